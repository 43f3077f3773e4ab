"""The package's shape: imports only downward, no cycles, the library never imports the lab,
function-level imports only for heavy optional packages, and short functions.

The import graph is read from the source (every ``import`` statement, at any depth), so a cycle
hidden behind a function-level import is still a cycle.
"""
from __future__ import annotations

import ast
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "initlab"
# third-party packages that may be imported inside a function: heavy, or optional (the lab extra), so
# that a core install keeps every command but the lab's working
LAZY_OK = {"pandas", "matplotlib", "tensorboard", "tqdm", "sklearn", "ray", "scipy", "tomli_w", "tomli",
           # the model libraries of the survey (the models extra): optional, and seconds to import
           "torchvision", "timm", "transformers"}
LAZY_OK_MODULES = {"torch.utils.tensorboard"}  # torch's wrapper imports tensorboard
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


@functools.lru_cache(maxsize=None)
def sources() -> dict[str, tuple[Path, ast.Module]]:
    """module name -> (path, parsed tree) of every module, parsed once per test session (read only)."""
    return {module_name(p): (p, ast.parse(p.read_text(), filename=str(p))) for p in sorted(ROOT.rglob("*.py"))}


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imported(node: ast.Import | ast.ImportFrom, here: str, path: Path) -> list[str]:
    """Absolute module names an import statement refers to (``from . import x`` counts x)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = here.split(".") if _is_package(path) else here.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [target] + [f"{target}.{a.name}" for a in node.names]


def _type_checking_blocks(tree: ast.Module) -> set[int]:
    """ids of nodes under ``if TYPE_CHECKING:`` (imports for type checkers only)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                out.update(id(n) for n in ast.walk(sub))
    return out


def import_edges() -> dict[str, set[str]]:
    """module -> initlab modules it imports (at any depth, type-checking imports excluded)."""
    mods = sources()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, (path, tree) in mods.items():
        skip = _type_checking_blocks(tree)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in skip:
                for target in imported(node, name, path):
                    if target in mods and target != name:
                        edges[name].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def _parents_are_packages(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """Drop edges from a module to its own parent packages (importing ``initlab.x`` runs
    ``initlab/__init__``, which is lazy and imports nothing of the package)."""
    return {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in edges.items()}


def test_cycle_detector_finds_a_cycle():
    # negative control: the detector is not blind
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    found = cycles(_parents_are_packages(import_edges()))
    assert not found, f"import cycles: {found}"


def test_library_never_imports_the_lab():
    bad = {m: sorted(t for t in ts if t == "initlab.lab" or t.startswith("initlab.lab."))
           for m, ts in import_edges().items() if not (m == "initlab.lab" or m.startswith("initlab.lab."))}
    bad = {m: ts for m, ts in bad.items() if ts}
    assert not bad, f"library modules importing the lab: {bad}"


def test_importing_every_library_module_loads_no_lab_module():
    lib = sorted(m for m in sources() if not m.startswith("initlab.lab") and m != "initlab.__main__")
    code = ("import importlib, sys\n"
            f"for m in {lib!r}:\n    importlib.import_module(m)\n"
            "print(sorted(k for k in sys.modules if k.startswith('initlab.lab')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def function_level_imports() -> list[str]:
    out = []
    for name, (_path, tree) in sources().items():
        skip = _type_checking_blocks(tree)
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in skip:
                    continue
                if isinstance(node, ast.ImportFrom) and node.level:
                    out.append(f"{name}.{fn.name}: from {'.' * node.level}{node.module or ''}")
                    continue
                for target in imported(node, name, _path)[:1] if isinstance(node, ast.ImportFrom) else \
                        [a.name for a in node.names]:
                    if target.split(".")[0] not in LAZY_OK and target not in LAZY_OK_MODULES:
                        out.append(f"{name}.{fn.name}: {target}")
    return out


def test_function_level_imports_only_for_heavy_optional_packages():
    found = function_level_imports()
    assert not found, "function-level imports of light or own modules (import them at module level):\n" + \
        "\n".join(found)


def long_functions(limit: int = MAX_FUNCTION_LINES) -> list[str]:
    out = []
    for name, (_path, tree) in sources().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if n > limit:
                    out.append(f"{name}.{node.name}: {n} lines")
    return out


def test_no_long_functions():
    found = long_functions()
    assert not found, f"functions over {MAX_FUNCTION_LINES} lines: {found}"


def test_long_function_detector_is_not_blind():
    # negative control: with a tiny limit, plenty of functions are "long"
    assert len(long_functions(limit=5)) > 50


HEAVY = ["pandas", "matplotlib", "tensorboard", "scipy", "initlab.lab", "torchvision", "timm", "transformers"]


@pytest.fixture(scope="module")
def loaded_by_import_initlab() -> dict[str, bool]:
    """heavy module -> whether a fresh interpreter has it loaded after ``import initlab`` (one interpreter for
    every parameter of the test below)."""
    code = f"import json, sys, initlab; print(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("heavy", HEAVY)
def test_import_initlab_stays_light(heavy, loaded_by_import_initlab):
    assert loaded_by_import_initlab[heavy] is False
