"""Which activation consumes each weight layer's output: the graph behind ``auto``.

``find_activations(model)`` traces ``model`` with :func:`torch.fx.symbolic_trace` and, for every
weight layer (:data:`WEIGHT_LAYERS`), follows the layer's output forward through *transparent*
operations (dropout, normalisation, flatten/view/reshape/permute, pooling, padding, identity,
additions such as a bias or a residual, concatenation, indexing) until it reaches

* an activation: an ``nn.Module`` known to :mod:`initlab._activations` (``nn.ReLU``,
  ``nn.LeakyReLU(0.2)`` with its slope, ``nn.GELU``, ...), a function of its table
  (``F.relu``, ``torch.tanh``, ``F.leaky_relu(x, 0.2)`` with the slope read from the call, ...) or a
  tensor method (``x.relu()``);
* or something that ends the search: the model's output, another weight layer, or an operation
  that is neither transparent nor an activation (``softmax``, ``matmul``, ...). The layer is then a
  *readout*: its link has ``activation=None``.

When the output of a layer feeds several consumers that disagree, the first consumer (in
execution order) wins and the link's ``note`` says so. Paths that carry no data (``x.size()``,
the attention weights returned by ``nn.MultiheadAttention``) are ignored.

PyTorch's own transformer layers (``nn.TransformerEncoderLayer``, ``nn.TransformerDecoderLayer``
and the ``nn.TransformerEncoder``/``Decoder``/``Transformer`` stacks) cannot be traced (their fast
path branches on tensor properties), so they are kept opaque and analysed from their known
structure: ``linear1`` feeds the layer's ``activation`` attribute (``F.relu`` by default, or a
module), ``linear2`` and the attention projections feed a residual sum (readout).

A model that cannot be traced (data-dependent control flow, ...) falls back to module
registration order: each layer is linked to the next activation *module* registered after it and
before the next weight layer; functional activations are invisible in that mode. Every link then
has ``traced=False`` and a note giving the reason.
"""
from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._activations import Activation, activation_of_call, is_activation_module, resolve_activation, row_of_method
from ._errors import InitlabError

__all__ = ["WEIGHT_LAYERS", "LayerLink", "find_activations"]

#: Module types whose weights initlab initialises with fan-based schemes.
WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Bilinear,
    nn.Embedding,
    nn.MultiheadAttention,
)


@dataclass(frozen=True)
class LayerLink:
    """The activation that consumes one weight layer's output.

    ``activation`` is None for a readout (nothing recognised follows before the output, another
    weight layer or an unrecognised operation). ``activation_node`` is the qualified name of the
    activation module, or None when the activation is functional (or absent). ``through`` lists the
    qualified names of the modules passed on the way (dropout, norm, flatten, pooling...);
    functional transparent operations are not listed. ``traced`` is False when the model could not
    be traced and registration order was used instead. ``note`` explains anything unusual.
    """

    name: str
    module: nn.Module
    activation: Activation | None
    activation_node: str | None = None
    through: tuple[str, ...] = ()
    traced: bool = True
    note: str = ""

    @property
    def readout(self) -> bool:
        """True when no activation follows the layer."""
        return self.activation is None


# --------------------------------------------------------------------------------------------
# what counts as transparent, an activation, or a dead end

_NORMS: tuple[type[nn.Module], ...] = tuple(
    t for t in (
        nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm, Lazy*
        nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, getattr(nn, "RMSNorm", None),
    ) if t is not None
)
_DROPOUTS: tuple[type[nn.Module], ...] = (nn.modules.dropout._DropoutNd,)
_RESHAPES: tuple[type[nn.Module], ...] = (
    nn.Flatten, nn.Unflatten, nn.Identity, nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle,
    nn.ChannelShuffle,
)
# pooling and padding modules are recognised by their defining torch module
_TRANSPARENT_MODULE_FILES = ("torch.nn.modules.pooling", "torch.nn.modules.padding")

_TRANSPARENT_FUNCTIONS: set[Any] = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, operator.itruediv, operator.neg, operator.pos, operator.getitem,
    torch.add, torch.sub, torch.mul, torch.div, torch.cat, torch.concat, torch.stack, torch.flatten,
    torch.reshape, torch.permute, torch.transpose, torch.swapaxes, torch.movedim, torch.squeeze,
    torch.unsqueeze, torch.chunk, torch.split, torch.narrow, torch.mean, torch.clone, torch.unflatten,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    F.layer_norm, F.batch_norm, F.group_norm, F.instance_norm, F.local_response_norm,
    F.pad, F.interpolate, F.pixel_shuffle, F.pixel_unshuffle,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
}
if hasattr(F, "rms_norm"):
    _TRANSPARENT_FUNCTIONS.add(F.rms_norm)
_TRANSPARENT_METHODS = {
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose",
    "swapaxes", "movedim", "t", "contiguous", "squeeze", "unsqueeze", "add", "add_", "sub", "sub_",
    "mul", "mul_", "div", "div_", "neg", "chunk", "split", "narrow", "expand", "expand_as", "repeat",
    "mean", "clone", "to", "type_as", "float", "double", "half", "bfloat16", "__getitem__",
}
# uses of a value that carry no data forward (shape queries)
_DEAD_FUNCTIONS: set[Any] = {getattr, len}
_DEAD_METHODS = {"size", "dim", "numel", "stride", "data_ptr", "element_size", "nelement", "ndimension"}

# PyTorch blocks that cannot be traced but whose structure is known
_KNOWN_BLOCKS: tuple[type[nn.Module], ...] = (
    nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder,
    nn.TransformerDecoder, nn.Transformer,
)
# modules kept whole (never traced into): weight layers and the known blocks
_OPAQUE: tuple[type[nn.Module], ...] = WEIGHT_LAYERS + _KNOWN_BLOCKS
_TRANSPARENT_MODULES: tuple[type[nn.Module], ...] = _NORMS + _DROPOUTS + _RESHAPES


def _is_activation_module(m: nn.Module) -> bool:
    """Whether ``m`` is an activation module of the table (class check only, reads no parameter)."""
    if isinstance(m, nn.Identity):
        return False  # transparent, not an activation
    return is_activation_module(m)


def _activation_module(m: nn.Module) -> Activation | None:
    """The activation a module computes, or None when it is not an activation module."""
    return resolve_activation(m) if _is_activation_module(m) else None


def _transparent_module(m: nn.Module) -> bool:
    if isinstance(m, _TRANSPARENT_MODULES):
        return True
    return any(cls.__module__ in _TRANSPARENT_MODULE_FILES for cls in type(m).__mro__[:-2])


def _has_weight_layers(m: nn.Module) -> bool:
    return any(isinstance(sub, WEIGHT_LAYERS) for sub in m.modules())


# --------------------------------------------------------------------------------------------
# outcomes of following a value forward

@dataclass(frozen=True)
class _Outcome:
    kind: str  # "act": activation found, "stop": readout, "dead": no data flows on
    activation: Activation | None = None
    activation_node: str | None = None
    through: tuple[str, ...] = ()
    note: str = ""

    def key(self) -> tuple[str, float | None] | None:
        return None if self.activation is None else (self.activation.name, self.activation.param)

    def describe(self) -> str:
        return "readout" if self.activation is None else self.activation.label


_DEAD = _Outcome("dead")
_READOUT = _Outcome("stop")


def _prefix(name: str, out: _Outcome) -> _Outcome:
    return replace(out, through=(name,) + out.through) if out.kind != "dead" else out


def _combine(outcomes: Iterable[_Outcome]) -> _Outcome:
    """First live outcome; a note when the other live consumers disagree with it."""
    live = [o for o in outcomes if o.kind != "dead"]
    if not live:
        return _DEAD
    first = live[0]
    others = sorted({o.describe() for o in live[1:] if o.key() != first.key()})
    if others:
        msg = (f"output also feeds {', '.join(others)}; used the first consumer "
               f"({first.describe()})")
        first = replace(first, note=f"{first.note}; {msg}" if first.note else msg)
    return first


def _attribute_activation(fn: Any) -> Activation | None:
    """The activation stored on a transformer layer: a function, a module, or an unknown callable."""
    act = resolve_activation(fn)
    return None if act.is_identity else act


# --------------------------------------------------------------------------------------------
# links for one module, given what consumes its output

def _leaf_links(module: nn.Module, name: str, after: _Outcome, traced: bool,
                out: dict[str, LayerLink]) -> None:
    """Links for a weight layer or an opaque block whose output is consumed as ``after``."""
    if isinstance(module, nn.MultiheadAttention):
        # in_proj: q, k, v feed the scaled dot product and softmax (linear use: a readout)
        out[name] = LayerLink(name, module, None, None, (), traced,
                              "in_proj feeds the attention softmax (no elementwise activation)")
        if isinstance(getattr(module, "out_proj", None), nn.Linear):
            sub = _join(name, "out_proj")
            out[sub] = _link(sub, module.out_proj, after, traced)
        return
    if isinstance(module, WEIGHT_LAYERS):
        out[name] = _link(name, module, after, traced)
        return
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        _transformer_layer_links(module, name, after, traced, out)
        return
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)):
        layers = list(module.layers)
        for i, layer in enumerate(layers):
            if i + 1 < len(layers):
                nxt = _READOUT  # the next layer starts with attention: a weight layer
            elif getattr(module, "norm", None) is not None:
                nxt = _prefix(_join(name, "norm"), after)
            else:
                nxt = after
            _leaf_links(layer, _join(name, f"layers.{i}"), nxt, traced, out)
        return
    if isinstance(module, nn.Transformer):
        # the encoder's output is the decoder's memory: it feeds cross-attention (a weight layer)
        _leaf_links(module.encoder, _join(name, "encoder"), _READOUT, traced, out)
        _leaf_links(module.decoder, _join(name, "decoder"), after, traced, out)
        return
    # any other opaque block: registration order inside it
    _order_links(module, name, traced, out, after=after,
                 note="opaque module analysed in registration order")


def _transformer_layer_links(layer: nn.Module, name: str, after: _Outcome, traced: bool,
                             out: dict[str, LayerLink]) -> None:
    post_norm = not getattr(layer, "norm_first", False)
    decoder = isinstance(layer, nn.TransformerDecoderLayer)
    # attention blocks: out_proj -> dropout -> residual add (-> norm) -> next weight layer
    attn = [("self_attn", "dropout1", "norm1")]
    if decoder:
        attn.append(("multihead_attn", "dropout2", "norm2"))
    for attr, drop, norm in attn:
        through = (_join(name, drop),) + ((_join(name, norm),) if post_norm else ())
        _leaf_links(getattr(layer, attr), _join(name, attr), _Outcome("stop", through=through),
                    traced, out)
    act = _attribute_activation(layer.activation)
    act_node = _join(name, "activation") if isinstance(layer.activation, nn.Module) else None
    out[_join(name, "linear1")] = LayerLink(
        _join(name, "linear1"), layer.linear1, act, act_node if act is not None else None, (), traced,
        "activation read from the transformer layer's `activation` attribute")
    drop, norm = ("dropout3", "norm3") if decoder else ("dropout2", "norm2")
    nxt = _prefix(_join(name, drop), _prefix(_join(name, norm), after) if post_norm else after)
    out[_join(name, "linear2")] = _link(_join(name, "linear2"), layer.linear2, nxt, traced)


def _link(name: str, module: nn.Module, outcome: _Outcome, traced: bool, note: str = "") -> LayerLink:
    note = "; ".join(n for n in (outcome.note, note) if n)
    act = outcome.activation if outcome.kind == "act" else None
    node = outcome.activation_node if act is not None else None
    return LayerLink(name, module, act, node, outcome.through, traced, note)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# --------------------------------------------------------------------------------------------
# registration-order fallback

def _order_links(model: nn.Module, prefix: str, traced: bool, out: dict[str, LayerLink], *,
                 after: _Outcome = _READOUT, note: str = "") -> None:
    """Link each weight layer to the next activation module registered after it."""
    items: list[tuple[str, nn.Module]] = []

    def walk(m: nn.Module, name: str) -> None:
        if isinstance(m, WEIGHT_LAYERS) or (isinstance(m, _KNOWN_BLOCKS) and name != prefix):
            items.append((name, m))
            return  # its insides are handled by _leaf_links
        if name != prefix and (_is_activation_module(m) or _transparent_module(m)):
            items.append((name, m))
            return
        for child_name, child in m.named_children():
            walk(child, _join(name, child_name))

    if isinstance(model, _OPAQUE):
        _leaf_links(model, prefix, after, traced, out)
        return
    walk(model, prefix)
    for i, (name, m) in enumerate(items):
        if not isinstance(m, _OPAQUE):
            continue
        through: list[str] = []
        outcome = after
        for nxt_name, nxt in items[i + 1:]:
            act = _activation_module(nxt)
            if act is not None:
                outcome = _Outcome("act", act, nxt_name)
                break
            if isinstance(nxt, _OPAQUE):
                outcome = _READOUT
                break
            through.append(nxt_name)
        outcome = replace(outcome, through=tuple(through) + outcome.through)
        if note:
            outcome = replace(outcome, note=note)
        _leaf_links(m, name, outcome, traced, out)


# --------------------------------------------------------------------------------------------
# tracing

class _Tracer(torch.fx.Tracer):
    """Keeps weight layers, activation modules and PyTorch's transformer blocks as leaves,
    including user subclasses of them (the default tracer would trace into those)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # only class checks here: parameters read during tracing would be proxies
        if isinstance(m, _OPAQUE) or _is_activation_module(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _trace(model: nn.Module) -> torch.fx.Graph:
    return _Tracer().trace(model)


def _via(user: torch.fx.Node, value: torch.fx.Node, modules: dict[str, nn.Module],
         memo: dict[torch.fx.Node, _Outcome]) -> _Outcome:
    """What happens to ``value`` when ``user`` consumes it."""
    op, target = user.op, user.target
    if op == "output":
        return _READOUT
    if op == "call_module":
        m = modules[target]  # type: ignore[index]
        act = _activation_module(m)
        if act is not None:
            return _Outcome("act", act, str(target))
        if _transparent_module(m):
            return _prefix(str(target), memo[user])
        if isinstance(m, WEIGHT_LAYERS) or _has_weight_layers(m):
            return _READOUT
        return _Outcome("stop", note=f"stopped at module {target!r} ({type(m).__name__}), "
                                     "not an activation")
    if op == "call_function":
        call = activation_of_call(target, tuple(user.args[1:]), user.kwargs)
        if call is not None:
            act, note = call
            return _Outcome("act", act, None, note=note)
        if target is operator.getitem:
            src = value
            if (src.op == "call_module" and isinstance(modules.get(str(src.target)), nn.MultiheadAttention)
                    and len(user.args) > 1 and user.args[1] == 1):
                return _DEAD  # the attention weights, not the output
            return memo[user]
        if target in _DEAD_FUNCTIONS:
            return _DEAD
        if target in _TRANSPARENT_FUNCTIONS:
            return memo[user]
        return _Outcome("stop", note=f"stopped at {getattr(target, '__name__', target)}(), "
                                     "not an activation")
    if op == "call_method":
        row = row_of_method(target)
        if row is not None:
            return _Outcome("act", resolve_activation(row.name), None)
        if target in _DEAD_METHODS:
            return _DEAD
        if target in _TRANSPARENT_METHODS:
            return memo[user]
        return _Outcome("stop", note=f"stopped at .{target}(), not an activation")
    return _READOUT


def _traced_links(model: nn.Module, graph: torch.fx.Graph) -> dict[str, LayerLink]:
    modules = dict(model.named_modules())
    nodes = list(graph.nodes)
    memo: dict[torch.fx.Node, _Outcome] = {}
    for node in reversed(nodes):  # users come after their inputs: one backward pass
        memo[node] = _combine(_via(u, node, modules, memo) for u in node.users)
    # one outcome per called module (a module called several times: first call wins)
    called: dict[str, list[_Outcome]] = {}
    for node in nodes:
        if node.op == "call_module":
            m = modules[str(node.target)]
            if isinstance(m, WEIGHT_LAYERS) or (_has_weight_layers(m) and not _is_activation_module(m)):
                called.setdefault(str(node.target), []).append(memo[node])
    out: dict[str, LayerLink] = {}
    for name, outcomes in called.items():
        _leaf_links(modules[name], name, _combine(outcomes), True, out)
    return out


def find_activations(model: nn.Module) -> dict[str, LayerLink]:
    """Map every weight layer of ``model`` (by qualified module name) to the activation after it.

    Weight layers are :data:`WEIGHT_LAYERS` (``nn.MultiheadAttention`` gives two links: its own
    name for the fused in_proj, a readout, and ``<name>.out_proj``). The model is traced with
    :mod:`torch.fx`; see the module docstring for the rules and the registration-order fallback
    (``traced=False``) used when tracing fails. Tracing runs no computation, so meta-device models
    work. Layers that are never called as modules in ``forward`` get ``activation=None`` and a note.
    """
    if not isinstance(model, nn.Module):
        raise InitlabError(f"find_activations expects an nn.Module, got {type(model).__name__}")
    out: dict[str, LayerLink] = {}
    if isinstance(model, _OPAQUE):
        _leaf_links(model, "", _READOUT, True, out)
    else:
        try:
            graph = _trace(model)
        except Exception as e:  # noqa: BLE001 - any tracing failure means: use module order
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            _order_links(model, "", False, out,
                         note=f"module order used: symbolic tracing failed ({type(e).__name__}: {reason[:120]})")
        else:
            out = _traced_links(model, graph)
    # every weight layer gets a link, in registration order
    ordered: dict[str, LayerLink] = {}
    for name, m in model.named_modules():
        if not isinstance(m, WEIGHT_LAYERS):
            continue
        if name in out:
            ordered[name] = out[name]
        else:
            traced = next(iter(out.values())).traced if out else True
            ordered[name] = LayerLink(name, m, None, None, (), traced,
                                      "not called as a module in forward (readout assumed)")
    return ordered

