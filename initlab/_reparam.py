"""Weights computed from other tensors: ``torch.nn.utils.parametrize`` parametrizations
(``parametrizations.weight_norm``, ``parametrizations.spectral_norm``, orthogonal, your own), the
old hook-based ``weight_norm`` (``weight_g``, ``weight_v``) and ``spectral_norm``
(``weight_orig``), and pruning (``weight_orig`` times the buffer ``weight_mask``).

``init_model`` initialises the **effective** weight: the scheme fills a scratch tensor W of the
weight's shape, then the underlying tensors are set so that the layer computes W:

* parametrize: ``module.weight = W`` (the parametrization's ``right_inverse``; weight norm's gives
  g = ||W|| per output unit and v = W, so the effective weight is exactly W);
* old-style weight norm: v = W, g = ``torch.norm_except_dim(W, 2, dim)``;
* pruning: ``weight_orig`` = W / sqrt(density), density the mask's fraction of ones, so the
  pruned weight W * mask / sqrt(density) has the target variance over all its entries: each unit
  sums over density * fan_in surviving inputs (the sparse fan-in of Evci et al. 2022, "Gradient
  flow in sparse neural networks and how lottery tickets win");
* spectral norm (both styles): ``weight_orig`` / original = W; the layer divides it by its
  largest singular value, as it always does; an orthogonal parametrization keeps its constraint
  (the report's realised std is the effective weight's).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = ["computed_kind", "scratch_for", "commit"]


def computed_kind(module: nn.Module, pname: str) -> str | None:
    """How ``module.<pname>`` is computed: ``"parametrize"``, ``"weight_norm"`` (old hooks),
    ``"orig"`` (pruning / old spectral norm), ``"unknown"``, or None for a plain parameter."""
    if parametrize.is_parametrized(module, pname):
        return "parametrize"
    params = module._parameters
    if params.get(pname) is not None:
        return None
    if params.get(f"{pname}_g") is not None and params.get(f"{pname}_v") is not None:
        return "weight_norm"
    if params.get(f"{pname}_orig") is not None:
        return "orig"
    return "unknown"


def _underlying(module: nn.Module, pname: str, kind: str) -> list[Tensor]:
    if kind == "parametrize":
        return list(module.parametrizations[pname].parameters())
    if kind == "weight_norm":
        return [module._parameters[f"{pname}_g"], module._parameters[f"{pname}_v"]]
    return [module._parameters[f"{pname}_orig"]]


def scratch_for(module: nn.Module, pname: str, kind: str) -> tuple[Tensor, list[Tensor]]:
    """(an empty tensor of the effective weight's shape, dtype and device, the underlying parameters)."""
    under = _underlying(module, pname, kind)
    if kind == "parametrize":
        with torch.no_grad():
            like = getattr(module, pname)
    else:
        like = under[-1]  # weight_v / weight_orig: the weight's shape
    return torch.empty(like.shape, dtype=like.dtype, device=like.device), under


def _hook(module: nn.Module, pname: str, cls_name: str):
    return next((h for h in module._forward_pre_hooks.values()
                 if type(h).__name__ == cls_name and getattr(h, "name", None) == pname), None)


@torch.no_grad()
def commit(module: nn.Module, pname: str, kind: str, value: Tensor) -> Tensor:
    """Set the underlying tensors so that the layer computes ``value``; returns the effective weight."""
    if value.is_meta:
        return value
    if kind == "parametrize":
        setattr(module, pname, value)
        return getattr(module, pname)
    if kind == "weight_norm":
        hook = _hook(module, pname, "WeightNorm")
        dim = hook.dim if hook is not None else 0
        module._parameters[f"{pname}_v"].copy_(value)
        module._parameters[f"{pname}_g"].copy_(torch.norm_except_dim(value, 2, dim))
        effective = value.clone()
    else:
        mask = module._buffers.get(f"{pname}_mask")
        if mask is None:  # old spectral norm: the hook recomputes W / sigma on the next forward
            module._parameters[f"{pname}_orig"].copy_(value)
            return value
        density = float(mask.float().mean())
        if density > 0:  # the surviving fan: Var = target^2 / density per entry (Evci et al. 2022)
            value = value / density ** 0.5
        module._parameters[f"{pname}_orig"].copy_(value)
        effective = value * mask
    setattr(module, pname, effective)  # the hooks keep the computed weight as a plain attribute
    return effective
