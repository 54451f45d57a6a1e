"""Hypothesis strategies shared by the property tests.

Values are drawn in float32 (by hypothesis, or by torch from a seed hypothesis draws) and
then cast, so float16, bfloat16, float32 and float64 see the same numbers up to the cast;
`wide_tensors` draws magnitudes up to each dtype's own limits instead. Every torch
random draw goes through an explicit `torch.Generator` seeded by hypothesis, so a failure
reproduces from hypothesis's report.

Shapes are batch-first, at least 2-D (`[b, d]`, `[b, n, d]`, `[b, n, m, d]`): the
perturbed tensors advlab documents; a mask has the shape before the feature dimension.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

MAX_SIDE = 16  # one side may reach this; the element budget keeps tensors small
MAX_ELEMENTS = 512


@st.composite
def bounded_shapes(draw, min_dims=2, max_dims=4, min_side=1, max_side=MAX_SIDE, max_elements=MAX_ELEMENTS):
    """A shape of `min_dims`..`max_dims` sides in [min_side, max_side] with at most `max_elements` elements.

    Sides are drawn one by one within what the budget leaves, so a single long side (a
    16-token row, a 16-class head) and many short ones are both drawn, without filtering.
    """
    ndim = draw(st.integers(min_dims, max_dims))
    shape: list[int] = []
    budget = max_elements
    for i in range(ndim):
        rest = ndim - i - 1  # leave at least min_side for each remaining side
        cap = min(max_side, max(min_side, budget // max(min_side**rest, 1)))
        side = draw(st.integers(min_side, cap))
        shape.append(side)
        budget = max(budget // max(side, 1), 1)
    return tuple(shape)


shapes = bounded_shapes()
dtypes = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])
all_dtypes = dtypes
exact_dtypes = st.sampled_from([torch.float32, torch.float64])


@st.composite
def logit_shapes(draw, min_classes=2, max_classes=MAX_SIDE):
    """Logit shapes [..., c]: 0 to 2 leading (row) dimensions, c in [min_classes, max_classes]."""
    lead = draw(bounded_shapes(min_dims=0, max_dims=2, max_side=9, max_elements=64))
    return tuple(lead) + (draw(st.integers(min_classes, max_classes)),)
seeds = st.integers(0, 2**32 - 1)
radii = st.floats(1e-3, 1e3, allow_nan=False, allow_infinity=False)
norms = st.sampled_from(["l2", "l2_token", "linf"])
# radius <= 0, NaN and inf are all invalid radii (None is the unbounded ball)
bad_radii = st.floats(max_value=0.0, exclude_max=True, allow_nan=False).filter(lambda r: r != 0) | st.sampled_from([math.nan, math.inf, -math.inf])


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with `seed`."""
    return torch.Generator().manual_seed(seed)


def rtol_for(dtype: torch.dtype) -> float:
    """Relative tolerance of a norm computed from values stored in `dtype`."""
    return {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]


def _shape(draw, shape) -> tuple[int, ...]:
    return tuple(draw(shape)) if isinstance(shape, st.SearchStrategy) else tuple(shape)


@st.composite
def tensors(draw, shape=shapes, dtype=torch.float32, scale=10.0):
    """`scale * randn` in float32 from a drawn seed, cast to `dtype`: fast, shrinks through shape and seed."""
    shape = _shape(draw, shape)
    dtype = draw(dtype) if isinstance(dtype, st.SearchStrategy) else dtype
    seed = draw(seeds)
    x = scale * torch.randn(shape, generator=generator(seed), dtype=torch.float32)
    return x.to(dtype)


@st.composite
def tensors_elementwise(draw, shape=shapes, dtype=torch.float32, bound=1e3):
    """float32 values hypothesis controls (so it finds 0, -0.0 and tiny numbers), cast to `dtype`."""
    shape = _shape(draw, shape)
    dtype = draw(dtype) if isinstance(dtype, st.SearchStrategy) else dtype
    elements = st.floats(-bound, bound, width=32, allow_nan=False, allow_infinity=False)
    return torch.from_numpy(draw(hnp.arrays(np.float32, shape, elements=elements))).to(dtype)


@st.composite
def wide_tensors(draw, shape=shapes, dtype=dtypes, spread=None):
    """Values whose binary exponents span up to the whole normal range of `dtype`, both signs.

    Each element is ±m · 2^e with m in [0.5, 0.99) and e drawn around a drawn centre, so a
    tensor holds anything from one magnitude (spread 0) to the dtype's smallest normal and
    largest finite numbers side by side. Computed in float64 and cast (exact for e in range).
    """
    shape = _shape(draw, shape)
    dtype = draw(dtype) if isinstance(dtype, st.SearchStrategy) else dtype
    info = torch.finfo(dtype)
    lo, hi = math.ceil(math.log2(info.tiny)) + 1, math.floor(math.log2(info.max))
    centre = draw(st.integers(lo, hi))
    width = draw(st.sampled_from([0, 3, 20, hi - lo])) if spread is None else spread
    gen = generator(draw(seeds))
    mant = 0.5 + 0.49 * torch.rand(shape, generator=gen, dtype=torch.float64)
    sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0).double()
    exps = torch.randint(centre - width, centre + width + 1, shape, generator=gen).clamp(lo, hi)
    return torch.ldexp(sign * mant, exps).to(dtype)


@st.composite
def masks(draw, shape):
    """A bool mask for a tensor of `shape` (its dimensions before the feature dimension).

    Often all True or with fully masked rows, the two cases that matter most.
    """
    mshape = tuple(shape[:-1])
    kind = draw(st.sampled_from(["random", "all", "row_masked"]))
    if kind == "all":
        return torch.ones(mshape, dtype=torch.bool)
    m = torch.from_numpy(draw(hnp.arrays(np.bool_, mshape)).copy())
    if kind == "row_masked":
        m[draw(st.integers(0, mshape[0] - 1))] = False
    return m


@st.composite
def optional_masks(draw, shape):
    """None or a mask from `masks(shape)`."""
    return draw(st.none() | masks(shape))


def poison_masked(x: torch.Tensor, mask: torch.Tensor | None, fill: float) -> torch.Tensor:
    """`x` with `fill` (NaN, inf, anything) at every masked element: masked values must never matter."""
    if mask is None:
        return x
    return torch.where(mask.unsqueeze(-1), x, torch.full((), fill, dtype=x.dtype))


fills = st.sampled_from([math.nan, math.inf, -math.inf, 1e30])


def expand_mask(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The mask broadcast to every element of `like` (all True for None)."""
    if mask is None:
        return torch.ones(like.shape, dtype=torch.bool)
    return mask.unsqueeze(-1).expand(like.shape)


def ref_norm(x: torch.Tensor, norm: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Independent float64 norm per row ([b]) or per position (x.shape[:-1] for "l2_token")."""
    x = torch.where(expand_mask(mask, x), x.double(), torch.zeros((), dtype=torch.float64))
    units = x if norm == "l2_token" else x.reshape(x.shape[0], -1)  # norms over the last dimension
    if units.shape[-1] == 0:
        return torch.zeros(units.shape[:-1], dtype=torch.float64)
    m = units.abs().amax(-1, keepdim=True)
    if norm == "linf":
        return m.squeeze(-1)
    # sqrt(sum((x / m)^2)) * m: the float64 squares of values near float64's limits stay finite
    safe = torch.where(m > 0, m, torch.ones_like(m))
    return ((units / safe).pow(2).sum(-1).sqrt() * safe.squeeze(-1)).where(m.squeeze(-1) > 0, torch.zeros(()).double())


def unmasked_rows(mask: torch.Tensor | None, like: torch.Tensor, norm: str = "l2") -> torch.Tensor:
    """True for each row (position for "l2_token") with at least one unmasked element."""
    full = expand_mask(mask, like)
    if norm == "l2_token":
        return full.any(-1)
    return full.reshape(like.shape[0], -1).any(-1)
