"""Which initialisation scheme produced a tensor: its distribution family by a goodness-of-fit
test, then its std against the stds of the known schemes for the tensor's fans.

**Family** (:func:`fit_family`). Every scheme draws zero-mean values, so each candidate is
centred at 0 and scaled to the values' root mean square ``s = sqrt(E[w^2])``; a shifted tensor
fits none of them:

* ``normal``: N(0, s^2);
* ``uniform``: U(-a, a), with ``a = max|w| (n + 1) / n`` (the unbiased bound for n draws);
* ``truncated_normal``: a normal of std sigma cut at +-a, ``a`` from ``max|w|`` as for the
  uniform, ``sigma`` solved from ``s^2 = sigma^2 V(t)``, ``t = a / sigma``,
  ``V(t) = 1 - 2 t phi(t) / (2 Phi(t) - 1)`` (the variance of N(0, 1) cut at +-t);
* ``constant``: all values equal (zeros, ones).

Each is tested by Kolmogorov-Smirnov on a fixed random subsample of at most
:data:`MAX_SAMPLES` values (p-value from the Kolmogorov distribution with Stephens' 1970
small-sample correction). The scale is estimated from the same values, so the p-values are
conservative (Lilliefors 1967): a fit is rejected when its shape is wrong, not for its scale.
The family is the simplest that fits (``p >=`` :data:`ALPHA`): the better of normal and uniform
when either fits, else the truncated normal when it fits and its truncation is visible, ``t <``
:data:`VISIBLE_T` (more than 0.27% of the normal cut; initlab, TensorFlow and JAX cut at +-2
sigma; a normal cut near 0 is a uniform). A normal cut
far in its tails, such as ``torch.nn.init.trunc_normal_(w, std=0.02)`` with its default
absolute bounds +-2 (100 sigma), cannot be told from a normal and is reported as one. No candidate
fits: ``other`` (mixtures, shifted or sparse values, orthogonal and identity patterns...).

**Scheme** (:func:`match_scheme`). A (semi-)orthogonal matrix (rows or columns orthonormal up to
a gain) is ``orthogonal``. Otherwise the measured std is compared with ``g / sqrt(n)`` for ``n``
= fan_in, fan_out and (fan_in + fan_out) / 2, the gains of :data:`GAINS` (and any extra gains,
e.g. the following activation's), and with the fixed stds of :data:`FIXED_STDS`. Fans are the
module-aware ones of :func:`initlab.fans` and also the shape-only ones ``torch.nn.init``
computes (they differ for grouped convolutions, transposed convolutions and the fused attention
projection, and a library using ``torch.nn.init`` scales by the latter). A candidate matches
when ``|ln(s / target)|`` is within :data:`Z_ACCEPT` standard errors of ``ln s``
(``sqrt((kurtosis - 1) / (4 n))``, at least :data:`REL_FLOOR`). For a truncated normal both the
realised std and sigma before truncation are tried (``torch.nn.init.trunc_normal_(std=sigma, a=-2
sigma, b=2 sigma)`` realises 0.88 sigma). The name follows the registry of
:mod:`initlab._schemes`: fan_avg is ``xavier_*``, fan_in with gain 1 ``lecun_*``, fan_in with gain
1/sqrt(3) and a uniform ``torch_default``, other fan-based ones ``he_*`` with their mode and gain;
a fixed std is ``fixed_std``. Nothing matches: ``custom``; family ``other``: ``unknown``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["Family", "Match", "fit_family", "match_scheme", "orthogonal_gain", "ks_pvalue", "trunc_t",
           "FAMILIES", "GAINS", "FIXED_STDS", "ALPHA", "MAX_SAMPLES", "VISIBLE_T", "Z_ACCEPT", "REL_FLOOR"]

FAMILIES = ("normal", "truncated_normal", "uniform", "constant", "other")
ALPHA = 1e-4
MAX_SAMPLES = 20_000
VISIBLE_T = 3.0
Z_ACCEPT = 4.0
REL_FLOOR = 0.002
#: (name, gain, what it is for): the gains a fan-based scheme is tried with
GAINS: tuple[tuple[str, float, str], ...] = (
    ("1", 1.0, "linear"),
    ("sqrt(2)", math.sqrt(2.0), "relu"),
    ("1/sqrt(3)", 1.0 / math.sqrt(3.0), "torch default"),
    ("5/3", 5.0 / 3.0, "tanh (torch)"),
    ("3/4", 0.75, "selu (torch)"),
)
#: stds that do not depend on fans (BERT/GPT-2/ViT 0.02, N(0, 1) embeddings...)
FIXED_STDS = (1.0, 0.02, 0.01, 0.001, 1e-6)
_MODES = ("fan_in", "fan_avg", "fan_out")
_CHUNK = 1 << 22


# --------------------------------------------------------------------------------------------
# the family


@dataclass(frozen=True)
class Family:
    """The distribution family of a tensor's values (see the module docstring).

    ``std`` is the root mean square about 0 (the realised std of a zero-mean scheme); ``mean`` and
    ``kurtosis`` are about the mean; ``bound`` is the fitted cut ``a`` of a uniform or truncated
    normal, ``sigma`` the truncated normal's std before truncation, ``value`` a constant's value.
    ``p_values`` holds every candidate's KS p-value.
    """

    distribution: str
    p_value: float | None
    n: int
    mean: float
    std: float
    kurtosis: float
    p_values: dict[str, float] = field(default_factory=dict)
    bound: float | None = None
    sigma: float | None = None
    trunc_t: float | None = None
    value: float | None = None


def _moments(flat: Tensor) -> tuple[float, float, float, float, float, float]:
    """(mean, E[w^2], central m2, central m4, min, max) in float64, chunked (no float64 copy of a big tensor)."""
    n = flat.numel()
    s1 = s2 = 0.0
    lo, hi = math.inf, -math.inf
    for c in flat.split(_CHUNK):
        c = c.double()
        s1 += float(c.sum())
        s2 += float(torch.dot(c, c))
        lo, hi = min(lo, float(c.min())), max(hi, float(c.max()))
    mean = s1 / n
    m2 = m4 = 0.0
    for c in flat.split(_CHUNK):
        d = c.double() - mean
        d2 = d * d
        m2 += float(d2.sum())
        m4 += float(torch.dot(d2, d2))
    return mean, s2 / n, m2 / n, m4 / n, lo, hi


def kolmogorov_sf(lam: float) -> float:
    """P(K > lam) for the Kolmogorov distribution: 2 sum_k (-1)^(k-1) exp(-2 k^2 lam^2)."""
    if lam < 0.2:
        return 1.0
    total = sum((-1) ** (k - 1) * math.exp(-2.0 * k * k * lam * lam) for k in range(1, 101))
    return min(1.0, max(0.0, 2.0 * total))


def ks_pvalue(sorted_x: Tensor, cdf: Callable[[Tensor], Tensor]) -> float:
    """Kolmogorov-Smirnov p-value of sorted float64 values against ``cdf`` (Stephens' correction)."""
    m = sorted_x.numel()
    f = cdf(sorted_x).clamp(0.0, 1.0)
    i = torch.arange(1, m + 1, dtype=torch.float64)
    d = max(float((i / m - f).max()), float((f - (i - 1) / m).max()))
    rm = math.sqrt(m)
    return kolmogorov_sf(d * (rm + 0.12 + 0.11 / rm))


def _trunc_var(t: float) -> float:
    """Variance of N(0, 1) cut at +-t."""
    mass = math.erf(t / math.sqrt(2.0))
    return 1.0 - 2.0 * t * math.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi) / mass


def trunc_t(ratio: float) -> float | None:
    """The cut ``t = a / sigma`` of a truncated normal whose variance is ``ratio * a^2``
    (``V(t) / t^2 = ratio``); None when ``ratio >= 1/3`` (flatter than a uniform)."""
    if not 0.0 < ratio < 1.0 / 3.0:
        return None
    lo, hi = 1e-4, 60.0
    for _ in range(200):  # V(t) / t^2 decreases from 1/3 to 0
        mid = math.sqrt(lo * hi)
        if _trunc_var(mid) / (mid * mid) > ratio:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


def _subsample(flat: Tensor, seed: int) -> Tensor:
    """At most MAX_SAMPLES values, sorted, in float64: drawn without replacement (repeated values
    would make the empirical CDF jump and inflate the KS distance), or with replacement from a
    tensor so big that repeats are negligible."""
    n = flat.numel()
    if n > MAX_SAMPLES:
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randperm(n, generator=gen)[:MAX_SAMPLES] if n <= (1 << 22) else \
            torch.randint(n, (MAX_SAMPLES,), generator=gen)
        flat = flat[pick]
    return flat.double().sort().values


def _candidate_pvalues(x: Tensor, n: int, s: float, amax: float) -> tuple[dict[str, float], float, float | None]:
    """KS p-values of the zero-mean candidates; also the fitted bound and truncation point."""
    ndtr = torch.special.ndtr
    a = amax * (n + 1) / n
    p = {"normal": ks_pvalue(x, lambda v: ndtr(v / s)),
         "uniform": ks_pvalue(x, lambda v: (v + a) / (2 * a))}
    t = trunc_t((s / a) ** 2)
    if t is not None:
        sigma = a / t
        mass = math.erf(t / math.sqrt(2.0))
        cut = 0.5 * (1.0 - mass)
        p["truncated_normal"] = ks_pvalue(x, lambda v: (ndtr(v / sigma) - cut) / mass)
    else:
        p["truncated_normal"] = 0.0
    return p, a, t


def _choose(p: dict[str, float], t: float | None) -> str:
    """The simpler families first: the better of normal and uniform when either fits (a truncated
    normal with a small cut is nearly uniform, with a large cut nearly normal), else the truncated
    normal when it fits with a visible cut, else other."""
    simple = {k: p[k] for k in ("normal", "uniform") if p[k] >= ALPHA}
    if simple:
        return max(simple, key=lambda k: simple[k])
    if p["truncated_normal"] >= ALPHA and t is not None and t < VISIBLE_T:
        return "truncated_normal"
    return "other"


@torch.no_grad()
def fit_family(tensor: Tensor, *, seed: int = 0) -> Family:
    """The distribution family of ``tensor``'s values (see the module docstring)."""
    flat = tensor.detach().reshape(-1)
    if not flat.is_floating_point():
        flat = flat.float()
    flat = flat.cpu()
    n = flat.numel()
    if n == 0:
        return Family("other", None, 0, math.nan, math.nan, math.nan)
    mean, sq, m2, m4, lo, hi = _moments(flat)
    s = math.sqrt(sq)
    kurt = m4 / (m2 * m2) if m2 > 0 else math.nan
    if lo == hi:
        return Family("constant", None, n, mean, s, kurt, value=lo)
    if not all(math.isfinite(v) for v in (lo, hi, s)):
        return Family("other", None, n, mean, s, kurt)
    x = _subsample(flat, seed)
    p, a, t = _candidate_pvalues(x, n, s, max(-lo, hi))
    dist = _choose(p, t)
    return Family(dist, p.get(dist), n, mean, s, kurt, p_values=p,
                  bound=a if dist in ("uniform", "truncated_normal") else None,
                  sigma=a / t if dist == "truncated_normal" and t else None,
                  trunc_t=t if dist == "truncated_normal" else None)


# --------------------------------------------------------------------------------------------
# the scheme


@dataclass(frozen=True)
class Match:
    """One scheme whose std matches the tensor's: ``scheme`` (a registry name, ``fixed_std``,
    ``orthogonal``, ``zeros``, ``constant``, ``custom`` or ``unknown``), ``mode`` and ``gain`` (None
    where they do not apply), the ``target`` std it realises for these fans, ``z`` (the distance
    in standard errors of ln std), ``fans`` (``"module"``, ``"shape"``: the fans it used) and
    ``basis`` (``"realised"``, or ``"sigma"``: the truncated normal's std before truncation)."""

    scheme: str
    mode: str | None = None
    gain: float | None = None
    gain_name: str | None = None
    target: float | None = None
    z: float = 0.0
    fans: str | None = None
    basis: str = "realised"
    priority: int = 0

    @property
    def label(self) -> str:
        """Short words for reports: ``he_normal fan_out gain sqrt(2)``, ``fixed_std 0.02``, ``torch_default``."""
        if self.scheme.startswith("he_"):
            text = f"{self.scheme} {self.mode} gain {self.gain_name}"
        elif self.scheme.startswith("xavier_") and self.gain_name != "1":
            text = f"{self.scheme} gain {self.gain_name}"
        elif self.scheme in ("fixed_std", "custom", "unknown") and self.target is not None:
            text = f"{self.scheme} {self.target:.4g}"
        elif self.scheme == "orthogonal":
            text = f"orthogonal gain {self.gain_name}"
        elif self.scheme == "constant" and self.target is not None:
            text = f"constant {self.target:.4g}"
        else:
            text = self.scheme
        if self.fans == "shape":
            text += " (torch fans)"
        if self.basis == "sigma":
            text += " (sigma before the cut)"
        return text

    @property
    def key(self) -> tuple[object, ...]:
        """What two layers share when they were initialised alike (by the same call; its fans may
        be counted by the module or by the shape)."""
        return (self.scheme, self.mode, self.gain_name, self.basis,
                None if self.scheme not in ("fixed_std", "custom") else round(self.target or 0, 6))


def scheme_name(distribution: str, mode: str, gain_name: str) -> str:
    """The registry name for a fan-based match (see the module docstring)."""
    word = "uniform" if distribution == "uniform" else "normal"
    if mode == "fan_avg":
        return f"xavier_{word}"
    if mode == "fan_in" and gain_name == "1":
        return f"lecun_{word}"
    if mode == "fan_in" and gain_name == "1/sqrt(3)" and word == "uniform":
        return "torch_default"
    if mode == "fan_in" and gain_name.startswith("kumar"):
        return "kumar"
    return f"he_{word}"


@torch.no_grad()
def orthogonal_gain(tensor: Tensor, *, tol: float = 1e-4, max_numel: int = 1 << 22) -> float | None:
    """The gain g when the tensor, viewed as (rows, prod(rest)), has orthonormal rows or columns
    times g (``torch.nn.init.orthogonal_``); None otherwise (or when it is too big to check)."""
    if tensor.dim() < 2 or tensor.numel() > max_numel or tensor.numel() == 0:
        return None
    w = tensor.detach().reshape(tensor.shape[0], -1).double().cpu()
    if w.shape[0] > w.shape[1]:
        w = w.T
    if w.shape[0] < 2 or w.shape[0] > 4096:
        return None
    gram = w @ w.T
    c = float(gram.diagonal().mean())
    if not c > 0:
        return None
    err = float((gram - c * torch.eye(gram.shape[0], dtype=gram.dtype)).abs().max()) / c
    return math.sqrt(c) if err < tol else None


def _se(fam: Family) -> float:
    k = fam.kurtosis if math.isfinite(fam.kurtosis) else 3.0
    return max(math.sqrt(max(k - 1.0, 0.1) / (4.0 * max(fam.n, 1))), REL_FLOOR)


def _fan_candidates(fam: Family, fan_sets: Sequence[tuple[str, tuple[float, float]]],
                    gains: Sequence[tuple[str, float, str]]) -> list[Match]:
    out = []
    seen: set[tuple[str, str]] = set()
    for fans_name, (fi, fo) in fan_sets:
        if (str(fi), str(fo)) in seen:
            continue
        seen.add((str(fi), str(fo)))
        for mi, mode in enumerate(_MODES):
            n = {"fan_in": fi, "fan_out": fo, "fan_avg": (fi + fo) / 2.0}[mode]
            if not n or n <= 0:
                continue
            for gi, (gname, g, _) in enumerate(gains):
                prio = 100 * (fans_name != "module") + 10 * mi + gi
                out.append(Match(scheme_name(fam.distribution, mode, gname), mode, g, gname, g / math.sqrt(n),
                                 fans=fans_name, priority=prio))
    return out


def match_scheme(fam: Family, fan_sets: Sequence[tuple[str, tuple[float, float]]] = (), *,
                 extra_gains: Sequence[tuple[str, float, str]] = (), ortho_gain: float | None = None) -> list[Match]:
    """Every scheme whose std matches the tensor's (see the module docstring), best first:
    smallest ``z``, then the simplest (module fans before shape fans, fan_in, fan_avg, fan_out, the
    gains in the order of :data:`GAINS`, fan-based before fixed). ``fan_sets`` are ``(name, (fan_in, fan_out))`` pairs, e.g.
    ``[("module", initlab.fans(w, module=m)), ("shape", initlab.fans(w))]``; none for a 1-d tensor
    without a layer. Always at least one match: ``custom`` (nothing matched), ``unknown`` (family
    other), ``zeros`` / ``constant``, or ``orthogonal``."""
    if fam.distribution == "constant":
        v = fam.value or 0.0
        return [Match("zeros" if v == 0 else "constant", target=v)]
    if ortho_gain is not None:
        return [Match("orthogonal", gain=ortho_gain, gain_name=f"{ortho_gain:.4g}", target=fam.std)]
    if fam.distribution == "other" or not fam.std > 0:
        return [Match("unknown", target=fam.std)]
    gains = list(GAINS) + [g for g in extra_gains if all(abs(g[1] - h[1]) > 1e-9 for h in GAINS)]
    cands = _fan_candidates(fam, fan_sets, gains)
    cands += [Match("fixed_std", target=v, fans=None, priority=1000 + i) for i, v in enumerate(FIXED_STDS)]
    measured = [("realised", fam.std)]
    if fam.distribution == "truncated_normal" and fam.sigma:
        measured.append(("sigma", fam.sigma))
    se = _se(fam)
    found = []
    for basis, s in measured:
        for c in cands:
            z = abs(math.log(s / c.target)) / se if c.target else math.inf
            if z <= Z_ACCEPT:
                found.append(Match(c.scheme, c.mode, c.gain, c.gain_name, c.target, z, c.fans, basis,
                                   c.priority + 10_000 * (basis != "realised")))
    if not found:
        return [Match("custom", target=fam.std)]
    return sorted(found, key=lambda m: (round(m.z, 6), m.priority))
