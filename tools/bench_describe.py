"""The description benchmark (bench.py --describe): what describing a photo costs beside a caption alone and
beside the text reader's library (rapidocr) alone, per photo, on photos with and without text, and on two hostile
photos.
"""

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from captioner.images import list_images
from image_loader import load_image
from utils import find_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_IMAGES = ROOT / "data" / "flickr8k_sample" / "Images"
VIZWIZ = ROOT.parent / "shared" / "vizwiz_dev"


def describe_bench(args):
    """What describing a photo costs beside a caption and beside the text reader's library, per photo, in folder
    mode: for each photo file, alternating the order, the caption alone (Captioner.caption: file to text, beam 3),
    the whole description as inference.py makes it (the photo loaded, looked at, its text read where the first
    look finds some, captioned, checked, the thing named), the rapidocr library's own call as it comes on the
    photo at the reader's size, the reader's full read (no first look), and the photo check. Photos with text are
    made by text_scenes.py (medicine boxes, screens, pages, signs, some degraded); photos without are Flickr8k's
    (--data's, else the bundled sample's); and real phone photos from ../shared/vizwiz_dev where it is. Then two
    hostile photos, timed whole."""
    from captioner.describe import Captioner
    from tools.text_scenes import make_set

    if args.threads:
        torch.set_num_threads(args.threads)
    n, checkpoint = 4 if args.smoke else 30, find_checkpoint(args.checkpoint)
    captioner = Captioner(checkpoint)
    library = rapidocr_as_it_comes(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        records = make_set("dev", n, 0, 0, Path(tmp), seed=1)
        groups = {"with text": [Path(tmp) / r["file"] for r in records],
                  "without text": list_images(Path(args.data) / "Images" if args.data else SAMPLE_IMAGES)[:n]}
        groups.update(phone_photos(n))
        r = {"checkpoint": str(checkpoint), "threads": torch.get_num_threads(),
             "load_average_before": os.getloadavg()[0], "groups": {}}
        for name, paths in groups.items():
            r["groups"][name] = time_descriptions(captioner, library, paths)
        r["hostile"] = time_hostile(captioner, Path(tmp))
    r["load_average_after"] = os.getloadavg()[0]
    r["read_s"] = statistics.median([r["groups"][g]["read_s"] for g in r["groups"] if g.endswith("with text")])
    return r


def phone_photos(n):
    """Real phone photos taken by blind people (../shared/vizwiz_dev, 1 to 5 megapixels, where it is), with and
    without legible text as its text_truth.json says: {group name: paths}."""
    truth_file = VIZWIZ / "text_truth.json"
    if not truth_file.is_file():
        return {}
    truth = {k: v for k, v in json.loads(truth_file.read_text()).items() if not k.startswith("_")}
    return {f"phone, {kind}": [VIZWIZ / k for k, v in sorted(truth.items()) if v["has_text"] == has][:n]
            for kind, has in (("with text", True), ("without text", False))}


def rapidocr_as_it_comes(threads):
    """The rapidocr library's own pipeline with its defaults (detector, direction classifier, recogniser), on
    `threads` threads: what the text reader is measured against."""
    from rapidocr import RapidOCR

    return RapidOCR(params={"Global.log_level": "error", "EngineConfig.onnxruntime.intra_op_num_threads": threads})


def describe_one(captioner, path):
    """A photo file described as inference.py describes it: the answer's dict."""
    image = captioner.load(path)
    return captioner.describe_batch([image], looks=[captioner.look(image)])[0]


def time_descriptions(captioner, library, paths):
    """Median seconds per photo of each step in describe_bench's list, and how many photos had text read."""
    from tqdm import tqdm

    from captioner.read_text import to_array

    steps = {"caption": lambda p: captioner.caption(p), "describe": lambda p: describe_one(captioner, p),
             "rapidocr": lambda p: library(to_array(load_image(p))),
             "read": lambda p: captioner.reader.read(load_image(p)),
             "photo_check": lambda p: captioner.checker.scores(captioner.load(p))}
    times, read = {k: [] for k in steps}, 0
    for i, path in enumerate(tqdm(paths, desc="describe", unit="photo", leave=False, disable=None)):
        captioner.caption(path)  # warm: the file in the page cache, the model's buffers
        order = list(steps) if i % 2 == 0 else list(steps)[::-1]  # alternate: each step sees the same load
        for key in order:
            start = time.perf_counter()
            out = steps[key](path)
            times[key].append(time.perf_counter() - start)
            read += key == "describe" and bool(out["text"])
    med = {k: statistics.median(v) for k, v in times.items()}
    # per photo, against the library's call on the same photo and the caption measured beside it
    of_library = [d / (1.15 * o + c) for d, o, c in zip(times["describe"], times["rapidocr"], times["caption"])]
    return {"photos": len(paths), "read": read, **{f"{k}_s": v for k, v in med.items()},
            "describe_mean_s": statistics.mean(times["describe"]),
            "describe_of_library_median": statistics.median(of_library)}


def time_hostile(captioner, folder):
    """Seconds to describe each of two hostile photos whole: 12 megapixels of noise, a page of ten thousand tiny
    characters."""
    import numpy as np
    from PIL import ImageDraw, ImageFont

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (3000, 4000, 3), dtype=np.uint8)).save(folder / "noise.jpg", quality=90)
    page = Image.new("RGB", (2000, 1500), "white")
    draw, font = ImageDraw.Draw(page), ImageFont.load_default(size=8)
    for y in range(0, 1500, 10):
        draw.text((0, y), "".join(chr(rng.integers(33, 127)) for _ in range(70)), font=font, fill="black")
    page.save(folder / "tiny.png")
    out = {}
    for name in ("noise.jpg", "tiny.png"):
        start = time.perf_counter()
        said = describe_one(captioner, folder / name)
        out[name] = {"seconds": time.perf_counter() - start, "text_lines": len(said["text"])}
    return out


def report_describe(r):
    """The table, and each group against its goal: a photo with text described in at most 1.15 times the rapidocr
    library's call on it plus the caption; a photo without, in at most the caption plus half a read (the reader's
    full read of the photos with text, median)."""
    print(f"describing photos ({r['checkpoint']}, {r['threads']} threads, load average {r['load_average_before']:.1f}"
          f" before, {r['load_average_after']:.1f} after): median ms per photo; a read: {r['read_s'] * 1000:.0f} ms")
    print("  photos                  n  read  caption  describe  rapidocr  read (full)  photo check  goal")
    for name, g in r["groups"].items():
        if name.endswith("with text"):
            goal = (f"at most 1.15 x rapidocr + caption: {g['describe_of_library_median']:.2f} of it "
                    f"(median per photo): {'met' if g['describe_of_library_median'] <= 1 else 'missed'}")
        else:
            most = g["caption_s"] + 0.5 * r["read_s"]
            goal = (f"at most caption + half a read, {most * 1000:.0f} ms: "
                    f"{'met' if g['describe_s'] <= most else 'missed'}")
        print(f"  {name:22s} {g['photos']:3d} {g['read']:5d}  {g['caption_s'] * 1000:7.1f}  "
              f"{g['describe_s'] * 1000:8.1f}  {g['rapidocr_s'] * 1000:8.1f}  {g['read_s'] * 1000:11.1f}  "
              f"{g['photo_check_s'] * 1000:11.2f}  {goal}")
    for name, h in r["hostile"].items():
        print(f"  hostile {name}: described in {h['seconds']:.2f} s, {h['text_lines']} lines of text said")

