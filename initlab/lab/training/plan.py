"""What to train: members (scenario x seed), groups of members that share a model shape, each
member's seeds, batches and initial model, and where the training runs.

A member's seed fixes its initial weights (:func:`init_member`), its first-pass batch
(:func:`first_pass_indices`) and its data order (:func:`minibatch_indices`).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..._apply import init_model
from ..._errors import InitlabError, unknown_choice
from ..._layers import AFFINE_LAYERS
from ..._schemes import get_scheme
from .._threads import one_thread
from ..models import build_model
from ..specs import OPTIMIZERS, Experiment, ModelSpec, Scenario, TrainSpec

__all__ = ["Member", "GroupSpec", "plan_groups", "data_seed", "minibatch_indices", "first_pass_indices",
           "init_member", "init_member_report", "resolve_device", "check_train", "group_memory"]


@dataclass(frozen=True)
class Member:
    """One model to train: a scenario (activation, scheme, resolved model) and a seed.

    The seed fixes the initial weights (``init_member``), the first-pass batch and the data order.
    """

    scenario: Scenario
    seed: int

    @property
    def key(self) -> tuple[str, int]:
        """``(scenario name, seed)``: the member's name in results."""
        return (self.scenario.name, int(self.seed))


@dataclass(frozen=True)
class GroupSpec:
    """A unit of work: members sharing one model shape, trained together with one ``TrainSpec``."""

    model: ModelSpec
    train: TrainSpec
    members: tuple[Member, ...]

    @property
    def keys(self) -> list[tuple[str, int]]:
        """The members' ``(scenario, seed)`` keys, in order."""
        return [m.key for m in self.members]



# ----------------------------------------------------------------------------- planning


def plan_groups(exp: Experiment, *, max_members: int | None = None) -> list[GroupSpec]:
    """Split an experiment into groups of members that share a model shape.

    Members are every (scenario, seed) pair of ``exp``, scenario-major in config order. Two
    scenarios land in the same group when their resolved ``ModelSpec`` is equal (same kind,
    widths, bias, channels, kernel), whatever their activation or scheme. ``max_members``
    optionally caps a group's size (a larger group is cut into consecutive chunks), e.g. to
    spread work over several workers.
    """
    if max_members is not None and (not isinstance(max_members, int) or max_members < 1):
        raise InitlabError(f"max_members must be a positive integer or None, got {max_members!r}")
    seeds = tuple(int(s) for s in exp.train.seeds)
    if not seeds:
        raise InitlabError("train.seeds is empty: give at least one seed")
    by_model: dict[Any, list[Member]] = {}
    for sc in exp.scenarios:
        by_model.setdefault(sc.model, []).extend(Member(sc, s) for s in seeds)
    groups = []
    for model, members in by_model.items():
        step = max_members or len(members)
        for i in range(0, len(members), step):
            groups.append(GroupSpec(model=model, train=exp.train, members=tuple(members[i:i + step])))
    return groups


# ----------------------------------------------------------------------------- seeds and batches


def data_seed(seed: int) -> int:
    """The seed of a member's data-order generator, derived from its ``seed``.

    A fixed odd-multiplier bijection on 63-bit integers (so distinct seeds never collide), so
    that the weights (drawn from ``Generator().manual_seed(seed)``) and the data order use
    unrelated random streams.
    """
    return (int(seed) * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % (1 << 63)


def minibatch_indices(seed: int, n: int, batch_size: int) -> Iterator[Tensor]:
    """Yield the training-set indices of a member's minibatches, forever, epoch after epoch.

    Each epoch draws ``torch.randperm(n)`` from ``torch.Generator().manual_seed(data_seed(seed))``
    and cuts it into ``ceil(n / batch_size)`` consecutive batches (the last one holds
    ``n mod batch_size`` indices when that is not 0). This is the exact order :func:`run_group`
    trains a member with.
    """
    g = torch.Generator().manual_seed(data_seed(seed))
    while True:
        perm = torch.randperm(n, generator=g)
        for start in range(0, n, batch_size):
            yield perm[start:start + batch_size]


def first_pass_indices(seed: int, n: int, size: int) -> Tensor:
    """Indices of a member's first-pass batch: the first ``min(size, n)`` of its first epoch."""
    g = torch.Generator().manual_seed(data_seed(seed))
    return torch.randperm(n, generator=g)[: min(int(size), n)]


# ----------------------------------------------------------------------------- members


def init_member(scenario: Scenario, seed: int, *, batch: Tensor | None = None,
                reports: list[Any] | None = None) -> nn.Module:
    """Build a member's model on CPU and initialise it: the scenario's scheme, biases at zero.

    ``models.build_model(scenario.model, scenario.activation)``, then
    ``initlab.init_model(model, scenario.scheme, generator=torch.Generator().manual_seed(seed),
    bias="zeros", residual=scenario.residual, **params)`` (residual ``"none"``: no policy); with ``model.bias_var`` = sigma_b^2 > 0 the biases are then drawn
    N(0, sigma_b^2) from the same generator. ``batch`` is passed to data-dependent schemes (``lsuv``).
    The same (scenario, seed) always gives the same weights. ``reports``: a list that receives
    ``init_model``'s report (see :func:`init_member_report`).
    """
    model, report = init_member_report(scenario, seed, batch=batch)
    if reports is not None:
        reports.append(report)
    return model


def init_member_report(scenario: Scenario, seed: int, *, batch: Tensor | None = None) -> tuple[nn.Module, Any]:
    """:func:`init_member` and ``init_model``'s report (:class:`initlab.InitReport`; its ``extra`` holds
    the per-layer outcome of a data-dependent scheme, e.g. the :class:`initlab.LSUVReport` under "lsuv")."""
    model = build_model(scenario.model, scenario.activation)
    params = dict(scenario.params)
    if batch is not None and get_scheme(scenario.scheme).needs_batch:
        params.setdefault("batch", batch)
    gen = torch.Generator().manual_seed(int(seed))
    residual = getattr(scenario, "residual", "none")
    with one_thread():  # auto's correction pass and LSUV run forward passes: the same bits on any executor
        report = init_model(model, scenario.scheme, generator=gen, bias="zeros",
                            residual=None if residual == "none" else residual, **params)
    bias_var = float(getattr(scenario.model, "bias_var", 0.0))
    if bias_var > 0:  # sigma_b^2 (Poole et al. 2016): N(0, sigma_b^2) biases, drawn after the weights
        with torch.no_grad():
            for mod in model.modules():
                b = getattr(mod, "bias", None)
                if isinstance(mod, AFFINE_LAYERS) and isinstance(b, Tensor):
                    b.copy_(torch.randn(b.shape, generator=gen, dtype=b.dtype) * bias_var ** 0.5)
    return model, report


# ----------------------------------------------------------------------------- memory

_EVAL_EXAMPLES = 2048  # the engines evaluate the test set in chunks of this many examples


_CPU_COUNT_BYTES = 64 << 20  # models up to this size count their activations with a CPU pass


def group_memory(spec: GroupSpec) -> int:
    """About how many bytes training ``spec`` takes (weights, gradients, optimiser state, checkpoints and the
    activations of a training batch, a first-pass batch and an evaluation chunk, per member), from a build of
    its model on the meta device (nothing is allocated). An upper-end estimate, to refuse what cannot fit."""
    per_example = 0

    def count(mod: nn.Module, inp: Any, out: Any) -> None:
        nonlocal per_example
        if isinstance(out, Tensor):
            per_example += out[0].numel()

    sc = spec.members[0].scenario
    with torch.device("meta"):
        model = build_model(spec.model, sc.activation)
    params = sum(p.numel() for p in model.parameters())
    # a small model runs its one-example pass on the CPU (uninitialised memory, no RNG drawn): torch's
    # first forward on the meta device loads its meta kernels, about a second once per process
    device = "cpu" if 4 * params <= _CPU_COUNT_BYTES else "meta"
    # Module.to_empty's empty_like of a meta tensor runs torch's Python reference, which imports
    # torch.fx's symbolic shapes (~0.3 s); an empty tensor of the same shape is the same here
    model = model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))
    handles = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    with torch.no_grad():
        model(torch.zeros(1, int(spec.model.widths[0]), device=device))
    for h in handles:
        h.remove()
    t = spec.train
    rows = 3 * int(t.batch_size) + int(t.first_pass_batch) + _EVAL_EXAMPLES
    return 4 * len(spec.members) * (6 * params + rows * per_example)


# ----------------------------------------------------------------------------- device and training settings


def resolve_device(name: object) -> torch.device:
    """Parse ``TrainSpec.device``; a clear error when the backend is not available here."""
    try:
        dev = torch.device(str(name) if name else "cpu")
    except (RuntimeError, TypeError, ValueError) as e:
        raise InitlabError(f"train.device: cannot parse {name!r} as a torch device (valid: 'cpu', 'cuda', 'cuda:<index>')") from e
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InitlabError(
                f"train.device: {str(name)!r} was requested but CUDA is not available "
                f"(torch {torch.__version__}, {'built without CUDA' if torch.version.cuda is None else 'no visible GPU'}); use device = \"cpu\""
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InitlabError(f"train.device: {str(name)!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        return dev
    if dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise InitlabError(f"train.device: {str(name)!r} was requested but MPS is not available; use device = \"cpu\"")
        return dev
    raise unknown_choice("device", str(name), ["cpu", "cuda", "mps"])


def check_train(train: TrainSpec) -> None:
    for key in ("batch_size", "steps", "log_every", "first_pass_batch"):
        v = getattr(train, key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise InitlabError(f"train.{key}: expected a positive integer, got {v!r}")
    lr = train.lr
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0 or not math.isfinite(lr):
        raise InitlabError(f"train.lr: expected a positive finite number, got {lr!r}")
    if str(train.optimizer).lower() not in OPTIMIZERS:
        raise unknown_choice("optimizer", train.optimizer, OPTIMIZERS)
