"""The bad-input suite, library part: hundreds of bad inputs to the public API and to the commands
``gains``, ``schemes`` and ``audit``.

Each case must end in a clear error (an ``InitlabError`` naming the bad value and, where there are
any, the valid choices; for a command: exit status 2 and one ``initlab: error:`` line, no traceback)
or in a correct result, never in a raw exception from deep inside, a hang, a silent wrong result,
or a change to the user's model or to the registries. Cases come from tables (every scheme times
every bad tensor, every scheme given a parameter it does not take, ...) and from ``hypothesis``.
The last test prints the counts: tried, clear error, correct, bad (which must be 0).
"""
from __future__ import annotations

import contextlib
import io
import math
import signal
import threading
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from model_state import assert_unchanged, snapshot
from torch import nn

import initlab
from initlab import InitlabError, theory
from initlab._activations import _ALIASES as _ACT_ALIASES
from initlab._schemes import _ALIASES as _SCHEME_ALIASES
from initlab.cli import main

TALLY: Counter[str] = Counter()
DEADLINE_S = 60  # a case running longer has hung


@dataclass(frozen=True)
class Case:
    """One input: ``call()`` (or ``call(model)`` with a ``model`` factory, whose model must be left
    unchanged by a failure); ``expect`` "error" (whose message must contain every ``match``,
    case-insensitively) or "ok" (whose result must pass ``check``)."""

    id: str
    call: Callable[..., Any]
    expect: str = "error"
    match: tuple[str, ...] = ()
    check: Callable[[Any], bool] | None = None
    model: Callable[[], nn.Module] | None = None


def err(id: str, call: Callable[..., Any], *match: str, model: Callable[[], nn.Module] | None = None) -> Case:
    return Case(id, call, "error", match, None, model)


def ok(id: str, call: Callable[..., Any], check: Callable[[Any], bool] | None = None,
       model: Callable[[], nn.Module] | None = None) -> Case:
    return Case(id, call, "ok", (), check, model)


class _Hang(BaseException):
    pass


@contextlib.contextmanager
def _deadline(seconds: int):
    if threading.current_thread() is not threading.main_thread():  # pragma: no cover
        yield
        return

    def fire(signum, frame):
        raise _Hang

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _registries() -> tuple[Any, ...]:
    return (tuple(initlab.activation_names()), tuple(sorted(_ACT_ALIASES.items())),
            tuple(initlab.schemes()), tuple(sorted(_SCHEME_ALIASES.items())))


def run(case: Case) -> tuple[str, str]:
    """("error" | "correct" | "bad", detail)."""
    model = case.model() if case.model is not None else None
    before = snapshot(model) if model is not None else None
    registries = _registries()
    try:
        with _deadline(DEADLINE_S), torch.random.fork_rng(), np.errstate(all="ignore"):
            result = case.call(model) if model is not None else case.call()
    except InitlabError as e:
        if case.expect != "error":
            return "bad", f"unexpected error: {e}"
        missing = [m for m in case.match if m.lower() not in str(e).lower()]
        if missing:
            return "bad", f"the error does not name {missing}: {e}"
        if model is not None:
            try:
                assert_unchanged(before, model)  # type: ignore[arg-type]
            except AssertionError as changed:
                return "bad", f"{changed} (error: {e})"
        if _registries() != registries:
            return "bad", f"a registry changed (error: {e})"
        return "error", str(e)
    except _Hang:
        return "bad", f"no answer within {DEADLINE_S} s"
    except Exception as e:  # noqa: BLE001 - exactly what the suite looks for
        return "bad", f"raw {type(e).__name__}: {e}"
    if case.expect == "error":
        return "bad", f"no error; returned {result!r:.200}"
    if case.check is not None and not case.check(result):
        return "bad", f"wrong result: {result!r:.200}"
    return "correct", ""


# ------------------------------------------------------------------------------------------ helpers


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).train()


def x6(n: int = 16) -> torch.Tensor:
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(1))


def w(*shape: int, **kw: Any) -> torch.Tensor:
    return torch.empty(*(shape or (8, 5)), **kw)


def inference_tensor() -> torch.Tensor:
    with torch.inference_mode():
        return torch.empty(8, 5)


def finite(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and bool(torch.isfinite(t.double()).all())


def cli(id: str, argv: list[str], *match: str, expect: str = "error") -> Case:
    """A command: exit 2 with one ``initlab: error:`` line naming ``match`` (or exit 0)."""
    def call() -> Any:
        out, err_ = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err_):
            try:
                code = main(argv)
            except SystemExit as e:  # argparse's usage errors
                code = e.code
        text = err_.getvalue()
        lines = [line for line in text.splitlines() if line.startswith("initlab: error:")]
        if expect == "ok":
            if code != 0:
                raise InitlabError(f"exit status {code}: {text}")
            return out.getvalue()
        if code != 2 or len(lines) != 1 or "Traceback" in text:
            raise AssertionError(f"exit status {code}, stderr {text!r}")
        raise InitlabError(lines[0])
    return Case(f"cli-{id}", call, expect, match)


# ------------------------------------------------------------------------------------------ the tables

TENSOR_SCHEMES = ["normal", "xavier_normal", "xavier_uniform", "xavier_caffe", "he_normal", "he_uniform",
                  "lecun_normal", "lecun_uniform", "kumar", "torch_default", "tf1_variance_scaling", "orthogonal",
                  "delta_orthogonal", "identity", "zeros"]
MODEL_SCHEMES = ["auto", "lsuv"]
ANY_SHAPE = {"normal", "zeros"}  # fill any tensor, biases included


def _scheme_cases() -> list[Case]:
    """Every scheme, called on every kind of bad tensor and argument."""
    cases = []
    for name in TENSOR_SCHEMES + MODEL_SCHEMES:
        s = initlab.get_scheme(name)
        model_level = name in MODEL_SCHEMES
        inputs: list[tuple[str, Callable[[], Any], str | None, tuple[str, ...]]] = [
            # (id, call, expected outcome for a tensor-level scheme ("ok" or None: error), what the error names)
            ("list", lambda s=s: s([[1.0, 2.0]]), None, ("torch.tensor", "list")),
            ("numpy", lambda s=s: s(np.zeros((3, 3))), None, ("torch.tensor", "ndarray")),
            ("int", lambda s=s: s(w(dtype=torch.long)), "ok" if name == "zeros" else None, ("int64",)),
            ("1d", lambda s=s: s(w(5)), "ok" if name in ANY_SHAPE else None, ("(5,)",)),
            ("0d", lambda s=s: s(torch.empty(())), "ok" if name in ANY_SHAPE else None, ("0-d",)),
            ("inference", lambda s=s: s(inference_tensor()), None, ("inference",)),
            ("generator-int", lambda s=s: s(w(), generator=1), None, ("generator", "int")),
            ("generator-seed", lambda s=s: s(w(), generator="0"), None, ("generator", "str")),
            ("fans-negative", lambda s=s: s(w(), fans=(-1, 3)), None, ("fans", "(-1, 3)")),
            ("fans-text", lambda s=s: s(w(), fans="ab"), None, ("fans", "'ab'")),
            ("fans-nan", lambda s=s: s(w(), fans=(math.nan, 3)), None, ("fans", "nan")),
            ("empty", lambda s=s: s(w(0, 5)), "ok", ()),
            ("meta", lambda s=s: s(w(device="meta")), "ok", ()),
        ]
        for iid, call, outcome, match in inputs:
            if name in ("orthogonal", "identity", "delta_orthogonal") and iid in ("1d", "0d"):
                match = ("at least 2 dimensions",)
            if model_level and iid not in ("list", "numpy", "generator-int", "generator-seed", "fans-negative",
                                           "fans-text", "fans-nan"):
                cases.append(err(f"scheme-{name}-{iid}", call, name, "init_model"))
            elif outcome == "ok":
                cases.append(ok(f"scheme-{name}-{iid}", call))
            else:
                cases.append(err(f"scheme-{name}-{iid}", call, *match))
        cases.append(err(f"get_scheme-{name}-unknown-param", lambda name=name: initlab.get_scheme(name, bogus=1),
                         "bogus" if name not in MODEL_SCHEMES else "bogus", name))
    return cases


def _get_scheme_cases() -> list[Case]:
    g = initlab.get_scheme
    return [
        err("get_scheme-typo", lambda: g("xavir_normal"), "xavir_normal", "did you mean 'xavier_normal'", "he_normal"),
        err("get_scheme-int", lambda: g(3), "3", "valid schemes"),
        err("get_scheme-none", lambda: g(None), "None", "valid schemes"),
        err("get_scheme-bytes", lambda: g(b"he_normal"), "bytes", "valid schemes"),
        err("get_scheme-empty", lambda: g(""), "''", "valid schemes"),
        err("get_scheme-list", lambda: g(["he_normal"]), "list", "valid schemes"),
        err("get_scheme-torch-function", lambda: g(torch.nn.init.xavier_normal_), "function", "valid schemes"),
        ok("get_scheme-case-and-dash", lambda: g(" He-Normal "), lambda s: s.name == "he_normal"),
        err("get_scheme-gain-negative", lambda: g("xavier_normal", gain=-1), "gain", "-1"),
        err("get_scheme-gain-zero", lambda: g("xavier_uniform", gain=0), "gain", "0"),
        err("get_scheme-gain-nan", lambda: g("orthogonal", gain=math.nan), "gain", "nan"),
        err("get_scheme-gain-inf", lambda: g("identity", gain=math.inf), "gain", "inf"),
        err("get_scheme-gain-text", lambda: g("xavier_normal", gain="2"), "gain", "'2'"),
        err("get_scheme-gain-bool", lambda: g("delta_orthogonal", gain=True), "gain", "True"),
        err("get_scheme-gain-huge", lambda: g("xavier_caffe", gain=1e300), "gain", "1e+300"),
        err("get_scheme-std-negative", lambda: g("normal", std=-1), "std", "-1"),
        err("get_scheme-std-zero", lambda: g("normal", std=0), "std", "0"),
        err("get_scheme-mean-nan", lambda: g("normal", mean=math.nan), "mean", "nan"),
        err("get_scheme-mean-text", lambda: g("normal", mean="0"), "mean", "'0'"),
        err("get_scheme-mode", lambda: g("he_normal", mode="fan_mid"), "fan_mid", "fan_in", "fan_out"),
        err("get_scheme-mode-int", lambda: g("kumar", mode=3), "3", "fan_in"),
        err("get_scheme-distribution", lambda: g("lecun_normal", distribution="gauss"), "gauss", "truncated_normal"),
        err("get_scheme-distribution-none", lambda: g("xavier_caffe", distribution=None), "None", "uniform"),
        err("get_scheme-activation", lambda: g("he_normal", activation="relux"), "relux", "did you mean 'relu'"),
        err("get_scheme-activation-int", lambda: g("he_uniform", activation=5), "int", "valid names"),
        err("get_scheme-param-text", lambda: g("he_normal", activation="leaky_relu", param="a"), "'a'", "number"),
        err("get_scheme-param-nan", lambda: g("he_normal", activation="leaky_relu", param=math.nan), "nan", "finite"),
        err("get_scheme-param-not-taken", lambda: g("he_normal", activation="relu", param=0.1), "relu", "no parameter"),
        err("get_scheme-kumar-relu", lambda: g("kumar", activation="relu"), "relu", "second_moment"),
        err("get_scheme-kumar-zero-slope", lambda: g("kumar", activation=lambda x: x * x), "phi'(0) = 0"),
        err("get_scheme-tf1-factor", lambda: g("tf1_variance_scaling", factor=0), "factor", "0"),
        err("get_scheme-tf1-mode", lambda: g("tf1_variance_scaling", mode="fan_geo_avg"), "fan_geo_avg", "fan_avg"),
        err("get_scheme-tf1-uniform", lambda: g("tf1_variance_scaling", uniform="yes"), "uniform", "'yes'"),
        err("get_scheme-identity-groups", lambda: g("identity", groups=0)(w(8, 8)), "groups", "0"),
        err("get_scheme-identity-groups-float", lambda: g("identity", groups=1.5)(w(8, 8)), "groups", "1.5"),
        err("get_scheme-identity-groups-bad", lambda: g("identity", groups=3)(w(8, 8)), "groups", "3", "8"),
        err("get_scheme-lsuv-tol", lambda: g("lsuv", tol=0), "tol", "0"),
        err("get_scheme-lsuv-max-iter", lambda: g("lsuv", max_iter=-1), "max_iter", "-1"),
        err("get_scheme-lsuv-max-iter-float", lambda: g("lsuv", max_iter=1.5), "max_iter", "1.5"),
        err("get_scheme-lsuv-target", lambda: g("lsuv", target_var=math.nan), "target_var", "nan"),
        err("get_scheme-auto-distribution", lambda: g("auto", distribution="x"), "'x'", "normal"),
        err("get_scheme-auto-mode", lambda: g("auto", mode=3), "3", "fan_in"),
        err("target_std-nothing", lambda: g("he_normal").target_std(), "fans=", "shape="),
        err("target_std-fans-text", lambda: g("he_normal").target_std(("a", 1)), "fans", "'a'"),
        err("target_std-fans-negative", lambda: g("lecun_normal").target_std((-4, 1)), "fans", "-4"),
        err("target_std-shape", lambda: g("xavier_normal").target_std(shape=(-1, 2)), "(-1, 2)"),
        ok("target_std-shape-ok", lambda: g("lecun_normal").target_std(shape=(3, 16)), lambda v: v == 0.25),
        err("find_activations-text", lambda: initlab.find_activations("m"), "nn.Module", "str"),
        err("gain_table-method", lambda: initlab.gain_table("xavier"), "xavier", "second_moment"),
        err("resolve_activation-typo", lambda: initlab.resolve_activation("sigmod"), "sigmod", "sigmoid"),
        err("resolve_activation-param", lambda: initlab.resolve_activation("elu", "a"), "'a'", "number"),
        ok("get_scheme-numpy-gain", lambda: g("xavier_normal", gain=np.float32(2.0))(w(), generator=torch.Generator()),
           finite),
    ]


def _function_cases() -> list[Case]:
    f = initlab
    return [
        err("xavier_normal_-gain", lambda: f.xavier_normal_(w(), gain=-2), "gain", "-2"),
        err("xavier_normal_-gain-huge", lambda: f.xavier_normal_(w(), gain=1e200), "gain", "1e+200"),
        err("xavier_uniform_-gain-tiny", lambda: f.xavier_uniform_(w(), gain=1e-200), "gain", "1e-200"),
        err("he_normal_-activation", lambda: f.he_normal_(w(), "relux"), "relux", "relu"),
        err("he_normal_-mode", lambda: f.he_normal_(w(), mode=None), "None", "fan_in"),
        err("he_normal_-distribution", lambda: f.he_normal_(w(), distribution="laplace"), "laplace", "uniform"),
        err("he_uniform_-param", lambda: f.he_uniform_(w(), "leaky_relu", math.inf), "inf", "finite"),
        err("lecun_normal_-distribution", lambda: f.lecun_normal_(w(), distribution=1), "1", "normal"),
        err("lecun_uniform_-tensor", lambda: f.lecun_uniform_("w"), "tensor", "str"),
        err("kumar_-relu", lambda: f.kumar_(w(), "relu"), "relu", "differentiable at 0"),
        err("kumar_-bad-fn", lambda: f.kumar_(w(), lambda x: x.sum()), "same shape"),
        err("normal_-std", lambda: f.normal_(w(), -1.0), "std", "-1"),
        err("normal_-mean-huge", lambda: f.normal_(w(), 1.0, mean=1e39), "mean", "float32"),
        err("normal_-std-fp16", lambda: f.normal_(w(dtype=torch.float16), 1e4), "float16", "too large"),
        err("orthogonal_-gain-fp16", lambda: f.orthogonal_(w(dtype=torch.float16), 1e5), "gain", "float16"),
        err("orthogonal_-1d", lambda: f.orthogonal_(w(5)), "(5,)", "2 dimensions"),
        err("delta_orthogonal_-generator", lambda: f.delta_orthogonal_(w(4, 4, 3), generator=np.random.default_rng()),
            "generator", "Generator"),
        err("truncated_normal_-std-nan", lambda: f.truncated_normal_(w(), math.nan), "std", "nan"),
        err("truncated_normal_-std-text", lambda: f.truncated_normal_(w(), "1"), "std", "'1'"),
        err("truncated_normal_-std-vector", lambda: f.truncated_normal_(w(), torch.ones(2)), "std", "tensor"),
        err("truncated_normal_-std-huge", lambda: f.truncated_normal_(w(), 1e38 * 2), "float32", "too large"),
        err("truncated_normal_-bool-tensor", lambda: f.truncated_normal_(w(dtype=torch.bool)), "torch.bool"),
        err("truncated_normal_-complex-tensor", lambda: f.truncated_normal_(w(dtype=torch.complex64)), "complex64"),
        ok("truncated_normal_-parameter", lambda: f.truncated_normal_(nn.Parameter(w()), 0.5), finite),
    ]


def _variance_scaling_cases() -> list[Case]:
    vs, vsf = initlab.variance_scaling_, initlab.variance_scaling
    return [
        err("vs-scale-negative", lambda: vs(w(), -1), "scale", "-1"),
        err("vs-scale-zero", lambda: vs(w(), 0), "scale", "0"),
        err("vs-scale-nan", lambda: vs(w(), math.nan), "scale", "nan"),
        err("vs-scale-inf", lambda: vs(w(), math.inf), "scale", "inf"),
        err("vs-scale-text", lambda: vs(w(), "1"), "scale", "'1'"),
        err("vs-scale-none", lambda: vs(w(), None), "scale", "None"),
        err("vs-scale-bool", lambda: vs(w(), True), "scale", "True"),
        err("vs-scale-list", lambda: vs(w(), [1.0]), "scale", "[1.0]"),
        err("vs-scale-complex", lambda: vs(w(), 1 + 1j), "scale", "(1+1j)"),
        err("vs-scale-complex-tensor", lambda: vs(w(), torch.tensor(1 + 1j)), "scale", "tensor"),
        err("vs-scale-huge", lambda: vs(w(), 1e300), "too large for float32", "1e+300"),
        err("vs-scale-tiny", lambda: vs(w(), 1e-300), "too small for float32", "1e-300"),
        err("vs-scale-bf16", lambda: vs(w(dtype=torch.bfloat16), 1e78), "bfloat16"),
        ok("vs-scale-bf16-near-max", lambda: vs(w(dtype=torch.bfloat16), 1e77), finite),
        ok("vs-scale-numpy", lambda: vs(w(), np.float32(2.0)), finite),
        ok("vs-scale-tensor", lambda: vs(w(), torch.tensor(2.0)), finite),
        err("vs-mode", lambda: vs(w(), 1.0, "fan"), "'fan'", "fan_in", "fan_geo_avg"),
        err("vs-mode-none", lambda: vs(w(), 1.0, None), "None", "fan_in"),
        err("vs-mode-int", lambda: vs(w(), 1.0, 1), "1", "fan_out"),
        ok("vs-mode-case", lambda: vs(w(), 1.0, " FAN_IN "), finite),
        err("vs-distribution", lambda: vs(w(), 1.0, "fan_in", "gauss"), "gauss", "truncated_normal"),
        err("vs-distribution-none", lambda: vs(w(), 1.0, "fan_in", None), "None", "normal"),
        ok("vs-distribution-alias", lambda: vs(w(), 1.0, "fan_in", "Gaussian"), finite),
        err("vs-tensor-list", lambda: vs([[1.0]]), "tensor", "list"),
        err("vs-tensor-int", lambda: vs(w(dtype=torch.int32)), "int32"),
        err("vs-tensor-1d", lambda: vs(w(5)), "(5,)", "zeros"),
        err("vs-tensor-0d", lambda: vs(torch.tensor(1.0)), "0-d"),
        err("vs-tensor-inference", lambda: vs(inference_tensor()), "inference"),
        ok("vs-tensor-meta", lambda: vs(w(device="meta")), lambda t: t.is_meta),
        ok("vs-tensor-empty", lambda: vs(w(0, 5)), lambda t: t.numel() == 0),
        ok("vs-tensor-zero-fan-empty", lambda: vs(w(5, 0)), lambda t: t.numel() == 0),
        ok("vs-tensor-transposed", lambda: vs(w(50, 40).T), finite),
        ok("vs-tensor-fp16", lambda: vs(w(dtype=torch.float16)), finite),
        err("vs-generator", lambda: vs(w(), generator=42), "generator", "int"),
        err("vs-fans-short", lambda: vs(w(), fans=(3,)), "fans", "(3,)"),
        err("vs-fans-inf", lambda: vs(w(), fans=(math.inf, 3)), "fans", "inf"),
        err("vs-fans-zero", lambda: vs(w(), fans=(0, 0)), "fan_in is 0"),
        err("vs-fans-bool", lambda: vs(w(), fans=(True, 3)), "fans", "True"),
        ok("vs-fans-numpy", lambda: vs(w(), fans=(np.int64(5), np.float32(8))), finite),
        err("vsf-shape-negative", lambda: vsf((-1, 3)), "-1"),
        err("vsf-shape-float", lambda: vsf((3.5, 2)), "3.5"),
        err("vsf-shape-text", lambda: vsf("abc"), "str", "'abc'"),
        err("vsf-shape-int-negative", lambda: vsf(-3), "-3"),
        err("vsf-shape-0d", lambda: vsf(()), "0-d"),
        err("vsf-dtype-int", lambda: vsf((3, 3), dtype=torch.int64), "int64"),
        err("vsf-dtype-text", lambda: vsf((3, 3), dtype="float32"), "dtype", "'float32'"),
        err("vsf-device", lambda: vsf((3, 3), device="nope"), "device", "'nope'"),
        ok("vsf-empty", lambda: vsf((0, 3)), lambda t: t.shape == (0, 3)),
        ok("vsf-like", lambda: vsf(w(), dtype=torch.float64), lambda t: t.dtype == torch.float64 and finite(t)),
    ]


def _fans_gain_cases() -> list[Case]:
    fans, gain = initlab.fans, initlab.gain
    return [
        err("fans-text", lambda: fans("abc"), "str", "'abc'"),
        err("fans-float", lambda: fans(3.5), "float", "3.5"),
        err("fans-negative-dim", lambda: fans((3, -1)), "(3, -1)"),
        err("fans-float-dim", lambda: fans((2, 2.5)), "(2, 2.5)"),
        err("fans-bool-dim", lambda: fans([True, 3]), "[True, 3]"),
        err("fans-none", lambda: fans(None), "None"),
        err("fans-1d", lambda: fans(w(5)), "1-d", "(5,)"),
        err("fans-module-text", lambda: fans(w(), module="x"), "module", "str"),
        err("fans-module-shape", lambda: fans(w(3, 3), module=nn.Conv2d(3, 3, 3)), "Conv2d", "(3, 3)"),
        err("fans-embedding-shape", lambda: fans(w(3, 3, 3), module=nn.Embedding(3, 3)), "Embedding", "(3, 3, 3)"),
        err("fans-axes-repeat", lambda: fans(w(), in_axis=(0, 0)), "in_axis", "(0, 0)"),
        err("fans-axes-float", lambda: fans(w(), in_axis=1.5), "in_axis", "1.5"),
        err("fans-axes-range", lambda: fans(w(), out_axis=5), "out_axis=5", "-2..1"),
        err("fans-axes-text", lambda: fans(w(), batch_axis="0"), "batch_axis", "'0'"),
        err("fans-axes-overlap", lambda: fans(w(), in_axis=0, out_axis=0), "disjoint"),
        err("fans-module-and-axes", lambda: fans(w(), module=nn.Linear(5, 8), in_axis=1), "module=", "not both"),
        err("fans-lazy", lambda: fans(nn.LazyLinear(3).weight), "lazy"),
        ok("fans-grouped", lambda: fans(nn.Conv2d(4, 4, 3, groups=4).weight, module=nn.Conv2d(4, 4, 3, groups=4)),
           lambda r: r == (9, 9)),
        err("gain-typo", lambda: gain("relux"), "relux", "did you mean 'relu'"),
        err("gain-int", lambda: gain(5), "int", "valid names"),
        err("gain-empty", lambda: gain(""), "''", "valid activations"),
        err("gain-list", lambda: gain([]), "list", "valid names"),
        ok("gain-none", lambda: gain(None), lambda g: g == 1.0),
        err("gain-method", lambda: gain("relu", method="xavier"), "xavier", "second_moment", "kumar"),
        err("gain-method-int", lambda: gain("relu", method=5), "5", "torch"),
        err("gain-torch-gelu", lambda: gain("gelu", method="torch"), "gelu", "second_moment"),
        err("gain-kumar-relu", lambda: gain("relu", method="kumar"), "relu", "differentiable"),
        err("gain-param-relu", lambda: gain("relu", 0.2), "relu", "no parameter"),
        err("gain-param-text", lambda: gain("leaky_relu", "x"), "'x'", "number"),
        err("gain-param-inf", lambda: gain("elu", math.inf), "inf", "finite"),
        err("gain-not-tensor", lambda: gain(lambda x: 3), "int", "same shape"),
        err("gain-raises", lambda: gain(lambda x: 1 / 0), "ZeroDivisionError", "elementwise"),
        err("gain-wrong-shape", lambda: gain(lambda x: x[:1]), "same shape"),
        err("gain-nan", lambda: gain(lambda x: x * math.nan), "nan", "finite"),
        err("gain-zero", lambda: gain(lambda x: x * 0), "0", "> 0"),
        err("gain-overflow", lambda: gain(lambda x: torch.exp(100 * x)), "inf"),
        err("gain-class-needs-args", lambda: gain(nn.Threshold), "Threshold", "instance"),
        err("gain-linear-module", lambda: gain(nn.Linear(3, 3)), "Linear", "failed"),
        ok("gain-class", lambda: gain(nn.LeakyReLU), lambda g: abs(g - math.sqrt(2 / (1 + 0.01 ** 2))) < 1e-9),
    ]


def _init_model_cases() -> list[Case]:
    im = initlab.init_model

    def scheme_returning_new(t, *, fans=None, generator=None):
        return torch.randn_like(t)

    def scheme_raising(t, *, fans=None, generator=None):
        raise ValueError("no")

    return [
        err("init_model-model-text", lambda: im("model"), "nn.Module", "str"),
        err("init_model-model-none", lambda: im(None), "nn.Module", "NoneType"),
        err("init_model-model-class", lambda: im(nn.Linear), "nn.Module", "type"),
        err("init_model-no-weights", lambda: im(nn.Sequential(nn.ReLU(), nn.Dropout())), "nothing to initialise", "Linear"),
        err("init_model-scheme-typo", lambda m: im(m, "xavir_normal"), "xavir_normal", "xavier_normal", model=mlp),
        err("init_model-scheme-int", lambda m: im(m, 3), "int", "valid names", model=mlp),
        err("init_model-scheme-none", lambda m: im(m, None), "NoneType", "auto", model=mlp),
        err("init_model-scheme-list", lambda m: im(m, ["auto"]), "list", "auto", model=mlp),
        err("init_model-scheme-class", lambda m: im(m, nn.Linear), "Linear", "f(tensor)", model=mlp),
        err("init_model-scheme-raises", lambda m: im(m, scheme_raising), "layer '0'", "ValueError: no", model=mlp),
        err("init_model-scheme-new-tensor", lambda m: im(m, scheme_returning_new), "in place", model=mlp),
        err("init_model-scheme-params-to-callable", lambda m: im(m, scheme_raising, gain=2), "scheme name", model=mlp),
        err("init_model-auto-param", lambda m: im(m, "auto", gain=2), "'auto'", "distribution, mode", model=mlp),
        err("init_model-auto-mode", lambda m: im(m, "auto", mode="fan"), "'fan'", "fan_in", model=mlp),
        err("init_model-lsuv-no-batch", lambda m: im(m, "lsuv"), "lsuv", "batch", model=mlp),
        err("init_model-lsuv-include", lambda m: im(m, "lsuv", batch=x6(), include="0"), "include", model=mlp),
        err("init_model-lsuv-bad-batch", lambda m: im(m, "lsuv", batch=torch.randn(4, 7)), "(4, 7)", "in_features",
            model=mlp),
        err("init_model-lsuv-batch-list", lambda m: im(m, "lsuv", batch=[[1.0] * 6]), "batch", "list", model=mlp),
        err("init_model-bias-text", lambda m: im(m, bias="ones"), "'ones'", "'zeros', 'keep'", model=mlp),
        err("init_model-bias-bool", lambda m: im(m, bias=True), "True", "'zeros'", model=mlp),
        err("init_model-bias-nan", lambda m: im(m, bias=math.nan), "nan", "finite", model=mlp),
        err("init_model-bias-inf", lambda m: im(m, bias=math.inf), "inf", "finite", model=mlp),
        err("init_model-bias-none", lambda m: im(m, bias=None), "None", "'keep'", model=mlp),
        err("init_model-bias-huge", lambda m: im(m, bias=1e39), "1e+39", "float32", model=mlp),
        err("init_model-generator", lambda m: im(m, generator=1), "generator", "int", model=mlp),
        err("init_model-generator-numpy", lambda m: im(m, generator=np.random.default_rng()), "generator", model=mlp),
        err("init_model-include-int", lambda m: im(m, include=3), "include", "3", model=mlp),
        err("init_model-include-empty-list", lambda m: im(m, include=[]), "include is empty", model=mlp),
        err("init_model-include-empty-text", lambda m: im(m, include=""), "include", "''", model=mlp),
        err("init_model-include-none-item", lambda m: im(m, include=[None]), "include", "None", model=mlp),
        err("init_model-include-bytes", lambda m: im(m, include=b"0"), "include", "bytes", model=mlp),
        err("init_model-include-nomatch", lambda m: im(m, include="head*"), "'head*'", "modules: 0", model=mlp),
        err("init_model-include-bracket", lambda m: im(m, include="["), "'['", "matches no", model=mlp),
        err("init_model-exclude-nomatch", lambda m: im(m, exclude=["0", "nope"]), "'nope'", model=mlp),
        err("init_model-predicate-arity", lambda m: im(m, include=lambda: True), "predicate", "f(name, module)",
            model=mlp),
        err("init_model-predicate-raises", lambda m: im(m, exclude=lambda n, mod: 1 / 0), "exclude predicate",
            "ZeroDivisionError", model=mlp),
        err("init_model-lazy", lambda m: im(m), "lazy", "forward pass",
            model=lambda: nn.Sequential(nn.LazyLinear(3), nn.ReLU())),
        ok("init_model-weight-norm", lambda m: im(m), lambda r: r["0"]["scheme"].endswith("(effective weight)"),
           model=lambda: nn.Sequential(torch.nn.utils.parametrizations.weight_norm(nn.Linear(3, 3)))),
        err("init_model-plain-tensor-weight", lambda m: im(m), "computed", "exclude=['0']", model=_plain_weight),
        err("init_model-gain-huge", lambda m: im(m, "xavier_normal", gain=1e200), "1e+200", model=mlp),
        err("init_model-fp16-too-small", lambda m: im(m, "normal", std=1e-6), "float16", "too small",
            model=lambda: mlp().half()),
        ok("init_model-meta", lambda m: im(m), lambda r: len(r) == 3, model=lambda: nn.Sequential(
            nn.Linear(3, 3, device="meta"), nn.BatchNorm1d(3, device="meta"), nn.Linear(3, 2, device="meta"))),
        ok("init_model-torch-function", lambda m: im(m, torch.nn.init.orthogonal_), lambda r: len(r) == 3, model=mlp),
        ok("init_model-batch-unused", lambda m: im(m, "xavier_normal", batch="ignored"), lambda r: len(r) == 3,
           model=mlp),
        err("init_model-auto-batch-text", lambda m: im(m, "auto", batch="ignored"), "batch must be a torch.Tensor",
            model=mlp),  # auto's correction pass runs on the batch
    ]


def _plain_weight() -> nn.Module:
    """A Linear whose weight is a plain tensor attribute, not a parameter: init_model cannot set it."""
    lin = nn.Linear(3, 3)
    del lin.weight
    lin.weight = torch.randn(3, 3)
    return nn.Sequential(lin)


def _probe_cases() -> list[Case]:
    pr, au, ls = initlab.probe, initlab.audit, initlab.lsuv_
    ce_target = torch.zeros(16, dtype=torch.long)
    return [
        err("probe-model-text", lambda: pr("m", x6()), "nn.Module", "str"),
        err("probe-model-class", lambda: pr(nn.Linear, x6()), "nn.Module", "type"),
        err("probe-no-weights", lambda: pr(nn.Sequential(nn.ReLU()), x6()), "no supported weight layer", "Linear"),
        err("probe-batch-list", lambda m: pr(m, [[0.0] * 6]), "list", "torch.tensor", model=mlp),
        err("probe-batch-numpy", lambda m: pr(m, np.zeros((4, 6))), "ndarray", "torch.from_numpy", model=mlp),
        err("probe-batch-text", lambda m: pr(m, "x"), "str", model=mlp),
        err("probe-batch-none", lambda m: pr(m, None), "NoneType", model=mlp),
        err("probe-batch-empty", lambda m: pr(m, torch.empty(0, 6)), "empty", "(0, 6)", model=mlp),
        err("probe-batch-tuple-empty", lambda m: pr(m, ()), "tuple", model=mlp),
        err("probe-batch-tuple-mixed", lambda m: pr(m, (x6(), 3)), "tuple", model=mlp),
        err("probe-batch-shape", lambda m: pr(m, torch.randn(4, 7)), "(4, 7)", "in_features", model=mlp),
        err("probe-batch-3d", lambda m: pr(m, torch.randn(4, 2, 6)), "(4, 2, 6)", model=lambda: nn.Sequential(
            nn.Linear(6, 3), nn.Flatten(), nn.Linear(3, 2))),
        err("probe-batch-float64", lambda m: pr(m, x6().double()), "float64", "float32", model=mlp),
        err("probe-batch-int", lambda m: pr(m, torch.ones(4, 6, dtype=torch.long)), "int64", "float32", model=mlp),
        err("probe-batch-bool", lambda m: pr(m, torch.ones(4, 6, dtype=torch.bool)), "bool", model=mlp),
        err("probe-batch-nan", lambda m: pr(m, torch.full((4, 6), math.nan)), "NaN", model=mlp),
        err("probe-batch-inf", lambda m: pr(m, torch.full((4, 6), math.inf)), "inf", model=mlp),
        err("probe-batch-meta", lambda m: pr(m, torch.empty(4, 6, device="meta")), "meta", model=mlp),
        err("probe-batch-one-sample-batchnorm", lambda m: pr(m, x6(1)), "(1, 6)", model=mlp),
        err("probe-target-list", lambda m: pr(m, x6(), target=[1, 2]), "target", "list", model=mlp),
        err("probe-target-shape", lambda m: pr(m, x6(), target=torch.zeros(5, dtype=torch.long)), "(5,)", "(16, 3)",
            model=mlp),
        err("probe-target-range", lambda m: pr(m, x6(), target=torch.full((16,), 7)), "target", "cross_entropy",
            model=mlp),
        err("probe-loss-name", lambda m: pr(m, x6(), target=ce_target, loss="crossentropy"), "crossentropy",
            "cross_entropy", "mse", model=mlp),
        err("probe-loss-int", lambda m: pr(m, x6(), loss=5), "loss", "int", model=mlp),
        err("probe-loss-no-target", lambda m: pr(m, x6(), loss="mse"), "mse", "target", model=mlp),
        err("probe-loss-not-scalar", lambda m: pr(m, x6(), loss=lambda out: out), "scalar", "(16, 3)", model=mlp),
        err("probe-loss-constant", lambda m: pr(m, x6(), loss=lambda out: torch.tensor(1.0)), "loss", "grad", model=mlp),
        err("probe-bins-zero", lambda m: pr(m, x6(), bins=0), "bins", "0", model=mlp),
        err("probe-bins-float", lambda m: pr(m, x6(), bins=1.5), "bins", "1.5", model=mlp),
        err("probe-bins-bool", lambda m: pr(m, x6(), bins=True), "bins", "True", model=mlp),
        err("probe-bins-text", lambda m: pr(m, x6(), bins="10"), "bins", "'10'", model=mlp),
        err("probe-bins-huge", lambda m: pr(m, x6(), bins=10 ** 12), "bins", str(10 ** 12), "1,000,000", model=mlp),
        err("probe-no-grad-weights", lambda m: pr(m, x6(), target=ce_target), "requires grad",
            model=lambda: mlp().requires_grad_(False)),
        ok("probe-eval", lambda m: pr(m.eval(), x6()), lambda r: len(r) == 2, model=mlp),
        err("audit-seed-text", lambda m: au(m, x6(), seed="x"), "seed", "'x'", model=mlp),
        err("audit-seed-float", lambda m: au(m, x6(), seed=1.5), "seed", "1.5", model=mlp),
        err("audit-seed-huge", lambda m: au(m, x6(), seed=2 ** 70), "seed", str(2 ** 70), model=mlp),
        err("audit-backward-text", lambda m: au(m, x6(), backward="yes"), "backward", "'yes'", model=mlp),
        err("audit-batch-shape", lambda m: au(m, torch.randn(4, 9)), "(4, 9)", model=mlp),
        err("audit-model-none", lambda: au(None, x6()), "nn.Module", "NoneType"),
        err("audit-int-output", lambda m: au(m, torch.zeros(4, dtype=torch.long)), "floating-point",
            model=lambda: nn.Sequential(nn.Embedding(3, 4), nn.Flatten(0), nn.Linear(16, 2), _ArgMax())),
        ok("audit-ok", lambda m: au(m, x6()), lambda r: r.probe.backward, model=mlp),
        err("lsuv-model-text", lambda: ls("m", x6()), "nn.Module", "str"),
        err("lsuv-no-layers", lambda: ls(nn.Sequential(nn.ReLU()), x6()), "no layer LSUV can fit", "Linear"),
        err("lsuv-embedding-only", lambda: ls(nn.Embedding(3, 3), torch.zeros(2, dtype=torch.long)), "Embedding"),
        err("lsuv-tol-zero", lambda m: ls(m, x6(), tol=0), "tol", "0", model=mlp),
        err("lsuv-tol-text", lambda m: ls(m, x6(), tol="0.1"), "tol", "'0.1'", model=mlp),
        err("lsuv-tol-bool", lambda m: ls(m, x6(), tol=True), "tol", "True", model=mlp),
        err("lsuv-max-iter-negative", lambda m: ls(m, x6(), max_iter=-1), "max_iter", "-1", model=mlp),
        err("lsuv-max-iter-text", lambda m: ls(m, x6(), max_iter="3"), "max_iter", "'3'", model=mlp),
        err("lsuv-target-inf", lambda m: ls(m, x6(), target_var=math.inf), "target_var", "inf", model=mlp),
        err("lsuv-center-text", lambda m: ls(m, x6(), center="yes"), "center", "'yes'", model=mlp),
        err("lsuv-generator", lambda m: ls(m, x6(), generator="g"), "generator", "str", model=mlp),
        err("lsuv-batch-shape", lambda m: ls(m, torch.randn(4, 5)), "(4, 5)", "in_features", model=mlp),
        err("lsuv-batch-int", lambda m: ls(m, torch.ones(4, 6, dtype=torch.long)), "int64", model=mlp),
        err("lsuv-batch-nan", lambda m: ls(m, torch.full((4, 6), math.nan)), "NaN", model=mlp),
        err("lsuv-lazy", lambda m: ls(m, x6()), "lazy", model=lambda: nn.Sequential(nn.LazyLinear(3))),
        ok("lsuv-max-iter-zero", lambda m: _quietly(lambda: ls(m, x6(), max_iter=0)), lambda r: len(r.rows) == 2,
           model=mlp),
    ]


def _quietly(call: Callable[[], Any]) -> Any:
    """``call()`` without its warnings (LSUV's "did not converge", expected here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return call()


class _ArgMax(nn.Module):
    def forward(self, x):
        return x.argmax(dim=-1)


def _theory_cases() -> list[Case]:
    T = theory
    spec = T.LayerSpec(fan_in=4, fan_out=4, weight_var=0.5, activation="relu")
    return [
        err("forward-ex2-negative", lambda: T.forward_variances(-1, [spec]), "input_sq_mean", ">= 0"),
        err("forward-ex2-nan", lambda: T.forward_variances(math.nan, [spec]), "input_sq_mean", "finite"),
        err("forward-ex2-text", lambda: T.forward_variances("1", [spec]), "input_sq_mean", "'1'"),
        err("forward-ex2-empty", lambda: T.forward_variances([], [spec]), "input_sq_mean", "empty"),
        err("forward-ex2-2d", lambda: T.forward_variances([[1.0]], [spec]), "input_sq_mean", "(1, 1)"),
        err("forward-layers-empty", lambda: T.forward_variances(1.0, []), "layers is empty"),
        err("forward-layers-int", lambda: T.forward_variances(1.0, [1]), "layers[0]", "LayerSpec"),
        err("forward-activation", lambda: T.forward_variances(1.0, [T.LayerSpec(4, 4, 1.0, activation="relux")]),
            "relux", "relu"),
        err("layerspec-fan-zero", lambda: T.LayerSpec(0, 4, 1.0), "fan_in", "0"),
        err("layerspec-fan-bool", lambda: T.LayerSpec(True, 4, 1.0), "fan_in", "True"),
        err("layerspec-var-negative", lambda: T.LayerSpec(4, 4, -1.0), "weight_var", "-1"),
        err("layerspec-bias-text", lambda: T.LayerSpec(4, 4, 1.0, bias_var="0"), "bias_var", "'0'"),
        err("backward-grad-negative", lambda: T.backward_variances(-1, [spec], [1.0]), "output_grad_var", "-1"),
        err("backward-pre-length", lambda: T.backward_variances(1, [spec, spec], [1.0]), "pre_var", "2 layers"),
        err("backward-pre-nan", lambda: T.backward_variances(1, [spec], [math.nan]), "pre_var", "NaN"),
        err("backward-pre-dict", lambda: T.backward_variances(1, [spec], {"x": 1}), "pre_var", "'pre_var'"),
        err("backward-pre-text", lambda: T.backward_variances(1, [spec], "abc"), "pre_var", "'abc'"),
        err("q_star-sw2-negative", lambda: T.q_star("relu", -1), "sw2", "-1"),
        err("q_star-sw2-bool", lambda: T.q_star("relu", True), "sw2", "True"),
        err("q_star-sw2-text", lambda: T.q_star("relu", "2"), "sw2", "'2'"),
        err("q_star-sb2-nan", lambda: T.q_star("tanh", 1.0, math.nan), "sb2", "nan"),
        err("q_star-q0-inf", lambda: T.q_star("tanh", 1.0, q0=math.inf), "q0", "inf"),
        err("q_star-activation", lambda: T.q_star("tanhh", 1.0), "tanhh", "tanh"),
        err("chi1-activation-int", lambda: T.chi1(3, 1.0), "int", "valid names"),
        err("critical-flat", lambda: T.critical_sw2(lambda x: x * 0), "no critical sw2"),
        err("critical-sb2-negative", lambda: T.critical_sw2("tanh", -0.1), "sb2", "-0.1"),
        err("correlation-c-range", lambda: T.correlation_map(2.0, 1.0, "tanh", 1.0), "c", "<= 1"),
        err("correlation-c-nan", lambda: T.correlation_map(math.nan, 1.0, "tanh", 1.0), "c", "finite"),
        err("correlation-q-negative", lambda: T.correlation_map(0.5, -1.0, "tanh", 1.0), "q", "-1"),
        err("correlation-diverges", lambda: T.correlation_map(0.5, None, "relu", 3.0), "q* diverges"),
        err("c_star-diverges", lambda: T.c_star("relu", 3.0), "q* diverges"),
        err("depth-diverges", lambda: T.depth_scales("relu", 4.0), "q* diverges"),
        ok("mean_field-diverges", lambda: T.mean_field("relu", 3.0), lambda r: math.isinf(r.q_star) and math.isnan(r.c_star)),
        err("gaussian_moments-q", lambda: T.gaussian_moments("relu", -1), "q", ">= 0"),
        err("length_map-q-empty", lambda: T.length_map([], "relu", 1.0), "q", "empty"),
        err("specs-model-text", lambda: T.layer_specs_from_model("m"), "nn.Module", "str"),
        err("specs-stat", lambda: T.layer_specs_from_model(mlp(), stat="mean"), "'mean'", "var", "sq_mean"),
        err("specs-no-affine", lambda: T.layer_specs_from_model(nn.Sequential(nn.Embedding(3, 3))), "Linear"),
        err("specs-meta", lambda: T.layer_specs_from_model(nn.Linear(3, 3, device="meta")), "meta"),
        err("specs-batch-shape", lambda: T.layer_specs_from_model(mlp().eval(), batch=torch.randn(4, 2)), "forward pass"),
        err("specs-batch-list", lambda: T.layer_specs_from_model(mlp(), batch=[1.0]), "batch", "list"),
        err("jacobian-batch-1d", lambda: T.jacobian_spectrum(nn.Linear(3, 3), torch.randn(3)), "batch", "(3,)"),
        err("jacobian-batch-int", lambda: T.jacobian_spectrum(nn.Linear(3, 3), torch.ones(2, 3, dtype=torch.long)),
            "floating-point", "int64"),
        err("jacobian-batch-nan", lambda: T.jacobian_spectrum(nn.Linear(3, 3), torch.full((2, 3), math.nan)), "NaN"),
        err("jacobian-max-entries", lambda: T.jacobian_spectrum(nn.Linear(3, 3), torch.randn(2, 3), max_entries="x"),
            "max_entries", "'x'"),
        err("jacobian-too-big", lambda: T.jacobian_spectrum(nn.Linear(30, 30), torch.randn(2, 30), max_entries=10),
            "max_entries", "30 x 30"),
        err("jacobian-model-fails", lambda: T.jacobian_spectrum(nn.Linear(3, 3), torch.randn(2, 4)), "(4,)"),
    ]


def _register_cases() -> list[Case]:
    ra, rs = initlab.register_activation, initlab.register_scheme
    ident = lambda x: x  # noqa: E731
    return [
        err("register_activation-name-empty", lambda: ra("", ident), "name", "''"),
        err("register_activation-name-int", lambda: ra(5, ident), "name", "5"),
        err("register_activation-name-taken", lambda: ra("relu", ident), "'relu'", "overwrite=True"),
        err("register_activation-alias-taken", lambda: ra("t_new", ident, aliases=("tanh",)), "'tanh'", "overwrite"),
        err("register_activation-fn", lambda: ra("t_fn", 5), "fn", "int"),
        err("register_activation-fn-none", lambda: ra("t_fn2", None), "fn", "NoneType"),
        err("register_activation-param-text", lambda: ra("t_p", lambda x, a: x, param="x"), "param", "'x'"),
        err("register_activation-param-nan", lambda: ra("t_p2", lambda x, a: x, param=math.nan), "param", "nan"),
        err("register_activation-moment-text", lambda: ra("t_m", ident, second_moment="x"), "second_moment", "'x'"),
        err("register_activation-moment-negative", lambda: ra("t_m2", ident, second_moment=-1), "second_moment", "-1"),
        err("register_activation-bounds-order", lambda: ra("t_b", ident, bounds=(1, 0)), "bounds", "(1.0, 0.0)"),
        err("register_activation-bounds-short", lambda: ra("t_b2", ident, bounds=(0,)), "bounds", "(0,)"),
        err("register_activation-bounds-text", lambda: ra("t_b3", ident, bounds="ab"), "bounds", "'ab'"),
        err("register_activation-kinks", lambda: ra("t_k", ident, kinks=("a",)), "kinks", "'a'"),
        err("register_activation-aliases-int", lambda: ra("t_a", ident, aliases=(5,)), "aliases", "5"),
        err("register_activation-modules-int", lambda: ra("t_mod", ident, modules=(int,)), "modules", "int"),
        err("register_activation-modules-linear", lambda: ra("t_lin", ident, modules=(nn.Linear,)), "Linear",
            "weight or normalisation layer"),
        err("register_activation-functions", lambda: ra("t_f", ident, functions=(5,)), "functions", "5"),
        err("register_activation-methods", lambda: ra("t_me", ident, methods=(5,)), "methods", "5"),
        err("register_activation-auto", lambda: ra("t_au", ident, auto="he"), "'he'", "second_moment", "kumar"),
        err("register_activation-flag", lambda: ra("t_fl", ident, homogeneous="yes"), "homogeneous", "'yes'"),
        err("register_activation-suggest", lambda: ra("t_s", ident, suggest=5), "suggest", "5"),
        err("register_activation-module-builder", lambda: ra("t_mb", ident, module=5), "module", "int"),
        err("register_scheme-name", lambda: rs("", lambda: None), "name", "''"),
        err("register_scheme-name-int", lambda: rs(3, lambda: None), "name", "3"),
        err("register_scheme-factory", lambda: rs("t_s1", 3), "factory", "int"),
        err("register_scheme-taken", lambda: rs("he_normal", lambda: None), "'he_normal'", "overwrite=True"),
        err("register_scheme-alias-hijack", lambda: rs("t_s2", lambda: None, aliases=("he_normal",)), "'he_normal'",
            "already registered"),
        err("register_scheme-alias-of-other", lambda: rs("t_s3", lambda: None, aliases=("glorot_normal",)),
            "'glorot_normal'", "xavier_normal"),
        err("register_scheme-aliases-int", lambda: rs("t_s4", lambda: None, aliases=(3,)), "aliases", "3"),
        err("register_scheme-description", lambda: rs("t_s5", lambda: None, 5), "description", "int"),
        err("register_scheme-overwrite-text", lambda: rs("t_s6", lambda: None, overwrite="yes"), "overwrite", "'yes'"),
        err("register_scheme-repeat", lambda: rs("t_s7", lambda: None, aliases=("t_s7",)), "repeat"),
        err("get_scheme-factory-raises", lambda: _with_scheme("t_raise", lambda k=1: 1 / 0, lambda: initlab.get_scheme(
            "t_raise")), "t_raise", "ZeroDivisionError"),
        err("get_scheme-factory-returns", lambda: _with_scheme("t_ret", lambda: 5, lambda: initlab.get_scheme("t_ret")),
            "t_ret", "int"),
    ]


def _with_scheme(name: str, factory: Callable[..., Any], then: Callable[[], Any]) -> Any:
    initlab.register_scheme(name, factory)
    try:
        return then()
    finally:
        initlab._schemes._REGISTRY.pop(name, None)


def _cli_cases() -> list[Case]:
    return [
        cli("gains-unknown", ["gains", "relux"], "relux", "relu"),
        cli("gains-empty-name", ["gains", ""], "''"),
        cli("gains-method", ["gains", "--method", "xavier"], "xavier", "second_moment"),
        cli("gains-param-text", ["gains", "--param", "x"], "--param", "'x'"),
        cli("gains-param-nan", ["gains", "leaky_relu", "--param", "nan"], "nan", "finite"),
        cli("gains-param-inf", ["gains", "elu", "--param", "inf"], "inf", "finite"),
        cli("gains-unknown-option", ["gains", "--bogus"], "--bogus"),
        cli("gains-ok", ["gains", "relu", "tanh"], expect="ok"),
        cli("schemes-extra", ["schemes", "extra"], "extra"),
        cli("schemes-option", ["schemes", "--bogus"], "--bogus"),
        cli("schemes-ok", ["schemes", "-v"], expect="ok"),
        cli("command-unknown", ["shemes"], "shemes", "schemes"),
        cli("audit-no-source", ["audit"], "--mlp", "--model"),
        cli("audit-both-sources", ["audit", "--mlp", "3,2", "--model", "m:f"], "--model", "--mlp"),
        cli("audit-mlp-empty", ["audit", "--mlp", ""], "--mlp", "[]"),
        cli("audit-mlp-one", ["audit", "--mlp", "784"], "--mlp", "[784]"),
        cli("audit-mlp-letters", ["audit", "--mlp", "784,a,10"], "--mlp", "'784,a,10'"),
        cli("audit-mlp-zero", ["audit", "--mlp", "0,10"], "--mlp", "[0, 10]"),
        cli("audit-mlp-negative", ["audit", "--mlp", "-5,3"], "--mlp"),
        cli("audit-act", ["audit", "--mlp", "6,3", "--act", "sigmoyd"], "sigmoyd", "sigmoid"),
        cli("audit-init", ["audit", "--mlp", "6,3", "--init", "xavir"], "xavir", "xavier_normal"),
        cli("audit-data", ["audit", "--mlp", "6,3", "--data", "cifar"], "cifar", "mnist"),
        cli("audit-batch-size-zero", ["audit", "--mlp", "6,3", "--batch-size", "0"], "--batch-size", "0"),
        cli("audit-batch-size-negative", ["audit", "--mlp", "6,3", "--batch-size", "-4"], "--batch-size", "-4"),
        cli("audit-batch-size-text", ["audit", "--mlp", "6,3", "--batch-size", "x"], "--batch-size", "'x'"),
        cli("audit-seed-text", ["audit", "--mlp", "6,3", "--seed", "x"], "--seed", "'x'"),
        cli("audit-seed-huge", ["audit", "--mlp", "6,3", "--seed", str(2 ** 70)], "seed", str(2 ** 70)),
        cli("audit-input-shape-text", ["audit", "--mlp", "6,3", "--input-shape", "a"], "--input-shape", "'a'"),
        cli("audit-input-shape-zero", ["audit", "--mlp", "6,3", "--input-shape", "0,3"], "--input-shape", "'0,3'"),
        cli("audit-input-shape-mismatch", ["audit", "--mlp", "6,3", "--input-shape", "7"], "(256, 7)", "in_features"),
        cli("audit-mnist-shape", ["audit", "--mlp", "6,3", "--data", "mnist"], "784", "--mlp 784"),
        cli("audit-mnist-input-shape", ["audit", "--mlp", "784,3", "--data", "mnist", "--input-shape", "3,32,32"],
            "784", "(3, 32, 32)"),
        cli("audit-model-no-colon", ["audit", "--model", "nocolon"], "MODULE:FACTORY", "'nocolon'"),
        cli("audit-model-empty-module", ["audit", "--model", ":make"], "MODULE:FACTORY", "':make'"),
        cli("audit-model-empty-factory", ["audit", "--model", "mod:"], "MODULE:FACTORY", "'mod:'"),
        cli("audit-model-missing-module", ["audit", "--model", "no_such_module_xyz:make"], "no_such_module_xyz"),
        cli("audit-model-missing-file", ["audit", "--model", "nofile_xyz.py:make"], "'nofile_xyz.py'", "not found"),
        cli("audit-model-not-a-model", ["audit", "--model", "math:pi"], "math:pi", "float", "not a function"),
        cli("audit-model-wrong-return", ["audit", "--model", "os:getcwd"], "nn.Module", "str"),
        cli("audit-model-factory-raises", ["audit", "--model", "json:loads"], "json:loads()", "TypeError"),
        cli("audit-huge-batch", ["audit", "--mlp", "6,3", "--batch-size", str(10 ** 12)], "not enough memory",
            "--batch-size"),
        cli("audit-huge-mlp", ["audit", "--mlp", "1000000,1000000"], "not enough memory", "Linear(1000000, 1000000)"),
        cli("audit-lsuv-ok", ["audit", "--mlp", "6,4,3", "--init", "lsuv", "--batch-size", "32"], expect="ok"),
    ]


CASES: list[Case] = (_scheme_cases() + _get_scheme_cases() + _function_cases() + _variance_scaling_cases()
                     + _fans_gain_cases() + _init_model_cases() + _probe_cases() + _theory_cases()
                     + _register_cases() + _cli_cases())
assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case) -> None:
    outcome, detail = run(case)
    TALLY["tried"] += 1
    TALLY[outcome] += 1
    assert outcome != "bad", f"{case.id}: {detail}"
    assert outcome == ("error" if case.expect == "error" else "correct")


# ------------------------------------------------------------------------------------------ generated

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10 ** 30, 10 ** 30),
                    st.sampled_from([0, -0.0, 1e-320, 5e-324, 1e308, -1e-308, True, None, "1", 1j]))


def _tally(case: Case) -> None:
    outcome, detail = run(case)
    TALLY["tried"] += 1
    TALLY["generated"] += 1
    TALLY[outcome] += 1
    assert outcome != "bad", f"{case.id}: {detail}"


@hypothesis.settings(max_examples=60, deadline=None, derandomize=True, database=None)
@hypothesis.given(value=NUMBERS, which=st.sampled_from(["scale", "gain", "std", "mean", "bias", "sw2"]),
                  dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
def test_any_number_anywhere_is_a_clear_error_or_finite_weights(value, which, dtype):
    """Any number (or near-number) as a scale, gain, std, mean, bias or sw2: a clear error, or
    finite weights (never inf/NaN, never a raw exception)."""
    calls = {
        "scale": lambda: initlab.variance_scaling_(w(dtype=dtype), value),
        "gain": lambda: initlab.xavier_normal_(w(dtype=dtype), gain=value),
        "std": lambda: initlab.normal_(w(dtype=dtype), value),
        "mean": lambda: initlab.normal_(w(dtype=dtype), 1.0, mean=value),
        "bias": lambda: initlab.init_model(nn.Sequential(nn.Linear(5, 4).to(dtype)), bias=value),
        "sw2": lambda: theory.length_map(1.0, "tanh", value),
    }
    is_finite = {"bias": lambda r: len(r) == 1, "sw2": lambda r: math.isfinite(r)}.get(which, finite)
    call = calls[which]
    # which outcome is right depends on the value: both a clear error and a finite result pass
    case = Case(f"generated-{which}-{value!r}", call, "error", ())
    outcome, detail = run(case)
    if outcome == "bad" and detail.startswith("no error"):
        case = Case(case.id, call, "ok", (), is_finite)
    _tally(case)


@hypothesis.settings(max_examples=40, deadline=None, derandomize=True, database=None)
@hypothesis.given(shape=st.lists(st.integers(-2, 6), min_size=0, max_size=4),
                  scheme=st.sampled_from(TENSOR_SCHEMES))
def test_any_shape_is_a_clear_error_or_a_filled_tensor(shape, scheme):
    """Every scheme on a tensor of any (possibly invalid) shape: a clear error or finite values."""
    def call():
        t = initlab.variance_scaling(tuple(shape), generator=torch.Generator())  # validates the shape first
        return initlab.get_scheme(scheme)(t, generator=torch.Generator())

    case = Case(f"generated-shape-{scheme}-{shape}", call, "error", ())
    outcome, detail = run(case)
    if outcome == "bad" and detail.startswith("no error"):
        case = Case(case.id, call, "ok", (), lambda t: finite(t) or t.numel() == 0)
    _tally(case)


def test_zz_counts(capsys):
    """The suite's counts, printed at the end of ``python -m pytest -q``."""
    with capsys.disabled():
        print(f"\nbad-input suite (library and commands): tried {TALLY['tried']} "
              f"({len(CASES)} from tables, {TALLY['generated']} generated), clear error {TALLY['error']}, "
              f"correct {TALLY['correct']}, bad {TALLY['bad']}")
    assert TALLY["bad"] == 0
    if TALLY["tried"] - TALLY["generated"] == len(CASES):  # the whole table ran (not a -k selection)
        assert len(CASES) >= 200
