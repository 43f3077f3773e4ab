"""One unit of work: every member of a group trained at once (:func:`run_group`), and
:func:`run_unit`, its picklable form for executors.

:func:`run_group` is a pure function: no file I/O, no global state (it never changes torch's
global RNG or thread settings, and restores the denormal mode), and its inputs and outputs
pickle, so another executor (a Ray worker, a process pool) can run it.

Live reporting: ``on_log(event)`` is called at each log step with what is new since the previous
call (a plain dict that pickles, so a worker can forward it to the driver as it trains):
``step``; ``rows``, the metrics rows recorded since the previous event; ``first_pass`` (first
event only), the first-pass arrays per member; ``histograms`` (when due), one
:func:`weight_histogram` per live member and weight layer, ``{(scenario, seed): {"weights/<layer>":
summary}}``, plus the layer histograms recorded at that step (``"activations/layer<l>"``,
``"gradients/layer<l>"``: :mod:`.records`). After the last log step, a final event (``step`` =
steps) carries any rows recorded after it (members that diverged). Together the events hold every row of the result, in the order
recorded.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..._errors import InitlabError
from ..data import Dataset
from ..metrics import sort_key
from .._threads import one_thread
from .engines import build_engine, plan_engine
from .first_pass import first_pass
from .loop import TrainLoop
from .plan import GroupSpec, check_train, first_pass_indices, init_member, resolve_device
from .records import init_report_rows, tb_histogram

__all__ = ["GroupResult", "run_group", "run_unit", "weight_histogram"]

_SPLIT_RANK = {"train": 0, "test": 1}


@dataclass
class GroupResult:
    """What :func:`run_group` returns (plain Python and numpy objects only, so it pickles).

    - ``metrics``: dicts with keys scenario, seed, step, split ("train"/"test"), metric (a name of
      :mod:`initlab.lab.metrics`: "loss", "acc", ...), value (float; NaN after divergence);
    - ``first_pass``: the probe rows (``initlab.probe(...).rows``, one per weight layer) of each
      member's initial model on its first-pass batch, plus scenario, seed and
      ``batch_input_var`` (the batch's population variance over all entries; the probe's own
      ``input_var`` column is each layer's input variance, so layer 1's equals it);
    - ``first_pass_values``: ``{(scenario, seed): {"input", "mat_mul_<i>", "fc_out_<i>"}}`` raw
      float32 arrays for histograms (i from 1: the pre-activation without bias of weight layer i,
      and the output of the activation that consumes it, or the layer output for the readout);
    - ``diverged``: dicts scenario, seed, step (first step whose minibatch loss was not finite);
    - ``wall_s``: seconds for the whole call; ``timings``: its parts ("init_first_pass", "setup",
      "train": the training steps, "eval": the test evaluations); ``engine``: "stacked", "vmap"
      or "per-member" (see :mod:`initlab.lab.training.engines`); ``device``: where it trained;
    - ``init``: the init report's per-layer rows of each member (``init.csv``: scenario, seed, source,
      index, layer, quantity, value; e.g. LSUV's iterations per layer; :mod:`.records`);
    - ``layer_histograms``: the fixed-bin histograms of activations and back-propagated gradients per
      hidden layer at step 0 and a few log steps (``train.layer_stats``, stacked MLPs; :mod:`.records`).
    """

    metrics: list[dict[str, Any]]
    first_pass: list[dict[str, Any]]
    first_pass_values: dict[tuple[str, int], dict[str, np.ndarray]]
    diverged: list[dict[str, Any]]
    wall_s: float
    engine: str = ""
    device: str = "cpu"
    timings: dict[str, float] | None = None
    init: list[dict[str, Any]] = field(default_factory=list)
    layer_histograms: list[dict[str, Any]] = field(default_factory=list)


def _dataset_tensors(data: Dataset, flatten: bool, device: torch.device, dtype: torch.dtype
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The data set's tensors on ``device`` (inputs in ``dtype``, flattened when asked; labels long)."""
    xs = []
    for x in (data.x_train, data.x_test):
        if flatten and x.dim() > 2:
            x = x.reshape(x.shape[0], -1)
        xs.append(x.to(device=device, dtype=dtype).contiguous())
    ys = [y.to(device=device, dtype=torch.long).contiguous() for y in (data.y_train, data.y_test)]
    if xs[0].shape[0] != ys[0].shape[0] or xs[1].shape[0] != ys[1].shape[0]:
        raise InitlabError(f"dataset sizes disagree: x_train {tuple(xs[0].shape)}, y_train {tuple(ys[0].shape)}, "
                           f"x_test {tuple(xs[1].shape)}, y_test {tuple(ys[1].shape)}")
    return xs[0], ys[0], xs[1], ys[1]


def _check_inputs(spec: GroupSpec, data: Dataset) -> torch.device:
    if not spec.members:
        raise InitlabError("group has no members")
    check_train(spec.train)
    device = resolve_device(getattr(spec.train, "device", "cpu"))
    for name in ("x_train", "y_train", "x_test", "y_test"):
        if not isinstance(getattr(data, name, None), Tensor):
            raise InitlabError(f"dataset.{name} must be a torch.Tensor, got {type(getattr(data, name, None)).__name__} "
                               f"(load data with initlab.lab.data.load_dataset)")
    if int(data.x_train.shape[0]) == 0:
        raise InitlabError("dataset has no training examples")
    return device


def _init_members(spec: GroupSpec, data: Dataset) -> tuple[list[nn.Module], list[dict[str, Any]], dict, list]:
    """Build, initialise and probe every member on CPU (reproducible whatever the device); also the
    init reports' per-layer rows."""
    n_train = int(data.x_train.shape[0])
    models, rows_all, values_all, init_rows = [], [], {}, []
    for mem in spec.members:
        fp_idx = first_pass_indices(mem.seed, n_train, int(spec.train.first_pass_batch))
        xb = data.x_train.index_select(0, fp_idx).float()
        yb = data.y_train.index_select(0, fp_idx).long()
        reports: list[Any] = []
        model = init_member(mem.scenario, mem.seed, batch=xb, reports=reports)
        for report in reports:
            init_rows.extend(init_report_rows(report, mem.scenario.name, mem.seed))
        with one_thread():  # first_pass.csv independent of --threads, the load and the executor
            rows, values, input_var = first_pass(model, xb, yb, mem.scenario.activation,
                                                 jacobian=bool(getattr(spec.train, "jacobian", False)))
        for r in rows:
            # the probe's own "input_var" column is each layer's input variance (layer 1: the batch)
            r.setdefault("input_var", input_var)
            r.update(scenario=mem.scenario.name, seed=int(mem.seed), batch_input_var=input_var)
        rows_all.extend(rows)
        values_all[mem.key] = values
        models.append(model)
    return models, rows_all, values_all, init_rows


def _flush_denormal_on() -> bool:
    """Whether this thread's CPU flushes denormal floats to zero (DAZ: a denormal input reads as 0)."""
    return float(torch.tensor([1e-39], dtype=torch.float32).mul(1.0)) == 0.0


def weight_histogram(w: Tensor) -> dict[str, Any]:
    """A histogram of a tensor's finite values as plain numbers (TensorBoard's raw histogram fields):
    min, max, num, sum, sum_squares, and 30 equal buckets over [min, max] (``bucket_limit``: their
    upper edges, ``bucket``: their counts). Computed in float64 from the values alone (numpy's pairwise sums, no
    BLAS, whose threads would change the last bits), so the same
    weights give the same histogram on any executor. The counts of float32 weights come from sorting
    the float32 values (half the bytes of float64; numpy compares them with the float64 edges in
    float64, so the counts are the same)."""
    t = w.detach().to("cpu").flatten()
    a = t.to(torch.float64).numpy()
    finite = np.isfinite(a)
    whole = bool(finite.all())
    if not whole:
        a = a[finite]
    if not a.size:
        return tb_histogram(a, np.zeros(1), np.zeros(0))
    lo, hi = float(a.min()), float(a.max())
    edges = np.unique(np.linspace(lo, hi, 31)) if hi > lo else np.array([lo, np.nextafter(lo, np.inf)])
    counts, _ = np.histogram(t.numpy() if whole and t.dtype == torch.float32 else a, bins=edges)
    return tb_histogram(a, edges, counts)


class _Reporter:
    """The loop's ``progress`` callable when live events are asked for: at each log step, the rows
    recorded since the previous event (and the first-pass arrays, then the weight histograms when due)
    go to ``on_log``, then ``progress(step)`` is called."""

    def __init__(self, on_log: Callable[[dict[str, Any]], Any], progress: Callable[[int], Any] | None,
                 first_pass: dict, histograms_every: int, train: Any) -> None:
        self.on_log, self.progress, self.first_pass = on_log, progress, first_pass
        self.every = int(histograms_every) * int(train.log_every)
        self.steps = int(train.steps)
        self.loop: TrainLoop | None = None
        self.sent = 0

    def __call__(self, step: int) -> None:
        self.emit(int(step), histograms=True)
        if self.progress is not None:
            self.progress(step)

    def emit(self, step: int, histograms: bool = False) -> None:
        loop = self.loop
        assert loop is not None
        event: dict[str, Any] = {"step": step, "rows": [dict(r) for r in loop.metrics[self.sent:]]}
        self.sent = len(loop.metrics)
        if self.first_pass is not None:
            event["first_pass"], self.first_pass = self.first_pass, None
        if histograms and self.every > 0 and loop.alive and (step % self.every == 0 or step == self.steps):
            keys = [m.key for m in loop.alive]
            hists: dict[tuple[str, int], dict[str, Any]] = {k: {} for k in keys}
            for layer in loop.engine.layers():
                for i, k in enumerate(keys):
                    hists[k][f"weights/{layer.name}"] = weight_histogram(layer.weight[i])
            event["histograms"] = hists
        if histograms and self.every > 0:  # the layer histograms recorded at this step
            for sc, seed, st, tags in loop.hist_tb:
                if st == step:
                    event.setdefault("histograms", {}).setdefault((sc, seed), {}).update(tags)
        self.on_log(event)


def run_group(spec: GroupSpec, data: Dataset, *, progress: Callable[[int], Any] | None = None,
              dtype: torch.dtype = torch.float32, flush_denormal: bool = True,
              checkpoint: Callable[[dict[str, Any]], Any] | None = None,
              resume: dict[str, Any] | None = None, on_log: Callable[[dict[str, Any]], Any] | None = None,
              histograms_every: int = 1) -> GroupResult:
    """Train every member of ``spec`` on ``data`` at once; return metrics and first-pass statistics.

    Steps: build and initialise each member (:func:`~initlab.lab.training.plan.init_member`), run
    the first pass (:mod:`~initlab.lab.training.first_pass`), then train all members together for
    ``train.steps`` steps (:mod:`~initlab.lab.training.loop`: data order, metrics, divergence).
    ``progress(n)`` is called with the number of steps done so far (0..steps) at each log step.
    ``dtype`` is the training precision (float32; float64 for exactness checks).
    ``flush_denormal``: for the duration of the call, the CPU flushes denormal numbers (below
    1.2e-38 in float32) to zero (``torch.set_flush_denormal``; the previous mode is restored on
    return). Saturated members (sigmoid with N(0, 1) weights) produce gradients and Adam second
    moments that underflow into the denormal range, where x86 arithmetic is many times slower;
    flushing changes values below float32's normal range only: Adam's step m/(sqrt(v) + 1e-8)
    moves by less than 1e-30 of a weight.
    ``checkpoint(state)`` is called at each log step, after the step's rows are recorded and before
    ``progress``, with the training state (:meth:`~initlab.lab.training.loop.TrainLoop.state`: a dict
    of CPU tensors, numbers and lists, a snapshot the caller may keep or save); a ``checkpoint`` with a
    ``wants(step)`` method is called only at the steps where it returns True (a snapshot of the weights
    and the optimiser state costs a copy of them); ``resume=state``
    continues from such a state instead of step 0 (the members are still built, initialised and
    probed, which is deterministic), and gives results bit-identical to an uninterrupted call.
    ``on_log(event)``: live events at each log step (see the module docstring), with weight
    histograms every ``histograms_every`` log steps and at the last step (0: none).
    Pure: no file I/O and no global state; the arguments and the result pickle.
    """
    previous = _flush_denormal_on()
    if flush_denormal != previous:
        torch.set_flush_denormal(flush_denormal)
    try:
        return _run_group(spec, data, progress, dtype, checkpoint, resume, on_log, histograms_every)
    finally:
        if flush_denormal != previous:
            torch.set_flush_denormal(previous)


def _run_group(spec: GroupSpec, data: Dataset, progress: Callable[[int], Any] | None, dtype: torch.dtype,
               checkpoint: Callable[[dict[str, Any]], Any] | None = None, resume: dict[str, Any] | None = None,
               on_log: Callable[[dict[str, Any]], Any] | None = None, histograms_every: int = 1) -> GroupResult:
    t0 = time.perf_counter()
    device = _check_inputs(spec, data)
    models, first_pass_rows, fp_values, init_rows = _init_members(spec, data)
    t1 = time.perf_counter()
    plan = plan_engine(models, [m.scenario.activation for m in spec.members])
    x_train, y_train, x_test, y_test = _dataset_tensors(data, plan.flatten, device, dtype)
    engine = build_engine(plan, models, x_train, y_train, device, dtype)
    members = [spec.members[i] for i in plan.order]
    t2 = time.perf_counter()
    reporter = None if on_log is None else _Reporter(on_log, progress, fp_values, histograms_every, spec.train)
    loop = TrainLoop(engine, members, x_test, y_test, int(data.x_train.shape[0]), spec.train, device,
                     progress if reporter is None else reporter, checkpoint)
    if reporter is not None:
        reporter.loop = loop
    metrics, diverged, eval_s = loop.run(resume)
    if reporter is not None and reporter.sent < len(metrics):
        reporter.emit(int(spec.train.steps))
    t3 = time.perf_counter()
    rank = {m.key: i for i, m in enumerate(spec.members)}
    metrics.sort(key=lambda r: (rank[(r["scenario"], r["seed"])], r["step"], _SPLIT_RANK[r["split"]], sort_key(r["metric"])))
    diverged.sort(key=lambda r: rank[(r["scenario"], r["seed"])])
    hist_rows = sorted(loop.hist_rows, key=lambda r: (rank[(r["scenario"], r["seed"])], r["step"]))
    return GroupResult(metrics=metrics, first_pass=first_pass_rows, first_pass_values=fp_values, diverged=diverged,
                       wall_s=time.perf_counter() - t0, engine=engine.kind, device=str(device),
                       timings={"init_first_pass": t1 - t0, "setup": t2 - t1, "train": t3 - t2 - eval_s, "eval": eval_s},
                       init=init_rows, layer_histograms=hist_rows)


def run_unit(item: tuple[GroupSpec, Dataset]) -> GroupResult:
    """Module-level (picklable) unit of work for executors: ``run_group(spec, data)``."""
    spec, data = item
    return run_group(spec, data)
