"""Experiments as config: schema validation with key paths, grids, presets, canonical TOML round trips."""
from __future__ import annotations

import dataclasses
import importlib.util
import pickle

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

from initlab._errors import InitlabError
from initlab.lab import config as C
from initlab.lab.config import (DataSpec, Experiment, ModelSpec, Scenario, TrainSpec, config_fingerprint,
                                experiment_from_dict, experiment_to_dict, experiment_to_toml, list_presets,
                                load_experiment, preset_names, with_overrides)

CLASSIC_SCENARIOS = [
    ("sigmoid-normal", "sigmoid", "normal"),
    ("sigmoid-xavier", "sigmoid", "xavier_normal"),
    ("relu-normal", "relu", "normal"),
    ("relu-xavier", "relu", "xavier_normal"),
    ("relu-he", "relu", "he_normal"),
]
ONE = [{"activation": "relu", "scheme": "normal"}]


def minimal(**sections) -> dict:
    d = {"scenarios": ONE}
    d.update(sections)
    return d


# ----------------------------------------------------------------------------- presets


def test_classic_is_the_study():
    e = load_experiment("classic")
    assert e.name == "classic" and e.description
    assert [(s.name, s.activation, s.scheme) for s in e.scenarios] == CLASSIC_SCENARIOS
    # he_normal's gain follows the scenario's activation (made explicit when the registry has the parameter)
    assert all(dict(s.params).get("activation", s.activation) == s.activation for s in e.scenarios)
    assert all(set(dict(s.params)) <= {"activation"} for s in e.scenarios)
    assert e.model == ModelSpec("mlp", (784, 100, 100, 10), True)
    assert all(s.model == e.model for s in e.scenarios)
    assert e.train == TrainSpec("adam", 1e-3, 30, 1000, 50, 100, "cpu", (0, 1, 2))
    assert e.data == DataSpec("mnist", "", False, 0.2, 0, 0)
    assert e.n_runs == 15


def test_smoke_is_the_study_cut_short():
    s, c = load_experiment("smoke"), load_experiment("classic")
    assert [(x.name, x.activation, x.scheme, x.model) for x in s.scenarios] == \
           [(x.name, x.activation, x.scheme, x.model) for x in c.scenarios]
    assert s.train.steps < 100 and len(s.train.seeds) == 1 and s.train.steps % s.train.log_every == 0
    assert (s.train.lr, s.train.batch_size, s.train.first_pass_batch) == (1e-3, 30, 100)


def test_deep_preset_is_a_depth_grid():
    e = load_experiment("deep")
    assert len(e.scenarios) == 2 * 3 * 4
    first = e.scenarios[0]
    assert first.name == "tanh-xavier_normal-d2" and first.model.widths == (784, 100, 100, 10)
    last = e.scenarios[-1]
    assert last.name == "relu-auto-d20" and last.model.widths == (784,) + (100,) * 20 + (10,)


def test_list_presets():
    presets = dict(list_presets())
    assert {"classic", "smoke", "deep"} <= set(presets)
    assert "Xavier" in presets["classic"] and all(presets.values())
    assert preset_names() == sorted(presets)


@pytest.mark.parametrize("name", preset_names())
def test_presets_round_trip(name):
    e = load_experiment(name)
    text = experiment_to_toml(e)
    assert experiment_from_dict(tomllib.loads(text)) == e
    assert experiment_to_toml(experiment_from_dict(tomllib.loads(text))) == text  # canonical: a fixed point


# ----------------------------------------------------------------------------- files


def test_load_from_file_and_default_name(tmp_path):
    p = tmp_path / "my-study.toml"
    p.write_text('[train]\nsteps = 40\nlog_every = 20\nseeds = 2\n\n[[scenarios]]\nactivation = "tanh"\nscheme = "normal"\n')
    e = load_experiment(str(p))
    assert e.name == "my-study" and e.train.steps == 40 and e.train.seeds == (0, 1)
    assert e.scenarios[0].name == "tanh-normal"
    assert load_experiment(p) == e


def test_malformed_toml_gives_file_line_and_column(tmp_path):
    p = tmp_path / "broken.toml"
    p.write_text('name = "x"\n[train]\nlr = = 1\n')
    with pytest.raises(InitlabError, match=r"broken\.toml, line 3, column \d+: malformed TOML: ") as err:
        load_experiment(str(p))
    assert "Traceback" not in str(err.value)
    p.write_text('name = "x"\n[train\n')
    with pytest.raises(InitlabError, match=r"broken\.toml, line 2, column \d+: malformed TOML"):
        load_experiment(str(p))


def test_file_errors(tmp_path):
    with pytest.raises(InitlabError, match=r"nope\.toml: config file not found"):
        load_experiment(str(tmp_path / "nope.toml"))
    with pytest.raises(InitlabError, match="is a folder"):
        load_experiment(tmp_path)
    (tmp_path / "latin1.toml").write_bytes(b'name = "caf\xe9"\n')
    with pytest.raises(InitlabError, match=r"latin1\.toml: not UTF-8 text"):
        load_experiment(str(tmp_path / "latin1.toml"))
    (tmp_path / "bad.toml").write_text('[train]\nlr = "fast"\n[[scenarios]]\nactivation = "relu"\nscheme = "normal"\n')
    with pytest.raises(InitlabError, match=r"bad\.toml: train\.lr: expected a number, got 'fast'"):
        load_experiment(str(tmp_path / "bad.toml"))


def test_unknown_preset_suggests():
    with pytest.raises(InitlabError, match=r"unknown preset 'clasic'; did you mean 'classic'\?.*smoke"):
        load_experiment("clasic")


# ----------------------------------------------------------------------------- validation: key path and expected type

BAD = [
    (minimal(train={"lr": "fast"}), r"^train\.lr: expected a number, got 'fast'$"),
    (minimal(train={"lr": -1}), r"^train\.lr: expected a number > 0, got -1"),
    (minimal(train={"lr": True}), r"^train\.lr: expected a number, got True"),
    (minimal(train={"steps": "10"}), r"^train\.steps: expected an integer, got '10'"),
    (minimal(train={"batch_size": 0}), r"^train\.batch_size: expected an integer >= 1, got 0"),
    (minimal(train={"batch_size": 2.5}), r"^train\.batch_size: expected an integer, got 2\.5"),
    (minimal(train={"steps": 10, "log_every": 20}), r"^train\.log_every: expected at most train\.steps \(10\), got 20"),
    (minimal(train={"seeds": [0, "a"]}), r"^train\.seeds\[1\]: expected an integer, got 'a'"),
    (minimal(train={"seeds": [0, 0]}), r"^train\.seeds: seed 0 appears twice"),
    (minimal(train={"seeds": []}), r"^train\.seeds: expected a list of at least 1 integer"),
    (minimal(train={"optimizer": "adma"}), r"^train\.optimizer: unknown optimizer 'adma'; did you mean 'adam'\?"),
    (minimal(train={"device": "gpu"}), r"^train\.device: expected a device such as 'cpu'"),
    (minimal(train={"lrr": 0.1}), r"^train\.lrr: unknown key 'lrr'; did you mean 'lr'\? Valid keys in \[train\]: "),
    (minimal(train=[1]), r"^train: expected a table, got \[1\]"),
    (minimal(tarin={}), r"^tarin: unknown key 'tarin'; did you mean 'train'\?"),
    (minimal(name=3), r"^name: expected a string, got 3"),
    (minimal(data={"name": "mnits"}), r"^data\.name: unknown data set 'mnits'; did you mean 'mnist'\?"),
    (minimal(data={"test_fraction": 0}), r"^data\.test_fraction: expected a number between 0 and 1"),
    (minimal(data={"standardize": "yes"}), r"^data\.standardize: expected true or false, got 'yes'"),
    (minimal(data={"limit": -1}), r"^data\.limit: expected an integer >= 0, got -1"),
    (minimal(data={"root": 5}), r"^data\.root: expected a string, got 5"),
    (minimal(model={"kind": "rnn"}), r"^model\.kind: unknown model kind 'rnn'"),
    (minimal(model={"widths": [784, 100]}), r"^model\.widths\[-1\]: expected 10 \(the number of classes"),
    (minimal(model={"widths": [100, 10]}), r"^model\.widths\[0\]: expected 784 \(the input size of data set 'mnist'\)"),
    (minimal(model={"widths": 784}), r"^model\.widths: expected a list of integers, got 784"),
    (minimal(model={"widths": [784, 0, 10]}), r"^model\.widths\[1\]: expected an integer >= 1, got 0"),
    (minimal(model={"widths": [784, 10], "hidden": [5]}), r"^model: give either widths or hidden"),
    (minimal(model={"kind": "cnn"}), r"^model\.channels: expected a non-empty list of integers for kind = 'cnn'"),
    (minimal(model={"channels": [4]}), r"^model\.channels: only used with kind = 'cnn'"),
    (minimal(model={"kernel": 5}), r"^model\.kernel: only used with kind = 'cnn'"),
    (minimal(model={"bias": 1}), r"^model\.bias: expected true or false, got 1"),
    ({"scenarios": [{"activation": "rleu", "scheme": "normal"}]},
     r"^scenarios\[0\]\.activation: unknown activation 'rleu'; did you mean 'relu'\?"),
    ({"scenarios": [{"scheme": "normal"}]}, r"^scenarios\[0\]\.activation: missing"),
    ({"scenarios": [{"activation": "relu"}]}, r"^scenarios\[0\]\.scheme: missing"),
    ({"scenarios": [{"activation": "relu", "scheme": 1}]}, r"^scenarios\[0\]\.scheme: expected a string, got 1"),
    ({"scenarios": [{"activation": "relu", "scheme": "normal", "actvation": "x"}]},
     r"^scenarios\[0\]\.actvation: unknown key 'actvation'; did you mean 'activation'\?"),
    ({"scenarios": [{"activation": "relu", "scheme": "normal", "params": [1]}]},
     r"^scenarios\[0\]\.params: expected a table"),
    ({"scenarios": [{"activation": "relu", "scheme": "normal", "params": {"std": {"a": 1}}}]},
     r"^scenarios\[0\]\.params\.std: expected a number, string, boolean or list"),
    ({"scenarios": [{"activation": "relu", "scheme": "auto", "params": {"mdoe": "fan_in"}}]},
     r"^scenarios\[0\]\.params\.mdoe: unknown parameter 'mdoe' of scheme 'auto'; did you mean 'mode'\?"),
    ({"scenarios": [{"activation": "relu", "scheme": "lsuv", "params": {"tl": 0.1}}]},
     r"^scenarios\[0\]\.params\.tl: unknown parameter 'tl' of scheme 'lsuv'; did you mean 'tol'\?"),
    ({"scenarios": [{"activation": "relu", "scheme": "normal", "widths": [784, 10], "depth": 2}]},
     r"^scenarios\[0\]: give either widths or depth/width"),
    ({"scenarios": [{"activation": "relu", "scheme": "normal", "widths": [64, 10]}]},
     r"^scenarios\[0\]\.widths\[0\]: expected 784"),
    ({"scenarios": [{"activation": "relu", "scheme": "normal", "depth": 0}]},
     r"^scenarios\[0\]\.depth: expected an integer >= 1, got 0"),
    ({"scenarios": [{"activation": "relu", "scheme": "normal", "name": "a b"}]},
     r"^scenarios\[0\]\.name: expected letters, digits"),
    ({"scenarios": ONE + ONE}, r"^scenarios\[1\]\.name: duplicate scenario name 'relu-normal'"),
    ({"scenarios": []}, r"^scenarios: the experiment has no scenarios"),
    ({}, r"^scenarios: the experiment has no scenarios"),
    ({"scenarios": {"activation": "relu"}}, r"^scenarios: expected a list of tables"),
    ({"grid": {"activations": ["relu"]}}, r"^grid\.schemes: missing"),
    ({"grid": {"activations": [], "schemes": ["normal"]}}, r"^grid\.activations: expected a non-empty list"),
    ({"grid": {"activations": "relu", "schemes": ["normal"]}}, r"^grid\.activations: expected a list of strings, got 'relu'"),
    ({"grid": {"activations": ["relu"], "schemes": ["normal"], "depth": [2]}},
     r"^grid\.depth: unknown key 'depth'; did you mean 'depths'\?"),
    ({"grid": {"activations": ["relu", "sigmoid"], "schemes": ["normal"], "depths": [2, "x"]}},
     r"^grid\.depths\[1\]: expected an integer, got 'x'"),
    ({"model": {"widths": [784, 10]}, "grid": {"activations": ["relu"], "schemes": ["normal"], "depths": [2]}},
     r"^grid\.depth: the base model\.widths \[784, 10\] has no hidden layer"),
    # sigma_w^2 (sw2) and the residual policy
    ({"scenarios": [{"activation": "tanh", "sw2": -1.0}]}, r"^scenarios\[0\]\.sw2: expected a number > 0, got -1\.0$"),
    ({"scenarios": [{"activation": "tanh", "sw2": "big"}]}, r"^scenarios\[0\]\.sw2: expected a number, got 'big'$"),
    ({"scenarios": [{"activation": "tanh", "sw2": 1.0, "scheme": "normal"}]},
     r"^scenarios\[0\]\.scheme: give either sw2 \(which draws N\(0, sw2 / fan_in\)\) or scheme/params, not both$"),
    ({"scenarios": [{"activation": "tanh", "sw2": 1.0, "params": {"std": 1}}]}, r"^scenarios\[0\]\.params: give either sw2"),
    ({"grid": {"activations": ["tanh"], "sw2": [1.0, 0.0]}}, r"^grid\.sw2\[1\]: expected a number > 0, got 0\.0$"),
    ({"grid": {"activations": ["tanh"], "sw2": []}}, r"^grid\.sw2: expected a non-empty list$"),
    ({"grid": {"activations": ["tanh"], "sw2": 1.76}}, r"^grid\.sw2: expected a list of numbers, got 1\.76$"),
    ({"grid": {"activations": ["tanh"], "sw2": [1.0], "schemes": ["normal"]}},
     r"^grid\.sw2: give either schemes or sw2 \(which draws N\(0, sw2 / fan_in\)\), not both$"),
    ({"grid": {"activations": ["tanh"], "sw2": [1.0], "params": {"std": 1}}}, r"^grid\.params: sw2 sets the scheme"),
    ({"grid": {"activations": ["tanh"], "sw": [1.0]}}, r"^grid\.sw: unknown key 'sw'; did you mean 'sw2'\?"),
    ({"model": {"kind": "resmlp", "widths": [784, 8, 8, 10]}, "scenarios": [{"activation": "relu", "scheme": "he_normal", "residual": "fixpu"}]},
     r"^scenarios\[0\]\.residual: unknown residual 'fixpu'; did you mean 'fixup'\? "
     r"Valid residuals: fixup, gpt2, none, skipinit$"),
    ({"model": {"kind": "resmlp", "widths": [784, 8, 8, 10]}, "scenarios": [{"activation": "relu", "scheme": "he_normal", "residual": 1}]},
     r"^scenarios\[0\]\.residual: expected a string, got 1$"),
    ({"scenarios": [{"activation": "relu", "scheme": "he_normal", "residual": "fixup"}]},
     r"^scenarios\[0\]\.residual: 'fixup' acts on residual branches, and model\.kind = 'mlp' has none"),
    ({"model": {"kind": "resmlp", "widths": [784, 8, 8, 10]}, "grid": {"activations": ["relu"], "schemes": ["he_normal"], "residual": "gpt"}},
     r"^grid\.residual: unknown residual 'gpt'; did you mean 'gpt2'\?"),
]


@pytest.mark.parametrize("d, pattern", BAD, ids=[p for _, p in BAD])
def test_bad_config_names_key_path_and_expectation(d, pattern):
    with pytest.raises(InitlabError, match=pattern):
        experiment_from_dict(d)


def test_good_config_passes_the_same_checks():
    # control for BAD: the corrected values are accepted
    e = experiment_from_dict(minimal(train={"lr": 0.01, "steps": 10, "log_every": 5, "seeds": [3, 1]},
                                     model={"widths": [784, 50, 10]}, data={"standardize": True}))
    assert e.train.lr == 0.01 and e.train.seeds == (3, 1) and e.model.widths == (784, 50, 10)
    assert e.scenarios[0].model.widths == (784, 50, 10)


def test_integral_floats_are_integers_and_ints_are_numbers():
    e = experiment_from_dict(minimal(train={"steps": 1e3, "lr": 1}))
    assert e.train.steps == 1000 and isinstance(e.train.steps, int)
    assert e.train.lr == 1.0 and isinstance(e.train.lr, float)


# ----------------------------------------------------------------------------- grids and scenario models


def test_grid_expansion_names_and_order():
    e = experiment_from_dict({"grid": {"activations": ["tanh", "ReLU"], "schemes": ["normal", "xavier_normal"],
                                       "depths": [1, 3], "widths": [50]}})
    names = [s.name for s in e.scenarios]
    assert names == ["tanh-normal-d1-w50", "tanh-normal-d3-w50", "tanh-xavier_normal-d1-w50", "tanh-xavier_normal-d3-w50",
                     "relu-normal-d1-w50", "relu-normal-d3-w50", "relu-xavier_normal-d1-w50", "relu-xavier_normal-d3-w50"]
    assert e.scenarios[1].model.widths == (784, 50, 50, 50, 10)
    e = experiment_from_dict({"grid": {"activations": ["tanh"], "schemes": ["normal"], "params": {"std": 0.5}}})
    assert e.scenarios[0].params == (("std", 0.5),) and e.scenarios[0].name == "tanh-normal"


def test_grid_without_depths_keeps_the_base_model_and_adds_to_explicit_scenarios():
    e = experiment_from_dict({"scenarios": [{"activation": "sigmoid", "scheme": "normal", "name": "base"}],
                              "grid": {"activations": ["logistic"], "schemes": ["normal"]}})
    assert [s.name for s in e.scenarios] == ["base", "sigmoid-normal"]  # aliases resolve to table names
    assert e.scenarios[1].model == e.model


def test_sw2_axis_and_key_name_the_scenarios_and_read_back():
    from initlab.lab.studies import scenario_sw2

    e = experiment_from_dict({"model": {"widths": [784, 64, 10]},
                              "scenarios": [{"activation": "tanh", "sw2": 2.5},
                                            {"activation": "tanh", "scheme": "normal", "params": {"std": 0.125},
                                             "name": "old-style"}],
                              "grid": {"activations": ["tanh"], "sw2": [1, 1.76], "depths": [2, 10]}})
    assert [s.name for s in e.scenarios] == ["tanh-sw2.5", "old-style", "tanh-sw1-d2", "tanh-sw1-d10",
                                             "tanh-sw1.76-d2", "tanh-sw1.76-d10"]
    sc = e.scenarios[4]
    assert sc.scheme == "xavier_caffe" and dict(sc.params) == {"distribution": "normal", "gain": 1.76 ** 0.5}
    assert sc.model.widths == (784, 64, 64, 10)
    # read back from the axis, and the old reading (normal with std: sw2 = std^2 * width) still works
    assert scenario_sw2(e) == {"tanh-sw2.5": 2.5, "old-style": 1.0, "tanh-sw1-d2": 1.0, "tanh-sw1-d10": 1.0,
                               "tanh-sw1.76-d2": 1.76, "tanh-sw1.76-d10": 1.76}
    assert experiment_from_dict(tomllib.loads(experiment_to_toml(e))) == e  # the canonical TOML keeps them
    other = experiment_from_dict({"model": {"widths": [784, 64, 10]}, "grid": {"activations": ["tanh"],
                                                                               "sw2": [1, 1.75], "depths": [2]}})
    assert config_fingerprint(other) != config_fingerprint(experiment_from_dict(
        {"model": {"widths": [784, 64, 10]}, "grid": {"activations": ["tanh"], "sw2": [1, 1.76], "depths": [2]}}))


def test_sw2_draws_sigma_w2_over_fan_in_at_every_layer():
    """Var(W_ij) = sw2 / fan_in (Poole et al. 2016), the first layer (fan_in 784) too. The sample variance of n
    normals has relative standard error sqrt(2 / n): checked within 4 of them."""
    import torch

    from initlab.lab.training.plan import init_member

    e = experiment_from_dict({"model": {"widths": [784, 64, 64, 10]},
                              "scenarios": [{"activation": "tanh", "sw2": 1.76}]})
    model = init_member(e.scenarios[0], seed=3)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    for lin in linears:
        w = lin.weight.detach().double()
        n, fan_in = w.numel(), w.shape[1]
        assert abs(w.var().item() / (1.76 / fan_in) - 1) < 4 * (2 / n) ** 0.5, (fan_in, w.var().item())
        assert abs(w.mean().item()) < 4 * (1.76 / fan_in / n) ** 0.5
    # negative control: the first layer is not drawn with the hidden width's variance sw2 / 64
    w1 = linears[0].weight.detach().double()
    assert abs(w1.var().item() / (1.76 / 64) - 1) > 4 * (2 / w1.numel()) ** 0.5


def test_residual_key_round_trips_and_changes_the_fingerprint():
    base = {"model": {"kind": "resmlp", "widths": [784, 8, 8, 8, 10]}}
    plain = experiment_from_dict(dict(base, scenarios=[{"activation": "relu", "scheme": "he_normal", "name": "a"}]))
    fixup = experiment_from_dict(dict(base, scenarios=[{"activation": "relu", "scheme": "he_normal", "name": "a",
                                                        "residual": "Fixup"}]))
    assert plain.scenarios[0].residual == "none" and fixup.scenarios[0].residual == "fixup"
    assert "residual" not in experiment_to_dict(plain)["scenarios"][0]  # written only when set
    assert experiment_to_dict(fixup)["scenarios"][0]["residual"] == "fixup"
    assert experiment_from_dict(tomllib.loads(experiment_to_toml(fixup))) == fixup
    assert config_fingerprint(fixup) != config_fingerprint(plain)
    grid = experiment_from_dict(dict(base, grid={"activations": ["relu"], "schemes": ["he_normal"],
                                                 "residual": "skipinit"}))
    assert [(s.name, s.residual) for s in grid.scenarios] == [("relu-he_normal-skipinit", "skipinit")]


def test_scenario_depth_and_width_overrides():
    e = experiment_from_dict({"scenarios": [
        {"activation": "relu", "scheme": "normal", "depth": 4},
        {"activation": "relu", "scheme": "normal", "width": 30},
        {"activation": "relu", "scheme": "normal", "widths": [784, 7, 10], "name": "tiny"},
    ]})
    assert [s.name for s in e.scenarios] == ["relu-normal-d4", "relu-normal-w30", "tiny"]
    assert [s.model.widths for s in e.scenarios] == [(784, 100, 100, 100, 100, 10), (784, 30, 30, 10), (784, 7, 10)]
    with pytest.raises(InitlabError, match=r"hidden widths \[100, 50\] differ; give a width too"):
        experiment_from_dict({"model": {"widths": [784, 100, 50, 10]}, "scenarios": [{"activation": "relu", "scheme": "normal", "depth": 3}]})


def test_hidden_sugar_and_digits_sizes():
    e = experiment_from_dict({"data": {"name": "digits"}, "model": {"hidden": [32]}, "scenarios": ONE})
    assert e.model.widths == (64, 32, 10)
    e = experiment_from_dict({"data": {"name": "gaussian"}, "scenarios": ONE})
    assert e.model.widths == (784, 100, 100, 10)


def test_cnn_experiment_round_trips():
    e = experiment_from_dict({"model": {"kind": "cnn", "channels": [8, 16], "kernel": 5, "hidden": [64]},
                              "grid": {"activations": ["relu"], "schemes": ["normal"], "depths": [1, 2]}})
    assert e.model == ModelSpec("cnn", (784, 64, 10), True, (8, 16), 5)
    assert e.scenarios[1].model == ModelSpec("cnn", (784, 64, 64, 10), True, (8, 16), 5)
    assert experiment_from_dict(tomllib.loads(experiment_to_toml(e))) == e


@pytest.fixture
def any_params_scheme():
    """A scheme that takes any parameter (its factory has ``**kwargs``), registered for one test."""
    from initlab import _schemes

    _schemes.register_scheme("any_params", lambda **kw: _schemes.get_scheme("normal", std=kw.get("std", 1.0)))
    yield "any_params"
    del _schemes._REGISTRY["any_params"]


def test_awkward_values_round_trip(any_params_scheme):
    e = experiment_from_dict({
        "name": 'quote " and \\ backslash', "description": "tab\tnewline\nunicode é ✓ del \x7f",
        "data": {"root": "C:\\data\\mnist", "split_seed": 7},
        "scenarios": [{"activation": "leaky_relu", "scheme": any_params_scheme,
                       "params": {"std": 0.25, "flag": True, "list": [1, 2.5, "a"], "weird key": "x"}}],
    })
    text = experiment_to_toml(e)
    back = experiment_from_dict(tomllib.loads(text))
    assert back == e and back.description == e.description
    assert back.scenarios[0].params == (("flag", True), ("list", (1, 2.5, "a")), ("std", 0.25), ("weird key", "x"))


# ----------------------------------------------------------------------------- the scheme registry check


def test_unknown_scheme_against_the_registry():
    with pytest.raises(InitlabError, match=r"^scenarios\[0\]\.scheme: unknown scheme 'xavier_norml'; did you mean 'xavier_normal'\?"):
        experiment_from_dict({"scenarios": [{"activation": "relu", "scheme": "xavier_norml"}]})
    with pytest.raises(InitlabError, match=r"^grid\.schemes\[1\]: unknown scheme 'he'"):
        experiment_from_dict({"grid": {"activations": ["relu"], "schemes": ["normal", "he"]}})
    with pytest.raises(InitlabError, match=r"^scenarios\[0\]\.params\.sdt: unknown parameter 'sdt' of scheme 'normal'; "
                                           r"did you mean 'std'\? Valid parameters: std, mean"):
        experiment_from_dict({"scenarios": [{"activation": "relu", "scheme": "normal", "params": {"sdt": 1}}]})
    # a parameter the scheme takes but whose value it rejects: the registry's message, at the key path
    with pytest.raises(InitlabError, match=r"^scenarios\[0\]\.params: "):
        experiment_from_dict({"scenarios": [{"activation": "relu", "scheme": "normal", "params": {"std": -1}}]})
    # control: known names (any case) and lsuv/auto pass
    e = experiment_from_dict({"grid": {"activations": ["relu"], "schemes": ["He_Normal", "lsuv", "AUTO"]}})
    assert [s.scheme for s in e.scenarios] == ["he_normal", "lsuv", "auto"]


def test_schemes_with_an_activation_parameter_get_the_scenarios():
    e = experiment_from_dict({"grid": {"activations": ["tanh", "sigmoid"], "schemes": ["kumar", "he_normal", "xavier_normal"]}})
    got = {s.name: dict(s.params).get("activation") for s in e.scenarios}
    assert got == {"tanh-kumar": "tanh", "tanh-he_normal": "tanh", "tanh-xavier_normal": None,
                   "sigmoid-kumar": "sigmoid", "sigmoid-he_normal": "sigmoid", "sigmoid-xavier_normal": None}
    # a combination the scheme refuses is reported at the grid entry
    with pytest.raises(InitlabError, match=r"^grid\.schemes\[0\]: scheme 'kumar' does not fit activation 'relu'"):
        experiment_from_dict({"grid": {"activations": ["relu"], "schemes": ["kumar"]}})
    # an explicit choice is kept
    e = experiment_from_dict({"scenarios": [{"activation": "tanh", "scheme": "kumar", "params": {"activation": "sigmoid"}}]})
    assert dict(e.scenarios[0].params)["activation"] == "sigmoid"
    # the real registry's parameter errors come back with the key path
    with pytest.raises(InitlabError, match=r"^scenarios\[0\]\.params\.gian: unknown parameter 'gian' .*did you mean 'gain'"):
        experiment_from_dict({"scenarios": [{"activation": "tanh", "scheme": "xavier_normal", "params": {"gian": 2.0}}]})


@pytest.mark.skipif(importlib.util.find_spec("initlab._schemes") is None, reason="scheme registry not installed")
def test_presets_use_registered_schemes():
    import initlab

    valid = set(initlab.schemes()) | {"auto", "lsuv"}
    for name in preset_names():
        assert {s.scheme for s in load_experiment(name).scenarios} <= valid
    with pytest.raises(InitlabError, match=r"unknown scheme 'xavier_norml'; did you mean 'xavier_normal'\?"):
        experiment_from_dict({"scenarios": [{"activation": "relu", "scheme": "xavier_norml"}]})


# ----------------------------------------------------------------------------- dataclasses, fingerprint, overrides


def test_dataclasses_validate_directly():
    with pytest.raises(InitlabError, match=r"^train\.lr: expected a number, got 'fast'$"):
        TrainSpec(lr="fast")  # type: ignore[arg-type]
    assert TrainSpec(seeds=3).seeds == (0, 1, 2)  # type: ignore[arg-type]
    assert ModelSpec(widths=[784, 10]).widths == (784, 10)  # type: ignore[arg-type]
    s = Scenario("x", "ReLU", "normal", (("std", 2.0),))
    assert s.activation == "relu" and s.params == (("std", 2.0),)
    with pytest.raises(InitlabError, match=r"scenario 'x'\.activation: unknown activation"):
        Scenario("x", "rleu", "normal")
    with pytest.raises(InitlabError, match=r"scenarios\[0\]\.widths\[0\]: expected 784"):
        Experiment("e", "", DataSpec(), ModelSpec(), TrainSpec(), (Scenario("x", "relu", "normal", (), ModelSpec(widths=(64, 10))),))


def test_frozen_hashable_picklable():
    e = load_experiment("classic")
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.train.lr = 0.1  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(e)) == e
    assert hash(e) == hash(load_experiment("classic"))
    assert len({s.model for s in e.scenarios}) == 1


def test_fingerprint():
    e = load_experiment("classic")
    f = config_fingerprint(e)
    assert len(f) == 64 and f == config_fingerprint(load_experiment("classic"))
    # labels and the device do not change results
    assert config_fingerprint(with_overrides(e, {"name": "mine", "description": "x", "train.device": "cuda"})) == f
    # anything else does
    for key, value in [("train.steps", 999), ("train.seeds", [0, 1]), ("data.split_seed", 1), ("data.standardize", True),
                       ("model.widths", [784, 50, 50, 10]), ("train.lr", 0.002)]:
        assert config_fingerprint(with_overrides(e, {key: value})) != f, key
    renamed = dataclasses.replace(e, scenarios=(dataclasses.replace(e.scenarios[0], name="other"),) + e.scenarios[1:])
    assert config_fingerprint(renamed) != f


def test_with_overrides():
    e = load_experiment("smoke")
    e2 = with_overrides(e, {"train.steps": 200, "train.log_every": 50, "data.root": "/data/mnist", "model.hidden": [30]})
    assert e2.train.steps == 200 and e2.data.root == "/data/mnist"
    assert all(s.model.widths == (784, 30, 10) for s in e2.scenarios)  # scenarios follow the base model
    assert e2.scenarios[0].name == e.scenarios[0].name
    with pytest.raises(InitlabError, match=r"train\.stesp: unknown key 'stesp'; did you mean 'steps'\?"):
        with_overrides(e, {"train.stesp": 5})
    with pytest.raises(InitlabError, match=r"unknown override section 'trian'"):
        with_overrides(e, {"trian.steps": 5})
    with pytest.raises(InitlabError, match=r"train\.steps: expected an integer"):
        with_overrides(e, {"train.steps": "many"})


def test_canonical_dict_is_explicit():
    d = experiment_to_dict(load_experiment("classic"))
    assert set(d) == {"name", "description", "data", "model", "train", "scenarios"}
    assert set(d["train"]) == {"optimizer", "lr", "batch_size", "steps", "log_every", "first_pass_batch", "device", "seeds",
                               "histograms_every"}
    assert set(d["data"]) == {"name", "root", "standardize", "test_fraction", "split_seed", "limit"}


def test_data_spec_feeds_the_loader():
    from initlab.lab.data import load_dataset

    e = experiment_from_dict({"data": {"limit": 300, "test_fraction": 0.1}, "scenarios": ONE})
    d = load_dataset(e.data)
    assert len(d.y_test) == 30 and d.x_train.shape[1] == e.model.widths[0]


def test_docstring_schema_example_is_valid():
    # the schema in the module docstring parses and validates (it is what users copy)
    doc = C.__doc__
    start = doc.index('name = "classic"')
    end = doc.index("Validation errors")
    text = "\n".join(line[4:] if line.startswith("    ") else line for line in doc[start:end].splitlines())
    e = experiment_from_dict(tomllib.loads(text))
    assert e.name == "classic" and len(e.scenarios) == 1 + 2 * 2 * 3
