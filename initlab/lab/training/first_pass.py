"""The first pass: each member's initial model on its first-pass batch, before any training.

``initlab.probe(model, batch, target=labels)`` gives the per-layer rows (one per weight layer,
numbered from 1 in call order, with the variance recursion's predictions beside the
measurements), and forward hooks give the raw arrays for histograms: ``input``, and for weight
layer i = 1, 2, ... ``mat_mul_<i>`` (the layer's output minus its bias: the pre-activation
without bias; biases are zero at init, so it is the layer output) and ``fc_out_<i>`` (the output
of the first elementwise activation module called after layer i and before the next weight
layer, else the layer output itself: the linear readout). Glorot & Bengio (2010) logged exactly
these: with N(0, 1) weights the layer-1 pre-activation variance is 784 E[x^2] (~88 on MNIST),
not 784 Var(x).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..._errors import InitlabError
from ..._layers import AFFINE_LAYERS, activation_module
from ..._probe import probe
from .activations import IDENTITY, activation_key

__all__ = ["first_pass", "fallback_rows", "jacobian_rows", "WEIGHT_TYPES", "JACOBIAN_EXAMPLES"]

#: weight layers computing h = W x + b (the library's layer table: Linear, Conv, ConvTranspose)
WEIGHT_TYPES = AFFINE_LAYERS


def _activation_modules(model: nn.Module, activation: object) -> set[int]:
    """ids of the leaf modules that are elementwise activations (decided before any hook exists:
    the check calls the modules)."""
    leaves = [m for m in model.modules() if not isinstance(m, WEIGHT_TYPES) and not list(m.children())]
    out = set()
    for m in leaves:
        key = activation_key(m, activation, allow_params=True)
        if key is not None and key is not IDENTITY:
            out.add(id(m))
    return out


def _forward_events(model: nn.Module, batch: Tensor, act_ids: set[int]) -> list[tuple[str, Tensor]]:
    """One forward pass with hooks: ("w", pre-activation without bias) and ("o", output) per weight
    layer, ("a", output) per activation module, in call order."""
    events: list[tuple[str, Tensor]] = []

    def on_weight(mod: nn.Module, inp: Any, out: Tensor) -> None:
        pre = out.detach().clone()
        if getattr(mod, "bias", None) is not None:
            pre -= mod.bias.detach().view(1, -1, *([1] * (pre.dim() - 2)))
        events.append(("w", pre))
        events.append(("o", out.detach().clone()))

    def on_act(mod: nn.Module, inp: Any, out: Any) -> None:
        if isinstance(out, Tensor):
            events.append(("a", out.detach().clone()))

    handles = []
    try:
        for mod in model.modules():
            if isinstance(mod, WEIGHT_TYPES):
                handles.append(mod.register_forward_hook(on_weight))
            elif id(mod) in act_ids:
                handles.append(mod.register_forward_hook(on_act))
        with torch.no_grad():
            model(batch)
    finally:
        for h in handles:
            h.remove()
    return events


def _arrays(batch: Tensor, events: Iterable[tuple[str, Tensor]]) -> dict[str, np.ndarray]:
    """``input``, ``mat_mul_<i>`` and ``fc_out_<i>`` from the forward events (see the module docstring)."""
    values: dict[str, np.ndarray] = {"input": batch.detach().cpu().float().numpy().copy()}
    layer = 0
    pending: Tensor | None = None  # output of the current layer, until its activation shows up
    for kind, t in events:
        if kind == "w":
            if pending is not None:
                values[f"fc_out_{layer}"] = pending.cpu().float().numpy()
            layer += 1
            values[f"mat_mul_{layer}"] = t.cpu().float().numpy()
            pending = None
        elif kind == "o":
            pending = t
        elif kind == "a" and pending is not None:
            values[f"fc_out_{layer}"] = t.cpu().float().numpy()
            pending = None
    if pending is not None:
        values[f"fc_out_{layer}"] = pending.cpu().float().numpy()
    return values


#: examples whose layer Jacobians are decomposed (``jacobian=True``)
JACOBIAN_EXAMPLES = 8


def _slope(activation: object, z: Tensor) -> Tensor:
    """phi'(z) of the scenario's activation, elementwise (autograd)."""
    act = activation_module(activation if activation is not None else "identity")
    with torch.enable_grad():
        zz = z.detach().double().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(act(zz).sum(), zz)
    return g


def jacobian_rows(model: nn.Module, values: dict[str, np.ndarray], activation: object,
                  n: int = JACOBIAN_EXAMPLES) -> list[dict[str, float]]:
    """Per Linear layer l (in call order): the singular values of its Jacobian J_l = dh_l/dh_(l-1) =
    diag(phi'(z_l)) W_l (the readout: W_L) on the first ``n`` examples: their mean, max and min over
    examples and singular values. Glorot & Bengio (2010, Sec. 4.2.2) report the mean singular value of these
    Jacobians: about 0.5 under their standard init and 0.8 under the normalised one (tanh). Convolutions: NaN."""
    layers = [m for m in model.modules() if isinstance(m, WEIGHT_TYPES)]
    out = []
    for i, mod in enumerate(layers, start=1):
        if not isinstance(mod, nn.Linear) or f"mat_mul_{i}" not in values:
            out.append({"jac_sv_mean": math.nan, "jac_sv_max": math.nan, "jac_sv_min": math.nan})
            continue
        w = mod.weight.detach().double()
        z = torch.from_numpy(values[f"mat_mul_{i}"][:n]).double()
        if mod.bias is not None:
            z = z + mod.bias.detach().double()
        slope = _slope(activation, z) if i < len(layers) else torch.ones_like(z)
        sv = torch.linalg.svdvals(slope.unsqueeze(2) * w.unsqueeze(0))  # (n, min(out, in))
        out.append({"jac_sv_mean": float(sv.mean()), "jac_sv_max": float(sv.max()), "jac_sv_min": float(sv.min())})
    return out


def first_pass(model: nn.Module, batch: Tensor, target: Tensor, activation: object = None, *,
               jacobian: bool = False) -> tuple[list[dict[str, Any]], dict[str, np.ndarray], float]:
    """The probe's rows, the raw per-layer arrays and the batch's population variance (over all
    entries) of one member's initial model on its batch; with ``jacobian`` each row also gets
    ``jac_sv_mean``, ``jac_sv_max`` and ``jac_sv_min`` (:func:`jacobian_rows`).

    A member the probe cannot measure (e.g. non-finite initial weights) must not stop its group:
    it gets :func:`fallback_rows`, the moments of the arrays measured here.
    """
    values = _arrays(batch, _forward_events(model, batch, _activation_modules(model, activation)))
    input_var = float(batch.double().var(unbiased=False))
    try:
        rows = [dict(r) for r in probe(model, batch, target=target).rows]
    except (InitlabError, RuntimeError, ValueError) as e:
        rows = fallback_rows(model, values, f"probe failed: {e}")
    model.zero_grad(set_to_none=True)
    if jacobian:
        for r, j in zip(rows, jacobian_rows(model, values, activation)):
            r.update(j)
    return rows, values, input_var


def fallback_rows(model: nn.Module, values: dict[str, np.ndarray], note: str) -> list[dict[str, Any]]:
    """Per-layer moments from the first-pass arrays, in the probe's column names; ``index`` from 1,
    as the probe numbers its rows (and as ``mat_mul_<i>`` is numbered)."""
    names = [n for n, m in model.named_modules() if isinstance(m, WEIGHT_TYPES)]
    rows = []
    for i, name in enumerate(names, start=1):
        if f"mat_mul_{i}" not in values:
            break
        pre = values[f"mat_mul_{i}"].astype(np.float64)
        post = values[f"fc_out_{i}"].astype(np.float64)
        with np.errstate(all="ignore"):
            rows.append(dict(index=i, layer=name, kind=type(model.get_submodule(name)).__name__,
                             pre_mean=float(pre.mean()), pre_var=float(pre.var()), pre_sq_mean=float((pre ** 2).mean()),
                             post_mean=float(post.mean()), post_var=float(post.var()),
                             post_sq_mean=float((post ** 2).mean()), note=note))
    return rows
