"""The runtime of a frozen model on the CPU (runtimes.use_runtime): the CNN in ONNX Runtime and a decoder stored
in fp16 generating from prepacked weights give PyTorch's captions, the export is cached and follows the weights,
and whatever is not a frozen model on the CPU stays in PyTorch."""

import json
import logging

import pytest
import torch

import runtimes
from backbones import preprocessing
from ensemble import Ensemble
from image_intial_model import CNN_RNN, DECODERS, ModelArgs
from image_loader import DataError
from inference import Captioner
from runtimes import PackedDecoder, use_runtime
from tests.conftest import ROOT, SAMPLE, run_script

SHIPPED = ROOT / "checkpoints" / "pretrained" / "model.pth"


def sample_photos():
    """The sample's dev and test photos (50)."""
    names = [n for split in ("dev", "test") for n in (SAMPLE / f"Flickr_8k.{split}Images.txt").read_text().split()]
    return [SAMPLE / "Images" / n for n in names]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return Captioner(SHIPPED, runtime="eager", cache_dir=cache), Captioner(SHIPPED, runtime="onnx", cache_dir=cache)


@pytest.mark.slow
@torch.no_grad()
def test_onnx_runtime_captions_as_pytorch_does_greedy_and_beam_3(pair):
    eager, onnx = pair
    assert (eager.runtime, onnx.runtime) == ("eager", "onnx")
    # the shipped release is stored in fp16: its decoder generates from prepacked weights too
    assert eager.model.decoder_runtime is None and isinstance(onnx.model.decoder_runtime, PackedDecoder)
    photos = [eager.load(p) for p in sample_photos()]
    for beam in (1, 3):
        by = {c: [] for c in pair}
        for c in pair:
            for i in range(0, len(photos), 25):
                by[c] += c.model.generate(c._batch(photos[i:i + 25]), beam=beam)
        assert by[eager] == by[onnx], beam
    x = eager._batch(photos[:8])
    a, b = eager.model.encoderCNN.extract(x), onnx.model.encoderCNN.extract(x)
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()  # cached regions are fp16: 1e-3 of it
    described = [c.describe(photos[:10]) for c in pair]
    assert [d["caption"] for d in described[0]] == [d["caption"] for d in described[1]]
    assert all(abs(x["confidence"] - y["confidence"]) <= 0.002 for x, y in zip(*described))


def tiny_model(decoder="attention", vocab_size=12, size=8):
    args = ModelArgs(vocab_size=vocab_size, encoder="efficientnet_lite0", embed_size=size, hidden_size=size,
                     decoder=decoder)
    return CNN_RNN(args, weights="random").eval(), {**preprocessing("efficientnet_lite0"), "crop": 64, "resize": 64}


def stored_in_fp16(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())  # as export.py --half stores them
    return model


@pytest.mark.slow
@pytest.mark.parametrize("decoder", DECODERS)
@torch.no_grad()
def test_a_decoder_stored_in_fp16_generates_from_packed_weights_as_pytorch_does(decoder):
    torch.manual_seed(0)
    models = [stored_in_fp16(tiny_model(decoder, vocab_size=60, size=32)[0]) for _ in range(2)]
    x = torch.randn(6, 49, models[0].args.feature_dim)  # cached regions (pooled: their mean)
    x = x if models[0].args.attention else x.mean(1)
    for model in (models[0], Ensemble(models)):
        assert PackedDecoder.exact(model.decoderRNN)
        plain = [model.generate(x, beam=b, from_features=True) for b in (1, 3)]
        plain_logp = model.word_log_probs(x, plain[1], from_features=True)[0]
        model.decoder_runtime = PackedDecoder(model.decoderRNN)
        assert [model.generate(x, beam=b, from_features=True) for b in (1, 3)] == plain
        torch.testing.assert_close(model.word_log_probs(x, plain[1], from_features=True)[0], plain_logp, atol=1e-4,
                                   rtol=0)  # banned words: -inf in both
    fp32 = tiny_model(decoder, vocab_size=60, size=32)[0]
    assert not PackedDecoder.exact(fp32.decoderRNN)  # rounding its weights would change its captions


def test_only_a_model_that_no_longer_learns_gets_a_packed_decoder(tmp_path):
    model, preset = tiny_model()
    stored_in_fp16(model)
    assert use_runtime(model, preset, "onnx", tmp_path) == "onnx" and model.decoder_runtime is None  # training's
    assert use_runtime(model, preset, "onnx", tmp_path, decoder=True) == "onnx"
    assert isinstance(model.decoder_runtime, PackedDecoder)
    assert "decoder_runtime" not in str(list(model.state_dict()))  # no module of the model: not saved
    assert use_runtime(model, preset, "eager", tmp_path, decoder=True) == "eager" and model.decoder_runtime is None
    assert use_runtime(model, preset, "auto", tmp_path, decoder=True, device="cuda") == "eager"
    assert model.decoder_runtime is None


@pytest.mark.slow
@torch.no_grad()
def test_the_export_is_kept_reused_and_follows_the_weights(tmp_path, monkeypatch):
    model, preset = tiny_model()
    cnn, x = model.encoderCNN, torch.rand(3, 3, 64, 64)
    assert use_runtime(model, preset, "onnx", tmp_path) == "onnx"
    [first] = tmp_path.glob("cnn-efficientnet_lite0-*.onnx")
    assert torch.allclose(cnn.runtime(x), cnn.backbone.forward_features(x), atol=1e-4)

    def no_export(*args):
        raise AssertionError("exported again")

    with monkeypatch.context() as m:
        m.setattr(runtimes, "export_backbone", no_export)
        assert use_runtime(model, preset, "onnx", tmp_path) == "onnx"  # from the cache
    cnn.backbone.conv_stem.weight.mul_(1.5)  # as a fine-tuned CNN's would be
    use_runtime(model, preset, "onnx", tmp_path)
    assert len(list(tmp_path.glob("cnn-*.onnx"))) == 2 and cnn.runtime.path != first
    assert torch.allclose(cnn.runtime(x), cnn.backbone.forward_features(x), atol=1e-4)
    monkeypatch.setattr(runtimes, "KEEP_EXPORTS", 2)
    for _ in range(2):
        cnn.backbone.conv_stem.weight.mul_(1.5)
        use_runtime(model, preset, "onnx", tmp_path)
    assert len(list(tmp_path.glob("cnn-*.onnx"))) == 2 and not first.exists()  # the least recently used went
    assert not list(tmp_path.glob(".*tmp"))


@torch.no_grad()
def test_what_is_not_a_frozen_cnn_on_the_cpu_stays_in_pytorch(tmp_path):
    model, preset = tiny_model()
    cnn, x = model.encoderCNN, torch.rand(2, 3, 64, 64)
    assert use_runtime(model, preset, "auto", tmp_path) == "onnx"
    eager = cnn.backbone.forward_features(x).flatten(2).transpose(1, 2)

    def refuse(images):
        raise AssertionError("the runtime ran")

    cnn.runtime = refuse
    cnn.set_train_cnn(True)  # a CNN that learns: the runtime holds its old weights
    assert torch.equal(cnn.extract(x), eager)
    cnn.set_train_cnn(False)
    with torch.autocast("cpu", torch.bfloat16):  # another precision: PyTorch's
        cnn.extract(x)
    assert use_runtime(model, preset, "eager", tmp_path) == "eager" and cnn.runtime is None
    assert use_runtime(model, preset, "auto", tmp_path, device="cuda") == "eager" and cnn.runtime is None
    for runtime, device, words in (("onnx", "cuda", "runs on the CPU"), ("fast", "cpu", "unknown runtime")):
        with pytest.raises(DataError, match=words):
            use_runtime(model, preset, runtime, tmp_path, device)


def test_a_failed_export_falls_back_with_auto_and_is_one_line_with_onnx(tmp_path, monkeypatch, caplog):
    model, preset = tiny_model()

    def broken(*args):
        raise RuntimeError("Unsupported: an operator\nwith a long story")

    monkeypatch.setattr(runtimes, "export_backbone", broken)
    with caplog.at_level(logging.WARNING, logger="captioner"):
        assert use_runtime(model, preset, "auto", tmp_path) == "eager"
    assert "exporting it to ONNX failed (Unsupported: an operator)" in caplog.text
    with pytest.raises(DataError, match="^the CNN could not be exported to ONNX: Unsupported: an operator$"):
        use_runtime(model, preset, "onnx", tmp_path)
    assert model.encoderCNN.runtime is None


@pytest.mark.slow
@torch.no_grad()
def test_a_cache_folder_that_cannot_be_written_exports_to_a_temporary_one(tmp_path):
    model, preset = tiny_model()
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    assert use_runtime(model, preset, "onnx", blocked) == "onnx"
    x = torch.rand(1, 3, 64, 64)
    assert torch.allclose(model.encoderCNN.runtime(x), model.encoderCNN.backbone.forward_features(x), atol=1e-4)
    assert blocked.read_text() == "not a folder"


@pytest.mark.slow
def test_inference_runtime_flag_gives_the_same_answer_and_refuses_an_unknown_one(tmp_path):
    photos = sample_photos()[:3]
    out = {}
    for runtime in ("eager", "onnx"):
        r = run_script(ROOT / "inference.py", *photos, "--json", "--runtime", runtime, "--cache-dir", tmp_path)
        assert r.returncode == 0, r.stderr
        out[runtime] = json.loads(r.stdout)
    assert out["eager"] == out["onnx"]
    assert list(tmp_path.glob("cnn-efficientnet_lite1-*.onnx"))
    r = run_script(ROOT / "inference.py", photos[0], "--runtime", "fast")
    assert r.returncode == 2 and "invalid choice: 'fast'" in r.stderr.strip().splitlines()[-1]


def test_threads_follow_the_cores_that_other_work_leaves_free(monkeypatch):
    import os

    import utils

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    for load, threads in ((0.0, 4), (0.4, 4), (1.2, 3), (2.6, 1), (9.0, 1)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        assert utils.idle_cores() == threads, load
    before = torch.get_num_threads()
    with utils.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
