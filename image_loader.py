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
import logging
import os
import pickle
import random
import signal
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms

log = logging.getLogger("captioner")

PAD, SOS, EOS, UNK = "<PAD>", "<SOS>", "<EOS>", "<UNK>"
SPECIALS = [PAD, SOS, EOS, UNK]  # PAD must stay index 0: pad_sequence and ignore_index rely on it
IMAGE_DIRS = ("Images", "Flicker8k_Dataset", "Flickr8k_Dataset")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLIT_FRACTIONS = {"train": 6000 / 8000, "dev": 1000 / 8000, "test": 1000 / 8000}
LAYOUT_HELP = ("expected DIR/Images/ + DIR/captions.txt (Kaggle) or "
               "DIR/Flicker8k_Dataset/ + DIR/Flickr8k.token.txt (original)")


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
    with open(path, newline="", encoding="utf-8") as f:
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
    """Return (images_dir, {image name: [caption, ...]}) for the images that exist on disk."""
    data_dir = Path(data_dir)
    images_dir = find_images_dir(data_dir)
    if (data_dir / "captions.txt").is_file():
        path, reader = data_dir / "captions.txt", _read_kaggle
    elif (data_dir / "Flickr8k.token.txt").is_file():
        path, reader = data_dir / "Flickr8k.token.txt", _read_token
    else:
        raise DataError(f"no captions file in {data_dir} ({LAYOUT_HELP})")
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
    return images_dir, captions


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

    pad_idx, sos_idx, eos_idx, unk_idx = range(4)

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
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as f:
            pickle.dump({"itos": self.itos}, f)
        os.replace(tmp, path)


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

def build_transform(preset, train=False):
    """The one place where images become tensors. `preset` is the plain dict stored in checkpoints:
    {"resize": int, "crop": int, "mean": [3 floats], "std": [3 floats]}. Images are squashed to a square
    (Flickr8k's captions describe the whole photo, so nothing is cropped away in evaluation); training
    with a trainable CNN adds a random crop and mild colour jitter."""
    interp = transforms.InterpolationMode.BILINEAR
    if train:
        size = preset["crop"]
        steps = [transforms.Resize((round(size * 1.07),) * 2, interpolation=interp, antialias=True),
                 transforms.RandomCrop(size), transforms.ColorJitter(0.1, 0.1, 0.1)]
    else:
        steps = [transforms.Resize((preset["resize"],) * 2, interpolation=interp, antialias=True),
                 transforms.CenterCrop(preset["crop"])]
    return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(preset["mean"], preset["std"])])


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


def load_image(path):
    """Open an image as upright RGB, or raise DataError with one line saying why not."""
    try:
        with _open_image(path) as im:
            return _to_rgb(ImageOps.exif_transpose(im))  # phones store rotation in EXIF: caption it upright
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"{path}: refused: over {Image.MAX_IMAGE_PIXELS:,} pixels, too large to be a photo") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image Pillow can read") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt files
        raise DataError(f"{path}: unreadable image ({e})") from None


def list_images(path):
    """An image path, or every image file directly in a folder (sorted)."""
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return [path]


# ------------------------------------------------------------------------------------------- datasets

@dataclass
class Flickr8k:
    """Everything read from a data folder: where the images are, their captions, and the split."""
    images_dir: Path
    captions: dict
    splits: dict

    @classmethod
    def load(cls, data_dir, seed=0, max_images=None):
        images_dir, captions = load_captions(data_dir)
        splits = split_images(data_dir, captions, seed)
        if max_images:  # smoke runs: the first images of each split, in proportion
            splits = {s: v[:max(1, round(max_images * SPLIT_FRACTIONS[s]))] for s, v in splits.items()}
        return cls(images_dir, captions, splits)

    def train_vocab(self, min_freq=5):
        """The vocabulary of the training split's captions alone, so dev and test words stay unseen."""
        return Vocab.build([c for n in self.splits["train"] for c in self.captions[n]], min_freq)

    def items(self, split, vocab):
        """[(image name, [caption ids, ...]), ...] for one split."""
        return [(n, [vocab.numericalize(c) for c in self.captions[n]]) for n in self.splits[split]]


def readable_images(images_dir, names):
    """The names whose files open as images (a header check: fast); the others are counted in one warning."""
    good, bad = [], []
    for n in names:
        try:
            with _open_image(images_dir / n):
                good.append(n)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning):
            bad.append(n)
    if bad:
        log.warning("skipped %d unreadable images, e.g. %s", len(bad), images_dir / bad[0])
    return good


class FlickrDataset(Dataset):
    """One item per image: (image tensor or cached feature, [caption id tensors], image name).

    `features` maps image name -> cached encoder feature; without it images are read and transformed.
    An image that fails to decode (say, a truncated file) gives None, which Collate leaves out.
    """

    def __init__(self, images_dir, items, vocab, transform=None, features=None):
        self.images_dir, self.items, self.vocab = Path(images_dir), items, vocab
        self.transform, self.features = transform, features
        self.failed = set()

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        name, caps = self.items[i]
        if self.features is not None:
            x = self.features[name]
        else:
            try:
                x = self.transform(load_image(self.images_dir / name))
            except DataError as e:
                if name not in self.failed:  # once per worker, not once per epoch
                    self.failed.add(name)
                    log.warning("skipping %s", e)
                return None
        return x, [torch.tensor(c) for c in caps], name


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


class Collate:
    """Stack images, pad all captions of the batch, and say which image each caption belongs to.

    Returns images [B, ...], captions [N, T] padded with PAD, lengths [N], image_index [N], names [B];
    or None when no image of the batch could be read."""

    def __init__(self, pad_idx=0):
        self.pad_idx = pad_idx

    def __call__(self, batch):
        batch = [b for b in batch if b is not None]
        if not batch:
            return None
        images = torch.stack([b[0] for b in batch])
        caps = [c for b in batch for c in b[1]]
        image_index = torch.tensor([i for i, b in enumerate(batch) for _ in b[1]])
        lengths = torch.tensor([len(c) for c in caps], dtype=torch.long)
        captions = (pad_sequence(caps, batch_first=True, padding_value=self.pad_idx) if caps
                    else torch.zeros((0, 0), dtype=torch.long))  # images to caption, no references
        return images, captions, lengths, image_index, [b[2] for b in batch]


def ignore_sigint(worker_id):
    """DataLoader workers leave Ctrl-C to the main process, which stops training cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def get_loader(dataset, batch_size=32, shuffle=True, num_workers=0, pin_memory=False, rank=0, world=1):
    """A loader of Collate batches; its batch_sampler's generator decides the order (seed it per epoch)."""
    sampler = ShardedBatchSampler(len(dataset), batch_size, rank, world, shuffle)
    # The loader's own generator too: without one, each new iterator draws a seed from the global RNG, and
    # whether a run had to fill the feature cache would change its dropout masks.
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=Collate(Vocab.pad_idx),
                      pin_memory=pin_memory, generator=torch.Generator(), persistent_workers=num_workers > 0,
                      worker_init_fn=ignore_sigint)
