"""Plain model builders for the lab: an MLP, a residual MLP and a small CNN.

The models come out with PyTorch's default parameters; the trainer initialises them with
``initlab.init_model(model, scheme, ...)`` so that every scheme of the registry (``auto`` and
``lsuv`` included) applies to them. Activations are the ``nn`` modules of the activation table
(``nn.Sigmoid``, ``nn.ReLU``, ``nn.LeakyReLU(slope)`` ...), so ``initlab.find_activations``
recognises them; an arbitrary callable is wrapped in :class:`Elementwise`. The MLP builder and
:func:`activation_module` are the library's (:mod:`initlab._layers`); the CNN is the lab's own.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from .._activations import Elementwise
from .._errors import InitlabError, unknown_choice
from .._layers import activation_module, check_sizes, mlp
from ._checks import as_bool, as_int, fail
from .specs import MODEL_KINDS, ModelSpec, image_shape

__all__ = ["Elementwise", "activation_module", "mlp", "cnn", "resmlp", "Residual", "build_model", "image_shape",
           "MODEL_KINDS"]

def _conv_out(size: int, kernel: int) -> int:
    return size + 2 * (kernel // 2) - kernel + 1


class Residual(nn.Module):
    """``x + body(x)``: a residual block (Fixup's and He's ResNet shape, without normalisation)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: Any) -> Any:
        return x + self.body(x)


def resmlp(widths: Sequence[int], activation: Any = "relu", bias: bool = True, *,
           param: float | None = None) -> nn.Sequential:
    """Residual MLP without normalisation: ``widths = (inputs, w, w, ..., classes)``; a stem Linear(inputs, w) and
    the activation, then per further hidden width one block h + W2 phi(W1 h) (two w x w layers), then the readout.

    With both block layers He-initialised, Var(h) doubles per block (Var(h + F(h)) = Var(h) + Var(F(h)));
    Fixup (Zhang, Dauphin & Ma 2019) scales the branch down instead.
    """
    sizes = check_sizes(widths, "widths", min_len=3)
    w = sizes[1]
    if any(x != w for x in sizes[1:-1]):
        raise InitlabError(f"widths: a residual MLP needs equal hidden widths, got {list(sizes)}")
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(sizes[0], w, bias=bias), activation_module(activation, param)]
    for _ in sizes[2:-1]:
        layers.append(Residual(nn.Sequential(nn.Linear(w, w, bias=bias), activation_module(activation, param),
                                             nn.Linear(w, w, bias=bias))))
    layers.append(nn.Linear(w, sizes[-1], bias=bias))
    return nn.Sequential(*layers)


def cnn(channels: Sequence[int] = (16, 32), kernel: int = 3, activation: Any = "relu", hidden: Sequence[int] = (100,),
        n_classes: int = 10, in_shape: Sequence[int] = (1, 28, 28), bias: bool = True, *,
        param: float | None = None, pool: bool = True) -> nn.Sequential:
    """Small CNN: per entry of ``channels`` a Conv2d (``kernel``, padding kernel//2), the activation and
    (when ``pool``) a 2x2 max-pool while the map is at least 2x2; then Flatten, ``hidden`` Linear layers
    with the activation, and a linear readout to ``n_classes``. Without pooling the map keeps its size:
    He et al. (2015)'s plain deep nets, where every conv sees fan_in = k^2 C_in inputs.

    Accepts flat inputs (N, C*H*W) as well as images (N, C, H, W): it starts with
    ``Flatten()`` + ``Unflatten(1, in_shape)``. He et al. (2015)'s fans apply to each conv
    (fan_in = C_in * k^2).
    """
    chans = check_sizes(channels, "channels", min_len=1)
    k = as_int(kernel, "kernel", minimum=1)
    shape = check_sizes(in_shape, "in_shape", min_len=3)
    if len(shape) != 3:
        raise InitlabError(f"in_shape: expected (channels, height, width), got {tuple(in_shape)!r}")
    heads = check_sizes(hidden, "hidden", min_len=0)
    n_out = as_int(n_classes, "n_classes", minimum=1)
    bias = as_bool(bias, "bias")
    c, h, w = shape
    layers: list[nn.Module] = [nn.Flatten(), nn.Unflatten(1, (c, h, w))]
    for i, ch in enumerate(chans):
        h, w = _conv_out(h, k), _conv_out(w, k)
        if h < 1 or w < 1:
            raise InitlabError(f"kernel: {k}x{k} convolutions shrink the {shape[1]}x{shape[2]} input to nothing "
                               f"at conv layer {i + 1}")
        layers += [nn.Conv2d(c, ch, k, padding=k // 2, bias=bool(bias)), activation_module(activation, param)]
        if pool and h >= 2 and w >= 2:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        c = ch
    layers.append(nn.Flatten())
    prev = c * h * w
    for width in heads:
        layers += [nn.Linear(prev, width, bias=bool(bias)), activation_module(activation, param)]
        prev = width
    layers.append(nn.Linear(prev, n_out, bias=bool(bias)))
    return nn.Sequential(*layers)


def build_model(spec: ModelSpec, activation: Any) -> nn.Module:
    """The model a :class:`~initlab.lab.specs.ModelSpec` describes, with ``activation``.

    ``mlp``: :func:`mlp` over ``spec.widths``. ``cnn``: :func:`cnn` with ``spec.channels``,
    ``spec.kernel``, input ``image_shape(widths[0])``, dense hidden layers ``widths[1:-1]`` and
    ``widths[-1]`` classes.
    """
    kind = getattr(spec, "kind", None)
    if kind is None:
        raise fail("spec", "a ModelSpec (initlab.lab.specs.ModelSpec(kind='mlp', widths=...))", spec)
    if kind == "mlp":
        return mlp(spec.widths, activation, bias=spec.bias)
    if kind == "resmlp":
        return resmlp(spec.widths, activation, bias=spec.bias)
    if kind == "cnn":
        widths = check_sizes(spec.widths, "model.widths", min_len=2)
        return cnn(spec.channels, spec.kernel, activation, hidden=widths[1:-1], n_classes=widths[-1],
                   in_shape=image_shape(widths[0]), bias=spec.bias, pool=getattr(spec, "pool", True))
    raise unknown_choice("model kind", kind, MODEL_KINDS)
