"""Run docs/walkthrough.ipynb top to bottom in a real kernel and store it with its outputs, so that it shows what
each step prints where it is only read (on GitHub, say). Run it after changing the notebook or what it calls:

    python tools/run_walkthrough.py            # a few minutes on a CPU: it trains the demo for 3 epochs
"""

import argparse
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "walkthrough.ipynb"


def keep_smallest_picture(data):
    """A picture shown in several formats (a PIL image: PNG and JPEG) keeps only its smallest in the stored notebook:
    any one shows it, and the attention map's PNG alone is most of a megabyte."""
    pictures = sorted((len(str(v)), k) for k, v in data.items() if k.startswith("image/"))
    for _, kind in pictures[1:]:
        del data[kind]


def main(args):
    import nbclient
    import nbformat

    notebook = nbformat.read(args.notebook, as_version=4)
    nbclient.NotebookClient(notebook, timeout=args.timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(args.notebook.parent)}}).execute()
    for cell in notebook.cells:
        cell.get("metadata", {}).pop("execution", None)  # the kernel's run times say nothing and change every run
        for output in cell.get("outputs", []):
            keep_smallest_picture(output.get("data", {}))
    with tempfile.NamedTemporaryFile("w", dir=args.notebook.parent, suffix=".ipynb", delete=False) as f:
        nbformat.write(notebook, f)
    os.chmod(f.name, args.notebook.stat().st_mode & 0o777)  # a temporary file is private; the notebook is not
    Path(f.name).replace(args.notebook)  # written whole, then renamed: a failed run leaves the old notebook
    print(f"{args.notebook}: {sum(c.cell_type == 'code' for c in notebook.cells)} code cells run and stored")


def cli(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--notebook", type=Path, default=NOTEBOOK, help="the notebook to run and store")
    p.add_argument("--timeout", type=int, default=900, help="seconds a cell may run")
    args = p.parse_args(argv)
    missing = [m for m in ("nbclient", "nbformat", "ipykernel") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"error: running the notebook needs {', '.join(missing)}: pip install {' '.join(missing)}",
              file=sys.stderr)
        return 1
    main(args)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
