"""The lab's data sets: the embedded MNIST sample, the IDX reader, download checks, synthetic data."""
from __future__ import annotations

import gzip
import hashlib
import math
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from initlab._errors import InitlabError
from initlab.lab import data as D
from initlab.lab.config import DataSpec
from initlab.lab.data import Dataset, load_dataset, read_idx, read_idx_pair, stratified_split, verify_md5

# ----------------------------------------------------------------------------- test utilities


def idx_bytes(arr: np.ndarray, code: int = 0x08, dims: tuple[int, ...] | None = None) -> bytes:
    """An IDX file's bytes (optionally with dims that disagree with the data)."""
    dims = arr.shape if dims is None else dims
    dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    head = struct.pack(">HBB", 0, code, len(dims)) + struct.pack(f">{len(dims)}I", *dims)
    return head + np.asarray(arr, dtype=dtype).tobytes()


def write(path: Path, payload: bytes, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload, mtime=0) if gz else payload)
    return path


def fake_mnist(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    y = (np.arange(n) % 10).astype(np.uint8)
    return x, y


def write_mnist(folder: Path, n_train: int = 60, n_test: int = 20, gz: bool = True, dot_names: bool = False
                ) -> dict[str, np.ndarray]:
    """Four small MNIST-format files in ``folder``; returns the arrays written."""
    xtr, ytr = fake_mnist(n_train, 1)
    xte, yte = fake_mnist(n_test, 2)
    sep = "." if dot_names else "-"
    suffix = ".gz" if gz else ""
    write(folder / f"train-images{sep}idx3-ubyte{suffix}", idx_bytes(xtr), gz)
    write(folder / f"train-labels{sep}idx1-ubyte{suffix}", idx_bytes(ytr), gz)
    write(folder / f"t10k-images{sep}idx3-ubyte{suffix}", idx_bytes(xte), gz)
    write(folder / f"t10k-labels{sep}idx1-ubyte{suffix}", idx_bytes(yte), gz)
    return {"xtr": xtr, "ytr": ytr, "xte": xte, "yte": yte}


def rows(x: torch.Tensor) -> set[bytes]:
    return {r.tobytes() for r in x.numpy()}


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    return load_dataset("mnist")


# ----------------------------------------------------------------------------- embedded sample


def test_embedded_shapes_and_types(mnist):
    assert mnist.x_train.shape == (4000, 784) and mnist.x_test.shape == (1000, 784)
    assert mnist.x_train.dtype == torch.float32 and mnist.y_train.dtype == torch.int64
    assert float(mnist.x_train.min()) == 0.0 and float(mnist.x_train.max()) == 1.0
    assert mnist.input_shape == (1, 28, 28) and mnist.input_dim == 784 and mnist.n_classes == 10
    # grey levels are k/255 exactly
    k = mnist.x_train[:50] * 255
    assert torch.allclose(k, k.round(), atol=1e-4)


def test_embedded_known_statistics(mnist):
    x = torch.cat([mnist.x_train, mnist.x_test]).double()
    mean, var, sq = float(x.mean()), float(x.var(unbiased=False)), float((x * x).mean())
    assert (round(mean, 4), round(var, 4), round(sq, 4)) == (0.1313, 0.0952, 0.1124)
    # E[x^2] = Var + mean^2 and the study's first-layer numbers: 784 E[x^2] ~ 88 vs 784 Var ~ 74.6
    assert sq == pytest.approx(var + mean**2, rel=1e-9)
    assert 784 * sq == pytest.approx(88.2, abs=0.1) and 784 * var == pytest.approx(74.6, abs=0.1)
    # the training split's own statistics are reported in meta, close to the whole sample's
    assert mnist.meta["train_sq_mean"] == pytest.approx(float((mnist.x_train.double() ** 2).mean()))
    assert abs(mnist.meta["train_var"] - var) < 0.002
    # negative control: unscaled grey levels do not pass the same check
    assert round(float((x * 255).var(unbiased=False)), 4) != 0.0952


def test_embedded_stratified_shuffled_split(mnist):
    assert torch.bincount(mnist.y_train, minlength=10).tolist() == [400] * 10
    assert torch.bincount(mnist.y_test, minlength=10).tolist() == [100] * 10
    tr, te = rows(mnist.x_train), rows(mnist.x_test)
    assert not tr & te  # disjoint
    assert len(tr | te) >= 4990  # (a handful of duplicate digits at most)
    # shuffled: the shipped rows are sorted by class, the split is not
    assert len(set(mnist.y_train[:40].tolist())) >= 6
    assert (mnist.y_train.diff() != 0).sum() > 3000


def test_split_is_seeded():
    a, b = load_dataset("mnist", split_seed=3), load_dataset("mnist", seed=3)
    c = load_dataset("mnist", split_seed=4)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_train, c.y_train)
    assert rows(a.x_test) != rows(c.x_test)


def test_test_fraction_and_limit():
    d = load_dataset("mnist", test_fraction=0.3)
    assert torch.bincount(d.y_test).tolist() == [150] * 10
    small = load_dataset("mnist", limit=200)
    assert len(small.y_train) + len(small.y_test) == 200
    assert torch.bincount(small.y_train).tolist() == [16] * 10
    assert torch.bincount(small.y_test).tolist() == [4] * 10
    assert load_dataset("mnist", n=100).meta["n_test"] == 20
    with pytest.raises(InitlabError, match="empty train or test"):
        load_dataset("mnist", limit=1)


def test_stratified_split_function():
    y = np.repeat(np.arange(3), [10, 20, 2])
    tr, te = stratified_split(y, 0.25, seed=0)
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(len(y)))
    assert np.bincount(y[te]).tolist() == [2, 5, 1]  # round(2.5) = 2, round(5) = 5, min 1 of a class of 2
    assert np.bincount(y[tr]).tolist() == [8, 15, 1]
    tr2, te2 = stratified_split(y, 0.25, seed=0)
    assert np.array_equal(tr, tr2) and np.array_equal(te, te2)


def test_image_layout_and_conversions(mnist):
    img = load_dataset("mnist", flat=False)
    assert img.x_train.shape == (4000, 1, 28, 28)
    assert torch.equal(img.x_train.reshape(4000, -1), mnist.x_train)
    assert torch.equal(mnist.images().x_test, img.x_test)
    assert torch.equal(img.flat().x_train, mnist.x_train)
    assert "4000" in repr(mnist) and "tensor" not in repr(mnist)


def test_standardize_uses_training_statistics(mnist):
    s = load_dataset("mnist", standardize=True)
    xt = s.x_train.double()
    assert abs(float(xt.mean())) < 1e-6 and float(xt.std(unbiased=False)) == pytest.approx(1.0, abs=1e-6)
    shift, scale = s.meta["shift"], s.meta["scale"]
    assert shift == pytest.approx(float(mnist.x_train.double().mean()))
    assert torch.allclose(s.x_test, (mnist.x_test - shift) / scale, atol=1e-6)
    assert s.meta["train_sq_mean"] == pytest.approx(1.0, abs=1e-6)


def test_load_from_dataspec_and_overrides():
    d = load_dataset(DataSpec(name="mnist", test_fraction=0.1, limit=500))
    assert len(d.y_test) == 50
    d2 = load_dataset(DataSpec(name="mnist", limit=500), test_fraction=0.1)
    assert torch.equal(d.x_test, d2.x_test)


def test_dataset_pickles(mnist):
    import pickle

    small = load_dataset("mnist", limit=50)
    back = pickle.loads(pickle.dumps(small))
    assert torch.equal(back.x_train, small.x_train) and back.meta == small.meta


# ----------------------------------------------------------------------------- bad names and options


def test_unknown_dataset_name():
    with pytest.raises(InitlabError, match=r"unknown data set 'mnits'; did you mean 'mnist'\?"):
        load_dataset("mnits")


def test_unknown_option_and_bad_values():
    with pytest.raises(InitlabError, match=r"unknown data option 'standardise'; did you mean 'standardize'\?"):
        load_dataset("mnist", standardise=True)
    with pytest.raises(InitlabError, match=r"data.test_fraction: expected a number between 0 and 1"):
        load_dataset("mnist", test_fraction=1.5)
    with pytest.raises(InitlabError, match=r"data.limit: expected an integer >= 0, got -3"):
        load_dataset("mnist", limit=-3)
    with pytest.raises(InitlabError, match="expected a data set name or a DataSpec"):
        load_dataset(42)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- synthetic and optional


def test_gaussian_data():
    g = load_dataset("gaussian", limit=2000, seed=1)
    assert g.x_train.shape == (1600, 784) and g.input_shape == (1, 28, 28)
    x = torch.cat([g.x_train, g.x_test]).double()
    n = x.numel()
    # E[x^2] = 1 with standard error sqrt(Var(x^2) / n) = sqrt(2 / n); 5 sigma
    se = math.sqrt(2.0 / n)
    assert abs(float((x * x).mean()) - 1.0) < 5 * se
    assert abs(float(x.mean())) < 5 / math.sqrt(n)
    # negative control: the same check rejects a variance of 1.05
    assert abs(float((x * x).mean()) * 1.05 - 1.0) > 5 * se
    counts = torch.bincount(torch.cat([g.y_train, g.y_test]), minlength=10)
    assert (counts > 50).all()  # every class of the teacher shows up
    assert torch.equal(load_dataset("gaussian", limit=2000, seed=1).x_test, g.x_test)
    assert not torch.equal(load_dataset("gaussian", limit=2000, seed=2).x_test, g.x_test)


def test_gaussian_labels_come_from_a_linear_teacher():
    g = load_dataset("gaussian", limit=3000)
    x = torch.cat([g.x_train, g.x_test]).double()
    y = torch.cat([g.y_train, g.y_test])
    # one thread for the fits: LAPACK's pivoted QR on 3000 x 784 takes 0.15 s on one thread, and up to tens of
    # seconds on two threads of a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # a least-squares linear fit to one-hot targets separates a linear teacher's classes well
        w = torch.linalg.lstsq(x, torch.nn.functional.one_hot(y, 10).double()).solution
        # negative control: shuffled labels are not linearly predictable
        perm = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
        w0 = torch.linalg.lstsq(x[:2000], torch.nn.functional.one_hot(perm[:2000], 10).double()).solution
    finally:
        torch.set_num_threads(threads)
    acc = float(((x @ w).argmax(1) == y).double().mean())
    assert acc > 0.9
    assert float(((x[2000:] @ w0).argmax(1) == perm[2000:]).double().mean()) < 0.2


def test_digits_without_sklearn_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(InitlabError, match=r"pip install initlab\[digits\]"):
        load_dataset("digits")


def test_digits_with_sklearn():
    pytest.importorskip("sklearn")
    d = load_dataset("digits")
    assert d.x_train.shape[1] == 64 and d.input_shape == (1, 8, 8)
    assert len(d.y_train) + len(d.y_test) == 1797
    assert 0.0 <= float(d.x_train.min()) and float(d.x_train.max()) <= 1.0


# ----------------------------------------------------------------------------- IDX reader


@pytest.mark.parametrize("code", [0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E])
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, code, gz):
    arr = (np.arange(24).reshape(2, 3, 4) - 5).astype(np.float64)
    if code == 0x08:
        arr = np.abs(arr)
    p = write(tmp_path / "a.idx", idx_bytes(arr, code), gz)
    out = read_idx(p)
    assert out.shape == (2, 3, 4) and np.array_equal(out.astype(np.float64), arr)


@pytest.mark.parametrize("layout", ["torchvision", "plain", "raw"])
@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_layouts(tmp_path, layout, gz):
    folder = {"torchvision": tmp_path / "MNIST" / "raw", "plain": tmp_path, "raw": tmp_path / "raw"}[layout]
    arrays = write_mnist(folder, gz=gz)
    d = load_dataset("mnist_idx", root=str(tmp_path))
    assert d.name == "mnist_idx" and d.x_train.shape == (60, 784) and d.x_test.shape == (20, 784)
    # the official test file is kept as the test split, in its order; train is a permutation
    assert torch.equal(d.x_test, torch.from_numpy(arrays["xte"].reshape(20, -1).astype(np.float32)) / 255)
    assert torch.equal(d.y_test, torch.from_numpy(arrays["yte"].astype(np.int64)))
    assert rows(d.x_train) == rows(torch.from_numpy(arrays["xtr"].reshape(60, -1).astype(np.float32)) / 255)
    assert d.meta["files"]["train_images"].startswith(str(folder))


def test_mnist_with_root_reads_idx_and_dot_names(tmp_path):
    write_mnist(tmp_path, gz=False, dot_names=True)
    d = load_dataset("mnist", root=str(tmp_path), limit=40)
    assert d.name == "mnist_idx"
    assert len(d.y_train) == 30 and len(d.y_test) == 10  # limit split in proportion 60:20


def _corrupt_cases() -> list[tuple[str, dict[str, bytes], str]]:
    x, y = fake_mnist(10, 0)
    good_i, good_l = idx_bytes(x), idx_bytes(y)
    bad_label = y.copy()
    bad_label[7] = 10
    return [
        ("not idx", {"train-images-idx3-ubyte": b"\x12\x34\x56\x78" + good_i[4:]}, r"bad magic number 0x12345678: not an IDX file"),
        ("labels as images", {"train-images-idx3-ubyte": good_l}, r"bad magic number 0x00000801 for an image file"),
        ("bad type code", {"train-labels-idx1-ubyte": b"\x00\x00\x07\x01" + good_l[4:]}, r"unknown IDX type code 0x07"),
        ("truncated data", {"train-images-idx3-ubyte": good_i[:-100]}, r"truncated: the header announces shape \(10, 28, 28\)"),
        ("truncated header", {"train-images-idx3-ubyte": good_i[:9]}, r"truncated header"),
        ("too short", {"train-labels-idx1-ubyte": b"\x00\x00"}, r"too short for an IDX header"),
        ("extra bytes", {"train-labels-idx1-ubyte": good_l + b"\x00\x01"}, r"the file holds 2 bytes more"),
        ("label range", {"train-labels-idx1-ubyte": idx_bytes(bad_label)}, r"label 10 at index 7 is out of range \(labels must be 0..9\)"),
        ("count mismatch", {"train-labels-idx1-ubyte": idx_bytes(y[:9])}, r"count mismatch: .*train-images-idx3-ubyte holds 10 images but .*train-labels-idx1-ubyte holds 9 labels"),
        ("image size", {"train-images-idx3-ubyte": idx_bytes(np.zeros((10, 20, 20), np.uint8))}, r"images are 20x20, expected 28x28"),
        ("corrupt gzip", {"train-images-idx3-ubyte.gz": gzip.compress(good_i)[:-30]}, r"corrupt gzip data"),
    ]


@pytest.mark.parametrize("case", _corrupt_cases(), ids=lambda c: c[0])
def test_corrupt_idx_files_name_file_and_problem(tmp_path, case):
    _, replace, pattern = case
    write_mnist(tmp_path, n_train=10, n_test=10, gz=False)
    for name, payload in replace.items():
        if name.endswith(".gz"):
            (tmp_path / name[:-3]).unlink()
        write(tmp_path / name, payload)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(InitlabError, match=pattern) as err:
        load_dataset("mnist_idx", root=str(tmp_path))
    assert str(tmp_path) in str(err.value)  # the message names the file
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing was touched


def test_valid_files_pass_the_same_checks(tmp_path):
    # control for the corrupt cases: the unmodified files load
    write_mnist(tmp_path, n_train=10, n_test=10, gz=False)
    assert len(load_dataset("mnist_idx", root=str(tmp_path)).y_train) == 10


def test_missing_files_and_root(tmp_path):
    write_mnist(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(InitlabError, match=r"MNIST files not found: t10k-labels-idx1-ubyte\[\.gz\].*--download"):
        load_dataset("mnist_idx", root=str(tmp_path))
    with pytest.raises(InitlabError, match=r"data.root: folder not found"):
        load_dataset("mnist_idx", root=str(tmp_path / "nope"))
    with pytest.raises(InitlabError, match=r"'mnist_idx' needs data.root"):
        load_dataset("mnist_idx")
    with pytest.raises(InitlabError, match=r"file not found"):
        read_idx(tmp_path / "absent.idx")


def test_read_idx_pair_label_classes(tmp_path):
    x, y = fake_mnist(10, 0)
    pi, pl = write(tmp_path / "i", idx_bytes(x)), write(tmp_path / "l", idx_bytes(y))
    xi, yi = read_idx_pair(pi, pl)
    assert xi.dtype == np.uint8 and yi.dtype == np.int64 and yi.tolist() == y.tolist()
    with pytest.raises(InitlabError, match=r"out of range \(labels must be 0..4\)"):
        read_idx_pair(pi, pl, n_classes=5)


# ----------------------------------------------------------------------------- checksums and download (offline)


def test_verify_md5(tmp_path):
    p = write(tmp_path / "f.bin", b"initlab")
    verify_md5(p, hashlib.md5(b"initlab").hexdigest())  # noqa: S324
    verify_md5(p, hashlib.md5(b"initlab").hexdigest().upper())  # noqa: S324
    with pytest.raises(InitlabError, match=r"f.bin: checksum mismatch: MD5 [0-9a-f]{32}, expected 0{32}"):
        verify_md5(p, "0" * 32)


def test_standard_checksums_are_the_published_ones():
    assert D.MNIST_FILES["train-images-idx3-ubyte.gz"] == "f68b3c2dcbeaaa9fbdd348bbdeb94873"
    assert D.MNIST_FILES["t10k-labels-idx1-ubyte.gz"] == "ec29112dd5afa0611ce80d1b7f02629c"
    assert len(D.MNIST_FILES) == 4 and all(len(v) == 32 for v in D.MNIST_FILES.values())


def _local_mirror(tmp_path: Path) -> tuple[str, str, dict[str, str]]:
    """A good and a bad file:// mirror of small MNIST-format files, and their MD5s."""
    good, bad = tmp_path / "good", tmp_path / "bad"
    write_mnist(good, gz=True)
    md5 = {p.name: D.md5sum(p) for p in good.iterdir()}
    for name in md5:
        write(bad / name, b"not the file")
    return bad.as_uri() + "/", good.as_uri() + "/", md5


def test_download_verifies_and_falls_back(tmp_path):
    bad, good, md5 = _local_mirror(tmp_path)
    root = tmp_path / "data"
    folder = D.download_mnist(root, mirrors=[bad, good], files=md5)
    assert folder == root / "MNIST" / "raw"
    assert sorted(p.name for p in folder.iterdir()) == sorted(md5)  # no temporary files left
    for name, digest in md5.items():
        verify_md5(folder / name, digest)


def test_download_failure_leaves_no_file(tmp_path):
    bad, _good, md5 = _local_mirror(tmp_path)
    root = tmp_path / "data"
    with pytest.raises(InitlabError, match=r"(?s)could not download .* from any mirror.*checksum mismatch"):
        D.download_mnist(root, mirrors=[bad], files=md5)
    assert list((root / "MNIST" / "raw").iterdir()) == []


def test_load_dataset_download_flag(tmp_path, monkeypatch):
    _bad, good, md5 = _local_mirror(tmp_path)
    monkeypatch.setattr(D, "MNIST_MIRRORS", (good,))
    monkeypatch.setattr(D, "MNIST_FILES", md5)
    root = tmp_path / "data"
    with pytest.raises(InitlabError, match="not found"):
        load_dataset("mnist_idx", root=str(root))  # no download unless asked
    d = load_dataset("mnist_idx", root=str(root), download=True)
    assert d.x_train.shape == (60, 784) and (root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").is_file()
