"""Round trips through the command lines, as a user runs them."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import image_training
from captioner.attention_maps import COLUMNS, PANEL, TITLE, attention_png
from captioner.backbones import preprocessing
from image_loader import Flickr8k
from tests.conftest import SAMPLE, run_script, train_args
from utils import SHIPPED_CHECKPOINT, find_checkpoint, load_checkpoint

PHOTO = SAMPLE / "Images" / "2364096157_eb7970a69a.jpg"


@pytest.mark.slow
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


@pytest.mark.slow
def test_inference_in_a_fresh_process_prints_a_caption(demo_run):
    proc = run_script("inference.py", PHOTO, "--checkpoint", demo_run / "checkpoints" / "last.pth.tar")
    assert proc.returncode == 0, proc.stderr
    name, caption = proc.stdout.strip().split(": ", 1)
    assert name.endswith(PHOTO.name) and len(caption.split()) >= 2


@pytest.mark.slow
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


def test_attention_map_png_has_one_titled_panel_per_word():
    words = ["a", "dog", "runs", "on", "the", "grass", "."]
    maps = torch.rand(len(words), 7, 7)
    sheet = attention_png(Image.open(PHOTO), words, maps / maps.sum((1, 2), keepdim=True))
    assert sheet.size == (COLUMNS * PANEL, 2 * (PANEL + TITLE))  # 5 panels a row: two rows for seven words
    cells = [sheet.crop((c * PANEL, r * (PANEL + TITLE), (c + 1) * PANEL, (r + 1) * (PANEL + TITLE)))
             for r in range(2) for c in range(COLUMNS)]
    for k, cell in enumerate(cells):
        title, panel = cell.crop((0, 0, PANEL, TITLE)), cell.crop((0, TITLE, PANEL, PANEL + TITLE))
        if k < len(words):  # a word in its title bar, and the photo under it
            assert title.getextrema() != ((255, 255),) * 3 and panel.getextrema() != ((255, 255),) * 3
        else:
            assert cell.getextrema() == ((255, 255),) * 3  # nothing after the last word


@pytest.mark.slow
def test_inference_attention_map_for_attention_models_one_line_for_others(demo_run, tmp_path):
    proc = run_script("inference.py", PHOTO, "--attention-map", tmp_path / "maps", "--json",
                      "--checkpoint", SHIPPED_CHECKPOINT)  # the shipped model has attention
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)[0]
    words = len(result["caption"].split())
    assert Image.open(result["attention_map"]).size == (min(words, COLUMNS) * PANEL,
                                                         -(-words // COLUMNS) * (PANEL + TITLE))
    plain = demo_run / "checkpoints" / "last.pth.tar"  # a plain decoder
    proc = run_script("inference.py", PHOTO, "--attention-map", tmp_path / "none", "--checkpoint", plain)
    # the model it used, named though given; one line on the maps; one saying its captions are not hedged
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 0 and lines[0] == f"using {plain}" and len(lines) == 3 and "no attention" in lines[1]
    assert "no confidence calibration" in lines[2]
    assert proc.stdout.startswith(f"{PHOTO}: ") and not (tmp_path / "none").exists()


@pytest.mark.slow
def test_inference_without_a_checkpoint_is_one_clear_line(tmp_path):
    proc = run_script("inference.py", PHOTO, "--checkpoint", tmp_path / "none.pth.tar")
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0 and "checkpoint not found" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("flags, message", [(["--data", "/no/such/folder"], "data folder not found"),
                                            (["--demo", "--epochs", "0"], "must be > 0"),
                                            (["--demo", "--encoder", "resnet"], "invalid choice")])
def test_training_refuses_bad_input_up_front(flags, message):
    proc = run_script("image_training.py", *flags)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_resume_continues_exactly_where_the_run_stopped_in_the_same_tensorboard_run(demo_run, tmp_path, cache_dir):
    """Resuming from epoch 1 reproduces the uninterrupted run's epoch 2: same loss, same weights; and TensorBoard
    shows one run, epoch 2 once (what the run logged after the checkpoint it resumes from is dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    shutil.copytree(demo_run / "runs", tmp_path / "runs")  # train_args logs to tmp_path / "runs"
    result = image_training.main(train_args(tmp_path, cache_dir, "--epochs", "2", "--device", "cpu", "--resume",
                                            str(demo_run / "checkpoints" / "checkpoint_epoch_1.pth.tar")))
    assert [h["epoch"] for h in result["history"]] == [2]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and len(list(runs[0].glob("events.out.tfevents.*"))) == 2
    events = EventAccumulator(str(runs[0])).Reload()
    resumed_loss = [e.value for e in events.Scalars("loss/train")]
    assert [e.step for e in events.Scalars("loss/train")] == [1, 2]
    assert resumed_loss[1] == pytest.approx(result["history"][0]["train_loss"])
    straight = load_checkpoint(demo_run / "checkpoints" / "last.pth.tar")
    resumed = load_checkpoint(tmp_path / "ck" / "last.pth.tar")
    assert resumed["epoch"] == 2 and resumed["step"] == straight["step"]
    assert resumed["history"][-1]["train_loss"] == pytest.approx(straight["history"][-1]["train_loss"], abs=1e-6)
    for k, v in straight["model"].items():
        torch.testing.assert_close(resumed["model"][k], v, msg=k)


@pytest.mark.slow
def test_scst_fine_tunes_a_trained_model_from_the_command_line(demo_run, tmp_path, cache_dir, capsys):
    start = demo_run / "checkpoints" / "best.pth.tar"
    result = image_training.main(train_args(tmp_path, cache_dir, "--epochs", "1", "--init-from", str(start),
                                            "--scst", "--scst-samples", "3", "--lr", "5e-5"))
    assert [h["epoch"] for h in result["history"]] == [1] and result["history"][0]["train_cider_d"] > 0
    tuned, before = load_checkpoint(tmp_path / "ck" / "last.pth.tar"), load_checkpoint(start)
    assert tuned["model_args"] == before["model_args"] and tuned["vocab"] == before["vocab"]
    assert any(not torch.equal(tuned["model"][k], v) for k, v in before["model"].items())  # it learned
    for flags, message in ((["--init-from", str(start), "--resume", str(start)], "give one of them"),
                           (["--resume", str(tmp_path / "ck" / "last.pth.tar")], "trained with --scst")):
        with pytest.raises(SystemExit) as stopped:  # wrong flags: the parser's one line, exit 2
            image_training.main(train_args(tmp_path, cache_dir, *flags))
        assert stopped.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_the_attention_regulariser_needs_an_attention_decoder_and_the_word_loss(demo_run, tmp_path, cache_dir,
                                                                                capsys):
    for flags, message in ((["--attention-reg", "1"], "add --decoder attention or --decoder topdown"),
                           (["--attention", "--attention-reg", "1", "--scst", "--init-from",
                             str(demo_run / "checkpoints" / "best.pth.tar")], "which --scst does not use")):
        with pytest.raises(SystemExit) as stopped:
            image_training.main(train_args(tmp_path, cache_dir, *flags))
        assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_the_demo_trains_into_a_folder_of_its_own_that_never_becomes_the_default(tmp_path, monkeypatch):
    """The quick start's demo model (200 images) must not replace the shipped model for the other commands."""
    args = image_training.parse_args(["--demo"])
    monkeypatch.chdir(tmp_path)
    demo_best = Path(args.checkpoint_dir) / "best.pth.tar"
    demo_best.parent.mkdir(parents=True)
    demo_best.write_bytes(b"")
    assert find_checkpoint(None) == SHIPPED_CHECKPOINT


@pytest.mark.slow
def test_inference_n_best_prints_ranked_captions_with_probabilities(demo_run, capsys):
    import inference

    checkpoint = str(demo_run / "checkpoints" / "last.pth.tar")
    assert inference.cli([str(PHOTO), "--checkpoint", checkpoint, "--n-best", "3", "--json"]) == 0
    (r,) = json.loads(capsys.readouterr().out)
    assert len(r["n_best"]) == 3 and r["caption"] == r["n_best"][0]["caption"]
    assert all(0 < c["mean_word_prob"] <= 1 and c["log_prob"] < 0 for c in r["n_best"])
    assert [c["log_prob"] for c in r["n_best"]] == sorted((c["log_prob"] for c in r["n_best"]), reverse=True)
    assert inference.cli([str(PHOTO), "--checkpoint", checkpoint, "--n-best", "3", "--beam", "2"]) == 1
    assert "--n-best 3 needs --beam 3 or more" in capsys.readouterr().err


@pytest.mark.slow
def test_training_reads_a_karpathy_split_file(tmp_path, cache_dir):
    """The sample as Karpathy's dataset_flickr8k.json (no captions.txt, no split files) trains as the sample."""
    data = Flickr8k.load(SAMPLE)
    (tmp_path / "data").mkdir()
    shutil.copytree(data.images_dir, tmp_path / "data" / "Images")
    split_of = {n: s for s, names in data.splits.items() for n in names}
    entries = [{"filename": n, "split": {"dev": "val"}.get(split_of[n], split_of[n]),
                "sentences": [{"raw": c} for c in data.captions[n]]} for n in sorted(split_of)]
    (tmp_path / "data" / "dataset_flickr8k.json").write_text(json.dumps({"images": entries}))
    result = image_training.main(train_args(tmp_path, cache_dir, "--data", str(tmp_path / "data"), "--epochs", "1",
                                            "--device", "cpu"))
    assert len(result["history"]) == 1 and Flickr8k.load(tmp_path / "data").splits == data.splits


@pytest.mark.slow
def test_inference_with_several_checkpoints_captions_with_their_ensemble(demo_run, tmp_path):
    ckpts = demo_run / "checkpoints"
    last = ckpts / "last.pth.tar"
    alone = run_script("inference.py", PHOTO, "--checkpoint", last, "--json")
    twice = run_script("inference.py", PHOTO, "--checkpoint", last, "--checkpoint", last, "--json")  # mean of equals
    both = run_script("inference.py", PHOTO, "--checkpoint", ckpts / "checkpoint_epoch_1.pth.tar", "--checkpoint",
                      last, "--json", "--n-best", "2")
    assert alone.returncode == twice.returncode == both.returncode == 0, both.stderr
    assert json.loads(twice.stdout)[0]["caption"] == json.loads(alone.stdout)[0]["caption"]
    assert len(json.loads(both.stdout)[0]["n_best"]) == 2
    other = load_checkpoint(last)
    other["vocab"] = other["vocab"][:4] + other["vocab"][5:] + other["vocab"][4:5]  # same words, other ids
    torch.save(other, tmp_path / "other.pth.tar")
    proc = run_script("inference.py", PHOTO, "--checkpoint", last, "--checkpoint", tmp_path / "other.pth.tar")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"using {last}, {tmp_path / 'other.pth.tar'}\n")  # named, though given
    assert proc.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'other.pth.tar'} has another vocabulary " \
        f"than {last}: an " \
        "ensemble's models must share theirs (train them on the same data with the same --min-freq)"
