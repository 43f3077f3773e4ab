"""``audit``: probe a model on a batch and say in plain words what is wrong with its initialization.

``audit(model, batch)`` runs :func:`initlab.probe` (forward, and backward: with ``target``/``loss``
the real loss, otherwise a fixed random unit-variance gradient at the output, which isolates
how the network propagates gradients) and turns the per-layer numbers into findings, each with
a severity, the layer, a message and a suggested fix. The rules and their thresholds:

* **saturation** (bounded activations of the table: sigmoid, tanh, softsign, hardtanh): share of unit values where
  phi'(x) < 10% of its maximum. warning >= ``SATURATED_WARN`` (20%), error >= ``SATURATED_ERROR``
  (50%). "Weights too large" when the pre-activation variance (without bias) exceeds 1.
* **dead ReLUs** (activations zero on the negative half-line: relu, relu6): share of units that are 0
  for every sample of the batch.
  warning >= ``DEAD_WARN`` (10%), error >= ``DEAD_ERROR`` (40%); one level lower when the
  layer's inputs are far from centred (E[x]^2 > E[x^2] / 4, e.g. after a ReLU and max-pool) and
  the biases are not to blame: then the cure is normalisation rather than another init.
* **signal**: r = (pre_var[last] / pre_var[first]) ** (1 / (L - 1)), the geometric-mean change
  per layer of the pre-activation variance (without bias) over the L layers in forward order.
  warning when r is outside [1/``RATIO``, ``RATIO``] = [0.5, 2] *and* the total change r^(L-1)
  is outside [1/``TOTAL``, ``TOTAL``] = [1/4, 4]; error when the total change exceeds
  ``TOTAL_ERROR`` (1e3) either way.
* **gradient**: the same rule, backwards, on the squared gradient norm per sample
  units * Var(dL/dh) (width-adjusted, so that a well-scaled network whose layers differ in width
  is not flagged: with He's fan_in scaling, per-unit gradient variance changes with the width but
  the norm does not). "grows" means towards the input (exploding), "shrinks" vanishing.
* **output scale**: the readout's output variance above ``OUTPUT_VAR_WARN`` (100): logits that
  large saturate the softmax at the first step.
* **non-finite**: NaN or inf anywhere in the measured statistics (error).
* **theory**: info only, where the measured pre-activation variance differs from the variance
  recursion's prediction by more than ``THEORY_RATIO`` (2x) (correlated inputs, a non-Gaussian
  regime, or a structure the recursion does not model).

* **dead units at small batches**: a live unit is 0 on all B samples with probability 2^-B, so
  only the share beyond p0 + 3 sqrt(p0 (1 - p0) / units), p0 = 2^-B, counts (:func:`dead_excess`).

Fixes name the scheme the activation table suggests for the activation: He (relu family; He et
al. 2015), Xavier or Kumar for sigmoid (Glorot & Bengio 2010; Kumar 2017), Xavier/LeCun for tanh,
LeCun for SELU (Klambauer et al. 2017), or ``initlab.init_model(model, "auto")`` -- never the
scheme in use (declared with ``scheme=`` / ``--init``, else :func:`detect_scheme` from the weights'
variance), nor ``auto``'s identical choice: that one is called "in use" and the next follows
(then LSUV, Mishkin & Matas 2016, or normalisation layers).

The table leaves a prediction empty where it tests no theory (:func:`theory_rows`): after a norm,
a residual merge or attention the recursion restarts from the measured input, and the backward
recursion is anchored at the last layer of each chain. ``--fail-on warning|error``: exit status 1
when a finding is at least that severe (0 otherwise; 2 for usage errors).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Mapping
from contextvars import ContextVar
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ._activations import resolve_activation
from ._apply import init_model
from ._errors import InitlabError, is_out_of_memory, memory_error, one_line_usage_errors, unknown_choice
from ._forward import as_inputs, first_tensor
from ._layers import guess_input_shape, mlp, output_width
from ._mnist import embedded_split
from ._probe import READOUT, ProbeResult, _named_loss, probe
from ._schemes import get_scheme
from ._text import fmt, format_table

__all__ = ["audit", "AuditResult", "Finding", "register_cli"]

SATURATED_WARN = 0.2
SATURATED_ERROR = 0.5
DEAD_WARN = 0.1
DEAD_ERROR = 0.4
RATIO = 2.0
TOTAL = 4.0
TOTAL_ERROR = 1e3
OUTPUT_VAR_WARN = 100.0
THEORY_RATIO = 2.0

SEVERITIES = ("error", "warning", "info")
FAIL_ON = ("never", "warning", "error")


@dataclass(frozen=True)
class Finding:
    """One problem: ``severity`` ("error", "warning" or "info"), ``layer`` (module name, or None for
    the whole model), ``message`` (plain language), ``fix`` (what to try) and ``code`` (a stable
    identifier: saturation, dead_relu, signal_shrinks, signal_grows, gradient_vanishes,
    gradient_explodes, output_scale, non_finite, theory_mismatch)."""

    severity: str
    layer: str | None
    message: str
    fix: str
    code: str

    def __str__(self) -> str:
        return f"[{self.severity}] {self.message}" + (f" -> {self.fix}" if self.fix else "")


@dataclass
class AuditResult:
    """Findings (most severe first) and the probe they came from. ``ok`` is True when no
    finding is a warning or an error."""

    findings: list[Finding]
    probe: ProbeResult
    model: str = ""
    batch_shape: tuple[int, ...] = ()
    notes: list[str] = field(default_factory=list)
    in_use: str | None = None

    @property
    def ok(self) -> bool:
        return not any(f.severity in ("error", "warning") for f in self.findings)

    def codes(self) -> set[str]:
        """The codes of the warnings and errors (infos excluded)."""
        return {f.code for f in self.findings if f.severity != "info"}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; ``theory`` lists, per row, why it has no prediction ("" where it has one)."""
        return {"model": self.model, "batch_shape": list(self.batch_shape), "ok": self.ok,
                "in_use": self.in_use, "findings": [asdict(f) for f in self.findings], "probe": self.probe.to_dict(),
                "theory": [r["theory"] for r in theory_rows(self.probe)], "notes": list(self.notes)}

    def exit_code(self, fail_on: str = "never") -> int:
        """The CLI's exit status for ``--fail-on``: 1 when a finding is at least that severe
        ("warning": a warning or an error; "error": an error), else 0 ("never": always 0)."""
        if fail_on not in FAIL_ON:
            raise unknown_choice("fail_on", fail_on, FAIL_ON)
        worst = {"error": ("error",), "warning": ("error", "warning"), "never": ()}[fail_on]
        return 1 if any(f.severity in worst for f in self.findings) else 0

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def table(self) -> str:
        cols = [("#", "index"), ("layer", "layer"), ("act", "activation"), ("fan_in", "fan_in"),
                ("pre_var", "pre_var"), ("pre_sq", "pre_sq_mean"), ("predicted", "predicted_pre_sq_mean"), ("post_var", "post_var"),
                ("saturated", "saturated_frac"), ("dead", "dead_frac")]
        if self.probe.backward:
            cols += [("grad_var", "grad_pre_var"), ("predicted", "predicted_grad_pre_var")]
        rows = [dict(r, index=str(r["index"]), theory=_short(r["theory"])) for r in theory_rows(self.probe)]
        if any(r["theory"] for r in rows):
            cols.append(("no prediction because", "theory"))
        return format_table(rows, cols)

    def __str__(self) -> str:
        p = self.probe
        head = (f"initlab audit: {self.model or 'model'} on a batch of shape {tuple(self.batch_shape)} "
                f"(input E[x^2] = {fmt(p.input_sq_mean)}, Var = {fmt(p.input_var)})")
        lines = [head, "", self.table(), ""]
        if self.findings:
            lines.append("findings:")
            lines += [f"  {f}" for f in self.findings]
        else:
            lines.append("findings: none; the signal and the gradient keep their scale through the network")
        for n in self.notes + p.notes:
            lines.append(f"note: {n}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- rules


_IN_USE: ContextVar[str | None] = ContextVar("initlab_audit_in_use", default=None)
_AUTO_CALL = "initlab.init_model(model, 'auto')"
_LAST_RESORT = "lsuv (init_model(model, 'lsuv', batch=x): fitted on data) or normalisation layers"


def _canonical(name: str) -> str:
    """A scheme's registry name (aliases resolved); the name itself when it is not registered."""
    if name.strip() == _AUTO_CALL:
        return "auto"
    try:
        return get_scheme(name.strip()).name
    except InitlabError:
        return name.strip().lower()


def _auto_twin(act_name: str, used: str) -> set[str]:
    """What ``auto`` and a named scheme share for this activation: auto's own choice for it
    (kumar for sigmoid, he_normal for relu) is the same draw as auto, and vice versa."""
    try:
        label = get_scheme("auto").for_layer(resolve_activation(act_name)).label  # type: ignore[misc]
    except (InitlabError, TypeError):
        return set()
    choice = _canonical(label)
    if act_name != READOUT and choice == "he_normal" and resolve_activation(act_name).family != "relu":
        return set()  # auto's second-moment gain is not he_normal's gain outside the relu family
    return {choice} if used == "auto" else {"auto"} if used == choice else set()


def suggest(act_name: str, in_use: str | None = None) -> str:
    """The scheme(s) to try for layers followed by ``act_name`` (the activation table's advice),
    never the scheme already in use (``in_use``, or the one the running audit was told about):
    that one is named "in use" and the next candidates follow (then ``auto``, then LSUV)."""
    try:
        advice = resolve_activation(act_name).suggest
    except InitlabError:  # a custom callable's label
        advice = resolve_activation(lambda x: x).suggest
    in_use = in_use if in_use is not None else _IN_USE.get()
    if not in_use:
        return advice
    used = _canonical(in_use)
    names = [n.strip() for n in advice.split(" or ")] + [_AUTO_CALL]  # auto: the fallback of every advice
    same = {used} | _auto_twin(act_name, used)
    if not same & {_canonical(n) for n in names}:
        return advice
    left: list[str] = []
    for n in names:
        if _canonical(n) not in same and _canonical(n) not in {_canonical(m) for m in left}:
            left.append(n)
    return f"{' or '.join(left + [_LAST_RESORT])} ({in_use} is in use)"


def _short(why: str) -> str:
    """The table's words for a row's ``theory`` note."""
    parts = []
    for w in filter(None, why.split("; ")):
        if w.startswith("grad:"):
            parts.append("grad measured")
        elif "normalisation" in w:
            parts.append("after norm")
        elif "not modeled" in w:
            parts.append("not modeled")
        elif "one-hot" in w:
            parts.append("index input")
        else:
            parts.append("not a chain (residual/attention/pool)")
    return ", ".join(parts)


def _weight_story(rows: Sequence[dict[str, Any]]) -> str:
    """What the weights look like: N(0,1), PyTorch's default, or fan_in * Var(w) = x."""
    prods = sorted(r["fan_in"] * r["weight_var"] for r in rows
                   if r["fan_in"] and math.isfinite(r["weight_var"]))
    if not prods:
        return ""
    med = prods[len(prods) // 2]
    fan = sorted(r["fan_in"] for r in rows if r["fan_in"])[len(prods) // 2]
    if abs(med - 1.0 / 3.0) < 0.05:
        return "PyTorch default init (Var(w) = 1/(3 fan_in))"
    if fan > 4 and abs(med / fan - 1.0) < 0.2:
        return "N(0,1) weights (Var(w) = 1)"
    return f"weights with fan_in * Var(w) = {med:.3g}"


def _main_activation(rows: Sequence[dict[str, Any]]) -> str:
    acts = Counter(r["activation"] for r in rows if r["activation"] != READOUT)
    return acts.most_common(1)[0][0] if acts else READOUT


def _label(row: dict[str, Any]) -> str:
    return f"layer {row['index']} ({row['layer']})"


def _trend(values: Sequence[float]) -> tuple[float, float] | None:
    """(per-layer geometric-mean ratio, total ratio) from first to last, or None."""
    v = [x for x in values if math.isfinite(x) and x > 0]
    if len(v) < 2 or len(v) != len(values):
        return None
    total = v[-1] / v[0]
    return total ** (1.0 / (len(v) - 1)), total


def _severity(r: float, total: float) -> str | None:
    """A steep trend (per layer beyond x RATIO, in all beyond x TOTAL), or a slow drift whose total
    is beyond x TOTAL_ERROR (a 50-layer net growing x1.27 per layer: x1e5)."""
    far = total > TOTAL_ERROR or total < 1.0 / TOTAL_ERROR
    if not (1.0 / RATIO <= r <= RATIO) and not (1.0 / TOTAL <= total <= TOTAL):
        return "error" if far else "warning"
    return "error" if far else None


def _dead_finding(r: dict[str, Any], dead: float) -> Finding:
    """Dead ReLUs, with their likely cause: negative biases, or inputs far from centred (after a
    ReLU or a max-pool every input is >= 0, so the sign of a unit is mostly fixed by w . E[x] and
    some units stay negative for the whole batch; that is a property of the architecture more
    than of the init, so it is reported one level lower)."""
    severity = "error" if dead >= DEAD_ERROR else "warning"
    head = f"{100 * dead:.0f}% dead ReLUs in {_label(r)}: these units are 0 for every sample of the batch (beyond chance)"
    sd = math.sqrt(r["pre_var"]) if r["pre_var"] > 0 else 0.0
    shift = r["pre_bias_mean"] - r["pre_mean"]  # the mean bias
    m, sq = r["input_mean"], r["input_sq_mean"]
    if sd > 0 and shift < -0.5 * sd:
        return Finding(severity, r["layer"], f"{head}; negative biases (mean {fmt(shift)}) push them below 0",
                       f"zero the biases (bias='zeros') and use {suggest(r['activation'])}", "dead_relu")
    if math.isfinite(m) and math.isfinite(sq) and sq > 0 and m * m > 0.25 * sq:
        return Finding("warning" if severity == "error" else "info", r["layer"],
                       f"{head}; its inputs are far from centred (mean {fmt(m)}, E[x^2] {fmt(sq)}), so the sign of "
                       "a unit is mostly set by w . E[x]",
                       "normalise this layer's inputs (e.g. BatchNorm before it), use a larger batch, or try "
                       "leaky_relu", "dead_relu")
    return Finding(severity, r["layer"], f"{head}, so they pass no gradient",
                   f"zero the biases and use {suggest(r['activation'])}, or try leaky_relu", "dead_relu")


def _layer_findings(r: dict[str, Any], backward: bool, batch_size: int = 0) -> list[Finding]:
    """Non-finite values, saturation and dead units of one layer."""
    measured = [r["pre_var"], r["pre_bias_var"], r["post_var"]]
    if backward:
        measured.append(r["grad_pre_var"])
    if any(math.isinf(v) for v in measured) or math.isnan(r["pre_bias_var"]):
        return [Finding("error", r["layer"], f"{_label(r)}: non-finite values (NaN or inf) in the "
                        "activations or gradients; the scale overflowed",
                        f"use a variance-preserving init (try {suggest(r['activation'])})", "non_finite")]
    out: list[Finding] = []
    sat = r["saturated_frac"]
    if isinstance(sat, float) and math.isfinite(sat) and sat >= SATURATED_WARN:
        act = r["activation"]
        if r["pre_var"] > 1.0:
            why = f"weights too large for {act} (pre-activation variance {fmt(r['pre_var'])})"
        else:
            why = (f"pre-activations are shifted into the flat tails (mean {fmt(r['pre_bias_mean'])}); "
                   "check the biases and centre the inputs")
        out.append(Finding("error" if sat >= SATURATED_ERROR else "warning", r["layer"],
                           f"{_label(r)}: {100 * sat:.0f}% of {act} units saturated; {why}",
                           f"try {suggest(act)}", "saturation"))
    dead = r["dead_frac"]
    if isinstance(dead, float) and math.isfinite(dead):
        excess = dead_excess(dead, r["units"], batch_size)
        if excess >= DEAD_WARN:
            out.append(_dead_finding(r, excess))
    return out


def dead_excess(dead: float, units: float, batch_size: int) -> float:
    """The share of dead units beyond sampling noise: 0 when ``dead`` is within chance.

    A live unit whose pre-activation is positive for half the samples is 0 on all ``B``
    independent samples with probability p0 = 2^-B (25% at B = 2), so over ``units`` units the
    dead share by chance is p0 with standard error sqrt(p0 (1 - p0) / units). Only the share above
    p0 + 3 standard errors is counted, minus p0 itself; ``batch_size`` 0 (unknown) counts all.
    """
    if batch_size <= 0 or not units or not math.isfinite(units):
        return dead
    p0 = 0.5 ** batch_size
    if dead <= p0 + 3.0 * math.sqrt(p0 * (1.0 - p0) / units):
        return 0.0
    return dead - p0


def _signal_finding(rows: Sequence[dict[str, Any]], main_act: str, story: str) -> Finding | None:
    """Forward: the per-element pre-activation variance from the first layer to the last."""
    tr = _trend([r["pre_var"] for r in rows])
    sev = None if tr is None else _severity(*tr)
    if sev is None:
        return None
    per = tr[0]  # type: ignore[index]
    verb = "shrinks" if per < 1 else "grows"
    cause = f": {story} with {main_act}" if story else ""
    return Finding(sev, None,
                   f"signal variance {verb} x{per:.2g} per layer (pre-activation variance "
                   f"{fmt(rows[0]['pre_var'])} at layer {rows[0]['index']}, {fmt(rows[-1]['pre_var'])} at layer "
                   f"{rows[-1]['index']}){cause}",
                   f"try {suggest(main_act)}", "signal_shrinks" if per < 1 else "signal_grows")


def _gradient_finding(rows: Sequence[dict[str, Any]], main_act: str) -> Finding | None:
    """Backward: the squared gradient norm per sample, from the output back to the input."""
    tr = _trend([r["grad_pre_var"] * r["units"] for r in reversed(rows)])
    sev = None if tr is None else _severity(*tr)
    if sev is None:
        return None
    per = tr[0]  # type: ignore[index]
    verb = "grows" if per > 1 else "shrinks"
    kind = "exploding" if per > 1 else "vanishing"
    return Finding(sev, None,
                   f"gradient variance {verb} x{per:.2g} per layer towards the input "
                   f"({kind} gradients; width-adjusted: squared gradient norm per sample)",
                   f"try {suggest(main_act)}", "gradient_explodes" if per > 1 else "gradient_vanishes")


def _output_finding(rows: Sequence[dict[str, Any]], main_act: str) -> Finding | None:
    """A readout whose logits are large enough to saturate a softmax."""
    last = rows[-1] if rows else None
    if last is None or last["activation"] != READOUT or not math.isfinite(last["pre_bias_var"]) \
            or last["pre_bias_var"] <= OUTPUT_VAR_WARN:
        return None
    return Finding("warning", last["layer"],
                   f"{_label(last)}: output variance {fmt(last['pre_bias_var'])}; logits this large "
                   "saturate a softmax at the first step",
                   f"scale the layers down (try {suggest(main_act)}; lecun_normal for the readout)",
                   "output_scale")


def _theory_findings(rows: Sequence[dict[str, Any]]) -> list[Finding]:
    """Layers whose measured pre-activation variance is far from the variance recursion's."""
    out = []
    for r in rows:
        m, p = r["pre_sq_mean"], r["predicted_pre_sq_mean"]
        if all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in (m, p)) and \
                not (1.0 / THEORY_RATIO <= m / p <= THEORY_RATIO):
            out.append(Finding("info", r["layer"],
                               f"{_label(r)}: measured pre-activation second moment {fmt(m)} is {m / p:.2g}x the "
                               f"variance recursion's {fmt(p)} (correlated inputs, shifted means, or a "
                               "structure the recursion does not model)", "", "theory_mismatch"))
    return out


def theory_rows(result: ProbeResult) -> list[dict[str, Any]]:
    """The probe's rows with the predictions that test no theory left empty (NaN), and a ``theory``
    column that says why: where the variance recursion restarts from a measurement (after a
    norm, a residual merge, attention...: ``ProbeResult.theory``) its forward "prediction" is
    computed from the layer's measured input, and the backward recursion is anchored at the last
    layer of each chain, whose "prediction" is the measured gradient itself."""
    why = list(result.theory) or [""] * len(result.rows)
    out = []
    for i, r in enumerate(result.rows):
        row, notes = dict(r), []
        if i > 0 and why[i]:
            row["predicted_pre_sq_mean"] = row["predicted_post_sq_mean"] = float("nan")
            notes.append(why[i])
        if result.backward and (i == len(result.rows) - 1 or why[i + 1]):
            row["predicted_grad_pre_var"] = float("nan")
            notes.append("grad: measured here (the backward recursion starts at this layer)")
        row["theory"] = "; ".join(notes)
        out.append(row)
    return out


def findings_from(result: ProbeResult, in_use: str | None = None) -> list[Finding]:
    """Apply the rules of the module docstring to a probe result (most severe first); ``in_use``:
    the scheme the model was initialised with, which the fixes then never suggest."""
    token = _IN_USE.set(in_use)
    try:
        return _findings(result)
    finally:
        _IN_USE.reset(token)


#: schemes ``audit`` recognises in the weights when it is not told which one is in use
DETECTABLE = ("auto", "he_normal", "xavier_normal", "lecun_normal", "kumar", "torch_default")


def _expected_var(name: str, row: dict[str, Any]) -> float | None:
    """Var(w) that scheme ``name`` (as ``init_model`` applies it) gives this layer."""
    fans = (float(row["fan_in"]), float(row["fan_out"]))
    try:
        sch = get_scheme(name)
        if sch.for_layer is not None:
            act = None if row["activation"] == READOUT else resolve_activation(row["activation"])
            sch = sch.for_layer(act).scheme
        std = sch.target_std(fans)
    except (InitlabError, KeyError, TypeError, ValueError):
        return None
    return None if std is None else std * std


def detect_scheme(rows: Sequence[dict[str, Any]]) -> str | None:
    """The first of :data:`DETECTABLE` whose variance every weight layer has (within 5% plus four
    standard errors of a sample variance, sqrt(2 / numel)), or None."""
    usable = [r for r in rows if isinstance(r["fan_in"], (int, float)) and r["fan_in"] and r["fan_out"]
              and math.isfinite(r["weight_var"]) and r["weight_var"] > 0]
    if not usable:
        return None
    for name in DETECTABLE:
        ok = True
        for r in usable:
            want = _expected_var(name, r)
            tol = 0.05 + 4.0 * math.sqrt(2.0 / max(float(r["fan_in"]) * float(r["units"] or 1), 1.0))
            if want is None or want <= 0 or abs(r["weight_var"] / want - 1.0) > tol:
                ok = False
                break
        if ok:
            return name
    return None


def _findings(result: ProbeResult) -> list[Finding]:
    rows = result.rows
    if _IN_USE.get() is None:
        _IN_USE.set(detect_scheme(rows))
    main_act = _main_activation(rows)
    out = [f for r in rows for f in _layer_findings(r, result.backward, result.batch_size)]
    # an index lookup (Embedding) carries no propagated signal: its output variance is its weight
    # variance, so it does not start the depth trend of the signal or the gradient
    deep = [r for r in rows if r["kind"] not in ("Embedding", "EmbeddingBag")]
    out.append(_signal_finding(deep, main_act, _weight_story(deep)))
    if result.backward:
        out.append(_gradient_finding(deep, main_act))
    out.append(_output_finding(rows, main_act))
    out += _theory_findings(theory_rows(result))
    rank = {s: i for i, s in enumerate(SEVERITIES)}
    return sorted((f for f in out if f is not None), key=lambda f: rank[f.severity])


def output_tensor(out: Any) -> Tensor | None:
    """The tensor an audit measures in a model's output: the tensor itself; of a Hugging Face
    output object or a dict, ``logits`` (else ``last_hidden_state``, else its first tensor); of a
    tuple or list, its first element."""
    if isinstance(out, Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        v = out.get(key) if isinstance(out, Mapping) else getattr(out, key, None)
        if isinstance(v, Tensor):
            return v
    if isinstance(out, Mapping):
        return next((v for v in out.values() if isinstance(v, Tensor)), None)
    return first_tensor(out)


def _target_loss(loss: str | None, target: Tensor) -> Callable[[Any], Tensor]:
    """A named loss on :func:`output_tensor`; token labels (N, T) against logits (N, T, V) are flattened."""
    def f(out: Any) -> Tensor:
        y = output_tensor(out)
        if y is None:
            raise InitlabError(f"the model's output is a {type(out).__name__} without a tensor; pass loss=callable")
        name = loss or ("mse" if target.is_floating_point() or target.is_complex() else "cross_entropy")
        if name == "cross_entropy" and y.dim() == target.dim() + 1 and y.dim() > 2 and y.shape[:-1] == target.shape:
            return _named_loss(name, target.reshape(-1), y.reshape(-1, y.shape[-1]))
        return _named_loss(name, target, y)
    return f


def audit(model: nn.Module, batch: Tensor | tuple[Tensor, ...], *, target: Tensor | None = None,
          loss: Callable[..., Tensor] | str | None = None, backward: bool = True, seed: int = 0,
          scheme: str | None = None) -> AuditResult:
    """Probe ``model`` on ``batch`` and return its :class:`AuditResult` (findings + table).

    With ``target``/``loss`` the backward pass uses that loss (see :func:`initlab.probe`; a named
    loss or a target alone applies to the output's tensor: Hugging Face ``logits`` or
    ``last_hidden_state``, token labels flattened); otherwise, when ``backward`` is True, the
    output receives a fixed N(0, 1) gradient drawn with ``seed`` (loss = sum(output * g)), so
    the gradient findings describe the network, not the loss. ``backward=False`` skips the
    backward pass even with a target. ``scheme``: the scheme the model was initialised with (its
    name), never suggested as the fix. The model and its ``.grad`` are left unchanged.
    Thresholds: see the module docstring.
    """
    inputs = as_inputs(batch)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not -2**63 <= int(seed) < 2**64:
        raise InitlabError(f"seed must be an int in [-2**63, 2**64) (torch's seed range), got {type(seed).__name__}: {seed!r}")
    if not isinstance(backward, bool):
        raise InitlabError(f"backward must be True or False, got {backward!r}")
    if scheme is not None and not isinstance(scheme, str):
        raise InitlabError(f"scheme must be a scheme name or None, got {type(scheme).__name__}")
    if not backward:
        target = loss = None
    elif target is not None and isinstance(target, Tensor) and (loss is None or isinstance(loss, str)):
        loss = _target_loss(loss, target)
        target = None
    if loss is None and target is None and backward:
        gen = torch.Generator().manual_seed(int(seed))

        def loss(out: Any) -> Tensor:
            y = output_tensor(out)
            if y is None or not y.is_floating_point():
                raise InitlabError("audit's default backward needs a floating-point tensor output; "
                                   "pass target=... and loss=..., or backward=False")
            g = torch.randn(y.shape, generator=gen, dtype=torch.float32).to(device=y.device, dtype=y.dtype)
            return (y * g).sum()
    result = probe(model, inputs if len(inputs) > 1 else inputs[0], target=target, loss=loss)
    detected = None if scheme is not None else detect_scheme(result.rows)
    out = AuditResult(findings=findings_from(result, scheme), probe=result, model=type(model).__name__,
                      batch_shape=tuple(inputs[0].shape), in_use=scheme or detected)
    if detected is not None:
        out.notes.append(f"the weights have {detected}'s variance in every layer: treated as the scheme in use")
    if 0 < result.batch_size <= 4 and any(math.isfinite(r["dead_frac"]) for r in result.rows):
        out.notes.append(f"a batch of {result.batch_size}: a live ReLU unit is 0 on every sample with probability "
                         f"{0.5 ** result.batch_size:.3g}, so dead units are counted beyond that chance only; "
                         "use 32 samples or more")
    return out


# --------------------------------------------------------------------------- CLI


def build_mlp(widths: Sequence[int], activation: str) -> nn.Sequential:
    """``--mlp``: :func:`initlab._layers.mlp` (``Linear(w0, w1), act, ..., Linear(w_{n-2}, w_{n-1})``
    with PyTorch's default init), with the CLI's words for bad widths and for a model too big for memory."""
    if len(widths) < 2 or any(w < 1 for w in widths):
        raise InitlabError(f"--mlp needs at least two positive widths (e.g. 784,100,100,10), got {list(widths)}")
    n = sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:]))
    try:
        return mlp(widths, activation)
    except (RuntimeError, MemoryError) as e:
        if is_out_of_memory(e):
            big = max(zip(widths[:-1], widths[1:]), key=lambda ab: ab[0] * ab[1])
            raise memory_error(f"the --mlp model ({n:,} float32 parameters; its largest layer Linear({big[0]}, {big[1]}))",
                               4 * n, e) from e
        raise


def _parse_widths(text: str) -> list[int]:
    try:
        return [int(w) for w in text.replace(" ", "").split(",") if w]
    except ValueError as e:
        raise InitlabError(f"--mlp expects comma-separated integers like 784,100,100,10, got {text!r}") from e


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(w) for w in text.replace(" ", "").split(",") if w)
    except ValueError as e:
        raise InitlabError(f"--input-shape expects comma-separated integers like 1,28,28, got {text!r}") from e
    if not shape or any(s < 1 for s in shape):
        raise InitlabError(f"--input-shape needs positive sizes, got {text!r}")
    return shape


def load_factory(spec: str) -> Any:
    """Call ``module:factory`` (or ``path/to/file.py:factory``) and return what it returns.

    Your code never shadows an installed module: a module name is imported with the current
    folder searched *last*, and a file is loaded by its path under a private module name (the
    folder holding it is searched last too, so it can import the modules beside it). A name that
    an installed module takes (``secrets``, ``json``...) while a file of that name sits in the
    current folder is refused with a hint, instead of silently importing the installed one.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise InitlabError(f"--model expects MODULE:FACTORY (e.g. mypkg.models:make_model or models.py:make), got {spec!r}")
    mod_name, _, attr = spec.rpartition(":")
    if not mod_name or not attr:
        raise InitlabError(f"--model expects MODULE:FACTORY, got {spec!r}")
    if mod_name.endswith(".py") or os.sep in mod_name or (os.altsep and os.altsep in mod_name):
        module = _load_file(mod_name)
    else:
        module = _import_user_module(mod_name)
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        if factory is not None:
            raise InitlabError(f"--model: {spec} is a {type(factory).__name__}, not a function that returns a model; "
                               f"functions in {mod_name}: {', '.join(names[:20]) or 'none'}")
        raise unknown_choice(f"factory in {mod_name}", attr, names)
    try:
        return factory()
    except InitlabError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's factory, reported in one line (the chain keeps the traceback)
        raise InitlabError(f"--model: {spec}() raised {type(e).__name__}: {e}") from e


def _search_last(folder: str) -> None:
    """Make ``folder`` importable without letting it shadow anything installed: append it to sys.path."""
    folder = os.path.abspath(folder)
    if folder not in (os.path.abspath(p or os.curdir) for p in sys.path):
        sys.path.append(folder)


def _import_user_module(mod_name: str) -> Any:
    cwd = os.getcwd()
    _search_last(cwd)
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and mod_name.startswith(e.name):
            raise InitlabError(f"--model: cannot import module {mod_name!r} ({e}); run from the folder that holds "
                               "it, or pass the file's path (path/to/models.py:make)") from e
        raise InitlabError(f"--model: module {mod_name!r} needs a module that is not installed ({e})") from e
    except Exception as e:  # noqa: BLE001 - an error in the user's module, in one line
        raise InitlabError(f"--model: importing {mod_name!r} failed ({type(e).__name__}: {e})") from e
    paths = [getattr(module, "__file__", None), *list(getattr(module, "__path__", None) or [])]
    where = os.path.abspath(next((p for p in paths if p), "")) if any(paths) else ""
    top = mod_name.split(".")[0]
    local = [p for p in (os.path.join(cwd, top + ".py"), os.path.join(cwd, top)) if os.path.exists(p)]
    if local and not where.startswith(os.path.join(cwd, "")):
        raise InitlabError(f"--model: {top!r} is an installed module ({where or 'built in'}), so your {local[0]!r} is "
                           f"not imported in its place; rename your file, or pass its path: --model ./{top}.py:...")
    return module


def _load_file(path: str) -> Any:
    if not os.path.isfile(path):
        raise InitlabError(f"--model: file {path!r} not found")
    stem = os.path.splitext(os.path.basename(path))[0]
    name = f"_initlab_model_{''.join(c if c.isalnum() else '_' for c in stem)}"  # never an installed module's name
    sp = importlib.util.spec_from_file_location(name, path)
    if sp is None or sp.loader is None:
        raise InitlabError(f"--model: {path!r} is not a Python file that can be imported")
    module = importlib.util.module_from_spec(sp)
    _search_last(os.path.dirname(os.path.abspath(path)))  # its own imports of the modules beside it
    sys.modules[name] = module
    try:
        sp.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - an error in the user's file, in one line
        sys.modules.pop(name, None)
        raise InitlabError(f"--model: loading {path!r} failed ({type(e).__name__}: {e})") from e
    return module


def _gaussian(shape: tuple[int, ...], batch_size: int, gen: torch.Generator) -> Tensor:
    try:
        return torch.randn((batch_size, *shape), generator=gen)
    except (RuntimeError, MemoryError) as e:
        if is_out_of_memory(e):
            raise memory_error(f"a batch of shape {(batch_size, *shape)} (--batch-size, --input-shape)",
                               4 * batch_size * math.prod(shape), e) from e
        raise


def _mnist(batch_size: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """A batch of the embedded MNIST sample; never another data source in its place."""
    try:
        ds = embedded_split()
    except InitlabError as e:
        raise InitlabError(f"--data mnist: the embedded MNIST sample cannot be read ({e}); reinstall initlab, "
                           "or choose --data gaussian") from e
    except Exception as e:  # noqa: BLE001 - a broken installation or environment, in one line
        raise InitlabError(f"--data mnist: the embedded MNIST sample cannot be loaded ({type(e).__name__}: {e}); "
                           "reinstall initlab, or choose --data gaussian") from e
    x, y = ds.x_train, ds.y_train
    idx = torch.randperm(x.shape[0], generator=gen)[:batch_size]
    return x[idx].reshape(len(idx), -1).float(), y[idx]


def _model_from_args(args: argparse.Namespace) -> tuple[nn.Module, str, tuple[int, ...] | None, Any, Any]:
    """(model, its name, input shape or None, batch or None, target or None) from ``--mlp`` or ``--model``."""
    if args.mlp is not None:
        widths = _parse_widths(args.mlp)
        model = build_mlp(widths, args.act)
        return model, f"MLP {'-'.join(map(str, widths))} {resolve_activation(args.act).name}", (widths[0],), None, None
    made = load_factory(args.model)
    batch = target = None
    if isinstance(made, tuple):
        if not made or not isinstance(made[0], nn.Module) or len(made) > 3:
            raise InitlabError("--model factory must return a model, (model, batch) or (model, batch, target)")
        model = made[0]
        batch = made[1] if len(made) > 1 else None
        target = made[2] if len(made) > 2 else None
    elif isinstance(made, nn.Module):
        model = made
    else:
        raise InitlabError(f"--model factory must return an nn.Module or a (model, batch) tuple, "
                           f"got {type(made).__name__}")
    return model, f"{args.model} ({type(model).__name__})", None, batch, target


def _default_batch(args: argparse.Namespace, model: nn.Module, in_shape: tuple[int, ...] | None,
                   gen: torch.Generator, notes: list[str]) -> tuple[Tensor, Tensor | None]:
    """(batch, target) of ``--data``: MNIST digits (labels used for a model with 10 outputs), or
    N(0, 1) values of ``in_shape`` (guessed from the first layer when not given)."""
    if args.data == "mnist":
        x, y = _mnist(args.batch_size, gen)
        if in_shape is not None and math.prod(in_shape) != x.shape[1]:
            raise InitlabError(f"MNIST images have 784 pixels; the model input {in_shape} does not fit "
                               "(use --mlp 784,... or --input-shape 1,28,28)")
        if output_width(model) != 10:
            notes.append("labels not used (the model does not have 10 outputs): random output gradient")
            y = None
        return (x.reshape(x.shape[0], *in_shape) if in_shape is not None else x), y
    if in_shape is None:
        in_shape = guess_input_shape(model)
        if in_shape is None:
            raise InitlabError("cannot guess the model's input shape; pass --input-shape (e.g. 3,32,32)")
        notes.append(f"input shape guessed from the first layer: {in_shape}; set it with --input-shape")
    return _gaussian(in_shape, args.batch_size, gen), None


def _run_cli(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise InitlabError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not -2**63 <= args.seed < 2**64:
        raise InitlabError(f"--seed must be an int in [-2**63, 2**64) (torch's seed range), got {args.seed}")
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    notes: list[str] = []
    model, name, in_shape, batch, target = _model_from_args(args)
    if args.input_shape:
        in_shape = _parse_shape(args.input_shape)
    if batch is None:
        batch, target = _default_batch(args, model, in_shape, gen, notes)
    in_use = None
    if args.init is not None:
        init_model(model, args.init, generator=gen, batch=batch)  # the batch is used by data-dependent schemes
        name += f", init {args.init}"
        in_use = args.init
    elif args.mlp is not None:
        name += ", PyTorch default init"
        in_use = "torch_default"
    if args.forward_only and target is not None:
        notes.append("labels not used: --forward-only")
    result = audit(model, batch, target=target, backward=not args.forward_only, seed=args.seed, scheme=in_use)
    result.model = name
    result.notes.extend(notes)
    print(result.to_json() if args.json else result)
    return result.exit_code(args.fail_on)


def register_cli(subparsers: Any) -> None:
    """Add ``initlab audit`` to an argparse subparsers object."""
    p = subparsers.add_parser(
        "audit", help="probe a model on one batch and say what is wrong with its initialization",
        description=(
            "Run one forward and backward pass, print per-layer statistics beside the variance "
            "recursion's predictions, and list findings with suggested fixes. The model comes from "
            "--mlp (a Linear/activation stack with PyTorch's default init unless --init is given) or "
            "from --model MODULE:FACTORY: a function of your code, called without arguments, that "
            "returns a model, a (model, batch) pair or a (model, batch, target) triple "
            "(MODULE may also be a path to a .py file). Exit status: 0 when the audit ran (whatever it found, "
            "unless --fail-on), 1 with --fail-on warning|error when a finding is that severe or worse, "
            "2 for a usage error or a model/batch that cannot be run."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--mlp", metavar="WIDTHS", help="layer widths, e.g. 784,100,100,10")
    src.add_argument("--model", metavar="MODULE:FACTORY", help="factory in your code returning a model or (model, batch)")
    p.add_argument("--act", default="relu", help="activation between the --mlp layers (any initlab activation name)")
    p.add_argument("--init", default=None, help="initialise with this scheme first (e.g. normal, xavier_normal, he_normal, auto, lsuv)")
    p.add_argument("--data", choices=("gaussian", "mnist"), default="gaussian",
                   help="input batch: N(0,1) values, or MNIST digits scaled to [0,1] (with their labels)")
    p.add_argument("--input-shape", default=None, metavar="SHAPE",
                   help="input shape without the batch dimension, e.g. 1,28,28 (default: from the first layer)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="seed of the batch, the init and the output gradient")
    p.add_argument("--forward-only", action="store_true", help="skip the backward pass")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of the table")
    p.add_argument("--fail-on", choices=FAIL_ON, default="never",
                   help="exit 1 when a finding is this severe or worse (for CI): warning, error, or never")
    p.set_defaults(func=_run_cli)
    one_line_usage_errors(p)
