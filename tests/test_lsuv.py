"""initlab.lsuv_: every covered layer ends within tolerance, in one forward pass, leaving no trace."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import initlab
from initlab import InitlabError, lsuv_

COVERED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def _output_stats(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[float, torch.Tensor]]:
    """Independent measurement: (variance, per-channel means) of every covered layer's output."""
    got: dict[str, tuple[float, torch.Tensor]] = {}

    def hook(name):
        def h(mod, args, out):
            o = out.detach()
            cdim = 1 if isinstance(mod, nn.modules.conv._ConvNd) else o.dim() - 1
            dims = tuple(d for d in range(o.dim()) if d != cdim)
            got.setdefault(name, (o.var(unbiased=False).item(), o.mean(dim=dims)))
        return h

    hs = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, COVERED)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hs:
            h.remove()
    return got


def _mlp(inplace: bool = True) -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(inplace=inplace), nn.Linear(128, 128), nn.Tanh(),
                         nn.Dropout(0.2), nn.Linear(128, 96), nn.ReLU(inplace=inplace), nn.Linear(96, 10))


def _cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.Conv2d(16, 32, 3, stride=2, groups=4), nn.ReLU(inplace=True),  # grouped
        nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU(),  # depthwise
        nn.ConvTranspose2d(32, 8, 4, stride=2, padding=1), nn.Tanh(),
        nn.Flatten(), nn.Linear(8 * 14 * 14, 10),
    )


@pytest.mark.parametrize("target_var,tol", [(1.0, 0.1), (2.5, 0.02)])
def test_mlp_every_layer_within_tolerance(target_var, tol):
    torch.manual_seed(0)
    m = _mlp().eval()
    x = torch.randn(256, 64) * 3 + 1
    before = _output_stats(m, x)
    # negative control: PyTorch's default init is not in the band, so the check below can fail
    assert any(abs(v - target_var) > tol * target_var for v, _ in before.values())
    rep = lsuv_(m, x, tol=tol, target_var=target_var, generator=torch.Generator().manual_seed(0))
    assert _no_hooks(m)
    after = _output_stats(m, x)
    assert set(after) == {"0", "2", "5", "7"}
    for row in rep.rows:
        v, _ = after[row["layer"]]
        assert abs(v - target_var) <= tol * target_var, row
        assert row["variance"] == pytest.approx(v, rel=1e-5)
        assert row["converged"] and 0 <= row["iterations"] <= 10
    assert rep.converged
    assert [r["layer"] for r in rep.rows] == ["0", "2", "5", "7"]  # forward order


def test_cnn_grouped_depthwise_transposed_in_eval_mode():
    torch.manual_seed(1)
    m = _cnn().eval()
    x = torch.rand(32, 3, 16, 16)
    rep = lsuv_(m, x, generator=torch.Generator().manual_seed(0))
    after = _output_stats(m, x)
    assert len(after) == 5
    for name, (v, _) in after.items():
        assert abs(v - 1.0) <= 0.1, name
    assert {r["kind"] for r in rep.rows} == {"Conv2d", "ConvTranspose2d", "Linear"}
    assert not m.training


def test_conv1d_conv3d_and_their_transposes():
    torch.manual_seed(9)
    m1 = nn.Sequential(nn.Conv1d(2, 6, 5), nn.ReLU(), nn.ConvTranspose1d(6, 4, 3, stride=2, groups=2), nn.Flatten())
    m3 = nn.Sequential(nn.Conv3d(1, 4, 3), nn.ELU(), nn.ConvTranspose3d(4, 2, 2, stride=2))
    for m, x in ((m1, torch.randn(16, 2, 40)), (m3, torch.randn(4, 1, 8, 8, 8))):
        rep = lsuv_(m, x, tol=0.05, generator=torch.Generator().manual_seed(0))
        assert len(rep.rows) == 2
        for name, (v, _) in _output_stats(m, x).items():
            assert abs(v - 1.0) <= 0.05, name


def test_conv_transpose_called_with_output_size():
    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(4, 2, 3, stride=2)

        def forward(self, x):
            return self.up(x, output_size=[16, 16])

    m = Up()
    x = torch.randn(8, 4, 7, 7)
    lsuv_(m, x)
    v, _ = _output_stats(m, x)["up"]
    assert abs(v - 1.0) <= 0.1


def test_center_zeroes_channel_means():
    torch.manual_seed(2)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Sigmoid(), nn.Flatten(),
                      nn.Linear(8 * 4 * 4, 5))
    x = torch.rand(64, 3, 8, 8) + 2.0  # far from zero mean
    lsuv_(m, x, center=True, generator=torch.Generator().manual_seed(0))
    for name, (v, means) in _output_stats(m, x).items():
        assert abs(v - 1.0) <= 0.1, name
        assert means.abs().max().item() < 1e-4, name
    # negative control: without centring the means stay far from 0
    lsuv_(m, x, center=False, generator=torch.Generator().manual_seed(0))
    _, means = _output_stats(m, x)["0"]
    assert means.abs().max().item() > 0.1


def test_orthogonal_pre_init_survives_rescaling():
    torch.manual_seed(3)
    m = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 16))
    lsuv_(m, torch.randn(128, 32), generator=torch.Generator().manual_seed(0))
    for lin in (m[0], m[2]):
        w = lin.weight.detach()
        gram = w @ w.T  # rows orthogonal, all of the same norm: s^2 I
        s2 = gram.diagonal().mean()
        assert torch.allclose(gram / s2, torch.eye(16), atol=1e-5)
        assert torch.count_nonzero(lin.bias) == 0


def test_same_generator_same_weights():
    x = torch.randn(64, 64)
    a, b = _mlp().eval(), _mlp().eval()
    lsuv_(a, x, generator=torch.Generator().manual_seed(7))
    lsuv_(b, x, generator=torch.Generator().manual_seed(7))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_one_forward_pass_and_a_few_layer_calls():
    """Cost: the model's forward runs once; each layer is recomputed only while it is fitted."""
    torch.manual_seed(4)
    m = _mlp().eval()
    calls = {"model": 0}
    layer_calls: dict[str, int] = {}
    orig = m.forward

    def counting_forward(*args):
        calls["model"] += 1
        return orig(*args)

    m.forward = counting_forward  # type: ignore[method-assign]
    for name, mod in m.named_modules():
        if isinstance(mod, nn.Linear):
            f = mod.forward

            def wrapped(*args, _f=f, _n=name):
                layer_calls[_n] = layer_calls.get(_n, 0) + 1
                return _f(*args)

            mod.forward = wrapped  # type: ignore[method-assign]
    rep = lsuv_(m, torch.randn(128, 64))
    assert calls["model"] == 1
    for row in rep.rows:
        # fitting: iterations + 1 evaluations; then the forward pass itself (skipped for the last layer)
        assert layer_calls[row["layer"]] <= row["iterations"] + 2


def test_train_mode_restores_buffers():
    torch.manual_seed(5)
    m = nn.Sequential(nn.Linear(10, 20), nn.BatchNorm1d(20), nn.ReLU(), nn.Linear(20, 5))
    before = {k: v.clone() for k, v in m.named_buffers()}
    lsuv_(m, torch.randn(64, 10) * 4 + 3)
    assert m.training
    for k, v in m.named_buffers():
        assert torch.equal(v, before[k]), k
    # negative control: a plain forward in train mode does change them
    m(torch.randn(64, 10) * 4 + 3)
    assert not torch.equal(m[1].running_mean, before["1.running_mean"])


def test_warns_when_max_iter_is_hit():
    torch.manual_seed(6)
    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(64, 16) * 10  # orthogonal weights keep variance 100: far outside the band
    with pytest.warns(RuntimeWarning, match=r"did not reach variance 1 \+- 0.1 within max_iter=0"):
        rep = lsuv_(m, x, max_iter=0)
    assert not rep.converged
    assert rep.rows[0]["iterations"] == 0
    assert _no_hooks(m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with iterations allowed: no warning
        assert lsuv_(m, x).converged


def test_constant_output_cannot_be_rescaled():
    class Zero(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc2(self.fc1(x) * 0.0)

    with pytest.warns(RuntimeWarning, match="fc2"):
        rep = lsuv_(Zero(), torch.randn(16, 4))
    row = [r for r in rep.rows if r["layer"] == "fc2"][0]
    assert not row["converged"] and "variance 0" in row["note"]


def test_uncovered_and_unused_layers_are_reported():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.fc = nn.Linear(8, 4)
            self.unused = nn.Linear(4, 4)

        def forward(self, idx):
            return self.fc(self.emb(idx))

    m = M()
    emb_before = m.emb.weight.detach().clone()
    rep = lsuv_(m, torch.randint(0, 20, (32, 5)))
    assert torch.equal(m.emb.weight, emb_before)  # not covered: untouched
    assert any("emb" in s for s in rep.skipped)
    unused = [r for r in rep.rows if r["layer"] == "unused"][0]
    assert unused["iterations"] is None and "not called" in unused["note"]
    assert rep.converged  # the unused layer does not count
    assert "LSUV" in str(rep)
    assert list(rep.frame()["layer"]) == ["fc", "unused"]


def test_init_model_lsuv_scheme():
    torch.manual_seed(8)
    m = _mlp().eval()
    x = torch.randn(128, 64)
    report = initlab.init_model(m, "lsuv", batch=x, generator=torch.Generator().manual_seed(0))
    for name, (v, _) in _output_stats(m, x).items():
        assert abs(v - 1.0) <= 0.1, name
    assert {r["scheme"] for r in report.rows} == {"lsuv"}


# ---------------------------------------------------------------------------------- bad input


def test_bad_input():
    m = _mlp()
    with pytest.raises(InitlabError, match="must be a torch.Tensor"):
        lsuv_(m, [1.0, 2.0])  # type: ignore[arg-type]
    x = torch.randn(8, 64)
    x[3, 3] = float("nan")
    with pytest.raises(InitlabError, match="NaN"):
        lsuv_(m, x)
    with pytest.raises(InitlabError, match=r"no layer LSUV can fit.*Linear.*found only: 0 \(Embedding\)"):
        lsuv_(nn.Sequential(nn.Embedding(5, 3)), torch.randint(0, 5, (4,)))
    with pytest.raises(InitlabError, match="no layer LSUV can fit"):
        lsuv_(nn.Sequential(nn.ReLU()), torch.randn(4, 3))
    with pytest.raises(InitlabError, match=r"expects .*64.*got input of shape \(8, 32\)"):
        lsuv_(m, torch.randn(8, 32))
    assert _no_hooks(m)
    for kw in ({"tol": 0}, {"tol": float("nan")}, {"target_var": -1.0}, {"max_iter": -1}, {"max_iter": 2.5},
               {"generator": 0}):
        with pytest.raises(InitlabError):
            lsuv_(m, torch.randn(8, 64), **kw)


def test_wrong_shape_deep_in_the_model():
    m = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(9, 4))  # a bug in the user's model
    with pytest.raises(InitlabError, match=r"layer '2' \(Linear\) expects .*9.*got input of shape \(4, 8\)"):
        lsuv_(m, torch.randn(4, 16))
    assert _no_hooks(m)
