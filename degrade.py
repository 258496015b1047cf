"""Degrade photos the ways blind people's photos are spoiled, then fit and score the photo check (photo_check.py).

    python degrade.py --fit                        # fit on Flickr8k train, thresholds on dev, write the checkpoint
    python degrade.py                              # score the checkpoint's photo check (dev, VizWiz, timing)
    python degrade.py --test                       # ... and the test split, once, at the end

From Flickr8k photos (its official train split for fitting, dev for choosing thresholds, test scored once) it makes
blur (gaussian, motion in a random direction, defocus), darkness (with the grain a phone adds when it boosts a dark
scene), over-exposure, wash-out and glare spots, crops (too close), quarter turns and mixes of them, each saved
again as a JPEG. It measures every degraded photo (photo_check.measures) and runs the checkpoint's CNN on it, as
the captioner would (the pooled feature, confidence.pooled_features); these are cached under --cache. --fit fits
the logistic heads and the upright head and writes them into the checkpoint under "photo_check" (every other key
unchanged). It then prints, per problem, the ROC AUC on the degraded dev photos, the share of clean dev photos
that get any problem named, the same on the real VizWiz photos (--vizwiz), and the check's time per photo against
a caption's.
"""

import argparse
import hashlib
import io
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import photo_check
from confidence import _logistic, pooled_features
from image_loader import DataError, find_images_dir, list_images, load_image, split_images
from utils import HelpFormatter, find_checkpoint, load_checkpoint, positive, save_checkpoint

DEGRADABLE = ("blur", "dark", "bright", "cut_off")  # the problems the logistic heads learn (rotation: TURNS)
IMAGE_PROBLEMS = ("blur", "dark", "bright")  # those the image measures alone can score
VERSION = 1  # of the degradations: part of the cache's key
CLEAN_GOAL = 0.08  # share of clean dev photos with any problem named that the thresholds aim at (the goal: 0.1)
# share of dev photos that may get a wrong turn, where the upright threshold is chosen: strict, as real photos
# (close-ups of objects) are less familiar to the head than Flickr8k's
WRONG_TURN_GOAL = 0.002


def get_args_parser():
    p = argparse.ArgumentParser(description="Degrade Flickr8k photos as blind people's photos are spoiled, fit and "
                                "score the photo check.", formatter_class=HelpFormatter)
    p.add_argument("--data", default="../shared/flickr8k", help="Flickr8k folder (images and official split files)")
    p.add_argument("--vizwiz", default="../shared/vizwiz_dev",
                   help="folder of real VizWiz photos with quality.json (and labels_only/); '' to skip")
    p.add_argument("--checkpoint", help="checkpoint whose CNN gives the pooled features, and that --fit writes "
                                        "into (default: as inference.py chooses)")
    p.add_argument("--fit", action="store_true", help="fit the check and write it into --checkpoint")
    p.add_argument("--thresholds", action="store_true",
                   help="choose the thresholds of the checkpoint's fitted check again on dev, and write them")
    p.add_argument("--test", action="store_true", help="also score the test split (once, when the fit is final)")
    p.add_argument("--variants", type=positive(int), default=2, help="degraded versions of each train photo")
    p.add_argument("--dev-variants", type=positive(int), default=3, help="degraded versions of each dev/test photo")
    p.add_argument("--max-images", type=positive(int), help="use at most this many photos of each split (quick runs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the degradations")
    p.add_argument("--cache", default="cache/photo_check", help="folder for the measures and features of each split")
    p.add_argument("--timing", type=int, default=20, help="photos to time the check against a caption on (0: none)")
    p.add_argument("--examples", help="write a few degraded photos (JPEG) into this folder, to look at")
    p.add_argument("--print-image-head", action="store_true",
                   help="print the fitted image-measures head as photo_check.IMAGE_HEAD's Python literal")
    return p


# ------------------------------------------------------------------------------------------- degradations

def _linear(x):
    return np.power(x, 2.2)  # sRGB-ish gamma: light adds up in linear values


def _gamma(x):
    return np.power(np.clip(x, 0, 1), 1 / 2.2)


def _convolve(x, kernel):
    """float [H, W, 3] convolved with a kernel [k, k] (odd k), edges reflected."""
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))).unsqueeze(1)  # [3, 1, H, W]
    k = kernel.shape[0] // 2
    t = F.pad(t, (k, k, k, k), mode="reflect")
    out = F.conv2d(t, torch.from_numpy(kernel[None, None].astype(np.float32)))  # [3, 1, H, W]
    return out[:, 0].numpy().transpose(1, 2, 0)


def _motion_kernel(length, angle):
    """A line `length` pixels long at `angle` (radians), unit sum."""
    size = int(math.ceil(length)) | 1
    kernel = np.zeros((size, size), np.float32)
    c = size // 2
    for t in np.linspace(-length / 2, length / 2, 4 * size):
        kernel[int(round(c + t * math.sin(angle))), int(round(c + t * math.cos(angle)))] += 1
    return kernel / kernel.sum()


def _disc_kernel(radius):
    size = 2 * int(math.ceil(radius)) + 1
    yy, xx = np.mgrid[:size, :size] - size // 2
    kernel = (np.hypot(yy, xx) <= radius).astype(np.float32)
    return kernel / kernel.sum()


def blur(x, rng):
    """Camera shake (motion), out of focus (disc) or soft (gaussian), clearly visible at 224 px."""
    kind = rng.choice(["gaussian", "motion", "defocus"])
    if kind == "gaussian":
        sigma = rng.uniform(1.3, 4.0)
        r = int(math.ceil(3 * sigma))
        g = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
        return _convolve(x, np.outer(g, g) / np.outer(g, g).sum()), kind
    if kind == "motion":
        return _convolve(x, _motion_kernel(rng.uniform(6, 20), rng.uniform(0, math.pi))), kind
    return _convolve(x, _disc_kernel(rng.uniform(2.5, 7))), kind


def dark(x, rng):
    """Too little light: 0.5-7% of the exposure, with a phone's gain and its grain (noise, partly per channel)."""
    exposure = rng.uniform(0.005, 0.07)
    lin = _linear(x) * exposure
    grain = rng.uniform(0.002, 0.012) * math.sqrt(exposure / 0.05)
    noise = rng.normal(0, grain, x.shape[:2])[..., None] + rng.normal(0, grain / 2, x.shape)
    return _gamma(lin + noise), "dark"


def bright(x, rng):
    """Over-exposed (clipped), washed out (glare over the whole lens) or one or two glare spots."""
    kind = rng.choice(["overexposed", "washed_out", "glare"])
    if kind == "overexposed":
        return _gamma(_linear(x) * rng.uniform(3, 10)), kind
    if kind == "washed_out":
        a = rng.uniform(0.5, 0.85)
        return x * (1 - a) + a, kind
    h, w = x.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    light = np.zeros((h, w), np.float32)
    for _ in range(rng.integers(1, 3)):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.2, 0.45) * max(h, w)
        light += rng.uniform(1.5, 4) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (r / 2) ** 2))
    return _gamma(_linear(x) * rng.uniform(1, 1.8) + light[..., None]), kind


def cut_off(image, rng):
    """Too close: a square crop of 45-65% of the side, at a random place, enlarged back to the photo's size."""
    w, h = image.size
    side = rng.uniform(0.45, 0.65)
    cw, ch = int(w * side), int(h * side)
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return image.crop((left, top, left + cw, top + ch)).resize((w, h), Image.Resampling.BILINEAR)


def degrade(image, rng):
    """A PIL photo -> (degraded PIL photo, {problem: 0/1 for DEGRADABLE}, the clockwise turn that makes it upright,
    what was done). 30% keep all of DEGRADABLE clean, 50% get one, 20% two (never dark and bright); the turn is
    uniform over TURNS; every result is saved again as a JPEG of quality 60-95, so clean photos are re-encoded too."""
    n = rng.choice([0, 1, 2], p=[0.3, 0.5, 0.2])
    chosen = set()
    while len(chosen) < n:
        chosen.add(str(rng.choice(DEGRADABLE)))
        if {"dark", "bright"} <= chosen:
            chosen.discard(str(rng.choice(["dark", "bright"])))
    done = []
    if "cut_off" in chosen:
        image, _ = cut_off(image, rng), done.append("cut_off")
    x = np.asarray(image, dtype=np.float32) / 255  # [H, W, 3]
    for name, fn in (("blur", blur), ("dark", dark), ("bright", bright)):
        if name in chosen:
            x, kind = fn(x, rng)
            done.append(kind)
    out = Image.fromarray((np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8))
    turn = int(rng.choice(photo_check.TURNS))  # the turn that makes it upright: it was turned the other way
    if turn:
        out = out.rotate(turn)  # PIL turns counter-clockwise: undone by `turn` clockwise
        done.append(f"turned {360 - turn}")
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=int(rng.integers(60, 96)))
    buf.seek(0)
    return Image.open(buf).convert("RGB"), {p: int(p in chosen) for p in DEGRADABLE}, turn, done


# ------------------------------------------------------------------------------------------- measured sets

def _cache_key(captioner, split, names, variants, seed):
    """What a cached set depends on: the CNN's weights, the photos, the degradations."""
    h = hashlib.sha1(f"{VERSION} {split} {variants} {seed} {photo_check.SIZE} {photo_check.MEASURES}".encode())
    h.update(" ".join(names).encode())
    for t in list(captioner.model.encoderCNN.backbone.state_dict().values())[:3]:
        h.update(t.float().numpy().tobytes())
    return h.hexdigest()[:12]


@torch.inference_mode()
def pooled_of(captioner, images):
    """PIL photos -> the captioner's pooled CNN features [N, F], as it computes them for a caption."""
    x = torch.stack([captioner.transform(im) for im in images])  # [N, 3, S, S]
    return pooled_features(captioner.model.encoderCNN.extract(x))


def measure_set(captioner, images_dir, names, split, variants, seed, cache):
    """Each photo clean (as on disk) and `variants` degraded versions of it -> {"measures" [N, M], "pooled" [N, F],
    "labels" [N, len(DEGRADABLE)], "turn" [N] (index into TURNS), "clean" [N] bool, "names", "done"}, cached."""
    path = Path(cache) / f"{split}_{_cache_key(captioner, split, names, variants, seed)}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    rows = {"measures": [], "pooled": [], "labels": [], "turn": [], "clean": [], "names": [], "done": []}
    batch = []
    for i, name in enumerate(tqdm(names, desc=f"degrading and measuring {split}", unit="photo")):
        image = load_image(images_dir / name, captioner.preset["resize"])
        rng = np.random.default_rng([seed, VERSION, i, hash_name(name)])
        batch.append((image, [0] * len(DEGRADABLE), 0, True, name, "clean"))
        for _ in range(variants):
            out, labels, turn, done = degrade(image, rng)
            batch.append((out, [labels[p] for p in DEGRADABLE], photo_check.TURNS.index(turn), False, name,
                          ", ".join(done) or "re-encoded"))
        if len(batch) >= 32 or i == len(names) - 1:
            rows["pooled"].append(pooled_of(captioner, [b[0] for b in batch]).half())
            rows["measures"].append(torch.from_numpy(np.stack([photo_check.measures(b[0]) for b in batch])))
            for key, k in (("labels", 1), ("turn", 2), ("clean", 3), ("names", 4), ("done", 5)):
                rows[key].extend(b[k] for b in batch)
            batch = []
    out = {"measures": torch.cat(rows["measures"]), "pooled": torch.cat(rows["pooled"]),
           "labels": torch.tensor(rows["labels"], dtype=torch.float32), "turn": torch.tensor(rows["turn"]),
           "clean": torch.tensor(rows["clean"]), "names": rows["names"], "done": rows["done"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


def hash_name(name):
    """A stable number from a file name (Python's hash() differs between runs)."""
    return int(hashlib.sha1(name.encode()).hexdigest()[:8], 16)


# ------------------------------------------------------------------------------------------- fitting

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


def choose_thresholds(scores_clean, goal=CLEAN_GOAL, also=None):
    """Scores of clean photos [N, P] -> (a, one threshold per problem): each problem's (1 - a) quantile with the
    one tail share a that names any problem (or `also` [N] holds) on at most `goal` of the clean photos."""
    also = torch.zeros(len(scores_clean), dtype=torch.bool) if also is None else also
    lo, hi = 0.0, goal
    for _ in range(30):  # bisection on a
        a = (lo + hi) / 2
        th = torch.quantile(scores_clean, 1 - a, dim=0)
        lo, hi = (a, hi) if ((scores_clean > th).any(1) | also).float().mean() <= goal else (lo, a)
    return lo, torch.quantile(scores_clean, 1 - lo, dim=0).clamp(max=0.99).tolist()


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
    (the turns of clean photos included). The heads' cut_off column gets the same tail share (it is not named)."""
    state = {**state, "upright": {k: v for k, v in state["upright"].items() if k in ("weights", "bias")}}
    check = photo_check.PhotoCheck({**state, "upright": {**state["upright"], "turn_above": 1.0}})
    probs = turn_probabilities(check, dev)  # [N, 4]
    state["upright"]["turn_above"] = choose_turn_above(probs, dev["turn"])
    clean = dev["clean"]
    turned = probs[clean, 1:].max(1).values > state["upright"]["turn_above"]  # [clean N]
    named = [DEGRADABLE.index(p) for p in photo_check.PROBLEMS if p in DEGRADABLE]
    pooled_scores = check.pooled_head(head_inputs(dev))[clean]  # [clean N, P]
    a, th = choose_thresholds(pooled_scores[:, named], also=turned)
    state["pooled_head"]["thresholds"] = torch.quantile(pooled_scores, 1 - a, dim=0).clamp(max=0.99).tolist()
    for j, t in zip(named, th):
        state["pooled_head"]["thresholds"][j] = t
    state["image_head"]["thresholds"] = choose_thresholds(check.image_head(head_inputs(dev, False))[clean])[1]
    return state


def turn_probabilities(check, data):
    weights, bias = check.upright[:2]
    return torch.softmax(data["pooled"].float() @ weights.T + bias, 1)  # [N, 4]


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


# ------------------------------------------------------------------------------------------- scoring

def roc_auc(scores, labels):
    """ROC AUC of scores [N] for binary labels [N] (ties count half), or nan without both classes."""
    scores, labels = torch.as_tensor(scores).double(), torch.as_tensor(labels).bool()
    pos, neg = scores[labels], scores[~labels]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None]).double().sum() + 0.5 * (pos[:, None] == neg[None]).double().sum()
    return float(greater / (len(pos) * len(neg)))


def report_set(check, data, split):
    """Print each problem's ROC AUC on the degraded photos of a split, its clean-photo rate, and the turns."""
    clean, labels = data["clean"], data["labels"]
    full = check.pooled_head(head_inputs(data))  # [N, P]
    alone = check.image_head(head_inputs(data, False))  # [N, 3]
    probs = turn_probabilities(check, data)
    rotated = data["turn"] != 0
    rows = [(p, roc_auc(full[:, j], labels[:, j]), full[clean, j] > check.pooled_head.thresholds[p])
            for j, p in enumerate(DEGRADABLE)]
    turn_p = probs[:, 1:].max(1).values  # the "rotated" score
    rows.append(("rotated", roc_auc(turn_p, rotated), turn_p[clean] > check.upright[2]))
    print(f"\n{split}: {int(clean.sum())} clean photos, {int((~clean).sum())} degraded versions of them")
    print("| problem | positives | AUC (measures + CNN) | AUC (measures only) | clean photos named |")
    print("|---|---|---|---|---|")
    for p, auc, named in rows:
        j = DEGRADABLE.index(p) if p in DEGRADABLE else None
        positives = int(labels[:, j].sum()) if j is not None else int(rotated.sum())
        only = roc_auc(alone[:, IMAGE_PROBLEMS.index(p)], labels[:, j]) if p in IMAGE_PROBLEMS else float("nan")
        note = "" if p in photo_check.PROBLEMS else " (not named)"
        print(f"| {p}{note} | {positives} | {auc:.3f} | {only:.3f} | {named.float().mean():.1%} |")
    lap = roc_auc(-data["measures"][:, photo_check.MEASURES.index("log_lap_var")], labels[:, 0])
    print(f"blur by the variance of the Laplacian alone (at {photo_check.SIZE} px): AUC {lap:.3f}")
    any_full = torch.stack([n for p, _, n in rows if p in photo_check.PROBLEMS], 1).any(1).float().mean()
    any_alone = (alone[clean] > torch.tensor([check.image_head.thresholds[p] for p in IMAGE_PROBLEMS])).any(1)
    print(f"clean {split} photos with any problem named: {any_full:.1%} (measures + CNN), "
          f"{any_alone.float().mean():.1%} (measures only, blur/dark/bright)")
    report_turns(check, probs, data["turn"], split)


def report_turns(check, probs, turn, split):
    best, p = probs[:, 1:].max(1)
    turned, right = best > check.upright[2], (p + 1) == turn
    rotated = turn != 0
    print(f"upright head on {split}: argmax right on {(probs.argmax(1) == turn).float().mean():.1%} of the photos; "
          f"turning above {check.upright[2]:.2f}: rotated photos turned right "
          f"{(turned & right)[rotated].float().mean():.1%}, turned wrong "
          f"{(turned & ~right)[rotated].float().mean():.1%}; upright photos turned "
          f"{turned[~rotated].float().mean():.1%}")


def vizwiz_photos(folder):
    """[(path, quality entry)] of the real photos in folder and folder/labels_only (quality.json beside each)."""
    out = []
    for part in (Path(folder), Path(folder) / "labels_only"):
        labels = json.loads((part / "quality.json").read_text()) if (part / "quality.json").is_file() else {}
        out += [(part / "Images" / name, q) for name, q in sorted(labels.items()) if (part / "Images" / name).is_file()]
    return out


def laplacian_variance(image):
    """The classic sharpness measure: the variance of the Laplacian of the grey photo, at its own size."""
    g = np.asarray(image.convert("L"), dtype=np.float32)
    return float(photo_check._laplacian(g).var())


def framing_score(check, image, pooled):
    """The pooled head's cut_off score, which the check does not name (see photo_check's docstring)."""
    x = torch.cat([torch.from_numpy(photo_check.measures(image)), pooled.float()]).unsqueeze(0)  # [1, M + F]
    return float(check.pooled_head(x)[0, DEGRADABLE.index("cut_off")])


def report_vizwiz(captioner, check, folder):
    """Score the real photos: which get which problem named, and blur's AUC against the Laplacian's."""
    photos = vizwiz_photos(folder)
    if not photos:
        print(f"\nno VizWiz photos in {folder}: skipped")
        return
    rows = []
    for path, q in tqdm(photos, desc="scoring VizWiz photos", unit="photo"):
        image = captioner.load(path)
        pooled = pooled_of(captioner, [image])[0]
        scores, alone = check.scores(image, pooled), check.scores(image)
        rows.append({"name": path.stem, "flaws": q["flaws_ge2"], "counts": q["flaw_counts"], "scores": scores,
                     "alone": alone, "named": [p["problem"] for p in check.problems(scores)],
                     "named_alone": [p["problem"] for p in check.problems(alone)], "turn": check.upright_turn(pooled),
                     "lap_loaded": laplacian_variance(image), "lap_full": laplacian_variance(load_image(path)),
                     "cut_off": framing_score(check, image, pooled)})
    print(f"\nVizWiz: {len(rows)} real photos (decoded as the captioner does); flaws flagged by >= 2 of 5 raters")
    print("| photo | flaws >= 2 | blur | dark | bright | cut_off | rotated | named | turn | Laplacian var. |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s = {**r["scores"], "cut_off": r["cut_off"]}
        print(f"| {r['name'].replace('VizWiz_', '')} | {' '.join(r['flaws'])} | "
              + " | ".join(f"{s.get(p, float('nan')):.2f}" for p in ("blur", "dark", "bright", "cut_off", "rotated"))
              + f" | {', '.join(r['named']) or '-'} | {r['turn']} | {r['lap_loaded']:.0f} |")
    blr = [r["counts"].get("BLR", 0) >= 2 for r in rows]
    print(f"blur flagged (BLR >= 2 of 5) on {sum(blr)} of {len(rows)}; ROC AUC (34 photos: a rough figure):")
    for label, values in (("blur score (measures + CNN)", [r["scores"]["blur"] for r in rows]),
                          ("blur score (measures only)", [r["alone"]["blur"] for r in rows]),
                          ("variance of the Laplacian, photo as decoded", [-r["lap_loaded"] for r in rows]),
                          ("variance of the Laplacian, full resolution", [-r["lap_full"] for r in rows])):
        print(f"  {label}: {roc_auc(values, blr):.3f}")
    frm = [r["counts"].get("FRM", 0) >= 2 for r in rows]
    print(f"framing (FRM >= 2) on {sum(frm)}: cut_off AUC {roc_auc([r['cut_off'] for r in rows], frm):.3f} (not named)")
    flawed = [r["counts"].get("NON", 0) < 2 for r in rows]
    for key in ("named", "named_alone"):
        hit = [bool(r[key]) for r in rows]
        print(f"  any problem named ({key}): {sum(h and f for h, f in zip(hit, flawed))} of {sum(flawed)} photos "
              f"with NON < 2, {sum(h and not f for h, f in zip(hit, flawed))} of {len(rows) - sum(flawed)} "
              "with NON >= 2")


def report_timing(captioner, check, paths):
    """Time the photo check on a loaded photo and its pooled feature (what the captioner has in hand) against a
    whole caption of the same photo (inference.Captioner.caption), alternating, one photo at a time."""
    check_ms, caption_ms = [], []
    for path in tqdm(paths, desc="timing", unit="photo"):
        image = captioner.load(path)
        pooled = pooled_of(captioner, [image])[0]
        t0 = time.perf_counter()
        captioner.caption(path)
        t1 = time.perf_counter()
        scores = check.scores(image, pooled)
        check.problems(scores)
        check.upright_turn(pooled)
        t2 = time.perf_counter()
        caption_ms.append(1000 * (t1 - t0))
        check_ms.append(1000 * (t2 - t1))
    c, k = statistics.median(caption_ms), statistics.median(check_ms)
    print(f"\ntiming on {len(paths)} photos, alternating, torch threads {torch.get_num_threads()}: caption median "
          f"{c:.1f} ms, photo check median {k:.2f} ms ({k / c:.1%} of a caption)")


def write_examples(images_dir, names, folder, seed, n=12):
    """A few degraded photos as JPEGs named for what was done to them, to look at."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names[:n]):
        out, _, _, done = degrade(load_image(images_dir / name), np.random.default_rng([seed, i]))
        out.save(folder / f"{i:02d}_{'_'.join(done).replace(' ', '') or 'clean'}.jpg", quality=95)
    print(f"wrote {min(n, len(names))} degraded photos into {folder}")


def main(args):
    from inference import Captioner  # the captioner's own loading and CNN: what the check sees in use

    path = find_checkpoint(args.checkpoint)
    captioner = Captioner(path, read_text=False)  # only its CNN and loading are used: no text reader
    images_dir = find_images_dir(args.data)
    splits = split_images(args.data, [p.name for p in list_images(images_dir)])
    pick = {s: v[:args.max_images] for s, v in splits.items()}
    if args.examples:
        write_examples(images_dir, pick["dev"], args.examples, args.seed)
    dev = measure_set(captioner, images_dir, pick["dev"], "dev", args.dev_variants, args.seed, args.cache)
    if args.fit:
        train = measure_set(captioner, images_dir, pick["train"], "train", args.variants, args.seed, args.cache)
        state = fit(train, dev)
        write_state(path, state)
    else:
        state = load_checkpoint(path).get("photo_check")
        if state is None:
            raise DataError(f"{path} holds no photo check: fit one with --fit")
        if args.thresholds:
            state = set_thresholds(state, dev)
            write_state(path, state)
    check = photo_check.PhotoCheck(state)
    if args.print_image_head:
        print(image_head_literal(state["image_head"]))
    report_set(check, dev, "dev")
    if args.test:
        test = measure_set(captioner, images_dir, pick["test"], "test", args.dev_variants, args.seed, args.cache)
        report_set(check, test, "test")
    if args.vizwiz:
        report_vizwiz(captioner, check, args.vizwiz)
    if args.timing:
        timing = [p for p, _ in vizwiz_photos(args.vizwiz)] if args.vizwiz else []
        timing += [images_dir / n for n in pick["dev"]]
        report_timing(captioner, check, timing[:args.timing])


def image_head_literal(head):
    """A fitted image head as photo_check.IMAGE_HEAD's Python source: numbers rounded, eight to a line."""
    def numbers(values, indent):
        values = [f"{float(v):.5g}" for v in values]
        rows = [", ".join(values[i:i + 8]) for i in range(0, len(values), 8)]
        return "[\n" + "".join(f"{indent}    {r},\n" for r in rows) + f"{indent}]"

    lines = ["IMAGE_HEAD = {", f'    "problems": {json.dumps(list(head["problems"]))},']
    for key in ("mean", "std", "bias", "thresholds"):
        lines.append(f'    "{key}": {numbers(torch.as_tensor(head[key]).tolist(), "    ")},')
    rows = [numbers(r, "        ") for r in torch.as_tensor(head["weights"]).tolist()]
    lines.append('    "weights": [' + "".join(f"\n        {r}," for r in rows) + "\n    ],")
    return "\n".join(lines + ["}"])


def cli(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        main(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
