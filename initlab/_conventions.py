"""Conventions of real architectures: the parameters that are not the weight of a fan-based layer.

``init_model`` gives every weight layer a fan-based scheme and every normalisation weight 1 /
bias 0. Real architectures hold other parameters too; each gets the documented rule below (the
report names the rule in the parameter's row):

* **HF ``Conv1D``** (transformers' GPT-2 family): a linear layer whose weight is stored
  transposed, (in, out), so its fans are swapped: fan_in = weight.shape[0],
  fan_out = weight.shape[1]. It is initialised like ``nn.Linear`` with those fans.
* **class / distillation / register / mask tokens and position embeddings** (parameters named
  ``*_token``, ``*_tokens``, ``pos_embed*``, ``*pos_embedding*``, ``*position_embedding*``, and
  ``nn.Embedding`` modules named ``wpe``, ``position_embeddings``, ``embed_positions``,
  ``pos_embed*``): truncated normal with realised std 0.02, as ViT (Dosovitskiy et al. 2021), DeiT,
  timm and BERT (Devlin et al. 2019) do. Tokens are added to (or concatenated with) unit-scale
  patch or word embeddings, so a small std keeps them from dominating.
* **relative position bias tables** (``relative_position_bias_table``): truncated normal with
  std 0.02 (Swin, Liu et al. 2021).
* **custom normalisation layers** (a module whose class name contains ``Norm``, e.g. T5's
  ``T5LayerNorm``, or timm's ResMLP ``Affine``): ``weight``/``alpha``/``scale`` 1 and
  ``bias``/``beta``/``shift`` 0, as for the ``nn`` normalisation layers.
* **layer scale** (parameters named ``gamma``, ``gamma_1``, ``gamma_2``, ``layer_scale*``,
  ``ls_gamma``, ``ls``, ``ls1``, ``ls2``; CaiT, Touvron et al. 2021; ConvNeXt, Liu et al. 2022): the model's configured value
  is kept when the tensor is finite and constant (every entry equal); otherwise (a meta build
  moved with ``to_empty()``: the configured value is lost) it is set to :data:`LAYER_SCALE_INIT`
  = 1e-6, the default of ConvNeXt and of timm's ``ls_init_value``. A module owning such a
  parameter that has its own ``reset_parameters()`` runs that instead (the configured value).
* **tied embedding / readout** (one weight shared by an ``nn.Embedding`` and an ``nn.Linear``
  readout; Press & Wolf 2017): written once, in the readout's role (``auto``: LeCun normal, std
  1/sqrt(d), so the logits of a unit-variance hidden state are O(1), where the embedding's N(0, 1)
  would give logits of std sqrt(d)); the other row says ``tied with``. The T5 family multiplies the
  hidden state by d^-1/2 before its tied readout, so there the embedding role (N(0, 1)) is kept.
* **recurrent layers** (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``), per gate block: input weights
  ``weight_ih`` by the scheme with the block's fans (fan_in = input size; ``auto``: LeCun normal,
  Var = 1/fan_in, the gates being sigmoid/tanh), recurrent weights ``weight_hh`` orthogonal per
  (h, h) gate block (Saxe et al. 2014), projections ``weight_hr`` LeCun normal; biases 0 (or the
  ``bias`` constant), and the LSTM forget-gate bias ``bias_ih[h:2h]`` = 1 (Jozefowicz et al. 2015;
  PyTorch's gate order is i, f, g, o), so the cell remembers by default.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._engine import truncated_normal_
from ._orthogonal import orthogonal_

__all__ = ["Convention", "is_conv1d", "scaled_tied_readout", "conv1d_fans", "param_convention", "is_position_embedding",
           "TOKEN_STD", "LAYER_SCALE_INIT", "init_recurrent", "recurrent_tensors"]

#: std of tokens, position embeddings and relative position bias tables (ViT, BERT, Swin)
TOKEN_STD = 0.02
#: layer scale when the configured value is lost (ConvNeXt's and timm's default ``ls_init_value``)
LAYER_SCALE_INIT = 1e-6

_TOKENS = ("*_token", "*_tokens", "pos_embed*", "*pos_embedding*", "*position_embedding*", "query_tokens")
_REL_BIAS = ("relative_position_bias_table*",)
_LAYER_SCALE = ("gamma", "gamma_1", "gamma_2", "layer_scale*", "ls_gamma", "*_layer_scale", "ls", "ls[0-9]")
_NORM_ONES = ("weight", "alpha", "scale")
_NORM_ZEROS = ("bias", "beta", "shift")
_POS_MODULES = ("wpe", "position_embeddings", "embed_positions", "pos_embed*", "position_embedding")


@dataclass(frozen=True)
class Convention:
    """A rule for one parameter: its report label and ``apply(tensor, generator)`` (None: keep it)."""

    label: str
    apply: Callable[[Tensor, torch.Generator | None], None] | None


def is_conv1d(m: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer with a transposed (in, out) weight."""
    w = getattr(m, "weight", None)
    return type(m).__name__ == "Conv1D" and isinstance(getattr(m, "nf", None), int) and \
        isinstance(w, Tensor) and w.dim() == 2


def conv1d_fans(m: nn.Module) -> tuple[float, float]:
    """(fan_in, fan_out) of a ``Conv1D``: its weight is (in, out), so the fans are swapped."""
    return float(m.weight.shape[0]), float(m.weight.shape[1])


#: transformers model types whose tied readout is applied to h * d^-1/2 (T5: the embedding keeps N(0, 1))
_SCALED_READOUT = ("t5", "mt5", "umt5", "longt5", "switch_transformers")


def scaled_tied_readout(model: nn.Module) -> bool:
    """A transformers model that rescales the hidden state by d^-1/2 before its tied readout (the
    T5 family, ``tie_word_embeddings``): its shared weight keeps the embedding's N(0, 1) role."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) in _SCALED_READOUT and bool(getattr(config, "tie_word_embeddings", False))


def is_position_embedding(name: str, m: nn.Module) -> bool:
    """An ``nn.Embedding`` of positions (GPT-2's ``wpe``, BERT's ``position_embeddings``)."""
    last = name.rsplit(".", 1)[-1]
    return isinstance(m, nn.Embedding) and any(fnmatch.fnmatchcase(last, p) for p in _POS_MODULES)


def _trunc(t: Tensor, g: torch.Generator | None) -> None:
    truncated_normal_(t, TOKEN_STD, generator=g)


def _constant(t: Tensor) -> bool:
    if t.is_meta or t.numel() == 0:
        return False
    flat = t.detach().reshape(-1)
    return bool(torch.isfinite(flat).all() and (flat == flat[0]).all())


def _is_norm_like(m: nn.Module | None) -> bool:
    name = type(m).__name__
    return m is not None and ("Norm" in name or name == "Affine")


def param_convention(pname: str, tensor: Tensor, module: nn.Module | None = None) -> Convention | None:
    """The convention of a parameter held by a module initlab has no layer rule for, or None."""
    if not tensor.is_floating_point():
        return None
    if _is_norm_like(module) and pname in _NORM_ONES + _NORM_ZEROS:
        one = pname in _NORM_ONES
        return Convention(f"{'ones' if one else 'zeros'} (normalisation)",
                          lambda t, g: t.fill_(1.0 if one else 0.0))  # type: ignore[misc]
    if any(fnmatch.fnmatchcase(pname, p) for p in _REL_BIAS):
        return Convention("trunc_normal(0.02) (relative position bias)", _trunc)
    if any(fnmatch.fnmatchcase(pname, p) for p in _TOKENS):
        return Convention("trunc_normal(0.02) (token / position embedding)", _trunc)
    if any(fnmatch.fnmatchcase(pname, p) for p in _LAYER_SCALE):
        if _constant(tensor):
            return Convention("kept (layer scale, configured value)", None)
        return Convention(f"layer scale {LAYER_SCALE_INIT:g}",
                          lambda t, g: t.fill_(LAYER_SCALE_INIT))  # type: ignore[misc]
    return None


# --------------------------------------------------------------------------------------------
# recurrent layers

def _gates(m: nn.RNNBase) -> int:
    return {"LSTM": 4, "GRU": 3}.get(m.mode, 1)


def recurrent_tensors(m: nn.RNNBase) -> list[tuple[str, Tensor]]:
    """Every parameter of a recurrent layer, (name, tensor)."""
    return list(m.named_parameters(recurse=False))


def init_recurrent(m: nn.RNNBase, input_init: Callable[[Tensor, tuple[float, float]], object],
                   bias: float | None, generator: torch.Generator | None) -> dict[str, str]:
    """Initialise an LSTM/GRU/RNN per gate block (see the module docstring); ``input_init(block,
    fans)`` samples an input-weight block, ``bias`` None keeps the biases. Returns the label of
    each parameter."""
    gates, h = _gates(m), m.hidden_size
    out: dict[str, str] = {}
    for name, t in m.named_parameters(recurse=False):
        if name.startswith("weight_ih"):
            for block in t.chunk(gates, 0):
                input_init(block, (float(block.shape[1]), float(block.shape[0])))
            out[name] = f"input weights per gate ({gates} blocks)"
        elif name.startswith("weight_hh"):
            for block in t.chunk(gates, 0):
                orthogonal_(block, generator=generator)
            out[name] = f"orthogonal per gate ({gates} blocks)"
        elif name.startswith("weight_hr"):
            input_init(t, (float(t.shape[1]), float(t.shape[0])))
            out[name] = "projection"
        elif bias is not None:
            t.fill_(bias)
            out[name] = f"bias {bias:g}"
            if m.mode == "LSTM" and name.startswith("bias_ih"):
                t[h:2 * h].fill_(1.0)
                out[name] += ", forget gate 1"
        else:
            out[name] = "kept (bias='keep')"
    return out
