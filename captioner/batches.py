"""Fast batches for training and evaluation: each image's captions as rows of one padded tensor on the device
(CaptionTable), and the images (files, or cached CNN features) read by loader workers or reader threads, whole
batches at a time, decoded on the GPU where it can (FileSource, Batches). image_loader.CaptionDataset is the same
data one (image, caption) pair at a time, as a learner first meets it; these batches are its fast form."""

import io
import logging
import os
import signal
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.io import ImageReadMode, decode_jpeg

from captioner.files import DataError
from captioner.images import open_image
from image_loader import Vocab, augment, load_image, normalize, resize_pil, resize_tensor, to_device

log = logging.getLogger("captioner")


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
    """All captions of a split as one padded tensor on the device: tokens [M, T + 1] (SOS w1 .. wn EOS, then PAD;
    T as in image_intial_model's legend); image i's captions are rows first[i]:first[i+1]. A batch of images is an
    index into it."""

    def __init__(self, captions, device):
        """captions: per image, a list of caption id lists (maybe empty: images to caption, no references)."""
        rows = [torch.tensor(c) for caps in captions for c in caps]
        self.lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        self.first = torch.tensor([0] + [len(caps) for caps in captions]).cumsum(0)
        tokens = pad_sequence(rows, batch_first=True, padding_value=Vocab.pad_idx) if rows else torch.zeros(0, 0)
        self.tokens, self.device = tokens.long().to(device), device

    def batch(self, images):
        """Image indices [B] -> (captions [N, T + 1] padded to the batch's longest, image_index [N]) on the device,
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
            with open_image(io.BytesIO(data)) as im:
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
    captions: torch.Tensor  # [N, T + 1]: SOS w1 .. wn EOS, padded with PAD
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
