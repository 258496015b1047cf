"""What a training run needs besides its loop (image_training.py): the batches, from the feature cache or the
image stores; where a run stands (TrainState, Progress) and how it resumes from a checkpoint, mid-epoch too;
stopping on SIGINT/SIGTERM after the step in flight (StopFlag); rank 0's checkpoints and TensorBoard logs
(RunOutput); and under torchrun, which process does what (utils.Dist).
"""

import contextlib
import logging
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from captioner.batches import Batches, CaptionTable
from captioner.features import ImageStore, StoreSource, split_sources
from captioner.runtimes import run_frozen
from image_loader import EvalTransform, load_image, train_size
from utils import autocast, checkpoint_state, print_examples, rng_state, save_checkpoint, set_rng_state

log = logging.getLogger("captioner")


# ------------------------------------------------------------------------------------------------ batches

def make_batches(args, data, vocab, model, preset, device, dist):
    """Batches of the training split, the dev split (dev loss) and the first --dev-images dev images (scores).
    A frozen CNN's features come from the feature cache; a CNN that learns (or --no-cache) reads images from
    image stores: the training split at train_size (random crops) with --train-cnn, else at the evaluation
    size. A frozen CNN runs on --runtime: in the feature cache's pass, or with --no-cache on every batch. Under
    torchrun, rank 0 fills the caches once; the others then read them."""
    from_features = not args.train_cnn and not args.no_cache
    with dist.main_first():
        frozen = model if args.train_cnn else run_frozen(model, preset, args.runtime, args.cache_dir, device)[0]
        if from_features:
            sources = split_sources(frozen, data, ("train", "dev"), preset, device, args.cache_dir, args.workers,
                                    args.precision, args.features_on_disk or None)
        else:
            sizes = {"train": train_size(preset) if args.train_cnn else preset["resize"], "dev": preset["resize"]}
            sources = {}
            for s, size in sizes.items():
                store = ImageStore.open(data.images_dir, data.splits[s], size, device, args.cache_dir, args.workers)
                sources[s] = StoreSource(store, args.workers), store.names
    transforms = {"train": None if from_features else "train" if args.train_cnn else "eval",
                  "dev": None if from_features else "eval"}
    encode = None
    if frozen is not model and not from_features:  # --no-cache: each batch's features from the runtime's CNN

        def encode(x):
            with torch.no_grad(), autocast(device, args.precision):  # as the training step would run it
                return frozen.encoderCNN.extract(x)

    captions = {s: CaptionTable([[vocab.numericalize(c) for c in data.captions[n]] for n in names], device)
                for s, (_, names) in sources.items()}

    def batches(split, limit=None, **sharding):  # the scoring sample is a prefix of dev: the same caption rows
        source, names = sources[split]
        return Batches(source, captions[split], names[:limit], device, preset, transforms[split], args.batch_size,
                       encode=encode, **sharding)

    return {"train": batches("train", shuffle=True, rank=dist.rank, world=dist.world), "dev": batches("dev"),
            "score": batches("dev", limit=args.dev_images)}


# ------------------------------------------------------------------------------------ where a run stands

@dataclass
class TrainState:
    """Where training stands: the last finished epoch and, after a stop mid-epoch, how far the next got."""
    epoch: int = 0
    step: int = 0
    best_score: float = -math.inf
    best_epoch: int = 0
    history: list = field(default_factory=list)
    progress: dict = None  # Progress of the unfinished epoch, as a dict
    run: str = None  # the TensorBoard run's folder under --log-dir, which a resumed run goes on writing to

    @classmethod
    def from_checkpoint(cls, ckpt):
        return cls(**{f: ckpt[f] for f in cls.__dataclass_fields__ if f in ckpt})


@dataclass
class Progress:
    """Running totals of one training pass; saved in a checkpoint taken mid-epoch, so that a resumed run skips
    the batches already done and reports the same figure for the epoch."""
    batches: int = 0
    total: float = 0.0  # the objective's figure, summed: the word loss, or with --scst the samples' CIDEr-D
    count: int = 0  # what `total` sums over: words, or sampled captions
    captions: int = 0
    seconds: float = 0.0

    def add_step(self, count, captions):
        """A step done: `count` more of what the figure sums over, of `captions` captions."""
        self.batches += 1
        self.count += count
        self.captions += captions

    @property
    def mean(self):
        return self.total / max(self.count, 1)

    @property
    def captions_per_s(self):
        return self.captions / max(self.seconds, 1e-9)

    @classmethod
    def from_dict(cls, saved):
        renamed = {"loss_sum": "total", "words": "count"}  # their names in checkpoints of earlier versions
        return cls(**{renamed.get(k, k): v for k, v in saved.items()})


def resume(ckpt, optimizer, schedule, scaler):
    """Where training stands: new (ckpt None), or as --resume's checkpoint left it, with the optimizer, its
    schedule, the gradient scaler and the random number generators as they were."""
    if ckpt is None:
        return TrainState()
    optimizer.load_state_dict(ckpt["optimizer"])
    schedule.load_state_dict(ckpt["schedule"])
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    return TrainState.from_checkpoint(ckpt)


def settle(progress, pending, bar, objective):
    """Add the figures still on the device to `progress`, read back at once: one wait for the device every few
    steps, not one per step, so that the CPU queues the next steps while the device computes."""
    if not pending:
        return
    total = torch.stack(pending).sum()
    check_finite(total)
    pending.clear()
    progress.total += total.item()
    bar.set_postfix({objective.figure: f"{progress.mean:.3f}"})  # the epoch's running mean, as before


def check_finite(loss):
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the loss became {loss.item()}: stopped, and the last checkpoint kept; "
                                 "lower --lr or check the data")


class StopFlag:
    """SIGINT or SIGTERM ask training to stop after the step in flight; a second SIGINT stops at once."""

    def __init__(self):
        self.requested = False

    @contextlib.contextmanager
    def installed(self):
        """Handle the signals while training runs; the caller's handlers come back afterwards."""
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield self
            return
        old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("%s: stopping after this step and saving a checkpoint to resume from",
                    signal.Signals(signum).name)


def finish(out, dist, examples=None):
    """The end of a run: rank 0 closes its logs (and prints a few captions of `examples`, the dev sample's
    Batches, if epochs were trained); under torchrun, every process leaves the process group."""
    if out is not None:
        out.close(examples)
    if dist.world > 1:
        dist.barrier()
        torch.distributed.destroy_process_group()


class Preloaded(list):
    """Batches already on the device, passed to train_one_epoch as a Batches would give them: the training
    steps alone, without the loader (bench.py times them so)."""

    def __init__(self, batches, from_features):
        super().__init__(batches)
        self.from_features = from_features

    def iterate(self, skip=0):
        return iter(self[skip:])


# ------------------------------------------------------------------------------------ rank 0's output

@dataclass
class RunOutput:
    """Rank 0's side of a run: its checkpoint folder (with the vocabulary), its TensorBoard run, and the
    checkpoints it writes. A resumed run goes on in its own TensorBoard run, from its next epoch: what the stopped
    run logged after its last checkpoint is dropped (purge_step), so no epoch is shown twice."""
    args: object
    model: torch.nn.Module
    vocab: object
    preset: dict
    trainer: object
    schedule: object
    state: TrainState
    logger: "Logger"

    @classmethod
    def open(cls, args, data, vocab, model, preset, trainer, schedule, state):
        Path(args.checkpoint_dir).mkdir(parents=True, exist_ok=True)
        vocab.save(Path(args.checkpoint_dir) / "vocabulary.pkl")
        resumed = state.run is not None
        state.run = state.run or time.strftime("%Y%m%d-%H%M%S")
        logger = Logger(Path(args.log_dir) / state.run, data, data.splits["dev"][:3],
                        purge_step=state.epoch + 1 if resumed else None)
        return cls(args, model, vocab, preset, trainer, schedule, state, logger)

    def save(self, name):
        """Write a checkpoint of everything the run needs to go on; returns its path."""
        trainer, path = self.trainer, Path(self.args.checkpoint_dir) / name
        save_checkpoint(checkpoint_state(self.model, self.vocab, self.preset,
                                         optimizer=trainer.optimizer.state_dict(), schedule=self.schedule.state_dict(),
                                         scaler=trainer.scaler.state_dict(), rng=rng_state(),
                                         train_args=_plain(vars(self.args)), **asdict(self.state)), path)
        return path

    def save_epoch(self, epoch):
        """After an epoch: last, best if it was, and every --save-every epochs its own."""
        self.save("last.pth.tar")
        if self.state.best_epoch == epoch:
            self.save("best.pth.tar")
        if self.args.save_every and epoch % self.args.save_every == 0:
            self.save(f"checkpoint_epoch_{epoch}.pth.tar")

    def keep_place(self, epoch):
        """Stopped mid-epoch: last.pth.tar holds the place, to go on from with --resume."""
        last = self.save("last.pth.tar")
        log.info("saved %s at epoch %d, batch %d: continue with --resume %s", last, epoch,
                 self.state.progress["batches"], last)

    def close(self, examples):
        """Close the logs; print a few dev captions if epochs were trained."""
        self.logger.close()
        if examples:
            print_examples(self.model, examples, self.vocab)


class Logger:
    """TensorBoard scalars, plus a few dev images with their generated and reference captions."""

    def __init__(self, log_dir, data, names, purge_step=None):
        """purge_step: a resumed run's first epoch; its events from that epoch on, logged before it stopped, are
        dropped (the dev images, logged at its first epoch, are kept)."""
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir, purge_step=purge_step)
        self.data, self.names = data, names
        self.images_logged = purge_step is not None

    def epoch(self, epoch, scalars, generated):
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, epoch)
        for n in self.names:
            refs = "  \n".join(self.data.captions[n])
            text = f"**generated:** {generated.get(n, '')}  \n**references:**  \n{refs}"
            self.writer.add_text(f"dev/{n}", text, epoch)
            if not self.images_logged:
                image = EvalTransform({"resize": 224, "crop": 224, "mean": [0] * 3, "std": [1] * 3})(
                    load_image(self.data.images_dir / n))
                self.writer.add_image(f"dev/{n}", image, epoch)
        self.images_logged = True
        self.writer.flush()

    def close(self):
        self.writer.close()


def _plain(d):
    return {k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v) for k, v in d.items()}
