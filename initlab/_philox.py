"""Counter-based random bits: Philox4x64-10 (Salmon, Moraes, Dror & Shaw 2011, "Parallel random
numbers: as easy as 1, 2, 3"), the generator of JAX, TensorFlow and torch's CUDA sampler.

Word ``q`` of a stream (a 64-bit unsigned integer) is lane ``q % 4`` of Philox4x64-10 applied to
the counter ``(q // 4, 0, 0, 0)`` under the stream's 128-bit key. Any word is computed on its own,
in any order, so a shard of a tensor costs only its own words. Two implementations give the same
bits: numpy's ``np.random.Philox`` (C, sequential) for long runs of consecutive words, and a
vectorised numpy version of the same rounds for scattered words (short runs, redraws).

A stream's key is BLAKE2b (RFC 7693) of (a 64-bit base, an attempt number, a name): the base is one
draw from the caller's generator, the name a parameter's fully qualified name.
"""
from __future__ import annotations

import hashlib
import struct
import threading

import numpy as np

__all__ = ["stream_key", "words", "gather"]

_M0, _M1 = np.uint64(0xD2E7470EE14C6C93), np.uint64(0xCA5A826395121157)
_W0, _W1 = 0x9E3779B97F4A7C15, 0xBB67AE8584CAA73B
_ROUNDS = 10
_MASK64 = (1 << 64) - 1
_LO32 = np.uint64(0xFFFFFFFF)
_S32 = np.uint64(32)
_tls = threading.local()
_HASHER = hashlib.blake2b(digest_size=16, person=b"initlab-philox")
_HEAD, _KEY = struct.Struct("<QI"), struct.Struct("<QQ")  # (base, attempt) in; the key's two words out


def stream_key(base: int, name: str, attempt: int = 0) -> tuple[int, int]:
    """The 128-bit Philox key of stream ``(base, name, attempt)`` as two 64-bit words."""
    # one message into a copy of the personalised hasher: the digest of three updates, in a third of the time
    h = _HASHER.copy()
    h.update(_HEAD.pack(base & _MASK64, int(attempt)) + name.encode("utf-8", "surrogatepass"))
    return _KEY.unpack(h.digest())


def _bitgen() -> tuple[np.random.Philox, dict, np.ndarray, np.ndarray]:
    """This thread's Philox bit generator and the state dict it is set from (its counter and key
    arrays are overwritten in place: setting a state then builds no arrays)."""
    got = getattr(_tls, "philox", None)
    if got is None:
        ctr, key = np.zeros(4, dtype=np.uint64), np.zeros(2, dtype=np.uint64)
        state = {"bit_generator": "Philox", "state": {"counter": ctr, "key": key},
                 "buffer": np.zeros(4, dtype=np.uint64), "buffer_pos": 4, "has_uint32": 0, "uinteger": 0}
        got = _tls.philox = (np.random.Philox(0), state, ctr, key)
    return got


def words(key: tuple[int, int], start: int, count: int) -> np.ndarray:
    """Words ``start .. start + count - 1`` of the stream ``key`` (uint64), by numpy's Philox."""
    bg, state, ctr, k = _bitgen()
    block, skip = divmod(start, 4)
    # numpy's Philox increments its counter before each block: start from block - 1 (mod 2^256)
    if block:
        ctr[0] = block - 1
        ctr[1:] = 0
    else:
        ctr[:] = _MASK64
    k[0], k[1] = key
    bg.state = state  # copied into the generator (buffer empty: buffer_pos 4)
    if skip:
        bg.random_raw(skip, output=False)
    return bg.random_raw(count)


def _mulhilo(a: np.ndarray, m: np.uint64) -> tuple[np.ndarray, np.ndarray]:
    """(high, low) 64-bit halves of the 128-bit products ``a * m`` (32-bit limbs, no overflow)."""
    mh, ml = m >> _S32, m & _LO32
    ah, al = a >> _S32, a & _LO32
    t = al * ml
    u = ah * ml + (t >> _S32)
    v = al * mh + (u & _LO32)
    hi = ah * mh + (u >> _S32) + (v >> _S32)
    return hi, a * m


def blocks(key: tuple[int, int], counters: np.ndarray) -> np.ndarray:
    """Philox4x64-10 of the counters ``(c, 0, 0, 0)``: an array of shape ``(len(c), 4)``."""
    c = np.asarray(counters, dtype=np.uint64)
    x0, x1 = c.copy(), np.zeros_like(c)
    x2, x3 = np.zeros_like(c), np.zeros_like(c)
    k0, k1 = key
    with np.errstate(over="ignore"):
        for r in range(_ROUNDS):
            if r:
                k0, k1 = (k0 + _W0) & _MASK64, (k1 + _W1) & _MASK64
            hi0, lo0 = _mulhilo(x0, _M0)
            hi1, lo1 = _mulhilo(x2, _M1)
            x0, x1, x2, x3 = hi1 ^ x1 ^ np.uint64(k0), lo1, hi0 ^ x3 ^ np.uint64(k1), lo0
    return np.stack([x0, x1, x2, x3], axis=1)


def gather(key: tuple[int, int], positions: np.ndarray) -> np.ndarray:
    """Words at the given positions of the stream ``key`` (any order, repeats allowed)."""
    q = np.asarray(positions, dtype=np.uint64)
    if q.size == 0:
        return np.empty(0, dtype=np.uint64)
    out = blocks(key, q >> np.uint64(2))
    return out[np.arange(q.size), (q & np.uint64(3)).astype(np.intp)]
