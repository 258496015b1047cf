"""Make photos with text the way blind people's look: the text_photos.py set, and the texts lit scenes draw.

Text is rendered with PIL onto Flickr8k photos and plain surfaces (medicine-box labels with a name and a dose,
dark and bright screens with an error message, letter pages, signs), then degraded the way phone photos by blind
people are: blur (gaussian, motion), darkness, glare, a quarter or half turn, small tilts, perspective, JPEG,
crops. Negatives are Flickr8k photos and surfaces without rendered text, and text blurred past reading. make_set
writes a split's photos and their records (the key words, every rendered word, the turn that makes it upright).
Used by text_photos.py (scoring the text reader), bench.py --describe and degradations.py (lit scenes: content,
panel, font, background and perspective, whose source is part of degrade.py's cache key).
"""

import io
import json
import random
import re
import sys
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont
from tqdm import tqdm

FLICKR = Path(__file__).resolve().parents[2] / "shared" / "flickr8k"
FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/truetype/liberation")
SANS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "LiberationSans-Regular.ttf", "LiberationSans-Bold.ttf",
        "DejaVuSansCondensed-Bold.ttf", "LiberationSansNarrow-Regular.ttf")
SERIF = ("DejaVuSerif.ttf", "LiberationSerif-Regular.ttf")

DRUGS = ["Paracetamol", "Ibuprofen", "Amoxicillin", "Aspirin", "Cetirizine", "Loratadine", "Omeprazole",
         "Metformin", "Simvastatin", "Lisinopril", "Atorvastatin", "Amlodipine", "Bristol", "Naproxen",
         "Prednisolone", "Codeine", "Diazepam", "Tylenol", "Advil", "Claritin", "Zyrtec", "Benadryl",
         "Sudafed", "Nexium", "Vitamin C", "Allergy Relief", "Cold and Flu"]
DOSES = ["5 mg", "10 mg", "20 mg", "25 mg", "40 mg", "50 mg", "100 mg", "200 mg", "250 mg", "400 mg", "500 mg",
         "1000 mg", "5 ml", "2 mg"]
FORMS = ["tablets", "capsules", "film coated tablets", "caplets", "oral solution", "soft gels"]
SMALL_PRINT = ["Take one tablet twice a day", "Keep out of the reach of children", "Do not exceed the stated dose",
               "Store below 25 C", "Read the leaflet before use", "For oral use only", "24 tablets",
               "Take with food", "May cause drowsiness", "Pain relief"]
SCREENS = ["Cannot connect to the network", "Your password has expired", "No internet connection",
           "The printer is out of paper", "Battery low please connect charger", "Please insert a disk",
           "Update failed try again later", "Check your connection and try again", "Enter your PIN",
           "This app is not responding", "Windows could not start", "Press any key to continue",
           "Your session has timed out", "Storage almost full", "Incorrect password", "Device not recognized",
           "Sign in to continue", "Low disk space on this computer", "Call ended", "Select your language"]
TITLES = ["Error", "Warning", "System", "Settings", "Update", "Network", "Message"]
BUTTONS = ["OK", "Cancel", "Retry", "Close", "Continue"]
HEADINGS = ["Dear Customer", "Notice of appointment", "Electricity bill", "Invitation to the annual meeting",
            "Your new bank card", "Important information", "Dear Neighbor", "Water bill reminder",
            "Change of address", "Thank you for your order", "Hospital appointment letter", "Dear Friend"]
SENTENCES = ["We are writing to let you know that your account has been updated.",
             "Please find enclosed the details of your next visit.", "The meeting will take place on Monday morning.",
             "If you have any questions please call us.", "Your payment is due at the end of the month.",
             "Thank you for being a loyal customer.", "Please bring this letter with you.",
             "The office is open from nine to five.", "We look forward to seeing you soon.",
             "Please keep this letter in a safe place.", "Your card will arrive within ten days."]
SIGNS = ["EXIT", "NO SMOKING", "BUS STOP", "PUSH", "PULL", "RESTROOM", "WET FLOOR", "PRIORITY SEATING",
         "EMERGENCY EXIT", "DO NOT ENTER", "KEEP LEFT", "CAUTION", "STAIRS", "ELEVATOR", "OPEN", "CLOSED",
         "Platform 2", "Women", "Men", "Pharmacy", "Reception", "Waiting Room", "Parking", "Library",
         "Stop", "Information"]
KINDS = ("medicine", "screen", "page", "sign")
NO_TEXT = ("none", "blurred")  # the kinds of photo without legible text


def words_of(text):
    """Lower-case letter/digit runs, accents dropped ("RAÍZ" is "raiz", as a screen reader says either): how
    rendered and read text are compared."""
    plain = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return re.findall(r"[a-z0-9]+", plain.lower())


def font(rng, size, serif=False):
    """A TrueType font from the machine's DejaVu/Liberation (Debian fonts-dejavu-core, fonts-liberation), else
    PIL's built-in one."""
    for name in rng.sample(SERIF if serif else SANS, k=len(SERIF if serif else SANS)):
        for d in FONT_DIRS:
            if (Path(d) / name).is_file():
                return ImageFont.truetype(str(Path(d) / name), size)
    return ImageFont.load_default(size=size)


def panel(lines, colours, rng, pad=0.4):
    """lines: [(text, size, serif)] -> an RGB panel with the lines stacked, left-aligned or centred."""
    fg, bg = colours
    fonts = [font(rng, size, serif) for _, size, serif in lines]
    boxes = [f.getbbox(t) for (t, _, _), f in zip(lines, fonts)]
    width = max(b[2] for b in boxes)
    gap = [int(size * pad) for _, size, _ in lines]
    height = sum(b[3] + g for b, g in zip(boxes, gap))
    margin = max(size for _, size, _ in lines) // 2
    im = Image.new("RGB", (width + 2 * margin, height + 2 * margin), bg)
    draw, y, centre = ImageDraw.Draw(im), margin, rng.random() < 0.5
    for (text, _, _), f, b, g in zip(lines, fonts, boxes, gap):
        x = margin + ((width - b[2]) // 2 if centre else 0)
        draw.text((x, y), text, font=f, fill=fg)
        y += b[3] + g
    return im


def content(kind, rng):
    """(panel lines [(text, size, serif)], colours (fg, bg), key words, canvas background is a photo?)."""
    if kind == "medicine":
        name, dose = rng.choice(DRUGS), rng.choice(DOSES)
        name = name.upper() if rng.random() < 0.4 else name
        lines = [(name, rng.randint(44, 80), False), (f"{dose} {rng.choice(FORMS)}", rng.randint(30, 44), False)]
        lines += [(t, rng.randint(20, 28), False) for t in rng.sample(SMALL_PRINT, rng.randint(0, 2))]
        colours = rng.choice([((20, 30, 120), (245, 245, 240)), ((0, 0, 0), (255, 255, 255)),
                              ((255, 255, 255), (30, 90, 160)), ((120, 0, 0), (250, 240, 220))])
        return lines, colours, f"{name} {dose}", True
    if kind == "screen":
        main = rng.choice(SCREENS)
        lines = [(rng.choice(TITLES), rng.randint(28, 40), False), (main, rng.randint(30, 42), False),
                 ("   ".join(rng.sample(BUTTONS, 2)), rng.randint(24, 32), False)]
        colours = rng.choice([((235, 235, 235), (15, 25, 60)), ((255, 255, 255), (0, 0, 0)),
                              ((20, 20, 20), (225, 230, 235)), ((255, 255, 255), (0, 90, 170))])
        return lines, colours, main, True
    if kind == "page":
        heading = rng.choice(HEADINGS)
        lines = [(heading, rng.randint(32, 44), rng.random() < 0.5)]
        lines += [(t, rng.randint(20, 26), True) for t in rng.sample(SENTENCES, rng.randint(3, 7))]
        return lines, ((10, 10, 10), (250, 250, 245)), heading, rng.random() < 0.5
    sign = rng.choice(SIGNS)
    colours = rng.choice([((255, 255, 255), (0, 120, 60)), ((255, 255, 255), (200, 20, 20)),
                          ((0, 0, 0), (250, 210, 0)), ((255, 255, 255), (20, 60, 150))])
    return [(sign, rng.randint(60, 110), False)], colours, sign, True


def background(rng, photos, size):
    """A Flickr8k photo scaled up to the canvas (as a phone sees a table or a room), or a plain surface."""
    if photos and rng.random() < 0.7:
        return Image.open(rng.choice(photos)).convert("RGB").resize(size, Image.BICUBIC)
    base = np.array([rng.randint(60, 230) for _ in range(3)], np.float32)
    ramp = np.linspace(-30, 30, size[0])[None, :, None] * rng.choice([-1, 1])
    noise = np.random.default_rng(rng.randint(0, 2**31)).normal(0, 6, (size[1], size[0], 1))
    return Image.fromarray(np.clip(base + ramp + noise, 0, 255).astype(np.uint8))


def place(canvas, card, rng):
    """Paste the text card onto the canvas, scaled to 35-85% of its width, tilted a little, at a random spot."""
    scale = min(canvas.width * rng.uniform(0.35, 0.85) / card.width, canvas.height * 0.8 / card.height)
    card = card.resize((max(1, int(card.width * scale)), max(1, int(card.height * scale))), Image.BICUBIC)
    tilt = rng.uniform(-8, 8)
    mask = Image.new("L", card.size, 255).rotate(tilt, expand=True, resample=Image.BICUBIC)
    card = card.rotate(tilt, expand=True, resample=Image.BICUBIC)
    if card.width >= canvas.width or card.height >= canvas.height:
        card.thumbnail((canvas.width - 2, canvas.height - 2))
        mask = mask.resize(card.size)
    x = rng.randint(0, canvas.width - card.width)
    y = rng.randint(0, canvas.height - card.height)
    canvas.paste(card, (x, y), mask)
    return canvas, scale


def motion_blur(im, length, angle):
    """Blur along a line of `length` px at `angle` degrees: the phone moved while the shutter was open."""
    import cv2

    k = np.zeros((length, length), np.float32)
    k[length // 2, :] = 1.0
    k = cv2.warpAffine(k, cv2.getRotationMatrix2D((length / 2 - 0.5, length / 2 - 0.5), angle, 1.0),
                       (length, length))
    return Image.fromarray(cv2.filter2D(np.asarray(im), -1, k / max(k.sum(), 1e-6)))


def glare(im, rng):
    """A bright soft spot: a lamp or window reflected in a glossy box or screen."""
    w, h = im.size
    cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.15, 0.4) * max(w, h)
    yy, xx = np.mgrid[0:h, 0:w]
    spot = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None] * rng.uniform(120, 220)
    return Image.fromarray(np.clip(np.asarray(im, np.float32) + spot, 0, 255).astype(np.uint8))


def perspective(im, rng, amount=0.08):
    """The photo taken at a slant: the four corners moved in by up to `amount` of the sides."""
    w, h = im.size
    d = lambda s: rng.uniform(0, amount) * s  # noqa: E731
    quad = (d(w), d(h), d(w), h - d(h), w - d(w), h - d(h), w - d(w), d(h))  # tl, bl, br, tr
    return im.transform(im.size, Image.QUAD, quad, Image.BICUBIC)


def degrade(im, rng, text_px=0):
    """The spoils of a phone photo by someone who cannot see the screen; returns (photo, [what was done]).
    text_px > 0: the height of the largest text, blurred past reading (for the invention rate)."""
    done = []
    if rng.random() < 0.4:
        im, done = perspective(im, rng), done + ["perspective"]
    if text_px:
        im, done = im.filter(ImageFilter.GaussianBlur(rng.uniform(0.13, 0.2) * text_px)), done + ["heavy blur"]
    elif rng.random() < 0.35:
        im, done = im.filter(ImageFilter.GaussianBlur(rng.uniform(0.8, 2.0))), done + ["blur"]
    elif rng.random() < 0.3:
        im, done = motion_blur(im, rng.randint(3, 9), rng.uniform(0, 180)), done + ["motion"]
    if rng.random() < 0.25:
        im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.3, 0.6))
        noise = np.random.default_rng(rng.randint(0, 2**31)).normal(0, 5, (im.height, im.width, 1))
        im, done = Image.fromarray(np.clip(np.asarray(im) + noise, 0, 255).astype(np.uint8)), done + ["dark"]
    if rng.random() < 0.2:
        im, done = glare(im, rng), done + ["glare"]
    if rng.random() < 0.25:  # too close: part of the frame cut off
        w, h = im.size
        box = (int(rng.uniform(0, 0.12) * w), int(rng.uniform(0, 0.12) * h), w - int(rng.uniform(0, 0.12) * w),
               h - int(rng.uniform(0, 0.12) * h))
        im, done = im.crop(box).resize((w, h), Image.BICUBIC), done + ["crop"]
    return im, done


def make_photo(rng, photos, kind):
    """One photo: (image, record) where the record has the key words, every rendered word and the turn (the
    clockwise turn that makes it upright). kind: one of KINDS, 'blurred' (text past reading) or 'none'."""
    size = (1024, 768) if rng.random() < 0.6 else (768, 1024)
    text_kind = rng.choice(KINDS) if kind == "blurred" else kind
    if kind == "none":
        im, key, words, text_px = background(rng, photos, size), "", [], 0
    else:
        lines, colours, key, on_photo = content(text_kind, rng)
        im = background(rng, photos if on_photo else [], size)
        im, scale = place(im, panel(lines, colours, rng), rng)
        words = [w for text, _, _ in lines for w in words_of(text)]
        text_px = max(size for _, size, _ in lines) * scale
    im, done = degrade(im, rng, text_px if kind == "blurred" else 0)
    turn = rng.choice([0, 0, 0, 0, 90, 180, 270])  # sideways photos are common
    im = im.rotate(turn, expand=True)  # PIL turns counter-clockwise: `turn` clockwise puts it back upright
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=rng.randint(35, 90))
    return buf.getvalue(), {"kind": kind, "text_kind": text_kind if kind != "none" else None, "key": key,
                            "words": words, "turn": turn, "degraded": done}


def make_set(split, n_text, n_none, n_blurred, out_dir, seed):
    """Write the split's photos (JPEG) and records (photos.json) under out_dir; backgrounds from Flickr8k's
    official split of the same name (dev or test), so dev and test share no photo."""
    split_file = FLICKR / f"Flickr_8k.{split}Images.txt"
    photos = [FLICKR / "Images" / n for n in split_file.read_text().split()] if split_file.is_file() else []
    rng = random.Random(f"{split}-{seed}")
    kinds = [KINDS[i % len(KINDS)] for i in range(n_text)] + ["none"] * n_none + ["blurred"] * n_blurred
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i, kind in enumerate(tqdm(kinds, desc=f"making {split} photos", file=sys.stderr)):
        data, rec = make_photo(rng, photos, kind)
        rec["file"] = f"{split}_{i:04d}_{kind}.jpg"
        (out_dir / rec["file"]).write_bytes(data)
        records.append(rec)
    (out_dir / "photos.json").write_text(json.dumps(records, indent=1))
    return records
