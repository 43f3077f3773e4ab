"""Nothing lost, nothing leaked: init_model, lsuv_, probe and audit finish or leave the model exactly
as it was (on errors and on Ctrl-C), never read stale activation parameters, and turn out-of-range
values and out-of-memory into one clear error. Each test failed before its fix."""
from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from model_state import assert_unchanged, snapshot
from torch import nn

import initlab
from initlab import InitlabError, _engine, _orthogonal, _undo
from initlab._audit import load_factory
from initlab.cli import main


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.PReLU(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 4))


class FailsOnCall(nn.Module):
    """Identity that raises ``exc`` on its ``n``-th call on a tensor (1-based; torch.fx's tracing
    calls it on a proxy, which does not count)."""

    def __init__(self, n: int, exc: BaseException) -> None:
        super().__init__()
        self.n, self.exc, self.calls = n, exc, 0

    def forward(self, x):
        if not isinstance(x, torch.Tensor):
            return x
        self.calls += 1
        if self.calls == self.n:
            raise self.exc
        return x


def _same_after_retry(model: nn.Module, scheme, g: torch.Generator, **kw) -> None:
    """After a rolled-back failure, the same generator gives what a fresh run gives."""
    fresh = copy.deepcopy(model)
    initlab.init_model(model, scheme, generator=g, **kw)
    initlab.init_model(fresh, scheme, generator=gen(1), **kw)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------
# init_model: all or nothing


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_init_model_user_scheme_failing_part_way_changes_nothing(exc):
    m, g = _mlp(), gen(1)
    calls = []

    def flaky(t, *, fans=None, generator=None):
        calls.append(1)
        if len(calls) == 3:
            raise exc
        return torch.nn.init.normal_(t, generator=generator)

    before, g_state = snapshot(m), g.get_state()
    with pytest.raises(InitlabError if isinstance(exc, Exception) else KeyboardInterrupt) as info:
        initlab.init_model(m, flaky, generator=g)
    if isinstance(exc, Exception):
        assert "layer '5' (Linear (4, 16)): scheme 'flaky' failed (RuntimeError: disk on fire)" in str(info.value)
    assert len(calls) == 3  # two layers were written before the failure
    assert_unchanged(before, m)
    assert torch.equal(g.get_state(), g_state)


def test_init_model_ctrl_c_during_the_engine_writes_finishes_then_stops(monkeypatch):
    m, ref = _mlp(), _mlp()
    initlab.init_model(ref, "auto", generator=gen(1))
    real, calls = _engine._sample_, []

    def sample_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        out = real(*args, **kwargs)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does
        return out

    monkeypatch.setattr(_engine, "_sample_", sample_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        initlab.init_model(m, "auto", generator=gen(1))
    assert len(calls) == 3  # every weight was written: the model is finished
    for a, b in zip(m.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_init_model_engine_writes_keep_no_copies(monkeypatch):
    saved = []
    monkeypatch.setattr(_undo.Undo, "save", lambda self, t, label="": saved.append(label))
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    initlab.init_model(m, "auto", generator=gen())
    initlab.init_model(m, "xavier_normal", generator=gen())
    assert saved == []  # the cost of all-or-nothing for the engine's schemes: no copy of the weights
    initlab.init_model(m, "orthogonal", generator=gen())
    assert saved  # a QR can fail: copies are kept


def test_init_model_orthogonal_interrupted_in_the_second_qr(monkeypatch):
    m, g = _mlp(), gen(1)
    real, calls = _orthogonal._haar, []

    def haar(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(_orthogonal, "_haar", haar)
    before = snapshot(m)
    with pytest.raises(KeyboardInterrupt):
        initlab.init_model(m, "orthogonal", generator=g)
    assert_unchanged(before, m)
    monkeypatch.setattr(_orthogonal, "_haar", real)
    _same_after_retry(m, "orthogonal", g)


def test_init_model_reset_parameters_failing_changes_nothing():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.full((4,), 3.0))

        def reset_parameters(self):
            self.s = nn.Parameter(torch.zeros(4))  # replaces the tensor, then fails
            raise ValueError("cannot reset")

        def forward(self, x):
            return x * self.s

    m = nn.Sequential(nn.Linear(4, 4), nn.PReLU(), Scale(), nn.Linear(4, 2))
    before = snapshot(m)
    with pytest.raises(InitlabError, match=r"module '2' \(Scale\): reset_parameters\(\) failed \(ValueError: cannot reset\)"):
        initlab.init_model(m, "auto", generator=gen())
    assert_unchanged(before, m)  # the PReLU reset before it is undone, the replaced parameter is back


def test_init_model_failing_gain_after_the_resets_changes_nothing():
    class Summed(nn.Module):
        def forward(self, x):
            return x.sum(dim=-1, keepdim=True).expand_as(x)

    initlab.register_activation("summed_for_test", lambda x: x.sum(), modules=(Summed,))  # not elementwise
    try:
        m = nn.Sequential(nn.Linear(4, 4), nn.PReLU(), nn.Linear(4, 4), Summed(), nn.Linear(4, 1))
        with torch.no_grad():
            m[1].weight.fill_(0.7)
        before = snapshot(m)
        with pytest.raises(InitlabError, match="layer '4'"):  # auto's recursion: the layer fed by it
            initlab.init_model(m, "auto", generator=gen())
        assert_unchanged(before, m)  # the PReLU was reset first, and is restored
    finally:
        initlab._activations.unregister_activation("summed_for_test")


def test_init_model_lsuv_forward_failing_changes_nothing():
    m = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16),
                      FailsOnCall(1, RuntimeError("flaky device")), nn.Linear(16, 2))
    before = snapshot(m)
    with pytest.raises(InitlabError, match="flaky device"):
        initlab.init_model(m, "lsuv", batch=torch.randn(32, 8), generator=gen())
    assert_unchanged(before, m)


@pytest.mark.parametrize("kwargs, match", [
    ({"scheme": "xavier_normal", "gain": 1e200}, "gain 1e\\+200 is out of range"),
    ({"scheme": "normal", "std": 1e39}, "std 1e\\+39 is too large for float32"),
    ({"scheme": "he_normal", "activation": lambda x: 1e-40 * torch.tanh(x)}, "too large for float32"),
    ({"scheme": "auto", "bias": 1e39}, "bias=1e\\+39 does not fit"),
])
def test_init_model_values_out_of_range_change_nothing(kwargs, match):
    m = _mlp()
    before = snapshot(m)
    with pytest.raises(InitlabError, match=match):
        initlab.init_model(m, **kwargs)
    assert_unchanged(before, m)


def test_init_model_half_precision_std_too_small_is_caught_before_any_write():
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4).half())
    before = snapshot(m)
    with pytest.raises(InitlabError, match=r"layer '2' .*too small for float16"):
        initlab.init_model(m, "tf1_variance_scaling", factor=1e-12)
    assert_unchanged(before, m)  # layer '0' (float32) was fine, but nothing is written before every check passed


def test_init_model_weight_computed_by_unknown_means_is_refused_not_silently_skipped():
    # weight norm, spectral norm, pruning and parametrizations are initialised through their
    # effective weight (tests/test_real_models.py); a weight that is a plain tensor attribute is refused
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    del m[2].weight
    m[2].weight = torch.randn(2, 4)
    before = snapshot(m)
    with pytest.raises(InitlabError, match=r"layer '2' \(Linear\): its weight is computed .*exclude=\['2'\]"):
        initlab.init_model(m)
    assert_unchanged(before, m)
    initlab.init_model(m, exclude=["2"])


def test_init_model_copies_that_do_not_fit_are_refused_before_any_write(monkeypatch):
    monkeypatch.setattr(_undo, "memory_available", lambda device: 500)
    monkeypatch.setattr(_undo, "_SMALL", 0)  # a real model's copies are large enough to be checked
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 30))
    before = snapshot(m)
    with pytest.raises(InitlabError, match=r"not enough memory on cpu .* the largest is layer '2' \(30x4 float32, 480 bytes\)"):
        initlab.init_model(m, "orthogonal")
    assert_unchanged(before, m)


def test_init_model_out_of_memory_in_a_scheme_names_the_layer_and_size():
    def big(t, *, fans=None, generator=None):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: "
                           "you tried to allocate 33285996544 bytes")

    m = _mlp()
    before = snapshot(m)
    with pytest.raises(InitlabError, match=r"not enough memory for initialising layer '0' \(Linear \(16, 8\)\) \(512 bytes\)"):
        initlab.init_model(m, big)
    assert_unchanged(before, m)


def test_init_model_takes_a_torch_init_function():
    m = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    rep = initlab.init_model(m, torch.nn.init.xavier_normal_, generator=gen(4))
    g = gen(4)
    torch.randint(0, 1 << 32, (2,), generator=g)  # init_model's one draw per call (initlab._keys.call_base)
    for i in (0, 2):
        w = torch.empty(m[i].weight.shape)
        torch.nn.init.xavier_normal_(w, generator=g)
        assert torch.equal(m[i].weight, w) and not m[i].bias.any()
    assert [r["scheme"] for r in rep] == ["xavier_normal_", "xavier_normal_"]
    with pytest.raises(InitlabError, match="must be a function f\\(tensor\\)"):
        initlab.init_model(m, lambda: None)


# ------------------------------------------------------------------------------------------
# lsuv_


def test_lsuv_ctrl_c_from_a_forward_hook_changes_nothing():
    m, g = _mlp(), gen(2)

    def hook(mod, args, out):  # after LSUV fitted layers 0 and 3
        raise KeyboardInterrupt

    h = m[3].register_forward_hook(hook)
    m.train()
    before, g_state = snapshot(m), g.get_state()
    with pytest.raises(KeyboardInterrupt):
        initlab.lsuv_(m, torch.randn(32, 8), generator=g)
    assert_unchanged(before, m)  # weights, BatchNorm statistics, hooks (ours gone, the user's kept)
    assert torch.equal(g.get_state(), g_state)
    h.remove()


def test_lsuv_forward_failing_on_the_nth_call():
    m = nn.Sequential(nn.Linear(8, 8), FailsOnCall(1, RuntimeError("boom")), nn.Linear(8, 8), nn.Linear(8, 2))
    before = snapshot(m)
    with pytest.raises(InitlabError, match="boom"):
        initlab.lsuv_(m, torch.randn(16, 8))
    assert_unchanged(before, m)


def test_out_of_memory_in_the_forward_is_said_as_such():
    m = nn.Sequential(nn.Linear(8, 8), FailsOnCall(1, RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")),
                      nn.Linear(8, 2))
    with pytest.raises(InitlabError, match="not enough memory for the forward pass"):
        initlab.lsuv_(m, torch.randn(16, 8))
    m[1].calls = 0
    with pytest.raises(InitlabError, match="not enough memory for the forward pass"):
        initlab.probe(m, torch.randn(16, 8))


# ------------------------------------------------------------------------------------------
# probe and audit leave the model as it was


@pytest.mark.parametrize("run", [
    lambda m, x: initlab.probe(m, x),
    lambda m, x: initlab.probe(m, x, target=torch.zeros(32, dtype=torch.long), bins=8),
    lambda m, x: initlab.audit(m, x),
], ids=["probe", "probe-backward", "audit"])
def test_probe_and_audit_keep_batchnorm_statistics(run):
    m = _mlp().train()
    before = snapshot(m)
    run(m, torch.randn(32, 8))
    assert_unchanged(before, m)  # running_mean, running_var and num_batches_tracked included


@pytest.mark.parametrize("run", [
    lambda m, x: initlab.theory.layer_specs_from_model(m, batch=x),
    lambda m, x: initlab.theory.jacobian_spectrum(m, x[:2]),
], ids=["layer_specs_from_model", "jacobian_spectrum"])
def test_theory_forward_passes_keep_batchnorm_statistics(run):
    m = nn.Sequential(nn.BatchNorm1d(2), nn.Flatten(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)).train()
    before = snapshot(m)
    try:
        run(m, torch.randn(16, 2, 4))
    except InitlabError as e:  # torch.func cannot differentiate a training-mode BatchNorm: said clearly
        assert "mutate" in str(e)
    assert_unchanged(before, m)


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_probe_failing_after_the_batchnorm_changes_nothing(exc):
    m = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), FailsOnCall(1, exc), nn.Linear(8, 2)).train()
    before = snapshot(m)
    with pytest.raises(InitlabError if isinstance(exc, Exception) else KeyboardInterrupt):
        initlab.audit(m, torch.randn(16, 8))
    assert_unchanged(before, m)


def test_probe_reads_the_current_activation_parameters():
    x = torch.randn(256, 8, generator=gen())

    def predicted(model):
        return [r["predicted_post_sq_mean"] for r in initlab.probe(model, x).rows]

    m = nn.Sequential(nn.Linear(8, 8), nn.LeakyReLU(0.01), nn.Linear(8, 8), nn.PReLU(), nn.Linear(8, 2))
    predicted(m)  # fills the caches
    m[1].negative_slope = 0.9
    with torch.no_grad():
        m[3].weight.fill_(0.7)
    assert predicted(m) == predicted(copy.deepcopy(m))  # a fresh copy has nothing cached

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out, self.slope = nn.Linear(8, 8), nn.Linear(8, 2), 0.01

        def forward(self, z):
            return self.out(torch.nn.functional.leaky_relu(self.fc(z), self.slope))

    f = Functional()
    predicted(f)
    f.slope = 0.9  # baked into the traced graph as a constant
    assert predicted(f) == predicted(copy.deepcopy(f))


def test_gain_and_theory_of_a_custom_module_follow_its_parameters():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.k = nn.Parameter(torch.tensor(1.0))

        def forward(self, z):
            return torch.tanh(self.k * z)

    act = Scaled()
    g1, q1 = initlab.gain(act), initlab.theory.q_star(act, 2.0, 0.1)
    with torch.no_grad():
        act.k.fill_(3.0)
    fresh = copy.deepcopy(act)
    assert initlab.gain(act) == initlab.gain(fresh) != g1
    assert initlab.theory.q_star(act, 2.0, 0.1) == initlab.theory.q_star(fresh, 2.0, 0.1) != q1


def test_probe_fans_follow_a_changed_stride():
    m = nn.Sequential(nn.ConvTranspose1d(4, 4, 4, stride=2), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(8, 4, 10)
    m(x)
    assert initlab.probe(m, x).rows[0]["fan_in"] == 8
    m[0].stride = (4,)
    m[3] = nn.LazyLinear(2)
    m(x)
    assert initlab.probe(m, x).rows[0]["fan_in"] == 4


# ------------------------------------------------------------------------------------------
# the engine: out of range and out of memory


@pytest.mark.parametrize("call, match", [
    (lambda w: initlab.xavier_normal_(w, gain=1e200), "gain 1e\\+200 is out of range"),
    (lambda w: initlab.xavier_uniform_(w, gain=1e-200), "gain 1e-200 is out of range"),
    (lambda w: initlab.variance_scaling_(w, 1e300, "fan_avg"), "too large for float32"),
    (lambda w: initlab.variance_scaling_(w, 1e-300), "too small for float32"),
    (lambda w: initlab.normal_(w, 1.0, mean=1e308), "too large for float32"),
    (lambda w: initlab.truncated_normal_(w, 2e38), "too large for float32"),
    (lambda w: initlab.orthogonal_(w.half(), 1e5), "gain 100000 is too large for float16"),
])
def test_out_of_range_values_are_clear_errors_and_write_nothing(call, match):
    w = torch.full((10, 10), 7.0)
    with pytest.raises(InitlabError, match=match):
        call(w)
    assert bool((w == 7.0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("distribution", ["normal", "truncated_normal", "uniform"])
def test_any_accepted_std_gives_finite_weights_of_that_std(dtype, distribution):
    info = torch.finfo(dtype)
    for std in (info.tiny * 10, 1e-3, 1.0, math.sqrt(info.max) * 2, info.max / 11):
        scale = std * std * 100
        if not 0 < scale < math.inf:
            continue  # not reachable through a float64 scale (float64 at its extremes)
        w = torch.empty(200, 100, dtype=dtype)
        initlab.variance_scaling_(w, scale, "fan_in", distribution, generator=gen())
        w = w.double()
        assert bool(torch.isfinite(w).all()) and float((w != 0).double().mean()) > 0.99, (std, w)
        assert float(w.std()) / std == pytest.approx(1.0, rel=0.05)


def _oom_for(monkeypatch, module, min_numel: int) -> None:
    real = torch.empty

    def empty(*size, **kw):
        shape = size[0] if len(size) == 1 and not isinstance(size[0], int) else size
        if str(kw.get("device", "cpu")) != "meta" and math.prod(shape) >= min_numel:
            raise RuntimeError(f"DefaultCPUAllocator: not enough memory: you tried to allocate {4 * math.prod(shape)} bytes")
        return real(*size, **kw)

    monkeypatch.setattr(module.torch, "empty", empty)


def test_out_of_memory_is_one_clear_error(monkeypatch):
    m = nn.Sequential(nn.Linear(200, 100))
    m[0].weight = nn.Parameter(torch.full((200, 100), 7.0).T)
    _oom_for(monkeypatch, _engine, 10_000)
    with pytest.raises(InitlabError, match=r"not enough memory for a 100000x100000 float32 tensor on cpu \(40 GB\)"):
        initlab.variance_scaling((100_000, 100_000))
    w = torch.full((200, 100), 7.0).T  # non-contiguous: sampled through a scratch copy
    with pytest.raises(InitlabError, match=r"not enough memory for the float32 scratch copy of a 100x200 tensor"):
        initlab.variance_scaling_(w)
    assert bool((w == 7.0).all())
    before = snapshot(m)
    with pytest.raises(InitlabError, match="scratch copy"):
        initlab.init_model(m, generator=gen())
    assert_unchanged(before, m)


def test_a_gain_square_never_overflows_into_a_raw_error():
    for name in ("xavier_normal", "xavier_uniform", "xavier_caffe", "orthogonal", "identity"):
        with pytest.raises(InitlabError, match="gain"):
            initlab.get_scheme(name, gain=1e300)


# ------------------------------------------------------------------------------------------
# the audit command: your files never shadow installed modules; MNIST never silently replaced


MODELS = "from torch import nn\ndef make():\n    return nn.Sequential(nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10))\n"


def test_model_import_never_shadows_an_installed_module(tmp_path, monkeypatch):
    (tmp_path / "models.py").write_text(MODELS)
    (tmp_path / "colorsys.py").write_text("raise ImportError('the user file, not the stdlib')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    monkeypatch.delitem(sys.modules, "models", raising=False)
    assert isinstance(load_factory("models:make"), nn.Module)
    assert os.path.realpath(sys.path[-1]) == os.path.realpath(tmp_path)  # searched last
    import colorsys

    assert colorsys.__file__ != str(tmp_path / "colorsys.py")
    with pytest.raises(InitlabError, match="'colorsys' is an installed module .* --model ./colorsys.py"):
        load_factory("colorsys:make")


def test_model_file_is_loaded_by_path_and_imports_its_neighbours(tmp_path, monkeypatch):
    (tmp_path / "helpers.py").write_text("WIDTH = 7\n")
    (tmp_path / "json.py").write_text("import helpers\nfrom torch import nn\n"
                                      "def make():\n    return nn.Linear(helpers.WIDTH, 2)\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "helpers", raising=False)
    import json

    model = load_factory(f"{tmp_path / 'json.py'}:make")
    assert model.in_features == 7 and sys.modules["json"] is json  # the stdlib json is untouched


def test_cli_secrets_py_in_the_working_folder_does_not_break_mnist(tmp_path):
    (tmp_path / "models.py").write_text(MODELS)
    (tmp_path / "secrets.py").write_text("raise ImportError('the user file, not the stdlib')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = textwrap.dedent(f"""
        import os, sys
        sys.path = [p for p in sys.path if p not in ('', os.getcwd())]  # as the installed `initlab` script
        sys.path.insert(0, {root!r})
        from initlab.cli import main
        sys.exit(main(['audit', '--model', 'models:make', '--data', 'mnist', '--batch-size', '32', '--json']))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Gaussian" not in out.stderr
    assert json.loads(out.stdout)["probe"]["input"]["sq_mean"] < 0.5  # MNIST pixels (E[x^2] ~ 0.11), not N(0, 1)


def test_cli_mnist_unavailable_is_an_error_not_gaussian_data(monkeypatch, capsys):
    from initlab import _audit

    def broken(*a, **k):
        raise OSError("package data missing")

    monkeypatch.setattr(_audit, "embedded_split", broken)
    assert main(["audit", "--mlp", "784,10", "--data", "mnist"]) == 2
    err = capsys.readouterr().err
    assert "initlab: error: --data mnist: the embedded MNIST sample cannot be loaded" in err
    assert "Gaussian" not in err
