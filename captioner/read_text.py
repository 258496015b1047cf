"""Read the text in a photo, offline: find text lines, read the confident ones aloud-ready (in reading order, in the
photo's upright frame), and tell how the photo must be turned to stand upright.

It runs PaddleOCR's PP-OCRv6 text detector and recogniser and its direction classifier, the ONNX files that the
`rapidocr` wheel carries, on ONNX Runtime (nothing is downloaded). The steps around the networks are the project's
own, not the library's, so that another runtime can repeat them (web/read_text.js, the offline page): the
geometry and pixel operations are text_geometry.py's (the detector's probability map becomes boxes, each box is
cut out and laid flat, the resizes, the reading order), and this file turns each crop to read left to right and
decodes the recogniser's output (`ctc_decode`). Lines that are junk (too few letters, a low recogniser score, words
no English reader would know) are dropped: a wrong word said with assurance is worse than none. Whether text is
there but too blurry to read is not told: PP-OCRv6's detector sees blurred print as one blob, much as it sees a
wall (RESULTS.md).

    reader = TextReader(threads=2)
    look = reader.first_look(rgb)              # cheap: is there text worth reading?
    if look.passes:
        result = reader.read(rgb, look)        # result.lines, result.angle, result.coverage ...
"""

import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from captioner import text_geometry
from captioner.text_geometry import (
    BOX_THRESH,
    DB_THRESH,
    READ_SIZE,
    box_area,
    box_sides,
    boxes_from_map,
    crop_box,
    fit_height,
    line_like,
    normalise,
    reading_order,
    resize_side,
    to_array,
)

# READ_SIZE and the detector's box settings (DB_THRESH ... MAX_ASPECT, LINE_ASPECT) are text_geometry.py's
CROP_SIDE = 2048      # line crops are cut from the photo as decoded, at most this long: small print keeps its detail
LANGUAGES = {"en": "English", "zh": "Chinese"}  # what the recogniser reads and the junk rules know
MODELS = {"det": "PP-OCRv6_det_small.onnx", "cls": "ch_ppocr_mobile_v2.0_cls_mobile.onnx",
          "rec": "PP-OCRv6_rec_small.onnx"}  # inside the rapidocr wheel's models/ folder

DET_SIDE = 1024       # long side the detector sees in read()
LOOK_SIDE = 480       # long side the detector sees in first_look(); it passes with LOOK_MIN_BOXES boxes of at
LOOK_MIN_BOXES = 1    # least LOOK_THRESH mean probability, LOOK_ASPECT times as long as high (on dev: 97% of the
LOOK_THRESH = 0.4     # photos read let through, 20% of Flickr8k's without text; at 320 px real photos' small
LOOK_ASPECT = 1.5     # print is lost, at 640 the look costs twice as much for no more photos read)
MAX_LINES = 32        # text boxes recognised at most: bounds the time on a page of tiny print
MIN_TEXT_PX = 8       # boxes whose text is less high than this (in the READ_SIZE image) cannot be read
REC_HEIGHT = 48       # the recogniser's input height (fixed by the model)
REC_MIN_WIDTH = 320   # the recogniser's input is at least this wide (PaddleOCR's own)
CLS_SHAPE = (48, 192)  # the direction classifier's input (height, width)
RETRY_SCORE = 0.85    # below this mean score the other reading direction is tried too,
RETRY_LINES = 4       # ... on this many of the largest lines first
# The junk rules, chosen on the real photos (text_photos.py --vizwiz ../shared/vizwiz_dev --sweep; the generated
# ones keep 0.94 of their key words under any of the settings swept, so the real ones decide):
MIN_SCORE = 0.8       # recogniser score (mean character probability) a line needs
SURE_SCORE = 0.95     # ... at or above which words unknown to the word list count as words if they look like one
MIN_WORD_SHARE = 0.75  # share of a line's tokens that must be known words or numbers
TRUST_SCORE = 0.97    # ... at or above which a line is kept whatever its words (a brand, another language)
MIN_ALNUM = 3         # letters and digits a line needs
LONG_NAME = 14        # an unknown word longer than this does not count as a word (medicine names are shorter)
MAX_WORD = 20         # no token longer than this many letters is ever output
# words of fewer than 3 letters that count (the list's others are mostly abbreviations such as "td", "rn")
SHORT_WORDS = frozenset(re.findall(r"\w+", "a i of in is to it as he on by or be an at if up so do no we go us my "
                                    "me am hi oh ok ex mg ml kg oz lb fl cm mm km tv pm dr mr ms st rd uk"))
# words that say nothing alone: a line of nothing else ("and", the visible part of a title) is not read out
FUNCTION_WORDS = frozenset(re.findall(r"\w+", "a an the and or but of in on at to for from by with as is are was be it "
                                       "its this that you your we our he she they his her not no so if"))

_CJK = re.compile(r"[\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uff00-\uffef]")
_NUMBER = re.compile(r"^[+-]?\d+([.,:/]\d+)*%?$")
STRIP = ".,:;!?'\"()[]{}-*#®™°"  # the punctuation around a word that the word list lacks


@dataclass
class TextResult:
    """What read() found: the confident lines and the signals a description is built from."""
    lines: list = field(default_factory=list)  # confident lines, in reading order
    confidence: float = 0.0   # mean recogniser score of the kept lines (0 if none)
    coverage: float = 0.0     # share of the photo's area inside detected text boxes
    angle: int | None = None  # 0/90/180/270: clockwise turn that makes the text upright (None: no text)
    seconds: float = 0.0

    def as_dict(self):
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass
class Look:
    """What first_look() saw: the photo as an array (at most CROP_SIDE long), the line boxes the detector found
    at LOOK_SIDE, and whether to read."""
    img: np.ndarray
    boxes: list
    passes: bool
    seconds: float = 0.0


def parse_languages(languages):
    """('en',) or 'en,zh' -> a tuple of supported codes; anything else raises one clear line."""
    if isinstance(languages, str):
        languages = languages.split(",")
    codes = tuple(dict.fromkeys(c.strip().lower() for c in languages if c.strip()))
    bad = [c for c in codes if c not in LANGUAGES]
    if bad or not codes:
        have = ", ".join(f"{k} ({v})" for k, v in LANGUAGES.items())
        raise ValueError(f"text languages {','.join(bad) or '(none)'} not supported: the bundled recogniser reads "
                         f"{have}")
    return codes


class Words:
    """English word list (wordninja's): tells words from junk."""

    def __init__(self):
        import wordninja

        self.model = wordninja.DEFAULT_LANGUAGE_MODEL
        # the list's one- and two-letter entries are mostly abbreviations ("td", "rn"): junk read as words
        self.cost = {w: c for w, c in self.model._wordcost.items()
                     if w.isalpha() and (len(w) > 2 or w in SHORT_WORDS)}
        # letter triples seen in English words: a name the list lacks ("Lisinopril") still looks like a word
        self.triples = {}
        for w in self.cost:
            for t in _triples(w):
                self.triples[t] = self.triples.get(t, 0) + 1

    def is_word(self, token):
        core = _core(token)
        return bool(core) and (core in self.cost or bool(_NUMBER.match(core)))

    def looks_like_word(self, token):
        """Letters only (a hyphen between parts allowed: "Coca-Cola"), 4 to LONG_NAME of them, every letter triple
        common in English words (longer unknown runs are words the recogniser ran together: junk to say)."""
        core = _core(token)
        parts = core.split("-")
        return (4 <= len(core) <= LONG_NAME and all(p.isalpha() for p in parts)
                and all(self.triples.get(t, 0) >= 3 for p in parts for t in _triples(p)))


def _core(token):
    """A token without the punctuation around it or a possessive 's, lower-cased: what the word list holds."""
    core = token.strip(STRIP).lower()
    return core[:-2] if core.endswith(("'s", "’s")) and len(core) > 3 else core


def _triples(word):
    padded = f"^{word}$"
    return [padded[i:i + 3] for i in range(len(padded) - 2)]


@dataclass
class Rules:
    """When a read line is kept (defaults chosen on dev photos)."""
    min_score: float = MIN_SCORE
    sure_score: float = SURE_SCORE
    min_word_share: float = MIN_WORD_SHARE
    trust_score: float = TRUST_SCORE
    long_name: int = LONG_NAME
    min_alnum: int = MIN_ALNUM


def tidy_line(text, score, words, languages, rules):
    """The recogniser's line -> (tidied line, kept?) under the junk rules above."""
    text = " ".join(text.split())
    if "zh" not in languages:
        text = _CJK.sub(" ", text).strip()
    # a run of letters longer than a name the list lacks is words run together, or junk: not said
    tokens = [t for t in text.split() if sum(c.isalpha() for c in t) <= min(rules.long_name, MAX_WORD)
              or words.is_word(t)]
    line = " ".join(tokens)
    alnum = sum(c.isalnum() for c in line)
    if not tokens or alnum < rules.min_alnum or alnum < 0.6 * len(line.replace(" ", "")):
        return line, False
    if all(_core(t) in FUNCTION_WORDS for t in tokens):
        return line, False
    # a word the list lacks (a medicine's name) counts where the recogniser is sure and it looks like a word
    good = sum(words.is_word(t) or bool(_CJK.search(t)) or (score >= rules.sure_score and words.looks_like_word(t))
               for t in tokens) / len(tokens)
    # a line read with great assurance is kept whatever its words (a brand, a name, another language)
    return line, score >= rules.min_score and (good >= rules.min_word_share or score >= rules.trust_score)


def ctc_decode(probs, chars):
    """The recogniser's output (T, C) for one line -> (text, mean probability of its characters): the likeliest
    class at each step, repeats merged, blanks (class 0) dropped. chars[i - 1] is class i's character."""
    best, p = probs.argmax(1), probs.max(1)
    keep = (best != 0) & np.concatenate([[True], best[1:] != best[:-1]])
    text = "".join(chars[i - 1] for i in best[keep])
    return text, float(p[keep].mean(dtype=np.float64)) if keep.any() else 0.0


# ------------------------------------------------------------------------------------------- the networks

def model_dir():
    """The folder of the rapidocr wheel's ONNX files (found, not imported: only its files are used)."""
    import importlib.util

    spec = importlib.util.find_spec("rapidocr")
    if spec is None or spec.origin is None:
        raise RuntimeError("reading text needs the rapidocr wheel's models: pip install 'rapidocr>=3.10,<4'")
    return Path(spec.origin).resolve().parent / "models"


def _session(path, threads):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0  # 0: ONNX Runtime's default, all cores
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def line_batches(crops, batch):
    """Indices of the crops grouped `batch` at a time, narrowest first (crops of one batch are padded to the
    widest: similar widths waste least)."""
    order = sorted(range(len(crops)), key=lambda i: crops[i].shape[1] / crops[i].shape[0])
    return [order[i:i + batch] for i in range(0, len(order), batch)]


class Networks:
    """The detector, direction classifier and recogniser in ONNX Runtime: arrays in, arrays out."""

    BATCH = 6  # crops the classifier and the recogniser take at once (PaddleOCR's own)

    def __init__(self, threads=None, folder=None):
        folder = Path(folder) if folder else model_dir()
        self.det, self.cls, self.rec = (_session(folder / MODELS[k], threads) for k in ("det", "cls", "rec"))
        # the recogniser's classes: 0 is CTC's blank, then its character list, then a space
        self.chars = characters(self.rec)

    def detect(self, img, side):
        """img (H, W, 3) BGR -> the text probability map (h', w') of the photo at about `side` px long."""
        x = normalise(resize_side(img, side))[None]  # (1, 3, h', w')
        return self.det.run(None, {"x": x})[0][0, 0]  # (1, 1, h', w') -> (h', w')

    def direction(self, crops):
        """Line crops (h, w, 3), each read left to right -> P(the crop is upside down) per crop."""
        out = np.zeros(len(crops), np.float32)
        h, w = CLS_SHAPE
        for idx in line_batches(crops, self.BATCH):
            x = np.zeros((len(idx), 3, h, w), np.float32)  # (B, 3, 48, 192), zero (grey) padded
            for j, i in enumerate(idx):
                fit = fit_height(crops[i], h, w)
                x[j, :, :, :fit.shape[1]] = normalise(fit)
            out[idx] = self.cls.run(None, {"x": x})[0][:, 1]  # (B, 2): P("0"), P("180")
        return out

    def recognise(self, crops):
        """Line crops (h, w, 3) read left to right -> [(text, mean character probability)] per crop."""
        out = [("", 0.0)] * len(crops)
        for idx in line_batches(crops, self.BATCH):
            ratio = max([REC_MIN_WIDTH / REC_HEIGHT] + [crops[i].shape[1] / crops[i].shape[0] for i in idx])
            width = int(REC_HEIGHT * ratio)
            x = np.zeros((len(idx), 3, REC_HEIGHT, width), np.float32)  # (B, 3, 48, W), zero (grey) padded
            for j, i in enumerate(idx):
                fit = fit_height(crops[i], REC_HEIGHT, width)
                x[j, :, :, :fit.shape[1]] = normalise(fit)
            probs = self.rec.run(None, {"x": x})[0]  # (B, T, C)
            for j, i in enumerate(idx):
                out[i] = ctc_decode(probs[j], self.chars)
        return out


def characters(rec):
    """The recogniser's classes after CTC's blank (class 0): its character list (in the model's metadata), then
    a space."""
    return rec.get_modelmeta().custom_metadata_map["character"].splitlines() + [" "]


# ------------------------------------------------------------------------------------------- the reader

class TextReader:
    """The networks loaded once, and the steps around them; first_look() and read() are safe to call from one
    thread at a time."""

    def __init__(self, languages=("en",), threads=None, det_side=DET_SIDE, max_lines=MAX_LINES, look_side=LOOK_SIDE,
                 rules=None, folder=None):
        """languages: codes from LANGUAGES ('en', 'zh'); threads: ONNX Runtime threads per network (None: its
        default, all cores); det_side, max_lines, look_side, rules: the speed/recall knobs text_photos.py
        measures; folder: where the MODELS files are (default: the rapidocr wheel's; the web export's copies)."""
        self.languages = parse_languages(languages)
        self.nets = Networks(threads, folder)
        self.det_side, self.max_lines, self.look_side = det_side, max_lines, look_side
        self.rules = rules or Rules()
        self.words = Words()

    def _boxes(self, img, side, thresh=DB_THRESH, box_thresh=BOX_THRESH):
        """The detector on img (H, W, 3) at `side` px: (its map (h, w), boxes_from_map's [(box, score)] in img's
        pixels)."""
        prob = self.nets.detect(img, side)
        scale = np.array([img.shape[1] / prob.shape[1], img.shape[0] / prob.shape[0]], np.float32)  # (x, y)
        return prob, [(box * scale, s) for box, s in boxes_from_map(prob, thresh, box_thresh)]

    def first_look(self, image):
        """A cheap look for text worth reading: the detector on the photo at look_side px. Returns a Look; read()
        takes it, to reuse the photo's array."""
        start = time.perf_counter()
        img = to_array(image, CROP_SIDE)
        found = [b for b, _ in self._boxes(img, self.look_side, box_thresh=LOOK_THRESH)[1]
                 if line_like(b, LOOK_ASPECT)]
        return Look(img, found, len(found) >= LOOK_MIN_BOXES, time.perf_counter() - start)

    def read_raw(self, image, look=None):
        """Everything the recogniser said, before the junk rules: a dict for judge() and for threshold sweeps.
        Where the detector finds no line of text in the photo as it is, it looks in the photo turned a quarter:
        it misses much small print that runs sideways."""
        start = time.perf_counter()
        img = look.img if look is not None else to_array(image, CROP_SIDE)
        found = self._read_frame(img, 0)
        if not found["boxes"]:
            turned = self._read_frame(img, 270)
            found = max(found, turned, key=lambda r: _worth(r["read"]))
        return {**found, "seconds": time.perf_counter() - start}

    def _read_frame(self, img, turn):
        """_find_lines and _orient in one frame: read_raw's dict without its time."""
        found = self._find_lines(img, turn)
        boxes, read, angle = self._orient(found["frame"], found["boxes"])
        return {"boxes": boxes, "read": read, "angle": angle, "turn": turn, **found["signals"]}

    def _find_lines(self, img, turn):
        """The text lines of img turned `turn` degrees clockwise (0 or 270): the turned array, the boxes worth
        recognising (the largest print first, at most max_lines) and the signals judge() needs."""
        frame = _turned(img, turn)
        height, width = frame.shape[:2]
        prob, found = self._boxes(frame, self.det_side)
        boxes = [b for b, _ in found if line_like(b)]  # a blob (a ball, a window) is no line of text
        cover = min(1.0, sum(box_area(b) for b in boxes) / (width * height))
        least = MIN_TEXT_PX * max(width, height) / READ_SIZE  # MIN_TEXT_PX is at READ_SIZE
        boxes = sorted((b for b in boxes if min(box_sides(b)) >= least), key=lambda b: -min(box_sides(b)))
        signals = {"coverage": cover, "width": width, "height": height}
        return {"frame": frame, "turn": turn, "boxes": boxes[:self.max_lines], "signals": signals}

    def _orient(self, img, boxes):
        """Boxes -> (kept boxes, their readings, the clockwise turn of img that makes the text upright). Text on
        its side has tall boxes; the direction classifier votes 0 or 180 over all crops, weighted by their
        length; where the reading is unsure the other direction is read too and the surer one kept."""
        sides = [box_sides(b) for b in boxes]
        tall = sum(w * h for w, h in sides if h > 1.5 * w)
        wide = sum(w * h for w, h in sides if w > 1.5 * h)
        sideways = tall > wide
        boxes = [b for b, (w, h) in zip(boxes, sides) if (h > w / 1.5 if sideways else w > h / 1.5)]
        crops = [crop_box(img, b) for b in boxes]
        if sideways:  # turned a quarter counter-clockwise: upright if the photo needs 270 clockwise
            crops = [np.ascontiguousarray(np.rot90(c)) for c in crops]
        if not crops:
            return [], [], 0
        base = 270 if sideways else 0
        flipped = self.nets.direction(crops)  # (N,) P(upside down)
        flip = sum(c.shape[1] * (2 * float(p) - 1) for c, p in zip(crops, flipped)) > 0
        read = self.nets.recognise([_flip(c) for c in crops] if flip else crops)
        if _mean_score(read) < RETRY_SCORE:  # compare on the largest print (crops come largest first)
            other = crops if flip else [_flip(c) for c in crops]
            top = self.nets.recognise(other[:RETRY_LINES])
            if _mean_score(top) > _mean_score(read[:RETRY_LINES]):
                read, flip = top + self.nets.recognise(other[RETRY_LINES:]), not flip
        return boxes, read, (base + 180 * flip) % 360

    def judge(self, raw, rules=None):
        """read_raw's dict -> TextResult under `rules` (default: this reader's)."""
        rules = rules or self.rules
        kept, scores = [], []
        for box, (text, score) in zip(raw["boxes"], raw["read"]):
            line, keep = tidy_line(text, score, self.words, self.languages, rules)
            if keep:
                kept.append((box, line))
                scores.append(score)
        lines = reading_order(kept, raw["angle"], raw["width"], raw["height"])
        return TextResult(lines=lines, confidence=float(np.mean(scores)) if scores else 0.0,
                          coverage=float(raw["coverage"]), angle=(raw["turn"] + raw["angle"]) % 360 if lines else None,
                          seconds=raw["seconds"])

    def read(self, image, look=None):
        """The confident text of a PIL image (found at det_side px, read from crops of up to CROP_SIDE px).
        look: this photo's first_look(), whose array is reused."""
        start = time.perf_counter()
        result = self.judge(self.read_raw(image, look))
        result.seconds = time.perf_counter() - start
        return result


def _turned(img, turn):
    """img (H, W, 3) turned `turn` (0 or 270) degrees clockwise: np.rot90 turns counter-clockwise."""
    return np.ascontiguousarray(np.rot90(img)) if turn == 270 else img


def _flip(crop):
    return np.ascontiguousarray(np.rot90(crop, 2))


def _worth(read):
    """How much a reading says with assurance: the characters of its lines read at MIN_SCORE or above, weighted
    by their scores."""
    return sum(len(t.strip()) * s for t, s in read if s >= MIN_SCORE)


def _mean_score(read):
    """Length-weighted mean score of [(text, score)]."""
    lengths = [max(len(t), 1) for t, _ in read]
    return float(sum(s * n for (_, s), n in zip(read, lengths)) / max(sum(lengths), 1))


# ------------------------------------------------------------------------------------------- for the web page

# the settings web/read_text.js reads (by these names) from export_rules(): this file's and text_geometry.py's
EXPORTED = ("READ_SIZE", "CROP_SIDE", "DET_SIDE", "LOOK_SIDE", "LOOK_MIN_BOXES", "LOOK_THRESH", "LOOK_ASPECT",
            "DB_THRESH", "BOX_THRESH", "UNCLIP", "MAX_CANDIDATES", "MAX_LINES", "MIN_TEXT_PX", "MAX_ASPECT",
            "REC_HEIGHT", "REC_MIN_WIDTH", "CLS_SHAPE", "RETRY_SCORE", "RETRY_LINES", "MIN_SCORE", "LONG_NAME",
            "MAX_WORD", "LINE_ASPECT")


def export_rules(folder=None):
    """Everything web/read_text.js needs to read as this file does, but the networks and the word list, as plain
    JSON-able values: the settings (EXPORTED, by name), the junk rules' defaults, the short and function words,
    the patterns (as JavaScript writes them, flag "u"), the languages, the model files and the recogniser's
    characters (chars[i - 1] is class i's)."""
    import onnxruntime as ort

    folder = Path(folder) if folder else model_dir()
    rec = ort.InferenceSession(str(folder / MODELS["rec"]), providers=["CPUExecutionProvider"])
    known = {**vars(text_geometry), **globals()}  # the settings of this file and of its geometry
    settings = {name: known[name] for name in EXPORTED}
    return {"settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
            "rules": asdict(Rules()), "short_words": sorted(SHORT_WORDS), "function_words": sorted(FUNCTION_WORDS),
            # Python's \d is any decimal digit; JavaScript's, even with flag "u", only 0-9
            "patterns": {"cjk": _CJK.pattern, "number": _NUMBER.pattern.replace(r"\d", r"\p{Nd}"),
                         "strip": STRIP},
            "languages": dict(LANGUAGES), "models": dict(MODELS), "batch": Networks.BATCH, "chars": characters(rec)}


def word_list():
    """The English words the junk rules know (Words.cost's keys), in the list's order: the web export writes them
    to words.txt, one a line."""
    return list(Words().cost)
