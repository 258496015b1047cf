"""Measure how fast this machine extracts features, trains and captions; print what was measured.

    python bench.py --quick                   # CPU: under 5 minutes
    python bench.py --data flickr8k --json    # real Flickr8k images and captions; JSON on stdout

Each pipeline figure comes with its bare ceiling, measured in the same run on in-memory tensors, so the
ratio says how much the data path costs:
  feature_efficiency    = feature pass over JPEG files  / encoder forward on in-memory tensors (images/s)
  train_efficiency      = training epoch from the cache / decoder forward+backward on in-memory batches (captions/s)
  caption_latency_ratio = captioning one photo file at beam 3 / the encoder's forward on one image tensor
Without --data, Flickr8k-shaped JPEGs (500x375) with five made-up captions each are generated in a temporary
folder. The frozen-encoder epoch runs over 6,000 images x 5 captions (1,200 with --quick, scaled) whose cached
features are random tensors of the model's feature shape (an epoch's cost does not depend on their values).
"""

import argparse
import json
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from image_intial_model import CNN_RNN, ENCODERS, EncoderWeightsError, ModelArgs, preprocessing
from image_loader import DataError, Flickr8k, FlickrDataset, Vocab, build_transform, get_loader, load_image
from image_training import Trainer, extract_features, make_optimizer
from utils import HelpFormatter, autocast, load_checkpoint, model_from_checkpoint, pick_device

FLICKR8K_VOCAB = 2548
WORDS = ["a", "the", "dog", "man", "woman", "child", "runs", "jumps", "sits", "on", "in", "through", "water",
         "grass", "snow", "street", "red", "blue", "ball", "."]


def get_args_parser():
    p = argparse.ArgumentParser(description="Benchmark feature extraction, training and captioning.",
                                formatter_class=HelpFormatter)
    p.add_argument("--data", help="a Flickr8k folder to read images and captions from (default: generated JPEGs)")
    p.add_argument("--encoder", choices=sorted(ENCODERS), default="efficientnet_lite0", help="CNN encoder")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--quick", action="store_true", help="fewer images and batches: a CPU run under 5 minutes")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.add_argument("--checkpoint", help="a trained checkpoint to time (default: a new decoder on the pretrained "
                                        "encoder; untrained, it writes all --max-len words of every caption)")
    p.add_argument("--batch-size", type=int, default=32, help="images per training batch, as in training")
    p.add_argument("--embed-size", type=int, default=256, help="decoder shape, as in training")
    p.add_argument("--hidden-size", type=int, default=256, help="decoder shape, as in training")
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
                              hidden_size=args.hidden_size)
            self.model = CNN_RNN(margs, weights="imagenet")
        self.model.to(device)
        if device.type == "cuda":
            self.model.encoderCNN.backbone.to(memory_format=torch.channels_last)
        self.names = sorted(data.captions)

    def _scaler(self):  # as training: a gradient scaler only for fp16 autocast
        cuda = self.device.type == "cuda"
        return torch.amp.GradScaler("cuda", enabled=cuda and not torch.cuda.is_bf16_supported())

    def encoder_forward(self, batch=64, repeat=5):
        size = self.preset["crop"]
        x = torch.randn(batch, 3, size, size, device=self.device)
        enc = self.model.encoderCNN.eval()

        @torch.inference_mode()
        def forward():
            with autocast(self.device):
                enc.extract(x)

        return batch / timed(forward, repeat, sync=self.sync)

    def feature_pass(self, n):
        names = self.names[:n]
        extract_features(self.model.encoderCNN, self.data.images_dir, names[:64], self.preset, self.device)  # warm
        self.sync()
        start = time.perf_counter()
        extract_features(self.model.encoderCNN, self.data.images_dir, names, self.preset, self.device)
        self.sync()
        return len(names) / (time.perf_counter() - start)

    def frozen_epoch(self, images):
        """A training epoch from a feature cache, measured on `images` images with five captions each and
        scaled to Flickr8k's 6,000. Returns (seconds, captions/s, bare decoder captions/s)."""
        real = self.data.items("train", self.vocab)
        items = [(f"img{i}", real[i % len(real)][1]) for i in range(images)]
        size = self.preset["crop"]
        with torch.inference_mode():  # one feature's shape: [F] pooled, [R, F] regions for attention
            shape = self.model.encoderCNN.extract(torch.zeros(1, 3, size, size, device=self.device)).shape[1:]
        # random values (an epoch's cost does not depend on them), stored as the cache stores them
        dtype = torch.float16 if self.model.encoderCNN.spatial else torch.float32
        features = {name: torch.randn(shape).to(dtype) for name, _ in items}
        loaders = [get_loader(FlickrDataset(".", subset, self.vocab, features=features), self.args.batch_size,
                              pin_memory=self.device.type == "cuda")
                   for subset in (items[:5 * self.args.batch_size], items)]  # warm-up, then the measured pass
        optimizer = make_optimizer(argparse.Namespace(lr=1e-3, train_cnn=False), self.model)
        criterion = torch.nn.CrossEntropyLoss(ignore_index=Vocab.pad_idx, reduction="sum")  # as training
        trainer = Trainer(self.model, criterion, self.device, True, optimizer, self._scaler(), 5.0)
        trainer.run(loaders[0], "warm-up")
        self.sync()
        start = time.perf_counter()
        trainer.run(loaders[1], "frozen epoch")
        self.sync()
        seconds = time.perf_counter() - start
        captions = sum(len(c) for _, c in items)
        batches = [tuple(t.to(self.device) for t in b[:4]) for b in loaders[1]]  # the same batches, in memory
        bare_criterion = torch.nn.CrossEntropyLoss(ignore_index=Vocab.pad_idx)
        return seconds * 6000 / images, captions / seconds, self.decoder_bare(batches, optimizer, bare_criterion)

    def decoder_bare(self, batches, optimizer, criterion):
        """Captions/s of the training step alone, on batches already in memory on the device."""
        model = self.model.train()

        def epoch():
            for x, captions, _, index in batches:
                with autocast(self.device):
                    logits = model(x, captions[:, :-1], index, from_features=True)
                    loss = criterion(logits.float().reshape(-1, logits.shape[-1]), captions[:, 1:].reshape(-1))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
                optimizer.step()

        captions = sum(b[1].shape[0] for b in batches)
        return captions / timed(epoch, 1, sync=self.sync)

    def finetune_epoch(self, max_batches):
        """Seconds per epoch over 6,000 images through the CNN (--train-cnn), from `max_batches` batches."""
        self.model.encoderCNN.set_train_cnn(True)
        try:
            items = self.data.items("train", self.vocab)[:max_batches * self.args.batch_size]
            dataset = FlickrDataset(self.data.images_dir, items, self.vocab, build_transform(self.preset, train=True))
            loader = get_loader(dataset, self.args.batch_size, num_workers=2, pin_memory=self.device.type == "cuda")
            optimizer = make_optimizer(argparse.Namespace(lr=1e-3, train_cnn=True, cnn_lr=1e-5), self.model)
            criterion = torch.nn.CrossEntropyLoss(ignore_index=Vocab.pad_idx, reduction="sum")
            trainer = Trainer(self.model, criterion, self.device, False, optimizer, self._scaler(), 5.0)
            self.sync()
            start = time.perf_counter()
            trainer.run(loader, "fine-tune")
            self.sync()
            per_image = (time.perf_counter() - start) / len(items)
        finally:
            self.model.encoderCNN.set_train_cnn(False)
        return per_image * 6000, len(items)

    @torch.no_grad()
    def caption_latency(self, repeat):
        """Seconds to caption one photo file (read, preprocess, encode, decode), greedy and beam 3, and the
        encoder's own forward on one image tensor."""
        model, path = self.model.eval(), self.data.images_dir / self.names[0]
        transform = build_transform(self.preset)

        def caption(beam):
            x = transform(load_image(path)).unsqueeze(0).to(self.device)
            with autocast(self.device):
                return len(model.generate(x, beam=beam)[0])

        one = torch.randn(1, 3, self.preset["crop"], self.preset["crop"], device=self.device)

        def encode():
            with autocast(self.device):
                model.encoderCNN.extract(one)

        return (timed(lambda: caption(1), repeat, 2, self.sync), timed(lambda: caption(3), repeat, 2, self.sync),
                timed(encode, repeat, 2, self.sync), caption(3))


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run(args, data_dir):
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    data = Flickr8k.load(data_dir)
    bench = Bench(args, device, data)
    n_feature = 200 if args.quick else min(len(bench.names), 2000)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    r = {"device": name, "encoder": args.encoder,
         "data": f"Flickr8k at {args.data}" if args.data else "generated JPEGs"}
    r["encoder_forward_images_per_s"] = bench.encoder_forward(repeat=3 if args.quick else 10)
    r["feature_pass_images_per_s"] = bench.feature_pass(n_feature)
    r["feature_pass_images"] = n_feature
    r["feature_efficiency"] = r["feature_pass_images_per_s"] / r["encoder_forward_images_per_s"]
    r["frozen_measured_images"] = 1200 if args.quick else 6000
    seconds, rate, bare = bench.frozen_epoch(r["frozen_measured_images"])
    r.update(frozen_epoch_s=seconds, frozen_epoch_captions_per_s=rate, decoder_bare_captions_per_s=bare,
             train_efficiency=rate / bare)
    r["finetune_epoch_s"], r["finetune_measured_images"] = bench.finetune_epoch(3 if args.quick else 20)
    greedy, beam3, encode, words = bench.caption_latency(5 if args.quick else 20)
    r.update(caption_greedy_s=greedy, caption_beam3_s=beam3, encoder_one_image_s=encode, caption_words=words,
             checkpoint=args.checkpoint,
             caption_latency_ratio=beam3 / encode, peak_memory_mb=peak_memory_mb(device))
    return r


def report(r):
    print(f"device {r['device']}, encoder {r['encoder']}, data: {r['data']}")
    print(f"feature pass      {r['feature_pass_images_per_s']:8.1f} images/s over {r['feature_pass_images']} JPEGs; "
          f"bare encoder {r['encoder_forward_images_per_s']:.1f} images/s; efficiency {r['feature_efficiency']:.0%}")
    print(f"frozen epoch      {r['frozen_epoch_s']:8.2f} s for 6,000 images / 30,000 captions "
          f"(measured on {r['frozen_measured_images']:,} images, {r['frozen_epoch_captions_per_s']:.0f} "
          "captions/s); bare decoder step "
          f"{r['decoder_bare_captions_per_s']:.0f} captions/s; efficiency {r['train_efficiency']:.0%}")
    print(f"fine-tune epoch   {r['finetune_epoch_s']:8.1f} s for 6,000 images "
          f"(measured on {r['finetune_measured_images']} images, scaled)")
    print(f"caption one photo {r['caption_greedy_s'] * 1000:8.1f} ms greedy, "
          f"{r['caption_beam3_s'] * 1000:.1f} ms beam 3; encoder forward alone "
          f"{r['encoder_one_image_s'] * 1000:.1f} ms; ratio {r['caption_latency_ratio']:.2f} "
          f"({r['caption_words']} words, {'trained' if r['checkpoint'] else 'untrained'} decoder)")
    print(f"peak memory       {r['peak_memory_mb']:8.0f} MiB")


def main(args):
    if args.data:
        return run(args, args.data)
    with tempfile.TemporaryDirectory() as tmp:
        return run(args, make_jpegs(Path(tmp), 240 if args.quick else 2000))


def cli(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        r = main(args)
    except (DataError, EncoderWeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(r))
    else:
        report(r)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
