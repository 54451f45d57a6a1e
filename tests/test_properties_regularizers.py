"""Properties of the regularisers: KL, symmetric KL, Jensen-Shannon (softmax and sigmoid)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch.autograd import gradcheck
from torch.testing import assert_close

import advlab
from tests.strategies import (
    all_dtypes,
    exact_dtypes,
    generator,
    logit_shapes,
    seeds,
    tensors,
    wide_tensors,
)

distributions = st.sampled_from(["softmax", "sigmoid"])
LN2 = math.log(2.0)
LOGIT_SCALES = st.sampled_from([0.1, 1.0, 5.0, 20.0])


@st.composite
def logit_pairs(draw, dtype=exact_dtypes, scale=LOGIT_SCALES):
    """Two logit tensors of one drawn shape (at least 2 classes), values from a drawn seed in float32, cast."""
    shape = draw(logit_shapes())
    dtype = draw(dtype)
    s = draw(scale)
    return draw(tensors(shape, dtype, s)), draw(tensors(shape, dtype, s))


def bernoulli_kl(p_logits, q_logits):
    """Hand-written sum over classes of the Bernoulli KL, in float64."""
    p, not_p = torch.sigmoid(p_logits.double()), torch.sigmoid(-p_logits.double())
    lp, lq = F.logsigmoid(p_logits.double()), F.logsigmoid(q_logits.double())
    l1p, l1q = F.logsigmoid(-p_logits.double()), F.logsigmoid(-q_logits.double())
    return (p * (lp - lq) + not_p * (l1p - l1q)).sum(-1)


# ---------------------------------------------------------------------------------------------- KL


@given(pair=logit_pairs(), distribution=distributions)
def test_kl_is_nonnegative_and_zero_on_equal_inputs(pair, distribution):
    p, q = pair
    kl = advlab.kl_divergence(p, q, distribution=distribution, reduction="none")
    assert kl.shape == p.shape[:-1]
    assert (kl >= -divergence_tol(p, q)["atol"]).all()
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
    tol = divergence_tol(p, q)
    assert_close(advlab.kl_divergence(p, q), expected, **tol)
    expected_mean = F.kl_div(F.log_softmax(q2, -1), F.softmax(p2, -1), reduction="none").mean()
    assert_close(advlab.kl_divergence(p, q, reduction="mean"), expected_mean, **tol)
    expected_sum = F.kl_div(F.log_softmax(q2, -1), F.softmax(p2, -1), reduction="sum")
    assert_close(advlab.kl_divergence(p, q, reduction="sum"), expected_sum, rtol=tol["rtol"], atol=tol["atol"] * p2.shape[0])
    # the module form is the function
    assert torch.equal(advlab.KLRegularizer()(p, q), advlab.kl_divergence(p, q))


@given(pair=logit_pairs())
def test_sigmoid_kl_is_the_bernoulli_kl_summed_over_classes(pair):
    p, q = pair
    got = advlab.kl_divergence(p, q, distribution="sigmoid", reduction="none")
    tol = divergence_tol(p, q)
    assert_close(got.double(), bernoulli_kl(p, q), **tol)
    rows = max(got.numel(), 1)
    assert_close(advlab.kl_divergence(p, q, distribution="sigmoid").double(), bernoulli_kl(p, q).sum() / rows, **tol)


# ---------------------------------------------------------------------------------------------- symmetric, JS


@given(pair=logit_pairs(), distribution=distributions)
def test_symmetric_kl_is_symmetric_and_detach_changes_no_value(pair, distribution):
    p, q = pair
    none = advlab.symmetric_kl(p, q, detach="none", distribution=distribution, reduction="none")
    target = advlab.symmetric_kl(p, q, detach="target", distribution=distribution, reduction="none")
    assert torch.equal(none, target)
    swapped = advlab.symmetric_kl(q, p, distribution=distribution, reduction="none")
    tol = divergence_tol(p, q)
    assert_close(swapped, none, rtol=tol["rtol"], atol=2 * tol["atol"])
    expected = advlab.kl_divergence(p, q, distribution=distribution, reduction="none") + advlab.kl_divergence(
        q, p, distribution=distribution, reduction="none"
    )
    assert_close(none, expected, rtol=tol["rtol"], atol=2 * tol["atol"])
    assert (none >= -2 * tol["atol"]).all()
    mod = advlab.SymmetricKLRegularizer(detach="target", distribution=distribution)
    assert torch.equal(mod(p, q), advlab.symmetric_kl(p, q, detach="target", distribution=distribution))


@given(pair=logit_pairs(scale=st.sampled_from([1.0, 20.0, 100.0])), distribution=distributions)
def test_js_is_bounded_by_ln2_and_symmetric(pair, distribution):
    p, q = pair
    js = advlab.js_divergence(p, q, distribution=distribution, reduction="none")
    classes = 1 if distribution == "softmax" else p.shape[-1]  # sigmoid: one Bernoulli JS per class
    assert (js <= classes * LN2 * (1 + 1e-6)).all()
    tol = divergence_tol(p, q)
    assert (js >= -tol["atol"]).all()
    assert_close(
        advlab.js_divergence(q, p, distribution=distribution, reduction="none"), js, **tol
    )
    assert (advlab.js_divergence(p, p, distribution=distribution, reduction="none").abs() <= tol["atol"]).all()


def test_js_reaches_ln2_for_disjoint_distributions():
    p = torch.tensor([[60.0, -60.0]], dtype=torch.float64)
    assert_close(advlab.js_divergence(p, -p), torch.tensor(LN2, dtype=torch.float64), rtol=1e-12, atol=0.0)


def divergence_tol(p: torch.Tensor, q: torch.Tensor) -> dict[str, float]:
    """Tolerances of a per-row divergence computed in p's dtype (float32 at least).

    Each class contributes a rounding error of a few machine epsilons times the size of its
    log-probabilities, which grow like the logits: 4 eps · c · (1 + max |logit|) absolute,
    4 eps relative. Measured worst cases (2-core CPU, scales 0.1 to 100, 2 to 16 classes):
    1.1e-16 · c(1 + max|logit|) in float64, 2.7e-8 · c(1 + max|logit|) in float32.
    """
    eps = torch.finfo(torch.float64 if p.dtype == torch.float64 else torch.float32).eps
    size = 1.0 + float(torch.cat([p.flatten(), q.flatten()]).abs().max()) if p.numel() else 1.0
    return {"rtol": 4 * eps, "atol": 4 * eps * p.shape[-1] * size}


def xlogy_kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ a log(a / b) elementwise, float64, with 0 log 0 = 0 and a log(a / 0) = +inf."""
    return torch.xlogy(a, a) - torch.xlogy(a, b)


def reference_js(p: torch.Tensor, q: torch.Tensor, distribution: str) -> torch.Tensor:
    """JS from its definition in float64 probabilities; 1 - σ(x) is taken as σ(-x), without cancellation."""
    if distribution == "softmax":
        a, b = F.softmax(p.double(), -1), F.softmax(q.double(), -1)
        m = (a + b) / 2
        return (0.5 * (xlogy_kl(a, m) + xlogy_kl(b, m))).sum(-1)
    a, b, ac, bc = (torch.sigmoid(s * t.double()) for t, s in ((p, 1), (q, 1), (p, -1), (q, -1)))
    m, mc = (a + b) / 2, (ac + bc) / 2
    return (0.5 * (xlogy_kl(a, m) + xlogy_kl(ac, mc) + xlogy_kl(b, m) + xlogy_kl(bc, mc))).sum(-1)


@given(pair=logit_pairs(scale=st.sampled_from([0.1, 1.0, 5.0, 20.0, 100.0])), distribution=distributions)
def test_js_matches_its_definition(pair, distribution):
    p, q = pair
    got = advlab.js_divergence(p, q, distribution=distribution, reduction="none")
    assert_close(got.double(), reference_js(p, q, distribution), **divergence_tol(p, q))


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


# ---------------------------------------------------------------------------------------------- single logit

FUNCTIONS = {"kl": advlab.kl_divergence, "symmetric_kl": advlab.symmetric_kl, "js": advlab.js_divergence}
MODULES = {"kl": advlab.KLRegularizer, "symmetric_kl": advlab.SymmetricKLRegularizer, "js": advlab.JSRegularizer}


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize("shape", [(4, 1), (1,), (2, 3, 1)])
def test_a_single_logit_under_softmax_is_refused_naming_sigmoid(name, shape):
    """softmax of one logit is 1: the divergence would be exactly 0 at every step, silently."""
    p, q = torch.zeros(shape), torch.randn(shape, generator=generator(0))
    for call in (lambda: FUNCTIONS[name](p, q), lambda: MODULES[name]()(p, q)):
        with pytest.raises(advlab.AdvlabValueError, match=r'distribution="sigmoid"') as info:
            call()
        assert str(tuple(shape)) in str(info.value)
    # a single-logit head is one Bernoulli per row: the sigmoid divergence is defined and nonzero
    got = FUNCTIONS[name](p, q, distribution="sigmoid", reduction="none")
    assert got.shape == shape[:-1] and (got > 0).all()


@given(seed=seeds, rows=st.integers(1, 9))
def test_single_logit_sigmoid_kl_is_the_bernoulli_kl(seed, rows):
    gen = generator(seed)
    p, q = (4 * torch.randn(rows, 1, generator=gen, dtype=torch.float64) for _ in range(2))
    got = advlab.kl_divergence(p, q, distribution="sigmoid", reduction="none")
    assert_close(got, bernoulli_kl(p, q), **divergence_tol(p, q))


# ---------------------------------------------------------------------------------------------- -inf logits

INF = math.inf


def reference_kl(p: torch.Tensor, q: torch.Tensor, distribution: str) -> torch.Tensor:
    """KL(p||q) per row from float64 probabilities (0 log 0 = 0, p log(p / 0) = +inf)."""
    if distribution == "softmax":
        return xlogy_kl(F.softmax(p.double(), -1), F.softmax(q.double(), -1)).sum(-1)
    a, b, ac, bc = (torch.sigmoid(s * t.double()) for t, s in ((p, 1), (q, 1), (p, -1), (q, -1)))
    return (xlogy_kl(a, b) + xlogy_kl(ac, bc)).sum(-1)


@st.composite
def class_masks(draw, shape):
    """True at the kept classes, at least one per row (a softmax over no class is undefined)."""
    keep = torch.from_numpy(draw(hnp.arrays(np.bool_, shape)).copy())
    keep[..., draw(st.integers(0, shape[-1] - 1))] = True
    return keep


@given(pair=logit_pairs(scale=st.sampled_from([1.0, 5.0, 20.0])), distribution=distributions, data=st.data())
def test_minus_inf_logits_on_the_same_classes_are_ignored(pair, distribution, data):
    """Masked-out classes (−inf in both forwards) contribute 0 and get a zero gradient: no NaN."""
    p, q = pair
    keep = data.draw(class_masks(p.shape))
    pm, qm = p.masked_fill(~keep, -INF), q.masked_fill(~keep, -INF)
    for name, fn in FUNCTIONS.items():
        pl, ql = pm.clone().requires_grad_(), qm.clone().requires_grad_()
        got = fn(pl, ql, distribution=distribution, reduction="none")
        if name == "kl":
            expected = reference_kl(pm, qm, distribution)
        elif name == "symmetric_kl":
            expected = reference_kl(pm, qm, distribution) + reference_kl(qm, pm, distribution)
        else:
            expected = reference_js(pm, qm, distribution)
        assert_close(got.double(), expected, **divergence_tol(p, q))
        gp, gq = torch.autograd.grad(got.sum(), (pl, ql))
        assert torch.isfinite(gp).all() and torch.isfinite(gq).all(), name
        assert (gp[~keep] == 0).all() and (gq[~keep] == 0).all(), name
    if distribution == "softmax":  # the masked classes change nothing: the KL over the kept ones
        c = p.shape[-1]
        for row in range(p.reshape(-1, c).shape[0]):
            k = keep.reshape(-1, c)[row]
            whole = advlab.kl_divergence(pm.reshape(-1, c)[row][None], qm.reshape(-1, c)[row][None])
            if k.sum() == 1:  # one class left: both distributions put all their mass on it
                assert whole == 0
                continue
            sub = advlab.kl_divergence(p.reshape(-1, c)[row, k][None], q.reshape(-1, c)[row, k][None])
            assert_close(whole, sub, **divergence_tol(p, q))


@given(pair=logit_pairs(scale=st.sampled_from([1.0, 5.0])), distribution=distributions, data=st.data())
def test_minus_inf_logits_on_different_classes_give_inf_kl_never_nan(pair, distribution, data):
    """p with mass where q's logit is −inf: KL(p||q) = +inf (its true value); JS stays finite."""
    p, q = pair
    pm = p.masked_fill(~data.draw(class_masks(p.shape)), -INF)
    qm = q.masked_fill(~data.draw(class_masks(q.shape)), -INF)
    if distribution == "sigmoid" and data.draw(st.booleans()):
        pm = pm.masked_fill(~data.draw(class_masks(p.shape)), INF)  # sigmoid logits may be +inf too
    kl = advlab.kl_divergence(pm, qm, distribution=distribution, reduction="none")
    expected = reference_kl(pm, qm, distribution)
    assert not kl.isnan().any()
    assert torch.equal(torch.isinf(kl), torch.isinf(expected)) and (kl >= 0).all()
    fin = torch.isfinite(expected)
    assert_close(kl.double()[fin], expected[fin], **divergence_tol(p, q))
    sym = advlab.symmetric_kl(pm, qm, distribution=distribution, reduction="none")
    assert not sym.isnan().any() and torch.equal(torch.isinf(sym), torch.isinf(expected + reference_kl(qm, pm, distribution)))
    js = advlab.js_divergence(pm, qm, distribution=distribution, reduction="none")
    assert torch.isfinite(js).all()
    assert_close(js.double(), reference_js(pm, qm, distribution), **divergence_tol(p, q))


def test_minus_inf_logit_examples():
    """The two documented cases, by value."""
    masked = torch.tensor([[0.0, -INF]])
    assert advlab.kl_divergence(masked, torch.zeros(1, 2)).item() == pytest.approx(math.log(2.0), rel=1e-6)
    assert advlab.kl_divergence(torch.zeros(1, 2), masked).item() == INF
    # p = (1/2, 1/2), q = (1, 0), m = (3/4, 1/4)
    js = 0.5 * (0.5 * math.log(2 / 3) + 0.5 * math.log(2.0)) + 0.5 * math.log(4 / 3)
    assert advlab.js_divergence(torch.zeros(1, 2), masked).item() == pytest.approx(js, rel=1e-6)
    assert advlab.js_divergence(torch.zeros(1, 2, dtype=torch.float64), masked.double()).item() == pytest.approx(
        js, rel=1e-15
    )


# ---------------------------------------------------------------------------------------------- NaN, extremes


@given(pair=logit_pairs(), distribution=distributions, data=st.data())
def test_a_nan_logit_makes_its_row_nan_and_no_other(pair, distribution, data):
    """Not silently finite: the engine then refuses the loss (NonFiniteError, see test below)."""
    p, q = (t.reshape(-1, t.shape[-1]).clone() for t in pair)
    row, col = data.draw(st.integers(0, p.shape[0] - 1)), data.draw(st.integers(0, p.shape[1] - 1))
    target = data.draw(st.sampled_from(["p", "q"]))
    (p if target == "p" else q)[row, col] = math.nan
    for name, fn in FUNCTIONS.items():
        got = fn(p, q, distribution=distribution, reduction="none")
        assert got[row].isnan(), name
        others = torch.arange(p.shape[0]) != row
        assert not got[others].isnan().any(), name
        assert fn(p, q, distribution=distribution).isnan(), name


def test_a_nan_logit_raises_nonfinite_in_training():
    """The documented behaviour for NaN in real (unmasked) logits is an error, not a silent step."""
    from tests.tiny_models import TinyVL, tiny_batch

    model = TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)

    def forward():
        out = model(ids, img, tm, im)
        return out.index_put((torch.tensor([1]), torch.tensor([2])), torch.tensor(math.nan))

    villa = advlab.VILLA(model, sites={"txt": "word", "img": "img_proj"})
    with pytest.raises(advlab.NonFiniteError):
        villa.step(forward, lambda out: F.cross_entropy(out[[0, 2, 3]], y[[0, 2, 3]]))


@settings(max_examples=max(4 * settings.default.max_examples, 100))
@given(data=st.data(), distribution=distributions)
def test_logits_at_the_dtype_limits_never_give_nan(data, distribution):
    """Finite logits of any magnitude the dtype holds: KL in [0, inf], JS in [0, log 2 per Bernoulli]."""
    shape = data.draw(logit_shapes())
    dtype = data.draw(all_dtypes)
    p, q = data.draw(wide_tensors(shape, dtype)), data.draw(wide_tensors(shape, dtype))
    classes = 1 if distribution == "softmax" else shape[-1]
    for name, fn in FUNCTIONS.items():
        got = fn(p, q, distribution=distribution, reduction="none")
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert not got.isnan().any(), name
        assert (got >= -divergence_tol(p, q)["atol"]).all(), name  # >= 0 up to its rounding
        if name == "js":
            assert torch.isfinite(got).all() and (got <= classes * LN2 * (1 + 1e-6)).all()
        same = fn(p, p, distribution=distribution, reduction="none")
        if name == "js":  # log((p + p) / 2) is rounded: a few eps per class, not exactly 0
            assert (same.abs() <= divergence_tol(p, p)["atol"] / (1 + float(p.abs().max()))).all()
        else:
            assert (same == 0).all(), name
