"""The named recipes (recipes.py): the shipped stages are the commands that trained the shipped model, as its
checkpoint records them, and --demo is --recipe demo."""

import shlex

import pytest

import image_training
from captioner.recipes import RECIPES, SHIPPED_STAGES
from utils import SHIPPED_CHECKPOINT, load_checkpoint


def _flags(args):
    """The settings a parsed command line trains with: what says which recipe chose them left out, and the
    decoder by its name (--attention is its old spelling)."""
    return {k: v for k, v in vars(args).items() if k not in ("recipe", "demo", "attention")}


@pytest.mark.parametrize("stage", range(len(SHIPPED_STAGES)), ids=SHIPPED_STAGES)
def test_each_shipped_recipe_is_the_command_that_trained_that_stage(stage):
    recorded = load_checkpoint(SHIPPED_CHECKPOINT)["trained_with"]
    assert len(recorded) == len(SHIPPED_STAGES)
    argv = shlex.split(recorded[stage])
    assert argv[:2] == ["python", "image_training.py"]
    data = argv[argv.index("--data") + 1]
    as_trained = image_training.parse_args(argv[2:])
    from_recipe = image_training.parse_args(["--recipe", SHIPPED_STAGES[stage], "--data", data])
    assert _flags(from_recipe) == _flags(as_trained)


def test_demo_is_the_demo_recipe_and_flags_given_still_win():
    demo, recipe = image_training.parse_args(["--demo"]), image_training.parse_args(["--recipe", "demo"])
    assert _flags(demo) == _flags(recipe)
    assert demo.save_every == 0 and demo.checkpoint_dir == RECIPES["demo"]["checkpoint_dir"]  # best and last only
    assert image_training.parse_args(["--demo", "--epochs", "2", "--save-every", "1"]).epochs == 2


def test_a_recipe_that_contradicts_demo_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        image_training.parse_args(["--demo", "--recipe", "shipped-word"])
    assert e.value.code == 2 and "--demo is --recipe demo, not --recipe shipped-word" in capsys.readouterr().err
