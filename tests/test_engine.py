"""The variance-scaling engine: realised variance, distributions (KS), dtypes, determinism, errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from initlab import InitlabError, truncated_normal_, variance_scaling, variance_scaling_
from initlab._engine import CHUNK, TRUNC_STD, TRUNC_VAR, _fill_torch

SEED = 1234
P_MIN = 1e-3  # KS p-value below which a distribution is rejected


def gen(seed: int = SEED) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def excess_kurtosis(distribution: str) -> float:
    return {"normal": 0.0, "uniform": -1.2,
            "truncated_normal": float(stats.truncnorm(-2, 2).stats(moments="k"))}[distribution]


def var_z(sample: np.ndarray, var: float, distribution: str) -> float:
    """How many standard errors the sample variance is from ``var``."""
    n = sample.size
    se = var * math.sqrt((excess_kurtosis(distribution) + 2.0) / n)
    return abs(float(np.var(sample.astype(np.float64))) - var) / se


def reference(distribution: str, std: float):
    if distribution == "normal":
        return stats.norm(scale=std)
    if distribution == "uniform":
        a = math.sqrt(3.0) * std
        return stats.uniform(loc=-a, scale=2 * a)
    return stats.truncnorm(-2, 2, scale=std / TRUNC_STD)


def test_trunc_constant():
    # 0.8796... is the std of N(0,1) truncated to [-2, 2]
    assert TRUNC_STD == pytest.approx(float(stats.truncnorm(-2, 2).std()), rel=1e-14)
    assert TRUNC_VAR == pytest.approx(TRUNC_STD ** 2)


@pytest.mark.parametrize("distribution", ["normal", "uniform", "truncated_normal"])
@pytest.mark.parametrize("mode, n", [("fan_in", 300), ("fan_out", 200), ("fan_avg", 250),
                                     ("fan_geo_avg", math.sqrt(300 * 200))])
def test_realised_variance_is_scale_over_fan(distribution, mode, n):
    w = torch.empty(200, 300)
    variance_scaling_(w, 2.0, mode, distribution, generator=gen())
    x = w.numpy()
    target = 2.0 / n
    assert var_z(x, target, distribution) < 5.0
    assert abs(float(x.mean())) < 5.0 * math.sqrt(target / x.size)


def test_variance_check_negative_control():
    # the same check rejects a variance that is off by the truncation factor (0.77)
    w = torch.empty(200, 300)
    variance_scaling_(w, 1.0, "fan_in", "truncated_normal", generator=gen())
    assert var_z(w.numpy(), TRUNC_VAR / 300, "truncated_normal") > 5.0
    assert var_z(w.numpy(), 1.05 / 300, "truncated_normal") > 5.0


@pytest.mark.parametrize("distribution", ["normal", "uniform", "truncated_normal"])
def test_ks_against_scipy(distribution):
    w = torch.empty(400, 500)
    variance_scaling_(w, 1.0, "fan_in", distribution, generator=gen(7))
    std = math.sqrt(1.0 / 500)
    p = stats.kstest(w.numpy().ravel().astype(np.float64), reference(distribution, std).cdf).pvalue
    assert p > P_MIN


def test_ks_negative_controls():
    std = 0.05
    x = truncated_normal_(torch.empty(200_000), std, generator=gen()).numpy().astype(np.float64)
    # a plain normal of the same variance is not a truncated normal
    assert stats.kstest(x, stats.norm(scale=std).cdf).pvalue < 1e-6
    # torch's trunc_normal_ with its absolute default bounds (+-2) truncates nothing at std 0.05:
    t = torch.nn.init.trunc_normal_(torch.empty(200_000), std=std, generator=gen()).numpy().astype(np.float64)
    assert stats.kstest(t, reference("truncated_normal", std).cdf).pvalue < 1e-6


def test_same_distribution_as_torch_trunc_normal_with_relative_bounds():
    std = 0.05
    s = std / TRUNC_STD
    ours = truncated_normal_(torch.empty(100_000), std, generator=gen(1)).numpy()
    theirs = torch.nn.init.trunc_normal_(torch.empty(100_000), std=s, a=-2 * s, b=2 * s, generator=gen(2)).numpy()
    assert stats.ks_2samp(ours, theirs).pvalue > P_MIN


def test_truncated_range_and_exact_std():
    std = 0.3
    x = truncated_normal_(torch.empty(300, 400), std, generator=gen())
    bound = 2 * std / TRUNC_STD
    assert float(x.abs().max()) <= bound * (1 + 1e-6)
    assert float(x.abs().max()) > 0.99 * bound  # it does reach the cut
    assert var_z(x.numpy(), std * std, "truncated_normal") < 5.0


def test_uniform_range():
    w = variance_scaling(torch.empty(100, 300), 3.0, "fan_in", "uniform", generator=gen())
    limit = math.sqrt(3 * 3.0 / 300)
    assert float(w.abs().max()) <= limit
    assert float(w.abs().max()) > 0.99 * limit


def test_torch_path_sampler_ks():
    # the sampler used on accelerators, checked here on CPU
    buf = torch.empty(200_000)
    _fill_torch(buf, "truncated", 0.7, gen())
    p = stats.kstest(buf.numpy().astype(np.float64), stats.truncnorm(-2, 2, scale=0.7).cdf).pvalue
    assert p > P_MIN
    assert float(buf.abs().max()) <= 1.4 * (1 + 1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(dtype):
    w = torch.empty(300, 400, dtype=dtype)
    variance_scaling_(w, 2.0, "fan_in", "truncated_normal", generator=gen())
    assert w.dtype == dtype
    x = w.double().numpy()
    assert np.isfinite(x).all()
    assert var_z(x, 2.0 / 400, "truncated_normal") < 5.0


def test_fp16_equals_fp32_rounded():
    a = variance_scaling_(torch.empty(64, 300), generator=gen())
    b = variance_scaling_(torch.empty(64, 300, dtype=torch.float16), generator=gen())
    assert torch.equal(a.half(), b)


def test_meta_and_empty_are_noops():
    m = torch.empty(30, 40, device="meta")
    assert variance_scaling_(m, generator=gen()) is m
    e = torch.empty(0, 5)
    assert variance_scaling_(e) is e
    assert truncated_normal_(torch.empty(0)).numel() == 0


def test_runs_under_no_grad_on_parameters():
    p = torch.nn.Parameter(torch.empty(20, 30))
    out = variance_scaling_(p, generator=gen())
    assert out is p and p.requires_grad and p.grad_fn is None
    assert float(p.detach().abs().sum()) > 0


def test_generator_reproducibility():
    a = variance_scaling_(torch.empty(50, 60), generator=gen(3))
    b = variance_scaling_(torch.empty(50, 60), generator=gen(3))
    c = variance_scaling_(torch.empty(50, 60), generator=gen(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_default_generator_follows_manual_seed():
    torch.manual_seed(11)
    a = variance_scaling_(torch.empty(10, 10))
    torch.manual_seed(11)
    b = variance_scaling_(torch.empty(10, 10))
    assert torch.equal(a, b)


@pytest.mark.parametrize("distribution", ["normal", "uniform", "truncated_normal"])
def test_bit_identical_for_any_thread_count(distribution):
    shape = (3 * CHUNK + 1234,)  # several chunks, a ragged tail
    before = torch.get_num_threads()
    try:
        out = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out.append(variance_scaling_(torch.empty(shape), 1.0, "fan_in", distribution,
                                         generator=gen(5), fans=(100, 100)))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])


@pytest.mark.parametrize("numel", [4096, 3 * CHUNK])
def test_sampling_never_wakes_the_openmp_team(numel, monkeypatch):
    # erfinv splits even a 4096-element tensor over torch's threads (torch's grain size is not its
    # threshold), so every torch op of the sampler must run with one intra-op thread
    seen = []
    real = torch.erfinv

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "erfinv", spy)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        variance_scaling_(torch.empty(numel), 1.0, "fan_in", "normal", generator=gen(5), fans=(100, 100))
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {1} and after == 2
    # negative control: the spy sees the caller's thread count where it is not set
    seen.clear()
    torch.set_num_threads(2)
    try:
        torch.erfinv(torch.zeros(3))
    finally:
        torch.set_num_threads(before)
    assert seen == [2]


def test_chunks_are_independent_streams():
    x = truncated_normal_(torch.empty(4 * CHUNK), generator=gen()).view(4, CHUNK)
    r = np.corrcoef(x.numpy().astype(np.float64))
    off = r[~np.eye(4, dtype=bool)]
    assert np.abs(off).max() < 5.0 / math.sqrt(CHUNK)
    assert not torch.equal(x[0], x[1])


def test_non_contiguous_equals_logical_order():
    a = variance_scaling_(torch.empty(40, 30), generator=gen(9), fans=(30, 40))
    b_store = torch.empty(30, 40)
    b = b_store.T  # a (40, 30) view that is not contiguous
    variance_scaling_(b, generator=gen(9), fans=(30, 40))
    assert torch.equal(a, b)


def test_explicit_fans_override_shape():
    w = variance_scaling_(torch.empty(200, 300), 1.0, "fan_in", "normal", generator=gen(), fans=(50, 7))
    assert var_z(w.numpy(), 1.0 / 50, "normal") < 5.0


def test_functional_form():
    w = variance_scaling((30, 40), 2.0, "fan_in", "uniform", generator=gen(), dtype=torch.float64)
    assert w.shape == (30, 40) and w.dtype == torch.float64
    like = torch.empty(3, 4, dtype=torch.bfloat16)
    v = variance_scaling(like, generator=gen())
    assert v.dtype == torch.bfloat16 and v is not like


# ---------------------------------------------------------------------------------------------
# bad input: the message names the bad value and the valid choices

def test_unknown_mode():
    with pytest.raises(InitlabError, match=r"unknown mode 'fan_inn'; did you mean 'fan_in'\?.*fan_avg.*fan_geo_avg"):
        variance_scaling_(torch.empty(3, 4), mode="fan_inn")


def test_unknown_distribution():
    with pytest.raises(InitlabError, match=r"unknown distribution 'gauss'.*normal.*truncated_normal.*uniform"):
        variance_scaling_(torch.empty(3, 4), distribution="gauss")


@pytest.mark.parametrize("scale", [0, -1.0, float("nan"), float("inf")])
def test_bad_scale(scale):
    with pytest.raises(InitlabError, match=f"scale must be a finite number > 0, got {scale!r}"):
        variance_scaling_(torch.empty(3, 4), scale)


def test_bad_scale_type_and_std():
    with pytest.raises(InitlabError, match="scale must be a positive number, got str: 'big'"):
        variance_scaling_(torch.empty(3, 4), "big")
    with pytest.raises(InitlabError, match="std must be a finite number > 0, got -0.1"):
        truncated_normal_(torch.empty(3), -0.1)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_tensor(dtype):
    with pytest.raises(InitlabError, match=f"floating-point tensor.*got dtype {dtype}"):
        variance_scaling_(torch.zeros(3, 4, dtype=dtype))


@pytest.mark.parametrize("shape", [(), (7,)])
def test_0d_1d_tensors(shape):
    with pytest.raises(InitlabError, match="fan-based schemes do not apply"):
        variance_scaling_(torch.empty(shape))


def test_bad_fans_and_generator():
    with pytest.raises(InitlabError, match=r"fans must be a pair \(fan_in, fan_out\).*got \(3,\)"):
        variance_scaling_(torch.empty(3, 4), fans=(3,))
    with pytest.raises(InitlabError, match="fan_out is 0"):
        variance_scaling_(torch.empty(3, 4), mode="fan_out", fans=(4, 0))
    with pytest.raises(InitlabError, match="generator must be a torch.Generator or None, got int"):
        variance_scaling_(torch.empty(3, 4), generator=0)
    with pytest.raises(InitlabError, match="expects a torch.Tensor, got list"):
        variance_scaling_([1.0, 2.0])


def test_truncated_inverse_cdf_inside_bounds_and_exact():
    # the inverse CDF never leaves [-2s, 2s] and follows the truncated law (KS)
    x = truncated_normal_(torch.empty(200_000), 0.5, generator=gen(21)).numpy().astype(np.float64)
    assert np.abs(x).max() <= 2 * 0.5 / TRUNC_STD * (1 + 1e-6)
    assert stats.kstest(x, stats.truncnorm(-2, 2, scale=0.5 / TRUNC_STD).cdf).pvalue > P_MIN
    # negative control: the untruncated normal of the same std is rejected
    assert stats.kstest(x, stats.norm(scale=0.5).cdf).pvalue < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("distribution", ["normal", "uniform"])
def test_ks_large_sample(distribution, dtype):
    # 1M draws: the Box-Muller and bit-to-float conversions, in both precisions
    w = variance_scaling(torch.empty(1000, 1000, dtype=dtype), 1.0, "fan_in", distribution,
                         generator=gen(31), fans=(1, 1))
    p = stats.kstest(w.numpy().ravel().astype(np.float64), reference(distribution, 1.0).cdf).pvalue
    assert p > P_MIN


def test_neighbours_sharing_a_word_are_independent():
    # fp32 elements 2m and 2m+1 take the two halves of one 64-bit Philox word: uncorrelated
    x = variance_scaling(torch.empty(CHUNK), 1.0, "fan_in", "normal", generator=gen(8), fans=(1, 1))
    a, b = x[0::2].double().numpy(), x[1::2].double().numpy()
    bound = 5.0 / math.sqrt(a.size)
    assert abs(np.corrcoef(a, b)[0, 1]) < bound
    assert abs(np.corrcoef(a * a, b * b)[0, 1]) < bound
    # negative control: a pair built from a shared value would be correlated
    assert abs(np.corrcoef(a * a, (a * 0.5) ** 2 + b * b * 0.1)[0, 1]) > bound
