"""Describe photos with an export (export.py), without PyTorch: ONNX Runtime, Pillow and NumPy only.

    runner = Runner("site/")                 # a folder that export.py wrote: captioner.json and the graphs
    runner.describe("photo.jpg")             # what inference.py says of the photo, as one dict
    check("site/", ["photo.jpg", "photos/"], beam=3)   # export.py --check: a row per image, timed

It does what describe.Captioner does, step for step, with the same code where that code needs no PyTorch:
the photo decoded upright and in full (images.read_photo, as image_loader.load_image); the photo check's measures
and the text read (description.look_at, with the text models of the export's folder); the caption (greedy or beam
search over the two graphs) on the photo turned upright where its text or the photo check's upright head says how;
its confidence; the thing named from the CNN's pooled feature (things.py); and description.answer's wording. Every
fit, threshold and word of wording comes from captioner.json, written from the Python modules at export:
web/captioner.js reads the same file, so the page, this runner and inference.py say the same of a photo. An export
from before the describing parts (no "describe" in its captioner.json) still captions, and says what it can.
"""

import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from captioner.description import alt_text, answer, look_at
from captioner.images import UnreadableImage, list_images, read_photo, turned
from captioner.photo_check import PhotoCheck
from captioner.read_text import TextReader
from captioner.things import Things

# ------------------------------------------------------------------------------------------- the photo

def to_input(image, preset):
    """The evaluation preset in NumPy, as EvalTransform: a PIL RGB image resized to a square (Pillow's
    bilinear), centre-cropped, scaled to [0, 1] and normalised -> float32 [1, 3, S, S]."""
    im = image.resize((preset["resize"],) * 2, Image.Resampling.BILINEAR)
    crop, size = preset["crop"], preset["resize"]
    top = left = int(round((size - crop) / 2.0))
    x = np.asarray(im, dtype=np.float32)[top:top + crop, left:left + crop] / 255.0  # [S, S, 3]
    x = (x - np.array(preset["mean"], dtype=np.float32)) / np.array(preset["std"], dtype=np.float32)
    return x.transpose(2, 0, 1)[None]  # [S, S, 3] -> [1, 3, S, S]


def preprocess(path, preset):
    """A photo file as the encoder's input [1, 3, S, S] (read_photo, then to_input)."""
    return to_input(read_photo(path), preset)


# ------------------------------------------------------------------------------------------- the runner

class Runner:
    """An export's graphs in ONNX Runtime (or TorchScript, for a .pt export), and the fits and rules of its
    captioner.json: describe() says what describe.Captioner.describe says of a photo."""

    def __init__(self, folder, read_text=True):
        """folder: what export.py wrote; read_text: read the text in photos (with the export's text models)."""
        folder = Path(folder)
        self.config = json.loads((folder / "captioner.json").read_text())
        self.axes = self.config["state_batch_axes"]
        # the vocabulary's special words, as the export names them (exports before this key: the same four)
        self.specials = self.config.get("specials", ["<PAD>", "<SOS>", "<EOS>", "<UNK>"])
        self.sos, self.eos = self.specials.index("<SOS>"), self.specials.index("<EOS>")
        self.calibration = self.config.get("calibration")
        if self.calibration:  # the unit features [K, F] of the training photos that familiarity is measured against
            self.bank = _halves(folder, self.calibration["bank"])
        self.encoder, self.step_session = _sessions(folder, self.config["format"])
        self._describing_parts(folder, self.config.get("describe", {}), read_text)

    def _describing_parts(self, folder, rules, read_text):
        """The photo check (the image measures alone where the export has no fit), the thing namer and the text
        reader, from captioner.json's "describe" (exports without it: the check's image measures only)."""
        self.checker = PhotoCheck(rules.get("photo_check"))
        things = rules.get("things")
        self.things = Things.from_rules(things, _halves(folder, things["classifier"])) if things else None
        self.reader = TextReader(folder=folder) if read_text and "reader" in rules else None

    def start(self, image):
        """image [1, 3, S, S] -> (the decoder's first state; the CNN's pooled feature [F], unit length, and as
        it is [F], each None where the export lacks it)."""
        if self.config["format"] == "onnx":
            out = self.encoder.run(None, {"image": image})
        else:
            import torch

            with torch.no_grad():
                out = [t.numpy() for t in self.encoder(torch.from_numpy(image))]
        state, extra = out[:len(self.axes)], out[len(self.axes):]
        unit = extra[0][0] if self.config.get("encoder_pooled") else None  # [1, F] -> [F]
        raw = extra[1][0] if self.config.get("encoder_pooled_raw") else None
        return state, unit, raw

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
        """The caption alone of a photo file, without the describing parts (nor its confidence pass)."""
        state, _, _ = self.start(preprocess(path, self.config["preprocessing"]))
        return self.words(self._search(state, beam, max_len, length_penalty))

    def words(self, ids):
        return " ".join(self.config["vocab"][i] for i in ids if i >= len(self.specials))

    def _search(self, state, beam, max_len, length_penalty):
        return self._greedy(state, max_len) if beam == 1 else self._beam(state, max_len, beam, length_penalty)

    def describe(self, path, beam=3, max_len=40, length_penalty=0.0):
        """What describe.Captioner.describe says of a photo file: {"caption", "confidence", "confidence_level",
        and description.answer's "alt_text", "description", "text", "thing", "photo_problems", "photo_scores",
        "retake_hint", "turned"}. Raises UnreadableImage for a file it cannot read."""
        image = read_photo(path)
        look = look_at(image, self.reader)
        turn = look.turn  # the text's upright turn, else (below) the photo check's where it is sure
        found = self._caption(turned(image, turn), beam, max_len, length_penalty)
        head_turn = 0 if turn else self.checker.upright_turn(found["unit"])
        if head_turn:  # a photo on its side with no text to tell by: turned where the check is sure, captioned again
            turn = head_turn
            found = self._caption(turned(image, turn), beam, max_len, length_penalty)
        thing = self.things.assess(found["raw"][None])[0] if self.things and found["raw"] is not None else None
        said = answer(self.checker, look, found["unit"], found["caption"], found["confidence_level"],
                      found["unfamiliar"], turn, thing)
        if "describe" not in self.config:  # an older export: its answer says only what it always said
            said = {"alt_text": self._alt_text(found)}
        return {"caption": found["caption"], "confidence": found["confidence"],
                "confidence_level": found["confidence_level"], **said}

    def _caption(self, image, beam, max_len, length_penalty):
        """The caption of an upright PIL image, its confidence and its pooled features, as a dict."""
        state, unit, raw = self.start(to_input(image, self.config["preprocessing"]))
        ids = self._search(state, beam, max_len, length_penalty)
        found = {"caption": self.words(ids), "confidence": None, "confidence_level": None, "unfamiliar": False,
                 "unit": unit, "raw": raw}
        if self.calibration:
            confidence, found["unfamiliar"] = self.assess(self.signals(state, ids), unit)
            found["confidence_level"] = self.level(confidence)
            found["confidence"] = round(confidence, 3)
        return found

    def _alt_text(self, found):
        return alt_text(found["caption"], found["confidence_level"], found["unfamiliar"])

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


def _halves(folder, spec):
    """An fp16 little-endian array file of the export ({"file", "shape"}) -> float32 [shape]."""
    return np.fromfile(Path(folder) / spec["file"], dtype="<f2").reshape(spec["shape"]).astype(np.float32)


def _sessions(folder, fmt):
    """The encoder and the decoder step: ONNX Runtime sessions, or TorchScript modules for a .pt export."""
    if fmt == "onnx":
        import onnxruntime as ort

        return (ort.InferenceSession(str(folder / name), ort.SessionOptions(), ["CPUExecutionProvider"])
                for name in ("encoder.onnx", "decoder_step.onnx"))
    import torch

    return (torch.jit.load(str(folder / name)) for name in ("encoder.pt", "decoder_step.pt"))


def timed_caption(caption, path, repeat=3):
    """(caption, median seconds over `repeat` runs after a warm-up run) for one image file."""
    text, times = caption(path), []
    for _ in range(repeat):
        start = time.perf_counter()
        caption(path)
        times.append(time.perf_counter() - start)
    return text, sorted(times)[len(times) // 2]


# ------------------------------------------------------------------------------------------- export.py --check

def check(folder, images, beam, compare=None, read_text=True):
    """Describe with the export each image path, and each image in a folder, of `images`, as inference.py does:
    a row {"image", "caption", "confidence", "confidence_level", "description", "alt_text", "text", "thing",
    "photo_problems", "photo_scores", "retake_hint", "turned", "export_s"} per image (Runner.describe),
    or {"image", "error"} for one that cannot be read (and for a folder with no images), the others still
    described. export_s: the time to the caption alone (Runner.caption: file to text: reading, preprocessing,
    encoder, caption loop; see timed_caption). With `compare`, also caption with the PyTorch checkpoint, timed
    the same way (Captioner.caption, the one use of PyTorch here): "pytorch_caption", "pytorch_s". read_text: read
    the text in photos."""
    from pillow_heif import register_heif_opener

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
