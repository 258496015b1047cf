"""Caption photos with a trained checkpoint, on CPU or GPU.

    python inference.py photo.jpg [more.jpg folder/ ...] [--checkpoint checkpoints/best.pth.tar] [--json]
    python inference.py photos/ --alt-text [--write-metadata]

With no --checkpoint: your own training's checkpoints/best.pth.tar (or last.pth.tar), else the model that
ships with the code (checkpoints/pretrained/model.pth); the choice is said on stderr.

Prints one line per image: "NAME: description", what a person would hear (description.py): the text read in
the photo, the caption worded by how sure the model is (confidence.py), what is wrong with the photo and how to
take it again (photo_check.py); with --alt-text, "NAME: alt text", the same cut to fit an alt attribute; --json
gives every part. A folder captions every image in it. Images that cannot
be read (or written, with --write-metadata) are reported on stderr, one line each, and the exit status is 1;
the others are still captioned.
"""

import argparse
import json
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from captioner.backbones import EncoderWeightsError
from captioner.describe import Captioner
from captioner.files import DataError
from captioner.images import list_images
from captioner.read_text import LANGUAGES
from captioner.runtimes import RUNTIME_CHOICES, RUNTIME_HELP
from utils import (
    USER_CHECKPOINTS,
    HelpFormatter,
    add_search_flags,
    find_checkpoint,
    idle_cores,
    pick_device,
    positive,
    text_languages,
    torch_threads,
)


def get_args_parser():
    p = argparse.ArgumentParser(description="Caption images with a trained CNN + LSTM captioner.",
                                formatter_class=HelpFormatter)
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.add_argument("--checkpoint", action="append", help="checkpoint to use (default: the first of "
                   f"{', '.join(USER_CHECKPOINTS)}, else the model that ships in checkpoints/pretrained/); given "
                   "several times: their ensemble, each word chosen from the mean of their next-word probabilities")
    p.add_argument("--vocab", help="vocabulary.pkl, for seed-style checkpoints that do not hold their vocabulary "
                                   "(default: the one next to the checkpoint)")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    add_search_flags(p)
    p.add_argument("--n-best", type=positive(int), metavar="K",
                   help="the K best captions of the beam search (K <= --beam), best first, each with its "
                        "log-probability and mean per-word probability")
    p.add_argument("--attention-map", metavar="DIR",
                   help="attention models: write DIR/NAME.png per photo, the photo once per word, lit where the "
                        "decoder looked for that word")
    p.add_argument("--alt-text", action="store_true",
                   help="print NAME: alt text: the description cut to fit an HTML alt attribute (125 characters)")
    p.add_argument("--no-text", action="store_true", help="do not read the text in photos")
    p.add_argument("--text-languages", default="en", type=text_languages,
                   help=f"the languages of the text to read, comma-separated: {', '.join(LANGUAGES)} (what the "
                        "bundled text models read)")
    p.add_argument("--write-metadata", action="store_true",
                   help="write each photo's alt text into its XMP (Iptc4xmpCore:AltTextAccessibility), losslessly: "
                        "the image data is not re-encoded, and the file is replaced whole or not at all")
    p.add_argument("--batch-size", type=positive(int), default=8, help="photos captioned at once")
    p.add_argument("--runtime", choices=RUNTIME_CHOICES, default="auto", help=RUNTIME_HELP)
    p.add_argument("--cache-dir", default="cache", help="where the CNN's ONNX file is kept (shared with training)")
    p.add_argument("--threads", type=positive(int),
                   help="CPU threads (default: the cores the last minute's load average leaves free, so that "
                        "captioning beside other work slows down gracefully)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON list of {image, caption, alt_text, confidence, confidence_level, "
                        "description, text, thing, photo_problems, photo_scores, retake_hint, turned} or {image, "
                        "error} (n_best: [...] too with --n-best)")
    return p


def main(args):
    """Describe every image; returns the list of {"image", "caption", ...} or {"image", "error"} results."""
    if args.n_best and args.n_best > args.beam:
        raise DataError(f"--n-best {args.n_best} needs --beam {args.n_best} or more: a beam search of "
                        f"{args.beam} keeps {args.beam} captions")
    with torch_threads(args.threads or idle_cores()):  # set before the CNN's runtime takes as many
        return describe_all(args)


def describe_all(args):
    captioner = Captioner(find_checkpoint(args.checkpoint), pick_device(args.device), args.vocab,
                          args.runtime, args.cache_dir, not args.no_text, args.text_languages)
    if args.attention_map and not captioner.model.args.attention:
        which = "not all these decoders have" if len(args.checkpoint or ()) > 1 else "this checkpoint's decoder has"
        print(f"no attention maps: {which} attention (trained without --attention)", file=sys.stderr)
        args.attention_map = None
    if captioner.calibration is None:  # a caption said plainly could be a guess: the listener must know
        print("this model has no confidence calibration (evaluate.py --calibrate makes one): its captions are not "
              "hedged, however unsure", file=sys.stderr)
    results, paths = [], []
    for arg in args.images:
        found = list_images(arg)
        if not found:
            results.append({"image": arg, "error": f"{arg}: folder holds no images"})
            show(results[-1], args)
        paths += found
    with tqdm(total=len(paths), unit="photo", desc="captioning", disable=len(paths) <= PROGRESS_FROM,
              leave=False) as bar:
        for start in range(0, len(paths), args.batch_size):
            for r in describe_files(captioner, paths[start:start + args.batch_size], args):
                results.append(r)
                show(r, args, bar)
            bar.update(min(args.batch_size, len(paths) - start))
    if args.json:
        print(json.dumps(results, indent=2))
    return results


PROGRESS_FROM = 4  # photos: a progress bar (on stderr) for more than this many


def describe_files(captioner, paths, args):
    """Results for some photo files, described as one batch; those that cannot be read get an error each."""
    loaded, looks, results = [], [], {}
    for path in paths:
        try:
            image = captioner.load(path)
            looks.append(captioner.look(image))
            loaded.append((path, image))
        except DataError as e:
            results[path] = {"image": str(path), "error": str(e)}
    described = captioner.describe_batch([im for _, im in loaded], args.beam, args.max_len, args.length_penalty,
                                         args.n_best, looks) if loaded else []
    for (path, _), r in zip(loaded, described):
        results[path] = {"image": str(path), **r}
        try:
            if args.attention_map:
                results[path]["attention_map"] = write_attention_map(captioner, path, args)
            if args.write_metadata:
                write_alt_text(path, r["alt_text"])
        except DataError as e:
            results[path]["error"] = str(e)
    return [results[p] for p in paths]


def write_attention_map(captioner, path, args):
    sheet = captioner.attention_map(path, args.beam, args.max_len, args.length_penalty)[1]
    out = Path(args.attention_map) / f"{Path(path).stem}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return str(out)


ALT_TEXT_KEY = "Xmp.iptc.AltTextAccessibility"  # Iptc4xmpCore:AltTextAccessibility, IPTC's field for alt text


def write_alt_text(path, text):
    """Store `text` in the photo's XMP as its alt text, without re-encoding the image: exiv2 writes a copy in the
    same folder, which then replaces the original in one rename, so a crash leaves the photo as it was. Raises
    DataError (one line) for a read-only file or a format exiv2 cannot write."""
    import pyexiv2  # only this option needs it

    path = Path(path)
    if not path.stat().st_mode & stat.S_IWUSR:  # even for root, who may write anything: the owner said no
        raise DataError(f"{path}: read-only: alt text not written")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise DataError(f"{path}: cannot write beside it ({e.strerror}): alt text not written") from None
    try:
        with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
            shutil.copyfileobj(src, out)
        shutil.copymode(path, tmp)
        with pyexiv2.Image(tmp) as im:
            im.modify_xmp({ALT_TEXT_KEY: {'lang="x-default"': text}})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # exiv2 raises RuntimeError for formats it cannot write
        Path(tmp).unlink(missing_ok=True)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: alt text not written ({reason})") from None


def read_alt_text(path):
    """The alt text in a photo's XMP, or None."""
    import pyexiv2

    with pyexiv2.Image(str(path)) as im:
        value = im.read_xmp().get(ALT_TEXT_KEY)
    return value.get('lang="x-default"') if isinstance(value, dict) else value


def show(r, args, bar=None):
    """Print one result as it comes (not with --json, which prints them all at the end)."""
    write = bar.write if bar is not None and not bar.disable else print
    if args.json:
        return
    if "error" in r:
        write(f"error: {r['error']}", file=sys.stderr)
    elif "n_best" in r:
        write(f"{r['image']}:")
        for i, c in enumerate(r["n_best"], 1):
            write(f"  {i}. {c['caption']}  (log-probability {c['log_prob']:.2f}, mean word probability "
                  f"{c['mean_word_prob']:.2f})")
    else:
        write(f"{r['image']}: {r['alt_text'] if args.alt_text else r['description']}")
    sys.stdout.flush()


def cli(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        results = main(args)
    except (DataError, EncoderWeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `inference.py folder | head`: the reader left, which is no error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(cli())
