"""The runtime of a frozen model on the CPU (runtimes.run_frozen): the CNN in ONNX Runtime and a decoder stored
in fp16 generating from prepacked weights give PyTorch's captions, the export is cached and follows the weights,
whatever is not a frozen model on the CPU stays in PyTorch, and the model itself is never changed."""

import copy
import json
import logging

import pytest
import torch

from captioner import runtimes
from captioner.backbones import preprocessing
from captioner.describe import Captioner
from captioner.ensemble import Ensemble
from captioner.files import DataError
from captioner.runtimes import RUNTIMES, FrozenModel, PackedDecoder, run_frozen
from captioner.search import generate, word_log_probs
from image_intial_model import CNN_RNN, DECODERS, ModelArgs
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
    assert isinstance(eager.model, CNN_RNN) and isinstance(onnx.model.generator, PackedDecoder)
    photos = [eager.load(p) for p in sample_photos()]
    for beam in (1, 3):
        by = {c: [] for c in pair}
        for c in pair:
            for i in range(0, len(photos), 25):
                by[c] += generate(c.model, c._batch(photos[i:i + 25]), beam=beam)
        assert by[eager] == by[onnx], beam
    x = eager._batch(photos[:8])
    a, b = eager.model.encoderCNN.extract(x), onnx.model.encoderCNN.extract(x)
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()  # cached regions are fp16: 1e-3 of it
    described = [c.describe_batch(photos[:10]) for c in pair]
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
        plain = [generate(model, x, beam=b, from_features=True) for b in (1, 3)]
        plain_logp = word_log_probs(model, x, plain[1], from_features=True)[0]
        packed = FrozenModel(model, {}, PackedDecoder(model.decoderRNN))
        assert [generate(packed, x, beam=b, from_features=True) for b in (1, 3)] == plain
        torch.testing.assert_close(word_log_probs(packed, x, plain[1], from_features=True)[0], plain_logp, atol=1e-4,
                                   rtol=0)  # banned words: -inf in both
    fp32 = tiny_model(decoder, vocab_size=60, size=32)[0]
    assert not PackedDecoder.exact(fp32.decoderRNN)  # rounding its weights would change its captions


def test_only_a_model_that_no_longer_learns_gets_a_packed_decoder(tmp_path):
    model, preset = tiny_model()
    stored_in_fp16(model)
    keys = list(model.state_dict())
    training, name = run_frozen(model, preset, "onnx", tmp_path)
    assert name == "onnx" and training.generator is model.decoderRNN  # training's feature pass: the CNN only
    generating, name = run_frozen(model, preset, "onnx", tmp_path, decoder=True)
    assert name == "onnx" and isinstance(generating.generator, PackedDecoder)
    assert generating.args is model.args and generating.decoderRNN is model.decoderRNN  # the rest is the model's
    assert model.generator is model.decoderRNN and list(model.state_dict()) == keys  # the model is not changed
    assert run_frozen(model, preset, "eager", tmp_path, decoder=True) == (model, "eager")
    assert run_frozen(model, preset, "auto", tmp_path, decoder=True, device="cuda") == (model, "eager")


@pytest.mark.slow
@torch.no_grad()
def test_the_export_is_kept_reused_and_follows_the_weights(tmp_path, monkeypatch):
    model, preset = tiny_model()
    cnn, x = model.encoderCNN, torch.rand(3, 3, 64, 64)
    frozen, name = run_frozen(model, preset, "onnx", tmp_path)
    assert name == "onnx"
    [first] = tmp_path.glob("cnn-efficientnet_lite0-*.onnx")
    assert torch.allclose(frozen.encoderCNN.onnx(x), cnn.backbone.forward_features(x), atol=1e-4)

    def no_export(*args):
        raise AssertionError("exported again")

    with monkeypatch.context() as m:
        m.setattr(runtimes, "export_backbone", no_export)
        assert run_frozen(model, preset, "onnx", tmp_path)[1] == "onnx"  # from the cache
    cnn.backbone.conv_stem.weight.mul_(1.5)  # as a fine-tuned CNN's would be
    onnx = run_frozen(model, preset, "onnx", tmp_path)[0].encoderCNN.onnx
    assert len(list(tmp_path.glob("cnn-*.onnx"))) == 2 and onnx.path != first
    assert torch.allclose(onnx(x), cnn.backbone.forward_features(x), atol=1e-4)
    monkeypatch.setattr(runtimes, "KEEP_EXPORTS", 2)
    for _ in range(2):
        cnn.backbone.conv_stem.weight.mul_(1.5)
        run_frozen(model, preset, "onnx", tmp_path)
    assert len(list(tmp_path.glob("cnn-*.onnx"))) == 2 and not first.exists()  # the least recently used went
    assert not list(tmp_path.glob(".*tmp"))


@torch.no_grad()
def test_what_is_not_a_frozen_cnn_on_the_cpu_stays_in_pytorch(tmp_path):
    model, preset = tiny_model()
    frozen, name = run_frozen(model, preset, "auto", tmp_path)
    cnn, x = frozen.encoderCNN, torch.rand(2, 3, 64, 64)
    eager = model.encoderCNN.backbone.forward_features(x).flatten(2).transpose(1, 2)
    assert name == "onnx" and torch.allclose(cnn.extract(x), eager, atol=1e-4)

    def refuse(images):
        raise AssertionError("the runtime ran")

    cnn.onnx = refuse
    model.encoderCNN.set_train_cnn(True)  # a CNN that learns: the runtime holds its old weights
    assert torch.equal(cnn.extract(x), eager)
    model.encoderCNN.set_train_cnn(False)
    with torch.autocast("cpu", torch.bfloat16):  # another precision: PyTorch's
        cnn.extract(x)
    assert run_frozen(model, preset, "eager", tmp_path) == (model, "eager")
    assert run_frozen(model, preset, "auto", tmp_path, device="cuda") == (model, "eager")
    for runtime, device, words in (("onnx", "cuda", "runs on the CPU"), ("fast", "cpu", "unknown runtime")):
        with pytest.raises(DataError, match=words):
            run_frozen(model, preset, runtime, tmp_path, device)


@pytest.mark.slow
@torch.no_grad()
def test_an_ensemble_runs_each_of_its_cnns_there_once(tmp_path, monkeypatch):
    """Members that share a CNN export it once; members whose CNNs differ get one each, and their features and
    attention maps come from ONNX Runtime, as PyTorch's would."""
    torch.manual_seed(0)
    (a, preset), (b, _) = tiny_model(), tiny_model()
    x, captions = torch.rand(2, 3, 64, 64), [[4, 5, 6], [7]]
    for members, exports in (([a, a], 1), ([a, b], 2)):
        ensemble = Ensemble(members)
        frozen = run_frozen(ensemble, preset, "onnx", tmp_path / str(exports))[0]
        assert len(list((tmp_path / str(exports)).glob("cnn-*.onnx"))) == exports
        features, maps = ensemble.features(x), ensemble.attention_maps(x, captions)
        with monkeypatch.context() as m:
            for member in members:  # PyTorch's CNN may not run now
                m.setattr(member.encoderCNN.backbone, "forward_features", None)
            for got, want in zip(frozen.features(x), features):
                assert torch.allclose(got, want, atol=1e-4)
            for got, want in zip(frozen.attention_maps(x, captions), maps):
                assert got.shape == want.shape and torch.allclose(got, want, atol=1e-4)
    twin = Ensemble([a, copy.deepcopy(a)])  # as two checkpoints of one CNN load: two objects, one set of weights
    assert twin.shared_cnn and len(run_frozen(twin, preset, "onnx", tmp_path / "twin")[0].cnns) == 1  # one session
    assert set(RUNTIMES) == {"eager", "onnx"}


def test_a_failed_export_falls_back_with_auto_and_is_one_line_with_onnx(tmp_path, monkeypatch, caplog):
    model, preset = tiny_model()

    def broken(*args):
        raise RuntimeError("Unsupported: an operator\nwith a long story")

    monkeypatch.setattr(runtimes, "export_backbone", broken)
    with caplog.at_level(logging.WARNING, logger="captioner"):
        assert run_frozen(model, preset, "auto", tmp_path) == (model, "eager")
    assert "exporting it to ONNX failed (Unsupported: an operator)" in caplog.text
    with pytest.raises(DataError, match="^the CNN could not be exported to ONNX: Unsupported: an operator$"):
        run_frozen(model, preset, "onnx", tmp_path)


@pytest.mark.slow
@torch.no_grad()
def test_a_cache_folder_that_cannot_be_written_exports_to_a_temporary_one(tmp_path):
    model, preset = tiny_model()
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    frozen, name = run_frozen(model, preset, "onnx", blocked)
    x = torch.rand(1, 3, 64, 64)
    assert name == "onnx"
    assert torch.allclose(frozen.encoderCNN.onnx(x), model.encoderCNN.backbone.forward_features(x), atol=1e-4)
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
