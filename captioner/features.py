"""What makes passes over images cheap: a frozen CNN's features computed once per image (`cached_features`,
kept in a `FeatureFile`), images decoded and resized once for a CNN that learns (`ImageStore`), with the Batches
sources that read them.
`split_sources` is the whole road from a data set's splits to the sources of their cached features, for
training and evaluation alike.

Decoding JPEGs is the slow part of every pass over images, so it is done once. Each cache file's name is a hash
of everything that changes its content (the CNN's weights, the preprocessing, the precision, each image file's
name, size and modification time), so a stale one is never used.
"""

import hashlib
import itertools
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from captioner.batches import cnn_layout, image_batches
from captioner.files import DataError, save_atomic
from image_loader import to_device
from utils import autocast, autocast_dtype, cuda_graphed

log = logging.getLogger("captioner")


# ------------------------------------------------------------------------------------------ sources
# Batches' sources of cached data (see image_loader's FileSource for the protocol: `load` in a loader worker,
# `to_device` in the main process).

class FeatureSource:
    """Cached CNN features, all of them one tensor on the training device: a batch is an index into it."""
    workers = 0  # indexing a tensor on the device needs no worker processes

    def __init__(self, features, rows):
        self.features, self.rows = features, torch.tensor(rows, dtype=torch.long)

    def load(self, indices):
        return self.rows[indices]

    def to_device(self, rows, device):
        return list(range(len(rows))), self.features[to_device(rows, self.features.device)]


class FeatureFileSource:
    """Cached CNN features read from their file (FeatureFile) a batch at a time, in the loader's workers."""

    def __init__(self, file, rows, workers):
        self.file, self.rows, self.workers = file, rows, workers

    def load(self, indices):
        return self.file.read([self.rows[i] for i in indices])

    def to_device(self, features, device):
        return list(range(len(features))), to_device(features, device)  # pinned already by a loader with workers


class StoreSource:
    """Images from an ImageStore (uint8, resized once), image i its row i: an epoch reads no JPEG."""

    def __init__(self, store, workers):
        self.store, self.workers = store, workers

    def load(self, indices):
        return self.store.read(indices)

    def to_device(self, images, device):
        return list(range(len(images))), to_device(images, device)  # pinned already by a loader with workers


# ------------------------------------------------------------------------------------------- caches

def files_key(h, images_dir, names):
    """Add each image file's name, size and modification time to the hash `h`."""
    for n in names:
        st = (Path(images_dir) / n).stat()
        h.update(f"{n}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h


def feature_cache_key(encoder, preset, images_dir, names, precision):
    """Hash of everything that changes the features: the CNN's weights, the preprocessing, the precision,
    pooled or regions, and each image file's name, size and modification time."""
    h = hashlib.sha256(json.dumps([preset, str(precision), encoder.spatial], sort_keys=True).encode())
    for k, t in encoder.backbone.state_dict().items():
        h.update(k.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return files_key(h, images_dir, names).hexdigest()[:24]


@torch.inference_mode()
def feature_batches(encoder, images_dir, names, preset, device, precision="auto", workers=2, batch_size=64):
    """Run the CNN once over the images (evaluation preset), yielding (names, features [n, F] or regions
    [n, R, F]) per batch, on the device; unreadable images are left out, each named in one warning."""
    encoder.eval()
    if hasattr(encoder, "renew"):
        encoder.renew()  # a runtime's CNN, before the loader's workers fork: see runtimes.OnnxBackbone.renew
    batches = image_batches(images_dir, names, preset["resize"], device, workers, batch_size, "eval", preset)

    def extract(x):
        with autocast(device, precision, cache_enabled=False):  # a CUDA graph cannot use autocast's cache
            return encoder.extract(x)

    # On CUDA every batch has the same shape (the last one padded), so that cuDNN tunes its kernels once and
    # the CNN's forward runs as one CUDA graph, the CPU free to decode the next batch meanwhile. It is captured
    # before the reader threads start, as they decode on the device: while a graph is being captured, no other
    # thread may allocate device memory.
    graphed = None
    if device.type == "cuda" and len(batches) >= 4:
        size = preset["crop"]
        graphed = cuda_graphed(extract, cnn_layout(torch.zeros(batch_size, 3, size, size, device=device)))
    kept = 0
    for batch in tqdm(batches, desc="extracting CNN features", unit="batch", leave=False, disable=None):
        x, n = batch.x, len(batch.names)
        if n < batch_size and x.is_cuda:
            x = cnn_layout(torch.cat([x, x.new_zeros((batch_size - n, *x.shape[1:]))]))
        f = (graphed(x) if graphed else extract(x))[:n]
        # region maps are R times larger than pooled features: half precision halves the cache
        yield batch.names, f.half() if encoder.spatial else f.float()
        kept += n
    if kept < len(names):
        log.warning("skipped %d unreadable images", len(names) - kept)


def extract_features(encoder, images_dir, names, preset, device, precision="auto", workers=2, batch_size=64):
    """The CNN's features of the images, all in memory: (names kept, features [N, F] or regions [N, R, F] on the
    device)."""
    kept, out = [], []
    for batch_names, f in feature_batches(encoder, images_dir, names, preset, device, precision, workers, batch_size):
        kept += batch_names
        out.append(f)  # on the device: no wait for it per batch
    return kept, torch.cat(out) if out else torch.zeros(0)


class FeatureFile:
    """A feature cache on disk: one .npy file [N, F] (pooled, fp32) or [N, R, F] (regions, fp16) and a .json
    index of its images' names (row i is names[i]; rows of images that could not be read are left unused at
    the end). Rows are read by index with positioned reads, not through a memory map: the pages stay in the
    OS's file cache and do not count in this process's memory, so a cache larger than RAM (MS-COCO's regions:
    about 15 GB) trains with bounded memory."""

    def __init__(self, path):
        self.path = Path(path)
        self.names = json.loads(self.path.with_suffix(".json").read_text())
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, self.dtype = read_header(f)
            self.offset = f.tell()
        self.shape = (len(self.names), *shape[1:])
        self.row_bytes = self.dtype.itemsize * math.prod(shape[1:])
        self._file = None  # opened by each process that reads (a loader worker opens its own)

    @property
    def nbytes(self):
        return self.shape[0] * self.row_bytes

    def __getstate__(self):
        return {**self.__dict__, "_file": None}

    def read(self, rows):
        """These rows (image indices), as one CPU tensor [len(rows), ...]."""
        if self._file is None:
            self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 (open while this object lives)
        buf = bytearray(len(rows) * self.row_bytes)
        view = memoryview(buf)
        for k, r in enumerate(rows):
            self._file.seek(self.offset + r * self.row_bytes)
            self._file.readinto(view[k * self.row_bytes:(k + 1) * self.row_bytes])
        return torch.from_numpy(np.frombuffer(buf, self.dtype).reshape(len(rows), *self.shape[1:]))

    def load(self, device, chunk=512):
        """All rows as one tensor on the device, read a chunk at a time (RAM holds one chunk besides)."""
        out = torch.empty(self.shape, dtype=torch.from_numpy(np.zeros(0, self.dtype)).dtype, device=device)
        for start in range(0, self.shape[0], chunk):
            rows = range(start, min(start + chunk, self.shape[0]))
            out[start:start + len(rows)] = self.read(rows)
        return out

    @classmethod
    def write(cls, path, batches, n):
        """Write the (names, features) batches of at most n images as a FeatureFile at path: each batch goes
        to disk as it comes, so memory holds one batch, not the cache. The index is written last: a cache
        with an index is complete."""
        path = Path(path)
        tmp, batches = path.with_name(f".{path.name}.{os.getpid()}.tmp"), iter(batches)
        first = next(batches, None)
        if first is None:
            raise DataError("no readable images to compute features of")
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        try:
            shape = first[1].shape[1:]  # the header needs the features' shape: known with the first batch
            header = np.lib.format.open_memmap(tmp, "w+", first[1].cpu().numpy().dtype, (max(n, 1), *shape))
            offset = header.offset
            del header
            with open(tmp, "r+b") as f:
                for names, features in itertools.chain([first], batches):
                    f.seek(offset + len(kept) * features[0].numel() * features.element_size())
                    f.write(features.cpu().numpy().tobytes())
                    kept += names
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        save_atomic(kept, path.with_suffix(".json"), json.dump, text=True)
        return cls(path)


def fits_in_memory(nbytes, device):
    """Whether a feature cache this large is better held in memory: under half the GPU's free memory, or a
    quarter of the machine's RAM (training needs the rest)."""
    if device.type == "cuda":
        return nbytes < torch.cuda.mem_get_info(device)[0] / 2
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): assume it fits
        return True
    return nbytes < ram / 4


def cached_features(model, images_dir, names, preset, device, cache_dir, workers, precision="auto", on_disk=None):
    """The frozen CNN's features of `names`, from the cache or computed and cached: (names kept, features):
    one tensor on the device, or, if `on_disk` (None: if the cache does not fit in memory), the FeatureFile,
    to be read a batch at a time (feature_source)."""
    encoder = model.encoderCNN
    key = feature_cache_key(encoder, preset, images_dir, names, autocast_dtype(device, precision))
    path = Path(cache_dir) / f"features-{model.args.encoder}-{key}.npy"
    if path.with_suffix(".json").is_file():
        log.info("CNN features from cache %s", path)
        store = FeatureFile(path)
    else:
        start = time.time()
        batches = feature_batches(encoder, images_dir, names, preset, device, precision, workers)
        store = FeatureFile.write(path, batches, len(names))
        seconds = max(time.time() - start, 1e-9)
        log.info("extracted %d CNN features in %.0f s (%.1f images/s) -> %s", len(store.names), seconds,
                 len(store.names) / seconds, path)
    if on_disk or (on_disk is None and not fits_in_memory(store.nbytes, device)):
        log.info("CNN features read from %s a batch at a time (%.1f GB)", path, store.nbytes / 1e9)
        return store.names, store
    return store.names, store.load(device)


def feature_source(features, rows, workers):
    """The Batches source of these rows of cached_features' features: in memory, or read from the file."""
    if isinstance(features, FeatureFile):
        return FeatureFileSource(features, rows, workers)
    return FeatureSource(features, rows)


def split_sources(model, data, splits, preset, device, cache_dir, workers, precision="auto", on_disk=None):
    """{split: (the source of its images' cached features, its image names that the cache holds)} for each of
    `splits` of `data` (a Flickr8k). The cache covers every split's images, test too, so that whichever command
    runs first fills it for the others; images that could not be read are left out."""
    names = sorted(set().union(*data.splits.values()))
    kept, features = cached_features(model, data.images_dir, names, preset, device, cache_dir, workers, precision,
                                     on_disk)
    row = {n: i for i, n in enumerate(kept)}
    out = {}
    for s in splits:
        split = [n for n in data.splits[s] if n in row]
        out[s] = feature_source(features, [row[n] for n in split], workers), split
    return out


class ImageStore:
    """Images decoded and resized once to size x size, kept as one memory-mapped uint8 file
    [N, 3, size, size] under the cache folder with an index of their names: a pass over it reads no JPEG, and
    its pages come from the OS's cache, not from a Python list in memory."""

    def __init__(self, path, names, size):
        self.path, self.names, self.size = Path(path), names, size
        self._array = None

    @classmethod
    def open(cls, images_dir, names, size, device, cache_dir, workers):
        """The store of these images at this size, built now if there is none for exactly these files."""
        decoder = "device" if device.type == "cuda" else "pillow"  # nvJPEG and libjpeg differ by a level or so
        h = hashlib.sha256(json.dumps([size, decoder]).encode())
        path = Path(cache_dir) / f"images-{size}px-{files_key(h, images_dir, names).hexdigest()[:24]}.npy"
        index = path.with_suffix(".json")
        if not index.is_file():
            start = time.time()
            kept = cls._build(path, images_dir, names, size, device, workers)
            log.info("stored %d images at %d px in %.0f s -> %s", len(kept), size, time.time() - start, path)
            save_atomic(kept, index, json.dump, text=True)  # written last: the store is complete
        else:
            log.info("images from store %s", path)
        return cls(path, json.loads(index.read_text()), size)

    @staticmethod
    def _build(path, images_dir, names, size, device, workers):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        # one row for each image (unreadable ones leave theirs unused at the end), and at least one: numpy
        # cannot map an empty file
        array = np.lib.format.open_memmap(tmp, "w+", np.uint8, (max(len(names), 1), 3, size, size))
        kept = []
        try:
            for batch in tqdm(image_batches(images_dir, names, size, device, workers),
                              desc=f"storing images at {size} px", unit="batch", leave=False, disable=None):
                array[len(kept):len(kept) + len(batch.names)] = batch.x.cpu().numpy()
                kept += batch.names
            if len(kept) < len(names):
                log.warning("skipped %d unreadable images", len(names) - len(kept))
            array.flush()
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return kept

    def read(self, rows):
        """uint8 [len(rows), 3, size, size] for these rows of the store, as a tensor."""
        if self._array is None:  # opened in each loader worker, not pickled into it
            self._array = np.load(self.path, mmap_mode="r")
        return torch.from_numpy(self._array[rows])
