"""Residual-branch policies: ``init_model(model, ..., residual="skipinit"|"fixup"|"gpt2")``.

A residual network computes x + f(x) per block; with the branches f at unit gain the variance of
the stream grows with the number L of branches. Three published answers, applied after the
per-layer initialisation:

* ``"skipinit"`` (De & Smith 2020, "Batch normalization biases residual blocks towards the
  identity function"): each branch starts as zero, so every block is the identity at init. The
  last normalisation of the branch gets weight 0 (torchvision's ``zero_init_residual``, timm's
  ``zero_init_last``); a branch without one gets its last projection zeroed.
* ``"fixup"`` (Zhang, Dauphin & Ma 2019, "Fixup initialization"): the last weight layer of each
  branch is zeroed and the other m - 1 weight layers of a branch of m layers are scaled by
  L^(-1/(2m-2)) (m = 1: only the zeroing).
* ``"gpt2"`` (Radford et al. 2019, GPT-2): the last projection of each branch is scaled by
  1/sqrt(N), N the number of residual branches (2 per transformer layer: attention and MLP; from
  the transformers config ``n_layer``/``num_hidden_layers`` when the model has one, else the
  branches found).

Branches are found by the module structure of the model libraries (documented names, not a
trace): a block with a ``downsample`` attribute and ``conv1``, ``conv2`` [, ``conv3``] (and
``bn2``/``bn3``) is a ResNet branch (torchvision, timm); a module with ``fc1``/``fc2``,
``c_fc``/``c_proj``, ``wi``/``wo`` or ``lin1``/``lin2`` is an MLP branch; an attention output
projection (``c_proj`` of an ``attn``, ``out_proj``, ``proj`` of an ``attn``, ``o``, BERT's
``attention.output.dense`` and ``output.dense``) closes an attention branch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ._errors import InitlabError

__all__ = ["POLICIES", "Branch", "find_branches", "apply_policy", "check_policy"]

POLICIES = ("skipinit", "fixup", "gpt2")
_MLP_PAIRS = (("fc1", "fc2"), ("c_fc", "c_proj"), ("wi", "wo"), ("lin1", "lin2"))


@dataclass
class Branch:
    """One residual branch: its weight layers in order (names) and its last norm (or None)."""

    layers: list[str]
    norm: str | None = None
    kind: str = "mlp"
    scaled: list[str] = field(default_factory=list)


def _attention_output(name: str, parent: str) -> bool:
    last = name.rsplit(".", 1)[-1]
    return (last == "out_proj" or last == "o" or (last in ("c_proj", "proj") and "attn" in parent.rsplit(".", 1)[-1])
            or name.endswith("attention.output.dense"))


def find_branches(model: nn.Module) -> list[Branch]:
    """The residual branches of a model (see the module docstring), in registration order."""
    out: list[Branch] = []
    taken: set[str] = set()
    for name, m in model.named_modules():
        pre = f"{name}." if name else ""
        kids = dict(m.named_children())
        if hasattr(m, "downsample") and "conv1" in kids and "conv2" in kids:
            convs = [f"{pre}{c}" for c in ("conv1", "conv2", "conv3") if c in kids]
            bn = next((f"{pre}{b}" for b in ("bn3", "bn2") if b in kids and len(convs) == int(b[-1])), None)
            out.append(Branch(convs, bn, "resnet"))
            continue
        for a, b in _MLP_PAIRS:
            if a in kids and b in kids and f"{pre}{b}" not in taken and hasattr(kids[b], "weight"):
                out.append(Branch([f"{pre}{a}", f"{pre}{b}"]))
                taken.add(f"{pre}{b}")
                break
        for child in kids:
            full = f"{pre}{child}"
            if full not in taken and _attention_output(full, name) and hasattr(kids[child], "weight"):
                out.append(Branch([full], None, "attention"))
                taken.add(full)
        if name.endswith("output") and not name.endswith("attention.output") and "dense" in kids \
                and f"{pre}dense" not in taken and hasattr(model.get_submodule(name.rsplit(".output", 1)[0]),
                                                           "intermediate"):
            out.append(Branch([f"{name.rsplit('.output', 1)[0]}.intermediate.dense", f"{pre}dense"]))
            taken.add(f"{pre}dense")
    return out


def _depth(model: nn.Module, branches: list[Branch]) -> int:
    config = getattr(model, "config", None)
    layers = getattr(config, "n_layer", None) or getattr(config, "num_hidden_layers", None)
    return 2 * int(layers) if isinstance(layers, int) and layers > 0 else len(branches)


def check_policy(policy: object) -> str | None:
    if policy is None or policy in POLICIES:
        return policy  # type: ignore[return-value]
    raise InitlabError(f"residual must be None or one of {', '.join(map(repr, POLICIES))}, got {policy!r}")


@torch.no_grad()
def apply_policy(model: nn.Module, policy: str, branches: list[Branch]) -> dict[str, str]:
    """Apply ``policy`` to the branches; returns module name -> what was done (for the report)."""
    mods = dict(model.named_modules())
    n = len(branches)
    done: dict[str, str] = {}

    def weight(name: str):
        return mods[name].weight

    for br in branches:
        last = br.layers[-1]
        if policy == "skipinit":
            target = br.norm or last
            weight(target).zero_()
            done[target] = "skipinit: zero (De & Smith 2020)"
        elif policy == "fixup":
            m = len(br.layers)
            weight(last).zero_()
            done[last] = "fixup: zero (Zhang et al. 2019)"
            if m > 1:
                s = n ** (-1.0 / (2 * m - 2))
                for lname in br.layers[:-1]:
                    weight(lname).mul_(s)
                    done[lname] = f"fixup: x{s:.4g} (L={n}, m={m})"
        else:
            s = _depth(model, branches) ** -0.5
            weight(last).mul_(s)
            done[last] = f"gpt2: x{s:.4g} (1/sqrt({_depth(model, branches)}))"
    return done
