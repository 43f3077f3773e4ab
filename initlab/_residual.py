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

Branches are found from the traced graph (:func:`find_branches`): every addition ``a + b``
(``operator.add``/``iadd``, ``torch.add``, ``Tensor.add``/``add_``) whose inputs both descend
from one node ``x`` (the block's input) is a residual merge. When ``a`` is ``x`` itself (or an
ancestor of ``b``), the branch is every module on the way from ``a`` to ``b``; otherwise
(a projection shortcut such as ResNet's ``downsample``) both sides are paths from the nearest
common ancestor and the side with more weight layers is the branch. The branch's weight layers
(graph order) and its last norm, when that norm comes after its last weight layer (a post-norm:
ResNet's ``bn3``), are what the policies act on; a ``nn.MultiheadAttention`` closes its branch
with its ``out_proj``. Additions whose branch holds another residual merge (a whole stage, a U-Net
skip) or no weight layer are not branches; PyTorch's transformer layers (traced as leaves) give
their attention (``self_attn.out_proj``) and MLP (``linear1``, ``linear2``) branches.

When the model cannot be traced (transformers' models, data-dependent control flow), the
branches are found by the module structure of the model libraries (documented names): a block with a ``downsample`` attribute and ``conv1``, ``conv2`` [, ``conv3``] (and
``bn2``/``bn3``) is a ResNet branch (torchvision, timm); a module with ``fc1``/``fc2``,
``c_fc``/``c_proj``, ``wi``/``wo``, ``lin1``/``lin2`` or ``linear1``/``linear2`` is an MLP branch; an attention output
projection (``c_proj`` of an ``attn``, ``out_proj``, ``proj`` of an ``attn``, ``o``, BERT's
``attention.output.dense`` and ``output.dense``) closes an attention branch.
"""
from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ._conventions import is_conv1d
from ._errors import InitlabError
from ._graph import _trace
from ._layers import is_norm, is_weight_layer

__all__ = ["POLICIES", "Branch", "find_branches", "branches_from_graph", "branches_by_name", "apply_policy", "check_policy"]

POLICIES = ("skipinit", "fixup", "gpt2")
_MLP_PAIRS = (("fc1", "fc2"), ("c_fc", "c_proj"), ("wi", "wo"), ("lin1", "lin2"), ("linear1", "linear2"))


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


def find_branches(model: nn.Module) -> tuple[list[Branch], str]:
    """The residual branches of a model (see the module docstring) and how they were found:
    ``"graph"`` (graph order), or ``"module names (tracing failed: ...)"`` (registration order)."""
    try:
        graph = _trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure: the name-based rule
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return branches_by_name(model), f"module names (tracing failed: {type(e).__name__}: {reason[:100]})"
    return branches_from_graph(model, graph), "graph"


_ADDS = {operator.add, operator.iadd, torch.add}


def _is_add(node: torch.fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADDS) or \
        (node.op == "call_method" and node.target in ("add", "add_"))


def _ancestors(node: torch.fx.Node, memo: dict[torch.fx.Node, frozenset]) -> frozenset:
    """Every node ``node`` depends on (iteratively: deep graphs exceed the recursion limit)."""
    stack = [node]
    while stack:
        n = stack[-1]
        if n in memo:
            stack.pop()
            continue
        todo = [a for a in n.all_input_nodes if a not in memo]
        if todo:
            stack += todo
            continue
        acc: set[torch.fx.Node] = set()
        for a in n.all_input_nodes:
            acc.add(a)
            acc |= memo[a]
        memo[n] = frozenset(acc)
        stack.pop()
    return memo[node]


def _side(node: torch.fx.Node, base: frozenset, memo: dict) -> set[torch.fx.Node]:
    """The nodes on the way to ``node`` (itself included) that are not in ``base``."""
    return ({node} | set(_ancestors(node, memo))) - base


def _layers_of(nodes: Iterable[torch.fx.Node], mods: dict[str, nn.Module],
               order: dict[torch.fx.Node, int]) -> tuple[list[str], str | None]:
    """(weight layers in graph order, the last norm when it follows the last weight layer)."""
    layers: list[str] = []
    norm: str | None = None
    for n in sorted(nodes, key=order.__getitem__):
        if n.op == "get_attr" and isinstance(n.target, str) and n.target.endswith(".weight"):
            owner = n.target[: -len(".weight")]  # a weight read as a tensor (Swin's attention: F-level calls)
            m = mods.get(owner)
            if m is not None and (is_weight_layer(m) or is_conv1d(m)) and owner not in layers:
                layers.append(owner)
                norm = None
            continue
        if n.op != "call_module" or not isinstance(n.target, str):
            continue
        m = mods.get(n.target)
        if isinstance(m, nn.MultiheadAttention):
            layers.append(f"{n.target}.out_proj")
            norm = None
        elif m is not None and (is_weight_layer(m) or is_conv1d(m)) and hasattr(m, "weight"):
            layers.append(n.target)
            norm = None
        elif m is not None and is_norm(m) and isinstance(getattr(m, "weight", None), torch.Tensor) and layers:
            norm = n.target
    return layers, norm


def branches_from_graph(model: nn.Module, graph: torch.fx.Graph) -> list[Branch]:
    """The residual branches of a traced model (see the module docstring), in graph order."""
    mods = dict(model.named_modules())
    order = {n: i for i, n in enumerate(graph.nodes)}
    memo: dict[torch.fx.Node, frozenset] = {}
    merges = [n for n in graph.nodes if _is_add(n) and len([a for a in n.args if isinstance(a, torch.fx.Node)]) == 2]
    found: list[tuple[torch.fx.Node, set[torch.fx.Node]]] = []
    for node in merges:
        a, b = (x for x in node.args if isinstance(x, torch.fx.Node))
        anc_a, anc_b = _ancestors(a, memo), _ancestors(b, memo)
        if a in anc_b or b in anc_a:
            x, y = (a, b) if a in anc_b else (b, a)
            sides = [_side(y, _ancestors(x, memo) | {x}, memo)]
        else:
            common = anc_a & anc_b
            if not common:
                continue
            sides = [_side(a, common, memo), _side(b, common, memo)]
        best = max(sides, key=lambda nodes: len(_layers_of(nodes, mods, order)[0]))
        found.append((node, best))
    residual = {node for node, nodes in found if _layers_of(nodes, mods, order)[0]}
    out: list[Branch] = []
    for node, nodes in found:
        layers, norm = _layers_of(nodes, mods, order)
        if layers and not (nodes & (residual - {node})):
            out.append(Branch(layers, norm, "resnet" if norm else "graph"))
    for n in graph.nodes:  # PyTorch's transformer layers are leaves of the trace
        m = mods.get(n.target) if n.op == "call_module" and isinstance(n.target, str) else None
        if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            out += _transformer_branches(n.target, m)
    return out


def _transformer_branches(name: str, m: nn.Module) -> list[Branch]:
    out = [Branch([f"{name}.self_attn.out_proj"], None, "attention")]
    if isinstance(m, nn.TransformerDecoderLayer):
        out.append(Branch([f"{name}.multihead_attn.out_proj"], None, "attention"))
    out.append(Branch([f"{name}.linear1", f"{name}.linear2"]))
    return out


def branches_by_name(model: nn.Module) -> list[Branch]:
    """The residual branches of a model by module names (see the module docstring), in
    registration order: the rule for models that cannot be traced."""
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
