"""The official-zip source, download, cache and npz/zip equivalence, on a small synthetic
Omniglot built here in the official layout ``<set>/<alphabet>/characterNN/XXXX_YY.png``."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metaopt.tasks import ChecksumError, Omniglot
from metaopt.tasks import omniglot as omniglot_module

# Alphabets in official-id order; note "Beta" < "Alpha" by id but not by name.
LAYOUT = {
    "images_background": [("Beta", 3), ("Alpha", 2)],
    "images_evaluation": [("Gamma", 3)],
}
SPLIT = {
    "train": [["images_background", "Beta", "character01"], ["images_background", "Beta", "character02"],
              ["images_background", "Alpha", "character02"], ["images_evaluation", "Gamma", "character01"]],
    "val": [["images_background", "Beta", "character03"], ["images_background", "Alpha", "character01"]],
    "test": [["images_evaluation", "Gamma", "character02"], ["images_evaluation", "Gamma", "character03"]],
}


def _white(seed: int) -> np.ndarray:
    """A 105x105 'drawing': True = white background, a random blob of ink."""
    rng = np.random.default_rng(seed)
    img = np.ones((105, 105), dtype=bool)
    r, c = rng.integers(10, 80, size=2)
    img[r:r + 20, c:c + rng.integers(3, 20)] = False
    img[rng.random((105, 105)) < 0.02] = False
    return img


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict:
    """Zips, an npz copy of the same pixels with index.json, and their digests."""
    base = tmp_path_factory.mktemp("synthetic-omniglot")
    zips, npz = base / "zips", base / "npz"
    zips.mkdir(), npz.mkdir()
    char_id, index, pixels = 0, {}, {}
    for s, alphabets in LAYOUT.items():
        rows, blocks = [], []
        with zipfile.ZipFile(zips / f"{s}.zip", "w") as zf:
            zf.writestr(f"{s}/", b"")
            for alphabet, n in alphabets:
                blocks.append({"alphabet": alphabet, "characters": n, "first_index": len(rows),
                               "first_id": char_id + 1})
                for k in range(1, n + 1):
                    char_id += 1
                    drawings = np.stack([_white(char_id * 100 + d) for d in range(1, 21)])
                    pixels[(s, alphabet, f"character{k:02d}")] = drawings
                    rows.append(drawings)
                    for d in range(20):
                        buf = io.BytesIO()
                        Image.fromarray(drawings[d]).convert("1").save(buf, format="PNG")
                        zf.writestr(f"{s}/{alphabet}/character{k:02d}/{char_id:04d}_{d + 1:02d}.png",
                                    buf.getvalue())
        images = np.stack(rows)
        np.savez_compressed(npz / f"{s}.npz", images=images,
                            labels=np.repeat(np.arange(len(rows))[:, None], 20, 1))
        index[s] = blocks
    (npz / "index.json").write_text(json.dumps(index))
    md5 = {f"{s}.zip": hashlib.md5((zips / f"{s}.zip").read_bytes()).hexdigest() for s in LAYOUT}
    sha = {n: hashlib.sha256((npz / n).read_bytes()).hexdigest()
           for n in ("images_background.npz", "images_evaluation.npz", "index.json")}
    return {"base": base, "zips": zips, "npz": npz, "md5": md5, "sha256": sha, "pixels": pixels}


def test_zip_default_checksum_is_strict(synthetic, tmp_path):
    with pytest.raises(ChecksumError, match="md5 of .*images_background.zip is .* expected 68d2efa1b9178cc56df9314c21c6e718"):
        Omniglot(synthetic["zips"], ways=2, split_file=SPLIT, cache_dir=tmp_path)


def test_zip_source_names_images_and_split(synthetic, tmp_path):
    data = Omniglot(synthetic["zips"], ways=3, shots=2, queries=3, split="train", split_file=SPLIT,
                    checksums=synthetic["md5"], cache_dir=tmp_path)
    assert data.source == "zip" and not data.cache_hit
    assert data.characters == [tuple(c) for c in SPLIT["train"]] and data.num_classes == 16
    for c in data.characters:
        want = torch.from_numpy(np.stack([
            np.asarray(Image.fromarray((~d).astype(np.uint8) * 255).resize((28, 28), Image.LANCZOS))
            for d in synthetic["pixels"][c]]))
        assert torch.equal(data.images[data.class_index(c)], want)
        assert torch.equal(data.images[data.class_index(c, 270)], torch.rot90(want, 3, dims=(-2, -1)))
    (xs, ys), (xq, yq) = data.sample(4, torch.Generator().manual_seed(0))
    assert xs.shape == (4, 6, 1, 28, 28) and xq.shape == (4, 9, 1, 28, 28) and ys.max() == 2


def test_zip_and_npz_give_the_same_arrays(synthetic, tmp_path):
    for split in SPLIT:
        z = Omniglot(synthetic["zips"], ways=2, split=split, split_file=SPLIT, checksums=synthetic["md5"],
                     cache_dir=tmp_path)
        n = Omniglot(synthetic["npz"], ways=2, split=split, split_file=SPLIT, checksums=synthetic["sha256"],
                     cache_dir=tmp_path)
        assert n.source == "npz" and z.classes == n.classes and torch.equal(z.images, n.images)
    # The whole internal arrays, in official id order (Beta before Alpha).
    names_z, images_z, _ = omniglot_module._load_images(
        synthetic["zips"], "zip", 28, tmp_path, True, synthetic["md5"], False)
    names_n, images_n, _ = omniglot_module._load_images(
        synthetic["npz"], "npz", 28, tmp_path, True, synthetic["sha256"], False)
    assert names_z == names_n and names_z[:3] == [("images_background", "Beta", f"character0{i}") for i in (1, 2, 3)]
    assert torch.equal(images_z, images_n)


def test_cache_written_once_then_loaded(synthetic, tmp_path, monkeypatch):
    kwargs = dict(ways=2, split_file=SPLIT, checksums=synthetic["md5"])
    monkeypatch.setenv("METAOPT_CACHE", str(tmp_path / "env-cache"))
    first = Omniglot(synthetic["zips"], **kwargs)
    assert not first.cache_hit and first.cache_path.parent == tmp_path / "env-cache" / "omniglot"
    assert first.cache_path.is_file() and not list(first.cache_path.parent.glob("*.tmp"))

    def no_resize(*args, **kw):
        raise AssertionError("resized again instead of loading the cache")

    monkeypatch.setattr(omniglot_module, "_resize", no_resize)
    second = Omniglot(synthetic["zips"], **kwargs)
    assert second.cache_hit and torch.equal(first.images, second.images)
    # The cache file is plain tensors and strings: loadable with weights_only=True.
    obj = torch.load(first.cache_path, weights_only=True)
    assert obj["images"].dtype == torch.uint8 and obj["images"].shape == (8, 20, 28, 28)
    # Another image size is another cache entry; cache_dir= beats the env var.
    monkeypatch.undo()
    other = Omniglot(synthetic["zips"], image_size=14, cache_dir=tmp_path / "arg-cache", **kwargs)
    assert other.images.shape[-2:] == (14, 14) and other.cache_path.parent == tmp_path / "arg-cache" / "omniglot"


def test_corrupt_cache_is_rebuilt(synthetic, tmp_path):
    kwargs = dict(ways=2, split_file=SPLIT, checksums=synthetic["md5"], cache_dir=tmp_path)
    first = Omniglot(synthetic["zips"], **kwargs)
    first.cache_path.write_bytes(b"not a torch file")
    again = Omniglot(synthetic["zips"], **kwargs)
    assert not again.cache_hit and torch.equal(first.images, again.images)
    assert Omniglot(synthetic["zips"], **kwargs).cache_hit


def test_download_fetches_official_urls_and_checks_md5(synthetic, tmp_path, monkeypatch):
    fetched = []

    def fake_download(url: str, dest: Path) -> None:
        fetched.append(url)
        shutil.copy(synthetic["zips"] / url.rsplit("/", 1)[1], dest)

    monkeypatch.setattr(omniglot_module, "_download", fake_download)
    root = tmp_path / "data"
    with pytest.raises(ChecksumError, match="was deleted"):  # default md5s: the synthetic zip fails
        Omniglot(root, ways=2, split_file=SPLIT, download=True, cache_dir=tmp_path)
    assert fetched == ["https://github.com/brendenlake/omniglot/raw/master/python/images_background.zip"]
    assert not (root / "images_background.zip").exists()
    data = Omniglot(root, ways=2, split_file=SPLIT, download=True, checksums=synthetic["md5"], cache_dir=tmp_path)
    assert data.source == "zip" and (root / "images_evaluation.zip").is_file()
    assert fetched[-1].endswith("/python/images_evaluation.zip")
    n = len(fetched)
    Omniglot(root, ways=2, split_file=SPLIT, download=True, checksums=synthetic["md5"], cache_dir=tmp_path)
    assert len(fetched) == n  # present files are not fetched again


def test_split_naming_a_missing_character(synthetic, tmp_path):
    split = {"train": SPLIT["train"] + [["images_background", "Beta", "character09"]]}
    with pytest.raises(ValueError, match="not in the data .* images_background/Beta/character09"):
        Omniglot(synthetic["zips"], ways=2, split_file=split, checksums=synthetic["md5"], cache_dir=tmp_path)


def test_split_with_a_character_twice(synthetic, tmp_path):
    split = {"train": SPLIT["train"], "test": SPLIT["train"][:1]}
    with pytest.raises(ValueError, match="in both split 'train' and split 'test'"):
        Omniglot(synthetic["zips"], ways=2, split_file=split, checksums=synthetic["md5"], cache_dir=tmp_path)


def test_verify_false_skips_the_checksums(synthetic, tmp_path):
    data = Omniglot(synthetic["zips"], ways=2, split="test", split_file=SPLIT, verify=False, cache_dir=tmp_path)
    assert data.num_classes == 8
