"""inference.py --write-metadata: alt text into the photo's XMP, losslessly and atomically."""

import shutil
import stat
import subprocess

import numpy as np
import pytest
from PIL import Image

from inference import read_alt_text, write_alt_text
from tests.conftest import SAMPLE, run_script

pytest.importorskip("pyexiv2")
PHOTO = SAMPLE / "Images" / "3258874419_23fec1bdc1.jpg"


def _pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_alt_text_reads_back_and_the_pixels_are_untouched(tmp_path):
    photo = tmp_path / "dog.jpg"
    shutil.copy(PHOTO, photo)
    before = _pixels(photo)
    write_alt_text(photo, "A greyhound runs on a track — fast.")
    assert read_alt_text(photo) == "A greyhound runs on a track — fast."
    assert np.array_equal(_pixels(photo), before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dog.jpg"]  # no temporary file left behind
    if shutil.which("exiftool"):  # an independent reader, as photo managers use
        out = subprocess.run(["exiftool", "-s3", "-XMP-iptcCore:AltTextAccessibility", str(photo)],
                             capture_output=True, text=True).stdout.strip()
        assert out == "A greyhound runs on a track — fast."
    write_alt_text(photo, "Another text.")  # written again: replaced, not added
    assert read_alt_text(photo) == "Another text."


def test_png_keeps_its_pixels_too(tmp_path):
    photo = tmp_path / "dog.png"
    Image.open(PHOTO).save(photo)
    write_alt_text(photo, "A dog.")
    assert read_alt_text(photo) == "A dog." and np.array_equal(_pixels(photo), _pixels(PHOTO))


@pytest.mark.slow
def test_write_metadata_reports_bad_files_in_one_line_and_writes_the_others(tmp_path):
    for name in ("a.jpg", "b.jpg", "locked.jpg"):
        shutil.copy(PHOTO, tmp_path / name)
    Image.open(PHOTO).save(tmp_path / "c.bmp")  # a format exiv2 cannot write
    (tmp_path / "locked.jpg").chmod(stat.S_IRUSR | stat.S_IRGRP)
    locked = (tmp_path / "locked.jpg").read_bytes()
    proc = run_script("inference.py", tmp_path, "--alt-text", "--write-metadata", "--beam", "1")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and any("locked.jpg: read-only" in e for e in errors)
    assert any("c.bmp" in e for e in errors)
    printed = dict(line.split(": ", 1) for line in proc.stdout.splitlines())
    for name in ("a.jpg", "b.jpg"):
        assert read_alt_text(tmp_path / name) == printed[str(tmp_path / name)]
    assert (tmp_path / "locked.jpg").read_bytes() == locked
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
