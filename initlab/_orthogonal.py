"""Orthogonal and identity weights: Haar-random (semi-)orthogonal matrices (Saxe et al. 2014;
Mezzadri 2007), their delta-orthogonal convolution form (Xiao et al. 2018), and the identity map.

Tensor samplers beside :mod:`initlab._engine`'s variance scaling; the scheme registry
(:mod:`initlab._schemes`) names them, and LSUV starts from :func:`orthogonal_`.
"""
from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait

import torch
from torch import Tensor

from ._engine import _check_generator, _check_tensor, _sample_, check_gain, thread_pool
from ._errors import InitlabError, is_out_of_memory, memory_error

__all__ = ["orthogonal_", "orthogonal_many_", "delta_orthogonal_", "identity_"]


def _check_gain_fits(tensor: Tensor, gain: float, what: str) -> None:
    """The matrix entries are at most ``gain`` in size: ``gain`` must be finite in the tensor's dtype."""
    info = torch.finfo(tensor.dtype)
    if gain >= info.max:
        raise InitlabError(f"{what}: gain {gain:g} is too large for {str(tensor.dtype).replace('torch.', '')} "
                           f"(largest number {info.max:.4g}): the weights would be inf")


def _haar_checked(rows: int, cols: int, dtype: torch.dtype, device: torch.device,
                  generator: torch.Generator | None, what: str) -> Tensor:
    """:func:`_haar`, with a clear error when the Gaussian matrix or its QR does not fit in memory."""
    try:
        return _haar(rows, cols, dtype, device, generator)
    except (RuntimeError, MemoryError) as e:
        if is_out_of_memory(e):
            n, m = max(rows, cols), min(rows, cols)
            nbytes = 3 * n * m * torch.empty((), dtype=dtype, device="meta").element_size()
            raise memory_error(f"{what}'s QR decomposition of a {n}x{m} {str(dtype).replace('torch.', '')} matrix",
                               nbytes, e) from e
        raise


def _gaussian_checked(rows: int, cols: int, dtype: torch.dtype, device: torch.device,
                      generator: torch.Generator | None) -> Tensor:
    try:
        return _gaussian(rows, cols, dtype, device, generator)
    except (RuntimeError, MemoryError) as e:
        if is_out_of_memory(e):
            nbytes = 3 * rows * cols * torch.empty((), dtype=dtype, device="meta").element_size()
            raise memory_error(f"orthogonal_'s Gaussian {max(rows, cols)}x{min(rows, cols)} matrix", nbytes, e) from e
        raise


def _matrix_shape(tensor: Tensor, what: str) -> tuple[int, int]:
    if tensor.dim() < 2:
        raise InitlabError(f"{what} needs a tensor with at least 2 dimensions, got shape {tuple(tensor.shape)}; "
                           "initialise biases with zeros or a constant")
    rows = tensor.shape[0]
    return rows, (tensor.numel() // rows if rows else 0)


def _gaussian(rows: int, cols: int, dtype: torch.dtype, device: torch.device,
              generator: torch.Generator | None) -> Tensor:
    """The (max, min) standard Gaussian matrix whose QR gives :func:`_haar`'s matrix."""
    a = torch.empty((max(rows, cols), min(rows, cols)), dtype=dtype, device=device)
    _sample_(a, "normal", 1.0, generator)
    return a


def _signed_q(a: Tensor, rows: int, cols: int) -> Tensor:
    """Q of ``a = QR`` with diag(R) made positive (Mezzadri 2007), as a (rows, cols) matrix."""
    q, r = torch.linalg.qr(a)
    d = torch.sign(torch.diagonal(r))
    d = torch.where(d == 0, torch.ones_like(d), d)
    q = q * d  # sign correction: without it the QR's convention biases the distribution
    return q.T if rows < cols else q


def _haar(rows: int, cols: int, dtype: torch.dtype, device: torch.device,
          generator: torch.Generator | None) -> Tensor:
    """A (rows, cols) matrix with orthonormal rows or columns, Haar-distributed (Mezzadri 2007)."""
    a = _gaussian(rows, cols, dtype, device, generator)
    threads = torch.get_num_threads()
    if device.type == "cpu" and threads > 1:
        # LAPACK's blocked QR sums in a thread-dependent order: run it on one thread so that the
        # same generator gives the same bits whatever torch.get_num_threads() is. It runs in a
        # worker thread: the caller's thread count never changes (switching it around a long
        # one-thread call left small ops slow for seconds afterwards on a busy machine)
        return _parallel_qs([(a, rows, cols)], threads)[0]
    return _signed_q(a, rows, cols)


@torch.no_grad()
def orthogonal_(tensor: Tensor, gain: float = 1.0, *, generator: torch.Generator | None = None) -> Tensor:
    """Saxe et al. (2014): a Haar-random (semi-)orthogonal matrix times ``gain``, the tensor
    viewed as (shape[0], prod(shape[1:])). QR of a Gaussian matrix with the sign of diag(R)
    corrected (Mezzadri 2007); computed in fp32 (fp64 for fp64 tensors), then copied. On CPU the
    QR runs on one thread (in a worker thread; the caller's thread count is left alone), so results
    are bit-identical for any ``torch.get_num_threads()``.
    Realised variance gain^2 / max(rows, cols)."""
    _check_tensor(tensor, "orthogonal_")
    g = check_gain(gain)
    gen = _check_generator(generator, tensor)
    rows, cols = _matrix_shape(tensor, "orthogonal_")
    _check_gain_fits(tensor, g, "orthogonal_")
    if tensor.is_meta or tensor.numel() == 0:
        return tensor
    work = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    q = _haar_checked(rows, cols, work, tensor.device, gen, "orthogonal_")
    tensor.copy_((q * g).reshape(tensor.shape))
    return tensor


def _qr_executor(workers: int) -> ThreadPoolExecutor:
    return thread_pool("initlab-qr", workers)


def _one_thread_q(a: Tensor, rows: int, cols: int, threads: int) -> Tensor:
    # this worker's OpenMP and MKL on one thread (per-thread settings); the process-wide default
    # that new threads start from is put back afterwards. get_num_threads first: torch sets a
    # thread's count from that default at the thread's first parallel op, which would otherwise
    # undo the 1 when another worker has just put the default back
    torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _signed_q(a, rows, cols)
    finally:
        torch.set_num_threads(threads)


def _parallel_qs(jobs: list[tuple[Tensor, int, int]], threads: int) -> list[Tensor]:
    """Each job's :func:`_signed_q`, every QR on one thread (so bit-identical to the sequential
    one-thread QR), the jobs spread over ``threads`` worker threads, largest first."""
    order = sorted(range(len(jobs)), key=lambda i: -jobs[i][0].shape[0] * jobs[i][0].shape[1] ** 2)
    pool = _qr_executor(threads)
    futures = {i: pool.submit(_one_thread_q, *jobs[i], threads) for i in order}
    try:
        return [futures[i].result() for i in range(len(jobs))]
    finally:
        for f in futures.values():  # never return (even on Ctrl-C) while a worker still runs
            f.cancel()
        wait(list(futures.values()))


@torch.no_grad()
def orthogonal_many_(tensors: Sequence[Tensor], gain: float = 1.0, *,
                     generator: torch.Generator | None = None) -> list[Tensor]:
    """:func:`orthogonal_` on each tensor in turn, bit-identical to calling it on each in order
    with the same generator, but faster on CPU with several threads: the Gaussian matrices are
    drawn first (in order, from the generator), then their QR decompositions run in parallel,
    each on one thread (LAPACK's result then does not depend on ``torch.get_num_threads()``).
    Realised variance gain^2 / max(rows, cols) for each tensor."""
    tensors = list(tensors)
    g = check_gain(gain)
    todo = []
    for t in tensors:
        _check_tensor(t, "orthogonal_")
        gen = _check_generator(generator, t)
        rows, cols = _matrix_shape(t, "orthogonal_")
        _check_gain_fits(t, g, "orthogonal_")
        if not (t.is_meta or t.numel() == 0):
            todo.append((t, rows, cols, gen))
    threads = torch.get_num_threads()
    cpu = [k for k, (t, *_rest) in enumerate(todo) if t.device.type == "cpu"]
    if threads == 1 or len(cpu) < 2:
        for t, _, _, gen in todo:
            orthogonal_(t, gain, generator=gen)
        return tensors
    work = {k: torch.float64 if t.dtype == torch.float64 else torch.float32 for k, (t, *_rest) in enumerate(todo)}
    drawn = {}
    for k, (t, rows, cols, gen) in enumerate(todo):  # draw in order: the generator's stream as for orthogonal_
        if k in cpu:
            drawn[k] = _gaussian_checked(rows, cols, work[k], t.device, gen)
        else:
            orthogonal_(t, gain, generator=gen)
    try:
        qs = _parallel_qs([(drawn[k], todo[k][1], todo[k][2]) for k in cpu], threads)
    except (RuntimeError, MemoryError) as e:
        if is_out_of_memory(e):
            nbytes = sum(3 * a.numel() * a.element_size() for a in drawn.values())
            raise memory_error("orthogonal_'s QR decompositions", nbytes, e) from e
        raise
    for k, q in zip(cpu, qs):
        t = todo[k][0]
        t.copy_((q * g).reshape(t.shape))
    return tensors


@torch.no_grad()
def delta_orthogonal_(tensor: Tensor, gain: float = 1.0, *, generator: torch.Generator | None = None) -> Tensor:
    """Xiao et al. (2018): zeros everywhere except the kernel centre (index k // 2 on every
    spatial axis), which holds a Haar (semi-)orthogonal (out, in) matrix times ``gain``.
    The convolution is then a norm-preserving map for out >= in (dynamical isometry).
    Realised variance gain^2 / max(fan_in, fan_out) (shape-based fans). A 2-d tensor gets
    a plain orthogonal matrix."""
    _check_tensor(tensor, "delta_orthogonal_")
    g = check_gain(gain)
    gen = _check_generator(generator, tensor)
    _matrix_shape(tensor, "delta_orthogonal_")
    _check_gain_fits(tensor, g, "delta_orthogonal_")
    if tensor.is_meta or tensor.numel() == 0:
        return tensor
    if tensor.dim() == 2:
        return orthogonal_(tensor, gain, generator=generator)
    work = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    q = _haar_checked(tensor.shape[0], tensor.shape[1], work, tensor.device, gen, "delta_orthogonal_")
    tensor.zero_()
    centre = tuple(k // 2 for k in tensor.shape[2:])
    tensor[(slice(None), slice(None), *centre)] = (q * g).to(tensor.dtype)
    return tensor


@torch.no_grad()
def identity_(tensor: Tensor, gain: float = 1.0, *, groups: int = 1) -> Tensor:
    """The identity map: ``eye`` for (out, in) matrices, a Dirac delta at the kernel centre for
    convolutions (``torch.nn.init.dirac_``, any number of spatial dims, ``groups``), times ``gain``."""
    _check_tensor(tensor, "identity_")
    g = check_gain(gain)
    if tensor.dim() < 2:
        raise InitlabError(f"identity_ needs a tensor with at least 2 dimensions, got shape {tuple(tensor.shape)}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or tensor.shape[0] % groups:
        raise InitlabError(f"groups must be a positive int dividing out_channels={tensor.shape[0]}, got {groups!r}")
    _check_gain_fits(tensor, g, "identity_")
    if tensor.is_meta:
        return tensor
    tensor.zero_()
    out_pg = tensor.shape[0] // groups
    m = min(out_pg, tensor.shape[1])
    idx = torch.arange(m, device=tensor.device)
    centre = tuple(k // 2 for k in tensor.shape[2:])
    for k in range(groups):
        tensor[(idx + k * out_pg, idx, *centre)] = g
    return tensor
