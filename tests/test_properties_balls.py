"""Properties of the balls (normalise, project, row norms); the ascent steps built on them are in test_ascent.py.

float32 and float64 are checked tightly, float16 and bfloat16 within their rounding; values are
drawn in float32 and cast, or (`wide_tensors`) over each dtype's whole range of magnitudes.
Norms in the assertions are recomputed independently in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

import advlab
from tests.strategies import (
    bad_radii,
    dtypes,
    expand_mask,
    fills,
    masks,
    norms,
    optional_masks,
    poison_masked,
    radii,
    ref_norm,
    rtol_for,
    shapes,
    tensors,
    tensors_elementwise,
    wide_tensors,
)

PROJECTIONS = {
    "l2": advlab.balls.project_l2,
    "l2_token": advlab.balls.project_l2_token,
    "linf": advlab.balls.project_linf,
}
NORMALIZERS = {
    "l2": advlab.balls.normalize_l2,
    "l2_token": advlab.balls.normalize_l2_token,
    "linf": advlab.balls.normalize_linf,
}


@st.composite
def masked_inputs(draw, dtype=dtypes, elementwise=True):
    """(x, mask or None) with x's values drawn in float32 and cast to a drawn dtype."""
    shape = draw(shapes)
    dtype = draw(dtype)
    x = draw(tensors_elementwise(shape, dtype) if elementwise else tensors(shape, dtype))
    return x, draw(optional_masks(shape))


# Categorical spaces of a few hundred combinations (norm x direction x dtype x fill x radius x mask
# kind) get 8 times the profile's budget (200 in dev, 800 in ci), so each combination is drawn.
WIDE = settings(max_examples=8 * settings.default.max_examples)

# ---------------------------------------------------------------------------------------------- project


@pytest.mark.parametrize("norm", ["l2", "l2_token", "linf"])
@given(data=masked_inputs(), radius=radii)
def test_project_is_idempotent_and_inside_the_ball(norm, data, radius):
    x, mask = data
    once = advlab.project(x, norm, radius, mask=mask)
    assert once.dtype == x.dtype and once.shape == x.shape
    # the named function and the Ball are the same projection, bit for bit
    assert torch.equal(PROJECTIONS[norm](x, radius, mask=mask), once)
    ball = advlab.balls.Ball(norm, radius)
    assert torch.equal(ball.project(x, mask=mask), once)

    twice = advlab.project(once, norm, radius, mask=mask)
    assert_close(twice, once)  # the dtype's default tolerances: bfloat16 may move by one rounding
    assert (ref_norm(once, norm) <= radius * (1 + rtol_for(x.dtype))).all()
    assert torch.isfinite(once).all()
    # the default rtol (bfloat16: its epsilon) covers the rounding of a projected row; one bool per row
    inside = ball.contains(once, mask=mask)
    assert inside.shape == x.shape[:1] and inside.all()
    assert ball.contains(once).all()


@pytest.mark.parametrize("norm", ["l2", "l2_token", "linf"])
@given(data=masked_inputs(), factor=st.floats(0.25, 4.0))
def test_project_leaves_points_inside_the_ball_untouched(norm, data, factor):
    x, mask = data
    n = ref_norm(x, norm, mask)
    radius = max(float(n.max()) * factor, 1e-3)  # radius relative to the data: some rows in, some out
    out = advlab.project(x, norm, radius, mask=mask)
    masked_x = torch.where(expand_mask(mask, x), x, torch.zeros((), dtype=x.dtype))
    if norm == "linf":
        inside = masked_x.double().abs() <= radius * (1 - 1e-6)  # elementwise clamp
        assert torch.equal(out[inside], masked_x[inside])
        return
    inside = n <= radius * (1 - 1e-6)  # margin: rows on the sphere may be rescaled by a rounding
    assert torch.equal(out[inside], masked_x[inside])  # bit-identical, bfloat16 included


@pytest.mark.parametrize("norm", ["l2", "l2_token", "linf"])
@given(data=masked_inputs())
def test_project_unbounded_only_masks(norm, data):
    x, mask = data
    assert torch.equal(advlab.project(x, norm, None), x)
    masked_x = torch.where(expand_mask(mask, x), x, torch.zeros((), dtype=x.dtype))
    assert torch.equal(advlab.project(x, norm, None, mask=mask), masked_x)
    inside = advlab.balls.Ball(norm, None).contains(x, mask=mask)
    assert inside.shape == x.shape[:1] and inside.all()


@given(x=tensors_elementwise(), radius=radii, norm=st.sampled_from(["l2", "l2_token"]))
def test_project_bfloat16_is_the_float32_projection_rounded(x, radius, norm):
    xb = x.bfloat16()
    assert torch.equal(advlab.project(xb, norm, radius), advlab.project(xb.float(), norm, radius).bfloat16())


def _unit_view(x: torch.Tensor, norm: str) -> torch.Tensor:
    """`x` as rows of the units a norm is taken over: [units, elements]."""
    return x.reshape(-1, x.shape[-1]) if norm == "l2_token" else x.reshape(x.shape[0], -1)


@pytest.mark.parametrize("norm", ["l2", "l2_token"])
@given(data=st.data(), factor=st.floats(0.01, 0.99), dtype=dtypes)
def test_project_puts_an_outside_point_on_the_sphere_along_its_own_direction(norm, data, factor, dtype):
    """Outside rows (positions) become radius * x / ||x||: not merely 'inside', the formula itself."""
    shape = data.draw(shapes)
    x = data.draw(wide_tensors(shape, dtype, spread=data.draw(st.sampled_from([0, 3, 20]))))
    mask = data.draw(optional_masks(shape))
    n = ref_norm(x, norm, mask)
    live = n > 0
    if not live.any() or not torch.isfinite(n).all():
        return
    radius = float(n[live].min()) * factor  # every unit with a nonzero norm is outside
    if not 0 < radius < float("inf"):
        return
    out = advlab.project(x, norm, radius, mask=mask)
    masked_x = torch.where(expand_mask(mask, x), x.double(), torch.zeros((), dtype=torch.float64))
    expected = masked_x * (radius / torch.where(live, n, torch.ones_like(n))).unsqueeze(-1).reshape(
        n.shape + (1,) * (x.dim() - n.dim())
    )
    # elementwise: the rounding of each output element, relative to the radius it is measured against
    # (and the dtype's subnormal spacing, where a small radius puts the result below its normal range)
    subnormal = torch.finfo(dtype).tiny * torch.finfo(dtype).eps
    assert_close(out.double(), expected, rtol=rtol_for(dtype), atol=rtol_for(dtype) * radius + subnormal)
    # and the result lies on the sphere (computed independently in float64)
    on = ref_norm(out, norm)[live]
    atol = subnormal * _unit_view(x, norm).shape[-1] ** 0.5
    assert_close(on, torch.full_like(on, radius), rtol=2 * rtol_for(dtype) + 1e-12 * x.shape[-1], atol=atol)


@given(data=st.data(), radius=radii, dtype=dtypes)
def test_linf_projection_clamps_each_element(data, radius, dtype):
    shape = data.draw(shapes)
    x = data.draw(wide_tensors(shape, dtype, spread=data.draw(st.sampled_from([0, 3, 20]))))
    mask = data.draw(optional_masks(shape))
    out = advlab.project(x, "linf", radius, mask=mask)
    masked_x = torch.where(expand_mask(mask, x), x, torch.zeros((), dtype=x.dtype))
    # the clamp of each element to [-r, r] rounded to the dtype, nothing else (untouched rows included)
    expected = masked_x.double().clamp(-radius, radius).to(dtype)
    assert torch.equal(out, expected)


def _unit_max_abs(x: torch.Tensor, norm: str) -> torch.Tensor:
    """Max-abs of each unit a norm is taken over, broadcastable to `x` (1 for zero units)."""
    m = x.abs().amax(-1, keepdim=True) if norm == "l2_token" else x.abs().flatten(1).amax(-1)
    m = torch.where(m > 0, m, torch.ones_like(m))
    return m if norm == "l2_token" else m.reshape((-1,) + (1,) * (x.dim() - 1))


@pytest.mark.parametrize("norm", ["l2", "l2_token", "linf"])
@given(data=st.data(), dtype=dtypes)
def test_normalize_values_are_the_gradient_over_its_norm(norm, data, dtype):
    """Each element is g / max(||g||, 1e-8), at every magnitude the dtype holds (not only unit norm)."""
    shape = data.draw(shapes)
    x = data.draw(wide_tensors(shape, dtype))
    mask = data.draw(optional_masks(shape))
    out = advlab.normalize(x, norm, mask=mask)
    assert out.dtype == dtype and torch.isfinite(out).all()
    masked_x = torch.where(expand_mask(mask, x), x.double(), torch.zeros((), dtype=torch.float64))
    # reference in float64 as (g / s) / max(||g / s||, eps / s), s the unit's max-abs: the norm of
    # float64 values near 1e308 is itself beyond float64
    s = _unit_max_abs(masked_x, norm)
    n = ref_norm(masked_x / s, norm)
    n = n.reshape(n.shape + (1,) * (x.dim() - n.dim()))
    expected = (masked_x / s) / torch.maximum(n, 1e-8 / s)
    # each element of a unit vector: its dtype's rounding (relative to 1), and float32's in the norm
    assert_close(out.double(), expected, rtol=rtol_for(dtype), atol=rtol_for(dtype))
    true_norm = (n * s).reshape(n.shape[: (x.dim() - 1 if norm == "l2_token" else 1)])
    got = ref_norm(out, norm)[true_norm > 2e-8]
    assert_close(got, torch.ones_like(got), rtol=0.0, atol=rtol_for(dtype) * 2)


# ---------------------------------------------------------------------------------------------- masks


@WIDE
@given(data=st.data(), norm=norms, fill=fills, radius=st.none() | radii, dtype=dtypes)
def test_masked_positions_are_exact_zeros_and_never_leak(data, norm, fill, radius, dtype):
    shape = data.draw(shapes)
    x = data.draw(tensors_elementwise(shape, dtype))
    mask = data.draw(masks(shape))
    poisoned = poison_masked(x, mask, fill)  # NaN / inf / huge at masked positions only
    full = expand_mask(mask, x)
    outs = {
        "normalize": (advlab.normalize(poisoned, norm, mask=mask), advlab.normalize(x, norm, mask=mask)),
        "normalize_sign": (advlab.balls.normalize_sign(poisoned, mask=mask), advlab.balls.normalize_sign(x, mask=mask)),
        "project": (advlab.project(poisoned, norm, radius, mask=mask), advlab.project(x, norm, radius, mask=mask)),
        "pgd_step": (
            advlab.ascent.pgd_step(poisoned, poisoned, step_size=0.1, norm=norm, radius=radius, mask=mask),
            advlab.ascent.pgd_step(x, x, step_size=0.1, norm=norm, radius=radius, mask=mask),
        ),
        "smart_step": (
            advlab.ascent.smart_step(poisoned, poisoned, step_size=0.1, mask=mask),
            advlab.ascent.smart_step(x, x, step_size=0.1, mask=mask),
        ),
    }
    for name, (out, clean) in outs.items():
        assert out.dtype == x.dtype, name
        assert (out[~full] == 0).all(), name
        assert torch.isfinite(out).all(), name
        # what was at the masked positions changed nothing anywhere
        assert torch.equal(out, clean), name
    n_poisoned = advlab.balls.row_norm(poisoned, norm, mask=mask)
    assert torch.equal(n_poisoned, advlab.balls.row_norm(x, norm, mask=mask))
    # atol: float32 squares of elements below ~1e-19 underflow (harmless: far below the 1e-8 clamp)
    assert_close(n_poisoned.double(), ref_norm(x, norm, mask), rtol=rtol_for(torch.float32), atol=1e-18)


@given(data=st.data(), norm=norms, dtype=dtypes)
def test_fully_masked_rows_normalise_and_project_to_zero(data, norm, dtype):
    shape = data.draw(shapes)
    x = data.draw(tensors(shape, dtype))
    mask = torch.zeros(shape[:-1], dtype=torch.bool)
    assert torch.equal(advlab.normalize(x, norm, mask=mask), torch.zeros_like(x))
    assert torch.equal(advlab.project(x, norm, 1.0, mask=mask), torch.zeros_like(x))
    assert torch.equal(advlab.balls.row_norm(x, norm, mask=mask), torch.zeros_like(advlab.balls.row_norm(x, norm)))


# ---------------------------------------------------------------------------------------------- normalise


@pytest.mark.parametrize("norm", ["l2", "l2_token", "linf"])
@given(data=st.data(), dtype=dtypes)
def test_normalize_has_unit_norm_or_is_zero(norm, data, dtype):
    shape = data.draw(shapes)
    x = data.draw(tensors_elementwise(shape, dtype))
    mask = data.draw(optional_masks(shape))
    zero_rows = data.draw(st.lists(st.integers(0, shape[0] - 1), max_size=2))
    x[zero_rows] = 0.0  # exact zero rows, also negative zero below
    if data.draw(st.booleans()):
        x = -x
    out = advlab.normalize(x, norm, mask=mask)
    assert torch.equal(NORMALIZERS[norm](x, mask=mask), out)
    assert torch.equal(advlab.balls.Ball(norm).normalize(x, mask=mask), out)
    assert out.dtype == x.dtype and torch.isfinite(out).all()

    g_norm = ref_norm(x, norm, mask)
    out_norm = ref_norm(out, norm)
    big = g_norm > 2e-8  # clear of the 1e-8 clamp
    assert_close(out_norm[big], torch.ones_like(out_norm[big]), rtol=0.0, atol=rtol_for(dtype))
    small = g_norm < 0.5e-8  # below the clamp: g / 1e-8
    assert_close(out_norm[small], g_norm[small] / 1e-8, rtol=rtol_for(dtype), atol=1e-6)
    zero = g_norm == 0
    assert (out_norm[zero] == 0).all()
    # the direction is g's: same signs, nothing where g is 0
    masked_x = torch.where(expand_mask(mask, x), x, torch.zeros((), dtype=x.dtype))
    assert (torch.sign(out) == torch.sign(masked_x))[out != 0].all()
    assert (out[masked_x == 0] == 0).all()


@given(x=tensors_elementwise(), norm=norms)
def test_normalize_bfloat16_is_the_float32_direction_rounded(x, norm):
    xb = x.bfloat16()
    assert torch.equal(advlab.normalize(xb, norm), advlab.normalize(xb.float(), norm).bfloat16())


@given(data=masked_inputs())
def test_normalize_sign_is_minus_one_zero_or_one(data):
    x, mask = data
    out = advlab.balls.normalize_sign(x, mask=mask)
    assert out.dtype == x.dtype
    assert torch.isin(out.double(), torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)).all()
    full = expand_mask(mask, x)
    assert torch.equal(out[full], torch.sign(x)[full])
    assert (out[~full] == 0).all()


# ---------------------------------------------------------------------------------------------- norms, radii


@given(x=tensors_elementwise(), norm=norms, data=st.data())
def test_row_norm_is_at_least_float32(x, norm, data):
    mask = data.draw(optional_masks(x.shape))
    xb = x.bfloat16()
    nb = advlab.balls.row_norm(xb, norm, mask=mask)
    assert nb.dtype == torch.float32
    assert torch.equal(nb, advlab.balls.row_norm(xb.float(), norm, mask=mask))  # not accumulated in bfloat16
    assert advlab.balls.row_norm(x, norm, mask=mask).dtype == torch.float32
    n64 = advlab.balls.row_norm(x.double(), norm, mask=mask)
    assert n64.dtype == torch.float64
    assert_close(n64, ref_norm(x, norm, mask), rtol=1e-12, atol=0.0)
    expected_shape = x.shape[:-1] if norm == "l2_token" else x.shape[:1]
    assert nb.shape == expected_shape


@given(radius=bad_radii, norm=norms)
def test_nonpositive_or_nonfinite_radius_raises(radius, norm):
    x = torch.ones(2, 3)
    for call in (
        lambda: advlab.project(x, norm, radius),
        lambda: PROJECTIONS[norm](x, radius),
        lambda: advlab.balls.Ball(norm, radius),
        lambda: advlab.ascent.pgd_step(x, x, step_size=0.1, norm=norm, radius=radius),
        lambda: advlab.PGDAscender(0.1, norm, radius),
        lambda: advlab.Perturbation(0.1, radius=radius, norm=norm),
    ):
        with pytest.raises(advlab.AdvlabValueError, match="radius"):
            call()


# ---------------------------------------------------------------------------------------------- extremes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("norm", ["l2", "l2_token"])
@pytest.mark.parametrize("where", ["largest", "smallest"])
def test_normalize_and_project_survive_values_at_the_dtype_limits(dtype, norm, where):
    """A row of the dtype's largest (or smallest normal) values: its square over- (under-)flows."""
    info = torch.finfo(dtype)
    value = info.max / 2 if where == "largest" else info.tiny * 16  # results stay normal numbers
    x = torch.full((2, 3, 4), value, dtype=dtype)
    x[1, :, 1] = -value
    n_elems = 4 if norm == "l2_token" else 12
    unit = 1 / n_elems**0.5  # every element has the same magnitude
    out = advlab.normalize(x, norm, eps=0.0 if where == "smallest" else 1e-8)
    expected = torch.sign(x.double()) * unit
    assert_close(out.double(), expected, rtol=rtol_for(dtype), atol=0.0)
    radius = float(value)  # every row is outside (norm sqrt(n) * value)
    proj = advlab.project(x, norm, radius)
    # on the sphere along x's own direction: each element radius / sqrt(n) in magnitude
    assert_close(proj.double(), expected * radius, rtol=rtol_for(dtype), atol=0.0)
    n = advlab.balls.row_norm(x, norm)
    true_norm = float(value) * n_elems**0.5
    if true_norm > torch.finfo(n.dtype).max:  # bfloat16's largest values: the norm itself exceeds float32
        assert torch.isinf(n).all()
    else:
        assert_close(n.double(), torch.full_like(n, true_norm, dtype=torch.float64), rtol=rtol_for(dtype), atol=0.0)


@given(data=st.data(), norm=norms, dtype=dtypes, fill=st.sampled_from([math.nan, math.inf, -math.inf]))
def test_a_nonfinite_unmasked_element_is_never_hidden(data, norm, dtype, fill):
    """NaN / inf at a real element: normalize and the L2 projections put NaN in its row (position for
    l2_token) and nowhere else; the L-inf clamp keeps NaN and sends ±inf to ±radius (documented)."""
    shape = data.draw(shapes)
    x = data.draw(tensors(shape, dtype))
    mask = data.draw(optional_masks(shape))
    live = expand_mask(mask, x)
    if not live.any():
        return
    flat = live.flatten().nonzero().flatten()
    where = int(flat[data.draw(st.integers(0, len(flat) - 1))])
    x = x.flatten().clone()
    x[where] = fill
    x = x.reshape(shape)
    index = torch.unravel_index(torch.tensor(where), shape)
    unit = tuple(int(i) for i in index[:-1]) if norm == "l2_token" else (int(index[0]),)
    others = torch.ones(shape[:-1] if norm == "l2_token" else shape[:1], dtype=torch.bool)
    others[unit] = False
    for name, out in (("normalize", advlab.normalize(x, norm, mask=mask)), ("project", advlab.project(x, norm, 1.0, mask=mask))):
        if name == "project" and norm == "linf":
            assert (out.flatten()[where].isnan() if math.isnan(fill) else out.flatten()[where] == math.copysign(1.0, fill))
            continue
        assert out[unit].isnan().any(), name  # the row is not silently finite
        assert torch.isfinite(out[others]).all(), name  # and no other row is touched
