"""``audit`` on real models: it never suggests the scheme in use, leaves theory-free predictions
empty and says why, reads Hugging Face-style outputs, exits non-zero with ``--fail-on``, honours
``--forward-only`` with MNIST, loads a model file's neighbours, and does not call sampling noise
(a "dead" unit in a batch of 2) an error."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import initlab
from initlab import audit
from initlab._audit import dead_excess, suggest
from initlab.cli import main


def _mlp(widths, act="relu", seed=0):
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append({"relu": nn.ReLU, "sigmoid": nn.Sigmoid}[act]())
    return nn.Sequential(*layers)


def test_suggest_never_the_scheme_in_use():
    assert suggest("sigmoid") == "xavier_normal or kumar"
    s = suggest("sigmoid", "glorot_normal")  # an alias of the suggestion counts as in use
    assert s.startswith("kumar") and "glorot_normal is in use" in s and "xavier_normal" not in s
    s = suggest("relu", "auto")  # auto's choice for relu is he_normal: the same draw, not suggested either
    assert s.startswith("lsuv") and "he_normal or" not in s and "auto is in use" in s
    assert suggest("relu", "he_normal").startswith("lsuv")
    assert suggest("sigmoid", "auto").startswith("xavier_normal or lsuv")  # auto is kumar for sigmoid
    assert suggest("relu", "normal") == "he_normal"  # not in use: the plain advice


def test_cli_init_in_use_is_not_recommended(capsys):
    assert main(["audit", "--mlp", "784,100,100,10", "--act", "sigmoid", "--init", "xavier_normal",
                 "--data", "mnist", "--batch-size", "64", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["in_use"] == "xavier_normal"
    for f in data["findings"]:
        assert not f["fix"].startswith("try xavier_normal"), f


def test_scheme_in_use_detected_from_the_weights():
    m = _mlp([784, 100, 100, 10], "sigmoid")
    x = torch.rand(256, 784, generator=torch.Generator().manual_seed(0))
    for name in ("xavier_normal", "auto", "kumar"):
        # auto is recognised by its fixed per-layer gain (exact=False); the default's correction
        # pass rescales each layer by a draw-dependent factor that no fixed rule predicts
        kw = {"exact": False} if name == "auto" else {}
        initlab.init_model(m, name, generator=torch.Generator().manual_seed(1), **kw)
        res = audit(m, x)
        assert res.in_use == name, name
        assert all(not f.fix.startswith(f"try {name}") for f in res.findings)
    with torch.no_grad():  # negative control: weights 3x too large match no scheme
        for lin in m[::2]:
            lin.weight.mul_(3.0)
    assert audit(m, x).in_use is None


def _bn_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))


def test_predictions_empty_where_theory_does_not_apply():
    res = audit(_bn_cnn(), torch.randn(32, 3, 8, 8))
    raw = res.probe.rows
    # the probe's backward recursion restarts at every norm, so its "prediction" is the measurement
    assert all(r["predicted_grad_pre_var"] == r["grad_pre_var"] for r in raw)
    rows = json.loads(res.to_json())
    assert all(math.isnan(r["predicted_grad_pre_var"]) for r in initlab._audit.theory_rows(res.probe))
    assert [math.isnan(r["predicted_pre_sq_mean"]) for r in initlab._audit.theory_rows(res.probe)] == [False, True, True]
    assert "after a normalisation (BatchNorm2d)" in rows["theory"][1]
    assert "after norm" in str(res) and "no prediction because" in str(res)
    # negative control: a plain MLP keeps its predictions (all but the readout's gradient, its anchor)
    mlp = audit(_mlp([32, 64, 64, 4]), torch.randn(64, 32))
    tr = initlab._audit.theory_rows(mlp.probe)
    assert all(math.isfinite(r["predicted_pre_sq_mean"]) for r in tr)
    assert [math.isfinite(r["predicted_grad_pre_var"]) for r in tr] == [True, True, False]


class _HF(nn.Module):
    """A Hugging Face-like model: returns an output object (or a dict) with ``logits``."""

    def __init__(self, as_dict=False):
        super().__init__()
        self.emb, self.fc, self.as_dict = nn.Embedding(50, 16), nn.Linear(16, 50), as_dict

    def forward(self, ids):
        logits = self.fc(torch.relu(self.emb(ids)))
        return {"logits": logits} if self.as_dict else SimpleNamespace(logits=logits, past_key_values=None)


@pytest.mark.parametrize("as_dict", [False, True])
def test_hf_style_outputs_and_token_labels(as_dict):
    ids = torch.randint(0, 50, (4, 7), generator=torch.Generator().manual_seed(0))
    res = audit(_HF(as_dict), ids)  # the default random output gradient on .logits
    assert res.probe.backward and all(math.isfinite(r["grad_pre_var"]) for r in res.probe.rows)
    res = audit(_HF(as_dict), ids, target=ids)  # labels (N, T) against logits (N, T, V)
    assert res.probe.loss is not None and math.isfinite(res.probe.loss)


def test_fail_on_exit_codes(capsys):
    bad = ["audit", "--mlp", "784,100,100,10", "--act", "sigmoid", "--init", "normal", "--batch-size", "64"]
    assert main(bad) == 0  # the default: the audit ran
    assert main([*bad, "--fail-on", "warning"]) == 1
    assert main([*bad, "--fail-on", "error"]) == 1  # saturation is an error
    good = ["audit", "--mlp", "256,256,256,10", "--init", "he_normal", "--batch-size", "256", "--seed", "1"]
    assert main([*good, "--fail-on", "warning"]) == 0
    capsys.readouterr()


def test_forward_only_with_mnist(capsys):
    assert main(["audit", "--mlp", "784,100,10", "--data", "mnist", "--batch-size", "32", "--forward-only",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["probe"]["backward"] is False and data["probe"]["loss"] is None
    assert all(r["grad_pre_var"] is None for r in data["probe"]["rows"])


def test_model_file_imports_its_neighbours(tmp_path, monkeypatch, capsys):
    (tmp_path / "blocks_for_audit.py").write_text(
        "from torch import nn\ndef block():\n    return nn.Sequential(nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 2))\n")
    (tmp_path / "net.py").write_text("import blocks_for_audit\ndef make():\n    return blocks_for_audit.block()\n")
    monkeypatch.chdir(tmp_path.parent)
    assert main(["audit", "--model", f"{tmp_path / 'net.py'}:make", "--batch-size", "16"]) == 0
    assert "input shape guessed" in capsys.readouterr().out


def test_bad_input_shape_is_one_line(tmp_path, capsys):
    (tmp_path / "cnn.py").write_text(
        "from torch import nn\ndef make():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))\n")
    assert main(["audit", "--model", f"{tmp_path / 'cnn.py'}:make", "--input-shape", "3,9,9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("initlab: error:") and len(err.splitlines()) == 1 and "Traceback" not in err


def test_dead_units_judged_against_chance():
    """At batch B a live unit is 0 on all B samples with probability 2^-B: 25% at B = 2."""
    assert dead_excess(0.25, 100, 2) == 0.0  # exactly chance
    se = math.sqrt(0.25 * 0.75 / 100)
    assert dead_excess(0.25 + 2.9 * se, 100, 2) == 0.0 and dead_excess(0.25 + 3.1 * se, 100, 2) > 0
    assert dead_excess(0.3, 100, 0) == 0.3  # batch size unknown: as measured
    assert dead_excess(0.3, 100, 64) == pytest.approx(0.3)  # 2^-64: no correction
    torch.manual_seed(0)
    m = _mlp([64, 256, 256, 256, 10])
    initlab.init_model(m, "he_normal", generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    raw_dead = [r["dead_frac"] for r in audit(m, x).probe.rows[:-1]]
    assert min(raw_dead) > 0.15  # about a quarter look dead in a batch of 2 ...
    res = audit(m, x)
    assert "dead_relu" not in res.codes() and any("a batch of 2" in n for n in res.notes)  # ... and are not reported
    with torch.no_grad():  # negative control: biases that really kill the units
        for lin in (m[0], m[2], m[4]):
            lin.bias.fill_(-100.0)
    assert "dead_relu" in audit(m, x).codes()


def test_an_embedding_does_not_start_the_depth_trend():
    """GPT-2 style: token embeddings of std 0.02, a LayerNorm, then variance-preserving layers. The
    embedding's output variance is its weight variance, not a propagated signal: no signal finding."""
    torch.manual_seed(0)

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.norm = nn.Embedding(100, 64), nn.LayerNorm(64)
            self.fc, self.head = nn.Linear(64, 64), nn.Linear(64, 100)

        def forward(self, ids):
            return self.head(torch.relu(self.fc(self.norm(self.emb(ids)))))

    m = LM()
    initlab.init_model(m, "auto", generator=torch.Generator().manual_seed(0))
    nn.init.normal_(m.emb.weight, std=0.02)
    res = audit(m, torch.randint(0, 100, (8, 16), generator=torch.Generator().manual_seed(1)))
    assert res.probe.rows[0]["pre_var"] < 1e-3 < res.probe.rows[1]["pre_var"]  # the jump a norm makes
    assert not res.codes() & {"signal_grows", "signal_shrinks", "gradient_explodes", "gradient_vanishes"}, str(res)
    # negative control: the same rule with the embedding row kept (the old behaviour) flags it
    from initlab._audit import _severity, _trend
    assert _severity(*_trend([r["pre_var"] for r in res.probe.rows])) is not None
