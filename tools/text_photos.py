"""Score the text reader (read_text.py) on photos with text made the way blind people's look.

The photos come from text_scenes.py: text rendered onto Flickr8k photos and plain surfaces (medicine-box labels,
screens, letter pages, signs), degraded as phone photos by blind people are; negatives without text, and text
blurred past reading. They are made once under --out and reused. Dev photos (Flickr8k dev backgrounds) are for
choosing thresholds (--sweep); the test photos (Flickr8k test backgrounds, other seeds) are scored once at the end.

    python tools/text_photos.py --split dev --sweep          # key-word recall etc. under a grid of junk rules
    python tools/text_photos.py --split test                 # the chosen reader, beside the caption's time
    python tools/text_photos.py --vizwiz ../shared/vizwiz_dev  # what the reader says of real photos

Prints key-word recall (share of legible-text photos whose key words are all read, as separate words),
precision of the words read, invention rate on photos without legible text, the longest word,
orientation accuracy, and the time per photo of first_look and read beside the shipped captioner's.
"""

import sys
from pathlib import Path

# ruff: noqa: E402 (the imports below need the path first)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's root: its commands and captioner/

import argparse
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from captioner import read_text
from tools.text_scenes import KINDS, NO_TEXT, make_set, words_of


def load_records(split, args):
    """The split's photos, made once under --out and reused (same seed, same photos)."""
    out_dir = Path(args.out) / split
    if (out_dir / "photos.json").is_file() and not args.remake:
        records = json.loads((out_dir / "photos.json").read_text())
        if len(records) == args.photos + args.negatives + args.blurred:
            return out_dir, records
    return out_dir, make_set(split, args.photos, args.negatives, args.blurred, out_dir, args.seed)


def look_and_read(reader, path):
    """The photo decoded at the reader's READ_SIZE, its first look, then (always, for the sweeps) read_raw:
    (the Look, raw, decode + first_look seconds, read seconds)."""
    from image_loader import load_image

    start = time.perf_counter()
    look = reader.first_look(load_image(path, read_text.READ_SIZE))
    looked = time.perf_counter()
    raw = reader.read_raw(None, look)
    return look, raw, looked - start, time.perf_counter() - looked


def run_reader(reader, captioner, out_dir, records):
    """Every photo through first_look and read_raw, and through the captioner (alternating which goes first, so
    that both see the same machine load); returns rows with the times."""
    rows = []
    for i, rec in enumerate(tqdm(records, desc="reading", file=sys.stderr)):
        path = out_dir / rec["file"]
        cap_s = None
        if captioner is not None and i % 2 == 0:
            start = time.perf_counter()
            captioner.caption(path)
            cap_s = time.perf_counter() - start
        look, raw, look_s, read_s = look_and_read(reader, path)
        if captioner is not None and i % 2 == 1:
            start = time.perf_counter()
            captioner.caption(path)
            cap_s = time.perf_counter() - start
        rows.append({"rec": rec, "look": look.passes, "raw": raw, "look_s": look_s, "read_s": read_s,
                     "caption_s": cap_s})
    return rows


def score_rows(reader, rows, rules):
    """The reader's figures over the rows under junk rules `rules`: a photo the first look turns away is not read,
    and the first look's figure says how many of the photos a full read reads something on it lets through."""
    legible = [r for r in rows if r["rec"]["kind"] not in NO_TEXT]
    empty = [r for r in rows if r["rec"]["kind"] in NO_TEXT]
    out_words, right, hits, invented, longest, turns, told, read_any, passed = 0, 0, 0, 0, 0, 0, 0, 0, 0
    for r in rows:
        whole = reader.judge(r["raw"], rules)
        res = whole if r["look"] else read_text.TextResult()
        r["result"] = res
        read_any, passed = read_any + bool(whole.lines), passed + bool(whole.lines and r["look"])
        said = words_of(" ".join(res.lines))
        out_words += len(said)
        right += sum(w in set(r["rec"]["words"]) for w in said)
        longest = max([longest] + [sum(c.isalpha() for c in w) for line in res.lines for w in line.split()])
        if r["rec"]["kind"] not in NO_TEXT:
            hits += all(w in said for w in words_of(r["rec"]["key"]))
            if res.angle is not None:
                told, turns = told + 1, turns + (res.angle == r["rec"]["turn"])
        else:
            invented += bool(res.lines)
    return {"key_recall": hits / max(len(legible), 1), "precision": right / max(out_words, 1),
            "invented": invented / max(len(empty), 1), "longest_word": longest,
            "turn_right": turns / max(told, 1), "turn_told": told / max(len(legible), 1),
            "look_keeps": passed / max(read_any, 1),
            "look_pass_none": sum(r["look"] for r in empty) / max(len(empty), 1)}


def print_scores(title, s):
    print(f"{title}: key words read {s['key_recall']:.3f} | words right {s['precision']:.3f} | invented "
          f"{s['invented']:.3f} | longest word {s['longest_word']} | turn right {s['turn_right']:.3f} "
          f"(told on {s['turn_told']:.3f}) | first look lets through {s['look_keeps']:.3f} of the photos read, "
          f"{s['look_pass_none']:.3f} of those without text")


def print_times(rows):
    """Mean times per photo, text and no-text photos apart, beside the caption's in the same run. On a photo
    the first look turns away, reading costs only the decode and the first look."""
    def mean(xs):
        return sum(xs) / max(len(xs), 1)

    for group, kinds in (("with text", KINDS), ("without text", ("none",)), ("text past reading", ("blurred",))):
        sel = [r for r in rows if r["rec"]["kind"] in kinds]
        if not sel:
            continue
        look = mean([r["look_s"] for r in sel])
        spent = mean([r["look_s"] + (r["read_s"] if r["look"] else 0.0) for r in sel])
        read = mean([r["read_s"] for r in sel])
        cap = [r["caption_s"] for r in sel if r["caption_s"] is not None]
        # per photo, against the caption measured next to it: robust to the machine's load drifting
        pairs = sorted((r["look_s"] + (r["read_s"] if r["look"] else 0.0)) / r["caption_s"]
                       for r in sel if r["caption_s"])
        ratio = (f" = {spent / mean(cap):.2f}x the caption's {mean(cap) * 1000:.0f} ms (median per photo "
                 f"{pairs[len(pairs) // 2]:.2f}x)" if cap else "")
        print(f"time per photo {group} ({len(sel)}): decode at {read_text.READ_SIZE} px + first_look "
              f"{look * 1000:.0f} ms, read {read * 1000:.0f} ms; both where the look passes {spent * 1000:.0f} ms"
              f"{ratio}")


def sweep(reader, rows, args):
    """Score a grid of junk rules on these (dev) rows; print the best under the goals (words right >=
    --goal-precision, invention <= --goal-invented), best key-word recall first."""
    grid = []
    for min_score in (0.75, 0.8, 0.85, 0.9):
        for share in (0.5, 0.75):
            for sure in (0.9, 0.95):
                for trust in (0.9, 0.95, 0.97, 1.01):
                    rules = read_text.Rules(min_score=min_score, min_word_share=share, sure_score=sure,
                                            trust_score=trust)
                    grid.append((rules, score_rows(reader, rows, rules)))
    ok = [g for g in grid if g[1]["precision"] >= args.goal_precision and g[1]["invented"] <= args.goal_invented]
    ok.sort(key=lambda g: (-g[1]["key_recall"], -g[1]["precision"]))
    print(f"{len(ok)} of {len(grid)} settings meet the goals on these photos; the best 10:")
    for rules, s in ok[:10]:
        print_scores(f"min_score {rules.min_score} word share {rules.min_word_share} sure {rules.sure_score} "
                     f"trust {rules.trust_score}", s)


def vizwiz_rows(reader, folder):
    """Real photos under folder, read, as rows like run_reader's: the text a sighted reader transcribed
    (folder/text_truth.json) stands for the rendered text; a photo it lists without legible text is a negative."""
    truth = json.loads((Path(folder) / "text_truth.json").read_text())
    rows = []
    for name, t in tqdm(sorted((k, v) for k, v in truth.items() if not k.startswith("_")), desc="reading",
                        file=sys.stderr):
        look, raw, look_s, read_s = look_and_read(reader, Path(folder) / name)
        rec = {"file": name, "kind": "real" if t["has_text"] else "none", "key": t["key_text"],
               "words": words_of(" ".join(t["legible_text"])), "turn": t["orientation"]}
        rows.append({"rec": rec, "look": look.passes, "raw": raw, "look_s": look_s, "read_s": read_s,
                     "caption_s": None})
    return rows


def vizwiz(reader, folder, args):
    """What the reader says of every real photo under folder: a markdown table, and its figures against the
    by-eye transcription where folder/text_truth.json has one."""
    if not (Path(folder) / "text_truth.json").is_file():
        raise SystemExit(f"{folder}/text_truth.json not found: the real photos' text, transcribed by eye")
    rows = vizwiz_rows(reader, folder)
    scores = score_rows(reader, rows, reader.rules)
    print("| photo | first look | read (s) | angle | lines |\n|---|---|---|---|---|")
    for r in rows:
        res = r["result"]
        gated = "" if r["look"] else " (skipped)"
        print(f"| {Path(r['rec']['file']).name} | {gated or 'read'} | {r['read_s']:.2f} | {res.angle} | "
              f"{' / '.join(res.lines) or '-'} |")
    print_scores(f"real photos ({len(rows)}), shipped rules", scores)
    if args.sweep:
        sweep(reader, rows, args)


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--split", choices=("dev", "test"), default="dev",
                   help="dev: backgrounds from Flickr8k dev, for choosing thresholds; test: scored once at the end")
    p.add_argument("--photos", type=int, default=120, help="photos with legible text (medicine, screen, page, sign)")
    p.add_argument("--negatives", type=int, default=60, help="photos without rendered text")
    p.add_argument("--blurred", type=int, default=30, help="photos with text blurred past reading")
    p.add_argument("--seed", type=int, default=0, help="seed of the photos (with the split's name)")
    p.add_argument("--out", default="cache/text_photos", help="folder the photos are written to (and reused from)")
    p.add_argument("--remake", action="store_true", help="make the photos again even where they exist")
    p.add_argument("--sweep", action="store_true", help="score a grid of junk rules")
    p.add_argument("--goal-precision", type=float, default=0.85, help="--sweep: least share of words read right")
    p.add_argument("--goal-invented", type=float, default=0.08,
                   help="--sweep: most share of photos without legible text that get any line")
    p.add_argument("--det-side", type=int, default=read_text.DET_SIDE, help="long side (px) the detector sees")
    p.add_argument("--look-side", type=int, default=read_text.LOOK_SIDE, help="first_look detector side (px)")
    p.add_argument("--max-lines", type=int, default=read_text.MAX_LINES, help="text boxes recognised at most")
    p.add_argument("--threads", type=int, default=None,
                   help="threads of the captioner (PyTorch) and of each reader model (ONNX Runtime); default: "
                   "PyTorch's")
    p.add_argument("--no-caption", action="store_true", help="skip the captioner's time (faster sweeps)")
    p.add_argument("--vizwiz", default=None,
                   help="a folder of real photos with text_truth.json (their text transcribed by eye): print what "
                        "the reader says of each and score it (with --sweep, sweep the junk rules on them)")
    p.add_argument("--dump", default=None, help="write every photo's lines and figures to this JSON file")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)  # the captioner's threads too: the reader runs beside it with as many
    threads = torch.get_num_threads()
    reader = read_text.TextReader(threads=threads, det_side=args.det_side, max_lines=args.max_lines,
                                  look_side=args.look_side)
    print(f"reader: det side {args.det_side}, max lines {args.max_lines}, look side {args.look_side}, {threads} "
          f"threads; READ_SIZE {read_text.READ_SIZE}")
    if args.vizwiz:
        return vizwiz(reader, args.vizwiz, args)
    captioner = None
    if not args.no_caption:
        from captioner.describe import Captioner
        from utils import find_checkpoint

        captioner = Captioner(find_checkpoint(None), read_text=False)  # only caption() is timed; `reader` reads
    out_dir, records = load_records(args.split, args)
    rows = run_reader(reader, captioner, out_dir, records)
    if args.sweep:
        sweep(reader, rows, args)
    print_scores(f"{args.split} ({len(rows)} photos), shipped rules", score_rows(reader, rows, reader.rules))
    print_times(rows)
    if args.dump:
        Path(args.dump).write_text(json.dumps([
            {**r["rec"], "look": r["look"], **r["result"].as_dict(),
             "raw": [[t, round(float(s), 3)] for t, s in r["raw"]["read"]]} for r in rows], indent=1))


if __name__ == "__main__":
    main()
