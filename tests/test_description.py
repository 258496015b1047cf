"""What a person hears: the text, the caption at its level and the photo's problems, combined (description.py)."""

import json
import subprocess
import sys
from types import SimpleNamespace

from conftest import ROOT

from captioner import description
from captioner.description import ABSTAIN, ALT_TEXT_MAX, NOTHING, NOTHING_HINT, NOTHING_SEEN, Look, answer, combine
from captioner.photo_check import HINTS

CAPTION = "a dog is running through the grass ."
DARK = {"problem": "dark", "score": 0.9, "hint": "It is too dark to see: turn on a light."}
BLUR = {"problem": "blur", "score": 0.8, "hint": "The photo is blurry: hold the phone still and try again."}


def text(lines=(), coverage=0.0):
    return SimpleNamespace(lines=list(lines), coverage=coverage, angle=0)


def test_a_good_photo_is_its_caption_at_its_level():
    said = combine(CAPTION, "high", False, Look(), [])
    assert said["description"] == "A dog is running through the grass." == said["alt_text"]
    assert said["retake_hint"] is None and said["text"] == []
    assert combine(CAPTION, "medium", False, Look(), [])["description"].startswith("Probably a dog running")


def test_a_photo_that_is_mostly_text_leads_with_the_text():
    look = Look(text=text(["BRISTOL Tablets", "20 mg"], coverage=0.4))
    said = combine("a box on a table .", "medium", False, look, [])
    assert said["description"] == "Text: BRISTOL Tablets. 20 mg. Probably a box on a table."
    assert said["text"] == ["BRISTOL Tablets", "20 mg"]


def test_a_little_text_follows_the_caption():
    look = Look(text=text(["STOP"], coverage=0.02))
    assert combine("a red sign on a street .", "high", False, look, [])["description"] == \
        "A red sign on a street. Text: STOP."


def test_a_problem_says_its_hint_after_a_sure_caption_and_before_an_unsure_one():
    sure = combine(CAPTION, "high", False, Look(), [DARK])
    assert sure["description"] == f"A dog is running through the grass. {DARK['hint']}"
    assert sure["retake_hint"] == DARK["hint"]
    unsure = combine(CAPTION, "low", False, Look(), [DARK, BLUR])
    assert unsure["description"].startswith(f"{DARK['hint']} {BLUR['hint']} Hard to tell; perhaps a dog")


def test_a_photo_nothing_can_be_said_of_says_why_and_how_to_retake_it():
    nothing = combine(CAPTION, "low", True, Look(), [])
    assert nothing["description"] == f"{NOTHING} {NOTHING_HINT}" and nothing["retake_hint"] == NOTHING_HINT
    assert nothing["description"] != ABSTAIN
    blurred = combine(CAPTION, "low", True, Look(), [BLUR])
    assert blurred["description"] == f"{NOTHING_SEEN} {BLUR['hint']}"  # never the caption of a photo it abstains on


def test_a_turned_photo_says_so_and_the_alt_text_fits():
    said = combine(CAPTION, "high", False, Look(), [], turned=90)
    assert said["description"] == "Turned upright: a dog is running through the grass."
    long = combine(CAPTION, "high", False, Look(text=text(["word " * 40], coverage=0.5)), [])
    assert len(long["alt_text"]) <= ALT_TEXT_MAX < len(long["description"])


class UpsideDownPhoto:
    """A photo check whose upright head is sure the photo is upside down."""
    def scores_of(self, measures, pooled):
        return {"blur": 0.1, "rotated": 0.9}

    def problems(self, scores):
        return [{"problem": "rotated", "score": 0.9, "hint": HINTS["rotated"]}]


def test_a_photo_on_its_side_is_said_to_be_turned_only_where_it_was():
    left = answer(UpsideDownPhoto(), Look(), [0.0], CAPTION, "high", False)  # turned=0, as evaluate.py describes
    assert "turned" not in left["description"].lower() and "hold the phone upright" in left["description"]
    assert left["retake_hint"] in left["description"] and "turned" not in left["retake_hint"].lower()
    assert left["photo_problems"] == [{"problem": "rotated", "score": 0.9}] and left["turned"] == 0
    turned = answer(UpsideDownPhoto(), Look(), [0.0], CAPTION, "high", False, turned=180)
    assert turned["description"] == "Turned upright: a dog is running through the grass."


CAN = {"name": "a can", "score": 0.82, "level": "medium"}


def test_a_thing_is_named_where_the_caption_is_unsure_and_never_nothing_recognisable():
    alone = combine(CAPTION, "low", True, Look(), [], thing=CAN)
    assert alone["description"] == "Probably a can." and alone["retake_hint"] is None
    blurred = combine(CAPTION, "low", False, Look(), [BLUR], thing=CAN)
    assert blurred["description"] == f"Probably a can. {BLUR['hint']}"  # not the low caption, not "Nothing ..."
    read = combine(CAPTION, "low", True, Look(text=text(["Crushed Tomatoes"], coverage=0.05)), [], thing=CAN)
    assert read["description"] == "Probably a can. Text: Crushed Tomatoes."
    sure = combine(CAPTION, "high", False, Look(), [], thing={"name": "a dog", "score": 0.9, "level": "medium"})
    assert sure["description"] == "A dog is running through the grass."  # the sure caption says it better


class DarkPhoto:
    """A photo check that finds the photo too dark (a lit screen in a dark room scores so)."""
    def scores_of(self, measures, pooled):
        return {"dark": 0.9, "blur": 0.1}

    def problems(self, scores):
        return [DARK]


def test_a_photo_whose_text_was_read_is_not_called_too_dark():
    screen = answer(DarkPhoto(), Look(text=text(["Windows cannot repair this computer"], coverage=0.05)), None,
                    CAPTION, "low", True, thing={"name": "a computer screen", "score": 0.7, "level": "medium"})
    assert DARK["hint"] not in screen["description"] and screen["photo_problems"] == []
    assert screen["description"] == "Probably a computer screen. Text: Windows cannot repair this computer."
    assert screen["thing"]["name"] == "a computer screen" and screen["photo_scores"]["dark"] == 0.9
    unread = answer(DarkPhoto(), Look(), None, CAPTION, "low", True)
    assert unread["photo_problems"] == [{"problem": "dark", "score": 0.9}] and unread["thing"] is None
    assert unread["description"] == f"{NOTHING_SEEN} {DARK['hint']}"


def test_the_wording_is_exported_as_plain_types_and_is_the_wording_used():
    rules = json.loads(json.dumps(description.export_rules()))  # what captioner.json holds
    assert rules["abstain"] == ABSTAIN and rules["max_chars"] == ALT_TEXT_MAX and rules["nothing"] == NOTHING
    assert description.alt_text(CAPTION, "medium") == rules["hedges"]["medium"] + "a dog running through the grass."
    assert description.alt_text(CAPTION, "low").startswith(rules["hedges"]["low"])
    turned = combine(CAPTION, "high", False, Look(text=text(["STOP"])), [], turned=90)["description"]
    assert turned.startswith(rules["turned"]) and rules["text"] + "STOP." in turned
    assert description.thing_sentence(CAN) == rules["hedges"]["medium"] + "a can."


def test_what_a_person_hears_needs_no_pytorch():
    """The photo check, the things head and the wording import without PyTorch: runner.py, which has none, says
    what inference.py says."""
    code = "import sys; from captioner import photo_check, things, description; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
