"""What is wrong with a photo that someone who cannot see it took, and how to take it again.

Photos taken by blind people are often blurred, too dark, too bright, sideways or cut off (VizWiz-QualityIssues:
77% have some flaw). PhotoCheck gives each photo a score in [0, 1] for each problem a person can fix (PROBLEMS),
names those over their thresholds with a short retake hint (HINTS), and says which quarter turn makes a sideways
or upside-down photo upright, only when it is confident.

The scores come from two kinds of evidence:
- image measures (`measures`): exposure, clipped pixels and sharpness, on a small grey copy of the whole photo at
  one fixed size (SIZE x SIZE, squashed as the CNN sees it), so blur is measured relative to the frame whatever
  the photo's resolution: a 12-megapixel phone photo and a 224-pixel one are measured alike;
- where the caller has it, the CNN's pooled feature (confidence.pooled_features), which the captioner computes for
  every photo anyway: linear heads on it cost next to nothing.
All parameters are fitted by degrade.py on Flickr8k photos degraded the ways blind people's photos are, and stored
in the checkpoint under "photo_check". Without that key (or without a pooled feature) the image measures alone
score blur, dark and bright with IMAGE_HEAD, fitted the same way; rotation needs the CNN's feature.

Framing ("too close, cut off") is not named: a head on the CNN's feature finds crops of Flickr8k photos (dev AUC
0.92) but ranks the real photos that raters flagged for framing no better than chance, so it would mislead.
"""

import math

import numpy as np
import torch
from PIL import Image

# in the order a spoken description should name them: what spoils the whole photo first, the tool's own fix last
PROBLEMS = ("dark", "bright", "blur", "rotated")
HINTS = {
    "dark": "It is too dark to see: turn on a light.",
    "bright": "It is too bright: move away from the light or turn off the flash.",
    "blur": "The photo is blurry: hold the phone still and try again.",
    # named where the check is sure enough to turn the photo upright (upright_turn); the hint claims no turn: one
    # turned says so itself ("Turned upright: ..."), and evaluate.py captions every photo as it was
    "rotated": "The photo is on its side or upside down: hold the phone upright.",
}
NAMED = 0.5  # a score above which its problem is named (each head's threshold, chosen on dev, maps to it)
TURNS = (0, 90, 180, 270)  # clockwise quarter turns, the classes of the upright head
SIZE = 224  # side of the grey copy the measures are taken on: Flickr8k's, so the fit sees its photos unresampled
MEASURES = (
    "mean", "std", "p02", "p50", "p98",            # luma level and spread (0..1)
    "black", "white",                                 # share of pixels crushed to black / clipped to white
    "log_lap_var",                                    # log variance of the Laplacian (the classic sharpness measure)
    "log_lap_rel",                                    # ... relative to the luma variance (contrast-free)
    "log_grad_ratio",                                 # gradient energy at SIZE against at SIZE/2: falls with blur
    "log_block_max", "log_block_q75",                 # sharpness of the sharpest / a sharp 4x4 block, contrast-free
    "log_noise",                                      # median |Laplacian|: the grain a phone adds in the dark
    "log_edge_density",                               # share of pixels with a strong gradient
    "log_edge_steep",                                 # the steepest edges against the contrast: blur softens them
)
_EPS = 1e-6

# The image-measures-only head for checkpoints without "photo_check" (or callers without a pooled feature):
# fitted by `python degrade.py --fit` on Flickr8k's train split (its "image_head", printed with --print-image-head);
# thresholds chosen on dev. Plain numbers so that any checkpoint can use it.
IMAGE_HEAD = {
    "problems": ["blur", "dark", "bright"],
    "mean": [
        0.43955, 0.18925, 0.11241, 0.43922, 0.78003, 0.05337, 0.04131, -4.6781,
        -1.0741, 1.0728, 0.40306, -0.26144, -3.5643, -2.164, -0.57996,
    ],
    "std": [
        0.20947, 0.08256, 0.16331, 0.23968, 0.25623, 0.10083, 0.11881, 1.8568,
        2.0331, 0.65017, 1.6797, 1.7671, 1.1915, 1.4667, 0.60216,
    ],
    "bias": [
        -3.4987, -10.791, -6.0479,
    ],
    "thresholds": [
        0.0392, 0.00757, 0.32931,
    ],
    "weights": [
        [
            0.03933, -0.6044, -0.26045, -0.03406, -0.84123, -0.08961, 0.36545, -1.08,
            -0.42437, 2.764, -1.239, -1.725, 0.58094, 0.77998, -1.9299,
        ],
        [
            -1.1575, -1.575, -0.983, -0.68743, -3.0438, -0.41486, -0.0045, -0.69189,
            0.84098, 1.8667, 0.63805, 0.47357, 0.61014, -0.63914, -0.6588,
        ],
        [
            1.2383, 0.89144, 2.1032, -0.63126, 3.6558, 0.54138, 1.8598, -0.58472,
            1.7679, 0.18446, -0.48998, -0.73346, 0.20871, -0.01385, -0.27264,
        ],
    ],
}


def grey_copy(image):
    """PIL image -> float32 [SIZE, SIZE] luma in [0, 1]: the whole frame squashed to SIZE x SIZE. A large image
    is first shrunk by an integer factor (reducing_gap), so a 12-megapixel photo costs little more."""
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    small = image.resize((SIZE, SIZE), Image.Resampling.BILINEAR, reducing_gap=2.0).convert("L")
    return np.asarray(small, dtype=np.float32) / 255.0


def _laplacian(g):
    """4-neighbour Laplacian of [H, W] -> [H-2, W-2]."""
    return g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4 * g[1:-1, 1:-1]


def _grad_energy(g):
    """Mean squared forward difference, both ways, of [H, W]."""
    return float(np.square(np.diff(g, axis=0)).mean() + np.square(np.diff(g, axis=1)).mean())


def _quantile(x, q):
    """The q quantile of an array's values, by partition (np.quantile sorts more than it needs)."""
    flat = x.ravel()
    k = min(int(q * flat.size), flat.size - 1)
    return float(np.partition(flat, k)[k])


def measures(image):
    """PIL image -> the MEASURES, float32 [M]."""
    g = grey_copy(image)  # [S, S]
    u8 = np.clip(g * 255 + 0.5, 0, 255).astype(np.uint8)
    cdf = np.cumsum(np.bincount(u8.ravel(), minlength=256)) / u8.size
    p02, p50, p98 = (np.searchsorted(cdf, q) / 255.0 for q in (0.02, 0.5, 0.98))
    var = float(g.var())
    lap = _laplacian(g)  # [S-2, S-2]
    lap_var = float(lap.var())
    half = g.reshape(SIZE // 2, 2, SIZE // 2, 2).mean((1, 3))  # [S/2, S/2], 2x2 box
    # a smooth (blurred) ramp's step per pixel doubles at half size (4x the energy): ratio ~1 there, up to 16 for
    # detail at the pixel level (or noise)
    ratio = (4 * _grad_energy(g) + _EPS) / (_grad_energy(half) + _EPS)
    b = (SIZE - 2) // 4
    blocks_lap = lap[:4 * b, :4 * b].reshape(4, b, 4, b).var((1, 3))  # [4, 4] per-block Laplacian variance
    blocks_var = g[1:1 + 4 * b, 1:1 + 4 * b].reshape(4, b, 4, b).var((1, 3))
    rel = np.log((blocks_lap + _EPS) / (blocks_var + 1e-3)).ravel()  # flat blocks count as unsharp, not sharp
    grad = np.abs(np.diff(g, axis=1))[:-1] + np.abs(np.diff(g, axis=0))[:, :-1]  # [S-1, S-1]
    return np.array([
        g.mean(), math.sqrt(var), p02, p50, p98,
        (u8 <= 8).mean(), (u8 >= 250).mean(),
        math.log(lap_var + _EPS), math.log((lap_var + _EPS) / (var + 1e-4)), math.log(ratio),
        rel.max(), np.sort(rel)[11], math.log(_quantile(np.abs(lap), 0.5) + 1e-4),
        math.log((grad > 0.1).mean() + 1e-3), math.log(_quantile(grad, 0.995) / (p98 - p02 + 0.02) + 1e-3),
    ], dtype=np.float32)


def _past(score, threshold):
    """A head's output moved so that its threshold (chosen on dev) lands on NAMED: sigmoid(logit(score) -
    logit(threshold)). The order of photos is kept; a score then reads the same way for every problem."""
    score, threshold = min(max(score, _EPS), 1 - _EPS), min(max(threshold, _EPS), 1 - _EPS)
    return 1.0 / (1.0 + math.exp(-(math.log(score / (1 - score)) - math.log(threshold / (1 - threshold)))))


def _tensor(x):
    return torch.as_tensor(x, dtype=torch.float32)


class _Head:
    """Logistic heads, one per problem, on standardised inputs: {"problems", "mean", "std", "weights" [P, D],
    "bias" [P], "thresholds" [P]}."""

    def __init__(self, state):
        self.problems = tuple(state["problems"])
        self.mean, self.std = _tensor(state["mean"]), _tensor(state["std"])
        self.weights, self.bias = _tensor(state["weights"]), _tensor(state["bias"])
        self.thresholds = dict(zip(self.problems, map(float, state["thresholds"])))

    def __call__(self, x):
        """Inputs [N, D] -> probabilities [N, P]."""
        return torch.sigmoid(((x - self.mean) / self.std) @ self.weights.T + self.bias)


class PhotoCheck:
    """Scores a photo's fixable problems; see the module's docstring."""

    def __init__(self, state=None):
        """state: the checkpoint's "photo_check" (degrade.py --fit), or None for the image measures only."""
        if state and list(state["measures"]) != list(MEASURES):
            raise ValueError("the checkpoint's photo check was fitted on other image measures than this code's: "
                             "fit it again with python degrade.py --fit")
        self.image_head = _Head(state["image_head"] if state else IMAGE_HEAD)  # always one: IMAGE_HEAD ships
        self.pooled_head = _Head(state["pooled_head"]) if state and "pooled_head" in state else None
        up = state.get("upright") if state else None
        # (weights [4, F], bias [4], the probability of a turn above which to turn, and to name "rotated")
        self.upright = (_tensor(up["weights"]), _tensor(up["bias"]), float(up["turn_above"])) if up else None

    @classmethod
    def from_checkpoint(cls, ckpt):
        """The check a loaded checkpoint carries (its "photo_check"), or the image measures alone."""
        return cls(ckpt.get("photo_check"))

    def scores(self, image, pooled=None):
        """image: upright PIL RGB, as the captioner loads it; pooled: the CNN's pooled feature [F] (or [1, F]),
        or None -> {problem: score in [0, 1]} for each problem this check can measure, in PROBLEMS order; a
        problem is named above NAMED."""
        return self.scores_of(measures(image), pooled)

    def scores_of(self, image_measures, pooled=None):
        """scores() of a photo whose measures() were taken already (where it was loaded, before captioning)."""
        m = _tensor(image_measures).unsqueeze(0)  # [1, M]
        out = {}
        if pooled is not None and self.pooled_head is not None:
            x = torch.cat([m, _tensor(pooled).reshape(1, -1)], 1)  # [1, M + F]
            out.update(zip(self.pooled_head.problems, self.pooled_head(x)[0].tolist()))
        else:
            out.update(zip(self.image_head.problems, self.image_head(m)[0].tolist()))
        if pooled is not None and self.upright is not None:
            out["rotated"] = max(self.turn_probabilities(pooled)[1:])  # that one turn makes it upright
        th = self.thresholds(pooled_available=pooled is not None)
        return {p: round(_past(float(out[p]), th[p]), 4) for p in PROBLEMS if p in out}

    def thresholds(self, pooled_available=True):
        """{problem: the score above which it is named}."""
        th = dict(self.image_head.thresholds)
        if pooled_available and self.pooled_head is not None:
            th.update(self.pooled_head.thresholds)
        if pooled_available and self.upright is not None:
            th["rotated"] = self.upright[2]
        return th

    def problems(self, scores):
        """scores (from scores()) -> [{"problem", "score", "hint"}] for each score over NAMED, in PROBLEMS order:
        a photo too dark to see is said to be dark before it is said to be blurred."""
        return [{"problem": p, "score": s, "hint": HINTS[p]} for p, s in scores.items() if s > NAMED]

    def turn_probabilities(self, pooled):
        """The pooled feature [F] -> the probability [4] that each of TURNS (clockwise) makes the photo upright."""
        weights, bias = self.upright[:2]
        return torch.softmax(_tensor(pooled).reshape(1, -1) @ weights.T + bias, 1)[0].tolist()

    def upright_turn(self, pooled):
        """The clockwise turn (0, 90, 180 or 270) that makes a photo without text upright, from its pooled
        feature; 0 when unsure, when it is upright, or without a fitted upright head: a wrong turn is worse than
        none."""
        if pooled is None or self.upright is None:
            return 0
        probs = self.turn_probabilities(pooled)
        best = max(range(4), key=probs.__getitem__)
        return TURNS[best] if best and probs[best] > self.upright[2] else 0
