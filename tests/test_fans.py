"""Fans: PyTorch layouts, module-aware corrections, explicit axes and error paths."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from initlab import InitlabError, fans
from initlab._fans import module_fans


def torch_fans(w: torch.Tensor) -> tuple[int, int]:
    return torch.nn.init._calculate_fan_in_and_fan_out(w)


def test_linear_matches_torch():
    layer = nn.Linear(7, 5)
    assert fans(layer.weight) == (7, 5)
    assert fans(layer.weight, module=layer) == torch_fans(layer.weight)
    assert fans((5, 7)) == (7, 5)
    assert fans(torch.Size([5, 7])) == (7, 5)


@pytest.mark.parametrize("conv, k", [(nn.Conv1d, 3), (nn.Conv2d, 9), (nn.Conv3d, 27)])
def test_conv_matches_torch_without_groups(conv, k):
    layer = conv(4, 6, 3)
    assert fans(layer.weight, module=layer) == (4 * k, 6 * k)
    assert fans(layer.weight, module=layer) == torch_fans(layer.weight)


def test_grouped_conv_fan_out():
    layer = nn.Conv2d(8, 12, 3, groups=4)  # weight (12, 2, 3, 3)
    assert tuple(layer.weight.shape) == (12, 2, 3, 3)
    fi, fo = fans(layer.weight, module=layer)
    assert fi == 2 * 9  # in/groups * k
    assert fo == 12 // 4 * 9  # out/groups * k, not out * k
    assert torch_fans(layer.weight)[1] == 12 * 9  # what torch computes (wrong for groups)


def test_depthwise_conv():
    layer = nn.Conv2d(16, 16, 5, groups=16)
    assert fans(layer.weight, module=layer) == (25, 25)
    mult = nn.Conv1d(4, 8, 3, groups=4)  # depth multiplier 2
    assert fans(mult.weight, module=mult) == (3, 6)


def test_shape_only_conv_ignores_groups():
    # without the module, the shape (out, in/groups, k) is all we know
    layer = nn.Conv2d(8, 12, 3, groups=4)
    assert fans(layer.weight) == torch_fans(layer.weight)


def test_conv_transpose_stride_1():
    layer = nn.ConvTranspose2d(6, 10, 3)  # weight (in=6, out=10, 3, 3)
    assert tuple(layer.weight.shape) == (6, 10, 3, 3)
    assert fans(layer.weight, module=layer) == (6 * 9, 10 * 9)
    assert torch_fans(layer.weight) == (10 * 9, 6 * 9)  # torch swaps in and out


def test_conv_transpose_stride_and_groups():
    layer = nn.ConvTranspose2d(8, 6, 4, stride=2, groups=2)  # weight (8, 3, 4, 4)
    fi, fo = fans(layer.weight, module=layer)
    assert fi == 8 // 2 * 16 // 4  # each output sees k/stride taps per input channel on average
    assert isinstance(fi, int)
    assert fo == 3 * 16
    odd = nn.ConvTranspose1d(1, 2, 3, stride=2)
    assert fans(odd.weight, module=odd) == (1.5, 6)


def test_conv_transpose_fan_in_counts_actual_taps():
    # empirical check: average number of (input, tap) pairs feeding an interior output pixel
    layer = nn.ConvTranspose1d(3, 2, 4, stride=2, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    with torch.no_grad():
        y = layer(torch.ones(1, 3, 20))
    interior = y[0, 0, 6:-6]
    assert float(interior.mean()) == fans(layer.weight, module=layer)[0]


def test_embedding_and_bilinear():
    emb = nn.Embedding(100, 16)
    assert fans(emb.weight, module=emb) == (1, 16)
    assert fans(nn.EmbeddingBag(10, 4).weight, module=nn.EmbeddingBag(10, 4)) == (1, 4)
    bil = nn.Bilinear(3, 5, 7)
    assert fans(bil.weight, module=bil) == (15, 7)


def test_fused_attention_in_proj():
    mha = nn.MultiheadAttention(12, 3)
    assert tuple(mha.in_proj_weight.shape) == (36, 12)
    assert fans(mha.in_proj_weight, module=mha) == (12, 12)
    assert module_fans(mha, "in_proj_weight") == (12, 12)
    assert torch_fans(mha.in_proj_weight) == (12, 36)  # torch treats the fused matrix as one
    assert fans(mha.out_proj.weight, module=mha.out_proj) == (12, 12)


def test_attention_separate_kv_dims():
    mha = nn.MultiheadAttention(8, 2, kdim=5, vdim=3)
    assert module_fans(mha, "q_proj_weight") == (8, 8)
    assert module_fans(mha, "k_proj_weight") == (5, 8)
    assert module_fans(mha, "v_proj_weight") == (3, 8)


def test_module_fans_weight_default():
    layer = nn.Conv2d(4, 8, 3, groups=2)
    assert module_fans(layer) == fans(layer.weight, module=layer)


def test_explicit_axes_jax_layout():
    # JAX dense kernel (in, out) and conv kernel (kh, kw, in, out)
    assert fans((7, 5), in_axis=0, out_axis=1) == (7, 5)
    assert fans((3, 3, 4, 6), in_axis=-2, out_axis=-1) == (36, 54)
    # stacked ensemble members along a batch axis count in neither fan
    assert fans((10, 5, 7), in_axis=2, out_axis=1, batch_axis=0) == (7, 5)
    # several input axes
    assert fans((6, 2, 3), in_axis=(1, 2), out_axis=0) == (6, 6)


@pytest.mark.parametrize("shape", [(), (5,)])
def test_0d_1d_error(shape):
    with pytest.raises(InitlabError, match="fan-based schemes do not apply") as e:
        fans(torch.empty(shape))
    assert "zeros" in str(e.value) and "bias" in str(e.value)


def test_bias_error_through_module():
    layer = nn.Linear(3, 2)
    with pytest.raises(InitlabError, match="do not apply"):
        module_fans(layer, "bias")
    with pytest.raises(InitlabError, match="no tensor parameter 'wieght'.*weight, bias"):
        module_fans(layer, "wieght")


def test_axis_errors():
    with pytest.raises(InitlabError, match="in_axis=5 is not a valid axis.*-3..2"):
        fans((2, 3, 4), in_axis=5)
    with pytest.raises(InitlabError, match="must be disjoint"):
        fans((2, 3), in_axis=0)
    with pytest.raises(InitlabError, match="either module= or explicit"):
        fans((2, 3), module=nn.Linear(3, 2), in_axis=1, out_axis=0)


def test_bad_shapes():
    with pytest.raises(InitlabError, match="non-negative ints"):
        fans((2, -3))
    with pytest.raises(InitlabError, match="expected a tensor or a shape"):
        fans("3x4")
    with pytest.raises(InitlabError, match="lazy"):
        fans(nn.LazyLinear(3).weight)
    with pytest.raises(InitlabError, match="in_proj_weight should have shape"):
        module_fans(_bad_mha(), "in_proj_weight")


def _bad_mha() -> nn.MultiheadAttention:
    mha = nn.MultiheadAttention(4, 1)
    mha.in_proj_weight = nn.Parameter(torch.empty(5, 4))
    return mha


def test_strided_conv_fan_out_divides_by_the_stride():
    """The counterpart of the transposed rule: ViT-B/16's patch conv has fan_out 768, not 768 * 256."""
    patch = nn.Conv2d(3, 768, 16, stride=16)
    assert fans(patch.weight, module=patch) == (3 * 256, 768)
    down = nn.Conv2d(8, 6, 3, stride=2, groups=2)  # 6/2 * 9 / 4 = 6.75 pairs per input position on average
    assert fans(down.weight, module=down) == (4 * 9, 6.75)
    assert fans(patch.weight) == (3 * 256, 768 * 256)  # a bare shape has no stride: torch's count
