"""The code as a learner and an engineer read it: the seed's scripts and the commands at the root, the library in
captioner/, no module importing a command, no import cycle, no file longer than one reads in a sitting, no
function longer than one reads at once, the model file the core in reading order, and the training step on one
page with the model's call and the loss in it."""

import ast
import subprocess
import sys

from tests.conftest import ROOT

MODEL_FILE = ROOT / "image_intial_model.py"
SEED_FILES = {"image_loader.py", "image_intial_model.py", "image_training.py", "inference.py", "utils.py"}
LONGEST_FUNCTION = 60  # lines
LONGEST_FILE = 500  # lines
MODEL_FILE_LINES = 350


def sources():
    """The project's own Python files: the root's, the package's and the tools' (tests are not modules of it)."""
    return [*sorted(ROOT.glob("*.py")), *sorted((ROOT / "captioner").glob("*.py")),
            *sorted((ROOT / "tools").glob("*.py"))]


def module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_command(path):
    """A file that people run: it has an `if __name__ == "__main__":` block."""
    return any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in ast.parse(path.read_text()).body)


def imports(path, modules):
    """The project's modules that a file imports, anywhere in it (lazy imports too): `from captioner import x`
    names the submodule x where there is one, else the package."""
    out = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.Import):
            out |= {a.name for a in n.names if a.name in modules}
        elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module in modules:
            subs = {f"{n.module}.{a.name}" for a in n.names} & modules.keys()
            out |= subs or {n.module}
    return out


def import_graph():
    modules = {module_name(p): p for p in sources()}
    return modules, {name: imports(path, modules) - {name} for name, path in modules.items()}


def functions(path):
    return [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_the_root_holds_the_seeds_scripts_and_the_commands_alone():
    root = {p.name for p in ROOT.glob("*.py")}
    assert root >= SEED_FILES and len(root) <= 10, sorted(root)
    libraries = {p for p in root if not is_command(ROOT / p)}
    assert libraries <= {"image_loader.py", "image_intial_model.py", "utils.py"}, libraries  # the seed's own


def test_no_module_imports_a_command():
    modules, graph = import_graph()
    commands = {name for name, path in modules.items() if is_command(path)}
    assert {"inference", "image_training", "evaluate", "export", "serve", "tools.bench"} <= commands
    wrong = sorted(f"{a} imports {b}" for a, deps in graph.items() for b in deps & commands)
    assert not wrong, wrong


def test_no_import_cycle():
    _, graph = import_graph()
    done, path, cycles = set(), [], []

    def visit(name):
        if name in path:
            cycles.append(path[path.index(name):] + [name])
            return
        if name in done:
            return
        path.append(name)
        for dep in sorted(graph.get(name, ())):
            visit(dep)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
    assert not cycles, cycles


def test_no_file_is_longer_than_one_reads_in_a_sitting():
    everything = [*sources(), *sorted((ROOT / "tests").glob("*.py"))]
    long = [f"{p.relative_to(ROOT)} ({n} lines)" for p in everything
            if (n := len(p.read_text().splitlines())) > LONGEST_FILE]
    assert not long


def test_no_function_is_longer_than_one_reads_at_once():
    long = [f"{path.relative_to(ROOT)}:{f.name} ({f.end_lineno - f.lineno + 1} lines)"
            for path in sources() for f in functions(path) if f.end_lineno - f.lineno + 1 > LONGEST_FUNCTION]
    assert not long


def test_the_model_file_is_the_core_in_reading_order():
    text = MODEL_FILE.read_text()
    assert len(text.splitlines()) <= MODEL_FILE_LINES
    tree = ast.parse(text)
    defined = [n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))]
    order = ["ModelArgs", "CNN_encoder", "RNN_decoder", "AttentionDecoder", "TopDownDecoder", "CNN_RNN",
             "greedy_search"]
    assert [name for name in defined if name in order] == order
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | \
        {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    # the machinery lives elsewhere, and builds on this file: never the other way round
    assert not imported & {"captioner.runtimes", "onnxruntime", "captioner.ensemble", "captioner.search", "utils"}
    names = {n.attr if isinstance(n, ast.Attribute) else n.id for n in ast.walk(tree)
             if isinstance(n, (ast.Attribute, ast.Name))}
    assert not [name for name in names if "runtime" in name]  # no runtime hook for others to set on the model


def test_train_one_epoch_shows_the_step_on_one_page():
    [step] = [f for f in functions(ROOT / "captioner" / "training.py") if f.name == "train_one_epoch"]
    assert step.end_lineno - step.lineno + 1 <= 40
    body = ast.unparse(step)
    for call in ("= model(batch.x, tokens", "criterion(out, targets)", "zero_grad", ".backward()"):
        assert call in body, call
    assert "WordLoss" in (ROOT / "captioner" / "training.py").read_text().split("def train_one_epoch")[1][:2500]


def test_the_package_gives_app_builders_the_captioner():
    proc = subprocess.run([sys.executable, "-c", "from captioner import Captioner; print(Captioner.describe.__doc__)"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "photo" in proc.stdout, proc.stderr
