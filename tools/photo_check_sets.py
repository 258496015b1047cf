"""The photo check's measured sets: each split's clean photos (Flickr8k's and lit scenes) and degraded versions of
them, measured (photo_check.measures) and through the checkpoint's CNN (the pooled feature the captioner computes),
cached under degrade.py's --cache by a key of the CNN's weights, the photos and the degradations' code.
"""

import hashlib
import inspect
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from captioner import photo_check
from captioner.confidence import pooled_features
from image_loader import load_image
from tools.degradations import DEGRADABLE, SCENE_SOURCES, VERSION, degrade, lit_scene

# lit screens and pages (lit_scene): photos of them are common among blind people's and mostly text on a dark
# surround, which Flickr8k lacks; a split gets this many of them per Flickr8k photo
SCENE_SHARE = 0.4


def _cache_key(captioner, split, names, variants, seed):
    """What a cached set depends on: the CNN's weights, the photos, the degradations."""
    h = hashlib.sha1(f"{VERSION} {split} {variants} {seed} {photo_check.SIZE} {photo_check.MEASURES} "
                     f"{SCENE_SHARE}".encode())
    h.update(" ".join(names).encode())
    for f in SCENE_SOURCES:  # the scenes' text, colours and surfaces come from text_scenes
        h.update((inspect.getsource(f) if callable(f) else repr(f)).encode())
    for t in list(captioner.model.encoderCNN.backbone.state_dict().values())[:3]:
        h.update(t.float().numpy().tobytes())
    return h.hexdigest()[:12]


@torch.inference_mode()
def pooled_of(captioner, images):
    """PIL photos -> the captioner's pooled CNN features [N, F], as it computes them for a caption."""
    x = torch.stack([captioner.transform(im) for im in images])  # [N, 3, S, S]
    return pooled_features(captioner.model.encoderCNN.extract(x))


def clean_photos(images_dir, names, split, seed, load):
    """The split's clean photos: each Flickr8k photo as the captioner loads it (`load`: path -> PIL photo), then
    SCENE_SHARE as many lit scenes (lit_scene; the photos in and behind them from the same split) -> an iterator
    of (name, kind: "photo" or one of SCENES, PIL photo, the numpy generator for its degraded versions)."""
    for i, name in enumerate(names):
        yield name, "photo", load(images_dir / name), np.random.default_rng([seed, VERSION, i, hash_name(name)])
    photos = [images_dir / n for n in names]
    for i in range(round(SCENE_SHARE * len(names))):
        rng = np.random.default_rng([seed, VERSION, i, hash_name(f"scene {split}")])
        image, kind = lit_scene(photos, rng)
        yield f"{split}_scene_{i:05d}", kind, image, rng


def measure_set(captioner, images_dir, names, split, variants, seed, cache):
    """Each clean photo (clean_photos: Flickr8k's and lit scenes) and `variants` degraded versions of it ->
    {"measures" [N, M], "pooled" [N, F], "labels" [N, len(DEGRADABLE)], "turn" [N] (index into TURNS), "clean" [N]
    bool, "scene" [N] bool (a lit screen or page), "names", "kinds", "done"}, cached."""
    path = Path(cache) / f"{split}_{_cache_key(captioner, split, names, variants, seed)}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    keys = ("measures", "pooled", "labels", "turn", "clean", "names", "kinds", "done")
    rows, batch = {k: [] for k in keys}, []
    load = lambda p: load_image(p, captioner.preset["resize"])  # noqa: E731
    total = len(names) + round(SCENE_SHARE * len(names))
    items = clean_photos(images_dir, names, split, seed, load)
    for i, (name, kind, image, rng) in enumerate(tqdm(items, total=total, desc=f"degrading and measuring {split}",
                                                      unit="photo")):
        batch.append((image, [0] * len(DEGRADABLE), 0, True, name, kind, "clean"))
        for _ in range(variants):
            out, labels, turn, done = degrade(image, rng)
            batch.append((out, [labels[p] for p in DEGRADABLE], photo_check.TURNS.index(turn), False, name, kind,
                          ", ".join(done) or "re-encoded"))
        if len(batch) >= 32 or i == total - 1:
            rows["pooled"].append(pooled_of(captioner, [b[0] for b in batch]).half())
            rows["measures"].append(torch.from_numpy(np.stack([photo_check.measures(b[0]) for b in batch])))
            for k, key in enumerate(keys[2:], start=1):
                rows[key].extend(b[k] for b in batch)
            batch = []
    out = {"measures": torch.cat(rows["measures"]), "pooled": torch.cat(rows["pooled"]),
           "labels": torch.tensor(rows["labels"], dtype=torch.float32), "turn": torch.tensor(rows["turn"]),
           "clean": torch.tensor(rows["clean"]), "scene": torch.tensor([k != "photo" for k in rows["kinds"]]),
           "names": rows["names"], "kinds": rows["kinds"], "done": rows["done"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


def hash_name(name):
    """A stable number from a file name (Python's hash() differs between runs)."""
    return int(hashlib.sha1(name.encode()).hexdigest()[:8], 16)
