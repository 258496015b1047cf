"""Exports caption like the PyTorch model, and the ONNX runner needs no PyTorch."""

import json
import re
import shutil

import pytest
import torch

import evaluate
import export
from captioner import exporting
from captioner.backbones import preprocessing
from captioner.describe import Captioner
from captioner.images import IMAGE_SUFFIXES
from captioner.images import IMAGE_SUFFIXES as RUNNER_SUFFIXES
from captioner.runner import Runner
from image_intial_model import CNN_RNN, ModelArgs
from image_loader import SPECIALS, Vocab
from tests.conftest import SAMPLE, run_script
from utils import checkpoint_state, save_checkpoint

PHOTOS = [SAMPLE / "Images" / n for n in ("2364096157_eb7970a69a.jpg", "1022454332_6af2c1449a.jpg",
                                          "2935986346_29df6cf692.jpg", "3256043809_47258e0b3e.jpg",
                                          "101669240_b2d3e7f17b.jpg")]
WITHOUT_TORCH = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['export.py'] + sys.argv[1:]; "
                 "runpy.run_path('export.py', run_name='__main__')")


@pytest.fixture(scope="module")
def onnx_export(demo_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    checkpoint = demo_run / "checkpoints" / "last.pth.tar"
    proc = run_script("export.py", "--checkpoint", checkpoint, "--format", "onnx", "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("beam", [1, 3])
def test_onnx_runner_without_pytorch_captions_like_pytorch(onnx_export, beam):
    out, checkpoint = onnx_export
    proc = run_script("-c", WITHOUT_TORCH, "--check", out, *PHOTOS, "--beam", beam, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout)
    captioner = Captioner(checkpoint)
    assert [r["caption"] for r in rows] == [captioner.caption(p, beam=beam) for p in PHOTOS]
    assert all(r["description"] for r in rows)  # the whole description, without PyTorch


@pytest.mark.slow
def test_check_reports_latency_next_to_pytorch(onnx_export):
    out, checkpoint = onnx_export
    proc = run_script("export.py", "--check", out, PHOTOS[0], "--compare", checkpoint)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"\[caption: [^\]]+, \d+ ms\]  \(PyTorch \d+ ms, same\)", proc.stdout), proc.stdout


@pytest.mark.slow
def test_torchscript_export_and_an_attention_model(tmp_path):
    torch.manual_seed(0)
    vocab = Vocab(SPECIALS + [f"w{i}" for i in range(30)])
    model = CNN_RNN(ModelArgs(vocab_size=len(vocab), encoder="efficientnet_lite0", embed_size=32, hidden_size=32,
                              decoder="attention", attention_dim=16), weights="random").eval()
    checkpoint = tmp_path / "attention.pth.tar"
    save_checkpoint(checkpoint_state(model, vocab, preprocessing("efficientnet_lite0")), checkpoint)
    captioner = Captioner(checkpoint)
    for fmt in ("onnx", "torchscript"):
        exporting.export(checkpoint, fmt, tmp_path / fmt)
        runner = Runner(tmp_path / fmt)
        for beam in (1, 3):
            assert [runner.caption(p, beam) for p in PHOTOS[:3]] == [captioner.caption(p, beam) for p in PHOTOS[:3]]


@pytest.mark.slow
def test_an_ensemble_exports_and_captions_like_pytorch(tmp_path):
    """A plain and an attention model (each with its own CNN) as one export: their states travel flat."""
    vocab, paths = Vocab(SPECIALS + [f"w{i}" for i in range(30)]), []
    for seed, attention in ((0, False), (1, True)):
        torch.manual_seed(seed)
        model = CNN_RNN(ModelArgs(vocab_size=len(vocab), encoder="efficientnet_lite0", embed_size=32,
                                  hidden_size=32, decoder="attention" if attention else "plain",
                                  attention_dim=16), weights="random").eval()
        paths.append(tmp_path / f"model{seed}.pth.tar")
        save_checkpoint(checkpoint_state(model, vocab, preprocessing("efficientnet_lite0")), paths[-1])
    captioner = Captioner(paths)
    for fmt in ("onnx", "torchscript"):
        exporting.export(paths, fmt, tmp_path / fmt)
        runner = Runner(tmp_path / fmt)
        assert len(runner.axes) == 2 + 4  # (h, c) of the plain decoder, then the attention decoder's four
        for beam in (1, 3):
            assert [runner.caption(p, beam) for p in PHOTOS[:3]] == [captioner.caption(p, beam) for p in PHOTOS[:3]]


@pytest.mark.slow
def test_check_of_a_folder_without_an_export_is_one_line(tmp_path):
    proc = run_script("export.py", "--check", tmp_path, PHOTOS[0])
    assert proc.returncode == 1 and "holds no export" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_check_reads_files_and_folders_as_inference_does(onnx_export, tmp_path):
    """A folder is captioned image by image; a bad file, a missing one and a folder with no images each get one
    line on stderr, the others are still captioned, and the exit status is 1 (with PyTorch unimportable)."""
    out, _ = onnx_export
    photos, empty = tmp_path / "photos", tmp_path / "empty"
    photos.mkdir()
    empty.mkdir()
    (photos / "a_notes.jpg").write_text("not an image")
    shutil.copy(PHOTOS[0], photos / "b_dog.jpg")
    (photos / "c_readme.txt").write_text("not an image file name: not listed")
    proc = run_script("-c", WITHOUT_TORCH, "--check", out, photos, tmp_path / "missing.jpg", empty, PHOTOS[1],
                      "--beam", "1")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert [line.split(": ", 1)[0] for line in proc.stdout.splitlines()] == [str(photos / "b_dog.jpg"), str(PHOTOS[1])]
    assert proc.stderr.splitlines() == [f"error: {photos / 'a_notes.jpg'}: not an image Pillow can read",
                                        f"error: {tmp_path / 'missing.jpg'}: no such file",
                                        f"error: {empty}: folder holds no images"]


def test_the_image_suffixes_are_image_loaders():
    assert RUNNER_SUFFIXES == IMAGE_SUFFIXES


def test_checkpoint_takes_one_path_and_repeats_for_an_ensemble():
    assert export.get_args_parser().parse_args(["--checkpoint", "a", "--checkpoint", "b"]).checkpoint == ["a", "b"]
    assert evaluate.get_args_parser().parse_args(["--checkpoint", "a", "--checkpoint", "b", "--data", "d"]
                                                 ).checkpoint == ["a", "b"]


def test_help_describes_every_format_with_nothing_left_to_find():
    text = export.get_args_parser().format_help()
    assert "see above" not in text and "A release (`--format release`)" in text
    assert "python export.py --check export/ photo.jpg" in text
