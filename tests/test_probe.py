"""initlab.probe: per-layer numbers against hand-written reference computations."""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from initlab import InitlabError, probe
from initlab._probe import COLUMNS

REQUIRED = ("layer", "kind", "fan_in", "fan_out", "pre_mean", "pre_var", "pre_sq_mean", "post_mean", "post_var",
            "post_sq_mean", "saturated_frac", "dead_frac", "grad_pre_var", "weight_grad_var",
            "predicted_pre_sq_mean", "predicted_grad_pre_var")


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               for m in model.modules())


def _tiny(dtype=torch.float64) -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).to(dtype)
    with torch.no_grad():
        m[0].weight.mul_(6.0)  # some tanh units saturate
        m[2].bias[1] = -50.0  # one ReLU unit is dead for every sample
    return m


def _moments(t: torch.Tensor) -> tuple[float, float, float]:
    t = t.detach().double()
    return t.mean().item(), t.var(unbiased=False).item(), (t * t).mean().item()


def test_probe_matches_hand_reference_on_a_tiny_mlp():
    m = _tiny()
    x = torch.randn(16, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.3
    y = torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(2))
    res = probe(m, x, target=y)
    assert _no_hooks(m)
    assert all(p.grad is None for p in m.parameters())  # probe leaves .grad alone

    # the reference: the same forward written out by hand, gradients by autograd on the tensors
    W = [m[0].weight, m[2].weight, m[4].weight]
    B = [m[0].bias, m[2].bias, m[4].bias]
    acts = [torch.tanh, torch.relu, lambda t: t]
    h_nob, h, post, inp = [], [], [], []
    a = x
    for w, b, act in zip(W, B, acts):
        inp.append(a)
        z = a @ w.T
        hb = z + b
        hb.retain_grad()
        h_nob.append(z)
        h.append(hb)
        a = act(hb)
        post.append(a)
    loss = F.cross_entropy(a, y)
    loss.backward()
    assert res.loss == pytest.approx(loss.item(), rel=1e-12)

    assert [r["layer"] for r in res.rows] == ["0", "2", "4"]
    for i, r in enumerate(res.rows):
        assert r["index"] == i + 1
        assert r["kind"] == "Linear"
        assert (r["fan_in"], r["fan_out"]) == (W[i].shape[1], W[i].shape[0])
        for prefix, t in (("pre", h_nob[i]), ("pre_bias", h[i]), ("post", post[i]), ("input", inp[i])):
            mean, var, sq = _moments(t)
            assert r[f"{prefix}_mean"] == pytest.approx(mean, rel=1e-9, abs=1e-12), prefix
            assert r[f"{prefix}_var"] == pytest.approx(var, rel=1e-9), prefix
            assert r[f"{prefix}_sq_mean"] == pytest.approx(sq, rel=1e-9), prefix
        assert r["weight_var"] == pytest.approx(W[i].detach().var(unbiased=False).item(), rel=1e-9)
        assert r["bias_var"] == pytest.approx(B[i].detach().var(unbiased=False).item(), rel=1e-9)
        assert r["grad_pre_var"] == pytest.approx(h[i].grad.var(unbiased=False).item(), rel=1e-9)
        assert r["weight_grad_var"] == pytest.approx(W[i].grad.var(unbiased=False).item(), rel=1e-9)
        assert r["weight_grad_norm"] == pytest.approx(W[i].grad.norm().item(), rel=1e-9)

    # tanh: saturated where tanh'(x) = 1 - tanh(x)^2 < 0.1 * max tanh' = 0.1
    sat_ref = ((1 - torch.tanh(h[0]) ** 2) < 0.1).double().mean().item()
    assert 0 < sat_ref < 1
    assert res.rows[0]["saturated_frac"] == pytest.approx(sat_ref, abs=1e-12)
    assert math.isnan(res.rows[0]["dead_frac"])
    # relu: a unit is dead when it is 0 for every sample
    dead_ref = (post[1] <= 0).all(dim=0).double().mean().item()
    assert dead_ref == pytest.approx(1 / 3)
    assert res.rows[1]["dead_frac"] == pytest.approx(dead_ref)
    assert math.isnan(res.rows[1]["saturated_frac"])
    # the readout: nothing follows, so the post-activation is the output itself
    assert res.rows[2]["activation"] == "none"
    assert res.rows[2]["post_var"] == pytest.approx(res.rows[2]["pre_bias_var"])


def test_saturation_threshold_for_sigmoid_is_the_derivative_rule():
    lin = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    m = nn.Sequential(lin, nn.Sigmoid())
    x = torch.linspace(-8, 8, 1601).reshape(-1, 1)
    s = torch.sigmoid(x)
    ref = (s * (1 - s) < 0.1 * 0.25).double().mean().item()  # sigmoid' < 10% of its max 1/4
    assert probe(m, x).rows[0]["saturated_frac"] == pytest.approx(ref, abs=1.5 / 1601)
    assert 0.5 < ref < 0.6  # |x| > 3.66 of [-8, 8]


def test_hardtanh_flat_tails_count_as_saturated():
    lin = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    x = torch.linspace(-4, 4, 801).reshape(-1, 1)
    ref = (x.abs() > 1).double().mean().item()
    for act in (nn.Hardtanh(), nn.Hardtanh(inplace=True)):
        got = probe(nn.Sequential(lin, act), x.clone()).rows[0]["saturated_frac"]
        assert got == pytest.approx(ref, abs=2 / 801)


def _reference_grad_pre(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> list[float]:
    """Var of dL/d(layer output) by autograd with retain_grad, for a Sequential of Linear/ReLU."""
    outs = []
    a = x
    for layer in model:
        if isinstance(layer, nn.ReLU):
            a = torch.relu(a)  # out of place: the reference must not depend on in-place semantics
        else:
            a = layer(a)
            a.retain_grad()
            outs.append(a)
    F.cross_entropy(a, target).backward()
    model.zero_grad(set_to_none=True)
    return [o.grad.var(unbiased=False).item() for o in outs]


def test_inplace_relu_gives_the_gradient_before_the_activation():
    torch.manual_seed(3)
    widths = [20, 16, 16, 4]

    def make(inplace: bool) -> nn.Sequential:
        torch.manual_seed(4)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(nn.ReLU(inplace=inplace))
        return nn.Sequential(*layers)

    x = torch.randn(64, 20)
    y = torch.randint(0, 4, (64,))
    ref = _reference_grad_pre(make(False), x, y)
    a, b = probe(make(True), x, target=y), probe(make(False), x, target=y)
    for ra, rb, g in zip(a.rows, b.rows, ref):
        assert ra["grad_pre_var"] == pytest.approx(g, rel=1e-5)
        for key in ("pre_var", "post_var", "dead_frac", "weight_grad_norm"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-6, nan_ok=True)


class _Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(12, 10), nn.Linear(10, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(F.relu(self.fc1(x)))))


def test_functional_activations_match_module_activations():
    torch.manual_seed(5)
    fm = _Functional()
    sm = nn.Sequential(fm.fc1, nn.ReLU(), fm.fc2, nn.Tanh(), fm.fc3)
    x = torch.randn(32, 12)
    a, b = probe(fm, x, target=torch.randn(32, 3)), probe(sm, x, target=torch.randn(32, 3))
    assert a.traced
    assert [r["activation"] for r in a.rows] == ["relu", "tanh", "none"]
    for ra, rb in zip(a.rows, b.rows):
        for key in ("pre_var", "post_mean", "post_var", "saturated_frac", "dead_frac"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-6, nan_ok=True), key


class _Shared(nn.Module):
    """One activation module used after two layers, and layers registered out of call order."""

    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(6, 2)
        self.fc2 = nn.Linear(6, 6)
        self.fc1 = nn.Linear(4, 6)
        self.act = nn.Sigmoid()

    def forward(self, x):
        return self.out(self.act(self.fc2(self.act(self.fc1(x)))))


def test_forward_order_and_a_shared_activation_module():
    torch.manual_seed(6)
    m = _Shared()
    x = torch.randn(50, 4)
    res = probe(m, x)
    assert res.layers == ["fc1", "fc2", "out"]  # forward order, not registration order
    h1 = torch.sigmoid(m.fc1(x))
    h2 = torch.sigmoid(m.fc2(h1))
    assert res["fc1"]["post_var"] == pytest.approx(h1.var(unbiased=False).item(), rel=1e-5)
    assert res["fc2"]["post_var"] == pytest.approx(h2.var(unbiased=False).item(), rel=1e-5)


def test_input_moments_follow_in_place_changes():
    """A layer's input moments are reused from the activation measured before it only while that
    tensor is unchanged: an in-place op in between (version counter) forces a fresh measurement."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2)

        def forward(self, x):
            h = self.act(self.fc1(x))
            h.mul_(3.0)
            return self.fc2(h)

    torch.manual_seed(10)
    m = M()
    x = torch.randn(64, 6)
    res = probe(m, x)
    h = torch.tanh(m.fc1(x)).detach()
    assert res["fc1"]["post_var"] == pytest.approx(h.var(unbiased=False).item(), rel=1e-5)
    assert res["fc2"]["input_var"] == pytest.approx(9 * h.var(unbiased=False).item(), rel=1e-5)
    assert res["fc1"]["input_sq_mean"] == pytest.approx((x * x).mean().item(), rel=1e-6)


class _Block(nn.Module):
    def __init__(self, c_in: int, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.shortcut = nn.Conv2d(c_in, c, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.conv2(y) + self.shortcut(x))


class _ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = _Block(8, 16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = self.pool(self.block(x)).flatten(1)
        return self.head(x)


def test_residual_conv_net_keyed_by_module_name():
    torch.manual_seed(7)
    m = _ResNet()
    x = torch.randn(8, 3, 10, 10)
    captured: dict[str, torch.Tensor] = {}
    hs = [mod.register_forward_hook(lambda mod, i, o, n=n: captured.__setitem__(n, o.detach().clone()))
          for n, mod in m.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    m(x)
    for h in hs:
        h.remove()
    res = probe(m, x, target=torch.randint(0, 5, (8,)))
    assert _no_hooks(m)
    assert set(res.layers) == {"stem", "block.conv1", "block.conv2", "block.shortcut", "head"}
    assert res.layers.index("block.conv1") < res.layers.index("block.conv2")
    for name, out in captured.items():
        assert res[name]["pre_bias_var"] == pytest.approx(out.var(unbiased=False).item(), rel=1e-4)
        assert res[name]["units"] == out[0].numel()
        assert math.isfinite(res[name]["grad_pre_var"]) and res[name]["grad_pre_var"] > 0
    # the stem's functional relu: dead = channels that are 0 for every sample and position
    dead = (F.relu(captured["stem"]) <= 0).flatten(2).all(dim=2).all(dim=0).double().mean().item()
    assert res["stem"]["dead_frac"] == pytest.approx(dead)


def test_dead_channels_of_a_conv_layer():
    conv = nn.Conv2d(2, 4, 3)
    with torch.no_grad():
        conv.bias.copy_(torch.tensor([-1e3, 0.0, 0.0, -1e3]))
    res = probe(nn.Sequential(conv, nn.ReLU()), torch.randn(6, 2, 8, 8))
    assert res.rows[0]["dead_frac"] == pytest.approx(0.5)  # channels 0 and 3
    ctrl = probe(nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU()), torch.randn(6, 2, 8, 8))
    assert ctrl.rows[0]["dead_frac"] == 0.0  # negative control


def test_norm_between_layer_and_functional_activation():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn, self.out = nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)

        def forward(self, x):
            return self.out(torch.sigmoid(self.bn(self.fc(x))))

    torch.manual_seed(8)
    m = M()
    x = torch.randn(40, 6) * 5
    res = probe(m, x)
    ref = torch.sigmoid(m.bn(m.fc(x)))  # the activation acts on the normalised value
    assert res["fc"]["post_var"] == pytest.approx(ref.var(unbiased=False).item(), rel=1e-5)
    # the recursion restarts after the norm: layer "out" is predicted from its measured input
    r = res["out"]
    assert r["predicted_pre_sq_mean"] == pytest.approx(r["fan_in"] * r["weight_var"] * r["input_sq_mean"], rel=1e-6)


def test_histograms_and_tensorboard_fields(tmp_path):
    m = _tiny(torch.float32)
    x = torch.randn(30, 5)
    res = probe(m, x, target=torch.randint(0, 2, (30,)), bins=12)
    z = x @ m[0].weight.detach().T  # the "mat_mul" value: without bias
    h = res.histograms["0"]["pre"]
    assert h.counts.sum() == z.numel() == h.num
    assert len(h.edges) == 13
    assert h.min == pytest.approx(z.min().item()) and h.max == pytest.approx(z.max().item())
    assert h.sum_squares == pytest.approx((z * z).sum().item(), rel=1e-5)
    ref, _ = np.histogram(z.numpy(), bins=12, range=(h.min, h.max))
    assert np.abs(h.counts - ref).sum() <= 2  # histc and numpy may differ on an edge value
    assert set(res.histograms["2"]) == {"pre", "post", "grad_pre"}
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path)) as w:
        w.add_histogram_raw("layer0/pre", global_step=0, **h.tensorboard())
    assert any(tmp_path.iterdir())


def test_frame_columns_and_json():
    res = probe(_tiny(torch.float32), torch.randn(8, 5), target=torch.randint(0, 2, (8,)))
    df = res.frame()
    assert set(REQUIRED) <= set(df.columns)
    assert list(df.columns) == list(COLUMNS)
    assert list(df["layer"]) == ["0", "2", "4"]
    import json

    json.dumps(res.to_dict(), allow_nan=False)  # NaN became None
    text = str(res)
    assert "pre_var" in text and "grad_pre_var" in text


def test_predictions_follow_a_wide_random_network():
    """Predicted variances (theory's recursion, fed by the probe) against a wide He/ReLU network.

    Finite width makes the measured/predicted ratio fluctuate from network to network; over 12
    seeds (width 512, batch 512) its standard deviation was 0.004, 0.016, 0.062 forward for the
    hidden layers 1-3 and 0.05 backward, with means within 1-2% of 1. Tolerances are 5 sigma;
    the negative control (weights changed behind the predictions' back) must fall outside them.
    """
    torch.manual_seed(9)
    n, batch = 512, 512
    layers: list[nn.Module] = []
    for _ in range(3):
        lin = nn.Linear(n, n)
        nn.init.normal_(lin.weight, std=math.sqrt(2.0 / n))
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.ReLU()]
    layers.append(nn.Linear(n, 10))
    m = nn.Sequential(*layers)
    x = torch.randn(batch, n)
    g = torch.randn(batch, 10, generator=torch.Generator().manual_seed(0))
    res = probe(m, x, loss=lambda out: (out * g).sum())
    fwd_tol = (0.02, 0.08, 0.31)
    for r, tol in zip(res.rows, fwd_tol):
        assert r["pre_sq_mean"] == pytest.approx(r["predicted_pre_sq_mean"], rel=tol), r["layer"]
        assert r["grad_pre_var"] == pytest.approx(r["predicted_grad_pre_var"], rel=0.25), r["layer"]
    # the readout's gradient anchors the backward recursion
    assert res.rows[-1]["predicted_grad_pre_var"] == res.rows[-1]["grad_pre_var"]
    # negative control: scale the hidden weights by 1.5 (variance x2.25); the old predictions miss
    with torch.no_grad():
        for lin in (m[0], m[2], m[4]):
            lin.weight.mul_(1.5)
    res2 = probe(m, x)
    for r, r2, tol in zip(res.rows, res2.rows, fwd_tol):
        assert abs(r2["pre_sq_mean"] / r["predicted_pre_sq_mean"] - 1) > tol, r["layer"]
    # ... while the new probe's own predictions follow the new weights
    for r2, tol in zip(res2.rows, fwd_tol):
        assert r2["pre_sq_mean"] == pytest.approx(r2["predicted_pre_sq_mean"], rel=tol), r2["layer"]


def test_readout_prediction_is_the_second_moment_not_the_variance():
    """On a 10-unit readout after ReLU the realised mean of W x is not negligible (its square is
    ~E[x]^2 / E[x^2] / 10 = 3% of E[h^2]): the recursion predicts E[(W x)^2], so over independent
    draws ``pre_sq_mean / predicted_pre_sq_mean`` averages 1, while ``pre_var`` (which subtracts that
    mean) is measurably lower: the negative control shows the check can tell the two apart."""
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    sq, var = [], []
    for seed in range(60):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 10))
        for lin in (m[0], m[2]):
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
            nn.init.zeros_(lin.bias)
        r = probe(m, x).rows[-1]
        sq.append(r["pre_sq_mean"] / r["predicted_pre_sq_mean"])
        var.append(r["pre_var"] / r["predicted_pre_sq_mean"])
    sq_a, var_a = np.asarray(sq), np.asarray(var)
    se = sq_a.std(ddof=1) / math.sqrt(len(sq_a))
    assert abs(sq_a.mean() - 1) < 4 * se, (sq_a.mean(), se)
    # negative control: the variance is low by E[mean^2] / E[h^2], about 1/pi / 10, on every draw
    diff = sq_a - var_a
    assert (diff >= 0).all() and diff.mean() > 4 * diff.std(ddof=1) / math.sqrt(len(diff))
    assert 0.01 < diff.mean() < 0.08, diff.mean()


def test_sigmoid_prediction_uses_per_example_lengths():
    """N(0,1) weights on MNIST-like inputs: layer 2's input is sigmoid(h) with Var(h) ~ 90; the
    recursion's E[sigmoid(h)^2] must match the measured second moment of the activations."""
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(512, 784, generator=g) < 0.19).float() * torch.rand(512, 784, generator=g)
    torch.manual_seed(3)
    m = nn.Sequential(nn.Linear(784, 500), nn.Sigmoid(), nn.Linear(500, 10))
    for lin in (m[0], m[2]):
        nn.init.normal_(lin.weight)
        nn.init.zeros_(lin.bias)
    r = probe(m, x).rows
    assert r[0]["predicted_pre_sq_mean"] == pytest.approx(r[0]["pre_sq_mean"], rel=0.05)
    assert r[0]["predicted_post_sq_mean"] == pytest.approx(r[0]["post_sq_mean"], rel=0.05)


def test_hooks_removed_when_forward_or_loss_fails():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            torch.relu(self.fc(x))
            raise RuntimeError("boom")

    m = Boom()
    with pytest.raises(InitlabError, match="boom"):
        probe(m, torch.randn(2, 3))
    assert _no_hooks(m)
    m2 = _tiny(torch.float32)

    def bad_loss(out, target):
        raise RuntimeError("loss failed")

    with pytest.raises(RuntimeError, match="loss failed"):
        probe(m2, torch.randn(4, 5), target=torch.zeros(4), loss=bad_loss)
    assert _no_hooks(m2)


def test_attention_and_embedding_layers():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
            self.fc = nn.Linear(16, 3)

        def forward(self, idx):
            e = self.emb(idx)
            a, _ = self.attn(e, e, e)
            return self.fc(torch.relu(a))

    m = M().eval()
    res = probe(m, torch.randint(0, 50, (4, 7)), target=torch.randn(4, 7, 3))
    assert res.layers == ["emb", "attn", "fc"]
    assert res["attn"]["activation"] == "relu"
    assert res["emb"]["predicted_pre_sq_mean"] == pytest.approx(m.emb.weight.var(unbiased=False).item(), rel=1e-6)
    assert all(math.isfinite(r["grad_pre_var"]) for r in res.rows)


def test_several_inputs_bilinear_and_a_shared_layer():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.bil = nn.Bilinear(4, 3, 5)
            self.fc = nn.Linear(5, 5)

        def forward(self, a, b):
            h = torch.tanh(self.bil(a, b))
            return self.fc(torch.relu(self.fc(h)))  # fc is called twice: measured at the first call

    torch.manual_seed(11)
    m = M()
    a, b = torch.randn(32, 4), torch.randn(32, 3)
    res = probe(m, (a, b), target=torch.randn(32, 5))
    assert res.layers == ["bil", "fc"]
    first = m.fc(torch.tanh(m.bil(a, b))).detach()
    assert res["fc"]["pre_bias_var"] == pytest.approx(first.var(unbiased=False).item(), rel=1e-5)
    assert math.isnan(res["bil"]["predicted_pre_sq_mean"])  # the recursion does not model Bilinear
    assert math.isfinite(res["bil"]["grad_pre_var"])
    with pytest.raises(InitlabError, match="NaN"):
        probe(m, (a, torch.full((32, 3), float("nan"))))


# ---------------------------------------------------------------------------------- bad input


def test_non_tensor_batch():
    m = _tiny(torch.float32)
    with pytest.raises(InitlabError, match="must be a torch.Tensor.*got list"):
        probe(m, [[0.0] * 5])
    with pytest.raises(InitlabError, match="from_numpy"):
        probe(m, np.zeros((2, 5), dtype=np.float32))


def test_nan_in_batch():
    x = torch.randn(4, 5)
    x[1, 2] = float("nan")
    x[0, 0] = float("inf")
    with pytest.raises(InitlabError, match=r"non-finite values \(1 NaN, 1 inf out of 20\)"):
        probe(_tiny(torch.float32), x)


def test_model_without_supported_layer():
    with pytest.raises(InitlabError, match="no supported weight layer.*Linear"):
        probe(nn.Sequential(nn.ReLU(), nn.Tanh()), torch.randn(3, 4))
    with pytest.raises(InitlabError, match="must be a torch.nn.Module"):
        probe("model", torch.randn(3, 4))  # type: ignore[arg-type]


def test_batch_of_the_wrong_shape():
    m = nn.Sequential(nn.Linear(784, 10), nn.ReLU(), nn.Linear(10, 2))
    with pytest.raises(InitlabError, match=r"layer '0' \(Linear\) expects .*784.*got input of shape \(8, 100\)"):
        probe(m, torch.randn(8, 100))
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(InitlabError, match="3 channels"):
        probe(conv, torch.randn(2, 1, 8, 8))
    with pytest.raises(InitlabError, match=r"target of shape \(8, 3\).*output of shape \(8, 2\)"):
        probe(m, torch.randn(8, 784), target=torch.randn(8, 3))
    assert _no_hooks(m) and _no_hooks(conv)


def test_bad_arguments():
    m = _tiny(torch.float32)
    with pytest.raises(InitlabError, match="bins must be a positive integer"):
        probe(m, torch.randn(2, 5), bins=0)
    with pytest.raises(InitlabError, match="did you mean 'mse'"):
        probe(m, torch.randn(2, 5), target=torch.randn(2, 2), loss="mes")


def test_probe_module_imports_no_pandas():
    code = ("import sys, torch, initlab\n"
            "r = initlab.probe(torch.nn.Linear(3, 2), torch.randn(4, 3))\n"
            "print('pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cached_graph_follows_a_replaced_activation():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(32, 6)
    assert probe(m, x)["0"]["activation"] == "relu"
    assert probe(m, x)["0"]["activation"] == "relu"  # from the cache
    m[1] = nn.Tanh()
    res = probe(m, x)
    assert res["0"]["activation"] == "tanh"
    assert res["0"]["post_var"] == pytest.approx(torch.tanh(m[0](x)).var(unbiased=False).item(), rel=1e-5)


def test_length_summary_equal_groups_match_the_group_by_group_means():
    """The equal-split shortcut of the per-example length summary gives the same bits as the
    general path (numpy's row-wise mean sums each group as its own mean does)."""
    from initlab._probe import _length_summary

    rng = np.random.default_rng(0)
    for n in (256, 512, 250, 17):
        a = rng.gamma(2.0, 0.1, n)
        got = _length_summary(a, 16)
        groups = np.array([g.mean() for g in np.array_split(np.sort(a), 16)])
        want = groups * (float(np.mean(a)) / float(groups.mean()))
        assert np.array_equal(got, want), n
    # negative control: unsorted groups give other means
    a = rng.gamma(2.0, 0.1, 256)
    assert not np.array_equal(_length_summary(a, 16), a.reshape(16, -1).mean(axis=1))


@pytest.mark.parametrize("case", ["linear_1d", "linear_3d", "conv1d_unbatched", "conv2d"])
def test_pre_activation_moments_for_every_output_layout(case):
    """Each output layout the probe reduces separately (a 1-d Linear output, a Linear over a 3-d
    input whose channels are last, an unbatched Conv1d whose channels come first, a batched Conv2d):
    pre-activation moments with and without bias and the dead-unit fraction, against a direct
    float64 computation. Negative control: a per-channel shift of the reference changes its variance
    by more than the tolerance."""
    g = torch.Generator().manual_seed(3)
    layer, x, bshape = {
        "linear_1d": (nn.Linear(6, 5), torch.randn(6, generator=g), [-1]),
        "linear_3d": (nn.Linear(6, 5), torch.randn(4, 3, 6, generator=g), [-1]),
        "conv1d_unbatched": (nn.Conv1d(3, 5, 3), torch.randn(3, 9, generator=g), [-1, 1]),
        "conv2d": (nn.Conv2d(3, 5, 3), torch.randn(4, 3, 6, 6, generator=g), [1, -1, 1, 1]),
    }[case]
    layer = layer.double()
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([-40.0, 0.5, -0.5, 1.0, 2.0]))  # unit 0 is dead for every sample
    row = probe(nn.Sequential(layer, nn.ReLU()), x.double()).rows[0]
    with torch.no_grad():
        h = layer(x.double())
        no_bias = h - layer.bias.reshape(bshape)

    def close(a, b):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)

    for prefix, t in (("pre_bias", h), ("pre", no_bias)):
        m, v, sq = _moments(t)
        assert close(row[f"{prefix}_mean"], m), (prefix, row[f"{prefix}_mean"], m)
        assert close(row[f"{prefix}_var"], v), (prefix, row[f"{prefix}_var"], v)
        assert close(row[f"{prefix}_sq_mean"], sq), (prefix, row[f"{prefix}_sq_mean"], sq)
    # a unit (feature or channel) is dead when it is <= 0 for every sample and position
    cdim = {"linear_1d": 0, "linear_3d": 2, "conv1d_unbatched": 0, "conv2d": 1}[case]
    per_unit = h.movedim(cdim, -1).reshape(-1, 5)
    dead = (per_unit <= 0).all(dim=0).double().mean().item()
    assert row["dead_frac"] == dead and dead >= 1 / 5  # unit 0 at least
    shifted = no_bias + 0.1 * torch.arange(5.0, dtype=torch.float64).reshape(bshape)
    assert not close(row["pre_var"], _moments(shifted)[1])
