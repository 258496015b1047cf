"""Named training recipes: `python image_training.py --recipe NAME` takes a recipe's flags as its defaults (flags
given on the command line still win). The shipped model's three stages are here as they trained it; a test holds
them equal to the commands recorded in checkpoints/pretrained/model.pth ("trained_with").

    python image_training.py --recipe demo                                # = --demo: a minute or two on a CPU
    python image_training.py --recipe shipped-word --data DIR             # 1: the word loss, the CNN frozen
    python image_training.py --recipe shipped-scst --data DIR             # 2: self-critical, from 1's best
    python image_training.py --recipe shipped-scst-cnn --data DIR         # 3: self-critical, the CNN learning too
"""

from pathlib import Path

SAMPLE_DATA = Path(__file__).resolve().parents[1] / "data" / "flickr8k_sample"

RECIPES = {
    "demo": {
        "data": str(SAMPLE_DATA), "encoder": "efficientnet_lite0", "epochs": 40,
        "lr": 2e-3,  # 200 images: few steps per epoch, so larger steps
        "min_freq": 3,
        "lr_decay": 1.0,  # never: 25 dev images score too noisily to steer by
        # a folder of its own: checkpoints/best.pth.tar is the one the other commands take by default, and a model
        # of 200 images must not replace the model that ships
        "checkpoint_dir": "checkpoints/demo",
        "save_every": 0,  # best and last only: a demo's every-5-epochs files would be 8 of 27 MB each
    },
    "shipped-word": {
        "encoder": "efficientnet_lite1", "decoder": "attention", "hidden_size": 512, "label_smoothing": 0.1,
        "epochs": 10, "lr": 1e-3, "lr_patience": 2, "early_stop": 3, "checkpoint_dir": "checkpoints/att_lite1",
    },
    "shipped-scst": {
        "init_from": "checkpoints/att_lite1/best.pth.tar", "scst": True, "lr": 1e-4, "epochs": 20,
        "lr_patience": 2, "early_stop": 3, "checkpoint_dir": "checkpoints/att_lite1_scst",
    },
    "shipped-scst-cnn": {
        "init_from": "checkpoints/att_lite1_scst/best.pth.tar", "scst": True, "train_cnn": True, "cnn_lr": 3e-5,
        "lr": 5e-5, "epochs": 4, "lr_patience": 2, "early_stop": 3, "checkpoint_dir": "checkpoints/att_lite1_scst_cnn",
    },
}
SHIPPED_STAGES = tuple(name for name in RECIPES if name.startswith("shipped-"))  # in the order they trained it


def describe(name):
    """A recipe's flags, as a command line would give them."""
    return " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in RECIPES[name].items())
