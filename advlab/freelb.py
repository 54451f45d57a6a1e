"""`FreeLB`: free large-batch adversarial training (Zhu et al., ICLR 2020), Hugging Face version.

One step on a batch (no clean forward, no KL):

    δ_0 = init(m) · mask;  for k = 0..K-1:  g += (1/K) ∇θ L(f(x + δ_k), y);  δ_{k+1} = Π(δ_k + η g_δ / ||g_δ||)

with the L2 initialisation U(-m, m)/√N (N = unmasked elements of the row; expected norm
m/√3, not m) and the L-inf initialisation U(-m, m). The reference script masks δ only at
initialisation; advlab keeps masked elements at 0 throughout, which is the same whenever the
model sends no gradient to padding (any model that masks padded keys and pools real tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from advlab._checks import check_choice, check_count, check_nonnegative, check_radius, check_scalar
from advlab._errors import AdvlabTypeError, AdvlabValueError
from advlab.ascent import Ascender
from advlab.balls import NORMS, Norm
from advlab.free import FreeTraining, Schedule
from advlab.perturbation import Perturbation
from advlab.recipe import Recipe, refuse_together
from advlab.samplers import ScaledUniformSampler, UniformSampler, ZeroSampler
from advlab.sites import SiteLike

__all__ = ["FreeLB", "FreeLBConfig"]


@dataclass(frozen=True)
class FreeLBConfig:
    """The numbers of a `FreeLB` step (the Hugging Face script's arguments).

    Attributes:
        steps: K (`adv_steps`; 2-4 in the published GLUE runs).
        step_size: η (`adv_lr`; 3e-2 to 2e-1 in the published runs).
        init_magnitude: m (`adv_init_mag`; 0 gives zeros).
        radius: Projection radius (`adv_max_norm`; None = 0 = unbounded).
        norm: `"l2"`, `"linf"` or `"l2_token"`.
        mode: `"joint"`, `"alter"` or a modality name.

    Examples:
        >>> FreeLBConfig(steps=2, init_magnitude=0.1).step_size
        0.1
    """

    steps: int = 3
    step_size: float = 0.1
    init_magnitude: float = 0.0
    radius: float | None = None  # None = unbounded (adv_max_norm = 0)
    norm: Norm = "l2"
    mode: str = "joint"

    def __post_init__(self) -> None:
        check_count(self.steps, "steps")
        object.__setattr__(self, "step_size", check_nonnegative(self.step_size, "step_size"))
        object.__setattr__(self, "init_magnitude", check_nonnegative(self.init_magnitude, "init_magnitude"))
        object.__setattr__(self, "radius", check_radius(self.radius, allow_zero=True))
        check_choice(self.norm, NORMS, "norm")
        if not isinstance(self.mode, str):
            raise AdvlabTypeError(f"Expected `mode` to be a str, but got {type(self.mode).__name__}.")


class FreeLB(Recipe):
    """FreeLB on any nn.Module.

    Args:
        model: The model.
        sites: Modality to site; None = `model.perturbation_sites()`.
        perturbations: Modality to `Perturbation`; None = one per site from the config's
            `step_size`, `init_magnitude`, `radius` and `norm` (which are refused as
            overrides together with `perturbations`: set them on each `Perturbation`).
        config: A `FreeLBConfig`; default `FreeLBConfig()` (K = 3, η = 0.1, m = 0, unbounded L2).
        ascender: Replaces the δ update built from each `Perturbation` (one `Ascender`,
            or a mapping modality -> `Ascender`); refused together with `step_size` or
            `radius`, which only configure the default one.
        schedule: Kept for symmetry with `VILLA` (FreeLB has no clean graph).
        on_nonfinite: `"raise"` or `"skip"` (see `free_training`).
        generator: Randomness for the initialisation.
            With several modalities in joint mode and no earlier forward in the step, δ₀ is drawn
            at each site's first call: list the sites in the order the model runs them (a
            model that runs a later-listed site first draws in its own order, with a warning).
        **overrides: Fields of `FreeLBConfig` (`steps`, `step_size`, `init_magnitude`,
            `radius`, `norm`, `mode`).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from advlab import FreeLB
        >>> model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 2))
        >>> ids, y = torch.tensor([[1, 2], [3, 4]]), torch.tensor([0, 1])
        >>> freelb = FreeLB(model, {"txt": "0"}, steps=2, init_magnitude=0.1, generator=torch.Generator().manual_seed(0))
        >>> stats = freelb.step(lambda: model(ids), lambda out: nn.functional.cross_entropy(out, y))
        >>> len(stats.task_loss)
        2
    """

    _config_class = FreeLBConfig

    def __init__(
        self,
        model: nn.Module,
        sites: Mapping[str, SiteLike] | None = None,
        perturbations: Mapping[str, Perturbation] | None = None,
        *,
        config: FreeLBConfig | None = None,
        ascender: Ascender | Mapping[str, Ascender] | None = None,
        schedule: Schedule = "deferred",
        on_nonfinite: str | None = None,
        generator: torch.Generator | None = None,
        **overrides: Any,
    ) -> None:
        if ascender is not None:
            refuse_together("FreeLB", overrides, ("step_size", "radius"), "ascender",
                            "which configure the default ascender built from each Perturbation")
        if perturbations is not None:
            both = [k for k in ("step_size", "init_magnitude", "radius", "norm") if overrides.get(k) is not None]
            if both:
                raise AdvlabValueError(
                    f"Expected {', '.join(f'`{k}`' for k in both)} either as arguments or inside each `Perturbation` "
                    "of `perturbations`, but got both; set them per modality on the `Perturbation`s."
                )
        c = self._setup(model, sites, config, None, overrides, on_nonfinite=on_nonfinite, generator=generator)
        if perturbations is not None and not isinstance(perturbations, Mapping):
            raise AdvlabTypeError(
                f"Expected `perturbations` to map modality -> Perturbation, but got {type(perturbations).__name__}."
            )
        m = c.init_magnitude
        init = ZeroSampler() if m == 0 else (UniformSampler(m) if c.norm == "linf" else ScaledUniformSampler(m))
        self.perturbations = dict(perturbations) if perturbations is not None else {
            k: Perturbation(step_size=c.step_size, radius=c.radius, norm=c.norm, init=init) for k in self.sites
        }
        self.steps, self.mode, self.schedule = c.steps, c.mode, schedule
        self.ascender = ascender
        self._context()  # checks perturbations against sites, mode, policy, ascender, no compile: now

    def _engine_options(self) -> dict[str, Any]:
        return {"steps": self.steps, "mode": self.mode, "schedule": self.schedule, "ascender": self.ascender}

    def _run(self, ft: FreeTraining, forward: Callable[[], Any], task_loss: Callable[[Any], Tensor],
             scale: float) -> tuple[list[Tensor], list[Tensor]]:
        """K perturbed forwards, each loss / K, parameter gradients accumulated."""
        task_values: list[Tensor] = []
        for step in ft:
            total: Tensor | float = 0.0
            for group in step.groups:
                task = check_scalar(task_loss(ft.forward(forward, group)), "`task_loss` output")
                total = total + task
                task_values.append(task.detach())
            ft.backward(total * (scale / (self.steps * len(step.groups))))  # type: ignore[operator]
        return task_values, []
