"""Layer-sequential unit-variance (LSUV) initialisation, after Mishkin & Matas (2016).

``lsuv_(model, batch)`` first gives every covered layer an orthogonal weight matrix
(Saxe et al. 2014; :func:`initlab.orthogonal_`) and a zero bias, then, layer by layer in forward
order, rescales the weights until the variance of the layer's output on ``batch`` is within
``tol`` of ``target_var``:

    W <- W * sqrt(target_var / Var(W x + b))

so that the realised output variance is ``target_var`` (up to ``tol``, relative:
``|Var - target_var| <= tol * target_var``). With ``center=True`` the bias also absorbs the
per-channel mean of the output, so every output unit (channel) has mean 0 on the batch.

Cost: one forward pass in total. Each covered layer is fitted inside a forward *pre*-hook on
its own input, recomputing only that layer (``module.forward``) while it iterates; the forward
pass then continues with the fitted weights, so the next layer sees its final input. The pass
stops as soon as the last covered layer is fitted. (The reference implementation runs a full
forward pass per layer and per iteration.)

Covered: ``nn.Linear``, ``nn.Conv1d/2d/3d`` (grouped and depthwise included) and
``nn.ConvTranspose1d/2d/3d``. Other weight layers (Bilinear, Embedding, MultiheadAttention) are
left as they are and listed in the report. The model's mode is kept (use ``model.eval()`` for
statistics without dropout); buffers (BatchNorm running statistics) are restored afterwards,
in-place activations are fine, and no hook is left behind.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ._errors import InitlabError
from ._probe import (_as_float, _channel_dim, _channel_sums, _moments, _Tracker, as_inputs, format_table,
                     forward_error, no_mha_fastpath)

if TYPE_CHECKING:  # pragma: no cover
    import pandas

__all__ = ["lsuv_", "LSUVReport"]

_COVERED: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)


class _StopForward(Exception):
    """Raised from a hook once every covered layer is fitted: the rest of the forward is not needed."""


@dataclass
class LSUVReport:
    """Per-layer outcome of :func:`lsuv_`, forward order first (layers never called come last).

    ``rows``: dicts with ``layer``, ``kind``, ``iterations`` (rescaling steps taken), ``variance``
    and ``mean`` (of the layer output on the batch, after fitting), ``scale`` (the total factor
    applied after the orthogonal init), ``converged`` and ``note``.
    """

    rows: list[dict[str, Any]]
    target_var: float
    tol: float
    max_iter: int
    skipped: list[str] = field(default_factory=list)

    @property
    def converged(self) -> bool:
        """True when every fitted layer ended within tolerance."""
        return all(r["converged"] for r in self.rows if r["iterations"] is not None)

    @property
    def iterations(self) -> dict[str, int]:
        return {r["layer"]: r["iterations"] for r in self.rows if r["iterations"] is not None}

    @property
    def variances(self) -> dict[str, float]:
        return {r["layer"]: r["variance"] for r in self.rows if r["iterations"] is not None}

    def frame(self) -> "pandas.DataFrame":
        import pandas as pd

        return pd.DataFrame(self.rows, columns=["layer", "kind", "iterations", "variance", "mean", "scale",
                                                "converged", "note"])

    def __str__(self) -> str:
        band = f"{self.target_var:g} +- {self.tol * self.target_var:g}"
        head = f"LSUV (Mishkin & Matas 2016): target output variance {band}, max_iter={self.max_iter}"
        table = format_table(self.rows, [("layer", "layer"), ("kind", "kind"), ("iterations", "iterations"),
                                         ("variance", "variance"), ("mean", "mean"), ("scale", "scale"),
                                         ("converged", "converged"), ("note", "note")])
        tail = f"\nnot covered (left as they were): {', '.join(self.skipped)}" if self.skipped else ""
        return f"{head}\n{table}{tail}"


def _covered_layers(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    from torch.nn.utils import parametrize

    from ._graph import WEIGHT_LAYERS

    covered: list[tuple[str, nn.Module]] = []
    skipped: list[str] = []
    inside_attention: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            inside_attention.append(name + ".")
        if any(name.startswith(p) for p in inside_attention):
            continue  # out_proj of an attention block is applied functionally, never called
        if isinstance(m, _COVERED):
            if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
                raise InitlabError(f"layer {name!r} ({type(m).__name__}) has uninitialised lazy parameters; "
                                   "run one forward pass before lsuv_")
            if parametrize.is_parametrized(m, "weight"):
                skipped.append(f"{name} (parametrized weight)")
                continue
            covered.append((name, m))
        elif isinstance(m, WEIGHT_LAYERS):
            skipped.append(f"{name} ({type(m).__name__})")
    return covered, skipped


def lsuv_(model: nn.Module, batch: Tensor | tuple[Tensor, ...], *, tol: float = 0.1, max_iter: int = 10,
          target_var: float = 1.0, center: bool = False,
          generator: torch.Generator | None = None) -> LSUVReport:
    """Initialise ``model`` in place by LSUV (Mishkin & Matas 2016); see the module docstring.

    ``batch`` is one input batch (a tuple of tensors for a model with several inputs).
    ``tol``: relative tolerance on the output variance; ``max_iter``: rescaling steps per layer
    (a :class:`RuntimeWarning` names the layers that did not reach the band); ``target_var``:
    the wanted output variance; ``center``: also set biases so each output channel has mean 0;
    ``generator``: the random generator of the orthogonal pre-initialisation.
    Returns an :class:`LSUVReport` with the iterations and the final variance of every layer.
    """
    if not isinstance(model, nn.Module):
        raise InitlabError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for key, value in (("tol", tol), ("target_var", target_var)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise InitlabError(f"{key} must be a positive finite number, got {value!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise InitlabError(f"max_iter must be a non-negative integer, got {max_iter!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise InitlabError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    inputs = as_inputs(batch)
    covered, skipped = _covered_layers(model)
    if not covered:
        names = ", ".join(c.__name__ for c in _COVERED)
        extra = f" (found only: {', '.join(skipped)})" if skipped else ""
        raise InitlabError(f"model {type(model).__name__} has no layer LSUV can fit; supported: {names}{extra}")

    from ._schemes import orthogonal_

    target = float(target_var)
    with torch.no_grad():
        for _, m in covered:  # orthogonal pre-init (Saxe et al. 2014), zero biases
            orthogonal_(m.weight, generator=generator)
            if m.bias is not None:
                m.bias.zero_()

    results: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    tracker = _Tracker()

    def fit(name: str, mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        w, b = mod.weight, mod.bias
        # the stock layers are linear in (W, b): scaling both by s scales the output by exactly s,
        # so its moments are updated in closed form; subclasses (which may e.g. normalise their
        # weights in forward) are recomputed after every rescaling
        exact = type(mod) in _COVERED
        total = 1.0
        note = ""
        it = 0
        var = mean = float("nan")
        fresh = True
        for it in range(max_iter + 1):
            if fresh:
                out = mod.forward(*args, **kwargs)  # the layer alone: its hooks do not run
                of = _as_float(out)
                if center and b is not None:
                    cdim = _channel_dim(mod, of)
                    sum_c = _channel_sums(of, cdim)
                    m_c = sum_c / (of.numel() // sum_c.numel())
                    b.sub_(m_c.to(b.dtype))
                    shape = [1] * of.dim()
                    shape[cdim] = -1
                    of = of - m_c.reshape(shape)
                mu, v = _moments(of)
                var, mean = float(v), float(mu)
            if abs(var - target) <= tol * target or it == max_iter:
                break
            if not math.isfinite(var) or var <= 0:
                note = ("output is constant on the batch (variance 0); cannot rescale" if var == 0
                        else f"output variance is {var}; cannot rescale")
                break
            s = math.sqrt(target / var)
            w.mul_(s)
            if b is not None and (center or exact):
                b.mul_(s)  # zero after the pre-init unless centred; keeps the centred mean at 0
            total *= s
            if exact:
                var, mean = var * s * s, mean * s
                fresh = False
        converged = abs(var - target) <= tol * target
        if center and b is None:
            note = (note + "; " if note else "") + "no bias: mean not centred"
        results[name] = {"layer": name, "kind": type(mod).__name__, "iterations": it, "variance": var,
                         "mean": mean, "scale": total, "converged": converged, "note": note}

    def pre_hook(name: str) -> Any:
        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            tracker.current = (name, mod, [tuple(a.shape) for a in args if isinstance(a, Tensor)])
            if name in results:
                return
            order.append(name)
            with torch.no_grad():
                try:
                    fit(name, mod, args, kwargs)
                except RuntimeError as e:
                    raise forward_error(e, inputs, tracker, covered) from e
            if len(results) == len(covered):
                raise _StopForward
        return hook

    saved = {k: v.clone() for k, v in model.named_buffers()} if model.training else {}
    handles = []
    try:
        for name, m in covered:
            handles.append(m.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
            handles.append(m.register_forward_hook(tracker.post))
        with torch.no_grad(), no_mha_fastpath():
            try:
                model(*inputs)
            except _StopForward:
                pass
            except InitlabError:
                raise
            except (RuntimeError, ValueError, IndexError, TypeError) as e:
                raise forward_error(e, inputs, tracker, covered) from e
    finally:
        for h in handles:
            h.remove()
        if saved:
            with torch.no_grad():
                for k, v in model.named_buffers():
                    if k in saved and v.shape == saved[k].shape:
                        v.copy_(saved[k])

    rows = [results[n] for n in order]
    for name, m in covered:
        if name not in results:
            rows.append({"layer": name, "kind": type(m).__name__, "iterations": None, "variance": float("nan"),
                         "mean": float("nan"), "scale": 1.0, "converged": False,
                         "note": "not called by the forward pass; kept the orthogonal init"})
    report = LSUVReport(rows=rows, target_var=target, tol=float(tol), max_iter=max_iter, skipped=skipped)
    stuck = [r for r in rows if r["iterations"] is not None and not r["converged"]]
    if stuck:
        detail = ", ".join(f"{r['layer']} (variance {r['variance']:.4g})" for r in stuck)
        warnings.warn(
            f"LSUV: {len(stuck)} layer(s) did not reach variance {target:g} +- {tol * target:g} within "
            f"max_iter={max_iter} rescaling steps: {detail}",
            RuntimeWarning, stacklevel=2,
        )
    return report
