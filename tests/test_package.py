"""Package-level contracts: a light import, a curated API, a working CLI entry point."""
from __future__ import annotations

import subprocess
import sys

import pytest

import initlab

HEAVY = ("pandas", "matplotlib", "scipy", "tensorboard", "tqdm")


def _loaded_after(code: str) -> set[str]:
    probe = (
        f"{code}\nimport sys\n"
        f"print(','.join(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return {m for m in out.stdout.strip().split(",") if m}


BASELINE = _loaded_after("import torch, numpy")  # what torch itself brings (e.g. tqdm via torch.hub)


def test_import_is_light():
    assert _loaded_after("import initlab") - BASELINE == set()


def test_core_api_is_light():
    # touching the library's core names must not pull in the heavy stack either
    code = (
        "import initlab, torch\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))\n"
        "initlab.init_model(m, 'auto', generator=torch.Generator().manual_seed(0))\n"
        "initlab.gain('tanh'); initlab.fans((3, 4)); initlab.get_scheme('he_normal')\n"
    )
    assert _loaded_after(code) - BASELINE == set()


def test_heavy_check_can_fail():
    # negative control: the check above does see a heavy import when one happens
    assert "pandas" in _loaded_after("import pandas") - BASELINE


@pytest.mark.parametrize("name", sorted(initlab._EXPORTS))
def test_every_export_resolves(name):
    assert getattr(initlab, name) is not None


def test_unknown_attribute():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        initlab.nope  # noqa: B018


def test_python_m_initlab_help():
    out = subprocess.run([sys.executable, "-m", "initlab", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("gains", "schemes", "audit", "run", "presets", "report"):
        assert command in out.stdout


def test_cli_without_command_is_an_error():
    out = subprocess.run([sys.executable, "-m", "initlab"], capture_output=True, text=True)
    assert out.returncode == 2


def test_missing_optional_dependency_names_the_extra(monkeypatch, capsys):
    from initlab import cli

    def needs_pandas(args):
        raise ModuleNotFoundError("No module named 'pandas'", name="pandas")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser.set_defaults(func=needs_pandas)
    assert cli.main([]) == 2
    assert "pip install 'initlab[lab]'" in capsys.readouterr().err


def test_missing_unrelated_module_is_not_masked(monkeypatch):
    from initlab import cli

    def broken(args):
        raise ModuleNotFoundError("No module named 'nonexistent_pkg'", name="nonexistent_pkg")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser.set_defaults(func=broken)
    with pytest.raises(ModuleNotFoundError):
        cli.main([])


def test_missing_own_command_module_is_an_error_not_a_vanished_command(monkeypatch):
    from initlab import cli

    monkeypatch.setattr(cli, "_CLI_MODULES", cli._CLI_MODULES + ("initlab.lab.no_such_commands",))
    with pytest.raises(ModuleNotFoundError, match="no_such_commands"):
        cli.build_parser()
    with pytest.raises(ModuleNotFoundError):
        cli.main(["--help"])


def test_own_command_module_that_fails_to_import_is_an_error(monkeypatch, tmp_path):
    from initlab import cli

    (tmp_path / "initlab_broken_cmds.py").write_text("import initlab.lab.no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "_CLI_MODULES", cli._CLI_MODULES + ("initlab_broken_cmds",))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency"):
        cli.build_parser()


def test_command_module_without_register_cli_is_an_error(monkeypatch):
    from initlab import cli

    monkeypatch.setattr(cli, "_CLI_MODULES", cli._CLI_MODULES + ("initlab._errors",))
    with pytest.raises(RuntimeError, match="initlab._errors has no register_cli"):
        cli.build_parser()
