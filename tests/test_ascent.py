"""Properties of the ascent steps (`advlab.ascent`): PGD and SMART updates on the balls of `advlab.balls`.

Masked positions stay exact zeros, δ stays in its ball, random directions move by the step size
and repeat for equal seeds, and a normalising step ignores the gradient's scale. Norms in the
assertions are recomputed independently in float64 (`tests.strategies.ref_norm`).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

import advlab
from advlab.ascent import pgd_step, random_direction, smart_step
from tests.strategies import (
    dtypes,
    exact_dtypes,
    expand_mask,
    fills,
    generator,
    masks,
    norms,
    optional_masks,
    poison_masked,
    radii,
    ref_norm,
    rtol_for,
    seeds,
    shapes,
    tensors,
    tensors_elementwise,
    unmasked_rows,
)

# Categorical spaces (norm x direction x dtype x fill x radius x mask kind) get 8 times the
# profile's budget, so each combination is drawn (as in tests/test_properties_balls.py).
WIDE = settings(max_examples=8 * settings.default.max_examples)


@WIDE
@given(
    data=st.data(),
    norm=norms,
    direction=st.sampled_from(["gradient", "sign", "random"]),
    radius=st.none() | radii,
    step_size=st.floats(0.0, 10.0),
    steps=st.integers(1, 4),
    dtype=dtypes,
    fill=fills,
)
def test_pgd_step_keeps_masked_zero_and_stays_in_the_ball(data, norm, direction, radius, step_size, steps, dtype, fill):
    shape = data.draw(shapes)
    mask = data.draw(masks(shape))
    gen = generator(data.draw(seeds))
    delta = advlab.project(data.draw(tensors(shape, dtype)), norm, radius, mask=mask)
    full = expand_mask(mask, delta)
    for _ in range(steps):
        grad = 10 * torch.randn(shape, generator=gen).to(dtype)
        grad = poison_masked(grad, mask, fill)
        delta = pgd_step(
            delta, grad, step_size=step_size, norm=norm, radius=radius, direction=direction, mask=mask, generator=gen
        )
        assert delta.dtype == dtype and delta.shape == shape
        assert (delta[~full] == 0).all()
        assert torch.isfinite(delta).all()
        if radius is not None:
            assert (ref_norm(delta, norm) <= radius * (1 + rtol_for(dtype))).all()


@given(data=st.data(), norm=norms, step_size=st.floats(1e-3, 10.0), dtype=exact_dtypes)
def test_pgd_step_random_direction_moves_by_step_size(data, norm, step_size, dtype):
    shape = data.draw(shapes)
    mask = data.draw(optional_masks(shape))
    seed = data.draw(seeds)
    delta = advlab.UniformSampler(step_size)(torch.empty(shape, dtype=dtype), mask=mask, generator=generator(seed + 1))
    out = pgd_step(
        delta, None, step_size=step_size, norm=norm, direction="random", mask=mask, generator=generator(seed)
    )
    move = ref_norm(out.double() - delta.double(), norm)
    live = unmasked_rows(mask, delta, norm)
    assert_close(move[live], torch.full_like(move[live], step_size), rtol=4 * rtol_for(dtype), atol=0.0)
    assert (move[~live] == 0).all()
    # equal seeds, equal moves; another seed, another move
    again = pgd_step(
        delta, None, step_size=step_size, norm=norm, direction="random", mask=mask, generator=generator(seed)
    )
    assert torch.equal(again, out)
    full = expand_mask(mask, delta)
    per_unit = full.sum(-1) if norm == "l2_token" else full.reshape(shape[0], -1).sum(-1)
    if (per_unit >= 2).any():  # a 1-element unit has only the directions +-1
        other = pgd_step(
            delta, None, step_size=step_size, norm=norm, direction="random", mask=mask, generator=generator(seed ^ 1)
        )
        assert not torch.equal(other, out)


@given(
    data=st.data(),
    norm=norms,
    direction=st.sampled_from(["gradient", "sign"]),
    radius=st.none() | radii,
    exponent=st.integers(-10, 10),
    dtype=exact_dtypes,
)
def test_pgd_step_is_invariant_to_scaling_the_gradient(data, norm, direction, radius, exponent, dtype):
    """A loss scaled by 2**16 (GradScaler's initial scale) moves δ identically: the step normalises."""
    shape = data.draw(shapes)
    mask = data.draw(optional_masks(shape))
    g = data.draw(tensors(shape, dtype, scale=2.0**exponent))  # normal floats: no subnormal squares
    g[data.draw(st.integers(0, shape[0] - 1))] = 0.0  # a zero row stays put in both
    delta = data.draw(tensors(shape, dtype, scale=0.1))
    kwargs = {"step_size": 0.05, "norm": norm, "radius": radius, "direction": direction, "mask": mask}
    assert torch.equal(pgd_step(delta, g * 2.0**16, **kwargs), pgd_step(delta, g, **kwargs))


@pytest.mark.parametrize("direction", ["gradient", "sign", "random"])
def test_pgd_step_refuses_a_1d_delta_by_its_name(direction):
    with pytest.raises(advlab.AdvlabValueError, match="`delta`.*at least 2 dimensions"):
        pgd_step(torch.zeros(3), torch.ones(3), step_size=0.1, direction=direction)
    with pytest.raises(advlab.AdvlabValueError, match="`like`.*at least 2 dimensions"):
        random_direction(torch.zeros(3))


@pytest.mark.parametrize("direction", ["gradient", "sign", "random"])
def test_pgd_step_returns_a_detached_perturbation(direction):
    """Documented: the new δ is detached, also when δ and its gradient still carry a graph."""
    delta = torch.zeros(2, 3, 4, requires_grad=True)
    grad = torch.randn(2, 3, 4, generator=generator(0)).requires_grad_()
    out = pgd_step(delta * 1.0, grad * 1.0, step_size=0.1, radius=1.0, direction=direction)
    assert not out.requires_grad and out.grad_fn is None


@given(
    data=st.data(),
    step_size=st.floats(0.0, 1e3),
    eps=st.sampled_from([0.0, 1e-6]),
    dtype=dtypes,
    steps=st.integers(1, 3),
)
def test_smart_step_is_bounded_per_position(data, step_size, eps, dtype, steps):
    shape = data.draw(shapes)
    mask = data.draw(optional_masks(shape))
    delta = data.draw(tensors_elementwise(shape, dtype))
    full = expand_mask(mask, delta)
    for _ in range(steps):
        grad = data.draw(tensors_elementwise(shape, dtype))
        delta = smart_step(delta, grad, step_size=step_size, eps=eps, mask=mask)
        assert delta.dtype == dtype and delta.shape == shape
        assert torch.isfinite(delta).all()
        assert (delta.double().abs().amax(-1) <= 1.0).all()
        assert (delta[~full] == 0).all()


def test_smart_step_max_abs_is_one_without_eps():
    """Independent value: after one step each nonzero position has max-abs exactly 1 when eps = 0."""
    g = torch.tensor([[[2.0, -4.0], [0.0, 0.0], [0.5, 0.25]]])
    out = smart_step(torch.zeros_like(g), g, step_size=3.0, eps=0.0)
    assert torch.equal(out, torch.tensor([[[0.5, -1.0], [0.0, 0.0], [1.0, 0.5]]]))
