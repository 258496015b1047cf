"""Degrade photos the ways blind people's photos are spoiled, then fit and score the photo check (photo_check.py).

    python degrade.py --fit                        # fit on Flickr8k train, thresholds on dev, write the checkpoint
    python degrade.py                              # score the checkpoint's photo check (dev, VizWiz, timing)
    python degrade.py --test                       # ... and the test split, once, at the end

From Flickr8k photos (its official train split for fitting, dev for choosing thresholds, test scored once) it makes
blur (gaussian, motion in a random direction, defocus), darkness (with the grain a phone adds when it boosts a dark
scene), over-exposure, wash-out and glare spots, crops (too close), quarter turns and mixes of them, each saved
again as a JPEG. Each split also gets photos of lit screens and pages (lit_scene: a monitor, TV or phone showing
text or a photo, a page or a medicine label, mostly on a dark surround, drawn with text_photos' texts over the
split's own photos), clean (not dark, however dark the room) and degraded the same ways. It measures every
photo (photo_check.measures) and runs the checkpoint's CNN on it, as the captioner would (the pooled feature,
confidence.pooled_features); these are cached under --cache. --fit fits
the logistic heads and the upright head and writes them into the checkpoint under "photo_check" (every other key
unchanged). It then prints, per problem, the ROC AUC on the degraded dev photos, the share of clean dev photos
that get any problem named, how often the lit scenes are called dark, bright or blurred, the same on the real
VizWiz photos (--vizwiz), and the check's time per photo against a caption's.
"""

import sys
from pathlib import Path

# ruff: noqa: E402 (the imports below need the path first)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's root: its commands and captioner/

import argparse
import hashlib
import inspect
import io
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from captioner import photo_check
from captioner.confidence import _logistic, pooled_features
from captioner.files import DataError
from captioner.layouts import find_images_dir, split_images
from image_loader import list_images, load_image
from tools import text_photos
from utils import HelpFormatter, find_checkpoint, load_checkpoint, positive, save_checkpoint

DEGRADABLE = ("blur", "dark", "bright", "cut_off")  # the problems the logistic heads learn (rotation: TURNS)
IMAGE_PROBLEMS = ("blur", "dark", "bright")  # those the image measures alone can score
VERSION = 2  # of the degradations and scenes: part of the cache's key
# lit screens and pages (lit_scene): photos of them are common among blind people's and mostly text on a dark
# surround, which Flickr8k lacks; a split gets this many of them per Flickr8k photo
SCENE_SHARE = 0.4
SCENES = ("monitor", "tv", "phone", "page", "label")
SCENE_WIDTH = {"monitor": (0.45, 1.15), "tv": (0.3, 0.85), "phone": (0.2, 0.5), "page": (0.4, 1.05),
               "label": (0.35, 0.9)}  # the lit thing's width, as a share of the frame's
# the frames scenes are drawn in (phones' 4:3 and 16:9, and square), then brought to a short side of 224
FRAMES = ((640, 480), (480, 640), (640, 360), (360, 640), (640, 640))
DARK_DESKTOPS = ((0, 0, 0), (12, 18, 40), (0, 40, 90), (20, 20, 24), (0, 0, 110), (35, 10, 45), (0, 60, 60))
LIGHT_DESKTOPS = ((240, 240, 240), (255, 255, 255), (220, 230, 240), (200, 220, 255))
SKINS = ((224, 172, 140), (198, 134, 100), (141, 85, 60), (90, 56, 40))
# what the scenes take from text_photos (part of the cache's key)
SCENE_SOURCES = (text_photos.content, text_photos.panel, text_photos.font, text_photos.background,
                 text_photos.perspective, text_photos.DRUGS, text_photos.DOSES, text_photos.FORMS,
                 text_photos.SMALL_PRINT, text_photos.SCREENS, text_photos.TITLES, text_photos.BUTTONS,
                 text_photos.HEADINGS, text_photos.SENTENCES, text_photos.SANS, text_photos.SERIF,
                 text_photos.FONT_DIRS)
# sizes (px, at Flickr8k's 224) of each blur: a gaussian's sigma, a shake's length, a defocus disc's radius
BLUR = {"gaussian": (1.3, 4.0), "motion": (6.0, 20.0), "defocus": (2.5, 7.0)}
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
    """Camera shake (motion), out of focus (disc) or soft (gaussian), each in BLUR's range of sizes."""
    kind = str(rng.choice(list(BLUR)))
    size = rng.uniform(*BLUR[kind])
    if kind == "gaussian":
        r = int(math.ceil(3 * size))
        g = np.exp(-0.5 * (np.arange(-r, r + 1) / size) ** 2)
        return _convolve(x, np.outer(g, g) / np.outer(g, g).sum()), kind
    if kind == "motion":
        return _convolve(x, _motion_kernel(size, rng.uniform(0, math.pi))), kind
    return _convolve(x, _disc_kernel(size)), kind


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


# ------------------------------------------------------------------------------------------- lit screens and pages

def _dimmed(image, factor):
    """A PIL image with its light scaled by `factor` in linear values (a room with the lights low), clipped."""
    lut = (_gamma(_linear(np.arange(256) / 255) * factor) * 255 + 0.5).astype(np.uint8).tolist()
    return image.point(lut * len(image.getbands()))


def _surround(py, photos, size):
    """What is around the screen or page: a Flickr8k photo scaled up (a room, a table) or a plain surface, mostly
    dim (a TV watched with the lights off, a page on a dark table: 0.5-15% of the light), a quarter as lit as
    usual. Returns (image, the light factor)."""
    if photos and py.random() < 0.6:
        room = Image.open(py.choice(photos)).convert("RGB").resize(size, Image.Resampling.BICUBIC)
    else:
        room = text_photos.background(py, [], size)
    factor = 1.0 if py.random() < 0.25 else math.exp(py.uniform(math.log(0.005), math.log(0.15)))
    return _dimmed(room, factor), factor


def _desktop(py, size):
    """A screen's display [size]: a dialog or error text from text_photos.content("screen") on a desktop, most
    often light text on a dark desktop (a PC's repair screen, a TV's menu), else a light desktop."""
    lines, colours, _, _ = text_photos.content("screen", py)
    dark = py.random() < 0.7
    desk = py.choice(DARK_DESKTOPS if dark else LIGHT_DESKTOPS)
    if py.random() < 0.5:  # the text straight on the desktop, in its own light or dark colour
        colours = ((py.randint(200, 255),) * 3 if dark else (py.randint(0, 40),) * 3, desk)
        lines = lines + [(t, py.randint(20, 30), False) for t in py.sample(text_photos.SCREENS, py.randint(0, 4))]
    display = Image.new("RGB", size, desk)
    card = text_photos.panel(lines, colours, py)
    scale = min(size[0] * py.uniform(0.35, 0.9) / card.width, size[1] * 0.9 / card.height)
    card = card.resize((max(1, int(card.width * scale)), max(1, int(card.height * scale))), Image.Resampling.BICUBIC)
    display.paste(card, (py.randint(0, max(0, size[0] - card.width)), py.randint(0, max(0, size[1] - card.height))))
    return display


def _tv_picture(py, photos, size):
    """A TV's display [size]: a Flickr8k photo, sometimes with a subtitle line."""
    if not photos or py.random() < 0.3:
        return _desktop(py, size)
    picture = Image.open(py.choice(photos)).convert("RGB").resize(size, Image.Resampling.BICUBIC)
    if py.random() < 0.4:
        draw = ImageDraw.Draw(picture)
        words = py.choice(text_photos.SENTENCES)
        draw.text((size[0] // 10, int(size[1] * 0.85)), words, font=text_photos.font(py, max(10, size[1] // 14)),
                  fill=(255, 255, 255), stroke_width=2, stroke_fill=(0, 0, 0))
    return picture


def _lit_object(py, photos, kind, width):
    """The lit thing of a scene, `width` px wide (RGB): a screen in its bezel (monitor, tv, phone) or a page or
    medicine-label card."""
    if kind in ("page", "label"):
        lines, colours, _, _ = text_photos.content("page" if kind == "page" else "medicine", py)
        card = text_photos.panel(lines, colours, py, pad=py.uniform(0.3, 0.8))
        return card.resize((width, max(1, card.height * width // card.width)), Image.Resampling.BICUBIC)
    aspect = {"monitor": py.choice([16 / 10, 16 / 9, 4 / 3]), "tv": 16 / 9, "phone": py.uniform(0.45, 0.56)}[kind]
    height = max(8, int(width / aspect))
    bezel = max(2, int(min(width, height) * (0.06 if kind == "phone" else py.uniform(0.015, 0.05))))
    inner = (max(4, width - 2 * bezel), max(4, height - 2 * bezel))
    display = _tv_picture(py, photos, inner) if kind == "tv" else _desktop(py, inner)
    body = Image.new("RGB", (width, height), (py.randint(0, 45),) * 3)
    body.paste(display, (bezel, bezel))
    return body


def _hand(canvas, box, skin, py, behind):
    """A hand holding the phone pasted at box: its palm behind the phone's lower half (behind=True, drawn before
    the phone) or its thumb and fingers over the phone's sides (behind=False, after)."""
    draw = ImageDraw.Draw(canvas)
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if behind:
        draw.ellipse((x0 - 0.25 * w, y0 + 0.45 * h, x1 + 0.25 * w, y1 + 0.8 * h), fill=skin)
        return
    side = x0 if py.random() < 0.5 else x1  # the thumb on one side, fingers on the other
    draw.ellipse((side - 0.12 * w, y0 + 0.5 * h, side + 0.06 * w, y0 + 0.85 * h), fill=skin)
    other = x1 if side == x0 else x0
    for k in range(py.randint(2, 4)):
        y = y0 + (0.45 + 0.12 * k) * h
        draw.ellipse((other - 0.06 * w, y, other + 0.12 * w, y + 0.09 * h), fill=skin)


def _spill(canvas, mask, at, py):
    """The light a screen or a lit page spills on a dim surround near it: its mask (pasted at `at`), blurred."""
    spill = Image.new("L", canvas.size, 0)
    spill.paste(mask, at)
    glow = np.asarray(spill.filter(ImageFilter.GaussianBlur(0.04 * canvas.width)), dtype=np.float32)[..., None]
    lin = _linear(np.asarray(canvas, dtype=np.float32) / 255) + glow / 255 * py.uniform(0.02, 0.12)
    return Image.fromarray((_gamma(lin) * 255 + 0.5).astype(np.uint8))


def lit_scene(photos, rng):
    """A photo of a lit screen or a page as a blind person's phone takes one -> (PIL photo, its kind in SCENES):
    a monitor, TV or phone (dark or light screen, text on it; a hand holds the phone) or a page or medicine label,
    filling part or most of the frame, mostly on a dim surround (a TV in a dark room, a white page on a dark
    table). The lit thing is exposed as a phone exposes for it (55-130% of its light), so the photo is not too
    dark however dark the room. Then a phone's grain, sometimes perspective, the frame's size brought to a short
    side of 224 px (as Flickr8k's photos here: a blur of so many pixels means the same on both) and a JPEG."""
    py = random.Random(int(rng.integers(2**62)))  # text_photos draws with Python's random
    kind, size = py.choice(SCENES), py.choice(FRAMES)
    canvas, light = _surround(py, photos, size)
    lo, hi = SCENE_WIDTH[kind]
    thing = _lit_object(py, photos, kind, int(size[0] * py.uniform(lo, hi)))
    if thing.height > 1.1 * size[1]:  # a tall phone or page: most of it in the frame
        thing = thing.resize((max(1, int(thing.width * 1.1 * size[1] / thing.height)), int(1.1 * size[1])))
    thing, tilt = _dimmed(thing, py.uniform(0.55, 1.3)), py.uniform(-10, 10)
    mask = Image.new("L", thing.size, 255).rotate(tilt, expand=True, resample=Image.Resampling.BICUBIC)
    thing = thing.rotate(tilt, expand=True, resample=Image.Resampling.BICUBIC)
    x = py.randint(min(0, size[0] - thing.width), max(0, size[0] - thing.width))  # a large one partly outside
    y = py.randint(min(0, size[1] - thing.height), max(0, size[1] - thing.height))
    box = (x, y, x + thing.width, y + thing.height)
    canvas = _spill(canvas, mask, (x, y), py) if light < 1 else canvas
    # the hand is lit by the room, or a little by the screen
    skin = tuple(int(c * max(light ** (1 / 2.2), py.uniform(0.15, 0.5))) for c in py.choice(SKINS))
    if kind == "phone":
        _hand(canvas, box, skin, py, behind=True)
    canvas.paste(thing, (x, y), mask)
    if kind == "phone":
        _hand(canvas, box, skin, py, behind=False)
    grain = np.random.default_rng(py.randint(0, 2**31)).normal(0, py.uniform(0.5, 3), (size[1], size[0], 1))
    canvas = Image.fromarray(np.clip(np.asarray(canvas, dtype=np.float32) + grain, 0, 255).astype(np.uint8))
    if py.random() < 0.4:
        canvas = text_photos.perspective(canvas, py, 0.1)
    return _as_photo(canvas, py), kind


def _as_photo(canvas, py):
    """A rendered scene brought to a short side of 224 px and saved as a phone's JPEG (quality 70-95)."""
    scale = 224 / min(canvas.size)
    canvas = canvas.resize((round(canvas.width * scale), round(canvas.height * scale)), Image.Resampling.BILINEAR,
                           reducing_gap=2.0)
    buf = io.BytesIO()
    canvas.save(buf, "JPEG", quality=py.randint(70, 95))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


# ------------------------------------------------------------------------------------------- measured sets

def _cache_key(captioner, split, names, variants, seed):
    """What a cached set depends on: the CNN's weights, the photos, the degradations."""
    h = hashlib.sha1(f"{VERSION} {split} {variants} {seed} {photo_check.SIZE} {photo_check.MEASURES} "
                     f"{SCENE_SHARE}".encode())
    h.update(" ".join(names).encode())
    for f in SCENE_SOURCES:  # the scenes' text, colours and surfaces come from text_photos
        h.update((inspect.getsource(f) if callable(f) else repr(f)).encode())
    for t in list(captioner.model.encoderCNN.backbone.state_dict().values())[:3]:
        h.update(t.float().numpy().tobytes())
    return h.hexdigest()[:12]


@torch.inference_mode()
def pooled_of(captioner, images):
    """PIL photos -> the captioner's pooled CNN features [N, F], as it computes them for a caption."""
    x = torch.stack([captioner.transform(im) for im in images])  # [N, 3, S, S]
    return pooled_features(captioner.model.encoderCNN.extract(x))


def clean_photos(images_dir, names, split, seed, load):
    """The split's clean photos: each Flickr8k photo as the captioner loads it (`load`: path -> PIL photo), then
    SCENE_SHARE as many lit scenes (lit_scene; the photos in and behind them from the same split) -> an iterator
    of (name, kind: "photo" or one of SCENES, PIL photo, the numpy generator for its degraded versions)."""
    for i, name in enumerate(names):
        yield name, "photo", load(images_dir / name), np.random.default_rng([seed, VERSION, i, hash_name(name)])
    photos = [images_dir / n for n in names]
    for i in range(round(SCENE_SHARE * len(names))):
        rng = np.random.default_rng([seed, VERSION, i, hash_name(f"scene {split}")])
        image, kind = lit_scene(photos, rng)
        yield f"{split}_scene_{i:05d}", kind, image, rng


def measure_set(captioner, images_dir, names, split, variants, seed, cache):
    """Each clean photo (clean_photos: Flickr8k's and lit scenes) and `variants` degraded versions of it ->
    {"measures" [N, M], "pooled" [N, F], "labels" [N, len(DEGRADABLE)], "turn" [N] (index into TURNS), "clean" [N]
    bool, "scene" [N] bool (a lit screen or page), "names", "kinds", "done"}, cached."""
    path = Path(cache) / f"{split}_{_cache_key(captioner, split, names, variants, seed)}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    keys = ("measures", "pooled", "labels", "turn", "clean", "names", "kinds", "done")
    rows, batch = {k: [] for k in keys}, []
    load = lambda p: load_image(p, captioner.preset["resize"])  # noqa: E731
    total = len(names) + round(SCENE_SHARE * len(names))
    items = clean_photos(images_dir, names, split, seed, load)
    for i, (name, kind, image, rng) in enumerate(tqdm(items, total=total, desc=f"degrading and measuring {split}",
                                                      unit="photo")):
        batch.append((image, [0] * len(DEGRADABLE), 0, True, name, kind, "clean"))
        for _ in range(variants):
            out, labels, turn, done = degrade(image, rng)
            batch.append((out, [labels[p] for p in DEGRADABLE], photo_check.TURNS.index(turn), False, name, kind,
                          ", ".join(done) or "re-encoded"))
        if len(batch) >= 32 or i == total - 1:
            rows["pooled"].append(pooled_of(captioner, [b[0] for b in batch]).half())
            rows["measures"].append(torch.from_numpy(np.stack([photo_check.measures(b[0]) for b in batch])))
            for k, key in enumerate(keys[2:], start=1):
                rows[key].extend(b[k] for b in batch)
            batch = []
    out = {"measures": torch.cat(rows["measures"]), "pooled": torch.cat(rows["pooled"]),
           "labels": torch.tensor(rows["labels"], dtype=torch.float32), "turn": torch.tensor(rows["turn"]),
           "clean": torch.tensor(rows["clean"]), "scene": torch.tensor([k != "photo" for k in rows["kinds"]]),
           "names": rows["names"], "kinds": rows["kinds"], "done": rows["done"]}
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
