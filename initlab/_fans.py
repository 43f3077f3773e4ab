"""Fan-in and fan-out of weight tensors, module-aware where the shape alone is wrong.

A variance-scaling scheme draws ``W`` with ``Var[W] = scale / n`` where ``n`` is the number of
inputs that one output unit sums over (``fan_in``, forward signal, LeCun et al. 1998; He et al.
2015) or the number of outputs one input unit feeds (``fan_out``, backward signal; Glorot &
Bengio 2010). The shape of a tensor gives these counts only for the standard PyTorch layouts:

========================  ==========================  =================================  ============================
layer                     weight shape                fan_in                             fan_out
========================  ==========================  =================================  ============================
Linear                    (out, in)                   in                                 out
Conv, groups g            (out, in/g, *k)             in/g * prod(k)                     out/g * prod(k) / prod(stride)
ConvTranspose, groups g   (in, out/g, *k)             in/g * prod(k) / prod(stride)      out/g * prod(k)
Embedding                 (num, dim)                  1 (a one-hot input)                dim
Bilinear                  (out, in1, in2)             in1 * in2                          out
MultiheadAttention        in_proj (3E, E)             E (one of the three (E, E) blocks)  E
========================  ==========================  =================================  ============================

``torch.nn.init`` computes ``fan_out = out * prod(k)`` for grouped convolutions (each output
channel only sees ``in/g`` inputs, and each input only feeds ``out/g`` channels) and swaps the
roles of ``in`` and ``out`` for ConvTranspose weights; :func:`fans` with ``module=`` fixes both.
For a transposed convolution with stride ``s`` each output position receives on average
``prod(k)/prod(s)`` kernel taps per input channel, so its fan_in is not an integer in general:
then a float is returned.

The same count, read backwards, gives a strided convolution's fan_out: a convolution with stride
``s`` is the adjoint of the transposed convolution with stride ``s`` (Dumoulin & Visin 2016, "A
guide to convolution arithmetic", section 4), so one input position feeds on average
``out/g * prod(k) / prod(s)`` (output unit, weight) pairs, and the backward variance of Glorot &
Bengio (2010), ``Var[dL/dx] = fan_out Var[W] Var[dL/dy]``, sums over exactly those. Hence
``fan_out = out/g * prod(k) / prod(stride)`` (ViT-B/16's patch embedding, 768 x 3 x 16 x 16 with
stride 16: fan_out 768, not 196,608), the exact counterpart of the transposed rule; dilation and
padding do not enter (borders aside). ``torch.nn.init`` ignores the stride in both directions;
``initlab.fans(w)`` without ``module=`` does too (a shape has no stride).

Arbitrary tensors (JAX-style layouts, stacked experts, ...) take explicit ``in_axis`` /
``out_axis`` (and ``batch_axis``): ``fan_in = prod(shape[in_axis]) * receptive``, ``fan_out =
prod(shape[out_axis]) * receptive`` where ``receptive`` is the product of the remaining,
non-batch axes.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ._errors import InitlabError
from ._layers import fan_rule

Fan = int | float
Axes = int | Sequence[int]

__all__ = ["fans", "module_fans", "shape_of"]


def _exact(x: float) -> Fan:
    """An int when ``x`` is integral, else the float itself."""
    return int(round(x)) if abs(x - round(x)) < 1e-9 else float(x)


def shape_of(tensor_or_shape: object) -> tuple[int, ...]:
    """The shape of a tensor, or a shape given as ``torch.Size`` / a sequence of non-negative ints."""
    if isinstance(tensor_or_shape, nn.parameter.UninitializedParameter):
        raise InitlabError("the tensor is an uninitialised lazy parameter (LazyLinear, LazyConv...); "
                           "run one forward pass before computing its fans")
    if isinstance(tensor_or_shape, Tensor):
        return tuple(tensor_or_shape.shape)
    if isinstance(tensor_or_shape, int) and not isinstance(tensor_or_shape, bool) and tensor_or_shape >= 0:
        return (tensor_or_shape,)
    if isinstance(tensor_or_shape, (tuple, list, torch.Size)):
        shape = tuple(tensor_or_shape)
        if all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            return shape
        raise InitlabError(f"a shape must be a sequence of non-negative ints, got {tensor_or_shape!r}")
    raise InitlabError(f"expected a tensor or a shape (tuple of ints), got {type(tensor_or_shape).__name__}: "
                       f"{tensor_or_shape!r}")


def _no_fans(shape: tuple[int, ...]) -> InitlabError:
    what = "a scalar (0-d)" if len(shape) == 0 else f"a 1-d tensor of shape {shape}"
    return InitlabError(
        f"fan-based schemes do not apply to {what}: fan_in and fan_out need at least 2 dimensions "
        "(out, in, *kernel). This is usually a bias or a norm scale: initialise biases with zeros "
        "(torch.nn.init.zeros_) or a constant, norm weights with ones, or pass fans=(fan_in, fan_out) explicitly"
    )


def _norm_axes(axes: Axes, ndim: int, what: str) -> tuple[int, ...]:
    if isinstance(axes, int) and not isinstance(axes, bool):
        items: tuple[object, ...] = (axes,)
    elif isinstance(axes, (tuple, list)):
        items = tuple(axes)
    else:
        raise InitlabError(f"{what} must be an int or a tuple of ints, got {type(axes).__name__}: {axes!r}")
    out = []
    for a in items:
        if not isinstance(a, int) or isinstance(a, bool) or not -ndim <= a < ndim:
            raise InitlabError(f"{what}={axes!r} is not a valid axis for a {ndim}-d tensor; "
                               f"valid axes are {-ndim}..{ndim - 1}")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise InitlabError(f"{what}={axes!r} repeats an axis")
    return tuple(out)


def _axes_fans(shape: tuple[int, ...], in_axis: Axes | None, out_axis: Axes | None,
               batch_axis: Axes) -> tuple[Fan, Fan]:
    nd = len(shape)
    if nd < 2:
        raise _no_fans(shape)
    if in_axis is None and out_axis is None and batch_axis == ():  # PyTorch's (out, in, *kernel)
        receptive = math.prod(shape[2:])
        return shape[1] * receptive, shape[0] * receptive
    ia = _norm_axes(1 if in_axis is None else in_axis, nd, "in_axis")
    oa = _norm_axes(0 if out_axis is None else out_axis, nd, "out_axis")
    ba = _norm_axes(batch_axis, nd, "batch_axis")
    if set(ia) & set(oa) or set(ia) & set(ba) or set(oa) & set(ba):
        raise InitlabError(f"in_axis={in_axis!r}, out_axis={out_axis!r} and batch_axis={batch_axis!r} must be "
                           f"disjoint axes of the {nd}-d shape {shape} (unset in_axis/out_axis default to 1 and 0, "
                           "PyTorch's (out, in, *kernel) layout; set both when you move one)")
    receptive = math.prod(d for i, d in enumerate(shape) if i not in ia and i not in oa and i not in ba)
    return (math.prod(shape[i] for i in ia) * receptive, math.prod(shape[i] for i in oa) * receptive)


def _param_name(module: nn.Module, tensor_or_shape: object) -> str | None:
    if isinstance(tensor_or_shape, Tensor):
        for name, p in module.named_parameters(recurse=False):
            if p is tensor_or_shape:
                return name
    return None


def _conv_fans(module: nn.Module, shape: tuple[int, ...]) -> tuple[Fan, Fan]:
    if len(shape) < 3:
        raise InitlabError(f"a {type(module).__name__} weight has at least 3 dimensions, got shape {shape}")
    g = int(module.groups)
    k = math.prod(shape[2:])
    if module.transposed:  # (in, out/groups, *k)
        stride = math.prod(module.stride)
        return _exact(shape[0] / g * k / stride), shape[1] * k
    return shape[1] * k, _exact(shape[0] / g * k / math.prod(module.stride))  # (out, in/groups, *k)


def _attention_fans(module: nn.Module, shape: tuple[int, ...], pname: str | None) -> tuple[Fan, Fan] | None:
    e = int(module.embed_dim)
    if len(shape) == 2 and shape == (3 * e, e):
        return e, e
    if pname == "in_proj_weight":
        raise InitlabError(f"MultiheadAttention in_proj_weight should have shape {(3 * e, e)}, got {shape}")
    return None  # a (E, E) block, q/k/v_proj_weight or out_proj: the Linear rule


def _embedding_fans(module: nn.Module, shape: tuple[int, ...]) -> tuple[Fan, Fan]:
    if len(shape) != 2:
        raise InitlabError(f"an {type(module).__name__} weight is 2-d (num_embeddings, dim), got shape {shape}")
    return 1, shape[1]


def _bilinear_fans(module: nn.Module, shape: tuple[int, ...]) -> tuple[Fan, Fan]:
    if len(shape) != 3:
        raise InitlabError(f"a Bilinear weight is 3-d (out, in1, in2), got shape {shape}")
    return shape[1] * shape[2], shape[0]


def _module_fans(module: nn.Module, shape: tuple[int, ...], pname: str | None) -> tuple[Fan, Fan] | None:
    """Module-aware fans by the layer table's fan rule, or None to fall back to the shape rule."""
    rule = fan_rule(module)
    if rule == "attention" and pname in (None, "in_proj_weight"):
        return _attention_fans(module, shape, pname)
    if pname not in (None, "weight"):
        return None
    if rule == "conv":
        return _conv_fans(module, shape)
    if rule == "embedding":
        return _embedding_fans(module, shape)
    if rule == "bilinear":
        return _bilinear_fans(module, shape)
    return None


def fans(tensor_or_shape: Tensor | Sequence[int], *, module: nn.Module | None = None,
         in_axis: Axes | None = None, out_axis: Axes | None = None, batch_axis: Axes = ()) -> tuple[Fan, Fan]:
    """``(fan_in, fan_out)`` of a weight tensor (or a shape).

    Without ``module`` and axes, the PyTorch layout ``(out, in, *kernel)`` is assumed:
    ``fan_in = in * prod(kernel)``, ``fan_out = out * prod(kernel)`` (as ``torch.nn.init``).
    With ``module`` (the layer that owns the tensor) the count is exact for grouped, depthwise
    and strided convolutions (fan_out divided by the stride), ConvTranspose (fan_in divided by it), Embedding, Bilinear and
    MultiheadAttention's fused ``in_proj_weight``; see the module docstring for the table.
    With ``in_axis`` / ``out_axis`` (ints or tuples of ints) any layout works, JAX-style;
    ``batch_axis`` axes (e.g. stacked ensemble members) count in neither fan.

    Returns ints, except a strided convolution whose average fan_out (or a ConvTranspose whose
    average fan_in) is fractional (a float).

    Raises:
        InitlabError: for 0-d and 1-d tensors (fan-based schemes do not apply: initialise
            biases with zeros or a constant), or for inconsistent axes/module shapes.
    """
    shape = shape_of(tensor_or_shape)
    if len(shape) < 2:
        raise _no_fans(shape)
    if in_axis is not None or out_axis is not None or batch_axis != ():
        if module is not None:
            raise InitlabError("pass either module= or explicit in_axis/out_axis/batch_axis, not both")
        return _axes_fans(shape, in_axis, out_axis, batch_axis)
    if module is not None:
        if not isinstance(module, nn.Module):
            raise InitlabError(f"module= must be an nn.Module, got {type(module).__name__}")
        got = _module_fans(module, shape, _param_name(module, tensor_or_shape))
        if got is not None:
            return got
    return _axes_fans(shape, None, None, ())


def module_fans(module: nn.Module, param_name: str = "weight") -> tuple[Fan, Fan]:
    """Fans of ``module.<param_name>`` (e.g. ``"weight"``, MultiheadAttention's ``"in_proj_weight"``,
    ``"q_proj_weight"``), using the module-aware rules of :func:`fans`."""
    t = getattr(module, param_name, None)
    if not isinstance(t, Tensor):
        names = [n for n, _ in module.named_parameters(recurse=False)]
        raise InitlabError(f"{type(module).__name__} has no tensor parameter {param_name!r}; "
                           f"its parameters: {', '.join(names) or 'none'}")
    shape = shape_of(t)
    if len(shape) < 2:
        raise _no_fans(shape)
    got = _module_fans(module, shape, param_name)
    return got if got is not None else _axes_fans(shape, None, None, ())
