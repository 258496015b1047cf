"""Shared fixtures: the bundled sample, the full Flickr8k where present, and one small trained run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "flickr8k_sample"
SHARED = ROOT.parent / "shared" / "flickr8k"
sys.path.insert(0, str(ROOT))


def run_script(*args, cwd=ROOT, timeout=600):
    """Run one of the project's command lines in a fresh Python process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def train_args(tmp_path, cache_dir, *extra):
    """image_training's arguments for a short run on the sample, writing under tmp_path."""
    import image_training

    return image_training.parse_args(
        ["--demo", "--dev-images", "5", "--checkpoint-dir", str(tmp_path / "ck"), "--log-dir", str(tmp_path / "runs"),
         "--cache-dir", str(cache_dir), *extra])


def copy_sample(data, train=12, dev=2):
    """A copy of the sample's files and of its first `train` training and `dev` dev images; returns
    (data folder, the training images' names)."""
    (data / "Images").mkdir(parents=True)
    for f in SAMPLE.iterdir():
        if f.is_file():
            (data / f.name).write_bytes(f.read_bytes())
    names = (SAMPLE / "Flickr_8k.trainImages.txt").read_text().split()[:train]
    for name in names + (SAMPLE / "Flickr_8k.devImages.txt").read_text().split()[:dev]:
        (data / "Images" / name).write_bytes((SAMPLE / "Images" / name).read_bytes())
    return data, names


@pytest.fixture(scope="session")
def shared_flickr8k():
    if not (SHARED / "Images").is_dir():
        pytest.skip("the full Flickr8k is not at ../shared/flickr8k")
    return SHARED


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, cache_dir):
    """Train two epochs on the sample through the command line, keeping a checkpoint every epoch; on the CPU,
    where a run is exactly reproducible, so that resumed runs can be compared with it."""
    out = tmp_path_factory.mktemp("demo")
    proc = run_script("image_training.py", "--demo", "--device", "cpu", "--epochs", 2, "--save-every", 1,
                      "--dev-images", 10, "--checkpoint-dir", out / "checkpoints", "--log-dir", out / "runs",
                      "--cache-dir", cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out
