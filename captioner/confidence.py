"""How sure a caption is, and how to say it to someone who cannot see the photo.

Each caption comes with signals of what the decoder and the CNN knew when it was written (SIGNALS); a fit made
on the dev split (`evaluate.py --calibrate`, stored in the checkpoint as plain types) turns them into
`confidence`, the estimated probability that the caption is good (TARGET), and into three levels, whose
thresholds are chosen on dev too. The decoder's own probabilities cannot tell a photo of nothing (an all-black
frame is captioned as fluently as a beach), so one signal looks at the image: how far the CNN's pooled feature
lies from those of real photos (training photos kept in the fit). A photo less familiar than nearly all of the
dev photos the fit was made on is `unfamiliar`: its caption gets no confidence and its alt text abstains.
"""

import math

import torch

from captioner import search
from captioner.ensemble import cnn_once
from captioner.search import generate

SIGNALS = (
    "mean_word_logp",     # mean log-probability of the caption's words and its end
    "min_word_logp",      # its least likely word
    "mean_margin",        # mean gap, in log-probability, between each word and the likeliest other word
    "words",              # length
    "attention_entropy",  # how spread the attention over the regions was (0: one region, 1: uniform; 0 if none)
    "familiarity",        # mean cosine similarity of the pooled CNN feature to its NEAREST among real photos
)
NEAREST = 5
GOOD_CIDER = 0.5  # TARGET, as a number
TARGET = f"the caption's CIDEr-D against the photo's own reference captions is at least {GOOD_CIDER}"
LEVELS = ("low", "medium", "high")


@torch.inference_mode()
def captions_with_signals(model, x, beam=3, max_len=40, length_penalty=0.0, n_best=None, from_features=False):
    """Caption images x [B, 3, S, S] -> (word ids per image, the n-best lists per image or None, the decoder's
    signals [B, 5], the CNN's pooled features [B, F] as it gives them: see decoder_signals and Calibration; the
    photo check reads them at unit length, pooled_features, and the ImageNet head of things.py as they are). The
    captions are generate()'s (n_best()'s best) for the same settings. from_features: x is the CNN's (cached)
    features."""
    inp, from_features = cnn_once(model, x, from_features)  # the CNN once, for generation and the signals
    if n_best:
        best = search.n_best(model, inp, n_best, max_len, beam, length_penalty, from_features=from_features)
        ids = [b[0]["ids"] for b in best]
    else:
        best = None
        ids = generate(model, inp, max_len=max_len, beam=beam, length_penalty=length_penalty,
                             from_features=from_features)
    raw = inp if from_features else model.encoderCNN.extract(x)
    return ids, best, decoder_signals(model, inp, from_features, ids), pooled_mean(raw)


def decoder_signals(model, inp, from_features, ids):
    """The first five SIGNALS, [N, 5], of each caption `ids` of the images whose generation input is `inp`."""
    logp, words = search.word_log_probs(model, inp, ids, from_features=from_features)  # [N, T, V], [N, T]
    mask = words != 0  # PAD after each caption's EOS
    chosen = logp.gather(-1, words.unsqueeze(-1)).squeeze(-1)  # [N, T]; -inf at PAD, a banned word
    other = logp.scatter(-1, words.unsqueeze(-1), -math.inf).amax(-1)  # the likeliest word not chosen
    n = mask.sum(1)
    mean = chosen.masked_fill(~mask, 0.0).sum(1) / n
    least = chosen.masked_fill(~mask, math.inf).amin(1)
    margin = (chosen - other).clamp(min=-20).masked_fill(~mask, 0.0).sum(1) / n
    entropy = torch.zeros_like(mean)
    if model.args.attention and all(ids):
        for i, m in enumerate(model.attention_maps(inp, ids, from_features=from_features)):  # [words, h, w] each
            w = m.flatten(1).float().clamp(min=1e-12)
            entropy[i] = (-(w * w.log()).sum(1) / math.log(w.shape[1])).mean()
    return torch.stack([mean, least, margin, (n - 1).float(), entropy], 1).cpu()


def pooled_mean(raw):
    """The CNN's features [N, F] or regions [N, R, F] -> the pooled feature [N, F] as the CNN gives it (the mean
    of its last feature map), float, on the CPU."""
    return (raw.float().mean(1) if raw.dim() == 3 else raw.float()).cpu()


def pooled_features(raw):
    """The CNN's features [N, F] or regions [N, R, F] (or pooled_mean's [N, F]) -> the pooled feature [N, F], unit
    length, on the CPU: how the fits on it (familiarity, the photo check) compare photos, whatever their contrast."""
    return torch.nn.functional.normalize(pooled_mean(raw), dim=1)


def familiarity(pooled, bank):
    """Mean cosine similarity of each unit feature [N, F] to its NEAREST in the bank [K, F] of real photos."""
    return (pooled @ bank.float().T).topk(min(NEAREST, bank.shape[0]), 1).values.mean(1)


class Calibration:
    """A fit of SIGNALS to the chance that a caption is good: the signals standardised, a logistic regression,
    the levels' thresholds on its output, and the real photos (unit features) that familiarity is measured
    against. Held in a checkpoint as the plain dict `state`."""

    def __init__(self, state):
        self.state = state

    @classmethod
    def fit(cls, decoder, pooled, good, bank, about):
        """decoder [N, 5] and pooled [N, F]: dev photos' signals and pooled features (at any length); good [N] bool:
        TARGET met; bank [K, F]: unit features of training photos; about: a dict of plain facts stored with the
        fit."""
        fam = familiarity(pooled_features(pooled), bank)
        x = torch.cat([decoder, fam.unsqueeze(1)], 1).double()
        mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
        weights, bias = _logistic((x - mean) / std, good.double())
        state = {"signals": list(SIGNALS), "mean": mean.tolist(), "std": std.tolist(), "weights": weights.tolist(),
                 "bias": bias, "bank": bank.half(), "target": TARGET, "good_cider": GOOD_CIDER,
                 # below all but the least familiar 1% of dev photos: not a photo like those it learnt from
                 "familiar_above": float(fam.quantile(0.01)), **about}
        calibration = cls(state)
        confidence = calibration.assess(decoder, pooled)[0]
        thirds = confidence.quantile(torch.tensor([1 / 3, 2 / 3], dtype=confidence.dtype))
        state["thresholds"] = dict(zip(LEVELS[1:], thirds.tolist()))
        return calibration

    def assess(self, decoder, pooled):
        """decoder [N, 5] and pooled [N, F] (at any length) -> (confidence [N] in [0, 1], levels [N] of LEVELS,
        unfamiliar [N] bool). An unfamiliar photo's confidence is 0: the fit never saw such an image, and a caption
        of a photo of nothing cannot be good."""
        s = self.state
        fam = familiarity(pooled_features(pooled), s["bank"])
        x = torch.cat([decoder, fam.unsqueeze(1)], 1).double()
        z = (x - torch.tensor(s["mean"], dtype=torch.double)) / torch.tensor(s["std"], dtype=torch.double)
        confidence = torch.sigmoid(z @ torch.tensor(s["weights"], dtype=torch.double) + s["bias"])
        unfamiliar = fam < s["familiar_above"]
        confidence = confidence.masked_fill(unfamiliar, 0.0)
        return confidence, [self.level(c) for c in confidence.tolist()], unfamiliar

    def level(self, confidence):
        t = self.state.get("thresholds", {})
        return "high" if confidence >= t.get("high", 1) else "medium" if confidence >= t.get("medium", 1) else "low"


def _logistic(x, y, l2=1e-2):
    """Logistic regression of y [N] on x [N, D] (standardised), lightly L2-regularised: (weights [D], bias)."""
    w = torch.zeros(x.shape[1] + 1, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)

    def loss():
        opt.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(xb @ w, y) + l2 * w[:-1].pow(2).sum()
        value.backward()
        return value

    with torch.enable_grad():
        opt.step(loss)
    w = w.detach()
    return w[:-1], float(w[-1])


def reliability(confidence, levels, cider, good):
    """Per level: photos, their mean CIDEr-D, the share of good captions, the mean confidence; and the
    calibration error (calibration_error) over all."""
    table = {}
    for level in LEVELS:
        inside = torch.tensor([v == level for v in levels])
        n = int(inside.sum())
        table[level] = {"photos": n, "mean_cider": float(cider[inside].mean()) if n else None,
                        "good": float(good[inside].double().mean()) if n else None,
                        "mean_confidence": float(confidence[inside].mean()) if n else None}
    return {"levels": table, "calibration_error": calibration_error(confidence, good), "target": TARGET}


def calibration_error(confidence, good, bins=10):
    """Mean |confidence - observed rate of good captions| over `bins` equal-width bins, weighted by count."""
    which = (confidence * bins).long().clamp(max=bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.sum().item() * abs(confidence[inside].mean().item() - good[inside].double().mean().item())
    return total / len(confidence)
