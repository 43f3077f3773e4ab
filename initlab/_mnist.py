"""The MNIST sample shipped with initlab and the IDX format it is stored in.

``initlab/_data`` holds 5,000 MNIST digits (500 per class; MNIST by LeCun, Cortes and Burges,
CC BY-SA 3.0, see the licence file there) as gzip'd IDX files. :func:`read_idx` and
:func:`read_idx_pair` read IDX files (LeCun's format; optionally gzip'd) with every header
check; :func:`embedded_mnist` returns the shipped sample and :func:`embedded_split` its default
train/test split, as float32 pixels in [0, 1] (``x = byte / 255``): the batch ``initlab audit
--data mnist`` draws from, and the ``mnist`` data set of the lab (:mod:`initlab.lab.data`).

Only numpy and torch are needed; no network.
"""
from __future__ import annotations

import gzip
import math
import struct
import zlib
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import as_file, files
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ._errors import InitlabError

__all__ = ["read_idx", "read_idx_pair", "embedded_mnist", "embedded_split", "stratified_split", "MnistSplit",
           "unit_pixels", "N_CLASSES"]

N_CLASSES = 10
_EMBEDDED_IMAGES = "mnist5k-images-idx3-ubyte.gz"
_EMBEDDED_LABELS = "mnist5k-labels-idx1-ubyte.gz"

# IDX type code -> (numpy big-endian dtype, name)
_IDX_TYPES: dict[int, tuple[str, str]] = {
    0x08: (">u1", "unsigned byte"),
    0x09: (">i1", "signed byte"),
    0x0B: (">i2", "short"),
    0x0C: (">i4", "int"),
    0x0D: (">f4", "float"),
    0x0E: (">f8", "double"),
}
_MAGIC_IMAGES = 0x00000803  # unsigned bytes, 3 dimensions (N, rows, cols)
_MAGIC_LABELS = 0x00000801  # unsigned bytes, 1 dimension (N,)


# ----------------------------------------------------------------------------- IDX files


def _read_bytes(path: Path | str, where: str | None = None) -> bytes:
    """The file's bytes, gunzipped when they start with the gzip magic (whatever the suffix)."""
    where = where or str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise InitlabError(f"{where}: file not found") from None
    except OSError as e:
        raise InitlabError(f"{where}: cannot read the file ({e.strerror or e})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise InitlabError(f"{where}: corrupt gzip data ({e}); delete the file and fetch it again") from None
    return raw


def _parse_header(raw: bytes, where: str) -> tuple[int, tuple[int, ...], int]:
    """(type code, dimensions, header size) of an IDX buffer; raises on a malformed header."""
    if len(raw) < 4:
        raise InitlabError(f"{where}: too short for an IDX header ({len(raw)} bytes)")
    zero, code, ndim = struct.unpack(">HBB", raw[:4])
    magic = struct.unpack(">I", raw[:4])[0]
    if zero != 0:
        raise InitlabError(f"{where}: bad magic number 0x{magic:08X}: not an IDX file "
                           "(an IDX file starts with two zero bytes, a type code and the number of dimensions)")
    if code not in _IDX_TYPES:
        raise InitlabError(f"{where}: bad magic number 0x{magic:08X}: unknown IDX type code 0x{code:02X} "
                           f"(valid: {', '.join(f'0x{c:02X}' for c in _IDX_TYPES)})")
    if ndim == 0:
        raise InitlabError(f"{where}: bad magic number 0x{magic:08X}: zero dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise InitlabError(f"{where}: truncated header: {ndim} dimensions need {header} bytes, the file has {len(raw)}")
    return code, struct.unpack(f">{ndim}I", raw[4:header]), header


def _parse_idx(raw: bytes, where: str) -> np.ndarray:
    """Decode an IDX buffer (LeCun's MNIST format) after checking its header against its size."""
    code, dims, header = _parse_header(raw, where)
    dtype = np.dtype(_IDX_TYPES[code][0])
    expected = int(math.prod(dims)) * dtype.itemsize
    found = len(raw) - header
    if found < expected:
        raise InitlabError(f"{where}: truncated: the header announces shape {dims} of {_IDX_TYPES[code][1]}s "
                           f"({expected} bytes of data), the file holds {found}")
    if found > expected:
        raise InitlabError(f"{where}: size mismatch: the header announces shape {dims} ({expected} bytes of data), "
                           f"the file holds {found - expected} bytes more")
    return np.frombuffer(raw, dtype=dtype, count=int(math.prod(dims)), offset=header).reshape(dims)


def read_idx(path: Path | str) -> np.ndarray:
    """Read an IDX file (optionally gzip'd): a numpy array of the header's shape and type.

    Checks the magic number (two zero bytes, a known type code, >= 1 dimension) and that the
    data size is exactly the product of the announced dimensions; raises InitlabError naming
    the file and the problem otherwise.
    """
    return _parse_idx(_read_bytes(path), str(path))


def _check_images(arr: np.ndarray, where: str, raw_magic: int) -> np.ndarray:
    if raw_magic != _MAGIC_IMAGES:
        raise InitlabError(f"{where}: bad magic number 0x{raw_magic:08X} for an image file "
                           f"(expected 0x{_MAGIC_IMAGES:08X}: unsigned bytes, 3 dimensions)")
    if arr.shape[0] == 0:
        raise InitlabError(f"{where}: holds no images")
    if arr.shape[1] == 0 or arr.shape[2] == 0:
        raise InitlabError(f"{where}: images of size {arr.shape[1]}x{arr.shape[2]}")
    return arr


def _check_labels(arr: np.ndarray, where: str, raw_magic: int, n_classes: int) -> np.ndarray:
    if raw_magic != _MAGIC_LABELS:
        raise InitlabError(f"{where}: bad magic number 0x{raw_magic:08X} for a label file "
                           f"(expected 0x{_MAGIC_LABELS:08X}: unsigned bytes, 1 dimension)")
    if arr.size and int(arr.max()) >= n_classes:
        bad = int(np.flatnonzero(arr >= n_classes)[0])
        raise InitlabError(f"{where}: label {int(arr[bad])} at index {bad} is out of range "
                           f"(labels must be 0..{n_classes - 1})")
    return arr


def _magic(raw: bytes) -> int:
    return struct.unpack(">I", raw[:4])[0] if len(raw) >= 4 else -1


def read_idx_pair(images: Path | str, labels: Path | str, *, n_classes: int = N_CLASSES,
                  image_size: tuple[int, int] | None = None, _names: tuple[str, str] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Read matching image and label IDX files: (uint8 array (N, rows, cols), int64 array (N,)).

    Validates the magic numbers (0x00000803 for images, 0x00000801 for labels), the sizes, the
    label range 0..n_classes-1, the image size when ``image_size`` is given, and that both
    files hold the same number of examples.
    """
    wi, wl = _names or (str(images), str(labels))
    raw_i = _read_bytes(images, wi)
    x = _check_images(_parse_idx(raw_i, wi), wi, _magic(raw_i))
    raw_l = _read_bytes(labels, wl)
    y = _check_labels(_parse_idx(raw_l, wl), wl, _magic(raw_l), n_classes)
    if image_size is not None and tuple(x.shape[1:]) != tuple(image_size):
        raise InitlabError(f"{wi}: images are {x.shape[1]}x{x.shape[2]}, expected {image_size[0]}x{image_size[1]}")
    if len(x) != len(y):
        raise InitlabError(f"count mismatch: {wi} holds {len(x)} images but {wl} holds {len(y)} labels")
    return x, y.astype(np.int64)


# ----------------------------------------------------------------------------- the embedded sample


@lru_cache(maxsize=1)
def embedded_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The shipped 5,000-digit sample: (uint8 (5000, 28, 28), int64 (5000,)), sorted by class; read-only arrays."""
    base = files(__package__) / "_data"
    names = (f"initlab/_data/{_EMBEDDED_IMAGES}", f"initlab/_data/{_EMBEDDED_LABELS}")
    with as_file(base / _EMBEDDED_IMAGES) as pi, as_file(base / _EMBEDDED_LABELS) as pl:
        x, y = read_idx_pair(pi, pl, image_size=(28, 28), _names=names)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices): ``round(test_fraction * n_c)`` of each class to test, shuffled.

    Deterministic for a given ``seed`` (numpy PCG64). Every class with at least two examples
    lands in both splits.
    """
    rng = np.random.Generator(np.random.PCG64(int(seed)))
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(test_fraction * len(idx)))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        test.append(idx[:k])
        train.append(idx[k:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def unit_pixels(x: np.ndarray, divisor: float = 255.0) -> Tensor:
    """Examples as a float32 tensor of shape (N, C*H*W), divided by ``divisor`` (bytes -> [0, 1])."""
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32).reshape(len(x), -1)) / divisor


@dataclass(frozen=True)
class MnistSplit:
    """Train and test split of the embedded sample: inputs float32 (N, 784) in [0, 1], labels int64 (N,)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def embedded_split(test_fraction: float = 0.2, seed: int = 0) -> MnistSplit:
    """The embedded sample split by :func:`stratified_split`: the lab's default ``mnist`` data set
    (``initlab.lab.data.load_dataset("mnist")`` holds the same values)."""
    x, y = embedded_mnist()
    i_tr, i_te = stratified_split(y, test_fraction, seed)
    labels = [torch.from_numpy(np.ascontiguousarray(y[i], dtype=np.int64)) for i in (i_tr, i_te)]
    return MnistSplit(unit_pixels(x[i_tr]).contiguous(), labels[0], unit_pixels(x[i_te]).contiguous(), labels[1])
