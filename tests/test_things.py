"""things.py: what the thing in a photo is. A name is said only where the fit is sure; a photo split between two close
groups gets the broader name; classes in no group are never named; a stale fit is refused in one line; the shipped
model names a generated computer screen, whose text is read and which is not called too dark."""

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from captioner import things
from captioner.description import thing_sentence

DOG, MONITOR, TELEVISION, LAMPSHADE = 207, 664, 851, 619  # golden retriever; monitor; television; lampshade
F = 1000  # the test's feature width: one feature per ImageNet class


def state(**thresholds):
    """A fit whose classifier is the identity (feature i is class i's logit) and whose calibration is the
    probability itself (the logit signal passes through a sigmoid unchanged)."""
    calibration = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "weights": [1.0, 0.0, 0.0], "bias": 0.0}
    return things.make_state(torch.eye(F), torch.zeros(F), calibration, {"medium": 0.7, "high": 0.95, **thresholds},
                             cnn="test")


def photo(**logits):
    """A pooled feature [1, F] whose classifier logits put the given classes ahead of the 1000 (log-odds)."""
    x = torch.zeros(1, F)
    for index, value in logits.items():
        x[0, int(index[1:])] = value
    return x


def test_a_sure_class_is_named_by_its_group_at_its_level():
    head = things.Things(state())
    (dog,) = head.assess(photo(c207=12.0))  # e^12 against 999 others: about 0.99
    assert dog["name"] == "a dog" and dog["level"] == "high" and dog["score"] > 0.95
    assert thing_sentence(dog) == "A dog."
    (medium,) = head.assess(photo(c207=8.5))  # about 0.83: named, as a guess
    assert medium["level"] == "medium" and thing_sentence(medium) == "Probably a dog."


def test_a_photo_split_between_close_groups_gets_the_broader_name():
    (screen,) = things.Things(state()).assess(photo(c664=8.0, c851=8.0))  # monitor and television, 0.44 each
    assert screen["name"] == "a screen"


def test_unsure_or_ungrouped_photos_are_not_named():
    head = things.Things(state())
    assert head.assess(photo()) == [None]  # all classes alike
    assert head.assess(photo(c207=5.0)) == [None]  # a dog at 0.13: not sure
    assert head.assess(photo(c619=14.0)) == [None]  # a lampshade: in no group
    assert thing_sentence(None) is None


def test_the_exported_rules_rebuild_the_same_head_without_pytorch():
    """export_rules' plain types (captioner.json's "things") and fp16 weight (things.f16) make the same head: the
    same names, scores and levels, for NumPy or PyTorch features alike."""
    head = things.Things(state())
    rules, weight = things.export_rules(head)
    rules = json.loads(json.dumps(rules))
    assert weight.dtype == np.float16 and rules["classifier"]["shape"] == [1000, F] == list(weight.shape)
    assert rules["names"] == things.names() and len(rules["classes"]) == len(rules["names"])
    assert rules["classes"][rules["names"].index("a dog")] == list(range(151, 269))
    rebuilt = things.Things.from_rules(rules, weight)
    photos = torch.cat([photo(c207=12.0), photo(c207=8.5), photo(c664=8.0, c851=8.0), photo(c619=14.0), photo()])
    assert rebuilt.assess(photos.numpy()) == head.assess(photos) == head.assess(photos.numpy())
    assert [d and d["name"] for d in head.assess(photos)] == ["a dog", "a dog", "a screen", None, None]


def test_a_stale_fit_is_refused_in_one_line():
    stale = {**state(), "table": "0123456789abcdef"}
    with pytest.raises(things.ThingsError) as e:
        things.Things(stale)
    assert "\n" not in str(e.value) and "refit" in str(e.value)


@pytest.mark.slow
def test_the_shipped_model_names_a_screen_reads_it_and_does_not_call_it_dark(tmp_path):
    from captioner.describe import Captioner
    from utils import SHIPPED_CHECKPOINT

    pytest.importorskip("rapidocr")
    captioner = Captioner(SHIPPED_CHECKPOINT)
    path = tmp_path / "monitor.jpg"
    monitor_in_a_dark_room().save(path)
    image = captioner.load(path)
    said = captioner.describe_batch([image], looks=[captioner.look(image)])[0]
    assert said["thing"]["name"] in ("a screen", "a computer screen", "a web page"), said
    assert "windows cannot repair this computer" in " ".join(said["text"]).lower(), said
    assert "dark" not in [p["problem"] for p in said["photo_problems"]] and "too dark" not in said["description"]
    assert said["description"].startswith(("Probably a", "A ")), said


def monitor_in_a_dark_room():
    """A lit monitor on a dark desk showing an error window: dark around, bright where the text is."""
    im = Image.new("RGB", (1024, 768), (40, 35, 30))
    draw, font = ImageDraw.Draw(im), ImageFont.load_default(size=20)
    draw.rectangle((150, 100, 874, 560), fill=(15, 15, 15))  # the monitor's bezel
    draw.rectangle((172, 120, 852, 540), fill=(0, 90, 170))  # its screen
    draw.rectangle((172, 120, 852, 150), fill=(220, 220, 220))  # a window's title bar
    draw.text((184, 124), "Windows Setup", font=font, fill=(0, 0, 0))
    for i, line in enumerate(["Windows cannot repair this computer", "automatically.", "Insert the Password Reset Disk",
                              "and press Enter to continue."]):
        draw.text((200, 200 + 40 * i), line, font=font, fill=(255, 255, 255))
    draw.rectangle((470, 560, 554, 650), fill=(20, 20, 20))  # its stand
    draw.rectangle((380, 650, 644, 670), fill=(20, 20, 20))
    return im
