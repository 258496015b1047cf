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
import math
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from captioner.backbones import EncoderWeightsError
from captioner.confidence import Calibration, captions_with_signals, pooled_features
from captioner.description import answer, look_at
from captioner.photo_check import PhotoCheck
from captioner.read_text import LANGUAGES, TextReader, parse_languages
from captioner.runtimes import RUNTIME_CHOICES, RUNTIME_HELP, run_frozen
from captioner.things import Things, ThingsError
from image_loader import DataError, EvalTransform, list_images, load_image, load_vocab_file
from utils import (
    USER_CHECKPOINTS,
    HelpFormatter,
    checkpoint_paths,
    find_checkpoint,
    idle_cores,
    load_checkpoint,
    models_from_checkpoints,
    non_negative,
    pick_device,
    positive,
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
    p.add_argument("--beam", type=positive(int), default=3, help="beam width; 1 is greedy decoding")
    p.add_argument("--length-penalty", type=non_negative, default=0.0,
                   help="beam search: divide log-probabilities by length**this (0: none)")
    p.add_argument("--max-len", type=positive(int), default=40, help="longest caption, in words")
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


def text_languages(text):
    """--text-languages: read_text.parse_languages, its refusal as argparse's one line."""
    try:
        return parse_languages(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class Captioner:
    """A checkpoint ready to describe photos with the preprocessing it was trained with, and with its
    confidence calibration where it has one (evaluate.py --calibrate)."""

    def __init__(self, checkpoint, device="cpu", vocab_path=None, runtime="auto", cache_dir="cache",
                 read_text=True, text_languages=("en",)):
        """checkpoint: a path, or a list of paths for an ensemble of their models. runtime, cache_dir: what runs
        the CNN on the CPU (runtimes.run_frozen), and where its ONNX file is kept. read_text: read the text in
        photos (read_text.TextReader, in text_languages)."""
        paths = checkpoint_paths(checkpoint)
        self.model, self.vocab, self.preset = models_from_checkpoints(paths, vocab_path)
        # a project checkpoint holds its vocabulary; a different --vocab beside it is a mistake to point out
        if vocab_path and load_vocab_file(vocab_path).itos != self.vocab.itos:
            raise DataError(f"{vocab_path} is not the vocabulary {paths[0]} was trained with (leave out --vocab: "
                            "the checkpoint holds its own)")
        self.calibration, self.checker, self.things = read_fits(paths, self.model)
        self.reader = TextReader(text_languages, threads=torch.get_num_threads()) if read_text else None
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        # the model as the runtime runs it, which generates only from now on
        self.model, self.runtime = run_frozen(self.model, self.preset, runtime, cache_dir, self.device, decoder=True)
        self.transform = EvalTransform(self.preset)

    def load(self, path, name=None):
        """A photo (a path or a binary file object) as upright RGB, decoded in full: the caption, the photo check
        and the text reader all start from these pixels, as runner.py and the web page do (a JPEG decoded at a
        reduced scale is faster, but a browser cannot decode so, and the page's captions then differed)."""
        return load_image(path, name=name)

    def look(self, image):
        """description.Look of a loaded photo: the photo check's image measures, and its text where it has some."""
        return look_at(image, self.reader)

    def _batch(self, images):
        return torch.stack([self.transform(im) for im in images]).to(self.device)

    def caption(self, path, beam=3, max_len=40, length_penalty=0.0):
        """The caption alone, without describe's confidence signals (and their extra decoder pass)."""
        ids = self.model.generate(self._batch([self.load(path)]), max_len=max_len, beam=beam,
                                  length_penalty=length_penalty)
        return self.vocab.decode(ids[0])

    @torch.no_grad()
    def describe(self, images, beam=3, max_len=40, length_penalty=0.0, n_best=None, looks=None):
        """PIL images, captioned as one batch -> one dict each: caption, alt_text, confidence (the estimated
        probability that the caption is good; None without a calibration), confidence_level (high, medium,
        low, or None), description (what a person hears: description.combine), text, thing (what the photo
        shows, things.Things.assess: {"name", "score", "level"} or None), photo_problems, photo_scores, retake_hint,
        turned; with n_best=K, n_best: see n_best_entries. looks: each image's description.Look (default: looked
        at here, without reading text at a higher resolution)."""
        looks = looks if looks is not None else [self.look(im) for im in images]
        turns = [lk.turn for lk in looks]
        found = self._signals(images, turns, beam, max_len, length_penalty, n_best)
        # a photo on its side with no text to tell by: where the photo check's head is sure how to turn it, it is
        # turned and captioned again
        heads = [0 if t else self.checker.upright_turn(p) for t, p in zip(turns, pooled_features(found[3]))]
        again = [i for i, t in enumerate(heads) if t]
        if again:
            for i in again:
                turns[i] = heads[i]
            redone = self._signals([images[i] for i in again], [turns[i] for i in again], beam, max_len,
                                   length_penalty, n_best)
            found = _replace_rows(found, again, redone)
        return self._answers(found, looks, turns)

    def _signals(self, images, turns, beam, max_len, length_penalty, n_best):
        """captions_with_signals of the images, each turned clockwise by its turn (degrees) first."""
        upright = [im.transpose(TURNS[t]) if t else im for im, t in zip(images, turns)]
        return captions_with_signals(self.model, self._batch(upright), beam, max_len, length_penalty, n_best)

    def _answers(self, found, looks, turns):
        ids, best, decoder, pooled = found  # pooled [N, F]: the CNN's, as it gives them
        things = self.things.assess(pooled) if self.things else [None] * len(ids)
        unit = pooled_features(pooled)
        if self.calibration:
            confidence, levels, unfamiliar = self.calibration.assess(decoder, pooled)
            confidence = [round(c, 3) for c in confidence.tolist()]
        else:
            confidence, levels, unfamiliar = [None] * len(ids), [None] * len(ids), [False] * len(ids)
        out = []
        for i, words in enumerate(ids):
            caption = self.vocab.decode(words)
            out.append({"caption": caption, "confidence": confidence[i], "confidence_level": levels[i],
                        **answer(self.checker, looks[i], unit[i], caption, levels[i], bool(unfamiliar[i]),
                                 turns[i], things[i])})
            if best:
                out[-1]["n_best"] = self.n_best_entries(best[i])
        return out

    def n_best_entries(self, best):
        """A beam search's n best (n_best_search) as {"caption", "log_prob", "mean_word_prob"}, best first; a
        caption's mean per-word probability is exp(log_prob / its words, EOS included)."""
        return [{"caption": self.vocab.decode(c["ids"]), "log_prob": round(c["log_prob"], 4),
                 "mean_word_prob": round(math.exp(c["log_prob"] / max(c["length"], 1)), 4)} for c in best]

    def attention_map(self, path, beam=3, max_len=40, length_penalty=0.0):
        """(the caption, a PIL image of the attention for each of its words: see attention_png)."""
        return attention_map(self.model, self.vocab, self.transform, path, self.device, beam, max_len, length_penalty)


def _replace_rows(found, rows, redone):
    """captions_with_signals' results with the given rows replaced by those of `redone` (of those rows alone)."""
    ids, best, decoder, pooled = (list(found[0]), found[1] and list(found[1]), found[2].clone(), found[3].clone())
    for k, i in enumerate(rows):
        ids[i] = redone[0][k]
        if best:
            best[i] = redone[1][k]
        decoder[i], pooled[i] = redone[2][k], redone[3][k]
    return ids, best, decoder, pooled


# PIL's transposes that turn a photo clockwise by 90, 180 and 270 degrees (ROTATE_90 is anticlockwise)
TURNS = {90: Image.Transpose.ROTATE_270, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_90}


def read_fits(paths, model=None):
    """The fits made on dev for a single checkpoint, read from its file once (models_from_checkpoints keeps only
    the model): (its confidence Calibration, or None for an ensemble of several files or a checkpoint never
    calibrated; its PhotoCheck, the image measures alone where it has none; its Things, the head that names what
    the photo shows, or None where it has none, or one fitted on another CNN than `model`'s, said on stderr)."""
    state = load_checkpoint(paths[0]) if len(paths) == 1 else {}
    calibration = Calibration(state["calibration"]) if state.get("calibration") else None
    things = None
    if state.get("things"):
        try:
            things = Things(state["things"], model.encoderCNN.backbone if model is not None else None)
        except ThingsError as e:  # the captions are still good: say why no thing is named, and go on
            print(f"no thing will be named: {e}", file=sys.stderr)
    return calibration, PhotoCheck.from_checkpoint(state), things


PANEL, TITLE, COLUMNS = 224, 22, 5  # attention maps: each panel's side and title bar (pixels); panels a row


def attention_png(image, words, maps):
    """The photo once per word, dimmed except where the decoder looked when it chose that word, titled with the
    word, COLUMNS panels a row: a PIL image. maps [words, h, w], each map summing to 1, shown scaled to its
    own peak and upsampled smoothly over the photo."""
    photo = image.convert("RGB").resize((PANEL, PANEL), Image.Resampling.BILINEAR)
    dimmed = Image.blend(photo, Image.new("RGB", photo.size), 0.75)
    cols, rows = min(max(len(words), 1), COLUMNS), max(math.ceil(len(words) / COLUMNS), 1)
    sheet = Image.new("RGB", (cols * PANEL, rows * (PANEL + TITLE)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (word, m) in enumerate(zip(words, maps)):
        light = Image.fromarray((m / m.max() * 255).round().byte().numpy(), "L")
        x, y = (k % COLUMNS) * PANEL, (k // COLUMNS) * (PANEL + TITLE)
        sheet.paste(Image.composite(photo, dimmed, light.resize(photo.size, Image.Resampling.BICUBIC)), (x, y + TITLE))
        draw.text((x + 4, y + 4), word, fill="black")
    return sheet


@torch.no_grad()
def attention_map(model, vocab, transform, path, device, beam=3, max_len=40, length_penalty=0.0):
    """Caption the photo at `path` with an attention model: (the caption, attention_png of its words)."""
    image = load_image(path)
    x = transform(image).unsqueeze(0).to(device)
    ids = model.generate(x, max_len=max_len, beam=beam, length_penalty=length_penalty)[0]
    maps = model.attention_maps(x, [ids])[0]
    return vocab.decode(ids), attention_png(image, [vocab.itos[i] for i in ids], maps)


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
    described = captioner.describe([im for _, im in loaded], args.beam, args.max_len, args.length_penalty,
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
