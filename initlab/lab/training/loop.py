"""The step loop shared by the engines: data order, logging, divergence, optimiser.

Data order. Member ``(scenario, seed)`` reads the training set in the order drawn by
``torch.Generator().manual_seed(data_seed(seed))``: one ``torch.randperm(n)`` per epoch, cut into
consecutive minibatches of ``batch_size`` with a smaller last batch (``drop_last=False``, as a
``DataLoader(shuffle=True)`` does); :func:`~initlab.lab.training.plan.minibatch_indices` yields
that sequence. Members with the same seed see the same minibatches.

Metrics, one row per (scenario, seed, step, split, metric): see :mod:`initlab.lab.metrics`.
``split="test"`` rows come from the whole test set at step 0 (before training), every
``log_every`` steps and after the last step; ``split="train"`` rows at each logged step s > 0:
for ``loss`` and ``acc`` the mean over the steps since the previous log of the per-step
minibatch value (measured before that step's update), for a computed metric its value after
the step's update.

Divergence. A member whose minibatch loss is NaN/inf is removed from the ensemble (parameters,
gradients and optimiser state) while the others go on unchanged. On CPU this is checked at
every step, before the update (the bad step's gradient is never applied); on an accelerator at
each log step, to avoid a device sync per step (members are independent, so a NaN cannot leak).
Its rows end with NaN values at the first log step at or after its first non-finite step.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..._errors import unknown_choice
from ..._layers import activation_module
from ..metrics import ENGINE_METRICS, LogView, registered, values_by_name
from ..specs import OPTIMIZERS, TrainSpec
from .engines import Engine
from .optim import FusedAdam, FusedSGD, fused_supported
from .plan import Member, data_seed
from .records import histogram_rows, histogram_steps

__all__ = ["TrainLoop", "make_optimizer", "mlp_layer_stats", "mlp_layer_values"]


def make_optimizer(name: str, params: list[Tensor], lr: float, momentum: float = 0.0) -> Any:
    """Adam (defaults betas=(0.9, 0.999), eps=1e-8, as ``torch.optim.Adam``) or SGD (plain, or with
    ``momentum``: v <- momentum v + g, w <- w - lr v, as ``torch.optim.SGD``).

    :class:`~initlab.lab.training.optim.FusedAdam` / ``FusedSGD`` (torch's fused kernels, one call
    for every tensor, without importing ``torch._dynamo``) where the kernels take the tensors, else
    ``torch.optim``'s foreach implementation; all are elementwise, so per-member results are unchanged.
    """
    key = str(name).lower()
    if key not in OPTIMIZERS:
        raise unknown_choice("optimizer", name, OPTIMIZERS)
    if fused_supported(params):
        return FusedAdam(params, lr) if key == "adam" else FusedSGD(params, lr, momentum)
    kw: dict[str, Any] = {"momentum": float(momentum)} if momentum else {}
    return (torch.optim.Adam if key == "adam" else torch.optim.SGD)(params, lr=lr, foreach=True, **kw)


def _cloned(obj: Any) -> Any:
    """``obj`` with every tensor in it copied to the CPU (dicts and lists rebuilt): a snapshot."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _cloned(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cloned(v) for v in obj)
    return obj


def _sync_each_step(device: torch.device) -> bool:
    """Whether to read the losses back every step (free on CPU; a device sync on a GPU)."""
    return device.type == "cpu"


def _mlp_pass(layers: Sequence[Any], biases: Sequence[Tensor | None], m: int, activation: Any, xs: Tensor,
              y: Tensor) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Member ``m`` of a stacked MLP on ``(xs, y)`` in float64 on the CPU, from detached copies of its weights:
    (h_l per layer (the logits last), z_l with its gradient dL/dz_l, W_l with dL/dW_l), L the mean cross-entropy."""
    act = activation_module(activation)
    ws = [lay.weight[m].detach().double().cpu().requires_grad_(True) for lay in layers]
    h, zs, hs = xs, [], []
    for i, w in enumerate(ws):
        b = biases[i]
        z = h @ w + (b[m].detach().double().cpu() if b is not None else 0.0)
        z.retain_grad()
        zs.append(z)
        h = act(z) if i < len(ws) - 1 else z
        hs.append(h.detach())
    torch.nn.functional.cross_entropy(h, y.cpu()).backward()
    return hs, zs, ws


def _stacked_mlp(layers: Sequence[Any], biases: Sequence[Tensor | None] | None) -> bool:
    return biases is not None and len(biases) == len(layers) and all(lay.weight.dim() == 3 for lay in layers)


def mlp_layer_stats(layers: Sequence[Any], biases: Sequence[Tensor | None] | None, members: Sequence[Member],
                    x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Per member and weight layer l of a stacked MLP (weights (M, in, out), biases (M, 1, out)), on the batch
    ``(x, y)``: the mean and variance of h_l = phi(z_l) (the logits for the readout) and the variances of the
    back-propagated gradient dL/dz_l and of dL/dW_l for L the mean cross-entropy; each (M, L). NaN for other models.
    """
    M, L = len(members), len(layers)
    out = {k: torch.full((M, L), math.nan, dtype=torch.float64) for k in ("act_mean", "act_var", "grad_var", "wgrad_var")}
    if not _stacked_mlp(layers, biases):
        return out
    xs = x.reshape(x.shape[0], -1).detach().double().cpu()
    for m, mem in enumerate(members):
        hs, zs, ws = _mlp_pass(layers, biases, m, mem.scenario.activation, xs, y)  # type: ignore[arg-type]
        for i, (h, z, w) in enumerate(zip(hs, zs, ws)):
            out["act_mean"][m, i], out["act_var"][m, i] = float(h.mean()), float(h.var(unbiased=False))
            out["grad_var"][m, i] = float(z.grad.var(unbiased=False))  # type: ignore[union-attr]
            out["wgrad_var"][m, i] = float(w.grad.var(unbiased=False))  # type: ignore[union-attr]
    return out


def mlp_layer_values(layers: Sequence[Any], biases: Sequence[Tensor | None] | None, members: Sequence[Member],
                     x: Tensor, y: Tensor) -> list[dict[str, list[np.ndarray]]] | None:
    """Per member of a stacked MLP, on ``(x, y)``: ``{"activation": [h_1, ..., h_(L-1)], "gradient":
    [dL/dz_1, ..., dL/dz_(L-1)]}`` (hidden layers, float64 arrays; see :func:`mlp_layer_stats`); None for
    other models."""
    if not _stacked_mlp(layers, biases):
        return None
    xs = x.reshape(x.shape[0], -1).detach().double().cpu()
    out = []
    for m, mem in enumerate(members):
        hs, zs, _ = _mlp_pass(layers, biases, m, mem.scenario.activation, xs, y)  # type: ignore[arg-type]
        out.append({"activation": [h.numpy() for h in hs[:-1]],
                    "gradient": [z.grad.detach().numpy() for z in zs[:-1]]})  # type: ignore[union-attr]
    return out


class TrainLoop:
    """One group's training run: the live members and everything that follows them (data order
    generators, the epoch's batches, the log window, the optimiser), and the rows recorded.

    ``run()`` trains for ``train.steps`` steps and returns (metrics rows, diverged rows, seconds
    spent evaluating).
    """

    def __init__(self, engine: Engine, members: Sequence[Member], x_test: Tensor, y_test: Tensor, n_train: int,
                 train: TrainSpec, device: torch.device, progress: Callable[[int], Any] | None = None,
                 checkpoint: Callable[[dict[str, Any]], Any] | None = None) -> None:
        self.engine, self.x_test, self.y_test, self.n_train = engine, x_test, y_test, int(n_train)
        self.steps, self.batch, self.log_every = int(train.steps), int(train.batch_size), int(train.log_every)
        self.opt_name, self.lr = str(train.optimizer).lower(), float(train.lr)
        self.momentum = float(getattr(train, "momentum", 0.0))
        self.device, self.progress, self.checkpoint = device, progress, checkpoint
        self.check_every_step = _sync_each_step(device)
        self.layer_stats = bool(getattr(train, "layer_stats", False))
        self.computed = [m for m in registered() if m.compute is not None and (self.layer_stats or not m.optional)]
        n_probe = min(int(train.first_pass_batch), int(x_test.shape[0]))
        self.probe_x, self.probe_y = x_test[:n_probe], y_test[:n_probe]
        self.alive = list(members)
        self.gens = [torch.Generator().manual_seed(data_seed(m.seed)) for m in self.alive]
        self._new_optimizer()
        dtype = engine.params[0].dtype
        # the log window: per step since the last log, each member's minibatch loss and accuracy
        self.win_loss = torch.zeros(self.log_every, len(self.alive), device=device, dtype=dtype)
        self.win_acc = torch.zeros(self.log_every, len(self.alive), device=device, dtype=dtype)
        self.perm = self.full = self.tail = torch.empty(0, dtype=torch.long)
        self.pos, self.w, self.last_log = self.n_train, 0, 0
        self.metrics: list[dict[str, Any]] = []
        self.diverged: list[dict[str, Any]] = []
        self.pending_nan: dict[int, list[Member]] = {}  # log step -> members whose NaN rows are due there
        self.train_names = list(ENGINE_METRICS)  # the train metrics recorded so far (NaN rows after divergence)
        self.eval_s = 0.0
        # layer histograms (records.py): the steps due, the rows so far, TensorBoard's [scenario, seed, step, {tag: ...}]
        self.hist_steps = histogram_steps(self.steps, self.log_every) if self.layer_stats else set()
        self.hist_rows: list[dict[str, Any]] = []
        self.hist_tb: list[list[Any]] = []

    # --- the run
    def run(self, state: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]], float]:
        """Train to the last step, from the start or from ``state`` (a :meth:`state` of this group at a log step)."""
        if state is None:
            self._evaluate(0)
            self._record_histograms(0)
            self._report(0)
        else:
            self.restore(state)
            self._report(self.last_log)
        for step in range(self.last_log + 1, self.steps + 1):
            if not self.alive:
                break
            self._step(step)
            if step % self.log_every == 0 or step == self.steps:
                self._log(step)
        for s in sorted(self.pending_nan):
            self._flush_nan(s)
        if self.progress is not None and (not self.alive and self.last_log < self.steps):
            self.progress(self.steps)
        return self.metrics, self.diverged, self.eval_s

    def _report(self, step: int) -> None:
        if self.progress is not None:
            self.progress(step)

    def _step(self, step: int) -> None:
        """One training step of every live member (dropping those whose loss is not finite, on CPU)."""
        if self.pos >= self.n_train:
            self._new_epoch()
        b = min(self.batch, self.n_train - self.pos)
        k = self.pos // self.batch
        self._forward(k, b)
        if self.check_every_step and not math.isfinite(float(self.win_loss[self.w].sum())):
            finite = torch.isfinite(self.win_loss[self.w])
            if not bool(finite.all()):
                bad = (~finite).nonzero().flatten().tolist()
                self._drop(bad, [step] * len(bad))
                if self.alive:  # redo this step's forward for the members that remain
                    self._forward(k, b)
        self.pos += b
        if self.alive:
            self.engine.backward()
            self.opt.step()
            self.w += 1

    def _forward(self, k: int, b: int) -> None:
        idx = self.full[k] if b == self.batch else self.tail
        self.engine.train_forward(idx, self.win_loss[self.w], self.win_acc[self.w])

    def _new_epoch(self) -> None:
        self.perm = torch.stack([torch.randperm(self.n_train, generator=g) for g in self.gens]).to(self.device)
        self.full, self.tail = self._epoch_batches(self.perm)
        self.pos = 0

    def _epoch_batches(self, perm: Tensor) -> tuple[Tensor, Tensor]:
        """(full batches (k, M*B), last short batch (M*r,)) of an epoch, member-major rows."""
        M, k, B = perm.shape[0], self.n_train // self.batch, self.batch
        full = perm[:, :k * B].reshape(M, k, B).transpose(0, 1).reshape(k, M * B)
        return full, perm[:, k * B:].reshape(-1)

    def _log(self, step: int) -> None:
        """A log step: divergence check (accelerators), train rows, evaluation, due NaN rows, progress."""
        w = self.w
        if self.alive and w and not self.check_every_step:
            finite = torch.isfinite(self.win_loss[:w]).all(0)
            if not bool(finite.all()):
                bad = (~finite).nonzero().flatten().tolist()
                first = [self.last_log + 1 + int((~torch.isfinite(self.win_loss[:w, i])).nonzero()[0]) for i in bad]
                self._drop(bad, first)
        if self.alive and w:
            self._record(step, "train", self.alive, {"loss": self.win_loss[:w].mean(0).tolist(),
                                                      "acc": self.win_acc[:w].mean(0).tolist()})
            self._record_computed(step)
        self._evaluate(step)
        self._record_histograms(step)
        self._flush_nan(step)
        self.last_log, self.w = step, 0
        if self.checkpoint is not None:
            wants = getattr(self.checkpoint, "wants", None)  # a checkpointer that says which states it keeps
            if wants is None or wants(step):
                self.checkpoint(self.state())
        self._report(step)

    # --- checkpoints
    def state(self) -> dict[str, Any]:
        """Everything the rest of the run depends on, at a log step (``w == 0``): a plain dict of
        tensors, numbers, strings and lists that ``torch.save`` writes and ``torch.load(weights_only=True)``
        reads back. :meth:`restore` continues from it bit for bit."""
        return {
            "step": self.last_log,
            "alive": [list(m.key) for m in self.alive],
            "gens": [g.get_state() for g in self.gens],
            "perm": self.perm.detach().cpu().clone(),
            "pos": self.pos,
            "params": [p.detach().cpu().clone() for p in self.engine.params] if self.alive else [],
            "opt": _cloned(self.opt.state_dict()) if self.alive else {},
            "metrics": list(self.metrics),
            "diverged": list(self.diverged),
            "pending_nan": [[s, [list(m.key) for m in ms]] for s, ms in sorted(self.pending_nan.items())],
            "train_names": list(self.train_names),
            "hist_rows": list(self.hist_rows),
            "hist_tb": [list(h) for h in self.hist_tb],
        }

    def restore(self, st: dict[str, Any]) -> None:
        """Continue from :meth:`state`: drop the members that had diverged, then load the weights, the
        optimiser state, the data-order generators and the rows recorded so far."""
        by_key = {m.key: m for m in self.alive}
        keys = [m.key for m in self.alive]
        keep = [keys.index((str(k[0]), int(k[1]))) for k in st["alive"]]
        if keep != list(range(len(keys))):
            if keep:
                self.engine.keep(keep)
            self.alive = [self.alive[i] for i in keep]
        self.gens = [torch.Generator() for _ in keep]
        for g, gs in zip(self.gens, st["gens"]):
            g.set_state(gs)
        if self.alive:
            with torch.no_grad():
                for p, v in zip(self.engine.params, st["params"], strict=True):
                    p.copy_(v)
            self._new_optimizer()
            self.opt.load_state_dict(st["opt"])
        self.perm = st["perm"].to(self.device)
        if self.perm.numel():
            self.full, self.tail = self._epoch_batches(self.perm)
        self.pos, self.last_log, self.w = int(st["pos"]), int(st["step"]), 0
        dtype = self.win_loss.dtype
        self.win_loss = torch.zeros(self.log_every, len(self.alive), device=self.device, dtype=dtype)
        self.win_acc = torch.zeros(self.log_every, len(self.alive), device=self.device, dtype=dtype)
        self.metrics, self.diverged = list(st["metrics"]), list(st["diverged"])
        self.pending_nan = {int(s): [by_key[(str(k[0]), int(k[1]))] for k in ks] for s, ks in st["pending_nan"]}
        self.train_names = list(st["train_names"])
        self.hist_rows, self.hist_tb = list(st.get("hist_rows", [])), [list(h) for h in st.get("hist_tb", [])]

    # --- rows
    def _record(self, step: int, split: str, mems: Sequence[Member], values: dict[str, list[float]]) -> None:
        for i, m in enumerate(mems):
            base = dict(scenario=m.scenario.name, seed=int(m.seed), step=step, split=split)
            for name, vals in values.items():
                self.metrics.append({**base, "metric": name, "value": float(vals[i])})

    def _record_computed(self, step: int) -> None:
        """The registry's computed metrics, from the live members' weights and last gradients."""
        if not self.computed:
            return
        layers = tuple(self.engine.layers())
        cache: dict[str, Tensor] = {}

        def stats() -> dict[str, Tensor]:
            if not cache:
                with torch.enable_grad():
                        cache.update(mlp_layer_stats(layers, getattr(self.engine, "b", None), self.alive, self.probe_x,
                                                 self.probe_y))
            return cache

        view = LogView(step, tuple(m.key for m in self.alive), layers, stats if self.layer_stats else None)
        for metric in self.computed:
            with torch.no_grad():
                values = values_by_name(metric, metric.compute(view))  # type: ignore[misc]
            for name in values:
                if name not in self.train_names:
                    self.train_names.append(name)
            self._record(step, "train", self.alive, values)

    def _record_histograms(self, step: int) -> None:
        """At a due step, the live members' layer histograms (:mod:`.records`) on the per-layer statistics' batch."""
        if step not in self.hist_steps or not self.alive:
            return
        with torch.enable_grad():
            values = mlp_layer_values(tuple(self.engine.layers()), getattr(self.engine, "b", None), self.alive,
                                      self.probe_x, self.probe_y)
        for m, v in zip(self.alive, values or ()):
            rows, tb = histogram_rows(v, m.scenario.name, int(m.seed), step)
            self.hist_rows.extend(rows)
            self.hist_tb.append([m.scenario.name, int(m.seed), step, tb])

    def _evaluate(self, step: int) -> None:
        n_test = int(self.x_test.shape[0])
        if n_test == 0 or not self.alive:
            return
        t = time.perf_counter()
        loss, correct = self.engine.evaluate(self.x_test, self.y_test)
        self._record(step, "test", self.alive, {"loss": (loss / n_test).tolist(),
                                                 "acc": (correct.double() / n_test).tolist()})
        self.eval_s += time.perf_counter() - t

    def _flush_nan(self, step: int) -> None:
        nan = [math.nan]
        for m in self.pending_nan.pop(step, []):
            self._record(step, "train", [m], {name: nan for name in self.train_names})
            self._record(step, "test", [m], {name: nan for name in ENGINE_METRICS})

    # --- divergence
    def _drop(self, bad: list[int], first_bad: list[int]) -> None:
        """Remove the members at positions ``bad`` (first non-finite steps ``first_bad``) from everything."""
        bad_set = set(bad)
        keep = [i for i in range(len(self.alive)) if i not in bad_set]
        for i, s in zip(bad, first_bad):
            m = self.alive[i]
            self.diverged.append(dict(scenario=m.scenario.name, seed=int(m.seed), step=int(s)))
            log_at = min(self.steps, -(-s // self.log_every) * self.log_every)
            self.pending_nan.setdefault(log_at, []).append(m)
        old_opt = self.opt
        triples = self.engine.keep(keep) if keep else []
        self.alive = [self.alive[i] for i in keep]
        self.gens = [self.gens[i] for i in keep]
        if not keep:
            return
        ki = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.perm = self.perm.index_select(0, ki)
        self.full, self.tail = self._epoch_batches(self.perm)
        self.win_loss, self.win_acc = self.win_loss.index_select(1, ki), self.win_acc.index_select(1, ki)
        self._new_optimizer()
        self._move_optimizer_state(old_opt, triples, ki)

    def _new_optimizer(self) -> None:
        """A new optimiser over the engine's parameters (its state is filled in afterwards: the first step
        reads it)."""
        self.opt = make_optimizer(self.opt_name, self.engine.params, self.lr, self.momentum)

    def _move_optimizer_state(self, old_opt: Any, triples: list[tuple[Tensor, Tensor, bool]],
                              ki: Tensor) -> None:
        for old_p, new_p, is_stacked in triples:
            st = old_opt.state.get(old_p)
            if st:
                self.opt.state[new_p] = {k: (v.index_select(0, ki) if is_stacked and isinstance(v, Tensor) and v.dim() > 0
                                             else (v.clone() if isinstance(v, Tensor) else v)) for k, v in st.items()}
