"""`VILLA`: free multi-modal adversarial training, as the official code runs it or as the paper prints it.

Official (`preset="official"` and the task presets), one step on a batch:

    g = Σ_{k=0}^{K-1} (1/(M·K)) Σ_{m ∈ forwards} ∇θ [ L(f(x + δ_k^m), y) + w · SymKL(f(x + δ_k^m), f(x)) ]

with δ_0 = 0 (so step 0 plays the clean loss), one δ per modality ascending the same loss,
δ_{k+1} = Π(δ_k + η · g_δ / ||g_δ||), neither side of the KL detached, M = 2 in `"alter"`
mode (one forward per modality) and M = 1 otherwise.

Paper (`preset="paper"`, Algorithm 1 as printed): δ_0 = U(-ε, ε)/√N, projection onto the
ε-ball, an explicit clean loss, and modalities summed rather than averaged:

    g = ∇θ L(f(x), y) + (1/K) Σ_{t} Σ_m ∇θ [ L(f(x + δ_t^m), y) + w · SymKL(f(x + δ_t^m), f(x)) ]

with w = 1 reproducing the printed algorithm.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from advlab._checks import check_choice, check_count, check_nonnegative
from advlab._errors import AdvlabTypeError, AdvlabValueError
from advlab.balls import Norm
from advlab.free import Schedule, _is_ddp, default_logits, forward_groups, free_training
from advlab.hooks import MaskLike, _check_perturbations
from advlab.perturbation import Perturbation
from advlab.presets import get_preset
from advlab.regularizers import DISTRIBUTIONS, REDUCTIONS, Distribution, Reduction, symmetric_kl
from advlab.samplers import Sampler, ScaledUniformSampler
from advlab.sites import SiteLike, resolve_sites
from advlab.stats import StepStats, collect_stats

__all__ = ["VILLA"]


class VILLA:
    """VILLA on any nn.Module: a preset plus overrides, and `step` for one batch.

    Args:
        model: The model; sites resolve against it (a DDP wrapper is unwrapped).
        sites: Modality to site; None = `model.perturbation_sites()`.
        perturbations: Modality to `Perturbation`; None = one per site from the preset
            (`step_size`, `radius`, `norm`, `init` overrides apply to each).
        preset: `"official"`, `"paper"` or a task preset (see `advlab.presets`).
        steps: K ascent steps.
        kl_weight: Weight w of the symmetric KL.
        mode: `"joint"`, `"alter"` or a modality name.
        step_size: Ascent step η for every modality (ignored if `perturbations` is given).
        radius: Ball radius ε (required by `"paper"`).
        norm: `"l2"`, `"l2_token"` or `"linf"`.
        init: Sampler of δ_0.
        kl_reduction: `"batchmean"`, `"mean"`, `"sum"`.
        distribution: `"softmax"` or `"sigmoid"` for the KL.
        logits: Output -> logits for the KL; default: a Tensor, `.logits`, or element 0.
        schedule: `"deferred"` (default), `"retain"` (official structure) or `"lean"`
            (memory-lean: clean forward recomputed); same gradients.
        on_nonfinite: `"raise"` or `"skip"`; default raise, skip with a GradScaler.
        generator: Randomness for δ_0.

    Examples:
        >>> import advlab
        >>> class Tiny(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.embed, self.head = nn.Embedding(10, 4), nn.Linear(4, 3)
        ...     def forward(self, ids):
        ...         return self.head(self.embed(ids).mean(1))
        >>> model = Tiny()
        >>> ids, y = torch.tensor([[1, 2], [3, 4]]), torch.tensor([0, 2])
        >>> villa = advlab.VILLA(model, sites={"txt": "embed"}, steps=2)
        >>> stats = villa.step(lambda: model(ids), lambda out: nn.functional.cross_entropy(out, y))
        >>> len(stats.task_loss), model.head.weight.grad is not None
        (2, True)
    """

    def __init__(
        self,
        model: nn.Module,
        sites: Mapping[str, SiteLike] | None = None,
        perturbations: Mapping[str, Perturbation] | None = None,
        *,
        preset: str = "official",
        steps: int | None = None,
        kl_weight: float | None = None,
        mode: str | None = None,
        step_size: float | None = None,
        radius: float | None = None,
        norm: Norm | None = None,
        init: Sampler | None = None,
        kl_reduction: Reduction | None = None,
        distribution: Distribution | None = None,
        logits: Callable[[Any], Tensor] | None = None,
        schedule: Schedule = "deferred",
        on_nonfinite: str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        p = get_preset(preset)
        given = {
            "steps": steps, "kl_weight": kl_weight, "mode": mode, "step_size": step_size, "radius": radius,
            "norm": norm, "init": init, "kl_reduction": kl_reduction, "distribution": distribution,
        }
        self.overrides: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
        if perturbations is not None:
            self.overrides["perturbations"] = dict(perturbations)
        self.model = model
        self.preset = p
        self.flavour = p.flavour
        self.steps = check_count(p.steps if steps is None else steps, "steps")
        self.kl_weight = check_nonnegative(p.kl_weight if kl_weight is None else kl_weight, "kl_weight")
        self.mode = p.mode if mode is None else mode
        self.kl_reduction = check_choice(p.kl_reduction if kl_reduction is None else kl_reduction, REDUCTIONS[:3],
                                         "kl_reduction")
        self.distribution = check_choice(p.distribution if distribution is None else distribution, DISTRIBUTIONS,
                                         "distribution")
        self.sites = resolve_sites(model, sites)  # once: steps reuse the resolved modules
        self.perturbations = self._build_perturbations(perturbations, p.step_size, step_size, radius, norm, init)
        self.groups = forward_groups(self.mode, list(self.perturbations))  # validates the mode now
        self.logits = logits or default_logits
        self.schedule: Schedule = schedule
        self.on_nonfinite = on_nonfinite
        self.generator = generator

    @classmethod
    def from_preset(cls, name: str, model: nn.Module, **overrides: Any) -> VILLA:
        """`VILLA(model, preset=name, **overrides)`.

        Examples:
            >>> villa = VILLA.from_preset("vqa-base", nn.Sequential(nn.Embedding(5, 2)), sites={"txt": "0"})
            >>> villa.steps, villa.kl_weight, villa.mode
            (3, 1.5, 'txt')
        """
        return cls(model, preset=name, **overrides)

    def _build_perturbations(
        self,
        perturbations: Mapping[str, Perturbation] | None,
        preset_step: float,
        step_size: float | None,
        radius: float | None,
        norm: Norm | None,
        init: Sampler | None,
    ) -> dict[str, Perturbation]:
        changes: dict[str, Any] = {}
        if radius is not None:
            changes["radius"] = radius
        if norm is not None:
            changes["norm"] = norm
        if init is not None:
            changes["init"] = init
        if perturbations is None:
            if self.flavour == "paper" and radius is None:
                raise AdvlabValueError(
                    "Expected `radius` (the ε of Algorithm 1) with preset='paper', but got None: the paper's values "
                    "are not available, so ε must be given."
                )
            if self.flavour == "paper" and init is None:
                changes["init"] = ScaledUniformSampler(radius)  # δ_0 = U(-ε, ε) / sqrt(N)
            eta = preset_step if step_size is None else step_size
            return {m: Perturbation(step_size=eta, **changes) for m in self.sites}
        if not isinstance(perturbations, Mapping):
            raise AdvlabTypeError(
                f"Expected `perturbations` to map modality -> Perturbation, but got {type(perturbations).__name__}."
            )
        _check_perturbations(perturbations, self.sites)
        out = {m: dataclasses.replace(pert, **changes) if changes else pert for m, pert in perturbations.items()}
        if self.flavour == "paper" and any(p.radius is None for p in out.values()):
            raise AdvlabValueError("Expected every perturbation to have a `radius` (ε) with preset='paper', but got None.")
        return out

    def __repr__(self) -> str:
        extra = f", overrides={self.overrides}" if self.overrides else ""
        return (
            f"VILLA(preset={self.preset.name!r}, mode={self.mode!r}, steps={self.steps}, kl_weight={self.kl_weight}, "
            f"perturbations={self.perturbations}{extra})"
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
        """One VILLA step on a batch: accumulates parameter gradients (no optimizer step).

        Args:
            forward: Runs the model once on the batch and returns its output; every call
                must see the same inputs.
            task_loss: Output -> scalar task loss, weighted as wanted (e.g. VQA's BCE mean × 3129).
            masks: Modality to bool mask, True at real elements ([b, n] for a [b, n, d] site).
            scale: Multiplies every loss (e.g. 1 / accumulation steps).
            scaler: A `torch.amp.GradScaler` (losses scaled, δ gradients unscaled).

        Returns:
            `StepStats` for the step.
        """
        scale = check_nonnegative(scale, "scale")
        task_values: list[Tensor] = []
        kl_values: list[Tensor] = []
        with free_training(
            self.model, self.sites, self.perturbations, steps=self.steps, mode=self.mode, masks=masks,
            schedule=self.schedule, logits=self.logits, scaler=scaler, on_nonfinite=self.on_nonfinite,  # type: ignore[arg-type]
            generator=self.generator,
        ) as ft:
            ft.clean(forward)
            if self.flavour == "paper":
                ft.clean_loss(lambda out: task_loss(out) * scale)
            per_forward = len(self.groups) if self.flavour == "official" else 1
            weight = scale / (self.steps * per_forward)
            # one backward per forward frees each graph at once ("alter": two graphs never coexist);
            # the official structure and DDP keep one backward per step
            split = self.schedule != "retain" and not _is_ddp(self.model)
            for step in ft:
                total: Tensor | float = 0.0
                step_task, step_kl = [], []
                for i, group in enumerate(step.groups):
                    output = ft.forward(forward, group)
                    task = task_loss(output)
                    kl = symmetric_kl(
                        self.logits(output), step.clean_logits, distribution=self.distribution,  # type: ignore[arg-type]
                        reduction=self.kl_reduction,  # type: ignore[arg-type]
                    )
                    part = task + self.kl_weight * kl
                    step_task.append(task.detach())
                    step_kl.append(kl.detach())
                    if split and i < len(step.groups) - 1:
                        ft.accumulate(part * weight)
                    else:
                        total = total + part
                ft.backward(total * weight)  # type: ignore[operator]
                task_values.append(torch.stack(step_task).mean())
                kl_values.append(torch.stack(step_kl).mean())
            norms = ft.delta_norms()
        return collect_stats(task_values, kl_values, norms, ft.skipped_steps, self.overrides)
