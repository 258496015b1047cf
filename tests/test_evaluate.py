import csv
import html
import json
import math

import pytest
import torch

import evaluate
from captioner import features, metrics
from tests.conftest import SAMPLE, run_script
from utils import load_checkpoint

needs_java = pytest.mark.skipif(not metrics.java_available(), reason="Java is not installed")


@pytest.mark.parametrize("java", [False, pytest.param(True, marks=[needs_java, pytest.mark.slow])])
def test_scores_of_a_hand_checkable_case(java):
    refs = [["A dog runs fast ."], ["Two kids swim in a blue pool ."]]
    perfect = metrics.score_captions(refs, ["a dog runs fast", "two kids swim in a blue pool"], java=java)
    assert perfect["Bleu_4"] == pytest.approx(1.0, abs=1e-6) and perfect["ROUGE_L"] == pytest.approx(1.0)
    # Each caption equals its only reference, so each n-gram vector's cosine is 1: CIDEr-D's maximum, 10.
    assert perfect["CIDEr"] == pytest.approx(10.0, rel=1e-6)
    assert ("METEOR" in perfect) == java and perfect.get("METEOR", 1.0) > 0.9
    # "a dog runs": every unigram right, but 3 words against the closest reference's 4: BLEU-1 = e^(1 - 4/3).
    short = metrics.score_captions([["A dog runs fast .", "The dog is running ."]], ["a dog runs"], java=java,
                                    metrics=("bleu",))
    assert short["Bleu_1"] == pytest.approx(math.exp(1 - 4 / 3), rel=1e-6)
    assert short["Bleu_2"] == pytest.approx(math.exp(1 - 4 / 3), rel=1e-6)


def test_python_tokenize_follows_ptb_rules():
    assert metrics.python_tokenize('A dog\'s "OK" ball, isn\'t it? (Mr. T-shirt) We cannot.') == \
        "a dog 's ok ball is n't it -lrb- mr. t-shirt -rrb- we can not"


@pytest.mark.slow
@needs_java
def test_python_tokenize_agrees_with_ptb_on_flickr8k_references(shared_flickr8k):
    with open(shared_flickr8k / "captions.txt", newline="") as f:
        texts = [row[1] for row in list(csv.reader(f))[1:]]
    ptb = metrics.tokenize_all(texts, java=True)
    differ = [t for t, p in zip(texts, ptb) if p != metrics.python_tokenize(t)]
    assert len(differ) <= 5, differ  # measured: 3 of 40,455, all "slip 'n' slide"


@pytest.mark.slow
@pytest.mark.parametrize("java", [False, pytest.param(True, marks=[needs_java, pytest.mark.slow])])
def test_evaluate_writes_results_and_gallery_with_progress_bars(demo_run, tmp_path, cache_dir, java):
    out = tmp_path / "eval"
    flags = [] if java else ["--no-java"]
    proc = run_script("evaluate.py", "--checkpoint", demo_run / "checkpoints" / "best.pth.tar", "--data", SAMPLE,
                      "--split", "test", "--out", out, "--cache-dir", cache_dir, *flags)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"metrics", "settings", "images", "photo_check"}
    assert len(results["images"]) == 25 and all(len(r["references"]) == 5 for r in results["images"])
    assert all(r["description"] and set(r["photo_scores"]) >= {"blur", "dark", "bright"} for r in results["images"])
    assert results["photo_check"]["photos"] == 25 and "photo check: a problem named on" in proc.stdout
    expected = {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"} | ({"METEOR"} if java else set())
    assert set(results["metrics"]) == expected
    assert results["settings"]["split"] == "test" and results["settings"]["beam"] == 3
    assert ("METEOR   skipped" in proc.stdout) != java
    gallery = (out / "gallery.html").read_text()
    assert gallery.count("<img") == 25 and results["images"][0]["caption"] in gallery
    assert html.escape(results["images"][0]["description"]) in gallery
    assert (out / gallery.split('src="')[1].split('"')[0]).is_file()  # the images are found from the gallery
    # a run of a minute or more shows where it is, on any stderr (here a pipe), not only on a terminal
    assert "captioning test" in proc.stderr and "scoring: cider" in proc.stderr


@pytest.mark.slow
def test_evaluate_scores_an_ensemble_of_checkpoints(demo_run, tmp_path, cache_dir):
    ckpts = demo_run / "checkpoints"
    paths = [ckpts / "checkpoint_epoch_1.pth.tar", ckpts / "last.pth.tar"]
    proc = run_script("evaluate.py", "--checkpoint", paths[0], "--checkpoint", paths[1], "--data", SAMPLE, "--split",
                      "test", "--out", tmp_path, "--cache-dir", cache_dir, "--no-java", "--beam", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["settings"]["ensemble"] == [str(p) for p in paths] and len(results["images"]) == 25


@pytest.mark.slow
def test_evaluate_reads_only_the_splits_images_for_a_fine_tuned_cnn(demo_run, tmp_path, cache_dir, monkeypatch):
    """A frozen CNN's feature cache (every split, shared with training) serves evaluation; a fine-tuned CNN's
    features would serve that checkpoint alone, so its split's images are read instead."""
    filled = []
    fill = features.cached_features
    monkeypatch.setattr(features, "cached_features", lambda *a, **k: filled.append(1) or fill(*a, **k))
    ckpt = load_checkpoint(demo_run / "checkpoints" / "best.pth.tar")
    torch.save(ckpt, tmp_path / "frozen.pth.tar")
    ckpt["model"]["encoderCNN.backbone.conv_stem.weight"] *= 1.01  # as if trained with --train-cnn
    torch.save(ckpt, tmp_path / "fine_tuned.pth.tar")
    for name, fills_so_far in (("frozen", [1]), ("fine_tuned", [1])):
        args = evaluate.get_args_parser().parse_args([
            "--checkpoint", str(tmp_path / f"{name}.pth.tar"), "--data", str(SAMPLE), "--out", str(tmp_path / name),
            "--cache-dir", str(cache_dir), "--no-java", "--beam", "1", "--device", "cpu"])
        assert len(evaluate.main(args)["images"]) == 25 and filled == fills_so_far


def test_cider_d_reward_equals_pycocoevalcap_per_caption():
    from pycocoevalcap.cider.cider import Cider

    refs = [["a dog runs on the grass", "a brown dog is running", "the dog runs fast"],
            ["two kids swim in a pool", "children swimming", "two children in a blue pool"],
            ["a man rides a bike", "a cyclist on a road", "a man on a bicycle rides down the road"]]
    hyps = ["a dog runs", "two kids in a pool", "a dog rides a bike on the road"]
    _, expected = Cider().compute_score(dict(enumerate(refs)), {i: [h] for i, h in enumerate(hyps)})
    cider = metrics.CiderD([[r.split() for r in rs] for rs in refs])  # document frequencies of these refs
    got = [cider.score(h.split(), [cider.vector(r.split()) for r in rs]) for h, rs in zip(hyps, refs)]
    assert got == pytest.approx(list(expected), rel=1e-9)
    assert got[0] > got[2] > 0  # a caption of another image's words scores less, but not nothing ("a", "the")
