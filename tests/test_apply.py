"""init_model: whole-model initialisation, the auto policy, the report, reproducibility, errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from initlab._apply import STD_SAMPLE, InitReport, init_model
from initlab._errors import InitlabError


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def within(realised: float, target: float, n: int, sigmas: float = 5.0) -> bool:
    """|s - sigma| within `sigmas` standard errors of the sample std of n normal draws:
    SE(s) = sigma / sqrt(2 (n - 1))."""
    return abs(realised - target) <= sigmas * target / math.sqrt(2 * (min(n, STD_SAMPLE) - 1))


def check_std(t: torch.Tensor, target: float) -> bool:
    return within(float(t.detach().float().std()), target, t.numel())


# ------------------------------------------------------------------------------------------
# the auto policy on an MLP

def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(200, 400), nn.ReLU(),
        nn.Linear(400, 300), nn.Sigmoid(),
        nn.Linear(300, 300), nn.Tanh(),
        nn.Linear(300, 300), nn.LeakyReLU(0.2),
        nn.Linear(300, 300), nn.SELU(),
        nn.Linear(300, 10),
    )


def test_auto_on_an_mlp_picks_the_scheme_per_activation():
    m = mlp()
    rep = init_model(m, exact=False, generator=gen())
    assert isinstance(rep, InitReport) and rep.traced and rep.scheme == "auto"
    expected = {  # name: (activation, scheme, target std from the closed forms)
        "0": ("relu", "he_normal", math.sqrt(2 / 200)),
        "2": ("sigmoid", "kumar", math.sqrt(12.8 / 400)),
        "4": ("tanh", "lecun_normal", math.sqrt(1 / 300)),
        "6": ("leaky_relu(0.2)", "he_normal", math.sqrt(2 / (1 + 0.2**2) / 300)),
        "8": ("selu", "lecun_normal", math.sqrt(1 / 300)),
        "10": (None, "lecun_normal", math.sqrt(1 / 300)),
    }
    for name, (act, scheme, target) in expected.items():
        row = rep[name]
        assert (row["activation"], row["scheme"]) == (act, scheme), name
        assert row["target_std"] == pytest.approx(target, rel=1e-6), name
        w = m.get_submodule(name).weight
        assert within(row["realised_std"], target, w.numel()), name
        assert check_std(w, target), name
        assert torch.count_nonzero(m.get_submodule(name).bias) == 0
        assert row["fan_in"] == w.shape[1] and row["fan_out"] == w.shape[0]


def test_std_check_negative_control():
    # the same 5-sigma check rejects what torch's default init (var 1/(3 fan_in)) and Xavier give
    m = nn.Linear(200, 400)
    assert not check_std(m.weight, math.sqrt(2 / 200))
    nn.init.xavier_normal_(m.weight)
    assert not check_std(m.weight, math.sqrt(2 / 200))
    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    assert check_std(m.weight, math.sqrt(2 / 200))


def test_auto_smooth_activations_use_the_second_moment_gain():
    from initlab._gains import gain

    m = nn.Sequential(nn.Linear(300, 300), nn.GELU(), nn.Linear(300, 300), nn.SiLU(), nn.Linear(300, 300),
                      nn.Mish(), nn.Linear(300, 2))
    rep = init_model(m, exact=False, generator=gen())
    for name, act in (("0", "gelu"), ("2", "silu"), ("4", "mish")):
        g = gain(act, method="second_moment")
        assert rep[name]["scheme"] == "he_normal" and rep[name]["activation"] == act
        assert rep[name]["target_std"] == pytest.approx(g / math.sqrt(300))
        assert check_std(m.get_submodule(name).weight, g / math.sqrt(300))
    assert rep["6"]["scheme"] == "lecun_normal"


def test_auto_distribution_and_mode():
    from initlab._schemes import get_scheme

    m = nn.Sequential(nn.Linear(200, 400), nn.ReLU(), nn.Linear(400, 300))
    rep = init_model(m, exact=False, distribution="uniform", mode="fan_out", generator=gen())
    assert [r["scheme"] for r in rep] == ["he_uniform", "lecun_uniform"]
    assert rep["0"]["target_std"] == pytest.approx(math.sqrt(2 / 400))
    # a uniform's sample std varies less than a normal's: the normal-based tolerance holds
    assert check_std(m[0].weight, math.sqrt(2 / 400))
    assert float(m[0].weight.detach().abs().max()) <= math.sqrt(3 * 2 / 400) + 1e-6
    rep = init_model(m, get_scheme("auto", distribution="truncated_normal", exact=False), generator=gen())
    assert rep.scheme == "auto" and rep["2"]["scheme"] == "lecun_truncated_normal"
    assert float(m[2].weight.detach().abs().max()) <= 2 * math.sqrt(1 / 400) / 0.87962566103423978 + 1e-6
    with pytest.raises(InitlabError, match="distribution"):
        init_model(m, distribution="cauchy")
    with pytest.raises(InitlabError, match="mode"):
        init_model(m, mode="fan_max")


class FunctionalNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(256, 256)
        self.b = nn.Linear(256, 256)
        self.c = nn.Linear(256, 256)
        self.d = nn.Linear(256, 4)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        x = F.leaky_relu(self.a(x), 0.1)
        x = torch.sigmoid(self.b(x))
        x = self.relu(self.c(x))
        return self.d(x)


def test_auto_with_functional_and_inplace_activations():
    m = FunctionalNet()
    rep = init_model(m, exact=False, generator=gen())
    assert [rep[n]["scheme"] for n in "abcd"] == ["he_normal", "kumar", "he_normal", "lecun_normal"]
    assert rep["a"]["target_std"] == pytest.approx(math.sqrt(2 / (1 + 0.01) / 256))
    assert rep["c"]["activation"] == "relu"
    assert check_std(m.b.weight, math.sqrt(12.8 / 256))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(256, 256)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(256, 256)

    def forward(self, x):
        x = self.act1(self.fc1(x))
        if x.mean() > 0:  # data-dependent control flow
            x = x / 2
        return self.fc2(x)


def test_untraceable_model_uses_module_order_and_says_so():
    m = Untraceable()
    rep = init_model(m, generator=gen())
    assert rep.traced is False
    assert rep["fc1"]["scheme"] == "he_normal" and rep["fc2"]["scheme"] == "lecun_normal"
    text = str(rep)
    assert "registration order" in text and "tracing failed" in text
    assert "registration order" not in str(init_model(mlp(), generator=gen()))


# ------------------------------------------------------------------------------------------
# CNN, residual block, transformer

def test_small_cnn_fans_and_norm_layers():
    m = nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 5, groups=4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )
    m[1].running_mean.fill_(5.0)
    m[1].weight.data.fill_(3.0)
    m[1].bias.data.fill_(2.0)
    rep = init_model(m, generator=gen())
    assert (rep["0"]["fan_in"], rep["0"]["scheme"]) == (27, "he_normal")
    assert rep["3"]["fan_in"] == 16 // 4 * 25 and rep["3"]["fan_out"] == 32 // 4 * 25
    assert rep["3"]["target_std"] == pytest.approx(math.sqrt(2 / 100))
    assert check_std(m[3].weight, math.sqrt(2 / 100))
    assert torch.all(m[1].weight == 1) and torch.all(m[1].bias == 0)
    assert torch.all(m[1].running_mean == 0) and torch.all(m[1].running_var == 1)
    assert rep["1"]["scheme"] == "ones/zeros"
    assert rep["7"]["scheme"] == "lecun_normal"


class ResBlock(nn.Module):
    def __init__(self, c: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


def test_residual_block():
    m = ResBlock()
    rep = init_model(m, exact=False, generator=gen())
    for name in ("conv1", "conv2"):
        assert rep[name]["scheme"] == "he_normal" and rep[name]["activation"] == "relu"
        assert check_std(m.get_submodule(name).weight, math.sqrt(2 / (32 * 9)))
    assert rep["conv1"]["bias"] is None  # no bias to set


def test_transformer_encoder_layer():
    e, ff = 64, 256
    m = nn.TransformerEncoderLayer(e, 4, ff, dropout=0.0)
    rep = init_model(m, exact=False, generator=gen())
    assert rep["self_attn"]["shape"] == (3 * e, e)
    assert (rep["self_attn"]["fan_in"], rep["self_attn"]["fan_out"]) == (e, e)
    # each of the q, k, v blocks has the LeCun std of an (E, E) matrix
    for block in m.self_attn.in_proj_weight.detach().chunk(3):
        assert check_std(block, math.sqrt(1 / e))
    assert torch.count_nonzero(m.self_attn.in_proj_bias) == 0
    assert rep["self_attn.out_proj"]["kind"] == "Linear"
    assert rep["linear1"]["scheme"] == "he_normal" and rep["linear1"]["activation"] == "relu"
    assert check_std(m.linear1.weight, math.sqrt(2 / e))
    assert rep["linear2"]["scheme"] == "lecun_normal"
    assert check_std(m.linear2.weight, math.sqrt(1 / ff))
    assert torch.all(m.norm1.weight == 1)
    # the layer still runs
    assert torch.isfinite(m(torch.randn(5, 2, e, generator=gen(1)))).all()


def test_mha_in_proj_is_three_blocks_for_orthogonal():
    e = 32
    m = nn.MultiheadAttention(e, 4)
    init_model(m, "orthogonal", generator=gen())
    eye = torch.eye(e)
    for block in m.in_proj_weight.detach().chunk(3):
        assert torch.allclose(block @ block.T, eye, atol=1e-4)
    # negative control: one orthogonal (3E, E) matrix does not have orthogonal (E, E) blocks
    w = torch.empty(3 * e, e)
    nn.init.orthogonal_(w, generator=gen())
    assert not torch.allclose(w[:e] @ w[:e].T, eye, atol=1e-2)


def test_transformer_custom_callable_activation():
    from initlab._gains import gain

    def swish(x):
        return x * torch.sigmoid(x)

    m = nn.TransformerEncoderLayer(64, 4, 128, activation=swish)
    rep = init_model(m, exact=False, generator=gen())
    assert rep["linear1"]["scheme"] == "he_normal"
    assert rep["linear1"]["target_std"] == pytest.approx(gain("silu") / 8, rel=1e-4)


# ------------------------------------------------------------------------------------------
# other layers, biases, include/exclude, named schemes

def test_embedding_padding_and_tied_weights():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(1000, 64, padding_idx=0)
            self.head = nn.Linear(64, 1000, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, t):
            return self.head(self.emb(t))

    m = LM()
    rep = init_model(m, generator=gen())
    # a tied embedding/readout is written once, in the readout's role: LeCun, std 1/sqrt(64) (logits O(1))
    assert rep["head"]["target_std"] == pytest.approx(1 / 8) and rep["head"]["scheme"] == "lecun_normal"
    assert torch.all(m.emb.weight[0] == 0)  # the padding row, as PyTorch does
    assert check_std(m.emb.weight[1:], 1 / 8)
    assert rep["emb"]["scheme"] == "tied with head"
    assert rep.param("head.weight")["action"] == "lecun_normal (tied with emb.weight)"
    # an untied embedding keeps N(0, 1)
    e = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 3))
    assert init_model(e, generator=gen())["0"]["target_std"] == pytest.approx(1.0)


def test_bias_policies():
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    init_model(m, bias=0.1, generator=gen())
    assert torch.all(m[0].bias == 0.1) and torch.all(m[2].bias == 0.1)
    before = m[0].bias.detach().clone()
    init_model(m, bias="keep", generator=gen(1))
    assert torch.equal(m[0].bias, before)
    init_model(m, generator=gen())
    assert torch.count_nonzero(m[0].bias) == 0


def test_include_and_exclude():
    m = mlp()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    rep = init_model(m, generator=gen(), exclude=["0", lambda name, mod: name == "10"])
    assert [r["name"] for r in rep] == ["2", "4", "6", "8"]
    assert torch.equal(m[0].weight, before["0.weight"]) and torch.equal(m[10].weight, before["10.weight"])
    assert not torch.equal(m[2].weight, before["2.weight"])
    rep = init_model(m, generator=gen(), include="1*")
    assert [r["name"] for r in rep] == ["10"]


def test_include_pattern_selects_children():
    m = nn.Sequential()
    m.add_module("body", nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    m.add_module("head", nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))
    rep = init_model(m, generator=gen(), include="head")
    assert [r["name"] for r in rep] == ["head.0", "head.1"]


def test_named_scheme_from_the_registry():
    m = nn.Sequential(nn.Linear(200, 400), nn.ReLU(), nn.Linear(400, 100))
    rep = init_model(m, "xavier_normal", generator=gen())
    for name, (fi, fo) in (("0", (200, 400)), ("2", (400, 100))):
        target = math.sqrt(2 / (fi + fo))
        assert rep[name]["scheme"].startswith("xavier_normal")
        assert rep[name]["target_std"] == pytest.approx(target)
        assert check_std(m.get_submodule(name).weight, target)
        assert rep[name]["activation"] == ("relu" if name == "0" else None)


def test_low_precision_model():
    m = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 2)).to(torch.bfloat16)
    rep = init_model(m, exact=False, generator=gen())
    assert m[0].weight.dtype == torch.bfloat16
    # bf16 rounding adds a relative error of at most 2**-8 per entry
    assert abs(rep["0"]["realised_std"] / math.sqrt(2 / 256) - 1) < 0.02


# ------------------------------------------------------------------------------------------
# meta device

def build(device: str | None = None) -> nn.Module:
    with torch.device(device or "cpu"):
        return nn.Sequential(nn.Linear(128, 256), nn.BatchNorm1d(256), nn.PReLU(), nn.Linear(256, 10))


def test_meta_model_still_meta_is_a_no_op_with_targets():
    m = build("meta")
    rep = init_model(m, exact=False, generator=gen())
    assert m[0].weight.is_meta
    assert rep["0"]["target_std"] == pytest.approx(math.sqrt(2 / (1 + 0.25**2) / 128))
    assert rep["0"]["realised_std"] is None


def test_meta_then_to_empty_matches_a_normal_build():
    m = build("meta").to_empty(device="cpu")
    rep = init_model(m, generator=gen(3))
    ref = build()
    init_model(ref, generator=gen(3))
    for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), n
    for (n, b), (_, c) in zip(m.named_buffers(), ref.named_buffers()):
        assert torch.equal(b, c), n
    assert torch.all(m[2].weight == 0.25)  # PReLU reset before its slope is read
    assert rep["0"]["activation"] == "prelu(0.25)"
    assert check_std(m[0].weight, rep["0"]["target_std"])


# ------------------------------------------------------------------------------------------
# reproducibility

def test_same_seed_same_weights_other_seed_differs():
    a, b, c = mlp(), mlp(), mlp()
    init_model(a, generator=gen(7))
    init_model(b, generator=gen(7))
    init_model(c, generator=gen(8))
    for (n, p), (_, q), (_, r) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(p, q), n
        if n.endswith("weight"):
            assert not torch.equal(p, r), n


def test_reproducible_across_thread_counts():
    threads = torch.get_num_threads()
    big = [nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 512)) for _ in range(2)]
    try:
        torch.set_num_threads(1)
        init_model(big[0], generator=gen(11))
        torch.set_num_threads(max(2, threads))
        init_model(big[1], generator=gen(11))
    finally:
        torch.set_num_threads(threads)
    for p, q in zip(big[0].parameters(), big[1].parameters()):
        assert torch.equal(p, q)


# ------------------------------------------------------------------------------------------
# the report

def test_report_table_and_frame():
    m = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.LayerNorm(30), nn.Linear(30, 5))
    rep = init_model(m, exact=False, generator=gen())
    assert len(rep) == 3 and rep.traced
    keys = {"name", "kind", "shape", "fan_in", "fan_out", "activation", "scheme", "target_std", "realised_std"}
    assert all(keys <= set(r) for r in rep.rows)
    lines = str(rep).splitlines()
    header = lines[1]
    for col in ("name", "kind", "shape", "fan_in", "fan_out", "activation", "scheme", "target_std",
                "realised_std"):
        assert col in header
    assert set(lines[2]) <= {"-", " "}
    # right-aligned numeric columns end at the same offset as their header
    end = header.index("target_std") + len("target_std")
    for line in lines[3:]:
        assert line[end - 1] != " "
    assert "Linear" in str(rep) and "he_normal" in str(rep) and "30x20" in str(rep)
    pytest.importorskip("pandas")
    df = rep.frame()
    assert list(df["name"]) == ["0", "2", "3"]
    assert df.loc[0, "target_std"] == pytest.approx(math.sqrt(2 / 20))
    with pytest.raises(KeyError):
        rep["nope"]


class _Temperature(nn.Module):
    def __init__(self):
        super().__init__()
        self.t = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x / self.t


def test_report_one_line_per_parameter():
    m = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.LayerNorm(30), nn.Linear(30, 5), _Temperature())
    rep = init_model(m, exact=False, strict=False, generator=gen())
    rows = rep.param_rows()
    assert [r["name"] for r in rows] == [n for n, _ in m.named_parameters()]
    by = {r["name"]: r for r in rows}
    assert by["0.weight"]["scheme"] == "he_normal" and by["0.weight"]["fan_in"] == 20
    assert by["0.weight"]["target_std"] == pytest.approx(math.sqrt(2 / 20))
    assert by["0.weight"]["realised_std"] == pytest.approx(float(m[0].weight.detach().std()), rel=1e-5)
    assert by["0.bias"]["scheme"] == "bias zeros" and by["0.bias"]["target_std"] is None
    assert by["2.weight"]["scheme"] == "ones/zeros" and by["2.bias"]["scheme"] == "ones/zeros"
    assert by["4.t"]["scheme"] == "untouched" and "no rule" in by["4.t"]["why"]
    lines = str(rep).splitlines()
    for name in by:  # the table: one line per parameter tensor, then why anything was left
        assert sum(line.startswith(name + " ") for line in lines) == 1, name
    assert "untouched: 4.t (no rule" in str(rep)
    pytest.importorskip("pandas")
    assert list(rep.frame(per="parameter")["name"]) == list(by)
    with pytest.raises(InitlabError, match="per must be"):
        rep.frame(per="tensor")


# ------------------------------------------------------------------------------------------
# LSUV delegation

def test_lsuv_needs_a_batch_and_delegates():
    m = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 8))
    with pytest.raises(InitlabError, match="batch"):
        init_model(m, "lsuv")
    x = torch.randn(256, 32, generator=gen(1))
    rep = init_model(m, "lsuv", batch=x, generator=gen())
    assert rep.scheme == "lsuv" and "lsuv" in rep.extra
    assert {r["name"]: r["scheme"] for r in rep} == {"0": "lsuv", "2": "lsuv"}
    with torch.no_grad():
        h = m[0](x)
    assert abs(float(h.var()) - 1.0) <= 0.1 + 1e-6


# ------------------------------------------------------------------------------------------
# bad input

@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scheme": "xavier_normall"}, "xavier_normal"),
        ({"scheme": 3}, "scheme must be"),
        ({"bias": "ones"}, "bias must be 'zeros', 'keep'"),
        ({"bias": True}, "bias must be"),
        ({"bias": float("nan")}, "bias must be"),
        ({"include": "decoder*"}, "include pattern 'decoder\\*' matches no"),
        ({"exclude": ["0", "nope"]}, "exclude pattern 'nope'"),
        ({"include": 3}, "glob patterns or predicates"),
        ({"scheme": "auto", "gain": 2.0}, "'auto' takes the parameters distribution, mode"),
    ],
)
def test_bad_input_gives_clear_errors(kwargs, match):
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(InitlabError, match=match):
        init_model(m, **kwargs)


def test_bad_model_and_lazy_layers():
    with pytest.raises(InitlabError, match="nn.Module"):
        init_model("model")  # type: ignore[arg-type]
    lazy = nn.Sequential(nn.LazyLinear(4), nn.ReLU())
    with pytest.raises(InitlabError, match="forward pass"):
        init_model(lazy)


def test_scheme_error_names_the_layer():
    def picky(t, *, fans=None, generator=None):
        if fans[0] != 4:
            raise InitlabError(f"fan_in {fans[0]} is not 4")
        return t.zero_()

    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3), nn.Linear(3, 2))
    with pytest.raises(InitlabError, match=r"layer '2' \(Linear \(2, 3\)\): fan_in 3 is not 4"):
        init_model(m, picky)
    with pytest.raises(InitlabError, match="only accepted with a scheme name"):
        init_model(m, picky, gain=2.0)
