"""The error the project raises for a problem with the user's data or files (one line, never a traceback), and
writing a file atomically, so that a crash never leaves half of one."""

import os
from pathlib import Path

import torch


class DataError(Exception):
    """A problem with the user's data or files, reported as one line."""


def save_atomic(obj, path, dump=torch.save, text=False):
    """Write to a temporary file in the same folder, then rename: a crash leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w" if text else "wb") as f:
            dump(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
