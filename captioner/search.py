"""Captions from a model, word by word: `generate` and its table of searches (greedy decoding, which
image_intial_model.py holds, and beam search), a beam search's n best captions, sampling (self-critical training),
and the log-probabilities of given captions.

The searches take a `decoder` with start/step/select (a model's decoderRNN, an EnsembleDecoder, or a runtime's copy
of one) and `feats`, the decoder's input for B images. `generate`, `n_best` and `word_log_probs` take a whole model
that generates: anything with `features(x, from_features)` and a `generator` (the decoder it generates with): one
CNN_RNN, several as one (ensemble.Ensemble), or a frozen model as a faster runtime runs it (runtimes.FrozenModel).
"""

import math

import torch

from image_intial_model import (
    EOS_IDX,
    NEVER_SAY,
    PAD_IDX,
    SOS_IDX,
    batch_of,
    greedy_search,
    next_word_logits,
    trim_at_eos,
    word_by_word,
)


@torch.inference_mode()  # lighter than no_grad: generation is many small ops
def generate(model, x, max_len=40, beam=1, length_penalty=0.0, from_features=False, search=None):
    """Captions as lists of word ids (without SOS/EOS), one per image of x (images, or the CNN's features when
    from_features). search: a name in SEARCHES; by default greedy where beam is 1, else a beam search of `beam`."""
    feats = model.features(x, from_features)
    return SEARCHES[search or ("greedy" if beam == 1 else "beam")](model.generator, feats, max_len, beam,
                                                                   length_penalty)


def greedy(decoder, feats, max_len, beam=1, length_penalty=0.0):
    """image_intial_model.greedy_search, in the searches' common signature (it has no beams to rank)."""
    return greedy_search(decoder, feats, max_len)


def beam_search(decoder, feats, max_len, k, length_penalty=0.0):
    """The best caption of a beam search of K beams, for each of B images: word ids without SOS/EOS."""
    return [best[0]["ids"] for best in n_best_search(decoder, feats, max_len, k, 1, length_penalty)]


def n_best_search(decoder, feats, max_len, k, n=1, length_penalty=0.0):
    """Batched beam search over B images at once, K beams each; for each image its n best captions (n <= K),
    best first: [{"ids": word ids without SOS/EOS, "log_prob": float, "length": words with EOS}, ...].

    Finished beams keep their score and only extend with EOS. The ranking divides each beam's
    log-probability by (length ** length_penalty): 0 ranks by probability, about 0.7 favours longer
    captions. Each step records only (parent beam, word); the captions are read back at the end."""
    b, device = batch_of(feats)
    offsets = torch.arange(b, device=device).unsqueeze(1) * k  # [B, 1]: row of each image's first beam
    state = decoder.select(decoder.start(feats), torch.arange(b, device=device).repeat_interleave(k))  # B*K rows
    scores = torch.full((b, k), -math.inf, device=device)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    tokens = torch.full((b * k,), SOS_IDX, dtype=torch.long, device=device)
    done = torch.zeros((b, k), dtype=torch.bool, device=device)
    lengths = torch.zeros((b, k), device=device)
    parents, words = [], []
    for _ in range(max_len):
        logits, state = next_word_logits(decoder, tokens, state)
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
    n, device = batch_of(feats)
    words = torch.full((n, max(map(len, captions)) + 1), PAD_IDX, dtype=torch.long)
    for i, ids in enumerate(captions):
        words[i, :len(ids) + 1] = torch.tensor([*ids, EOS_IDX])
    words = words.to(device)
    state, tokens, out = decoder.start(feats), torch.full((n,), SOS_IDX, dtype=torch.long, device=device), []
    for t in range(words.shape[1]):
        logits, state = next_word_logits(decoder, tokens, state)
        out.append(logits.float().log_softmax(-1))
        tokens = words[:, t]  # PAD after a caption's EOS: its later steps are never read
    return torch.stack(out, 1), words


def sample_captions(decoder, feats, max_len):
    """One random caption per row of feats, each word drawn from the model's next-word distribution
    (self-critical training). Returns word ids [N, steps], EOS included, PAD after it."""
    return word_by_word(decoder, feats, max_len,
                         lambda logits: torch.multinomial(logits.float().softmax(-1), 1).squeeze(1))


def caption_log_probs(logits, words):
    """Log-probability of each caption: logits [N, T, V] (from the decoder's forward), words [N, T] padded
    with PAD -> [N]. Generation's banned words are banned here too, so these are the sampler's probabilities."""
    banned = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    banned[NEVER_SAY] = True
    logits = logits.float().masked_fill(banned, -math.inf)
    logp = logits.log_softmax(-1).gather(-1, words.unsqueeze(-1)).squeeze(-1)  # [N, T]
    return logp.masked_fill(words == PAD_IDX, 0.0).sum(1)


@torch.inference_mode()
def n_best(model, x, n, max_len=40, beam=3, length_penalty=0.0, from_features=False):
    """Each image's n best captions of a beam search (n <= beam), best first (n_best_search), for a model that
    generates (see above): its images x, or its cached features when from_features."""
    return n_best_search(model.generator, model.features(x, from_features), max_len, beam, n, length_penalty)


@torch.inference_mode()
def word_log_probs(model, x, captions, from_features=False):
    """How sure a model that generates was of each word of given captions (teacher_forced)."""
    return teacher_forced(model.generator, model.features(x, from_features), captions)


# The searches by name: (decoder, feats, max_len, beam, length_penalty) -> each image's word ids. A new search is its
# function and a line here (docs/extending.md); generate(..., search=NAME) runs it.
SEARCHES = {"greedy": greedy, "beam": beam_search}
