"""The variance-scaling engine: every fan-based scheme is one call to :func:`variance_scaling_`.

``W ~ D(0, sigma^2)`` with ``sigma^2 = scale / n`` and ``n`` chosen by ``mode``:

* ``fan_in``      n = fan_in                      (LeCun et al. 1998; He et al. 2015)
* ``fan_out``     n = fan_out                     (He et al. 2015, backward pass)
* ``fan_avg``     n = (fan_in + fan_out) / 2      (Glorot & Bengio 2010)
* ``fan_geo_avg`` n = sqrt(fan_in * fan_out)

and ``D`` one of

* ``normal``: N(0, sigma^2);
* ``uniform``: U(-sqrt(3) sigma, sqrt(3) sigma), whose variance is sigma^2;
* ``truncated_normal``: a normal with std ``sigma / 0.87962566103423978`` cut at +-2 of *its*
  standard deviations. 0.8796... is the std of N(0, 1) truncated to [-2, 2] (its variance is
  1 - 4 phi(2) / (2 Phi(2) - 1) = 0.77374...), so the **realised** variance is sigma^2 too.
  ``torch.nn.init.trunc_normal_`` instead cuts at absolute bounds (default +-2), which for
  the small stds of real layers truncates nothing.

So for every distribution the realised variance is exactly ``scale / n``.

Sampling on CPU is counter-based (changed in 0.2; 0.1 drew each 2**17-element block from its
own sequential SFC64 stream seeded by one draw of the generator per tensor). Element ``i`` of a
tensor's logical row-major order is a function of ``(stream key, i)`` alone: 32 bits (fp32; 64
for fp64) of the Philox4x64-10 stream (Salmon et al. 2011) at word ``i // 2`` (fp64: ``i``) give a
uniform ``v`` on a symmetric grid inside (-1, 1); the normal is ``sigma sqrt(2) erfinv(v)`` and
the truncated normal ``s sqrt(2) erfinv(erf(sqrt 2) v)``, the exact inverse CDF of N(0, s^2)
conditioned on [-2s, 2s] (no rejection). The stream key comes from :mod:`initlab._keys`: under
``init_model``, (one draw of the caller's generator per call, the parameter's fully qualified
name), so values do not depend on the order of the writes, on the thread count, on the memory
layout, or on how the parameter is sharded (a DTensor's local shard computes only its own
elements, with no communication); on its own, ``variance_scaling_(t, generator=g)`` keys by one
draw of ``g``. Work is cut into chunks of ``2**17`` elements (peak scratch: one chunk per
thread), spread over ``torch.get_num_threads()`` threads for tensors of at least ``SMALL``
elements and run on the calling thread below that; under :func:`batched` (``init_model``'s
writes) the small tensors are filled together, whole, spread over those threads. Other devices
sample with the caller's generator and torch's own ``normal_`` / ``uniform_``.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np
import torch
from torch import Tensor

from ._errors import InitlabError, is_out_of_memory, memory_error, unknown_choice
from ._fans import fans as _fans
from ._fans import shape_of
from ._keys import is_dtensor, is_shard_block, resolve
from . import _philox

__all__ = ["variance_scaling_", "variance_scaling", "truncated_normal_", "MODES", "DISTRIBUTIONS",
           "TRUNC_STD", "TRUNC_VAR", "check_scale", "check_gain", "check_std", "planned_std", "needs_scratch", "check_mode", "check_distribution", "fan_for",
           "target_std"]

MODES = ("fan_in", "fan_out", "fan_avg", "fan_geo_avg")
DISTRIBUTIONS = ("truncated_normal", "normal", "uniform")
_DIST_ALIASES = {"truncated": "truncated_normal", "trunc_normal": "truncated_normal",
                 "untruncated_normal": "normal", "gaussian": "normal"}

TRUNC_STD = 0.87962566103423978
"""Std of a standard normal truncated to [-2, 2]: sqrt(1 - 4 phi(2) / (2 Phi(2) - 1))."""
TRUNC_VAR = TRUNC_STD * TRUNC_STD
"""Variance of a standard normal truncated to [-2, 2] (0.773741...)."""

CHUNK = 1 << 17  # elements per independent stream (fits the L2 cache with its scratch)
_SQRT3 = math.sqrt(3.0)


# --------------------------------------------------------------------------------------------
# validation

def is_number(v: object) -> bool:
    """A real number (Python or numpy, or a one-element real tensor), not a bool."""
    if type(v) in (float, int):
        return True
    if isinstance(v, (bool, np.bool_)):
        return False
    if isinstance(v, Tensor):
        return v.numel() == 1 and not v.is_complex() and v.dtype != torch.bool and not v.is_meta
    return isinstance(v, numbers.Real)


def check_scale(scale: object, what: str = "scale") -> float:
    """``scale`` as a float; it must be a finite number > 0."""
    if not is_number(scale):
        raise InitlabError(f"{what} must be a positive number, got {type(scale).__name__}: {scale!r}")
    v = float(scale)  # type: ignore[arg-type]
    if not (math.isfinite(v) and v > 0):
        raise InitlabError(f"{what} must be a finite number > 0, got {scale!r} "
                           "(the variance of the weights is scale / fan)")
    return v


def check_gain(g: object) -> float:
    """``g`` as a float; it must be a finite number > 0 whose square (the variance factor) is a
    finite, non-zero float too (``gain=1e200`` would give weights of infinite variance)."""
    if not is_number(g) or isinstance(g, Tensor) or not math.isfinite(float(g)) or float(g) <= 0:  # type: ignore[arg-type]
        raise InitlabError(f"gain must be a finite number > 0, got {g!r}")
    v = float(g)  # type: ignore[arg-type]
    if not (math.isfinite(v * v) and v * v > 0):
        raise InitlabError(f"gain {g!r} is out of range: gain^2 = {v * v!r} (the weights' variance is "
                           "gain^2 / fan); use a gain between 1e-150 and 1e150")
    return v


# the largest |value| a sampler writes, in units of its std: the inverse CDF on the 23- or 52-bit
# uniform grid reaches 5.3 or 8.1 std (torch's normal_ on other devices: about as far); the
# truncated normal 2 / 0.8796; the uniform sqrt(3)
_REACH = {"normal": 10.0, "truncated_normal": 2.0 / 0.87962566103423978 + 1e-6, "uniform": math.sqrt(3.0) + 1e-6}


_FINFO: dict[torch.dtype, torch.finfo] = {}


def _finfo(dtype: torch.dtype) -> torch.finfo:
    """``torch.finfo`` of a floating dtype (float32's for any other), made once per dtype."""
    info = _FINFO.get(dtype)
    if info is None:
        info = _FINFO[dtype] = torch.finfo(dtype) if dtype.is_floating_point else torch.finfo(torch.float32)
    return info


def check_std(std: float, dtype: torch.dtype, distribution: str = "normal", *, mean: float = 0.0,
              what: str = "std", how: str = "") -> float:
    """``std`` if weights of that std (and ``mean``) can be stored in ``dtype``: every value finite
    (no inf or NaN) and the std above the smallest normal number (else the values are zeros and
    denormals). Raises an :class:`InitlabError` naming the value and the range otherwise."""
    info = _finfo(dtype)
    name = str(dtype).replace("torch.", "")
    reach = _REACH.get(distribution, 10.0)
    how = f" ({how})" if how else ""
    if not (math.isfinite(std) and std > 0):
        raise InitlabError(f"the weights' {what} is {std!r}{how}; it must be a finite number > 0")
    if abs(mean) > info.max:
        raise InitlabError(f"the weights' mean {mean:g} is too large for {name} (largest number {info.max:.4g})")
    if abs(mean) + reach * std > info.max:
        hi = (info.max - abs(mean)) / reach
        raise InitlabError(
            f"the weights' {what} {std:.6g}{how}{f' with mean {mean:g}' if mean else ''} is too large for {name}: "
            f"{distribution} values would reach {abs(mean) + reach * std:.3g}, beyond its largest number "
            f"{info.max:.4g} (inf/NaN weights). Use a smaller scale or gain ({what} <= {hi:.3g} in {name})")
    if std < info.tiny:
        raise InitlabError(
            f"the weights' {what} {std:.6g}{how} is too small for {name}: below its smallest normal number "
            f"{info.tiny:.4g}, the weights would be zeros and denormals. Use a larger scale or gain, or a wider dtype")
    return std


def check_mode(mode: object) -> str:
    """A valid mode name (``fan_in``, ``fan_out``, ``fan_avg``, ``fan_geo_avg``)."""
    if type(mode) is str and mode in MODES:
        return mode
    key = mode.strip().lower() if isinstance(mode, str) else mode
    if key not in MODES:
        raise unknown_choice("mode", mode, MODES)
    return key  # type: ignore[return-value]


def check_distribution(distribution: object) -> str:
    """A valid distribution name (``truncated_normal``, ``normal``, ``uniform``)."""
    if type(distribution) is str and distribution in DISTRIBUTIONS:
        return distribution
    key = distribution.strip().lower() if isinstance(distribution, str) else distribution
    key = _DIST_ALIASES.get(key, key) if isinstance(key, str) else key
    if key not in DISTRIBUTIONS:
        raise unknown_choice("distribution", distribution, DISTRIBUTIONS)
    return key  # type: ignore[return-value]


def fan_for(mode: str, fan_in: float, fan_out: float) -> float:
    """The ``n`` of ``Var = scale / n`` for a mode."""
    return _fan_for(check_mode(mode), fan_in, fan_out)


def _fan_for(mode: str, fan_in: float, fan_out: float) -> float:
    if mode == "fan_in":
        return float(fan_in)
    if mode == "fan_out":
        return float(fan_out)
    if mode == "fan_avg":
        return (fan_in + fan_out) / 2.0
    return math.sqrt(fan_in * fan_out)


def _check_fans(f: object) -> tuple[float, float]:
    if type(f) is tuple and len(f) == 2 and type(f[0]) in (int, float) and type(f[1]) in (int, float) and \
            0 <= f[0] < math.inf and 0 <= f[1] < math.inf:  # the common case, without the general checks
        return float(f[0]), float(f[1])
    if isinstance(f, (tuple, list)) and len(f) == 2 and all(
            is_number(v) and not isinstance(v, Tensor) and math.isfinite(v) and v >= 0 for v in f):
        return float(f[0]), float(f[1])
    raise InitlabError(f"fans must be a pair (fan_in, fan_out) of non-negative numbers, got {f!r}")


def target_std(scale: float, mode: str, fans: tuple[float, float]) -> float:
    """sqrt(scale / n): the std every distribution of the engine realises."""
    fi, fo = _check_fans(fans)
    n = fan_for(mode, fi, fo)
    if n <= 0:
        raise InitlabError(f"{mode} is 0 for fans {fans!r}; cannot scale the variance by 1/{mode}")
    return math.sqrt(check_scale(scale) / n)


_WHOLE_MATRIX = ("orthogonal_", "delta_orthogonal_", "identity_")


def _check_tensor(tensor: object, what: str) -> Tensor:
    if not isinstance(tensor, Tensor):
        raise InitlabError(f"{what} expects a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise InitlabError(f"{what} needs a floating-point tensor (float32, float64, float16, bfloat16), "
                           f"got dtype {tensor.dtype}; random weights cannot be stored in it")
    if what in _WHOLE_MATRIX and (is_dtensor(tensor) or is_shard_block(tensor)):
        shape = "a row block" if is_shard_block(tensor) else f"of shape {tuple(tensor.shape)}"
        raise InitlabError(
            f"{what} cannot fill a sharded (DTensor) tensor ({shape}): an orthogonal matrix couples "
            "all its entries, so a shard is not computable alone (it would take the full matrix and its QR on every "
            "rank); initialise it before sharding, load a checkpoint, or use a variance-scaling scheme (normal, "
            "uniform, truncated normal: exact per shard). LSUV starts from orthogonal_ and is refused likewise")
    if tensor.is_inference() and not torch.is_inference_mode_enabled():
        raise InitlabError(f"{what} cannot write into an inference tensor (made under torch.inference_mode()) "
                           "outside inference mode; clone it first (tensor.clone()) or call it inside inference_mode")
    return tensor


def _check_generator(generator: object, tensor: Tensor) -> torch.Generator | None:
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise InitlabError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != tensor.device.type and not tensor.is_meta:
        raise InitlabError(f"generator is on {generator.device} but the tensor is on {tensor.device}; "
                           f"use torch.Generator(device={str(tensor.device)!r})")
    return generator


# --------------------------------------------------------------------------------------------
# samplers: fill a contiguous fp32/fp64 buffer; ``a`` is the std (normal), the half-width
# (uniform) or the std of the underlying normal (truncated)

def _fill_torch(buf: Tensor, kind: str, a: float, g: torch.Generator | None) -> None:
    """Pure-torch sampler (any device)."""
    if kind == "uniform":
        buf.uniform_(-a, a, generator=g)
        return
    buf.normal_(0.0, a, generator=g)
    if kind == "normal":
        return
    flat = buf.view(-1)
    bound = 2.0 * a
    idx = (flat.abs() > bound).nonzero().squeeze(1)
    while idx.numel():
        k = idx.numel()
        v = torch.empty(k + k // 8 + 16, dtype=buf.dtype, device=buf.device).normal_(0.0, a, generator=g)
        v = v[v.abs() <= bound]
        m = min(k, v.numel())
        flat[idx[:m]] = v[:m]
        idx = idx[m:]


# CPU: every element is one function of (stream key, its global index): Philox4x64-10 words
# (initlab._philox), 32 bits per fp32 element and 64 per fp64 one, turned into a uniform on a
# symmetric grid inside (-1, 1) and into a normal or truncated normal by the inverse CDF
# (torch's vectorised erfinv). No rejection, no pairs: a shard computes exactly its own elements.

# the mass of N(0, 1) inside [-2, 2], erf(sqrt 2) correctly rounded: a literal, not math.erf, whose
# last bit is the platform's C library's
_ERF_SQRT2 = float.fromhex("0x1.e8b4307d3627ap-1")
_SQRT2 = math.sqrt(2.0)
_SHORT_RUN = 256  # runs of fewer words are gathered by the vectorised Philox (no per-run setup)
SMALL = 1 << 18  # below this many elements the sampler runs on the calling thread alone
_SHIFT32, _EXP32 = np.uint32(9), np.uint32(0x40000000)
_SHIFT64, _EXP64 = np.uint64(12), np.uint64(0x4000000000000000)
_GRID = {"f": (np.float32(3.0), np.float32(2.0 ** -23)), "d": (np.float64(3.0), np.float64(2.0 ** -52))}


def _unit_grid(w: np.ndarray, first: int, n: int, dtype: torch.dtype) -> Tensor:
    """``n`` uniforms on the symmetric grid ``(2k + 1) / 2^m - 1`` (m = 23 or 52 mantissa bits)
    from the words ``w``: fp32 element ``e`` takes half ``e % 2`` of its word (low half first),
    fp64 element ``e`` a whole word; ``first`` is the parity of the first element (fp32).
    ``w`` is overwritten (the result shares its memory)."""
    return _grid(w if dtype == torch.float64 else w.astype("<u8", copy=False).view("<u4")[first: first + n])


def _grid(h: np.ndarray) -> Tensor:
    """The uniforms of :func:`_unit_grid` from the bits ``h`` of each element: 32-bit halves (fp32)
    or 64-bit words (fp64), overwritten (the result shares their memory)."""
    if h.dtype.itemsize == 8:
        np.right_shift(h, _SHIFT64, out=h)
        np.bitwise_or(h, _EXP64, out=h)
        f = h.view(np.float64)
    else:
        np.right_shift(h, _SHIFT32, out=h)
        np.bitwise_or(h, _EXP32, out=h)
        f = h.view(np.float32)
    # the mantissa bits under exponent 1 make f = 2 + 2k / 2^m in [2, 4); then (f - 3) + 2^-m,
    # both steps exact (f - 3 is a multiple of 2^(1-m) in [-1, 1), and adding half of that step
    # needs one more bit, which every float in (-1, 1) has), so the grid is symmetric and never
    # reaches -1 or 1, where erfinv is infinite. Two passes (0.2 took three: [1, 2), - 1.5,
    # + 2^-(m+1), * 2; the same numbers). Exact in any IEEE implementation: numpy's in-place
    # ufuncs cost a microsecond a call, torch's four
    three, step = _GRID[f.dtype.char]
    np.subtract(f, three, out=f)
    np.add(f, step, out=f)
    return torch.from_numpy(f)


def _scale(x: np.ndarray, s: float) -> None:
    """``x *= s`` in ``x``'s precision (``s`` rounded to it first, as torch's ``mul_`` by a Python
    number does), one correctly rounded product per element."""
    np.multiply(x, x.dtype.type(s), out=x)


def _transform(v: Tensor, out: Tensor, kind: str, a: float) -> None:
    """``out = F^-1(v)`` for ``v`` uniform on (-1, 1) (a CPU tensor, overwritten): uniform ``a v``;
    normal ``a sqrt(2) erfinv(v)``; truncated normal ``a sqrt(2) erfinv(erf(sqrt 2) v)`` (the normal
    of std ``a`` conditioned on [-2a, 2a], exactly: the inverse CDF of the truncated law)."""
    if kind == "uniform":
        if a < _finfo(out.dtype).max / 2:
            torch.mul(v, a, out=out)
        else:
            torch.mul(v, a / 2, out=out).mul_(2.0)
        return
    if kind == "truncated":
        _scale(v.numpy(), _ERF_SQRT2)
    torch.erfinv(v, out=out)
    s = a * _SQRT2
    o = out.numpy()
    if math.isfinite(s) and s < _finfo(out.dtype).max / 16:
        _scale(o, s)
    else:  # a sqrt(2) would overflow the buffer's dtype
        _scale(o, a)
        _scale(o, _SQRT2)


def _words_for(key: tuple[int, int], starts: np.ndarray, lens: np.ndarray, per: int) -> tuple[np.ndarray, list[int]]:
    """The words behind element runs ``[start, start + len)``, concatenated, and each run's
    offset (in elements) into its words' elements: fp32 (``per`` 2) runs start on a word boundary."""
    if starts.size == 1:
        s, n = int(starts[0]), int(lens[0])
        w0 = s // per
        return _philox.words(key, w0, -(-(s + n) // per) - w0), [s - w0 * per]
    parts, firsts = [], []
    short: list[np.ndarray] = []
    for s, n in zip(starts.tolist(), lens.tolist()):
        w0, w1 = s // per, -(-(s + n) // per)
        firsts.append(s - w0 * per)
        if w1 - w0 >= _SHORT_RUN:
            if short:
                parts.append(_philox.gather(key, np.concatenate(short)))
                short = []
            parts.append(_philox.words(key, w0, w1 - w0))
        else:
            short.append(np.arange(w0, w1, dtype=np.uint64))
    if short:
        parts.append(_philox.gather(key, np.concatenate(short)))
    return (parts[0] if len(parts) == 1 else np.concatenate(parts)), firsts


def _fill_run(buf: Tensor, kind: str, a: float, key: tuple[int, int], start: int) -> None:
    """Fill the 1-d contiguous fp32/fp64 CPU tensor ``buf`` with the elements at global indices
    ``start .. start + buf.numel() - 1`` (one run: the words are drawn in one call)."""
    per = 1 if buf.dtype == torch.float64 else 2
    n = buf.numel()
    w0 = start // per
    w = _philox.words(key, w0, -(-(start + n) // per) - w0)
    _transform(_unit_grid(w, start - w0 * per, n, buf.dtype), buf, kind, a)


def _fill_runs(buf: Tensor, kind: str, a: float, key: tuple[int, int], starts: np.ndarray, lens: np.ndarray) -> None:
    """Fill the 1-d contiguous fp32/fp64 CPU tensor ``buf`` with the elements at global indices
    ``starts[k] .. starts[k] + lens[k] - 1``, run after run."""
    if starts.size == 1:
        _fill_run(buf, kind, a, key, int(starts[0]))
        return
    per = 1 if buf.dtype == torch.float64 else 2
    w, firsts = _words_for(key, starts, lens, per)
    if per == 1:
        _transform(_unit_grid(w, 0, buf.numel(), buf.dtype), buf, kind, a)
        return
    # several runs: each run's words hold whole pairs; keep the elements the runs ask for
    v = _unit_grid(w, 0, 2 * w.size, buf.dtype)
    wl = (np.asarray(firsts) + lens + 1) // 2  # words per run
    woff = np.concatenate(([0], np.cumsum(wl)[:-1])) * 2 + np.asarray(firsts)
    keep = np.repeat(woff - np.concatenate(([0], np.cumsum(lens)[:-1])), lens) + np.arange(buf.numel())
    _transform(v[torch.from_numpy(keep)], buf, kind, a)


def _chunk_runs(starts: np.ndarray, lens: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """The parts of the runs (laid end to end in local order) between local elements lo and hi."""
    ends = np.cumsum(lens)
    begins = ends - lens
    i, j = int(np.searchsorted(ends, lo, "right")), int(np.searchsorted(begins, hi, "left"))
    s, b, e = starts[i:j].copy(), begins[i:j], ends[i:j]
    cut_lo = np.maximum(lo - b, 0)
    s += cut_lo
    n = np.minimum(e, hi) - np.maximum(b, lo)
    return s, n


_pools: dict[str, tuple[tuple[int, int], ThreadPoolExecutor]] = {}
_pool_lock = threading.Lock()


def thread_pool(prefix: str, workers: int) -> ThreadPoolExecutor:
    """The process's thread pool named ``prefix`` with ``workers`` threads, made once and reused (a forked
    child, or a new size, gets a new one)."""
    key = (os.getpid(), workers)  # a forked child must not reuse the parent's (absent) threads
    with _pool_lock:
        old = _pools.get(prefix)
        if old is None or old[0] != key:
            if old is not None and old[0][0] == os.getpid():
                old[1].shutdown(wait=False)
            _pools[prefix] = (key, ThreadPoolExecutor(max_workers=workers, thread_name_prefix=prefix))
        return _pools[prefix][1]


class using_threads:
    """``with using_threads(n):`` torch's intra-op thread count set to ``n`` for the block (this
    thread's OpenMP team), the previous count put back afterwards, also on errors; nothing is
    switched when the count is already ``n``. A class, not a generator: it is entered once per
    sampled chunk and per hook, where a switch must cost well under a microsecond."""

    __slots__ = ("n", "previous")

    def __init__(self, n: int) -> None:
        self.n, self.previous = n, 0

    def __enter__(self) -> int:
        self.previous = torch.get_num_threads()
        if self.previous != self.n:
            torch.set_num_threads(self.n)
        return self.n

    def __exit__(self, *exc: object) -> None:
        if torch.get_num_threads() != self.previous:
            torch.set_num_threads(self.previous)


def _executor(workers: int) -> ThreadPoolExecutor:
    return thread_pool("initlab-sample", workers)


def workers_for(n: int) -> int:
    """Threads the sampler uses for ``n`` elements: one below :data:`SMALL` (a thread hand-off
    costs more than it saves there), else up to ``torch.get_num_threads()``, one per chunk."""
    if n < SMALL:
        return 1
    return max(1, min(torch.get_num_threads(), -(-n // CHUNK)))


def _fill_chunks(flat: Tensor, kind: str, a: float, key: tuple[int, int], starts: np.ndarray,
                 lens: np.ndarray, work: torch.dtype) -> None:
    """Fill the 1-d contiguous CPU tensor ``flat`` (its elements: the runs, end to end) chunk by
    chunk; chunks spread over :func:`workers_for` threads, the calling one and pool threads, each
    taking the next chunk when it is free (a thread that the machine's load holds back takes fewer;
    the result does not depend on who fills which chunk). Every torch operation runs on one
    intra-op thread, so no OpenMP team is left spinning."""
    n = flat.numel()
    nchunks = -(-n // CHUNK)
    whole = starts.size == 1 and int(starts[0]) == 0  # a whole tensor: one run, no search

    def run(chunks: Iterator[int]) -> None:
        scratch = None if flat.dtype == work else torch.empty(min(CHUNK, n), dtype=work)
        for i in chunks:
            s, e = i * CHUNK, min(n, (i + 1) * CHUNK)
            dst = flat[s:e] if nchunks > 1 else flat
            buf = dst if scratch is None else scratch[: e - s]
            if whole:
                _fill_run(buf, kind, a, key, s)
            else:
                _fill_runs(buf, kind, a, key, *_chunk_runs(starts, lens, s, e))
            if scratch is not None:
                dst.copy_(buf)

    def single(chunks: Iterator[int]) -> None:
        # always, also on tiny tensors: erfinv splits work far below torch's usual grain size
        # (32768), so a 4096-element erfinv would wake the OpenMP team (21 ms on a busy machine
        # with 2 threads, 0.07 ms with 1); switching costs about half a microsecond
        with using_threads(1):
            run(chunks)

    workers = workers_for(n)
    if workers == 1 or threading.current_thread().name.startswith("initlab-sample"):
        single(iter(range(nchunks)))
        return
    order = iter(range(nchunks))  # shared: next() on it is one step under the GIL, so each chunk is taken once
    _run_parallel([lambda: single(order)] * (workers - 1), workers, here=lambda: single(order))


_batch: contextvars.ContextVar[list[tuple[Any, ...]] | None] = contextvars.ContextVar("initlab_batch", default=None)


@contextlib.contextmanager
def batched(measure: int = 0) -> Iterator[dict[tuple[int, int, torch.dtype], tuple[int, Tensor, Tensor]]]:
    """Inside, every CPU tensor the sampler fills in place is only prepared (its key and runs,
    on the calling thread); all are filled when the block ends, with the small ones (below
    :data:`SMALL` elements) spread over ``torch.get_num_threads()`` threads as whole tensors,
    which no per-tensor call can do without a thread hand-off per tensor. The values are the
    same (each element is a function of its key and index). Nothing is written when the block
    raises; nothing inside it may read what it samples.

    ``measure=n``: the dict it yields then holds, once the block has ended, the sum and the
    2-norm (``x.sum()``, ``torch._foreach_norm([x])[0]``, on one intra-op thread) of the first
    ``n`` elements ``x`` of each fp32/fp64 tensor filled (of at least ``_TINY`` elements), computed by the thread that filled it
    while they are in its cache, keyed by ``(x.data_ptr(), x.numel(), x.dtype)`` with the
    tensor's version counter after the write (:func:`measured` reads them back)."""
    jobs: list[tuple[Any, ...]] = []
    stats: dict[tuple[int, int, torch.dtype], tuple[int, Tensor, Tensor]] = {}
    token = _batch.set(jobs)
    try:
        yield stats
    finally:
        _batch.reset(token)
    _fill_all(jobs, (measure, stats) if measure > 0 else None)


_Stats = tuple[int, "dict[tuple[int, int, torch.dtype], tuple[int, Tensor, Tensor]]"] | None


def _version(t: Tensor) -> int | None:
    """``t._version`` (None for an inference tensor, which has no version counter)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _measure(flat: Tensor, stats: _Stats) -> None:
    """Record :func:`batched`'s sums of the just-filled 1-d tensor ``flat`` (not below ``_TINY``
    elements: there the two reductions are mostly per-call cost, the same on any thread)."""
    if stats is None or flat.dtype not in (torch.float32, torch.float64) or flat.numel() < _TINY:
        return
    n, out = stats
    x = flat[:n] if flat.numel() > n else flat
    v = _version(flat)
    if x.numel() >= 2 and v is not None:
        with using_threads(1):
            out[(x.data_ptr(), x.numel(), x.dtype)] = (v, x.sum(), torch._foreach_norm([x])[0])


def measured(x: Tensor, version: int | None, stats: dict[tuple[int, int, torch.dtype], tuple[int, Tensor, Tensor]]
             ) -> tuple[Tensor, Tensor] | None:
    """The (sum, 2-norm) :func:`batched` recorded for the 1-d tensor ``x`` (a view of the first
    elements of a tensor it filled, at its version counter ``version``), or None: not recorded, or
    written since."""
    hit = stats.get((x.data_ptr(), x.numel(), x.dtype)) if stats else None
    return None if hit is None or version is None or hit[0] != version else (hit[1], hit[2])


_TINY = 1 << 14  # a tensor this small is mostly Python per call: its own thread would only contend for the GIL


def _fill_all(jobs: list[tuple[Any, ...]], stats: _Stats = None) -> None:
    """Fill the jobs :func:`batched` collected: the large ones chunk-parallel, one after the
    other; the small ones whole, each thread taking the next one when it is free, the calling
    thread first filling every tiny tensor (below ``_TINY`` elements). ``stats``:
    :func:`batched`'s ``measure`` and the dict its sums go to."""
    for j in jobs:
        if j[0].numel() >= SMALL:
            _fill_chunks(*j)
            _measure(j[0], stats)
    small = [j for j in jobs if _TINY <= j[0].numel() < SMALL]
    tiny = [j for j in jobs if j[0].numel() < _TINY]
    workers = workers_for(sum(j[0].numel() for j in small))

    def fill(group: Iterable[tuple[Any, ...]]) -> None:
        for j in group:
            _fill_chunks(*j)
            _measure(j[0], stats)

    if workers == 1 or threading.current_thread().name.startswith("initlab-sample"):
        fill(small)
        _fill_tiny(tiny, stats)
        return
    # largest first, each thread taking the next job when it is free (shared iterator: each job once);
    # the calling thread fills the tiny ones first
    queue = iter(sorted(small, key=lambda j: -j[0].numel()))
    _run_parallel([lambda: fill(queue)] * (workers - 1), workers,  # the pool of that size
                  here=lambda: (_fill_tiny(tiny, stats), fill(queue)))


def _fill_tiny(jobs: list[tuple[Any, ...]], stats: _Stats = None) -> None:
    """Fill tiny jobs (one run each, in their work dtype) a batch of up to :data:`CHUNK` elements
    of one distribution at a time: each job's words from its own stream, then one uniform grid, one
    erfinv over the batch (normal, truncated normal) and one scaled copy into each tensor.
    Elementwise the same operations as :func:`_fill_run` (the grid is exact, erfinv and the product
    are per element), so the same bits; what is saved is the per-call cost (~15 us a tensor),
    which dominates below ~4k elements. A job whose scale needs :func:`_transform`'s overflow
    guard is filled alone."""
    batches: dict[tuple[str, torch.dtype], list[tuple[Any, ...]]] = {}
    for j in jobs:
        flat, kind, a, _, starts, _, work = j
        if flat.dtype == work and starts.size == 1 and _batchable(kind, a, work):
            batches.setdefault((kind, work), []).append(j)
        else:
            _fill_chunks(*j)
            _measure(flat, stats)
    with using_threads(1):
        for (kind, work), group in batches.items():
            lo, size = 0, 0
            for i, j in enumerate(group):
                if size and size + j[0].numel() > CHUNK:
                    _fill_batch(group[lo:i], kind, work, stats)
                    lo, size = i, 0
                size += j[0].numel()
            _fill_batch(group[lo:], kind, work, stats)


def _batchable(kind: str, a: float, work: torch.dtype) -> bool:
    """Whether :func:`_transform`'s final product is one multiplication by ``a`` (uniform) or by
    ``a sqrt(2)`` (normal, truncated normal), not its overflow-guarded two."""
    if kind == "uniform":
        return a < _finfo(work).max / 2
    s = a * _SQRT2
    return kind in ("normal", "truncated") and math.isfinite(s) and s < _finfo(work).max / 16


def _fill_batch(group: list[tuple[Any, ...]], kind: str, work: torch.dtype, stats: _Stats = None) -> None:
    """:func:`_fill_tiny`'s batch: ``group`` jobs of one kind and work dtype, whole runs."""
    per = 1 if work == torch.float64 else 2
    halves = []
    for flat, _, _, key, starts, _, _ in group:
        start, n = int(starts[0]), flat.numel()
        w0 = start // per
        w = _philox.words(key, w0, -(-(start + n) // per) - w0)
        halves.append(w if per == 1 else w.astype("<u8", copy=False).view("<u4")[start - w0 * per: start - w0 * per + n])
    v = _grid(np.concatenate(halves))
    if kind == "truncated":
        _scale(v.numpy(), _ERF_SQRT2)
    if kind != "uniform":
        torch.erfinv(v, out=v)
    at = 0
    for flat, _, a, _, _, _, _ in group:
        n = flat.numel()
        # as _transform: the uniform's a v; the normal's s erfinv(v), s rounded to the dtype first as _scale does
        torch.mul(v[at: at + n], a if kind == "uniform" else a * _SQRT2, out=flat)
        _measure(flat, stats)
        at += n


def _run_parallel(tasks: list[Any], workers: int, here: Any = None) -> None:
    """Run ``tasks`` on the sampler's pool (and ``here`` on the calling thread meanwhile); never
    return (even on Ctrl-C) while one still runs."""
    futures = [_executor(workers).submit(t) for t in tasks]
    try:
        if here is not None:
            here()
        for f in futures:
            f.result()
    finally:
        for f in futures:
            f.cancel()
        wait(futures)


def _sample_(tensor: Tensor, kind: str, a: float, generator: torch.Generator | None) -> Tensor:
    """Fill ``tensor`` in place from the distribution ``kind`` with parameter ``a``.

    On the CPU (and for a DTensor's local shard on any device) element ``i`` of the tensor's
    logical row-major order is a function of (stream key, i) alone; the key is
    :func:`initlab._keys.resolve`'s (a parameter's name under ``init_model``, else one draw of
    ``generator``). Elsewhere torch's own samplers run with ``generator``. Every write goes to a
    detached tensor (or a scratch one), so autograd records nothing without a ``no_grad`` block."""
    if tensor.is_meta or tensor.numel() == 0:
        return tensor
    if tensor.device.type != "cpu" and not (is_dtensor(tensor) or is_shard_block(tensor)):
        t = tensor.detach()
        work = torch.float64 if t.dtype == torch.float64 else torch.float32
        if t.dtype == work and t.is_contiguous():
            _fill_torch(t, kind, a, generator)
        else:
            buf = _scratch(t, work)
            _fill_torch(buf, kind, a, generator)
            t.copy_(buf)
        return tensor
    target = resolve(tensor, generator)
    t = target.local.detach()
    if t.numel() == 0:
        return tensor
    work = torch.float64 if t.dtype == torch.float64 else torch.float32
    direct = t.is_contiguous() and t.device.type == "cpu"
    buf = t if direct else _scratch(t, work, "cpu")  # allocated before anything is written
    key = _philox.stream_key(target.base, target.name)
    jobs = _batch.get()
    if jobs is not None and direct:  # filled when the batch ends
        jobs.append((buf.view(-1), kind, a, key, target.starts, target.lens, work))
        return tensor
    _fill_chunks(buf.view(-1), kind, a, key, target.starts, target.lens, work)
    if not direct:
        t.copy_(buf)
    return tensor


def needs_scratch(t: Tensor) -> bool:
    """Whether sampling ``t`` allocates a scratch tensor of its size (non-contiguous, or off the CPU
    in a dtype other than fp32/fp64): then the sampler can run out of memory part-way."""
    if t.is_meta or t.numel() == 0:
        return False
    if t.device.type != "cpu":
        return not (t.dtype in (torch.float32, torch.float64) and t.is_contiguous())
    return not t.is_contiguous()


def _scratch(t: Tensor, work: torch.dtype, device: torch.device | str | None = None) -> Tensor:
    """A contiguous ``work``-dtype tensor of ``t``'s shape; a clear error when memory runs out."""
    try:
        return torch.empty(t.shape, dtype=work, device=t.device if device is None else device)
    except (RuntimeError, MemoryError) as e:
        if is_out_of_memory(e):
            n = t.numel() * torch.empty((), dtype=work, device="meta").element_size()
            raise memory_error(f"the {str(work).replace('torch.', '')} scratch copy of a "
                               f"{'x'.join(map(str, t.shape))} tensor on {t.device}", n, e) from e
        raise


# --------------------------------------------------------------------------------------------
# public API

def truncated_normal_(tensor: Tensor, std: float = 1.0, *, generator: torch.Generator | None = None) -> Tensor:
    """Fill ``tensor`` in place with a truncated normal whose **realised** std is ``std``.

    The underlying normal N(0, s^2), s = std / 0.87962566103423978, is cut at +-2s; the result
    has mean 0 and variance std^2 (TensorFlow/JAX truncation, variance-corrected as in
    Keras' ``VarianceScaling``). Sampled exactly by the inverse CDF,
    ``s sqrt(2) erfinv(erf(sqrt 2) v)`` with ``v`` uniform on (-1, 1). Returns ``tensor``.
    """
    _check_tensor(tensor, "truncated_normal_")
    std = check_scale(std, "std")
    gen = _check_generator(generator, tensor)
    check_std(std, tensor.dtype, "truncated_normal")
    return _sample_(tensor, "truncated", std / TRUNC_STD, gen)


def _sample_scaled_(tensor: Tensor, std: float, distribution: str, generator: torch.Generator | None) -> Tensor:
    if distribution == "normal":
        return _sample_(tensor, "normal", std, generator)
    if distribution == "uniform":
        return _sample_(tensor, "uniform", _SQRT3 * std, generator)
    return _sample_(tensor, "truncated", std / TRUNC_STD, generator)


def variance_scaling_(tensor: Tensor, scale: float = 1.0, mode: str = "fan_in",
                      distribution: str = "truncated_normal", *, generator: torch.Generator | None = None,
                      fans: tuple[float, float] | None = None) -> Tensor:
    """Fill ``tensor`` in place with zero-mean weights of variance ``scale / n``.

    ``n`` is fan_in, fan_out, (fan_in + fan_out)/2 or sqrt(fan_in fan_out) by ``mode``;
    ``distribution`` is ``"truncated_normal"`` (cut at +-2 sigma of the underlying normal, std
    corrected by 1/0.87962566103423978), ``"normal"`` or ``"uniform"`` (+-sqrt(3 scale / n)).
    The realised variance is ``scale / n`` for all three (Glorot & Bengio 2010; He et al. 2015;
    Klambauer et al. 2017 for LeCun normal).

    Args:
        tensor: a floating-point tensor (fp32/fp64, or fp16/bf16 computed in fp32). A meta
            tensor is left as is (nothing to fill); so is an empty tensor.
        fans: ``(fan_in, fan_out)``; default ``initlab.fans(tensor)`` (PyTorch layout). Pass
            ``initlab.fans(w, module=layer)`` for grouped/transposed convolutions and friends.
        generator: a CPU ``torch.Generator`` for a CPU tensor: one draw of it keys the tensor's
            Philox stream (under ``init_model``: one draw per call, keyed with the parameter's
            name). Results do not depend on the number of threads or the CPU instruction set
            torch dispatches to; across machines the normal's last bit follows ``torch.erfinv``'s
            (seen to differ in a few elements). Values differ from initlab 0.1, whose streams
            were sequential and per tensor.

    Returns:
        ``tensor``.
    """
    std, distribution, gen = planned_std(tensor, scale, mode, distribution, generator=generator, fans=fans)
    if std is None:
        return tensor
    return _sample_scaled_(tensor, std, distribution, gen)


def planned_std(tensor: Tensor, scale: float = 1.0, mode: str = "fan_in", distribution: str = "truncated_normal",
                *, generator: torch.Generator | None = None, fans: tuple[float, float] | None = None,
                what: str = "variance_scaling_") -> tuple[float | None, str, torch.Generator | None]:
    """Every check of :func:`variance_scaling_`, without writing: ``(std, distribution, generator)``
    it would sample with (std None: nothing to write, an empty tensor). Raises what it would raise."""
    _check_tensor(tensor, what)
    scale = check_scale(scale)
    mode = check_mode(mode)
    distribution = check_distribution(distribution)
    gen = _check_generator(generator, tensor)
    f = _check_fans(fans) if fans is not None else _fans(tensor)
    n = _fan_for(mode, f[0], f[1])
    if n <= 0 or not math.isfinite(n):
        if tensor.numel() == 0:
            return None, distribution, gen
        raise InitlabError(f"{mode} is {n:g} for fans {tuple(f)!r} (shape {tuple(tensor.shape)}); "
                           f"cannot scale the variance by 1/{n:g}")
    if tensor.numel() == 0:
        return None, distribution, gen
    std = math.sqrt(scale / n)
    info = _finfo(tensor.dtype)
    if math.isfinite(std) and info.tiny <= std and _REACH.get(distribution, 10.0) * std <= info.max:
        return std, distribution, gen  # what check_std returns, without formatting its message
    return check_std(std, tensor.dtype, distribution, how=f"sqrt(scale / {mode}) = sqrt({scale:.4g} / {n:.4g})"), \
        distribution, gen


def variance_scaling(shape_or_tensor: Tensor | Sequence[int], scale: float = 1.0, mode: str = "fan_in",
                     distribution: str = "truncated_normal", *, generator: torch.Generator | None = None,
                     fans: tuple[float, float] | None = None, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> Tensor:
    """Functional :func:`variance_scaling_`: a new tensor of the given shape (or like the given
    tensor; ``dtype``/``device`` override) with variance ``scale / n``."""
    if isinstance(shape_or_tensor, Tensor):
        shape = tuple(shape_or_tensor.shape)
        dtype = dtype or shape_or_tensor.dtype
        device = device if device is not None else shape_or_tensor.device
    else:
        shape = shape_of(shape_or_tensor)
        dtype = dtype or torch.get_default_dtype()
    if not isinstance(dtype, torch.dtype):
        raise InitlabError(f"dtype must be a torch.dtype (e.g. torch.float32), got {dtype!r}")
    try:
        device = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise InitlabError(f"device must be a torch.device or a device string like 'cpu' or 'cuda:0', got {device!r}") from e
    # every check first (on a meta tensor of the shape), then the allocation
    planned_std(torch.empty(shape, dtype=dtype, device="meta"), scale, mode, distribution, fans=fans,
                what="variance_scaling")
    try:
        out = torch.empty(shape, dtype=dtype, device=device)
    except (RuntimeError, MemoryError) as e:
        if is_out_of_memory(e):
            n = math.prod(shape) * torch.empty((), dtype=dtype, device="meta").element_size()
            raise memory_error(f"a {'x'.join(map(str, shape))} {str(dtype).replace('torch.', '')} tensor on {device}",
                               n, e) from e
        raise InitlabError(f"cannot allocate a tensor of shape {shape} on {device} ({type(e).__name__}: "
                           f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from e
    return variance_scaling_(out, scale, mode, distribution, generator=generator, fans=fans)
