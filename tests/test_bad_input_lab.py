"""Bad input to the lab, by the table: experiment configs (dicts and TOML: every key, wrong types,
out-of-range values, unknown names), ``load_dataset``, the model builders, ``run_experiment``'s
arguments, ``with_overrides`` and the commands ``initlab run``, ``presets`` and ``report``.

Each case must end in a clear error (an ``InitlabError`` whose message holds the case's needles: the
key or argument, the bad value and, for names, the valid choices; on the command line exit status 2
with one ``initlab: error:`` line and no traceback) or in a correct result (checked). Never a raw
traceback, a hang or a silent wrong result. The last test prints the counts.
"""
from __future__ import annotations

import copy
import math
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from initlab._errors import InitlabError
from initlab.cli import main
from initlab.lab.config import experiment_from_dict, load_experiment, with_overrides
from initlab.lab.data import load_dataset
from initlab.lab.models import build_model, cnn, mlp
from initlab.lab.run import run_experiment
from initlab.lab.specs import ModelSpec

OUTCOMES: Counter = Counter()


@dataclass
class Case:
    id: str
    call: Callable[[Path], Any]  # gets a scratch folder
    needles: tuple[str, ...] = ()  # must appear in the error
    check: Callable[[Any], bool] | None = None  # a result counts as correct when this holds


# ----------------------------------------------------------------------------- experiment configs

BASE: dict[str, Any] = {
    "name": "bad", "data": {"name": "mnist", "limit": 200},
    "model": {"widths": [784, 8, 10]},
    "train": {"steps": 2, "log_every": 1, "seeds": [0], "first_pass_batch": 10},
    "scenarios": [{"activation": "relu", "scheme": "he_normal"}],
}
DELETE = object()


def patched(changes: dict[str, Any]) -> dict[str, Any]:
    """BASE with dotted keys set (``"train.lr"``; ``"scenarios[0].scheme"``), or removed with DELETE."""
    d = copy.deepcopy(BASE)
    for key, value in changes.items():
        node: Any = d
        parts = key.replace("]", "").replace("[", ".").split(".")
        for p in parts[:-1]:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        last = parts[-1]
        if value is DELETE:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return d


def cfg(id: str, changes: dict[str, Any], *needles: str) -> Case:
    return Case(f"config:{id}", lambda tmp: experiment_from_dict(patched(changes)), needles)


NAN, INF = float("nan"), float("inf")
CONFIG_CASES = [
    cfg("unknown top key", {"nme": "x"}, "unknown key 'nme'", "did you mean 'name'"),
    cfg("name int", {"name": 5}, "name", "5"),
    cfg("name empty", {"name": ""}, "name", "''"),
    cfg("description list", {"description": ["a"]}, "description", "['a']"),
    cfg("data not a table", {"data": "mnist"}, "data", "'mnist'"),
    cfg("model not a table", {"model": [784, 10]}, "model", "[784, 10]"),
    cfg("train not a table", {"train": 3}, "train", "3"),
    cfg("scenarios a table", {"scenarios": {"activation": "relu"}}, "scenarios", "tables"),
    cfg("scenarios empty", {"scenarios": []}, "scenarios", "no scenarios"),
    cfg("scenario a string", {"scenarios": ["relu"]}, "scenarios[0]", "'relu'"),
    cfg("grid a list", {"grid": ["relu"]}, "grid", "['relu']"),
    # [data]
    cfg("data.name typo", {"data.name": "mnits"}, "data.name", "'mnits'", "did you mean 'mnist'"),
    cfg("data.name int", {"data.name": 3}, "data.name", "3"),
    cfg("data.root int", {"data.root": 5}, "data.root", "5"),
    cfg("data.standardize str", {"data.standardize": "yes"}, "data.standardize", "'yes'"),
    cfg("data.test_fraction 0", {"data.test_fraction": 0}, "data.test_fraction", "0"),
    cfg("data.test_fraction 1", {"data.test_fraction": 1}, "data.test_fraction", "1"),
    cfg("data.test_fraction 1.5", {"data.test_fraction": 1.5}, "data.test_fraction", "1.5"),
    cfg("data.test_fraction -0.1", {"data.test_fraction": -0.1}, "data.test_fraction", "-0.1"),
    cfg("data.test_fraction str", {"data.test_fraction": "0.2"}, "data.test_fraction", "'0.2'"),
    cfg("data.test_fraction nan", {"data.test_fraction": NAN}, "data.test_fraction", "nan"),
    cfg("data.split_seed -1", {"data.split_seed": -1}, "data.split_seed", "-1"),
    cfg("data.split_seed 1.5", {"data.split_seed": 1.5}, "data.split_seed", "1.5"),
    cfg("data.limit -5", {"data.limit": -5}, "data.limit", "-5"),
    cfg("data.limit str", {"data.limit": "all"}, "data.limit", "'all'"),
    cfg("data unknown key", {"data.seed": 1}, "data.seed", "unknown key 'seed'", "Valid keys", "split_seed"),
    # [model]
    cfg("model.kind rnn", {"model.kind": "rnn"}, "model.kind", "'rnn'", "cnn, mlp"),
    cfg("model.kind int", {"model.kind": 3}, "model.kind", "3"),
    cfg("model.widths one", {"model.widths": [784]}, "model.widths", "[784]"),
    cfg("model.widths zero", {"model.widths": [784, 0, 10]}, "model.widths[1]", "0"),
    cfg("model.widths negative", {"model.widths": [784, -1, 10]}, "model.widths[1]", "-1"),
    cfg("model.widths float", {"model.widths": [784, 8.5, 10]}, "model.widths[1]", "8.5"),
    cfg("model.widths bool", {"model.widths": [784, True, 10]}, "model.widths[1]", "True"),
    cfg("model.widths str", {"model.widths": "784,10"}, "model.widths", "'784,10'"),
    cfg("model.widths input", {"model.widths": [783, 8, 10]}, "widths[0]", "783", "784"),
    cfg("model.widths classes", {"model.widths": [784, 8, 9]}, "widths[-1]", "9", "10"),
    cfg("model.hidden str", {"model.widths": DELETE, "model.hidden": "8"}, "model.hidden", "'8'"),
    cfg("model.hidden zero", {"model.widths": DELETE, "model.hidden": [0]}, "model.hidden[0]", "0"),
    cfg("model widths and hidden", {"model.hidden": [8]}, "model", "widths or hidden"),
    cfg("model.bias str", {"model.bias": "yes"}, "model.bias", "'yes'"),
    cfg("model.channels with mlp", {"model.channels": [4]}, "model.channels", "cnn"),
    cfg("model.kernel with mlp", {"model.kernel": 5}, "model.kernel", "cnn"),
    cfg("model cnn without channels", {"model.kind": "cnn"}, "model.channels", "cnn"),
    cfg("model cnn kernel 0", {"model.kind": "cnn", "model.channels": [4], "model.kernel": 0}, "model.kernel", "0"),
    cfg("model cnn channels -1", {"model.kind": "cnn", "model.channels": [-1]}, "model.channels[0]", "-1"),
    cfg("model unknown key", {"model.width": 8}, "model.width", "unknown key", "did you mean"),
    # [train]
    cfg("train.optimizer adamw", {"train.optimizer": "adamw"}, "train.optimizer", "'adamw'", "adam, sgd"),
    cfg("train.optimizer int", {"train.optimizer": 3}, "train.optimizer", "3"),
    cfg("train.lr 0", {"train.lr": 0}, "train.lr", "0"),
    cfg("train.lr negative", {"train.lr": -1e-3}, "train.lr", "-0.001"),
    cfg("train.lr str", {"train.lr": "fast"}, "train.lr", "'fast'"),
    cfg("train.lr inf", {"train.lr": INF}, "train.lr", "inf"),
    cfg("train.lr nan", {"train.lr": NAN}, "train.lr", "nan"),
    cfg("train.lr bool", {"train.lr": True}, "train.lr", "True"),
    cfg("train.batch_size 0", {"train.batch_size": 0}, "train.batch_size", "0"),
    cfg("train.batch_size float", {"train.batch_size": 2.5}, "train.batch_size", "2.5"),
    cfg("train.batch_size str", {"train.batch_size": "30"}, "train.batch_size", "'30'"),
    cfg("train.steps 0", {"train.steps": 0}, "train.steps", "0"),
    cfg("train.steps negative", {"train.steps": -1}, "train.steps", "-1"),
    cfg("train.log_every 0", {"train.log_every": 0}, "train.log_every", "0"),
    cfg("train.log_every > steps", {"train.log_every": 5}, "train.log_every", "5", "train.steps"),
    cfg("train.first_pass_batch 0", {"train.first_pass_batch": 0}, "train.first_pass_batch", "0"),
    cfg("train.device tpu", {"train.device": "tpu"}, "train.device", "'tpu'"),
    cfg("train.device cuda:x", {"train.device": "cuda:x"}, "train.device", "'cuda:x'"),
    cfg("train.device int", {"train.device": 5}, "train.device", "5"),
    cfg("train.device empty", {"train.device": ""}, "train.device", "''"),
    cfg("train.seeds 0", {"train.seeds": 0}, "train.seeds", "0"),
    cfg("train.seeds empty", {"train.seeds": []}, "train.seeds", "[]"),
    cfg("train.seeds negative", {"train.seeds": [-1]}, "train.seeds[0]", "-1"),
    cfg("train.seeds twice", {"train.seeds": [0, 0]}, "train.seeds", "seed 0 appears twice"),
    cfg("train.seeds str", {"train.seeds": "0,1"}, "train.seeds", "'0,1'"),
    cfg("train.seeds float", {"train.seeds": [0.5]}, "train.seeds[0]", "0.5"),
    cfg("train unknown key", {"train.epochs": 3}, "train.epochs", "unknown key"),
    # [[scenarios]]
    cfg("scenario no activation", {"scenarios[0].activation": DELETE}, "scenarios[0].activation", "missing"),
    cfg("scenario no scheme", {"scenarios[0].scheme": DELETE}, "scenarios[0].scheme", "missing"),
    cfg("scenario activation typo", {"scenarios[0].activation": "sigmod"}, "scenarios[0].activation", "'sigmod'",
        "did you mean 'sigmoid'"),
    cfg("scenario activation int", {"scenarios[0].activation": 3}, "scenarios[0].activation", "3"),
    cfg("scenario scheme typo", {"scenarios[0].scheme": "he_nromal"}, "scenarios[0].scheme", "'he_nromal'",
        "did you mean 'he_normal'"),
    cfg("scenario scheme int", {"scenarios[0].scheme": 5}, "scenarios[0].scheme", "5"),
    cfg("scenario params str", {"scenarios[0].params": "x"}, "scenarios[0].params", "'x'"),
    cfg("scenario params unknown", {"scenarios[0].params": {"nope": 1}}, "scenarios[0].params.nope", "'nope'",
        "Valid parameters"),
    cfg("scenario params wrong type", {"scenarios[0].scheme": "normal", "scenarios[0].params": {"std": "big"}},
        "scenarios[0].params", "'big'"),
    cfg("scenario params nan", {"scenarios[0].scheme": "normal", "scenarios[0].params": {"std": NAN}},
        "scenarios[0].params.std", "nan"),
    cfg("scenario name bad chars", {"scenarios[0].name": "a b/c"}, "scenarios[0].name", "'a b/c'"),
    cfg("scenario name empty", {"scenarios[0].name": ""}, "scenarios[0].name", "''"),
    cfg("scenario name int", {"scenarios[0].name": 7}, "scenarios[0].name", "7"),
    cfg("scenario names twice", {"scenarios": [{"activation": "relu", "scheme": "he_normal"}] * 2},
        "duplicate scenario name", "'relu-he_normal'"),
    cfg("scenario widths and depth", {"scenarios[0].widths": [784, 8, 10], "scenarios[0].depth": 2},
        "scenarios[0]", "widths or depth/width"),
    cfg("scenario depth 0", {"scenarios[0].depth": 0}, "scenarios[0].depth", "0"),
    cfg("scenario depth str", {"scenarios[0].depth": "3"}, "scenarios[0].depth", "'3'"),
    cfg("scenario width -1", {"scenarios[0].width": -1}, "scenarios[0].width", "-1"),
    cfg("scenario widths input", {"scenarios[0].widths": [100, 8, 10]}, "scenarios[0].widths[0]", "100", "784"),
    cfg("scenario unknown key", {"scenarios[0].act": "relu"}, "scenarios[0].act", "unknown key",
        "Valid keys", "activation"),
    # [grid]
    cfg("grid no activations", {"grid": {"schemes": ["he_normal"]}}, "grid.activations", "missing"),
    cfg("grid no schemes", {"grid": {"activations": ["relu"]}}, "grid.schemes", "missing"),
    cfg("grid activations str", {"grid": {"activations": "relu", "schemes": ["he_normal"]}}, "grid.activations",
        "'relu'"),
    cfg("grid activations empty", {"grid": {"activations": [], "schemes": ["he_normal"]}}, "grid.activations",
        "non-empty"),
    cfg("grid scheme unknown", {"grid": {"activations": ["relu"], "schemes": ["nope"]}}, "grid.schemes[0]",
        "'nope'", "Valid schemes"),
    cfg("grid depths 0", {"grid": {"activations": ["relu"], "schemes": ["he_normal"], "depths": [0]}},
        "grid.depths[0]", "0"),
    cfg("grid widths str", {"grid": {"activations": ["relu"], "schemes": ["he_normal"], "widths": ["a"]}},
        "grid.widths[0]", "'a'"),
    cfg("grid unknown key", {"grid": {"activations": ["relu"], "schemes": ["he_normal"], "depth": [2]}},
        "grid.depth", "unknown key", "did you mean 'depths'"),
    cfg("grid params unknown", {"grid": {"activations": ["relu"], "schemes": ["he_normal"], "params": {"x": 1}}},
        "grid.params.x", "'x'"),
]


# ----------------------------------------------------------------------------- TOML files


def toml(id: str, text: bytes | str | None, *needles: str, name: str = "exp.toml") -> Case:
    def call(tmp: Path) -> Any:
        p = tmp / name
        if isinstance(text, str):
            p.write_text(text)
        elif isinstance(text, bytes):
            p.write_bytes(text)
        return load_experiment(p)

    return Case(f"toml:{id}", call, needles)


GOOD_TOML = 'name = "t"\n[[scenarios]]\nactivation = "relu"\nscheme = "he_normal"\n'
TOML_CASES = [
    toml("missing file", None, "exp.toml", "not found"),
    toml("empty file", "", "exp.toml", "no scenarios"),
    toml("malformed", 'name = "x"\n[train\nsteps = 3\n', "exp.toml", "line 2", "malformed TOML"),
    toml("unclosed string", 'name = "x\n', "exp.toml", "line 1", "malformed TOML"),
    toml("duplicate key", 'name = "a"\nname = "b"\n', "exp.toml", "malformed TOML"),
    toml("not utf-8", b'name = "\xff\xfe"\n', "exp.toml", "not UTF-8"),
    toml("binary", b"\x00\x01\x02\x03", "exp.toml"),
    toml("lr as string", GOOD_TOML + '[train]\nlr = "fast"\n', "exp.toml", "train.lr", "'fast'"),
    toml("steps as float", GOOD_TOML + "[train]\nsteps = 2.5\n", "exp.toml", "train.steps", "2.5"),
    toml("seeds as table", GOOD_TOML + "[train.seeds]\na = 1\n", "exp.toml", "train.seeds", "{'a': 1}"),
    toml("scenarios as table", 'name = "x"\n[scenarios]\nactivation = "relu"\n', "exp.toml", "scenarios"),
    toml("unknown section", GOOD_TOML + "[optim]\nlr = 1\n", "exp.toml", "unknown key 'optim'"),
    toml("a folder", None, "is a folder", name="folder.toml"),
]


def _folder_toml(tmp: Path) -> Any:
    (tmp / "folder.toml").mkdir()
    return load_experiment(tmp / "folder.toml")


TOML_CASES[-1] = Case("toml:a folder", _folder_toml, ("folder.toml", "is a folder"))


# ----------------------------------------------------------------------------- load_dataset


def data(id: str, *args: Any, needles: tuple[str, ...] = (), check: Callable[[Any], bool] | None = None,
         **kwargs: Any) -> Case:
    return Case(f"load_dataset:{id}", lambda tmp: load_dataset(*args, **kwargs), needles, check)


def _is_digits_or_missing(ds: Any) -> bool:
    return ds.x_train.shape[1] == 64


DATA_CASES = [
    data("unknown name", "mnits", needles=("'mnits'", "did you mean 'mnist'")),
    data("name int", 5, needles=("data", "int", "5")),
    data("name list", ["mnist"], needles=("data", "['mnist']")),
    data("limit -1", "mnist", limit=-1, needles=("data.limit", "-1")),
    data("limit str", "mnist", limit="x", needles=("data.limit", "'x'")),
    data("limit 3", "mnist", limit=3, needles=("data.limit", "3", "empty")),
    data("n -5", "mnist", n=-5, needles=("data.limit", "-5")),
    data("test_fraction 0", "mnist", test_fraction=0, needles=("data.test_fraction", "0")),
    data("test_fraction 2", "mnist", test_fraction=2, needles=("data.test_fraction", "2")),
    data("seed -1", "mnist", seed=-1, needles=("data.split_seed", "-1")),
    data("unknown option", "mnist", foo=1, needles=("'foo'", "Valid data options")),
    data("flat str", "mnist", flat="no", needles=("flat", "'no'")),
    data("download str", "mnist", download="yes", needles=("download", "'yes'")),
    data("standardize str", "mnist", standardize="yes", needles=("data.standardize", "'yes'")),
    data("root missing", "mnist", root="/nonexistent/initlab-mnist", needles=("/nonexistent/initlab-mnist", "not found")),
    data("mnist_idx without root", "mnist_idx", needles=("mnist_idx", "data.root")),
    data("gaussian limit", "gaussian", limit=100, check=lambda ds: len(ds.y_train) + len(ds.y_test) == 100),
    data("digits", "digits", needles=("scikit-learn",), check=_is_digits_or_missing),
]


# ----------------------------------------------------------------------------- model builders


def model(id: str, fn: Callable[[], Any], *needles: str, check: Callable[[Any], bool] | None = None) -> Case:
    return Case(f"models:{id}", lambda tmp: fn(), needles, check)


def _n_linear(m: Any) -> int:
    return sum(isinstance(x, torch.nn.Linear) for x in m.modules())


MODEL_CASES = [
    model("mlp one width", lambda: mlp([784]), "widths", "[784]"),
    model("mlp zero width", lambda: mlp([784, 0, 10]), "widths[1]", "0"),
    model("mlp float width", lambda: mlp([784, 2.5, 10]), "widths[1]", "2.5"),
    model("mlp str widths", lambda: mlp("784,10"), "widths", "'784,10'"),
    model("mlp None widths", lambda: mlp(None), "widths", "None"),
    model("mlp activation typo", lambda: mlp([784, 10, 10], "sigmod"), "'sigmod'", "did you mean 'sigmoid'"),
    model("mlp activation int", lambda: mlp([784, 10, 10], 3), "activation", "3"),
    model("mlp param on relu", lambda: mlp([784, 10, 10], "relu", param=0.1), "'relu'", "param"),
    model("mlp param str", lambda: mlp([784, 10, 10], "leaky_relu", param="x"), "parameter", "'x'"),
    model("mlp no activation", lambda: mlp([784, 10, 10], None), check=lambda m: _n_linear(m) == 2),
    model("cnn no channels", lambda: cnn([]), "channels", "[]"),
    model("cnn zero channels", lambda: cnn([0]), "channels[0]", "0"),
    model("cnn kernel 0", lambda: cnn([4], kernel=0), "kernel", "0"),
    model("cnn kernel float", lambda: cnn([4], kernel=2.5), "kernel", "2.5"),
    model("cnn in_shape 2d", lambda: cnn([4], in_shape=(1, 28)), "in_shape", "28"),
    model("cnn in_shape 4d", lambda: cnn([4], in_shape=(1, 28, 28, 3)), "in_shape", "(1, 28, 28, 3)"),
    model("cnn activation", lambda: cnn([4], activation="nope"), "'nope'", "Valid activations"),
    model("cnn n_classes 0", lambda: cnn([4], n_classes=0), "n_classes", "0"),
    model("cnn bias str", lambda: cnn([4], bias="no"), "bias", "'no'"),
    model("cnn big kernel", lambda: cnn([4], kernel=29), check=lambda m: m(torch.zeros(2, 784)).shape == (2, 10)),
    model("build_model str spec", lambda: build_model("mlp", "relu"), "spec", "ModelSpec", "'mlp'"),
    model("build_model None spec", lambda: build_model(None, "relu"), "spec", "ModelSpec", "None"),
    model("build_model activation", lambda: build_model(ModelSpec(), "bad"), "'bad'", "Valid activations"),
    model("ModelSpec kind", lambda: ModelSpec(kind="transformer"), "model.kind", "'transformer'", "cnn, mlp"),
    model("ModelSpec cnn not square", lambda: ModelSpec(kind="cnn", widths=(785, 10), channels=(4,)),
          "model.widths[0]", "785", "square"),
]


# ----------------------------------------------------------------------------- run_experiment and with_overrides


def _exp() -> Any:
    return experiment_from_dict(BASE)


def runexp(id: str, *needles: str, exp: Any = None, out: Any = "OUT", **kwargs: Any) -> Case:
    def call(tmp: Path) -> Any:
        o = tmp / "run" if out == "OUT" else out
        try:
            return run_experiment(_exp() if exp is None else exp, o, **kwargs)
        finally:
            assert not (tmp / "run").exists(), "a refused run wrote its folder"

    return Case(f"run_experiment:{id}", call, needles)


def override(id: str, overrides: Any, *needles: str) -> Case:
    return Case(f"with_overrides:{id}", lambda tmp: with_overrides(_exp(), overrides), needles)


RUN_CASES = [
    runexp("exp a preset name", "exp", "Experiment", "'classic'", exp="classic"),
    runexp("exp a dict", "exp", "Experiment", exp={"name": "x"}),
    runexp("out None", "out_dir", "None", out=None),
    runexp("out int", "out_dir", "123", out=123),
    runexp("out empty", "out_dir", "''", out=""),
    runexp("out NUL", "output path", "NUL", out="bad\x00dir"),
    runexp("resume str", "resume", "'no'", resume="no"),
    runexp("report str", "report", "'no'", report="no"),
    runexp("download int", "download", "1", download=1),
    runexp("progress str", "progress", "'yes'", progress="yes"),
    runexp("executor object", "executor", "map", executor=object()),
    runexp("data str", "data", "'mnist'", data="mnist"),
    runexp("data array", "data", "ndarray", data=np.zeros(3)),
    runexp("max_members 0", "max_members", "0", max_members=0),
    runexp("max_members bool", "max_members", "True", max_members=True),
    runexp("max_members float", "max_members", "2.5", max_members=2.5),
    runexp("checkpoint_every negative", "checkpoint_every", "-1", checkpoint_every=-1),
    runexp("checkpoint_every nan", "checkpoint_every", "nan", checkpoint_every=math.nan),
    runexp("checkpoint_every str", "checkpoint_every", "'5'", checkpoint_every="5"),
    runexp("too big for memory", "model.widths", "GiB", exp=with_overrides(_exp(), {"model.widths": [784, 10 ** 9, 10]})),
    override("unknown section", {"optim.lr": 1}, "'optim'", "data, model, train"),
    override("unknown key", {"train.lrr": 1}, "train.lrr", "did you mean 'lr'"),
    override("bad value", {"train.steps": "ten"}, "train.steps", "'ten'"),
    override("bad top key", {"seeds": 3}, "'seeds'", "train.<key>"),
    override("not a mapping", [("train.steps", 3)], "overrides", "mapping"),
    override("name int", {"name": 5}, "name", "5"),
]


# ----------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    run_experiment(experiment_from_dict(BASE), out)
    return out


def _one_error_line(err: str) -> bool:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("initlab: error: ")]
    usage = [ln for ln in lines if ln not in errors]
    return len(errors) == 1 and all(ln.startswith(("usage:", " ")) for ln in usage)


@dataclass
class CliResult:
    rc: int
    out: str
    err: str


def cli(id: str, argv: Callable[[Path, Path], list[str]], *needles: str,
        setup: Callable[[Path, Path], None] | None = None, check: Callable[[CliResult], bool] | None = None) -> Case:
    """``initlab ARGV``: argv and setup get a scratch folder and a copy of a finished run directory."""
    return Case(f"cli:{id}", ("CLI", argv, setup), needles, check)  # type: ignore[arg-type]


def _write(rel: str, data: bytes | str) -> Callable[[Path, Path], None]:
    def setup(tmp: Path, run: Path) -> None:
        p = run / rel
        if isinstance(data, str):
            p.write_text(data)
        else:
            p.write_bytes(data)
    return setup


def _replace_by_folder(rel: str) -> Callable[[Path, Path], None]:
    def setup(tmp: Path, run: Path) -> None:
        p = run / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink()
        p.mkdir()
        (p / "x").write_text("x")
    return setup


def _replace_by_file(rel: str) -> Callable[[Path, Path], None]:
    def setup(tmp: Path, run: Path) -> None:
        p = run / rel
        shutil.rmtree(p)
        p.write_text("x")
    return setup


def _exp_toml(tmp: Path) -> str:
    p = tmp / "e.toml"
    p.write_text('name = "e"\n[data]\nlimit = 200\n[train]\nsteps = 2\nlog_every = 1\nseeds = [0]\n'
                 'first_pass_batch = 10\n[model]\nwidths = [784, 8, 10]\n[[scenarios]]\nactivation = "relu"\n'
                 'scheme = "he_normal"\n')
    return str(p)


CLI_CASES = [
    cli("run without experiment", lambda t, r: ["run"], "PRESET_OR_TOML", "required"),
    cli("run unknown preset", lambda t, r: ["run", "smok", "--out", str(t / "o")], "'smok'", "did you mean 'smoke'"),
    cli("run missing toml", lambda t, r: ["run", str(t / "nope.toml")], "nope.toml", "not found"),
    cli("run steps 0", lambda t, r: ["run", "smoke", "--steps", "0"], "--steps", "positive integer", "0"),
    cli("run steps -1", lambda t, r: ["run", "smoke", "--steps", "-1"], "--steps", "-1"),
    cli("run steps abc", lambda t, r: ["run", "smoke", "--steps", "abc"], "--steps", "'abc'"),
    cli("run steps 1.5", lambda t, r: ["run", "smoke", "--steps", "1.5"], "--steps", "'1.5'"),
    cli("run seeds 0", lambda t, r: ["run", "smoke", "--seeds", "0"], "--seeds", "0"),
    cli("run seeds x", lambda t, r: ["run", "smoke", "--seeds", "x"], "--seeds", "'x'"),
    cli("run seeds too many", lambda t, r: ["run", _exp_toml(t), "--seeds", "100000", "--out", str(t / "o")],
        "GiB", "fewer seeds"),
    cli("run device tpu", lambda t, r: ["run", "smoke", "--device", "tpu", "--out", str(t / "o")], "train.device",
        "'tpu'"),
    cli("run data-root missing", lambda t, r: ["run", "smoke", "--data-root", str(t / "no"), "--out", str(t / "o")],
        "--data-root", "does not exist"),
    cli("run data-root a file", lambda t, r: ["run", "smoke", "--data-root", _exp_toml(t), "--out", str(t / "o")],
        "--data-root", "e.toml", "not a folder"),
    cli("run download without root", lambda t, r: ["run", "smoke", "--download", "--out", str(t / "o")],
        "--download needs --data-root"),
    cli("run out is a file", lambda t, r: ["run", _exp_toml(t), "--out", str(r / "config.toml")], "config.toml",
        "not a directory"),
    cli("run out under a file", lambda t, r: ["run", _exp_toml(t), "--out", str(r / "config.toml" / "x")],
        "config.toml", "is a file"),
    cli("run out empty", lambda t, r: ["run", "smoke", "--out", ""], "--out", "''"),
    cli("run out another experiment", lambda t, r: ["run", "smoke", "--out", str(r)], "holds another experiment"),
    cli("run fresh another experiment", lambda t, r: ["run", "smoke", "--fresh", "--out", str(r)],
        "holds another experiment"),
    cli("run out not a run", lambda t, r: ["run", _exp_toml(t), "--out", str(r / "parts")],
        "not an initlab run directory"),
    cli("run unknown flag", lambda t, r: ["run", "smoke", "--bogus"], "unrecognized arguments", "--bogus"),
    cli("run a folder as toml", lambda t, r: ["run", str(r) + "/"], "is a folder"),
    cli("presets extra argument", lambda t, r: ["presets", "classic"], "unrecognized arguments", "classic"),
    cli("presets unknown flag", lambda t, r: ["presets", "--all"], "unrecognized arguments", "--all"),
    cli("presets", lambda t, r: ["presets"], check=lambda res: res.rc == 0 and "classic" in res.out),
    cli("report without folder", lambda t, r: ["report"], "RUN_DIR", "required"),
    cli("report missing folder", lambda t, r: ["report", str(t / "nope")], "nope", "does not exist"),
    cli("report a file", lambda t, r: ["report", str(r / "metrics.csv")], "metrics.csv", "not a directory"),
    cli("report empty folder", lambda t, r: ["report", str(t)], "no config.toml"),
    cli("report no metrics", lambda t, r: ["report", str(r)], "no metrics.csv", setup=lambda t, r: (r / "metrics.csv").unlink()),
    cli("report config not utf-8", lambda t, r: ["report", str(r)], "config.toml", "not UTF-8",
        setup=_write("config.toml", b"\xff\xfe")),
    cli("report config malformed", lambda t, r: ["report", str(r)], "config.toml", "malformed TOML",
        setup=_write("config.toml", "[[[")),
    cli("report metrics binary", lambda t, r: ["report", str(r)], "metrics.csv", setup=_write("metrics.csv", b"\xff\x00\x01")),
    cli("report metrics columns", lambda t, r: ["report", str(r)], "metrics.csv", "missing column",
        setup=_write("metrics.csv", "a,b\n1,2\n")),
    cli("report metrics value", lambda t, r: ["report", str(r)], "metrics.csv", "'abc'",
        setup=lambda t, r: (r / "metrics.csv").write_text((r / "metrics.csv").read_text() + "relu-he_normal,0,2,test,loss,abc\n")),
    cli("report metrics step", lambda t, r: ["report", str(r)], "metrics.csv", "step", "'x'",
        setup=lambda t, r: (r / "metrics.csv").write_text((r / "metrics.csv").read_text() + "relu-he_normal,0,x,test,acc,0.5\n")),
    cli("report first_pass columns", lambda t, r: ["report", str(r)], "first_pass.csv", "missing column",
        setup=_write("first_pass.csv", "a,b\n1,2\n")),
    cli("report values.npz", lambda t, r: ["report", str(r)], "values.npz", "delete the folder",
        setup=_write("parts/relu-he_normal/seed0/values.npz", b"not a zip")),
    cli("report page is a folder", lambda t, r: ["report", str(r)], "report.html", "a folder is where a file should be",
        setup=_replace_by_folder("report.html")),
    cli("report figures is a file", lambda t, r: ["report", str(r)], "figures", setup=_replace_by_file("figures")),
    cli("report unknown flag", lambda t, r: ["report", str(r), "--pdf"], "unrecognized arguments", "--pdf"),
]


# ----------------------------------------------------------------------------- running the cases

CASES = CONFIG_CASES + TOML_CASES + DATA_CASES + MODEL_CASES + RUN_CASES + CLI_CASES


def _run_cli(case: Case, tmp: Path, finished: Path, capsys) -> Any:
    _, argv_fn, setup = case.call  # type: ignore[misc]
    run = tmp / "run"
    shutil.copytree(finished, run)
    if setup is not None:
        setup(tmp, run)
    argv = argv_fn(tmp, run)
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code if isinstance(e.code, int) else 2
    captured = capsys.readouterr()
    return CliResult(int(rc), captured.out, captured.err)


def judge(case: Case, tmp: Path, finished: Path, capsys) -> tuple[str, str]:
    """("clear" | "correct" | "bad", why) for one case."""
    try:
        result = _run_cli(case, tmp, finished, capsys) if isinstance(case.call, tuple) else case.call(tmp)
    except InitlabError as e:
        missing = [n for n in case.needles if n not in str(e)]
        return ("bad", f"message lacks {missing}: {e}") if missing else ("clear", str(e))
    except Exception as e:  # noqa: BLE001 - anything else is a raw traceback
        return "bad", f"raw {type(e).__name__}: {e}"
    if isinstance(result, CliResult) and result.rc == 2:
        if "Traceback" in result.err or not _one_error_line(result.err):
            return "bad", f"not one error line: {result.err!r}"
        missing = [n for n in case.needles if n not in result.err]
        return ("bad", f"message lacks {missing}: {result.err}") if missing else ("clear", result.err)
    if case.check is not None and case.check(result):
        return "correct", ""
    return "bad", f"no error and no correct result: {str(result)[:200]}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path, finished_run, capsys):
    outcome, why = judge(case, tmp_path, finished_run, capsys)
    OUTCOMES[outcome] += 1
    assert outcome != "bad", f"{case.id}: {why}"


def test_bad_input_counts(capsys):
    tried = sum(OUTCOMES.values())
    with capsys.disabled():
        print(f"\nbad input (lab): {len(CASES)} distinct inputs, {tried} tried, {OUTCOMES['clear']} clear errors, "
              f"{OUTCOMES['correct']} correct results, {OUTCOMES['bad']} bad")
    assert len(CASES) >= 120 and len({c.id for c in CASES}) == len(CASES)
    assert OUTCOMES["bad"] == 0
