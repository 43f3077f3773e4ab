"""Benchmark: the lab's batched ensemble trainer against a plain per-model PyTorch loop.

Both sides run the same experiment (default: the ``classic`` preset, 5 scenarios x 3 seeds,
784-100-100-10 MLP, Adam lr 1e-3, batch 30, 1000 steps, test evaluation every 50 steps) from
the same initial weights, end to end: build + initialise every model, the first pass (probe
on a batch of 100), training, and the periodic train/test metrics.

- ensemble: ``initlab.lab.training.run_group`` on each group of ``plan_groups(exp)``;
- peer: the way the study and most tutorials do it, one model after the other:
  ``nn.Sequential`` from the same builder, ``DataLoader(TensorDataset(x, y), batch_size=30,
  shuffle=True)``, ``torch.optim.Adam``, ``loss.item()`` per step, test evaluation under
  ``torch.no_grad()`` at the same steps.

It prints the time of each, the speed-up, training samples/s against a matmul roofline
measured in the same run (the GFLOP/s of a large fp32 GEMM, divided by the FLOPs one training
sample costs), and the peak resident memory of each phase. ``run_group`` flushes denormal
floats to zero while it runs (its default; the sigmoid + N(0, 1) members underflow); the
ensemble is also timed with ``flush_denormal=False``, and the peer runs as tutorials do, with
denormals. One-time process costs (torch.optim's first use imports torch._dynamo) are paid
before both timings. Run from the repository root:

    python bench/bench_lab.py                 # the full classic preset
    python bench/bench_lab.py --steps 200     # a quick run
    python bench/bench_lab.py --skip-end-to-end --rounds 3 --profile   # training alone, with its op profile
    python bench/bench_lab.py --threads 1 --clock cpu   # one thread, CPU time: steadier on a busy machine

Two ratios against the peer's time (goals on 2 quiet cores): **training alone** (``run_group`` on
every group: init, first pass, training, periodic metrics; goal >= 10x) and **end to end**
(``run_experiment`` of the same experiment into a fresh directory: training, first pass,
TensorBoard logs, figures and the HTML report, drawn as ``initlab run`` draws them: by
``--figure-workers`` processes (default: as `initlab run` chooses, 2 where 2 CPUs are idle beyond training's threads, else fewer) that import matplotlib and pandas while the run trains;
0 draws them in this process, including the first import of matplotlib and pandas; goal >= 5x). The Python start-up and ``import torch``/``initlab``, which
every command pays, are not in either time; ``--commands N`` times the two commands a user runs as whole
processes instead (``initlab run PRESET`` against the peer alone as a script), start-up included.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


#: the clock of every timing below (``--clock``): wall time, or this process's CPU time
_clock: Callable[[], float] = time.perf_counter


# ----------------------------------------------------------------------------- memory


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_mb() -> float:
    """Current resident set size in MiB (VmRSS), NaN where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def _peak_rss_mb() -> float:
    """Peak resident set size in MiB: VmHWM since the last reset, else ru_maxrss (process lifetime)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0


# ----------------------------------------------------------------------------- roofline


def sgemm_gflops(n: int = 2048, repeat: int = 5) -> float:
    """Best-of-``repeat`` fp32 GFLOP/s of an n x n x n matmul (2 n^3 FLOPs) on this machine."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    torch.mm(a, b, out=c)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        torch.mm(a, b, out=c)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best / 1e9


def mlp_flops(widths: tuple[int, ...]) -> tuple[float, float]:
    """(FLOPs per training sample, FLOPs per evaluated sample) of an MLP, matmuls only.

    Training: forward 2*sum(in*out), weight gradients 2*sum(in*out), input gradients
    2*sum(in*out) for every layer but the first. Evaluation: the forward pass.
    """
    mac = [a * b for a, b in zip(widths[:-1], widths[1:])]
    fwd = 2.0 * sum(mac)
    return fwd + 2.0 * sum(mac) + 2.0 * sum(mac[1:]), fwd


# ----------------------------------------------------------------------------- the peer


def baseline_member(scenario: Any, seed: int, data: Any, train: Any) -> dict[str, float]:
    """Train one model the tutorial way; return its final test loss and accuracy."""
    import initlab
    from initlab.lab.training import first_pass_indices, init_member

    x_train, y_train = data.x_train.float(), data.y_train.long()
    x_test, y_test = data.x_test.float(), data.y_test.long()
    if x_train.dim() > 2 and scenario.model.kind == "mlp":
        x_train, x_test = x_train.flatten(1), x_test.flatten(1)
    fp = first_pass_indices(seed, x_train.shape[0], train.first_pass_batch)
    model = init_member(scenario, seed, batch=x_train[fp])
    initlab.probe(model, x_train[fp], target=y_train[fp])  # the first pass, as the ensemble does it
    model.zero_grad(set_to_none=True)

    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=train.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.Adam(model.parameters(), lr=train.lr)
    log: dict[str, float] = {}

    def evaluate() -> None:
        model.eval()
        with torch.no_grad():
            out = model(x_test)
            log["test_loss"] = F.cross_entropy(out, y_test).item()
            log["test_acc"] = (out.argmax(1) == y_test).float().mean().item()
        model.train()

    evaluate()
    step, run_loss, run_acc, n = 0, 0.0, 0.0, 0
    while step < train.steps:
        for xb, yb in loader:
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run_loss += loss.item()
            run_acc += (out.argmax(1) == yb).float().mean().item()
            n += 1
            step += 1
            if step % train.log_every == 0 or step == train.steps:
                log["train_loss"], log["train_acc"] = run_loss / n, run_acc / n
                run_loss, run_acc, n = 0.0, 0.0, 0
                evaluate()
            if step >= train.steps:
                break
    return log


# ----------------------------------------------------------------------------- main


def _experiment(args: argparse.Namespace) -> Any:
    """The preset, with the command line's steps and seeds."""
    from initlab.lab.config import load_experiment

    exp = load_experiment(args.preset)
    train = exp.train
    if args.steps is not None:
        train = dataclasses.replace(train, steps=args.steps, log_every=min(train.log_every, args.steps))
    if args.seeds is not None:
        train = dataclasses.replace(train, seeds=tuple(range(args.seeds)))
    return dataclasses.replace(exp, train=train)


def _warm_up() -> None:
    """One-time process costs paid by whichever side runs first (torch.optim's first use imports
    torch._dynamo, ~1-2 s): pay them here, outside both timings."""
    import initlab

    torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-3)
    initlab.probe(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), torch.randn(8, 4), target=torch.randint(0, 2, (8,)))


def _samples(train: Any, n_train: int, n_members: int) -> int:
    """Training samples of the whole run: every step's batch size (an epoch's last batch is smaller), per model."""
    b = train.batch_size
    per_epoch = [b] * (n_train // b) + ([n_train % b] if n_train % b else [])
    return sum(per_epoch[i % len(per_epoch)] for i in range(train.steps)) * n_members


def _time_ensemble(groups: list[Any], data: Any, samples: int) -> tuple[float, list[Any]]:
    from initlab.lab.training import run_group

    _reset_peak_rss()
    rss0 = _rss_mb()
    t = _clock()
    results = [run_group(g, data) for g in groups]
    t_ens = _clock() - t
    peak = _peak_rss_mb()
    engines = sorted({r.engine for r in results})
    parts = ", ".join(f"{k} {sum((r.timings or {}).get(k, 0.0) for r in results):.2f} s"
                      for k in ("init_first_pass", "setup", "train", "eval"))
    print(f"\nensemble ({'/'.join(engines)}): {t_ens:.2f} s end to end "
          f"({sum(r.wall_s for r in results):.2f} s in run_group: {parts}), {samples / t_ens:,.0f} training samples/s, "
          f"peak RSS {peak:.0f} MiB (+{peak - rss0:.0f} MiB over the phase start)")
    return t_ens, results


def _print_roofline(members: list[Any], train: Any, n_test: int, samples: int, gflops: float, t_ens: float,
                    results: list[Any]) -> None:
    """Matmul work of an MLP run against the GEMM roofline measured in this process."""
    widths = tuple(members[0].scenario.model.widths)
    f_train, f_eval = mlp_flops(widths)
    n_evals = 1 + len({s for s in range(train.log_every, train.steps + 1, train.log_every)} | {train.steps})
    flops = samples * f_train + len(members) * n_evals * n_test * f_eval
    t_loop = sum((r.timings or {}).get("train", 0.0) + (r.timings or {}).get("eval", 0.0) for r in results) or t_ens
    roof_sps = gflops * 1e9 / f_train
    print(f"  matmul work {flops / 1e9:.1f} GFLOP ({f_train / 1e6:.2f} MFLOP per training sample, "
          f"{n_evals} evaluations of {n_test} test digits); GEMM roofline {roof_sps:,.0f} training samples/s")
    for label, tt in (("end to end", t_ens), ("steps + evals", t_loop)):
        achieved = flops / tt / 1e9
        print(f"  {label:>13}: {achieved:6.1f} GFLOP/s = {100 * achieved / gflops:4.1f}% of the GEMM roofline, "
              f"{samples / tt:,.0f} training samples/s = {100 * samples / tt / roof_sps:4.1f}% of the roofline's")
    params = sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
    print(f"  ensemble tensors: {len(members)} x {params:,} parameters x 4 (weights, grads, Adam m, v) x 4 B = "
          f"{len(members) * params * 16 / 2 ** 20:.0f} MiB")


def _print_op_profile(groups: list[Any], data: Any, train: Any, top: int = 16) -> None:
    """The ops of one more ensemble run by self CPU time (torch.profiler adds a few us per op), with
    their calls per training step and time per step."""
    from torch.profiler import ProfilerActivity, profile

    from initlab.lab.training import run_group

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for g in groups:
            run_group(g, data)
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in rows) / 1e6
    steps = int(train.steps)
    print(f"  op profile of one more run (torch.profiler, {total:.2f} s of op self time; the whole run_group divided by its {steps} steps):")
    for e in rows[:top]:
        print(f"    {e.key:<28} {e.self_cpu_time_total / 1e6:6.3f} s {100 * e.self_cpu_time_total / 1e6 / total:5.1f}%"
              f"  {e.count / steps:6.2f} calls/step  {e.self_cpu_time_total / steps:7.1f} us/step")


def _final(metrics: list[dict[str, Any]], split: str, metric: str) -> dict[tuple[str, int], float]:
    """Each member's value at its last logged step."""
    out: dict[tuple[str, int], tuple[int, float]] = {}
    for r in metrics:
        if r["split"] == split and r["metric"] == metric:
            k = (r["scenario"], r["seed"])
            if k not in out or r["step"] >= out[k][0]:
                out[k] = (r["step"], r["value"])
    return {k: v for k, (_, v) in out.items()}


def _time_peer(members: list[Any], data: Any, train: Any, samples: int) -> tuple[float, dict[tuple[str, int], Any]]:
    _reset_peak_rss()
    rss0 = _rss_mb()
    t = _clock()
    peer = {m.key: baseline_member(m.scenario, m.seed, data, train) for m in members}
    t_peer = _clock() - t
    peak = _peak_rss_mb()
    print(f"peer (DataLoader + nn.Sequential + Adam, one model at a time): {t_peer:.2f} s, "
          f"{samples / t_peer:,.0f} training samples/s, peak RSS {peak:.0f} MiB (+{peak - rss0:.0f} MiB over the phase start)")
    return t_peer, peer


def _time_end_to_end(exp: Any, data: Any, figure_workers: int | None = None) -> float:
    """Wall time of ``run_experiment`` into a fresh directory (train, TensorBoard, figures, report), with
    ``figure_workers`` report workers as ``initlab run`` starts them."""
    import tempfile

    from initlab.lab.run import run_experiment

    with tempfile.TemporaryDirectory() as out:
        kids = _children_cpu()
        t = _clock()
        summary = run_experiment(exp, out, data=data, resume=False, figure_workers=figure_workers)
        t_e2e = _clock() - t
        kids = _children_cpu() - kids
        report = summary.report is not None and os.path.exists(summary.report)
    print(f"end to end (run_experiment: train, first pass, TensorBoard, {len(summary.figures)} figures, "
          f"report {'written' if report else 'MISSING'}): {t_e2e:.2f} s")
    print("  " + _phases(summary.timings, t_e2e))
    print(f"  CPU time of the processes it started (figure workers, the report's fork), not in the time above: "
          f"{kids:.2f} s; load average {os.getloadavg()[0]:.1f}")
    return t_e2e


def _children_cpu() -> float:
    """User + system CPU seconds of this process's finished (waited-for) child processes."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _phases(tm: dict[str, float], total: float) -> str:
    """One line: where ``run_experiment``'s time went (``RunSummary.timings``)."""
    train, events, commit = tm.get("train", 0.0), tm.get("events", 0.0), tm.get("commit", 0.0)
    first = tm.get("unit.init_first_pass", 0.0)
    parts = [("first pass", first), ("training", train - events - commit - first), ("events (TensorBoard, checkpoints)", events),
             ("commit (parts, logs, CSVs)", commit), ("finish (run.json, CSVs)", tm.get("finish", 0.0)),
             ("figures + report", tm.get("report", 0.0))]
    rest = total - train - tm.get("finish", 0.0) - tm.get("report", 0.0)
    return "phases: " + ", ".join(f"{k} {v:.2f} s" for k, v in parts) + f", set-up and other {rest:.2f} s"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="classic", help="preset name or TOML path (default: classic)")
    p.add_argument("--steps", type=int, default=None, help="override train.steps (quick mode)")
    p.add_argument("--seeds", type=int, default=None, help="override the number of seeds (0..N-1)")
    p.add_argument("--skip-peer", action="store_true", help="time the ensemble only")
    p.add_argument("--skip-end-to-end", action="store_true", help="do not time run_experiment")
    p.add_argument("--figure-workers", type=int, default=None,
                   help="report workers for the end-to-end run, as `initlab run --figure-workers` "
                        "(default: as `initlab run` chooses them)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for both sides (default: torch's own count)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time, or this process's CPU time (steadier on a busy machine with --threads 1; "
                        "with more threads it adds the threads' times up, spinning included)")
    p.add_argument("--profile", action="store_true",
                   help="also print the training step's op profile (torch.profiler, one extra ensemble run)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat (ensemble, end to end, peer) this many times, interleaved; ratios are per-round medians")
    p.add_argument("--commands", type=int, default=0, metavar="N",
                   help="instead: time the two commands a user runs, as whole processes (Python start-up, imports "
                        "and data load included), N interleaved rounds: `initlab run PRESET` against this script's "
                        "peer alone (--peer-only)")
    p.add_argument("--peer-only", action="store_true", help=argparse.SUPPRESS)  # the peer as a plain script
    args = p.parse_args(argv)
    if args.commands:
        return _time_commands(args.preset, args.commands)
    global _clock
    _clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    from initlab.lab.data import load_dataset
    from initlab.lab.training import plan_groups, run_group

    exp = _experiment(args)
    train = exp.train
    t = time.perf_counter()
    data = load_dataset(exp.data)
    t_data = time.perf_counter() - t
    groups = plan_groups(exp)
    members = [m for g in groups for m in g.members]
    n_train, n_test = int(data.x_train.shape[0]), int(data.x_test.shape[0])
    samples = _samples(train, n_train, len(members))
    if args.peer_only:  # what a plain script does: load the data, train one model after the other
        _time_peer(members, data, train, samples)
        return 0
    print(f"initlab lab bench: preset {exp.name!r}, {len(exp.scenarios)} scenarios x {len(train.seeds)} seeds = "
          f"{len(members)} models in {len(groups)} group(s); batch {train.batch_size}, {train.steps} steps, "
          f"log every {train.log_every}; train {n_train}, test {n_test}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} cpus, {args.clock} clock; data load {t_data:.2f} s (not timed below)")
    gflops = sgemm_gflops()
    print(f"roofline: fp32 GEMM 2048^3 = {gflops:.1f} GFLOP/s")
    _warm_up()

    t_ens, results = _time_ensemble(groups, data, samples)
    if all(m.scenario.model.kind == "mlp" for m in members):
        _print_roofline(members, train, n_test, samples, gflops, t_ens, results)
    if args.profile:
        _print_op_profile(groups, data, train)
    ens_acc = _final([r for res in results for r in res.metrics], "test", "acc")
    # the same without flushing denormals to zero (saturated members then run at denormal speed)
    t = _clock()
    for g in groups:
        run_group(g, data, flush_denormal=False)
    t_ens_denormal = _clock() - t
    print(f"ensemble with flush_denormal=False: {t_ens_denormal:.2f} s end to end, {samples / t_ens_denormal:,.0f} training samples/s")
    t_e2e = float("nan") if args.skip_end_to_end else _time_end_to_end(exp, data, args.figure_workers)
    if args.skip_peer:
        return 0

    t_peer, peer = _time_peer(members, data, train, samples)
    print("\nfinal test accuracy, mean over seeds (same initial weights; the peer's DataLoader draws its own order):")
    for sc in exp.scenarios:
        e = [ens_acc[(sc.name, s)] for s in train.seeds]
        q = [peer[(sc.name, s)]["test_acc"] for s in train.seeds]
        print(f"  {sc.name:<28} ensemble {statistics.fmean(e):.3f}   peer {statistics.fmean(q):.3f}")
    print(f"\nround 1: training alone {t_peer / t_ens:.1f}x ({t_peer / t_ens_denormal:.1f}x with flush_denormal=False), "
          f"end to end {t_peer / t_e2e:.1f}x")
    rounds = [(t_ens, t_e2e, t_peer)]
    for k in range(2, args.rounds + 1):  # interleaved repeats: a load that changes hits every side alike
        print(f"\n-- round {k} --")
        r_ens = _time_ensemble(groups, data, samples)[0]
        r_e2e = float("nan") if args.skip_end_to_end else _time_end_to_end(exp, data, args.figure_workers)
        rounds.append((r_ens, r_e2e, _time_peer(members, data, train, samples)[0]))
        print(f"round {k}: training alone {rounds[-1][2] / r_ens:.1f}x, end to end {rounds[-1][2] / r_e2e:.1f}x")
    _print_ratios(rounds)
    return 0


def _time_commands(preset: str, rounds: int) -> int:
    """Wall time of ``initlab run PRESET`` (into a fresh folder) and of the peer alone, each a whole
    process, interleaved; prints each time, the medians and their ratio."""
    import subprocess
    import tempfile

    here = os.path.abspath(__file__)
    times: dict[str, list[float]] = {"initlab run": [], "peer script": []}
    for k in range(rounds):
        with tempfile.TemporaryDirectory() as tmp:
            cmds = {"initlab run": [sys.executable, "-m", "initlab.cli", "run", preset, "--out", os.path.join(tmp, "run")],
                    "peer script": [sys.executable, here, "--peer-only", "--preset", preset]}
            for name, cmd in cmds.items():
                t = time.perf_counter()
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                times[name].append(time.perf_counter() - t)
        print(f"round {k + 1}: " + ", ".join(f"{n} {v[-1]:.2f} s" for n, v in times.items())
              + f"; load average {os.getloadavg()[0]:.1f}")
    a, b = (statistics.median(v) for v in times.values())
    print(f"whole commands (Python start-up, imports, data, training, and for initlab TensorBoard, figures, report): "
          f"initlab run {preset} {a:.2f} s, peer script {b:.2f} s: {b / a:.1f}x (median of {rounds})")
    return 0


def _print_ratios(rounds: list[tuple[float, float, float]]) -> None:
    """Median over rounds of each round's ratios (each ratio pairs measurements taken minutes apart)."""
    train = statistics.median(p / e for e, _, p in rounds)
    e2e = statistics.median(p / e for _, e, p in rounds)
    print(f"\ntraining alone (run_group) vs peer: {train:.1f}x (goal >= 10x on 2 quiet cores); median of "
          f"{len(rounds)} round(s)")
    print(f"end to end (run_experiment with TensorBoard, figures, report) vs peer: {e2e:.1f}x "
          f"(goal >= 5x on 2 quiet cores); median of {len(rounds)} round(s)")
    print("times (s), ensemble / end to end / peer: "
          + "; ".join(f"{e:.1f} / {x:.1f} / {p:.1f}" for e, x, p in rounds))
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"load average at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} cpus")


if __name__ == "__main__":
    sys.exit(main())
