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


@pytest.mark.parametrize("name", list(MODELS))
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
    assert low <= float(y.std()) <= 3.0, float(y.std())
