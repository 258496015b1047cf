"""The code as a learner reads it: the model file holds the core in reading order and nothing else, the training
loop's step fits on a page, and no function is longer than one can read at once."""

import ast

from tests.conftest import ROOT

MODEL_FILE = ROOT / "image_intial_model.py"
LONGEST_FUNCTION = 60  # lines
MODEL_FILE_LINES = 350


def functions(path):
    return [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_function_is_longer_than_one_reads_at_once():
    long = [f"{path.name}:{f.name} ({f.end_lineno - f.lineno + 1} lines)"
            for path in sorted(ROOT.glob("*.py")) for f in functions(path)
            if f.end_lineno - f.lineno + 1 > LONGEST_FUNCTION]
    assert not long


def test_the_model_file_is_the_core_in_reading_order():
    text = MODEL_FILE.read_text()
    assert len(text.splitlines()) <= MODEL_FILE_LINES
    tree = ast.parse(text)
    defined = [n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))]
    order = ["ModelArgs", "CNN_encoder", "RNN_decoder", "AttentionDecoder", "TopDownDecoder", "CNN_RNN",
             "greedy_search"]
    assert [name for name in defined if name in order] == order
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in (n.names if isinstance(n, ast.Import) else [ast.alias(n.module or "")])}
    assert not imported & {"runtimes", "onnxruntime", "ensemble", "utils"}  # the machinery lives elsewhere
    names = {n.attr if isinstance(n, ast.Attribute) else n.id for n in ast.walk(tree)
             if isinstance(n, (ast.Attribute, ast.Name))}
    assert not [name for name in names if "runtime" in name]  # no runtime hook for others to set on the model


def test_train_one_epoch_shows_the_step_on_one_page():
    [step] = [f for f in functions(ROOT / "image_training.py") if f.name == "train_one_epoch"]
    assert step.end_lineno - step.lineno + 1 <= 40
    body = ast.unparse(step)
    for call in ("objective(model, batch", ".backward()", ".step(optimizer)", "zero_grad"):
        assert call in body, call
