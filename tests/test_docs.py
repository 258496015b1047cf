"""The documents a user reads: a README read in minutes whose commands do what it says, and no word of how the
project was run (issue numbers, commit hashes, sessions, machines by nickname)."""

import re
from pathlib import Path

import pytest

import image_training
from tests.conftest import ROOT

USER_DOCUMENTS = [ROOT / "README.md", ROOT / "RESULTS.md", *sorted((ROOT / "docs").glob("*.md"))]
# words of the project's own history, not of the tool: "issue #11", "#11", a commit hash, "box A", a session
HISTORY = re.compile(r"issue\s*#?\d+|(?<![\w&])#\d+\b|\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b"
                     r"|\bbox [AB]\b|\bsession\b", re.IGNORECASE)


def test_the_readme_is_a_short_read():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


@pytest.mark.parametrize("path", USER_DOCUMENTS, ids=lambda p: p.name)
def test_user_documents_tell_no_project_history(path):
    found = [m.group(0) for m in HISTORY.finditer(path.read_text())]
    assert not found, found


def test_the_quick_start_captions_with_the_demo_model_it_just_trained():
    """The quick start's second line trains the demo, then names the demo's checkpoint: the demo never becomes
    the model that the other commands take by default."""
    quick_start = (ROOT / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    line = next(x for x in quick_start.splitlines() if "image_training.py --demo" in x)
    demo = Path(image_training.parse_args(["--demo"]).checkpoint_dir) / "best.pth.tar"
    assert re.search(r"inference\.py --checkpoint (\S+) ", line).group(1) == demo.as_posix()
