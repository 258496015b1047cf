"""Checkpoints (atomic save, safe load, model rebuild), device choice, precision and runtime settings (autocast,
CUDA graphs), torchrun, help text, and printed examples."""

import argparse
import contextlib
import os
import random
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from captioner.ensemble import Ensemble
from captioner.files import DataError, save_atomic
from captioner.search import generate
from image_intial_model import CNN_RNN, ModelArgs
from image_loader import Vocab, load_vocab_file


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default in its help, except where there is none to show (None, False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def positive(kind):
    """An argparse type: a number of `kind` (int, float) above 0, or one clear line."""
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def non_negative(text):
    """An argparse type: a float of at least 0, or one clear line."""
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


@dataclass
class Dist:
    """This process's place under torchrun (rank 0 of 1 without it). Rank 0 writes logs and checkpoints."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self):
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (filling caches, say); the others then run it (and read them)."""
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()

    def all_sum(self, value):
        """The sum of a number over all processes."""
        if self.world == 1:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return t.item()

    def from_main(self, value):
        """Rank 0's value of a number, on every process."""
        if self.world == 1:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64)
        torch.distributed.broadcast(t, 0)
        return t.item()


def init_distributed(device):
    """Join the process group when started by torchrun; returns (Dist, this process's device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        gpus, per_node = torch.cuda.device_count(), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if per_node > gpus:  # every process would fail on its own, some with a CUDA error
            raise DataError(f"torchrun started {per_node} processes on a node with {gpus} GPU(s): use "
                            f"--nproc_per_node={gpus}, or --device cpu")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    # NCCL reduces CUDA tensors only: the small counts that processes agree on go through gloo
    torch.distributed.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank), device


def pick_device(name="auto"):
    if name != "auto":
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise DataError(f"--device {name}: CUDA is not available on this machine")
        if name == "mps" and not torch.backends.mps.is_available():
            raise DataError("--device mps: MPS is not available on this machine")
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# ------------------------------------------------------------------------------- precision and runtime

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def cores():
    """CPU cores this process may use (a container's or taskset's limit, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def idle_cores():
    """The cores that the last minute's load average leaves free, at least 1: the threads for a short job on
    a CPU that other work may be using. Measured twice on 2 cores with two busy processes beside it, one
    caption with ONNX Runtime took 145 and 69 ms on 2 threads, 49 and 78 ms on 1 (31-42 ms idle): one thread
    is at worst 2x idle, two threads, which wait for each other at every operation, up to 4x."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores(), round(cores() - load)))


@contextlib.contextmanager
def torch_threads(n):
    """PyTorch's CPU threads set to n for a while, then as they were."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def set_cnn_layout(model, device, train_cnn):
    """The CNN's weights channels-last where that pays: on CUDA (tensor cores want NHWC), and on the CPU for a
    CNN that learns (oneDNN's NHWC kernels: a fine-tune step of EfficientNet-Lite1 with the attention decoder,
    16 images, took 1.49 s against 2.09 s, alternating, median of 3). A frozen CNN on the CPU keeps NCHW: it
    runs in ONNX Runtime, or in PyTorch on images that come NCHW."""
    cl = device.type == "cuda" or train_cnn
    model.encoderCNN.backbone.to(memory_format=torch.channels_last if cl else torch.contiguous_format)


def autocast_dtype(device, precision="auto"):
    """The dtype that autocast computes in, or None for full precision. auto: bf16 on CUDA cards that have
    it, fp16 on older ones, full precision elsewhere; bf16 runs on CPUs too, so CI takes the GPU's dtype paths."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device, precision="auto", cache_enabled=True):
    """Mixed precision on any device (see autocast_dtype)."""
    dtype = autocast_dtype(device, precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None, cache_enabled=cache_enabled)


def step_precision(device, precision, margs, from_features):
    """The precision of a training step: `precision`, except that auto on CUDA runs the attention decoder on
    cached features (no CNN in the step) in fp32, its matrix products on TF32 tensor cores (tune_for): they are
    small, and the casts to bf16 and back cost more than they save (a bare epoch, hidden 512, on an H100: 3.21 s
    against 3.96 s in bf16)."""
    if precision == "auto" and device.type == "cuda" and from_features and margs.attention:
        return "fp32"
    return precision


def tune_for(device):
    """Process-wide settings for speed on CUDA: cuDNN picks its fastest kernels for each input shape once, and
    fp32 matrix products run on TF32 tensor cores (a 10-bit mantissa, as cuDNN's convolutions have by default)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")


def cuda_graphed(fn, example):
    """fn, for inputs of `example`'s shape on a CUDA device, as the replay of one CUDA graph: a single launch
    where a CNN's forward is hundreds of small kernels, each of which costs the CPU more time to launch than
    the GPU takes to run it. For inference; fn must not read anything back to the CPU."""
    static = example.clone()
    side = torch.cuda.Stream(example.device)
    side.wait_stream(torch.cuda.current_stream(example.device))
    with torch.cuda.stream(side):  # outside the capture: cuDNN picks its kernels, the allocator its blocks
        for _ in range(2):
            fn(static)
    torch.cuda.current_stream(example.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(static)

    def replay(x):
        static.copy_(x)
        graph.replay()
        return out.clone()  # the next replay overwrites `out`

    return replay


# ---------------------------------------------------------------------------------------- checkpoints

def save_checkpoint(state, path):
    """Write atomically: a crash, even mid-write, leaves the last complete checkpoint loadable."""
    save_atomic(state, path)


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint without running any code from it (weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # zip/pickle errors or a refused global: the file is not a usable checkpoint
        raise DataError(f"cannot load checkpoint {path}: {str(e).splitlines()[0]}") from None


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# The model that ships with the code (README, "The model that ships"), found beside this file wherever the
# command runs; a user's own training writes to ./checkpoints (or --checkpoint-dir), never here.
SHIPPED_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "pretrained" / "model.pth"
USER_CHECKPOINTS = ("checkpoints/best.pth.tar", "checkpoints/last.pth.tar")


def find_checkpoint(path):
    """The checkpoint a command uses: `path` (or a list of paths: an ensemble's) if given, as given; else the
    user's own best (or last) in ./checkpoints; else the model that ships with the code. It says which on
    stderr, in one line, so that what a caption came from is never a guess."""
    if path:
        paths = checkpoint_paths(path)
        if all(p.is_file() for p in paths):  # else the error that loading it gives is the one line to print
            shipped = len(paths) == 1 and paths[0].resolve() == SHIPPED_CHECKPOINT
            named = "the model that ships with the code, " if shipped else ""
            print(f"using {named}{', '.join(map(str, paths))}", file=sys.stderr)
        return path if isinstance(path, (list, tuple)) else Path(path)
    for p in map(Path, USER_CHECKPOINTS):
        if p.is_file():
            print(f"using your checkpoint {p} (--checkpoint chooses another)", file=sys.stderr)
            return p
    if SHIPPED_CHECKPOINT.is_file():
        print(f"using the model that ships with the code, {SHIPPED_CHECKPOINT} (--checkpoint chooses another)",
              file=sys.stderr)
        return SHIPPED_CHECKPOINT
    raise DataError(f"no checkpoint given and none at {' or '.join(USER_CHECKPOINTS)} or {SHIPPED_CHECKPOINT}: "
                    "train first (python image_training.py --demo) or pass --checkpoint PATH")


def model_args_from(saved):
    """ModelArgs from a checkpoint's model_args. Older checkpoints (the shipped one too) name the decoder with two
    booleans, attention and topdown, instead."""
    saved = dict(saved)
    attention, topdown = saved.pop("attention", False), saved.pop("topdown", False)
    saved.setdefault("decoder", "topdown" if topdown else "attention" if attention else "plain")
    return ModelArgs(**{f.name: saved[f.name] for f in fields(ModelArgs) if f.name in saved})


def model_from_checkpoint(ckpt, vocab_path=None):
    """Rebuild (model, vocab, preprocessing preset) from a loaded checkpoint: this project's, or the seed
    tutorial's {"state_dict", ...} plus its vocabulary.pkl. A released checkpoint (export.py --format release)
    leaves out a frozen CNN's ImageNet weights, which come from the encoder's package instead (a fine-tuned CNN's
    are in the file); an ensemble's release holds its models as "members" and rebuilds as an Ensemble."""
    if "members" in ckpt:  # an ensemble's release: each member's args and weights, the rest shared
        shared = {k: v for k, v in ckpt.items() if k != "members"}
        built = [model_from_checkpoint({**shared, **member}) for member in ckpt["members"]]
        return Ensemble([m for m, _, _ in built]), built[0][1], built[0][2]
    if "model_args" not in ckpt:
        return model_from_seed_checkpoint(ckpt, vocab_path)
    args = model_args_from(ckpt["model_args"])
    imagenet = ckpt.get("encoder_weights") == "imagenet"
    model = CNN_RNN(args, weights="imagenet" if imagenet else None)
    state = ckpt["model"]
    if imagenet:
        state = {**{f"encoderCNN.backbone.{k}": v for k, v in model.encoderCNN.backbone.state_dict().items()}, **state}
    model.load_state_dict(state)  # strict: every tensor of the model, from the file or the package
    return model, Vocab(ckpt["vocab"]), ckpt["preprocessing"]


def checkpoint_paths(checkpoints):
    """A checkpoint's path, or a list of them (an ensemble), as a list of Paths."""
    return [Path(p) for p in (checkpoints if isinstance(checkpoints, (list, tuple)) else [checkpoints])]


def models_from_checkpoints(paths, vocab_path=None):
    """(model, vocab, preprocessing preset) from one checkpoint, or from several (a list of checkpoint_paths)
    the Ensemble of their models, which must share a vocabulary and a preprocessing. vocab_path: for
    seed-style checkpoints (default: the vocabulary.pkl beside each)."""
    paths = checkpoint_paths(paths)
    built = [model_from_checkpoint(load_checkpoint(p), vocab_path or Path(p).parent / "vocabulary.pkl")
             for p in paths]
    if len(built) == 1:
        return built[0]
    _, vocab, preset = built[0]
    models = [one for m, _, _ in built for one in (m.models if isinstance(m, Ensemble) else [m])]
    for path, (_, other_vocab, other_preset) in zip(paths[1:], built[1:]):
        if other_vocab.itos != vocab.itos:
            raise DataError(f"{path} has another vocabulary than {paths[0]}: an ensemble's models must share "
                            "theirs (train them on the same data with the same --min-freq)")
        if other_preset != preset:
            raise DataError(f"{path} preprocesses images otherwise than {paths[0]}: an ensemble's models must "
                            "take the same input (the same --encoder)")
    return Ensemble(models), vocab, preset


# The seed trained Inception-v3 on Resize(356) + RandomCrop(299) with mean = std = 0.5.
SEED_PREPROCESSING = {"resize": 356, "crop": 299, "mean": [0.5] * 3, "std": [0.5] * 3}


def model_from_seed_checkpoint(ckpt, vocab_path):
    if "state_dict" not in ckpt:
        raise DataError("not a captioner checkpoint: it has neither model_args nor state_dict")
    if vocab_path is None or not Path(vocab_path).is_file():
        raise DataError(f"a seed-style checkpoint needs its vocabulary.pkl (looked for {vocab_path}; "
                        "pass --vocab PATH)")
    vocab = load_vocab_file(vocab_path)
    state = {}
    for k, v in ckpt["state_dict"].items():
        if k.startswith("encoderCNN.inception.AuxLogits."):
            continue
        k = k.replace("encoderCNN.inception.fc.", "encoderCNN.fc.")
        state[k.replace("encoderCNN.inception.", "encoderCNN.backbone.")] = v
    vocab_size, embed = state["decoderRNN.embed.weight"].shape
    hidden = state["decoderRNN.lstm.weight_hh_l0"].shape[1]
    layers = sum(k.startswith("decoderRNN.lstm.weight_hh_l") for k in state)
    if vocab_size != len(vocab):
        raise DataError(f"{vocab_path} has {len(vocab)} words but the checkpoint was trained on {vocab_size}")
    args = ModelArgs(vocab_size=vocab_size, encoder="inception_v3", embed_size=embed, hidden_size=hidden,
                     num_layers=layers)
    model = CNN_RNN(args, weights=None)
    model.load_state_dict(state)
    return model, vocab, SEED_PREPROCESSING


def checkpoint_state(model, vocab, preset, **extra):
    """The plain-typed part of every checkpoint: enough to rebuild and run the model."""
    return {"model_args": asdict(model.args), "model": model.state_dict(), "vocab": list(vocab.itos),
            "preprocessing": preset, **extra}


@torch.no_grad()
def print_examples(model, batches, vocab, n=3):
    """Print generated vs first reference captions for the first n images of a Batches' first batch."""
    was_training = model.training
    model.eval()
    batch = next(iter(batches))
    for i, ids in enumerate(generate(model, batch.x[:n], from_features=batches.from_features)):
        reference = batch.captions[batch.image_index == i][0, 1:].tolist()
        print(f"{batch.names[i]}\n  generated: {vocab.decode(ids)}\n  reference: {vocab.decode(reference)}")
    model.train(was_training)


def text_languages(text):
    """--text-languages: read_text.parse_languages, its refusal as argparse's one line."""
    from captioner.read_text import parse_languages  # here: the commands without a text reader need not load it

    try:
        return parse_languages(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_search_flags(p):
    """The flags that choose how captions are searched for (captioner/search.py), the same in every command that
    captions photos."""
    p.add_argument("--beam", type=positive(int), default=3, help="beam width; 1 is greedy decoding")
    p.add_argument("--length-penalty", type=non_negative, default=0.0,
                   help="beam search: divide log-probabilities by length**this (0: none)")
    p.add_argument("--max-len", type=positive(int), default=40, help="longest caption, in words")
