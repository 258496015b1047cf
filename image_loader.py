"""Flickr8k data: caption files, image splits, vocabulary, preprocessing, datasets and collate.

Two layouts are read, as found in the wild:
  Kaggle:   DIR/Images/*.jpg + DIR/captions.txt        (CSV, header "image,caption")
  original: DIR/Flicker8k_Dataset/*.jpg (or Images/) + DIR/Flickr8k.token.txt  ("NAME.jpg#N<TAB>caption")
The official split files Flickr_8k.{train,dev,test}Images.txt are used when they lie in DIR.

A training item is one image with all of its captions, so the encoder runs once per image and the decoder
learns from every caption of that image in the same step.
"""

import contextlib
import csv
import io
import json
import logging
import os
import pickle
import random
import signal
import warnings
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from pillow_heif import register_heif_opener
from torch.nn import functional as nn_functional
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.io import ImageReadMode, decode_jpeg

from image_intial_model import EOS_IDX, PAD_IDX, SOS_IDX, SPECIALS, UNK_IDX

log = logging.getLogger("captioner")
register_heif_opener()  # HEIC/HEIF, the iPhone's default format, opens as any other image

IMAGE_DIRS = ("Images", "Flicker8k_Dataset", "Flickr8k_Dataset", "flickr30k-images", "flickr30k_images")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".heic", ".heif"}
SPLIT_FRACTIONS = {"train": 6000 / 8000, "dev": 1000 / 8000, "test": 1000 / 8000}
LAYOUT_HELP = ("expected DIR/Images/ + DIR/captions.txt (Kaggle's layout, or your own photos), "
               "DIR/Flicker8k_Dataset/ + DIR/Flickr8k.token.txt (the original), or Karpathy's "
               "DIR/dataset_flickr8k.json, dataset_flickr30k.json or dataset_coco.json beside the images")
# Karpathy's split files: their "split" per image, in this project's names ("restval" is COCO's extra training)
KARPATHY_FILES = ("dataset_flickr8k.json", "dataset_flickr30k.json", "dataset_coco.json")
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "dev", "test": "test"}


class DataError(Exception):
    """A problem with the user's data or files, reported as one line."""


# --------------------------------------------------------------------------------------------- captions

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


def save_atomic(obj, path, dump=torch.save, text=False):
    """Write to a temporary file in the same folder, then rename: a crash leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w" if text else "wb") as f:
            dump(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ vocabulary

def _tokenizer():
    import spacy  # imported here: spaCy takes a second to load and only the vocabulary needs it

    return spacy.blank("en").tokenizer  # the English tokenizer rules, no model download


class Vocab:
    """Words <-> indices. Specials first, then words in order of frequency (ties alphabetical)."""

    def __init__(self, itos):
        if list(itos[:len(SPECIALS)]) != SPECIALS:
            raise DataError(f"vocabulary must start with {SPECIALS}")
        self.itos = list(itos)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self._tok = None

    pad_idx, sos_idx, eos_idx, unk_idx = PAD_IDX, SOS_IDX, EOS_IDX, UNK_IDX

    def __len__(self):
        return len(self.itos)

    def tokenize(self, text):
        if self._tok is None:
            self._tok = _tokenizer()
        return [t.text.lower() for t in self._tok(text) if not t.is_space]

    @classmethod
    def build(cls, captions, min_freq=5):
        tok = cls(SPECIALS)
        counts = Counter(w for c in captions for w in tok.tokenize(c))
        words = sorted((w for w, n in counts.items() if n >= min_freq and w not in SPECIALS),
                       key=lambda w: (-counts[w], w))
        vocab = cls(SPECIALS + words)
        vocab._tok = tok._tok
        return vocab

    def numericalize(self, text):
        """Caption text -> [SOS, word ids..., EOS]."""
        return [self.sos_idx] + [self.stoi.get(w, self.unk_idx) for w in self.tokenize(text)] + [self.eos_idx]

    def decode(self, ids):
        """Word ids -> text, stopping at EOS and dropping the specials."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.eos_idx:
                break
            if i >= len(SPECIALS):
                words.append(self.itos[i])
        return " ".join(words)

    def save(self, path):
        """vocabulary.pkl: a dict of plain types only, so it loads with the safe unpickler below."""
        save_atomic({"itos": self.itos}, path, pickle.dump)


class _SeedVocabulary:
    """Stands in for the seed tutorial's pickled Vocabulary class: it only receives attributes."""


class _SafeUnpickler(pickle.Unpickler):
    """Builds plain types only: a pickle that names any other class or function is refused."""

    def find_class(self, module, name):
        if name in ("Vocabulary", "Vocab"):  # the seed's vocabulary object: attributes only, no code
            return _SeedVocabulary
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not a vocabulary")


def load_vocab_file(path):
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f).load()
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
        raise DataError(f"cannot load vocabulary {path}: {e}") from None
    itos = obj.get("itos") if isinstance(obj, dict) else getattr(obj, "itos", None)
    if isinstance(itos, dict):  # the seed stores {index: word}
        itos = [itos[i] for i in range(len(itos))]
    if not isinstance(itos, list) or not all(isinstance(w, str) for w in itos):
        raise DataError(f"{path} holds no vocabulary")
    return Vocab(itos)


# --------------------------------------------------------------------------------------- preprocessing
# The one place where images become the CNN's input. A preset is the plain dict stored in checkpoints:
# {"resize": int, "crop": int, "mean": [3 floats], "std": [3 floats]}. Every path goes through uint8 images
# resized to a square (Flickr8k's captions describe the whole photo, so nothing is cropped away in
# evaluation): Pillow resizes them (or the GPU, for plain JPEGs), then `normalize` (evaluation) or `augment`
# (training a CNN) turns a batch of them into floats on the device.

def train_size(preset):
    """The side of the images a trainable CNN's random crops are cut from."""
    return round(preset["crop"] * 1.07)


def resize_pil(im, size):
    """PIL image -> uint8 tensor [3, size, size] (bilinear, antialiased: as torchvision's Resize on PIL)."""
    im = im.resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(im)).permute(2, 0, 1)


def resize_tensor(images, size):
    """uint8 images [B, 3, h, w] -> uint8 [B, 3, size, size], resized as resize_pil does (to within rounding)."""
    if images.shape[-2:] == (size, size):
        return images
    x = nn_functional.interpolate(images.float(), (size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def _standardize(x, preset):
    """Floats in [0, 1] [B, 3, s, s] -> normalised with the preset's mean and std, in place. Channel by
    channel with Python numbers: a tensor of them would be copied to the device, and waited for."""
    for c, (mean, std) in enumerate(zip(preset["mean"], preset["std"])):
        x[:, c].sub_(mean).div_(std)
    return x


def _grey(x):
    """Floats [B, 3, s, s] -> their luma [B, 1, s, s] (ITU-R 601, as torchvision's greyscale)."""
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def to_device(t, device):
    """A CPU tensor to the device without waiting for it: a copy to CUDA from pageable memory waits until
    the device has done all the work queued before it, so a batch's small index tensors go through pinned
    memory, and the CPU keeps queueing work while the device computes."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def normalize(images, preset):
    """The evaluation preset on a batch: uint8 [B, 3, resize, resize] -> float [B, 3, crop, crop], centre crop
    (a no-op where resize == crop), scaled to [0, 1] and normalised."""
    crop, (h, w) = preset["crop"], images.shape[-2:]
    top, left = round((h - crop) / 2), round((w - crop) / 2)  # where torchvision's CenterCrop cuts
    return _standardize(images[..., top:top + crop, left:left + crop].float().div_(255), preset)


def augment(images, preset, generator):
    """The training preset of a CNN that learns, on a batch: uint8 [B, 3, train_size, train_size] ->
    float [B, 3, crop, crop]: a random crop per image, then brightness, contrast and saturation each scaled by
    a factor in [0.9, 1.1] (ColorJitter(0.1, 0.1, 0.1), in a fixed order), normalised. The random numbers come
    from `generator` (CPU), so a run is reproducible on any device."""
    b, crop = images.shape[0], preset["crop"]
    corners = torch.randint(images.shape[-1] - crop + 1, (b, 2), generator=generator).tolist()
    factors = to_device(torch.empty(b, 3).uniform_(0.9, 1.1, generator=generator), images.device).view(b, 3, 1, 1, 1)
    x = torch.stack([im[:, t:t + crop, s:s + crop] for im, (t, s) in zip(images, corners)]).float().div_(255)
    x = (x * factors[:, 0]).clamp_(0, 1)  # brightness
    x = (x * factors[:, 1] + _grey(x).mean((2, 3), keepdim=True) * (1 - factors[:, 1])).clamp_(0, 1)  # contrast
    x = (x * factors[:, 2] + _grey(x) * (1 - factors[:, 2])).clamp_(0, 1)  # saturation
    return _standardize(x, preset)


class EvalTransform:
    """PIL image -> float [3, crop, crop], the evaluation preset for one image (inference, logs)."""

    def __init__(self, preset):
        self.preset = preset

    def __call__(self, im):
        return normalize(resize_pil(im, self.preset["resize"]).unsqueeze(0), self.preset)[0]


def _to_rgb(im):
    if im.mode.startswith("I"):  # 16-bit greyscale (I;16, or I from older Pillows): convert() would clip it
        im = Image.fromarray((np.asarray(im, dtype=np.float64) / 256).clip(0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "P", "PA"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)  # transparency over white, not black
    return im.convert("RGB")


@contextlib.contextmanager
def _open_image(path):
    """Image.open, refusing images over Pillow's pixel limit: Pillow only warns between MAX_IMAGE_PIXELS and
    twice that, so the warning is made an error (DecompressionBombWarning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            yield im


def load_image(path, size=None, name=None):
    """Open an image as upright RGB, or raise DataError with one line saying why not. path: a file's path, or a
    binary file object (an upload held in memory; `name` then labels it in errors). size: the side the image
    will be resized to: a JPEG at least twice as large each way is decoded at a reduced scale (DCT scaling,
    1/2 to 1/8, never below size) rather than in full and then shrunk, so a 12-megapixel phone photo costs
    little more than a small one."""
    name = name or path
    try:
        with _open_image(path) as im:
            if size and im.format == "JPEG":
                im.draft("RGB", (size, size))
            return _to_rgb(ImageOps.exif_transpose(im))  # phones store rotation in EXIF: caption it upright
    except FileNotFoundError:
        raise DataError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{name}: is a folder") from None
    except PermissionError:
        raise DataError(f"{name}: not allowed to read it") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"{name}: refused: over {Image.MAX_IMAGE_PIXELS:,} pixels, too large to be a photo") from None
    except UnidentifiedImageError:
        raise DataError(f"{name}: not an image Pillow can read") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt files
        raise DataError(f"{name}: unreadable image ({e})") from None


def list_images(path):
    """An image path, or every image file directly in a folder (sorted)."""
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return [path]


# ------------------------------------------------------------------------------------------- data layouts
# The layouts a data folder may have: each reader recognises its own layout and reads it into (images_dir,
# {image name: [caption, ...]}, {split: [image names]}). Flickr8k.load takes the first in LAYOUTS that
# recognises the folder, so a new layout is a reader of its own and its place in that list.

class KarpathySplit:
    """Karpathy's split file (dataset_flickr8k.json, _flickr30k or _coco) in DIR: its captions and its split."""

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

    def recognises(self, data_dir):
        return (data_dir / self.name).is_file()

    def captions(self, data_dir):
        images_dir = find_images_dir(data_dir)
        return images_dir, read_caption_file(images_dir, data_dir / self.name, self.parse)

    def read(self, data_dir, seed):
        images_dir, captions = self.captions(data_dir)
        return images_dir, captions, split_images(data_dir, captions, seed)


# Kaggle's captions.txt ("image,caption" CSV) before the original Flickr8k.token.txt ("name#i<TAB>caption")
CAPTION_FILES = [CaptionFile("captions.txt", _read_kaggle), CaptionFile("Flickr8k.token.txt", _read_token)]
LAYOUTS = [KarpathySplit(), *CAPTION_FILES]  # Karpathy's file, where there is one, decides the split


def find_layout(data_dir, layouts=LAYOUTS):
    """The first of `layouts` that recognises the folder; else the folder's missing image folder, or its
    missing captions file, as a DataError."""
    layout = next((reader for reader in layouts if reader.recognises(data_dir)), None)
    if layout is None:
        find_images_dir(data_dir)  # no folder, or no image folder in it: that error first
        raise DataError(f"no captions file in {data_dir} ({LAYOUT_HELP})")
    return layout


# ------------------------------------------------------------------------------------------- datasets

@dataclass
class Flickr8k:
    """Everything read from a data folder: where the images are, their captions, and the split."""
    images_dir: Path
    captions: dict
    splits: dict

    @classmethod
    def load(cls, data_dir, seed=0, max_images=None):
        """Read by the first of LAYOUTS that recognises the folder."""
        data_dir = Path(data_dir)
        images_dir, captions, splits = find_layout(data_dir).read(data_dir, seed)
        if max_images:  # smoke runs: the first images of each split, in proportion
            splits = {s: v[:max(1, round(max_images * SPLIT_FRACTIONS[s]))] for s, v in splits.items()}
        return cls(images_dir, captions, splits)

    def train_vocab(self, min_freq=5):
        """The vocabulary of the training split's captions alone, so dev and test words stay unseen."""
        return Vocab.build([c for n in self.splits["train"] for c in self.captions[n]], min_freq)

    def items(self, split, vocab):
        """[(image name, [caption ids, ...]), ...] for one split."""
        return [(n, [vocab.numericalize(c) for c in self.captions[n]]) for n in self.splits[split]]


def default_workers(processes_per_node=1):
    """Loader worker processes: the cores this process may use, shared among the node's processes, at most 16."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, min(16, cores // processes_per_node))


def _ignore_sigint(worker_id):
    """Loader workers leave Ctrl-C to the main process, which stops training cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ShardedBatchSampler(Sampler):
    """Batches of `batch_size` images in a random order that its generator (seeded per epoch) decides.
    Under torchrun each of `world` processes takes its share of every batch, so N processes train on the
    same batches as one. A last batch of fewer images than processes is left out, so that no process is
    left with nothing to do while the others wait for its gradients."""

    def __init__(self, n, batch_size, rank=0, world=1, shuffle=True):
        self.n, self.batch_size, self.rank, self.world, self.shuffle = n, batch_size, rank, world, shuffle
        self.generator = torch.Generator()

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)
        for batch in order.split(self.batch_size):
            if len(batch) >= self.world:
                yield batch.tensor_split(self.world)[self.rank].tolist()

    def __len__(self):
        full, rest = divmod(self.n, self.batch_size)
        return full + (rest >= self.world if rest else 0)


class CaptionTable:
    """All captions of a split as one padded tensor on the device: tokens [M, T] (SOS ... EOS, then PAD);
    image i's captions are rows first[i]:first[i+1]. A batch of images is an index into it."""

    def __init__(self, captions, device):
        """captions: per image, a list of caption id lists (maybe empty: images to caption, no references)."""
        rows = [torch.tensor(c) for caps in captions for c in caps]
        self.lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        self.first = torch.tensor([0] + [len(caps) for caps in captions]).cumsum(0)
        tokens = pad_sequence(rows, batch_first=True, padding_value=Vocab.pad_idx) if rows else torch.zeros(0, 0)
        self.tokens, self.device = tokens.long().to(device), device

    def batch(self, images):
        """Image indices [B] -> (captions [N, T] padded to the batch's longest, image_index [N]) on the device,
        and the number of words to predict (known here, on the CPU: no wait for the device)."""
        counts = self.first[images + 1] - self.first[images]  # captions per image [B]
        image_index = torch.arange(len(images)).repeat_interleave(counts)  # [N]
        # caption k of the batch is its image's first row + its place among that image's captions
        place = torch.arange(len(image_index)) - (counts.cumsum(0) - counts)[image_index]
        rows = self.first[images][image_index] + place
        lengths = self.lengths[rows]
        longest = int(lengths.max()) if len(rows) else 0
        rows, image_index = to_device(torch.stack([rows, image_index]), self.device)  # one copy, not two
        return self.tokens[rows, :longest], image_index, int((lengths - 1).sum())  # words: all after SOS


# ------------------------------------------------------------------------------- where images come from
# A source gives the pixels (or cached features) of images by index: `load(indices)` runs in a loader worker
# and returns CPU data; `to_device(loaded, device)` runs in the main process and returns (the positions in
# `indices` that were readable, a tensor on the device).

class FileSource:
    """Image files, resized to `size`: by Pillow in the loader's workers, or, with a `decode_device`, plain JPEGs
    decoded and resized on that device in one call per batch, by the reader threads (other files keep Pillow's
    path and rules). Unreadable files are left out of their batch, each named in one warning."""

    def __init__(self, images_dir, names, size, workers, decode_device=None):
        self.images_dir, self.names, self.size, self.decode_device = Path(images_dir), names, size, decode_device
        # With device decoding the loader reads files and their headers and launches the device's work: two
        # threads keep up (file reads and the device's decoder release the GIL), they start at once where each
        # worker process would be a fork of this large, CUDA-holding one, and they leave the main thread only
        # the model to launch. Measured on an H100 with the decoding still in the main thread, feature pass over
        # 2,000 JPEGs: 1, 2, 4 threads 3,600, 3,585, 3,400 images/s; 4 processes 2,360.
        self.threads = decode_device is not None
        self.workers = min(workers, 2) if self.threads else workers

    @classmethod
    def for_device(cls, images_dir, names, size, workers, device):
        """The files for a pass on `device`: plain JPEGs decoded on a CUDA device (nvJPEG), Pillow elsewhere."""
        return cls(images_dir, names, size, workers, device if device.type == "cuda" else None)

    def load(self, indices):
        """A batch's files: a pack of tensors (see _read) for to_device, or with a decode_device, this batch
        ready on it, since this then runs in a reader thread."""
        pack = self._read(indices)
        return pack if self.decode_device is None else self._decode(pack, self.decode_device)

    def to_device(self, loaded, device):
        return self._decode(loaded, device) if self.decode_device is None else loaded

    def _read(self, indices):
        """A batch's files, packed as two tensors whatever its size, since each tensor that crosses from a
        worker to the main process costs a shared-memory handle: the plain JPEGs' bytes end to end, and the
        other images resized by Pillow [n, 3, size, size]. Errors come back as text, for the main process to
        say (a worker's log may go nowhere)."""
        jpegs, pillow, errors = [], [], []
        for k, i in enumerate(indices):
            try:
                x = read_image(self.images_dir / self.names[i], self.size, self.decode_device is not None)
                (jpegs if x.dim() == 1 else pillow).append((k, x))
            except DataError as e:
                errors.append(str(e))
        pack = {"jpeg_at": [k for k, _ in jpegs], "jpeg_lengths": [len(x) for _, x in jpegs],
                "jpeg_paths": [str(self.images_dir / self.names[indices[k]]) for k, _ in jpegs],
                "pillow_at": [k for k, _ in pillow], "errors": errors}
        pack["jpeg"] = torch.cat([x for _, x in jpegs]) if jpegs else torch.zeros(0, dtype=torch.uint8)
        pack["pillow"] = torch.stack([x for _, x in pillow]) if pillow else torch.zeros(0, dtype=torch.uint8)
        return pack

    def _decode(self, pack, device):
        """(positions kept in the batch, uint8 images [n, 3, size, size] on the device) from a pack."""
        errors = list(pack["errors"])
        images = dict(zip(pack["pillow_at"], to_device(pack["pillow"], device)))
        chunks = pack["jpeg"].split(pack["jpeg_lengths"])
        decoded = decode_jpegs(chunks, device)
        for k, path, im in zip(pack["jpeg_at"], pack["jpeg_paths"], decoded):
            try:  # if the device's decoder refused it: Pillow's path and rules
                if im is None:
                    im = to_device(resize_pil(load_image(path, self.size), self.size), device)
                images[k] = im
            except DataError as e:
                errors.append(str(e))
        for e in errors:
            log.warning("skipping %s", e)
        kept = sorted(images)
        by_shape = {}  # decoded JPEGs come in their own sizes: resized together, one shape at a time
        for k in kept:
            by_shape.setdefault(tuple(images[k].shape), []).append(k)
        for shape, group in by_shape.items():
            if shape[1:] != (self.size, self.size):
                images.update(zip(group, resize_tensor(torch.stack([images[k] for k in group]), self.size)))
        return kept, torch.stack([images[k] for k in kept]) if kept else None


def decode_jpegs(chunks, device):
    """JPEG bytes (uint8 [n] each) -> uint8 [3, h, w] each, on the device, in one call (nvJPEG on CUDA); if the
    call fails (a file corrupt past its header), each alone, with None for those that fail."""
    if not chunks:
        return []
    try:
        return decode_jpeg(list(chunks), mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        out = []
        for c in chunks:
            try:
                out.append(decode_jpeg(c, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
        return out


def _is_plain_jpeg(im, data):
    """Files the device decodes to Pillow's pixels, to within a level: baseline 8-bit RGB JPEGs, upright, complete."""
    return (im.format == "JPEG" and im.mode == "RGB" and not im.info.get("progressive")
            and not im.info.get("progression") and im.getexif().get(0x0112, 1) == 1
            and data.endswith(b"\xff\xd9"))  # no end marker: truncated, and Pillow's rules apply


def read_image(path, size, raw_jpeg=False):
    """One image for a batch: uint8 [3, size, size] resized by Pillow, or with raw_jpeg, for a plain JPEG, its
    bytes (uint8 [n]) for FileSource to decode on the device. Raises DataError, as load_image."""
    if raw_jpeg:
        try:
            data = Path(path).read_bytes()
            with _open_image(io.BytesIO(data)) as im:
                if _is_plain_jpeg(im, data):
                    return torch.frombuffer(bytearray(data), dtype=torch.uint8)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning):
            pass  # load_image says what is wrong, in one line
    return resize_pil(load_image(path, size), size)


class _Loadable(Dataset):
    """A source as a Dataset whose items are whole batches (lists of indices), for the DataLoader's workers."""

    def __init__(self, source):
        self.source = source

    def __getitem__(self, indices):
        return indices, self.source.load(indices)


class _Plan:
    """The batches of this pass, as the DataLoader's sampler: set before each pass (a resumed epoch skips
    some), while persistent workers live on."""
    batches = ()

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


class Batch(NamedTuple):
    x: torch.Tensor  # features [B, F] / [B, R, F], or images [B, 3, S, S]
    captions: torch.Tensor  # [N, T]: SOS w1 .. wn EOS, padded with PAD
    image_index: torch.Tensor  # [N]: the image (row of x) of each caption
    words: int  # words to predict in `captions`
    names: list  # [B] image names


class Batches:
    """The batches of one split, ready on the device: each a Batch.

    x is what the model's forward takes: cached features [B, F] or [B, R, F] (`from_features`), or images
    [B, 3, S, S], normalised (evaluation preset) or augmented (training preset) on the device. `transform`
    is None (features), "eval", "train" or "raw" (uint8, as resized: what the image store keeps). encode: a
    frozen CNN's forward (images -> features) run on each batch after its transform, which makes x features."""

    def __init__(self, source, captions, names, device, preset=None, transform=None, batch_size=32,
                 shuffle=False, rank=0, world=1, encode=None):
        self.source, self.captions, self.names, self.device = source, captions, names, device
        self.preset, self.transform, self.encode = preset, transform, encode
        self.sampler = ShardedBatchSampler(len(names), batch_size, rank, world, shuffle)
        self.from_features = transform is None or encode is not None
        self._plan, self._loader = _Plan(), None

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        return self.iterate()

    def iterate(self, skip=0):
        """This pass's batches after the first `skip` (a resumed epoch): the order, and each batch's random
        augmentation, depend only on the sampler's generator, so skipped batches are never read."""
        self._plan.batches = list(self.sampler)[skip:]
        seed = int(torch.randint(2**62, (1,), generator=self.sampler.generator))
        for k, (indices, loaded) in enumerate(self._loaded(), start=skip):
            kept, x = self.source.to_device(loaded, self.device)
            if not kept:  # every image of the batch was unreadable (only image files can be: never in training)
                continue
            indices = [indices[i] for i in kept]
            x = self._transform(x, torch.Generator().manual_seed(seed + k))
            if self.encode is not None:
                x = self.encode(x)
            yield Batch(x, *self.captions.batch(torch.tensor(indices)), [self.names[i] for i in indices])

    def _loaded(self):
        if self.source.workers == 0:
            return ((b, self.source.load(b)) for b in self._plan)
        if getattr(self.source, "threads", False):
            return _in_threads(self.source.load, list(self._plan), self.source.workers)
        if self._loader is None:
            # The loader's own generator: without one, it seeds its workers from the global RNG, and whether a
            # run had to fill a cache would change its dropout masks.
            self._loader = DataLoader(_Loadable(self.source), sampler=self._plan, batch_size=None,
                                      num_workers=self.source.workers, pin_memory=self.device.type == "cuda",
                                      persistent_workers=True, worker_init_fn=_ignore_sigint,
                                      generator=torch.Generator())
        return iter(self._loader)

    def _transform(self, x, generator):
        if self.transform == "eval":
            x = normalize(x, self.preset)
        elif self.transform == "train":
            x = augment(x, self.preset, generator)
        return cnn_layout(x) if x.dim() == 4 and x.is_floating_point() else x


def _in_threads(load, plan, threads):
    """(batch, load(batch)) for each batch of `plan`, in order, loaded by `threads` threads that keep a few
    batches ahead of the caller."""
    pool, ahead = ThreadPoolExecutor(threads), deque()
    try:
        for indices in plan:
            ahead.append((indices, pool.submit(load, indices)))
            if len(ahead) > 2 * threads:
                done, future = ahead.popleft()
                yield done, future.result()
        while ahead:
            done, future = ahead.popleft()
            yield done, future.result()
    finally:  # a pass stopped early: batches not yet started are dropped
        pool.shutdown(cancel_futures=True)


def cnn_layout(images):
    """Images [B, 3, S, S] in the layout of the CNN's weights: channels-last on CUDA (tensor cores want NHWC)."""
    return images.contiguous(memory_format=torch.channels_last) if images.is_cuda else images


def image_batches(images_dir, names, size, device, workers, batch_size=64, transform="raw", preset=None):
    """Batches of image files with no captions: the feature pass and the image store read them so; on CUDA
    plain JPEGs are decoded on the GPU."""
    source = FileSource.for_device(images_dir, names, size, workers, device)
    return Batches(source, CaptionTable([[] for _ in names], device), names, device, preset, transform,
                   batch_size)
