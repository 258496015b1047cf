"""What runs a frozen model when it need not be PyTorch's eager forward: a table of runtimes (RUNTIMES), each a
function that takes a model that no longer learns and returns it as it runs there, and `run_frozen`, which
chooses one. "onnx" wraps the model in a FrozenModel: its CNN in ONNX Runtime (an OnnxEncoder, exported once per
weights into the cache folder), and generation from the decoder's weights prepacked in fp16 (a PackedDecoder).
The model itself is never changed: a CNN that learns, and any GPU, run the model as it is.
"""

import copy
import hashlib
import importlib.util
import io
import json
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from captioner.ensemble import cnn_once
from captioner.files import DataError, save_atomic

log = logging.getLogger("captioner")

# PyTorch's eager forward of these CNNs is far from what the CPU can do: ONNX Runtime runs the same graph about
# 4x as fast (EfficientNet-Lite1 at 240 px on 2 cores, one image: 9.9 ms against 41.8 ms; batches of 32: 78
# images/s against 15). A frozen CNN on the CPU therefore runs there, from an ONNX file exported once per
# weights and kept in the cache folder; a CNN that learns, and any GPU, stay with PyTorch. The decoder stays
# in PyTorch too, where generation may run it with its weights prepacked (PackedDecoder).

RUNTIME_HELP = ("what runs a frozen model on the CPU: onnx (the CNN in ONNX Runtime, about 4x as fast; exported "
                "once per weights into --cache-dir; a decoder stored in fp16 generates from prepacked weights, "
                "about 2x as fast), eager (PyTorch as it is), auto (onnx where onnxruntime is installed). A GPU, "
                "and a CNN that learns, always run in PyTorch")


class OnnxBackbone:
    """A frozen backbone's forward_features in ONNX Runtime: images [B, 3, S, S] fp32 -> feature map
    [B, F, h, w], on `threads` threads that sleep between calls (spinning, ONNX Runtime's default, would take
    the cores from the PyTorch decoder that runs next)."""

    def __init__(self, path, threads):
        self.path, self.threads, self.session = Path(path), threads, None
        self.renew()

    def renew(self):
        """A new session, its memory not yet touched. A pass over image files forks loader workers, after which
        each page of this process that it writes to is first copied (copy-on-write) while they live: with the
        session's memory arena already full, the first batches of a second pass took 4x as long (3.2 s
        against 0.8 s for 64 images, EfficientNet-Lite0). So each pass starts with a fresh session (0.1 s)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = self.threads, 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # its warnings about unused initialisers are no news to a user
        self.session = None  # the old one's memory goes first
        self.session = ort.InferenceSession(str(self.path), options, ["CPUExecutionProvider"])

    def __call__(self, images):
        return torch.from_numpy(self.session.run(None, {"image": images.contiguous().numpy()})[0])


def backbone_key(backbone, encoder, size):
    """A hash of what the exported graph depends on: the weights, the encoder, the input size, the exporter."""
    h = hashlib.blake2b(digest_size=12)
    h.update(json.dumps([encoder, size, torch.__version__, 17]).encode())
    for name, t in backbone.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class _ForwardFeatures(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, images):
        return self.backbone.forward_features(images)


def export_backbone(backbone, size, path):
    """The backbone's forward_features as ONNX (any batch size), written atomically to `path`."""
    buf, was_training = io.BytesIO(), backbone.training
    backbone.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notice
            torch.onnx.export(_ForwardFeatures(backbone), (torch.zeros(1, 3, size, size),), buf,
                              input_names=["image"], output_names=["fmap"], opset_version=17, dynamo=False,
                              dynamic_axes={"image": {0: "batch"}, "fmap": {0: "batch"}})
    finally:
        backbone.train(was_training)
    save_atomic(buf.getvalue(), path, dump=lambda data, f: f.write(data))


KEEP_EXPORTS = 4  # CNN exports kept in a cache folder, the most recently used: each is the size of its weights


def onnx_backbone(cnn, encoder, size, cache_dir):
    """The OnnxBackbone of CNN_encoder `cnn`, from cache_dir/cnn-ENCODER-KEY.onnx, exported there first if it
    is not there yet (where cache_dir cannot be written, into a temporary folder, for this once). Of the exports in
    cache_dir, the KEEP_EXPORTS used last stay: models retrained or fine-tuned leave no pile behind."""
    name = f"cnn-{encoder}-{backbone_key(cnn.backbone, encoder, size)}.onnx"
    path = Path(cache_dir) / name
    try:
        if path.is_file():
            os.utime(path)  # used now: the pruning below goes by modification time
        else:
            export_backbone(cnn.backbone, size, path)
        for old in sorted(path.parent.glob("cnn-*.onnx"), key=lambda f: f.stat().st_mtime)[:-KEEP_EXPORTS]:
            old.unlink(missing_ok=True)
    except OSError:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="captioner-") as tmp:  # the session keeps the graph in memory
            export_backbone(cnn.backbone, size, Path(tmp) / name)
            return OnnxBackbone(Path(tmp) / name, torch.get_num_threads())
    return OnnxBackbone(path, torch.get_num_threads())


class PackedDecoder:
    """A frozen decoder for generation on the CPU, its weight matrices prepacked in fp16 for FBGEMM (PyTorch's
    dynamic fp16 Linear and LSTMCell: fp16 weights, fp32 arithmetic). A beam step multiplies a few rows by every
    weight matrix, so on a CPU it waits on reading those weights from memory, about 14 MB a word for the shipped
    model: prepacked at half the bytes, a beam-3 caption decodes 2.2-2.7x as fast. Made only where fp16 holds
    every weight exactly (a release written with --half), so that the captions are PyTorch's own."""

    def __init__(self, decoder):
        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():  # the eager quantization API says it is moving to torchao
            warnings.simplefilter("ignore")
            self.net = quantize_dynamic(copy.deepcopy(decoder).eval(), {nn.Linear, nn.LSTMCell}, torch.float16)

    @staticmethod
    def exact(decoder):
        """Whether fp16 holds every weight that packing would store in it, and this PyTorch has FBGEMM's kernel."""
        if torch.backends.quantized.engine not in ("x86", "fbgemm"):
            return False
        packed = [p for m in decoder.modules() if isinstance(m, (nn.Linear, nn.LSTMCell))
                  for name, p in m.named_parameters() if name.startswith("weight")]
        return bool(packed) and all(torch.equal(p, p.half().float()) for p in packed)

    def start(self, feats):
        return self.net.start(feats)

    def step(self, tokens, state):
        return self.net.step(tokens, state)

    def select(self, state, rows):
        return self.net.select(state, rows)


class OnnxEncoder:
    """A frozen CNN_encoder whose backbone runs in ONNX Runtime (`onnx`, an OnnxBackbone); all else (spatial,
    project, the weights) is the CNN's own. What the graph cannot stand in for goes to the CNN itself: images
    that are not fp32 on the CPU, autocast, and a CNN that has begun to learn (the graph holds its old weights)."""

    def __init__(self, cnn, onnx):
        self.cnn, self.onnx = cnn, onnx

    def __getattr__(self, name):  # called only for what this wrapper lacks
        if name == "cnn":
            raise AttributeError(name)
        return getattr(self.cnn, name)

    def extract(self, images):
        """images [B, 3, S, S] -> features [B, F] or regions [B, R, F], as CNN_encoder.extract."""
        if self.cnn.train_cnn or images.device.type != "cpu" or images.dtype != torch.float32 \
                or torch.is_autocast_enabled("cpu"):
            return self.cnn.extract(images)
        return self.cnn.pool(self.onnx(images))  # [B, F, h, w] -> [B, F] or [B, R, F]

    def renew(self):
        self.onnx.renew()  # before a loader's workers fork: see OnnxBackbone.renew


class FrozenModel:
    """A model that no longer learns (a CNN_RNN or an ensemble.Ensemble) as a runtime runs it: its CNNs as
    `cnns` has them ({id of a CNN_encoder: its stand-in}) and generation on `decoder` (else its own decoder).
    Everything else (args, decoder_kind, the parameters) is the model's own, which this never changes."""

    def __init__(self, model, cnns, decoder=None):
        self.model, self.cnns, self.decoder = model, cnns, decoder

    def __getattr__(self, name):  # called only for what this wrapper lacks
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    @property
    def generator(self):
        return self.decoder or self.model.decoderRNN

    @property
    def encoderCNN(self):
        return self.cnns.get(id(self.model.encoderCNN), self.model.encoderCNN)

    def features(self, x, from_features=False):
        x, from_features = cnn_once(self, x, from_features)
        if from_features:
            return self.model.features(x, True)
        return tuple(FrozenModel(m, self.cnns).features(x) for m in self.model.models)  # CNNs that differ

    def attention_maps(self, x, captions, from_features=False):
        x, from_features = cnn_once(self, x, from_features)
        if from_features:
            return self.model.attention_maps(x, captions, True)
        members = [FrozenModel(m, self.cnns) for m in self.model.models]  # an ensemble whose CNNs differ
        return self.model.mean_maps([m.attention_maps(x, captions) for m in members])


def eager(model, preset, cache_dir, decoder):
    """PyTorch as it is: the model itself."""
    return model


def onnx(model, preset, cache_dir, decoder):
    """Each CNN of the model in ONNX Runtime, and with `decoder` (a model that will only generate from now on),
    generation from a PackedDecoder where that is exact."""
    # the CNNs that run: the model's one (an ensemble's first member's, where its members' CNNs are the same),
    # else each member's
    shared = getattr(model, "shared_cnn", True)
    encoders = {id(c): c for c in ([model.encoderCNN] if shared else [m.encoderCNN for m in model.models])}
    try:
        cnns = {key: OnnxEncoder(cnn, onnx_backbone(cnn, model.args.encoder, preset["crop"], cache_dir))
                for key, cnn in encoders.items()}
    except Exception as e:  # the exporter's failures are many and unnamed
        raise DataError(f"the CNN could not be exported to ONNX: {str(e).splitlines()[0]}") from None
    packed = PackedDecoder(model.decoderRNN) if decoder and PackedDecoder.exact(model.decoderRNN) else None
    return FrozenModel(model, cnns, packed)


# The runtimes by name (--runtime; "auto" chooses one): each turns a frozen model into the model as it runs there.
# A new runtime: its function, and a line here.
RUNTIMES = {"eager": eager, "onnx": onnx}
RUNTIME_CHOICES = ("auto", *RUNTIMES)


def run_frozen(model, preset, runtime="auto", cache_dir="cache", device="cpu", decoder=False):
    """(`model` as `runtime` runs it, the runtime's name), for a model (a CNN_RNN or an Ensemble) whose CNN will
    not learn while it runs there. "auto": onnx on the CPU where onnxruntime is installed, else eager; a failed
    export is an error with onnx and falls back to eager with auto. decoder: see `onnx`."""
    if runtime not in RUNTIME_CHOICES:
        raise DataError(f"unknown runtime {runtime!r}: choose from {', '.join(RUNTIME_CHOICES)}")
    on_cpu, installed = torch.device(device).type == "cpu", importlib.util.find_spec("onnxruntime") is not None
    if runtime == "onnx" and not on_cpu:
        raise DataError(f"--runtime onnx runs on the CPU, not on {device}")
    if runtime == "onnx" and not installed:
        raise DataError("--runtime onnx needs onnxruntime (pip install onnxruntime)")
    chosen = runtime if runtime != "auto" else "onnx" if on_cpu and installed else "eager"
    try:
        return RUNTIMES[chosen](model, preset, cache_dir, decoder), chosen
    except DataError as e:
        if runtime != "auto":
            raise
        log.warning("the CNN runs in PyTorch: exporting it to ONNX failed (%s)", str(e).split(": ", 1)[1])
        return model, "eager"
