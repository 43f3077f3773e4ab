"""The lab's thread policy (initlab.lab._threads) and ``initlab run --threads``."""
from __future__ import annotations

import os

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


def test_one_thread_restores_the_outer_count():
    from initlab.lab._threads import one_thread
    before = torch.get_num_threads()
    with using_threads(2):
        with one_thread() as n:
            assert n == 1 and torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == before


def _members_under(n_threads, wrap):
    from initlab.lab import training
    from initlab.lab.config import experiment_from_dict
    from initlab.lab.data import load_dataset
    from initlab.lab.training.plan import plan_groups
    exp = experiment_from_dict({
        "name": "threads", "data": {"name": "mnist", "limit": 1200},
        "model": {"widths": [784, 512, 512, 10]},
        "train": {"steps": 1, "log_every": 1, "first_pass_batch": 200, "seeds": [0]},
        "scenarios": [{"name": "auto", "activation": "gelu", "scheme": "auto"}]})
    spec = plan_groups(exp)[0]
    data = load_dataset(exp.data)
    with using_threads(n_threads), wrap():
        models, rows, _, _ = training.group._init_members(spec, data)
    return [p.detach().clone() for p in models[0].parameters()], rows


def test_member_init_and_first_pass_are_the_same_bits_for_any_thread_count(monkeypatch):
    """auto's correction pass and the first pass are forward passes whose sums torch splits by thread
    count: the lab runs them on one thread, so a unit gives the same bits in this process (any --threads)
    and in a worker that starts with another count. Negative control: without that, 1 and 2 threads differ."""
    import contextlib

    from initlab.lab import training
    if torch.get_num_threads() < 2 and (os.cpu_count() or 1) < 2:
        pytest.skip("needs two cores to see a thread-count difference")
    p1, r1 = _members_under(1, contextlib.nullcontext)
    p2, r2 = _members_under(2, contextlib.nullcontext)
    assert all(torch.equal(a, b) for a, b in zip(p1, p2, strict=True))
    assert repr(r1) == repr(r2)  # repr: exact floats, and NaN equals NaN
    # negative control: the same work on the caller's threads differs in the last bits
    monkeypatch.setattr(training.group, "one_thread", contextlib.nullcontext)
    monkeypatch.setattr(training.plan, "one_thread", contextlib.nullcontext)
    q1, s1 = _members_under(1, contextlib.nullcontext)
    q2, s2 = _members_under(2, contextlib.nullcontext)
    assert not (all(torch.equal(a, b) for a, b in zip(q1, q2, strict=True)) and repr(s1) == repr(s2))


def test_busy_elsewhere_counts_other_processes_not_this_one(monkeypatch):
    # two CPUs; over the window, 150 of 200 ticks busy (1.5 CPUs), 0.5 CPU of it this process's own
    ticks = iter([(1000, 4000), (1150, 4200)])
    times = iter([os.times_result((1.0, 2.0, 0, 0, 0)), os.times_result((1.025, 2.0, 0, 0, 0))])
    clock = iter([10.0, 10.05])
    monkeypatch.setattr(_threads.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(_threads, "_jiffies", lambda cpus: next(ticks))
    monkeypatch.setattr(_threads.os, "times", lambda: next(times))
    monkeypatch.setattr(_threads.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(_threads.time, "sleep", lambda s: None)
    assert _threads.busy_elsewhere() == pytest.approx(1.0)


def test_idle_cpus_prefers_the_measurement_over_the_load_average(monkeypatch):
    monkeypatch.setattr(_threads, "usable_cpus", lambda: 4)
    monkeypatch.setattr(_threads.os, "getloadavg", lambda: (3.0, 3.0, 3.0))
    monkeypatch.setattr(_threads, "busy_now", lambda max_age=2.0: 0.2)
    assert _threads.idle_cpus() == 4          # the load average (3) would leave 1
    monkeypatch.setattr(_threads, "busy_now", lambda max_age=2.0: 2.6)
    assert _threads.idle_cpus() == 1
    monkeypatch.setattr(_threads, "busy_now", lambda max_age=2.0: None)  # no /proc/stat
    assert _threads.idle_cpus() == 1          # 4 - 3 from the load average


def test_jiffies_reads_only_the_given_cpus(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    stat.write_text("cpu  9 9 9 9 9 9 9 9 0 0\n"
                    "cpu0 10 0 5 80 5 0 0 0 0 0\n"
                    "cpu1 1 1 1 1 1 1 1 1 0 0\n"
                    "intr 12345\n")
    real = _threads.Path
    monkeypatch.setattr(_threads, "Path", lambda p: stat if p == "/proc/stat" else real(p))
    assert _threads._jiffies({0}) == (15, 100)   # busy = total - idle - iowait
    assert _threads._jiffies({0, 1}) == (21, 108)
    assert _threads._jiffies({7}) is None
    if os.path.exists("/proc/stat"):
        monkeypatch.setattr(_threads, "Path", real)
        busy = _threads.busy_elsewhere(0.02)
        assert busy is None or 0.0 <= busy <= len(os.sched_getaffinity(0)) + 0.5


def test_busy_now_reuses_a_recent_measurement(monkeypatch):
    values = iter([0.3, 1.7])
    monkeypatch.setattr(_threads, "busy_elsewhere", lambda window=0.05: next(values))
    monkeypatch.setattr(_threads, "_measured", [])
    assert _threads.busy_now() == 0.3
    assert _threads.busy_now() == 0.3             # measured just now: the same value
    assert _threads.busy_now(max_age=0.0) == 1.7  # too old: measured again
