"""A full snapshot of what an operation could change in a model, for "nothing changed" checks:
every parameter and buffer (bit for bit, and which tensor object fills each slot), gradients,
requires_grad, train/eval flags, every hook table (the module's and torch's global ones) and
parametrizations."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module
from torch.nn.utils import parametrize


def _bits(t: Tensor | None) -> Any:
    if t is None:
        return None
    if isinstance(t, nn.parameter.UninitializedTensorMixin):
        return ("uninitialized", type(t).__name__)
    if t.is_meta:
        return ("meta", tuple(t.shape), t.dtype)
    flat = t.detach().reshape(-1).contiguous()
    raw = flat.view(torch.uint8) if flat.numel() else flat
    return (tuple(t.shape), t.dtype, bytes(raw.cpu().numpy().tobytes()))


def _hook_tables(m: nn.Module) -> dict[str, list[Any]]:
    return {k: list(v.keys()) for k, v in vars(m).items() if "hook" in k and isinstance(v, dict)}


def _global_hooks() -> dict[str, list[Any]]:
    return {k: list(v.keys()) for k, v in vars(_module).items() if k.startswith("_global") and isinstance(v, dict)}


def snapshot(model: nn.Module) -> dict[str, Any]:
    modules = list(model.named_modules(remove_duplicate=False))
    return {
        "values": {f"{n}.{k}": _bits(t) for n, m in modules for k, t in (*m._parameters.items(), *m._buffers.items())},
        "slots": {f"{n}.{k}": id(t) for n, m in modules for k, t in (*m._parameters.items(), *m._buffers.items())},
        "grads": {n: _bits(p.grad) for n, p in model.named_parameters(remove_duplicate=False)},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)},
        "training": {n: m.training for n, m in modules},
        "hooks": {n: _hook_tables(m) for n, m in modules},
        "global_hooks": _global_hooks(),
        "parametrized": {n: parametrize.is_parametrized(m) for n, m in modules},
    }


def assert_unchanged(before: dict[str, Any], model: nn.Module) -> None:
    after = snapshot(model)
    for key in before:
        if before[key] != after[key]:
            diff = key if not isinstance(before[key], dict) else \
                sorted(k for k in set(before[key]) | set(after[key]) if before[key].get(k) != after[key].get(k))
            raise AssertionError(f"the model changed: {key} {diff}")
