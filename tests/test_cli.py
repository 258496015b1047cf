"""Round trips through the command lines, as a user runs them."""

import json
import shutil

import pytest
import torch

import image_training
from image_intial_model import preprocessing
from image_loader import Batches, CaptionTable, FeatureSource, Flickr8k, feature_cache_key
from tests.conftest import SAMPLE, run_script, train_args
from utils import Dist, load_checkpoint

PHOTO = SAMPLE / "Images" / "2364096157_eb7970a69a.jpg"


def test_training_writes_checkpoints_vocabulary_and_tensorboard(demo_run):
    ckpts = demo_run / "checkpoints"
    for name in ("last.pth.tar", "best.pth.tar", "checkpoint_epoch_1.pth.tar", "checkpoint_epoch_2.pth.tar",
                 "vocabulary.pkl"):
        assert (ckpts / name).is_file(), name
    ckpt = load_checkpoint(ckpts / "last.pth.tar")
    assert ckpt["epoch"] == 2 and ckpt["model_args"]["encoder"] == "efficientnet_lite0"
    assert ckpt["preprocessing"] == preprocessing("efficientnet_lite0")
    assert isinstance(ckpt["vocab"], list) and ckpt["vocab"][:4] == ["<PAD>", "<SOS>", "<EOS>", "<UNK>"]
    assert [h["epoch"] for h in ckpt["history"]] == [1, 2]
    assert ckpt["history"][1]["train_loss"] < ckpt["history"][0]["train_loss"]
    events = list((demo_run / "runs").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 1000


def test_inference_in_a_fresh_process_prints_a_caption(demo_run):
    proc = run_script("inference.py", PHOTO, "--checkpoint", demo_run / "checkpoints" / "last.pth.tar")
    assert proc.returncode == 0, proc.stderr
    name, caption = proc.stdout.strip().split(": ", 1)
    assert name.endswith(PHOTO.name) and len(caption.split()) >= 2


def test_inference_json_folder_and_bad_paths(demo_run, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(PHOTO, folder / "dog.jpg")
    (folder / "notes.jpg").write_text("not an image")
    proc = run_script("inference.py", folder, tmp_path / "missing.jpg", "--json", "--beam", "1",
                      "--checkpoint", demo_run / "checkpoints" / "last.pth.tar")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    results = {r["image"].rsplit("/", 1)[-1]: r for r in json.loads(proc.stdout)}
    assert results["dog.jpg"]["caption"]
    assert "not an image" in results["notes.jpg"]["error"] and "no such file" in results["missing.jpg"]["error"]


def test_inference_without_a_checkpoint_is_one_clear_line(tmp_path):
    proc = run_script("inference.py", PHOTO, "--checkpoint", tmp_path / "none.pth.tar")
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0 and "checkpoint not found" in proc.stderr


@pytest.mark.parametrize("flags, message", [(["--data", "/no/such/folder"], "data folder not found"),
                                            (["--demo", "--epochs", "0"], "must be > 0"),
                                            (["--demo", "--encoder", "resnet"], "invalid choice")])
def test_training_refuses_bad_input_up_front(flags, message):
    proc = run_script("image_training.py", *flags)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr


def test_resume_continues_exactly_where_the_run_stopped(demo_run, tmp_path, cache_dir):
    """Resuming from epoch 1 reproduces the uninterrupted run's epoch 2: same loss, same weights."""
    result = image_training.main(train_args(tmp_path, cache_dir, "--epochs", "2", "--device", "cpu", "--resume",
                                            str(demo_run / "checkpoints" / "checkpoint_epoch_1.pth.tar")))
    assert [h["epoch"] for h in result["history"]] == [2]
    straight = load_checkpoint(demo_run / "checkpoints" / "last.pth.tar")
    resumed = load_checkpoint(tmp_path / "ck" / "last.pth.tar")
    assert resumed["epoch"] == 2 and resumed["step"] == straight["step"]
    assert resumed["history"][-1]["train_loss"] == pytest.approx(straight["history"][-1]["train_loss"], abs=1e-6)
    for k, v in straight["model"].items():
        torch.testing.assert_close(resumed["model"][k], v, msg=k)


def test_cached_features_give_the_same_loss_as_the_cnn_on_the_image_store(tmp_path, cache_dir):
    args = image_training.resolve_defaults(train_args(tmp_path, cache_dir, "--max-images", "16", "--device", "cpu"))
    device = torch.device("cpu")
    data, vocab, model, preset, _ = image_training.build(args, device)
    cached = image_training.make_batches(args, data, vocab, model, preset, device, Dist())
    args.no_cache = True
    direct = image_training.make_batches(args, data, vocab, model, preset, device, Dist())
    assert cached["dev"].from_features and not direct["dev"].from_features
    assert list(cache_dir.glob("images-224px-*.npy"))  # --no-cache read the images from a store
    criterion = torch.nn.CrossEntropyLoss(ignore_index=0, reduction="sum")
    with_cache = image_training.Trainer(model, criterion, device).run(cached["dev"]).loss
    without = image_training.Trainer(model, criterion, device).run(direct["dev"]).loss
    assert with_cache == pytest.approx(without, rel=1e-5)


def test_feature_cache_key_changes_with_images_and_preprocessing(tmp_path, cache_dir):
    args = image_training.resolve_defaults(train_args(tmp_path, cache_dir, "--max-images", "8"))
    data = Flickr8k.load(args.data, max_images=8)
    images = tmp_path / "Images"
    shutil.copytree(data.images_dir, images)
    names = data.splits["train"]
    _, _, model, preset, _ = image_training.build(args, torch.device("cpu"))
    key = feature_cache_key(model.encoderCNN, preset, images, names, None)
    assert key == feature_cache_key(model.encoderCNN, preset, images, names, None)
    assert key != feature_cache_key(model.encoderCNN, {**preset, "resize": 256}, images, names, None)
    assert key != feature_cache_key(model.encoderCNN, preset, images, names, torch.bfloat16)
    with open(images / names[0], "ab") as f:
        f.write(b"\0")  # the same name, other bytes
    assert key != feature_cache_key(model.encoderCNN, preset, images, names, None)


def test_self_critical_training_raises_the_reward():
    """A few steps of --scst on four 'images' make their sampled captions score better against references."""
    torch.manual_seed(0)
    model = image_training.CNN_RNN(image_training.ModelArgs(vocab_size=12, encoder="efficientnet_lite0",
                                                            embed_size=16, hidden_size=32), weights="random")
    refs = {"a": [4, 5, 6], "b": [7, 8, 9, 10], "c": [11, 4, 5], "d": [9, 9, 8]}
    items = [(n, [[1, *r, 2]] * 2) for n, r in refs.items()]
    cpu = torch.device("cpu")
    batches = Batches(FeatureSource(torch.randn(4, 1280), range(4)), CaptionTable([c for _, c in items], cpu),
                      list(refs), cpu, batch_size=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    trainer = image_training.Trainer(model, None, cpu, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                                     scst=image_training.SelfCritical(items, samples=8, max_len=8))
    rewards = [trainer.run(batches).loss for _ in range(60)]  # mean CIDEr-D of each step's 32 samples
    assert sum(rewards[-5:]) / 5 > 2 * max(sum(rewards[:5]) / 5, 0.5), rewards


def test_scst_fine_tunes_a_trained_model_from_the_command_line(demo_run, tmp_path, cache_dir):
    start = demo_run / "checkpoints" / "best.pth.tar"
    result = image_training.main(train_args(tmp_path, cache_dir, "--epochs", "1", "--init-from", str(start),
                                            "--scst", "--scst-samples", "3", "--lr", "5e-5"))
    assert [h["epoch"] for h in result["history"]] == [1] and result["history"][0]["train_cider_d"] > 0
    tuned, before = load_checkpoint(tmp_path / "ck" / "last.pth.tar"), load_checkpoint(start)
    assert tuned["model_args"] == before["model_args"] and tuned["vocab"] == before["vocab"]
    assert any(not torch.equal(tuned["model"][k], v) for k, v in before["model"].items())  # it learned
    with pytest.raises(image_training.DataError, match="give one of them"):
        image_training.main(train_args(tmp_path, cache_dir, "--init-from", str(start), "--resume", str(start)))
    with pytest.raises(image_training.DataError, match="trained with --scst"):
        image_training.main(train_args(tmp_path, cache_dir, "--resume", str(tmp_path / "ck" / "last.pth.tar")))
