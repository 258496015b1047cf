"""The captioner, top to bottom: a pretrained CNN encoder, an LSTM decoder, and greedy caption generation.

Show-and-Tell ("plain"): the CNN's pooled feature, projected to the embedding size, is the LSTM's first input;
the caption's words follow (in training the true ones, in generation its own). The attention decoders read the
CNN's regions at every word instead. `ModelArgs` is the model's whole shape, stored in every checkpoint.

Shapes: B images, N captions, T steps (a caption's words + 1: the decoder reads SOS w1 .. wn and predicts
w1 .. wn EOS, so with both SOS and EOS a caption is T + 1 tokens), V words in the vocabulary, F the CNN's feature
width, E the embedding size, H the LSTM's, R the CNN's regions (h * w of its feature map). Elsewhere, in captioner/:
the CNNs (backbones.py), beam search and sampling (search.py), ensembles (ensemble.py), faster runtimes
(runtimes.py, lstm_kernels.py: the attention decoders' loops over T run there).
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from captioner.backbones import ENCODERS, build_backbone
from captioner.lstm_kernels import lstm_kernel, lstm_step, output_where_read, shrinking_pass

# Every vocabulary starts with these words, in this order. PAD must be 0: padding and the loss's ignore_index
# rely on it.
SPECIALS = ["<PAD>", "<SOS>", "<EOS>", "<UNK>"]
PAD_IDX, SOS_IDX, EOS_IDX, UNK_IDX = range(len(SPECIALS))


@dataclass
class ModelArgs:
    vocab_size: int
    encoder: str = "inception_v3"  # one of backbones.ENCODERS
    embed_size: int = 256
    hidden_size: int = 256
    num_layers: int = 1
    dropout: float = 0.5
    decoder: str = "plain"  # one of DECODERS (at the end of the decoders, below)
    attention_dim: int = 256  # the attention decoders' attention layer

    def __post_init__(self):
        if self.decoder not in DECODERS:
            raise ValueError(f"unknown decoder {self.decoder!r}; choose from {', '.join(DECODERS)}")

    @property
    def feature_dim(self):
        return ENCODERS[self.encoder]["features"]

    @property
    def attention(self):
        """Whether the decoder attends over the CNN's regions (and so has attention maps)."""
        return DECODERS[self.decoder].regions


class CNN_encoder(nn.Module):
    """Pretrained CNN -> pooled feature [B, F] -> projection to the embedding size [B, E].
    For a decoder that attends, the feature map's regions instead: [B, R, F] -> [B, R, E]."""

    def __init__(self, args: ModelArgs, weights=None):
        super().__init__()
        self.spatial = args.attention
        self.backbone = build_backbone(args.encoder, weights)
        self.fc = nn.Linear(args.feature_dim, args.embed_size)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(args.dropout)
        self.train_cnn = False
        self.backbone.requires_grad_(False)

    def set_train_cnn(self, train_cnn):
        self.train_cnn = train_cnn
        self.backbone.requires_grad_(train_cnn)
        self.train(self.training)

    def train(self, mode=True):
        super().train(mode)
        if not self.train_cnn:  # a frozen CNN keeps its BatchNorm statistics and dropout in eval mode
            self.backbone.eval()
        return self

    def extract(self, images):
        """images [B, 3, S, S] -> features [B, F] or regions [B, R, F]: what a feature cache stands in for."""
        with torch.set_grad_enabled(self.train_cnn and torch.is_grad_enabled()):
            fmap = self.backbone.forward_features(images)  # [B, F, h, w]
        return self.pool(fmap)

    def pool(self, fmap):
        """[B, F, h, w] -> regions [B, h*w, F], or the mean over the map (the CNN's own global pool) [B, F]."""
        return fmap.flatten(2).transpose(1, 2) if self.spatial else fmap.mean((2, 3))

    def project(self, features):
        return self.dropout(self.relu(self.fc(features.float())))  # [.., F] -> [.., E]; cached ones are fp16

    def forward(self, images):
        return self.project(self.extract(images))


class RNN_decoder(nn.Module):
    help = "the image is the LSTM's first input (Show and Tell)"  # what --decoder's help says of it
    regions = False  # it reads one feature per image [N, E], not regions
    layers = None  # its LSTM has --num-layers layers
    state_batch_axes = (1, 1)  # (h, c), each [L, N, H]

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed = nn.Embedding(args.vocab_size, args.embed_size)
        self.lstm = nn.LSTM(args.embed_size, args.hidden_size, args.num_layers, batch_first=True,
                            dropout=args.dropout if args.num_layers > 1 else 0.0)
        self.linear = nn.Linear(args.hidden_size, args.vocab_size)
        self.dropout = nn.Dropout(args.dropout)

    def forward(self, features, tokens):
        """features [N, E], tokens [N, T] (SOS w1 .. wn, padded) -> logits [N, T, V] for (w1 .. wn EOS).
        The image is step 0; its output is not scored, it only sets the LSTM's state."""
        x = torch.cat([features.unsqueeze(1), self.dropout(self.embed(tokens))], dim=1)  # [N, 1 + T, E]
        with lstm_kernel(x, self.training):
            hiddens, _ = self.lstm(x)  # [N, 1 + T, H]
        return self.linear(self.dropout(hiddens[:, 1:]))  # [N, T, V]

    def start(self, features):
        """The LSTM state after reading the image: (h, c), each [L, N, H]."""
        zeros = features.new_zeros(self.lstm.num_layers, features.shape[0], self.lstm.hidden_size)
        return lstm_step(self.lstm, features, (zeros, zeros))[1]

    def step(self, tokens, state):
        """tokens [N] -> logits [N, V] for the next word, and the new state (h, c), each [L, N, H]."""
        x, state = lstm_step(self.lstm, self.embed(tokens), state)  # [N, E] -> [N, H]
        return self.linear(x), state

    @staticmethod
    def select(state, rows):
        """The state of the captions `rows` (beam search reorders and repeats captions)."""
        return tuple(s[:, rows] for s in state)


class _RegionDecoder(nn.Module):
    """What the decoders that attend over the image's regions [N, R, E] share: the additive attention, the pass
    over a caption, one generation step. A subclass gives `start(regions)` (the first state, a tuple whose
    tensors' batch axes are state_batch_axes) and `advance(word_emb, state)` (one word: -> (the output h [N, H]
    that predicts the next word, the next state, the weights [N, R] it looked at the regions with)), and has
    embed, linear, dropout, att_hidden and att_score."""

    regions = True

    def _weights(self, h, keys):
        """How much the LSTM in state h looks at each region: keys [N, R, A] + h [N, H] -> [N, R], rows sum to 1."""
        return self.att_score(torch.tanh(keys + self.att_hidden(h).unsqueeze(1))).squeeze(-1).softmax(-1)

    def forward(self, regions, tokens, with_attention=False):
        """regions [N, R, E], tokens [N, T] (SOS w1 .. wn, padded) -> logits [N, T, V] for (w1 .. wn EOS), and
        with_attention, the weights [N, T, R] each of them was predicted with too; both zero where tokens is PAD.
        It is `advance` at each word; lstm_kernels.py runs it so that each caption stops at its padding."""
        read = tokens != PAD_IDX  # [N, T]: padding only ever follows a caption
        emb = self.dropout(self.embed(tokens))  # [N, T, E]
        hidden, weights, padded = shrinking_pass(self.start, self.advance, regions, emb, read)  # [N,T,H], [N,T,R]
        logits = output_where_read(self.linear, self.dropout(hidden), read, padded)  # [N, T, V]
        return (logits, weights) if with_attention else logits

    def step(self, tokens, state):
        """tokens [N] -> logits [N, V] for the next word, and the new state."""
        h, state, _ = self.advance(self.embed(tokens), state)
        return self.linear(h), state

    @staticmethod
    def select(state, rows):
        """The state of the captions `rows` (beam search reorders and repeats captions): batch on axis 0."""
        return tuple(s[rows] for s in state)


class AttentionDecoder(_RegionDecoder):
    """Show, Attend and Tell (Xu et al. 2015), soft attention: at every word the LSTM looks again at the
    image's regions, weighted by how well each matches its state. Regions [N, R, E] stand for the image."""

    help = "Show, Attend and Tell: soft attention over the CNN's feature map at every word"
    state_batch_axes = (0, 0, 0, 0)  # h, c [N, H]; regions [N, R, E]; their attention keys [N, R, A]
    layers = "has one LSTM layer"  # what --num-layers 2 is told

    def __init__(self, args: ModelArgs):
        super().__init__()
        e, h, a = args.embed_size, args.hidden_size, args.attention_dim
        self.embed = nn.Embedding(args.vocab_size, e)
        self.init_h, self.init_c = nn.Linear(e, h), nn.Linear(e, h)
        self.att_regions, self.att_hidden, self.att_score = nn.Linear(e, a), nn.Linear(h, a), nn.Linear(a, 1)
        self.gate = nn.Linear(h, e)  # how much of the attended context to let in at this word
        self.cell = nn.LSTMCell(2 * e, h)
        self.linear = nn.Linear(h, args.vocab_size)
        self.dropout = nn.Dropout(args.dropout)

    def start(self, regions):
        mean = regions.mean(1)  # [N, R, E] -> [N, E]
        return torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean)), regions, self.att_regions(regions)

    def advance(self, word_emb, state):
        """One word [N, E]: -> (h [N, H], the next state, the weights [N, R] it looked at the regions with)."""
        h, c, regions, keys = state
        weights = self._weights(h, keys)  # [N, R]
        context = (weights.unsqueeze(-1) * regions).sum(1)  # [N, E]
        h, c = self.cell(torch.cat([word_emb, torch.sigmoid(self.gate(h)) * context], -1), (h, c))  # [N, 2E] in
        return h, (h, c, regions, keys), weights


class TopDownDecoder(_RegionDecoder):
    """The top-down decoder of Bottom-Up and Top-Down Attention (Anderson et al. 2018), over the CNN's grid of
    regions (not a detector's boxes): two LSTMs at every word. The attention LSTM reads the language LSTM's last
    output, the mean region and the word, and from its state the decoder chooses where to look; the language
    LSTM reads what it saw there and the attention LSTM's state, and says the next word. Both start from zeros."""

    # h1, c1 (attention LSTM), h2, c2 (language LSTM) [N, H]; regions [N, R, E]; their attention keys [N, R, A];
    # the mean region [N, E] (computed once, read at every word)
    help = ("Anderson et al.'s top-down decoder, an attention LSTM that chooses where to look at every word and a "
            "language LSTM that says it (one layer each)")
    state_batch_axes = (0, 0, 0, 0, 0, 0, 0)
    layers = "has two LSTMs of one layer each"

    def __init__(self, args: ModelArgs):
        super().__init__()
        e, h, a = args.embed_size, args.hidden_size, args.attention_dim
        self.embed = nn.Embedding(args.vocab_size, e)
        self.att_lstm = nn.LSTMCell(h + 2 * e, h)  # [language h, mean region, word]
        self.att_regions, self.att_hidden, self.att_score = nn.Linear(e, a), nn.Linear(h, a), nn.Linear(a, 1)
        self.lang_lstm = nn.LSTMCell(e + h, h)  # [attended region, attention h]
        self.linear = nn.Linear(h, args.vocab_size)
        self.dropout = nn.Dropout(args.dropout)

    def start(self, regions):
        # four tensors, not one four times: an export's encoder graph names each state output apart
        h1, c1, h2, c2 = (regions.new_zeros(regions.shape[0], self.lang_lstm.hidden_size) for _ in range(4))
        return h1, c1, h2, c2, regions, self.att_regions(regions), regions.mean(1)

    def advance(self, word_emb, state):
        """One word [N, E]: -> (the language LSTM's h [N, H], the next state, the weights [N, R] it used)."""
        h1, c1, h2, c2, regions, keys, mean = state
        h1, c1 = self.att_lstm(torch.cat([h2, mean, word_emb], -1), (h1, c1))  # [N, H + 2E] -> [N, H]
        weights = self._weights(h1, keys)  # [N, R]
        seen = (weights.unsqueeze(-1) * regions).sum(1)  # [N, E]
        h2, c2 = self.lang_lstm(torch.cat([seen, h1], -1), (h2, c2))  # [N, E + H] -> [N, H]
        return h2, (h1, c1, h2, c2, regions, keys, mean), weights


# The decoders by name (ModelArgs.decoder). A new decoder: its class, and a line here (see docs/extending.md).
DECODERS = {"plain": RNN_decoder, "attention": AttentionDecoder, "topdown": TopDownDecoder}


class CNN_RNN(nn.Module):
    # Attribute names follow the seed tutorial (encoderCNN, decoderRNN.embed/lstm/linear), so its
    # checkpoints map onto this model with few renames (see utils.model_from_seed_checkpoint).
    def __init__(self, args: ModelArgs, weights=None):
        super().__init__()
        self.args = args
        self.encoderCNN = CNN_encoder(args, weights)
        self.decoderRNN = DECODERS[args.decoder](args)

    @property
    def decoder_kind(self):
        """Its decoder, one of DECODERS: what a user-facing line names it."""
        return self.args.decoder

    @property
    def generator(self):
        """The decoder that generation runs (greedy_search below; captioner/search.py's generate): its own."""
        return self.decoderRNN

    def features(self, x, from_features=False):
        """Images [B, 3, S, S], or cached CNN features [B, F] / [B, R, F] when from_features -> [B, E] / [B, R, E]."""
        return self.encoderCNN.project(x) if from_features else self.encoderCNN(x)

    def forward(self, x, tokens, image_index=None, from_features=False, with_attention=False):
        """x: B images (or features); tokens [N, T]; image_index [N] names each caption's image (default:
        caption i belongs to image i). Each image is encoded once however many captions it has. -> logits
        [N, T, V], and with_attention (an attention decoder) the attention weights [N, T, R] too."""
        feats = self.features(x, from_features)  # [B, E] or [B, R, E]
        if image_index is not None:
            feats = feats[image_index]  # [N, E] or [N, R, E]
        if with_attention:
            return self.decoderRNN(feats, tokens, with_attention=True)
        return self.decoderRNN(feats, tokens)

    @torch.inference_mode()
    def attention_maps(self, x, captions, from_features=False):
        """For an attention decoder: each image's caption (word ids, as generate gives them) -> its attention
        over the CNN's feature map for each word, [words, h, w] (h = w: the map is square), in a list."""
        feats = self.features(x, from_features)
        maps = []
        for i, ids in enumerate(captions):
            tokens = torch.tensor([[SOS_IDX, *ids]], device=feats.device)
            _, weights = self.decoderRNN(feats[i:i + 1], tokens, with_attention=True)  # [1, words + 1, R]
            weights = weights[0, :len(ids)].float()  # [words, R]
            side = math.isqrt(weights.shape[-1])
            maps.append(weights.view(len(ids), side, side).cpu())  # [words, h, w]
        return maps


# ------------------------------------------------------------------------------------------ greedy decoding

NEVER_SAY = [PAD_IDX, SOS_IDX, UNK_IDX]  # generation never emits these: "<UNK>" is no word to read out


def trim_at_eos(ids):
    """Word ids up to the first EOS (or all of them)."""
    return ids[:ids.index(EOS_IDX)] if EOS_IDX in ids else ids


def next_word_logits(decoder, tokens, state):
    """One step of generation: tokens [N] -> logits [N, V] of the next word, the words it may not say at -inf."""
    logits, state = decoder.step(tokens, state)
    logits[:, NEVER_SAY] = -math.inf
    return logits, state


def batch_of(feats):
    """(images, device) of a decoder's input: a tensor, or an ensemble's tuple of them."""
    first = feats[0] if isinstance(feats, tuple) else feats
    return first.shape[0], first.device


def word_by_word(decoder, feats, max_len, choose):
    """One caption per row of feats, each next word picked from the logits [N, V] by `choose`.
    Returns word ids [N, steps], EOS included, PAD after it."""
    state = decoder.start(feats)
    n, device = batch_of(feats)
    tokens = torch.full((n,), SOS_IDX, dtype=torch.long, device=device)  # [N]
    done = torch.zeros_like(tokens, dtype=torch.bool)
    out = []
    for _ in range(max_len):
        logits, state = next_word_logits(decoder, tokens, state)  # [N, V]
        tokens = choose(logits).masked_fill(done, PAD_IDX)  # [N]
        out.append(tokens)
        done |= tokens == EOS_IDX
        if done.all():
            break
    return torch.stack(out, 1)  # [N, steps]


def greedy_search(decoder, feats, max_len):
    """The most likely next word at every step, for each image: word ids without SOS/EOS."""
    seqs = word_by_word(decoder, feats, max_len, lambda logits: logits.argmax(-1)).tolist()  # [B, steps]
    return [trim_at_eos(s) for s in seqs]
