"""The lab's thread policy (initlab.lab._threads) and ``initlab run --threads``."""
from __future__ import annotations

import pytest
import torch

from initlab import InitlabError
from initlab.lab import _threads
from initlab.lab._threads import choose_threads, using_threads


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def test_requested_wins_and_is_checked():
    assert choose_threads(3, load=100.0) == 3
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(InitlabError, match="threads: expected a positive integer"):
            choose_threads(bad)


def test_busy_machine_gets_one_thread(monkeypatch):
    monkeypatch.setattr(_threads, "usable_cpus", lambda: 8)
    monkeypatch.setattr(_threads, "physical_cores", lambda: 4)
    assert choose_threads(load=0.0) == 4            # physical cores, not hyper-threads
    assert choose_threads(load=5.2) == 3            # 8 usable - 5 busy
    assert choose_threads(load=7.6) == 1
    assert choose_threads(load=40.0) == 1           # never 0
    assert choose_threads(load=0.0, workers=2) == 2  # split over workers
    assert choose_threads(load=0.0, workers=8) == 1
    assert choose_threads(load=0.0, flops=5e6) == 2  # the work caps it


def test_environment_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert choose_threads(load=0.0) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")
    assert choose_threads(load=0.0) >= 1


def test_counts_are_sane():
    assert 1 <= _threads.physical_cores() <= _threads.usable_cpus()
    assert 1 <= _threads.idle_cpus() <= _threads.usable_cpus()
    with pytest.raises(InitlabError, match="workers"):
        choose_threads(workers=0)


def test_using_threads_restores():
    before = torch.get_num_threads()
    with using_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), using_threads(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_cli_threads_flag_is_checked(capsys):
    from initlab.cli import main
    with pytest.raises(SystemExit) as e:
        main(["run", "smoke", "--threads", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--threads" in err and len(err.splitlines()) == 1


def test_caller_threads_restores_the_outer_count():
    from initlab.lab._threads import caller_threads
    before = torch.get_num_threads()
    with caller_threads() as n:
        assert n == before
    with using_threads(1):
        with caller_threads() as n:
            assert n == before and torch.get_num_threads() == before
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
