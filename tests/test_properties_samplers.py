"""Properties of the samplers (initial δ): determinism per seed, bounds, masks, dtype/shape/device."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.testing import assert_close

import advlab
from tests.strategies import (
    dtypes,
    expand_mask,
    generator,
    masks,
    optional_masks,
    ref_norm,
    rtol_for,
    seeds,
    shapes,
    unmasked_rows,
)

# 0 or at least 1e-6: a subnormal half-width rounds to the subnormal grid in float32 (IEEE, not a sampler bug)
magnitudes = st.just(0.0) | st.floats(1e-6, 10.0, allow_nan=False)
positive = st.floats(1e-3, 10.0, allow_nan=False)

SAMPLERS = {
    "zero": lambda m: advlab.ZeroSampler(),
    "uniform": advlab.UniformSampler,
    "scaled_uniform": advlab.ScaledUniformSampler,
    "normal": advlab.NormalSampler,
    "sphere": advlab.SphereSampler,
}


@st.composite
def cases(draw, magnitude=magnitudes):
    """(like, mask or None, seed, magnitude); `like` holds NaN: a sampler must never read its values."""
    shape = draw(shapes)
    like = torch.full(shape, math.nan, dtype=draw(dtypes))
    return like, draw(optional_masks(shape)), draw(seeds), draw(magnitude)


@pytest.mark.parametrize("kind", list(SAMPLERS))
@given(case=cases())
def test_sampler_contract(kind, case):
    like, mask, seed, m = case
    sampler = SAMPLERS[kind](m)
    assert isinstance(sampler, advlab.Sampler)
    out = sampler(like, mask=mask, generator=generator(seed))
    assert out.shape == like.shape and out.dtype == like.dtype and out.device == like.device
    assert torch.isfinite(out).all()
    assert (out[~expand_mask(mask, like)] == 0).all()
    # equal seeds, equal draws
    assert torch.equal(sampler(like, mask=mask, generator=generator(seed)), out)


@pytest.mark.parametrize("kind", ["uniform", "scaled_uniform", "normal", "sphere"])
@given(case=cases(positive))
def test_sampler_differs_for_different_seeds(kind, case):
    like, mask, seed, m = case
    sampler = SAMPLERS[kind](m)
    a = sampler(like, mask=mask, generator=generator(seed))
    b = sampler(like, mask=mask, generator=generator(seed + 1))
    full = expand_mask(mask, like)
    if kind == "sphere":  # a row of one element has only the directions +-r
        if (full.reshape(like.shape[0], -1).sum(-1) >= 2).any():
            assert not torch.equal(a, b)
    elif full.any():
        assert not torch.equal(a, b)


@pytest.mark.parametrize("kind", list(SAMPLERS))
@given(data=st.data(), m=magnitudes)
def test_fully_masked_row_is_zero_never_nan(kind, data, m):
    shape = data.draw(shapes)
    mask = data.draw(masks(shape))
    row = data.draw(st.integers(0, shape[0] - 1))
    mask[row] = False
    like = torch.zeros(shape, dtype=data.draw(dtypes))
    out = SAMPLERS[kind](m)(like, mask=mask, generator=generator(data.draw(seeds)))
    assert torch.equal(out[row], torch.zeros_like(out[row]))
    assert not torch.isnan(out).any()
    everything_masked = torch.zeros(shape[:-1], dtype=torch.bool)
    assert torch.equal(SAMPLERS[kind](m)(like, mask=everything_masked), torch.zeros_like(like))


@given(case=cases())
def test_zero_sampler_is_zero(case):
    like, mask, seed, _ = case
    assert torch.equal(advlab.ZeroSampler()(like, mask=mask, generator=generator(seed)), torch.zeros_like(like))


@given(case=cases())
def test_uniform_sampler_is_within_its_half_width(case):
    like, mask, seed, m = case
    out = advlab.UniformSampler(m)(like, mask=mask, generator=generator(seed))
    spacing = torch.finfo(like.dtype).tiny * torch.finfo(like.dtype).eps  # subnormal step: 6e-8 in float16
    assert (out.double().abs() <= m * (1 + rtol_for(like.dtype)) + spacing).all()


@given(case=cases())
def test_scaled_uniform_sampler_is_within_m_over_sqrt_n(case):
    like, mask, seed, m = case
    out = advlab.ScaledUniformSampler(m)(like, mask=mask, generator=generator(seed))
    full = expand_mask(mask, like)
    n = full.reshape(like.shape[0], -1).sum(-1).clamp_min(1).double()  # unmasked elements of each row
    bound = (m / n.sqrt()).reshape(-1, *([1] * (like.dim() - 1)))
    assert (out.double().abs() <= bound * (1 + rtol_for(like.dtype))).all()
    # written out: u ~ U(0, 1) from the seed in the compute dtype (float64 for float64, else float32),
    # (2u - 1) m / sqrt(N), padded elements 0
    u = torch.rand(like.shape, generator=generator(seed), dtype=_compute(like.dtype)).double()
    expected = ((2 * u - 1) * m / n.sqrt().reshape(bound.shape)) * full
    assert_close(out.double(), expected, rtol=rtol_for(like.dtype), atol=torch.finfo(like.dtype).tiny)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scaled_uniform_rows_have_norm_about_m_over_sqrt3_whatever_the_mask(dtype):
    """Documented: the expected L2 norm of a row is about m / sqrt(3), as N counts only unmasked elements."""
    like = torch.zeros(64, 32, 32, dtype=dtype)
    mask = torch.arange(32).expand(64, 32) < torch.arange(64).unsqueeze(1) % 32 + 1  # 1 to 32 real positions
    out = advlab.ScaledUniformSampler(2.0)(like, mask=mask, generator=generator(0))
    norms = ref_norm(out, "l2")
    # ||δ||² = Σ u² / N with Var(u²) = 4 m⁴ / 45: the norm's relative std is about 1.5 sqrt(4 / (45 N)),
    # and sqrt biases it low by about half its relative variance. Allowed: 4 standard deviations (a fixed seed).
    n = mask.sum(-1).double() * like.shape[-1]
    rel_std = 1.5 * torch.sqrt(4 / (45 * n))
    mean_tol = 4 * float(rel_std.pow(2).sum().sqrt()) / len(n) + float((rel_std**2 / 2).mean())
    assert_close(norms.mean(), torch.tensor(2.0 / math.sqrt(3), dtype=torch.float64), rtol=mean_tol, atol=0.0)
    full = norms[mask.all(-1)]  # rows with 1024 real elements concentrate tightly
    assert_close(full, torch.full_like(full, 2.0 / math.sqrt(3)), rtol=4 * 1.5 * math.sqrt(4 / (45 * 1024)), atol=0.0)


@given(case=cases(positive))
def test_sphere_sampler_has_row_norm_r(case):
    like, mask, seed, r = case
    out = advlab.SphereSampler(r)(like, mask=mask, generator=generator(seed))
    live = unmasked_rows(mask, like)
    norm = ref_norm(out, "l2")
    assert_close(norm[live], torch.full_like(norm[live], r), rtol=rtol_for(like.dtype), atol=0.0)
    assert (norm[~live] == 0).all()


def _compute(dtype: torch.dtype) -> torch.dtype:
    """The dtype samplers draw in: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@given(case=cases(positive))
def test_normal_sampler_is_std_times_standard_normal_draws(case):
    """Written out: z ~ N(0, 1) from the seed in the compute dtype, σ z, padded elements 0."""
    like, mask, seed, s = case
    out = advlab.NormalSampler(s)(like, mask=mask, generator=generator(seed))
    z = torch.randn(like.shape, generator=generator(seed), dtype=_compute(like.dtype)).double()
    expected = s * z * expand_mask(mask, like)
    assert_close(out.double(), expected, rtol=rtol_for(like.dtype), atol=torch.finfo(like.dtype).tiny)


@given(case=cases())
def test_uniform_sampler_is_written_out_uniform_draws(case):
    """Written out: u ~ U(0, 1) from the seed in the compute dtype, (2u - 1) m, padded elements 0."""
    like, mask, seed, m = case
    out = advlab.UniformSampler(m)(like, mask=mask, generator=generator(seed))
    u = torch.rand(like.shape, generator=generator(seed), dtype=_compute(like.dtype)).double()
    expected = (2 * u - 1) * m * expand_mask(mask, like)
    assert_close(out.double(), expected, rtol=rtol_for(like.dtype), atol=torch.finfo(like.dtype).tiny)


@pytest.mark.parametrize("kind", ["uniform", "scaled_uniform", "normal", "sphere"])
@given(m=st.floats(max_value=-1e-6) | st.sampled_from([math.nan, math.inf]))
def test_negative_or_nonfinite_magnitude_raises(kind, m):
    with pytest.raises(advlab.AdvlabValueError):
        SAMPLERS[kind](m)


@pytest.mark.parametrize("kind", ["scaled_uniform", "sphere"])
def test_row_samplers_reject_a_tensor_without_rows(kind):
    """A 1-D tensor has no batch dimension: it is refused, not drawn as one row (as it once was)."""
    with pytest.raises(advlab.AdvlabValueError, match="`like`.*at least 2 dimensions"):
        SAMPLERS[kind](1.0)(torch.zeros(4))


@pytest.mark.parametrize("kind", list(SAMPLERS))
def test_wrong_mask_shape_raises_with_both_shapes(kind):
    with pytest.raises(advlab.AdvlabValueError, match=r"\(2, 3\).*\(3, 2\)"):
        SAMPLERS[kind](1.0)(torch.zeros(2, 3, 4), mask=torch.ones(3, 2, dtype=torch.bool))
