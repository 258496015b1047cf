"""Write an export of a checkpoint (export.py --format onnx, torchscript or web): the model's two graphs, traced
(an image to the decoder's first state, and one decoder step), and captioner.json, with the files the rest of the
description needs (the confidence fit's bank of photos, the thing namer's classifier, the text reader's networks
and words), all written from the Python modules that own them; export.py's docstring lists the files. A web
export is that folder with its weights in fp16, made into a static site: the page of web/, its runtime and a
service worker. PyTorch is imported only to export: export.py --check imports this file without it.

    export("checkpoints/best.pth.tar", "onnx", "export/")   # prints each file's size; returns {name: bytes}
"""

import hashlib
import json
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]  # the project's folder: web/ and node_modules/ are in it
WEB = ROOT / "web"  # the page's own files, copied into every web export
# what the page loads of onnxruntime-web (npm, pinned in package.json): its WebAssembly backend alone
WEB_RUNTIME = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
# the CNN's first weights that stay fp32 (numbers): with 1.5M (of Lite1's 4.2M) the shipped model's 250 sample
# captions at beam 3 were all PyTorch's (with none: 245), for 20.5 MiB of graphs (fp32: 34.8 MiB)
FP32_FIRST = 1_500_000
# the same for the text reader's networks (read_text.MODELS): all fp16 (15.7 MiB; fp32: 30.3 MiB, which the folder
# has no room for). On 64 photos (real, generated and Flickr8k) the lines read changed on 3, each a line whose
# score sits at the keep threshold (one gained, one lost, one garbled either way); key words, words right and
# invented text on the real photos unchanged. The page and export.py --check read with these; inference.py reads
# with the wheel's own
TEXT_FP32_FIRST = {"det": 0, "cls": 0, "rec": 0}


class ExportError(Exception):
    """A problem the user can fix, reported as one line."""


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
    # encoder_pooled(_raw) / step_attention: the graphs' extra outputs, for the confidence signals, the photo
    # check and the thing named (older exports lack some); calibration: confidence.py's fit, its bank of
    # training photos in bank.f16; describe: the rules and fits of all the rest that is said (_describing)
    paths = checkpoint_paths(checkpoint)
    config = {"format": "onnx" if fmt == "web" else fmt, "vocab": vocab.itos, "preprocessing": preset,
              "state_batch_axes": encoder.state_axes, "never_say": list(NEVER_SAY), "specials": SPECIALS,
              "encoder": model.args.encoder, "attention": model.args.attention, "decoder": model.decoder_kind,
              "encoder_pooled": encoder.pooled, "encoder_pooled_raw": encoder.pooled, "step_attention": step.attention,
              **_calibration(paths, out, encoder.pooled), "describe": _describing(paths, model, out, encoder.pooled)}
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
    # the CNN's pooled feature [B, F], unit length (for the confidence and the photo check) and as it is (things)
    pooled = ["pooled", "pooled_raw"] if encoder.pooled else []
    attention = ["attention"] if step.attention else []  # the weights [B, R] the step looked at the regions with
    torch.onnx.export(encoder, (image,), out / "encoder.onnx", input_names=["image"], output_names=names + pooled,
                      dynamic_axes={"image": batch, **axes, **{n: batch for n in pooled}},
                      dynamo=False, opset_version=17)
    torch.onnx.export(step, (tokens, *state), out / "decoder_step.onnx", input_names=["tokens", *names],
                      output_names=["logits"] + [f"next_{n}" for n in names] + attention,
                      dynamic_axes={"tokens": batch, "logits": batch, **axes,
                                    **{f"next_{n}": a for n, a in axes.items()}, **{n: batch for n in attention}},
                      dynamo=False, opset_version=17)


def _graphs(model):
    """The two traceable pieces: image -> first decoder state, and one decoder step. An ensemble's nested
    state (a tuple per model) travels flat, as one list of tensors. A single model's encoder also gives the
    CNN's pooled feature (unit length: confidence.pooled_features), and an attention decoder's step the weights
    it looked at the regions with: what the confidence signals read. Each piece says what it gives: state_axes
    (the batch axis of each state tensor), pooled, attention."""
    from torch import nn

    from captioner.confidence import pooled_features, pooled_mean

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
            return (*decoder.start(model.encoderCNN.project(raw)), pooled_features(raw), pooled_mean(raw))

    class Step(nn.Module):
        attention = not ensemble and getattr(decoder, "regions", False)  # the decoders with attention over regions

        def __init__(self):
            super().__init__()
            self.decoder = decoder

        def forward(self, tokens, *state):
            if self.attention:
                h, state, weights = decoder.advance(decoder.embed(tokens), state)  # weights [B, R]
                return (decoder.linear(h), *state, weights)
            logits, state = self.decoder.step(tokens, nested(state))
            return (logits, *flat(state))

    return Encoder().eval(), Step().eval()


def _decoders(model):
    """The model's decoder, or an ensemble's decoders."""
    return list(getattr(model.decoderRNN, "members", [model.decoderRNN]))


def _calibration(paths, out, pooled):
    """captioner.json's "calibration": the checkpoint's confidence fit (confidence.Calibration) as plain numbers,
    with its bank of training photos' features written to out/bank.f16 (fp16, little-endian, [K, F]) (none for
    an ensemble, a checkpoint never calibrated, or graphs without the pooled feature)."""
    from captioner import confidence
    from captioner.describe import read_fits

    # the fit as inference.py reads it (a single checkpoint's), and its state: the plain dict it is kept as
    calibration = read_fits(paths)[0] if pooled else None
    if calibration is None:
        return {}
    state = calibration.state
    bank = state["bank"].half().numpy()
    bank.astype("<f2").tofile(out / "bank.f16")
    fit = {k: state[k] for k in ("signals", "mean", "std", "weights", "bias", "thresholds", "familiar_above")}
    bank = {"file": "bank.f16", "shape": list(bank.shape)}
    return {"calibration": {**fit, "bank": bank, "nearest": confidence.NEAREST}}


def _describing(paths, model, out, pooled):
    """captioner.json's "describe": what inference.py says besides the caption, as data that runner.py and
    web/ read, written here from the Python modules that own it (one source for each rule): description.py's
    wording, the photo check's fit and hints, the thing namer's groups and fit (its ImageNet classifier in
    out/things.f16), and the text reader's rules (its word list in out/words.txt, its three ONNX files beside)."""
    from captioner import description, photo_check, things
    from captioner.describe import read_fits

    _, checker, namer = read_fits(paths, model)
    rules = {"description": description.export_rules(), "photo_check": photo_check.export_rules(checker)}
    if namer is not None and pooled:
        rules["things"], weight = things.export_rules(namer)
        weight.astype("<f2").tofile(out / rules["things"]["classifier"]["file"])
    reader = _reader_files(out)
    if reader:
        rules["reader"] = reader
    return rules


def _reader_files(out):
    """The text reader's rules, with its three ONNX files (weights in fp16: TEXT_FP32_FIRST) and its word list
    copied into out; {} where the rapidocr wheel that carries the models is not installed (said on stderr)."""
    from captioner import read_text
    try:
        models = read_text.model_dir()
    except RuntimeError as e:
        print(f"the export will not read text: {e}", file=sys.stderr)
        return {}
    for kind, name in read_text.MODELS.items():
        shutil.copyfile(models / name, out / name)
        half_weights(out / name, TEXT_FP32_FIRST[kind])
    (out / "words.txt").write_text("\n".join(read_text.word_list()) + "\n")
    return {**read_text.export_rules(), "words": "words.txt"}


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


# ------------------------------------------------------------------------------------- the web page

def web_runtime_files():
    """The paths of WEB_RUNTIME in node_modules, or ExportError saying to run `npm ci`."""
    dist = ROOT / "node_modules" / "onnxruntime-web" / "dist"
    missing = [n for n in WEB_RUNTIME if not (dist / n).is_file()]
    if missing:
        raise ExportError(f"{dist / missing[0]} is missing: run `npm ci` (in {dist.parents[2]}) to install "
                          "onnxruntime-web, which the web page runs the model with")
    return [dist / n for n in WEB_RUNTIME]


def web_export(out, runtime):
    """Turn the ONNX export in `out` into a static site: the graphs' weights in fp16, the page (the files of
    web/, whose style.css serve.py's page shares), the runtime files, and a service worker that caches them all
    for use offline."""
    half_weights(out / "encoder.onnx", FP32_FIRST)
    half_weights(out / "decoder_step.onnx")
    for path in [*runtime, *(p for p in sorted(WEB.iterdir()) if p.is_file() and p.name != "sw.js")]:
        shutil.copyfile(path, out / path.name)
    with Image.open(WEB / "icon.png") as icon:
        icon.resize((192, 192), Image.Resampling.LANCZOS).save(out / "icon-192.png")
    files = sorted(p.name for p in out.iterdir() if p.is_file() and p.name != "sw.js")
    digest = hashlib.sha256()
    for name in files:
        digest.update(name.encode() + (out / name).read_bytes())
    # the worker's cache is named by the folder's content: a new export replaces the old cache on the next visit
    worker = (WEB / "sw.js").read_text().replace('"__VERSION__"', json.dumps(digest.hexdigest()[:16]))
    (out / "sw.js").write_text(worker.replace('["__FILES__"]', json.dumps(["./", *files])))
