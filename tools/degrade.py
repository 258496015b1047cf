"""Degrade photos the ways blind people's photos are spoiled, then fit and score the photo check (photo_check.py).

    python tools/degrade.py --fit                  # fit on Flickr8k train, thresholds on dev, write the checkpoint
    python tools/degrade.py                        # score the checkpoint's photo check (dev, VizWiz, timing)
    python tools/degrade.py --test                 # ... and the test split, once, at the end

From Flickr8k photos (its official train split for fitting, dev for choosing thresholds, test scored once) it makes
blur (gaussian, motion in a random direction, defocus), darkness (with the grain a phone adds when it boosts a dark
scene), over-exposure, wash-out and glare spots, crops (too close), quarter turns and mixes of them, each saved
again as a JPEG (degradations.py). Each split also gets photos of lit screens and pages (lit_scene: a monitor, TV
or phone showing text or a photo, a page or a medicine label, mostly on a dark surround, drawn with text_scenes'
texts over the split's own photos), clean (not dark, however dark the room) and degraded the same ways. It
measures every photo (photo_check.measures) and runs the checkpoint's CNN on it, as the captioner would (the
pooled feature, confidence.pooled_features); these are cached under --cache (photo_check_sets.py). --fit fits
the logistic heads and the upright head and writes them into the checkpoint under "photo_check" (every other key
unchanged; photo_check_fit.py). It then prints, per problem, the ROC AUC on the degraded dev photos, the share of
clean dev photos that get any problem named, how often the lit scenes are called dark, bright or blurred, the same
on the real VizWiz photos (--vizwiz), and the check's time per photo against a caption's.
"""

import sys
from pathlib import Path

# ruff: noqa: E402 (the imports below need the path first)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's root: its commands and captioner/

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from captioner import photo_check
from captioner.files import DataError
from captioner.images import list_images
from captioner.layouts import find_images_dir, split_images
from image_loader import load_image
from tools.degradations import DEGRADABLE, degrade
from tools.photo_check_fit import (
    IMAGE_PROBLEMS,
    fit,
    head_inputs,
    roc_auc,
    set_thresholds,
    turn_probabilities,
    write_state,
)
from tools.photo_check_sets import measure_set, pooled_of
from utils import HelpFormatter, find_checkpoint, load_checkpoint, positive, save_checkpoint


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


# ------------------------------------------------------------------------------------------- scoring

def report_set(check, data, split):
    """Print each problem's ROC AUC on the degraded photos of a split, its clean-photo rate, and the turns."""
    clean, labels = data["clean"], data["labels"]
    full = check.pooled_head(head_inputs(data))  # [N, P]
    alone = check.image_head(head_inputs(data, False))  # [N, 3]
    probs = turn_probabilities(check, data)
    rotated = data["turn"] != 0
    rows = [(p, roc_auc(full[:, j], labels[:, j]), full[:, j] > check.pooled_head.thresholds[p])
            for j, p in enumerate(DEGRADABLE)]
    turn_p = probs[:, 1:].max(1).values  # the "rotated" score
    rows.append(("rotated", roc_auc(turn_p, rotated), turn_p > check.upright[2]))
    print(f"\n{split}: {int(clean.sum())} clean photos ({int((clean & data['scene']).sum())} of them lit scenes), "
          f"{int((~clean).sum())} degraded versions of them")
    print("| problem | positives | AUC (measures + CNN) | AUC (measures only) | positives named | clean photos named |")
    print("|---|---|---|---|---|---|")
    for p, auc, named in rows:
        has = labels[:, DEGRADABLE.index(p)] > 0 if p in DEGRADABLE else rotated
        only = roc_auc(alone[:, IMAGE_PROBLEMS.index(p)], has) if p in IMAGE_PROBLEMS else float("nan")
        note = "" if p in photo_check.PROBLEMS else " (not named)"
        print(f"| {p}{note} | {int(has.sum())} | {auc:.3f} | {only:.3f} | {named[has].float().mean():.1%} | "
              f"{named[clean].float().mean():.1%} |")
    lap = roc_auc(-data["measures"][:, photo_check.MEASURES.index("log_lap_var")], labels[:, 0])
    print(f"blur by the variance of the Laplacian alone (at {photo_check.SIZE} px): AUC {lap:.3f}")
    any_full = torch.stack([n[clean] for p, _, n in rows if p in photo_check.PROBLEMS], 1).any(1).float().mean()
    any_alone = (alone[clean] > torch.tensor([check.image_head.thresholds[p] for p in IMAGE_PROBLEMS])).any(1)
    print(f"clean {split} photos with any problem named: {any_full:.1%} (measures + CNN), "
          f"{any_alone.float().mean():.1%} (measures only, blur/dark/bright)")
    report_turns(check, probs, data["turn"], split)
    report_scenes(check, data, full, alone, split)


def report_scenes(check, data, full, alone, split):
    """The lit scenes of a split (screens and pages, mostly on a dark surround): how often each problem is named
    on the clean ones and on degraded ones without it, and how often on those with it, both heads."""
    scene, clean, labels = data["scene"], data["clean"], data["labels"]
    print(f"lit scenes of {split} ({int((scene & clean).sum())} clean, {int((scene & ~clean).sum())} degraded), "
          "share named: clean | degraded without the problem | with it")
    for p in IMAGE_PROBLEMS:
        j = DEGRADABLE.index(p)
        cells = []
        for probs, th in ((full[:, j], check.pooled_head.thresholds[p]),
                          (alone[:, IMAGE_PROBLEMS.index(p)], check.image_head.thresholds[p])):
            named = probs > th
            has = labels[:, j] > 0
            cells.append(" | ".join(f"{named[m].float().mean():.1%}" if m.any() else "-"
                                    for m in (scene & clean, scene & ~clean & ~has, scene & has)))
        print(f"  {p}: {cells[0]} (measures + CNN); {cells[1]} (measures only); AUC on scenes "
              f"{roc_auc(full[scene, j], labels[scene, j]):.3f}")


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
    whole caption of the same photo (describe.Captioner.caption), alternating, one photo at a time."""
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


def load_captioner(path, fitting):
    """The captioner whose loading and CNN the check is measured with (what it sees in use; no text reader). A
    checkpoint whose photo check was fitted on other image measures than photo_check's cannot be loaded (the
    check refuses it); when fitting, which replaces that check, a copy of it without the check is loaded."""
    from captioner.describe import Captioner

    state = load_checkpoint(path).get("photo_check")
    if not fitting or not state or list(state["measures"]) == list(photo_check.MEASURES):
        return Captioner(path, read_text=False)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / Path(path).name
        save_checkpoint({k: v for k, v in load_checkpoint(path).items() if k != "photo_check"}, copy)
        return Captioner(copy, read_text=False)


def main(args):
    path = find_checkpoint(args.checkpoint)
    captioner = load_captioner(path, args.fit)
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
