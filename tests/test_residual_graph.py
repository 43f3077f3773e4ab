"""Residual branches found from the traced graph (initlab._residual.find_branches), the name-based
rule only when tracing fails, and the report saying which."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from initlab import init_model
from initlab._residual import branches_by_name, find_branches


class Odd(nn.Module):
    """A bottleneck block whose names follow no library's convention."""

    def __init__(self, c: int = 8, project: bool = False) -> None:
        super().__init__()
        self.squeeze_in = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.tidy = nn.BatchNorm2d(c)
        self.expand_out = nn.Conv2d(c, c, 1, bias=False)
        self.settle = nn.BatchNorm2d(c)
        self.gate = nn.ReLU()
        self.skip_path = nn.Conv2d(c, c, 1, bias=False) if project else None

    def forward(self, x):
        h = self.gate(self.tidy(self.squeeze_in(x)))
        h = self.settle(self.expand_out(h))
        return self.gate((self.skip_path(x) if self.skip_path is not None else x) + h)


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Odd(project=True), Odd(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 4))


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_unusual_names_found_from_the_graph():
    net = _net()
    branches, how = find_branches(net)
    assert how == "graph"
    # the projection shortcut (one conv) is not the branch; the side with two convs is
    assert [(b.layers, b.norm) for b in branches] == [(["1.squeeze_in", "1.expand_out"], "1.settle"),
                                                      (["2.squeeze_in", "2.expand_out"], "2.settle")]
    assert branches_by_name(net) == []  # negative control: the name-based rule finds nothing here


def test_policies_act_on_the_traced_branches():
    net = _net()
    rep = init_model(net, "auto", generator=_gen(), residual="skipinit")
    assert rep.extra["residual"] == {"policy": "skipinit", "branches": 2, "found_by": "graph"}
    assert "residual: skipinit on 2 branches, found by graph" in str(rep)
    assert torch.all(net[1].settle.weight == 0) and torch.all(net[1].tidy.weight == 1)
    init_model(net, "auto", generator=_gen(), residual="fixup")  # 2 branches of 2 convs: x 2^(-1/2), last 0
    assert torch.all(net[2].expand_out.weight == 0) and bool(torch.any(net[1].skip_path.weight != 0))
    std = float(net[1].squeeze_in.weight.detach().std())
    # fed by the stem conv (no activation): LeCun 1/(8 * 9), then x 2^(-1/2); 576 entries: rel. s.e. 3 %
    assert std == pytest.approx((1 / (8 * 9)) ** 0.5 / 2 ** 0.5, rel=0.12)


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = x * 2
        return x + self.fc2(torch.relu(self.fc1(x)))


def test_fallback_to_names_when_tracing_fails_and_the_report_says_so():
    m = Untraceable()
    branches, how = find_branches(m)
    assert how.startswith("module names (tracing failed: TraceError")
    assert [b.layers for b in branches] == [["fc1", "fc2"]]
    rep = init_model(m, "auto", generator=_gen(), residual="skipinit")
    assert rep.extra["residual"]["found_by"].startswith("module names")
    assert "found by module names (tracing failed" in str(rep)
    assert torch.all(m.fc2.weight == 0)


def test_pytorch_transformer_layers():
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 2, 64), 2, enable_nested_tensor=False)
    layers = sorted(tuple(b.layers) for b in find_branches(enc)[0])
    assert layers == [("layers.0.linear1", "layers.0.linear2"), ("layers.0.self_attn.out_proj",),
                      ("layers.1.linear1", "layers.1.linear2"), ("layers.1.self_attn.out_proj",)]


_HAVE = all(importlib.util.find_spec(m) for m in ("timm", "torchvision"))


@pytest.mark.skipif(not _HAVE, reason="needs timm and torchvision")
@pytest.mark.parametrize("spec", ["torchvision:resnet50", "timm:resnet50"])
def test_resnet50_bottlenecks(spec):
    from initlab._zoo import build

    with torch.device("meta"):  # tracing runs no computation
        net = build(f"{spec}[num_classes=10]")
    branches, how = find_branches(net)
    assert how == "graph" and len(branches) == 16
    first = branches[0]
    assert first.layers == ["layer1.0.conv1", "layer1.0.conv2", "layer1.0.conv3"] and first.norm == "layer1.0.bn3"
    assert all("downsample" not in name for b in branches for name in b.layers)


@pytest.mark.skipif(not _HAVE, reason="needs timm and torchvision")
def test_swin_attention_weights_read_as_tensors():
    from torchvision.models.swin_transformer import SwinTransformer

    from initlab._compat import ensure_torchvision

    ensure_torchvision()
    with torch.device("meta"):
        net = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=[4, 4],
                              num_classes=10)
    layers = [b.layers for b in find_branches(net)[0]]
    assert ["features.1.0.attn.qkv", "features.1.0.attn.proj"] in layers
    assert ["features.1.0.mlp.0", "features.1.0.mlp.3"] in layers
