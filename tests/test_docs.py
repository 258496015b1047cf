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


def named_in(path, pattern):
    return sorted(set(re.findall(pattern, path.read_text())))


@pytest.mark.parametrize("path", [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_every_file_a_document_names_exists(path):
    """A file a document names in code quotes is there: under the path it gives, or in the folder its table names."""
    missing = [name for name in named_in(path, r"`([\w/.-]+\.(?:py|js|md|ipynb))\b")
               if not any((ROOT / folder / name).exists() for folder in ("", "docs", "web", "captioner", "tools"))]
    assert not missing, missing


def test_every_name_extending_md_gives_is_in_the_code():
    """`module.NAME` in extending.md names something that module defines."""
    import importlib

    wrong = []
    for module, name in named_in(ROOT / "docs" / "extending.md", r"`((?:captioner\.)?\w+)\.(\w+)[`(]"):
        if name != "py" and (ROOT / f"{module.replace('.', '/')}.py").exists():
            target = importlib.import_module(module)
            for part in name.split("."):
                target = getattr(target, part, None)
            wrong += [] if target is not None else [f"{module}.{name}"]
    assert not wrong, wrong


def test_extending_md_tables_are_what_the_code_reads():
    """Each row's table is where the flags and messages come from: a new line in it is the whole registration."""
    from captioner.backbones import ENCODERS
    from captioner.layouts import LAYOUT_HELP, LAYOUTS
    from captioner.recipes import RECIPES
    from captioner.runtimes import RUNTIME_CHOICES, RUNTIME_HELP, RUNTIMES
    from image_intial_model import DECODERS

    choices = {a.dest: a for a in image_training.get_args_parser()._actions}
    assert list(choices["decoder"].choices) == list(DECODERS)
    assert all(cls.help in " ".join(choices["decoder"].help.split()) for cls in DECODERS.values())
    for cls in DECODERS.values():
        assert {"help", "regions", "layers", "state_batch_axes", "start", "step", "select"} <= set(dir(cls))
    assert sorted(choices["encoder"].choices) == sorted(ENCODERS)
    assert set(choices["recipe"].choices) == set(RECIPES)
    assert ("auto", *RUNTIMES) == RUNTIME_CHOICES and all(f"{name} (" in RUNTIME_HELP for name in RUNTIMES)
    assert all(layout.help in LAYOUT_HELP and hasattr(layout, "recognises") and hasattr(layout, "read")
               for layout in LAYOUTS)


def test_every_search_in_the_table_generates_for_every_decoder():
    import torch

    from captioner.search import SEARCHES, generate
    from image_intial_model import CNN_RNN, DECODERS, ModelArgs

    torch.manual_seed(0)
    for decoder in DECODERS:
        model = CNN_RNN(ModelArgs(30, "efficientnet_lite0", embed_size=16, hidden_size=16, attention_dim=8,
                                  decoder=decoder), weights="random").eval()
        feats = torch.randn(2, 49, 1280) if model.args.attention else torch.randn(2, 1280)
        for search in SEARCHES:
            captions = generate(model, feats, max_len=5, beam=2, from_features=True, search=search)
            assert len(captions) == 2 and all(len(c) <= 5 for c in captions), (decoder, search)
