"""docs/walkthrough.ipynb runs from top to bottom, as a learner would run it in Jupyter (nbclient, a real kernel), and
is stored with its outputs, so that it shows them where it is only read."""

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_the_walkthrough_notebook_runs_top_to_bottom():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    notebook = nbformat.read(ROOT / "docs" / "walkthrough.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "docs")}}).execute()
    printed = ["".join(o.get("text", "") for o in cell.get("outputs", [])) for cell in notebook.cells
               if cell.cell_type == "code"]
    assert "ln V" in printed[3] and "[B, R = h * w, F]" in printed[3]
    assert "epoch 3: train loss" in printed[4]
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for o in notebook.cells[-1].outputs)  # the attention map, drawn


def test_the_walkthrough_is_stored_with_its_outputs():
    """Read on GitHub, without running it, the notebook shows what each step prints and the attention map."""
    import json

    notebook = json.loads((ROOT / "docs" / "walkthrough.ipynb").read_text())
    cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    shown = ["".join(o.get("text", "")) for c in cells for o in c.get("outputs", [])]
    assert all(c.get("outputs") for c in cells[1:]), "run it and save it: python tools/run_walkthrough.py"
    assert any("epoch 3: train loss" in text for text in shown)
    assert any({"image/png", "image/jpeg"} & o.get("data", {}).keys() for o in cells[-1]["outputs"])  # the map
