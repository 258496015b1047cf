import json
import logging
import pickle
import sys
import types

import pytest
import torch
from torch.utils.data import DataLoader

from captioner.backbones import preprocessing
from captioner.batches import CaptionTable, ShardedBatchSampler
from captioner.files import DataError
from captioner.layouts import load_captions, split_images
from image_loader import SPECIALS, CaptionDataset, EvalTransform, Flickr8k, Vocab, load_vocab_file, pad_captions
from tests.conftest import SAMPLE


def write_dataset(root, captions_txt=None, token_txt=None, images=("a.jpg", "b.jpg", "c.jpg")):
    (root / "Images").mkdir(parents=True)
    for n in images:
        (root / "Images" / n).write_bytes(b"")
    if captions_txt is not None:
        (root / "captions.txt").write_text(captions_txt)
    if token_txt is not None:
        (root / "Flickr8k.token.txt").write_text(token_txt)
    return root


def test_kaggle_layout_reads_quoted_commas_and_skips_missing_images(tmp_path, caplog):
    root = write_dataset(tmp_path, captions_txt='image,caption\na.jpg,A dog runs .\n'
                         'a.jpg,"A dog , brown , runs ."\nb.jpg,Two cats .\nghost.jpg,Not here .\n')
    with caplog.at_level(logging.WARNING, logger="captioner"):
        images_dir, caps = load_captions(root)
    assert images_dir == root / "Images"
    assert caps == {"a.jpg": ["A dog runs .", "A dog , brown , runs ."], "b.jpg": ["Two cats ."]}
    assert "skipped 1 caption lines naming 1 images" in caplog.text


def test_original_layout_skips_bogus_lines_with_one_warning(tmp_path, caplog):
    root = write_dataset(tmp_path, token_txt="a.jpg#0\tA dog .\na.jpg#1\tA brown dog .\n"
                         "a.jpg.1#0\tBogus .\na.jpg.1#1\tBogus again .\nc.jpg#0\tA cat .\n")
    with caplog.at_level(logging.WARNING, logger="captioner"):
        _, caps = load_captions(root)
    assert caps == {"a.jpg": ["A dog .", "A brown dog ."], "c.jpg": ["A cat ."]}
    assert caplog.text.count("skipped") == 1 and "skipped 2 caption lines" in caplog.text


@pytest.mark.parametrize("setup, message", [
    (lambda root: None, "data folder not found"),
    (lambda root: (root / "Images").mkdir(parents=True), "no captions file"),
    (lambda root: root.mkdir(), "no image folder"),
    (lambda root: (write_dataset(root), (root / "captions.txt").write_bytes(b"\xff\xfe\x00bad")),
     "cannot read captions file"),
])
def test_bad_data_folders_give_one_clear_error(tmp_path, setup, message):
    root = tmp_path / "flickr"
    setup(root)
    with pytest.raises(DataError, match=message) as e:
        load_captions(root)
    assert str(root) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_full_flickr8k_in_both_layouts(shared_flickr8k, caplog):
    _, kaggle = load_captions(shared_flickr8k)  # captions.txt is preferred when both are present
    assert len(kaggle) == 8091 and sum(map(len, kaggle.values())) == 40455
    assert any("," in c for cs in kaggle.values() for c in cs)
    from captioner.layouts import _read_token

    pairs = _read_token(shared_flickr8k / "Flickr8k.token.txt")
    assert len(pairs) == 40460
    assert sum(n == "2258277193_586949ec62.jpg.1" for n, _ in pairs) == 5


@pytest.mark.slow
def test_official_split_is_by_image_without_overlap(shared_flickr8k):
    _, caps = load_captions(shared_flickr8k)
    splits = split_images(shared_flickr8k, caps)
    assert {s: len(v) for s, v in splits.items()} == {"train": 6000, "dev": 1000, "test": 1000}
    assert not (set(splits["train"]) & set(splits["dev"]) or set(splits["train"]) & set(splits["test"])
                or set(splits["dev"]) & set(splits["test"]))


def test_seeded_split_without_split_files(tmp_path):
    names = [f"{i}.jpg" for i in range(80)]
    a, b, c = split_images(tmp_path, names, seed=1), split_images(tmp_path, names, seed=1), split_images(tmp_path,
                                                                                                       names, seed=2)
    assert a == b and a != c
    assert [len(a[s]) for s in ("train", "dev", "test")] == [60, 10, 10]
    assert sorted(a["train"] + a["dev"] + a["test"]) == sorted(names)


def test_sample_uses_its_official_split():
    data = Flickr8k.load(SAMPLE)
    assert {s: len(v) for s, v in data.splits.items()} == {"train": 200, "dev": 25, "test": 25}


def test_the_caption_dataset_gives_one_image_and_caption_per_item():
    """CaptionDataset: one item per caption, (the image as the CNN takes it, SOS w1 .. wn EOS); pad_captions batches
    them for a DataLoader, each caption padded to the longest."""
    data = Flickr8k.load(SAMPLE)
    vocab = data.train_vocab(min_freq=3)
    pairs = CaptionDataset(data, "dev", vocab, EvalTransform(preprocessing("efficientnet_lite0")))
    assert len(pairs) == sum(len(data.captions[n]) for n in data.splits["dev"])
    first = data.splits["dev"][0]
    image, caption = pairs[0]
    assert image.shape == (3, 224, 224) and caption.tolist() == vocab.numericalize(data.captions[first][0])
    images, captions = next(iter(DataLoader(pairs, batch_size=6, collate_fn=pad_captions)))
    lengths = [len(pairs[i][1]) for i in range(6)]
    assert images.shape == (6, 3, 224, 224) and captions.shape == (6, max(lengths))
    assert all((captions[i, n:] == vocab.pad_idx).all() for i, n in enumerate(lengths))


def test_vocabulary_comes_from_the_training_split_only(tmp_path):
    names = ("t1.jpg", "t2.jpg", "d1.jpg", "e1.jpg")
    rows = ["t1.jpg,a dog runs", "t2.jpg,a dog sits", "d1.jpg,zebra zebra zebra zebra zebra", "e1.jpg,giraffe giraffe"]
    root = write_dataset(tmp_path, captions_txt="image,caption\n" + "\n".join(rows) + "\n", images=names)
    for split, ns in (("train", ["t1.jpg", "t2.jpg"]), ("dev", ["d1.jpg"]), ("test", ["e1.jpg"])):
        (root / f"Flickr_8k.{split}Images.txt").write_text("\n".join(ns))
    vocab = Flickr8k.load(root).train_vocab(min_freq=2)
    assert vocab.itos == SPECIALS + ["a", "dog"]
    assert vocab.numericalize("zebra dog") == [vocab.sos_idx, vocab.unk_idx, vocab.stoi["dog"], vocab.eos_idx]


def test_tokenizer_numericalize_decode():
    vocab = Vocab.build(["A dog's ball, isn't it?"] * 5, min_freq=5)
    assert vocab.tokenize("A dog's ball, isn't it?") == ["a", "dog", "'s", "ball", ",", "is", "n't", "it", "?"]
    assert vocab.itos[:4] == ["<PAD>", "<SOS>", "<EOS>", "<UNK>"] and vocab.pad_idx == 0
    ids = vocab.numericalize("The dog's ball")
    assert ids[0] == vocab.sos_idx and ids[-1] == vocab.eos_idx and ids[1] == vocab.unk_idx
    assert vocab.decode(ids) == "dog 's ball"
    assert vocab.decode([vocab.stoi["dog"], vocab.eos_idx, vocab.stoi["ball"]]) == "dog"


def test_caption_table_pads_a_batch_to_its_longest_and_maps_captions_to_images():
    table = CaptionTable([[[1, 4, 2], [1, 4, 4, 4, 2]], [[1, 2]], [[1, 5, 5, 5, 5, 5, 5, 2]]], torch.device("cpu"))
    caps, index, words = table.batch(torch.tensor([1, 0]))  # the longest caption (image 2) is not in the batch
    assert caps.tolist() == [[1, 2, 0, 0, 0], [1, 4, 2, 0, 0], [1, 4, 4, 4, 2]]
    assert index.tolist() == [0, 1, 1] and words == 1 + 2 + 4  # each caption's words after SOS, EOS included
    caps, index, words = table.batch(torch.tensor([2]))
    assert caps.shape == (1, 8) and index.tolist() == [0] and words == 7


def test_vocabulary_file_round_trip_and_seed_format(tmp_path, monkeypatch):
    vocab = Vocab(SPECIALS + ["dog", "cat"])
    vocab.save(tmp_path / "vocabulary.pkl")
    assert load_vocab_file(tmp_path / "vocabulary.pkl").itos == vocab.itos

    class Vocabulary:  # the seed tutorial pickles an object of this name
        def __init__(self):
            self.itos = dict(enumerate(SPECIALS + ["dog"]))
            self.stoi = {w: i for i, w in self.itos.items()}
            self.freq_threshold = 5

    seed_module = types.ModuleType("get_loader")
    seed_module.Vocabulary, Vocabulary.__module__, Vocabulary.__qualname__ = Vocabulary, "get_loader", "Vocabulary"
    monkeypatch.setitem(sys.modules, "get_loader", seed_module)
    (tmp_path / "seed.pkl").write_bytes(pickle.dumps(Vocabulary()))
    assert load_vocab_file(tmp_path / "seed.pkl").itos == SPECIALS + ["dog"]


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))  # loading this with plain pickle would create the file


def test_crafted_vocabulary_pickle_runs_no_code(tmp_path):
    target = tmp_path / "pwned"
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"itos": _Exploit(str(target))}))
    with pytest.raises(DataError, match="refusing"):
        load_vocab_file(tmp_path / "evil.pkl")
    assert not target.exists()


def test_sharded_batches_give_each_process_its_share_of_every_batch():
    one = ShardedBatchSampler(10, 4, shuffle=False)
    assert list(one) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]] and len(one) == 3
    shares = [list(ShardedBatchSampler(10, 4, rank=r, world=3, shuffle=False)) for r in range(3)]
    # batches of 4 split 2/1/1; the last batch (2 images) has fewer images than processes and is left out
    assert shares == [[[0, 1], [4, 5]], [[2], [6]], [[3], [7]]]
    assert all(len(ShardedBatchSampler(10, 4, rank=r, world=3)) == 2 for r in range(3))
    assert len(ShardedBatchSampler(10, 4, world=2)) == 3  # a last batch of 2 images still feeds 2 processes
    a, b = ShardedBatchSampler(10, 4), ShardedBatchSampler(10, 4, rank=1, world=2)
    a.generator.manual_seed(5)
    b.generator.manual_seed(5)
    whole, half = list(a), list(b)
    assert [batch[len(batch) - len(h):] for batch, h in zip(whole, half)] == half  # same order, rank 1's part


def test_captions_saved_by_a_spreadsheet_read_as_well(tmp_path):
    """Excel's "CSV UTF-8" writes a byte-order mark first, and CRLF line ends."""
    root = write_dataset(tmp_path)
    (root / "captions.txt").write_bytes("\ufeffimage,caption\r\na.jpg,A dog runs .\r\nb.jpg,\"Two cats, asleep .\"\r\n"
                                        .encode("utf-8"))
    _, caps = load_captions(root)
    assert caps == {"a.jpg": ["A dog runs ."], "b.jpg": ["Two cats, asleep ."]}


def test_karpathy_split_files_for_flickr_and_coco(tmp_path, caplog):
    def entry(name, split, *captions, **extra):
        return {"filename": name, "split": split, "sentences": [{"raw": c} for c in captions], **extra}

    root = write_dataset(tmp_path / "f30k", images=("a.jpg", "b.jpg", "c.jpg", "d.jpg"))
    entries = [entry("a.jpg", "train", "A dog .", "A brown dog . "), entry("b.jpg", "val", "Two cats ."),
               entry("c.jpg", "test", "A bird ."), entry("d.jpg", "restval", "A horse ."),
               entry("ghost.jpg", "train", "Not here .")]
    (root / "dataset_flickr30k.json").write_text(json.dumps({"dataset": "flickr30k", "images": entries}))
    with caplog.at_level(logging.WARNING, logger="captioner"):
        data = Flickr8k.load(root)
    assert data.images_dir == root / "Images" and "skipped 1 images of dataset_flickr30k.json" in caplog.text
    assert data.splits == {"train": ["a.jpg", "d.jpg"], "dev": ["b.jpg"], "test": ["c.jpg"]}  # restval trains
    assert data.captions["a.jpg"] == ["A dog .", "A brown dog ."]
    coco = tmp_path / "coco"
    for folder, name in (("train2014", "x.jpg"), ("val2014", "y.jpg"), ("val2014", "z.jpg")):
        (coco / folder).mkdir(parents=True, exist_ok=True)
        (coco / folder / name).write_bytes(b"")
    entries = [entry("x.jpg", "train", "A bus .", filepath="train2014"),
               entry("y.jpg", "restval", "A cat .", filepath="val2014"),
               entry("z.jpg", "test", "A pizza .", filepath="val2014")]
    (coco / "dataset_coco.json").write_text(json.dumps({"images": entries}))
    data = Flickr8k.load(coco)
    assert data.images_dir == coco and data.splits == {"train": ["train2014/x.jpg", "val2014/y.jpg"], "dev": [],
                                                       "test": ["val2014/z.jpg"]}
    (coco / "dataset_coco.json").write_text('{"annotations": []}')
    with pytest.raises(DataError, match="Karpathy's split file"):
        Flickr8k.load(coco)
