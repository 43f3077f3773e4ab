"""The lab's layout: stages that import only earlier stages (so no cycles), imports at module level
except for heavy optional third-party packages, and a light ``import initlab.lab``."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

LAB = Path(__file__).resolve().parents[1] / "initlab" / "lab"

#: the lab's modules, each importing only modules listed before it
ORDER = [
    "_io", "_checks", "_threads", "specs", "config", "data", "models", "metrics", "claims",
    "training.plan", "training.activations", "training.engines", "training.records", "training.optim", "training.loop", "training.first_pass",
    "training.group", "training",
    "rundir", "studies",
    "report.labels", "report.stats", "report.load", "report.tensorboard", "report.plots", "report.figures", "report.findings",
    "report.tables", "report.html", "report.workers", "report",
    "executors", "run", "tune.space", "tune.trial", "tune.results", "tune.resume", "tune", "cli",
]
#: third-party packages a function may import (heavy or optional: the lab and digits extras)
LATE = {"pandas", "matplotlib", "tensorboard", "torch.utils.tensorboard", "tqdm", "sklearn", "ray", "tomli_w", "tomli"}


def _name(path: Path) -> str:
    rel = path.relative_to(LAB).with_suffix("")
    parts = list(rel.parts[:-1]) if rel.name == "__init__" else list(rel.parts)
    return ".".join(parts)


def _lab_targets(node: ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The lab modules an import statement of ``module`` names (relative imports resolved)."""
    if node.level == 0:
        base = node.module or ""
        if not base.startswith("initlab.lab"):
            return []
        base = base[len("initlab.lab"):].lstrip(".")
    else:
        pkg = module.split(".") if module else []
        pkg = pkg if is_package else pkg[:-1]
        up = node.level - 1
        if up > len(pkg):
            return []  # the library, above the lab
        pkg = pkg[: len(pkg) - up]
        base = ".".join(pkg + ([node.module] if node.module else []))
    out = []
    for alias in node.names:
        cand = f"{base}.{alias.name}" if base else alias.name
        out.append(cand if cand in ORDER else base)
    return out


def _modules() -> dict[str, Path]:
    return {_name(p): p for p in LAB.rglob("*.py") if _name(p) != ""}


def test_every_lab_module_has_a_stage():
    assert sorted(_modules()) == sorted(ORDER)


@pytest.mark.parametrize("module", ORDER)
def test_imports_only_earlier_stages(module):
    path = _modules()[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    allowed = set(ORDER[: ORDER.index(module)]) | {""}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for target in _lab_targets(node, module, path.name == "__init__.py"):
                if target != module and target.split(".")[0] != "":
                    assert target in allowed, f"{module} imports {target}, a later stage"


@pytest.mark.parametrize("module", ORDER)
def test_function_level_imports_are_only_heavy_optional_packages(module):
    tree = ast.parse(_modules()[module].read_text(encoding="utf-8"))
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{module}.{fn.name}: relative import inside a function"
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert any(name == late or name.startswith(late + ".") for late in LATE), \
                    f"{module}.{fn.name} imports {name} inside the function"


def test_import_lab_and_its_commands_stay_light():
    code = ("import sys, initlab.lab, initlab.lab.cli, initlab.lab.run, initlab.lab.report\n"
            "print(sorted(m for m in ('pandas', 'matplotlib', 'tensorboard') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_check_sees_a_later_import():
    # negative control: an upward import is found
    node = ast.parse("from ..run import run_experiment").body[0]
    assert _lab_targets(node, "report.load", False) == ["run"]
    assert "run" not in set(ORDER[: ORDER.index("report.load")])
