"""`Perturbation`: how one modality's perturbation is drawn, moved and bounded."""

from __future__ import annotations

from dataclasses import dataclass, field

from advlab._checks import check_choice, check_nonnegative, check_radius
from advlab._errors import AdvlabTypeError
from advlab.ascent import DIRECTIONS, Direction
from advlab.balls import NORMS, Norm
from advlab.samplers import Sampler, ZeroSampler

__all__ = ["Perturbation"]


@dataclass(frozen=True)
class Perturbation:
    """Settings of one modality's perturbation δ.

    Args:
        step_size: Ascent step η (VILLA's `adv_lr_txt` / `adv_lr_img`).
        radius: Radius ε of the ball δ is projected onto; None = unbounded (the official
            configs' `adv_max_norm = 0`).
        norm: `"l2"` (per row, over all positions and features), `"l2_token"` (per
            position) or `"linf"` (per row max-abs; projection clamps elements).
        direction: `"gradient"` (the normalised gradient), `"sign"` (sign of the gradient)
            or `"random"` (a random unit direction of the same norm, no ascent: the noise
            control).
        init: Sampler of the initial δ (zeros by default, as the official VILLA code).

    Examples:
        >>> Perturbation(step_size=1e-3)
        Perturbation(step_size=0.001, radius=None, norm='l2', direction='gradient', init=ZeroSampler())
        >>> Perturbation(step_size=0.1, radius=0.0)
        Traceback (most recent call last):
        ...
        advlab._errors.AdvlabValueError: Expected `radius` to be a positive finite float or None (unbounded), but got 0.0; the official configs' `adv_max_norm = 0` means None.
    """

    step_size: float = 1e-3  # VILLA VQA-base adv_lr_txt / adv_lr_img
    radius: float | None = None  # None = unbounded (adv_max_norm = 0 in the VILLA and FreeLB configs)
    norm: Norm = "l2"
    direction: Direction = "gradient"
    init: Sampler = field(default_factory=ZeroSampler)

    def __post_init__(self) -> None:
        object.__setattr__(self, "step_size", check_nonnegative(self.step_size, "step_size"))
        object.__setattr__(self, "radius", check_radius(self.radius))
        check_choice(self.norm, NORMS, "norm")
        check_choice(self.direction, DIRECTIONS, "direction")
        if not callable(self.init):
            raise AdvlabTypeError(
                f"Expected `init` to be a sampler (callable like, *, mask, generator), but got {type(self.init).__name__}."
            )
