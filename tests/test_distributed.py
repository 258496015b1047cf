"""torchrun with two CPU processes (gloo) trains the same model as one process."""

import pytest
import torch

from tests.conftest import run_script
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
