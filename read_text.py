"""Read the text in a photo, offline: find text lines, read the confident ones aloud-ready (spaced, in reading
order, in the photo's upright frame), and tell how the photo must be turned and whether text is there but
unreadable.

It runs the PaddleOCR detector, direction classifier and Chinese+English recogniser that the rapidocr-onnxruntime
wheel carries (ONNX Runtime, nothing downloaded). The recogniser often drops the spaces between English words;
they are restored with wordninja's English word list. Lines that are junk (too few letters, mostly non-words, a
low recogniser score) are dropped: a wrong word said with assurance is worse than none.

    reader = TextReader(threads=2)
    if reader.first_look(small_rgb) >= FIRST_LOOK_MIN:
        result = reader.read(rgb_at_most_READ_SIZE)   # result.lines, result.angle, result.illegible ...
"""

import math
import re
import time
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

READ_SIZE = 1024      # long side (px) read() wants: crops for the recogniser come from this size
FIRST_LOOK_MIN = 0.2  # first_look score at or above which read() is worth running (chosen on dev photos)
LANGUAGES = {"en": "English", "zh": "Chinese"}  # what the bundled PP-OCRv4 recogniser reads

DET_SIDE = 480        # long side the detector sees in read() (dev: 640 reads 8% more key words at 1.6x the time)
LOOK_SIDE = 320       # long side the detector sees in first_look() (384: 5% more text photos, 2x the time)
LOOK_TURN_BELOW = 0.002  # first_look: under this share of the photo in text lines it looks again, turned 90
DENSE_LINES = 6       # read(): this many boxes whose median height is under DENSE_PX at the detector's scale
DENSE_PX = 18         # ... are small print: the detector looks again at twice det_side
MAX_LINES = 32        # text boxes recognised at most: bounds the time on a page of tiny print
MAX_CANDIDATES = 300  # detector regions examined at most (the library's 1000 costs ~0.2 s on a page of noise)
MIN_TEXT_PX = 9       # boxes whose text is less high than this (in the READ_SIZE image) cannot be read
MAX_ASPECT = 40       # a crop wider than this many heights is squashed: bounds the recogniser's input
MIN_SCORE = 0.85      # recogniser score (mean character probability) a line needs
SURE_SCORE = 0.93     # ... at or above which words unknown to the word list count as words if they look like one
MIN_WORD_SHARE = 0.75  # share of a line's tokens that must be known words or numbers (dev: 0.6 to 0.8 keep
                       # the same key words; 0.75 and 0.85 above say the fewest wrong words)
MIN_ALNUM = 3         # letters and digits a line needs
LONG_NAME = 14        # an unknown word longer than this does not count as a word (medicine names are shorter)
MAX_WORD = 20         # no token longer than this many letters is ever output
SPLIT_COST = 2.0      # respacing: cost of each added space, against
UNKNOWN_LETTER_COST = 2.8  # ... the cost per letter of leaving the token whole (chosen on the rendered phrases)
# words of fewer than 3 letters that count (the list's others are mostly abbreviations such as "td", "rn")
SHORT_WORDS = frozenset(re.findall(r"\w+", "a i of in is to it as he on by or be an at if up so do no we go us my "
                                    "me am hi oh ok ex mg ml kg oz lb fl cm mm km tv pm dr mr ms st rd uk"))
NUMBER_COST = 8.0     # a number's cost as a part (like a word of middling frequency)
REC_HEIGHT = 32       # recogniser input height: the model was trained at 48; 32 costs ~half (dev: 0.74 of key
                      # words read at 32, 0.82 at 48, at 1.3x the whole read's time)
REREAD_HEIGHT = 48    # lines read at 32 with a score in [REREAD_LOW, SURE_SCORE) are read again at this height
REREAD_LOW = 0.6
REREAD_LINES = 2      # ... the largest this many of them (crops come largest first): the time stays bounded
RETRY_SCORE = 0.85    # below this mean score the other reading direction is tried too,
RETRY_LINES = 4       # ... on this many of the largest lines first
ILLEGIBLE_COVER = 0.01  # text-box share of the photo above which unread boxes mean "text is there"
ILLEGIBLE_BOXES = 1
WEAK_THRESH = 0.2     # detector probability where "half sure" starts (its own thresholds: 0.3 and 0.5)
LINE_HIGH = 0.25      # a box higher than this share of the photo's short side is a blob, not a line of text

_CJK = re.compile(r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef]")
_NUMBER = re.compile(r"^[+-]?\d+([.,:/]\d+)*%?$")
_NUMBER_UNIT = re.compile(r"^(\d+(?:[.,]\d+)?)([A-Za-z]{1,12}[.,:;]?)$")


@dataclass
class TextResult:
    """What read() found: the confident lines and the signals a description is built from."""
    lines: list = field(default_factory=list)  # confident lines, spaced, in reading order
    confidence: float = 0.0   # mean recogniser score of the kept lines (0 if none)
    coverage: float = 0.0     # share of the photo's area inside detected text boxes
    illegible: bool = False   # text-like regions found, nothing read confidently
    angle: int | None = None  # 0/90/180/270: clockwise turn that makes the text upright (None: no text)
    seconds: float = 0.0

    def as_dict(self):
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


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
    """English word list (wordninja's, ranked by frequency): restores lost spaces and tells words from junk."""

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
        core = token.strip(".,:;!?'\"()[]{}-*#").lower()
        return bool(core) and (core in self.cost or bool(_NUMBER.match(core)))

    def looks_like_word(self, token):
        """Letters only, 4 to LONG_NAME of them, every letter triple common in English words (longer unknown runs
        are words the recogniser ran together and could not be split: junk to say)."""
        core = token.strip(".,:;!?'\"()[]{}-*#").lower()
        return (4 <= len(core) <= LONG_NAME and core.isalpha()
                and all(self.triples.get(t, 0) >= 3 for t in _triples(core)))

    def _cost(self, part):
        return NUMBER_COST if _NUMBER.match(part) else self.cost.get(part.lower(), math.inf)

    def respace(self, token):
        """A token the recogniser ran together ('anotrepairthiscomputer') -> 'a not repair this computer'; kept
        whole where it is a known word, or where splitting it costs more than an unknown word of its length
        ('Metformin' is not 'Met form in')."""
        if self.is_word(token) or len(token) < 3 or not re.search("[A-Za-z]", token):
            return token
        unit = _NUMBER_UNIT.match(token)  # "20mg" -> "20 mg": a number and a known word are always two
        if unit and unit.group(2).rstrip(".,:;").lower() in self.cost:
            return f"{unit.group(1)} {unit.group(2)}"
        core = token.rstrip(".,:;!?")
        parts = self.model.split(core)
        cost = sum(self._cost(p) for p in parts) + SPLIT_COST * (len(parts) - 1)
        if len(parts) > 1 and cost < UNKNOWN_LETTER_COST * len(core):
            return " ".join(parts) + token[len(core):]  # wordninja drops punctuation: put a trailing one back
        return token


def _triples(word):
    padded = f"^{word}$"
    return [padded[i:i + 3] for i in range(len(padded) - 2)]


@dataclass
class Rules:
    """When a read line is kept and when unread boxes mean illegible text (defaults chosen on dev photos)."""
    min_score: float = MIN_SCORE
    sure_score: float = SURE_SCORE
    min_word_share: float = MIN_WORD_SHARE
    min_alnum: int = MIN_ALNUM
    illegible_cover: float = ILLEGIBLE_COVER
    illegible_boxes: int = ILLEGIBLE_BOXES


def tidy_line(text, score, words, languages, rules):
    """The recogniser's line -> (spaced line, kept?) with the junk rules above."""
    text = " ".join(text.split())
    if "zh" not in languages:
        text = _CJK.sub(" ", text).strip()
    tokens = [t for t in " ".join(words.respace(t) for t in text.split()).split()
              if sum(c.isalpha() for c in t) <= MAX_WORD]
    line = " ".join(tokens)
    alnum = sum(c.isalnum() for c in line)
    if not tokens or alnum < rules.min_alnum or alnum < 0.6 * len(line.replace(" ", "")):
        return line, False
    # a word the list lacks (a medicine's name) counts where the recogniser is sure and it looks like a word
    good = sum(words.is_word(t) or bool(_CJK.search(t)) or (score >= rules.sure_score and words.looks_like_word(t))
               for t in tokens) / len(tokens)
    keep = score >= rules.min_score and good >= rules.min_word_share
    return line, keep


def _box_sides(box):
    """(width along the text, height) of a detector quadrilateral tl, tr, br, bl."""
    return float(np.linalg.norm(box[0] - box[1])), float(np.linalg.norm(box[0] - box[3]))


def crop_box(img, box):
    """The box cut out of img (H, W, 3) and warped flat: (h, w, 3), w along the box's top edge."""
    import cv2

    w, h = _box_sides(box)
    w, h = max(int(round(w)), 1), max(int(round(h)), 1)
    target = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float32)
    m = cv2.getPerspectiveTransform(box.astype(np.float32), target)
    crop = cv2.warpPerspective(img, m, (w, h), borderMode=cv2.BORDER_REPLICATE, flags=cv2.INTER_CUBIC)
    if w > MAX_ASPECT * h:  # a page-wide run of tiny print: squash it rather than feed a huge tensor
        crop = cv2.resize(crop, (MAX_ASPECT * h, h), interpolation=cv2.INTER_AREA)
    return crop


def upright_centre(box, angle, width, height):
    """The box's centre and text height in the frame where the photo is turned `angle` degrees clockwise."""
    x, y = box.mean(axis=0)
    turned = {0: (x, y), 90: (height - y, x), 180: (width - x, height - y), 270: (y, width - x)}[angle]
    return turned[0], turned[1], min(_box_sides(box))


def reading_order(items, angle, width, height):
    """items: (box, text) -> rows of text, top to bottom, left to right in the upright frame; boxes on one row
    are joined with a space."""
    placed = sorted(((upright_centre(b, angle, width, height), t) for b, t in items), key=lambda p: p[0][1])
    rows = []
    for (x, y, h), text in placed:
        if rows and abs(y - rows[-1]["y"]) < 0.5 * max(h, rows[-1]["h"]):
            rows[-1]["parts"].append((x, text))
        else:
            rows.append({"y": y, "h": h, "parts": [(x, text)]})
    return [" ".join(t for _, t in sorted(r["parts"])) for r in rows]


def to_array(image, long_side):
    """PIL image -> BGR uint8 array (H, W, 3) at most long_side px long (the models were trained on BGR)."""
    image = image.convert("RGB")
    if max(image.size) > long_side:
        image = image.copy()
        image.thumbnail((long_side, long_side), Image.BILINEAR)
    return np.ascontiguousarray(np.asarray(image)[:, :, ::-1])


def _line_like(box):
    """A text line is long and thin (either way: the photo may be on its side); a blob is not."""
    w, h = _box_sides(box)
    return max(w, h) >= 1.5 * min(w, h)


def _area(box):
    x, y = box[:, 0], box[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


class TextReader:
    """The bundled detector, direction classifier and recogniser, loaded once; read() and first_look() are
    safe to call from one thread at a time."""

    def __init__(self, languages=("en",), threads=None, det_side=DET_SIDE, max_lines=MAX_LINES, rec_height=REC_HEIGHT,
                 look_side=LOOK_SIDE, rules=None):
        """languages: codes from LANGUAGES ('en', 'zh'); threads: ONNX Runtime threads per model (None: its
        default, all cores); det_side, max_lines, rec_height, look_side, rules: the speed/recall knobs text_photos.py
        measures."""
        self.languages = parse_languages(languages)
        try:
            from rapidocr_onnxruntime.ch_ppocr_cls import TextClassifier
            from rapidocr_onnxruntime.ch_ppocr_det import TextDetector
            from rapidocr_onnxruntime.ch_ppocr_det.utils import DBPostProcess
            from rapidocr_onnxruntime.ch_ppocr_rec import TextRecognizer
            from rapidocr_onnxruntime.main import DEFAULT_CFG_PATH
            from rapidocr_onnxruntime.utils import read_yaml, update_model_path
        except ImportError as e:
            raise RuntimeError(f"reading text needs rapidocr-onnxruntime ({e}): "
                               "pip install rapidocr-onnxruntime wordninja") from None
        config = update_model_path(read_yaml(DEFAULT_CFG_PATH))
        for part in ("Det", "Cls", "Rec"):
            config[part]["intra_op_num_threads"] = threads or -1
            config[part]["inter_op_num_threads"] = 1
        config["Det"]["max_candidates"] = MAX_CANDIDATES
        self.det = TextDetector(config["Det"])
        self.weak = DBPostProcess(thresh=WEAK_THRESH, box_thresh=WEAK_THRESH, max_candidates=MAX_CANDIDATES,
                                  unclip_ratio=1.6, use_dilation=True)
        self.cls = TextClassifier(config["Cls"])
        self.rec = TextRecognizer(config["Rec"])
        self.rec.rec_image_shape = [3, rec_height, 320]  # (C, H, W at least): the width follows each crop
        self.det_side, self.max_lines, self.look_side = det_side, max_lines, look_side
        self.rules = rules or Rules()
        self.words = Words()

    def _detect(self, img, side):
        """img (H, W, 3) BGR -> (probability map (h, w) at <= side px, boxes (N, 4, 2) in img's pixels, scores)."""
        h, w = img.shape[:2]
        if min(h, w) * side / max(h, w) < 32:  # too thin for the network's 32-px grid: pad it square
            pad = np.full((max(h, w), max(h, w), 3), 255, np.uint8)
            pad[:h, :w] = img
            img = pad
        import cv2

        scale = side / max(img.shape[:2])
        size = [max(32, int(round(n * scale / 32)) * 32) for n in img.shape[1::-1]]  # (w', h'): multiples of 32
        x = cv2.resize(img, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        x = (x.astype(np.float32) * (2 / 255) - 1).transpose(2, 0, 1)[None]  # (1, 3, h', w'), in [-1, 1]
        prob = self.det.infer(x)[0]  # (1, 1, h', w')
        boxes, scores = self.det.postprocess_op(prob, img.shape[:2])
        boxes = [self.det.order_points_clockwise(b.astype(np.float32)) for b in boxes]
        keep = [i for i, b in enumerate(boxes) if min(_box_sides(b)) > 3]
        return prob[0, 0], [boxes[i] for i in keep], [float(scores[i]) for i in keep]

    def first_look(self, image):
        """A cheap score in [0, 1] that the photo holds text worth reading: the share of the photo inside lines
        the detector finds with assurance, at look_side px (one or two detector passes on a small image)."""
        img = to_array(image, self.look_side)
        share = self._line_share(img)
        if share < LOOK_TURN_BELOW:  # the detector misses small print on its side: look at the photo turned too
            share = max(share, self._line_share(np.ascontiguousarray(np.rot90(img))))
        return float(1.0 - math.exp(-share / 0.01))  # 1% of the photo in text lines: 0.63

    def _line_share(self, img):
        _, boxes, scores = self._detect(img, self.look_side)
        return sum(_area(b) for b, s in zip(boxes, scores) if s >= 0.6 and _line_like(b)) / img[..., 0].size

    def _recognise(self, crops):
        """crops -> ([(text, score)], length-weighted mean score)."""
        if not crops:
            return [], 0.0
        res, _ = self.rec([np.ascontiguousarray(c) for c in crops])
        return res, self._recognise_score(res)

    @staticmethod
    def _recognise_score(res):
        lengths = [max(len(t), 1) for t, _ in res]
        return float(sum(s * n for (_, s), n in zip(res, lengths)) / max(sum(lengths), 1))

    def _orient(self, img, boxes):
        """Boxes -> (kept boxes, their crops turned to read left to right, angle). A photo turned 90 degrees has
        tall boxes; the classifier votes 0 or 180 over all crops; where the reading is unsure the other
        direction is read too and the surer one kept."""
        sides = [_box_sides(b) for b in boxes]
        tall = sum(w * h for w, h in sides if h > 1.5 * w)
        wide = sum(w * h for w, h in sides if w > 1.5 * h)
        sideways = tall > wide
        keep = [i for i, (w, h) in enumerate(sides) if (h > w / 1.5 if sideways else w > h / 1.5)]
        boxes = [boxes[i] for i in keep]
        crops = [crop_box(img, b) for b in boxes]
        if sideways:  # turned a quarter counter-clockwise: upright if the photo needs 270 clockwise
            crops = [np.rot90(c) for c in crops]
        base = 270 if sideways else 0
        _, votes, _ = self.cls(crops) if crops else (None, [], 0)
        vote = sum(c.shape[1] * (s if label == "180" else -s) for c, (label, s) in zip(crops, votes))
        flip = vote > 0
        read, score = self._recognise([np.rot90(c, 2) if flip else c for c in crops])
        if crops and score < RETRY_SCORE:  # compare on the largest print (crops come largest first)
            other = [c if flip else np.rot90(c, 2) for c in crops]
            top, top_score = self._recognise(other[:RETRY_LINES])
            if top_score > self._recognise_score(read[:RETRY_LINES]):
                rest, _ = self._recognise(other[RETRY_LINES:])
                read, flip = top + rest, not flip
        final = [np.rot90(c, 2) if flip else c for c in crops]
        return boxes, self._reread(final, read), (base + 180 * flip) % 360

    def _reread(self, crops, read):
        """The largest lines read with middling assurance are read again at the recogniser's full input height
        (48 px, what it was trained at; 32 px costs ~half): the surer reading of the two is kept."""
        again = [i for i, (_, score) in enumerate(read) if REREAD_LOW <= score < SURE_SCORE][:REREAD_LINES]
        if not again or self.rec.rec_image_shape[1] >= REREAD_HEIGHT:
            return read
        height = self.rec.rec_image_shape[1]
        self.rec.rec_image_shape[1] = REREAD_HEIGHT
        try:
            better, _ = self._recognise([crops[i] for i in again])
        finally:
            self.rec.rec_image_shape[1] = height
        read = list(read)
        for i, new in zip(again, better):
            read[i] = max(read[i], new, key=lambda r: r[1])
        return read

    def read_raw(self, image):
        """Everything the recogniser said, before the junk rules: a dict for read() and for threshold sweeps."""
        start = time.perf_counter()
        img = to_array(image, READ_SIZE)
        height, width = img.shape[:2]
        prob, boxes, _ = self._detect(img, self.det_side)
        scale = self.det_side / max(height, width)
        if len(boxes) >= DENSE_LINES and np.median([min(_box_sides(b)) for b in boxes]) * scale < DENSE_PX:
            # a page of small print: at det_side its lines run into each other; look again at twice the size
            prob, boxes, _ = self._detect(img, min(2 * self.det_side, READ_SIZE))
        boxes = [b for b in boxes if _line_like(b)]  # a blob (a ball, a dark window) is no line of text
        cover = min(1.0, sum(_area(b) for b in boxes) / (width * height))
        # the evidence for "illegible": text-line-sized boxes (not a blob as high as a quarter of the photo) where
        # the detector is only half sure, as it is of blurred text
        weak, _ = self.weak(prob[None, None], (height, width))  # prob (h', w') -> (1, 1, h', w')
        weak = [self.det.order_points_clockwise(b.astype(np.float32)) for b in weak]
        sized = [b for b in weak if min(_box_sides(b)) > 3 and _line_like(b)
                 and min(_box_sides(b)) <= LINE_HIGH * min(width, height)]
        line_cover = sum(_area(b) for b in sized) / (width * height)
        boxes = [b for b in boxes if min(_box_sides(b)) >= MIN_TEXT_PX]
        boxes = sorted(boxes, key=lambda b: -min(_box_sides(b)))[:self.max_lines]  # the largest print first
        boxes, read, angle = self._orient(img, boxes)
        return {"boxes": boxes, "read": read, "angle": angle, "coverage": cover, "line_cover": line_cover,
                "lines_seen": len(sized), "width": width,
                "height": height, "seconds": time.perf_counter() - start}

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
        seen = raw["line_cover"] >= rules.illegible_cover and raw["lines_seen"] >= rules.illegible_boxes
        illegible = seen and not lines
        return TextResult(lines=lines, confidence=float(np.mean(scores)) if scores else 0.0,
                          coverage=float(raw["coverage"]), illegible=bool(illegible),
                          angle=int(raw["angle"]) if lines else None, seconds=raw["seconds"])

    def read(self, image):
        """The confident text of a PIL image (best at most READ_SIZE px long; larger ones are scaled down)."""
        start = time.perf_counter()
        result = self.judge(self.read_raw(image))
        result.seconds = time.perf_counter() - start
        return result
