"""Properties of the regularisers: KL, symmetric KL, Jensen-Shannon (softmax and sigmoid)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch.autograd import gradcheck
from torch.testing import assert_close

import advlab
from tests.strategies import exact_dtypes, generator, seeds, tensors

logit_shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=6)
distributions = st.sampled_from(["softmax", "sigmoid"])
LN2 = math.log(2.0)
# per-row tolerance of a divergence computed in this dtype from logits of size ~10
ATOL = {torch.float32: 2e-5, torch.float64: 1e-12}
LOGIT_SCALES = st.sampled_from([0.1, 1.0, 5.0, 20.0])


@st.composite
def logit_pairs(draw, dtype=exact_dtypes, scale=LOGIT_SCALES):
    """Two logit tensors of one drawn shape, values from a drawn seed in float32, cast."""
    shape = tuple(draw(logit_shapes))
    dtype = draw(dtype)
    s = draw(scale)
    return draw(tensors(shape, dtype, s)), draw(tensors(shape, dtype, s))


def bernoulli_kl(p_logits, q_logits):
    """Hand-written sum over classes of the Bernoulli KL, in float64."""
    p = torch.sigmoid(p_logits.double())
    lp, lq = F.logsigmoid(p_logits.double()), F.logsigmoid(q_logits.double())
    l1p, l1q = F.logsigmoid(-p_logits.double()), F.logsigmoid(-q_logits.double())
    return (p * (lp - lq) + (1 - p) * (l1p - l1q)).sum(-1)


# ---------------------------------------------------------------------------------------------- KL


@given(pair=logit_pairs(), distribution=distributions)
def test_kl_is_nonnegative_and_zero_on_equal_inputs(pair, distribution):
    p, q = pair
    kl = advlab.kl_divergence(p, q, distribution=distribution, reduction="none")
    assert kl.shape == p.shape[:-1]
    assert (kl >= -ATOL[p.dtype] * p.shape[-1]).all()
    same = advlab.kl_divergence(p, p, distribution=distribution, reduction="none")
    assert (same == 0).all()
    for reduction in ("batchmean", "mean", "sum"):
        assert advlab.kl_divergence(p, p.clone(), distribution=distribution, reduction=reduction) == 0


@given(pair=logit_pairs(), data=st.data())
def test_softmax_kl_is_invariant_to_a_per_row_logit_shift(pair, data):
    p, q = pair
    rows = p.shape[:-1]
    shift_p = data.draw(tensors(rows + (1,), torch.float32, 10.0)).to(p.dtype)
    shift_q = data.draw(tensors(rows + (1,), torch.float32, 10.0)).to(p.dtype)
    base = advlab.kl_divergence(p, q, reduction="none")
    shifted = advlab.kl_divergence(p + shift_p, q + shift_q, reduction="none")
    # the shifted logits are rounded in their dtype: allow that rounding times the logits' size
    scale = float((p.abs().max() + q.abs().max() + 20).clamp_min(1))
    tol = {torch.float32: 1e-6 * scale * p.shape[-1], torch.float64: 1e-14 * scale * p.shape[-1]}[p.dtype]
    assert_close(shifted, base, rtol=1e-4, atol=tol)
    for fn in (advlab.symmetric_kl, advlab.js_divergence):
        assert_close(
            fn(p + shift_p, q + shift_q, reduction="none"), fn(p, q, reduction="none"), rtol=1e-4, atol=2 * tol
        )


@given(pair=logit_pairs())
def test_softmax_kl_agrees_with_torch_kl_div(pair):
    p, q = pair
    p2, q2 = p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1])  # rows: every leading dimension
    expected = F.kl_div(F.log_softmax(q2, -1), F.log_softmax(p2, -1), reduction="batchmean", log_target=True)
    assert_close(advlab.kl_divergence(p, q), expected, rtol=1e-5, atol=ATOL[p.dtype])
    expected_mean = F.kl_div(F.log_softmax(q2, -1), F.softmax(p2, -1), reduction="none").mean()
    assert_close(advlab.kl_divergence(p, q, reduction="mean"), expected_mean, rtol=1e-5, atol=ATOL[p.dtype])
    expected_sum = F.kl_div(F.log_softmax(q2, -1), F.softmax(p2, -1), reduction="sum")
    assert_close(advlab.kl_divergence(p, q, reduction="sum"), expected_sum, rtol=1e-5, atol=ATOL[p.dtype] * p2.shape[0])
    # the module form is the function
    assert torch.equal(advlab.KLRegularizer()(p, q), advlab.kl_divergence(p, q))


@given(pair=logit_pairs())
def test_sigmoid_kl_is_the_bernoulli_kl_summed_over_classes(pair):
    p, q = pair
    got = advlab.kl_divergence(p, q, distribution="sigmoid", reduction="none")
    assert_close(got.double(), bernoulli_kl(p, q), rtol=1e-4, atol=ATOL[p.dtype] * p.shape[-1])
    rows = max(got.numel(), 1)
    assert_close(
        advlab.kl_divergence(p, q, distribution="sigmoid").double(),
        bernoulli_kl(p, q).sum() / rows,
        rtol=1e-4,
        atol=ATOL[p.dtype] * p.shape[-1],
    )


# ---------------------------------------------------------------------------------------------- symmetric, JS


@given(pair=logit_pairs(), distribution=distributions)
def test_symmetric_kl_is_symmetric_and_detach_changes_no_value(pair, distribution):
    p, q = pair
    none = advlab.symmetric_kl(p, q, detach="none", distribution=distribution, reduction="none")
    target = advlab.symmetric_kl(p, q, detach="target", distribution=distribution, reduction="none")
    assert torch.equal(none, target)
    swapped = advlab.symmetric_kl(q, p, distribution=distribution, reduction="none")
    assert_close(swapped, none, rtol=1e-6, atol=ATOL[p.dtype])
    expected = advlab.kl_divergence(p, q, distribution=distribution, reduction="none") + advlab.kl_divergence(
        q, p, distribution=distribution, reduction="none"
    )
    assert_close(none, expected, rtol=1e-6, atol=ATOL[p.dtype])
    assert (none >= -2 * ATOL[p.dtype] * p.shape[-1]).all()
    mod = advlab.SymmetricKLRegularizer(detach="target", distribution=distribution)
    assert torch.equal(mod(p, q), advlab.symmetric_kl(p, q, detach="target", distribution=distribution))


@given(pair=logit_pairs(scale=st.sampled_from([1.0, 20.0, 100.0])), distribution=distributions)
def test_js_is_bounded_by_ln2_and_symmetric(pair, distribution):
    p, q = pair
    js = advlab.js_divergence(p, q, distribution=distribution, reduction="none")
    classes = 1 if distribution == "softmax" else p.shape[-1]  # sigmoid: one Bernoulli JS per class
    assert (js <= classes * LN2 * (1 + 1e-6)).all()
    assert (js >= -ATOL[p.dtype] * p.shape[-1]).all()
    assert_close(
        advlab.js_divergence(q, p, distribution=distribution, reduction="none"), js, rtol=1e-6, atol=ATOL[p.dtype]
    )
    assert (advlab.js_divergence(p, p, distribution=distribution, reduction="none").abs() <= ATOL[p.dtype]).all()


def test_js_reaches_ln2_for_disjoint_distributions():
    p = torch.tensor([[60.0, -60.0]], dtype=torch.float64)
    assert_close(advlab.js_divergence(p, -p), torch.tensor(LN2, dtype=torch.float64), rtol=1e-12, atol=0.0)


@given(pair=logit_pairs(), distribution=distributions)
def test_js_matches_its_definition(pair, distribution):
    p, q = pair
    if distribution == "softmax":
        pp, qq = F.softmax(p.double(), -1), F.softmax(q.double(), -1)
        m = (pp + qq) / 2
        expected = 0.5 * (F.kl_div(m.log(), pp, reduction="none") + F.kl_div(m.log(), qq, reduction="none")).sum(-1)
    else:
        pp, qq = torch.sigmoid(p.double()), torch.sigmoid(q.double())
        m = (pp + qq) / 2

        def h(a, b):  # Bernoulli KL(a || b), elementwise, 0 log 0 = 0
            return torch.xlogy(a, a) - torch.xlogy(a, b) + torch.xlogy(1 - a, 1 - a) - torch.xlogy(1 - a, 1 - b)

        expected = (0.5 * (h(pp, m) + h(qq, m))).sum(-1)
    got = advlab.js_divergence(p, q, distribution=distribution, reduction="none")
    # float64 logits of size 20 saturate sigmoid: 1 - p loses digits in the reference, not in advlab
    assert_close(got.double(), expected, rtol=1e-4, atol=1e-5 * p.shape[-1])


# ---------------------------------------------------------------------------------------------- bfloat16, gradcheck


@given(pair=logit_pairs(dtype=st.just(torch.float32)), distribution=distributions)
def test_bfloat16_logits_are_compared_in_float32(pair, distribution):
    p, q = (t.bfloat16() for t in pair)
    for fn in (advlab.kl_divergence, advlab.symmetric_kl, advlab.js_divergence):
        got = fn(p, q, distribution=distribution, reduction="none")
        assert got.dtype == torch.float32
        assert torch.equal(got, fn(p.float(), q.float(), distribution=distribution, reduction="none"))


@pytest.mark.parametrize("fn", [advlab.kl_divergence, advlab.symmetric_kl, advlab.js_divergence])
@pytest.mark.parametrize("distribution", ["softmax", "sigmoid"])
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "none"])
def test_gradcheck_float64(fn, distribution, reduction):
    gen = generator(0)  # gradcheck is slow: one fixed draw per case, 18 cases
    p = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    q = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda a, b: fn(a, b, distribution=distribution, reduction=reduction), (p, q))


def cross_entropy(target_logits, logits, distribution):
    """Hand-written Σ_c sg(target) · -log(prediction) per row (both outcomes for sigmoid)."""
    t = target_logits.detach()
    if distribution == "softmax":
        return (F.softmax(t, -1) * -F.log_softmax(logits, -1)).sum(-1)
    return (torch.sigmoid(t) * -F.logsigmoid(logits) + torch.sigmoid(-t) * -F.logsigmoid(-logits)).sum(-1)


@given(seed=seeds, distribution=distributions)
def test_symmetric_kl_detach_target_sends_no_gradient_through_the_expectation(seed, distribution):
    """KL(sg(p)||q) + KL(sg(q)||p): each side's gradient comes only from its log-probabilities."""
    gen = generator(seed)
    p = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    q = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    gp, gq = torch.autograd.grad(advlab.symmetric_kl(p, q, detach="target", distribution=distribution), (p, q))
    ep, eq = torch.autograd.grad(
        cross_entropy(q, p, distribution).mean() + cross_entropy(p, q, distribution).mean(), (p, q)
    )
    assert_close(gp, ep, rtol=1e-10, atol=1e-12)
    assert_close(gq, eq, rtol=1e-10, atol=1e-12)
