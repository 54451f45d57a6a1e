"""Ascenders: one update of the perturbation from its gradient.

- `pgd_step`: δ ← project(δ + η · direction(g)), the projected step of VILLA and FreeLB,
  where the direction is `normalize(g)` (`"gradient"`), `sign(g)` (`"sign"`), or a random
  unit direction of the same norm that ignores g (`"random"`, the noise control).
- `smart_step`: δ ← (δ + η·g) / (||δ + η·g||∞ per position + eps), SMART's update as in
  mt-dnn's code, which normalises the *sum* instead of projecting (so after one step every
  position has max-abs about 1, whatever η).

Shape notation:
    - b: batch size; n: positions; d: features
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

from advlab._checks import (
    apply_mask,
    broadcast_mask,
    check_choice,
    check_float_tensor,
    check_nonnegative,
    check_radius,
    compute_dtype,
)
from advlab._errors import AdvlabValueError
from advlab.balls import NORMS, Norm, _norm_keepdim, normalize, normalize_sign, project
from advlab.samplers import _rand

__all__ = [
    "Ascender", "Direction", "DIRECTIONS", "pgd_step", "random_direction", "smart_step", "PGDAscender", "SMARTAscender",
]

Direction = Literal["gradient", "sign", "random"]
DIRECTIONS: tuple[str, ...] = ("gradient", "sign", "random")


class Ascender(Protocol):
    """What moves δ given its gradient: `PGDAscender`, `SMARTAscender`, or any matching callable.

    Recipes and `free_training` take one as `ascender=` (one for every modality, or a mapping
    modality -> ascender). An ascender that also accepts `scale=` (the clean embedding norm per
    row) serves perturbations with relative sizes.

    Shape:
        - delta, grad: the site tensor's shape, e.g. [b, n, d]; mask: [b, n] (True = real element)
        - output: the shape of `delta`

    Examples:
        >>> import torch
        >>> def half_sign(delta, grad, *, mask=None, generator=None):
        ...     return delta + 0.5 * grad.sign()
        >>> step: Ascender = half_sign
        >>> step(torch.zeros(1, 2), torch.tensor([[3.0, -4.0]]))
        tensor([[ 0.5000, -0.5000]])
    """

    def __call__(
        self, delta: Tensor, grad: Tensor | None, *, mask: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Return the new δ (`grad` is None for a δ that sends no gradient, e.g. a random direction)."""
        ...


def random_direction(
    like: Tensor, norm: Norm = "l2", *, mask: Tensor | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """A random direction with unit norm per row (per position for `"l2_token"`).

    Args:
        like: Tensor whose shape, dtype and device to take.
        norm: The norm in which the direction has length 1.
        mask: True at real elements; masked elements are 0.
        generator: Source of randomness.

    Shape:
        - like: [b, n, d] or [b, d]; output: the same.

    Examples:
        >>> import torch
        >>> from advlab.ascent import random_direction
        >>> g = torch.Generator().manual_seed(0)
        >>> u = random_direction(torch.zeros(2, 3, 4), generator=g)
        >>> torch.linalg.vector_norm(u, dim=(1, 2))  # one unit direction per row
        tensor([1., 1.])
    """
    like = check_float_tensor(like, "like", min_dim=2)
    return normalize(_rand(like, generator, "normal"), norm, mask=mask).to(like.dtype)


def pgd_step(
    delta: Tensor,
    grad: Tensor | None,
    *,
    step_size: float,
    norm: Norm = "l2",
    radius: float | None = None,
    direction: Direction = "gradient",
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    scale: Tensor | None = None,
) -> Tensor:
    """One projected ascent step: `project(delta + step_size * direction, radius)`.

    With `scale` (a relative perturbation, see `embedding_scale`) the step size and the
    radius are multiplied by it row by row (position by position for `"l2_token"`):
    `project(delta + step_size * s * direction, radius * s)`.

    Args:
        delta: Current perturbation.
        grad: Gradient of the ascended loss with respect to `delta` (unused, may be None,
            for `direction="random"`).
        step_size: η ≥ 0.
        norm: Geometry of both the normalisation and the projection.
        radius: Ball radius, or None for unbounded.
        direction: `"gradient"` (normalised gradient), `"sign"`, or `"random"`.
        mask: True at real elements; masked elements stay exactly 0.
        generator: Randomness for `direction="random"`.
        scale: Per-row (or per-position) unit of `step_size` and `radius`, finite and
            >= 0, as `embedding_scale` returns it; None = absolute sizes. A negative or
            non-finite value is refused on the CPU; on an accelerator (no host read) it makes
            that row of the result NaN.

    Returns:
        The new perturbation, detached, in `delta`'s dtype.

    Shape:
        - delta, grad: [b, n, d] or [b, d]; output: the same.
        - scale: [b, 1, 1] (or [b]) for `"l2"` / `"linf"`, [b, n, 1] (or [b, n]) for `"l2_token"`.

    Examples:
        >>> pgd_step(torch.zeros(1, 2), torch.tensor([[3.0, 4.0]]), step_size=0.1)
        tensor([[0.0600, 0.0800]])
        >>> pgd_step(torch.zeros(1, 2), torch.tensor([[3.0, 4.0]]), step_size=1.0, norm="linf", radius=0.5)
        tensor([[0.5000, 0.5000]])
    """
    delta = check_float_tensor(delta, "delta", min_dim=2)
    step_size = check_nonnegative(step_size, "step_size")
    check_choice(norm, NORMS, "norm")
    check_choice(direction, DIRECTIONS, "direction")
    if direction == "random":
        move = random_direction(delta, norm, mask=mask, generator=generator)
    else:
        if grad is None:
            raise AdvlabValueError(f"Expected `grad` to be a tensor for direction={direction!r}, but got None.")
        grad = check_float_tensor(grad, "grad").detach()
        if grad.shape != delta.shape:
            raise AdvlabValueError(
                f"Expected `grad` to have the shape of `delta` {tuple(delta.shape)}, but got {tuple(grad.shape)}."
            )
        move = normalize(grad, norm, mask=mask) if direction == "gradient" else normalize_sign(grad, mask=mask)
    if scale is None:
        moved = delta.detach() + step_size * move.to(delta.dtype)
        return project(moved, norm, radius, mask=mask)
    s = _check_scale(scale, delta, norm)
    moved = delta.detach() + (step_size * s).to(delta.dtype) * move.to(delta.dtype)
    return _project_scaled(moved, norm, radius, s, mask)


def _check_scale(scale: object, delta: Tensor, norm: str) -> Tensor:
    """`scale` as a tensor broadcastable to `delta`: one value per row, or per position for "l2_token"."""
    scale = check_float_tensor(scale, "scale")
    b = delta.shape[0]
    per_position = norm == "l2_token"
    lead = tuple(delta.shape[:-1]) if per_position else (b,)
    shape = tuple(scale.shape)
    if shape == lead:
        scale = scale.reshape(*lead, *([1] * (delta.dim() - len(lead))))
    elif shape != lead + (1,) * (delta.dim() - len(lead)):
        want = f"{lead} or {lead + (1,) * (delta.dim() - len(lead))}"
        raise AdvlabValueError(
            f"Expected `scale` to have shape {want} (one value per {'position' if per_position else 'row'} for "
            f"norm={norm!r}, `delta` shape {tuple(delta.shape)}), but got {shape}."
        )
    scale = scale.detach().to(device=delta.device, dtype=compute_dtype(delta))
    valid = torch.isfinite(scale) & (scale >= 0)
    if scale.device.type == "cpu":
        if not bool(valid.all()):
            raise AdvlabValueError(
                f"Expected `scale` to be finite and >= 0 (a norm of the clean embedding), but it holds "
                f"{scale[~valid].flatten()[:3].tolist()}."
            )
        return scale
    # on an accelerator a host read here would stall every ascent step: a bad row's δ becomes NaN
    # instead, which the training engine's non-finite rule reports
    return torch.where(valid, scale, torch.full((), float("nan"), dtype=scale.dtype, device=scale.device))


def _project_scaled(delta: Tensor, norm: str, radius: float | None, scale: Tensor, mask: Tensor | None) -> Tensor:
    """`project` onto the ball of radius `radius * scale`, one radius per row (or position)."""
    d = apply_mask(delta, broadcast_mask(mask, delta, "mask"))
    if radius is None:
        return d
    r = radius * scale
    if norm == "linf":
        return torch.minimum(torch.maximum(d.to(r.dtype), -r), r).to(delta.dtype)
    n = _norm_keepdim(d, norm)
    factor = torch.where(n > r, r / n.clamp_min(torch.finfo(n.dtype).tiny), torch.ones_like(n))
    return (d.to(factor.dtype) * factor).to(delta.dtype)


def smart_step(
    delta: Tensor, grad: Tensor, *, step_size: float, eps: float = 1e-6, mask: Tensor | None = None
) -> Tensor:
    """SMART's update: `(delta + step_size * grad) / (max-abs per position + eps)`.

    This follows mt-dnn's `SmartPerturbation` (token-level L-inf), which normalises the sum
    rather than projecting onto a ball (acknowledged by its maintainer in mt-dnn#224).

    Args:
        delta: Current perturbation.
        grad: Gradient of the ascended loss with respect to `delta`.
        step_size: η ≥ 0.
        eps: Added to the max-abs norm.
        mask: True at real elements; masked elements stay exactly 0.

    Shape:
        - delta, grad: [b, n, d] (or [b, d], one position per row); output: the same.

    Examples:
        >>> smart_step(torch.zeros(1, 1, 2), torch.tensor([[[2.0, -1.0]]]), step_size=1.0, eps=0.0)
        tensor([[[ 1.0000, -0.5000]]])
    """
    delta = check_float_tensor(delta, "delta")
    grad = check_float_tensor(grad, "grad")
    if grad.shape != delta.shape:
        raise AdvlabValueError(f"Expected `grad` to have the shape of `delta` {tuple(delta.shape)}, but got {tuple(grad.shape)}.")
    step_size = check_nonnegative(step_size, "step_size")
    eps = check_nonnegative(eps, "eps")
    m = broadcast_mask(mask, delta)
    moved = apply_mask(delta.detach().to(compute_dtype(delta)) + step_size * grad.to(compute_dtype(delta)), m)
    denom = moved.abs().amax(dim=-1, keepdim=True) + eps
    # denom is 0 only where the whole position is 0: divide by 1 there
    return (moved / torch.where(denom > 0, denom, torch.ones_like(denom))).to(delta.dtype)


@dataclass(frozen=True)
class PGDAscender:
    """`pgd_step` with its settings bound.

    Args:
        step_size: η ≥ 0.
        norm: `"l2"`, `"l2_token"` or `"linf"`.
        radius: Ball radius or None.
        direction: `"gradient"`, `"sign"` or `"random"`.

    Examples:
        >>> PGDAscender(0.1)(torch.zeros(1, 2), torch.tensor([[3.0, 4.0]]))
        tensor([[0.0600, 0.0800]])
    """

    step_size: float
    norm: Norm = "l2"
    radius: float | None = None
    direction: Direction = "gradient"

    def __post_init__(self) -> None:
        object.__setattr__(self, "step_size", check_nonnegative(self.step_size, "step_size"))
        check_choice(self.norm, NORMS, "norm")
        object.__setattr__(self, "radius", check_radius(self.radius, allow_zero=True))
        check_choice(self.direction, DIRECTIONS, "direction")

    def __call__(
        self,
        delta: Tensor,
        grad: Tensor | None,
        *,
        mask: Tensor | None = None,
        generator: torch.Generator | None = None,
        scale: Tensor | None = None,
    ) -> Tensor:
        """One step from `delta` along `grad`; `scale` makes the sizes relative (see `pgd_step`)."""
        return pgd_step(
            delta, grad, step_size=self.step_size, norm=self.norm, radius=self.radius,
            direction=self.direction, mask=mask, generator=generator, scale=scale,
        )


@dataclass(frozen=True)
class SMARTAscender:
    """`smart_step` with its settings bound.

    Args:
        step_size: η ≥ 0 (mt-dnn default 1e-5).
        eps: Added to the per-position max-abs norm (mt-dnn default 1e-6).

    Examples:
        >>> SMARTAscender(1.0, eps=0.0)(torch.zeros(1, 1, 2), torch.tensor([[[2.0, -1.0]]]))
        tensor([[[ 1.0000, -0.5000]]])
    """

    step_size: float = 1e-5
    eps: float = 1e-6

    def __post_init__(self) -> None:
        object.__setattr__(self, "step_size", check_nonnegative(self.step_size, "step_size"))
        object.__setattr__(self, "eps", check_nonnegative(self.eps, "eps"))

    def __call__(
        self, delta: Tensor, grad: Tensor | None, *, mask: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """One SMART update of `delta`."""
        if grad is None:
            raise AdvlabValueError("Expected `grad` to be a tensor for the SMART update, but got None.")
        return smart_step(delta, grad, step_size=self.step_size, eps=self.eps, mask=mask)
