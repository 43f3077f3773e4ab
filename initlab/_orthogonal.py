"""Orthogonal and identity weights: Haar-random (semi-)orthogonal matrices (Saxe et al. 2014;
Mezzadri 2007), their delta-orthogonal convolution form (Xiao et al. 2018), and the identity map.

Tensor samplers beside :mod:`initlab._engine`'s variance scaling; the scheme registry
(:mod:`initlab._schemes`) names them, and LSUV starts from :func:`orthogonal_`.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from ._engine import SMALL, _check_generator, _check_tensor, _sample_, check_gain, thread_pool, using_threads
from ._errors import InitlabError, is_out_of_memory, memory_error

__all__ = ["orthogonal_", "orthogonal_many_", "delta_orthogonal_", "identity_"]


def _check_gain_fits(tensor: Tensor, gain: float, what: str) -> None:
    """The matrix entries are at most ``gain`` in size: ``gain`` must be finite in the tensor's dtype."""
    info = torch.finfo(tensor.dtype)
    if gain >= info.max:
        raise InitlabError(f"{what}: gain {gain:g} is too large for {str(tensor.dtype).replace('torch.', '')} "
                           f"(largest number {info.max:.4g}): the weights would be inf")


def _haar_checked(rows: int, cols: int, dtype: torch.dtype, device: torch.device,
                  generator: torch.Generator | None, what: str) -> tuple[Tensor, Tensor]:
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


# a QR of a (n, m) matrix, n >= m, with n m^2 at most this runs on the calling thread (784x100 and
# 256x256 do: about 1 and 2 ms on one core); a larger one runs in a worker thread (see _qr)
_INLINE = 1 << 24


def _cost(rows: int, cols: int) -> int:
    """A QR's work, in units of its flop count: n m^2 for a (n, m) matrix, n >= m."""
    return max(rows, cols) * min(rows, cols) ** 2


def _qr_signs(a: Tensor) -> tuple[Tensor, Tensor]:
    """Q of ``a = QR`` and D, the signs of diag(R) (0 taken as +1): Q D is the Q of the QR with
    diag(R) made positive (Mezzadri 2007); without D the QR's sign convention biases the law."""
    q, r = torch.linalg.qr(a)
    d = torch.sign(torch.diagonal(r))
    return q, torch.where(d == 0, torch.ones_like(d), d)


def _scaled(q: Tensor, d: Tensor, g: float, rows: int, cols: int, out: Tensor | None = None) -> Tensor:
    """The (rows, cols) matrix ``Q D g`` (its transpose when rows < cols), in one product, into
    ``out`` when given. The same bits as ``(Q * D) * g``: D is +-1, so ``D g`` is exact and
    ``q (+-g)`` rounds as ``+-(q g)``."""
    s = d * g
    if rows < cols:
        q, s = q.T, s[:, None]
    return q * s if out is None else torch.mul(q, s, out=out)


def _write(tensor: Tensor, q: Tensor, d: Tensor, g: float, rows: int, cols: int) -> None:
    """``tensor`` = Q D g, reshaped: written in place by the product itself when ``tensor`` is a
    contiguous tensor of Q's dtype, else computed in Q's dtype and copied (rounded once)."""
    # a small one on one intra-op thread: an elementwise op split over torch's threads would wake
    # the OpenMP team, which on a busy machine waits milliseconds for a time slice (same bits)
    with using_threads(1 if tensor.numel() < SMALL else torch.get_num_threads()):
        if tensor.dtype == q.dtype and tensor.is_contiguous():
            _scaled(q, d, g, rows, cols, out=tensor.view(rows, cols))
        else:
            tensor.copy_(_scaled(q, d, g, rows, cols).reshape(tensor.shape))


def _qr(a: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`_qr_signs` of ``a``; on the CPU with one intra-op thread whatever
    ``torch.get_num_threads()`` is (LAPACK's blocked QR sums in a thread-dependent order), so the
    same generator gives the same bits for any thread count."""
    threads = torch.get_num_threads()
    if a.device.type != "cpu" or threads == 1:
        return _qr_signs(a)
    if _cost(*a.shape) <= _INLINE:  # short: on this thread, switched to one intra-op thread and back
        with using_threads(1):
            return _qr_signs(a)
    # long: in a worker thread, so the caller's thread count never changes (switching it around a
    # long one-thread call left small ops slow for seconds afterwards on a busy machine)
    return _run_qrs([a], threads)[0]


def _haar(rows: int, cols: int, dtype: torch.dtype, device: torch.device,
          generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Q and D (:func:`_qr_signs`) of a (max, min) standard Gaussian matrix: ``Q D``, transposed
    when rows < cols (:func:`_scaled`), is a (rows, cols) matrix with orthonormal rows or columns,
    Haar-distributed (Mezzadri 2007)."""
    return _qr(_gaussian(rows, cols, dtype, device, generator))


@torch.no_grad()
def orthogonal_(tensor: Tensor, gain: float = 1.0, *, generator: torch.Generator | None = None) -> Tensor:
    """Saxe et al. (2014): a Haar-random (semi-)orthogonal matrix times ``gain``, the tensor
    viewed as (shape[0], prod(shape[1:])). QR of a Gaussian matrix with the sign of diag(R)
    corrected (Mezzadri 2007); computed in fp32 (fp64 for fp64 tensors), then written. On CPU the
    QR runs on one intra-op thread (a large one in a worker thread; the caller's thread count is
    left alone), so results are bit-identical for any ``torch.get_num_threads()``.
    Realised variance gain^2 / max(rows, cols)."""
    _check_tensor(tensor, "orthogonal_")
    g = check_gain(gain)
    gen = _check_generator(generator, tensor)
    rows, cols = _matrix_shape(tensor, "orthogonal_")
    _check_gain_fits(tensor, g, "orthogonal_")
    if tensor.is_meta or tensor.numel() == 0:
        return tensor
    _orthogonal_checked(tensor, rows, cols, gen, g)
    return tensor


def _orthogonal_checked(tensor: Tensor, rows: int, cols: int, gen: torch.Generator | None, g: float) -> None:
    """:func:`orthogonal_` of a tensor whose arguments are checked already."""
    work = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    q, d = _haar_checked(rows, cols, work, tensor.device, gen, "orthogonal_")
    _write(tensor, q, d, g, rows, cols)


def _qr_executor(workers: int) -> ThreadPoolExecutor:
    return thread_pool("initlab-qr", workers)


class _QRQueue:
    """QRs (:func:`_qr_signs`) of matrices handed in one by one (:meth:`put`), each on one
    intra-op thread (so bit-identical to the sequential one-thread QR). Worker threads (as many as
    there are QRs above :data:`_INLINE`, at most ``threads``) take the largest matrix waiting as
    soon as it is put, so the QRs overlap the drawing of the next matrices; :meth:`results` then
    runs the small QRs still waiting on the calling thread (switched to one intra-op thread once
    for all) and waits for those the workers took, not for the workers themselves: on a busy
    machine a worker woken too late finds nothing left and ends without touching any setting.
    Only small QRs: no worker at all (on a quiet machine a worker would save a few tenths of a
    millisecond on the study MLP; on a busy one its wake-up costs milliseconds). :meth:`stop`
    (always, in a ``finally``) returns only when no QR runs any more."""

    def __init__(self, costs: list[int], threads: int) -> None:
        self.costs, self.threads = costs, threads
        self.mats: list[Tensor | None] = [None] * len(costs)
        self.out: list[tuple[Tensor, Tensor] | None] = [None] * len(costs)
        self.waiting: list[int] = []
        self.left, self.running = len(costs), 0  # QRs not done; QRs under way
        self.closed = False
        self.error: BaseException | None = None
        self.cond = threading.Condition()
        big = sum(c > _INLINE for c in costs)
        self.workers = min(threads, big)  # still to start

    def put(self, i: int, a: Tensor) -> None:
        with self.cond:
            self.mats[i] = a
            self.waiting.append(i)
            self.cond.notify_all()
        if self.workers:  # one worker started per matrix put, up to their number: none idles before
            self.workers -= 1
            _qr_executor(self.threads).submit(self._work)

    def _take(self, largest: bool) -> int | None:
        """The largest matrix waiting (blocking until one is put or the queue is closed), or
        the smallest one if it is small (never blocking); None when there is none to take."""
        with self.cond:
            while largest and not self.waiting and not self.closed:
                self.cond.wait()
            if not self.waiting or self.error is not None:
                return None
            j = (max if largest else min)(range(len(self.waiting)), key=lambda j: self.costs[self.waiting[j]])
            if not largest and self.costs[self.waiting[j]] > _INLINE:
                return None
            self.running += 1
            return self.waiting.pop(j)

    def _run(self, i: int, worker: bool) -> None:
        a, self.mats[i] = self.mats[i], None
        error = None
        try:
            if worker:
                # this worker's OpenMP and MKL on one thread (per-thread settings); the process-wide
                # default that new threads start from is put back before the QR counts as done.
                # get_num_threads first: torch sets a thread's count from that default at the
                # thread's first parallel op, which would otherwise undo the 1 when another thread
                # has just put the default back
                torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    self.out[i] = _qr_signs(a)  # type: ignore[arg-type]
                finally:
                    torch.set_num_threads(self.threads)
            else:
                self.out[i] = _qr_signs(a)  # type: ignore[arg-type]
        except BaseException as e:
            error = e
            raise
        finally:
            with self.cond:
                self.running -= 1
                self.left -= 1
                if error is not None and self.error is None:
                    self.error = error
                self.cond.notify_all()

    def _work(self) -> None:
        while (i := self._take(True)) is not None:
            self._run(i, True)

    def results(self) -> list[tuple[Tensor, Tensor]]:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        i = self._take(False)
        if i is not None:
            with using_threads(1):
                while i is not None:
                    self._run(i, False)
                    i = self._take(False)
        with self.cond:
            while self.left and self.error is None:
                self.cond.wait()
            if self.error is not None:
                raise self.error
        return self.out  # type: ignore[return-value]

    def stop(self) -> None:
        with self.cond:  # on an error or Ctrl-C the workers take nothing more
            self.closed = True
            self.waiting.clear()
            self.cond.notify_all()
            while self.running:  # never return (even on Ctrl-C) while a QR still runs
                self.cond.wait()


def _run_qrs(mats: list[Tensor], threads: int) -> list[tuple[Tensor, Tensor]]:
    """Each matrix's :func:`_qr_signs`, on one intra-op thread each, spread as by :class:`_QRQueue`."""
    queue = _QRQueue([_cost(*a.shape) for a in mats], threads)
    try:
        for i, a in enumerate(mats):
            queue.put(i, a)
        return queue.results()
    finally:
        queue.stop()


@torch.no_grad()
def orthogonal_many_(tensors: Sequence[Tensor], gain: float = 1.0, *,
                     generator: torch.Generator | None = None) -> list[Tensor]:
    """:func:`orthogonal_` on each tensor in turn, bit-identical to calling it on each in order
    with the same generator, but faster on CPU with several threads: the Gaussian matrices are
    drawn in order from the generator, and each one's QR starts in a worker thread as soon as it
    is drawn, the small ones left over then on the calling thread (:class:`_QRQueue`); every QR
    runs on one intra-op thread, so LAPACK's result does not depend on ``torch.get_num_threads()``.
    Nothing is written until all QRs are done. Realised variance gain^2 / max(rows, cols) for each
    tensor."""
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
        for t, rows, cols, gen in todo:
            _orthogonal_checked(t, rows, cols, gen, g)
        return tensors
    slot = {k: i for i, k in enumerate(cpu)}
    queue = _QRQueue([_cost(*todo[k][1:3]) for k in cpu], threads)
    try:
        nbytes = 0
        for k, (t, rows, cols, gen) in enumerate(todo):  # in order: the generator's stream as for orthogonal_
            if k in slot:  # drawn here, its QR started at once
                work = torch.float64 if t.dtype == torch.float64 else torch.float32
                a = _gaussian_checked(rows, cols, work, t.device, gen)
                nbytes += 3 * a.numel() * a.element_size()
                queue.put(slot[k], a)
            else:
                _orthogonal_checked(t, rows, cols, gen, g)
        try:
            qs = queue.results()
        except (RuntimeError, MemoryError) as e:
            if is_out_of_memory(e):
                raise memory_error("orthogonal_'s QR decompositions", nbytes, e) from e
            raise
    finally:
        queue.stop()
    for k, (q, d) in zip(cpu, qs):
        t, rows, cols, _gen = todo[k]
        _write(t, q, d, g, rows, cols)
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
    rows, cols = tensor.shape[0], tensor.shape[1]
    q, d = _haar_checked(rows, cols, work, tensor.device, gen, "delta_orthogonal_")
    tensor.zero_()
    centre = tuple(k // 2 for k in tensor.shape[2:])
    tensor[(slice(None), slice(None), *centre)] = _scaled(q, d, g, rows, cols).to(tensor.dtype)
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
