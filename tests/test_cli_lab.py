"""`initlab run`, `initlab presets`, `initlab report`: end to end, and clear errors on bad input."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from initlab.cli import main
from initlab.lab.config import list_presets
from initlab.lab.run import RunProgress, TqdmProgress, read_run_meta

PRESET_DIR = Path(__file__).resolve().parents[1] / "initlab" / "lab" / "presets"


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    return subprocess.run([sys.executable, "-m", "initlab", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """`python -m initlab run smoke` (shortened) in a fresh folder: stdout/stderr are not a terminal."""
    cwd = tmp_path_factory.mktemp("cli")
    proc = run_cli("run", "smoke", "--steps", "20", "--out", "out/smoke", cwd=cwd)
    return cwd, proc


def smoke_toml(tmp_path: Path, old: str, new: str) -> Path:
    text = (PRESET_DIR / "smoke.toml").read_text()
    assert old in text
    p = tmp_path / "exp.toml"
    p.write_text(text.replace(old, new, 1))
    return p


def test_python_m_initlab_run_end_to_end(cli_run):
    cwd, proc = cli_run
    assert proc.returncode == 0, proc.stderr
    out = cwd / "out" / "smoke"
    for name in ("config.toml", "metrics.csv", "first_pass.csv", "report.html", "run.json"):
        assert (out / name).is_file(), name
    assert len(list((out / "figures").glob("*.png"))) == 4
    assert len(list((out / "tb").glob("*/seed0/events.out.tfevents*"))) == 5
    assert f"report:      {Path('out/smoke/report.html')}" in proc.stdout
    assert f"tensorboard --logdir {Path('out/smoke/tb')}" in proc.stdout
    for name in ("sigmoid-normal", "relu-he"):
        assert name in proc.stdout  # the final accuracies are printed
    # not a terminal: no progress bar on stderr
    assert "step/s" not in proc.stderr and "%|" not in proc.stderr


def test_same_command_again_resumes_with_nothing_to_do(cli_run, monkeypatch, capsys):
    """The same command again (in this process: ``python -m initlab`` itself is the test above)."""
    cwd, _ = cli_run
    out = cwd / "out" / "smoke"
    before = snapshot(out)
    monkeypatch.chdir(cwd)
    rc = main(["run", "smoke", "--steps", "20", "--out", "out/smoke"])
    stdout, stderr = capsys.readouterr()
    assert rc == 0, stderr
    assert "nothing to train, all 5 model(s) already done" in stdout
    after = snapshot(out)
    assert after["metrics.csv"] == before["metrics.csv"] and after["first_pass.csv"] == before["first_pass.csv"]


def test_default_out_dir_is_runs_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "smoke", "--steps", "5", "--seeds", "1", "--no-progress", "--figure-workers", "0"]) == 0
    assert (tmp_path / "runs" / "smoke" / "report.html").is_file()
    assert read_run_meta(tmp_path / "runs" / "smoke")["status"] == "complete"
    assert "tensorboard --logdir " + str(Path("runs/smoke/tb")) in capsys.readouterr().out


def test_presets_lists_names_and_descriptions(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name, desc in list_presets():
        assert name in out and desc in out
    assert "classic" in out and "smoke" in out


# ----------------------------------------------------------------------------- bad input


def fails(argv: list[str], capsys, *needles: str) -> str:
    """Run the CLI in process: exit status 2, one clear line, no traceback."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("initlab: error: ") and "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)
    return err


def test_unknown_preset(tmp_path, capsys):
    fails(["run", "smok", "--out", str(tmp_path / "o")], capsys, "unknown preset 'smok'", "did you mean 'smoke'", "classic")
    assert not (tmp_path / "o").exists()


def test_unknown_scheme_and_activation(tmp_path, capsys):
    bad = smoke_toml(tmp_path, 'scheme = "he_normal"', 'scheme = "he_nromal"')
    fails(["run", str(bad), "--out", str(tmp_path / "o")], capsys, "unknown scheme 'he_nromal'", "did you mean 'he_normal'")
    bad = smoke_toml(tmp_path, 'activation = "sigmoid"', 'activation = "sigmod"')
    fails(["run", str(bad), "--out", str(tmp_path / "o")], capsys, "unknown activation 'sigmod'", "did you mean 'sigmoid'")
    assert not (tmp_path / "o").exists()


def test_malformed_toml(tmp_path, capsys):
    bad = tmp_path / "broken.toml"
    bad.write_text('name = "x"\n[train\nsteps = 3\n')
    fails(["run", str(bad), "--out", str(tmp_path / "o")], capsys, "broken.toml", "line 2", "malformed TOML")
    wrong_type = smoke_toml(tmp_path, "lr = 1e-3", 'lr = "fast"')
    fails(["run", str(wrong_type), "--out", str(tmp_path / "o")], capsys, "train.lr", "'fast'")
    fails(["run", str(tmp_path / "missing.toml")], capsys, "missing.toml", "not found")
    assert not (tmp_path / "o").exists()


def test_missing_data_root(tmp_path, capsys):
    fails(["run", "smoke", "--data-root", str(tmp_path / "no-mnist"), "--out", str(tmp_path / "o")], capsys,
          "--data-root", "no-mnist", "does not exist")
    empty = tmp_path / "empty-mnist"
    empty.mkdir()
    fails(["run", "smoke", "--data-root", str(empty), "--out", str(tmp_path / "o")], capsys, "empty-mnist")
    fails(["run", "smoke", "--download", "--out", str(tmp_path / "o")], capsys, "--download needs --data-root")
    assert not (tmp_path / "o").exists()


def test_corrupt_idx_files(tmp_path, capsys):
    root = tmp_path / "mnist"
    root.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (root / name).write_bytes(b"\x00\x00\x08\x99" + b"\x01" * 64)  # wrong magic, truncated
    err = fails(["run", "smoke", "--data-root", str(root), "--out", str(tmp_path / "o")], capsys)
    assert "idx" in err.lower() and str(root) in err
    assert not (tmp_path / "o").exists()


def test_output_dir_with_another_config_is_left_alone(cli_run, capsys):
    cwd, _ = cli_run
    out = cwd / "out" / "smoke"
    before = snapshot(out)
    fails(["run", "smoke", "--steps", "30", "--out", str(out)], capsys, "holds another experiment",
          "train.steps: 20 -> 30", "config fingerprint")
    fails(["run", "smoke", "--steps", "30", "--out", str(out), "--fresh"], capsys, "holds another experiment")
    assert snapshot(out) == before


def test_output_dir_that_is_not_a_run(tmp_path, capsys):
    d = tmp_path / "photos"
    d.mkdir()
    (d / "cat.jpg").write_bytes(b"\xff\xd8")
    fails(["run", "smoke", "--out", str(d)], capsys, "not an initlab run directory")
    assert [p.name for p in d.iterdir()] == ["cat.jpg"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_unavailable_device(tmp_path, capsys):
    fails(["run", "smoke", "--device", "cuda", "--out", str(tmp_path / "o")], capsys, "cuda", "not available")
    assert not (tmp_path / "o").exists()


def test_bad_numbers_are_argparse_errors(capsys):
    for argv in (["run", "smoke", "--seeds", "0"], ["run", "smoke", "--steps", "many"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert "expected a positive integer" in capsys.readouterr().err


def test_report_of_a_non_run(tmp_path, capsys):
    fails(["report", str(tmp_path)], capsys, "no config.toml")


def test_interrupt_exits_130_and_the_same_command_resumes(tmp_path, monkeypatch, capsys):
    import initlab.lab.executors as ensemble

    real = ensemble.run_group
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        raise KeyboardInterrupt

    out = tmp_path / "o"
    argv = ["run", "smoke", "--steps", "5", "--out", str(out), "--no-progress", "--figure-workers", "0"]
    monkeypatch.setattr(ensemble, "run_group", interrupted)
    assert main(argv) == 130
    assert "re-run the same command to resume" in capsys.readouterr().err
    assert calls["n"] == 1 and read_run_meta(out)["status"] == "interrupted"
    monkeypatch.setattr(ensemble, "run_group", real)
    assert main(argv) == 0
    assert read_run_meta(out)["status"] == "complete"


def test_progress_bar_draws_when_enabled(capsys):
    bar = TqdmProgress(disable=False)
    keys = (("a", 0),)
    bar(RunProgress("plan", -1, 2, 0, 10, (), 0, 2))
    for unit in range(2):
        bar(RunProgress("unit_start", unit, 2, 0, 10, keys, unit, 2))
        bar(RunProgress("step", unit, 2, 5, 10, keys, unit, 2))
        bar(RunProgress("unit_done", unit, 2, 10, 10, keys, unit + 1, 2))
    bar(RunProgress("done", -1, 2, 10, 10, (), 2, 2))
    err = capsys.readouterr().err
    assert "training" in err and "20/20" in err
    quiet = TqdmProgress(disable=True)
    quiet(RunProgress("plan", -1, 1, 0, 10, (), 0, 1))
    quiet(RunProgress("done", -1, 1, 10, 10, (), 1, 1))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("run_json", ["{}", "not json", '{"name": "smoke"}'])
def test_out_dir_with_a_run_json_that_records_nothing(tmp_path, capsys, run_json):
    """A folder whose run.json has no fingerprint (and no config.toml beside it) is refused in one line
    naming the file, what is wrong and what to do, and nothing is written there."""
    out = tmp_path / "d"
    out.mkdir()
    (out / "run.json").write_text(run_json)
    err = fails(["run", "smoke", "--steps", "5", "--out", str(out), "--no-progress"], capsys,
                str(out / "run.json"), "fingerprint", "no config.toml", "another --out")
    assert err.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == ["run.json"]
