"""The layer table: which ``nn`` modules are weight layers, normalisations or pass-through, and
what initlab needs to know about each; plus :func:`mlp`, the one MLP builder.

Every part of initlab asks this table (``is_weight_layer(m)``, ``is_norm(m)``, ...) instead of
keeping its own class list:

* **weight layers** (``role="weight"``): initialised by ``init_model`` with fan-based schemes,
  linked to their activation by ``find_activations``, measured by ``probe``. ``affine`` ones
  compute ``h = W x + b`` of one input (Linear, Conv, ConvTranspose): LSUV fits them and the
  variance recursion chains them; ``modeled`` ones are modeled by the recursion (the affine
  ones, and Embedding: a one-hot input);
* **normalisations** (``role="norm"``): weight 1, bias 0 at init; transparent for the
  activation search;
* **pass-through** modules (``role="pass"``: dropout, reshapes, identity, resampling; pooling
  and padding too, recognised by their defining torch module): transparent for the activation
  search. ``plain`` ones leave the values as they are (up to dropout's noise), so a chain of
  the variance recursion passes them.

``fans`` names the rule :func:`initlab.fans` applies to the layer's weight (``"conv"``,
``"attention"``, ``"embedding"``, ``"bilinear"``; ``"shape"``: the PyTorch layout).
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from torch import Tensor, nn

from ._activations import resolve_activation
from ._errors import InitlabError

__all__ = ["LayerRow", "LAYERS", "WEIGHT_LAYERS", "NORM_LAYERS", "AFFINE_LAYERS", "layer_row", "is_weight_layer",
           "is_norm", "is_transparent", "is_plain", "is_affine", "is_stock_affine", "is_modeled", "is_one_hot", "fan_rule",
           "kind_name", "init_weights", "init_biases", "output_layer", "output_weight", "output_bias", "calls_children_functionally",
           "channel_dim", "describe_input", "attr", "guess_input_shape", "output_width", "activation_module", "mlp"]

ROLES = ("weight", "norm", "pass", "other")


@dataclass(frozen=True)
class LayerRow:
    """One row of the layer table (see the module docstring for what each fact is for)."""

    cls: type[nn.Module]
    role: str
    affine: bool = False  # h = W x + b of one input
    modeled: bool = False  # the variance recursion models it
    plain: bool = False  # pass-through that leaves the values unchanged
    fans: str = "shape"  # the fan rule of its weight
    fused: bool = False  # its submodules are applied functionally (never called as modules)
    one_hot: bool = False  # its input is an index, a one-hot vector: fan_in 1, E[x^2] = 1

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"layer role must be one of {ROLES}, got {self.role!r}")


def _weights(*classes: type[nn.Module], **facts: Any) -> tuple[LayerRow, ...]:
    return tuple(LayerRow(c, "weight", **facts) for c in classes)


def _passes(*classes: type[nn.Module], **facts: Any) -> tuple[LayerRow, ...]:
    return tuple(LayerRow(c, "pass", **facts) for c in classes)


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORMS = (nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm, Lazy*
          nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, getattr(nn, "RMSNorm", None))

#: the table, most specific rows first (a module takes the first row it is an instance of)
LAYERS: tuple[LayerRow, ...] = (
    *_weights(nn.Linear, affine=True, modeled=True),
    *_weights(*_CONVS, affine=True, modeled=True, fans="conv"),
    *_weights(nn.Bilinear, fans="bilinear"),
    *_weights(nn.Embedding, modeled=True, fans="embedding", one_hot=True),
    *_weights(nn.MultiheadAttention, fans="attention", fused=True),
    LayerRow(nn.EmbeddingBag, "other", fans="embedding"),  # reset_parameters() at init; fans know it
    *(LayerRow(c, "norm") for c in _NORMS if c is not None),
    *_passes(nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity, nn.Flatten,
             nn.Unflatten, plain=True),
    *_passes(nn.modules.dropout._DropoutNd, nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle),
)
# pooling and padding modules are pass-through, recognised by their defining torch module
_PASS_MODULE_FILES = ("torch.nn.modules.pooling", "torch.nn.modules.padding")


def _classes(role: str, **facts: Any) -> tuple[type[nn.Module], ...]:
    return tuple(r.cls for r in LAYERS if r.role == role and all(getattr(r, k) == v for k, v in facts.items()))


#: module types whose weights initlab initialises with fan-based schemes
WEIGHT_LAYERS: tuple[type[nn.Module], ...] = _classes("weight")
#: normalisation layers: weight 1, bias 0, running statistics reset
NORM_LAYERS: tuple[type[nn.Module], ...] = _classes("norm")
#: weight layers computing h = W x + b of one input (Linear, Conv, ConvTranspose)
AFFINE_LAYERS: tuple[type[nn.Module], ...] = _classes("weight", affine=True)


@lru_cache(maxsize=None)
def _row_of_type(cls: type) -> LayerRow | None:
    return next((r for r in LAYERS if issubclass(cls, r.cls)), None)


def layer_row(m: nn.Module) -> LayerRow | None:
    """The table row of a module (the first row whose class it is an instance of), or None."""
    return _row_of_type(type(m))


def _role(m: nn.Module) -> str | None:
    row = layer_row(m)
    return None if row is None else row.role


def is_weight_layer(m: nn.Module) -> bool:
    """A layer initlab initialises with fan-based schemes (:data:`WEIGHT_LAYERS`)."""
    return _role(m) == "weight"


def is_norm(m: nn.Module) -> bool:
    """A normalisation layer (BatchNorm, InstanceNorm, LayerNorm, GroupNorm, RMSNorm, LocalResponseNorm)."""
    return _role(m) == "norm"


def is_transparent(m: nn.Module) -> bool:
    """A module the activation search looks through: normalisation or pass-through (dropout,
    reshapes, identity, resampling, pooling, padding)."""
    if _role(m) in ("norm", "pass"):
        return True
    return any(cls.__module__ in _PASS_MODULE_FILES for cls in type(m).__mro__[:-2])


def _fact(m: nn.Module, name: str) -> bool:
    """A boolean fact of the module's layer-table row (False for modules the table does not know)."""
    row = layer_row(m)
    return row is not None and bool(getattr(row, name))


def is_plain(m: nn.Module) -> bool:
    """A pass-through module that leaves the values unchanged (dropout, identity, flatten, unflatten)."""
    return _fact(m, "plain")


def is_affine(m: nn.Module) -> bool:
    """A weight layer computing h = W x + b of one input (Linear, Conv, ConvTranspose; subclasses too)."""
    return _fact(m, "affine")


def is_stock_affine(m: nn.Module) -> bool:
    """An affine layer of a stock class (not a subclass, whose forward may do more)."""
    return type(m) in AFFINE_LAYERS


def is_modeled(m: nn.Module) -> bool:
    """A weight layer the variance recursion models (the affine ones, and Embedding)."""
    return _fact(m, "modeled")


def is_one_hot(m: nn.Module) -> bool:
    """A weight layer whose input is an index, i.e. a one-hot vector (Embedding)."""
    return _fact(m, "one_hot")


def fan_rule(m: nn.Module) -> str:
    """The fan rule of the module's weight (see the module docstring)."""
    row = layer_row(m)
    return "shape" if row is None else row.fans


def calls_children_functionally(m: nn.Module) -> bool:
    """Whether the module applies its submodules functionally (MultiheadAttention's out_proj)."""
    row = layer_row(m)
    return row is not None and row.fused


def kind_name(m: nn.Module) -> str:
    """The layer's kind for reports: the table class of a weight layer (``Linear`` for
    ``NonDynamicallyQuantizableLinear`` and user subclasses), else the module's own class."""
    row = layer_row(m)
    return row.cls.__name__ if row is not None and row.role == "weight" else type(m).__name__


# --------------------------------------------------------------------------------------------
# the tensors of a weight layer


def attr(m: nn.Module, name: str) -> Any:
    """``getattr(m, name, None)``; a registered parameter is read from ``m._parameters`` (no
    ``Module.__getattr__``, which costs a microsecond or two: a parameter's name cannot also be
    an attribute, so it is the same object)."""
    params = m._parameters
    return params[name] if name in params else getattr(m, name, None)


def init_weights(m: nn.Module) -> list[tuple[str, Tensor, int]]:
    """(parameter name, tensor, blocks) to initialise for a weight layer: MultiheadAttention's
    fused in_proj_weight (3E, E) is three (E, E) blocks, its separate q/k/v weights one each."""
    if isinstance(m, nn.MultiheadAttention):
        if m.in_proj_weight is not None:
            return [("in_proj_weight", m.in_proj_weight, 3)]
        return [(n, getattr(m, n), 1) for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight")]
    w = m._parameters.get("weight")
    return [("weight", m.weight if w is None else w, 1)]


def init_biases(m: nn.Module) -> list[Tensor]:
    """The bias tensors of a weight layer that ``init_model`` sets (MultiheadAttention: in_proj_bias,
    bias_k, bias_v; out_proj is a Linear of its own)."""
    names = ("in_proj_bias", "bias_k", "bias_v") if isinstance(m, nn.MultiheadAttention) else ("bias",)
    return [t for t in (attr(m, n) for n in names) if isinstance(t, Tensor)]


def output_layer(m: nn.Module) -> nn.Module:
    """The module whose weight produces the layer's output: MultiheadAttention's out_proj, else itself."""
    return m.out_proj if isinstance(m, nn.MultiheadAttention) else m


def output_weight(m: nn.Module) -> Tensor | None:
    """The weight that produces the layer's output (MultiheadAttention: out_proj's)."""
    w = getattr(output_layer(m), "weight", None)
    return w if isinstance(w, Tensor) else None


def output_bias(m: nn.Module) -> Tensor | None:
    """The bias added to the layer's output (MultiheadAttention: out_proj's), or None."""
    b = getattr(output_layer(m), "bias", None)
    return b if isinstance(b, Tensor) else None


def channel_dim(m: nn.Module, y: Tensor) -> int:
    """The output dimension that indexes the layer's units: 1 for batched convs, else the last."""
    if isinstance(m, nn.modules.conv._ConvNd):
        return 1 if y.dim() == len(m.kernel_size) + 2 else 0
    return y.dim() - 1


# --------------------------------------------------------------------------------------------
# inputs and outputs


def describe_input(m: nn.Module) -> str | None:
    """What a weight layer expects as input, in words (None when unknown)."""
    if isinstance(m, nn.Linear):
        return f"inputs whose last dimension is {m.in_features} (in_features), e.g. shape (N, {m.in_features})"
    if isinstance(m, nn.Bilinear):
        return f"two inputs with last dimensions {m.in1_features} and {m.in2_features}"
    if isinstance(m, nn.modules.conv._ConvNd):
        d = len(m.kernel_size)
        spatial = ", ".join("HWD"[i] if d > 1 else "L" for i in range(d))
        return (f"{d + 2}-d inputs (N, {m.in_channels}, {spatial}) with {m.in_channels} channels "
                f"(in_channels), or unbatched ({m.in_channels}, {spatial})")
    if isinstance(m, nn.Embedding):
        return f"integer indices in [0, {m.num_embeddings}) (num_embeddings)"
    if isinstance(m, nn.MultiheadAttention):
        return f"query/key/value with embedding dimension {m.embed_dim}"
    return None


def guess_input_shape(model: nn.Module) -> tuple[int, ...] | None:
    """An input shape (without the batch dimension) that fits the model's first Linear or Conv
    layer: (in_features,), or in_channels and 64 / 32x32 / 16x16x16 positions; None without one."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            return (m.in_features,)
        if isinstance(m, nn.modules.conv._ConvNd):
            d = len(m.kernel_size)
            return (m.in_channels,) + ((64,) if d == 1 else (32, 32) if d == 2 else (16, 16, 16))
    return None


def output_width(model: nn.Module) -> int | None:
    """Output width of the last registered Linear layer (None when the model has none)."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m.out_features
    return last


# --------------------------------------------------------------------------------------------
# building models


def activation_module(activation: Any, param: float | None = None) -> nn.Module:
    """A fresh ``nn.Module`` computing ``activation`` (a name, an nn.Module or class, a function, or None).

    Table names give the table's module (``"leaky_relu"`` -> ``nn.LeakyReLU(0.01)``, ``param``
    sets the slope/alpha). A module instance is deep-copied (so layers never share parameters,
    e.g. PReLU's slope); any other callable is wrapped in an elementwise module.
    """
    if isinstance(activation, nn.Module):
        resolve_activation(activation, param)  # validates param
        return copy.deepcopy(activation)
    return resolve_activation(activation, param).module()


def check_sizes(values: Any, what: str, *, min_len: int) -> tuple[int, ...]:
    """``values`` as a tuple of positive integers (at least ``min_len``); errors name ``what``."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise InitlabError(f"{what}: expected a list of positive integers, got {values!r}")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InitlabError(f"{what}[{i}]: expected a positive integer, got {v!r}")
        out.append(int(v))
    if len(out) < min_len:
        raise InitlabError(f"{what}: expected at least {min_len} entries, got {list(values)!r}")
    return tuple(out)


def mlp(widths: Sequence[int], activation: Any = "relu", bias: bool = True, *,
        param: float | None = None) -> nn.Sequential:
    """Fully connected network ``Linear(w0, w1), act, Linear(w1, w2), act, ..., Linear(w[-2], w[-1])``.

    ``widths = [784, 100, 100, 10]`` is the classic study's model: two hidden layers with the
    activation and a linear readout (logits for softmax cross-entropy). PyTorch's default
    parameters until an initialisation scheme is applied (``initlab.init_model``). Each
    activation is a fresh module (:func:`activation_module`).
    """
    sizes = check_sizes(widths, "widths", min_len=2)
    if not isinstance(bias, bool):
        raise InitlabError(f"bias must be True or False, got {bias!r}")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2:
            layers.append(activation_module(activation, param))
    return nn.Sequential(*layers)
