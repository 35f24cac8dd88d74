"""Omniglot few-shot classification (Lake et al. 2015) with the Vinyals et al. (2016) split.

Two sources give the same internal arrays:

* the official zips ``images_background.zip`` / ``images_evaluation.zip`` of
  ``brendenlake/omniglot`` (md5-checked; ``download=True`` fetches them), laid out as
  ``images_background/<alphabet>/characterNN/XXXX_YY.png``;
* the NumPy copy ``images_background.npz`` / ``images_evaluation.npz`` (sha256-checked)
  with ``index.json`` naming every array row.

Characters are identified by ``(set, alphabet, "characterNN")`` and stored in the order of
the official character ids ``XXXX``; never by a folder sort order. The 105x105 drawings are
resized once to ``image_size`` (default 28) and cached as a uint8 tensor file keyed by the
source's checksums, so later runs load in well under a second.

Resize: the 1-bit drawing is turned into an 8-bit image (ink = 255) and resized with
``PIL.Image.LANCZOS``, which gives real antialiasing. MAML's ``resize_images.py`` also
calls ``resize(..., LANCZOS)``, but on the mode-"1" PNG, for which Pillow silently uses
nearest-neighbour, so its 28x28 images are binary; ours are grey at the edges.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor

from metaopt.rundir import atomic_write
from metaopt.tasks.base import TaskBatch

__all__ = ["Omniglot", "ChecksumError", "load_split", "default_cache_dir", "DATA_DIR"]

PathLike = Union[str, os.PathLike]
Character = tuple[str, str, str]  # (set, alphabet, "characterNN")

SETS = ("images_background", "images_evaluation")
SPLITS = ("train", "val", "test")
ROTATIONS = (0, 90, 180, 270)
URL = "https://github.com/brendenlake/omniglot/raw/master/python/"
ZIP_MD5 = {
    "images_background.zip": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation.zip": "6b91aef0f799c5bb55b94e3f2daec811",
}
NPZ_SHA256 = {
    "images_background.npz": "8bf84167413cd00beacdce3fe582f780ab538d8dbef043a6d688f2527bbce199",
    "images_evaluation.npz": "0b84c7ffd94c4841c0040e529c86a82eaaccb986d8eadad5673f7991b7475276",
    "index.json": "4329ccc0f3392b76613e0db20b0a68badb8d884f6281e281278fecca2fae6331",
}
DATA_DIR = Path(__file__).resolve().parent / "data"
"""Package data: ``vinyals_split.json`` (the Vinyals et al. split) and ``index.json`` (the
row names of the NumPy copy)."""
SPLIT_FILE = DATA_DIR / "vinyals_split.json"
SPLIT_SHA256 = "3c9fcd1d74eaee948ff41e1e29ccbb195158ca9a65d71e3a0638aafeaff8fab8"
SPLIT_SIZES = {"train": 1028, "val": 172, "test": 423}
RESIZE_METHOD = "pil-lanczos-8bit-v1"  # part of the cache key: change it when the resize changes
_PNG = re.compile(r"^(images_background|images_evaluation)/([^/]+)/(character\d+)/(\d+)_(\d+)\.png$")


class ChecksumError(ValueError):
    """A data file's checksum differs from the expected one (corrupt or another version)."""


# ----------------------------------------------------------------------------- files


def default_cache_dir() -> Path:
    """``$METAOPT_CACHE`` if set, else ``~/.cache/metaopt``."""
    env = os.environ.get("METAOPT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "metaopt"


def _digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check(path: Path, algorithm: str, expected: str | None, got: str, hint: str) -> None:
    if expected is not None and got.lower() != expected.lower():
        raise ChecksumError(
            f"{algorithm} of {path} is {got}, expected {expected}. The file is corrupt or not "
            f"the expected version. {hint}"
        )


def _download(url: str, dest: Path) -> None:
    """Fetch ``url`` into ``dest`` atomically."""

    def write(f: Any) -> None:
        with urllib.request.urlopen(url, timeout=60) as response:
            while chunk := response.read(1 << 20):
                f.write(chunk)

    try:
        atomic_write(dest, write)
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        reason = getattr(e, "reason", e)
        raise OSError(f"cannot download {url} ({reason}); check the network, or fetch the file by hand into "
                      f"{dest.parent} (config key task.root)") from None


def load_split(split_file: PathLike | Mapping[str, Sequence[Sequence[str]]] | None = None
               ) -> dict[str, list[Character]]:
    """Read a split file ``{"train": [[set, alphabet, "characterNN"], ...], ...}``.

    Args:
        split_file: ``None`` for the shipped Vinyals split (its sha256 is checked), a path
            to a JSON file of that shape, or the mapping itself.

    Raises:
        ChecksumError: the shipped split file was modified.
        ValueError: malformed entries, or a character in two splits.
    """
    if split_file is None:
        _check(SPLIT_FILE, "sha256", SPLIT_SHA256, _digest(SPLIT_FILE, "sha256"),
               "The split file shipped with metaopt was modified; reinstall metaopt.")
        raw: Any = json.loads(SPLIT_FILE.read_text())
    elif isinstance(split_file, Mapping):
        raw = split_file
    else:
        raw = json.loads(Path(split_file).read_text())
    if not isinstance(raw, Mapping) or not raw:
        raise ValueError(f"a split file must map split names to character lists, got {type(raw).__name__}")
    out: dict[str, list[Character]] = {}
    seen: dict[Character, str] = {}
    for name, entries in raw.items():
        chars: list[Character] = []
        for e in entries:
            if len(e) != 3 or e[0] not in SETS or not re.fullmatch(r"character\d+", str(e[2])):
                raise ValueError(
                    f"split {name!r}: bad entry {e!r}; expected [set, alphabet, 'characterNN'] "
                    f"with set in {SETS}"
                )
            c = (str(e[0]), str(e[1]), str(e[2]))
            if c in seen:
                raise ValueError(f"character {c} is in both split {seen[c]!r} and split {name!r}")
            seen[c] = name
            chars.append(c)
        out[str(name)] = chars
    return out


# ----------------------------------------------------------------------------- sources


def _read_sums(root: Path) -> dict[str, str]:
    """``SHA256SUMS`` beside the data, if present: {file name: sha256}."""
    sums = root / "SHA256SUMS"
    if not sums.is_file():
        return {}
    out = {}
    for line in sums.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[parts[1].lstrip("*")] = parts[0]
    return out


def _npz_source(root: Path, verify: bool, checksums: Mapping[str, str]) -> dict[str, str]:
    """Check the npz files (and the index) and return {file: sha256} for the cache key."""
    listed = _read_sums(root)
    index = root / "index.json" if (root / "index.json").is_file() else DATA_DIR / "index.json"
    digests = {}
    for name in ("images_background.npz", "images_evaluation.npz", "index.json"):
        path = index if name == "index.json" else root / name
        got = _digest(path, "sha256")
        if verify:
            hint = ("Get the NumPy copy again, or, if you trust your copy, give its digests "
                    "(task.checksums / checksums={file: sha256}) or turn the check off (task.verify=false / verify=False).")
            _check(path, "sha256", checksums.get(name, NPZ_SHA256[name]), got, hint)
            if name in listed and name not in checksums:
                _check(path, "sha256", listed[name], got, f"(listed in {root / 'SHA256SUMS'})")
        digests[name] = got
    return digests


def _zip_source(root: Path, verify: bool, checksums: Mapping[str, str]) -> dict[str, str]:
    digests = {}
    for name in ZIP_MD5:
        path = root / name
        got = _digest(path, "md5")
        if verify:
            hint = (f"Delete it and run again with task.download=true / download=True (from {URL}{name}), or, "
                    "for a copy you trust, give its digests (task.checksums / checksums={file: md5}) or turn the "
                    "check off (task.verify=false / verify=False).")
            _check(path, "md5", checksums.get(name, ZIP_MD5[name]), got, hint)
        digests[name] = got
    return digests


def _read_npz(root: Path) -> tuple[list[Character], np.ndarray]:
    """Names (official id order) and ink masks ``(chars, 20, 105, 105)`` bool, ink = True."""
    index_path = root / "index.json" if (root / "index.json").is_file() else DATA_DIR / "index.json"
    index = json.loads(index_path.read_text())
    names: list[Character] = []
    arrays = []
    for s in SETS:
        images = np.load(root / f"{s}.npz")["images"]  # bool, True = white background
        rows: list[Character | None] = [None] * images.shape[0]
        for block in index[s]:
            for k in range(block["characters"]):
                i = block["first_index"] + k
                if not 0 <= i < len(rows) or rows[i] is not None:
                    raise ValueError(f"{index_path}: row {i} of {s} is out of range or named twice")
                rows[i] = (s, block["alphabet"], f"character{k + 1:02d}")
        if any(r is None for r in rows):
            raise ValueError(f"{index_path} does not name every row of {s}.npz")
        names += rows  # type: ignore[arg-type]
        arrays.append(~images)
    return names, np.concatenate(arrays)


def _read_zips(root: Path) -> tuple[list[Character], np.ndarray]:
    """Names and ink masks from the official zips, ordered by (set, official id)."""
    from PIL import Image  # Pillow: imported when the data is first read, not by `import metaopt`

    found: dict[Character, dict[str, Any]] = {}
    for s in SETS:
        with zipfile.ZipFile(root / f"{s}.zip") as zf:
            for info in zf.infolist():
                m = _PNG.match(info.filename)
                if m is None:
                    continue
                if m[1] != s:
                    raise ValueError(f"{root / (s + '.zip')} holds {info.filename}, outside {s}/")
                char = (m[1], m[2], m[3])
                entry = found.setdefault(char, {"ids": set(), "drawings": {}})
                entry["ids"].add(int(m[4]))
                with Image.open(io.BytesIO(zf.read(info))) as img:
                    entry["drawings"][int(m[5])] = np.asarray(img.convert("L")) < 128  # ink = True
    if not found:
        raise ValueError(f"no PNG in the layout <set>/<alphabet>/characterNN/XXXX_YY.png in the zips in {root}")
    chars = sorted(found, key=lambda c: (SETS.index(c[0]), min(found[c]["ids"]), c))
    counts = {tuple(sorted(found[c]["drawings"])) for c in chars}
    for c in chars:
        if len(found[c]["ids"]) != 1:
            raise ValueError(f"{'/'.join(c)} holds drawings of several ids {sorted(found[c]['ids'])}")
    if len(counts) != 1:
        raise ValueError(f"characters have different drawer numbers: {sorted(counts)[:3]}...")
    drawers = counts.pop()
    shapes = {d.shape for c in chars for d in found[c]["drawings"].values()}
    if len(shapes) != 1:
        raise ValueError(f"drawings have different sizes: {sorted(shapes)}")
    ink = np.stack([np.stack([found[c]["drawings"][d] for d in drawers]) for c in chars])
    return chars, ink


def _images_sha256(images: Tensor) -> str:
    """sha256 of the cached image tensor's bytes (with its shape)."""
    h = hashlib.sha256(str(tuple(images.shape)).encode())
    h.update(images.contiguous().numpy().tobytes())
    return h.hexdigest()


def _resize(ink: np.ndarray, size: int) -> Tensor:
    """``(chars, drawings, H, W)`` bool ink -> ``(chars, drawings, size, size)`` uint8, ink = 255."""
    from PIL import Image

    n, d, h, w = ink.shape
    out = np.empty((n, d, size, size), dtype=np.uint8)
    try:  # first-time preprocessing takes a while: a bar on a terminal (tqdm hides itself elsewhere)
        from tqdm.auto import tqdm
        rows: Any = tqdm(range(n), desc=f"Omniglot: resizing {n} characters to {size}px (once; cached)",
                         disable=None, leave=False, file=sys.stderr)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        rows = range(n)
    for i in rows:
        gray = ink[i].astype(np.uint8) * 255  # (drawings, H, W)
        for j in range(d):
            img = Image.fromarray(gray[j])  # uint8 2-D: mode "L"
            out[i, j] = np.asarray(img if (h, w) == (size, size) else img.resize((size, size), Image.Resampling.LANCZOS))
    return torch.from_numpy(out)


def _load_images(root: Path, source: str, image_size: int, cache_dir: Path, verify: bool,
                 checksums: Mapping[str, str], download: bool) -> tuple[list[Character], Tensor, dict]:
    """Find, check, resize (or load the cached resize of) the whole dataset."""
    has_npz = all((root / f"{s}.npz").is_file() for s in SETS)
    has_zip = all((root / f"{s}.zip").is_file() for s in SETS)
    requested = source
    if source == "auto":
        source = "npz" if has_npz else "zip" if has_zip or download else "none"
    if source == "zip" and not has_zip and download:
        for name in ZIP_MD5:
            if not (root / name).is_file():
                _download(URL + name, root / name)
                got = _digest(root / name, "md5")
                if verify and got != checksums.get(name, ZIP_MD5[name]):
                    (root / name).unlink()
                    _check(root / name, "md5", checksums.get(name, ZIP_MD5[name]), got,
                           f"The download from {URL}{name} was deleted; try again later.")
        has_zip = True
    if source == "none" or (source == "npz" and not has_npz) or (source == "zip" and not has_zip):
        raise FileNotFoundError(
            f"Omniglot data not found in {root} (source={requested!r}): looked for "
            f"images_background.npz + images_evaluation.npz (the NumPy copy, with index.json) and "
            f"images_background.zip + images_evaluation.zip (the official zips). Set task.root (root=) "
            f"to the folder that holds them or $METAOPT_OMNIGLOT to it, or fetch the official zips from "
            f"{URL} with task.download=true (download=True)"
        )
    digests = (_npz_source if source == "npz" else _zip_source)(root, verify, checksums)
    # format 2: the cache carries the sha256 of its images (format-1 files are rebuilt once).
    key_text = json.dumps({"format": 2, "source": source, "digests": digests,
                           "size": image_size, "resize": RESIZE_METHOD}, sort_keys=True)
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    cache = cache_dir / "omniglot" / f"omniglot-{source}-{image_size}px-{key}.pt"
    info = {"source": source, "cache_path": cache, "cache_hit": False}
    if cache.is_file():
        try:
            obj = torch.load(cache, map_location="cpu", weights_only=True)
            names = [tuple(n) for n in obj["names"]]
            images = obj["images"]
            if obj.get("key") == key_text and images.dtype == torch.uint8 and len(names) == images.shape[0]:
                # torch.load checks the file's structure, not its data: a zeroed or flipped
                # image would train at chance silently, so the images carry their sha256.
                if obj.get("sha256") == _images_sha256(images):
                    info["cache_hit"] = True
                    return names, images, info  # type: ignore[return-value]
                print(f"metaopt: the Omniglot cache {cache} fails its checksum (corrupt); rebuilding it",
                      file=sys.stderr)
        except (RuntimeError, EOFError, KeyError, ValueError, TypeError, OSError, pickle.UnpicklingError):
            pass  # unreadable or stale cache: rebuild it below and replace the file
    names, ink = (_read_npz if source == "npz" else _read_zips)(root)
    images = _resize(ink, image_size)
    obj = {"key": key_text, "names": [list(n) for n in names], "images": images, "sha256": _images_sha256(images)}
    try:
        atomic_write(cache, lambda f: torch.save(obj, f))
    except OSError as e:
        raise OSError(f"cannot write the Omniglot cache {cache}: {e}. Pass cache_dir= or set "
                      "$METAOPT_CACHE to a writable folder") from e
    return names, images, info


# ----------------------------------------------------------------------------- dataset


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


class Omniglot:
    """N-way K-shot Omniglot episodes, sampled on ``device`` by pure tensor indexing.

    Args:
        root: folder holding the NumPy copy (``images_background.npz``,
            ``images_evaluation.npz``, ``index.json``) or the official zips. ``None``:
            ``$METAOPT_OMNIGLOT``, else ``<cache_dir>/omniglot`` (where ``download`` puts the zips).
        ways: classes per task (N).
        shots: support drawings per class (K).
        queries: query drawings per class (Q); ``shots + queries <= 20``.
        split: ``"train"`` (1028 characters), ``"val"`` (172) or ``"test"`` (423) of the
            Vinyals split, or a name in ``split_file``.
        rotations: rotations by 0/90/180/270 degrees are distinct classes (MAML), so
            ``num_classes`` is 4x the characters.
        image_size: side of the resized images (antialiased PIL LANCZOS).
        device: where the dataset lives and batches are made.
        download: fetch the official zips into ``root`` when no data is there.
        cache_dir: cache folder (default ``$METAOPT_CACHE`` or ``~/.cache/metaopt``).
        source: ``"auto"`` (npz if present, else zips), ``"npz"`` or ``"zip"``.
        verify: check the data files against the known checksums (default). Only for
            copies you trust otherwise.
        checksums: expected digests by file name (sha256 for ``.npz``/``index.json``, md5 for
            ``.zip``) replacing the built-in ones, e.g. for a custom copy.
        split_file: ``None`` for the shipped Vinyals split, or a path / mapping of the same
            shape (``{"train": [[set, alphabet, "characterNN"], ...], ...}``).
        dtype: floating dtype of the sampled images.

    Attributes:
        characters: the split's characters ``(set, alphabet, "characterNN")``, split-file order.
        classes: ``(set, alphabet, "characterNN", degrees)`` of each class index; the
            rotations of one character are adjacent (class ``4 * c + r``).
        images: ``(num_classes, 20, image_size, image_size)`` uint8 on ``device``, ink = 255.
        num_classes: ``len(classes)``.

    Example:
        >>> import torch
        >>> tasks = Omniglot(root, ways=5, shots=1, queries=15, split="train")  # doctest: +SKIP
        >>> batch = tasks.sample(32, generator=torch.Generator().manual_seed(0))  # doctest: +SKIP
        >>> batch.support[0].shape, batch.support[1].shape  # doctest: +SKIP
        (torch.Size([32, 5, 1, 28, 28]), torch.Size([32, 5]))

    Episodes: ``ways`` distinct classes per task; per class ``shots + queries`` distinct
    drawings, the first ``shots`` for support and the rest for query. Targets are laid
    out label by label (``[0]*shots + [1]*shots + ...``); which class gets which label is
    random per task.

    Differences from the reference: MAML picks characters and then one rotation per
    class, so a task never holds two rotations of one character; here rotated classes are
    drawn like any other class (as torchmeta and learn2learn do), so rarely they can.
    """

    def __init__(
        self,
        root: PathLike | None = None,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        split: str = "train",
        rotations: bool = True,
        image_size: int = 28,
        device: torch.device | str = "cpu",
        download: bool = False,
        *,
        cache_dir: PathLike | None = None,
        source: str = "auto",
        verify: bool = True,
        checksums: Mapping[str, str] | None = None,
        split_file: PathLike | Mapping[str, Sequence[Sequence[str]]] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        start = time.perf_counter()
        self.ways = _positive_int("ways", ways)
        self.shots = _positive_int("shots", shots)
        self.queries = _positive_int("queries", queries)
        self.image_size = _positive_int("image_size", image_size)
        if source not in ("auto", "npz", "zip"):
            raise ValueError(f"source must be one of 'auto', 'npz', 'zip', got {source!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        self.dtype = dtype
        self.rotations = bool(rotations)
        self.device = torch.device(device)
        splits = load_split(split_file)
        if split not in splits:
            raise ValueError(f"split must be one of {', '.join(map(repr, splits))}, got {split!r}")
        self.split = split
        self.characters: list[Character] = splits[split]
        n_rot = len(ROTATIONS) if self.rotations else 1
        self.num_classes = len(self.characters) * n_rot
        if self.ways > self.num_classes:
            raise ValueError(
                f"ways={self.ways} is larger than the {self.num_classes} classes of split {split!r} "
                f"({len(self.characters)} characters" + (" x 4 rotations)" if self.rotations else ")")
            )
        if self.shots + self.queries > 20:
            raise ValueError(
                f"shots + queries = {self.shots} + {self.queries} = {self.shots + self.queries} "
                "is more than the 20 drawings of an Omniglot character; use shots + queries <= 20"
            )
        cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        if root is None:
            env = os.environ.get("METAOPT_OMNIGLOT")
            root = Path(env) if env else cache / "omniglot"
        self.root = Path(root).expanduser()
        if download:
            self.root.mkdir(parents=True, exist_ok=True)

        names, images, info = _load_images(self.root, source, self.image_size, cache, verify,
                                           dict(checksums or {}), download)
        if images.shape[1] < self.shots + self.queries:
            raise ValueError(f"shots + queries = {self.shots + self.queries} is more than the "
                             f"{images.shape[1]} drawings per character in {self.root}")
        row = {n: i for i, n in enumerate(names)}
        missing = [c for c in self.characters if c not in row]
        if missing:
            raise ValueError(f"{len(missing)} characters of split {split!r} are not in the data in "
                             f"{self.root}, e.g. {'/'.join(missing[0])}")
        base = images[torch.tensor([row[c] for c in self.characters], dtype=torch.long)]  # (chars, 20, S, S)
        if self.rotations:  # (chars, 4, 20, S, S) -> class 4*c + r is character c rotated by 90*r degrees
            base = torch.stack([torch.rot90(base, r, dims=(-2, -1)) for r in range(4)], dim=1)
            base = base.flatten(0, 1)
        self.images: Tensor = base.contiguous().to(self.device)
        self.classes = [(*c, deg) for c in self.characters for deg in (ROTATIONS if self.rotations else (0,))]
        self.source: str = info["source"]
        self.cache_path: Path = info["cache_path"]
        self.cache_hit: bool = info["cache_hit"]
        self.load_seconds = time.perf_counter() - start

    models = ("conv4", "resnet12")
    """Models that fit these tasks (the first is ``model.name: auto``)."""

    def model_args(self) -> dict[str, Any]:
        """The data-dependent model arguments: ``ways`` outputs, one input channel."""
        return {"ways": self.ways, "in_channels": 1}

    @property
    def generator_device(self) -> torch.device:
        """Sampling draws indices on the images' device: pass a generator there."""
        return self.images.device

    def __repr__(self) -> str:
        return (f"Omniglot(split={self.split!r}, ways={self.ways}, shots={self.shots}, "
                f"queries={self.queries}, num_classes={self.num_classes}, "
                f"image_size={self.image_size}, device={str(self.device)!r})")

    @property
    def drawings(self) -> int:
        """Drawings per class (20 for Omniglot)."""
        return int(self.images.shape[1])

    def class_index(self, character: Sequence[str], rotation: int = 0) -> int:
        """Class index of ``(set, alphabet, "characterNN")`` rotated by ``rotation`` degrees."""
        key = (*tuple(character), rotation)
        try:
            return self.classes.index(key)  # type: ignore[arg-type]
        except ValueError:
            raise ValueError(f"{key} is not a class of split {self.split!r}") from None

    def sample(self, num_tasks: int, generator: torch.Generator, *,
               dtype: torch.dtype | None = None) -> TaskBatch:
        """A meta-batch of ``num_tasks`` episodes, made on ``self.device``.

        Args:
            num_tasks: tasks in the batch.
            generator: the only source of randomness; must be on ``self.device``'s type.
            dtype: floating dtype of the images (default: the constructor's).

        Returns:
            ``TaskBatch`` with support ``(tasks, ways*shots, 1, S, S)`` float in [0, 1]
            (ink = 1) and ``(tasks, ways*shots)`` int64 targets in ``0..ways-1``; query
            ``(tasks, ways*queries, 1, S, S)`` and ``(tasks, ways*queries)``.
        """
        t = _positive_int("num_tasks", num_tasks)
        cls, draw = self.sample_indices(t, generator)
        n, k, q, s = self.ways, self.shots, self.queries, self.image_size
        # Row gathers from the (classes*drawings, S*S) view, straight into the final
        # layouts (much faster on CPU than advanced indexing with two index tensors).
        flat = self.images.view(-1, s * s)                              # uint8, ink = 255
        rows = cls[:, :, None] * self.drawings + draw                   # (tasks, ways, K+Q)
        dtype = dtype or self.dtype
        xs = flat.index_select(0, rows[:, :, :k].reshape(-1)).to(dtype).div_(255)
        xq = flat.index_select(0, rows[:, :, k:].reshape(-1)).to(dtype).div_(255)
        xs = xs.view(t, n * k, 1, s, s)                                 # (tasks, ways*shots, 1, S, S)
        xq = xq.view(t, n * q, 1, s, s)                                 # (tasks, ways*queries, 1, S, S)
        labels = torch.arange(n, device=self.images.device)
        ys = labels.repeat_interleave(k).repeat(t, 1)                   # (tasks, ways*shots)
        yq = labels.repeat_interleave(q).repeat(t, 1)                   # (tasks, ways*queries)
        return TaskBatch(support=(xs, ys), query=(xq, yq))

    def sample_indices(self, num_tasks: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """The classes and drawings of :meth:`sample` (which calls this first).

        Returns:
            ``cls`` ``(tasks, ways)``: the class given label ``i`` in each task, and
            ``draw`` ``(tasks, ways, shots+queries)``: distinct drawings of each, the
            first ``shots`` for support.
        """
        t = _positive_int("num_tasks", num_tasks)
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        dev = self.images.device
        if generator.device.type != dev.type:
            raise ValueError(
                f"generator is on {generator.device} but the dataset is on {dev}; "
                f"use torch.Generator(device={str(dev)!r})"
            )
        # N distinct classes per task: the top N of iid uniform keys is a uniformly random
        # ordered subset; label i goes to cls[:, i], so the labels are shuffled per task.
        keys = torch.rand(t, self.num_classes, generator=generator, device=dev, dtype=torch.float64)
        cls = keys.topk(self.ways, dim=1).indices                       # (tasks, ways)
        # K + Q distinct drawings per class: a random permutation of the 20, cut.
        perm = torch.rand(t, self.ways, self.drawings, generator=generator, device=dev).argsort(dim=2)
        return cls, perm[:, :, : self.shots + self.queries]             # (tasks, ways, K+Q)
