"""inference.py's command line as a newcomer types it."""

import pytest

from tests.conftest import SAMPLE, run_script
from utils import SHIPPED_CHECKPOINT

pytestmark = pytest.mark.slow  # every test here runs a command line, a service or a browser

PHOTO = SAMPLE / "Images" / "3258874419_23fec1bdc1.jpg"


def test_checkpoint_takes_one_path_and_leaves_the_photo_alone():
    proc = run_script("inference.py", "--checkpoint", SHIPPED_CHECKPOINT, PHOTO, "--beam", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{PHOTO}: ")


def test_an_ensemble_repeats_the_flag():
    proc = run_script("inference.py", PHOTO, "--checkpoint", SHIPPED_CHECKPOINT, "--checkpoint", SHIPPED_CHECKPOINT,
                      "--beam", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{PHOTO}: ")


def test_a_folder_without_images_says_so_in_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("no photos here")
    proc = run_script("inference.py", tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        f"error: {tmp_path}: folder holds no images"]
