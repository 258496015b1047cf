"""The captioner's library: the CNNs, search and ensembles; data and features; training's machinery; runtimes and
the PyTorch-free runner; describing a photo. The commands at the project's root use it; it never imports them.

    from captioner import Captioner      # describe.Captioner: describe photos with a trained checkpoint
"""


def __getattr__(name):
    # Captioner is loaded on first use, so that the modules that need no PyTorch (runner, photo_check, read_text,
    # things, description) can be imported without it
    if name == "Captioner":
        from captioner.describe import Captioner
        return Captioner
    raise AttributeError(f"module 'captioner' has no attribute {name!r}")
