"""Fit the photo check on measured sets: its logistic heads and upright head on train, thresholds on dev, and
write it into a checkpoint; and the ROC AUC its choices and degrade.py's reports are made with.
"""

import statistics

import numpy as np
import torch
import torch.nn.functional as F

from captioner import photo_check
from captioner.confidence import _logistic
from tools.degradations import DEGRADABLE, VERSION
from utils import load_checkpoint, save_checkpoint

IMAGE_PROBLEMS = ("blur", "dark", "bright")  # those the image measures alone can score
CLEAN_GOAL = 0.08  # share of clean dev photos with any problem named that the thresholds aim at (the goal: 0.1)
# "Too dark: turn on a light" said of a lit screen or a page sends a person looking for a light for nothing, and
# the dark dev photos score far above all others (AUC 1.000). So dark's threshold names at most CLEAN_CAP's share
# of the clean dev photos (Flickr8k's and lit scenes), and it goes further up, to the score that still names KEEP's
# share of the dark dev photos: into the gap between the two, not at the edge of the clean photos' scores, where a
# real photo a little unlike them (a screen in a dark room) would be named
CLEAN_CAP = {"dark": 0.002}
KEEP = {"dark": 0.995}
# share of dev photos that may get a wrong turn, where the upright threshold is chosen: strict, as real photos
# (close-ups of objects) are less familiar to the head than Flickr8k's
WRONG_TURN_GOAL = 0.002


def _standardiser(x):
    return x.mean(0), x.std(0).clamp(min=1e-4)


def fit_head(x, labels, problems, l2):
    """Logistic heads (photo_check._Head's state, thresholds still unset) of each problem on inputs x [N, D]."""
    mean, std = _standardiser(x)
    z = ((x - mean) / std).double()
    fits = [_logistic(z, labels[:, DEGRADABLE.index(p)].double(), l2) for p in problems]
    return {"problems": list(problems), "mean": mean, "std": std,
            "weights": torch.stack([w.float() for w, _ in fits]), "bias": torch.tensor([b for _, b in fits]),
            "thresholds": [0.5] * len(problems)}


def fit_upright(pooled, turn, l2=1e-3):
    """Softmax regression of the turn (index into TURNS) on the pooled feature [N, F], its standardisation folded
    into the weights: {"weights" [4, F], "bias" [4]}."""
    mean, std = _standardiser(pooled)
    z = ((pooled - mean) / std).double()
    w = torch.zeros(len(photo_check.TURNS), z.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=300, line_search_fn="strong_wolfe")
    zb = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], 1)

    def loss():
        opt.zero_grad()
        value = F.cross_entropy(zb @ w.T, turn) + l2 * w[:, :-1].pow(2).sum()
        value.backward()
        return value

    with torch.enable_grad():
        opt.step(loss)
    w = w.detach().float()
    weights = w[:, :-1] / std  # [4, F]: on the raw pooled feature
    return {"weights": weights, "bias": w[:, -1] - weights @ mean}


def head_inputs(data, pooled=True):
    """A measured set's inputs for the pooled head [N, M + F], or for the image head [N, M]."""
    m = data["measures"].float()
    return torch.cat([m, data["pooled"].float()], 1) if pooled else m


def choose_thresholds(scores_clean, problems, goal=CLEAN_GOAL, also=None, floors=None):
    """Scores of clean photos [N, P] for `problems` -> (a, one threshold per problem): each problem's (1 - a)
    quantile with the one tail share a that names any problem (or `also` [N] holds) on at most `goal` of the clean
    photos; a problem in CLEAN_CAP names at most its share of them, whatever a; no threshold is below its `floors`
    [P] (default none)."""
    also = torch.zeros(len(scores_clean), dtype=torch.bool) if also is None else also
    cap = torch.tensor([CLEAN_CAP.get(p, 1.0) for p in problems])
    floors = torch.zeros(len(problems)) if floors is None else torch.as_tensor(floors, dtype=torch.float32)

    def thresholds(a):
        share = torch.minimum(cap, torch.tensor(a)).tolist()
        th = torch.stack([torch.quantile(scores_clean[:, j], 1 - q) for j, q in enumerate(share)])
        return torch.maximum(th, floors).clamp(max=0.99)

    lo, hi = 0.0, goal
    for _ in range(30):  # bisection on a
        a = (lo + hi) / 2
        lo, hi = (a, hi) if ((scores_clean > thresholds(a)).any(1) | also).float().mean() <= goal else (lo, a)
    return lo, thresholds(lo).tolist()


def keep_floors(scores, labels, problems):
    """Scores [N, P] of dev photos, clean and degraded, for `problems` -> the lowest threshold of each problem in
    KEEP (the score that still names KEEP's share of the photos that have it), 0 for the others [P]."""
    return torch.stack([torch.quantile(scores[labels[:, DEGRADABLE.index(p)] > 0, j], 1 - KEEP[p])
                        if p in KEEP else torch.tensor(0.0) for j, p in enumerate(problems)])


def choose_turn_above(probs, turn, goal=WRONG_TURN_GOAL):
    """Turn probabilities [N, 4] and the right turns [N] -> the lowest probability above which turning gets at most
    `goal` of the photos turned wrongly."""
    best, p = probs[:, 1:].max(1)
    p = p + 1
    for above in [x / 100 for x in range(50, 100)]:
        turned = best > above
        if (turned & (p != turn)).float().mean() <= goal:
            return above
    return 0.99


def fit(train, dev):
    """The photo check's state: heads fitted on train (L2 strength chosen on dev), thresholds chosen on dev."""
    state = {"version": VERSION, "size": photo_check.SIZE, "measures": list(photo_check.MEASURES)}
    for key, problems, pooled in (("image_head", IMAGE_PROBLEMS, False), ("pooled_head", DEGRADABLE, True)):
        best = None
        for l2 in (1e-4, 1e-3, 1e-2):
            head = fit_head(head_inputs(train, pooled), train["labels"], problems, l2)
            probs = photo_check._Head(head)(head_inputs(dev, pooled))  # [N, P]
            auc = statistics.mean(roc_auc(probs[:, j], dev["labels"][:, DEGRADABLE.index(p)])
                                  for j, p in enumerate(problems))
            print(f"{key}: L2 {l2:g}: mean dev AUC {auc:.4f}")
            best = max(best or (auc, l2, head), (auc, l2, head), key=lambda t: t[0])
        state[key] = best[2]
    state["upright"] = fit_upright(train["pooled"].float(), train["turn"])
    return set_thresholds(state, dev)


def set_thresholds(state, dev):
    """Choose the state's thresholds on dev: the upright head's turn first (at most WRONG_TURN_GOAL of the photos
    turned wrongly), then those of the problems named, for at most CLEAN_GOAL of the clean photos named anything
    (the turns of clean photos included; dark's share capped by CLEAN_CAP, its threshold raised to KEEP's). The
    heads' cut_off column gets the same tail share (it is not named)."""
    state = {**state, "upright": {k: v for k, v in state["upright"].items() if k in ("weights", "bias")}}
    check = photo_check.PhotoCheck({**state, "upright": {**state["upright"], "turn_above": 1.0}})
    probs = turn_probabilities(check, dev)  # [N, 4]
    state["upright"]["turn_above"] = choose_turn_above(probs, dev["turn"])
    clean = dev["clean"]
    turned = probs[clean, 1:].max(1).values > state["upright"]["turn_above"]  # [clean N]
    named = [DEGRADABLE.index(p) for p in photo_check.PROBLEMS if p in DEGRADABLE]
    scores = check.pooled_head(head_inputs(dev))  # [N, P]
    problems = [DEGRADABLE[j] for j in named]
    a, th = choose_thresholds(scores[clean][:, named], problems, also=turned,
                              floors=keep_floors(scores[:, named], dev["labels"], problems))
    state["pooled_head"]["thresholds"] = torch.quantile(scores[clean], 1 - a, dim=0).clamp(max=0.99).tolist()
    for j, t in zip(named, th):
        state["pooled_head"]["thresholds"][j] = t
    alone = check.image_head(head_inputs(dev, False))  # [N, len(IMAGE_PROBLEMS)]
    state["image_head"]["thresholds"] = choose_thresholds(
        alone[clean], IMAGE_PROBLEMS, floors=keep_floors(alone, dev["labels"], IMAGE_PROBLEMS))[1]
    return state


def turn_probabilities(check, data):
    weights, bias = (torch.as_tensor(np.asarray(a), dtype=torch.float32) for a in check.upright[:2])  # [4, F], [4]
    return torch.softmax(data["pooled"].float() @ weights.T + bias, 1)  # [N, F] -> [N, 4]


def write_state(path, state):
    """Store the state under "photo_check" in the checkpoint at path, every other key unchanged (checked)."""
    ckpt = load_checkpoint(path)
    before = {k: v for k, v in ckpt.items() if k != "photo_check"}
    save_checkpoint({**ckpt, "photo_check": state}, path)
    after = load_checkpoint(path)
    assert after.keys() - {"photo_check"} == before.keys() and _same(before, after), "checkpoint changed"
    print(f"wrote the photo check into {path}")


def _same(a, b):
    """Equal values, tensors compared exactly, nested dicts and lists included."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and all(k in b and _same(v, b[k]) for k, v in a.items())
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def roc_auc(scores, labels):
    """ROC AUC of scores [N] for binary labels [N] (ties count half), or nan without both classes."""
    scores, labels = torch.as_tensor(scores).double(), torch.as_tensor(labels).bool()
    pos, neg = scores[labels], scores[~labels]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None]).double().sum() + 0.5 * (pos[:, None] == neg[None]).double().sum()
    return float(greater / (len(pos) * len(neg)))

