"""``auto``'s correction pass: the variance recursion made exact for the weights actually drawn.

The recursion of :class:`initlab._schemes._AutoRule` is exact at infinite width. At finite
width each weight draw scales the signal by a random factor: ``||W x||^2 / (n_out Var[W] ||x||^2)``
has relative standard deviation sqrt(2 / n_out) for a single direction ``x``. For a batch of
inputs the sample-specific parts average out, but the part shared by every sample does not:
after a non-centred activation (E[phi(z)] != 0: ReLU, GELU, SiLU, Mish, softplus, sigmoid...)
every input carries the same mean vector ``m``, and ``||W m||^2`` is one chi-square draw with
n_out degrees of freedom, layer after layer. The second moment the recursion tracks,
E[h^2] = mean direction + centred part, therefore random-walks in log scale (ReLU family: the
map q -> 2 E[relu(sqrt(q) z)^2] is neutral, Hanin & Nica 2019), and where the map
q -> E[phi(sqrt(q) z)^2] / E[phi(z)^2] has slope > 1 at q* = 1 (GELU, SiLU, Mish, hard-swish,
QuickGELU) the walk is amplified geometrically: a 50-layer SiLU MLP of width 256 ends at E[h^2]
~1e5 although every layer's gain is exact.

The correction measures what the recursion only predicts. One forward pass, in forward order:
a hook on each covered layer measures the second moment of its output, q_l = mean(h_l^2), and
replaces the output by ``h_l * a_l`` with a_l = sqrt(q* / q_l) (q* = 1), so that the next layer
sees its corrected input; afterwards every covered weight is multiplied by its a_l. The realised
weight variance is then a_l^2 times the recursion's (a_l = 1 +- O(sqrt(2 / n)) per layer), and the measured pre-activation second moment is q* at every layer
(exactly on the calibration batch; on other data from the same distribution within the
sampling error of the batch). It is the scale step of LSUV (Mishkin & Matas 2016) applied once
per layer on top of a variance-correct draw, without the orthogonal draw or the iterations.

The batch is ``init_model(..., batch=x)`` when given; otherwise, for a plain chain of
``nn.Linear`` layers fed by the model's input (an MLP), a synthetic batch of 512 standard
normal inputs (E[x^2] = 1, the recursion's default), drawn from a private generator seeded 0
(the caller's generator is not consumed). Covered: ``nn.Linear`` and convolutions whose bias is
absent or zero and that are not followed by a normalisation (the norm would undo the scale) nor
called more than once per forward pass; parametrized and tied weights are left as drawn.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._forward import as_inputs, forward_error, hooks, kept_buffers, no_mha_fastpath
from ._layers import is_norm, is_weight_layer

__all__ = ["SYNTHETIC_BATCH", "calibrate"]

#: rows of the synthetic calibration batch (standard error of a layer's measured second moment
#: about sqrt(2 / (512 * width)) for independent units)
SYNTHETIC_BATCH = 512
#: the target second moment of every covered layer's pre-activations (the recursion's q*)
TARGET = 1.0

_COVERED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _covered(name: str, module: nn.Module, link: Any, modules: dict[str, nn.Module]) -> bool:
    if not isinstance(module, _COVERED):
        return False
    if parametrize.is_parametrized(module) or module.weight.is_meta or not module.weight.is_floating_point():
        return False
    b = module.bias
    if isinstance(b, Tensor) and bool(torch.any(b)):
        return False
    through = getattr(link, "through", ()) if link is not None else ()
    return not any(is_norm(modules[t]) for t in through if t in modules)


def _synthetic(model: nn.Module, links: dict[str, Any]) -> tuple[Tensor, ...] | None:
    """A standard normal batch for a plain MLP: every weight layer a ``nn.Linear``, one of them fed
    by the model's input, no normalisation (PReLU and other activation parameters are fine);
    None for anything else."""
    mods = list(model.modules())
    weights = [m for m in mods if is_weight_layer(m)]
    if not weights or not all(isinstance(m, nn.Linear) for m in weights) or any(is_norm(m) for m in mods):
        return None
    first = [link.module for link in links.values() if getattr(link, "fed", None) == "input"]
    if len(first) != 1 or not isinstance(first[0], nn.Linear):
        return None
    w = first[0].weight
    if w.is_meta or not w.is_floating_point():
        return None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SYNTHETIC_BATCH, first[0].in_features, generator=g, dtype=torch.float64)
    return (x.to(device=w.device, dtype=w.dtype),)


def calibrate(model: nn.Module, links: dict[str, Any], only: set[str], batch: Any = None) -> tuple[dict[str, float], str]:
    """Rescale the covered layers of ``model`` (forward order) so that each one's output second
    moment on the calibration batch is :data:`TARGET`; returns ({layer name: factor a_l}, what the
    batch was: ``"batch"``, ``"synthetic"`` or ``""`` when no pass ran). ``only``: the layers that
    may be rescaled (those ``auto`` drew; not tied or computed weights). A failing forward pass on the caller's batch is an error;
    on the synthetic batch (a model whose input is not what its first Linear suggests) the pass
    is skipped."""
    given = batch is not None
    inputs = as_inputs(batch) if given else _synthetic(model, links)
    if inputs is None:
        return {}, ""
    modules = dict(model.named_modules())
    layers = [(name, m) for name, m in modules.items()
              if name in only and _covered(name, m, links.get(name), modules)]
    factors: dict[str, float | None] = {}

    def hook(name: str):
        def post(mod: nn.Module, args: Any, out: Any) -> Any:
            if name in factors or not isinstance(out, Tensor):  # called twice: shared, leave as drawn
                factors[name] = None
                return None
            h = out.detach()
            q = float(torch.linalg.vector_norm(h.float())) ** 2 / max(1, h.numel())
            if not math.isfinite(q) or q <= 0.0:
                factors[name] = None
                return None
            a = math.sqrt(TARGET / q)
            factors[name] = a
            return out * a
        return post

    with kept_buffers(model), hooks() as handles, torch.no_grad(), no_mha_fastpath():
        for name, m in layers:
            handles.append(m.register_forward_hook(hook(name)))
        try:
            model(*inputs)
        except Exception as e:  # noqa: BLE001 - the model's own code
            if given:
                raise forward_error(e, inputs, None, layers) from e
            return {}, ""
    done = {name: a for name, a in factors.items() if a is not None}
    with torch.no_grad():
        for name, a in done.items():
            modules[name].weight.mul_(a)
    return done, "batch" if given else "synthetic"

