"""The batched ensemble trainer: equivalence with single-model training, divergence, planning,
metrics format, first pass, pickling."""
from __future__ import annotations

import dataclasses
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from initlab._errors import InitlabError
from initlab.lab import training as E
from initlab.lab.training import engines as engines_mod
from initlab.lab.training import group as group_mod
from initlab.lab.training import loop as loop_mod
from initlab.lab.config import experiment_from_dict
from initlab.lab.data import load_dataset

WIDTHS = [784, 32, 32, 10]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small models: one intra-op thread is faster and steadier on a busy machine (restored after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data():
    """A small slice of the embedded MNIST sample: 600 training and 200 test digits."""
    ds = load_dataset("mnist")
    g = torch.Generator().manual_seed(0)
    tr = torch.randperm(ds.x_train.shape[0], generator=g)[:600]
    te = torch.randperm(ds.x_test.shape[0], generator=g)[:200]
    return dataclasses.replace(ds, x_train=ds.x_train[tr], y_train=ds.y_train[tr],
                               x_test=ds.x_test[te], y_test=ds.y_test[te])


def make_exp(scenarios, *, widths=WIDTHS, seeds=(0, 1), steps=60, log_every=20, lr=1e-3, batch_size=16,
             optimizer="adam", first_pass_batch=50, model=None):
    """An experiment through the config schema (scenarios: (activation, scheme[, extra keys]))."""
    scs = []
    for sc in scenarios:
        act, scheme, *extra = sc
        d = {"name": f"{act}-{scheme}" + "".join(f"-w{'x'.join(map(str, e['widths']))}" for e in extra if "widths" in e),
             "activation": act, "scheme": scheme}
        for e in extra:
            d.update(e)
        scs.append(d)
    return experiment_from_dict({
        "name": "t", "description": "test",
        "data": {"name": "mnist"},
        "model": model or {"kind": "mlp", "widths": list(widths), "bias": True},
        "train": {"optimizer": optimizer, "lr": lr, "batch_size": batch_size, "steps": steps,
                  "log_every": log_every, "first_pass_batch": first_pass_batch, "device": "cpu",
                  "seeds": list(seeds)},
        "scenarios": scs,
    })


def series(result, key, split="train", metric="loss"):
    rows = [r for r in result.metrics if (r["scenario"], r["seed"]) == key and r["split"] == split and r["metric"] == metric]
    rows.sort(key=lambda r: r["step"])
    return [r["step"] for r in rows], np.array([r["value"] for r in rows])


def reference(member, data, steps, *, lr=1e-3, batch_size=16, dtype=torch.float32, optimizer="adam"):
    """A plain single-model loop: nn.Sequential, torch.optim, the member's minibatch order."""
    model = E.init_member(member.scenario, member.seed).to(dtype)
    opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)(model.parameters(), lr=lr)
    x = data.x_train.to(dtype)
    if x.dim() > 2 and member.scenario.model.kind == "mlp":
        x = x.flatten(1)
    batches = E.minibatch_indices(member.seed, x.shape[0], batch_size)
    losses = []
    for _ in range(steps):
        idx = next(batches)
        loss = F.cross_entropy(model(x[idx]), data.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        xt = data.x_test.to(dtype)
        if xt.dim() > 2 and member.scenario.model.kind == "mlp":
            xt = xt.flatten(1)
        out = model(xt)
        test = (F.cross_entropy(out, data.y_test).item(), (out.argmax(1) == data.y_test).double().mean().item())
    return np.array(losses), test


# ----------------------------------------------------------------------------- equivalence


def test_ensemble_matches_single_model_training_float32(data):
    """Same seed -> the batched group's per-step losses equal a plain PyTorch loop's (rtol 1e-4, 200 steps)."""
    steps = 200
    exp = make_exp([("sigmoid", "xavier_normal"), ("relu", "he_normal"), ("tanh", "lecun_normal")],
                   seeds=(0, 1), steps=steps, log_every=1)
    (group,) = E.plan_groups(exp)
    res = E.run_group(group, data)
    assert res.engine == "stacked"
    for m in group.members:
        ref, (ref_test_loss, ref_test_acc) = reference(m, data, steps)
        steps_logged, ens = series(res, m.key)
        assert steps_logged == list(range(1, steps + 1))
        np.testing.assert_allclose(ens, ref, rtol=1e-4, err_msg=str(m.key))
        _, test_loss = series(res, m.key, "test", "loss")
        _, test_acc = series(res, m.key, "test", "acc")
        assert test_loss[-1] == pytest.approx(ref_test_loss, rel=1e-4)
        assert test_acc[-1] == pytest.approx(ref_test_acc, abs=1.5 / data.x_test.shape[0])
    # negative control: another seed's loop does not match
    other = dataclasses.replace(group.members[0], seed=7)
    wrong, _ = reference(other, data, steps)
    _, ens0 = series(res, group.members[0].key)
    assert not np.allclose(ens0, wrong, rtol=1e-4)


@pytest.mark.parametrize("widths", [[784, 64, 32, 10], [784, 16, 10]])
def test_training_is_the_same_bits_for_any_thread_count(data, monkeypatch, widths):
    """The stacked engine's step (batched matmuls, the fused Adam over every tensor, the evaluations)
    gives the same metrics, bit for bit, on 1 and 2 threads. Negative control: one initial weight
    moved by one ulp changes them, so the comparison sees last-bit differences. (784-16-10: the
    evaluation's first-layer GEMM split its sums by thread count when it ran on the run's threads.)"""
    from initlab._engine import using_threads

    exp = make_exp([("sigmoid", "normal"), ("relu", "he_normal")], widths=widths, seeds=(0, 1),
                   steps=60, log_every=20)
    (group,) = E.plan_groups(exp)

    def values(threads):
        with using_threads(threads):
            res = E.run_group(group, data)
        assert res.engine == "stacked"
        return [(r["scenario"], r["seed"], r["step"], r["split"], r["metric"], r["value"]) for r in res.metrics]

    one = values(1)
    assert values(2) == one
    real_init = E.init_member

    def nudged(scenario, seed, **kw):
        model = real_init(scenario, seed, **kw)
        if seed == 1 and scenario.activation == "relu":
            with torch.no_grad():
                w = model[0].weight
                w[0, 300] = torch.nextafter(w[0, 300], torch.tensor(math.inf))
        return model

    monkeypatch.setattr(group_mod, "init_member", nudged)
    assert values(1) != one


def _histogram_float64(w):
    """weight_histogram's counts as computed before float32 sorting: numpy on the float64 values."""
    a = w.detach().double().flatten().numpy()
    a = a[np.isfinite(a)]
    lo, hi = float(a.min()), float(a.max())
    edges = np.unique(np.linspace(lo, hi, 31)) if hi > lo else np.array([lo, np.nextafter(lo, np.inf)])
    return np.histogram(a, bins=edges)[0].tolist()


def test_weight_histogram_counts_from_float32_are_the_float64_counts():
    """The live weight histograms count float32 weights by sorting them in float32: the same counts as
    numpy on the float64 values, for normal weights, ties on the bucket edges (small integers), a constant
    tensor and non-finite entries. Negative control: edges rounded to float32 before counting miscount."""
    g = torch.Generator().manual_seed(0)
    cases = [torch.randn(784, 100, generator=g) * 0.05, torch.randint(-15, 16, (40, 30), generator=g).float(),
             torch.full((7, 3), 0.25), torch.randn(50, 20, generator=g)]
    cases[3][3, 4], cases[3][7, 1] = float("nan"), float("inf")
    for w in cases:
        h = group_mod.weight_histogram(w)
        assert h["bucket"] == _histogram_float64(w) and sum(h["bucket"]) == int(torch.isfinite(w).sum())
    a = np.linspace(-1.0, 1.0, 31)[1:-1].astype(np.float32)  # float32 values next to the float64 edges
    vals = np.concatenate([a, np.nextafter(a, np.float32(2)), np.nextafter(a, np.float32(-2)), [-1.0, 1.0]])
    w = torch.from_numpy(vals.astype(np.float32))
    edges = np.linspace(-1.0, 1.0, 31)
    wrong = np.histogram(vals.astype(np.float32), bins=edges.astype(np.float32))[0].tolist()
    assert group_mod.weight_histogram(w)["bucket"] == _histogram_float64(w) != wrong


def test_ensemble_matches_single_model_float64_mixed_activations(data):
    """float64, N(0,1) weights included (chaotic in float32), leaky ReLU, a generic activation
    (GELU, autograd path), a single-layer model, and SGD: agreement to 1e-9."""
    steps = 60
    for optimizer, lr in (("adam", 1e-3), ("sgd", 0.05)):
        exp = make_exp([("sigmoid", "normal"), ("relu", "normal"), ("gelu", "he_normal"), ("leaky_relu", "he_normal"),
                        ("relu", "xavier_normal", {"widths": [784, 10]})],
                       seeds=(3,), steps=steps, log_every=1, optimizer=optimizer, lr=lr)
        groups = E.plan_groups(exp)
        assert [len(g.members) for g in groups] == [4, 1]
        for group in groups:
            res = E.run_group(group, data, dtype=torch.float64)
            assert res.engine == "stacked"
            for m in group.members:
                ref, (ref_test_loss, _) = reference(m, data, steps, dtype=torch.float64, optimizer=optimizer, lr=lr)
                _, ens = series(res, m.key)
                np.testing.assert_allclose(ens, ref, rtol=1e-9, err_msg=f"{optimizer} {m.key}")
                assert series(res, m.key, "test", "loss")[1][-1] == pytest.approx(ref_test_loss, rel=1e-9)


def test_inputs_zero_in_training_keep_their_initial_weights(data):
    """Features that are 0 in every training digit (MNIST's borders) are not trained (their
    gradient is exactly 0), but test digits that light them up still see their initial weights."""
    x_train = data.x_train.clone()
    x_train[:, :50] = 0.0
    x_test = data.x_test.clone()
    x_test[:, :50] = 0.5
    d = dataclasses.replace(data, x_train=x_train, x_test=x_test)
    steps = 40
    exp = make_exp([("relu", "he_normal"), ("sigmoid", "xavier_normal")], seeds=(2,), steps=steps, log_every=steps)
    (group,) = E.plan_groups(exp)
    res = E.run_group(group, d)
    for m in group.members:
        ref, (ref_test_loss, _) = reference(m, d, steps)
        assert series(res, m.key)[1][-1] == pytest.approx(ref.mean(), rel=1e-4)
        assert series(res, m.key, "test", "loss")[1][-1] == pytest.approx(ref_test_loss, rel=1e-4)
    # negative control: the same weights evaluated without the frozen rows give another test loss
    model = E.init_member(group.members[0].scenario, 2)
    with torch.no_grad():
        full = F.cross_entropy(model(x_test), d.y_test).item()
        model[0].weight[:, :50] = 0
        assert F.cross_entropy(model(x_test), d.y_test).item() != pytest.approx(full, rel=1e-3)


def test_denormal_mode_is_restored(data):
    exp = make_exp([("sigmoid", "normal")], seeds=(0,), steps=5, log_every=5)
    (group,) = E.plan_groups(exp)
    assert not group_mod._flush_denormal_on()
    a = E.run_group(group, data)
    assert not group_mod._flush_denormal_on()
    torch.set_flush_denormal(True)
    try:
        b = E.run_group(group, data, flush_denormal=False)
        assert group_mod._flush_denormal_on()
    finally:
        torch.set_flush_denormal(False)
    np.testing.assert_allclose([r["value"] for r in a.metrics], [r["value"] for r in b.metrics], rtol=1e-6)


def test_one_adam_over_stacked_tensors_is_per_member_adam():
    """Adam is elementwise: one optimiser over a (M, ...) tensor == M optimisers over its slices."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(4, 5, 3, generator=g)
    grads = [torch.randn(4, 5, 3, generator=g) * 10 ** torch.randn(4, 1, 1, generator=g) for _ in range(25)]
    for kw in ({"fused": True}, {"foreach": True}, {"foreach": False}):
        try:
            stacked = w0.clone().requires_grad_()
            opt = torch.optim.Adam([stacked], lr=1e-2, **kw)
        except (RuntimeError, ValueError):  # fused not available for this build
            continue
        singles = [w0[m].clone().requires_grad_() for m in range(4)]
        opts = [torch.optim.Adam([s], lr=1e-2) for s in singles]
        for gr in grads:
            stacked.grad = gr.clone()
            opt.step()
            for m in range(4):
                singles[m].grad = gr[m].clone()
                opts[m].step()
        torch.testing.assert_close(stacked.detach(), torch.stack([s.detach() for s in singles]), rtol=1e-6, atol=1e-7)
    # negative control: a norm-coupled update (Adam over the flattened ensemble with gradient
    # clipping by the global norm) is not per-member, and the same comparison catches it
    stacked = w0.clone().requires_grad_()
    opt = torch.optim.Adam([stacked], lr=1e-2)
    for gr in grads:
        stacked.grad = gr.clone()
        torch.nn.utils.clip_grad_norm_([stacked], 1.0)
        opt.step()
    with pytest.raises(AssertionError):
        torch.testing.assert_close(stacked.detach(), torch.stack([s.detach() for s in singles]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("engine", ["vmap", "per-member"])
def test_cnn_group_matches_single_model(data, monkeypatch, engine):
    """CNN members (torch.func vmap blocks, one per activation; or the per-member fallback) train
    like single models, and a poisoned member is dropped there too."""
    if engine == "per-member":
        monkeypatch.setattr(engines_mod, "_vmap_works", lambda models, x: False)
    steps = 15
    exp = make_exp([("relu", "he_normal"), ("tanh", "xavier_normal")], seeds=(0, 1), steps=steps, log_every=5,
                   model={"kind": "cnn", "widths": [784, 10], "channels": [4, 8], "kernel": 3, "bias": True})
    (group,) = E.plan_groups(exp)
    res = E.run_group(group, data)
    assert res.engine == engine
    for m in group.members:
        ref, (ref_test_loss, _) = reference(m, data, steps)
        steps_logged, ens = series(res, m.key)
        assert steps_logged == [5, 10, 15]
        np.testing.assert_allclose(ens, ref.reshape(3, 5).mean(1), rtol=1e-4)
        assert series(res, m.key, "test", "loss")[1][-1] == pytest.approx(ref_test_loss, rel=1e-4)
    vals = res.first_pass_values[group.members[0].key]
    assert vals["mat_mul_1"].shape == (50, 4, 28, 28) and vals["fc_out_2"].shape == (50, 8, 14, 14)
    assert vals["mat_mul_3"].shape == (50, 10)

    real_init = E.init_member

    def poisoned(scenario, seed, **kw):
        model = real_init(scenario, seed, **kw)
        if seed == 1 and scenario.activation == "tanh":
            with torch.no_grad():
                model[-1].weight[0, 0] = float("nan")
        return model

    monkeypatch.setattr(group_mod, "init_member", poisoned)
    bad = E.run_group(group, data)
    assert [(d["scenario"], d["seed"], d["step"]) for d in bad.diverged] == [("tanh-xavier_normal", 1, 1)]
    survivors = [r["value"] for r in bad.metrics if (r["scenario"], r["seed"]) != ("tanh-xavier_normal", 1)]
    clean = [r["value"] for r in res.metrics if (r["scenario"], r["seed"]) != ("tanh-xavier_normal", 1)]
    np.testing.assert_allclose(survivors, clean, rtol=1e-5)


# ----------------------------------------------------------------------------- divergence


def test_absurd_lr_diverges_relu_but_sigmoid_goes_on(data):
    """lr = 1e20: ReLU nets overflow to inf/NaN and are dropped; bounded sigmoid nets keep training."""
    exp = make_exp([("relu", "normal"), ("sigmoid", "xavier_normal")], seeds=(0, 1), steps=30, log_every=10, lr=1e20)
    (group,) = E.plan_groups(exp)
    res = E.run_group(group, data)
    div = {(d["scenario"], d["seed"]): d["step"] for d in res.diverged}
    assert set(div) == {("relu-normal", 0), ("relu-normal", 1)}
    for key, step in div.items():
        assert 1 <= step <= 30
        log_at = min(30, math.ceil(step / 10) * 10)
        rows = [r for r in res.metrics if (r["scenario"], r["seed"]) == key and r["step"] > 0]
        assert rows and max(r["step"] for r in rows) == log_at
        assert all(math.isnan(r["value"]) for r in rows if r["step"] == log_at)
        assert all(math.isfinite(r["value"]) for r in rows if r["step"] < log_at)
    for seed in (0, 1):
        steps, loss = series(res, ("sigmoid-xavier_normal", seed))
        assert steps == [10, 20, 30] and np.isfinite(loss).all()


@pytest.mark.parametrize("sync_each_step", [True, False], ids=["cpu-check-every-step", "accelerator-check-at-logs"])
def test_poisoned_member_is_dropped_and_others_are_unchanged(data, monkeypatch, sync_each_step):
    """A member whose weights hold inf diverges at step 1; the survivors' metrics are exactly those
    of a group without it (both divergence checks: every step, and at log steps)."""
    monkeypatch.setattr(loop_mod, "_sync_each_step", lambda device: sync_each_step)
    real_init = E.init_member

    def poisoned(scenario, seed, **kw):
        model = real_init(scenario, seed, **kw)
        if seed == 1:
            with torch.no_grad():
                model[0].weight[0, 0] = float("inf")
        return model

    exp = make_exp([("sigmoid", "xavier_normal"), ("relu", "he_normal")], seeds=(0, 1, 2), steps=25, log_every=10)
    (group,) = E.plan_groups(exp)
    clean = E.run_group(dataclasses.replace(group, members=tuple(m for m in group.members if m.seed != 1)), data)
    monkeypatch.setattr(group_mod, "init_member", poisoned)
    res = E.run_group(group, data)
    assert sorted((d["scenario"], d["seed"], d["step"]) for d in res.diverged) == [
        ("relu-he_normal", 1, 1), ("sigmoid-xavier_normal", 1, 1)]
    survivors = [r for r in res.metrics if r["seed"] != 1]
    assert [(r["scenario"], r["seed"], r["step"], r["split"], r["metric"]) for r in survivors] == \
        [(r["scenario"], r["seed"], r["step"], r["split"], r["metric"]) for r in clean.metrics]
    np.testing.assert_allclose([r["value"] for r in survivors], [r["value"] for r in clean.metrics], rtol=1e-6)
    dead = [r for r in res.metrics if r["seed"] == 1 and r["step"] > 0]
    assert {r["step"] for r in dead} == {10} and all(math.isnan(r["value"]) for r in dead)
    # its first pass is still reported (moments of the broken model)
    assert [r for r in res.first_pass if r["seed"] == 1]


# ----------------------------------------------------------------------------- planning, format, pickling


def test_plan_groups_by_model_shape():
    exp = make_exp([("sigmoid", "normal"), ("relu", "he_normal", {"widths": [784, 64, 10]}),
                    ("relu", "xavier_normal"), ("tanh", "normal", {"widths": [784, 64, 10]})], seeds=(0, 1, 2))
    groups = E.plan_groups(exp)
    assert len(groups) == 2
    assert [tuple(g.model.widths) for g in groups] == [tuple(WIDTHS), (784, 64, 10)]
    assert [m.key for m in groups[0].members] == [(n, s) for n in ("sigmoid-normal", "relu-xavier_normal") for s in (0, 1, 2)]
    assert all(m.scenario.model == g.model for g in groups for m in g.members)
    assert all(g.train == exp.train for g in groups)
    capped = E.plan_groups(exp, max_members=4)
    assert [len(g.members) for g in capped] == [4, 2, 4, 2]
    assert [m.key for g in capped for m in g.members] == [m.key for g in groups for m in g.members]
    with pytest.raises(InitlabError, match="max_members"):
        E.plan_groups(exp, max_members=0)


def test_metrics_rows_format_and_train_window_mean(data):
    """Rows: scenario, seed, step, split, metric, value; test at 0, every log_every and the end;
    train = the mean of the per-step minibatch values since the previous log."""
    exp = make_exp([("sigmoid", "xavier_normal")], seeds=(0, 5), steps=25, log_every=10)
    (group,) = E.plan_groups(exp)
    seen = []
    res = E.run_group(group, data, progress=seen.append)
    assert seen == [0, 10, 20, 25]
    assert all(set(r) == {"scenario", "seed", "step", "split", "metric", "value"} for r in res.metrics)
    assert all(isinstance(r["value"], float) and isinstance(r["step"], int) and isinstance(r["seed"], int) for r in res.metrics)
    for m in group.members:
        assert series(res, m.key, "test")[0] == [0, 10, 20, 25]
        assert series(res, m.key, "train")[0] == [10, 20, 25]
        _, acc = series(res, m.key, "train", "acc")
        assert ((acc >= 0) & (acc <= 1)).all()
    assert len(res.metrics) == 2 * (4 * 2 + 3 * 2)
    per_step = E.run_group(E.plan_groups(make_exp([("sigmoid", "xavier_normal")], seeds=(0, 5), steps=25, log_every=1))[0], data)
    for m in group.members:
        for metric in ("loss", "acc"):
            _, each = series(per_step, m.key, "train", metric)
            _, windows = series(res, m.key, "train", metric)
            np.testing.assert_allclose(windows, [each[:10].mean(), each[10:20].mean(), each[20:].mean()], rtol=1e-6)
    assert res.diverged == [] and res.wall_s > 0


def test_first_pass_values_and_rows(data):
    exp = make_exp([("sigmoid", "normal"), ("relu", "he_normal")], seeds=(0, 1), steps=1, log_every=1, first_pass_batch=50)
    (group,) = E.plan_groups(exp)
    res = E.run_group(group, data)
    n = data.x_train.shape[0]
    for m in group.members:
        v = res.first_pass_values[m.key]
        assert set(v) == {"input", "mat_mul_1", "fc_out_1", "mat_mul_2", "fc_out_2", "mat_mul_3", "fc_out_3"}
        assert v["input"].shape == (50, 784) and v["mat_mul_1"].shape == (50, 32) and v["fc_out_3"].shape == (50, 10)
        assert all(a.dtype == np.float32 for a in v.values())
        idx = E.first_pass_indices(m.seed, n, 50)
        np.testing.assert_array_equal(v["input"], data.x_train[idx].numpy())
        assert torch.equal(idx, next(E.minibatch_indices(m.seed, n, 50)))  # the first batch of epoch 1
        model = E.init_member(m.scenario, m.seed)
        w1 = model[0].weight.detach().numpy()
        np.testing.assert_allclose(v["mat_mul_1"], v["input"] @ w1.T, rtol=1e-5, atol=1e-4)
        act = torch.sigmoid if m.scenario.activation == "sigmoid" else torch.relu
        np.testing.assert_allclose(v["fc_out_1"], act(torch.from_numpy(v["mat_mul_1"])).numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(v["mat_mul_3"], v["fc_out_3"])  # linear readout, zero bias
        rows = [r for r in res.first_pass if (r["scenario"], r["seed"]) == m.key]
        assert len(rows) == 3
        assert rows[0]["input_var"] == pytest.approx(float(v["input"].astype(np.float64).var()), rel=1e-6)
        assert rows[0]["batch_input_var"] == pytest.approx(float(v["input"].astype(np.float64).var()), rel=1e-9)
        assert rows[0]["pre_var"] == pytest.approx(float(v["mat_mul_1"].astype(np.float64).var()), rel=1e-4)
    # N(0,1) weights saturate sigmoids; He keeps ReLU pre-activations at unit scale
    sat = res.first_pass_values[("sigmoid-normal", 0)]["fc_out_1"]
    assert ((sat < 0.05) | (sat > 0.95)).mean() > 0.5


def test_pickle_round_trip(data):
    exp = make_exp([("sigmoid", "xavier_normal"), ("relu", "he_normal")], seeds=(0,), steps=5, log_every=5)
    (group,) = E.plan_groups(exp)
    spec2, data2 = pickle.loads(pickle.dumps((group, data)))
    assert spec2 == group
    res = E.run_group(spec2, data2)
    res2 = pickle.loads(pickle.dumps(res))
    assert res2.metrics == res.metrics and res2.diverged == res.diverged
    assert res2.first_pass_values.keys() == res.first_pass_values.keys()
    for k, vals in res.first_pass_values.items():
        for name, arr in vals.items():
            np.testing.assert_array_equal(res2.first_pass_values[k][name], arr)
    again = E.run_group(group, data)  # pure: same inputs, same outputs
    assert [r["value"] for r in again.metrics] == [r["value"] for r in res.metrics]


def test_minibatch_indices_epochs():
    it = E.minibatch_indices(4, 50, 16)
    epoch = [next(it) for _ in range(4)]
    assert [len(b) for b in epoch] == [16, 16, 16, 2]
    assert sorted(torch.cat(epoch).tolist()) == list(range(50))
    nxt = torch.cat([next(it) for _ in range(4)])
    assert sorted(nxt.tolist()) == list(range(50)) and not torch.equal(nxt, torch.cat(epoch))
    assert not torch.equal(next(E.minibatch_indices(5, 50, 16)), epoch[0])


def test_bad_device_and_train_settings(data):
    exp = make_exp([("relu", "he_normal")], seeds=(0,), steps=2, log_every=1)
    (group,) = E.plan_groups(exp)
    if not torch.cuda.is_available():
        with pytest.raises(InitlabError, match="cuda.*not available"):
            E.run_group(dataclasses.replace(group, train=dataclasses.replace(group.train, device="cuda")), data)
    with pytest.raises(InitlabError, match="device"):
        E.run_group(dataclasses.replace(group, train=dataclasses.replace(group.train, device="tpu9")), data)
    with pytest.raises(InitlabError, match="optimizer"):
        E.run_group(dataclasses.replace(group, train=dataclasses.replace(group.train, optimizer="adamw")), data)
    with pytest.raises(InitlabError, match="train.steps"):
        E.run_group(dataclasses.replace(group, train=dataclasses.replace(group.train, steps=0)), data)
    with pytest.raises(InitlabError, match="dataset.x_train must be a torch.Tensor"):
        E.run_group(group, dataclasses.replace(data, x_train=data.x_train.numpy()))
    with pytest.raises(InitlabError, match="no members"):
        E.run_group(dataclasses.replace(group, members=()), data)


def test_first_pass_fallback_rows_number_layers_from_1_like_the_probe(data, monkeypatch):
    """When the probe cannot measure a member, its first-pass rows come from the hooked arrays: they
    must number the weight layers as the probe does (from 1), since the report picks layer 1 by index."""
    from initlab.lab.training import first_pass as first_pass_mod

    exp = make_exp([("relu", "he_normal")], seeds=(0,), steps=1, log_every=1)
    (grp,) = E.plan_groups(exp)
    good = E.run_group(grp, data)

    def broken(*args, **kwargs):
        raise InitlabError("the probe is unavailable")

    monkeypatch.setattr(first_pass_mod, "probe", broken)
    bad = E.run_group(grp, data)
    assert all(r["note"].startswith("probe failed") for r in bad.first_pass)
    assert [r["index"] for r in bad.first_pass] == [r["index"] for r in good.first_pass] == [1, 2, 3]
    assert [r["layer"] for r in bad.first_pass] == [r["layer"] for r in good.first_pass]
    for b, g in zip(bad.first_pass, good.first_pass):  # the same layer under the same number
        assert b["pre_var"] == pytest.approx(g["pre_var"], rel=1e-3)


@pytest.mark.parametrize("n", [1, 255, 256, 257, 500, 1000, 2048])
@pytest.mark.parametrize("threads", [1, 2])
def test_evaluation_first_layer_product_is_the_one_thread_gemm_bit_for_bit(n, threads):
    from initlab._engine import using_threads
    from initlab.lab.training.engines import _rows_mm

    g = torch.Generator().manual_seed(n)
    x, w, b = torch.randn(n, 712, generator=g), torch.randn(712, 1500, generator=g), torch.randn(1, 1500, generator=g)
    with using_threads(1):
        want, want_nb = torch.addmm(b, x, w), torch.mm(x, w)
    with using_threads(threads):
        got, got_nb = _rows_mm(x, w, b), _rows_mm(x, w, None)
    assert torch.equal(got, want) and torch.equal(got_nb, want_nb)
    # negative control: the same product summed in another order differs in some last bits
    other = (x.double() @ w.double() + b.double()).float()
    assert not torch.equal(other, want)
