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
from typing import Any

import torch
from torch import Tensor, nn

from advlab._checks import check_callable, check_choice, check_count, check_module, check_nonnegative, check_scalar
from advlab._errors import AdvlabTypeError, AdvlabValueError
from advlab.balls import NORMS, Norm
from advlab.free import Ascender, FreeTraining, Schedule, free_training
from advlab.hooks import MaskLike
from advlab.perturbation import Perturbation
from advlab.samplers import ScaledUniformSampler, UniformSampler, ZeroSampler
from advlab.sites import SiteLike, resolve_sites
from advlab.stats import StepStats, collect_stats

__all__ = ["FreeLB"]


class FreeLB:
    """FreeLB on any nn.Module.

    Args:
        model: The model.
        sites: Modality to site; None = `model.perturbation_sites()`.
        perturbations: Modality to `Perturbation`; None = one per site from
            `step_size`, `init_magnitude`, `radius` and `norm` (which are refused together
            with `perturbations`: set them on each `Perturbation`).
        steps: K (FreeLB's `adv_steps`; 2-4 in the published GLUE runs; default 3).
        step_size: η (`adv_lr`; 3e-2 to 2e-1 in the published runs; default 0.1).
        init_magnitude: m (`adv_init_mag`; default 0, which gives zeros).
        radius: Projection radius (`adv_max_norm`; None = 0 = unbounded).
        norm: `"l2"` (default) or `"linf"` (also `"l2_token"`).
        mode: `"joint"`, `"alter"` or a modality name.
        ascender: Replaces the δ update built from each `Perturbation` (one `Ascender`,
            or a mapping modality -> `Ascender`); refused together with `step_size` or
            `radius`, which only configure the default one.
        schedule: Kept for symmetry with `VILLA` (FreeLB has no clean graph).
        on_nonfinite: `"raise"` or `"skip"` (see `free_training`).
        generator: Randomness for the initialisation.
            With several modalities in joint mode and no earlier forward in the step, δ₀ is drawn
            at each site's first call: list the sites in the order the model runs them (a
            model that runs a later-listed site first draws in its own order, with a warning).

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

    def __init__(
        self,
        model: nn.Module,
        sites: Mapping[str, SiteLike] | None = None,
        perturbations: Mapping[str, Perturbation] | None = None,
        *,
        steps: int = 3,
        step_size: float | None = None,
        init_magnitude: float | None = None,
        radius: float | None = None,
        norm: Norm | None = None,
        mode: str = "joint",
        ascender: Ascender | Mapping[str, Ascender] | None = None,
        schedule: Schedule = "deferred",
        on_nonfinite: str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        given = {"step_size": step_size, "init_magnitude": init_magnitude, "radius": radius, "norm": norm}
        both = [k for k, v in given.items() if v is not None]
        if ascender is not None and (step_size is not None or radius is not None):
            raise AdvlabValueError(
                "Expected either `ascender` or `step_size` / `radius` (which configure the default ascender built "
                "from each Perturbation), but got both; the ascender would ignore them."
            )
        if perturbations is not None and both:
            raise AdvlabValueError(
                f"Expected {', '.join(f'`{k}`' for k in both)} either as arguments or inside each `Perturbation` of "
                "`perturbations`, but got both; set them per modality on the `Perturbation`s."
            )
        norm = check_choice("l2" if norm is None else norm, NORMS, "norm")  # type: ignore[assignment]
        m = check_nonnegative(0.0 if init_magnitude is None else init_magnitude, "init_magnitude")
        init = ZeroSampler() if m == 0 else (UniformSampler(m) if norm == "linf" else ScaledUniformSampler(m))
        self.model = check_module(model)
        self.sites = resolve_sites(model, sites)  # once: steps reuse the resolved modules
        if perturbations is not None and not isinstance(perturbations, Mapping):
            raise AdvlabTypeError(
                f"Expected `perturbations` to map modality -> Perturbation, but got {type(perturbations).__name__}."
            )
        eta = 0.1 if step_size is None else step_size
        self.perturbations = dict(perturbations) if perturbations is not None else {
            k: Perturbation(step_size=eta, radius=radius, norm=norm, init=init) for k in self.sites  # type: ignore[arg-type]
        }
        self.steps, self.mode, self.schedule = check_count(steps, "steps"), mode, schedule
        self.ascender = ascender
        self.on_nonfinite, self.generator = on_nonfinite, generator
        self._context()  # checks perturbations against sites, mode, policy, ascender, no compile: now

    def _context(self, masks: Mapping[str, MaskLike] | None = None, scaler: Any | None = None) -> FreeTraining:
        return free_training(
            self.model, self.sites, self.perturbations, steps=self.steps, mode=self.mode, masks=masks,
            schedule=self.schedule, scaler=scaler, on_nonfinite=self.on_nonfinite,  # type: ignore[arg-type]
            generator=self.generator, ascender=self.ascender,
        )

    def step(
        self,
        forward: Callable[[], Any],
        task_loss: Callable[[Any], Tensor],
        *,
        masks: Mapping[str, MaskLike] | None = None,
        scale: float = 1.0,
        scaler: Any | None = None,
    ) -> StepStats:
        """One FreeLB step: K perturbed forwards, each loss / K, parameter gradients accumulated."""
        scale = check_nonnegative(scale, "scale")
        check_callable(task_loss, "task_loss", ("output",))
        task_values: list[Tensor] = []
        with self._context(masks, scaler) as ft:
            for step in ft:
                total: Tensor | float = 0.0
                for group in step.groups:
                    task = check_scalar(task_loss(ft.forward(forward, group)), "`task_loss` output")
                    total = total + task
                    task_values.append(task.detach())
                ft.backward(total * (scale / (self.steps * len(step.groups))))  # type: ignore[operator]
            norms = ft.delta_norms()
        return collect_stats(task_values, [], norms, ft.skipped_steps, {}, skip_reason=ft.skip_reason)
