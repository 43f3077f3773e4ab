"""The batched ensemble trainer: every scenario x seed that shares a model shape trains at once.

The study of Glorot & Bengio (2010) and He et al. (2015) trains the same MLP many times,
once per (initialisation, activation, seed). Training those models one after the other
spends most of the time in Python overhead around tiny matmuls. Here all members of a
group are stacked: layer ``l`` of member ``m`` is ``W[m] in R^{in x out}`` inside one tensor
``W`` of shape ``(M, in, out)``, and one step of the whole ensemble is

    Z_l = H_{l-1} @ W_l + b_l            (torch.baddbmm over the member axis)
    H_l = phi_m(Z_l)                     (each member's own activation on its slice)
    L   = sum_m mean_b CE(Z_L[m, b], y[m, b])

followed by one optimiser step over the stacked tensors. Because the loss is a *sum* of
per-member losses, dL/dW[m] is exactly member m's own gradient, and Adam (Kingma & Ba, 2015)
is elementwise (m_t = b1 m + (1-b1) g, v_t = b2 v + (1-b2) g^2, w -= lr m_hat / (sqrt(v_hat) + eps)
with one step count), so one Adam over the stacked tensors *is* M independent Adams.
Plain SGD is elementwise too. The result is the same model, step by step, as training each
member alone (tests check the loss sequence against a plain ``nn.Sequential`` loop).

Data order. Member ``(scenario, seed)`` reads the training set in the order drawn by
``torch.Generator().manual_seed(data_seed(seed))``: one ``torch.randperm(n)`` per epoch, cut
into consecutive minibatches of ``batch_size`` with a smaller last batch (``drop_last=False``,
as a ``DataLoader(shuffle=True)`` does). :func:`minibatch_indices` yields that sequence, so
any member can be replayed by hand. Members with the same seed see the same minibatches
(common random numbers across scenarios). The first-pass batch is the first
``first_pass_batch`` indices of the first epoch.

Metrics (``GroupResult.metrics``), one dict per (scenario, seed, step, split, metric):
- ``split="test"``: loss = mean cross-entropy over the whole test set, acc = fraction correct,
  evaluated at step 0 (before training), every ``log_every`` steps and after the last step;
- ``split="train"``: at each logged step s > 0, the mean over the steps since the previous log
  of the per-step minibatch loss and accuracy (each measured on the minibatch *before* that
  step's update; an unweighted mean of per-step values, so the short last batch of an epoch
  counts as one step).

Divergence. A member whose minibatch loss is NaN/inf is marked diverged: it is removed from
the ensemble (parameters, gradients and optimiser state), so it gets no further update, while
the others go on unchanged. On CPU this is checked at every step, before the update (the bad
step's gradient is never applied); on an accelerator it is checked at each log step, to avoid a
device sync per step (members are independent, so a NaN cannot leak into another member).
``GroupResult.diverged`` gives the first step whose loss was not finite, and the member's
metric rows end with NaN values at the first log step at or after that step.

Engines (``GroupResult.engine``):
- ``stacked``: plain MLPs (an ``nn.Sequential`` of Linear layers, each followed by at most one
  elementwise activation) as stacked tensors with a hand-written backward pass into
  preallocated buffers: no autograd graph and no allocation per step;
- ``vmap``: other buffer-free models with the same module tree (the CNN builder) batched by
  ``torch.func.vmap`` over ``functional_call`` with stacked parameters, autograd backward; a
  group whose members differ in activation gets one block per architecture;
- ``per-member``: anything else (norm layers with running statistics, dropout, modules vmap
  cannot batch): each member's own module in a Python loop inside the step.
All three share the data order, metrics, divergence handling and optimiser.

The first pass. Before training, each member's initial model sees its first-pass batch:
``initlab.probe(model, batch, target=labels)`` gives ``GroupResult.first_pass`` (one row per
weight layer, plus scenario, seed and ``batch_input_var``), and forward hooks give the raw
``input``, ``mat_mul_<i>`` and ``fc_out_<i>`` arrays for histograms. Glorot & Bengio (2010)
logged exactly these: with N(0, 1) weights the layer-1 pre-activation variance is
784 E[x^2] (~88 on MNIST), not 784 Var(x).

:func:`run_group` is a pure function: no file I/O, no global state (it never changes torch's
global RNG or thread settings), and its inputs and outputs pickle, so another executor (a Ray
worker, a process pool) can run it.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._errors import InitlabError, unknown_choice
from .config import OPTIMIZERS

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from .config import Experiment, ModelSpec, Scenario, TrainSpec
    from .data import Dataset

__all__ = [
    "Member",
    "GroupSpec",
    "GroupResult",
    "plan_groups",
    "init_member",
    "run_group",
    "minibatch_indices",
    "first_pass_indices",
    "data_seed",
    "OPTIMIZERS",
]

_EVAL_CHUNK = 2048  # test examples per evaluation chunk (bounds memory: M x chunk x width)


# ----------------------------------------------------------------------------- public types


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


@dataclass
class GroupResult:
    """What :func:`run_group` returns (plain Python and numpy objects only, so it pickles).

    - ``metrics``: dicts with keys scenario, seed, step, split ("train"/"test"), metric
      ("loss"/"acc"), value (float; NaN after divergence);
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
      or "per-member" (see the module docstring); ``device``: where it trained.
    """

    metrics: list[dict[str, Any]]
    first_pass: list[dict[str, Any]]
    first_pass_values: dict[tuple[str, int], dict[str, np.ndarray]]
    diverged: list[dict[str, Any]]
    wall_s: float
    engine: str = ""
    device: str = "cpu"
    timings: dict[str, float] | None = None


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


def init_member(scenario: Scenario, seed: int, *, batch: Tensor | None = None) -> nn.Module:
    """Build a member's model on CPU and initialise it: the scenario's scheme, biases at zero.

    ``models.build_model(scenario.model, scenario.activation)``, then
    ``initlab.init_model(model, scenario.scheme, generator=torch.Generator().manual_seed(seed),
    bias="zeros", **params)``. ``batch`` is passed to data-dependent schemes (``lsuv``).
    The same (scenario, seed) always gives the same weights.
    """
    from .._apply import init_model
    from .models import build_model

    model = build_model(scenario.model, scenario.activation)
    params = dict(scenario.params)
    if batch is not None and str(scenario.scheme).lower() == "lsuv":
        params.setdefault("batch", batch)
    init_model(model, scenario.scheme, generator=torch.Generator().manual_seed(int(seed)),
               bias="zeros", **params)
    return model


# ----------------------------------------------------------------------------- device, optimiser


def _resolve_device(name: object) -> torch.device:
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


def _make_optimizer(name: str, params: list[Tensor], lr: float) -> torch.optim.Optimizer:
    """Adam (defaults betas=(0.9, 0.999), eps=1e-8, as ``torch.optim.Adam``) or plain SGD.

    Uses the fused kernel when the device and dtype support it (one kernel for every tensor),
    else the foreach implementation; both are elementwise, so per-member results are unchanged.
    """
    key = str(name).lower()
    if key not in OPTIMIZERS:
        raise unknown_choice("optimizer", name, OPTIMIZERS)
    cls = torch.optim.Adam if key == "adam" else torch.optim.SGD
    try:
        return cls(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return cls(params, lr=lr, foreach=True)


# ----------------------------------------------------------------------------- activations


@dataclass
class _Act:
    """An elementwise activation applied to the slice ``[start, stop)`` of the member axis.

    Sigmoid, tanh, ReLU and leaky ReLU use torch's own forward and backward kernels (the ones
    autograd uses: sigmoid'(z) = h(1-h), tanh'(z) = 1-h^2, relu'(z) = [h > 0]); any other
    elementwise activation runs its torch function under autograd on the slice.
    """

    name: str
    param: float | None
    fn: Callable[[Tensor], Tensor]
    start: int
    stop: int
    inplace: bool = False
    _saved: tuple[Tensor, Tensor] | None = None

    def forward(self, z: Tensor, out: Tensor, track: bool) -> None:
        z, out = z[self.start:self.stop], out[self.start:self.stop]
        if self.name == "sigmoid":
            torch.sigmoid(z, out=out)
        elif self.name == "tanh":
            torch.tanh(z, out=out)
        elif self.name == "relu":
            torch.clamp_min(z, 0, out=out)
        elif self.name == "leaky_relu":
            torch.ops.aten.leaky_relu.out(z, self.param, out=out)
        elif self.name == "identity":
            out.copy_(z)
        elif track:
            with torch.enable_grad():
                zs = z.detach().requires_grad_(True)
                hs = self.fn(zs.clone() if self.inplace else zs)
            out.copy_(hs.detach())
            self._saved = (zs, hs)
        else:
            out.copy_(self.fn(z.clone() if self.inplace else z))

    def backward(self, g: Tensor, z: Tensor, h: Tensor) -> None:
        """``g[slice] *= phi'(z[slice])`` in place (``h`` = phi(z))."""
        s = slice(self.start, self.stop)
        gs = g[s]
        if self.name == "sigmoid":
            torch.ops.aten.sigmoid_backward.grad_input(gs, h[s], grad_input=gs)
        elif self.name == "tanh":
            torch.ops.aten.tanh_backward.grad_input(gs, h[s], grad_input=gs)
        elif self.name == "relu":
            torch.ops.aten.threshold_backward.grad_input(gs, h[s], 0, grad_input=gs)
        elif self.name == "leaky_relu":
            torch.ops.aten.leaky_relu_backward.grad_input(gs, z[s], self.param, False, grad_input=gs)
        elif self.name == "identity":
            pass
        else:
            assert self._saved is not None
            zs, hs = self._saved
            (gz,) = torch.autograd.grad(hs, zs, gs)
            gs.copy_(gz)
            self._saved = None


def _activation_key(module: nn.Module, scenario_activation: object, *, allow_params: bool = False
                    ) -> tuple[str, float | None, Callable] | None:
    """(name, param, fn) of an elementwise activation module, or None if it is not one we know.

    A module from the activation table is recognised directly. A wrapper module (e.g. a
    builder's own ``nn.Module`` around a function) is accepted when it computes exactly the
    scenario's activation on a test tensor.
    """
    from .._activations import resolve_activation

    if isinstance(module, nn.Identity):
        return ("identity", None, lambda x: x)
    if not allow_params and (any(True for _ in module.parameters()) or any(True for _ in module.buffers())):
        return None  # e.g. PReLU: a trainable slope is not part of the stacked engine
    try:
        act = resolve_activation(module)
    except (InitlabError, TypeError):
        return None
    if act.custom:
        try:
            cand = resolve_activation(scenario_activation)
        except (InitlabError, TypeError):
            return None
        if cand.custom:
            return None
        t = torch.linspace(-5.0, 5.0, 2 * 3 * 11, dtype=torch.float64).view(2, 3, 11)
        try:
            with torch.no_grad():
                ok = torch.equal(module(t.clone()), cand.fn(t.clone()))
        except Exception:  # noqa: BLE001 - any failure means "not a plain elementwise activation"
            return None
        if not ok:
            return None
        act = cand
    if act.name in ("leaky_relu", "prelu"):
        return ("leaky_relu", float(act.param if act.param is not None else 0.01), act.fn)
    return (act.name, act.param, module)


def _flat_children(model: nn.Module) -> list[nn.Module]:
    out: list[nn.Module] = []

    def rec(m: nn.Module) -> None:
        if isinstance(m, nn.Sequential):
            for c in m:
                rec(c)
        else:
            out.append(m)

    rec(model)
    return out


def _parse_mlp(model: nn.Module, scenario_activation: object) -> tuple[bool, list[tuple[nn.Linear, tuple | None]]] | None:
    """``(flatten_input, [(linear, activation key or None), ...])`` for a plain MLP, else None.

    A plain MLP is an ``nn.Sequential`` (nested ones allowed) of optional leading
    ``nn.Flatten()``, then Linear layers each followed by at most one elementwise activation.
    """
    if not isinstance(model, nn.Sequential):
        return None
    mods = _flat_children(model)
    flatten = False
    while mods and isinstance(mods[0], nn.Flatten):
        if mods[0].start_dim != 1 or mods[0].end_dim != -1:
            return None
        flatten = True
        mods = mods[1:]
    layers: list[list[Any]] = []
    for m in mods:
        if type(m) is nn.Linear:
            if layers and layers[-1][0].out_features != m.in_features:
                return None
            layers.append([m, None])
            continue
        if not layers or layers[-1][1] is not None:
            return None
        key = _activation_key(m, scenario_activation)
        if key is None:
            return None
        layers[-1][1] = None if key[0] == "identity" else key
    if not layers:
        return None
    return flatten, [(lin, key) for lin, key in layers]


# ----------------------------------------------------------------------------- engines


class _Engine:
    """Interface of a training engine over M members (in the trainer's member order)."""

    kind = ""
    M: int
    params: list[Tensor]

    def train_forward(self, idx: Tensor, loss_out: Tensor, acc_out: Tensor) -> None:
        """Forward the minibatches ``idx`` (M*b indices, member-major); write each member's mean
        cross-entropy and accuracy on its minibatch."""
        raise NotImplementedError

    def backward(self) -> None:
        """Gradients of sum_m loss_m into each parameter's ``.grad``."""
        raise NotImplementedError

    def evaluate(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(sum of cross-entropy, number correct) per member over a shared set."""
        raise NotImplementedError

    def keep(self, keep: list[int]) -> list[tuple[Tensor, Tensor, bool]]:
        """Drop all members but ``keep``; returns (old param, new param, stacked) triples."""
        raise NotImplementedError


class _StackedMLP(_Engine):
    """All members' MLPs as stacked tensors: W_l (M, in, out), b_l (M, 1, out); manual backward.

    Forward: Z_l = baddbmm(b_l, H_{l-1}, W_l), H_l = phi(Z_l) per activation segment (the
    readout is computed transposed, Z_L^T = W_L^T H^T + b_L^T, for a faster softmax).
    Loss: per member mean_b [logsumexp(z) - z_y]; dL/dZ_L = (softmax(Z_L) - onehot(y)) / b.
    Backward: dW_l = H_{l-1}^T dZ_l, db_l = sum_b dZ_l, dH_{l-1} = dZ_l W_l^T,
    dZ_{l-1} = dH_{l-1} * phi'(Z_{l-1}). Every buffer is preallocated per batch size.
    """

    kind = "stacked"

    def __init__(self, models: Sequence[nn.Module], plans: Sequence[list[tuple[nn.Linear, tuple | None]]],
                 x_train: Tensor, y_train: Tensor, device: torch.device, dtype: torch.dtype) -> None:
        self.x_train, self.y_train = x_train, y_train
        self.device, self.dtype = device, dtype
        n_layers = len(plans[0])
        self.dims = [plans[0][0][0].in_features] + [lin.out_features for lin, _ in plans[0]]  # full widths
        self.has_bias = [plans[0][i][0].bias is not None for i in range(n_layers)]
        with torch.no_grad():
            self.W = [torch.stack([p[i][0].weight.detach().t() for p in plans]).to(device=device, dtype=dtype).contiguous()
                      for i in range(n_layers)]
            self.b = [torch.stack([p[i][0].bias.detach().view(1, -1) for p in plans]).to(device=device, dtype=dtype).contiguous()
                      if self.has_bias[i] else None for i in range(n_layers)]
        self.keys = [[p[i][1] for i in range(n_layers)] for p in plans]
        # Inputs that are 0 in every training example (MNIST's border pixels) give their first-layer
        # weights a zero gradient at every step, so Adam (m = v = 0) and SGD never move them: train
        # only the other rows (exactly the same updates, less work); the frozen rows stay in
        # ``W_in_full`` for evaluation, where test inputs may be nonzero there.
        self.W_in_full: Tensor | None = None
        self.active: Tensor | None = None
        with torch.no_grad():
            active = (x_train != 0).any(0).nonzero().flatten()
            frozen = torch.ones(x_train.shape[1], dtype=torch.bool, device=device)
            frozen[active] = False
            if 0 < active.numel() < x_train.shape[1] and bool(torch.isfinite(self.W[0][:, frozen]).all()):
                self.active, self.W_in_full = active, self.W[0]
                self.W[0] = self.W[0].index_select(1, active).contiguous()
                self.x_train = x_train.index_select(1, active).contiguous()
        self._setup()

    # --- state
    def _setup(self) -> None:
        self.M = self.W[0].shape[0]
        self.params = [t for pair in zip(self.W, self.b) for t in pair if t is not None]
        for p in self.params:
            p.requires_grad_(True)
            p.grad = torch.zeros_like(p)
        self.gW = [w.grad for w in self.W]
        self.gb = [b.grad if b is not None else None for b in self.b]
        self.acts: list[list[_Act]] = []
        for i in range(len(self.W)):
            segs: list[_Act] = []
            for m, keys in enumerate(self.keys):
                key = keys[i]
                if key is None:
                    key = ("identity", None, lambda x: x)
                if segs and (segs[-1].name, segs[-1].param) == (key[0], key[1]):
                    segs[-1].stop = m + 1  # same table activation: same function
                else:
                    segs.append(_Act(key[0], key[1], key[2], m, m + 1, bool(getattr(key[2], "inplace", False))))
            self.acts.append(segs)
        self.identity_layer = [all(s.name == "identity" for s in segs) for segs in self.acts]
        self._bufs: dict[int, dict[str, Any]] = {}

    def _buffers(self, b: int) -> dict[str, Any]:
        buf = self._bufs.get(b)
        if buf is None:
            M, dims, kw = self.M, self.dims, dict(device=self.device, dtype=self.dtype)
            L = len(self.W)
            # hidden layers (M, b, width); the readout transposed, (M, classes, b), so that the
            # softmax runs over a non-contiguous dim (several times faster for 10 classes)
            shape = [(M, b, dims[i + 1]) for i in range(L - 1)] + [(M, dims[-1], b)]
            z = [torch.empty(sh, **kw) for sh in shape]
            buf = dict(
                x=torch.empty(M * b, self.W[0].shape[1], **kw),
                y=torch.empty(M * b, dtype=torch.long, device=self.device),
                z=z,
                h=[z[i] if self.identity_layer[i] else torch.empty(shape[i], **kw) for i in range(L)],
                g=[torch.empty(sh, **kw) for sh in shape],
                logp=torch.empty(M, dims[-1], b, **kw),
                nll=torch.empty(M, 1, b, **kw),
                pred=torch.empty(M, b, dtype=torch.long, device=self.device),
                top=torch.empty(M, b, **kw),
                hit=torch.empty(M, b, dtype=torch.bool, device=self.device),
                n_hit=torch.empty(M, dtype=torch.long, device=self.device),
                minus_one=torch.full((M, 1, b), -1.0, **kw),
            )
            self._bufs[b] = buf
        return buf

    # --- training
    @torch.no_grad()
    def train_forward(self, idx: Tensor, loss_out: Tensor, acc_out: Tensor) -> None:
        M, L = self.M, len(self.W)
        b = idx.numel() // M
        buf = self._buffers(b)
        self._b = b
        torch.index_select(self.x_train, 0, idx, out=buf["x"])
        torch.index_select(self.y_train, 0, idx, out=buf["y"])
        h = buf["x"].view(M, b, -1)
        for i, W in enumerate(self.W):
            z = buf["z"][i]
            if i < L - 1:
                if self.b[i] is not None:
                    torch.baddbmm(self.b[i], h, W, out=z)
                else:
                    torch.bmm(h, W, out=z)
            else:  # Z^T = W^T H^T (+ b^T): (M, classes, b)
                if self.b[i] is not None:
                    torch.baddbmm(self.b[i].transpose(1, 2), W.transpose(1, 2), h.transpose(1, 2), out=z)
                else:
                    torch.bmm(W.transpose(1, 2), h.transpose(1, 2), out=z)
            if not self.identity_layer[i]:
                for a in self.acts[i]:
                    a.forward(z, buf["h"][i], True)
            h = buf["h"][i]
        y = buf["y"].view(M, 1, b)
        torch.log_softmax(h, 1, out=buf["logp"])  # h: logits (M, classes, b)
        torch.gather(buf["logp"], 1, y, out=buf["nll"])
        torch.mean(buf["nll"].view(M, b), 1, out=loss_out)
        loss_out.neg_()
        torch.max(h, 1, out=(buf["top"], buf["pred"]))  # max(dim) is much faster than argmax over a middle dim
        torch.eq(buf["pred"], buf["y"].view(M, b), out=buf["hit"])
        torch.sum(buf["hit"], 1, out=buf["n_hit"])
        acc_out.copy_(buf["n_hit"]).div_(b)

    @torch.no_grad()
    def backward(self) -> None:
        b = self._b
        buf = self._bufs[b]
        M, L = self.M, len(self.W)
        g = buf["g"][L - 1]  # dL/dZ_L^T = (softmax - onehot)^T / b, (M, classes, b)
        torch.exp(buf["logp"], out=g)
        g.scatter_add_(1, buf["y"].view(M, 1, b), buf["minus_one"])
        g.mul_(1.0 / b)
        for i in range(L - 1, -1, -1):
            if not self.identity_layer[i]:
                for a in self.acts[i]:
                    a.backward(g, buf["z"][i], buf["h"][i])
            inp = buf["h"][i - 1] if i > 0 else buf["x"].view(M, b, -1)
            gz = g.transpose(1, 2) if i == L - 1 else g  # (M, b, out)
            torch.bmm(inp.transpose(1, 2), gz, out=self.gW[i])
            if self.gb[i] is not None:
                torch.sum(gz, 1, keepdim=True, out=self.gb[i])
            if i > 0:
                g_prev = buf["g"][i - 1]
                torch.bmm(gz, self.W[i].transpose(1, 2), out=g_prev)
                g = g_prev

    # --- evaluation
    @torch.no_grad()
    def evaluate(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """All members on a shared set: the first layer as one GEMM X (n, D) @ [W_1 ... W_M]
        (D, M*H), the others batched; activations in place; softmax over the class dim of
        (M, classes, n) logits."""
        M, L, D, H1 = self.M, len(self.W), self.dims[0], self.dims[1]
        loss = torch.zeros(M, device=self.device, dtype=torch.float64)
        correct = torch.zeros(M, device=self.device, dtype=torch.long)
        W_in = self.W[0]
        if self.W_in_full is not None:
            W_in = self.W_in_full.index_copy_(1, self.active, self.W[0].detach())
        W0 = W_in.permute(1, 0, 2).reshape(D, M * H1)
        b0 = self.b[0].reshape(1, M * H1) if self.b[0] is not None else None
        for s in range(0, x.shape[0], _EVAL_CHUNK):
            xc, yc = x[s:s + _EVAL_CHUNK], y[s:s + _EVAL_CHUNK]
            n = xc.shape[0]
            z = torch.addmm(b0, xc, W0) if b0 is not None else torch.mm(xc, W0)  # (n, M*H1)
            h = z.view(n, M, H1).transpose(0, 1)  # (M, n, H1), strided
            self._eval_act(0, h)
            for i in range(1, L):
                if i < L - 1:
                    h = torch.baddbmm(self.b[i], h, self.W[i]) if self.b[i] is not None else torch.bmm(h, self.W[i])
                else:  # (M, classes, n)
                    wt, ht = self.W[i].transpose(1, 2), h.transpose(1, 2)
                    h = torch.baddbmm(self.b[i].transpose(1, 2), wt, ht) if self.b[i] is not None else torch.bmm(wt, ht)
                self._eval_act(i, h)
            logits = h if L > 1 else h.permute(0, 2, 1)  # (M, classes, n)
            logp = torch.log_softmax(logits, 1)
            loss -= logp.gather(1, yc.view(1, 1, n).expand(M, 1, n)).view(M, n).sum(1, dtype=torch.float64)
            correct += (torch.max(logits, 1)[1] == yc).sum(1)
        return loss, correct

    def _eval_act(self, i: int, z: Tensor) -> None:
        if not self.identity_layer[i]:
            for a in self.acts[i]:
                a.forward(z, z, False)  # in place, slice by slice

    # --- divergence
    def keep(self, keep: list[int]) -> list[tuple[Tensor, Tensor, bool]]:
        old = list(self.params)
        ki = torch.tensor(keep, dtype=torch.long, device=self.device)
        with torch.no_grad():
            self.W = [w.detach().index_select(0, ki) for w in self.W]
            if self.W_in_full is not None:
                self.W_in_full = self.W_in_full.index_select(0, ki)
            self.b = [b.detach().index_select(0, ki) if b is not None else None for b in self.b]
        self.keys = [self.keys[i] for i in keep]
        self._setup()
        return [(o, n, True) for o, n in zip(old, self.params)]


class _Vmapped(_Engine):
    """Any buffer-free model (the CNN builder, ...) batched with ``torch.func``: the members'
    parameters stacked by ``stack_module_state`` (each (M, *shape)), the forward pass
    ``vmap(functional_call)`` over the member axis, autograd for the backward pass."""

    kind = "vmap"

    def __init__(self, models: Sequence[nn.Module], x_train: Tensor, y_train: Tensor,
                 device: torch.device, dtype: torch.dtype) -> None:
        import copy

        from torch.func import stack_module_state

        self.x_train, self.y_train, self.device = x_train, y_train, device
        self.base = copy.deepcopy(models[0]).to("meta")
        params, _ = stack_module_state([m.to(device=device, dtype=dtype) for m in models])
        self.names = list(params)
        self._set([params[k].detach() for k in self.names])

    def _set(self, tensors: list[Tensor]) -> None:
        self.params = [t.contiguous().requires_grad_(True) for t in tensors]
        self.M = self.params[0].shape[0]

    def _logits(self, x: Tensor, shared: bool) -> Tensor:
        from torch.func import functional_call, vmap

        def one(*args: Tensor) -> Tensor:
            *ps, xi = args
            return functional_call(self.base, dict(zip(self.names, ps)), (xi,))

        in_dims = tuple([0] * len(self.params)) + ((None,) if shared else (0,))
        return vmap(one, in_dims=in_dims)(*self.params, x)

    def train_forward(self, idx: Tensor, loss_out: Tensor, acc_out: Tensor) -> None:
        M = self.M
        b = idx.numel() // M
        xb = self.x_train.index_select(0, idx).view(M, b, *self.x_train.shape[1:])
        yb = self.y_train.index_select(0, idx).view(M, b)
        with torch.enable_grad():
            logits = self._logits(xb, False)
            C = logits.shape[-1]
            losses = F.cross_entropy(logits.reshape(M * b, C), yb.reshape(-1), reduction="none").view(M, b).mean(1)
        self._loss = losses
        with torch.no_grad():
            loss_out.copy_(losses.detach())
            acc_out.copy_((logits.detach().argmax(2) == yb).sum(1)).div_(b)

    def backward(self) -> None:
        for p in self.params:
            p.grad = None
        self._loss.sum().backward()
        self._loss = None

    @torch.no_grad()
    def evaluate(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        loss = torch.zeros(self.M, device=self.device, dtype=torch.float64)
        correct = torch.zeros(self.M, device=self.device, dtype=torch.long)
        for s in range(0, x.shape[0], _EVAL_CHUNK):
            xc, yc = x[s:s + _EVAL_CHUNK], y[s:s + _EVAL_CHUNK]
            logits = self._logits(xc, True)
            n, C = xc.shape[0], logits.shape[-1]
            loss += F.cross_entropy(logits.reshape(-1, C), yc.repeat(self.M), reduction="none").view(self.M, n).sum(1, dtype=torch.float64)
            correct += (logits.argmax(2) == yc).sum(1)
        return loss, correct

    def keep(self, keep: list[int]) -> list[tuple[Tensor, Tensor, bool]]:
        old = list(self.params)
        ki = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._set([p.detach().index_select(0, ki) for p in old])
        return [(o, n, True) for o, n in zip(old, self.params)]


def _vmap_works(models: Sequence[nn.Module], x: Tensor) -> bool:
    """Whether the models can be batched with vmap: no buffers (running statistics), no dropout,
    and a vmapped forward on two examples reproduces each member's own output."""
    if any(True for m in models for _ in m.buffers()):
        return False
    if any(isinstance(mod, nn.modules.dropout._DropoutNd) for m in models for mod in m.modules()):
        return False
    if any(not p.requires_grad for m in models for p in m.parameters()):
        return False
    try:
        import copy

        sample = x[:2].detach().to("cpu", torch.float32)
        trial = _Vmapped([copy.deepcopy(m) for m in models], sample, sample, torch.device("cpu"), torch.float32)
        with torch.no_grad():
            out = trial._logits(sample, True)
            ref = torch.stack([m.cpu().float()(sample) for m in models])
        return out.shape == ref.shape and torch.allclose(out, ref, rtol=1e-4, atol=1e-5)
    except Exception:  # noqa: BLE001 - anything vmap cannot do sends the group to the per-member engine
        return False


class _Blocks(_Engine):
    """Consecutive blocks of members, each trained by its own engine (e.g. one vmap engine per
    architecture when the members' activations differ). Same interface as a single engine."""

    def __init__(self, engines: list[_Engine]) -> None:
        self.engines = engines
        self._setup()

    def _setup(self) -> None:
        self.M = sum(e.M for e in self.engines)
        self.params = [p for e in self.engines for p in e.params]
        kinds = sorted({e.kind for e in self.engines})
        self.kind = "+".join(kinds)

    def _spans(self) -> list[tuple[int, int]]:
        out, s = [], 0
        for e in self.engines:
            out.append((s, s + e.M))
            s += e.M
        return out

    def train_forward(self, idx: Tensor, loss_out: Tensor, acc_out: Tensor) -> None:
        per = idx.view(self.M, -1)
        for e, (s, t) in zip(self.engines, self._spans()):
            e.train_forward(per[s:t].reshape(-1), loss_out[s:t], acc_out[s:t])

    def backward(self) -> None:
        for e in self.engines:
            e.backward()

    def evaluate(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        parts = [e.evaluate(x, y) for e in self.engines]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def keep(self, keep: list[int]) -> list[tuple[Tensor, Tensor, bool]]:
        triples, engines = [], []
        for e, (s, t) in zip(self.engines, self._spans()):
            mine = [i - s for i in keep if s <= i < t]
            if mine:
                triples.extend(e.keep(mine))
                engines.append(e)
        self.engines = engines
        self._setup()
        return triples


class _PerMember(_Engine):
    """Fallback for any model (CNNs, norm layers, dropout, PReLU): each member's own module,
    called in a Python loop inside the step; autograd for the backward pass."""

    kind = "per-member"

    def __init__(self, models: Sequence[nn.Module], x_train: Tensor, y_train: Tensor,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.models = [m.to(device=device, dtype=dtype).train() for m in models]
        self.x_train, self.y_train, self.device = x_train, y_train, device
        self._setup()

    def _setup(self) -> None:
        self.M = len(self.models)
        self.params = [p for m in self.models for p in m.parameters() if p.requires_grad]

    def train_forward(self, idx: Tensor, loss_out: Tensor, acc_out: Tensor) -> None:
        M = self.M
        b = idx.numel() // M
        xb = self.x_train.index_select(0, idx).view(M, b, *self.x_train.shape[1:])
        yb = self.y_train.index_select(0, idx).view(M, b)
        losses, correct = [], []
        with torch.enable_grad():
            for i, model in enumerate(self.models):
                logits = model(xb[i])
                losses.append(F.cross_entropy(logits, yb[i]))
                correct.append((logits.detach().argmax(1) == yb[i]).sum())
        self._losses = losses
        with torch.no_grad():
            loss_out.copy_(torch.stack([v.detach() for v in losses]))
            acc_out.copy_(torch.stack(correct)).div_(b)

    def backward(self) -> None:
        for p in self.params:
            p.grad = None
        torch.stack(self._losses).sum().backward()
        self._losses = []

    @torch.no_grad()
    def evaluate(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        loss = torch.zeros(self.M, device=self.device, dtype=torch.float64)
        correct = torch.zeros(self.M, device=self.device, dtype=torch.long)
        for i, model in enumerate(self.models):
            model.eval()
            try:
                for s in range(0, x.shape[0], _EVAL_CHUNK):
                    logits = model(x[s:s + _EVAL_CHUNK])
                    yc = y[s:s + _EVAL_CHUNK]
                    loss[i] += F.cross_entropy(logits, yc, reduction="sum").double()
                    correct[i] += (logits.argmax(1) == yc).sum()
            finally:
                model.train()
        return loss, correct

    def keep(self, keep: list[int]) -> list[tuple[Tensor, Tensor, bool]]:
        self.models = [self.models[i] for i in keep]
        self._setup()
        return [(p, p, False) for p in self.params]


# ----------------------------------------------------------------------------- first pass


def _first_pass(model: nn.Module, batch: Tensor, target: Tensor, activation: object = None
                ) -> tuple[list[dict[str, Any]], dict[str, np.ndarray], float]:
    """The probe's rows and the raw per-layer arrays of one member's initial model on its batch.

    Weight layers (Linear, Conv, ConvTranspose) are numbered i = 1, 2, ... in call order.
    ``mat_mul_i`` = the layer's output minus its bias (the pre-activation without bias, the
    seeds' "mat_mul"; biases are zero at init, so it is the layer output). ``fc_out_i`` = the
    output of the first elementwise activation module called after layer i and before the next
    weight layer, else the layer output itself (the linear readout). ``input_var`` is the
    population variance of all entries of the batch.
    """
    from .._probe import probe

    weight_types = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    # Decide which leaf modules are activations before any hook exists (the check calls them).
    leaves = [m for m in model.modules() if not isinstance(m, weight_types) and not list(m.children())]
    act_ids = set()
    for m in leaves:
        key = _activation_key(m, activation, allow_params=True)
        if key is not None and key[0] != "identity":
            act_ids.add(id(m))
    events: list[tuple[str, Tensor]] = []
    handles = []

    def on_weight(mod: nn.Module, inp: Any, out: Tensor) -> None:
        pre = out.detach().clone()
        if getattr(mod, "bias", None) is not None:
            pre -= mod.bias.detach().view(1, -1, *([1] * (pre.dim() - 2)))
        events.append(("w", pre))
        events.append(("o", out.detach().clone()))

    def on_act(mod: nn.Module, inp: Any, out: Any) -> None:
        if isinstance(out, Tensor):
            events.append(("a", out.detach().clone()))

    try:
        for mod in model.modules():
            if isinstance(mod, weight_types):
                handles.append(mod.register_forward_hook(on_weight))
            elif id(mod) in act_ids:
                handles.append(mod.register_forward_hook(on_act))
        with torch.no_grad():
            model(batch)
    finally:
        for h in handles:
            h.remove()

    values: dict[str, np.ndarray] = {"input": batch.detach().cpu().float().numpy().copy()}
    layer = 0
    pending: Tensor | None = None  # output of the current layer, until its activation shows up
    for kind, t in events:
        if kind == "w":
            if pending is not None:
                values[f"fc_out_{layer}"] = pending.cpu().float().numpy()
            layer += 1
            values[f"mat_mul_{layer}"] = t.cpu().float().numpy()
            pending = None
        elif kind == "o":
            pending = t
        elif kind == "a" and pending is not None:
            values[f"fc_out_{layer}"] = t.cpu().float().numpy()
            pending = None
    if pending is not None:
        values[f"fc_out_{layer}"] = pending.cpu().float().numpy()

    input_var = float(batch.double().var(unbiased=False))
    try:
        rows = [dict(r) for r in probe(model, batch, target=target).rows]
    except (InitlabError, RuntimeError, ValueError) as e:
        # a broken member (e.g. non-finite initial weights) must not stop its group: keep the
        # moments measured here, without the probe's backward statistics and predictions
        rows = _fallback_rows(model, values, weight_types, f"probe failed: {e}")
    model.zero_grad(set_to_none=True)
    return rows, values, input_var


def _fallback_rows(model: nn.Module, values: dict[str, np.ndarray], weight_types: tuple, note: str) -> list[dict[str, Any]]:
    """Per-layer moments from the first-pass arrays, in the probe's column names."""
    names = [n for n, m in model.named_modules() if isinstance(m, weight_types)]
    rows = []
    for i, name in enumerate(names, start=1):
        if f"mat_mul_{i}" not in values:
            break
        pre = values[f"mat_mul_{i}"].astype(np.float64)
        post = values[f"fc_out_{i}"].astype(np.float64)
        with np.errstate(all="ignore"):
            rows.append(dict(index=i - 1, layer=name, kind=type(model.get_submodule(name)).__name__,
                             pre_mean=float(pre.mean()), pre_var=float(pre.var()), pre_sq_mean=float((pre ** 2).mean()),
                             post_mean=float(post.mean()), post_var=float(post.var()),
                             post_sq_mean=float((post ** 2).mean()), note=note))
    return rows


# ----------------------------------------------------------------------------- the trainer


def _dataset_tensors(data: Dataset, flatten: bool, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The data set's tensors on ``device`` (inputs in ``dtype``, flattened when asked; labels long).

    ``_run_group`` has already checked that all four are tensors and that the training set is not empty.
    """
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


def _check_train(train: TrainSpec) -> None:
    for key in ("batch_size", "steps", "log_every", "first_pass_batch"):
        v = getattr(train, key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise InitlabError(f"train.{key}: expected a positive integer, got {v!r}")
    lr = train.lr
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0 or not math.isfinite(lr):
        raise InitlabError(f"train.lr: expected a positive finite number, got {lr!r}")
    if str(train.optimizer).lower() not in OPTIMIZERS:
        raise unknown_choice("optimizer", train.optimizer, OPTIMIZERS)


def _flush_denormal_on() -> bool:
    """Whether this thread's CPU flushes denormal floats to zero (DAZ: a denormal input reads as 0)."""
    return float(torch.tensor([1e-39], dtype=torch.float32).mul(1.0)) == 0.0


def run_group(spec: GroupSpec, data: Dataset, *, progress: Callable[[int], Any] | None = None,
              dtype: torch.dtype = torch.float32, flush_denormal: bool = True) -> GroupResult:
    """Train every member of ``spec`` on ``data`` at once; return metrics and first-pass statistics.

    Steps: build and initialise each member (:func:`init_member`), run the first pass (probe on
    the member's first-pass batch), then train all members together for ``train.steps`` steps
    (see the module docstring for the data order, metrics and divergence rules).
    ``progress(n)`` is called with the number of steps done so far (0..steps) at each log step.
    ``dtype`` is the training precision (float32; float64 for exactness checks).
    ``flush_denormal``: for the duration of the call, the CPU flushes denormal numbers (below
    1.2e-38 in float32) to zero (``torch.set_flush_denormal``; the previous mode is restored on
    return). Saturated members (sigmoid with N(0, 1) weights) produce gradients and Adam second
    moments that underflow into the denormal range, where x86 arithmetic is many times slower;
    flushing changes values below float32's normal range only: Adam's step m/(sqrt(v) + 1e-8)
    moves by less than 1e-30 of a weight.
    Pure: no file I/O and no global state; the arguments and the result pickle.
    """
    previous = _flush_denormal_on()
    if flush_denormal != previous:
        torch.set_flush_denormal(flush_denormal)
    try:
        return _run_group(spec, data, progress, dtype)
    finally:
        if flush_denormal != previous:
            torch.set_flush_denormal(previous)


def _run_group(spec: GroupSpec, data: Dataset, progress: Callable[[int], Any] | None, dtype: torch.dtype) -> GroupResult:
    t0 = time.perf_counter()
    if not spec.members:
        raise InitlabError("group has no members")
    train = spec.train
    _check_train(train)
    device = _resolve_device(getattr(train, "device", "cpu"))
    for name in ("x_train", "y_train", "x_test", "y_test"):
        if not isinstance(getattr(data, name, None), Tensor):
            raise InitlabError(f"dataset.{name} must be a torch.Tensor, got {type(getattr(data, name, None)).__name__} "
                               f"(load data with initlab.lab.data.load_dataset)")
    n_train = int(data.x_train.shape[0])
    if n_train == 0:
        raise InitlabError("dataset has no training examples")
    fp_size = int(train.first_pass_batch)

    # Build, initialise and probe every member on CPU (reproducible whatever the device).
    models, first_pass, fp_values = [], [], {}
    for mem in spec.members:
        fp_idx = first_pass_indices(mem.seed, n_train, fp_size)
        xb = data.x_train.index_select(0, fp_idx).float()
        yb = data.y_train.index_select(0, fp_idx).long()
        model = init_member(mem.scenario, mem.seed, batch=xb)
        rows, values, input_var = _first_pass(model, xb, yb, mem.scenario.activation)
        for r in rows:
            # the probe's own "input_var" column is each layer's input variance (layer 1: the batch)
            r.setdefault("input_var", input_var)
            r.update(scenario=mem.scenario.name, seed=int(mem.seed), batch_input_var=input_var)
        first_pass.extend(rows)
        fp_values[mem.key] = values
        models.append(model)

    t1 = time.perf_counter()
    # Choose the engine; order members so that equal activations are contiguous.
    plans = [_parse_mlp(m, mem.scenario.activation) for m, mem in zip(models, spec.members)]
    stacked = all(p is not None for p in plans) and len({(p[0], tuple((lin.in_features, lin.out_features, lin.bias is not None)
                                                                       for lin, _ in p[1])) for p in plans}) == 1
    if stacked:
        def act_sort_key(i: int) -> tuple:
            return tuple((k[0], repr(k[1])) if k else ("", "") for _, k in plans[i][1])  # type: ignore[index]
        order = sorted(range(len(models)), key=act_sort_key)
        flatten = plans[0][0]  # type: ignore[index]
    else:  # blocks of identical architectures (same module tree), each vmapped when possible
        order = sorted(range(len(models)), key=lambda i: repr(models[i]))
        flatten = False
    x_train, y_train, x_test, y_test = _dataset_tensors(data, flatten, device, dtype)
    if stacked:
        engine: _Engine = _StackedMLP([models[i] for i in order], [plans[i][1] for i in order],  # type: ignore[index]
                                      x_train, y_train, device, dtype)
    else:
        blocks: list[_Engine] = []
        start = 0
        for j in range(1, len(order) + 1):
            if j == len(order) or repr(models[order[j]]) != repr(models[order[start]]):
                block = [models[i] for i in order[start:j]]
                cls = _Vmapped if _vmap_works(block, x_train) else _PerMember
                blocks.append(cls(block, x_train, y_train, device, dtype))
                start = j
        engine = blocks[0] if len(blocks) == 1 else _Blocks(blocks)
    members = [spec.members[i] for i in order]

    t2 = time.perf_counter()
    metrics, diverged, eval_s = _train_loop(engine, members, x_test, y_test, n_train, train, device, progress)
    t3 = time.perf_counter()
    rank = {m.key: i for i, m in enumerate(spec.members)}
    split_rank = {"train": 0, "test": 1}
    metric_rank = {"loss": 0, "acc": 1}
    metrics.sort(key=lambda r: (rank[(r["scenario"], r["seed"])], r["step"], split_rank[r["split"]], metric_rank[r["metric"]]))
    diverged.sort(key=lambda r: rank[(r["scenario"], r["seed"])])
    return GroupResult(metrics=metrics, first_pass=first_pass, first_pass_values=fp_values, diverged=diverged,
                       wall_s=time.perf_counter() - t0, engine=engine.kind, device=str(device),
                       timings={"init_first_pass": t1 - t0, "setup": t2 - t1, "train": t3 - t2 - eval_s, "eval": eval_s})


def _sync_each_step(device: torch.device) -> bool:
    """Whether to read the losses back every step (free on CPU; a device sync on a GPU)."""
    return device.type == "cpu"


def _train_loop(engine: _Engine, members: list[Member], x_test: Tensor, y_test: Tensor, n_train: int,
                train: TrainSpec, device: torch.device, progress: Callable[[int], Any] | None
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], float]:
    """The step loop shared by the engines: data order, logging, divergence, optimiser."""
    steps, B, log_every = int(train.steps), int(train.batch_size), int(train.log_every)
    opt_name, lr = str(train.optimizer).lower(), float(train.lr)
    check_every_step = _sync_each_step(device)
    alive = list(members)
    gens = [torch.Generator().manual_seed(data_seed(m.seed)) for m in alive]
    opt = _make_optimizer(opt_name, engine.params, lr)
    win_loss = torch.zeros(log_every, len(alive), device=device, dtype=engine.params[0].dtype)
    win_acc = torch.zeros(log_every, len(alive), device=device, dtype=engine.params[0].dtype)
    n_test = int(x_test.shape[0])
    metrics: list[dict[str, Any]] = []
    diverged: list[dict[str, Any]] = []
    pending_nan: dict[int, list[Member]] = {}  # log step -> members whose NaN rows are due there
    eval_s = [0.0]

    def rows(step: int, split: str, mems: list[Member], loss: list[float], acc: list[float]) -> None:
        for m, lv, av in zip(mems, loss, acc):
            base = dict(scenario=m.scenario.name, seed=int(m.seed), step=step, split=split)
            metrics.append({**base, "metric": "loss", "value": float(lv)})
            metrics.append({**base, "metric": "acc", "value": float(av)})

    def evaluate(step: int) -> None:
        if n_test == 0 or not alive:
            return
        t = time.perf_counter()
        loss, correct = engine.evaluate(x_test, y_test)
        rows(step, "test", alive, (loss / n_test).tolist(), (correct.double() / n_test).tolist())
        eval_s[0] += time.perf_counter() - t

    def drop(bad: list[int], first_bad: list[int]) -> None:
        nonlocal opt, win_loss, win_acc, gens, perm, full, tail, alive
        bad_set = set(bad)
        keep = [i for i in range(len(alive)) if i not in bad_set]
        for i, s in zip(bad, first_bad):
            m = alive[i]
            diverged.append(dict(scenario=m.scenario.name, seed=int(m.seed), step=int(s)))
            log_at = min(steps, -(-s // log_every) * log_every)
            pending_nan.setdefault(log_at, []).append(m)
        old_opt = opt
        triples = engine.keep(keep) if keep else []
        alive = [alive[i] for i in keep]
        gens = [gens[i] for i in keep]
        if not keep:
            return
        ki = torch.tensor(keep, dtype=torch.long, device=device)
        perm = perm.index_select(0, ki)
        full, tail = epoch_batches(perm)
        win_loss, win_acc = win_loss.index_select(1, ki), win_acc.index_select(1, ki)
        opt = _make_optimizer(opt_name, engine.params, lr)
        for old_p, new_p, is_stacked in triples:
            st = old_opt.state.get(old_p)
            if st:
                opt.state[new_p] = {k: (v.index_select(0, ki) if is_stacked and isinstance(v, Tensor) and v.dim() > 0
                                        else (v.clone() if isinstance(v, Tensor) else v)) for k, v in st.items()}

    def flush_nan(step: int) -> None:
        for m in pending_nan.pop(step, []):
            rows(step, "train", [m], [math.nan], [math.nan])
            rows(step, "test", [m], [math.nan], [math.nan])

    def epoch_batches(perm: Tensor) -> tuple[Tensor, Tensor]:
        """(full batches (k, M*B), last short batch (M*r,)) of an epoch, member-major rows."""
        M, k = perm.shape[0], n_train // B
        full = perm[:, :k * B].reshape(M, k, B).transpose(0, 1).reshape(k, M * B)
        return full, perm[:, k * B:].reshape(-1)

    evaluate(0)
    if progress is not None:
        progress(0)
    perm = full = tail = torch.empty(0, dtype=torch.long)
    pos, w, last_log = n_train, 0, 0
    for step in range(1, steps + 1):
        if not alive:
            break
        if pos >= n_train:
            perm = torch.stack([torch.randperm(n_train, generator=g) for g in gens]).to(device)
            full, tail = epoch_batches(perm)
            pos = 0
        b = min(B, n_train - pos)
        k = pos // B
        engine.train_forward(full[k] if b == B else tail, win_loss[w], win_acc[w])
        if check_every_step and not math.isfinite(float(win_loss[w].sum())):
            finite = torch.isfinite(win_loss[w])
            if not bool(finite.all()):
                bad = (~finite).nonzero().flatten().tolist()
                drop(bad, [step] * len(bad))
                if alive:  # redo this step's forward for the members that remain
                    engine.train_forward(full[k] if b == B else tail, win_loss[w], win_acc[w])
        pos += b
        if alive:
            engine.backward()
            opt.step()
            w += 1
        if step % log_every == 0 or step == steps:
            if alive and w and not check_every_step:
                finite = torch.isfinite(win_loss[:w]).all(0)
                if not bool(finite.all()):
                    bad = (~finite).nonzero().flatten().tolist()
                    first = [last_log + 1 + int((~torch.isfinite(win_loss[:w, i])).nonzero()[0]) for i in bad]
                    drop(bad, first)
            if alive and w:
                rows(step, "train", alive, win_loss[:w].mean(0).tolist(), win_acc[:w].mean(0).tolist())
            evaluate(step)
            flush_nan(step)
            last_log, w = step, 0
            if progress is not None:
                progress(step)
    for s in sorted(pending_nan):
        flush_nan(s)
    if progress is not None and (not alive and last_log < steps):
        progress(steps)
    return metrics, diverged, eval_s[0]
