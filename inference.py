"""Caption photos with a trained checkpoint, on CPU or GPU.

    python inference.py photo.jpg [more.jpg folder/ ...] [--checkpoint checkpoints/best.pth.tar] [--json]

With no --checkpoint: your own training's checkpoints/best.pth.tar (or last.pth.tar), else the model that
ships with the code (checkpoints/pretrained/model.pth); the choice is said on stderr.

Prints one line per image: "NAME: caption". A folder captions every image in it. Images that cannot be
read are reported on stderr, one line each, and the exit status is 1; the others are still captioned.
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from image_intial_model import EncoderWeightsError
from image_loader import DataError, EvalTransform, list_images, load_image, load_vocab_file
from utils import (
    USER_CHECKPOINTS,
    HelpFormatter,
    checkpoint_paths,
    find_checkpoint,
    models_from_checkpoints,
    non_negative,
    pick_device,
    positive,
)


def get_args_parser():
    p = argparse.ArgumentParser(description="Caption images with a trained CNN + LSTM captioner.",
                                formatter_class=HelpFormatter)
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.add_argument("--checkpoint", nargs="+", help="checkpoint to use (default: the first of "
                   f"{', '.join(USER_CHECKPOINTS)}, else the model that ships in checkpoints/pretrained/); several: "
                   "their ensemble, each word chosen from the mean of their next-word probabilities")
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
    p.add_argument("--json", action="store_true", help="print one JSON list of {image, caption} / {image, error} "
                                                       "({image, caption, n_best: [...]} with --n-best)")
    return p


class Captioner:
    """A checkpoint ready to caption image files with the preprocessing it was trained with."""

    def __init__(self, checkpoint, device="cpu", vocab_path=None):
        """checkpoint: a path, or a list of paths for an ensemble of their models."""
        paths = checkpoint_paths(checkpoint)
        self.model, self.vocab, self.preset = models_from_checkpoints(paths, vocab_path)
        # a project checkpoint holds its vocabulary; a different --vocab beside it is a mistake to point out
        if vocab_path and load_vocab_file(vocab_path).itos != self.vocab.itos:
            raise DataError(f"{vocab_path} is not the vocabulary {paths[0]} was trained with (leave out --vocab: "
                            "the checkpoint holds its own)")
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.transform = EvalTransform(self.preset)

    def _image(self, path):
        return self.transform(load_image(path)).unsqueeze(0).to(self.device)

    @torch.no_grad()
    def caption(self, path, beam=3, max_len=40, length_penalty=0.0):
        ids = self.model.generate(self._image(path), max_len=max_len, beam=beam, length_penalty=length_penalty)[0]
        return self.vocab.decode(ids)

    def attention_map(self, path, beam=3, max_len=40, length_penalty=0.0):
        """(the caption, a PIL image of the attention for each of its words: see attention_png)."""
        return attention_map(self.model, self.vocab, self.transform, path, self.device, beam, max_len, length_penalty)

    def n_best(self, path, n, beam=3, max_len=40, length_penalty=0.0):
        """The n best captions, best first: [{"caption", "log_prob", "mean_word_prob"}, ...]; a caption's
        mean per-word probability is exp(log_prob / its words, EOS included)."""
        best = self.model.n_best(self._image(path), n, max_len, beam, length_penalty)[0]
        return [{"caption": self.vocab.decode(c["ids"]), "log_prob": round(c["log_prob"], 4),
                 "mean_word_prob": round(math.exp(c["log_prob"] / max(c["length"], 1)), 4)} for c in best]


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
    """Caption every image; returns the list of {"image", "caption"} or {"image", "error"} results."""
    if args.n_best and args.n_best > args.beam:
        raise DataError(f"--n-best {args.n_best} needs --beam {args.n_best} or more: a beam search of "
                        f"{args.beam} keeps {args.beam} captions")
    captioner = Captioner(args.checkpoint or find_checkpoint(None), pick_device(args.device), args.vocab)
    if args.attention_map and not captioner.model.args.attention:
        which = "not all these decoders have" if len(args.checkpoint or ()) > 1 else "this checkpoint's decoder has"
        print(f"no attention maps: {which} attention (trained without --attention)", file=sys.stderr)
        args.attention_map = None
    results = []
    for arg in args.images:
        paths = list_images(arg)
        if not paths:
            results.append({"image": arg, "error": f"{arg}: folder holds no images"})
        for path in paths:
            try:
                results.append(caption_one(captioner, path, args))
            except DataError as e:
                results.append({"image": str(path), "error": str(e)})
            if not args.json:
                print_result(results[-1])
    if args.json:
        print(json.dumps(results, indent=2))
    return results


def caption_one(captioner, path, args):
    search = (args.beam, args.max_len, args.length_penalty)
    best = captioner.n_best(path, args.n_best, *search) if args.n_best else None
    if args.attention_map:
        caption, sheet = captioner.attention_map(path, *search)
        out = Path(args.attention_map) / f"{Path(path).stem}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        sheet.save(out)
    else:
        caption = best[0]["caption"] if best else captioner.caption(path, *search)
    result = {"image": str(path), "caption": caption}
    if best:
        result["n_best"] = best
    if args.attention_map:
        result["attention_map"] = str(out)
    return result


def print_result(r):
    if "error" in r:
        print(f"error: {r['error']}", file=sys.stderr, flush=True)
    elif "n_best" not in r:
        print(f"{r['image']}: {r['caption']}", flush=True)
    else:
        print(f"{r['image']}:")
        for i, c in enumerate(r["n_best"], 1):
            print(f"  {i}. {c['caption']}  (log-probability {c['log_prob']:.2f}, mean word probability "
                  f"{c['mean_word_prob']:.2f})", flush=True)


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
