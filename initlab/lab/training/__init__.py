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

The package, by stage: :mod:`.plan` (members, groups, seeds, batch order, initial models,
device), :mod:`.activations` (the activation kernels the stacked engine fuses),
:mod:`.engines` (stacked MLP, vmap, per-member), :mod:`.records` (per-layer records: the init
report's numbers, layer histograms over training), :mod:`.loop` (the step loop: data order,
metrics, divergence; its docstring has the rules), :mod:`.first_pass` (probe rows and arrays of
the initial models) and :mod:`.group` (:func:`run_group`, one unit of work, and its picklable
form :func:`run_unit`).
"""
from __future__ import annotations

from .engines import build_engine, plan_engine
from .group import GroupResult, run_group, run_unit
from .loop import TrainLoop, make_optimizer
from .plan import (GroupSpec, Member, check_train, data_seed, first_pass_indices, group_memory, init_member,
                   minibatch_indices, plan_groups, resolve_device)

__all__ = [
    "Member",
    "GroupSpec",
    "GroupResult",
    "plan_groups",
    "init_member",
    "run_group",
    "run_unit",
    "minibatch_indices",
    "first_pass_indices",
    "data_seed",
    "resolve_device",
    "check_train",
    "group_memory",
    "make_optimizer",
    "TrainLoop",
    "plan_engine",
    "build_engine",
]
