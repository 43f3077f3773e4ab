"""``fingerprint(model)``: one digest of all parameter values, the same however they are sharded.

Each element contributes ``h(name, global index, value bits)`` (a SplitMix64-style mix of the
three, Steele, Lea & Flood 2014); a parameter's contributions are summed modulo 2^64, which does
not depend on which process holds which element. A DTensor's local shard sums its own elements
(a replicated copy counts once: only the process at coordinate 0 of each ``Replicate`` mesh
dimension adds it), and one all-reduce of 4 small integers per sharded parameter adds the
processes' sums. The digest is BLAKE2b over the parameters' names, shapes, dtypes and sums.
Every process of the default process group must call it when any parameter is a DTensor.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ._errors import InitlabError
from ._keys import is_dtensor, shard_runs

__all__ = ["fingerprint"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_C1, _C2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_CHUNK = 1 << 20


def _name_key(name: str) -> np.uint64:
    d = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=8, person=b"initlab-digest").digest()
    return np.uint64(int.from_bytes(d, "little"))


def _mix(z: np.ndarray) -> np.ndarray:
    z ^= z >> np.uint64(30)
    z *= _C1
    z ^= z >> np.uint64(27)
    z *= _C2
    z ^= z >> np.uint64(31)
    return z


def _value_bits(t: torch.Tensor) -> np.ndarray:
    """The raw bits of ``t``'s elements (row-major) as uint64."""
    c = t.detach().contiguous().reshape(-1)
    if c.dtype == torch.bool:
        c = c.to(torch.uint8)
    size = c.element_size()
    if size not in _BITS or c.is_complex():
        c = c.view(torch.uint8).reshape(-1, size)
        return np.frombuffer(hashlib.blake2b(c.numpy().tobytes()).digest(), dtype=np.uint64)
    raw = c.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]).numpy()
    return raw.view(_BITS[size]).astype(np.uint64)


def _sum(name: str, local: torch.Tensor, starts: np.ndarray, lens: np.ndarray) -> int:
    """Sum mod 2^64 of the element hashes of ``local``, whose global indices are the runs."""
    if local.numel() == 0:
        return 0
    bits = _value_bits(local.cpu())
    key = _name_key(name)
    total = np.uint64(0)
    ends = np.cumsum(lens)
    with np.errstate(over="ignore"):
        for lo in range(0, bits.size, _CHUNK):
            hi = min(bits.size, lo + _CHUNK)
            i, j = int(np.searchsorted(ends, lo, "right")), int(np.searchsorted(ends - lens, hi, "left"))
            b, e = (ends - lens)[i:j], ends[i:j]
            n = np.minimum(e, hi) - np.maximum(b, lo)
            s = starts[i:j] + np.maximum(lo - b, 0)
            idx = (np.repeat(s - np.concatenate(([0], np.cumsum(n)[:-1])), n) + np.arange(hi - lo)).astype(np.uint64)
            z = _mix(idx * _GOLDEN + key)
            z ^= bits[lo:hi] * _C2
            total += _mix(z + _GOLDEN).sum(dtype=np.uint64)
    return int(total)


def _counts_once(t: torch.Tensor) -> bool:
    """Whether this process adds its shard: it is in the mesh, at coordinate 0 of every mesh
    dimension the tensor is replicated over."""
    coord = t.device_mesh.get_coordinate()
    if coord is None:
        return False
    return all(c == 0 for c, p in zip(coord, t.placements) if not p.is_shard())


def fingerprint(model: nn.Module) -> str:
    """A hex digest of every parameter's values (and name, shape, dtype), equal for the same
    values on any mesh and placement and in a single process. Computed from local shards with
    one all-reduce of ``4 x (number of DTensor parameters)`` integers, no gather."""
    if not isinstance(model, nn.Module):
        raise InitlabError(f"fingerprint expects an nn.Module, got {type(model).__name__}")
    rows, sharded = [], []
    for name, p in model.named_parameters():
        if p.is_meta:
            raise InitlabError(f"parameter {name!r} is on the meta device: it has no values to fingerprint")
        if is_dtensor(p):
            loc = p.to_local()
            s = _sum(name, loc, *shard_runs(p)) if _counts_once(p) else 0
            sharded.append(len(rows))
        else:
            n = p.numel()
            s = _sum(name, p, np.zeros(1, dtype=np.int64), np.array([n], dtype=np.int64))
        rows.append([name, tuple(p.shape), str(p.dtype), s])
    if sharded:
        if not dist.is_available() or not dist.is_initialized():
            raise InitlabError("fingerprint: the model has DTensor parameters but torch.distributed is not initialised")
        limbs = torch.tensor([(rows[i][3] >> (16 * k)) & 0xFFFF for i in sharded for k in range(4)], dtype=torch.int64)
        dev = next(p for p in model.parameters() if is_dtensor(p)).device_mesh.device_type
        limbs = limbs.to(dev)
        dist.all_reduce(limbs)
        vals = limbs.cpu().view(-1, 4).tolist()
        for i, v in zip(sharded, vals):
            rows[i][3] = sum(int(x) << (16 * k) for k, x in enumerate(v)) & ((1 << 64) - 1)
    h = hashlib.blake2b(digest_size=16, person=b"initlab-fprint")
    for name, shape, dtype, s in rows:
        h.update(f"{name}|{shape}|{dtype}|{s:016x}\n".encode())
    return h.hexdigest()
