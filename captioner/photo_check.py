"""What is wrong with a photo that someone who cannot see it took, and how to take it again.

Photos taken by blind people are often blurred, too dark, too bright, sideways or cut off (VizWiz-QualityIssues:
77% have some flaw). PhotoCheck gives each photo a score in [0, 1] for each problem a person can fix (PROBLEMS),
names those over their thresholds with a short retake hint (HINTS), and says which quarter turn makes a sideways
or upside-down photo upright, only when it is confident.

The scores come from two kinds of evidence:
- image measures (`measures`): exposure, clipped pixels and sharpness, on a small grey copy of the whole photo at
  one fixed size (SIZE x SIZE, squashed as the CNN sees it), so blur is measured relative to the frame whatever
  the photo's resolution: a 12-megapixel phone photo and a 224-pixel one are measured alike; and the level of its
  brightest colour channel, as a saturated surface is lit however low its luma;
- where the caller has it, the CNN's pooled feature (confidence.pooled_features), which the captioner computes for
  every photo anyway: linear heads on it cost next to nothing.
All parameters are fitted by degrade.py on Flickr8k photos degraded the ways blind people's photos are, and on
rendered photos of lit screens and pages (mostly on a dark surround: a lit screen is not too dark, however dark the
room), clean and degraded alike, and stored in the checkpoint under "photo_check". Without that key (or without
a pooled feature) the image measures alone score blur, dark and bright with IMAGE_HEAD, fitted the same way;
rotation needs the CNN's feature.

Framing ("too close, cut off") is not named: a head on the CNN's feature finds crops of Flickr8k photos (dev AUC
0.92) but ranks the real photos that raters flagged for framing no better than chance, so it would mislead.
"""

import math

import numpy as np
from PIL import Image, ImageChops

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
    "v98",                                            # p98 of the brightest channel: a red wall is not dark
)
_EPS = 1e-6
# a photo none of whose pixels (but the brightest 2%) reaches this share of full brightness is too dark to see: the
# degraded photos the heads learnt from always keep some light and a phone's grain, and an all-black frame (a
# finger on the lens, a room with no light) scored 0.26 on the fitted check
DARK_FLOOR = 0.06

# The image-measures-only head for checkpoints without "photo_check" (or callers without a pooled feature):
# fitted by `python tools/degrade.py --fit` on Flickr8k's train split and the lit scenes made from it (its "image_head",
# printed with --print-image-head); thresholds chosen on dev. Plain numbers so that any checkpoint can use it.
IMAGE_HEAD = {
    "problems": ["blur", "dark", "bright"],
    "mean": [
        0.40001, 0.19154, 0.10083, 0.39164, 0.74865, 0.087365, 0.046373, -4.9497,
        -1.2935, 1.0248, 0.21828, -0.583, -4.2129, -2.4669, -0.57057, 0.7918,
    ],
    "std": [
        0.22318, 0.096614, 0.15934, 0.26188, 0.28149, 0.14639, 0.12468, 1.8602,
        2.0352, 0.63362, 1.6665, 1.8143, 1.8477, 1.4976, 0.60303, 0.28039,
    ],
    "bias": [
        -2.8438, -7.3209, -3.4563,
    ],
    "thresholds": [
        0.085654, 0.51411, 0.29161,
    ],
    "weights": [
        [
            -0.015129, 0.080181, 0.10971, 0.15542, -0.38499, 0.1272, 0.067789, -0.78245,
            -0.60408, 1.872, -1.5164, -0.28207, 0.2272, 0.76923, -1.4274, -0.59598,
        ],
        [
            -0.44304, -0.54617, -0.29258, -0.28578, -1.1628, 0.14162, -0.0097114, -0.11942,
            0.3737, 1.2069, 0.40036, 1.2067, 0.87402, -0.18247, -0.631, -1.525,
        ],
        [
            0.53797, 0.30647, 0.97726, 0.3379, 0.91952, 0.77053, 1.0396, -0.31936,
            0.080377, 0.68749, -0.094089, -0.24105, -0.15264, -0.32034, 0.020073, 0.29651,
        ],
    ],
}


def small_copy(image):
    """PIL image -> PIL RGB (or L) image of SIZE x SIZE: the whole frame squashed. A large image is first shrunk
    by an integer factor (reducing_gap), so a 12-megapixel photo costs little more."""
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    return image.resize((SIZE, SIZE), Image.Resampling.BILINEAR, reducing_gap=2.0)


def _value_p98(small):
    """The 98th percentile, in [0, 1], of the brightest of R, G and B of each pixel of small_copy: a saturated
    surface (a red wall, a blue screen) has a low luma but is lit. By PIL (numpy's max over channels costs 8x)."""
    if small.mode == "RGB":
        r, g, b = small.split()
        small = ImageChops.lighter(ImageChops.lighter(r, g), b)
    cdf = np.cumsum(small.histogram()) / (small.width * small.height)
    return np.searchsorted(cdf, 0.98) / 255.0


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
    small = small_copy(image)
    g = np.asarray(small.convert("L"), dtype=np.float32) / 255.0  # [S, S]
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
    # flat blocks count as unsharp, not sharp. The log in float64, rounded back: NumPy's float32 log differs from
    # machine to machine (and from JavaScript's) in the last bit; float64's is the same everywhere
    rel = np.log(((blocks_lap + _EPS) / (blocks_var + 1e-3)).astype(np.float64)).astype(np.float32).ravel()
    grad = np.abs(np.diff(g, axis=1))[:-1] + np.abs(np.diff(g, axis=0))[:, :-1]  # [S-1, S-1]
    return np.array([
        g.mean(), math.sqrt(var), p02, p50, p98,
        (u8 <= 8).mean(), (u8 >= 250).mean(),
        math.log(lap_var + _EPS), math.log((lap_var + _EPS) / (var + 1e-4)), math.log(ratio),
        rel.max(), np.sort(rel)[11], math.log(_quantile(np.abs(lap), 0.5) + 1e-4),
        math.log((grad > 0.1).mean() + 1e-3), math.log(_quantile(grad, 0.995) / (p98 - p02 + 0.02) + 1e-3),
        _value_p98(small),
    ], dtype=np.float32)


def _past(score, threshold):
    """A head's output moved so that its threshold (chosen on dev) lands on NAMED: sigmoid(logit(score) -
    logit(threshold)). The order of photos is kept; a score then reads the same way for every problem."""
    score, threshold = min(max(score, _EPS), 1 - _EPS), min(max(threshold, _EPS), 1 - _EPS)
    return 1.0 / (1.0 + math.exp(-(math.log(score / (1 - score)) - math.log(threshold / (1 - threshold)))))


def _array(x):
    """Numbers (a list, a NumPy array, a PyTorch tensor on the CPU, as a checkpoint holds them) -> float64 array:
    the heads compute in float64, as web/describe.js does in JavaScript's numbers, so both say the same."""
    return np.asarray(x, dtype=np.float64)


def _sigmoid(z):
    with np.errstate(over="ignore"):  # exp(-z) of a very negative z is inf, and the probability 0, as it should
        return 1.0 / (1.0 + np.exp(-z))


class _Head:
    """Logistic heads, one per problem, on standardised inputs: {"problems", "mean", "std", "weights" [P, D],
    "bias" [P], "thresholds" [P]}."""

    def __init__(self, state):
        self.problems = tuple(state["problems"])
        self.mean, self.std = _array(state["mean"]), _array(state["std"])
        self.weights, self.bias = _array(state["weights"]), _array(state["bias"])
        self.thresholds = dict(zip(self.problems, map(float, state["thresholds"])))

    def __call__(self, x):
        """Inputs [N, D] -> probabilities [N, P]: a NumPy array, or, for a PyTorch tensor in (degrade.py fits with
        them), a tensor of its dtype."""
        p = _sigmoid(((_array(x) - self.mean) / self.std) @ self.weights.T + self.bias)
        if isinstance(x, np.ndarray):
            return p
        import torch  # only a caller that has PyTorch gets here

        return torch.from_numpy(p).to(x.dtype)

    def state(self):
        """The head as plain lists: what it was made from."""
        return {"problems": list(self.problems), "mean": self.mean.tolist(), "std": self.std.tolist(),
                "weights": self.weights.tolist(), "bias": self.bias.tolist(),
                "thresholds": [self.thresholds[p] for p in self.problems]}


class PhotoCheck:
    """Scores a photo's fixable problems; see the module's docstring."""

    def __init__(self, state=None):
        """state: the checkpoint's "photo_check" (degrade.py --fit), or export_rules' dict (the same, as plain lists),
        or None for the image measures only."""
        if state and list(state["measures"]) != list(MEASURES):
            raise ValueError("the checkpoint's photo check was fitted on other image measures than this code's: "
                             "fit it again with python tools/degrade.py --fit")
        self.image_head = _Head(state["image_head"] if state else IMAGE_HEAD)  # always one: IMAGE_HEAD ships
        self.pooled_head = _Head(state["pooled_head"]) if state and state.get("pooled_head") else None
        up = state.get("upright") if state else None
        # (weights [4, F], bias [4], the probability of a turn above which to turn, and to name "rotated")
        self.upright = (_array(up["weights"]), _array(up["bias"]), float(up["turn_above"])) if up else None

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
        m = _array(image_measures).reshape(1, -1)  # [M] -> [1, M]
        out = {}
        if pooled is not None and self.pooled_head is not None:
            x = np.concatenate([m, _array(pooled).reshape(1, -1)], 1)  # [1, M + F]
            out.update(zip(self.pooled_head.problems, self.pooled_head(x)[0].tolist()))
        else:
            out.update(zip(self.image_head.problems, self.image_head(m)[0].tolist()))
        if pooled is not None and self.upright is not None:
            out["rotated"] = max(self.turn_probabilities(pooled)[1:])  # that one turn makes it upright
        if max(image_measures[MEASURES.index("p98")], image_measures[MEASURES.index("v98")]) < DARK_FLOOR:
            out["dark"] = 1.0  # nothing in the frame is lit: dark whatever the heads, which never saw a frame so black
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
        z = _array(pooled).reshape(-1) @ weights.T + bias  # [F] @ [F, 4] -> [4]
        e = np.exp(z - z.max())
        return (e / e.sum()).tolist()

    def upright_turn(self, pooled):
        """The clockwise turn (0, 90, 180 or 270) that makes a photo without text upright, from its pooled
        feature; 0 when unsure, when it is upright, or without a fitted upright head: a wrong turn is worse than
        none."""
        if pooled is None or self.upright is None:
            return 0
        probs = self.turn_probabilities(pooled)
        best = max(range(4), key=probs.__getitem__)
        return TURNS[best] if best and probs[best] > self.upright[2] else 0


def export_rules(checker):
    """A PhotoCheck as plain JSON types, for the runners that cannot import this file (web/describe.js) and to
    rebuild it without PyTorch (PhotoCheck(rules), runner.py): its heads ("image_head", "pooled_head" or
    None, "upright" or None: {"weights", "bias", "turn_above"}) and every constant the check uses."""
    up = checker.upright
    return {"measures": list(MEASURES), "image_head": checker.image_head.state(),
            "pooled_head": checker.pooled_head.state() if checker.pooled_head else None,
            "upright": {"weights": up[0].tolist(), "bias": up[1].tolist(), "turn_above": up[2]} if up else None,
            "problems": list(PROBLEMS), "hints": dict(HINTS), "named": NAMED, "turns": list(TURNS), "size": SIZE,
            "dark_floor": DARK_FLOOR, "eps": _EPS}
