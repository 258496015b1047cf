"""Measure how fast this machine extracts features, trains and captions; print what was measured.

    python bench.py --quick                   # CPU: a few minutes
    python bench.py --data flickr8k --json    # real Flickr8k images and captions; JSON on stdout
    python bench.py --encoder inception_v3 --no-pretrained --attention   # a GPU box with no network
    python bench.py --serve                   # serve.py under 1, 8 and 32 concurrent clients, batching on and off
    python bench.py --serve --serve-workers 2 --threads 1   # the same with two server processes of one thread
    python bench.py --web                     # the web export in headless Chromium beside the Python runner
    python bench.py --describe                # a whole description beside a caption and the OCR library alone

Each pipeline figure comes with its ceiling, measured in the same run, so a ratio says where the time goes:
  loader                = JPEG files decoded and resized by the loader alone, no model, --workers workers
                          (images/s; on CUDA plain JPEGs are decoded on the GPU): the most a pass over files can do
  feature_efficiency    = feature pass over JPEG files  / encoder forward on in-memory tensors (images/s)
  train_efficiency      = training epoch from the cache / decoder forward+backward on in-memory batches (captions/s)
  store_speedup         = images/s read from the image store / decoded from JPEG files and resized to the
                          training size, in one process (per core): what decoding once saves each epoch
  caption_latency_ratio = captioning one photo file at beam 3 / the encoder's forward on one image tensor
  finetune_loader / finetune_bare = a fine-tune epoch's two ceilings (images/s): the image store read with
                          random crops and colour jitter on the device, no model; the CNN + decoder training
                          step on batches already on the device
--serve measures the captioning service instead (see serve_bench): its photos/s and p50/p99 latency against the
same model's in-process batched captioning rate (decoding included), its ceiling.
Without --data, Flickr8k-shaped JPEGs (500x375) with five made-up captions each are generated in a temporary
folder. The frozen-encoder epoch runs over 6,000 images x 5 captions (1,200 with --quick, scaled) whose cached
features are random tensors of the model's feature shape (an epoch's cost does not depend on their values).
"""

import sys
from pathlib import Path

# ruff: noqa: E402 (the imports below need the path first)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's root: its commands and captioner/

import argparse
import asyncio
import contextlib
import io
import json
import multiprocessing
import os
import random
import re
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from captioner.backbones import ENCODERS, EncoderWeightsError, preprocessing
from captioner.batches import Batches, CaptionTable, FileSource, default_workers, image_batches
from captioner.features import (
    FeatureSource,
    ImageStore,
    StoreSource,
    extract_features,
)
from captioner.files import DataError
from captioner.runtimes import RUNTIME_CHOICES, RUNTIME_HELP, export_backbone, run_frozen
from captioner.search import generate
from captioner.training import Trainer, WordLoss, make_optimizer
from captioner.training_run import Preloaded
from image_intial_model import CNN_RNN, ModelArgs
from image_loader import EvalTransform, Flickr8k, Vocab, list_images, load_image, train_size
from utils import (
    PRECISIONS,
    HelpFormatter,
    autocast,
    autocast_dtype,
    find_checkpoint,
    load_checkpoint,
    model_from_checkpoint,
    pick_device,
    positive,
    set_cnn_layout,
    step_precision,
    tune_for,
)

FLICKR8K_VOCAB = 2548
WORDS = ["a", "the", "dog", "man", "woman", "child", "runs", "jumps", "sits", "on", "in", "through", "water",
         "grass", "snow", "street", "red", "blue", "ball", "."]
# per size of run: JPEGs generated, feature pass images, frozen epoch images, fine-tune batches, timing repeats
SIZES = {"full": (2000, 2000, 6000, 20, 20), "quick": (240, 200, 1200, 3, 5), "smoke": (24, 16, 64, 1, 1)}


def get_args_parser():
    p = argparse.ArgumentParser(description="Benchmark feature extraction, training and captioning.",
                                formatter_class=HelpFormatter)
    p.add_argument("--data", help="a Flickr8k folder to read images and captions from (default: generated JPEGs)")
    p.add_argument("--encoder", choices=sorted(ENCODERS), default="efficientnet_lite0", help="CNN encoder")
    p.add_argument("--no-pretrained", action="store_true",
                   help="random CNN weights: the same speed, no download (Inception-v3 on a machine with no network)")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="autocast dtype, as in training")
    p.add_argument("--workers", type=positive(int),
                   help="loader worker processes (default: the cores this process may use, at most 16)")
    p.add_argument("--quick", action="store_true", help="fewer images and batches: a CPU run of a few minutes")
    p.add_argument("--smoke", action="store_true",
                   help="a handful of images: checks that every stage runs (the test suite's); its figures mean little")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.add_argument("--checkpoint", help="a trained checkpoint to time (default: a new decoder on the pretrained "
                                        "encoder; untrained, it writes all --max-len words of every caption)")
    p.add_argument("--attention", action="store_true",
                   help="time the attention decoder (hidden 512 unless --hidden-size says otherwise), the "
                        "README's best recipe")
    p.add_argument("--batch-size", type=positive(int), default=32, help="images per training batch, as in training")
    p.add_argument("--runtime", choices=RUNTIME_CHOICES, default="auto", help=RUNTIME_HELP)
    p.add_argument("--no-compile", action="store_true",
                   help="leave out torch.compile's ceiling (it compiles for about a minute a shape on a small CPU)")
    p.add_argument("--embed-size", type=positive(int), default=256, help="decoder shape, as in training")
    p.add_argument("--hidden-size", type=positive(int), help="decoder shape (default 256; 512 with --attention)")
    p.add_argument("--describe", action="store_true",
                   help="time a whole description per photo file beside the caption alone and the rapidocr "
                        "library's own call (--checkpoint default: the one inference.py picks; photos with text made "
                        "by text_photos.py, photos without from --data, else the bundled sample), then two hostile "
                        "photos")
    p.add_argument("--web", action="store_true",
                   help="benchmark the web export instead (bench_web.py): headless Chromium, WebAssembly, beside "
                        "the Python runner on 20 sample photos (--checkpoint: the model exported)")
    p.add_argument("--serve", action="store_true",
                   help="benchmark serve.py instead: photos/s and p50/p99 latency at --clients concurrent clients, "
                        "batching on (--max-batch) and off, against the in-process batched rate (--checkpoint "
                        "default: the one serve.py picks; photos: --data's, else the bundled sample's)")
    p.add_argument("--clients", type=positive(int), nargs="+", default=[1, 8, 32],
                   help="--serve: the numbers of concurrent clients to measure")
    p.add_argument("--requests", type=positive(int),
                   help="--serve: requests per measurement (default: 4 per client, at least 32; 2 per client "
                        "with --smoke)")
    p.add_argument("--max-batch", type=positive(int), default=8,
                   help="--serve: the server's --max-batch with batching on, and the in-process ceiling's batch")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="--serve: the server's --max-wait-ms")
    p.add_argument("--threads", type=positive(int),
                   help="--serve: PyTorch threads of the server and of the in-process ceiling (default: the cores)")
    p.add_argument("--serve-workers", type=positive(int), default=1,
                   help="--serve: the server's --workers (processes, each with its model and --threads threads)")
    return p


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


def size_of_run(args):
    return SIZES["smoke" if args.smoke else "quick" if args.quick else "full"]


def run(args, data_dir, cache_dir):
    device = pick_device(args.device)
    tune_for(device)
    args.workers = args.workers or default_workers()
    data = Flickr8k.load(data_dir)
    bench = Bench(args, device, data)
    _, n_feature, n_frozen, n_finetune, repeat = size_of_run(args)
    n_feature = min(len(bench.names), n_feature)
    bench.frozen, runtime = run_frozen(bench.model, bench.preset, args.runtime, cache_dir, device, decoder=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    r = {"device": name, "encoder": args.encoder, "decoder": bench.model.decoder_kind,
         "hidden_size": bench.model.args.hidden_size, "precision": str(bench.dtype or "fp32").replace("torch.", ""),
         "decoder_precision": str(autocast_dtype(device, bench.decoder_precision) or "fp32").replace("torch.", ""),
         "workers": args.workers, "data": f"Flickr8k at {args.data}" if args.data else "generated JPEGs",
         "runtime": runtime}
    if device.type == "cpu":  # the CPU's real limit: the same CNN under each runtime, in this run
        r["ceilings"], r["compile_s"] = bench.ceilings(repeat, min(64, n_feature), not (args.smoke or args.no_compile),
                                                       cache_dir)
    # in batches as the feature pass makes them (64, or fewer when it has fewer images)
    r["encoder_forward_images_per_s"] = bench.encoder_forward(repeat, batch=min(64, n_feature))
    r["loader_images_per_s"], r["loader_warm_images_per_s"], r["loader_first_batch_s"] = bench.loader(n_feature)
    r["feature_pass_images_per_s"] = bench.feature_pass(n_feature)
    r["feature_pass_images"] = n_feature
    r["feature_efficiency"] = r["feature_pass_images_per_s"] / r["encoder_forward_images_per_s"]
    # captioning first, from the model as loaded: the stages after it train the model
    greedy, beam3, encode, words = bench.caption_latency(repeat)
    r.update(caption_greedy_s=greedy, caption_beam3_s=beam3, encoder_one_image_s=encode, caption_words=words,
             checkpoint=args.checkpoint, caption_latency_ratio=beam3 / encode,
             packed_decoder=bench.frozen.generator is not bench.model.decoderRNN)
    r["frozen_measured_images"] = n_frozen
    seconds, rate, bare = bench.frozen_epoch(n_frozen)
    r.update(frozen_epoch_s=seconds, frozen_epoch_captions_per_s=rate, decoder_bare_captions_per_s=bare,
             train_efficiency=rate / bare)
    store, build, rates = bench.image_store(bench.names[:n_finetune * args.batch_size], cache_dir)
    r.update(store_build_images_per_s=build, store_read_images_per_s=rates["store"],
             jpeg_read_images_per_s=rates["jpeg"], store_speedup=rates["store"] / rates["jpeg"])
    (r["finetune_epoch_s"], r["finetune_measured_images"], r["finetune_loader_images_per_s"],
     r["finetune_bare_images_per_s"]) = bench.finetune_epoch(store, n_finetune)
    r["peak_memory_mb"] = peak_memory_mb(device)
    if "ceilings" in r:
        r["feature_pass_of_onnx"] = r["feature_pass_images_per_s"] / r["ceilings"]["onnx"][0]
        r["caption_beam3_per_onnx_image"] = beam3 / r["ceilings"]["onnx"][1]
    return r


def report(r):
    print(f"device {r['device']}, encoder {r['encoder']}, {r['decoder']} decoder (hidden {r['hidden_size']}), "
          f"{r['precision']} (the decoder on cached features: {r['decoder_precision']}), {r['workers']} loader "
          f"workers, data: {r['data']}")
    print(f"loader alone      {r['loader_images_per_s']:8.1f} images/s decoded and resized from JPEG files, "
          f"{r['loader_warm_images_per_s']:.1f} once its workers run; first batch after "
          f"{r['loader_first_batch_s']:.2f} s")
    print(f"feature pass      {r['feature_pass_images_per_s']:8.1f} images/s over {r['feature_pass_images']} JPEGs; "
          f"bare encoder {r['encoder_forward_images_per_s']:.1f} images/s; efficiency {r['feature_efficiency']:.0%}")
    print(f"frozen epoch      {r['frozen_epoch_s']:8.2f} s for 6,000 images / 30,000 captions "
          f"(measured on {r['frozen_measured_images']:,} images, {r['frozen_epoch_captions_per_s']:.0f} "
          "captions/s); bare decoder step "
          f"{r['decoder_bare_captions_per_s']:.0f} captions/s; efficiency {r['train_efficiency']:.0%}")
    print(f"image store       built at {r['store_build_images_per_s']:.1f} images/s; one process reads "
          f"{r['store_read_images_per_s']:.1f} images/s from it against {r['jpeg_read_images_per_s']:.1f} from "
          f"JPEG files (x{r['store_speedup']:.1f})")
    print(f"fine-tune epoch   {r['finetune_epoch_s']:8.1f} s for 6,000 images from the image store, loader "
          f"workers running (measured on {r['finetune_measured_images']} images, scaled); loader alone "
          f"{r['finetune_loader_images_per_s']:.0f} images/s, bare CNN + decoder step "
          f"{r['finetune_bare_images_per_s']:.0f} images/s")
    print(f"caption one photo {r['caption_greedy_s'] * 1000:8.1f} ms greedy, "
          f"{r['caption_beam3_s'] * 1000:.1f} ms beam 3; encoder forward alone "
          f"{r['encoder_one_image_s'] * 1000:.1f} ms; ratio {r['caption_latency_ratio']:.2f} "
          f"({r['caption_words']} words, {'trained' if r['checkpoint'] else 'untrained'} decoder"
          f"{', prepacked fp16 weights' if r['packed_decoder'] else ''})")
    if "ceilings" in r:
        report_ceilings(r)
    print(f"peak memory       {r['peak_memory_mb']:8.0f} MiB")


def report_ceilings(r):
    c = r["ceilings"]
    compiled = f" (torch.compile: {r['compile_s']:.0f} s to compile both shapes)" if r["compile_s"] else \
        " (torch.compile not measured)"
    print(f"CNN ceilings      the same CNN's forward on tensors{compiled}; the tool ran it on {r['runtime']}:")
    for name, (batched, one) in c.items():
        print(f"  {name:<15} {batched:8.1f} images/s batched, {one * 1000:.1f} ms one image")
    print(f"  feature pass = {r['feature_pass_of_onnx']:.0%} of ONNX Runtime's batched forward; caption at beam 3 "
          f"= {r['caption_beam3_per_onnx_image']:.2f}x its one-image forward")


def main(args):
    with tempfile.TemporaryDirectory() as tmp:  # the image store goes here, and generated JPEGs
        data = args.data or make_jpegs(Path(tmp) / "data", size_of_run(args)[0])
        return run(args, data, Path(tmp) / "cache")


# ---------------------------------------------------------------------------------------- --serve

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_IMAGES = ROOT / "data" / "flickr8k_sample" / "Images"
VIZWIZ = ROOT.parent / "shared" / "vizwiz_dev"


def serve_bench(args):
    """serve.py measured from outside: for batching on (--max-batch) and off (1), a server process on a free
    port of 127.0.0.1, and for each number of --clients, that many clients each posting photos one after
    another (multipart, as the page does), after one untimed round. Its ceiling: the same model in this
    process captioning the same photo bytes (decoded as the server decodes them) in batches of --max-batch."""
    checkpoint = find_checkpoint(args.checkpoint)
    folder = Path(args.data) / "Images" if args.data else SAMPLE_IMAGES
    photos = [p.read_bytes() for p in list_images(folder)[:64]]
    if not photos:
        raise DataError(f"{folder}: no photos to send")
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before, rounds = os.getloadavg()[0], 2 if args.smoke else 12
    ceiling, model_only, one_at_a_time = in_process_rate(checkpoint, photos, args.max_batch, rounds)
    if args.serve_workers > 1:
        ceiling = parallel_rate(checkpoint, photos, args.max_batch, rounds, args.serve_workers)
    r = {"checkpoint": str(checkpoint), "photos": len(photos), "threads": torch.get_num_threads(),
         "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms, "workers": args.serve_workers,
         "model_only_photos_per_s": model_only,
         "one_at_a_time_photos_per_s": one_at_a_time, "load_average_before": load_before, "runs": []}
    for batching, max_batch in (("on", args.max_batch), ("off", 1)):
        with serve_process(checkpoint, max_batch, args.max_wait_ms, r["threads"], args.serve_workers) as (url, pid):
            r[f"server_idle_rss_mib_batching_{batching}"] = memory_mib(pid)[0]
            for clients in args.clients:
                n = args.requests or (2 * clients if args.smoke else max(32, 4 * clients))
                run = asyncio.run(serve_load(url, photos, clients, n))
                run.update(batching=batching, clients=clients)
                if args.serve_workers > 1:  # /health speaks for whichever worker answered it
                    run["mean_batch"] = None
                r["runs"].append(run)
            r[f"server_rss_mib_batching_{batching}"], r[f"server_private_mib_batching_{batching}"] = memory_mib(pid)
    # measured again after the server's runs: on a machine shared with other work, the two tell how steady it
    # was; the ratios take the higher, the harder ceiling to reach
    again = parallel_rate(checkpoint, photos, args.max_batch, rounds, args.serve_workers)
    r.update(ceiling_before_photos_per_s=ceiling, ceiling_after_photos_per_s=again,
             ceiling_photos_per_s=max(ceiling, again), load_average_after=os.getloadavg()[0])
    for run in r["runs"]:
        run["of_ceiling"] = run["photos_per_s"] / r["ceiling_photos_per_s"]
    return r


def parallel_rate(checkpoint, photos, batch, rounds, processes):
    """The batched in-process rate (photos/s, decoding included) of `processes` processes at once, each with
    its own model and this process's thread count, as --workers runs them: the sum of their rates, timed
    together (each starts once all have loaded their model). One process: this one."""
    if processes == 1:
        return in_process_rate(checkpoint, photos, batch, rounds, one_at_a_time=False)[0]
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(processes), context.Queue()
    jobs = [context.Process(target=_rate_in_child, args=(str(checkpoint), photos, batch, rounds,
                                                          torch.get_num_threads(), barrier, results))
            for _ in range(processes)]
    for job in jobs:
        job.start()
    rates = [results.get(timeout=1800) for _ in jobs]
    for job in jobs:
        job.join()
    return sum(rates)


def _rate_in_child(checkpoint, photos, batch, rounds, threads, barrier, results):
    torch.set_num_threads(threads)
    results.put(in_process_rate(checkpoint, photos, batch, rounds, one_at_a_time=False, loaded=barrier.wait)[0])


def in_process_rate(checkpoint, photos, batch, rounds, one_at_a_time=True, loaded=lambda: None):
    """Photos/s of Captioner.describe in this process over `rounds` batches of `batch` photos, decoding each
    from its bytes as serve.py does; the same on photos decoded beforehand (the model alone); and one photo
    at a time, decoding included. One untimed batch first. loaded(): called once the model is."""
    from captioner.describe import Captioner

    captioner = Captioner(checkpoint)
    loaded()
    decoded = [captioner.load(io.BytesIO(b)) for b in photos]

    def caption(chunk):
        captioner.describe_batch([captioner.load(io.BytesIO(b)) if isinstance(b, bytes) else b for b in chunk])

    def rate(size, photos=photos):
        chunks = [[photos[(k * size + i) % len(photos)] for i in range(size)] for k in range(rounds * batch // size)]
        caption(chunks[0])
        start = time.perf_counter()
        for chunk in chunks:
            caption(chunk)
        return sum(map(len, chunks)) / (time.perf_counter() - start)

    return rate(batch), rate(batch, decoded), rate(1) if one_at_a_time else None


@contextlib.contextmanager
def serve_process(checkpoint, max_batch, max_wait_ms, threads, workers=1):
    """serve.py on a free port of 127.0.0.1, once /health says ready (every worker's): yields (its URL, its
    pid)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryFile() as log:  # the server's stderr, shown if it fails
        proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--checkpoint",
                                 str(checkpoint), "--port", str(port), "--max-batch", str(max_batch),
                                 "--max-wait-ms", str(max_wait_ms), "--threads", str(threads), "--workers",
                                 str(workers), "--log-level", "warning"], stderr=log)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, proc, log)
            if workers > 1:
                deadline = time.monotonic() + 300
                while len(worker_pids(proc.pid)) < workers:  # uvicorn starts the others once the first is ready
                    if time.monotonic() > deadline:
                        raise DataError(f"serve.py did not start {workers} workers within 5 minutes")
                    time.sleep(0.25)
                for _ in range(10 * workers):  # each on a new connection, which any worker may take
                    wait_ready(url, proc, log)
            yield url, proc.pid
        finally:
            proc.terminate()
            proc.wait(30)


def wait_ready(url, proc, log, minutes=5):
    import httpx

    with httpx.Client(timeout=5, trust_env=False) as client:
        for _ in range(minutes * 240):
            if proc.poll() is not None:
                log.seek(0)
                said = log.read().decode(errors="replace").strip().splitlines() or ["(nothing on stderr)"]
                raise DataError(f"serve.py exited with status {proc.returncode} before it was ready: {said[-1]}")
            with contextlib.suppress(httpx.TransportError):
                if client.get(f"{url}/health").status_code == 200:
                    return
            time.sleep(0.25)
    raise DataError(f"serve.py was not ready within {minutes} minutes")


async def serve_load(url, photos, clients, n):
    """`clients` concurrent clients posting n photos in all, after an untimed round of one each: photos/s,
    p50 and p99 latency (ms), and the server's mean batch over the timed requests (from /health)."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600, trust_env=False,
                                 limits=httpx.Limits(max_connections=clients)) as client:
        async def post(i, latencies):
            start = time.perf_counter()
            r = await client.post("/caption", files={"image": (f"{i}.jpg", photos[i % len(photos)], "image/jpeg")})
            r.raise_for_status()
            latencies.append(time.perf_counter() - start)

        async def run(count, latencies):
            todo = iter(range(count))
            await asyncio.gather(*(worker(todo, latencies) for _ in range(clients)))

        async def worker(todo, latencies):
            for i in todo:
                await post(i, latencies)

        await run(clients, [])
        before = (await client.get("/health")).json()
        latencies, start = [], time.perf_counter()
        await run(n, latencies)
        seconds = time.perf_counter() - start
        after = (await client.get("/health")).json()
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"requests": n, "photos_per_s": n / seconds, "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": cuts[98] * 1000, "mean_batch": (after["photos"] - before["photos"]) /
            max(after["batches"] - before["batches"], 1)}


def worker_pids(pid):
    """--workers: the worker processes under uvicorn's supervisor `pid` (none when it serves by itself)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [c for c in children if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]


def memory_mib(pid):
    """(RSS, the private part of it: what the process alone holds, not the libraries it shares), MiB, of the
    server's process, or of its worker processes together when it has some."""
    rss = private = 0
    for p in worker_pids(pid) or [pid]:
        text = Path(f"/proc/{p}/smaps_rollup").read_text()
        kib = {k: int(v) for k, v in re.findall(r"^(\w+):\s+(\d+) kB", text, re.M)}
        rss, private = rss + kib["Rss"] / 1024, private + (kib["Private_Clean"] + kib["Private_Dirty"]) / 1024
    return rss, private


def report_serve(r):
    workers = f"{r['workers']} worker processes of " if r["workers"] > 1 else ""
    print(f"serve.py benchmark: {r['checkpoint']}, beam 3, {workers}{r['threads']} PyTorch threads, "
          f"{r['photos']} photos sent in turn (multipart); load average {r['load_average_before']:.1f} before, "
          f"{r['load_average_after']:.1f} after")
    together = f" ({r['workers']} processes at once, their sum)" if r["workers"] > 1 else ""
    print(f"ceiling, in process: {r['ceiling_photos_per_s']:.2f} photos/s in batches of {r['max_batch']}{together}, "
          f"decoding included (measured before the server runs {r['ceiling_before_photos_per_s']:.2f}, after "
          f"{r['ceiling_after_photos_per_s']:.2f}); one process: {r['model_only_photos_per_s']:.2f} on photos "
          f"decoded beforehand, {r['one_at_a_time_photos_per_s']:.2f} photos/s one at a time")
    print(f"{'batching':<10}{'clients':>8}{'requests':>10}{'photos/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'batch':>7}{'of ceiling':>12}")
    for run in r["runs"]:
        label = f"on ({r['max_batch']}, {r['max_wait_ms']:g} ms)" if run["batching"] == "on" else "off"
        batch = "-" if run["mean_batch"] is None else f"{run['mean_batch']:.1f}"
        print(f"{label:<10}{run['clients']:>8}{run['requests']:>10}{run['photos_per_s']:>10.2f}"
              f"{run['p50_ms']:>9.0f}{run['p99_ms']:>9.0f}{batch:>7}{run['of_ceiling']:>12.0%}")
    for batching in ("on", "off"):
        print(f"server process, batching {batching}: RSS {r[f'server_idle_rss_mib_batching_{batching}']:.0f} MiB "
              f"once ready, {r[f'server_rss_mib_batching_{batching}']:.0f} MiB after the runs, of which "
              f"{r[f'server_private_mib_batching_{batching}']:.0f} MiB private (not shared with other processes)")


# ---------------------------------------------------------------------------------------- --describe

def describe_bench(args):
    """What describing a photo costs beside a caption and beside the text reader's library, per photo, in folder
    mode: for each photo file, alternating the order, the caption alone (Captioner.caption: file to text, beam 3),
    the whole description as inference.py makes it (the photo loaded, looked at, its text read where the first
    look finds some, captioned, checked, the thing named), the rapidocr library's own call as it comes on the
    photo at the reader's size, the reader's full read (no first look), and the photo check. Photos with text are
    made by text_photos.py (medicine boxes, screens, pages, signs, some degraded); photos without are Flickr8k's
    (--data's, else the bundled sample's); and real phone photos from ../shared/vizwiz_dev where it is. Then two
    hostile photos, timed whole."""
    from captioner.describe import Captioner
    from tools.text_photos import make_set

    if args.threads:
        torch.set_num_threads(args.threads)
    n, checkpoint = 4 if args.smoke else 30, find_checkpoint(args.checkpoint)
    captioner = Captioner(checkpoint)
    library = rapidocr_as_it_comes(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        records = make_set("dev", n, 0, 0, Path(tmp), seed=1)
        groups = {"with text": [Path(tmp) / r["file"] for r in records],
                  "without text": list_images(Path(args.data) / "Images" if args.data else SAMPLE_IMAGES)[:n]}
        groups.update(phone_photos(n))
        r = {"checkpoint": str(checkpoint), "threads": torch.get_num_threads(),
             "load_average_before": os.getloadavg()[0], "groups": {}}
        for name, paths in groups.items():
            r["groups"][name] = time_descriptions(captioner, library, paths)
        r["hostile"] = time_hostile(captioner, Path(tmp))
    r["load_average_after"] = os.getloadavg()[0]
    r["read_s"] = statistics.median([r["groups"][g]["read_s"] for g in r["groups"] if g.endswith("with text")])
    return r


def phone_photos(n):
    """Real phone photos taken by blind people (../shared/vizwiz_dev, 1 to 5 megapixels, where it is), with and
    without legible text as its text_truth.json says: {group name: paths}."""
    truth_file = VIZWIZ / "text_truth.json"
    if not truth_file.is_file():
        return {}
    truth = {k: v for k, v in json.loads(truth_file.read_text()).items() if not k.startswith("_")}
    return {f"phone, {kind}": [VIZWIZ / k for k, v in sorted(truth.items()) if v["has_text"] == has][:n]
            for kind, has in (("with text", True), ("without text", False))}


def rapidocr_as_it_comes(threads):
    """The rapidocr library's own pipeline with its defaults (detector, direction classifier, recogniser), on
    `threads` threads: what the text reader is measured against."""
    from rapidocr import RapidOCR

    return RapidOCR(params={"Global.log_level": "error", "EngineConfig.onnxruntime.intra_op_num_threads": threads})


def describe_one(captioner, path):
    """A photo file described as inference.py describes it: the answer's dict."""
    image = captioner.load(path)
    return captioner.describe_batch([image], looks=[captioner.look(image)])[0]


def time_descriptions(captioner, library, paths):
    """Median seconds per photo of each step in describe_bench's list, and how many photos had text read."""
    from tqdm import tqdm

    from captioner.read_text import to_array

    steps = {"caption": lambda p: captioner.caption(p), "describe": lambda p: describe_one(captioner, p),
             "rapidocr": lambda p: library(to_array(load_image(p))),
             "read": lambda p: captioner.reader.read(load_image(p)),
             "photo_check": lambda p: captioner.checker.scores(captioner.load(p))}
    times, read = {k: [] for k in steps}, 0
    for i, path in enumerate(tqdm(paths, desc="describe", unit="photo", leave=False, disable=None)):
        captioner.caption(path)  # warm: the file in the page cache, the model's buffers
        order = list(steps) if i % 2 == 0 else list(steps)[::-1]  # alternate: each step sees the same load
        for key in order:
            start = time.perf_counter()
            out = steps[key](path)
            times[key].append(time.perf_counter() - start)
            read += key == "describe" and bool(out["text"])
    med = {k: statistics.median(v) for k, v in times.items()}
    # per photo, against the library's call on the same photo and the caption measured beside it
    of_library = [d / (1.15 * o + c) for d, o, c in zip(times["describe"], times["rapidocr"], times["caption"])]
    return {"photos": len(paths), "read": read, **{f"{k}_s": v for k, v in med.items()},
            "describe_mean_s": statistics.mean(times["describe"]),
            "describe_of_library_median": statistics.median(of_library)}


def time_hostile(captioner, folder):
    """Seconds to describe each of two hostile photos whole: 12 megapixels of noise, a page of ten thousand tiny
    characters."""
    import numpy as np
    from PIL import ImageDraw, ImageFont

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (3000, 4000, 3), dtype=np.uint8)).save(folder / "noise.jpg", quality=90)
    page = Image.new("RGB", (2000, 1500), "white")
    draw, font = ImageDraw.Draw(page), ImageFont.load_default(size=8)
    for y in range(0, 1500, 10):
        draw.text((0, y), "".join(chr(rng.integers(33, 127)) for _ in range(70)), font=font, fill="black")
    page.save(folder / "tiny.png")
    out = {}
    for name in ("noise.jpg", "tiny.png"):
        start = time.perf_counter()
        said = describe_one(captioner, folder / name)
        out[name] = {"seconds": time.perf_counter() - start, "text_lines": len(said["text"])}
    return out


def report_describe(r):
    """The table, and each group against its goal: a photo with text described in at most 1.15 times the rapidocr
    library's call on it plus the caption; a photo without, in at most the caption plus half a read (the reader's
    full read of the photos with text, median)."""
    print(f"describing photos ({r['checkpoint']}, {r['threads']} threads, load average {r['load_average_before']:.1f}"
          f" before, {r['load_average_after']:.1f} after): median ms per photo; a read: {r['read_s'] * 1000:.0f} ms")
    print("  photos                  n  read  caption  describe  rapidocr  read (full)  photo check  goal")
    for name, g in r["groups"].items():
        if name.endswith("with text"):
            goal = (f"at most 1.15 x rapidocr + caption: {g['describe_of_library_median']:.2f} of it "
                    f"(median per photo): {'met' if g['describe_of_library_median'] <= 1 else 'missed'}")
        else:
            most = g["caption_s"] + 0.5 * r["read_s"]
            goal = (f"at most caption + half a read, {most * 1000:.0f} ms: "
                    f"{'met' if g['describe_s'] <= most else 'missed'}")
        print(f"  {name:22s} {g['photos']:3d} {g['read']:5d}  {g['caption_s'] * 1000:7.1f}  "
              f"{g['describe_s'] * 1000:8.1f}  {g['rapidocr_s'] * 1000:8.1f}  {g['read_s'] * 1000:11.1f}  "
              f"{g['photo_check_s'] * 1000:11.2f}  {goal}")
    for name, h in r["hostile"].items():
        print(f"  hostile {name}: described in {h['seconds']:.2f} s, {h['text_lines']} lines of text said")


def cli(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.web:
        from tools import bench_web
        return bench_web.cli([*(["--checkpoint", args.checkpoint] if args.checkpoint else []),
                              *(["--json"] if args.json else [])])
    try:
        r = serve_bench(args) if args.serve else describe_bench(args) if args.describe else main(args)
    except (DataError, EncoderWeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(r))
    else:
        (report_serve if args.serve else report_describe if args.describe else report)(r)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
