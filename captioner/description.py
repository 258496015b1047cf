"""What a person hears about a photo: what the thing in it is, the text read in it, what is wrong with it and how to
take it again, and the caption at the level its confidence allows, combined into one description, shortest useful
first.

Captioning a photo (describe.Captioner) is two steps. `look_at` measures the photo as it was taken: the photo
check's image scores (photo_check.py) and, where a cheap first look finds text, the text read at a higher
resolution (read_text.py), which also says how far the photo is turned. Then the caption is written on the upright
photo, the thing in it is named from the captioner's own CNN (things.py), and `combine` says it all in one
description:

    a package, a screen, a bottle   "Probably a package. Text: Farley's. Orange Slices."
    a photo that is mostly text     "Text: BRISTOL Tablets 20 mg. Probably a box on a table."
    a good photo                    "A dog runs through the grass."
    a photo with a problem          "Probably a dog in the dark. It is too dark to see: turn on a light."
    a photo turned on its side      "Turned upright: a man rides a bicycle."
    nothing recognisable at all     "No reliable description: nothing recognisable. Hold the phone ..."

Every part is honest: text is read aloud only where the reader was sure of it, a thing named and a caption said
only at the level their fits allow (things.py, alt_text), and a photo the captioner cannot place gets
no caption at all. A photo whose text was read is not called too dark to see: the text says otherwise (a lit
screen in a dark room is the usual case).

The wording lives here alone: export_rules gives it (as photo_check.export_rules and things.export_rules give their
fits) to the export's captioner.json, which the runner without PyTorch and the web page (web/describe.js) follow.
"""

import re
from dataclasses import dataclass

from captioner.photo_check import measures

MOSTLY_TEXT = 0.12  # share of the photo inside text boxes from which it is "mostly text": the text leads
SPOKEN_LINES = 6  # lines of text read aloud at most (the full list is in the answer's `text`)
SPOKEN_HINTS = 2  # retake hints said at most: the most serious first
NOTHING_SEEN = "Nothing recognisable."
NOTHING = "No reliable description: nothing recognisable."
NOTHING_HINT = "Hold the phone about a forearm's length from the thing, in good light, and try again."
TURNED = "Turned upright: "  # before the caption of a photo turned upright before it was captioned
TEXT = "Text: "  # before the lines read
ALT_TEXT_MAX = 125  # characters: what screen readers and CMSs expect of an alt attribute
ABSTAIN = "No reliable description."
# how a caption (confidence.py's levels) and a thing named (things.py's) are hedged at each level below "high"
HEDGES = {"medium": "Probably ", "low": "Hard to tell; perhaps "}
_ATTACHED = re.compile(r" ([.,!?;:]|'s|'re|'ve|'ll|'d|'m|n't)(?=\s|$)")
_PROGRESSIVE = re.compile(r"^(.*?) (?:is|are) (\w+ing)\b")  # "a dog is running ..." -> "a dog running ..."


@dataclass
class Look:
    """What is measured of a photo before it is captioned: the photo check's image measures (photo_check.measures),
    the text read (read_text.TextResult, or None where the first look found none or reading is off), and the
    clockwise turn, in degrees, that its text says makes it upright (0: none, or no text to tell by)."""
    measures: object = None
    text: object = None
    turn: int = 0


def look_at(image, reader=None):
    """Look at a photo (upright by EXIF, decoded in full): its image measures, and its text where the reader's
    first look finds some (read_text.TextReader; None: no text is read)."""
    text = None
    if reader is not None:
        first = reader.first_look(image)
        text = reader.read(image, first) if first.passes else None
    turn = text.angle if text is not None and text.lines and text.angle else 0
    return Look(measures(image), text, turn)


def answer(checker, look, pooled, caption, level, unfamiliar, turned=0, thing=None):
    """The description part of one photo's answer: the photo check's scores (of the image's measures in `look`
    and, where given, the CNN's pooled feature [F]) and the problems found, the thing named (things.Things.assess:
    {"name", "score", "level"} or None), and what `combine` makes of it all."""
    scores = checker.scores_of(look.measures, pooled)
    read = look.text is not None and bool(look.text.lines)
    problems = [p for p in checker.problems(scores) if not (read and p["problem"] == "dark")]  # text was seen
    told = [p for p in problems if not (turned and p["problem"] == "rotated")]  # turned upright: says so itself
    said = combine(caption, level, unfamiliar, look, told, turned, thing)
    return {"alt_text": said["alt_text"], "description": said["description"], "text": said["text"], "thing": thing,
            "photo_problems": [{"problem": p["problem"], "score": round(p["score"], 3)} for p in problems],
            "photo_scores": {k: round(v, 3) for k, v in scores.items()}, "retake_hint": said["retake_hint"],
            "turned": turned}


def combine(caption, level, unfamiliar, look, problems, turned=0, thing=None):
    """The answer's description fields for one photo: description (what a person hears), alt_text (the same cut to
    fit an alt attribute), text (the lines read), retake_hint (the most serious problem's hint, or None).
    caption/level/unfamiliar: the caption and its confidence (alt_text); problems: the photo check's
    [{"problem", "score", "hint"}], most serious first; turned: the clockwise turn made before captioning;
    thing: the thing named, or None."""
    lines = list(look.text.lines) if look.text is not None else []
    said = alt_text(caption, level, unfamiliar)
    said = None if said == ABSTAIN else (f"{TURNED}{said[0].lower()}{said[1:]}" if turned else said)
    text = f"{TEXT}{'. '.join(line.rstrip('. ') for line in lines[:SPOKEN_LINES])}." if lines else None
    sure = said is not None and level in (None, "high", "medium")
    # the thing, named where its fit is sure, says more than a caption hedged as a guess; a caption the model is
    # sure of says it better ("A dog runs through the grass.", not "Probably a dog." too)
    named = None if sure else thing_sentence(thing)
    said = None if named else said
    hints = [p["hint"] for p in problems if p.get("hint")][:SPOKEN_HINTS]
    mostly_text = text is not None and look.text.coverage >= MOSTLY_TEXT
    parts = [named, text if mostly_text else None, said if sure else None, None if mostly_text else text, *hints,
             None if sure else said]
    parts = [p for p in parts if p]
    if said is None and text is None and named is None and hints:
        parts.insert(0, NOTHING_SEEN)  # the hints say why: nothing could be made out
    retake = hints[0] if hints else None
    if not parts:  # nothing read or named, nothing wrong that the check can name, and no caption it could stand by
        parts, retake = [NOTHING, NOTHING_HINT], NOTHING_HINT
    description = " ".join(parts)
    return {"description": description, "alt_text": fit_alt_text(description), "text": lines,
            "retake_hint": retake}


# ------------------------------------------------------------------------------------------- the wording

def sentence(caption):
    """A tokenised caption as written prose: "a dog runs through the grass ." -> "A dog runs through the grass.\""""
    text = " ".join(w for w in caption.split() if w != '"')
    text = _ATTACHED.sub(r"\1", text).replace(" - ", "-").rstrip(" .,;:")
    return (text[:1].upper() + text[1:] + ".") if text else ""


def alt_text(caption, level=None, unfamiliar=False):
    """One sentence for an HTML alt attribute (at most ALT_TEXT_MAX characters), worded by confidence level
    (confidence.py): plain when high (or when the model has no calibration), "Probably …" when medium, "Hard to
    tell; perhaps …" when low (HEDGES), and ABSTAIN for a photo unlike any real photo the fit saw."""
    if unfamiliar or not caption.strip():
        return ABSTAIN
    plain = sentence(caption)
    if level not in HEDGES:
        return fit_alt_text(plain)
    return fit_alt_text(HEDGES[level] + _PROGRESSIVE.sub(r"\1 \2", plain[0].lower() + plain[1:]))


def fit_alt_text(text):
    """text, cut at a word to ALT_TEXT_MAX characters (ending in an ellipsis) where it is longer."""
    if len(text) <= ALT_TEXT_MAX:
        return text
    return text[:ALT_TEXT_MAX - 1].rsplit(" ", 1)[0].rstrip(",;:") + "…"


def thing_sentence(thing):
    """A thing named (things.Things.assess) as said: "Probably a computer screen." at medium, "A computer screen."
    at high; None for None."""
    if thing is None:
        return None
    name = thing["name"]
    if thing["level"] == "high":
        return f"{name[0].upper()}{name[1:]}."
    return f"{HEDGES['medium']}{name}."


def export_rules():
    """Every wording and number of combine, answer, alt_text and thing_sentence as plain JSON types, for the page,
    which cannot import this file (web/describe.js): written into captioner.json at export, so that the words live
    here alone."""
    return {"mostly_text": MOSTLY_TEXT, "spoken_lines": SPOKEN_LINES, "spoken_hints": SPOKEN_HINTS,
            "nothing_seen": NOTHING_SEEN, "nothing": NOTHING, "nothing_hint": NOTHING_HINT, "turned": TURNED,
            "text": TEXT, "abstain": ABSTAIN, "max_chars": ALT_TEXT_MAX, "hedges": dict(HEDGES),
            "attached": _ATTACHED.pattern, "progressive": _PROGRESSIVE.pattern}
