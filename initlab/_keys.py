"""Which random stream a tensor is sampled from, and which of its elements a process holds.

Every element the CPU sampler writes is a function of ``(base, name, global index)``
(:mod:`initlab._philox`):

* under :func:`keyed` (``init_model`` opens it around its writes) ``base`` is one draw from the
  caller's generator per call and ``name`` the parameter's fully qualified name; the global index
  is the element's position in the parameter's row-major order, also when a scheme fills a view
  of it (MultiheadAttention's in_proj blocks) or the parameter is a DTensor whose local shard
  holds only some of its elements (a DTensor's in_proj blocks are views of its local shard,
  :func:`row_blocks`, no redistribution). So values do not depend on the order of the writes, on which
  other layers exist (a pipeline stage builds only its own) or on the process and its mesh;
* a tensor that is not a parameter of the model (a scratch tensor a scheme samples into) is
  keyed by the number of such tensors sampled so far in the call;
* outside :func:`keyed` (``variance_scaling_(t, generator=g)`` on its own) ``base`` is one draw
  from ``g`` and ``name`` is empty.

DTensors (``torch.distributed.tensor``): the local shard's global indices follow from the
global shape, the device mesh and the placements (``Shard(d)`` splits dimension ``d`` like
``torch.chunk``, the last shards possibly shorter or empty; ``Replicate`` keeps it whole), so a
shard is filled with no communication. ``Partial`` and ``_StridedShard`` placements are refused.
"""
from __future__ import annotations

import contextlib
import contextvars
import sys
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from ._errors import InitlabError

__all__ = ["keyed", "resolve", "is_dtensor", "local", "call_base", "Target", "shard_runs", "row_blocks", "is_shard_block"]


_DTENSOR: list[type] = []  # DTensor, once torch.distributed.tensor is imported


def _dtensor_type() -> type | None:
    if _DTENSOR:
        return _DTENSOR[0]
    mod = sys.modules.get("torch.distributed.tensor")  # no DTensor can exist before it is imported
    cls = getattr(mod, "DTensor", None) if mod is not None else None
    if cls is not None:
        _DTENSOR.append(cls)
    return cls


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: Tensor) -> Tensor:
    """The tensor this process holds: a DTensor's local shard, else ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def call_base(generator: torch.Generator | None) -> int:
    """One 64-bit draw from ``generator`` (torch's default generator when None)."""
    dev = generator.device if generator is not None else "cpu"
    hi, lo = torch.randint(0, 1 << 32, (2,), generator=generator, device=dev).tolist()
    return (int(hi) << 32) | int(lo)


@dataclass
class _Context:
    base: int
    params: dict[int, tuple[str, Tensor]]  # storage address of the local data -> (name, parameter)
    temps: int = 0


@dataclass
class Target:
    """What the sampler writes: ``local`` (a plain tensor), its stream ``(base, name)`` and the
    global indices of its elements in row-major order, as runs ``starts[k] .. starts[k] + lens[k] - 1``."""

    local: Tensor
    base: int
    name: str
    starts: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64))
    lens: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64))


_PLAIN = (Tensor, nn.Parameter)  # not an UninitializedParameter (its isinstance check costs ~0.4 us)
_SHARD_BLOCKS: weakref.WeakValueDictionary[int, Tensor] = weakref.WeakValueDictionary()  # row_blocks' views
_current: contextvars.ContextVar[_Context | None] = contextvars.ContextVar("initlab_keys", default=None)


def _address(t: Tensor) -> int | None:
    if type(t) not in _PLAIN and isinstance(t, nn.parameter.UninitializedParameter) or t.is_meta or t.numel() == 0:
        return None
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, ValueError):
        return None


@contextlib.contextmanager
def keyed(model: nn.Module, generator: torch.Generator | None, *,
          modules: Sequence[tuple[str, nn.Module]] | None = None) -> Iterator[int]:
    """Key every tensor sampled inside by ``(one draw of generator, parameter name, index)``;
    yields the draw. ``modules``: ``model.named_modules(remove_duplicate=False)``, when the caller
    has it (the parameters are then read from it, as ``model.named_parameters()`` names them)."""
    params: dict[int, tuple[str, Tensor]] = {}
    dt = _dtensor_type()
    for name, p in named_parameters(model, modules):
        addr = _address(p.to_local() if dt is not None and isinstance(p, dt) else p)
        if addr is not None:
            params.setdefault(addr, (name, p))
    ctx = _Context(call_base(generator), params)
    token = _current.set(ctx)
    try:
        with _sharding_hooks_off(model, None if modules is None else [m for _, m in modules]):
            yield ctx.base
    finally:
        _current.reset(token)


def named_parameters(model: nn.Module, modules: Sequence[tuple[str, nn.Module]] | None = None
                     ) -> Iterator[tuple[str, Tensor]]:
    """``model.named_parameters()``, read from ``modules`` (``model.named_modules(remove_duplicate=False)``)
    when given: each parameter once, under the name of its first holder, in the same order."""
    if modules is None or type(model).named_parameters is not nn.Module.named_parameters:
        yield from model.named_parameters()
        return
    seen: set[int] = set()
    for mname, m in modules:
        for pname, p in m._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            yield (f"{mname}.{pname}" if mname else pname), p


@contextlib.contextmanager
def _sharding_hooks_off(model: nn.Module, modules: Iterable[nn.Module] | None = None) -> Iterator[None]:
    """FSDP2 modules' forward hooks set aside while ``init_model`` traces the model with
    ``torch.fx`` (tracing calls each block's hooks: an all-gather, and a block that then believes
    it is the root, so the model's first real forward fails). ``modules``: ``model.modules()``,
    when the caller has them."""
    saved = []
    for m in model.modules() if modules is None else modules:
        if (m._forward_pre_hooks or m._forward_hooks) and hasattr(m, "_get_fsdp_state"):
            saved.append((m, m._forward_pre_hooks, m._forward_hooks))
            m._forward_pre_hooks, m._forward_hooks = type(m._forward_pre_hooks)(), type(m._forward_hooks)()
    try:
        yield
    finally:
        for m, pre, post in saved:
            m._forward_pre_hooks, m._forward_hooks = pre, post


def _merge(starts: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs with the adjacent ones joined (row after row of a row shard is one run)."""
    keep = lens > 0
    starts, lens = starts[keep], lens[keep]
    if starts.size <= 1:
        return starts, lens
    new = np.ones(starts.size, dtype=bool)
    new[1:] = starts[1:] != starts[:-1] + lens[:-1]
    first = np.flatnonzero(new)
    ends = np.add.reduceat(lens, first)
    return starts[first], ends


def _runs(offsets: list[np.ndarray], base: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Runs of global indices ``base + sum_d offsets[d][i_d]`` over the local elements in
    row-major order (``offsets[d]``: dimension d's contribution for each local index). Built from
    the last dimension outwards, a dimension that continues the runs inside it (a contiguous
    block) joins them, so the cost is about one entry per run, not one per row."""
    if not offsets:
        return np.array([base], dtype=np.int64), np.ones(1, dtype=np.int64)
    if any(o.size == 0 for o in offsets):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    last = offsets[-1]
    cut = np.flatnonzero(np.diff(last) != 1) + 1
    starts = last[np.concatenate(([0], cut))].astype(np.int64)
    lens = np.diff(np.concatenate(([0], cut, [last.size]))).astype(np.int64)
    for o in reversed(offsets[:-1]):
        if o.size == 1:
            starts = starts + o[0]
            continue
        if starts.size == 1 and np.all(np.diff(o) == lens[0]):  # the rows follow each other
            starts, lens = starts + o[0], lens * o.size
            continue
        starts = (o[:, None] + starts[None, :]).ravel()
        lens = np.tile(lens, o.size)
    starts = starts + base
    return _merge(starts, lens)


def _row_major_strides(shape: tuple[int, ...]) -> list[int]:
    out, acc = [], 1
    for s in reversed(shape):
        out.append(acc)
        acc *= s
    return out[::-1]


def shard_indices(shape: tuple[int, ...], mesh: object, placements: tuple[object, ...]) -> list[np.ndarray]:
    """For each dimension of a DTensor of global ``shape``, the global indices this process holds."""
    idx = [np.arange(s, dtype=np.int64) for s in shape]
    coord = mesh.get_coordinate()  # type: ignore[attr-defined]
    if coord is None:  # this rank is not in the mesh: it holds nothing
        return [np.zeros(0, dtype=np.int64) for _ in shape]
    for mdim, p in enumerate(placements):
        if p.is_partial():  # type: ignore[attr-defined]
            raise InitlabError(f"cannot initialise a DTensor with a Partial placement ({p}); "
                               "use Shard or Replicate")
        if not p.is_shard():  # type: ignore[attr-defined]
            continue
        if type(p).__name__ != "Shard":
            raise InitlabError(f"cannot initialise a DTensor with placement {p!r} (mesh dim {mdim}); "
                               "supported: Shard(d) and Replicate")
        d, n, c = p.dim, mesh.size(mdim), coord[mdim]  # type: ignore[attr-defined]
        size = idx[d].size
        per = -(-size // n) if size else 0  # torch.chunk: ceil(size / n) each, the last ones short
        idx[d] = idx[d][min(size, c * per): min(size, (c + 1) * per)]
    return idx


def shard_runs(t: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Runs of the global row-major indices of a DTensor's local elements."""
    shape = tuple(t.shape)
    idx = shard_indices(shape, t.device_mesh, tuple(t.placements))  # type: ignore[attr-defined]
    strides = _row_major_strides(shape)
    return _runs([i * s for i, s in zip(idx, strides)])


def row_blocks(t: Tensor, blocks: int) -> tuple[Tensor, ...]:
    """``t`` cut into ``blocks`` row blocks like ``t.chunk(blocks, 0)`` (MultiheadAttention's
    fused in_proj: q, k, v). For a DTensor, each block is the plain view of the local shard that
    holds the block's rows (empty where the shard holds none of them): no redistribution and no
    collective, and :func:`resolve` maps a view's elements back to their global indices."""
    if not is_dtensor(t):
        return tuple(t.chunk(blocks, 0))
    loc = t.to_local()
    rows = shard_indices(tuple(t.shape), t.device_mesh, tuple(t.placements))[0]  # type: ignore[attr-defined]
    n = t.shape[0]
    per = -(-n // blocks) if n else 0  # torch.chunk's block size
    cuts = np.searchsorted(rows, [min(n, b * per) for b in range(blocks + 1)])  # rows: ascending, contiguous
    out = tuple(loc[int(cuts[b]): int(cuts[b + 1])] for b in range(blocks) if b * per < n or n == 0)
    _SHARD_BLOCKS.update((id(b), b) for b in out)
    return out


def is_shard_block(t: object) -> bool:
    """Whether ``t`` is a block :func:`row_blocks` cut from a DTensor's local shard."""
    return isinstance(t, Tensor) and _SHARD_BLOCKS.get(id(t)) is t


def _local_view_runs(t: Tensor, p: Tensor) -> tuple[np.ndarray, np.ndarray] | None:
    """Runs of the global indices of ``t``'s elements when ``t`` is a sub-block view (same
    dimensions, unit steps) of the DTensor ``p``'s contiguous local shard; else None."""
    loc = p.to_local()
    if not loc.is_contiguous() or t.dim() != loc.dim():
        return None
    lstr = _row_major_strides(tuple(loc.shape))
    if any(n > 1 and st != ls for n, st, ls in zip(t.shape, t.stride(), lstr)):
        return None
    off = t.storage_offset() - loc.storage_offset()
    begin = []
    for ls in lstr:
        b, off = divmod(off, ls)
        begin.append(b)
    if off or any(b + n > s for b, n, s in zip(begin, t.shape, loc.shape)):
        return None
    gshape = tuple(p.shape)
    idx = shard_indices(gshape, p.device_mesh, tuple(p.placements))  # type: ignore[attr-defined]
    return _runs([i[b: b + n] * st for i, b, n, st in zip(idx, begin, t.shape, _row_major_strides(gshape))])


def _view_runs(t: Tensor, p: Tensor) -> tuple[np.ndarray, np.ndarray] | None:
    """Runs of ``t``'s elements in ``p``'s row-major order when ``t`` views the contiguous ``p``."""
    if not p.is_contiguous():
        return None
    if t is p or (t.shape == p.shape and t.stride() == p.stride() and t.storage_offset() == p.storage_offset()):
        return _whole(t)  # the parameter itself (or p.detach(), p.data): all of it, in order, one run
    offs = [np.arange(s, dtype=np.int64) * st for s, st in zip(t.shape, t.stride())]
    return _runs(offs, t.storage_offset() - p.storage_offset())


def _whole(t: Tensor) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(1, dtype=np.int64), np.array([t.numel()], dtype=np.int64)


def resolve(tensor: Tensor, generator: torch.Generator | None) -> Target:
    """The :class:`Target` the sampler fills for ``tensor`` (a plain tensor or a DTensor)."""
    dt = is_dtensor(tensor)
    loc = tensor.to_local() if dt else tensor
    ctx = _current.get()
    if ctx is None:
        starts, lens = shard_runs(tensor) if dt else _whole(loc)
        return Target(loc, call_base(generator), "", starts, lens)
    hit = ctx.params.get(_address(loc) or -1)
    if hit is not None:
        name, p = hit
        if dt and is_dtensor(p) and tuple(p.shape) == tuple(tensor.shape):
            return Target(loc, ctx.base, name, *shard_runs(tensor))
        if not dt and is_dtensor(p):  # a block of the local shard (row_blocks)
            runs = _local_view_runs(loc, p)
            if runs is None:
                raise InitlabError(f"cannot sample a {tuple(loc.shape)} view (strides {tuple(loc.stride())}) of the "
                                   f"local shard of DTensor parameter {name!r}: only its row blocks map to global "
                                   "indices; sample the DTensor itself")
            return Target(loc, ctx.base, name, *runs)
        if not dt and not is_dtensor(p):
            runs = _view_runs(loc, p)
            if runs is not None:
                return Target(loc, ctx.base, name, *runs)
            return Target(loc, ctx.base, f"{name}@{loc.storage_offset()}", *_whole(loc))
    ctx.temps += 1
    starts, lens = shard_runs(tensor) if dt else _whole(loc)
    return Target(loc, ctx.base, f"#{ctx.temps}", starts, lens)
