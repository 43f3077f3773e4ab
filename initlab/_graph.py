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
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import _layers
from ._activations import (Activation, activation_functions, activation_of_call, is_activation_module,
                           resolve_activation, row_of_method)
from ._errors import InitlabError
from ._fingerprint import fingerprint

__all__ = ["WEIGHT_LAYERS", "LayerLink", "find_activations"]

#: Module types whose weights initlab initialises (the layer table's weight layers; kept here for
#: code that imported it from this module).
WEIGHT_LAYERS = _layers.WEIGHT_LAYERS


@dataclass(frozen=True)
class LayerLink:
    """The activation that consumes one weight layer's output.

    ``activation`` is None for a readout (nothing recognised follows before the output, another
    weight layer or an unrecognised operation). ``activation_node`` is the qualified name of the
    activation module, or None when the activation is functional (or absent). ``through`` lists the
    qualified names of the modules passed on the way (dropout, norm, flatten, pooling...);
    functional transparent operations are not listed. ``traced`` is False when the model could not
    be traced and registration order was used instead. ``note`` explains anything unusual.
    ``fed``/``fed_by`` say what the layer's *input* is (``auto``'s variance recursion reads it):
    the model's input, the output of activation ``fed_by`` (reached backwards through dropout,
    reshapes and pooling), or anything else (a norm, a residual sum, an embedding: unit second
    moment assumed). Without a trace, the previous weight layer's activation in registration order.
    """

    name: str
    module: nn.Module
    activation: Activation | None
    activation_node: str | None = None
    through: tuple[str, ...] = ()
    traced: bool = True
    note: str = ""
    fed: str = "other"  # what feeds the layer: "input" (the model's input), "activation" (fed_by), "other"
    fed_by: Activation | None = None  # the activation whose output the layer reads (fed == "activation")

    @property
    def readout(self) -> bool:
        """True when no activation follows the layer."""
        return self.activation is None


# --------------------------------------------------------------------------------------------
# what counts as transparent, an activation, or a dead end

# modules: the layer table says which are transparent (normalisation, dropout, reshapes,
# identity, resampling, pooling, padding); functions and Tensor methods here
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


def _is_activation_module(m: nn.Module) -> bool:
    """Whether ``m`` is an activation module of the table (class check only, reads no parameter);
    a module the layer table calls transparent (``nn.Identity``) is not an activation here."""
    return not _layers.is_transparent(m) and is_activation_module(m)


def _activation_module(m: nn.Module) -> Activation | None:
    """The activation a module computes, or None when it is not an activation module."""
    return resolve_activation(m) if _is_activation_module(m) else None


def _fingerprinted_module(m: nn.Module) -> Activation | None:
    """For the registration-order fallback: the activation a module the table does not know
    computes (HF's ``NewGELUActivation``, a user ``Swish``), by fingerprint; only modules with
    no children and no parameters that no table calls transparent are probed."""
    if (next(m.children(), None) is not None or next(m.parameters(), None) is not None
            or _layers.is_transparent(m) or _layers.is_weight_layer(m) or isinstance(m, _KNOWN_BLOCKS)):
        return None
    return fingerprint(m, type(m).__name__)


def _order_activation(m: nn.Module) -> Activation | None:
    """An activation module of the table, or one recognised by fingerprint."""
    act = _activation_module(m)
    return act if act is not None else _fingerprinted_module(m)


def _has_weight_layers(m: nn.Module) -> bool:
    return any(_layers.is_weight_layer(sub) for sub in m.modules())


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
    if _layers.is_weight_layer(module):
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
    out[_join(name, "linear2")] = replace(_link(_join(name, "linear2"), layer.linear2, nxt, traced),
                                          fed="activation" if act is not None else "other", fed_by=act)


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
    acts: dict[str, Activation | None] = {}
    barriers: set[str] = set()

    def walk(m: nn.Module, name: str) -> None:
        if _layers.is_weight_layer(m) or (isinstance(m, _KNOWN_BLOCKS) and name != prefix):
            items.append((name, m))
            return  # its insides are handled by _leaf_links
        if name != prefix and (_layers.is_transparent(m) or _is_activation_module(m)):
            items.append((name, m))
            return
        if name != prefix and next(m.children(), None) is None and next(m.parameters(), None) is not None:
            items.append((name, m))  # a layer with weights the table does not know (HF's Conv1D): a barrier
            barriers.add(name)
            return
        if name != prefix:
            acts[name] = _fingerprinted_module(m)
            if acts[name] is not None:
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
            act = acts[nxt_name] if nxt_name in acts else _activation_module(nxt)
            if act is not None:
                outcome = _Outcome("act", act, nxt_name)
                break
            if isinstance(nxt, _OPAQUE) or nxt_name in barriers:
                outcome = _READOUT
                break
            through.append(nxt_name)
        outcome = replace(outcome, through=tuple(through) + outcome.through)
        if note:
            outcome = replace(outcome, note=note)
        _leaf_links(m, name, outcome, traced, out)


# --------------------------------------------------------------------------------------------
# tracing

def _user_functions() -> tuple[Callable[..., Any], ...]:
    """The table's Python functions from outside torch (a registered ``squareplus``): fx would trace
    into them, so they are wrapped as single calls. torch's own functions reach the graph as
    calls already (through ``__torch_function__``)."""
    return tuple(f for f in activation_functions()
                 if isinstance(f, types.FunctionType) and not (f.__module__ or "").startswith("torch"))


class _Tracer(torch.fx.Tracer):
    """Keeps weight layers, activation modules and PyTorch's transformer blocks as leaves,
    including user subclasses of them (the default tracer would trace into those), and calls
    of the table's user functions as single nodes."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=_user_functions())

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
    if user.op == "call_module":
        return _via_module(user, modules, memo)
    if user.op == "call_function":
        return _via_function(user, value, modules, memo)
    if user.op == "call_method":
        return _via_method(user, memo)
    return _READOUT  # the output, or anything else that ends the search


def _via_module(user: torch.fx.Node, modules: dict[str, nn.Module], memo: dict[torch.fx.Node, _Outcome]) -> _Outcome:
    target = str(user.target)
    m = modules[target]
    act = _activation_module(m)
    if act is not None:
        return _Outcome("act", act, target)
    if _layers.is_transparent(m):
        return _prefix(target, memo[user])
    if _layers.is_weight_layer(m) or _has_weight_layers(m):
        return _READOUT
    return _Outcome("stop", note=f"stopped at module {target!r} ({type(m).__name__}), not an activation")


def _via_function(user: torch.fx.Node, value: torch.fx.Node, modules: dict[str, nn.Module],
                  memo: dict[torch.fx.Node, _Outcome]) -> _Outcome:
    target = user.target
    call = activation_of_call(target, tuple(user.args[1:]), user.kwargs)
    if call is not None:
        act, note = call
        return _Outcome("act", act, None, note=note)
    if target is operator.getitem:
        if (value.op == "call_module" and isinstance(modules.get(str(value.target)), nn.MultiheadAttention)
                and len(user.args) > 1 and user.args[1] == 1):
            return _DEAD  # the attention weights, not the output
        return memo[user]
    if target in _DEAD_FUNCTIONS:
        return _DEAD
    if target in _TRANSPARENT_FUNCTIONS:
        return memo[user]
    return _Outcome("stop", note=f"stopped at {getattr(target, '__name__', target)}(), not an activation")


def _via_method(user: torch.fx.Node, memo: dict[torch.fx.Node, _Outcome]) -> _Outcome:
    target = user.target
    row = row_of_method(target)
    if row is not None:
        return _Outcome("act", resolve_activation(row.name), None)
    if target in _DEAD_METHODS:
        return _DEAD
    if target in _TRANSPARENT_METHODS:
        return memo[user]
    return _Outcome("stop", note=f"stopped at .{target}(), not an activation")


# --------------------------------------------------------------------------------------------
# inline expressions: a chain of elementwise ops recognised by what it computes

_ELEMENTWISE_FUNCTIONS: set[Any] = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.pow, torch.clamp, torch.clip,
    torch.clamp_min, torch.clamp_max, torch.exp, torch.log1p, torch.abs, torch.erf, torch.sqrt,
    torch.maximum, torch.minimum, torch.where, torch.sign, torch.square, torch.expm1,
}
_ELEMENTWISE_METHODS = {
    "add", "sub", "mul", "div", "neg", "pow", "clamp", "clip", "clamp_min", "clamp_max", "exp",
    "log1p", "abs", "erf", "sqrt", "square", "expm1", "sign", "float", "double", "to", "contiguous",
    "__add__", "__mul__", "__sub__", "__truediv__", "__radd__", "__rmul__",
}
# ops that change no value (casts): a table activation reached through them keeps the plain reading
_PLAIN_FUNCTIONS: set[Any] = set()
_PLAIN_METHODS = {"float", "double", "to", "contiguous"}


def _node_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    out: list[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), lambda n: out.append(n) or n)
    return out


def _elementwise_kind(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """"act" (a table activation), "plain" (transparent arithmetic), "op" (another elementwise op or
    an unknown callable of one tensor, checked later by the fingerprint), or None (not elementwise)."""
    if node.op == "call_module":
        m = modules.get(str(node.target))
        if m is None or _layers.is_weight_layer(m) or _layers.is_transparent(m) or _has_weight_layers(m):
            return None
        return "act" if _is_activation_module(m) else "op"
    if node.op == "call_function":
        if activation_of_call(node.target, (), {}) is not None:
            return "act"
        if node.target in _ELEMENTWISE_FUNCTIONS:
            return "plain" if node.target in _PLAIN_FUNCTIONS else "op"
        if node.target in _TRANSPARENT_FUNCTIONS or node.target in _DEAD_FUNCTIONS:
            return None
        return "op" if len(_node_inputs(node)) == 1 else None
    if node.op == "call_method":
        if row_of_method(node.target) is not None:
            return "act"
        if node.target in _ELEMENTWISE_METHODS:
            return "plain" if node.target in _PLAIN_METHODS else "op"
    return None


def _region(start: torch.fx.Node, modules: dict[str, nn.Module], order: dict[torch.fx.Node, int]
            ) -> tuple[list[torch.fx.Node], dict[torch.fx.Node, str]]:
    """The elementwise expression growing from ``start``: every op whose tensor inputs all come
    from ``start`` or from the region, in graph order."""
    region = {start}
    kinds: dict[torch.fx.Node, str] = {}
    pending = sorted(start.users, key=order.__getitem__)
    seen: set[torch.fx.Node] = set(pending)
    while pending:
        node = pending.pop(0)
        kind = _elementwise_kind(node, modules)
        if kind is None or not all(n in region for n in _node_inputs(node)):
            continue
        region.add(node)
        kinds[node] = kind
        for u in node.users:
            if u not in seen:
                seen.add(u)
                pending.append(u)
        pending.sort(key=order.__getitem__)
    return sorted(region, key=order.__getitem__), kinds


def _expression_outcome(start: torch.fx.Node, modules: dict[str, nn.Module], model: nn.Module,
                        order: dict[torch.fx.Node, int], sinks_found: dict[torch.fx.Node, Activation]
                        ) -> _Outcome | None:
    """The activation an inline expression after ``start`` computes (``x * torch.sigmoid(x)``,
    ``x.clamp(min=0)``...), by fingerprint; None when the plain reading applies (a single table
    activation, reached through transparent arithmetic) or the expression is not elementwise."""
    nodes, kinds = _region(start, modules, order)
    inside = set(nodes)
    sinks = [n for n in nodes if n.op != "output" and any(u not in inside for u in n.users)]
    if len(sinks) != 1 or sinks[0] is start or any(u not in inside for u in start.users):
        return None
    acts = sum(k == "act" for k in kinds.values())
    reused = any(sum(a in inside for a in _node_inputs(n)) > 1 for n in kinds)
    if not reused and acts <= 1 and all(k != "op" for k in kinds.values()):
        return None
    sink = sinks[0]
    keep = [n for n in nodes if n is start or order[n] <= order[sink]]
    act = fingerprint(_subgraph(model, keep, start, sink), _describe(keep[1:]))
    if act is None:
        return None
    sinks_found[sink] = act
    node = str(sink.target) if sink.op == "call_module" else None
    what = ("a custom activation, not in the table (gains by quadrature)" if act.custom else act.label)
    return _Outcome("act", act, node, note=f"recognised by what it computes: {_describe(keep[1:])} is {what}")


class _Ref:
    """The value of the ``i``-th node of an :class:`_Expression` (0: its input)."""

    __slots__ = ("i",)

    def __init__(self, i: int) -> None:
        self.i = i


class _Expression:
    """An inline expression as a function of its start node's value: the region's nodes evaluated
    in graph order, as a ``GraphModule`` of them computes it, without generating and compiling that
    module's code (which cost ~0.8 ms per expression: efficientnet_b0's trace has nine). Holds no
    fx node: the targets (functions, method names, the called submodules) and the arguments, with
    :class:`_Ref` where a node's value goes."""

    def __init__(self, model: nn.Module, nodes: list[torch.fx.Node], start: torch.fx.Node,
                 sink: torch.fx.Node) -> None:
        index = {start: 0}
        self.steps: list[tuple[str, Any, Any, Any]] = []
        for n in nodes:
            if n is start:
                continue
            index[n] = len(index)
            target = model.get_submodule(str(n.target)) if n.op == "call_module" else n.target
            args = torch.fx.node.map_arg(n.args, lambda a: _Ref(index[a]))
            kwargs = torch.fx.node.map_arg(n.kwargs, lambda a: _Ref(index[a]))
            self.steps.append((n.op, target, args, kwargs))
        self.out = index[sink]

    def __call__(self, x: Any) -> Any:
        vals = [x]

        def value(a: Any) -> Any:
            return vals[a.i] if isinstance(a, _Ref) else a
        for op, target, args, kwargs in self.steps:
            args = torch.fx.node.map_aggregate(args, value)
            kwargs = torch.fx.node.map_aggregate(kwargs, value)
            if op == "call_method":
                vals.append(getattr(args[0], target)(*args[1:], **kwargs))
            else:  # call_function, call_module (a region holds only these and methods)
                vals.append(target(*args, **kwargs))
        return vals[self.out]


def _subgraph(model: nn.Module, nodes: list[torch.fx.Node], start: torch.fx.Node,
              sink: torch.fx.Node) -> _Expression:
    return _Expression(model, nodes, start, sink)


def _describe(nodes: list[torch.fx.Node]) -> str:
    names = [str(getattr(n.target, "__name__", n.target)) for n in nodes]
    return "expression " + " -> ".join(names)


def _traced_links(model: nn.Module, graph: torch.fx.Graph) -> dict[str, LayerLink]:
    modules = dict(model.named_modules())
    nodes = list(graph.nodes)
    memo: dict[torch.fx.Node, _Outcome] = {}
    order = {n: i for i, n in enumerate(nodes)}
    sinks: dict[torch.fx.Node, Activation] = {}
    for node in reversed(nodes):  # users come after their inputs: one backward pass
        expr = _expression_outcome(node, modules, model, order, sinks) if node.op != "output" else None
        memo[node] = expr if expr is not None else _combine(_via(u, node, modules, memo) for u in node.users)
    # one outcome per called module (a module called several times: first call wins)
    called: dict[str, list[_Outcome]] = {}
    for node in nodes:
        if node.op == "call_module":
            m = modules[str(node.target)]
            if _layers.is_weight_layer(m) or (_has_weight_layers(m) and not _is_activation_module(m)):
                called.setdefault(str(node.target), []).append(memo[node])
    out: dict[str, LayerLink] = {}
    for name, outcomes in called.items():
        _leaf_links(modules[name], name, _combine(outcomes), True, out)
    for node in nodes:
        name = str(node.target)
        if node.op == "call_module" and name in out and out[name].fed == "other" and node.args:
            fed, act = _source(node.args[0], modules, sinks)
            out[name] = replace(out[name], fed=fed, fed_by=act)
    return out


_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_PASS_BACK_METHODS = {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose",
                      "swapaxes", "movedim", "t", "contiguous", "squeeze", "unsqueeze", "to", "type_as", "float",
                      "double", "half", "bfloat16", "__getitem__", "expand", "expand_as"}


def _source(node: Any, modules: dict[str, nn.Module], sinks: dict[torch.fx.Node, Activation]
            ) -> tuple[str, Activation | None]:
    """What a layer's input is, walking backwards through dropout, reshapes and pooling:
    ("input", None), ("activation", phi) or ("other", None)."""
    while isinstance(node, torch.fx.Node):
        if node in sinks:
            return "activation", sinks[node]
        if node.op == "placeholder":
            return "input", None
        nxt: Any = None
        if node.op == "call_module":
            m = modules[str(node.target)]
            act = _activation_module(m)
            if act is not None:
                return ("other", None) if act.is_identity else ("activation", act)
            if _layers.is_transparent(m) and not isinstance(m, _NORMS) and node.args:
                nxt = node.args[0]
        elif node.op == "call_function":
            call = activation_of_call(node.target, tuple(node.args[1:]), node.kwargs)
            if call is not None:
                return "activation", call[0]
            if node.target in _TRANSPARENT_FUNCTIONS and node.target not in _ARITHMETIC and node.args:
                nxt = node.args[0]
        elif node.op == "call_method":
            row = row_of_method(node.target)
            if row is not None:
                return "activation", resolve_activation(row.name)
            if node.target in _PASS_BACK_METHODS and node.args:
                nxt = node.args[0]
        if nxt is None:
            return "other", None
        node = nxt
    return "other", None


_ARITHMETIC = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
               operator.truediv, operator.itruediv, operator.neg, operator.pos, torch.add, torch.sub, torch.mul,
               torch.div, torch.cat, torch.concat, torch.stack, torch.mean, F.layer_norm, F.batch_norm,
               F.group_norm, F.instance_norm, F.local_response_norm} | ({F.rms_norm} if hasattr(F, "rms_norm") else set())


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
    return _fill_fed(_ordered_links(model, out))


def _fill_fed(links: dict[str, LayerLink]) -> dict[str, LayerLink]:
    """Without a trace: each layer is fed by the activation of the previous weight layer in
    registration order ("input" for the first)."""
    out: dict[str, LayerLink] = {}
    prev: LayerLink | None = None
    for name, link in links.items():
        if link.fed == "other" and not link.traced:
            if prev is None:
                link = replace(link, fed="input")
            elif prev.activation is not None and not prev.activation.is_identity:
                link = replace(link, fed="activation", fed_by=prev.activation)
        out[name] = link
        prev = link
    return out


def _ordered_links(model: nn.Module, out: dict[str, LayerLink]) -> dict[str, LayerLink]:
    """Every weight layer gets a link, in registration order."""
    ordered: dict[str, LayerLink] = {}
    for name, m in model.named_modules():
        if not _layers.is_weight_layer(m):
            continue
        if name in out:
            ordered[name] = out[name]
        else:
            traced = next(iter(out.values())).traced if out else True
            ordered[name] = LayerLink(name, m, None, None, (), traced,
                                      "not called as a module in forward (readout assumed)")
    return ordered

