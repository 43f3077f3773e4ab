"""The training engines: M members' models as one object that steps them all at once.

- :class:`StackedMLP` (``"stacked"``): plain MLPs (an ``nn.Sequential`` of Linear layers, each
  followed by at most one elementwise activation) as stacked tensors with a hand-written
  backward pass into preallocated buffers: no autograd graph and no allocation per step;
- :class:`Vmapped` (``"vmap"``): other buffer-free models with the same module tree (the CNN
  builder) batched by ``torch.func.vmap`` over ``functional_call`` with stacked parameters,
  autograd backward; a group whose members differ in activation gets one block per architecture
  (:class:`Blocks`);
- :class:`PerMember` (``"per-member"``): anything else (norm layers with running statistics,
  dropout, modules vmap cannot batch): each member's own module in a Python loop inside the step.

:func:`build_engine` picks one for a group's initial models. Every engine has the same
interface (:class:`Engine`): forward a step's minibatches and write each member's loss and
accuracy, backward, evaluate on a shared set, drop members, and show its weight layers.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from ..._engine import thread_pool, using_threads
from ..metrics import LayerState
from .activations import IDENTITY, SegmentAct, activation_key

__all__ = ["Engine", "StackedMLP", "Vmapped", "Blocks", "PerMember", "EnginePlan", "plan_engine", "build_engine",
           "parse_mlp"]

_EVAL_CHUNK = 2048  # test examples per evaluation chunk (bounds memory: M x chunk x width)


# ----------------------------------------------------------------------------- plain MLPs


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


def parse_mlp(model: nn.Module, scenario_activation: object) -> tuple[bool, list[tuple[nn.Linear, tuple | None]]] | None:
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
        key = activation_key(m, scenario_activation)
        if key is None:
            return None
        layers[-1][1] = None if key is IDENTITY else key
    if not layers:
        return None
    return flatten, [(lin, key) for lin, key in layers]


# ----------------------------------------------------------------------------- engines

_SPLIT_ROWS = 128  # _rows_mm computes a product of at least twice this many rows as two halves


def _rows_mm(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``b + x @ w`` as one-thread GEMMs, so the same bits for any thread count (a multi-threaded GEMM may
    split its sums by thread count). With at least 2 * :data:`_SPLIT_ROWS` rows on the CPU, always as two
    halves of rows, side by side in two threads when torch has two: each row's sums are those of the
    whole product (the row blocks of a GEMM do not change an element's sums; tested), at half the time."""
    n = x.shape[0]
    out = torch.empty((n, w.shape[1]), dtype=x.dtype, device=x.device)

    def rows(lo: int, hi: int) -> None:
        with torch.no_grad(), using_threads(1):  # grad mode is per thread
            if b is not None:
                torch.addmm(b, x[lo:hi], w, out=out[lo:hi])
            else:
                torch.mm(x[lo:hi], w, out=out[lo:hi])

    half = n // 2 if x.device.type == "cpu" and n >= 2 * _SPLIT_ROWS else n
    if half == n:
        rows(0, n)
    elif torch.get_num_threads() >= 2:
        other = thread_pool("initlab-eval", 1).submit(rows, half, n)
        try:
            rows(0, half)
        finally:
            other.result()
    else:
        rows(0, half)
        rows(half, n)
    return out


class Engine:
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

    def layers(self) -> list[LayerState]:
        """Every weight layer of the members: weights (M, ...) and their last gradients, for metrics."""
        raise NotImplementedError


class StackedMLP(Engine):
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
        self._g_full: Tensor | None = None
        self.acts: list[list[SegmentAct]] = []
        for i in range(len(self.W)):
            segs: list[SegmentAct] = []
            for m, keys in enumerate(self.keys):
                key = keys[i]
                if key is None:
                    key = IDENTITY
                if segs and (segs[-1].name, segs[-1].param) == (key[0], key[1]):
                    segs[-1].stop = m + 1  # same table activation: same function
                else:
                    segs.append(SegmentAct(key[0], key[1], key[2], m, m + 1, bool(getattr(key[2], "inplace", False))))
            self.acts.append(segs)
        self.identity_layer = [all(s.is_identity for s in segs) for segs in self.acts]
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
                minus_one=torch.full((M, 1, b), -1.0, **kw),
            )
            self._plan_views(buf, b)
            self._bufs[b] = buf
        return buf

    def _plan_views(self, buf: dict[str, Any], b: int) -> None:
        """Every view a step of batch size ``b`` uses, made once (the buffers and parameters stay the
        same tensors until :meth:`keep`): the matmuls' operands and outputs, and each activation
        segment's slices."""
        M, L = self.M, len(self.W)
        x = buf["x"].view(M, b, -1)
        ins = [x] + buf["h"][:-1]
        fwd = []
        for i, (W, bias, z) in enumerate(zip(self.W, self.b, buf["z"])):
            if i < L - 1:
                args = (bias, ins[i], W) if bias is not None else (ins[i], W)
            else:  # Z^T = W^T H^T (+ b^T): (M, classes, b)
                args = ((bias.transpose(1, 2), W.transpose(1, 2), ins[i].transpose(1, 2)) if bias is not None
                        else (W.transpose(1, 2), ins[i].transpose(1, 2)))
            acts = [(a, z[a.start:a.stop], buf["h"][i][a.start:a.stop]) for a in self.acts[i]] \
                if not self.identity_layer[i] else []
            fwd.append((torch.baddbmm if bias is not None else torch.bmm, args, z, acts))
        bwd = []
        for i in range(L - 1, -1, -1):
            g = buf["g"][i]
            gz = g.transpose(1, 2) if i == L - 1 else g  # (M, b, out)
            acts = [(a, g[a.start:a.stop], zs, hs) for a, zs, hs in fwd[i][3]]
            grad_in = (gz, self.W[i].transpose(1, 2), buf["g"][i - 1]) if i > 0 else None
            bwd.append((acts, ins[i].transpose(1, 2), gz, self.gW[i], self.gb[i], grad_in))
        buf.update(fwd=fwd, bwd=bwd, y_col=buf["y"].view(M, 1, b), y_row=buf["y"].view(M, b),
                   nll_row=buf["nll"].view(M, b))

    # --- training
    @torch.no_grad()
    def train_forward(self, idx: Tensor, loss_out: Tensor, acc_out: Tensor) -> None:
        b = idx.numel() // self.M
        buf = self._buffers(b)
        self._b = b
        torch.index_select(self.x_train, 0, idx, out=buf["x"])
        torch.index_select(self.y_train, 0, idx, out=buf["y"])
        for mm, args, z, acts in buf["fwd"]:
            mm(*args, out=z)
            for a, zs, hs in acts:
                a.forward_slice(zs, hs, True)
        h = buf["h"][-1]  # the logits (M, classes, b)
        torch.log_softmax(h, 1, out=buf["logp"])
        torch.gather(buf["logp"], 1, buf["y_col"], out=buf["nll"])
        torch.mean(buf["nll_row"], 1, out=loss_out)
        loss_out.neg_()
        torch.max(h, 1, out=(buf["top"], buf["pred"]))  # max(dim) is much faster than argmax over a middle dim
        torch.eq(buf["pred"], buf["y_row"], out=buf["hit"])
        torch.sum(buf["hit"], 1, dtype=acc_out.dtype, out=acc_out)  # counts, exact in float
        acc_out.div_(b)

    @torch.no_grad()
    def backward(self) -> None:
        b = self._b
        buf = self._bufs[b]
        g = buf["g"][-1]  # dL/dZ_L^T = (softmax - onehot)^T / b, (M, classes, b)
        torch.exp(buf["logp"], out=g)
        g.scatter_add_(1, buf["y_col"], buf["minus_one"])
        g.mul_(1.0 / b)
        for acts, inp_t, gz, gW, gb, grad_in in buf["bwd"]:
            for a, gs, zs, hs in acts:
                a.backward_slice(gs, zs, hs)
            torch.bmm(inp_t, gz, out=gW)
            if gb is not None:
                torch.sum(gz, 1, keepdim=True, out=gb)
            if grad_in is not None:
                torch.bmm(grad_in[0], grad_in[1], out=grad_in[2])

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
            z = _rows_mm(xc, W0, b0)  # (n, M*H1)
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

    # --- inspection
    @torch.no_grad()
    def layers(self) -> list[LayerState]:
        """Each weight layer, (M, in, out) as stacked here; the first one with its frozen input rows
        (their gradient is exactly zero), written into buffers this engine keeps: read them before its
        next step."""
        out = []
        for i, (w, g) in enumerate(zip(self.W, self.gW)):
            if i == 0 and self.W_in_full is not None:
                w = self.W_in_full.index_copy_(1, self.active, w.detach())
                if self._g_full is None:
                    self._g_full = torch.zeros_like(w)  # the frozen rows stay 0
                g = self._g_full.index_copy_(1, self.active, g)
            out.append(LayerState(str(i + 1), w.detach(), g))
        return out

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


class Vmapped(Engine):
    """Any buffer-free model (the CNN builder, ...) batched with ``torch.func``: the members'
    parameters stacked by ``stack_module_state`` (each (M, *shape)), the forward pass
    ``vmap(functional_call)`` over the member axis, autograd for the backward pass."""

    kind = "vmap"

    def __init__(self, models: Sequence[nn.Module], x_train: Tensor, y_train: Tensor,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.x_train, self.y_train, self.device = x_train, y_train, device
        self.base = copy.deepcopy(models[0]).to("meta")
        params, _ = stack_module_state([m.to(device=device, dtype=dtype) for m in models])
        self.names = list(params)
        self._set([params[k].detach() for k in self.names])

    def _set(self, tensors: list[Tensor]) -> None:
        self.params = [t.contiguous().requires_grad_(True) for t in tensors]
        self.M = self.params[0].shape[0]

    def _logits(self, x: Tensor, shared: bool) -> Tensor:
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

    def layers(self) -> list[LayerState]:
        """Each weight (a parameter with at least two dimensions per member), stacked (M, ...)."""
        return [LayerState(n, p.detach(), p.grad) for n, p in zip(self.names, self.params) if p.dim() >= 3]

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
        sample = x[:2].detach().to("cpu", torch.float32)
        trial = Vmapped([copy.deepcopy(m) for m in models], sample, sample, torch.device("cpu"), torch.float32)
        with torch.no_grad():
            out = trial._logits(sample, True)
            ref = torch.stack([m.cpu().float()(sample) for m in models])
        return out.shape == ref.shape and torch.allclose(out, ref, rtol=1e-4, atol=1e-5)
    except Exception:  # noqa: BLE001 - anything vmap cannot do sends the group to the per-member engine
        return False


class Blocks(Engine):
    """Consecutive blocks of members, each trained by its own engine (e.g. one vmap engine per
    architecture when the members' activations differ). Same interface as a single engine."""

    def __init__(self, engines: list[Engine]) -> None:
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

    def layers(self) -> list[LayerState]:
        """The blocks' layers, joined along the member axis (the blocks share the model shape)."""
        per = [e.layers() for e in self.engines]
        return [LayerState(parts[0].name, torch.cat([p.weight for p in parts]),
                           None if any(p.grad is None for p in parts) else torch.cat([p.grad for p in parts]))
                for parts in zip(*per)]

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


class PerMember(Engine):
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

    @torch.no_grad()
    def layers(self) -> list[LayerState]:
        """Each weight (a parameter with at least two dimensions), stacked over the members."""
        named = [dict(m.named_parameters()) for m in self.models]
        out = []
        for name, p in named[0].items():
            if p.dim() >= 2:
                grads = [d[name].grad for d in named]
                grad = None if any(g is None for g in grads) else torch.stack(grads)
                out.append(LayerState(name, torch.stack([d[name].detach() for d in named]), grad))
        return out

    def keep(self, keep: list[int]) -> list[tuple[Tensor, Tensor, bool]]:
        self.models = [self.models[i] for i in keep]
        self._setup()
        return [(p, p, False) for p in self.params]




# ----------------------------------------------------------------------------- choosing an engine


@dataclass
class EnginePlan:
    """How a group trains: the member order (equal activations contiguous), whether inputs are
    flattened first, and each member's MLP layers when every member is a plain MLP of one shape."""

    order: list[int]
    flatten: bool
    mlp: list[list[tuple[nn.Linear, Any]]] | None


def _mlp_shape(plan: tuple[bool, list[tuple[nn.Linear, Any]]]) -> tuple:
    return (plan[0], tuple((lin.in_features, lin.out_features, lin.bias is not None) for lin, _ in plan[1]))


def plan_engine(models: Sequence[nn.Module], activations: Sequence[object]) -> EnginePlan:
    """The stacked engine when every model is a plain MLP of the same shape, else blocks of identical
    architectures (same module tree), each vmapped when possible."""
    plans = [parse_mlp(m, act) for m, act in zip(models, activations)]
    if all(p is not None for p in plans) and len({_mlp_shape(p) for p in plans}) == 1:  # type: ignore[arg-type]
        def act_sort_key(i: int) -> tuple:
            return tuple((k[0], repr(k[1])) if k else ("", "") for _, k in plans[i][1])  # type: ignore[index]
        order = sorted(range(len(models)), key=act_sort_key)
        return EnginePlan(order, plans[0][0], [plans[i][1] for i in order])  # type: ignore[index]
    return EnginePlan(sorted(range(len(models)), key=lambda i: repr(models[i])), False, None)


def build_engine(plan: EnginePlan, models: Sequence[nn.Module], x_train: Tensor, y_train: Tensor,
                 device: torch.device, dtype: torch.dtype) -> Engine:
    """The engine of ``plan`` over ``models`` (in the plan's order), on ``device`` in ``dtype``."""
    ordered = [models[i] for i in plan.order]
    if plan.mlp is not None:
        return StackedMLP(ordered, plan.mlp, x_train, y_train, device, dtype)
    blocks: list[Engine] = []
    start = 0
    for j in range(1, len(ordered) + 1):
        if j == len(ordered) or repr(ordered[j]) != repr(ordered[start]):
            block = ordered[start:j]
            cls = Vmapped if _vmap_works(block, x_train) else PerMember
            blocks.append(cls(block, x_train, y_train, device, dtype))
            start = j
    return blocks[0] if len(blocks) == 1 else Blocks(blocks)
