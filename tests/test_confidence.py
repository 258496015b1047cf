"""Confidence and alt text: the signals, the fit, the levels, the wording, and the shipped model's calibration."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import evaluate
from captioner.confidence import (
    LEVELS,
    SIGNALS,
    Calibration,
    calibration_error,
    captions_with_signals,
    decoder_signals,
    pooled_features,
    pooled_mean,
)
from captioner.describe import Captioner
from captioner.description import ABSTAIN, ALT_TEXT_MAX, alt_text, sentence
from captioner.ensemble import Ensemble
from captioner.search import generate
from image_intial_model import CNN_RNN, ModelArgs
from image_loader import load_image, resize_pil
from tests.conftest import SAMPLE, run_script
from utils import SHIPPED_CHECKPOINT, load_checkpoint

PHOTO = SAMPLE / "Images" / "3258874419_23fec1bdc1.jpg"  # a racing greyhound


def test_sentence_undoes_the_tokeniser_and_capitalises():
    assert sentence("a dog runs through the grass .") == "A dog runs through the grass."
    assert sentence("a man in a red t - shirt , smiling .") == "A man in a red t-shirt, smiling."
    assert sentence('a boy \'s " toy " is n\'t here') == "A boy's toy isn't here."
    assert sentence("") == ""


def test_alt_text_is_worded_by_level_and_fits_an_alt_attribute():
    caption = "a dog is running through the grass ."
    assert alt_text(caption, "high") == "A dog is running through the grass."
    assert alt_text(caption, "medium") == "Probably a dog running through the grass."
    assert alt_text(caption, "low") == "Hard to tell; perhaps a dog running through the grass."
    assert alt_text(caption, None) == "A dog is running through the grass."  # no calibration: no hedge to give
    assert alt_text(caption, "high", unfamiliar=True) == ABSTAIN
    long = alt_text(" ".join(["dog"] * 60) + " .", "medium")
    assert len(long) <= ALT_TEXT_MAX and long.endswith("…") and " " in long


def _synthetic(n=600, seed=0):
    """Signals where the caption's mean word log-probability decides how likely it is to be good."""
    g = torch.Generator().manual_seed(seed)
    decoder = torch.randn(n, len(SIGNALS) - 1, generator=g)
    p = torch.sigmoid(2 * decoder[:, 0])
    good = torch.rand(n, generator=g) < p
    pooled = torch.nn.functional.normalize(torch.randn(n, 16, generator=g) + 3, dim=1)
    bank = torch.nn.functional.normalize(torch.randn(50, 16, generator=g) + 3, dim=1)
    return decoder, pooled, good, bank


def test_fit_is_calibrated_ordered_and_survives_a_safe_checkpoint(tmp_path):
    decoder, pooled, good, bank = _synthetic()
    fit = Calibration.fit(decoder, pooled, good, bank, {"fitted_on": "synthetic"})
    torch.save({"calibration": fit.state}, tmp_path / "c.pth")
    fit = Calibration(torch.load(tmp_path / "c.pth", weights_only=True)["calibration"])  # plain types only
    test_decoder, test_pooled, test_good, _ = _synthetic(seed=1)
    confidence, levels, unfamiliar = fit.assess(test_decoder, test_pooled)
    assert confidence.min() >= 0 and confidence.max() <= 1 and unfamiliar.float().mean() < 0.05
    assert fit.state["weights"][0] > 1  # it found the signal that matters
    assert calibration_error(confidence, test_good) < 0.08
    rates = [test_good[torch.tensor([v == level for v in levels])].float().mean() for level in LEVELS]
    assert rates[0] < rates[1] < rates[2]
    assert sorted(fit.state["thresholds"].values()) == [fit.state["thresholds"]["medium"],
                                                        fit.state["thresholds"]["high"]]


def test_a_photo_unlike_the_bank_gets_no_confidence():
    decoder, pooled, good, bank = _synthetic()
    fit = Calibration.fit(decoder, pooled, good, bank, {})
    odd = torch.nn.functional.normalize(torch.randn(4, 16) - 3, dim=1)  # pointing away from every real photo
    confidence, levels, unfamiliar = fit.assess(decoder[:4], odd)
    assert unfamiliar.all() and (confidence == 0).all() and levels == ["low"] * 4


def test_calibration_error_counts_each_bin_by_its_photos():
    confidence = torch.tensor([0.05, 0.05, 0.95, 0.95])
    assert calibration_error(confidence, torch.tensor([False, False, True, True])) == pytest.approx(0.05)
    assert calibration_error(confidence, torch.tensor([True, True, False, False])) == pytest.approx(0.95)


@pytest.mark.slow
@pytest.mark.parametrize("attention", [False, True])
def test_signals_come_with_the_captions_that_generate_gives(attention):
    torch.manual_seed(0)
    model = CNN_RNN(ModelArgs(vocab_size=30, encoder="efficientnet_lite0", embed_size=16, hidden_size=16,
                              decoder="attention" if attention else "plain"), weights=None).eval()
    x = torch.randn(3, 3, 64, 64)
    for net in (model, Ensemble([model, model])):
        ids, best, decoder, pooled = captions_with_signals(net, x, beam=3, max_len=6, n_best=2)
        assert ids == generate(net, x, max_len=6, beam=3) and [len(b) for b in best] == [2, 2, 2]
        assert decoder.shape == (3, len(SIGNALS) - 1) and torch.isfinite(decoder).all()
        assert (decoder[:, 0] <= 0).all() and (decoder[:, 1] <= decoder[:, 0] + 1e-6).all()  # log-probabilities
        # the CNN's pooled feature as it gives it (the mean of its map): things.py reads it so, the fits at unit length
        torch.testing.assert_close(pooled, pooled_mean(model.encoderCNN.extract(x)))
        assert ((decoder[:, 4] > 0) == attention).all()  # the attention's spread, where there is attention


def test_signals_of_captions_of_different_lengths_are_each_their_own():
    torch.manual_seed(0)
    model = CNN_RNN(ModelArgs(vocab_size=30, encoder="efficientnet_lite0", embed_size=16, hidden_size=16,
                              decoder="attention"), weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    feats = model.encoderCNN.extract(x)
    ids = [[5, 6, 7, 8, 9], [5]]  # the second is padded in the batch
    both = decoder_signals(model, feats, True, ids)
    alone = torch.cat([decoder_signals(model, feats[i:i + 1], True, ids[i:i + 1]) for i in range(2)])
    assert torch.isfinite(both).all() and torch.allclose(both, alone, atol=1e-5)
    assert both[:, 3].tolist() == [5, 1]


# ---------------------------------------------------------------------------------- the shipped model

def _blank_and_noise():
    rng = np.random.default_rng(0)
    text = Image.new("RGB", (800, 600), "white")
    draw = ImageDraw.Draw(text)
    for y in range(10, 600, 20):
        draw.text((10, y), "Quarterly report: revenue, costs and the outlook for the next year", fill="black")
    return {"black": Image.new("RGB", (500, 375)), "white wall": Image.new("RGB", (500, 375), (235, 230, 220)),
            "noise": Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)), "text": text}


@pytest.fixture(scope="module")
def shipped():
    if "calibration" not in load_checkpoint(SHIPPED_CHECKPOINT):
        pytest.fail("the shipped model carries no confidence calibration (evaluate.py --calibrate)")
    return Captioner(SHIPPED_CHECKPOINT)


@pytest.mark.slow
def test_shipped_model_says_photos_of_nothing_are_low_and_never_reads_their_caption_aloud(shipped):
    odd = _blank_and_noise()
    for name, r in zip(odd, shipped.describe_batch(list(odd.values()))):
        assert r["confidence_level"] == "low" and r["confidence"] == 0, (name, r)
        assert r["caption"].rstrip(" .") not in r["description"].lower() and r["description"] != ABSTAIN, (name, r)
        # a page of text is read (legible print is no photo of nothing to the reader); the rest say nothing is there
        # (which of its 30 lines of 10-pixel bitmap print come out with a stray space, "re port", varies with the
        # resampling: what matters is that the page is read)
        said = ("Text: Quarterly re",) if name == "text" else ("Nothing recognisable.", "No reliable description: ")
        assert r["description"].startswith(said), (name, r)
    assert [p["problem"] for p in shipped.describe_batch([odd["black"]])[0]["photo_problems"]][0] == "dark"
    real = shipped.describe_batch([shipped.load(PHOTO)])[0]
    assert real["caption"] == shipped.caption(PHOTO) and real["confidence"] > 0
    assert real["alt_text"].rstrip(".").lower().endswith(real["caption"].rstrip(" .").split()[-1])


@pytest.mark.slow
def test_inference_alt_text_and_json_in_a_fresh_process(tmp_path):
    proc = run_script("inference.py", PHOTO, "--alt-text")
    assert proc.returncode == 0, proc.stderr
    name, text = proc.stdout.strip().split(": ", 1)
    assert name.endswith(PHOTO.name) and text[0].isupper() and text.endswith(".") and " ." not in text
    proc = run_script("inference.py", PHOTO, "--json", "--n-best", "2")
    r = json.loads(proc.stdout)[0]
    assert {"caption", "alt_text", "confidence", "confidence_level", "n_best"} <= r.keys()
    assert 0 <= r["confidence"] <= 1 and r["confidence_level"] in LEVELS and r["alt_text"] == text
    assert r["n_best"][0]["caption"] == r["caption"]


@pytest.mark.slow
def test_a_folder_of_photos_shows_a_progress_bar(tmp_path):
    for i in range(6):
        Image.open(PHOTO).save(tmp_path / f"{i}.jpg")
    proc = run_script("inference.py", tmp_path, "--beam", "1")
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 6
    assert "6/6" in proc.stderr and "photo" in proc.stderr


# ---------------------------------------------------------------------------------- phone photos

def test_a_12_megapixel_jpeg_is_decoded_at_a_reduced_scale_and_looks_the_same():
    big = Image.open(PHOTO).resize((4032, 3024), Image.Resampling.BICUBIC)
    data = io.BytesIO()
    big.save(data, "JPEG", quality=92)
    full = resize_pil(load_image(io.BytesIO(data.getvalue())), 240).float()
    reduced = load_image(io.BytesIO(data.getvalue()), size=240)
    assert reduced.size == (504, 378)  # DCT scaling by 1/8: still above 240 each way
    assert (resize_pil(reduced, 240).float() - full).abs().mean() < 2  # grey levels of 255


def test_heic_photos_open(tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif")
    photo = Image.open(PHOTO)
    pillow_heif.from_pillow(photo).save(tmp_path / "phone.heic", quality=90)
    opened = load_image(tmp_path / "phone.heic")
    assert opened.size == photo.size
    assert np.abs(np.asarray(opened, dtype=float) - np.asarray(photo, dtype=float)).mean() < 6


@pytest.mark.slow
def test_calibrate_writes_a_fit_into_the_checkpoint_and_refuses_test(demo_run, tmp_path):
    from tests.conftest import copy_sample

    data, _ = copy_sample(tmp_path / "data", train=20, dev=20)
    ckpt = tmp_path / "model.pth"
    ckpt.write_bytes((demo_run / "checkpoints" / "last.pth.tar").read_bytes())
    proc = run_script("evaluate.py", "--calibrate", "--checkpoint", ckpt, "--data", data, "--split", "test")
    assert proc.returncode == 2 and "dev" in proc.stderr and "Traceback" not in proc.stderr
    args = evaluate.get_args_parser().parse_args(["--calibrate", "--checkpoint", str(ckpt), "--data", str(data),
                                                  "--split", "dev", "--beam", "1", "--workers", "1",
                                                  "--out", str(tmp_path / "eval")])
    table = evaluate.main(args)["reliability"]
    assert sum(row["photos"] for row in table["levels"].values()) == 20
    state = load_checkpoint(ckpt)["calibration"]
    assert state["signals"] == list(SIGNALS) and state["bank"].shape == (20, 1280)
    r = Captioner(ckpt).describe_batch([load_image(PHOTO)])[0]
    assert r["confidence_level"] in LEVELS and 0 <= r["confidence"] <= 1
    assert pooled_features(torch.randn(2, 5, 7)).shape == (2, 7)


def test_a_release_keeps_the_confidence_calibration_the_photo_check_and_the_things_fit(shipped, tmp_path):
    from export import release

    path = release(SHIPPED_CHECKPOINT, tmp_path / "release", half=True)
    assert load_checkpoint(path)["calibration"]["weights"] == shipped.calibration.state["weights"]
    assert load_checkpoint(path)["photo_check"].keys() == load_checkpoint(SHIPPED_CHECKPOINT)["photo_check"].keys()
    # the shipped CNN is stored in fp16 already: the half release's is the same, and so its things fit still holds
    assert Captioner(path, read_text=False).things.state["thresholds"] == shipped.things.state["thresholds"]
