"""Make photos with text the way blind people's look, and score the text reader (read_text.py) on them.

Text is rendered with PIL onto Flickr8k photos and plain surfaces (medicine-box labels with a name and a dose,
dark and bright screens with an error message, letter pages, signs), then degraded the way phone photos by blind
people are: blur (gaussian, motion), darkness, glare, a quarter or half turn, small tilts, perspective, JPEG,
crops. Negatives are Flickr8k photos and surfaces without rendered text, and text blurred past reading. Dev photos
(Flickr8k dev backgrounds) are for choosing thresholds (--sweep); the test photos (Flickr8k test backgrounds,
other seeds) are scored once at the end.

    python text_photos.py --split dev --sweep          # key-word recall etc. under a grid of junk rules
    python text_photos.py --split test                 # the chosen reader, beside the caption's time
    python text_photos.py --vizwiz ../shared/vizwiz_dev  # what the reader says of real photos

Prints key-word recall (share of legible-text photos whose key words are all read, as separate words),
precision of the words read, invention rate on photos without legible text, the longest word,
orientation accuracy, and the time per photo of first_look and read beside the shipped captioner's.
"""

import sys
from pathlib import Path

# ruff: noqa: E402 (the imports below need the path first)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's root: its commands and captioner/

import argparse
import io
import json
import random
import re
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont
from tqdm import tqdm

from captioner import read_text

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
