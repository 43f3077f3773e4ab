"""``initlab run``, ``initlab presets`` and ``initlab report``: the lab's command line.

Examples::

    initlab presets                                  # the built-in experiments
    initlab run classic                              # the classic study into runs/classic/
    initlab run my_study.toml --out runs/mine --seeds 5 --steps 2000
    initlab run classic --data-root ~/data/mnist     # full MNIST from IDX files
    initlab report runs/classic                      # rebuild figures and report.html from the CSVs
    initlab tune edge_tanh --samples 16              # a Ray Tune search (ASHA) over the [tune] table's space

Re-running ``initlab run`` with the same experiment and ``--out`` resumes: finished members
(scenario x seed) are skipped. An output directory holding another experiment is refused.
pandas, matplotlib and tensorboard load when a command needs them.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .._errors import InitlabError
from .._probe import format_table
from ._io import describe_os_error
from .config import list_presets, load_experiment, parse_set, with_overrides
from .executors import InProcess, make_executor
from .metrics import headline
from .report import load_run, summary_rows, write_report
from .report.stats import pct
from .run import run_experiment
from .tune import parse_param, run_tune, search_table, summary_lines

__all__ = ["register_cli", "cmd_run", "cmd_presets", "cmd_report", "cmd_tune"]


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _count(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 64], got {text!r}") from None
    if not 0 <= v <= 64:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 64], got {v}")
    return v


def _one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make the subcommand's usage errors one line, ``initlab: error: run: argument --steps: ...``, like every
    other error of the command line (argparse prints the usage first, and names the error by the parser)."""
    command = parser.prog.split()[-1]

    def error(message: str) -> None:
        parser.exit(2, f"initlab: error: {command}: {message} (see: {parser.prog} --help)\n")

    parser.error = error  # type: ignore[method-assign]
    return parser


def register_cli(subparsers: Any) -> None:
    """Add the ``run``, ``presets`` and ``report`` subcommands to ``initlab``'s parser."""
    _add_run(subparsers)
    _one_line_errors(subparsers.add_parser(
        "presets", help="list the built-in experiments",
        description="List the built-in experiment presets that `initlab run NAME` accepts.")).set_defaults(func=cmd_presets)
    p = _one_line_errors(subparsers.add_parser(
        "report", help="rebuild a run directory's figures and report.html",
        description="Rebuild figures/*.png and report.html of a run directory from its CSV files."))
    p.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by `initlab run`")
    p.set_defaults(func=cmd_report)
    _add_tune(subparsers)


def _add_run(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "run", help="run an experiment (a preset or a TOML file) into a run directory",
        description="Train every scenario x seed of an experiment as one batched ensemble and write a run "
                    "directory: config.toml, metrics.csv, first_pass.csv, TensorBoard logs (tb/), figures/ and "
                    "report.html. Re-running the same command resumes an interrupted run.",
    )
    p.add_argument("experiment", metavar="PRESET_OR_TOML",
                   help="a preset name (see `initlab presets`) or the path of a .toml experiment file")
    p.add_argument("--out", metavar="DIR", default=None, help="run directory (default: runs/<experiment name>)")
    p.add_argument("--device", metavar="DEVICE", default=None, help="where to train: cpu (default) or cuda")
    p.add_argument("--seeds", metavar="N", type=_positive_int, default=None, help="train seeds 0..N-1 per scenario")
    p.add_argument("--steps", metavar="N", type=_positive_int, default=None, help="training steps per model")
    p.add_argument("--data-root", metavar="DIR", default=None,
                   help="folder with the MNIST IDX files (full MNIST instead of the embedded 5,000-digit sample)")
    p.add_argument("--download", action="store_true",
                   help="download the MNIST IDX files into --data-root when they are missing (checksums verified)")
    p.add_argument("--threads", metavar="N", type=_positive_int, default=None,
                   help="torch threads (default: the idle physical cores; OMP_NUM_THREADS if set)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--figure-workers", metavar="N", type=_count, default=None,
                   help="processes that import the report's modules while the run trains and draw its figures "
                        "in parallel afterwards (default: 2 where at least 2 CPUs are idle beyond the training "
                        "threads, else fewer; 0: draw them after training, in this process and a fork of it)")
    p.add_argument("--fresh", action="store_true",
                   help="discard the results already in --out (same experiment only) and start over")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="set_",
                   help="override a [data], [model] or [train] key, the value read as TOML "
                        "(--set train.lr=0.01 --set model.hidden=[50,50]); repeatable; see docs/schema.md")
    _add_executor_options(p)
    p.set_defaults(func=cmd_run)
    _one_line_errors(p)


# ----------------------------------------------------------------------------- where the units run


def _add_executor_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where to run (the run directory is the same whichever you choose)")
    g.add_argument("--executor", metavar="NAME", default=None,
                   help="inprocess (default: this process), process (local worker processes) or ray (a Ray cluster)")
    g.add_argument("--workers", metavar="N", type=_positive_int, default=None,
                   help="--executor process: worker processes (default: one per CPU core)")
    g.add_argument("--address", metavar="ADDR", default=None,
                   help="--executor ray: auto, ray://HOST:PORT or HOST:PORT (default: $RAY_ADDRESS, else a local Ray)")
    g.add_argument("--retries", metavar="N", type=int, default=2,
                   help="times a failed unit is tried again on a pool or a cluster (default 2)")


def _executor_from_args(args: argparse.Namespace) -> Any:
    if args.retries < 0:
        raise InitlabError(f"--retries: expected an integer >= 0, got {args.retries}")
    ex = make_executor(args.executor, workers=args.workers, address=args.address)
    return None if isinstance(ex, InProcess) else ex


def _print_failed(summary: Any) -> None:
    for f in summary.failed:
        members = ", ".join(f"{sc} seed {seed}" for sc, seed in f["members"])
        print(f"  failed after {f['attempts']} attempt(s): {members}: {f['error']}", file=sys.stderr)
    print("  re-run the same command to train the failed units again", file=sys.stderr)


def _add_tune(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "tune", help="search an experiment's parameters with Ray Tune and ASHA early stopping",
        description="Run a Ray Tune search over the [tune] table of an experiment (and/or --param flags) for each "
                    "scenario, stopping poor trials early (ASHA); write OUT/run (a run directory, one scenario per "
                    "trial), OUT/tune_results.csv and OUT/tune_search.png. Needs the ray extra.")
    p.add_argument("experiment", metavar="PRESET_OR_TOML", help="a preset name or the path of a .toml experiment file")
    p.add_argument("--param", metavar="KEY=DIST", action="append", default=[],
                   help="a searched parameter, e.g. 'scheme.factor=loguniform(0.25,4)' or 'train.lr=loguniform(1e-4,1e-2)' "
                        "(distributions: uniform, loguniform, randint, choice, grid); repeatable")
    for flag, what in (("--samples", "trials per scenario"), ("--steps", "training steps per trial"),
                       ("--seeds", "train seeds 0..N-1 in each trial"), ("--cpus", "CPUs of the local Ray (default: all)")):
        p.add_argument(flag, metavar="N", type=_positive_int, default=None, help=what)
    p.add_argument("--seed", metavar="N", type=int, default=None, help="the sampler's seed (default 0)")
    p.add_argument("--metric", default=None, help="the objective, e.g. test_loss (default) or test_acc")
    p.add_argument("--address", default=None, help="a Ray cluster (auto, ray://HOST:PORT; default: RAY_ADDRESS or a "
                                                   "local Ray on 127.0.0.1)")
    p.add_argument("--data-root", metavar="DIR", default=None, help="folder with the MNIST IDX files")
    p.add_argument("--out", metavar="DIR", default=None, help="output directory (default: runs/<experiment name>-tune)")
    p.add_argument("--fresh", action="store_true",
                   help="discard the search already in --out (same search only) and start over; without it an "
                        "interrupted search resumes")
    p.set_defaults(func=cmd_tune, device=None, download=False)
    _one_line_errors(p)


def cmd_tune(args: argparse.Namespace) -> int:
    """``initlab tune``: run the search, then print the best trial of each scenario and where the files are."""
    exp = _experiment_from_args(args)
    table = dict(search_table(args.experiment))
    for key, flag in (("samples", args.samples), ("seed", args.seed), ("metric", args.metric)):
        if flag is not None:
            table[key] = flag
    params = dict(parse_param(text) for text in args.param)
    out = Path(args.out) if args.out is not None else _default_out(exp.name + "-tune")
    received: list[int] = []
    try:
        with _ClearErrors(f"tune {str(out)!r}"), _signals_interrupt(received):
            summary = run_tune(exp, table, out, address=args.address, cpus=args.cpus, params=params,
                               fresh=args.fresh)
    except KeyboardInterrupt:  # Ray turns the Terminated raised inside its calls into a KeyboardInterrupt
        if signal.SIGTERM not in received:
            raise
        print("initlab: terminated (SIGTERM); the finished trials are kept: re-run the same command to resume",
              file=sys.stderr)
        return 143
    print("\n".join(summary_lines(summary)))
    return 0


def _experiment_from_args(args: argparse.Namespace) -> Any:
    exp = load_experiment(args.experiment)
    overrides: dict[str, Any] = {}
    if args.steps is not None:
        overrides["train.steps"] = args.steps
        if exp.train.log_every > args.steps:
            overrides["train.log_every"] = args.steps  # log at least at the end
    if args.seeds is not None:
        overrides["train.seeds"] = list(range(args.seeds))
    if args.device is not None:
        overrides["train.device"] = args.device
    if args.data_root is not None:
        root = Path(args.data_root).expanduser()
        if root.exists() and not root.is_dir():
            raise InitlabError(f"--data-root: {args.data_root!r} is not a folder "
                               "(give the folder holding the MNIST IDX files)")
        if not root.is_dir() and not args.download:
            raise InitlabError(f"--data-root: folder {args.data_root!r} does not exist "
                               "(give the folder holding the MNIST IDX files, or add --download to fetch them)")
        overrides["data.root"] = str(root)
    elif args.download and exp.data.name in ("mnist", "mnist_idx") and not exp.data.root:
        raise InitlabError("--download needs --data-root DIR: the folder to download full MNIST into "
                           "(the default data set is the embedded 5,000-digit sample, which needs no download)")
    overrides.update(parse_set(getattr(args, "set_", [])))
    if overrides:
        try:
            exp = with_overrides(exp, overrides)
        except InitlabError as e:
            raise InitlabError(f"--set: {e}") from None
    return exp


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so that a run stops the same way:
    the finished work recorded, the lock released, resumable with the same command."""


@contextlib.contextmanager
def _signals_interrupt(received: list[int] | None = None) -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated` and SIGINT ``KeyboardInterrupt``, once:
    a second signal is ignored while the first one unwinds (so cleanup is never cut short by a traceback).
    The signal taken is appended to ``received``, when given."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = [signal.SIGINT, signal.SIGTERM]

    def handler(signum: int, frame: Any) -> None:
        if received is not None:
            received.append(signum)
        for sig in sigs:
            signal.signal(sig, signal.SIG_IGN)
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    old = {sig: signal.signal(sig, handler) for sig in sigs}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


class _ClearErrors(contextlib.AbstractContextManager):
    """``with _ClearErrors("run 'runs/x'"):`` turns an OSError or an out-of-memory error raised in the block
    into one clear InitlabError: what was being done, the cause, the path and what to do."""

    def __init__(self, action: str) -> None:
        self.action = action

    def __exit__(self, kind: Any, e: Any, tb: Any) -> bool:
        if isinstance(e, OSError):
            raise InitlabError(f"{self.action}: {describe_os_error(e)}") from None
        if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and _out_of_memory(e)):
            raise InitlabError(f"{self.action}: out of memory ({_first_line(e) or type(e).__name__}); use fewer "
                               "seeds or scenarios, smaller models, or a machine with more memory") from None
        return False


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else ""


def _out_of_memory(e: RuntimeError) -> bool:
    text = str(e).lower()
    return "can't allocate memory" in text or "out of memory" in text or "not enough memory" in text


def _default_out(name: str) -> Path:
    """``runs/<name>``, when the experiment's name is one plain folder name (it comes from a file, so it is
    checked: ``../x`` or an absolute path must not write outside ``runs/``)."""
    p = Path(name)
    if (len(p.parts) != 1 or p.name != name or name in (".", "..") or p.is_absolute() or p.drive
            or any(c in name for c in "/\\\x00") or name != name.strip()):
        raise InitlabError(f"name: {name!r} cannot name the output folder runs/<name>: it must be one plain folder "
                           "name (no '/', '\\', '..', absolute path or surrounding spaces); rename the experiment "
                           "or pass --out DIR")
    return Path("runs") / name


def cmd_run(args: argparse.Namespace) -> int:
    """``initlab run``: run the experiment, then say where the report and the TensorBoard logs are."""
    if args.out is not None and not args.out.strip():
        raise InitlabError(f"--out: expected a folder path, got {args.out!r}")
    exp = _experiment_from_args(args)
    out = Path(args.out) if args.out is not None else _default_out(exp.name)
    executor = _executor_from_args(args)
    try:
        with _ClearErrors(f"run {str(out)!r}"), _signals_interrupt():
            summary = run_experiment(exp, out, resume=not args.fresh, progress=not args.no_progress,
                                     download=bool(args.download), executor=executor, retries=args.retries,
                                     threads=args.threads, figure_workers=args.figure_workers)
    except Terminated:
        print("initlab: terminated (SIGTERM); the finished work is kept: re-run the same command to resume",
              file=sys.stderr)
        return 143
    if summary.members_run == 0 and summary.members_skipped:
        what = f"nothing to train, all {summary.members_skipped} model(s) already done"
    else:
        what = f"{summary.members_run} model(s) trained"
        if summary.members_skipped:
            what += f" ({summary.members_skipped} already done, skipped)"
    print(f"initlab: {exp.name}: {what} in {summary.wall_s:.1f} s -> {out}")
    if summary.diverged:
        print("  diverged: " + ", ".join(f"{d['scenario']} seed {d['seed']} (step {d['step']})" for d in summary.diverged))
    if summary.report is not None:
        _print_results(out)
        print(f"  report:      {summary.report}  (open it in a browser)")
    print(f"  data:        {out / 'metrics.csv'}, {out / 'first_pass.csv'}")
    print(f"  TensorBoard: tensorboard --logdir {out / 'tb'}")
    if summary.failed:
        _print_failed(summary)
        return 1
    return 0


def _print_results(run_dir: Path) -> None:
    try:
        rows = summary_rows(load_run(run_dir))
    except InitlabError:
        return
    if not rows:
        return
    key = f"test_{headline().name}"
    table = [{"scenario": r["scenario"], "final": pct(r[key]), "n": r[key].n} for r in rows]
    title = f"final test {headline().label} (mean \u00b1 std over seeds)"
    text = format_table(table, [("scenario", "scenario"), (title, "final"), ("n", "n")])
    print("\n".join("  " + line for line in text.splitlines()))


def cmd_presets(args: argparse.Namespace) -> int:
    """``initlab presets``: the built-in experiments, one per line."""
    rows = [{"name": name, "description": desc} for name, desc in list_presets()]
    text = format_table(rows, [("preset", "name"), ("description", "description")])
    print("\n".join(line.rstrip() for line in text.splitlines()))
    for name, _ in list_presets():
        claims = load_experiment(name).claims
        if claims:
            print(f"\n{name}: {len(claims)} claim(s)")
            for c in claims:
                print(f"  {c.id}: {c.claim} [{c.source}]")
    print("\nrun one with: initlab run NAME [--out DIR] [--set table.key=value]")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """``initlab report RUN_DIR``: rebuild the figures and report.html from the run directory's files."""
    with _ClearErrors(f"report {args.run_dir!r}"), _signals_interrupt():
        path = write_report(args.run_dir)
    print(f"initlab: report written to {path}")
    print(f"  TensorBoard: tensorboard --logdir {os.path.join(args.run_dir, 'tb')}")
    return 0

