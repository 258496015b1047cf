"""The main benchmark's measurements (bench.py): what the pipeline does on this machine, each beside its ceiling.

Bench times, on one model (a checkpoint's, else a new decoder on the chosen encoder): the encoder's forward on
in-memory tensors and under each runtime (the CPU's ceilings), the loader alone, the feature pass over JPEG files,
a frozen-encoder training epoch from cached features and the bare decoder step, the image store against JPEG
files, a fine-tune epoch and its two ceilings, and captioning one photo file. make_jpegs writes the Flickr8k-shaped
photos it runs on when no data is given.
"""

import argparse
import random
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from captioner.backbones import preprocessing
from captioner.batches import Batches, CaptionTable, FileSource, image_batches
from captioner.features import (
    FeatureSource,
    ImageStore,
    StoreSource,
    extract_features,
)
from captioner.runtimes import export_backbone
from captioner.search import generate
from captioner.training import Trainer, WordLoss, make_optimizer
from captioner.training_run import Preloaded
from image_intial_model import CNN_RNN, ModelArgs
from image_loader import EvalTransform, Vocab, load_image, train_size
from utils import (
    autocast,
    autocast_dtype,
    load_checkpoint,
    model_from_checkpoint,
    set_cnn_layout,
    step_precision,
)

FLICKR8K_VOCAB = 2548
WORDS = ["a", "the", "dog", "man", "woman", "child", "runs", "jumps", "sits", "on", "in", "through", "water",
         "grass", "snow", "street", "red", "blue", "ball", "."]


def timed(fn, repeat, warmup=1, sync=lambda: None):
    """Median seconds of fn() over `repeat` runs, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_jpegs(folder, n, seed=0):
    """n Flickr8k-shaped photos (500x375 JPEG, smooth colour fields with noise) and five captions each."""
    rng = random.Random(seed)
    (folder / "Images").mkdir(parents=True, exist_ok=True)
    rows = ["image,caption"]
    for i in range(n):
        base = Image.radial_gradient("L").resize((500, 375)).convert("RGB")
        noise = Image.effect_noise((500, 375), 40).convert("RGB")
        tint = Image.new("RGB", (500, 375), tuple(rng.randrange(256) for _ in range(3)))
        Image.blend(Image.blend(base, tint, 0.5), noise, 0.2).save(folder / "Images" / f"{i:05d}.jpg", quality=90)
        rows += [f"{i:05d}.jpg," + " ".join(rng.choices(WORDS, k=rng.randint(8, 16))) for _ in range(5)]
    (folder / "captions.txt").write_text("\n".join(rows) + "\n")
    return folder


class Bench:
    def __init__(self, args, device, data):
        self.args, self.device, self.data = args, device, data
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        if args.checkpoint:  # a trained model: captions end where they should, as in real use
            self.model, self.vocab, self.preset = model_from_checkpoint(load_checkpoint(args.checkpoint))
            args.encoder = self.model.args.encoder
        else:
            self.preset = preprocessing(args.encoder)
            # Flickr8k's training vocabulary has 2,548 words (min frequency 5): pad to that, so that the
            # output layer costs what it costs in real training.
            words = data.train_vocab(min_freq=1).itos
            self.vocab = Vocab(words + [f"<filler{i}>" for i in range(FLICKR8K_VOCAB - len(words))])
            margs = ModelArgs(vocab_size=len(self.vocab), encoder=args.encoder, embed_size=args.embed_size,
                              hidden_size=args.hidden_size or (512 if args.attention else 256),
                              decoder="attention" if args.attention else "plain")
            self.model = CNN_RNN(margs, weights="random" if args.no_pretrained else "imagenet")
        self.model.to(device)
        set_cnn_layout(self.model, device, False)
        self.frozen = self.model  # the model as --runtime runs it while it does not learn: set by run()
        self.names = sorted(data.captions)
        self.dtype = autocast_dtype(device, args.precision)
        self.decoder_precision = step_precision(device, args.precision, self.model.args, from_features=True)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)  # as training

    def _autocast(self):
        return autocast(self.device, self.args.precision)

    def _trainer(self, optimizer, precision):
        return Trainer(self.model, WordLoss(), self.device, optimizer, self.scaler, 5.0, precision=precision)

    def _pass(self, batches, n, first=None):
        """Images/s of one pass over `batches` of n images, with no model: what the data path alone does.
        `first`, a list, receives the seconds to the first batch."""
        self.sync()
        start = time.perf_counter()
        for _ in batches:
            if first is not None and not first:
                first.append(time.perf_counter() - start)
        self.sync()
        return n / (time.perf_counter() - start)

    def encoder_forward(self, repeat, batch=64):
        size = self.preset["crop"]
        x = torch.randn(batch, 3, size, size, device=self.device)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        self.model.encoderCNN.eval()
        enc = self.frozen.encoderCNN

        @torch.inference_mode()
        def forward():
            with self._autocast():
                enc.extract(x)

        return batch / timed(forward, repeat, sync=self.sync)

    @torch.inference_mode()
    def ceilings(self, repeat, batch, compile_too, cache_dir):
        """The same frozen CNN's forward under each runtime, on in-memory tensors, CPU only: {runtime:
        (images/s in batches of `batch`, seconds for one image)}, and torch.compile's compile time (both
        shapes). ONNX Runtime with its default options (its threads spin between calls: its fastest)."""
        size, backbone = self.preset["crop"], self.model.encoderCNN.backbone.eval()
        x, one = torch.randn(batch, 3, size, size), torch.randn(1, 3, size, size)
        path = Path(cache_dir) / "ceiling.onnx"
        export_backbone(backbone, size, path)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(path), options, ["CPUExecutionProvider"])
        engines = {"eager": backbone.forward_features,
                   "onnx": lambda t: session.run(None, {"image": t.numpy()})}
        compile_s = None
        if compile_too:
            compiled = torch.compile(backbone.forward_features)
            start = time.perf_counter()
            compiled(x), compiled(one)
            compile_s, engines["compile"] = time.perf_counter() - start, compiled
        return {name: (batch / timed(lambda f=f: f(x), repeat), timed(lambda f=f: f(one), repeat * 3, 2))
                for name, f in engines.items()}, compile_s

    def loader(self, n):
        """Images/s decoded and resized from JPEG files by the loader alone, over one pass that starts its
        workers (as a feature pass does) and over a second pass with them running; and the seconds to the
        first batch: the workers' start."""
        self._pass(image_batches(self.data.images_dir, self.names[:64], self.preset["resize"], self.device,
                                 self.args.workers), 64)  # warm-up: nvJPEG's start on CUDA
        batches = image_batches(self.data.images_dir, self.names[:n], self.preset["resize"], self.device,
                                self.args.workers)
        first = []
        return self._pass(batches, n, first), self._pass(batches, n), first[0]

    def feature_pass(self, n):
        def extract(names):
            return extract_features(self.frozen.encoderCNN, self.data.images_dir, names, self.preset, self.device,
                                    self.args.precision, self.args.workers)

        extract(self.names[:min(64, n)])  # warm-up: cuDNN's choice of kernels
        self.sync()
        start = time.perf_counter()
        extract(self.names[:n])
        self.sync()
        return n / (time.perf_counter() - start)

    def frozen_epoch(self, images):
        """A training epoch from a feature cache, measured on `images` images with five captions each and
        scaled to Flickr8k's 6,000. Returns (seconds, captions/s, bare decoder captions/s)."""
        real = self.data.items("train", self.vocab)
        captions = CaptionTable([real[i % len(real)][1] for i in range(images)], self.device)
        size = self.preset["crop"]
        with torch.inference_mode():  # one feature's shape: [F] pooled, [R, F] regions for attention
            shape = self.model.encoderCNN.extract(torch.zeros(1, 3, size, size, device=self.device)).shape[1:]
        # random values (an epoch's cost does not depend on them), stored as the cache stores them
        dtype = torch.float16 if self.model.encoderCNN.spatial else torch.float32
        features = torch.randn(images, *shape, device=self.device).to(dtype)

        def batches(n):
            return Batches(FeatureSource(features, list(range(n))), captions, [f"img{i}" for i in range(n)],
                           self.device, batch_size=self.args.batch_size, shuffle=True)

        optimizer = make_optimizer(argparse.Namespace(lr=1e-3, train_cnn=False), self.model)
        trainer = self._trainer(optimizer, self.decoder_precision)
        trainer.run(batches(min(images, 5 * self.args.batch_size)), "warm-up")
        epoch = batches(images)
        self.sync()
        start = time.perf_counter()
        trainer.run(epoch, "frozen epoch")
        self.sync()
        seconds = time.perf_counter() - start
        in_memory = list(epoch)  # the same batches, already on the device
        return (seconds * 6000 / images, len(captions.lengths) / seconds,
                self.decoder_bare(in_memory, optimizer))

    def decoder_bare(self, batches, optimizer):
        """Captions/s of the training step alone, on batches already in memory on the device."""
        model = self.model.train()
        criterion = torch.nn.CrossEntropyLoss(ignore_index=Vocab.pad_idx)

        def epoch():
            for b in batches:
                with autocast(self.device, self.decoder_precision):
                    logits = model(b.x, b.captions[:, :-1], b.image_index, from_features=True)
                    loss = criterion(logits.float().reshape(-1, logits.shape[-1]), b.captions[:, 1:].reshape(-1))
                optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0, foreach=True)
                self.scaler.step(optimizer)
                self.scaler.update()

        return sum(b.captions.shape[0] for b in batches) / timed(epoch, 1, sync=self.sync)

    def image_store(self, names, cache_dir):
        """Build the image store of `names` at the training size (timed), then time reading them back as uint8
        images at that size, from the store and from the JPEG files, in this process alone (per core). The
        random crops and colour jitter that follow are the same work for both, batched on the device."""
        size = train_size(self.preset)
        start = time.perf_counter()
        store = ImageStore.open(self.data.images_dir, names, size, self.device, cache_dir, self.args.workers)
        build = len(names) / (time.perf_counter() - start)
        captions = CaptionTable([[] for _ in store.names], self.device)
        one_core = {"store": StoreSource(store, workers=0),
                    "jpeg": FileSource(self.data.images_dir, store.names, size, workers=0)}
        rates = {k: self._pass(Batches(source, captions, store.names, self.device, self.preset, "raw",
                                       self.args.batch_size), len(store.names)) for k, source in one_core.items()}
        return store, build, rates

    def finetune_epoch(self, store, n_batches):
        """Seconds per epoch over 6,000 images through the CNN (--train-cnn) from the image store, timed on
        `n_batches` batches after a warm-up of one; and its two ceilings in images/s: the loader alone (store
        reads, random crops and colour jitter on the device) and the training step alone on batches already
        on the device."""
        self.model.encoderCNN.set_train_cnn(True)
        set_cnn_layout(self.model, self.device, True)  # as training lays it out
        try:
            names = store.names[:n_batches * self.args.batch_size]
            real = self.data.items("train", self.vocab)
            captions = CaptionTable([real[i % len(real)][1] for i in range(len(names))], self.device)
            source = StoreSource(store, self.args.workers)
            optimizer = make_optimizer(argparse.Namespace(lr=1e-3, train_cnn=True, cnn_lr=1e-5), self.model)
            trainer = self._trainer(optimizer, self.args.precision)

            def batches(n):
                return Batches(source, captions, names[:n], self.device, self.preset, "train",
                               self.args.batch_size, shuffle=True)

            trainer.run(batches(self.args.batch_size), "warm-up")  # cuDNN's choice of kernels
            epoch = batches(len(names))
            self._pass(epoch, len(names))  # its workers started, as they stay from one epoch to the next
            loader = self._pass(epoch, len(names))
            self.sync()
            start = time.perf_counter()
            trainer.run(epoch, "fine-tune")
            self.sync()
            per_image = (time.perf_counter() - start) / len(names)
            in_memory = Preloaded(epoch, from_features=False)
            bare = len(names) / timed(lambda: trainer.run(in_memory, "fine-tune steps"), 1, sync=self.sync)
        finally:
            self.model.encoderCNN.set_train_cnn(False)
            set_cnn_layout(self.model, self.device, False)
        return per_image * 6000, len(names), loader, bare

    @torch.no_grad()
    def caption_latency(self, repeat):
        """Seconds to caption one photo file (read, preprocess, encode, decode), greedy and beam 3, and the
        encoder's own forward on one image tensor."""
        self.model.eval()
        model, path = self.frozen, self.data.images_dir / self.names[0]
        transform = EvalTransform(self.preset)

        def caption(beam):
            x = transform(load_image(path)).unsqueeze(0).to(self.device)
            with self._autocast():
                return len(generate(model, x, beam=beam)[0])

        one = torch.randn(1, 3, self.preset["crop"], self.preset["crop"], device=self.device)

        def encode():
            with self._autocast():
                model.encoderCNN.extract(one)

        return (timed(lambda: caption(1), repeat, 2, self.sync), timed(lambda: caption(3), repeat, 2, self.sync),
                timed(encode, repeat, 2, self.sync), caption(3))


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # macOS reports bytes, Linux KiB
