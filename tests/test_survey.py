"""``initlab survey``: the inference is right where the truth is known (every initlab scheme and
torch.nn.init function on a Linear, torch's defaults, negative controls), on one small real model
per library, and the command's JSON, text, exit codes and one-line errors."""
from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest
import torch
from torch import nn

import initlab
from initlab import InitlabError
from initlab._infer import fit_family, kolmogorov_sf, ks_pvalue, match_scheme, trunc_t, _trunc_var
from initlab._survey import ROW_KEYS, survey, survey_spec
from initlab.cli import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from code and default configs, never downloads

FAN_IN, FAN_OUT = 300, 200  # no two of the usual schemes give the same std for these fans


def needs(package: str) -> None:
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (pip install 'initlab[models]')")


def _linear_row(init, *, act: nn.Module | None = None, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    layer = nn.Linear(FAN_IN, FAN_OUT)
    with torch.no_grad():
        init(layer.weight)
    model = nn.Sequential(layer, act) if act is not None else nn.Sequential(layer)
    return survey(model, signal=False).rows[0]


def _scheme(name, **params):
    return lambda w: initlab.get_scheme(name, **params)(w)


# (init, distribution, scheme, mode, gain_name)
KNOWN = {
    "initlab he_normal": (_scheme("he_normal"), "normal", "he_normal", "fan_in", "sqrt(2)"),
    "initlab he_normal fan_out": (_scheme("he_normal", mode="fan_out"), "normal", "he_normal", "fan_out", "sqrt(2)"),
    "initlab he_uniform": (_scheme("he_uniform"), "uniform", "he_uniform", "fan_in", "sqrt(2)"),
    "initlab he truncated": (_scheme("he_normal", distribution="truncated_normal"), "truncated_normal", "he_normal",
                             "fan_in", "sqrt(2)"),
    "initlab xavier_normal": (_scheme("xavier_normal"), "normal", "xavier_normal", "fan_avg", "1"),
    "initlab xavier_uniform": (_scheme("xavier_uniform"), "uniform", "xavier_uniform", "fan_avg", "1"),
    "initlab xavier_normal tanh": (_scheme("xavier_normal", gain=5 / 3), "normal", "xavier_normal", "fan_avg", "5/3"),
    "initlab lecun_normal": (_scheme("lecun_normal"), "normal", "lecun_normal", "fan_in", "1"),
    "initlab lecun truncated": (_scheme("lecun_normal", distribution="truncated_normal"), "truncated_normal",
                                "lecun_normal", "fan_in", "1"),
    "initlab lecun_uniform": (_scheme("lecun_uniform"), "uniform", "lecun_uniform", "fan_in", "1"),
    "initlab torch_default": (_scheme("torch_default"), "uniform", "torch_default", "fan_in", "1/sqrt(3)"),
    "initlab tf1_variance_scaling": (_scheme("tf1_variance_scaling"), "truncated_normal", "he_normal", "fan_in",
                                     "sqrt(2)"),
    "initlab normal std 0.02": (_scheme("normal", std=0.02), "normal", "fixed_std", None, None),
    "initlab orthogonal": (_scheme("orthogonal"), "normal", "orthogonal", None, "1"),
    "initlab orthogonal gain 2": (_scheme("orthogonal", gain=2.0), "normal", "orthogonal", None, "2"),
    "initlab zeros": (_scheme("zeros"), "constant", "zeros", None, None),
    "torch kaiming_normal_": (nn.init.kaiming_normal_, "normal", "he_normal", "fan_in", "sqrt(2)"),
    "torch kaiming_normal_ fan_out": (lambda w: nn.init.kaiming_normal_(w, mode="fan_out"), "normal", "he_normal",
                                      "fan_out", "sqrt(2)"),
    "torch kaiming_uniform_": (nn.init.kaiming_uniform_, "uniform", "he_uniform", "fan_in", "sqrt(2)"),
    "torch kaiming_uniform_ a=sqrt(5)": (lambda w: nn.init.kaiming_uniform_(w, a=math.sqrt(5)), "uniform",
                                         "torch_default", "fan_in", "1/sqrt(3)"),
    "torch xavier_normal_": (nn.init.xavier_normal_, "normal", "xavier_normal", "fan_avg", "1"),
    "torch xavier_uniform_": (nn.init.xavier_uniform_, "uniform", "xavier_uniform", "fan_avg", "1"),
    "torch xavier_uniform_ relu gain": (lambda w: nn.init.xavier_uniform_(w, gain=math.sqrt(2)), "uniform",
                                        "xavier_uniform", "fan_avg", "sqrt(2)"),
    "torch normal_ 0.02": (lambda w: nn.init.normal_(w, std=0.02), "normal", "fixed_std", None, None),
    "torch trunc_normal_ 0.02 cut at 2 sigma": (lambda w: nn.init.trunc_normal_(w, std=0.02, a=-0.04, b=0.04),
                                                "truncated_normal", "fixed_std", None, None),
    "torch orthogonal_": (nn.init.orthogonal_, "normal", "orthogonal", None, "1"),
    "torch ones_": (nn.init.ones_, "constant", "constant", None, None),
}


@pytest.mark.parametrize("case", list(KNOWN))
def test_known_schemes_are_named(case):
    init, dist, scheme, mode, gain_name = KNOWN[case]
    row = _linear_row(init)
    if scheme != "orthogonal":  # an orthogonal matrix's entries are normal-like; the scheme is what counts
        assert row["distribution"] == dist, row
    assert (row["scheme"], row["mode"], row["gain_name"]) == (scheme, mode, gain_name), row


def test_fixed_stds_and_the_truncation_basis():
    row = _linear_row(lambda w: nn.init.normal_(w, std=0.02))
    assert row["target_std"] == 0.02 and row["std_basis"] == "realised"
    # torch's trunc_normal_(std=0.02, a=-2 std, b=2 std) realises 0.88 * 0.02: sigma before the cut is 0.02
    row = _linear_row(lambda w: nn.init.trunc_normal_(w, std=0.02, a=-0.04, b=0.04))
    assert row["target_std"] == 0.02 and row["std_basis"] == "sigma"
    assert row["std"] == pytest.approx(0.02 * 0.8796, rel=0.01)


def test_a_truncation_far_in_the_tails_is_a_normal():
    # torch.nn.init.trunc_normal_ cuts at +-2 (absolute): 100 sigma for std 0.02, nothing is cut
    row = _linear_row(lambda w: nn.init.trunc_normal_(w, std=0.02))
    assert row["distribution"] == "normal" and row["scheme"] == "fixed_std" and row["target_std"] == 0.02


def test_kumar_is_named_with_the_following_sigmoid():
    row = _linear_row(_scheme("kumar"), act=nn.Sigmoid())
    assert row["activation"] == "sigmoid"
    assert (row["scheme"], row["gain_name"]) == ("kumar", "kumar(sigmoid)")
    assert row["gain"] == pytest.approx(math.sqrt(12.8))
    assert row["verdict"] == "ok" and row["auto_scheme"] == "kumar"  # auto's rule for sigmoid is Kumar's


@pytest.mark.parametrize("name, draw", [
    ("scale mixture", lambda n: torch.cat([0.01 * torch.randn(n // 2), 0.05 * torch.randn(n - n // 2)])),
    ("shifted normal", lambda n: 0.05 + 0.02 * torch.randn(n)),
    ("two bumps", lambda n: 0.05 * (2 * torch.randint(0, 2, (n,)) - 1) + 0.01 * torch.randn(n)),
    ("laplace", lambda n: torch.distributions.Laplace(0.0, 0.02).sample((n,))),
])
def test_negative_controls_are_other(name, draw):
    torch.manual_seed(0)
    row = _linear_row(lambda w: w.copy_(draw(w.numel())[torch.randperm(w.numel())].reshape(w.shape)))
    assert row["distribution"] == "other" and row["scheme"] == "unknown", (name, row["p_values"])


def test_false_alarms_are_rare():
    # a true normal or uniform is named as such (the p-values are conservative, alpha is small)
    fams = [fit_family(torch.randn(64, 64, 3, 3), seed=i).distribution for i in range(40)]
    fams += [fit_family(torch.rand(1000) - 0.5, seed=i).distribution for i in range(40)]
    assert fams[:40] == ["normal"] * 40 and fams[40:] == ["uniform"] * 40


def test_torch_defaults():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 6 * 6, 10))
    result = survey(model, signal=False)
    assert [r["scheme"] for r in result.rows] == ["torch_default", "torch_default"]
    assert [r["activation"] for r in result.rows] == ["relu", "none"]
    assert result.rows[0]["verdict"] == "low"  # 1/(3 fan_in) is a sixth of He's 2/fan_in before a ReLU
    assert result.rows[0]["var_ratio"] == pytest.approx(1 / 6, rel=0.05)
    emb = survey(nn.Sequential(nn.Embedding(1000, 64)), signal=False).rows[0]
    assert emb["distribution"] == "normal" and emb["target_std"] == 1.0  # N(0, 1): fan_in 1 of a one-hot input


def test_attention_and_grouped_convolutions_use_torch_fans_where_torch_did():
    torch.manual_seed(0)
    mha = survey(nn.Sequential(nn.MultiheadAttention(128, 4)), signal=False)
    in_proj = next(r for r in mha.rows if r["param"] == "in_proj_weight")
    assert (in_proj["fan_in"], in_proj["fan_out"]) == (128, 128)  # initlab: each of the three blocks
    assert (in_proj["scheme"], in_proj["fans_basis"]) == ("xavier_uniform", "shape")  # torch: the (3E, E) shape
    # a depthwise conv alone fits he fan_out and xavier (torch fans) within 1%: its model settles it (MobileNet)
    convs = [nn.Conv2d(256, 256, 5, groups=256), nn.Conv2d(256, 384, 1), nn.Conv2d(384, 384, 5, groups=384),
             nn.Conv2d(384, 192, 1)]
    for m in convs:
        nn.init.kaiming_normal_(m.weight, mode="fan_out")
    rows = survey(nn.Sequential(*convs), signal=False).rows
    assert [(r["scheme"], r["mode"], r["fans_basis"]) for r in rows] == [
        ("he_normal", "fan_out", "shape"), ("he_normal", "fan_out", "module")] * 2
    assert (rows[0]["fan_in"], rows[0]["fan_out"]) == (25, 25)  # initlab's depthwise fans; torch counts 256 x 25 out


def test_one_model_settles_ambiguous_layers():
    # square layers fit he fan_in, he fan_out and xavier(sqrt 2) alike; the non-square ones say fan_out
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 64, 7), nn.Conv2d(64, 64, 3), nn.Conv2d(64, 64, 3), nn.Conv2d(64, 128, 1), nn.Conv2d(128, 128, 3)]
    for m in layers:
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    rows = survey(nn.Sequential(*[x for m in layers for x in (m, nn.ReLU())]), signal=False).rows
    assert {(r["scheme"], r["mode"], r["gain_name"]) for r in rows} == {("he_normal", "fan_out", "sqrt(2)")}


def test_a_std_shared_by_layers_of_different_fans_is_fixed():
    torch.manual_seed(0)
    layers = [nn.Linear(64, 256), nn.Linear(256, 64), nn.Linear(64, 64)]
    for m in layers:
        nn.init.normal_(m.weight, std=0.0123)
    rows = survey(nn.Sequential(*layers), signal=False).rows
    assert {r["scheme"] for r in rows} == {"fixed_std"}
    assert all(r["target_std"] == pytest.approx(0.0123, rel=0.01) for r in rows)


def test_ks_and_truncation_helpers():
    scipy_stats = pytest.importorskip("scipy.stats")
    x = torch.randn(3000, dtype=torch.float64).sort().values
    ours = ks_pvalue(x, torch.special.ndtr)
    theirs = scipy_stats.kstest(x.numpy(), "norm").pvalue
    assert ours == pytest.approx(theirs, abs=0.02)
    assert kolmogorov_sf(0.1) == 1.0 and kolmogorov_sf(3.0) < 1e-7
    assert trunc_t(_trunc_var(2.0) / 4.0) == pytest.approx(2.0, rel=1e-6)
    assert trunc_t(0.34) is None  # flatter than a uniform
    assert match_scheme(fit_family(torch.zeros(3, 3)))[0].scheme == "zeros"


def test_the_survey_needs_weight_tensors():
    with pytest.raises(InitlabError, match="no weight tensors"):
        survey(nn.Sequential(nn.ReLU()))


def test_signal_with_an_example_input(tmp_path):
    src = tmp_path / "nets.py"
    src.write_text("import torch\nfrom torch import nn\n\ndef make():\n"
                   "    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4)), torch.randn(512, 32)\n")
    result = survey_spec(f"{src}:make")
    assert result.signal is not None and result.signal["input"] == "the factory's batch"
    first = result.rows[0]
    # N(0, 1) input through torch's default init: Var = fan_in * 1/(3 fan_in) = 1/3, plus the bias
    assert first["out_var"] == pytest.approx(1 / 3, rel=0.25)
    assert [r["layer"] for r in result.signal["rows"]] == ["0", "2"]
    assert "signal at init" in result.signal_line()


# --------------------------------------------------------------------------------------------
# one small real model per library (their own init, CPU, real tensors)


def test_torchvision_resnet18():
    needs("torchvision")
    result = survey_spec("torchvision:resnet18")
    convs = [r for r in result.rows if r["kind"] == "Conv2d"]
    assert len(convs) == 20
    assert {(r["scheme"], r["mode"], r["gain_name"], r["distribution"]) for r in convs} == \
        {("he_normal", "fan_out", "sqrt(2)", "normal")}
    fc = result.rows[-1]
    assert (fc["name"], fc["scheme"], fc["distribution"]) == ("fc.weight", "torch_default", "uniform")
    assert {r["activation"] for r in convs} == {"relu"}
    assert result.signal is not None and all(r["out_var"] is not None for r in result.rows)
    # the 7 strided convs: torchvision's kaiming_normal_(mode="fan_out") uses torch's fan_out, which ignores the
    # stride (initlab's fan_out divides by it), so the survey says it matched with torch's fans
    assert result.summary == ("torchvision:resnet18: 21 weight tensors; Conv2d x20: he_normal fan_out gain sqrt(2) (13), "
                              "he_normal fan_out gain sqrt(2) (torch fans) (7); Linear x1: torch_default")


def test_timm_vit_tiny():
    needs("timm")
    result = survey_spec("timm:vit_tiny_patch16_224", signal=False)
    linears = [r for r in result.rows if r["kind"] == "Linear"]
    assert len(linears) == 49
    # timm's trunc_normal_(std=.02) cuts at +-2 (100 sigma): a normal, std 0.02, the same for every fan
    assert {(r["distribution"], r["scheme"], r["target_std"]) for r in linears} == {("normal", "fixed_std", 0.02)}
    cls = next(r for r in result.rows if r["name"] == "cls_token")
    assert (cls["scheme"], cls["target_std"]) == ("fixed_std", 1e-6)


def test_hf_gpt2_two_layers():
    needs("transformers")
    result = survey_spec("hf:gpt2[n_layer=2]")
    by_name = {r["name"]: r for r in result.rows}
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight",
                 "transformer.h.1.mlp.c_fc.weight"):
        assert (by_name[name]["distribution"], by_name[name]["target_std"]) == ("normal", 0.02), name
    # GPT-2 scales the residual projections by 1 / sqrt(2 n_layer): 0.02 / 2
    proj = by_name["transformer.h.0.mlp.c_proj.weight"]
    assert proj["std"] == pytest.approx(0.01, rel=0.01) and proj["scheme"] == "fixed_std"
    assert by_name["transformer.h.0.attn.c_attn.weight"]["fan_in"] == 768  # Conv1D stores (in, out)
    assert any("tied" in n for n in result.notes)  # lm_head.weight is wte.weight
    assert result.signal is not None and "token ids" in result.signal["input"]


# --------------------------------------------------------------------------------------------
# the command


NETS = """
import torch
from torch import nn

def make():
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))

def boom():
    raise ValueError("cannot build this one")

def empty():
    return nn.Sequential(nn.ReLU())
"""


@pytest.fixture
def nets(tmp_path):
    path = tmp_path / "nets.py"
    path.write_text(NETS)
    return path


def test_cli_json_schema(nets, capsys):
    assert main(["survey", f"{nets}:make", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    (model,) = data["models"]
    assert model["error"] is None and model["name"] == "make" and model["class"] == "Sequential"
    assert model["summary"].startswith("make: 2 weight tensors; Linear x2: torch_default")
    assert len(model["rows"]) == 2
    for row in model["rows"]:
        assert set(ROW_KEYS) <= set(row)
        for key in ("name", "kind", "shape", "fan_in", "fan_out", "std", "distribution", "scheme", "mode", "gain",
                    "activation", "p_value"):
            assert key in row
    row = model["rows"][0]
    assert (row["name"], row["kind"], row["shape"], row["fan_in"], row["fan_out"]) == ("0.weight", "Linear", [64, 32], 32, 64)
    assert (row["distribution"], row["scheme"], row["mode"], row["activation"]) == ("uniform", "torch_default", "fan_in", "relu")
    assert row["gain"] == pytest.approx(1 / math.sqrt(3)) and 0 < row["p_value"] <= 1
    assert model["signal"]["layers"] == 2


def test_cli_text_and_html(nets, tmp_path, capsys):
    page = tmp_path / "survey.html"
    assert main(["survey", f"{nets}:make", f"{nets}:make", "--html", str(page)]) == 0
    out = capsys.readouterr().out
    assert "tensor" in out and "torch_default" in out and "signal at init" in out
    assert out.count("summary: make: 2 weight tensors") == 2  # under each model's table
    assert out.rstrip().endswith("summary:\n  make: 2 weight tensors; Linear x2: torch_default\n"
                                 "  make: 2 weight tensors; Linear x2: torch_default")  # and all of them at the end
    assert page.read_text().count("<table>") == 2
    assert main(["survey", f"{nets}:make", "--brief"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == ["make: 2 weight tensors; Linear x2: torch_default"]


def test_cli_errors_are_one_line_each_and_the_others_are_surveyed(nets, capsys):
    specs = [f"{nets}:boom", f"{nets}:make", f"{nets}:empty", "no_such_pkg_xyz.models:make", "resnet50"]
    assert main(["survey", *specs, "--brief"]) == 1
    out, err = capsys.readouterr()
    assert out.strip().splitlines() == ["make: 2 weight tensors; Linear x2: torch_default"]
    lines = err.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("initlab survey: error: ") for line in lines)
    assert "the factory raised ValueError: cannot build this one" in lines[0]
    assert "no weight tensors" in lines[1]
    assert "no module named 'no_such_pkg_xyz'" in lines[2]
    assert "expected LIBRARY:MODEL" in lines[3]


def test_cli_json_keeps_the_errors(nets, capsys):
    assert main(["survey", f"{nets}:boom", f"{nets}:make", "--json"]) == 1
    models = json.loads(capsys.readouterr().out)["models"]
    assert [m["error"] is None for m in models] == [False, True]
    assert "cannot build this one" in models[0]["error"]


def test_cli_unknown_library_model(capsys):
    needs("torchvision")
    assert main(["survey", "torchvision:resnet5O"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "closest: resnet50" in err


def test_cli_needs_a_model():
    with pytest.raises(SystemExit) as e:
        main(["survey"])
    assert e.value.code == 2
