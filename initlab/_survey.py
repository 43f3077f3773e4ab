"""``initlab survey``: which initialisation each layer of a real model gets from its own library.

For every parameter tensor with two or more dimensions (every tensor with ``all_params=True``)
:func:`survey` infers, with :mod:`initlab._infer`, the distribution family (goodness of fit) and
the scheme whose std matches (fan-based with a mode and a gain, or a fixed std), then judges the
std against what ``auto`` gives for the activation that follows the layer
(:func:`initlab.find_activations`, the activation table's ``auto`` rule). Two passes over the model
settle what one tensor cannot: where several schemes give the same std (a square layer has
``fan_in == fan_out``) the one the model's unambiguous layers use is named, and a std that matches
no known scheme but recurs across layers of different fans is a ``fixed_std`` (GPT-2's
``0.02 / sqrt(2 n_layer)`` projections).

Where the model has an example input (:func:`initlab._zoo.example_inputs`), one forward pass
measures the variance of each surveyed layer's output: signal propagation at init. It runs
without gradients, dropout off (eval mode) and normalisation layers on the batch's statistics
(train mode, as in training); the model's modes and buffers are restored afterwards.

The command builds each model by its library's own code (:mod:`initlab._zoo`), on CPU, with real
tensors and a fixed seed, and prints a table and a one-line summary per model (``--json``:
machine-readable rows; ``--html F``: the tables as a web page). A model that fails (unknown name,
a factory that raises, no weight tensors) is one line on stderr; the others are still surveyed,
and the exit status is 1.
"""
from __future__ import annotations

import argparse
import gc
import html
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ._errors import InitlabError
from ._fans import fans as _fans
from ._forward import first_tensor, hooks, kept_buffers, no_mha_fastpath
from ._gains import gain as _gain
from ._graph import LayerLink, find_activations
from ._infer import Family, Match, fit_family, match_scheme, orthogonal_gain
from ._layers import init_weights, is_norm, is_weight_layer, kind_name
from ._schemes import get_scheme
from ._text import fmt, format_table, jsonable
from ._zoo import Built, load

__all__ = ["survey", "survey_spec", "ModelSurvey", "ROW_KEYS", "register_cli"]

#: the keys of every row (``--json``), in order
ROW_KEYS: tuple[str, ...] = (
    "name", "layer", "param", "kind", "shape", "numel", "fan_in", "fan_out", "mean", "std", "kurtosis",
    "distribution", "p_value", "p_values", "scheme", "mode", "gain", "gain_name", "target_std", "fans_basis",
    "std_basis", "label", "alternatives", "activation", "auto_scheme", "auto_std", "var_ratio", "verdict",
    "normalised", "out_var",
)
#: the variance ratio to ``auto`` within which a layer is "ok" (a factor 1.5 either way)
OK_RATIO = 1.5
_SHORT = {"truncated_normal": "trunc_normal"}


@dataclass
class _Tensor:
    name: str
    layer: str
    module: nn.Module
    param: str
    tensor: Tensor


@dataclass
class ModelSurvey:
    """One model's survey: ``rows`` (dicts with :data:`ROW_KEYS`), a one-line ``summary``, the
    ``signal`` measured by one forward pass (None when there was no example input; ``notes``
    says why) and how long it took."""

    spec: str
    name: str
    cls: str
    parameters: int
    rows: list[dict[str, Any]]
    summary: str = ""
    signal: dict[str, Any] | None = None
    signal_note: str = ""
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN becomes None)."""
        return jsonable({"spec": self.spec, "name": self.name, "class": self.cls, "parameters": self.parameters,
                          "summary": self.summary, "signal": self.signal, "signal_note": self.signal_note,
                          "notes": self.notes,
                          "seconds": round(self.seconds, 3), "rows": self.rows, "error": None})

    def columns(self) -> tuple[list[tuple[str, str]], list[dict[str, Any]]]:
        """``(cols, rows)`` of the table: ``(title, key)`` pairs and the rows with display keys added."""
        cols = [("tensor", "name"), ("kind", "kind"), ("shape", "_shape"), ("fan_in", "fan_in"),
                ("fan_out", "fan_out"), ("std", "std"), ("dist", "_dist"), ("p", "p_value"), ("scheme", "label"),
                ("act", "activation"), ("var/auto", "var_ratio"), ("verdict", "_verdict")]
        if self.signal and self.signal.get("rows"):
            cols.append(("out_var", "out_var"))
        shown = [{**r, "_shape": "x".join(map(str, r["shape"])), "_dist": _SHORT.get(r["distribution"], r["distribution"]),
                  "_verdict": _verdict_text(r)} for r in self.rows]
        return cols, shown

    def table(self) -> str:
        """The rows as an aligned text table."""
        return format_table(*reversed(self.columns()))

    def signal_line(self) -> str:
        """The signal propagation at init in one line (or why it was not measured)."""
        s = self.signal
        if not s:
            return f"signal: not measured ({self.signal_note})"
        first, last, lo, hi = s["first"], s["last"], s["min"], s["max"]
        return (f"signal at init ({s['input']}; {s['layers']} layer outputs): var {fmt(first[1])} ({first[0]}) -> "
                f"{fmt(last[1])} ({last[0]}); min {fmt(lo[1])} ({lo[0]}), max {fmt(hi[1])} ({hi[0]})")

    def __str__(self) -> str:
        head = f"{self.spec}: {self.cls}, {self.parameters / 1e6:.1f}M parameters, {len(self.rows)} tensors"
        parts = [head, self.table(), "", "summary: " + self.summary, self.signal_line()]
        return "\n".join(parts + [f"note: {n}" for n in self.notes])


def _verdict_text(row: dict[str, Any]) -> str:
    v = row.get("verdict")
    if v is None:
        return "-"
    return v + (", normed" if row.get("normalised") and v != "ok" else "")


# --------------------------------------------------------------------------------------------
# the tensors and their fans


def _tensors(model: nn.Module, all_params: bool, notes: list[str]) -> list[_Tensor]:
    """Every parameter once (a tied parameter under its first name), 1-d ones only with ``all_params``."""
    seen: dict[int, str] = {}
    out: list[_Tensor] = []
    tied: list[str] = []
    for layer, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            full = f"{layer}.{pname}" if layer else pname
            if isinstance(p, nn.parameter.UninitializedParameter):
                notes.append(f"{full}: uninitialised lazy parameter, skipped")
                continue
            if id(p) in seen:
                tied.append(f"{full} = {seen[id(p)]}")
                continue
            seen[id(p)] = full
            if p.dim() >= 2 or all_params:
                out.append(_Tensor(full, layer, module, pname, p))
    if tied:
        notes.append("tied parameters (surveyed once): " + ", ".join(tied[:4]) + (" ..." if len(tied) > 4 else ""))
    return out


def _is_hf_conv1d(module: nn.Module, p: Tensor) -> bool:
    """transformers' Conv1D: a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and p.dim() == 2 and getattr(module, "nf", None) == p.shape[1]


def _fan_sets(t: _Tensor) -> list[tuple[str, tuple[float, float]]]:
    """``[("module", fans), ("shape", fans)]``: module-aware fans (initlab), then the shape-only fans
    of ``torch.nn.init`` where they differ; a 1-d tensor gets its layer's weight fans (a bias)."""
    p, module = t.tensor, t.module
    if p.dim() < 2:
        w = getattr(module, "weight", None)
        if not isinstance(w, Tensor) or w.dim() < 2 or w is p:
            return []
        p = w
    shape_fans = _fans(p)
    mod_fans = shape_fans
    if _is_hf_conv1d(module, p):
        mod_fans = (p.shape[0], p.shape[1])
    elif is_weight_layer(module):
        try:
            mod_fans = _fans(p, module=module)
        except InitlabError:
            pass
    sets = [("module", mod_fans)]
    if tuple(map(float, shape_fans)) != tuple(map(float, mod_fans)):
        sets.append(("shape", shape_fans))
    return sets


# --------------------------------------------------------------------------------------------
# activations and auto


def _links(model: nn.Module, notes: list[str]) -> dict[str, LayerLink]:
    try:
        links = find_activations(model)
    except Exception as e:  # noqa: BLE001 - activations unknown is a note, not a failure
        notes.append(f"activations unknown ({type(e).__name__}: {str(e)[:120]})")
        return {}
    if links and not next(iter(links.values())).traced:
        notes.append("activations from module order (the model could not be traced with torch.fx)")
    return links


def _act_gains(link: LayerLink | None) -> list[tuple[str, float, str]]:
    """The following activation's gains (second moment, torch's table, Kumar's) as extra candidates."""
    act = None if link is None else link.activation
    if act is None:
        return []
    out = []
    for method, tag in (("second_moment", ""), ("torch", " (torch)"), ("kumar", "")):
        try:
            g = float(_gain(act, method=method))
        except InitlabError:
            continue
        name = f"kumar({act.label})" if method == "kumar" else f"{act.label}{tag}"
        out.append((name, g, name))
    return out


def _judge(row: dict[str, Any], t: _Tensor, link: LayerLink | None, modules: dict[str, nn.Module]) -> None:
    """``auto``'s choice for the layer and how far the measured variance is from it."""
    weights = [n for n, _, _ in init_weights(t.module)] if is_weight_layer(t.module) else []
    if link is None or t.param not in weights or not row["std"] or not math.isfinite(row["std"]):
        return
    choice = get_scheme("auto").for_layer(link.activation)
    target = choice.scheme.target_std((float(row["fan_in"]), float(row["fan_out"])))
    if not target:
        return
    ratio = (row["std"] / target) ** 2
    row.update(auto_scheme=choice.label, auto_std=target, var_ratio=ratio,
               verdict="ok" if 1 / OK_RATIO <= ratio <= OK_RATIO else ("low" if ratio < 1 else "high"),
               normalised=any(is_norm(modules[n]) for n in link.through if n in modules))


# --------------------------------------------------------------------------------------------
# one tensor, then the model


def _row(t: _Tensor, fam: Family, fan_sets: list[tuple[str, tuple[float, float]]], link: LayerLink | None) -> dict[str, Any]:
    fi, fo = fan_sets[0][1] if fan_sets else (None, None)
    return {
        "name": t.name, "layer": t.layer, "param": t.param, "kind": _kind(t), "shape": list(t.tensor.shape),
        "numel": t.tensor.numel(), "fan_in": fi, "fan_out": fo, "mean": fam.mean, "std": fam.std,
        "kurtosis": fam.kurtosis, "distribution": fam.distribution, "p_value": fam.p_value,
        "p_values": dict(fam.p_values), "activation": _act_name(link), "auto_scheme": None, "auto_std": None,
        "var_ratio": None, "verdict": None, "normalised": False, "out_var": None,
    }


def _kind(t: _Tensor) -> str:
    if t.tensor.dim() < 2:
        return f"{kind_name(t.module)}.{t.param}"
    return kind_name(t.module) if t.param in ("weight", "in_proj_weight") else f"{kind_name(t.module)}.{t.param}"


def _act_name(link: LayerLink | None) -> str | None:
    if link is None:
        return None
    return "none" if link.activation is None else link.activation.label


def _infer(tensors: Sequence[_Tensor], links: dict[str, LayerLink]) -> tuple[list[dict[str, Any]], list[list[Match]]]:
    rows, matches = [], []
    for i, t in enumerate(tensors):
        fam = fit_family(t.tensor, seed=i)
        fan_sets = _fan_sets(t)
        link = links.get(t.layer) if t.param in ("weight", "in_proj_weight") else None
        ortho = orthogonal_gain(t.tensor) if fam.distribution not in ("constant",) and t.tensor.dim() >= 2 else None
        matches.append(match_scheme(fam, fan_sets, extra_gains=_act_gains(link), ortho_gain=ortho))
        rows.append(_row(t, fam, fan_sets, link))
    return rows, matches


def _resolve(matches: list[list[Match]], iterations: int = 50) -> list[Match]:
    """Per tensor, the scheme among those its std matches that best explains the whole model.

    Several schemes often match one tensor (a square layer has fan_in == fan_out, a layer twice as
    wide as its input has 2 / fan_out == 1 / fan_in, a small layer matches loosely), while a model
    uses few schemes. So the schemes are fitted as a mixture by expectation-maximisation: each
    tensor's matches are weighted by ``exp(-z^2 / 2)`` (z: the distance in standard errors) times
    the scheme's share of the model, the shares are re-estimated from those weights, and each
    tensor gets its most probable scheme (then the simplest).
    """
    like: list[dict[tuple[object, ...], tuple[float, Match]]] = []
    for ms in matches:
        best: dict[tuple[object, ...], tuple[float, Match]] = {}
        for m in ms:
            lk = math.exp(-0.5 * m.z * m.z)
            if m.key not in best or (lk, -m.priority) > (best[m.key][0], -best[m.key][1].priority):
                best[m.key] = (lk, m)
        like.append(best)
    share = dict.fromkeys((k for d in like for k in d), 1.0)
    for _ in range(iterations):
        new = dict.fromkeys(share, 0.0)
        for d in like:
            total = sum(share[k] * lk for k, (lk, _) in d.items()) or 1.0
            for k, (lk, _) in d.items():
                new[k] += share[k] * lk / total
        share = {k: v / len(like) for k, v in new.items()}
    return [max(d.values(), key=lambda lm: (round(share[lm[1].key] * lm[0], 9), -lm[1].priority))[1] for d in like]


def _fixed_clusters(rows: list[dict[str, Any]], chosen: list[Match]) -> list[Match]:
    """``custom`` stds that agree (within 4 standard errors) are one std: a ``fixed_std`` when the
    tensors have different fans, else one ``custom`` std for all of them."""
    idx = sorted((i for i, m in enumerate(chosen) if m.scheme == "custom"), key=lambda i: rows[i]["std"])
    out = list(chosen)
    groups: list[list[int]] = []
    for i in idx:
        if groups and abs(math.log(rows[i]["std"] / rows[groups[-1][0]]["std"])) <= 4 * _rel_se(rows[i], rows[groups[-1][0]]):
            groups[-1].append(i)
        else:
            groups.append([i])
    for g in groups:
        if len(g) < 2:
            continue
        scheme = "fixed_std" if len({(rows[i]["fan_in"], rows[i]["fan_out"]) for i in g}) > 1 else "custom"
        std = sum(rows[i]["std"] for i in g) / len(g)
        for i in g:
            out[i] = Match(scheme, target=std, z=abs(math.log(rows[i]["std"] / std)))
    return out


def _rel_se(a: dict[str, Any], b: dict[str, Any]) -> float:
    def se(r: dict[str, Any]) -> float:
        k = r["kurtosis"] if r["kurtosis"] and math.isfinite(r["kurtosis"]) else 3.0
        return max(math.sqrt(max(k - 1, 0.1) / (4 * r["numel"])), 0.002)
    return math.hypot(se(a), se(b))


def _fill(row: dict[str, Any], m: Match, alternatives: list[Match]) -> None:
    label = m.label
    if row["distribution"] == "truncated_normal" and m.scheme not in ("fixed_std", "custom"):
        label += " (truncated)"
    elif m.scheme in ("fixed_std", "custom"):
        label += " " + _SHORT.get(row["distribution"], row["distribution"])
    row.update(scheme=m.scheme, mode=m.mode, gain=m.gain, gain_name=m.gain_name, target_std=m.target,
               fans_basis=m.fans, std_basis=m.basis if m.scheme not in ("zeros", "constant", "unknown") else None,
               label=label, alternatives=sorted({a.label for a in alternatives if a.key != m.key})[:6])


# --------------------------------------------------------------------------------------------
# signal propagation


def _forward_modes(model: nn.Module) -> dict[nn.Module, bool]:
    """Eval mode (no dropout), normalisation layers in train mode; returns the modes to restore."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    for m in model.modules():
        if is_norm(m):
            m.train()
    return modes


def _measure(built: Built, layers: Sequence[tuple[str, nn.Module]]) -> list[tuple[str, float]]:
    """(layer, variance of its output) at the first call of each layer, in call order."""
    seen: dict[str, float] = {}

    def hook_for(name: str):
        def hook(mod: nn.Module, args: Any, out: Any) -> None:
            y = first_tensor(out)
            if name not in seen and y is not None and y.is_floating_point() and y.numel() > 1:
                seen[name] = float(y.detach().double().var(unbiased=False))
        return hook

    model = built.model
    modes = _forward_modes(model)
    try:
        with kept_buffers(model), hooks() as handles, torch.no_grad(), no_mha_fastpath():
            for name, module in layers:
                handles.append(module.register_forward_hook(hook_for(name)))
            model(*built.inputs, **built.kwargs)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return list(seen.items())


def _signal(built: Built, tensors: Sequence[_Tensor], rows: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, str]:
    """One forward pass on the example input: each surveyed layer's output variance (or why not)."""
    if not built.has_input:
        return None, built.input_note or "no example input"
    layers = list({t.layer: t.module for t in tensors if t.layer and t.tensor.dim() >= 2}.items())
    try:
        measured = _measure(built, layers)
    except Exception as e:  # noqa: BLE001 - a model that does not take the default input: skipped
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        return None, f"the forward pass on {built.input_note} failed: {type(e).__name__}: {msg}"
    if not measured:
        return None, "no surveyed layer was called by the forward pass"
    var = dict(measured)
    for r in rows:
        r["out_var"] = var.get(r["layer"])
    finite = [(n, v) for n, v in measured if math.isfinite(v)] or measured
    return {"input": built.input_note, "layers": len(measured), "first": measured[0], "last": measured[-1],
            "min": min(finite, key=lambda x: x[1]), "max": max(finite, key=lambda x: x[1]),
            "rows": [{"layer": n, "out_var": v} for n, v in measured]}, built.input_note


# --------------------------------------------------------------------------------------------
# the survey


def summary_line(name: str, rows: Sequence[dict[str, Any]]) -> str:
    """``resnet50: 54 weight tensors; Conv2d x53: he_normal fan_out gain sqrt(2); Linear x1: torch_default``."""
    weights = [r for r in rows if len(r["shape"]) >= 2]
    by_kind: dict[str, Counter] = {}
    for r in weights:
        by_kind.setdefault(r["kind"], Counter())[r["label"]] += 1
    parts = []
    for kind, labels in sorted(by_kind.items(), key=lambda kv: -sum(kv[1].values())):
        common = labels.most_common()
        text = ", ".join(lab if len(common) == 1 else f"{lab} ({c})" for lab, c in common[:3])
        if len(common) > 3:
            text += f", +{len(common) - 3} more"
        parts.append(f"{kind} x{sum(labels.values())}: {text}")
    return f"{name}: {len(weights)} weight tensors; " + "; ".join(parts)


def survey(model: nn.Module | Built, *, name: str | None = None, all_params: bool = False,
           signal: bool = True) -> ModelSurvey:
    """Survey a model's initialisation (see the module docstring). ``model`` is an ``nn.Module`` or
    a :class:`initlab._zoo.Built` (which also carries an example input for the signal).

    Raises :class:`InitlabError` when the model has no parameter with two or more dimensions.
    """
    t0 = time.perf_counter()
    built = model if isinstance(model, Built) else Built(spec=name or type(model).__name__, library="module",
                                                         name=name or type(model).__name__, model=model)
    net = built.model
    notes: list[str] = []
    tensors = _tensors(net, all_params, notes)
    if not any(t.tensor.dim() >= 2 for t in tensors):
        raise InitlabError(f"{built.spec}: {type(net).__name__} has no weight tensors (no parameter with 2 or more "
                           "dimensions) to survey")
    if any(t.tensor.is_meta for t in tensors):
        raise InitlabError(f"{built.spec}: the model is on the meta device; the survey needs real tensors")
    links = _links(net, notes)
    rows, matches = _infer(tensors, links)
    chosen = _fixed_clusters(rows, _resolve(matches))
    modules = dict(net.named_modules())
    for t, row, m, ms in zip(tensors, rows, chosen, matches):
        _fill(row, m, ms)
        _judge(row, t, links.get(t.layer) if row["activation"] is not None else None, modules)
    sig, sig_note = _signal(built, tensors, rows) if signal else (None, "not requested")
    result = ModelSurvey(spec=built.spec, name=built.name, cls=type(net).__name__,
                         parameters=sum(t.tensor.numel() for t in _tensors(net, True, [])), rows=rows,
                         signal=sig, signal_note=sig_note, notes=notes)
    result.summary = summary_line(built.name, rows)
    result.seconds = time.perf_counter() - t0
    return result


def survey_spec(spec: str, *, seed: int = 0, all_params: bool = False, signal: bool = True) -> ModelSurvey:
    """Build the model of ``spec`` (:func:`initlab._zoo.load`) with a fixed seed and survey it."""
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        built = load(spec)
        result = survey(built, all_params=all_params, signal=signal)
    result.seconds = time.perf_counter() - t0
    return result


# --------------------------------------------------------------------------------------------
# CLI: ``initlab survey``


def _error_line(spec: str, e: BaseException) -> str:
    msg = (str(e).strip().splitlines() or [""])[0]
    if isinstance(e, InitlabError):
        return msg if msg.startswith(spec) else f"{spec}: {msg}"
    return f"{spec}: {type(e).__name__}: {msg}"


def _html(results: Sequence[ModelSurvey], errors: Sequence[tuple[str, str]]) -> str:
    parts = ["<!doctype html><meta charset='utf-8'><title>initlab survey</title>",
             "<style>body{font-family:sans-serif}table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}td:first-child{text-align:left}</style>",
             "<h1>initlab survey</h1><ul>"]
    parts += [f"<li>{html.escape(r.summary)}</li>" for r in results]
    parts += [f"<li style='color:#a00'>{html.escape(msg)}</li>" for _, msg in errors]
    parts.append("</ul>")
    for r in results:
        cols, shown = r.columns()
        parts.append(f"<h2>{html.escape(r.spec)}</h2><p>{html.escape(r.signal_line())}</p><table><tr>")
        parts += [f"<th>{html.escape(title)}</th>" for title, _ in cols]
        parts.append("</tr>")
        for row in shown:
            parts.append("<tr>" + "".join(f"<td>{html.escape(fmt(row.get(key)))}</td>" for _, key in cols) + "</tr>")
        parts.append("</table>")
    return "\n".join(parts) + "\n"


def _cli_survey(args: argparse.Namespace) -> int:
    results: list[ModelSurvey] = []
    errors: list[tuple[str, str]] = []
    for spec in args.models:
        try:
            r = survey_spec(spec, seed=args.seed, all_params=args.all, signal=not args.no_signal)
        except Exception as e:  # noqa: BLE001 - one line per failed model; the others are still surveyed
            errors.append((spec, _error_line(spec, e)))
            print(f"initlab survey: error: {errors[-1][1]}", file=sys.stderr, flush=True)
            continue
        finally:
            gc.collect()
        results.append(r)
        if not args.json:
            print(r.summary if args.brief else f"{r}\n", flush=True)
    if args.json:
        out = [r.to_dict() for r in results] + [{"spec": s, "error": m} for s, m in errors]
        order = {s: i for i, s in enumerate(args.models)}
        print(json.dumps({"models": sorted(out, key=lambda d: order.get(d["spec"], 0))}, indent=1))
    elif len(results) > 1 and not args.brief:
        print("\n".join(["summary:"] + [f"  {r.summary}" for r in results]))
    if args.html:
        with open(args.html, "w", encoding="utf-8") as f:
            f.write(_html(results, errors))
    return 1 if errors else 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``initlab survey MODEL [MODEL ...] [--json] [--html F] [--brief] [--all] [--no-signal] [--seed N]``."""
    p = subparsers.add_parser(
        "survey", help="infer which initialisation each layer of real models gets from its library",
        description=(
            "Build each model by its library's own code (torchvision:NAME, timm:NAME, hf:MODEL_TYPE with its default "
            "config, MODULE:FACTORY or FILE.py:FACTORY; options as NAME[key=value,...]), never with downloaded "
            "weights, and infer per weight tensor the distribution (KS goodness of fit), the scheme, mode and gain "
            "whose std matches, and how it compares with auto for the activation that follows; then one forward "
            "pass on a default input shows each layer's output variance. Exit status 1 when a model failed (the "
            "others are still surveyed)."))
    p.add_argument("models", nargs="+", metavar="MODEL", help="e.g. torchvision:resnet50 timm:vit_small_patch16_224 hf:gpt2")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON (one entry per model, rows per tensor)")
    p.add_argument("--html", metavar="FILE", default=None, help="also write the tables to an HTML file")
    p.add_argument("--brief", action="store_true", help="print only the one-line summary of each model")
    p.add_argument("--all", action="store_true", help="also survey 1-d tensors (biases, norm scales)")
    p.add_argument("--no-signal", action="store_true", help="skip the forward pass")
    p.add_argument("--seed", type=int, default=0, help="torch seed for building the models and the inputs")
    p.set_defaults(func=_cli_survey)
