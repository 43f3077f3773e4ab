"""Data sets for the lab: the embedded MNIST sample, full MNIST from IDX files, synthetic data.

Every loader returns a :class:`Dataset` of float32 inputs and int64 labels, split into train
and test. Pixels are scaled to [0, 1] (``x = byte / 255``), as in the classic study; with
``standardize=True`` the inputs are shifted and scaled by the *training* split's global mean and
standard deviation, ``x' = (x - mean) / std`` (one scalar each, so constant pixels stay finite).

Names (``load_dataset(name)``):

- ``mnist``: 5,000 MNIST digits (500 per class) shipped inside the package as gzip'd IDX files
  (``initlab/_data``, read by :mod:`initlab._mnist`; MNIST by LeCun, Cortes and Burges, CC BY-SA 3.0, see the licence
  file there). No network. A stratified train/test split (``test_fraction``, ``split_seed``).
  Known statistics with pixels in [0, 1]: mean 0.1313, variance 0.0952, E[x^2] 0.1124, so a
  784-input layer with N(0, 1) weights has pre-activation variance 784 * E[x^2] ~= 88.
  With a ``root`` folder, ``mnist`` reads full MNIST from there instead (as ``mnist_idx``).
- ``mnist_idx``: full MNIST read from IDX files under ``root`` (torchvision's layout
  ``root/MNIST/raw/train-images-idx3-ubyte[.gz]`` ..., or the files directly in ``root``);
  the official 60,000/10,000 train/test split is kept. ``download=True`` fetches the four
  standard files first (MD5-checked, atomic writes) when they are missing.
- ``gaussian``: synthetic inputs ``x ~ N(0, I_784)`` labelled by a fixed random linear teacher,
  ``y = argmax(x W)``, ``W ~ N(0, 1/784)`` (784 x 10): E[x^2] = 1 exactly in expectation, for
  checks against variance-propagation theory.
- ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, grey levels 0..16 scaled by 1/16);
  needs the optional dependency (``pip install initlab[digits]``).
"""
from __future__ import annotations

import hashlib
import math
import os
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .._errors import InitlabError, unknown_choice
from .._mnist import embedded_mnist, read_idx, read_idx_pair, stratified_split, unit_pixels
from ._checks import as_bool
from .specs import DATASET_SHAPES, DATASETS, N_CLASSES, DataSpec

__all__ = [
    "Dataset",
    "DATASETS",
    "DATASET_SHAPES",
    "N_CLASSES",
    "load_dataset",
    "read_idx",
    "read_idx_pair",
    "find_mnist_files",
    "download_mnist",
    "md5sum",
    "verify_md5",
    "stratified_split",
    "MNIST_FILES",
    "MNIST_MIRRORS",
]

GAUSSIAN_DEFAULT_N = 5000
_GAUSSIAN_TEACHER_SEED = 20100513  # fixed: every seed sees the same task

# The four standard MNIST files and their MD5 checksums (the ones torchvision checks).
MNIST_FILES: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)


# ----------------------------------------------------------------------------- the data set


@dataclass(eq=False)
class Dataset:
    """A train/test split: ``x_*`` float32 of shape (N, D) (``flat``) or (N, C, H, W), ``y_*`` int64.

    ``meta`` records where the data came from and its statistics: ``source``, ``input_shape``
    (C, H, W), ``n_classes``, ``n_train``, ``n_test``, ``standardize`` (and the ``shift`` and
    ``scale`` applied), ``split_seed``, ``test_fraction``, and the training inputs'
    ``train_mean``, ``train_var`` (population variance over all entries) and ``train_sq_mean``
    (E[x^2], which sets the first layer's pre-activation variance: fan_in * Var(w) * E[x^2]).
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, (C, H, W)."""
        return tuple(self.meta.get("input_shape", self.x_train.shape[1:]))

    @property
    def input_dim(self) -> int:
        """Number of input features, C * H * W."""
        return int(math.prod(self.input_shape))

    @property
    def n_classes(self) -> int:
        """Number of classes (labels are 0 .. n_classes - 1)."""
        return int(self.meta.get("n_classes", N_CLASSES))

    def flat(self) -> Dataset:
        """The same data with inputs of shape (N, C*H*W)."""
        return replace(self, x_train=self.x_train.reshape(len(self.x_train), -1),
                       x_test=self.x_test.reshape(len(self.x_test), -1), meta=dict(self.meta))

    def images(self) -> Dataset:
        """The same data with inputs of shape (N, C, H, W), as CNNs take them."""
        shape = tuple(self.input_shape)
        return replace(self, x_train=self.x_train.reshape(len(self.x_train), *shape),
                       x_test=self.x_test.reshape(len(self.x_test), *shape), meta=dict(self.meta))

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, train={tuple(self.x_train.shape)}, test={tuple(self.x_test.shape)}, "
                f"classes={self.n_classes}, source={self.meta.get('source', '?')!r})")


# ----------------------------------------------------------------------------- full MNIST on disk

_MNIST_PARTS = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def _mnist_dirs(root: Path) -> list[Path]:
    return [root / "MNIST" / "raw", root / "raw", root]


def find_mnist_files(root: Path | str) -> dict[str, Path]:
    """Locate the four MNIST IDX files under ``root``: keys train_images, train_labels, test_images, test_labels.

    Looks in ``root/MNIST/raw`` (torchvision's layout), ``root/raw`` and ``root`` for
    ``train-images-idx3-ubyte`` (or ``train-images.idx3-ubyte``), each optionally ``.gz``.
    Raises InitlabError naming the missing files and the folders searched.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise InitlabError(f"data.root: folder not found: {root}")
    found: dict[str, Path] = {}
    for key, names in _MNIST_PARTS.items():
        for folder in _mnist_dirs(root):
            hit = next((folder / (n + gz) for n in names for gz in ("", ".gz") if (folder / (n + gz)).is_file()), None)
            if hit is not None:
                found[key] = hit
                break
    missing = [_MNIST_PARTS[k][0] + "[.gz]" for k in _MNIST_PARTS if k not in found]
    if missing:
        where = ", ".join(str(d) for d in _mnist_dirs(root))
        raise InitlabError(f"MNIST files not found: {', '.join(missing)} (searched {where}); "
                           "put the IDX files there, or pass --download (download=True) to fetch them")
    return found


def md5sum(path: Path | str) -> str:
    """Hex MD5 digest of a file (the published MNIST checksums are MD5; integrity, not security)."""
    h = hashlib.md5()  # noqa: S324
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_md5(path: Path | str, expected: str, *, name: str | None = None) -> None:
    """Raise InitlabError unless the file's MD5 digest is ``expected``."""
    got = md5sum(path)
    if got != expected.lower():
        raise InitlabError(f"{name or path}: checksum mismatch: MD5 {got}, expected {expected.lower()} "
                           "(a corrupt or different file)")


def download_mnist(root: Path | str, *, mirrors: Sequence[str] | None = None,
                   files: Mapping[str, str] | None = None, timeout: float = 60.0) -> Path:
    """Fetch the MNIST IDX files into ``root/MNIST/raw`` (torchvision's layout); return that folder.

    ``files`` maps file names to MD5 digests (default :data:`MNIST_FILES`, the four standard
    files); ``mirrors`` are base URLs tried in order (default :data:`MNIST_MIRRORS`).
    Files already present with the right MD5 are kept. Each file is tried on each mirror in turn,
    written to a temporary file in the same folder, checked against its MD5 and only then moved
    into place (``os.replace``), so an interrupted or corrupt download never leaves a file under
    the final name. Raises InitlabError when a file cannot be fetched from any mirror.
    """
    mirrors = MNIST_MIRRORS if mirrors is None else tuple(mirrors)
    files = MNIST_FILES if files is None else files
    folder = Path(root).expanduser() / "MNIST" / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    for fname, md5 in files.items():
        dest = folder / fname
        if dest.is_file():
            try:
                verify_md5(dest, md5)
                continue
            except InitlabError:
                pass  # fetch it again
        errors = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + fname
            tmp = folder / f".{fname}.{os.getpid()}.part"
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as out:  # noqa: S310
                    for chunk in iter(lambda: resp.read(1 << 20), b""):
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                verify_md5(tmp, md5, name=url)
                os.replace(tmp, dest)
                break
            except InitlabError as e:
                errors.append(str(e))
            except (OSError, ValueError) as e:
                errors.append(f"{url}: {e}")
            finally:
                if tmp.exists():
                    tmp.unlink()
        else:
            raise InitlabError(f"could not download {fname} from any mirror:\n  " + "\n  ".join(errors))
    return folder




def _load_mnist_idx(root: str, download: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
    if not root:
        raise InitlabError("data set 'mnist_idx' needs data.root: the folder holding the MNIST IDX files")
    path = Path(root).expanduser()
    if download:
        try:
            files = find_mnist_files(path)
        except InitlabError:
            download_mnist(path)
            files = find_mnist_files(path)
    else:
        files = find_mnist_files(path)
    x_tr, y_tr = read_idx_pair(files["train_images"], files["train_labels"], image_size=(28, 28))
    x_te, y_te = read_idx_pair(files["test_images"], files["test_labels"], image_size=(28, 28))
    return x_tr, y_tr, x_te, y_te, {"files": {k: str(v) for k, v in files.items()}}


# ----------------------------------------------------------------------------- synthetic and optional


def _gaussian(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` inputs x ~ N(0, I_784) (seeded) and labels argmax(x W) of a fixed teacher W ~ N(0, 1/784)."""
    d = int(math.prod(DATASET_SHAPES["gaussian"]))
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(int(seed)))
    w = torch.randn(d, N_CLASSES, generator=torch.Generator().manual_seed(_GAUSSIAN_TEACHER_SEED)) / math.sqrt(d)
    y = (x @ w).argmax(dim=1)
    return x.numpy(), y.numpy().astype(np.int64)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise InitlabError("the 'digits' data set needs scikit-learn: pip install initlab[digits]") from None
    bunch = load_digits()
    x = np.asarray(bunch.data, dtype=np.float32).reshape(-1, 8, 8) / 16.0
    return x, np.asarray(bunch.target, dtype=np.int64)


# ----------------------------------------------------------------------------- splits


def _largest_remainder(counts: np.ndarray, total: int) -> np.ndarray:
    """Integer allocation of ``total`` proportional to ``counts`` (Hamilton's method), capped by counts."""
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    if total >= n:
        return counts.copy()
    exact = counts * (total / n)
    alloc = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - alloc), kind="stable")
    alloc[order[: total - int(alloc.sum())]] += 1
    return np.minimum(alloc, counts)


def _stratified_subset(y: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``k`` examples with class proportions kept (largest remainder), in random order."""
    classes = np.unique(y)
    per_class = [np.flatnonzero(y == c) for c in classes]
    alloc = _largest_remainder(np.array([len(i) for i in per_class]), k)
    take = [rng.permutation(idx)[:a] for idx, a in zip(per_class, alloc)]
    return rng.permutation(np.concatenate(take))


# ----------------------------------------------------------------------------- the loader

_OVERRIDES = ("name", "root", "standardize", "test_fraction", "split_seed", "limit", "seed", "n", "download", "flat")


class _Split(NamedTuple):
    """Train and test examples before scaling: arrays of any numeric type, one example per row."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    divisor: float  # inputs are divided by this (255 for bytes)
    meta: dict[str, Any]


#: the in-memory data sets: name -> (examples and labels, divisor, source)
_IN_MEMORY: dict[str, tuple[Callable[[DataSpec], tuple[np.ndarray, np.ndarray]], float, str]] = {
    "mnist": (lambda spec: embedded_mnist(), 255.0,
              "embedded MNIST sample (5,000 digits; MNIST by LeCun, Cortes and Burges, CC BY-SA 3.0)"),
    "gaussian": (lambda spec: _gaussian(spec.limit or GAUSSIAN_DEFAULT_N, spec.split_seed), 1.0,
                 "synthetic: x ~ N(0, I_784), labels from a fixed random linear teacher"),
    "digits": (lambda spec: _digits(), 1.0, "scikit-learn digits (8x8, grey levels 0..16 scaled to [0, 1])"),
}


def _spec_from(spec: DataSpec | str | None, overrides: dict[str, Any]) -> tuple[DataSpec, bool, bool]:
    for key in overrides:
        if key not in _OVERRIDES:
            raise unknown_choice("data option", key, _OVERRIDES)
    if "seed" in overrides:
        overrides.setdefault("split_seed", overrides.pop("seed"))
    if "n" in overrides:
        n = overrides.pop("n")
        overrides.setdefault("limit", 0 if n is None else n)
    download = as_bool(overrides.pop("download", False), "download")
    flat = as_bool(overrides.pop("flat", True), "flat")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if spec is None:
        spec = DataSpec()
    elif isinstance(spec, str):
        spec = DataSpec(name=spec)
    elif not isinstance(spec, DataSpec):
        raise InitlabError(f"data: expected a data set name or a DataSpec, got {type(spec).__name__}: {spec!r}")
    if overrides:
        spec = replace(spec, **overrides)
    return spec, download, flat


def _split_mnist_idx(spec: DataSpec, download: bool, rng: np.random.Generator) -> _Split:
    """Full MNIST: the official train/test files; ``limit`` takes each split in proportion to its size."""
    x_tr, y_tr, x_te, y_te, meta = _load_mnist_idx(spec.root, download)
    meta["source"] = f"MNIST IDX files in {spec.root}"
    meta["split"] = "official MNIST train/test files"
    if spec.limit:
        n_tr = min(len(y_tr), int(round(spec.limit * len(y_tr) / (len(y_tr) + len(y_te)))))
        i_tr = _stratified_subset(y_tr, n_tr, rng)
        i_te = _stratified_subset(y_te, min(len(y_te), spec.limit - n_tr), rng)
    else:
        i_tr, i_te = rng.permutation(len(y_tr)), np.arange(len(y_te))
    return _Split(x_tr[i_tr], y_tr[i_tr], x_te[i_te], y_te[i_te], 255.0, meta)


def _split_in_memory(name: str, spec: DataSpec, rng: np.random.Generator) -> _Split:
    """A data set held in memory, cut to ``limit`` (stratified) and split by :func:`stratified_split`."""
    load, divisor, source = _IN_MEMORY[name]
    x, y = load(spec)
    if spec.limit and spec.limit < len(y):
        keep = np.sort(_stratified_subset(y, spec.limit, rng))
        x, y = x[keep], y[keep]
    i_tr, i_te = stratified_split(y, spec.test_fraction, spec.split_seed)
    meta = {"source": source, "split": f"stratified, test_fraction={spec.test_fraction}, seed={spec.split_seed}"}
    return _Split(x[i_tr], y[i_tr], x[i_te], y[i_te], divisor, meta)


def _standardize(xt: Tensor, xe: Tensor, on: bool) -> tuple[Tensor, Tensor, float, float]:
    """``(x - mean) / std`` with the training inputs' scalar mean and std (when ``on``)."""
    if not on:
        return xt, xe, 0.0, 1.0
    xd = xt.double()
    shift, div = float(xd.mean()), float(xd.std(unbiased=False))
    if not div > 0:
        raise InitlabError("data.standardize: the training inputs are constant; cannot standardize")
    return (xt - shift) / div, (xe - shift) / div, shift, div


def _to_dataset(name: str, spec: DataSpec, split: _Split, flat: bool) -> Dataset:
    """Scale, standardise and describe a split: the :class:`Dataset` ``load_dataset`` returns."""
    y_tr, y_te = split.y_train, split.y_test
    if len(y_tr) == 0 or len(y_te) == 0:
        raise InitlabError(f"data.limit: {spec.limit} examples leave an empty train or test split "
                           f"(train {len(y_tr)}, test {len(y_te)}); use a larger limit (0 = all)")
    shape = DATASET_SHAPES[name]
    xt, xe = unit_pixels(split.x_train, split.divisor), unit_pixels(split.x_test, split.divisor)
    xt, xe, shift, div = _standardize(xt, xe, spec.standardize)
    xd = xt.double()
    meta = dict(split.meta)
    meta.update(
        input_shape=shape,
        n_classes=N_CLASSES,
        n_train=len(y_tr),
        n_test=len(y_te),
        standardize=bool(spec.standardize),
        shift=shift,
        scale=div,
        split_seed=int(spec.split_seed),
        test_fraction=float(spec.test_fraction) if name != "mnist_idx" else None,
        limit=int(spec.limit),
        train_mean=float(xd.mean()),
        train_var=float(xd.var(unbiased=False)),
        train_sq_mean=float((xd * xd).mean()),
    )
    if not flat:
        xt, xe = xt.reshape(len(xt), *shape), xe.reshape(len(xe), *shape)
    return Dataset(name=name, x_train=xt.contiguous(), y_train=torch.from_numpy(np.ascontiguousarray(y_tr, dtype=np.int64)),
                   x_test=xe.contiguous(), y_test=torch.from_numpy(np.ascontiguousarray(y_te, dtype=np.int64)), meta=meta)


def load_dataset(spec: DataSpec | str | None = "mnist", **overrides: Any) -> Dataset:
    """Load a data set by name or :class:`~initlab.lab.specs.DataSpec`, split into train and test.

    Overrides (keyword): ``root``, ``standardize``, ``test_fraction``, ``split_seed`` (alias
    ``seed``), ``limit`` (alias ``n``; at most this many examples in all, a stratified subset;
    0 = all), ``download`` (fetch full MNIST when missing; never needed for the embedded sample),
    ``flat`` (True: inputs (N, C*H*W); False: (N, C, H, W) for CNNs).

    The embedded ``mnist``, ``gaussian`` and ``digits`` are split by :func:`stratified_split`;
    ``mnist_idx`` keeps MNIST's own train/test files (``limit`` then takes each split in
    proportion to its size). Inputs are float32 in [0, 1] (``gaussian``: N(0, 1)); with
    ``standardize`` they become ``(x - mean_train) / std_train``.
    """
    spec, download, flat = _spec_from(spec, dict(overrides))
    name = spec.name
    if name not in DATASETS:
        raise unknown_choice("data set", name, DATASETS)
    if name == "mnist" and spec.root:
        name = "mnist_idx"
    rng = np.random.Generator(np.random.PCG64(int(spec.split_seed)))
    split = _split_mnist_idx(spec, download, rng) if name == "mnist_idx" else _split_in_memory(name, spec, rng)
    return _to_dataset(name, spec, split, flat)
