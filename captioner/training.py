"""Training, one epoch at a time: `train_one_epoch` (for each batch the model's scores for every next word, the loss,
backward() and the optimiser's step), the two losses it minimises (WordLoss, the cross-entropy of each next word;
SelfCritical, --scst's CIDEr-D reward), and what image_training.main builds for it (the optimiser, the learning-rate
schedule, the gradient scaler). The bookkeeping around the steps (a progress bar, resuming mid-epoch, torchrun's
processes, a stop on a signal) is in `Steps`, below, out of the loop's way.
"""

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from captioner.metrics import CiderD
from captioner.search import caption_log_probs, sample_captions
from captioner.training_run import Progress, check_finite, settle
from image_intial_model import PAD_IDX, SOS_IDX, trim_at_eos
from utils import Dist, autocast, autocast_dtype


def train_one_epoch(trainer, batches, progress, stop=None, desc="train"):
    """One pass over `batches` (a Batches): for each batch the model's scores for every next word, the loss,
    backward() and the optimiser's step. It goes on from `progress` (skipping the batches it counts as done) and
    adds to it; it ends early, after the step in flight, when `stop` is requested."""
    model, criterion, optimizer = trainer.model, trainer.objective, trainer.optimizer
    model.train(criterion.dropout)
    steps = Steps(trainer, batches, progress, stop, desc)
    for batch in steps:
        with autocast(trainer.device, trainer.precision):
            if isinstance(criterion, SelfCritical):  # --scst: it samples captions of its own and rewards them
                loss, figure, count = criterion(model, batch, batches.from_features)
            else:  # teacher forcing: the model reads SOS w1 .. wn and scores each next word w1 .. wn EOS
                tokens, targets = batch.captions[:, :-1], batch.captions[:, 1:]  # [N, T] each
                out = model(batch.x, tokens, batch.image_index, from_features=batches.from_features,
                            with_attention=criterion.attention_reg > 0)  # logits [N, T, V] (, attention [N, T, R])
                loss, figure = criterion(out, targets)  # WordLoss: the words' cross-entropy, summed
                count = batch.words
        loss = trainer.mean_over_processes(loss, count)
        optimizer.zero_grad(set_to_none=True)
        trainer.scaler.scale(loss).backward()
        trainer.clip_and_step()
        steps.done(figure, count, batch)
    return steps.finish()


class Steps:
    """The batches of train_one_epoch with its bookkeeping: a progress bar, the batches a resumed epoch has done
    skipped, the figure read back from the device every few steps (each read waits for it), and a stop, on a
    signal, after the same step on all processes."""

    def __init__(self, trainer, batches, progress, stop, desc):
        self.trainer, self.progress, self.stop, self.pending = trainer, progress, stop, []
        self.bar = tqdm(batches.iterate(progress.batches), desc=desc, unit="batch", leave=False, disable=None,
                        initial=progress.batches, total=len(batches))
        self.start = time.time()

    def __iter__(self):
        for batch in self.bar:
            yield batch
            if self.stop is not None and self.trainer.dist.all_sum(self.stop.requested):
                break

    def done(self, figure, count, batch):
        """A step taken: its figure (on the device, summed), what it sums over, and its batch."""
        self.pending.append(figure)
        self.progress.add_step(count, batch.captions.shape[0])
        if len(self.pending) == self.trainer.settle_every:
            settle(self.progress, self.pending, self.bar, self.trainer.objective)

    def finish(self):
        settle(self.progress, self.pending, self.bar, self.trainer.objective)
        self.progress.seconds += time.time() - self.start
        return self.progress


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


def make_scaler(device, precision):
    """The gradient scaler: fp16 needs its gradients scaled up, or small ones flush to zero; bf16 has fp32's range
    and needs none."""
    return torch.amp.GradScaler(device.type, enabled=autocast_dtype(device, precision) == torch.float16)


def make_objective(args, data, vocab, train_names):
    """The word loss, or with --scst self-critical training on the training images' references."""
    if not args.scst:
        return WordLoss(args.label_smoothing, args.attention_reg)
    names = set(train_names)
    return SelfCritical([it for it in data.items("train", vocab) if it[0] in names], args.scst_samples, args.max_len)


class WordLoss:
    """The word loss: the cross-entropy of each next word of the reference captions (teacher forcing)."""
    figure, history_key, tag = "train loss", "train_loss", "loss/train"  # how an epoch reports it
    dropout = True

    def __init__(self, label_smoothing=0.0, attention_reg=0.0):
        self.criterion = nn.CrossEntropyLoss(ignore_index=PAD_IDX, label_smoothing=label_smoothing, reduction="sum")
        self.attention_reg = attention_reg

    def __call__(self, out, targets):
        """The model's output (logits [N, T, V]; with attention_reg, (logits, attention weights [N, T, R])) and the
        words it should have scored highest, targets [N, T] -> (what to minimise, summed over the words; the
        figure to report, the cross-entropy alone, summed)."""
        logits, weights = out if self.attention_reg else (out, None)
        loss = self.criterion(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        if not self.attention_reg:
            return loss, loss.detach()
        # doubly stochastic attention (Xu et al. 2015, eq. 14): over a caption's words each region's weights
        # should sum to about 1, so that the decoder looks at every part of the image, not at a few regions
        seen = (weights.float() * (targets != PAD_IDX).unsqueeze(-1)).sum(1)  # [N, R]
        penalty = ((1 - seen) ** 2).sum()  # summed over captions, as the word loss is: each caption's loss is
        # its words' cross-entropy plus --attention-reg times its penalty, as in Xu et al.'s code
        return loss + self.attention_reg * penalty, loss.detach()


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
        check_finite(loss)  # here, not every few steps: a NaN here would make the next samples fail first
        return loss, reward.sum(), words.shape[0]


@dataclass
class Trainer:
    """What a training step needs: the model, `objective` (WordLoss or SelfCritical: what each batch minimises),
    the optimiser and the gradient scaler, and how to run (device, precision, processes)."""
    model: nn.Module
    objective: WordLoss
    device: torch.device
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    grad_clip: float = 0.0
    dist: Dist = field(default_factory=Dist)
    precision: str = "auto"
    settle_every: int = 25  # steps between reading the figure back from the device (each read waits for it)

    def mean_over_processes(self, loss, count):
        """The loss summed over a batch -> its mean over the whole batch (words or samples) of all processes
        together: DDP averages gradients over processes, so each scales its sum by world / (all counts) and N
        processes equal one."""
        return loss * (self.dist.world / self.dist.all_sum(count))

    def clip_and_step(self):
        """The optimiser's step, the gradients clipped to grad_clip first (unscaled: the scaler scaled them up)."""
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, foreach=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def run(self, batches, desc="train", progress=None, stop=None):
        """One pass over a Batches: train_one_epoch, from a new Progress unless one is given."""
        return train_one_epoch(self, batches, progress or Progress(), stop, desc)
