"""Train the captioner on Flickr8k.

    python image_training.py --data DIR                      # Inception-v3 + LSTM, the documented default
    python image_training.py --demo                          # 1-2 minutes on a CPU, on the bundled sample
    python image_training.py --data DIR --resume checkpoints/last.pth.tar

With a frozen CNN (the default) each image's CNN feature is computed once and cached on disk, and the
decoder trains from the cache. Checkpoints go to --checkpoint-dir, TensorBoard logs to --log-dir (a resumed run
goes on in its own TensorBoard run). The functions below come in the order main calls them.
"""

import argparse
import contextlib
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from evaluate import CiderD, caption_loader, score_captions
from features import RUNTIME_HELP, RUNTIMES, ImageStore, StoreSource, split_sources, use_runtime
from image_intial_model import (
    CNN_RNN,
    DECODERS,
    ENCODERS,
    PAD_IDX,
    SOS_IDX,
    EncoderWeightsError,
    ModelArgs,
    caption_log_probs,
    decoder_fields,
    preprocessing,
    sample_captions,
    trim_at_eos,
)
from image_loader import (
    Batches,
    CaptionTable,
    DataError,
    EvalTransform,
    Flickr8k,
    default_workers,
    load_image,
    train_size,
)
from utils import (
    PRECISIONS,
    SHIPPED_CHECKPOINT,
    Dist,
    HelpFormatter,
    autocast,
    autocast_dtype,
    checkpoint_state,
    init_distributed,
    load_checkpoint,
    model_from_checkpoint,
    non_negative,
    pick_device,
    positive,
    print_examples,
    rng_state,
    save_checkpoint,
    set_cnn_layout,
    set_rng_state,
    step_precision,
    tune_for,
)

log = logging.getLogger("captioner")
SAMPLE_DATA = Path(__file__).resolve().parent / "data" / "flickr8k_sample"
DEMO = {  # --demo's defaults
    "data": str(SAMPLE_DATA), "encoder": "efficientnet_lite0", "epochs": 40,
    "lr": 2e-3,  # 200 images: few steps per epoch, so larger steps
    "min_freq": 3,
    "lr_decay": 1.0,  # never: 25 dev images score too noisily to steer by
    # a folder of its own: checkpoints/best.pth.tar is the one the other commands take by default, and a model
    # of 200 images must not replace the model that ships
    "checkpoint_dir": "checkpoints/demo",
}
SELECT_METRICS = {"cider": "CIDEr", "bleu4": "Bleu_4"}


def get_args_parser(add_help=True):
    p = argparse.ArgumentParser(description="Train the CNN + LSTM image captioner on Flickr8k.", add_help=add_help,
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", help="Flickr8k folder: Images/ + captions.txt (Kaggle) or Flicker8k_Dataset/ + "
                                  "Flickr8k.token.txt (original); official split files are used when present")
    g.add_argument("--demo", action="store_true",
                   help="a quick run on the bundled sample, with these defaults (flags given still win): "
                        + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in DEMO.items()))
    g.add_argument("--min-freq", type=positive(int), default=5, help="keep words seen this often in training captions")
    g.add_argument("--max-images", type=positive(int), help="smoke test: use only about this many images")
    g.add_argument("--workers", type=positive(int),
                   help="loader worker processes (default: the cores this process may use, shared by torchrun's "
                        "processes, at most 16)")
    g.add_argument("--no-cache", action="store_true",
                   help="run the frozen CNN on every batch (from the image store) instead of caching its features")
    g.add_argument("--cache-dir", default="cache",
                   help="where cached CNN features and image stores (images resized once) are kept")
    g.add_argument("--runtime", choices=RUNTIMES, default="auto", help=RUNTIME_HELP)
    g.add_argument("--features-on-disk", action="store_true",
                   help="read cached CNN features from their file a batch at a time instead of holding them in "
                        "memory (the default only for a cache larger than a quarter of RAM, or half the GPU's "
                        "free memory)")
    add_model_flags(p.add_argument_group("model"))
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive(int), default=30, help="epochs to train")
    g.add_argument("--batch-size", type=positive(int), default=32,
                   help="images per batch, each with all its captions")
    g.add_argument("--lr", type=positive(float), default=3e-4, help="Adam learning rate of the decoder and projection")
    g.add_argument("--train-cnn", action="store_true", help="fine-tune the CNN too (disables the feature cache)")
    g.add_argument("--cnn-lr", type=positive(float), default=1e-5, help="learning rate of the CNN with --train-cnn")
    g.add_argument("--grad-clip", type=non_negative, default=5.0, help="clip the gradient norm to this (0: off)")
    g.add_argument("--lr-decay", type=positive(float), default=0.5,
                   help="multiply the learning rates by this when the dev score stalls; 1: never")
    g.add_argument("--lr-patience", type=positive(int), default=2,
                   help="multiply the learning rates by --lr-decay after this many epochs without a better dev score")
    g.add_argument("--early-stop", type=int, default=0,
                   help="stop after this many epochs without a better dev score (0: never)")
    g.add_argument("--label-smoothing", type=non_negative, default=0.0, help="label smoothing of the word loss")
    g.add_argument("--attention-reg", type=non_negative, default=0.0,
                   help="doubly stochastic attention (Xu et al. 2015; they used 1): add this times the sum over "
                        "regions of (1 - the region's weights summed over the caption's words)^2 to each caption's "
                        "word loss (summed over its words)")
    g.add_argument("--scst", action="store_true",
                   help="self-critical training: reward sampled captions by their CIDEr-D instead of the "
                        "word loss; start it from a trained model with --init-from, at a small --lr (1e-4)")
    g.add_argument("--scst-samples", type=positive(int), default=5,
                   help="--scst: captions sampled per image; each one's baseline is the others' mean reward")
    g.add_argument("--seed", type=int, default=0, help="random seed (data split, initialisation, shuffling)")
    g.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    g.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="autocast dtype; auto: bf16 on CUDA (fp16 on cards without bf16), fp32 elsewhere")
    add_output_flags(p.add_argument_group("checkpoints and logs"))
    return p


def add_output_flags(g):
    """Where a run writes, and where it starts from."""
    g.add_argument("--checkpoint-dir", default="checkpoints", help="where checkpoints and vocabulary.pkl go")
    g.add_argument("--save-every", type=positive(int), default=5, help="keep checkpoint_epoch_N every N epochs")
    g.add_argument("--resume", metavar="PATH", help="continue from this checkpoint (model, optimizer, epoch, RNG)")
    g.add_argument("--init-from", metavar="PATH",
                   help="start from this checkpoint's model and vocabulary (its shape and encoder too), with a "
                        "new optimizer at epoch 0: how --scst fine-tunes a model trained on the word loss")
    g.add_argument("--log-dir", default="runs", help="TensorBoard log folder")
    g.add_argument("--dev-images", type=positive(int), default=1000,
                   help="dev images captioned (greedy) and scored after each epoch")
    g.add_argument("--select-metric", choices=sorted(SELECT_METRICS), default="cider",
                   help="dev score that picks best.pth.tar and drives --lr-decay and --early-stop")
    g.add_argument("--max-len", type=positive(int), default=40, help="longest generated caption, in words")


def add_model_flags(g):
    """The model's shape: its encoder and its decoder."""
    g.add_argument("--encoder", choices=sorted(ENCODERS), default="inception_v3", help="CNN encoder")
    g.add_argument("--no-pretrained", action="store_true", help="start the CNN from random weights")
    g.add_argument("--encoder-weights", metavar="FILE", help="local ImageNet state_dict for the encoder (offline use)")
    g.add_argument("--embed-size", type=positive(int), default=256, help="word and image embedding size")
    g.add_argument("--hidden-size", type=positive(int), default=256, help="LSTM hidden size")
    g.add_argument("--num-layers", type=positive(int), default=1, help="LSTM layers")
    g.add_argument("--dropout", type=float, default=0.5, help="dropout on embeddings and LSTM outputs")
    g.add_argument("--decoder", choices=DECODERS,
                   help="plain (the default): the image is the LSTM's first input; attention: Show-Attend-Tell, "
                        "soft attention over the CNN's feature map at every word; topdown: Anderson et al.'s "
                        "top-down decoder, an attention LSTM that chooses where to look at every word and a "
                        "language LSTM that says it (one layer each)")
    g.add_argument("--attention", action="store_true", help="the same as --decoder attention")
    g.add_argument("--attention-dim", type=positive(int), default=256,
                   help="size of the attention layer (--decoder attention or topdown)")


def parse_args(argv=None):
    """The command line, with --demo's defaults where --demo is given; a wrong flag ends it with one line (exit
    2). Fills in the loader's workers."""
    parser = get_args_parser()
    if parser.parse_known_args(argv)[0].demo:
        parser.set_defaults(**DEMO)
    args = parser.parse_args(argv)
    problem = flag_problem(args)
    if problem:
        parser.error(problem)
    args.decoder = chosen_decoder(args)  # so that the checkpoint's train_args name it
    args.workers = args.workers or default_workers(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return args


def chosen_decoder(args):
    """The decoder the flags ask for, one of DECODERS: --decoder, or --attention (its old spelling)."""
    return args.decoder or ("attention" if args.attention else "plain")


def flag_problem(args):
    """What is wrong with these flags together that the parser cannot see, in one line; None if nothing."""
    decoder = chosen_decoder(args)
    problems = [
        (args.lr_decay > 1, f"--lr-decay must be in (0, 1], got {args.lr_decay}"),
        (not args.data, "say where Flickr8k is with --data DIR, or try --demo"),
        (args.attention and decoder != "attention",
         f"--attention means --decoder attention, not --decoder {decoder}: give one of them"),
        (decoder == "attention" and args.num_layers > 1,
         "the attention decoder has one LSTM layer: drop --num-layers or --attention"),
        (decoder == "topdown" and args.num_layers > 1,
         "the topdown decoder has two LSTMs of one layer each: drop --num-layers"),
        (not 0 <= args.dropout < 1, f"--dropout must be in [0, 1), got {args.dropout}"),
        (args.resume and args.init_from, "--resume continues a run and --init-from starts one: give one of them"),
        (args.scst and args.attention_reg,
         "--attention-reg regularises the word loss, which --scst does not use: drop one"),
        (args.scst and args.scst_samples < 2,
         "--scst-samples must be at least 2: each sample's baseline is the other samples' mean"),
        (Path(args.checkpoint_dir).resolve() == SHIPPED_CHECKPOINT.parent,
         f"{args.checkpoint_dir} holds the model that ships with the code: train into another --checkpoint-dir"),
    ]
    return next((text for wrong, text in problems if wrong), None)


def usage_error(problem):
    """A problem with the flags that shows only once a checkpoint is read: one line and exit 2, as the parser's."""
    get_args_parser().error(problem)


# ------------------------------------------------------------------------------------------------ a run

def main(args):
    """Train; returns {"history": [this run's per-epoch dicts], "best_score": float, "checkpoint_dir": Path,
    "stopped": whether SIGINT/SIGTERM ended it}. Under torchrun, rank 0 writes logs and checkpoints."""
    args.workers = args.workers or default_workers(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    dist, device = init_distributed(pick_device(args.device))
    tune_for(device)
    run = Run.start(args, dist, device)
    first, train, stop = len(run.state.history), run.batches["train"], StopFlag()
    log.info("training %d images (%d captions) on %s%s, %s, epochs %d..%d", len(train.names),
             len(train.captions.lengths), device, f" x {dist.world} processes" if dist.world > 1 else "",
             "from cached features" if train.from_features else "through the CNN", run.state.epoch + 1, args.epochs)
    with stop.installed():
        for epoch in range(run.state.epoch + 1, args.epochs + 1):
            if not run.epoch(epoch, stop):
                break
    run.finish(examples=len(run.state.history) > first and not stop.requested)
    return {"history": run.state.history[first:], "best_score": run.state.best_score,
            "checkpoint_dir": run.ckpt_dir, "stopped": stop.requested}


@dataclass
class Run:
    """One training run: its data, model and trainer, where it stands, and (rank 0) where it writes."""
    args: argparse.Namespace
    data: Flickr8k
    vocab: object
    model: nn.Module
    preset: dict
    batches: dict
    trainer: "Trainer"
    schedule: object
    state: "TrainState"
    logger: "Logger" = None

    @property
    def ckpt_dir(self):
        return Path(self.args.checkpoint_dir)

    @classmethod
    def start(cls, args, dist, device):
        """A new run, or the one --resume names, as its checkpoint left it."""
        data, vocab, model, preset, ckpt = build(args, device)
        batches = make_batches(args, data, vocab, model, preset, device, dist)
        precision = step_precision(device, args.precision, model.args, batches["train"].from_features)
        optimizer, schedule, scaler, state = training_state(args, model, device, ckpt, precision)
        trainer = Trainer(model if dist.world == 1 else nn.parallel.DistributedDataParallel(model),
                          make_objective(args, data, vocab, batches["train"].names), device, optimizer, scaler,
                          args.grad_clip, dist, precision)
        run = cls(args, data, vocab, model, preset, batches, trainer, schedule, state)
        if dist.main:
            run.ckpt_dir.mkdir(parents=True, exist_ok=True)
            vocab.save(run.ckpt_dir / "vocabulary.pkl")
            # a resumed run goes on in its own TensorBoard run, from its next epoch: what the stopped run logged
            # after its last checkpoint is dropped (purge_step), so no epoch is shown twice
            resumed = state.run is not None
            state.run = state.run or time.strftime("%Y%m%d-%H%M%S")
            run.logger = Logger(Path(args.log_dir) / state.run, data, data.splits["dev"][:3],
                                purge_step=state.epoch + 1 if resumed else None)
        return run

    def epoch(self, epoch, stop):
        """Train one epoch, score it on dev and save the checkpoints; False if training stops after it."""
        args, state, train, dist = self.args, self.state, self.batches["train"], self.trainer.dist
        train.sampler.generator.manual_seed(args.seed * 100003 + epoch)  # the order: seed and epoch alone
        progress = Progress.from_dict(state.progress or {})
        done_before = progress.batches
        self.trainer.run(train, f"epoch {epoch}/{args.epochs}", progress, stop)
        state.step += progress.batches - done_before
        if progress.batches < len(train):  # stopped mid-epoch: keep the place, not the epoch
            state.progress = asdict(progress)
            if dist.main:
                last = self.save("last.pth.tar")
                log.info("saved %s at epoch %d, batch %d: continue with --resume %s", last, epoch,
                         progress.batches, last)
            return False
        state.epoch, state.progress = epoch, None
        score = dist.from_main(self.score(epoch, progress))
        self.schedule.step(score)  # on every process, so that all keep the same learning rate
        if score > state.best_score:
            state.best_score, state.best_epoch = score, epoch
        if dist.main:
            self.save("last.pth.tar")
            if state.best_epoch == epoch:
                self.save("best.pth.tar")
            if epoch % args.save_every == 0:
                self.save(f"checkpoint_epoch_{epoch}.pth.tar")
        if stop.requested:
            return False
        if args.early_stop and epoch - state.best_epoch >= args.early_stop:
            log.info("stopping early: no better dev %s for %d epochs (best %.4f at epoch %d)", args.select_metric,
                     args.early_stop, state.best_score, state.best_epoch)
            return False
        return True

    def score(self, epoch, progress):
        """The epoch's figure over all processes; rank 0 adds its history row with the dev scores, and returns
        the dev score that selects models (the others 0: rank 0's is broadcast)."""
        dist, optimizer = self.trainer.dist, self.trainer.optimizer
        figure = dist.all_sum(progress.total) / max(dist.all_sum(progress.count), 1)  # all processes' mean
        if not dist.main:
            return 0.0
        row = {"epoch": epoch, self.trainer.objective.history_key: figure, "lr": optimizer.param_groups[0]["lr"],
               "captions_per_s": progress.captions_per_s * dist.world}
        score = end_of_epoch(self.args, row, self.trainer, self.data, self.vocab, self.model, self.batches,
                             self.logger)
        self.state.history.append(row)
        return score

    def save(self, name):
        """Write a checkpoint of everything the run needs to go on; returns its path."""
        trainer, path = self.trainer, self.ckpt_dir / name
        save_checkpoint(checkpoint_state(self.model, self.vocab, self.preset,
                                         optimizer=trainer.optimizer.state_dict(), schedule=self.schedule.state_dict(),
                                         scaler=trainer.scaler.state_dict(), rng=rng_state(),
                                         train_args=_plain(vars(self.args)), **asdict(self.state)), path)
        return path

    def finish(self, examples):
        """Close the logs; print a few dev captions if epochs were trained; leave the process group."""
        if self.logger is not None:
            self.logger.close()
            if examples:
                print_examples(self.model, self.batches["score"], self.vocab)
        if self.trainer.dist.world > 1:
            self.trainer.dist.barrier()
            torch.distributed.destroy_process_group()


def build(args, device):
    """Data, vocabulary, model, preprocessing and (when resuming) the checkpoint to continue from."""
    data = Flickr8k.load(args.data, seed=args.seed, max_images=args.max_images)
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        if "optimizer" not in ckpt:
            raise DataError(f"{args.resume} holds no training state to resume from")
        was_scst = bool(ckpt.get("train_args", {}).get("scst", False))
        if was_scst != args.scst:  # a run goes on with the objective it started with
            usage_error(f"{args.resume} was trained {'with' if was_scst else 'without'} --scst: "
                        "resume it the same way")
        model, vocab, preset = model_from_checkpoint(ckpt)
        log.info("resuming from %s (epoch %d)", args.resume, ckpt["epoch"])
    elif args.init_from:
        model, vocab, preset = model_from_checkpoint(load_checkpoint(args.init_from))
        log.info("starting from the model of %s (%s encoder, %s decoder)", args.init_from, model.args.encoder,
                 model.decoder_kind)
    else:
        vocab = data.train_vocab(args.min_freq)
        margs = ModelArgs(vocab_size=len(vocab), encoder=args.encoder, embed_size=args.embed_size,
                          hidden_size=args.hidden_size, num_layers=args.num_layers, dropout=args.dropout,
                          attention_dim=args.attention_dim, **decoder_fields(chosen_decoder(args)))
        weights = "random" if args.no_pretrained else (args.encoder_weights or "imagenet")
        model = CNN_RNN(margs, weights=weights)
        preset = preprocessing(args.encoder)
    if args.attention_reg and not model.args.attention:
        usage_error("--attention-reg regularises an attention decoder's weights: add --attention "
                    "(or --decoder topdown)")
    model.encoderCNN.set_train_cnn(args.train_cnn)
    log.info("vocabulary: %d words (min frequency %d, training captions only)", len(vocab), args.min_freq)
    model.to(device)
    set_cnn_layout(model, device, args.train_cnn)
    return data, vocab, model, preset, ckpt


def make_batches(args, data, vocab, model, preset, device, dist):
    """Batches of the training split, the dev split (dev loss) and the first --dev-images dev images (scores).
    A frozen CNN's features come from the feature cache; a CNN that learns (or --no-cache) reads images from
    image stores: the training split at train_size (random crops) with --train-cnn, else at the evaluation
    size. Under torchrun, rank 0 fills the caches once; the others then read them."""
    from_features = not args.train_cnn and not args.no_cache
    with dist.main_first():
        if not args.train_cnn:  # the frozen CNN's feature pass (or, with --no-cache, every batch's) on --runtime
            use_runtime(model, preset, args.runtime, args.cache_dir, device)
        if from_features:
            sources = split_sources(model, data, ("train", "dev"), preset, device, args.cache_dir, args.workers,
                                    args.precision, args.features_on_disk or None)
        else:
            sizes = {"train": train_size(preset) if args.train_cnn else preset["resize"], "dev": preset["resize"]}
            sources = {}
            for s, size in sizes.items():
                store = ImageStore.open(data.images_dir, data.splits[s], size, device, args.cache_dir, args.workers)
                sources[s] = StoreSource(store, args.workers), store.names
    transforms = {"train": None if from_features else "train" if args.train_cnn else "eval",
                  "dev": None if from_features else "eval"}

    captions = {s: CaptionTable([[vocab.numericalize(c) for c in data.captions[n]] for n in names], device)
                for s, (_, names) in sources.items()}

    def batches(split, limit=None, **sharding):  # the scoring sample is a prefix of dev: the same caption rows
        source, names = sources[split]
        return Batches(source, captions[split], names[:limit], device, preset, transforms[split], args.batch_size,
                       **sharding)

    return {"train": batches("train", shuffle=True, rank=dist.rank, world=dist.world), "dev": batches("dev"),
            "score": batches("dev", limit=args.dev_images)}


def training_state(args, model, device, ckpt=None, precision="auto"):
    """The optimizer, its schedule, the gradient scaler for steps in `precision` and where training stands: new,
    or as `ckpt` left them (the RNGs too)."""
    optimizer = make_optimizer(args, model)
    schedule = make_schedule(args, optimizer)
    # fp16 needs its gradients scaled up, or small ones flush to zero; bf16 has fp32's range and needs none
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype(device, precision) == torch.float16)
    if ckpt is None:
        return optimizer, schedule, scaler, TrainState()
    optimizer.load_state_dict(ckpt["optimizer"])
    schedule.load_state_dict(ckpt["schedule"])
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    return optimizer, schedule, scaler, TrainState.from_checkpoint(ckpt)


def make_optimizer(args, model):
    groups = [{"params": [p for n, p in model.named_parameters() if not n.startswith("encoderCNN.backbone.")],
               "lr": args.lr}]
    if args.train_cnn:
        groups.append({"params": model.encoderCNN.backbone.parameters(), "lr": args.cnn_lr})
    # fused: one kernel for all parameters' updates (CUDA and CPU alike), not several per parameter
    return torch.optim.Adam(groups, fused=True)


def make_schedule(args, optimizer):
    """Multiply the learning rates by --lr-decay after --lr-patience epochs without a better dev score
    (--lr-decay 1: never; the scheduler insists on a factor below 1, so it gets endless patience instead)."""
    never = args.lr_decay >= 1
    # The scheduler acts once its count of epochs without a better score exceeds `patience`: N - 1 acts on the Nth.
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5 if never else args.lr_decay,
                                                      patience=math.inf if never else args.lr_patience - 1)


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


def make_objective(args, data, vocab, train_names):
    """The word loss, or with --scst self-critical training on the training images' references."""
    if not args.scst:
        return WordLoss(args.label_smoothing, args.attention_reg)
    names = set(train_names)
    return SelfCritical([it for it in data.items("train", vocab) if it[0] in names], args.scst_samples, args.max_len)


# ------------------------------------------------------------------------------------------- objectives

class WordLoss:
    """The word loss: the cross-entropy of each next word of the reference captions (teacher forcing)."""
    figure, history_key, tag = "train loss", "train_loss", "loss/train"  # how an epoch reports it
    dropout = True

    def __init__(self, label_smoothing=0.0, attention_reg=0.0):
        self.criterion = nn.CrossEntropyLoss(ignore_index=PAD_IDX, label_smoothing=label_smoothing, reduction="sum")
        self.attention_reg = attention_reg

    def __call__(self, model, batch, from_features):
        """-> (what to minimise, summed over the batch; the figure to report, summed; what both sum over)."""
        tokens, targets = batch.captions[:, :-1], batch.captions[:, 1:]  # [N, T-1] each: predict the next word
        if self.attention_reg:
            logits, weights = model(batch.x, tokens, batch.image_index, from_features=from_features,
                                    with_attention=True)
        else:
            logits = model(batch.x, tokens, batch.image_index, from_features=from_features)
        loss = self.criterion(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        if not self.attention_reg:
            return loss, loss.detach(), batch.words
        # doubly stochastic attention (Xu et al. 2015, eq. 14): over a caption's words each region's weights
        # should sum to about 1, so that the decoder looks at every part of the image, not at a few regions
        seen = (weights.float() * (targets != PAD_IDX).unsqueeze(-1)).sum(1)  # [N, R]
        penalty = ((1 - seen) ** 2).sum()  # summed over captions, as the word loss is: each caption's loss is
        # its words' cross-entropy plus --attention-reg times its penalty, as in Xu et al.'s code
        return loss + self.attention_reg * penalty, loss.detach(), batch.words


class SelfCritical:
    """Self-critical sequence training (Rennie et al. 2017) with CIDEr-D as the reward: the word loss only
    teaches the next word of a reference, this teaches whole captions that score well. Each image gets K
    sampled captions; a sample's baseline is the mean reward of the image's other K-1 (Luo 2020), so captions
    better than their siblings become more likely and worse ones less, with no greedy pass needed."""
    figure, history_key, tag = "train CIDEr-D of samples", "train_cider_d", "cider_d/train"
    dropout = False  # it samples with dropout off, so the captions it rewards are the ones whose probabilities
    # it then raises

    def __init__(self, items, samples, max_len):
        """items: the training set's [(image name, [caption ids with SOS and EOS]), ...]."""
        refs = [[ids[1:-1] for ids in caps] for _, caps in items]
        self.cider = CiderD(refs)  # document frequencies of the training references
        self.refs = {name: [self.cider.vector(r) for r in rs] for (name, _), rs in zip(items, refs)}
        self.samples, self.max_len = samples, max_len

    def rewards(self, words, names):
        """Sampled word ids [B*K, T] (EOS, then PAD) of the images `names` -> CIDEr-D [B, K]."""
        out = []
        for i, row in enumerate(words.tolist()):
            out.append(self.cider.score(trim_at_eos(row), self.refs[names[i // self.samples]]))
        return torch.tensor(out).view(len(names), self.samples)

    def __call__(self, model, batch, from_features):
        """-> (minus the samples' log-probabilities weighted by their advantage, summed; their rewards,
        summed; the number of samples)."""
        ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        inner = model.module if ddp else model
        x, k = batch.x, self.samples
        rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(k)  # [B*K]: each sample's image
        # With dropout off the features do not change between the sampling and the pass with gradients: one
        # pass through the CNN serves both (a CNN that learns: a third less work a step). DDP's gradient hooks
        # need its own forward, so under DDP the features are computed again there.
        feats = None if ddp else inner.features(x, from_features)
        with torch.no_grad():
            sampled_from = inner.features(x, from_features) if ddp else feats.detach()
            words = sample_captions(inner.decoderRNN, sampled_from[rows], self.max_len)  # [B*K, T]
        reward = self.rewards(words, batch.names).to(x.device)  # [B, K]
        advantage = (reward - (reward.sum(1, keepdim=True) - reward) / (k - 1)).view(-1)  # [B*K]
        tokens = torch.cat([torch.full_like(words[:, :1], SOS_IDX), words[:, :-1]], 1)  # SOS w1 .. w(T-1)
        # the samples again, with gradients
        logits = model(x, tokens, rows, from_features=from_features) if ddp else inner.decoderRNN(feats[rows], tokens)
        loss = -(advantage * caption_log_probs(logits, words)).sum()
        _check_finite(loss)  # here, not every few steps: a NaN here would make the next samples fail first
        return loss, reward.sum(), words.shape[0]


# ---------------------------------------------------------------------------------------------- passes

@dataclass
class Trainer:
    """Training passes: `objective` (WordLoss or SelfCritical) says what each batch minimises."""
    model: nn.Module
    objective: WordLoss
    device: torch.device
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    grad_clip: float = 0.0
    dist: Dist = field(default_factory=Dist)
    precision: str = "auto"
    settle_every: int = 25  # steps between reading the figure back from the device (each read waits for it)

    def step(self, batch, from_features):
        """One batch: returns (the objective's figure summed over it, as a tensor on the device; what it sums)."""
        with autocast(self.device, self.precision):
            loss, figure, count = self.objective(self.model, batch, from_features)
        # The mean over the whole batch (words or samples), on all processes together: DDP averages gradients
        # over processes, so each scales its sum by world / (all counts) and N processes equal one.
        loss = loss * (self.dist.world / self.dist.all_sum(count))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, foreach=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return figure, count

    def run(self, batches, desc="train", progress=None, stop=None):
        """One pass over a Batches, continuing `progress` if given: its first `progress.batches` batches are
        skipped. Ends early when `stop` is requested."""
        self.model.train(self.objective.dropout)
        progress = progress or Progress()
        bar = tqdm(batches.iterate(progress.batches), desc=desc, unit="batch", leave=False, disable=None,
                   initial=progress.batches, total=len(batches))
        start, pending = time.time(), []
        for batch in bar:
            figure, count = self.step(batch, batches.from_features)
            pending.append(figure)
            progress.batches += 1
            progress.count += count
            progress.captions += batch.captions.shape[0]
            if len(pending) == self.settle_every:
                _settle(progress, pending, bar, self.objective)
            # all processes must stop after the same step, or the others wait for its gradients forever
            if stop is not None and self.dist.all_sum(stop.requested):
                break
        _settle(progress, pending, bar, self.objective)
        progress.seconds += time.time() - start
        return progress


@dataclass
class Progress:
    """Running totals of one training pass; saved in a checkpoint taken mid-epoch, so that a resumed run skips
    the batches already done and reports the same figure for the epoch."""
    batches: int = 0
    total: float = 0.0  # the objective's figure, summed: the word loss, or with --scst the samples' CIDEr-D
    count: int = 0  # what `total` sums over: words, or sampled captions
    captions: int = 0
    seconds: float = 0.0

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


def _settle(progress, pending, bar, objective):
    """Add the figures still on the device to `progress`, read back at once: one wait for the device every few
    steps, not one per step, so that the CPU queues the next steps while the device computes."""
    if not pending:
        return
    total = torch.stack(pending).sum()
    _check_finite(total)
    pending.clear()
    progress.total += total.item()
    bar.set_postfix({objective.figure: f"{progress.mean:.3f}"})  # the epoch's running mean, as before


def _check_finite(loss):
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


# ------------------------------------------------------------------------------------------ end of epoch

def end_of_epoch(args, row, trainer, data, vocab, model, batches, logger):
    """Rank 0: dev loss and scores into the epoch's history row, the log line, TensorBoard.
    Returns the dev score that selects models."""
    objective = trainer.objective
    # the word loss on dev, with --scst too: the same figure before and after self-critical training; the
    # decoder in the precision it trains in
    row["dev_loss"] = dev_loss(model, batches["dev"], WordLoss(args.label_smoothing), batches["dev"].device,
                               trainer.precision)
    scores, generated = dev_scores(model, batches["score"], data, vocab, batches["dev"].device, args.max_len,
                                   trainer.precision)
    row.update({f"dev_{k}": v for k, v in scores.items()})
    log.info("epoch %d: %s %.3f, dev loss %.3f, dev BLEU-4 %.4f, dev CIDEr %.4f, %.0f captions/s, lr %.2g",
             row["epoch"], objective.figure, row[objective.history_key], row["dev_loss"], scores["Bleu_4"],
             scores["CIDEr"], row["captions_per_s"], row["lr"])
    logger.epoch(row["epoch"], {objective.tag: row[objective.history_key], "loss/dev": row["dev_loss"],
                                "bleu4/dev": scores["Bleu_4"], "cider/dev": scores["CIDEr"], "lr": row["lr"],
                                "speed/captions_per_s": row["captions_per_s"]}, generated)
    return scores[SELECT_METRICS[args.select_metric]]


@torch.no_grad()
def dev_loss(model, batches, objective, device, precision="auto"):
    """The word loss on dev, per word, teacher forced, with dropout off."""
    model.eval()
    totals, words = [], 0
    for batch in tqdm(batches, desc="dev loss", unit="batch", leave=False, disable=None):
        with autocast(device, precision):
            totals.append(objective(model, batch, batches.from_features)[1])
        words += batch.words
    return float(torch.stack(totals).sum()) / max(words, 1) if totals else 0.0


def dev_scores(model, batches, data, vocab, device, max_len, precision="auto"):
    """Greedy captions for the dev sample, scored with BLEU and CIDEr (Python tokenisation: fast, no Java)."""
    generated = caption_loader(model, batches, vocab, device, beam=1, max_len=max_len, desc="captioning dev",
                               precision=precision)
    scores = score_captions([data.captions[n] for n in generated], list(generated.values()), java=False,
                            metrics=("bleu", "cider"))
    return scores, generated


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


def cli(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        main(args)
    except (DataError, EncoderWeightsError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
