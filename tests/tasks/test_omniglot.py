"""Omniglot from the shared NumPy copy: the split, the names, the images, the episodes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metaopt.tasks import ChecksumError, Omniglot, TaskBatch, load_split
from metaopt.tasks import omniglot as omniglot_module

SPLIT_SIZES = {"train": 1028, "val": 172, "test": 423}


@pytest.fixture(scope="module")
def npz_row(omniglot_root: Path):
    """``npz_row(character)``: its 20 drawings from the npz row that index.json names,
    ink = True (105x105). Each npz file is read once per module."""
    index = json.loads((omniglot_root / "index.json").read_text())
    arrays: dict[str, np.ndarray] = {}

    def row(character: tuple[str, str, str]) -> np.ndarray:
        s, alphabet, char = character
        if s not in arrays:
            arrays[s] = np.load(omniglot_root / f"{s}.npz")["images"]
        block = next(b for b in index[s] if b["alphabet"] == alphabet)
        return ~arrays[s][block["first_index"] + int(char[len("character"):]) - 1]

    return row


def lanczos28(ink: np.ndarray) -> torch.Tensor:
    """What the loader promises: 8-bit ink = 255, PIL LANCZOS to 28x28."""
    return torch.from_numpy(np.stack([
        np.asarray(Image.fromarray(d.astype(np.uint8) * 255).resize((28, 28), Image.LANCZOS))
        for d in ink
    ]))


# ---------------------------------------------------------------- split


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_split_sizes(omniglot_splits, split):
    data = omniglot_splits[split]
    assert len(data.characters) == SPLIT_SIZES[split]
    assert data.num_classes == 4 * SPLIT_SIZES[split] == len(data.classes)
    assert data.images.shape == (4 * SPLIT_SIZES[split], 20, 28, 28)
    assert data.images.dtype == torch.uint8


def test_no_rotations_counts(omniglot_root, omniglot_cache):
    data = Omniglot(omniglot_root, split="val", rotations=False, cache_dir=omniglot_cache)
    assert data.num_classes == 172 and data.images.shape[0] == 172


def test_splits_disjoint_and_cover_everything(omniglot_splits):
    sets = {s: set(d.characters) for s, d in omniglot_splits.items()}
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"] and not sets["val"] & sets["test"]
    assert len(sets["train"] | sets["val"] | sets["test"]) == 1623


def test_named_characters_land_in_the_right_split(omniglot_splits):
    gurmukhi42 = ("images_evaluation", "Gurmukhi", "character42")
    gurmukhi41 = ("images_evaluation", "Gurmukhi", "character41")
    assert gurmukhi42 in omniglot_splits["test"].characters
    assert gurmukhi41 in omniglot_splits["train"].characters
    assert gurmukhi42 not in omniglot_splits["train"].characters
    assert ("images_background", "Armenian", "character01") in omniglot_splits["val"].characters
    assert ("images_background", "Alphabet_of_the_Magi", "character20") in omniglot_splits["train"].characters
    assert ("images_evaluation", "ULOG", "character26") in omniglot_splits["test"].characters


@pytest.mark.parametrize("split, character", [
    ("test", ("images_evaluation", "Gurmukhi", "character42")),          # eval row 236
    ("train", ("images_evaluation", "Gurmukhi", "character41")),         # eval row 235
    ("train", ("images_background", "Braille", "character01")),          # bg row 191
    ("train", ("images_background", "Alphabet_of_the_Magi", "character01")),  # bg row 708, not sort order
    ("val", ("images_background", "Armenian", "character01")),           # bg row 26
    ("test", ("images_evaluation", "Syriac_(Serto)", "character23")),    # eval row 537
])
def test_named_character_image_is_the_resized_npz_row(npz_row, omniglot_splits, split, character):
    data = omniglot_splits[split]
    got = data.images[data.class_index(character, 0)].cpu()
    assert torch.equal(got, lanczos28(npz_row(character)))


def test_resize_is_antialiased(omniglot_splits):
    values = omniglot_splits["val"].images.unique()
    assert values.min() == 0 and values.max() == 255 and len(values) > 100  # grey edges, not binary


def test_rotated_class_is_rot90_of_its_source(omniglot_splits):
    data = omniglot_splits["val"]
    by_char = data.images.view(-1, 4, 20, 28, 28)  # class 4*c + r
    for r, deg in enumerate((0, 90, 180, 270)):
        assert torch.equal(by_char[:, r], torch.rot90(by_char[:, 0], r, dims=(-2, -1)))
        c = ("images_background", "Hebrew", "character05")
        assert data.classes[data.class_index(c, deg)] == (*c, deg)
        assert torch.equal(data.images[data.class_index(c, deg)],
                           torch.rot90(data.images[data.class_index(c, 0)], r, dims=(-2, -1)))


def test_shipped_files_match_the_shared_copy(omniglot_root):
    for name in ("vinyals_split.json", "index.json"):
        assert (omniglot_module.DATA_DIR / name).read_bytes() == (omniglot_root / name).read_bytes()
    assert {k: len(v) for k, v in load_split().items()} == SPLIT_SIZES


def test_shipped_split_checksum_is_checked(monkeypatch):
    monkeypatch.setattr(omniglot_module, "SPLIT_SHA256", "0" * 64)
    with pytest.raises(ChecksumError, match="vinyals_split.json"):
        load_split()


# ---------------------------------------------------------------- episodes


def test_episode_shapes_dtypes_ranges(omniglot_splits):
    data = omniglot_splits["train"]
    batch = data.sample(8, generator=torch.Generator().manual_seed(0))
    assert isinstance(batch, TaskBatch)
    (xs, ys), (xq, yq) = batch
    assert xs.shape == (8, 5, 1, 28, 28) and xq.shape == (8, 75, 1, 28, 28)
    assert ys.shape == (8, 5) and yq.shape == (8, 75)
    assert xs.dtype == xq.dtype == torch.float32 and ys.dtype == yq.dtype == torch.int64
    for x in (xs, xq):
        assert x.min() == 0 and x.max() == 1
        assert x.mean() < 0.2  # ink = 1 on a background of 0
    for y, per_class in ((ys, 1), (yq, 15)):
        assert y.min() >= 0 and y.max() <= 4
        assert (torch.stack([(y == c).sum(1) for c in range(5)], 1) == per_class).all()  # balanced


def test_float64_and_other_shapes(omniglot_splits, omniglot_root, omniglot_cache):
    data = Omniglot(omniglot_root, ways=20, shots=5, queries=15, split="test", cache_dir=omniglot_cache)
    (xs, ys), (xq, yq) = data.sample(3, torch.Generator().manual_seed(1), dtype=torch.float64)
    assert xs.shape == (3, 100, 1, 28, 28) and xq.shape == (3, 300, 1, 28, 28) and xs.dtype == torch.float64
    assert ys.shape == (3, 100) and ys.max() == 19


def test_batch_matches_its_indices_and_is_disjoint(omniglot_splits):
    data = omniglot_splits["train"]
    ways, shots, queries, tasks = 5, 1, 15, 64
    batch = data.sample(tasks, torch.Generator().manual_seed(3))
    cls, draw = data.sample_indices(tasks, torch.Generator().manual_seed(3))
    # The batch is exactly images[class of label, drawing] in the documented layout.
    imgs = data.images[cls[:, :, None], draw].float() / 255  # (tasks, ways, K+Q, 28, 28)
    assert torch.equal(batch.support[0], imgs[:, :, :shots].reshape(tasks, ways * shots, 1, 28, 28))
    assert torch.equal(batch.query[0], imgs[:, :, shots:].reshape(tasks, ways * queries, 1, 28, 28))
    for t in range(tasks):
        assert len(set(cls[t].tolist())) == ways  # distinct classes
        for w in range(ways):
            support = {(int(cls[t, w]), int(d)) for d in draw[t, w, :shots]}
            query = {(int(cls[t, w]), int(d)) for d in draw[t, w, shots:]}
            assert len(support) == shots and len(query) == queries and not support & query


def test_labels_are_randomly_assigned(omniglot_splits):
    cls, _ = omniglot_splits["train"].sample_indices(200, torch.Generator().manual_seed(4))
    ascending = (cls[:, 1:] > cls[:, :-1]).all(1).float().mean()
    assert ascending < 0.05  # 1/120 expected for a random order; a sorted order would give 1
    # Every class can be drawn: with 200*5 draws from 4112 classes, ids spread over the range.
    assert cls.min() < 200 and cls.max() > 3900


def test_same_seed_same_batch_other_seed_different(omniglot_splits):
    data = omniglot_splits["train"]
    a = data.sample(4, torch.Generator().manual_seed(7))
    b = data.sample(4, torch.Generator().manual_seed(7))
    c = data.sample(4, torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(a.support + a.query, b.support + b.query))
    assert not torch.equal(a.query[0], c.query[0])


def test_sampling_uses_only_the_generator(omniglot_splits):
    data = omniglot_splits["train"]
    torch.manual_seed(0)
    a = data.sample(2, torch.Generator().manual_seed(5))
    torch.manual_seed(1)
    b = data.sample(2, torch.Generator().manual_seed(5))
    assert torch.equal(a.support[0], b.support[0])


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, match", [
    (dict(split="val", ways=689), r"ways=689 .* 688 classes of split 'val' \(172 characters x 4 rotations\)"),
    (dict(split="val", ways=173, rotations=False), r"ways=173 .* 172 classes"),
    (dict(shots=5, queries=16), r"shots \+ queries = 5 \+ 16 = 21 .* 20 drawings"),
    (dict(split="validation"), r"split must be one of 'train', 'val', 'test', got 'validation'"),
    (dict(ways=0), r"ways must be an int >= 1, got 0"),
    (dict(source="png"), r"source must be one of"),
])
def test_argument_errors(omniglot_root, omniglot_cache, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Omniglot(omniglot_root, cache_dir=omniglot_cache, **kwargs)


def test_data_not_found_says_where_and_how(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found in .*images_background.npz.*download=True") as e:
        Omniglot(tmp_path / "nothing", cache_dir=tmp_path)
    assert str(tmp_path / "nothing") in str(e.value)


def test_checksum_mismatch(omniglot_root, omniglot_cache, tmp_path):
    with pytest.raises(ChecksumError, match="sha256 of .*images_background.npz is 8bf84167.*expected 0000"):
        Omniglot(omniglot_root, cache_dir=omniglot_cache, checksums={"images_background.npz": "0" * 64})
    # A corrupt copy: one byte changed.
    for name in ("images_background.npz", "images_evaluation.npz", "index.json"):
        shutil.copy(omniglot_root / name, tmp_path / name)
    raw = bytearray((tmp_path / "images_evaluation.npz").read_bytes())
    raw[-100] ^= 1
    (tmp_path / "images_evaluation.npz").write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match="images_evaluation.npz .*expected 0b84c7ff"):
        Omniglot(tmp_path, cache_dir=omniglot_cache)


def test_generator_must_be_a_generator(omniglot_splits):
    with pytest.raises(TypeError, match="torch.Generator"):
        omniglot_splits["val"].sample(2, 0)  # type: ignore[arg-type]


@pytest.mark.cuda
def test_on_cuda(omniglot_root, omniglot_cache):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    data = Omniglot(omniglot_root, split="val", device="cuda", cache_dir=omniglot_cache)
    batch = data.sample(4, torch.Generator(device="cuda").manual_seed(0))
    assert all(t.is_cuda for t in batch.support + batch.query)
    with pytest.raises(ValueError, match="generator is on cpu"):
        data.sample(4, torch.Generator().manual_seed(0))
