"""Spoil photos the ways blind people's photos are spoiled, and draw the lit screens and pages they often take.

degrade(photo, rng): blur (gaussian, motion in a random direction, defocus), darkness (with the grain a phone adds
when it boosts a dark scene), over-exposure, wash-out and glare spots, crops (too close), quarter turns and mixes of
them, each saved again as a JPEG. lit_scene(photos, rng): a monitor, TV or phone showing text or a photo, a page or
a medicine label, mostly on a dark surround, drawn with text_scenes' texts over the given photos. degrade.py makes
the photo check's sets of them (photo_check_sets.py); VERSION and SCENE_SOURCES are part of those sets' cache key.
"""

import io
import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter

from captioner import photo_check
from tools import text_scenes

DEGRADABLE = ("blur", "dark", "bright", "cut_off")  # the problems the logistic heads learn (rotation: TURNS)
VERSION = 2  # of the degradations and scenes: part of the cache's key
SCENES = ("monitor", "tv", "phone", "page", "label")
SCENE_WIDTH = {"monitor": (0.45, 1.15), "tv": (0.3, 0.85), "phone": (0.2, 0.5), "page": (0.4, 1.05),
               "label": (0.35, 0.9)}  # the lit thing's width, as a share of the frame's
# the frames scenes are drawn in (phones' 4:3 and 16:9, and square), then brought to a short side of 224
FRAMES = ((640, 480), (480, 640), (640, 360), (360, 640), (640, 640))
DARK_DESKTOPS = ((0, 0, 0), (12, 18, 40), (0, 40, 90), (20, 20, 24), (0, 0, 110), (35, 10, 45), (0, 60, 60))
LIGHT_DESKTOPS = ((240, 240, 240), (255, 255, 255), (220, 230, 240), (200, 220, 255))
SKINS = ((224, 172, 140), (198, 134, 100), (141, 85, 60), (90, 56, 40))
# what the scenes take from text_scenes (part of the cache's key)
SCENE_SOURCES = (text_scenes.content, text_scenes.panel, text_scenes.font, text_scenes.background,
                 text_scenes.perspective, text_scenes.DRUGS, text_scenes.DOSES, text_scenes.FORMS,
                 text_scenes.SMALL_PRINT, text_scenes.SCREENS, text_scenes.TITLES, text_scenes.BUTTONS,
                 text_scenes.HEADINGS, text_scenes.SENTENCES, text_scenes.SANS, text_scenes.SERIF,
                 text_scenes.FONT_DIRS)
# sizes (px, at Flickr8k's 224) of each blur: a gaussian's sigma, a shake's length, a defocus disc's radius
BLUR = {"gaussian": (1.3, 4.0), "motion": (6.0, 20.0), "defocus": (2.5, 7.0)}


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
        room = text_scenes.background(py, [], size)
    factor = 1.0 if py.random() < 0.25 else math.exp(py.uniform(math.log(0.005), math.log(0.15)))
    return _dimmed(room, factor), factor


def _desktop(py, size):
    """A screen's display [size]: a dialog or error text from text_scenes.content("screen") on a desktop, most
    often light text on a dark desktop (a PC's repair screen, a TV's menu), else a light desktop."""
    lines, colours, _, _ = text_scenes.content("screen", py)
    dark = py.random() < 0.7
    desk = py.choice(DARK_DESKTOPS if dark else LIGHT_DESKTOPS)
    if py.random() < 0.5:  # the text straight on the desktop, in its own light or dark colour
        colours = ((py.randint(200, 255),) * 3 if dark else (py.randint(0, 40),) * 3, desk)
        lines = lines + [(t, py.randint(20, 30), False) for t in py.sample(text_scenes.SCREENS, py.randint(0, 4))]
    display = Image.new("RGB", size, desk)
    card = text_scenes.panel(lines, colours, py)
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
        words = py.choice(text_scenes.SENTENCES)
        draw.text((size[0] // 10, int(size[1] * 0.85)), words, font=text_scenes.font(py, max(10, size[1] // 14)),
                  fill=(255, 255, 255), stroke_width=2, stroke_fill=(0, 0, 0))
    return picture


def _lit_object(py, photos, kind, width):
    """The lit thing of a scene, `width` px wide (RGB): a screen in its bezel (monitor, tv, phone) or a page or
    medicine-label card."""
    if kind in ("page", "label"):
        lines, colours, _, _ = text_scenes.content("page" if kind == "page" else "medicine", py)
        card = text_scenes.panel(lines, colours, py, pad=py.uniform(0.3, 0.8))
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
    py = random.Random(int(rng.integers(2**62)))  # text_scenes draws with Python's random
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
        canvas = text_scenes.perspective(canvas, py, 0.1)
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
