"""`Perturbation`: how one modality's perturbation is drawn, moved and bounded.

Sizes are absolute by default. With `relative=True` the step size, the radius and the
initial draw are fractions of each row's clean embedding norm at the site, measured in the
perturbation's norm by `embedding_scale`.

Shape notation:
    - b: batch size (rows); n: positions; d: features
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from advlab._checks import apply_mask, broadcast_mask, check_choice, check_float_tensor, check_nonnegative, check_radius
from advlab._errors import AdvlabTypeError
from advlab.ascent import DIRECTIONS, Direction
from advlab.balls import NORMS, Norm, _norm_keepdim
from advlab.samplers import Sampler, ZeroSampler

__all__ = ["Perturbation", "embedding_scale"]


def embedding_scale(x: Tensor, norm: Norm = "l2", *, mask: Tensor | None = None) -> Tensor:
    """The clean embedding's norm per row (per position for `"l2_token"`), shaped to broadcast.

    This is the unit of a relative perturbation: its step size and radius are multiplied by
    it. `"l2"` takes one Frobenius norm per row over the real positions and features,
    `"l2_token"` one L2 norm per position, `"linf"` the largest absolute value per row over
    the real elements. Masked positions count in no norm. The result is detached and in
    float32 (float64 for float64 input), so a bfloat16 site gets an exact float32 scale.

    Args:
        x: The clean site tensor (before any perturbation is added).
        norm: `"l2"`, `"l2_token"` or `"linf"`, the perturbation's norm.
        mask: True (or 1) at real positions.

    Returns:
        The scale, with x's number of dimensions: [b, 1, 1] (`"l2"`, `"linf"`) or
        [b, n, 1] (`"l2_token"`) for a [b, n, d] tensor.

    Shape:
        - x: [b, n, d] or [b, d]
        - mask: [b, n] (for [b, n, d]) or [b] (for [b, d])
        - output: [b, 1, 1] or [b, n, 1] ([b, 1] for [b, d])

    Examples:
        >>> import torch
        >>> from advlab import embedding_scale
        >>> x = torch.tensor([[[3.0, 4.0], [6.0, 8.0]]])
        >>> embedding_scale(x, "l2", mask=torch.tensor([[True, False]]))
        tensor([[[5.]]])
        >>> embedding_scale(x, "l2_token")
        tensor([[[ 5.],
                 [10.]]])
    """
    x = check_float_tensor(x, "x", min_dim=2)
    check_choice(norm, NORMS, "norm")
    with torch.no_grad():
        return _norm_keepdim(apply_mask(x.detach(), broadcast_mask(mask, x)), norm)


@dataclass(frozen=True)
class Perturbation:
    """Settings of one modality's perturbation δ.

    Args:
        step_size: Ascent step η (VILLA's `adv_lr_txt` / `adv_lr_img`); with `relative=True`
            a fraction of each row's clean embedding norm.
        radius: Radius ε of the ball δ is projected onto; None = unbounded (the official
            configs' `adv_max_norm = 0`); with `relative=True` a fraction of the row's norm.
            A radius of exactly 0 keeps δ ≡ 0: an attack then returns the clean loss, and
            training recipes warn once, since `adv_max_norm = 0` in a released config means
            None, not 0.
        norm: `"l2"` (per row, over all positions and features), `"l2_token"` (per
            position) or `"linf"` (per row max-abs; projection clamps elements).
        direction: `"gradient"` (the normalised gradient), `"sign"` (sign of the gradient)
            or `"random"` (a random unit direction of the same norm, no ascent: the noise
            control).
        init: Sampler of the initial δ (zeros by default, as the official VILLA code).
        relative: Sizes relative to the clean embedding. The engine measures
            `embedding_scale(x, norm, mask=mask)` on the clean site tensor x at the first
            forward of each step and multiplies the step size, the radius and the initial
            sampler's draw by it, row by row (position by position for `"l2_token"`): a step
            then has norm `step_size * ||x_row||`. Masked positions are neither counted nor
            perturbed. The sampler's numbers are read in the same unit, so
            `SphereSampler(r)` starts at norm `r * ||x_row||` and `ScaledUniformSampler(m)`
            at about `m / sqrt(3) * ||x_row||`.

    Examples:
        >>> from advlab import Perturbation
        >>> Perturbation(step_size=1e-3)
        Perturbation(step_size=0.001, radius=None, norm='l2', direction='gradient', init=ZeroSampler())
        >>> Perturbation(step_size=2e-4, radius=1e-3, relative=True).relative
        True
        >>> Perturbation(step_size=0.1, radius=0.0).radius  # δ ≡ 0
        0.0
        >>> Perturbation(step_size=0.1, radius=-1.0)
        Traceback (most recent call last):
        ...
        advlab._errors.AdvlabValueError: Expected `radius` to be a finite float >= 0 or None (unbounded), but got -1.0; the official configs' `adv_max_norm = 0` means None.
    """

    step_size: float = 1e-3  # VILLA VQA-base adv_lr_txt / adv_lr_img
    radius: float | None = None  # None = unbounded (adv_max_norm = 0 in the VILLA and FreeLB configs)
    norm: Norm = "l2"
    direction: Direction = "gradient"
    init: Sampler = field(default_factory=ZeroSampler)
    relative: bool = False  # True: step_size, radius and init are fractions of the clean row norm

    def __post_init__(self) -> None:
        object.__setattr__(self, "step_size", check_nonnegative(self.step_size, "step_size"))
        object.__setattr__(self, "radius", check_radius(self.radius, allow_zero=True))
        check_choice(self.norm, NORMS, "norm")
        check_choice(self.direction, DIRECTIONS, "direction")
        if not callable(self.init):
            raise AdvlabTypeError(
                f"Expected `init` to be a sampler (callable like, *, mask, generator), but got {type(self.init).__name__}."
            )
        if not isinstance(self.relative, bool):
            raise AdvlabTypeError(f"Expected `relative` to be a bool, but got {self.relative!r}.")

    def __repr__(self) -> str:
        extra = ", relative=True" if self.relative else ""
        return (
            f"Perturbation(step_size={self.step_size!r}, radius={self.radius!r}, norm={self.norm!r}, "
            f"direction={self.direction!r}, init={self.init!r}{extra})"
        )

    def scale_for(self, x: Tensor, *, mask: Tensor | None = None) -> Tensor | None:
        """The per-row scale of the sizes on clean input `x`: `embedding_scale` if relative, else None.

        An attack or a custom loop passes it as `scale=` to `pgd_step` / `PGDAscender`.

        Args:
            x: The clean site tensor.
            mask: True at real positions.

        Shape:
            - x: [b, n, d] or [b, d]; output: see `embedding_scale`.

        Examples:
            >>> import torch
            >>> from advlab import Perturbation
            >>> from advlab.ascent import pgd_step
            >>> p = Perturbation(step_size=0.1, relative=True)
            >>> x = torch.tensor([[3.0, 4.0]])
            >>> s = p.scale_for(x)
            >>> pgd_step(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), step_size=p.step_size, scale=s)
            tensor([[0.5000, 0.0000]])
        """
        return embedding_scale(x, self.norm, mask=mask) if self.relative else None
