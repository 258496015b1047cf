"""torchrun with two CPU processes (gloo) trains the same model as one process."""

import pytest
import torch

from tests.conftest import SAMPLE, run_script
from utils import load_checkpoint


def test_two_processes_with_gloo_match_one_process(tmp_path, cache_dir):
    # dropout 0: each process draws its own dropout masks, so only a run without dropout can match exactly
    flags = ["image_training.py", "--demo", "--epochs", "2", "--dropout", "0", "--dev-images", "5",
             "--cache-dir", str(cache_dir)]
    one = run_script(*flags, "--checkpoint-dir", tmp_path / "one", "--log-dir", tmp_path / "runs1")
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *flags,
                     "--checkpoint-dir", tmp_path / "two", "--log-dir", tmp_path / "runs2")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "x 2 processes" in two.stderr
    a, b = load_checkpoint(tmp_path / "one" / "last.pth.tar"), load_checkpoint(tmp_path / "two" / "last.pth.tar")
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"]
    assert [h["train_loss"] for h in b["history"]] == pytest.approx(
        [h["train_loss"] for h in a["history"]], rel=1e-5)
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    assert len(list((tmp_path / "runs2").rglob("events.out.tfevents.*"))) == 1  # rank 0 alone logs


def test_a_process_whose_share_of_a_batch_is_unreadable_does_not_hang_the_others(tmp_path):
    """Through the CNN (--no-cache), batches of 2 images: one process gets the truncated JPEG alone, so its
    share of that batch is empty while the other's is not. Both must skip it, not wait for each other."""
    data = tmp_path / "data"
    (data / "Images").mkdir(parents=True)
    for f in SAMPLE.iterdir():
        if f.is_file():
            (data / f.name).write_bytes(f.read_bytes())
    train = (SAMPLE / "Flickr_8k.trainImages.txt").read_text().split()[:4]
    for name in train + (SAMPLE / "Flickr_8k.devImages.txt").read_text().split()[:2]:
        (data / "Images" / name).write_bytes((SAMPLE / "Images" / name).read_bytes())
    whole = (data / "Images" / train[1]).read_bytes()
    (data / "Images" / train[1]).write_bytes(whole[:len(whole) // 4])  # opens, fails while decoding
    proc = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "image_training.py",
                      "--demo", "--data", data, "--epochs", "1", "--batch-size", "2", "--no-cache", "--workers", "0",
                      "--dev-images", "2", "--checkpoint-dir", tmp_path / "ck", "--log-dir", tmp_path / "runs",
                      timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipping {data / 'Images' / train[1]}" in proc.stderr
    ckpt = load_checkpoint(tmp_path / "ck" / "last.pth.tar")
    assert ckpt["epoch"] == 1 and ckpt["step"] == 2  # two batches of two images: the epoch ran to its end
