"""Describe photos with a trained checkpoint: the class an app builds on.

    from captioner import Captioner
    captioner = Captioner("checkpoints/pretrained/model.pth")
    said = captioner.describe("photo.jpg")        # a path, the photo's bytes, or a PIL image
    print(said["description"])                   # what a person hears; said holds every part

A description is the caption worded by how sure the model is (confidence.py), the text read in the photo
(read_text.py), what the photo shows (things.py) and what is wrong with it (photo_check.py), put together by
description.py. inference.py and serve.py are this class behind a command line and a web service.
"""

import io
import math
import sys

import torch
from PIL import Image

from captioner.attention_maps import attention_map
from captioner.confidence import Calibration, captions_with_signals, pooled_features
from captioner.description import answer, look_at
from captioner.files import DataError
from captioner.images import turned
from captioner.photo_check import PhotoCheck
from captioner.read_text import TextReader
from captioner.runtimes import run_frozen
from captioner.search import generate
from captioner.things import Things, ThingsError
from image_loader import EvalTransform, load_image, load_vocab_file
from utils import checkpoint_paths, load_checkpoint, models_from_checkpoints


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
        ids = generate(self.model, self._batch([self.load(path)]), max_len=max_len, beam=beam,
                                  length_penalty=length_penalty)
        return self.vocab.decode(ids[0])

    def describe(self, photo, beam=3, max_len=40, length_penalty=0.0, n_best=None):
        """One photo (a path, its bytes, a binary file object or a PIL image) -> describe_batch's dict for it,
        its text read in full. A photo that cannot be read raises captioner.files.DataError."""
        if isinstance(photo, (bytes, bytearray)):
            photo = io.BytesIO(photo)
        image = photo if isinstance(photo, Image.Image) else self.load(photo)
        return self.describe_batch([image], beam, max_len, length_penalty, n_best, [self.look(image)])[0]

    @torch.no_grad()
    def describe_batch(self, images, beam=3, max_len=40, length_penalty=0.0, n_best=None, looks=None):
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
        upright = [turned(im, t) for im, t in zip(images, turns)]
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
