"""Plain model builders for the lab: an MLP and a small CNN.

The models come out with PyTorch's default parameters; the trainer initialises them with
``initlab.init_model(model, scheme, ...)`` so that every scheme of the registry (``auto`` and
``lsuv`` included) applies to them. Activations are the ``nn`` modules of the activation table
(``nn.Sigmoid``, ``nn.ReLU``, ``nn.LeakyReLU(slope)`` ...), so ``initlab.find_activations``
recognises them; an arbitrary callable is wrapped in :class:`Elementwise`.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from .._activations import Activation, resolve_activation
from .._errors import InitlabError, unknown_choice
from .specs import MODEL_KINDS, ModelSpec, image_shape

__all__ = ["Elementwise", "activation_module", "mlp", "cnn", "build_model", "image_shape", "MODEL_KINDS"]

class Elementwise(nn.Module):
    """An elementwise activation given as a function: ``forward(x) = fn(x)``."""

    def __init__(self, fn: Callable[[Tensor], Tensor], name: str | None = None) -> None:
        super().__init__()
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


def activation_module(activation: Any, param: float | None = None) -> nn.Module:
    """A fresh ``nn.Module`` computing ``activation`` (a name, an nn.Module or class, a function, or None).

    Table names give the matching ``torch.nn`` module (``"leaky_relu"`` -> ``nn.LeakyReLU(0.01)``,
    ``param`` sets the slope/alpha). A module instance is deep-copied (so layers never share
    parameters, e.g. PReLU's slope); any other callable is wrapped in :class:`Elementwise`.
    """
    if isinstance(activation, nn.Module):
        resolve_activation(activation, param)  # validates param
        return copy.deepcopy(activation)
    if isinstance(activation, type) and issubclass(activation, nn.Module):
        act = resolve_activation(activation, param)  # validates the class and param
        module = _table_module(act)
        return activation() if module is None else module
    act = resolve_activation(activation, param)
    module = _table_module(act)
    return Elementwise(act.fn, act.name) if module is None else module


def _table_module(act: Activation) -> nn.Module | None:
    """The ``torch.nn`` module the activation table builds for a row (its parameter bound), None for a
    custom activation or a row without a module."""
    return None if act.custom or act.row is None else act.row.build_module(act.param)


def _check_sizes(values: Any, what: str, *, min_len: int) -> tuple[int, ...]:
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


def mlp(widths: Sequence[int], activation: Any = "relu", bias: bool = True, *, param: float | None = None) -> nn.Sequential:
    """Fully connected network ``Linear(w0, w1), act, Linear(w1, w2), act, ..., Linear(w[-2], w[-1])``.

    ``widths = [784, 100, 100, 10]`` is the classic study's model: two hidden layers with the
    activation and a linear readout (logits for softmax cross-entropy). PyTorch's default
    parameters until an initialisation scheme is applied (``initlab.init_model``).
    """
    sizes = _check_sizes(widths, "widths", min_len=2)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b, bias=bool(bias)))
        if i < len(sizes) - 2:
            layers.append(activation_module(activation, param))
    return nn.Sequential(*layers)


def _conv_out(size: int, kernel: int) -> int:
    return size + 2 * (kernel // 2) - kernel + 1


def cnn(channels: Sequence[int] = (16, 32), kernel: int = 3, activation: Any = "relu", hidden: Sequence[int] = (100,),
        n_classes: int = 10, in_shape: Sequence[int] = (1, 28, 28), bias: bool = True, *,
        param: float | None = None) -> nn.Sequential:
    """Small CNN: per entry of ``channels`` a Conv2d (``kernel``, padding kernel//2), the activation and
    a 2x2 max-pool (while the map is at least 2x2); then Flatten, ``hidden`` Linear layers with the
    activation, and a linear readout to ``n_classes``.

    Accepts flat inputs (N, C*H*W) as well as images (N, C, H, W): it starts with
    ``Flatten()`` + ``Unflatten(1, in_shape)``. He et al. (2015)'s fans apply to each conv
    (fan_in = C_in * k^2).
    """
    chans = _check_sizes(channels, "channels", min_len=1)
    (k,) = _check_sizes([kernel], "kernel", min_len=1)
    shape = _check_sizes(in_shape, "in_shape", min_len=3)
    if len(shape) != 3:
        raise InitlabError(f"in_shape: expected (channels, height, width), got {tuple(in_shape)!r}")
    heads = _check_sizes(list(hidden), "hidden", min_len=0)
    (n_out,) = _check_sizes([n_classes], "n_classes", min_len=1)
    c, h, w = shape
    layers: list[nn.Module] = [nn.Flatten(), nn.Unflatten(1, (c, h, w))]
    for i, ch in enumerate(chans):
        h, w = _conv_out(h, k), _conv_out(w, k)
        if h < 1 or w < 1:
            raise InitlabError(f"kernel: {k}x{k} convolutions shrink the {shape[1]}x{shape[2]} input to nothing "
                               f"at conv layer {i + 1}")
        layers += [nn.Conv2d(c, ch, k, padding=k // 2, bias=bool(bias)), activation_module(activation, param)]
        if h >= 2 and w >= 2:
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
    if kind == "mlp":
        return mlp(spec.widths, activation, bias=spec.bias)
    if kind == "cnn":
        widths = _check_sizes(spec.widths, "model.widths", min_len=2)
        return cnn(spec.channels, spec.kernel, activation, hidden=widths[1:-1], n_classes=widths[-1],
                   in_shape=image_shape(widths[0]), bias=spec.bias)
    raise unknown_choice("model kind", kind, MODEL_KINDS)
