"""The layer table (initlab._layers), the one MLP builder, the one text-table formatter, and the
library's import structure (module-level imports, no cycles, the lab never imported)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import initlab
from initlab import _graph, _layers, _probe, _text
from initlab._activations import resolve_activation
from initlab._audit import build_mlp
from initlab.cli import main

LIB = Path(initlab.__file__).parent


# ------------------------------------------------------------------------------------------
# the layer table


def test_every_part_uses_the_one_weight_layer_table():
    assert _graph.WEIGHT_LAYERS is _layers.WEIGHT_LAYERS  # kept for code importing it from _graph
    assert set(_layers.AFFINE_LAYERS) < set(_layers.WEIGHT_LAYERS)
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Dropout(), nn.Linear(4, 2))
    rep = initlab.init_model(m, "auto", generator=torch.Generator().manual_seed(0))
    assert [(r["name"], r["scheme"]) for r in rep] == [("0", "he_normal"), ("1", "ones/zeros"), ("4", "lecun_normal")]


@pytest.mark.parametrize(("module", "facts"), [
    (nn.Linear(3, 2), {"weight", "affine", "modeled"}),
    (nn.modules.linear.NonDynamicallyQuantizableLinear(3, 2), {"weight", "affine", "modeled"}),
    (nn.ConvTranspose2d(3, 2, 3), {"weight", "affine", "modeled"}),
    (nn.Embedding(5, 3), {"weight", "modeled", "one_hot"}),
    (nn.MultiheadAttention(4, 2), {"weight", "fused"}),
    (nn.Bilinear(2, 3, 4), {"weight"}),
    (nn.LayerNorm(3), {"norm", "transparent"}),
    (nn.Dropout(), {"transparent", "plain"}),
    (nn.Identity(), {"transparent", "plain"}),
    (nn.MaxPool2d(2), {"transparent"}),  # by its defining torch module
    (nn.ZeroPad2d(1), {"transparent"}),
    (nn.PixelShuffle(2), {"transparent"}),
    (nn.ReLU(), set()),  # an activation: the activation table's, not the layer table's
    (nn.LSTM(3, 3), set()),
])
def test_layer_queries(module, facts):
    got = {name for name, query in (
        ("weight", _layers.is_weight_layer), ("norm", _layers.is_norm), ("transparent", _layers.is_transparent),
        ("plain", _layers.is_plain), ("affine", _layers.is_affine), ("modeled", _layers.is_modeled),
        ("one_hot", _layers.is_one_hot), ("fused", _layers.calls_children_functionally)) if query(module)}
    assert got == facts


def test_kind_name_is_the_table_class():
    assert _layers.kind_name(nn.modules.linear.NonDynamicallyQuantizableLinear(3, 2)) == "Linear"
    assert _layers.kind_name(nn.LSTM(3, 3)) == "LSTM"


# ------------------------------------------------------------------------------------------
# the one MLP builder


@pytest.mark.parametrize(("activation", "param"), [
    ("relu", None), ("leaky_relu", 0.2), ("prelu", 0.1), ("gelu_tanh", None), (None, None), (nn.Softplus(beta=2), None),
])
def test_mlp_is_linear_activation_linear(activation, param):
    from initlab.lab import models

    assert models.mlp is _layers.mlp and models.activation_module is _layers.activation_module  # one builder
    m = _layers.mlp([6, 5, 4, 3], activation, bias=False, param=param)
    assert [type(x) for x in m][0::2] == [nn.Linear] * 3
    assert [(x.in_features, x.out_features, x.bias) for x in m[0::2]] == [(6, 5, None), (5, 4, None), (4, 3, None)]
    act = resolve_activation(activation, param)
    for x in m[1::2]:
        assert resolve_activation(x).label == act.label
    t = torch.randn(7, 6)
    assert torch.equal(m(t), m[4](act.fn(m[2](act.fn(m[0](t))))))


def test_mlp_gives_every_layer_its_own_activation_module():
    m = _layers.mlp([4, 4, 4, 2], nn.PReLU())
    assert m[1] is not m[3] and m[1].weight is not m[3].weight


def test_audit_builds_its_mlp_with_the_library_builder():
    torch.manual_seed(0)
    a = build_mlp([6, 5, 3], "tanh")
    torch.manual_seed(0)
    b = _layers.mlp([6, 5, 3], "tanh")
    assert repr(a) == repr(b) and all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(initlab.InitlabError, match="--mlp needs at least two positive widths"):
        build_mlp([6], "tanh")
    with pytest.raises(initlab.InitlabError, match=r"widths\[1\]: expected a positive integer"):
        _layers.mlp([6, 0, 3], "tanh")


# ------------------------------------------------------------------------------------------
# the one text-table formatter


def _assert_aligned(table: str) -> None:
    """Every row fits the columns of the dashed rule under the header, with no trailing blanks."""
    lines = table.splitlines()
    rule = next(i for i, line in enumerate(lines) if line and set(line) <= {"-", " "})
    spans = [m.span() for m in re.finditer(r"-+", lines[rule])]
    for line in lines[rule - 1:rule] + lines[rule + 1:]:
        assert line == line.rstrip()
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert line[end:start].strip() == "", (line, end, start)  # the gaps between columns stay blank


def test_text_table_aligns_labels_left_and_numbers_right():
    out = _text.text_table(["name", "kind", "value"], [["a", "Linear", "1"], ["long_name", "x", "123.5"]])
    assert out.splitlines() == ["name       kind    value",
                                "---------  ------  -----",
                                "a          Linear      1",
                                "long_name  x       123.5"]
    _assert_aligned(out)
    with pytest.raises(AssertionError):  # negative control: a misaligned table is caught
        _assert_aligned("a  b\n-  -\nxyz 1")


def test_every_report_table_uses_the_one_formatter(capsys):
    assert _probe.format_table is _text.format_table  # the lab imports it from _probe
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    rep = initlab.init_model(m, "auto", generator=torch.Generator().manual_seed(0))
    x = torch.randn(32, 8)
    assert main(["gains", "relu", "tanh"]) == 0
    gains = capsys.readouterr().out.split("\n\n")[-1]
    for table in (str(rep), str(initlab.probe(m, x)), initlab.audit(m, x).table(),
                  str(initlab.lsuv_(m, x)), gains):
        _assert_aligned(table)


# ------------------------------------------------------------------------------------------
# imports


def _library_modules() -> dict[str, ast.Module]:
    files = sorted(LIB.glob("_*.py")) + [LIB / "theory.py"]
    return {p.stem: ast.parse(p.read_text(encoding="utf-8")) for p in files if p.stem not in ("__init__", "__main__")}


def _imports(tree: ast.Module) -> tuple[set[str], list[tuple[str, str]]]:
    """(library modules imported at module level, (function, import) for imports inside functions)."""
    top: set[str] = set()
    inner: list[tuple[str, str]] = []

    def visit(node: ast.AST, fn: str | None) -> None:
        for ch in ast.iter_child_nodes(node):
            if isinstance(ch, ast.If) and "TYPE_CHECKING" in ast.unparse(ch.test):
                continue
            name = ch.name if isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef)) else fn
            if isinstance(ch, (ast.Import, ast.ImportFrom)):
                if fn is not None:
                    inner.append((fn, ast.unparse(ch)))
                elif isinstance(ch, ast.ImportFrom) and ch.level:
                    top.update([ch.module.split(".")[0]] if ch.module else [a.name for a in ch.names])
            visit(ch, name)

    visit(tree, None)
    return top, inner


HEAVY_OPTIONAL = ("pandas", "matplotlib", "tensorboard", "tqdm", "sklearn", "ray",
                  "torchvision", "timm", "transformers")  # the survey's model libraries (the models extra)


def test_library_imports_are_module_level_and_acyclic():
    mods = _library_modules()
    graph = {}
    for name, tree in mods.items():
        top, inner = _imports(tree)
        graph[name] = top & set(mods)
        assert "lab" not in top, f"{name} imports initlab.lab"
        for fn, stmt in inner:  # only heavy optional packages, and the one MNIST loader of the audit CLI
            ok = any(re.search(rf"\b{pkg}\b", stmt) for pkg in HEAVY_OPTIONAL) or (name, fn) == ("_audit", "_mnist")
            assert ok, f"{name}.{fn}: function-level import {stmt!r}"

    def cycle_from(start: str, node: str, path: tuple[str, ...]) -> tuple[str, ...] | None:
        for nxt in graph[node]:
            if nxt == start:
                return path
            if nxt not in path:
                found = cycle_from(start, nxt, path + (nxt,))
                if found:
                    return found
        return None

    cycles = [c for c in (cycle_from(m, m, (m,)) for m in graph) if c]
    assert not cycles, cycles


def test_import_check_sees_a_function_level_import():
    # negative control for the check above
    _, inner = _imports(ast.parse("def f():\n    from ._probe import probe\n"))
    assert inner == [("f", "from ._probe import probe")]


@pytest.mark.parametrize("bias", ["no", 0, 1, None, "False"])
def test_mlp_bias_must_be_a_bool(bias):
    # a string such as "no" used to build a model with biases (bool("no") is True)
    with pytest.raises(initlab.InitlabError, match="bias must be True or False"):
        _layers.mlp([4, 3, 2], bias=bias)
