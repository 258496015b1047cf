"""The data: Flickr8k's captions and splits (Flickr8k), one (image, caption) pair at a time (CaptionDataset), the
vocabulary (Vocab), and how an image is read and preprocessed for the CNN (load_image, EvalTransform).

    data = Flickr8k.load("data/flickr8k_sample")            # any layout of captioner/layouts.py
    vocab = data.train_vocab(min_freq=3)
    pairs = CaptionDataset(data, "train", vocab, EvalTransform(preprocessing("efficientnet_lite0")))
    image, caption = pairs[0]                               # [3, S, S], [T + 1]: SOS w1 .. wn EOS
    loader = DataLoader(pairs, batch_size=32, shuffle=True, collate_fn=pad_captions)

Training itself reads the same data faster (captioner/batches.py): each image once per step with all of its
captions, its CNN feature cached on disk while the CNN is frozen, batches read by worker processes.
"""

import logging
import pickle
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pillow_heif import register_heif_opener
from torch.nn import functional as nn_functional
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from captioner.files import DataError, save_atomic
from captioner.images import read_photo
from captioner.layouts import SPLIT_FRACTIONS, find_layout
from image_intial_model import EOS_IDX, PAD_IDX, SOS_IDX, SPECIALS, UNK_IDX

log = logging.getLogger("captioner")
register_heif_opener()  # HEIC/HEIF, the iPhone's default format, opens as any other image

# ------------------------------------------------------------------------------------------- the data set

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


class CaptionDataset(Dataset):
    """One split as (image, caption) pairs, one pair per caption, as the seed's tutorial has them: item i is
    (the image, transformed [3, S, S]; its caption as word ids [T + 1]: SOS w1 .. wn EOS)."""

    def __init__(self, data, split, vocab, transform):
        self.images_dir, self.transform = data.images_dir, transform
        self.pairs = [(name, vocab.numericalize(c)) for name in data.splits[split] for c in data.captions[name]]

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        name, ids = self.pairs[i]
        return self.transform(load_image(self.images_dir / name)), torch.tensor(ids)


def pad_captions(pairs):
    """A DataLoader's collate_fn for CaptionDataset: [(image, caption), ...] -> (images [B, 3, S, S], captions
    [B, T + 1] padded with PAD to the longest)."""
    images, captions = zip(*pairs)
    return torch.stack(images), pad_sequence(list(captions), batch_first=True, padding_value=PAD_IDX)


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


def load_image(path, size=None, name=None):
    """Open an image as upright RGB, or raise DataError with one line saying why not (images.read_photo, which
    runner.py reads photos with too). path: a file's path, or a binary file object (an upload held in memory;
    `name` then labels it in errors). size: the side the image will be resized to: a large JPEG is decoded at a
    reduced scale, never below it."""
    return read_photo(path, DataError, size, name)
