"""initlab.audit and `initlab audit`: broken models are diagnosed, well-initialised ones are not."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from initlab import InitlabError, audit
from initlab._audit import build_mlp, findings_from
from initlab.cli import main


def _mlp(widths, act, init=None, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    m = build_mlp(widths, act)
    for layer in m:
        if isinstance(layer, nn.Linear) and init is not None:
            init(layer.weight)
            nn.init.zeros_(layer.bias)
    return m


def _gauss(n=256, d=128, seed=0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _pixels(n=256, seed=0) -> torch.Tensor:
    """MNIST-like inputs: 784 values in [0, 1], E[x^2] about 0.11."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 784, generator=g) < 0.19).float() * torch.rand(n, 784, generator=g).clamp(0.3, 1.0)


def _finding(result, code):
    hits = [f for f in result.findings if f.code == code]
    assert hits, f"no {code} finding in:\n{result}"
    return hits


def test_sigmoid_with_standard_normal_weights_saturates():
    res = audit(_mlp([784, 100, 100, 10], "sigmoid", nn.init.normal_), _pixels())
    sat = _finding(res, "saturation")
    first = [f for f in sat if f.layer == "0"][0]
    assert first.severity == "error"
    assert "of sigmoid units saturated; weights too large for sigmoid" in first.message
    pct = float(first.message.split("%")[0].split()[-1]) / 100
    assert pct == pytest.approx(res.probe["0"]["saturated_frac"], abs=0.006)
    assert "xavier_normal" in first.fix and "kumar" in first.fix
    assert not res.ok
    # negative control: the same network with Xavier weights has no saturated layer
    ctrl = audit(_mlp([784, 100, 100, 10], "sigmoid", nn.init.xavier_normal_), _pixels())
    assert "saturation" not in ctrl.codes()


def test_default_init_with_relu_shrinks_the_signal():
    res = audit(_mlp([128] + [256] * 6 + [10], "relu"), _gauss())
    (f,) = _finding(res, "signal_shrinks")
    per = float(f.message.split("shrinks x")[1].split()[0])
    assert 0.1 < per < 0.3  # 1/6 per layer in theory: Var(w) = 1/(3 fan_in), E[relu^2] = q/2
    assert "PyTorch default init" in f.message and "he_normal" in f.fix
    assert f.severity == "error"  # 6 layers at x1/6: the signal loses more than 1e3
    assert "gradient_vanishes" in res.codes()


def test_large_weights_with_relu_explode():
    big = lambda w: nn.init.normal_(w, std=3.0 / math.sqrt(w.shape[1]))  # noqa: E731  Var = 9/fan_in
    res = audit(_mlp([128] + [128] * 5 + [10], "relu", big), _gauss())
    assert {"signal_grows", "gradient_explodes", "output_scale"} <= res.codes()
    (g,) = _finding(res, "gradient_explodes")
    per = float(g.message.split("grows x")[1].split()[0])
    assert 3.0 < per < 6.0  # 9/2 = 4.5 per layer in theory


def test_dead_relus_are_counted():
    m = _mlp([64, 100, 100, 10], "relu", nn.init.kaiming_normal_)
    with torch.no_grad():
        m[2].bias[:41] = -100.0  # 41 of 100 units of layer 2 never fire
    res = audit(m, _gauss(d=64))
    (f,) = _finding(res, "dead_relu")
    assert f.message.startswith("41% dead ReLUs in layer 2 (2)")
    assert f.severity == "error" and f.layer == "2"


@pytest.mark.parametrize("act,init", [
    ("relu", nn.init.kaiming_normal_),
    ("tanh", nn.init.xavier_normal_),
    ("tanh", lambda w: nn.init.normal_(w, std=1 / math.sqrt(w.shape[1]))),
    ("selu", lambda w: nn.init.normal_(w, std=1 / math.sqrt(w.shape[1]))),
])
def test_well_initialised_networks_raise_no_alarm(act, init):
    """Negative control: He/Xavier/LeCun-scaled networks give no warning and no error."""
    res = audit(_mlp([128] + [256] * 6 + [10], act, init, seed=1), _gauss(seed=1))
    assert res.ok, str(res)
    assert res.codes() == set()


def test_he_initialised_cnn_is_clean():
    """Negative control on an all-convolutional net (strided convs, where He keeps the variance):
    the dense layer's inputs are all >= 0 after the ReLUs, so some of its units are off for the
    whole batch; that is reported as info (architecture), not as an alarm."""
    torch.manual_seed(2)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                      nn.ReLU(), nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
                      nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))
    for layer in m:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(layer.weight)
            nn.init.zeros_(layer.bias)
    res = audit(m, torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    assert res.ok, str(res)
    for f in res.findings:
        if f.code == "dead_relu":
            assert f.severity == "info" and "far from centred" in f.message


def test_mnist_like_he_relu_is_clean():
    res = audit(_mlp([784, 100, 100, 10], "relu", nn.init.kaiming_normal_), _pixels(),
                target=torch.randint(0, 10, (256,), generator=torch.Generator().manual_seed(0)))
    assert res.ok, str(res)


def test_overflow_is_reported_as_non_finite():
    m = _mlp([16, 16, 16, 4], "relu", lambda w: nn.init.constant_(w, 1e30))
    res = audit(m, _gauss(d=16))
    assert "non_finite" in res.codes()
    json.loads(res.to_json())  # inf/NaN never reach the JSON


def test_report_table_json_and_findings_order():
    res = audit(_mlp([784, 100, 100, 10], "sigmoid", nn.init.normal_), _pixels())
    text = str(res)
    for word in ("pre_var", "predicted", "saturated", "grad_var", "findings:", "[error]", "-> try"):
        assert word in text
    data = json.loads(res.to_json())
    assert data["ok"] is False
    assert {f["code"] for f in data["findings"]} >= {"saturation"}
    assert len(data["probe"]["rows"]) == 3
    sev = [f.severity for f in res.findings]
    assert sev == sorted(sev, key=["error", "warning", "info"].index)
    assert findings_from(res.probe) == res.findings  # a pure function of the probe


def test_audit_bad_input():
    m = _mlp([8, 4, 2], "relu")
    with pytest.raises(InitlabError, match="must be a torch.Tensor"):
        audit(m, "data")  # type: ignore[arg-type]
    x = torch.randn(4, 8)
    x[0, 0] = float("nan")
    with pytest.raises(InitlabError, match="NaN"):
        audit(m, x)
    with pytest.raises(InitlabError, match=r"expects .*8.*got input of shape \(4, 5\)"):
        audit(m, torch.randn(4, 5))
    with pytest.raises(InitlabError, match="no supported weight layer"):
        audit(nn.Sequential(nn.Tanh()), torch.randn(4, 8))


# ---------------------------------------------------------------------------------- CLI


def test_cli_mlp_sigmoid_normal_json(capsys):
    code = main(["audit", "--mlp", "784,100,100,10", "--act", "sigmoid", "--init", "normal",
                 "--data", "gaussian", "--batch-size", "64", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    data = json.loads(out)
    assert "saturation" in {f["code"] for f in data["findings"]}
    assert data["batch_shape"] == [64, 784]


def test_cli_mnist_table(capsys):
    code = main(["audit", "--mlp", "784,100,100,10", "--act", "relu", "--data", "mnist", "--batch-size", "128"])
    captured = capsys.readouterr()
    assert code == 0
    assert "findings" in captured.out and "PyTorch default init" in captured.out
    # MNIST comes from initlab.lab.data when it is installed; otherwise the audit says it fell back
    assert "(128, 784)" in captured.out
    if "unavailable" in captured.err:
        assert "using Gaussian data" in captured.err


def test_cli_model_factory_with_batch(tmp_path, capsys, monkeypatch):
    src = tmp_path / "my_models.py"
    src.write_text(
        "import torch\n"
        "from torch import nn\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))\n"
        "    return m, torch.randn(16, 1, 8, 8)\n"
        "def only_model():\n"
        "    return nn.Sequential(nn.Linear(20, 5), nn.ReLU(), nn.Linear(5, 2))\n"
        "def not_a_model():\n"
        "    return 42\n",
        encoding="utf-8",
    )
    assert main(["audit", "--model", f"{src}:make", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["layer"] for r in data["probe"]["rows"]] == ["0", "3"]
    monkeypatch.chdir(tmp_path)
    assert main(["audit", "--model", "my_models:only_model", "--data", "gaussian"]) == 0
    out = capsys.readouterr().out
    assert "input shape guessed from the first layer: (20,)" in out
    assert main(["audit", "--model", "my_models:not_a_model"]) == 2
    assert "initlab: error:" in capsys.readouterr().err
    assert main(["audit", "--model", "my_models:mak"]) == 2
    assert "did you mean 'make'" in capsys.readouterr().err


def test_cli_user_errors(capsys):
    assert main(["audit", "--mlp", "784,a,10"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
    assert main(["audit", "--mlp", "784"]) == 2
    assert "at least two positive widths" in capsys.readouterr().err
    assert main(["audit", "--mlp", "10,5,2", "--act", "sigmoyd"]) == 2
    assert "did you mean 'sigmoid'" in capsys.readouterr().err
    assert main(["audit", "--model", "no_such_module_xyz:make"]) == 2
    assert "cannot import module" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["audit"])  # one of --mlp / --model is required (argparse exits 2)
