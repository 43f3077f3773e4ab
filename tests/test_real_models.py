"""The architecture harness: real models from torchvision, timm and transformers (small configs),
recurrent layers and a U-Net, built on the meta device, moved with ``to_empty()``, filled with NaN,
then ``init_model(model, "auto")``: no NaN parameter, a finite forward pass, logits of std in
[0.3, 3], and a report that names every parameter."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from torch import nn

from initlab import init_model
from initlab._zoo import build

pytestmark = pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("timm", "transformers", "torchvision")),
                                reason="needs the models extra (torchvision, timm, transformers)")


def _tv():
    from initlab._compat import ensure_torchvision

    ensure_torchvision()
    import torchvision.models as tvm

    return tvm


def _tv_vit():
    return _tv().VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                   mlp_dim=64, num_classes=10)


def _tv_convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    _tv()
    return ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=10)


def _tv_swin():
    from torchvision.models.swin_transformer import SwinTransformer

    _tv()
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=[4, 4],
                           num_classes=10)


def _timm_mixer():
    from timm.models.mlp_mixer import MlpMixer

    return MlpMixer(num_classes=10, img_size=32, patch_size=8, num_blocks=2, embed_dim=64)


class UNet(nn.Module):
    """A small U-Net: conv encoder, ConvTranspose decoder, a skip connection by concatenation."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.down1 = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.down2 = nn.Sequential(nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU())
        self.up = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.out = nn.Sequential(nn.Conv2d(2 * c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, 2, 1))

    def forward(self, x):
        a = self.down1(x)
        b = self.down2(a)
        return self.out(torch.cat([a, self.up(b)], 1))


class Recurrent(nn.Module):
    def __init__(self, cls: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = cls(16, 32, num_layers=2, batch_first=True)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


def _img(size: int):
    return lambda: ((torch.randn(2, 3, size, size),), {})


def _ids(vocab: int = 1000, seq2seq: bool = False):
    def make():
        ids = torch.randint(0, vocab, (2, 12))
        return (), ({"input_ids": ids, "decoder_input_ids": ids} if seq2seq else {"input_ids": ids})
    return make


#: name -> (builder on the current device, input maker)
MODELS = {
    "torchvision:resnet18": (lambda: build("torchvision:resnet18[num_classes=10]"), _img(32)),
    "torchvision:resnet18-zero-init": (lambda: build("torchvision:resnet18[num_classes=10,zero_init_residual=True]"),
                                       _img(32)),
    "torchvision:mobilenet_v3_small": (lambda: build("torchvision:mobilenet_v3_small[num_classes=10]"), _img(32)),
    "torchvision:efficientnet_b0": (lambda: build("torchvision:efficientnet_b0[num_classes=10]"), _img(32)),
    "torchvision:vit": (_tv_vit, _img(32)),
    "torchvision:convnext": (_tv_convnext, _img(32)),
    "torchvision:swin": (_tv_swin, _img(32)),
    "timm:vit_tiny": (lambda: build("timm:vit_tiny_patch16_224[img_size=32,depth=2,num_classes=10]"), _img(32)),
    "timm:deit_tiny_distilled": (lambda: build("timm:deit_tiny_distilled_patch16_224[img_size=32,depth=2,"
                                               "num_classes=10]"), _img(32)),
    "timm:convnext_atto": (lambda: build("timm:convnext_atto[num_classes=10]"), _img(32)),
    "timm:resmlp": (lambda: build("timm:resmlp_12_224[img_size=32,num_classes=10]"), _img(32)),
    "timm:mixer": (_timm_mixer, _img(32)),
    "hf:gpt2": (lambda: build("hf:gpt2[n_layer=2,n_embd=64,n_head=2,vocab_size=1000,n_positions=64]"), _ids()),
    "hf:bert": (lambda: build("hf:bert[num_hidden_layers=2,hidden_size=64,num_attention_heads=2,"
                              "intermediate_size=128,vocab_size=1000]"), _ids()),
    "hf:t5": (lambda: build("hf:t5[num_layers=2,num_decoder_layers=2,d_model=64,d_ff=128,num_heads=2,d_kv=32,"
                            "vocab_size=1000]"), _ids(seq2seq=True)),
    "hf:opt": (lambda: build("hf:opt[num_hidden_layers=2,hidden_size=64,ffn_dim=128,num_attention_heads=2,"
                             "vocab_size=1000,word_embed_proj_dim=64,max_position_embeddings=64]"), _ids()),
    "hf:vit": (lambda: build("hf:vit[num_hidden_layers=2,hidden_size=64,num_attention_heads=2,"
                             "intermediate_size=128,image_size=32,patch_size=8,num_labels=10]"),
               lambda: ((), {"pixel_values": torch.randn(2, 3, 32, 32)})),
    "lstm": (lambda: Recurrent(nn.LSTM), lambda: ((torch.randn(2, 7, 16),), {})),
    "gru": (lambda: Recurrent(nn.GRU), lambda: ((torch.randn(2, 7, 16),), {})),
    "unet": (UNet, _img(16)),
}


def meta_build(make) -> nn.Module:
    """Build on meta, ``to_empty()``, fill every parameter and float buffer with NaN (garbage
    memory). Computed buffers (Swin's relative position index, BERT's position ids) are not
    parameters and are not initialised by ``init_model``: they are copied from a real build, as a
    meta recipe must; transformers' tied weights are re-tied, as ``from_pretrained`` does."""
    with torch.device("meta"):
        model = make()
    model = model.to_empty(device="cpu")
    real = dict(make().named_buffers())
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(real[n])
        for t in (*model.parameters(), *model.buffers()):
            if t.is_floating_point():
                t.fill_(math.nan)
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()
    return model


def _logits(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        v = getattr(out, key, None)
        if isinstance(v, torch.Tensor):
            return v
    return out[0]


#: the slower builds (several seconds each on a loaded 2-core machine), run by CI
SLOW = {"torchvision:resnet18-zero-init", "torchvision:efficientnet_b0"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in MODELS])
def test_meta_build_then_auto(name):
    make, inputs = MODELS[name]
    torch.manual_seed(0)
    model = meta_build(make)
    rep = init_model(model, "auto", generator=torch.Generator().manual_seed(0))
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    assert {p["name"] for p in rep.params} == set(names)  # the report names every parameter
    assert not rep.untouched, rep.untouched
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    assert not bad, bad
    model.train()  # batch statistics: with reset running statistics an eval-mode BatchNorm is the identity
    args, kwargs = inputs()
    with torch.no_grad():
        y = _logits(model(*args, **kwargs)).float()
    assert torch.isfinite(y).all()
    # a recurrent layer's hidden state is gated and bounded (|h| < 1): std ~0.1 under the standard rules
    low = 0.03 if name in ("lstm", "gru") else 0.3
    assert low <= _std(y) <= 3.0, _std(y)


# --------------------------------------------------------------------------------------------
# each convention, on its own


def _std(t: torch.Tensor) -> float:
    return float(t.detach().std())


def _gen():
    return torch.Generator().manual_seed(0)


def test_hf_conv1d_fans_are_swapped():
    model = meta_build(MODELS["hf:gpt2"][0])
    rep = init_model(model, "auto", generator=_gen())
    row = rep["transformer.h.0.mlp.c_fc"]  # Conv1D weight (64, 256): in 64, out 256
    assert (row["fan_in"], row["fan_out"]) == (64, 256)
    assert row["target_std"] == pytest.approx(64 ** -0.5)
    w = model.transformer.h[0].mlp.c_fc.weight
    assert _std(w) == pytest.approx(64 ** -0.5, rel=0.05)
    # the tied readout: LeCun in the readout's role, logits O(1)
    assert rep["transformer.wte"]["scheme"] == "tied with lm_head"
    assert _std(model.lm_head.weight) == pytest.approx(64 ** -0.5, rel=0.05)
    # position embeddings: trunc normal 0.02
    assert _std(model.transformer.wpe.weight) == pytest.approx(0.02, rel=0.1)


def test_tokens_position_embeddings_and_relative_bias_tables():
    vit = meta_build(MODELS["timm:deit_tiny_distilled"][0])
    rep = init_model(vit, "auto", generator=_gen())
    for name in ("cls_token", "dist_token", "pos_embed"):
        assert rep.param(name)["action"].startswith("trunc_normal(0.02)")
    assert _std(vit.pos_embed) == pytest.approx(0.02, rel=0.15)
    swin = meta_build(MODELS["torchvision:swin"][0])
    rep = init_model(swin, "auto", generator=_gen())
    tables = [p for p in rep.params if p["name"].endswith("relative_position_bias_table")]
    assert tables and all(p["action"].startswith("trunc_normal(0.02)") for p in tables)


def test_layer_scale_keeps_the_configured_value_and_falls_back_to_1e_6():
    model = MODELS["torchvision:convnext"][0]()  # a real build: layer_scale = 1e-6 everywhere
    with torch.no_grad():
        model.features[1][0].layer_scale.fill_(0.1)
    rep = init_model(model, "auto", generator=_gen())
    assert torch.all(model.features[1][0].layer_scale == 0.1)
    assert rep.param("features.1.0.layer_scale")["action"] == "kept (layer scale, configured value)"
    meta = meta_build(MODELS["torchvision:convnext"][0])
    rep = init_model(meta, "auto", generator=_gen())
    assert torch.all(meta.features[1][0].layer_scale == 1e-6)
    assert rep.param("features.1.0.layer_scale")["action"] == "layer scale 1e-06"


def test_lstm_per_gate_orthogonal_recurrent_and_forget_bias():
    m = Recurrent(nn.LSTM)
    rep = init_model(m, "auto", generator=_gen())
    h = 32
    b_ih, b_hh = m.rnn.bias_ih_l0, m.rnn.bias_hh_l0
    assert torch.all(b_ih[h:2 * h] == 1) and torch.all(b_ih[:h] == 0) and torch.all(b_hh == 0)
    for block in m.rnn.weight_hh_l0.detach().chunk(4, 0):
        assert torch.allclose(block @ block.T, torch.eye(h), atol=1e-5)
    assert _std(m.rnn.weight_ih_l0) == pytest.approx(16 ** -0.5, rel=0.1)  # LeCun per gate, fan_in 16
    assert rep["rnn.weight_hh_l0"]["scheme"] == "orthogonal per gate (4 blocks)"
    g = Recurrent(nn.GRU)
    init_model(g, "auto", generator=_gen())
    assert torch.all(g.rnn.bias_ih_l0 == 0)


def test_zero_init_residual_norms_are_kept():
    model = build("torchvision:resnet18[num_classes=10,zero_init_residual=True]")
    rep = init_model(model, "auto", generator=_gen())
    assert torch.all(model.layer1[0].bn2.weight == 0) and torch.all(model.bn1.weight == 1)
    assert rep["layer1.0.bn2"]["scheme"] == "kept zeros (zero-init residual)"
    # every norm zero is uninitialised memory, not a choice: they get ones
    m = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with torch.no_grad():
        m[1].weight.zero_()
    init_model(m, generator=_gen())
    assert torch.all(m[1].weight == 1)


class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.temperature = nn.Parameter(torch.full((1,), math.nan))

    def forward(self, x):
        return self.lin(x) * self.temperature


def test_strict_names_every_parameter_left_as_it_was():
    from initlab import InitlabError

    with pytest.raises(InitlabError, match="temperature"):  # NaN: detectably uninitialised, strict by default
        init_model(_Custom(), generator=_gen())
    m = _Custom()
    with torch.no_grad():
        m.temperature.fill_(1.0)
    rep = init_model(m, generator=_gen())  # finite: kept, and the report says why
    assert rep.untouched == ["temperature"] and "no rule" in rep.param("temperature")["why"]
    assert "untouched: temperature" in str(rep)
    with pytest.raises(InitlabError, match="strict=True"):
        init_model(m, generator=_gen(), strict=True)
    rep = init_model(_Custom(), generator=_gen(), strict=False)
    assert rep.untouched == ["temperature"]
    rep = init_model(_Custom(), generator=_gen(), exclude=lambda n, mod: n == "")
    assert rep.param("temperature")["why"] == "left out by include/exclude"
    assert [p["name"] for p in rep.params] == ["temperature", "lin.weight", "lin.bias"]


@pytest.mark.parametrize("kind", ["weight_norm", "old_weight_norm", "spectral_norm", "prune"])
def test_the_effective_weight_of_a_parametrized_layer_is_initialised(kind):
    from torch.nn.utils import parametrizations, prune

    m = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 2))
    with torch.no_grad():
        m[0].weight.mul_(0.3)  # PyTorch's default, scaled: not what init_model writes
    if kind == "weight_norm":
        parametrizations.weight_norm(m[0])
    elif kind == "old_weight_norm":
        with pytest.warns(FutureWarning):
            torch.nn.utils.weight_norm(m[0])
    elif kind == "spectral_norm":
        parametrizations.spectral_norm(m[0])
    else:
        prune.random_unstructured(m[0], "weight", 0.5)
    rep = init_model(m, generator=_gen())
    row = rep["0"]
    assert row["scheme"] == "he_normal (effective weight)" and not rep.untouched
    std = float(m[0].weight.detach().std())
    if kind == "spectral_norm":  # W / sigma_max(W) (each read runs a power iteration): the layer's constraint
        assert float(torch.linalg.matrix_norm(m[0].weight.detach(), 2)) == pytest.approx(1.0, rel=0.25)  # power iteration
    else:  # weight norm is exact; the pruned weight has the target variance over all its entries
        assert row["realised_std"] == pytest.approx(std, rel=0.02)
        assert std == pytest.approx(row["target_std"], rel=0.03)
    y = m(torch.randn(8, 256))
    assert torch.isfinite(y).all()


def test_residual_policies():
    from initlab import InitlabError

    gpt = meta_build(MODELS["hf:gpt2"][0])
    rep = init_model(gpt, "auto", generator=_gen(), residual="gpt2")
    w = gpt.transformer.h[0].attn.c_proj.weight.detach()  # Conv1D (64, 64): LeCun 1/8, x 1/sqrt(2 n_layer) = 1/2
    assert _std(w) == pytest.approx(64 ** -0.5 / 2, rel=0.05)
    assert rep["transformer.h.0.attn.c_proj"]["scheme"].endswith("gpt2: x0.5 (1/sqrt(4))")
    assert rep.param("transformer.h.0.mlp.c_proj.weight")["action"].endswith("(1/sqrt(4))")
    assert rep["transformer.h.0.attn.c_proj"]["realised_std"] == pytest.approx(_std(w), rel=1e-3)

    net = build("torchvision:resnet18[num_classes=10]")
    rep = init_model(net, "auto", generator=_gen(), residual="skipinit")
    assert torch.all(net.layer1[0].bn2.weight == 0) and torch.all(net.bn1.weight == 1)
    assert rep["layer1.0.bn2"]["scheme"].startswith("ones/zeros + skipinit")
    init_model(net, "auto", generator=_gen(), residual="fixup")  # 8 branches of 2 convs: x 8^(-1/2), last 0
    assert torch.all(net.layer1[0].conv2.weight == 0)
    assert float(net.layer1[0].conv1.weight.detach().std()) == pytest.approx((2 / (64 * 9)) ** 0.5 / 8 ** 0.5, rel=0.05)

    vit = meta_build(MODELS["timm:vit_tiny"][0])
    init_model(vit, "auto", generator=_gen(), residual="skipinit")
    assert torch.all(vit.blocks[0].attn.proj.weight == 0) and torch.all(vit.blocks[0].mlp.fc2.weight == 0)
    with pytest.raises(InitlabError, match="no residual branch"):
        init_model(nn.Sequential(nn.Linear(3, 3)), residual="fixup")
    with pytest.raises(InitlabError, match="residual must be"):
        init_model(nn.Sequential(nn.Linear(3, 3)), residual="rezero")
