"""Train the captioner on Flickr8k.

    python image_training.py --data DIR                      # Inception-v3 + LSTM, the documented default
    python image_training.py --demo                          # 1-2 minutes on a CPU, on the bundled sample
    python image_training.py --recipe shipped-word --data DIR   # the shipped model's first stage (captioner/recipes.py)
    python image_training.py --data DIR --resume checkpoints/last.pth.tar

main(args) reads top to bottom: data -> vocabulary -> model -> optimiser -> resume -> for each epoch:
train_one_epoch (captioner/training.py: the model's call, the loss, backward(), the optimiser's step), evaluate on
dev, save. With a frozen CNN (the default) each image's CNN feature is computed once and cached on disk, and the
decoder trains from the cache. What a run needs besides its loop (the batches and their caches, resuming mid-epoch,
signals, torchrun, checkpoints and TensorBoard logs) is in captioner/training_run.py.
"""

import argparse
import logging
import os
import random
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from captioner.backbones import ENCODERS, EncoderWeightsError, preprocessing
from captioner.batches import default_workers
from captioner.files import DataError
from captioner.metrics import caption_loader, score_captions
from captioner.recipes import RECIPES, describe
from captioner.runtimes import RUNTIME_CHOICES, RUNTIME_HELP
from captioner.training import (
    Trainer,
    WordLoss,
    make_objective,
    make_optimizer,
    make_scaler,
    make_schedule,
    train_one_epoch,
)
from captioner.training_run import Progress, RunOutput, StopFlag, finish, make_batches, resume
from image_intial_model import CNN_RNN, DECODERS, ModelArgs
from image_loader import Flickr8k
from utils import (
    PRECISIONS,
    SHIPPED_CHECKPOINT,
    HelpFormatter,
    autocast,
    init_distributed,
    load_checkpoint,
    model_from_checkpoint,
    non_negative,
    pick_device,
    positive,
    set_cnn_layout,
    step_precision,
    tune_for,
)

log = logging.getLogger("captioner")
SELECT_METRICS = {"cider": "CIDEr", "bleu4": "Bleu_4"}


def get_args_parser(add_help=True):
    p = argparse.ArgumentParser(description="Train the CNN + LSTM image captioner on Flickr8k.", add_help=add_help,
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", help="Flickr8k folder: Images/ + captions.txt (Kaggle) or Flicker8k_Dataset/ + "
                                  "Flickr8k.token.txt (original); official split files are used when present")
    g.add_argument("--demo", action="store_true", help="the same as --recipe demo: " + describe("demo"))
    g.add_argument("--recipe", choices=list(RECIPES),
                   help="take a named recipe's flags as defaults (flags given still win; see recipes.py): demo, a "
                        "quick run on the bundled sample; shipped-word, shipped-scst, shipped-scst-cnn, the three "
                        "stages that trained the shipped model, in that order")
    g.add_argument("--min-freq", type=positive(int), default=5, help="keep words seen this often in training captions")
    g.add_argument("--max-images", type=positive(int), help="smoke test: use only about this many images")
    g.add_argument("--workers", type=positive(int),
                   help="loader worker processes (default: the cores this process may use, shared by torchrun's "
                        "processes, at most 16)")
    g.add_argument("--no-cache", action="store_true",
                   help="run the frozen CNN on every batch (from the image store) instead of caching its features")
    g.add_argument("--cache-dir", default="cache",
                   help="where cached CNN features and image stores (images resized once) are kept")
    g.add_argument("--runtime", choices=RUNTIME_CHOICES, default="auto", help=RUNTIME_HELP)
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
    g.add_argument("--save-every", type=int, default=5,
                   help="keep checkpoint_epoch_N every N epochs (0: keep best and last only)")
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
    g.add_argument("--decoder", choices=DECODERS, help="; ".join(
        f"{name}{' (the default)' if name == 'plain' else ''}: {cls.help}" for name, cls in DECODERS.items()))
    g.add_argument("--attention", action="store_true", help="the same as --decoder attention")
    g.add_argument("--attention-dim", type=positive(int), default=256,
                   help=f"size of the attention layer (--decoder {' or '.join(attending_decoders())})")


def parse_args(argv=None):
    """The command line, with --demo's defaults where --demo is given; a wrong flag ends it with one line (exit
    2). Fills in the loader's workers."""
    parser = get_args_parser()
    known = parser.parse_known_args(argv)[0]
    recipe = "demo" if known.demo else known.recipe
    if recipe:
        parser.set_defaults(**RECIPES[recipe])
    args = parser.parse_args(argv)
    problem = flag_problem(args)
    if problem:
        parser.error(problem)
    args.decoder = chosen_decoder(args)  # so that the checkpoint's train_args name it
    args.workers = args.workers or default_workers(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return args


def attending_decoders():
    """The names of the decoders that attend over the CNN's regions (DECODERS), as flags' help and errors name them."""
    return [name for name, cls in DECODERS.items() if cls.regions]


def chosen_decoder(args):
    """The decoder the flags ask for, one of DECODERS: --decoder, or --attention (its old spelling)."""
    return args.decoder or ("attention" if args.attention else "plain")


def flag_problem(args):
    """What is wrong with these flags together that the parser cannot see, in one line; None if nothing."""
    decoder = chosen_decoder(args)
    problems = [
        (args.lr_decay > 1, f"--lr-decay must be in (0, 1], got {args.lr_decay}"),
        (args.save_every < 0, f"--save-every must be 0 (never) or more, got {args.save_every}"),
        (args.demo and args.recipe not in (None, "demo"), f"--demo is --recipe demo, not --recipe {args.recipe}"),
        (not args.data, "say where Flickr8k is with --data DIR, or try --demo"),
        (args.attention and decoder != "attention",
         f"--attention means --decoder attention, not --decoder {decoder}: give one of them"),
        (DECODERS[decoder].layers is not None and args.num_layers > 1,  # a decoder whose LSTMs have one layer
         f"the {decoder} decoder {DECODERS[decoder].layers}: drop --num-layers"
         + (" or --attention" if decoder == "attention" else "")),
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
    data = Flickr8k.load(args.data, seed=args.seed, max_images=args.max_images)
    ckpt = checkpoint_to_resume(args)
    vocab, model, preset = build_model(args, data, ckpt, device)
    batches = make_batches(args, data, vocab, model, preset, device, dist)
    train = batches["train"]
    precision = step_precision(device, args.precision, model.args, train.from_features)
    optimizer = make_optimizer(args, model)
    schedule, scaler = make_schedule(args, optimizer), make_scaler(device, precision)
    state = resume(ckpt, optimizer, schedule, scaler)  # where training stands: new, or where --resume left it
    trainer = Trainer(model if dist.world == 1 else nn.parallel.DistributedDataParallel(model),
                      make_objective(args, data, vocab, train.names), device, optimizer, scaler, args.grad_clip, dist,
                      precision)
    out = RunOutput.open(args, data, vocab, model, preset, trainer, schedule, state) if dist.main else None
    first, stop = len(state.history), StopFlag()
    log.info("training %d images (%d captions) on %s%s, %s, epochs %d..%d", len(train.names),
             len(train.captions.lengths), device, f" x {dist.world} processes" if dist.world > 1 else "",
             "from cached features" if train.transform is None else "through the CNN", state.epoch + 1, args.epochs)
    with stop.installed():
        for epoch in range(state.epoch + 1, args.epochs + 1):
            train.sampler.generator.manual_seed(args.seed * 100003 + epoch)  # the order: seed and epoch alone
            progress = Progress.from_dict(state.progress or {})  # a resumed epoch goes on where it stopped
            done_before = progress.batches
            train_one_epoch(trainer, train, progress, stop, f"epoch {epoch}/{args.epochs}")
            state.step += progress.batches - done_before
            if progress.batches < len(train):  # stopped mid-epoch: keep the place, not the epoch
                state.progress = asdict(progress)
                if out:
                    out.keep_place(epoch)
                break
            state.epoch, state.progress = epoch, None
            score = dist.from_main(evaluate(trainer, batches, data, vocab, args, epoch, progress, out))
            schedule.step(score)  # on every process, so that all keep the same learning rate
            if score > state.best_score:
                state.best_score, state.best_epoch = score, epoch
            if out:
                out.save_epoch(epoch)
            if stop.requested or stops_early(args, state, epoch):
                break
    finish(out, dist, batches["score"] if len(state.history) > first and not stop.requested else None)
    return {"history": state.history[first:], "best_score": state.best_score,
            "checkpoint_dir": Path(args.checkpoint_dir), "stopped": stop.requested}


def evaluate(trainer, batches, data, vocab, args, epoch, progress, out):
    """The epoch's figure over all processes; rank 0 scores dev (the word loss, greedy captions' BLEU and CIDEr),
    logs the epoch and adds its history row. Returns the dev score that selects models (elsewhere 0: rank 0's is
    broadcast)."""
    dist, objective = trainer.dist, trainer.objective
    figure = dist.all_sum(progress.total) / max(dist.all_sum(progress.count), 1)  # all processes' mean
    if not dist.main:
        return 0.0
    model, device = out.model, batches["dev"].device
    row = {"epoch": epoch, objective.history_key: figure, "lr": trainer.optimizer.param_groups[0]["lr"],
           "captions_per_s": progress.captions_per_s * dist.world}
    # the word loss on dev, with --scst too: the same figure before and after self-critical training; the
    # decoder in the precision it trains in
    row["dev_loss"] = dev_loss(model, batches["dev"], WordLoss(args.label_smoothing), device, trainer.precision)
    scores, generated = dev_scores(model, batches["score"], data, vocab, device, args.max_len, trainer.precision)
    row.update({f"dev_{k}": v for k, v in scores.items()})
    log.info("epoch %d: %s %.3f, dev loss %.3f, dev BLEU-4 %.4f, dev CIDEr %.4f, %.0f captions/s, lr %.2g",
             row["epoch"], objective.figure, row[objective.history_key], row["dev_loss"], scores["Bleu_4"],
             scores["CIDEr"], row["captions_per_s"], row["lr"])
    out.logger.epoch(row["epoch"], {objective.tag: row[objective.history_key], "loss/dev": row["dev_loss"],
                                    "bleu4/dev": scores["Bleu_4"], "cider/dev": scores["CIDEr"], "lr": row["lr"],
                                    "speed/captions_per_s": row["captions_per_s"]}, generated)
    out.state.history.append(row)
    return scores[SELECT_METRICS[args.select_metric]]


def stops_early(args, state, epoch):
    """--early-stop: whether this many epochs have gone by without a better dev score."""
    if args.early_stop and epoch - state.best_epoch >= args.early_stop:
        log.info("stopping early: no better dev %s for %d epochs (best %.4f at epoch %d)", args.select_metric,
                 args.early_stop, state.best_score, state.best_epoch)
        return True
    return False


@torch.no_grad()
def dev_loss(model, batches, criterion, device, precision="auto"):
    """The word loss (criterion, a WordLoss) on dev, per word, teacher forced, with dropout off."""
    model.eval()
    totals, words = [], 0
    for batch in tqdm(batches, desc="dev loss", unit="batch", leave=False, disable=None):
        with autocast(device, precision):
            tokens, targets = batch.captions[:, :-1], batch.captions[:, 1:]  # [N, T] each
            logits = model(batch.x, tokens, batch.image_index, from_features=batches.from_features)  # [N, T, V]
            totals.append(criterion(logits, targets)[1])
        words += batch.words
    return float(torch.stack(totals).sum()) / max(words, 1) if totals else 0.0


def dev_scores(model, batches, data, vocab, device, max_len, precision="auto"):
    """Greedy captions for the dev sample, scored with BLEU and CIDEr (Python tokenisation: fast, no Java)."""
    generated = caption_loader(model, batches, vocab, device, beam=1, max_len=max_len, desc="captioning dev",
                               precision=precision)
    scores = score_captions([data.captions[n] for n in generated], list(generated.values()), java=False,
                            metrics=("bleu", "cider"))
    return scores, generated


# ------------------------------------------------------------------------------------ what main builds

def checkpoint_to_resume(args):
    """--resume's checkpoint (None without --resume), checked: it holds a training state, and it was trained with
    this run's objective."""
    if not args.resume:
        return None
    ckpt = load_checkpoint(args.resume)
    if "optimizer" not in ckpt:
        raise DataError(f"{args.resume} holds no training state to resume from")
    was_scst = bool(ckpt.get("train_args", {}).get("scst", False))
    if was_scst != args.scst:  # a run goes on with the objective it started with
        usage_error(f"{args.resume} was trained {'with' if was_scst else 'without'} --scst: resume it the same way")
    return ckpt


def build_model(args, data, ckpt, device):
    """(vocabulary, model, preprocessing preset): new from the flags (the vocabulary from the training
    captions), or --resume's or --init-from's."""
    if ckpt is not None:
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
                          attention_dim=args.attention_dim, decoder=chosen_decoder(args))
        weights = "random" if args.no_pretrained else (args.encoder_weights or "imagenet")
        model = CNN_RNN(margs, weights=weights)
        preset = preprocessing(args.encoder)
    if args.attention_reg and not model.args.attention:
        usage_error("--attention-reg regularises an attention decoder's weights: add --decoder "
                    + " or --decoder ".join(attending_decoders()))
    model.encoderCNN.set_train_cnn(args.train_cnn)
    log.info("vocabulary: %d words (min frequency %d, training captions only)", len(vocab), args.min_freq)
    model.to(device)
    set_cnn_layout(model, device, args.train_cnn)
    return vocab, model, preset



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
