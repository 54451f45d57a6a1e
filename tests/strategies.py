"""Hypothesis strategies shared by the property tests.

Values are drawn in float32 (by hypothesis, or by torch from a seed hypothesis draws) and
then cast, so float32, float64 and bfloat16 see the same numbers up to the cast. Every torch
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

MAX_SIDE = 6

shapes = hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=MAX_SIDE)
dtypes = st.sampled_from([torch.float32, torch.float64, torch.bfloat16])
exact_dtypes = st.sampled_from([torch.float32, torch.float64])
seeds = st.integers(0, 2**32 - 1)
radii = st.floats(1e-3, 1e3, allow_nan=False, allow_infinity=False)
norms = st.sampled_from(["l2", "l2_token", "linf"])
# radius <= 0, NaN and inf are all invalid radii (None is the unbounded ball)
bad_radii = st.floats(max_value=0.0, allow_nan=False) | st.sampled_from([math.nan, math.inf, -math.inf])


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
    if norm == "l2_token":
        return x.pow(2).sum(-1).sqrt()
    flat = x.reshape(x.shape[0], -1)
    if norm == "l2":
        return flat.pow(2).sum(-1).sqrt()
    return flat.abs().amax(-1) if flat.shape[1] else torch.zeros(x.shape[0], dtype=torch.float64)


def unmasked_rows(mask: torch.Tensor | None, like: torch.Tensor, norm: str = "l2") -> torch.Tensor:
    """True for each row (position for "l2_token") with at least one unmasked element."""
    full = expand_mask(mask, like)
    if norm == "l2_token":
        return full.any(-1)
    return full.reshape(like.shape[0], -1).any(-1)
