"""The data path that feeds the model: JPEG decoding on the device, the image store, batches as indices into
tensors, mixed precision on the CPU, and bench.py."""

import io
import json
import logging
import os
import shutil
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

import image_intial_model as M
import image_training
import utils
from captioner import backbones, training_run
from captioner import batches as batch_module
from captioner.batches import Batches, CaptionTable, FileSource, default_workers, read_image
from captioner.features import (
    FeatureFile,
    FeatureSource,
    ImageStore,
    StoreSource,
    cached_features,
    extract_features,
    feature_cache_key,
)
from captioner.files import DataError
from captioner.training import Trainer, WordLoss
from image_loader import EvalTransform, Flickr8k, augment, load_image, normalize, resize_pil
from image_training import dev_loss
from tests.conftest import SAMPLE, copy_sample, run_script, train_args
from tests.test_robustness import make_bad_and_odd_images
from utils import SEED_PREPROCESSING, Dist

CPU = torch.device("cpu")
LITE0 = backbones.preprocessing("efficientnet_lite0")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Eight sample photos at Flickr8k's original size (500x375), so that every path resizes them."""
    folder = tmp_path_factory.mktemp("photos")
    names = sorted(p.name for p in (SAMPLE / "Images").iterdir())[:8]
    for n in names:
        Image.open(SAMPLE / "Images" / n).resize((500, 375)).save(folder / n, quality=90)
    return folder, names


def images_of(source, indices):
    return source.to_device(source.load(indices), CPU)[1]


@pytest.mark.slow
def test_jpegs_decoded_on_the_device_give_pillows_pixels_and_features(photos):
    """The device path (torchvision.io.decode_jpeg, here on CPU tensors; nvJPEG on CUDA) against Pillow's."""
    folder, names = photos
    for size in (224, 299):
        device = images_of(FileSource(folder, names, size, 0, decode_device=CPU), range(8)).float()
        pillow = images_of(FileSource(folder, names, size, 0), range(8)).float()
        assert device.shape == pillow.shape == (8, 3, size, size)
        # measured: mean 0.15 / 0.17 levels, max 1
        assert (device - pillow).abs().max() <= 2 and (device - pillow).abs().mean() < 0.5
    encoder = M.CNN_RNN(M.ModelArgs(10, "efficientnet_lite0"), weights="imagenet").encoderCNN.eval()
    with torch.no_grad():
        features = [encoder.extract(normalize(images_of(FileSource(folder, names, 224, 0, decode_device=d),
                                                        range(8)), LITE0)) for d in (CPU, None)]
    # measured: 0.046 at most, cosine 0.999; noise of +-1 level on Pillow's own pixels moves them by 0.23
    relative = (features[0] - features[1]).norm(dim=1) / features[1].norm(dim=1)
    assert relative.max() < 0.1


def test_only_plain_jpegs_go_to_the_device_and_odd_files_keep_pillows_rules(tmp_path, photos):
    folder, names = photos
    expected = make_bad_and_odd_images(tmp_path / "odd")
    Image.open(folder / names[0]).save(tmp_path / "odd" / "progressive.jpg", progressive=True)
    assert read_image(folder / names[0], 224, raw_jpeg=True).dim() == 1  # bytes, for the device to decode
    for name in ("cmyk.jpg", "grey.jpg", "rotated.jpg", "progressive.jpg", "palette.png", "rgba.png"):
        assert read_image(tmp_path / "odd" / name, 224, raw_jpeg=True).shape == (3, 224, 224), name
    for name in ("truncated.jpg", "text.jpg", "empty.jpg", "huge.png"):
        with pytest.raises(DataError, match=expected[name]):
            read_image(tmp_path / "odd" / name, 224, raw_jpeg=True)
    # a batch of both kinds, with an unreadable file left out
    source = FileSource(tmp_path / "odd", ["cmyk.jpg", "truncated.jpg", "rotated.jpg"], 224, 0, decode_device=CPU)
    kept, images = source.to_device(source.load([0, 1, 2]), CPU)
    assert kept == [0, 2] and images.shape == (2, 3, 224, 224) and images.dtype == torch.uint8  # positions
    upright = np.asarray(load_image(tmp_path / "odd" / "rotated.jpg").resize((224, 224), Image.BILINEAR))
    assert np.array_equal(images[1].permute(1, 2, 0).numpy(), upright)


def test_device_decoding_reads_files_in_threads_in_order_and_stops_cleanly(photos):
    """With device decoding, threads read the files (no worker process to fork): the same batches, in order,
    as reading them in the main process, and a pass left early leaves no thread behind."""
    folder, names = photos
    source = FileSource(folder, names, 224, workers=16, decode_device=CPU)
    assert source.threads and source.workers == 2

    def batches(src):
        return Batches(src, CaptionTable([[] for _ in names], CPU), names, CPU, transform="raw", batch_size=3)

    threaded = list(batches(source))
    alone = list(batches(FileSource(folder, names, 224, workers=0, decode_device=CPU)))
    assert [b.names for b in threaded] == [b.names for b in alone] == [names[:3], names[3:6], names[6:]]
    assert all(torch.equal(a.x, b.x) for a, b in zip(threaded, alone))
    before = threading.active_count()
    for _ in batches(FileSource(folder, names, 224, workers=2, decode_device=CPU)):
        break
    assert threading.active_count() == before


def test_device_decoding_runs_in_the_reader_threads(photos, monkeypatch):
    """The decoding and resizing are the reader threads' work, so that the main thread only launches the model."""
    folder, names = photos
    real, decoded_in = batch_module.decode_jpegs, []

    def decode(chunks, device):
        decoded_in.append(threading.current_thread())
        return real(chunks, device)

    monkeypatch.setattr(batch_module, "decode_jpegs", decode)
    batches = Batches(FileSource(folder, names, 224, workers=2, decode_device=CPU),
                      CaptionTable([[] for _ in names], CPU), names, CPU, transform="raw", batch_size=3)
    assert [b.x.shape for b in batches] == [(3, 3, 224, 224)] * 2 + [(2, 3, 224, 224)]
    assert len(decoded_in) == 3 and threading.main_thread() not in decoded_in


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_the_feature_pass_as_a_cuda_graph_gives_the_eager_features(photos):
    folder, names = photos
    model = M.CNN_RNN(M.ModelArgs(10, "efficientnet_lite0"), weights="imagenet").cuda()
    cuda = torch.device("cuda")
    # 8 photos in batches of 2: 4 batches, so the pass runs as a graph, decoded by the reader threads while it
    # replays; one photo in batches of 2: eagerly
    kept, graphed = extract_features(model.encoderCNN, folder, names, LITE0, cuda, "fp32", 2, batch_size=2)
    eager = torch.cat([extract_features(model.encoderCNN, folder, [n], LITE0, cuda, "fp32", 0, batch_size=2)[1]
                       for n in names])
    assert kept == names and torch.allclose(graphed, eager, atol=1e-4)


@pytest.mark.parametrize("preset", [LITE0, backbones.preprocessing("inception_v3"), SEED_PREPROCESSING])
def test_evaluation_preset_is_torchvisions_resize_crop_and_normalize(photos, preset):
    folder, names = photos
    im = load_image(folder / names[0])
    reference = transforms.Compose([
        transforms.Resize((preset["resize"],) * 2, interpolation=transforms.InterpolationMode.BILINEAR,
                          antialias=True),
        transforms.CenterCrop(preset["crop"]), transforms.ToTensor(), transforms.Normalize(preset["mean"],
                                                                                           preset["std"])])
    torch.testing.assert_close(EvalTransform(preset)(im), reference(im), rtol=0, atol=1e-6)


def test_augmentation_crops_and_jitters_each_image_reproducibly(photos):
    folder, names = photos
    images = torch.stack([resize_pil(load_image(folder / n), 240) for n in names[:4]])
    a = augment(images, LITE0, torch.Generator().manual_seed(1))
    assert a.shape == (4, 3, 224, 224)
    torch.testing.assert_close(a, augment(images, LITE0, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, augment(images, LITE0, torch.Generator().manual_seed(2)))
    pixels = a * 0.5 + 0.5  # back to [0, 1]
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    # jitter is mild: each image stays close to some 224-px crop of itself
    plain = normalize(images[:, :, 8:232, 8:232], LITE0)
    assert (a - plain).abs().mean() < (a - plain.roll(1, 0)).abs().mean()


def test_image_store_is_built_once_read_back_exactly_and_never_stale(tmp_path, caplog):
    data, train = copy_sample(tmp_path / "data", train=5, dev=0)
    (data / "Images" / train[4]).write_text("not a photo")
    images = data / "Images"
    with caplog.at_level(logging.INFO, logger="captioner"):
        store = ImageStore.open(images, train, 64, CPU, tmp_path / "cache", workers=1)
        assert "stored 4 images at 64 px" in caplog.text and "skipped 1 unreadable images" in caplog.text
        assert store.names == train[:4]
        # as the store decodes them: load_image told the size, so a large JPEG is decoded at a reduced scale
        expected = torch.stack([resize_pil(load_image(images / n, 64), 64) for n in store.names])
        assert torch.equal(store.read([0, 1, 2, 3]), expected)
        caplog.clear()
        again = ImageStore.open(images, train, 64, CPU, tmp_path / "cache", workers=1)
        assert "images from store" in caplog.text and again.path == store.path
        os.utime(images / train[0], ns=(0, 0))  # a changed file: a new store, never the stale one
        assert ImageStore.open(images, train, 64, CPU, tmp_path / "cache", workers=1).path != store.path


def test_batches_from_tensors_give_the_losses_of_each_caption_scored_alone():
    """A batch is an index into one features tensor and one padded caption tensor; the summed loss must be
    what each caption of each image gives on its own."""
    torch.manual_seed(0)
    model = M.CNN_RNN(M.ModelArgs(vocab_size=20, encoder="efficientnet_lite0", embed_size=8, hidden_size=16,
                                  dropout=0.0), weights="random")
    captions = [[[1, 5, 6, 2], [1, 7, 2]], [[1, 8, 9, 10, 11, 12, 2]], [[1, 4, 2]] * 5, [[1, 13, 14, 2]]]
    features = torch.randn(6, 1280)
    rows = [5, 0, 3, 1]  # the split's images are rows of a larger cache
    batches = Batches(FeatureSource(features, rows), CaptionTable(captions, CPU), list("abcd"), CPU, batch_size=3,
                      shuffle=True)
    criterion = torch.nn.CrossEntropyLoss(ignore_index=0, reduction="sum")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # a training pass that leaves the model as it is
    progress = Trainer(model, WordLoss(), CPU, optimizer, torch.amp.GradScaler("cpu", enabled=False)).run(batches)
    expected, words = 0.0, 0
    with torch.no_grad():
        for row, caps in zip(rows, captions):
            for c in caps:
                c = torch.tensor([c])
                logits = model(features[row:row + 1], c[:, :-1], from_features=True)
                expected += criterion(logits[0], c[0, 1:]).item()
                words += c.shape[1] - 1
    assert progress.batches == 2 and progress.count == words and progress.captions == 9
    assert progress.total == pytest.approx(expected, rel=1e-5)
    assert dev_loss(model, batches, WordLoss(), CPU) == pytest.approx(expected / words, rel=1e-5)


def test_a_resumed_pass_skips_batches_unread_and_augments_the_rest_the_same(tmp_path):
    data, train = copy_sample(tmp_path / "data", train=8, dev=0)
    store = ImageStore.open(data / "Images", train, 240, CPU, tmp_path / "cache", workers=1)
    read = []

    class Counting(StoreSource):
        def load(self, indices):
            read.append(list(indices))
            return super().load(indices)

    batches = Batches(Counting(store, workers=0), CaptionTable([[[1, 2]]] * 8, CPU), train, CPU,
                      LITE0, "train", batch_size=2, shuffle=True)
    batches.sampler.generator.manual_seed(7)
    whole = list(batches)
    read.clear()
    batches.sampler.generator.manual_seed(7)
    resumed = list(batches.iterate(skip=2))
    assert len(read) == 2 and len(resumed) == 2
    for a, b in zip(whole[2:], resumed):
        assert a.names == b.names
        torch.testing.assert_close(a.x, b.x)


@pytest.mark.slow
def test_mixed_precision_runs_on_the_cpu_as_on_a_gpu(tmp_path, cache_dir):
    model = M.CNN_RNN(M.ModelArgs(vocab_size=30, encoder="efficientnet_lite0"), weights="random")
    with utils.autocast(CPU, "bf16"):
        logits = model(torch.randn(2, 1280), torch.ones(2, 5, dtype=torch.long), from_features=True)
    assert logits.dtype == torch.bfloat16
    assert utils.autocast_dtype(CPU) is None and utils.autocast_dtype(CPU, "fp16") == torch.float16
    import image_training

    result = image_training.main(train_args(tmp_path, cache_dir, "--epochs", "1", "--max-images", "40",
                                            "--precision", "bf16", "--attention"))
    assert np.isfinite(result["history"][0]["train_loss"])


def test_auto_precision_trains_the_attention_decoder_on_cached_features_in_fp32_on_cuda():
    """Only auto changes, only on CUDA, only for the attention decoder with no CNN in the step; a dtype the
    user names is kept. (A CUDA device object needs no GPU to be made.)"""
    cuda, attention, plain = torch.device("cuda"), M.ModelArgs(10, decoder="attention"), M.ModelArgs(10)
    assert utils.step_precision(cuda, "auto", attention, from_features=True) == "fp32"
    assert utils.step_precision(cuda, "auto", attention, from_features=False) == "auto"
    assert utils.step_precision(cuda, "auto", plain, from_features=True) == "auto"
    assert utils.step_precision(cuda, "bf16", attention, from_features=True) == "bf16"
    assert utils.step_precision(CPU, "auto", attention, from_features=True) == "auto"


def test_self_critical_learning_in_eval_mode_keeps_the_lstm_off_cudnn(monkeypatch):
    """cuDNN's LSTM has no backward in eval mode (self-critical training learns with dropout off): the
    decoder must not ask it for one. Recorded on any device: the flag it runs the LSTM under."""
    seen = []
    real = torch.nn.LSTM.forward

    def forward(self, *args, **kwargs):
        seen.append(torch.backends.cudnn.enabled)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.LSTM, "forward", forward)
    decoder = M.RNN_decoder(M.ModelArgs(vocab_size=10, embed_size=4, hidden_size=4))
    tokens = torch.ones(2, 3, dtype=torch.long)
    decoder.eval()(torch.randn(2, 4), tokens).sum().backward()
    decoder.train()(torch.randn(2, 4), tokens)
    with torch.no_grad():
        decoder.eval()(torch.randn(2, 4), tokens)
    assert seen == [False, torch.backends.cudnn.enabled, torch.backends.cudnn.enabled]


def test_loader_workers_follow_the_cores_this_process_may_use(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    assert default_workers() == 6 and default_workers(processes_per_node=4) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(96)), raising=False)
    assert default_workers() == 16


@pytest.mark.slow
def test_bench_smoke_run_prints_every_figure(tmp_path):
    proc = run_script("tools/bench.py", "--smoke", "--json", "--batch-size", "8", "--device", "cpu", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    for key in ("encoder_forward_images_per_s", "loader_images_per_s", "feature_pass_images_per_s",
                "decoder_bare_captions_per_s", "frozen_epoch_captions_per_s", "store_read_images_per_s",
                "jpeg_read_images_per_s", "finetune_epoch_s", "finetune_loader_images_per_s",
                "finetune_bare_images_per_s", "caption_beam3_s", "peak_memory_mb"):
        assert r[key] > 0, key
    assert r["finetune_measured_images"] == 8 and r["decoder"] == "plain" and r["workers"] >= 1
    assert r["runtime"] == "onnx" and set(r["ceilings"]) == {"eager", "onnx"} and r["compile_s"] is None  # --smoke
    assert all(rate > 0 and one > 0 for rate, one in r["ceilings"].values())
    assert r["feature_pass_of_onnx"] > 0 and r["caption_beam3_per_onnx_image"] > 0


@pytest.mark.slow
def test_cached_features_give_the_same_loss_as_the_cnn_on_the_image_store(tmp_path, cache_dir):
    args = train_args(tmp_path, cache_dir, "--max-images", "16", "--device", "cpu")
    device = torch.device("cpu")
    data = Flickr8k.load(args.data, seed=args.seed, max_images=args.max_images)
    vocab, model, preset = image_training.build_model(args, data, None, device)
    cached = training_run.make_batches(args, data, vocab, model, preset, device, Dist())
    args.no_cache = True
    direct = training_run.make_batches(args, data, vocab, model, preset, device, Dist())
    assert cached["dev"].transform is None and direct["dev"].transform == "eval"  # the second reads images
    assert list(cache_dir.glob("images-224px-*.npy"))  # --no-cache read the images from a store
    with_cache = dev_loss(model, cached["dev"], WordLoss(), device)
    without = dev_loss(model, direct["dev"], WordLoss(), device)
    assert with_cache == pytest.approx(without, rel=1e-5)


@pytest.mark.slow
def test_features_read_from_their_file_train_as_the_in_memory_cache(tmp_path, cache_dir):
    """--features-on-disk: the same rows, and a training run with the same losses, as features in memory."""
    runs = {}
    for mode, extra in (("memory", ()), ("disk", ("--features-on-disk", "--workers", "2"))):
        args = train_args(tmp_path / mode, cache_dir, "--max-images", "40", "--epochs", "2", "--device", "cpu", *extra)
        runs[mode] = image_training.main(args)["history"]
    assert [e["train_loss"] for e in runs["memory"]] == [e["train_loss"] for e in runs["disk"]]
    assert [e["dev_loss"] for e in runs["memory"]] == [e["dev_loss"] for e in runs["disk"]]
    args = train_args(tmp_path, cache_dir, "--max-images", "40", "--device", "cpu")
    data = Flickr8k.load(args.data, seed=args.seed, max_images=args.max_images)
    _, model, preset = image_training.build_model(args, data, None, CPU)
    names = sorted(set().union(*data.splits.values()))
    kept, file = cached_features(model, data.images_dir, names, preset, CPU, cache_dir, 0, on_disk=True)
    _, memory = cached_features(model, data.images_dir, names, preset, CPU, cache_dir, 0, on_disk=False)
    assert isinstance(file, FeatureFile) and kept == names and memory.shape == (len(names), 1280)
    assert torch.equal(file.read([5, 0, 5, 39]), memory[[5, 0, 5, 39]])


MEMORY_BOUND = 1200 * 2**20  # bytes of memory allowed to a run whose feature cache is 2.5 GB
# The training run below, in a process that reports the most memory it held: its resident anonymous and
# shared memory, sampled every 20 ms. Not ru_maxrss: that also counts the pages of PyTorch's libraries mapped
# from the OS's file cache, which vary by hundreds of MB with what ran before.
MEASURED_RUN = """
import re, sys, threading, time
import image_training

peak = 0

def sample():
    global peak
    while True:
        status = open("/proc/self/status").read()
        held = sum(int(re.search(rf"{k}:\\s+(\\d+) kB", status).group(1)) for k in ("RssAnon", "RssShmem"))
        peak = max(peak, held * 1024)
        time.sleep(0.02)

threading.Thread(target=sample, daemon=True).start()
rc = image_training.cli(sys.argv[1:])
time.sleep(0.05)
print(peak)
sys.exit(rc)
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc/self/status")
def test_a_feature_cache_larger_than_memory_trains_with_bounded_memory(tmp_path):
    """20,000 images with 7x7 regions (fp16: 2.5 GB of features), one epoch of an attention decoder reading them
    from their file: the training process's memory stays under MEMORY_BOUND."""
    data, n = tmp_path / "data", 20_000
    (data / "Images").mkdir(parents=True)
    tiny = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 60)).save(tiny, "JPEG")
    rows = ["image,caption"]
    for i in range(n):
        (data / "Images" / f"{i:05d}.jpg").write_bytes(tiny.getvalue())
        rows.append(f"{i:05d}.jpg,a {('dog', 'cat', 'man', 'child')[i % 4]} runs on the grass .")
    (data / "captions.txt").write_text("\n".join(rows) + "\n")
    flags = ["--data", data, "--encoder", "efficientnet_lite0", "--attention", "--embed-size", "16",
             "--hidden-size", "16", "--attention-dim", "8", "--epochs", "1", "--batch-size", "500", "--min-freq", "1",
             "--dev-images", "4", "--features-on-disk", "--workers", "1", "--device", "cpu",
             "--cache-dir", tmp_path / "cache", "--checkpoint-dir", tmp_path / "ck", "--log-dir", tmp_path / "runs"]
    # The cache the run would compute (its key: these files, the encoder's weights, the preprocessing), filled
    # with random regions instead: the CNN on 20,000 images takes a CPU a quarter of an hour.
    args = image_training.parse_args([str(f) for f in flags])
    loaded = Flickr8k.load(data)
    names = sorted(set().union(*loaded.splits.values()))
    _, model, preset = image_training.build_model(args, loaded, None, CPU)
    key = feature_cache_key(model.encoderCNN, preset, loaded.images_dir, names, None)
    chunks = ((names[i:i + 1000], torch.randn(len(names[i:i + 1000]), 49, 1280).half())
              for i in range(0, len(names), 1000))
    file = FeatureFile.write(tmp_path / "cache" / f"features-efficientnet_lite0-{key}.npy", chunks, len(names))
    assert file.nbytes > 2.4e9
    proc = run_script("-c", MEASURED_RUN, *flags, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CNN features from cache" in proc.stderr and "a batch at a time" in proc.stderr
    peak = int(proc.stdout.split()[-1])
    assert peak < MEMORY_BOUND, f"peak memory {peak / 2**20:.0f} MiB"


def test_feature_cache_key_changes_with_images_and_preprocessing(tmp_path, cache_dir):
    args = train_args(tmp_path, cache_dir, "--max-images", "8")
    data = Flickr8k.load(args.data, max_images=8)
    images = tmp_path / "Images"
    shutil.copytree(data.images_dir, images)
    names = data.splits["train"]
    _, model, preset = image_training.build_model(args, data, None, torch.device("cpu"))
    key = feature_cache_key(model.encoderCNN, preset, images, names, None)
    assert key == feature_cache_key(model.encoderCNN, preset, images, names, None)
    assert key != feature_cache_key(model.encoderCNN, {**preset, "resize": 256}, images, names, None)
    assert key != feature_cache_key(model.encoderCNN, preset, images, names, torch.bfloat16)
    with open(images / names[0], "ab") as f:
        f.write(b"\0")  # the same name, other bytes
    assert key != feature_cache_key(model.encoderCNN, preset, images, names, None)


def test_a_jpeg_the_device_cannot_decode_takes_pillows_path(photos, tmp_path, monkeypatch, caplog):
    """nvJPEG may refuse a file whose header looked plain (corrupt further in): the batch is decoded again image
    by image, and a refused one goes to Pillow, which reads it or names it in one warning."""
    folder, names = photos
    for n in names[:2]:
        shutil.copy(folder / n, tmp_path / n)
    (tmp_path / "bad.jpg").write_bytes((folder / names[2]).read_bytes()[:600] + b"\xff\xd9")  # a header, no image
    refused = {(tmp_path / n).stat().st_size for n in (names[1], "bad.jpg")}
    real = batch_module.decode_jpeg

    def decode(data, **kwargs):
        if isinstance(data, list) or len(data) in refused:
            raise RuntimeError("Error while decoding JPEG images")
        return real(data, **kwargs)

    monkeypatch.setattr(batch_module, "decode_jpeg", decode)
    source = FileSource(tmp_path, [names[0], names[1], "bad.jpg"], 224, 0, decode_device=CPU)
    with caplog.at_level(logging.WARNING, logger="captioner"):
        kept, images = source.to_device(source.load([0, 1, 2]), CPU)
    pillow = images_of(FileSource(tmp_path, names[:2], 224, 0), [0, 1])
    assert kept == [0, 1] and (images.float() - pillow.float()).abs().max() <= 2
    assert torch.equal(images[1], pillow[1])  # the refused one: Pillow's own pixels
    assert f"skipping {tmp_path / 'bad.jpg'}: unreadable image" in caplog.text
