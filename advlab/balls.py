"""Norm balls: per-row norms, the normalised ascent direction, and projection.

Three geometries, each with two separate operations:

- *normalise* turns a gradient into an ascent direction of unit norm
  (`g / max(||g||, 1e-8)`, as the official VILLA and FreeLB code do);
- *project* brings a perturbation back into the ball of radius `radius`
  (`None` = unbounded, then projection only re-applies the mask).

Norms:

- `"l2"`: one Frobenius norm per row (batch element) over every position and feature;
- `"l2_token"`: one L2 norm per position (token or region), over the feature dimension;
- `"linf"`: one max-abs norm per row; projection clamps each element.

Masked elements (mask False) count in no norm and come out exactly 0. Norms are computed
in at least float32 (float64 stays float64) whatever the input dtype. L2 norms do not
overflow or underflow in the squares: a row of 1e20s (float32) normalises to norm 1 and
projects onto the sphere like any other row. `row_norm` returns inf only when the norm
itself exceeds the compute dtype's largest value (bfloat16 rows near 3e38).

These functions do not check finiteness (that would cost a host sync per call). NaN at an
unmasked element makes its whole row (position for `"l2_token"`) NaN; inf makes
`normalize` and the L2 projections put NaN in its row, and is clamped to ±radius by the
L-inf projection. The training engine checks every loss and δ gradient and, by default,
raises `NonFiniteError` before such a gradient reaches them. Masked elements never matter,
whatever they hold.

Shape notation:
    - b: batch size (rows)
    - n: positions (tokens or regions)
    - d: feature size
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from advlab._checks import apply_mask, broadcast_mask, check_choice, check_float_tensor, check_radius, compute_dtype

__all__ = [
    "Norm",
    "NORMS",
    "Ball",
    "row_norm",
    "normalize",
    "normalize_l2",
    "normalize_l2_token",
    "normalize_linf",
    "normalize_sign",
    "project",
    "project_l2",
    "project_l2_token",
    "project_linf",
]

Norm = Literal["l2", "l2_token", "linf"]
NORMS: tuple[str, ...] = ("l2", "l2_token", "linf")
NORMALIZE_EPS = 1e-8  # the official VILLA / FreeLB clamp on the gradient norm


def _norm_parts(x: Tensor, norm: str) -> tuple[Tensor, Tensor]:
    """Norm of an already masked tensor as `(scale, rest)`, norm = scale * rest, dims kept.

    Computed in float32 or float64. For `"l2"` / `"l2_token"` `vector_norm` squares the
    elements: in float32 a row of 1e20s has an infinite squared norm, a row of 1e-25s a zero
    one, and a row of 3e38s a norm above the largest float. Rows whose max-abs m lies
    outside a safe range are therefore measured as m · ||x / m|| and returned as (m, ||x / m||),
    so callers can divide by m first; every other row is returned as (1, `vector_norm(x)`),
    bit for bit the plain norm. Both are computed and selected without a host sync.
    """
    x = x.to(compute_dtype(x))
    dims = (-1,) if norm == "l2_token" else tuple(range(1, x.dim()))
    if norm == "linf":
        m = x.abs().amax(dim=dims, keepdim=True)
        return torch.ones_like(m), m
    plain = torch.linalg.vector_norm(x, ord=2, dim=dims, keepdim=True)
    if x.numel() == 0:
        return torch.ones_like(plain), plain
    m = x.abs().amax(dim=dims, keepdim=True)
    info = torch.finfo(x.dtype)
    # below `small` the squares of elements within 2^-23 of m are still normal numbers; below
    # `big` a sum of up to 2^32 squares stays finite
    big, small = math.sqrt(info.max) * 2.0**-16, math.sqrt(info.tiny) * 2.0**23
    extreme = ((m > big) | ((m < small) & (m > 0))) & torch.isfinite(m)
    scale = torch.where(extreme, m, torch.ones_like(m))
    rest = torch.where(extreme, torch.linalg.vector_norm(x / scale, ord=2, dim=dims, keepdim=True), plain)
    return scale, rest


def _norm_keepdim(x: Tensor, norm: str) -> Tensor:
    """Norm of an already masked tensor, in float32 or float64, with dims kept for broadcasting."""
    scale, rest = _norm_parts(x, norm)
    return scale * rest


def row_norm(x: Tensor, norm: Norm = "l2", *, mask: Tensor | None = None) -> Tensor:
    """Norm of each row (`"l2"`, `"linf"`) or of each position (`"l2_token"`).

    Args:
        x: Tensor whose norms to take.
        norm: `"l2"`, `"l2_token"` or `"linf"`.
        mask: True at real elements; masked elements count in no norm.

    Returns:
        The norms, in float32 (float64 for float64 input).

    Shape:
        - x: [b, n, d] or [b, d]
        - mask: [b, n] (for [b, n, d]) or [b] (for [b, d])
        - output: [b] for `"l2"` / `"linf"`, x.shape[:-1] for `"l2_token"`

    Examples:
        >>> import torch
        >>> from advlab.balls import row_norm
        >>> row_norm(torch.tensor([[[3.0, 4.0], [0.0, 0.0]]]))
        tensor([5.])
        >>> row_norm(torch.tensor([[[3.0, 4.0], [6.0, 8.0]]]), "l2_token")
        tensor([[ 5., 10.]])
        >>> row_norm(torch.tensor([[[3.0, 4.0], [6.0, 8.0]]]), "linf", mask=torch.tensor([[True, False]]))
        tensor([4.])
    """
    x = check_float_tensor(x, "x", min_dim=2)
    check_choice(norm, NORMS, "norm")
    out = _norm_keepdim(apply_mask(x, broadcast_mask(mask, x)), norm)
    if norm == "l2_token":
        return out.squeeze(-1)
    return out.reshape(x.shape[0])


def normalize(grad: Tensor, norm: Norm = "l2", *, mask: Tensor | None = None, eps: float = NORMALIZE_EPS) -> Tensor:
    """Ascent direction: `grad / max(||grad||, eps)` per row (or per position for `"l2_token"`).

    A row whose norm exceeds `eps` gets norm 1; a zero row stays zero. For `"linf"` this is
    the official VILLA / FreeLB step `g / max|g|`, not `sign(g)` (see `normalize_sign`).

    Args:
        grad: Gradient with respect to the perturbation.
        norm: `"l2"`, `"l2_token"` or `"linf"`.
        mask: True at real elements; masked elements come out 0.
        eps: Lower clamp on the norm.

    Returns:
        The direction, in `grad`'s dtype.

    Shape:
        - grad: [b, n, d] or [b, d]; output: the same.

    Examples:
        >>> import torch
        >>> from advlab.balls import normalize
        >>> normalize(torch.tensor([[[3.0, 4.0]], [[0.0, 0.0]]]))
        tensor([[[0.6000, 0.8000]],
        <BLANKLINE>
                [[0.0000, 0.0000]]])
        >>> normalize(torch.full((1, 4), 1e20))  # the squared norm would overflow float32
        tensor([[0.5000, 0.5000, 0.5000, 0.5000]])
    """
    grad = check_float_tensor(grad, "grad", min_dim=2)
    check_choice(norm, NORMS, "norm")
    g = apply_mask(grad, broadcast_mask(mask, grad, "mask"))
    scale, rest = _norm_parts(g, norm)  # ||g|| = scale * rest; scale is 1 except for extreme rows
    # g / max(||g||, eps) = (g / scale) / max(rest, eps / scale), exact when scale is 1
    return (g.to(rest.dtype) / scale / torch.maximum(rest, eps / scale)).to(grad.dtype)


def normalize_l2(grad: Tensor, *, mask: Tensor | None = None, eps: float = NORMALIZE_EPS) -> Tensor:
    """`normalize(grad, "l2")`: unit Frobenius norm per row.

    Examples:
        >>> import torch
        >>> from advlab.balls import normalize_l2
        >>> normalize_l2(torch.tensor([[1.0, 1.0, 1.0, 1.0]]))
        tensor([[0.5000, 0.5000, 0.5000, 0.5000]])
    """
    return normalize(grad, "l2", mask=mask, eps=eps)


def normalize_l2_token(grad: Tensor, *, mask: Tensor | None = None, eps: float = NORMALIZE_EPS) -> Tensor:
    """`normalize(grad, "l2_token")`: unit L2 norm per position.

    Examples:
        >>> import torch
        >>> from advlab.balls import normalize_l2_token
        >>> normalize_l2_token(torch.tensor([[[0.0, 2.0], [3.0, 4.0]]]))
        tensor([[[0.0000, 1.0000],
                 [0.6000, 0.8000]]])
    """
    return normalize(grad, "l2_token", mask=mask, eps=eps)


def normalize_linf(grad: Tensor, *, mask: Tensor | None = None, eps: float = NORMALIZE_EPS) -> Tensor:
    """`normalize(grad, "linf")`: `g / max|g|` per row (the official "linf" step, not sign).

    Examples:
        >>> import torch
        >>> from advlab.balls import normalize_linf
        >>> normalize_linf(torch.tensor([[1.0, -4.0, 2.0]]))
        tensor([[ 0.2500, -1.0000,  0.5000]])
    """
    return normalize(grad, "linf", mask=mask, eps=eps)


def normalize_sign(grad: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """`sign(grad)`: the steepest-ascent direction of standard L-inf PGD; masked elements 0.

    Examples:
        >>> import torch
        >>> from advlab.balls import normalize_sign
        >>> normalize_sign(torch.tensor([[1.5, -0.2, 0.0]]))
        tensor([[ 1., -1.,  0.]])
    """
    grad = check_float_tensor(grad, "grad")
    return apply_mask(torch.sign(grad), broadcast_mask(mask, grad, "mask"))


def project(delta: Tensor, norm: Norm = "l2", radius: float | None = None, *, mask: Tensor | None = None) -> Tensor:
    """Bring `delta` into the ball of radius `radius` (`None`: unbounded, only masking applies).

    `"l2"` rescales each row whose Frobenius norm exceeds `radius` onto the sphere (rows
    inside are untouched); `"l2_token"` does the same per position; `"linf"` clamps each
    element to `[-radius, radius]`.

    Args:
        delta: Perturbation to project; not modified.
        norm: `"l2"`, `"l2_token"` or `"linf"`.
        radius: Ball radius >= 0 (0 gives δ = 0), or None for no bound.
        mask: True at real elements; masked elements come out 0.

    Returns:
        The projected perturbation, in `delta`'s dtype.

    Shape:
        - delta: [b, n, d] or [b, d]; output: the same.

    Examples:
        >>> import torch
        >>> from advlab.balls import project
        >>> project(torch.tensor([[3.0, 4.0], [0.3, 0.4]]), "l2", radius=1.0)
        tensor([[0.6000, 0.8000],
                [0.3000, 0.4000]])
        >>> project(torch.tensor([[0.3, -0.05]]), "linf", radius=0.1)
        tensor([[ 0.1000, -0.0500]])
    """
    delta = check_float_tensor(delta, "delta", min_dim=2)
    check_choice(norm, NORMS, "norm")
    radius = check_radius(radius, allow_zero=True)
    d = apply_mask(delta, broadcast_mask(mask, delta, "mask"))
    if radius == 0:
        return torch.zeros_like(d)  # the ball of radius 0 is the single point δ = 0
    if radius is None:
        return d
    if norm == "linf":
        return d.clamp(-radius, radius)
    scale, rest = _norm_parts(d, norm)  # ||d|| = scale * rest; scale is 1 except for extreme rows
    rest = rest.clamp_min(torch.finfo(rest.dtype).tiny)
    plain = scale == 1  # ordinary rows: the plain radius / ||d||, bit for bit
    # extreme rows in float64: a radius near or beyond float32's largest value stays finite
    wide = (radius / scale.to(torch.float64) / rest.to(torch.float64)).to(rest.dtype)
    ratio = torch.where(plain, radius / rest, wide)
    factor = torch.where(ratio < 1, ratio, torch.ones_like(ratio))
    return (d.to(factor.dtype) * factor).to(delta.dtype)


def project_l2(delta: Tensor, radius: float | None, *, mask: Tensor | None = None) -> Tensor:
    """`project(delta, "l2", radius)`: per-row Frobenius ball.

    Examples:
        >>> import torch
        >>> from advlab.balls import project_l2
        >>> project_l2(torch.tensor([[6.0, 8.0]]), 5.0)
        tensor([[3., 4.]])
    """
    return project(delta, "l2", radius, mask=mask)


def project_l2_token(delta: Tensor, radius: float | None, *, mask: Tensor | None = None) -> Tensor:
    """`project(delta, "l2_token", radius)`: one L2 ball per position.

    Examples:
        >>> import torch
        >>> from advlab.balls import project_l2_token
        >>> project_l2_token(torch.tensor([[[6.0, 8.0], [0.3, 0.4]]]), 1.0)
        tensor([[[0.6000, 0.8000],
                 [0.3000, 0.4000]]])
    """
    return project(delta, "l2_token", radius, mask=mask)


def project_linf(delta: Tensor, radius: float | None, *, mask: Tensor | None = None) -> Tensor:
    """`project(delta, "linf", radius)`: elementwise clamp.

    Examples:
        >>> import torch
        >>> from advlab.balls import project_linf
        >>> project_linf(torch.tensor([[0.3, -0.05]]), 0.1)
        tensor([[ 0.1000, -0.0500]])
    """
    return project(delta, "linf", radius, mask=mask)


@dataclass(frozen=True)
class Ball:
    """A norm ball: its geometry and radius, with `normalize`, `project` and `norm` bound to them.

    Args:
        norm: `"l2"`, `"l2_token"` or `"linf"`.
        radius: Radius > 0, or None for an unbounded ball.

    Examples:
        >>> import torch
        >>> from advlab.balls import Ball
        >>> ball = Ball("l2", radius=1.0)
        >>> ball.project(torch.tensor([[3.0, 4.0]]))
        tensor([[0.6000, 0.8000]])
        >>> ball.contains(torch.tensor([[0.6, 0.8]]))
        tensor([True])
    """

    norm: Norm = "l2"
    radius: float | None = None

    def __post_init__(self) -> None:
        check_choice(self.norm, NORMS, "norm")
        object.__setattr__(self, "radius", check_radius(self.radius, allow_zero=True))

    def normalize(self, grad: Tensor, *, mask: Tensor | None = None) -> Tensor:
        """The unit-norm ascent direction (see `normalize`)."""
        return normalize(grad, self.norm, mask=mask)

    def project(self, delta: Tensor, *, mask: Tensor | None = None) -> Tensor:
        """Projection onto this ball (see `project`)."""
        return project(delta, self.norm, self.radius, mask=mask)

    def row_norm(self, x: Tensor, *, mask: Tensor | None = None) -> Tensor:
        """Norm per row, or per position for `"l2_token"` (see `row_norm`)."""
        return row_norm(x, self.norm, mask=mask)

    def contains(self, delta: Tensor, *, mask: Tensor | None = None, rtol: float | None = None) -> Tensor:
        """Whether each row lies in the ball (every position for `"l2_token"`), up to `rtol`.

        The default `rtol` is 1e-5, or the dtype's machine epsilon for bfloat16 / float16,
        whose rounding can put a projected row slightly outside.

        Returns:
            One bool per row, shape [b], for every norm and input shape.
        """
        if rtol is None:
            rtol = max(1e-5, torch.finfo(delta.dtype).eps) if delta.is_floating_point() else 1e-5
        n = row_norm(delta, self.norm, mask=mask)  # [b], or delta.shape[:-1] for "l2_token"
        inside = torch.ones_like(n, dtype=torch.bool) if self.radius is None else n <= self.radius * (1 + rtol)
        return inside.flatten(1).all(dim=-1) if inside.dim() > 1 else inside
