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

Sampling on CPU is chunked: the tensor (in logical, row-major order) is cut into blocks of
``2**17`` elements; block ``i`` draws its random bits from its own stream (numpy's SFC64,
seeded by SplitMix64 from ``i`` and one 64-bit draw of the caller's ``torch.Generator``), and
blocks are filled by ``torch.get_num_threads()`` threads. The result depends only on the
generator's state and the tensor's shape, never on the number of threads or the memory
layout. Normals come from Box & Muller (1958) with torch's vectorised log/sin/cos (faster than
``Tensor.normal_`` on CPU); the truncated normal redraws only the ~4.55% of entries beyond
+-2 sigma (exact rejection sampling, no ``erfinv``). Other devices sample with the caller's
generator and torch's own ``normal_`` / ``uniform_``.
"""
from __future__ import annotations

import math
import numbers
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np
import torch
from torch import Tensor

from ._errors import InitlabError, is_out_of_memory, memory_error, unknown_choice
from ._fans import fans as _fans
from ._fans import shape_of

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


# the largest |value| a sampler writes, in units of its std: Box-Muller on 24- or 53-bit uniforms
# reaches 5.65 or 8.57 std (torch's normal_ on other devices: about as far); the truncated
# normal 2 / 0.8796; the uniform sqrt(3)
_REACH = {"normal": 10.0, "truncated_normal": 2.0 / 0.87962566103423978 + 1e-6, "uniform": math.sqrt(3.0) + 1e-6}


def check_std(std: float, dtype: torch.dtype, distribution: str = "normal", *, mean: float = 0.0,
              what: str = "std", how: str = "") -> float:
    """``std`` if weights of that std (and ``mean``) can be stored in ``dtype``: every value finite
    (no inf or NaN) and the std above the smallest normal number (else the values are zeros and
    denormals). Raises an :class:`InitlabError` naming the value and the range otherwise."""
    info = torch.finfo(dtype) if dtype.is_floating_point else torch.finfo(torch.float32)
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
    key = mode.strip().lower() if isinstance(mode, str) else mode
    if key not in MODES:
        raise unknown_choice("mode", mode, MODES)
    return key  # type: ignore[return-value]


def check_distribution(distribution: object) -> str:
    """A valid distribution name (``truncated_normal``, ``normal``, ``uniform``)."""
    key = distribution.strip().lower() if isinstance(distribution, str) else distribution
    key = _DIST_ALIASES.get(key, key) if isinstance(key, str) else key
    if key not in DISTRIBUTIONS:
        raise unknown_choice("distribution", distribution, DISTRIBUTIONS)
    return key  # type: ignore[return-value]


def fan_for(mode: str, fan_in: float, fan_out: float) -> float:
    """The ``n`` of ``Var = scale / n`` for a mode."""
    mode = check_mode(mode)
    if mode == "fan_in":
        return float(fan_in)
    if mode == "fan_out":
        return float(fan_out)
    if mode == "fan_avg":
        return (fan_in + fan_out) / 2.0
    return math.sqrt(fan_in * fan_out)


def _check_fans(f: object) -> tuple[float, float]:
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


def _check_tensor(tensor: object, what: str) -> Tensor:
    if not isinstance(tensor, Tensor):
        raise InitlabError(f"{what} expects a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise InitlabError(f"{what} needs a floating-point tensor (float32, float64, float16, bfloat16), "
                           f"got dtype {tensor.dtype}; random weights cannot be stored in it")
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


# CPU: random bits from numpy's SFC64 (one stream per chunk), turned into floats by exponent
# tricks and into normals by Box-Muller with torch's vectorised log/sin/cos: faster than
# torch's own normal_ on one core (mt19937 + Box-Muller), and exact in distribution.

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_TWO_PI = 2.0 * math.pi
_tls = threading.local()


def _splitmix64(s: int) -> tuple[int, int]:
    """One step of SplitMix64 (Steele et al. 2014): (output, next state)."""
    s = (s + _GOLDEN) & _M64
    z = s
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31), s


def _stream(base: int, i: int) -> np.random.SFC64:
    """The bit generator of chunk ``i``: SFC64 (Doty-Humphrey) seeded by SplitMix64 from
    ``(base, i)``; one reusable object per thread."""
    bg = getattr(_tls, "bitgen", None)
    if bg is None:
        bg = _tls.bitgen = np.random.SFC64(0)
    h, _ = _splitmix64(i)  # a bijective hash of the index: well-separated starting points
    s = base ^ h
    a, s = _splitmix64(s)
    b, s = _splitmix64(s)
    c, s = _splitmix64(s)
    bg.state = {"bit_generator": "SFC64", "state": {"state": np.array([a, b, c, 1], dtype=np.uint64)},
                "has_uint32": 0, "uinteger": 0}
    bg.random_raw(12, output=False)  # SFC64's reference seeding discards 12 outputs
    return bg


def _unit(bg: np.random.SFC64, n: int, dtype: torch.dtype) -> np.ndarray:
    """``n`` uniforms on [1, 2) (random mantissa bits under exponent 0), fp32 or fp64 numpy."""
    if dtype == torch.float64:
        r = bg.random_raw(n)
        np.right_shift(r, np.uint64(12), out=r)
        np.bitwise_or(r, np.uint64(0x3FF0000000000000), out=r)
        return r.view(np.float64)
    r = bg.random_raw((n + 1) // 2).view(np.uint32)[:n]
    np.right_shift(r, np.uint32(9), out=r)
    np.bitwise_or(r, np.uint32(0x3F800000), out=r)
    return r.view(np.float32)


def _box_muller(out: Tensor, bg: np.random.SFC64, sigma: float, extra: int = 0) -> Tensor | None:
    """N(0, sigma^2) into the 1-d contiguous ``out`` (Box & Muller 1958): r = sigma sqrt(-2 log u1)
    with u1 in (0, 1], theta = 2 pi u2; outputs r cos(theta) and r sin(theta), which are
    independent. With 23-bit (fp32) uniforms |z| <= 5.65 sigma (torch's normal_: 5.8 sigma); the
    probability of a normal beyond is 1.6e-8.

    ``extra > 0`` also returns a new tensor of ``extra`` further draws (from the same batch of
    uniforms, which saves a second round of calls); else None.
    """
    n = out.numel()
    h1, h2 = (n + 1) // 2, (extra + 1) // 2
    h = h1 + h2
    f = _unit(bg, 2 * h, out.dtype)
    np.subtract(f.dtype.type(2.0), f[:h], out=f[:h])  # 2 - [1, 2) = (0, 1]
    u = torch.from_numpy(f)
    r, theta = u[:h], u[h:]
    info = torch.finfo(out.dtype)
    if info.tiny * 1e6 < 2.0 * sigma * sigma < info.max / 64:
        r.log_().mul_(-2.0 * sigma * sigma).sqrt_()
    else:  # sigma^2 would overflow or underflow in the buffer's dtype: scale after the root
        r.log_().mul_(-2.0).sqrt_().mul_(sigma)
    theta.mul_(_TWO_PI)  # 2 pi [1, 2): cos and sin are 2 pi-periodic
    pool = torch.empty(extra, dtype=out.dtype) if extra else None
    for dst, lo, hh, m in ((out, 0, h1, n), (pool, h1, h2, extra)):
        if dst is None:
            continue
        torch.cos(theta[lo: lo + hh], out=dst[:hh])
        dst[:hh].mul_(r[lo: lo + hh])
        if m > hh:
            torch.sin(theta[lo: lo + m - hh], out=dst[hh:])
            dst[hh:].mul_(r[lo: lo + m - hh])
    return pool


def _fill_cpu(buf: Tensor, kind: str, a: float, bg: np.random.SFC64) -> None:
    """Fill the 1-d contiguous fp32/fp64 CPU tensor ``buf`` from one stream."""
    if kind == "uniform":
        # a * (2 (f - 1.5) + 2^-m): a symmetric grid on (-a, a), m = mantissa bits
        f = torch.from_numpy(_unit(bg, buf.numel(), buf.dtype))
        half_step = 2.0 ** (-53 if buf.dtype == torch.float64 else -24)
        torch.sub(f, 1.5, out=buf)
        if 2.0 * a < torch.finfo(buf.dtype).max:
            buf.add_(half_step).mul_(2.0 * a)
        else:  # 2a overflows the buffer's dtype; a is representable (checked by check_std)
            buf.add_(half_step).mul_(a).mul_(2.0)
        return
    if kind == "normal":
        _box_muller(buf, bg, a)
        return
    # truncated: each entry beyond 2 sigma (4.55% of them) takes the next in-range draw from a
    # pool sampled with the chunk (enough with overwhelming probability; else draw more).
    # Exact: the draws are independent, so every kept value is a truncated-normal draw.
    n = buf.numel()
    bound = 2.0 * a
    pool = _box_muller(buf, bg, a, extra=_pool_size(n))
    x = buf.numpy()
    idx = np.flatnonzero(np.greater(np.abs(x), bound))
    while idx.size:
        if pool is None:
            pool = torch.empty(idx.size + idx.size // 8 + 16, dtype=buf.dtype)
            _box_muller(pool, bg, a)
        v = pool.numpy()
        v = v[np.abs(v) <= bound]
        m = min(idx.size, v.size)
        x[idx[:m]] = v[:m]
        idx = idx[m:]
        pool = None


def _pool_size(n: int) -> int:
    """Spare draws for a chunk of ``n``: mean need 0.0455 n, supply 0.9545 * (n / 20 + ...)."""
    return n // 20 + 4 * math.isqrt(n) + 16


_pool: ThreadPoolExecutor | None = None
_pool_key: tuple[int, int] = (0, 0)
_pool_lock = threading.Lock()


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_key
    key = (os.getpid(), workers)  # a forked child must not reuse the parent's (absent) threads
    with _pool_lock:
        if _pool is None or _pool_key != key:
            if _pool is not None and _pool_key[0] == os.getpid():
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="initlab-sample")
            _pool_key = key
        return _pool


def _fill_chunks(flat: Tensor, kind: str, a: float, base: int, work: torch.dtype) -> None:
    """Fill the 1-d contiguous CPU tensor ``flat``: chunk ``i`` from stream ``(base, i)``,
    chunks spread over ``torch.get_num_threads()`` threads (the result does not depend on it)."""
    n = flat.numel()
    nchunks = -(-n // CHUNK)

    def run(lo: int, hi: int) -> None:
        scratch = None if flat.dtype == work else torch.empty(min(CHUNK, n), dtype=work)
        for i in range(lo, hi):
            s, e = i * CHUNK, min(n, (i + 1) * CHUNK)
            dst = flat[s:e]
            buf = dst if scratch is None else scratch[: e - s]
            _fill_cpu(buf, kind, a, _stream(base, i))
            if scratch is not None:
                dst.copy_(buf)

    threads = torch.get_num_threads()
    workers = max(1, min(threads, nchunks))
    if workers == 1 or threading.current_thread().name.startswith("initlab-sample"):
        run(0, nchunks)
        return

    def worker(lo: int, hi: int) -> None:
        # one intra-op thread per worker: the parallelism is across chunks (torch's OpenMP
        # thread count is per calling thread; restore the process-wide default afterwards)
        torch.set_num_threads(1)
        try:
            run(lo, hi)
        finally:
            torch.set_num_threads(threads)

    bounds = [nchunks * w // workers for w in range(workers + 1)]
    pool = _executor(threads)
    futures = [pool.submit(worker, bounds[w], bounds[w + 1]) for w in range(workers)]
    try:
        for f in futures:
            f.result()
    finally:
        # never return (even on Ctrl-C) while a worker still writes into the tensor
        for f in futures:
            f.cancel()
        wait(futures)


@torch.no_grad()
def _sample_(tensor: Tensor, kind: str, a: float, generator: torch.Generator | None) -> Tensor:
    """Fill ``tensor`` in place from the distribution ``kind`` with parameter ``a``."""
    if tensor.is_meta or tensor.numel() == 0:
        return tensor
    t = tensor.detach()
    work = torch.float64 if t.dtype == torch.float64 else torch.float32
    if t.device.type != "cpu":
        if t.dtype == work and t.is_contiguous():
            _fill_torch(t, kind, a, generator)
        else:
            buf = _scratch(t, work)
            _fill_torch(buf, kind, a, generator)
            t.copy_(buf)
        return tensor
    buf = None if t.is_contiguous() else _scratch(t, work)  # allocated before anything is drawn or written
    hi, lo = torch.randint(0, 1 << 32, (2,), generator=generator).tolist()
    base = (hi << 32) | lo
    if buf is None:
        _fill_chunks(t.view(-1), kind, a, base, work)
    else:
        _fill_chunks(buf.view(-1), kind, a, base, work)
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


def _scratch(t: Tensor, work: torch.dtype) -> Tensor:
    """A contiguous ``work``-dtype tensor of ``t``'s shape; a clear error when memory runs out."""
    try:
        return torch.empty(t.shape, dtype=work, device=t.device)
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
    Keras' ``VarianceScaling``). Exact rejection sampling. Returns ``tensor``.
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
        generator: a CPU ``torch.Generator`` for a CPU tensor (one draw of it seeds all the
            per-chunk streams); results do not depend on the number of threads.

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
    n = fan_for(mode, f[0], f[1])
    if n <= 0 or not math.isfinite(n):
        if tensor.numel() == 0:
            return None, distribution, gen
        raise InitlabError(f"{mode} is {n:g} for fans {tuple(f)!r} (shape {tuple(tensor.shape)}); "
                           f"cannot scale the variance by 1/{n:g}")
    if tensor.numel() == 0:
        return None, distribution, gen
    std = math.sqrt(scale / n)
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
