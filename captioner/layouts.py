"""The layouts a data folder may have, one reader each, in one table (LAYOUTS): Kaggle's Flickr8k (Images/ and
captions.txt, which also suits your own photos), the original Flickr8k (Flickr8k.token.txt) and Karpathy's split files
(Flickr8k, Flickr30k, COCO). Each reader recognises its own layout and reads it into (images_dir, {image name:
[caption, ...]}, {split: [image names]}); image_loader.Flickr8k.load takes the first that recognises the folder."""

import csv
import json
import logging
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from captioner.files import DataError

log = logging.getLogger("captioner")

IMAGE_DIRS = ("Images", "Flicker8k_Dataset", "Flickr8k_Dataset", "flickr30k-images", "flickr30k_images")
SPLIT_FRACTIONS = {"train": 6000 / 8000, "dev": 1000 / 8000, "test": 1000 / 8000}


# Karpathy's split files: their "split" per image, in this project's names ("restval" is COCO's extra training)
KARPATHY_FILES = ("dataset_flickr8k.json", "dataset_flickr30k.json", "dataset_coco.json")
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "dev", "test": "test"}


def find_images_dir(data_dir):
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data folder not found: {data_dir} ({LAYOUT_HELP})")
    for name in IMAGE_DIRS:
        if (data_dir / name).is_dir():
            return data_dir / name
    raise DataError(f"no image folder in {data_dir} ({LAYOUT_HELP})")


def _read_kaggle(path):
    # utf-8-sig: a spreadsheet's "CSV UTF-8" export starts with a byte-order mark, which is no part of the header
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip().lower() for c in rows[0][:2]] != ["image", "caption"]:
        raise DataError(f"{path}: first line must be the header 'image,caption'")
    return [(r[0].strip(), r[1].strip()) for r in rows[1:] if len(r) >= 2]


def _read_token(path):
    pairs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if "\t" not in line:
                continue
            key, caption = line.rstrip("\n").split("\t", 1)
            pairs.append((key.rsplit("#", 1)[0].strip(), caption.strip()))
    return pairs


def load_captions(data_dir):
    """Return (images_dir, {image name: [caption, ...]}) for the images that exist on disk, from the first
    captions file of CAPTION_FILES that the folder has."""
    data_dir = Path(data_dir)
    return find_layout(data_dir, CAPTION_FILES).captions(data_dir)


def read_caption_file(images_dir, path, reader):
    """{image name: [caption, ...]} of a captions file read by `reader` (path -> [(image name, caption)]), for
    the images in images_dir; caption lines naming images not there are skipped, and counted in one warning."""
    try:
        pairs = reader(path)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read captions file {path}: {e}") from None
    on_disk = set(os.listdir(images_dir))
    captions, missing = {}, Counter()
    for name, caption in pairs:
        if name not in on_disk:
            missing[name] += 1
        elif caption:
            captions.setdefault(name, []).append(caption)
    if missing:
        log.warning("skipped %d caption lines naming %d images not found in %s (e.g. %s)",
                    sum(missing.values()), len(missing), images_dir, next(iter(missing)))
    if not captions:
        raise DataError(f"{path} names no image found in {images_dir}")
    return captions


def load_karpathy(data_dir, path):
    """Karpathy's split file (images[].filename, .filepath, .split, .sentences[].raw): (images_dir,
    {image name: [caption, ...]}, {split: [names]}) for the images on disk. COCO's entries name a folder
    (`filepath`: train2014, val2014) under DIR; Flickr's images lie in DIR's image folder."""
    data_dir = Path(data_dir)
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))["images"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"cannot read {path} as Karpathy's split file (an 'images' list): {e}") from None
    in_folders = any("filepath" in e for e in entries)
    images_dir = data_dir if in_folders else find_images_dir(data_dir)
    captions, splits, missing = {}, {s: [] for s in SPLIT_FRACTIONS}, 0
    for e in entries:
        name = f"{e['filepath']}/{e['filename']}" if in_folders else e["filename"]
        caps = [c["raw"].strip() for c in e.get("sentences", []) if c.get("raw", "").strip()]
        if not (images_dir / name).is_file():
            missing += 1
        elif caps:
            captions[name] = caps
            splits[KARPATHY_SPLITS.get(e.get("split"), "train")].append(name)
    if missing:
        log.warning("skipped %d images of %s not found under %s", missing, Path(path).name, images_dir)
    if not captions:
        raise DataError(f"{path} names no image found under {images_dir}")
    log.info("Karpathy's split (%s): %s", Path(path).name, ", ".join(f"{s} {len(v)}" for s, v in splits.items()))
    return images_dir, captions, {s: sorted(v) for s, v in splits.items()}


def split_images(data_dir, names, seed=0):
    """Split image names (never caption rows) into train/dev/test.

    The official Flickr8k split files are used when they lie in data_dir; otherwise a seeded split
    with the official proportions (6000/1000/1000).
    """
    data_dir, names = Path(data_dir), sorted(names)
    files = {s: data_dir / f"Flickr_8k.{s}Images.txt" for s in SPLIT_FRACTIONS}
    if all(f.is_file() for f in files.values()):
        known = set(names)
        splits = {s: [n for n in f.read_text().split() if n in known] for s, f in files.items()}
        log.info("official split: %s", ", ".join(f"{s} {len(v)}" for s, v in splits.items()))
        return splits
    shuffled = names[:]
    random.Random(seed).shuffle(shuffled)
    n_train = round(len(names) * SPLIT_FRACTIONS["train"])
    n_dev = round(len(names) * SPLIT_FRACTIONS["dev"])
    splits = {"train": sorted(shuffled[:n_train]), "dev": sorted(shuffled[n_train:n_train + n_dev]),
              "test": sorted(shuffled[n_train + n_dev:])}
    log.info("no official split files in %s: seeded split (seed %d): %s", data_dir, seed,
             ", ".join(f"{s} {len(v)}" for s, v in splits.items()))
    return splits


class KarpathySplit:
    """Karpathy's split file (dataset_flickr8k.json, _flickr30k or _coco) in DIR: its captions and its split."""
    help = "Karpathy's DIR/dataset_flickr8k.json, dataset_flickr30k.json or dataset_coco.json beside the images"

    def recognises(self, data_dir):
        return self.file(data_dir) is not None

    def file(self, data_dir):
        return next((data_dir / f for f in KARPATHY_FILES if (data_dir / f).is_file()), None)

    def read(self, data_dir, seed):
        return load_karpathy(data_dir, self.file(data_dir))


@dataclass(frozen=True)
class CaptionFile:
    """An image folder beside a captions file named `name`, read by `parse` (path -> [(image name, caption)]),
    split by the official Flickr8k split files where they are there, else by a seeded split."""
    name: str
    parse: object
    help: str  # the layout in a few words, for the error that lists every layout

    def recognises(self, data_dir):
        return (data_dir / self.name).is_file()

    def captions(self, data_dir):
        images_dir = find_images_dir(data_dir)
        return images_dir, read_caption_file(images_dir, data_dir / self.name, self.parse)

    def read(self, data_dir, seed):
        images_dir, captions = self.captions(data_dir)
        return images_dir, captions, split_images(data_dir, captions, seed)


# Kaggle's captions.txt ("image,caption" CSV) before the original Flickr8k.token.txt ("name#i<TAB>caption")
CAPTION_FILES = [CaptionFile("captions.txt", _read_kaggle, "DIR/Images/ + DIR/captions.txt (Kaggle's layout, or "
                             "your own photos)"),
                 CaptionFile("Flickr8k.token.txt", _read_token, "DIR/Flicker8k_Dataset/ + DIR/Flickr8k.token.txt "
                             "(the original)")]
LAYOUTS = [KarpathySplit(), *CAPTION_FILES]  # Karpathy's file, where there is one, decides the split
# what a folder that no reader recognises is told, every layout named
LAYOUT_HELP = "expected " + ", or ".join(layout.help for layout in LAYOUTS)


def find_layout(data_dir, layouts=LAYOUTS):
    """The first of `layouts` that recognises the folder; else the folder's missing image folder, or its
    missing captions file, as a DataError."""
    layout = next((reader for reader in layouts if reader.recognises(data_dir)), None)
    if layout is None:
        find_images_dir(data_dir)  # no folder, or no image folder in it: that error first
        raise DataError(f"no captions file in {data_dir} ({LAYOUT_HELP})")
    return layout
