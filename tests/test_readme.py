"""The README's commands and examples are part of the contract: they run as tests."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_readme_starts_with_the_two_commands():
    first = _blocks("bash")[0].strip().splitlines()
    commands = [line for line in first if line and not line.startswith("#")]
    assert len(commands) == 2
    main_job, tests = commands
    assert "initlab run classic" in main_job and "pip install" in main_job
    assert "pytest" in tests and "pip install" in tests


def test_ci_runs_the_readmes_test_command():
    first = _blocks("bash")[0].strip().splitlines()
    test_command = [line for line in first if "pytest" in line][0]
    install_and_test = test_command.split("&& ", 2)[-1] if test_command.startswith("python3 -m venv") else test_command
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert install_and_test.strip() in ci, f"{install_and_test!r} not in .ci/run"


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_readme_python_examples_run(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _blocks("python")[index]
    exec(compile(code, f"README.md[python block {index}]", "exec"), {"__name__": "__readme__"})
