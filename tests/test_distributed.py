"""torchrun with two CPU processes (gloo), on one node or two, trains the same model as one process."""

import socket
import subprocess
import sys

import pytest
import torch

from captioner.files import DataError
from tests.conftest import ROOT, copy_sample, run_script
from utils import init_distributed, load_checkpoint

# dropout 0: each process draws its own dropout masks, so only a run without dropout can match exactly
FLAGS = ["image_training.py", "--demo", "--device", "cpu", "--epochs", "2", "--dropout", "0", "--dev-images", "5"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("one")
    proc = run_script(*FLAGS, "--cache-dir", cache_dir, "--checkpoint-dir", out, "--log-dir", out / "runs")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return load_checkpoint(out / "last.pth.tar")


def assert_same_training(a, b):
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"]
    assert [h["train_loss"] for h in b["history"]] == pytest.approx([h["train_loss"] for h in a["history"]], rel=1e-5)
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
def test_two_processes_with_gloo_match_one_process(one_process, tmp_path, cache_dir):
    two = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *FLAGS,
                     "--cache-dir", cache_dir, "--checkpoint-dir", tmp_path / "two", "--log-dir", tmp_path / "runs2")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "x 2 processes" in two.stderr
    assert_same_training(one_process, load_checkpoint(tmp_path / "two" / "last.pth.tar"))
    assert len(list((tmp_path / "runs2").rglob("events.out.tfevents.*"))) == 1  # rank 0 alone logs


@pytest.mark.slow
def test_two_nodes_on_localhost_match_one_process(one_process, tmp_path, cache_dir):
    """Two torchrun launches, one process each, meeting at a c10d rendezvous: what two machines do."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
              f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=test", *FLAGS, "--cache-dir", str(cache_dir)]
    nodes = [subprocess.Popen([*launch, "--checkpoint-dir", str(tmp_path / f"node{i}"), "--log-dir",
                               str(tmp_path / f"runs{i}")], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    errs = [node.communicate(timeout=300)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], errs[0][-2000:] + errs[1][-2000:]
    written = [p for p in tmp_path.glob("node*/last.pth.tar")]
    assert len(written) == 1  # rank 0, whichever launch it was, alone writes checkpoints
    assert_same_training(one_process, load_checkpoint(written[0]))


@pytest.mark.slow
def test_an_unreadable_image_is_left_out_before_two_processes_train(tmp_path):
    """Through the CNN (--no-cache), batches of 2 images, one of the 4 training images truncated: the image store,
    which rank 0 fills once, leaves it out, so no process's share of a batch is ever empty mid-epoch."""
    data, train = copy_sample(tmp_path / "data", train=4)
    whole = (data / "Images" / train[1]).read_bytes()
    (data / "Images" / train[1]).write_bytes(whole[:len(whole) // 4])  # opens, fails while decoding
    proc = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "image_training.py",
                      "--demo", "--device", "cpu", "--data", data, "--epochs", "1", "--batch-size", "2", "--no-cache",
                      "--workers", "1", "--dev-images", "2", "--checkpoint-dir", tmp_path / "ck",
                      "--log-dir", tmp_path / "runs", "--cache-dir", tmp_path / "cache", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipping {data / 'Images' / train[1]}" in proc.stderr
    ckpt = load_checkpoint(tmp_path / "ck" / "last.pth.tar")
    # 3 readable images in batches of 2: one step; the last batch, 1 image for 2 processes, is left out
    assert ckpt["epoch"] == 1 and ckpt["step"] == 1


def test_more_processes_than_gpus_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DataError, match="torchrun started 2 processes on a node with 1 GPU"):
        init_distributed(torch.device("cuda"))
