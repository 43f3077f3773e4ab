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
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._errors import InitlabError
from ._forward import Tracker, as_inputs, forward_error, hooks, kept_buffers, no_mha_fastpath
from ._layers import AFFINE_LAYERS, calls_children_functionally, channel_dim, is_affine, is_stock_affine, is_weight_layer
from ._orthogonal import orthogonal_many_
from ._stats import as_float, channel_sums, moments
from ._text import format_table
from ._undo import Undo, all_or_nothing

if TYPE_CHECKING:  # pragma: no cover
    import pandas

__all__ = ["lsuv_", "run_lsuv", "LSUVReport"]


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
    def fitted(self) -> list[str]:
        """The layers LSUV rescaled, in forward order."""
        return [r["layer"] for r in self.rows if r["iterations"] is not None]

    def row_updates(self) -> dict[str, dict[str, Any]]:
        """For ``init_model``'s report: what changes in the row of every fitted layer (its target
        std is set by the data, not by the fans; no gain; biases zeroed by the pre-init)."""
        return {name: {"target_std": None, "gain": None, "bias": "zeros"} for name in self.fitted}

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
    """(the layers LSUV fits, the weight layers it leaves as they are, with the reason)."""
    covered: list[tuple[str, nn.Module]] = []
    skipped: list[str] = []
    inside: list[str] = []  # prefixes of modules whose submodules are applied functionally
    for name, m in model.named_modules():
        if calls_children_functionally(m):
            inside.append(name + ".")
        if any(name.startswith(p) for p in inside):
            continue  # out_proj of an attention block is applied functionally, never called
        if is_affine(m):
            if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
                raise InitlabError(f"layer {name!r} ({type(m).__name__}) has uninitialised lazy parameters; "
                                   "run one forward pass before lsuv_")
            if parametrize.is_parametrized(m, "weight"):
                skipped.append(f"{name} (parametrized weight)")
                continue
            covered.append((name, m))
        elif is_weight_layer(m):
            skipped.append(f"{name} ({type(m).__name__})")
    return covered, skipped


def check_lsuv_args(tol: object, max_iter: object, target_var: object) -> None:
    """Raise :class:`InitlabError` for a tolerance, iteration count or target variance LSUV cannot use."""
    for key, value in (("tol", tol), ("target_var", target_var)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise InitlabError(f"{key} must be a positive finite number, got {value!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise InitlabError(f"max_iter must be a non-negative integer, got {max_iter!r}")


class _Fit:
    """One LSUV pass: the covered layers, the settings, and each fitted layer's result.

    Each covered layer is fitted in a forward pre-hook on its own input (:meth:`pre_hook`), so the
    forward pass continues with the fitted weights; :class:`_StopForward` ends the pass once the
    last covered layer is fitted.
    """

    def __init__(self, covered: list[tuple[str, nn.Module]], inputs: tuple[Tensor, ...], *, tol: float,
                 max_iter: int, target: float, center: bool) -> None:
        self.covered, self.inputs = covered, inputs
        self.tol, self.max_iter, self.target, self.center = tol, max_iter, target, center
        self.results: dict[str, dict[str, Any]] = {}
        self.order: list[str] = []
        self.tracker = Tracker()

    def run(self, model: nn.Module) -> None:
        """One forward pass with the fitting hooks; buffers (BatchNorm statistics) are restored in
        training mode, and no hook is left behind."""
        with kept_buffers(model), hooks() as handles:
            for name, m in self.covered:
                handles.append(m.register_forward_pre_hook(partial(self.pre_hook, name), with_kwargs=True))
                handles.append(m.register_forward_hook(self.tracker.post))
            with torch.no_grad(), no_mha_fastpath():
                try:
                    model(*self.inputs)
                except _StopForward:
                    pass
                except InitlabError:
                    raise
                except Exception as e:  # noqa: BLE001 - the model's own failure, explained in one line
                    raise forward_error(e, self.inputs, self.tracker, self.covered) from e

    def pre_hook(self, name: str, mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.tracker.enter(name, mod, args)
        if name in self.results:
            return
        self.order.append(name)
        with torch.no_grad():
            try:
                self.results[name] = self.fit(name, mod, args, kwargs)
            except InitlabError:
                raise
            except Exception as e:  # noqa: BLE001 - the layer's own failure, explained in one line
                raise forward_error(e, self.inputs, self.tracker, self.covered) from e
        if len(self.results) == len(self.covered):
            raise _StopForward

    def _output_moments(self, mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[float, float]:
        """(variance, mean) of the layer's output, computed alone (its hooks do not run); with
        ``center`` the bias first absorbs the per-channel means."""
        of = as_float(mod.forward(*args, **kwargs))
        b = mod.bias
        if self.center and b is not None:
            cdim = channel_dim(mod, of)
            sum_c = channel_sums(of, cdim)
            m_c = sum_c / (of.numel() // sum_c.numel())
            b.sub_(m_c.to(b.dtype))
            shape = [1] * of.dim()
            shape[cdim] = -1
            of = of - m_c.reshape(shape)
        mu, v = moments(of)
        return float(v), float(mu)

    def fit(self, name: str, mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """Rescale the layer until its output variance is within ``tol`` of the target."""
        w, b = mod.weight, mod.bias
        target, band = self.target, self.tol * self.target
        # the stock layers are linear in (W, b): scaling both by s scales the output by exactly s,
        # so its moments are updated in closed form; subclasses (which may e.g. normalise their
        # weights in forward) are recomputed after every rescaling
        exact = is_stock_affine(mod)
        total, note, it, fresh = 1.0, "", 0, True
        var = mean = float("nan")
        for it in range(self.max_iter + 1):
            if fresh:
                var, mean = self._output_moments(mod, args, kwargs)
            if abs(var - target) <= band or it == self.max_iter:
                break
            if not math.isfinite(var) or var <= 0:
                note = ("output is constant on the batch (variance 0); cannot rescale" if var == 0
                        else f"output variance is {var}; cannot rescale")
                break
            s = math.sqrt(target / var)
            w.mul_(s)
            if b is not None and (self.center or exact):
                b.mul_(s)  # zero after the pre-init unless centred; keeps the centred mean at 0
            total *= s
            if exact:
                var, mean = var * s * s, mean * s
                fresh = False
        if self.center and b is None:
            note = (note + "; " if note else "") + "no bias: mean not centred"
        return {"layer": name, "kind": type(mod).__name__, "iterations": it, "variance": var, "mean": mean,
                "scale": total, "converged": abs(var - target) <= band, "note": note}

    def rows(self) -> list[dict[str, Any]]:
        """The fitted layers in forward order, then the covered layers the forward pass never called."""
        rows = [self.results[n] for n in self.order]
        for name, m in self.covered:
            if name not in self.results:
                rows.append({"layer": name, "kind": type(m).__name__, "iterations": None, "variance": float("nan"),
                             "mean": float("nan"), "scale": 1.0, "converged": False,
                             "note": "not called by the forward pass; kept the orthogonal init"})
        return rows


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
    return run_lsuv(model, batch, tol=tol, max_iter=max_iter, target_var=target_var, center=center,
                    generator=generator, undo=True)


def run_lsuv(model: nn.Module, batch: Tensor | tuple[Tensor, ...], *, tol: float = 0.1, max_iter: int = 10,
             target_var: float = 1.0, center: bool = False, generator: torch.Generator | None = None,
             undo: bool = True) -> LSUVReport:
    """:func:`lsuv_`; with ``undo=False`` no copy of the weights is kept (for a caller, such as
    ``init_model``, that keeps its own and rolls the whole operation back)."""
    if not isinstance(model, nn.Module):
        raise InitlabError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_lsuv_args(tol, max_iter, target_var)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise InitlabError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if not isinstance(center, bool):
        raise InitlabError(f"center must be True or False, got {center!r}")
    inputs = as_inputs(batch)
    covered, skipped = _covered_layers(model)
    if not covered:
        names = ", ".join(c.__name__ for c in AFFINE_LAYERS)
        extra = f" (found only: {', '.join(skipped)})" if skipped else ""
        raise InitlabError(f"model {type(model).__name__} has no layer LSUV can fit; supported: {names}{extra}")

    target = float(target_var)
    log = Undo("undoing lsuv_ on failure")
    if undo:
        log.save_generator(generator)
        log.save_all([(f"layer {name!r}'s {k}", t) for name, m in covered
                      for k, t in (("weight", m.weight), ("bias", m.bias)) if t is not None])
    with all_or_nothing(log):
        with torch.no_grad():
            # orthogonal pre-init (Saxe et al. 2014; the QRs in parallel, bit-identical to one
            # orthogonal_ per layer in order), zero biases
            orthogonal_many_([m.weight for _, m in covered], generator=generator)
            for _, m in covered:
                if m.bias is not None:
                    m.bias.zero_()
        fit = _Fit(covered, inputs, tol=tol, max_iter=max_iter, target=target, center=center)
        fit.run(model)
    report = LSUVReport(rows=fit.rows(), target_var=target, tol=float(tol), max_iter=max_iter, skipped=skipped)
    stuck = [r for r in report.rows if r["iterations"] is not None and not r["converged"]]
    if stuck:
        detail = ", ".join(f"{r['layer']} (variance {r['variance']:.4g})" for r in stuck)
        warnings.warn(
            f"LSUV: {len(stuck)} layer(s) did not reach variance {target:g} +- {tol * target:g} within "
            f"max_iter={max_iter} rescaling steps: {detail}",
            RuntimeWarning, stacklevel=3,
        )
    return report
