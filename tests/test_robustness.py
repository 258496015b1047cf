"""Bad input gets one clear line, work is never lost, and nothing runs that should not."""

import importlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import image_training
from captioner.files import DataError
from image_loader import SPECIALS, Vocab, load_image
from tests.conftest import ROOT, SAMPLE, copy_sample, run_script, train_args
from utils import load_checkpoint

PHOTO = SAMPLE / "Images" / "2364096157_eb7970a69a.jpg"


def make_bad_and_odd_images(folder):
    """Every kind of file a phone or a folder may hold; returns {name: expected error text or None}."""
    folder.mkdir()
    photo = Image.open(PHOTO)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not a photo")
    data = PHOTO.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[:len(data) // 3])
    photo.convert("CMYK").save(folder / "cmyk.jpg")
    photo.convert("L").save(folder / "grey.jpg")
    Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257).save(folder / "deep16.png")
    photo.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    photo.transpose(Image.Transpose.ROTATE_90).save(folder / "rotated.jpg", exif=exif)
    Image.new("1", (12000, 8000)).save(folder / "huge.png")  # 96 million pixels
    return {"empty.jpg": "not an image", "text.jpg": "not an image", "truncated.jpg": "unreadable image",
            "huge.png": "too large", "cmyk.jpg": None, "grey.jpg": None, "deep16.png": None, "palette.png": None,
            "rgba.png": None, "rotated.jpg": None}


@pytest.mark.slow
def test_inference_captions_good_images_and_reports_each_bad_one(demo_run, tmp_path):
    expected = make_bad_and_odd_images(tmp_path / "inbox")
    proc = run_script("inference.py", tmp_path / "inbox", tmp_path / "missing.jpg", "--json",
                      "--checkpoint", demo_run / "checkpoints" / "last.pth.tar")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    results = {r["image"].rsplit("/", 1)[-1]: r for r in json.loads(proc.stdout)}
    assert "no such file" in results["missing.jpg"]["error"]
    for name, error in expected.items():
        if error is None:
            assert results[name]["caption"], name
        else:
            assert error in results[name]["error"], name


def test_odd_images_load_as_the_photo_a_person_sees(tmp_path):
    make_bad_and_odd_images(tmp_path / "x")
    upright = np.asarray(Image.open(PHOTO).convert("RGB"), dtype=float)
    rotated = np.asarray(load_image(tmp_path / "x" / "rotated.jpg"), dtype=float)
    assert rotated.shape == upright.shape and np.abs(rotated - upright).mean() < 8  # upright again (JPEG noise)
    deep = np.asarray(load_image(tmp_path / "x" / "deep16.png"), dtype=float)
    grey = np.asarray(Image.open(PHOTO).convert("L"), dtype=float)
    assert np.abs(deep[..., 0] - grey).max() <= 1  # 16 bits scaled down, not clipped to white
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    clear.save(tmp_path / "clear.png")
    assert np.asarray(load_image(tmp_path / "clear.png")).min() == 255  # transparency over white
    with pytest.raises(DataError, match="is a folder"):
        load_image(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("script, flags, message", [
    ("inference", ["--beam", "0"], "argument --beam: must be > 0, got 0"),
    ("inference", ["--max-len", "-3"], "argument --max-len: must be > 0, got -3"),
    ("inference", ["--vocab", "OTHER"], "is not the vocabulary"),
    ("evaluate", ["--batch-size", "0", "--data", str(SAMPLE)], "argument --batch-size: must be > 0, got 0"),
    ("export", ["--beam", "0", "--check", "x"], "argument --beam: must be > 0, got 0"),
    ("tools.bench", ["--workers", "0"], "argument --workers: must be > 0, got 0"),
])
def test_scripts_refuse_bad_flags_up_front(demo_run, tmp_path, capsys, script, flags, message):
    """In this process (each script's cli): argparse's refusals exit 2, the others return 1; one line each."""
    Vocab(SPECIALS + ["other", "words"]).save(tmp_path / "other.pkl")
    flags = [str(tmp_path / "other.pkl") if f == "OTHER" else f for f in flags]
    checkpoint = str(demo_run / "checkpoints" / "last.pth.tar")
    args = {"inference": [str(PHOTO), "--checkpoint", checkpoint], "evaluate": ["--checkpoint", checkpoint]}
    cli = importlib.import_module(script).cli
    try:
        status = cli([*args.get(script, []), *flags])
    except SystemExit as e:  # argparse
        status = e.code
    err = capsys.readouterr().err
    assert status in (1, 2) and message in err and err.strip().splitlines()[-1].count(message) == 1


@pytest.mark.slow
@pytest.mark.parametrize("through", [[], ["--no-cache"], ["--train-cnn"]])
def test_training_skips_unreadable_images(tmp_path, caplog, through):
    data, train = copy_sample(tmp_path / "data")
    (data / "Images" / train[0]).write_text("not a photo")
    whole = (data / "Images" / train[1]).read_bytes()
    (data / "Images" / train[1]).write_bytes(whole[:len(whole) // 4])  # opens, fails while decoding
    result = image_training.main(train_args(tmp_path, tmp_path / "cache", "--data", str(data), "--epochs", "1",
                                            *through))
    assert len(result["history"]) == 1 and np.isfinite(result["history"][0]["train_loss"])
    # the feature pass, or the image store, decodes every image once, before training: both are found there
    assert "skipped 2 unreadable images" in caplog.text
    assert f"skipping {data / 'Images' / train[1]}: unreadable image" in caplog.text


@pytest.mark.slow
def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path, cache_dir, monkeypatch,
                                                                           capsys):
    calls = {"n": 0}
    real = torch.nn.CrossEntropyLoss.forward

    def sometimes_nan(self, logits, targets):
        calls["n"] += 1
        loss = real(self, logits, targets)
        return loss * float("nan") if calls["n"] > 12 else loss  # epoch 1 has 7 training + 1 dev batch

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", sometimes_nan)
    argv = ["--demo", "--epochs", "3", "--dev-images", "5", "--checkpoint-dir", str(tmp_path / "ck"),
            "--log-dir", str(tmp_path / "runs"), "--cache-dir", str(cache_dir)]
    assert image_training.cli(argv) == 1
    assert "the loss became nan" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "ck" / "last.pth.tar")["epoch"] == 1


SAVER = """
import sys, torch
sys.path.insert(0, sys.argv[2])
from utils import save_checkpoint
state = {"weights": torch.randn(4_000_000), "step": 0}
print("ready", flush=True)
while True:
    state["step"] += 1
    save_checkpoint(state, sys.argv[1])
"""


@pytest.mark.slow
def test_sigkill_mid_save_leaves_the_last_checkpoint_loadable(tmp_path):
    path = tmp_path / "last.pth.tar"
    steps = []
    for delay in (0.3, 0.45, 0.6, 0.8, 1.1):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(path), str(ROOT)], stdout=subprocess.PIPE)
        proc.stdout.readline()
        time.sleep(delay)
        proc.kill()  # SIGKILL: no cleanup, possibly in the middle of writing
        proc.wait()
        if path.exists():
            ckpt = load_checkpoint(path)
            assert ckpt["weights"].shape == (4_000_000,)
            steps.append(ckpt["step"])
    assert steps and max(steps) >= 1
    assert not [p for p in tmp_path.iterdir() if p.name != "last.pth.tar" and not p.name.startswith(".")]


def assert_same_as_uninterrupted(final, demo_run):
    straight = load_checkpoint(demo_run / "checkpoints" / "last.pth.tar")
    assert final["epoch"] == 2 and final["step"] == straight["step"] and final["progress"] is None
    assert [h["train_loss"] for h in final["history"]] == pytest.approx(
        [h["train_loss"] for h in straight["history"]], abs=1e-6)
    for k, v in straight["model"].items():
        torch.testing.assert_close(final["model"][k], v, msg=k)


def demo_cmd(tmp_path, cache_dir):
    """The demo_run fixture's training, into another folder."""
    return ["image_training.py", "--demo", "--device", "cpu", "--epochs", "2", "--dev-images", "10",
            "--save-every", "1", "--checkpoint-dir", str(tmp_path / "ck"), "--log-dir", str(tmp_path / "runs"),
            "--cache-dir", str(cache_dir)]


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_the_place_and_resume_matches_an_uninterrupted_run(demo_run, tmp_path, cache_dir,
                                                                                    monkeypatch):
    real_step, calls = torch.amp.GradScaler.step, {"n": 0}

    def step(self, *args, **kwargs):  # the optimiser's step, once per training step
        out = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 10:  # epoch 2 (7 batches each), batch 3
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(torch.amp.GradScaler, "step", step)
    argv = demo_cmd(tmp_path, cache_dir)[1:]
    assert image_training.cli(argv) == 0
    stopped = load_checkpoint(tmp_path / "ck" / "last.pth.tar")
    assert stopped["epoch"] == 1 and stopped["progress"]["batches"] == 3 and stopped["step"] == 10
    monkeypatch.setattr(torch.amp.GradScaler, "step", real_step)
    assert image_training.cli(argv + ["--resume", str(tmp_path / "ck" / "last.pth.tar")]) == 0
    assert_same_as_uninterrupted(load_checkpoint(tmp_path / "ck" / "last.pth.tar"), demo_run)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_from_outside_exits_0_and_the_run_resumes(demo_run, tmp_path, cache_dir, sig):
    cmd = [sys.executable] + demo_cmd(tmp_path, cache_dir)
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.startswith("epoch 1:"):
            proc.send_signal(sig)
            break
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, err
    assert "stopping after this step" in err and "Traceback" not in err
    ckpt = tmp_path / "ck" / "last.pth.tar"
    if load_checkpoint(ckpt)["epoch"] < 2:  # the signal came before the end: go on from where it stopped
        assert run_script(*cmd[1:], "--resume", ckpt).returncode == 0
    assert_same_as_uninterrupted(load_checkpoint(ckpt), demo_run)
