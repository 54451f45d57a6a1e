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

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from advlab._checks import check_callable, check_choice, check_count, check_module, check_nonnegative, check_scalar
from advlab._errors import AdvlabTypeError, AdvlabValueError
from advlab.balls import Norm
from advlab.free import Ascender, FreeTraining, Schedule, default_logits, forward_groups, free_training
from advlab.hooks import MaskLike
from advlab.perturbation import Perturbation
from advlab.presets import get_preset
from advlab.regularizers import DISTRIBUTIONS, REDUCTIONS, Distribution, Reduction, Regularizer, symmetric_kl
from advlab.samplers import Sampler, ScaledUniformSampler
from advlab.sites import SiteLike, resolve_sites
from advlab.stats import StepStats, collect_stats

__all__ = ["VILLA"]


class VILLA:
    """VILLA on any nn.Module: a preset plus overrides, and `step` for one batch.

    Args:
        model: The model; sites resolve against it (a DDP wrapper is unwrapped).
        sites: Modality to site; None = `model.perturbation_sites()`.
        perturbations: Modality to `Perturbation`; None = one per site, built from the
            preset and `step_size`, `radius`, `norm`, `init` (which are then refused: set
            them on each `Perturbation`).
        preset: `"official"`, `"paper"` or a task preset (see `advlab.presets`).
        steps: K ascent steps (preset: 3).
        kl_weight: Weight w of the regulariser (preset: 1.5; 1.0 for `"paper"`).
        mode: `"joint"`, `"alter"` or a modality name (preset: `"joint"` for `"official"`).
        step_size: Ascent step η for every modality (preset: 1e-3 for `"official"`).
        radius: Ball radius ε (required by `"paper"`; default unbounded).
        norm: `"l2"` (default), `"l2_token"` or `"linf"`.
        init: Sampler of δ_0 (default zeros; U(-ε, ε)/√N for `"paper"`).
        kl_reduction: `"batchmean"` (preset default), `"mean"` or `"sum"` for the default
            regulariser.
        distribution: `"softmax"` (default) or `"sigmoid"` for the default regulariser.
        logits: Output -> logits for the regulariser; default `default_logits` (a Tensor,
            or an object's `.logits`). It may return a tuple, list or dict of tensors for a
            model with several outputs, given a `regularizer` that takes them.
        regularizer: `(clean_logits, perturbed_logits) -> scalar` (a `Regularizer`);
            default the symmetric KL with `distribution` and `kl_reduction` (both refused
            together with a `regularizer`).
        ascender: Replaces the δ update built from each `Perturbation` (one `Ascender` for
            every modality, or a mapping modality -> `Ascender`); refused together with
            `step_size` or `radius`, which only configure the default one.
        clean_loss: Add the clean forward's task loss (weight 1, times `scale`) to the
            gradient, as the paper's Algorithm 1 does. Default True for `"paper"` and
            False otherwise (the official code's step 0, with δ = 0, plays the clean
            loss). True with an official preset keeps its averaging over forwards and steps.
        schedule: `"deferred"` (default), `"retain"` (official structure) or `"lean"`
            (memory-lean: clean forward recomputed); same gradients.
        on_nonfinite: `"raise"` or `"skip"`; default raise, skip with a GradScaler (see
            `free_training`: either way the parameter gradients are left as they were).
        generator: Randomness for δ_0.

    Examples:
        >>> import torch
        >>> from torch import nn
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
        >>> len(stats.task_loss), stats.skipped_steps, model.head.weight.grad.shape
        (2, 0, torch.Size([3, 4]))

        A model with two outputs, compared output by output (no packing into one tensor):

        >>> class TwoHeads(Tiny):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.match = nn.Linear(4, 2)
        ...     def forward(self, ids):
        ...         h = self.embed(ids).mean(1)
        ...         return {"answer": self.head(h), "match": self.match(h)}
        >>> model = TwoHeads()
        >>> both = lambda clean, adv: sum(advlab.symmetric_kl(adv[k], clean[k]) for k in ("answer", "match"))
        >>> villa = advlab.VILLA(model, sites={"txt": "embed"}, logits=lambda out: out, regularizer=both)
        >>> stats = villa.step(lambda: model(ids), lambda out: nn.functional.cross_entropy(out["answer"], y))
        >>> len(stats.kl), model.match.weight.grad.shape
        (3, torch.Size([2, 4]))
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
        logits: Callable[[Any], Any] | None = None,
        regularizer: Regularizer | None = None,
        ascender: Ascender | Mapping[str, Ascender] | None = None,
        clean_loss: bool | None = None,
        schedule: Schedule = "deferred",
        on_nonfinite: str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        check_module(model)
        p = get_preset(preset)
        if perturbations is not None:
            both = [k for k, v in {"step_size": step_size, "radius": radius, "norm": norm, "init": init}.items()
                    if v is not None]
            if both:
                raise AdvlabValueError(
                    f"Expected {', '.join(f'`{k}`' for k in both)} either as {'an argument' if len(both) == 1 else 'arguments'} "
                    "or inside each `Perturbation` of `perturbations`, but got both; set "
                    f"`Perturbation({both[0]}=...)` per modality."
                )
        if ascender is not None and (step_size is not None or radius is not None):
            raise AdvlabValueError(
                "Expected either `ascender` or `step_size` / `radius` (which configure the default ascender built "
                "from each Perturbation), but got both; the ascender would ignore them."
            )
        if regularizer is not None:
            both = [k for k, v in {"kl_reduction": kl_reduction, "distribution": distribution}.items() if v is not None]
            if both:
                raise AdvlabValueError(
                    f"Expected either `regularizer` or {' / '.join(f'`{k}`' for k in both)} (which configure the "
                    "default symmetric KL), but got both."
                )
            check_callable(regularizer, "regularizer", ("clean_logits", "perturbed_logits"))
        given = {
            "steps": steps, "kl_weight": kl_weight, "mode": mode, "step_size": step_size, "radius": radius,
            "norm": norm, "init": init, "kl_reduction": kl_reduction, "distribution": distribution,
            "clean_loss": clean_loss,
        }
        self.overrides: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
        if perturbations is not None:
            self.overrides["perturbations"] = dict(perturbations)
        self.model = model
        self.preset = p
        self.flavour = p.flavour
        if clean_loss is not None and not isinstance(clean_loss, bool):
            raise AdvlabTypeError(f"Expected `clean_loss` to be a bool or None, but got {clean_loss!r}.")
        self.clean_loss: bool = self.flavour == "paper" if clean_loss is None else clean_loss
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
        self.regularizer: Regularizer = regularizer if regularizer is not None else self._symmetric_kl
        self.ascender = ascender
        self.schedule: Schedule = schedule
        self.on_nonfinite = on_nonfinite
        self.generator = generator
        self._context()  # checks perturbations against sites, schedule, policy, ascender, no compile: now
        if self.flavour == "paper" and any(q.radius is None for q in self.perturbations.values()):
            raise AdvlabValueError("Expected every perturbation to have a `radius` (ε) with preset='paper', but got None.")

    def _symmetric_kl(self, clean: Tensor, perturbed: Tensor) -> Tensor:
        """The default regulariser: SymKL(perturbed, clean), neither side detached (the official code)."""
        return symmetric_kl(perturbed, clean, distribution=self.distribution,  # type: ignore[arg-type]
                            reduction=self.kl_reduction)  # type: ignore[arg-type]

    def _context(self, masks: Mapping[str, MaskLike] | None = None, scaler: Any | None = None) -> FreeTraining:
        return free_training(
            self.model, self.sites, self.perturbations, steps=self.steps, mode=self.mode, masks=masks,
            schedule=self.schedule, logits=self.logits, scaler=scaler, on_nonfinite=self.on_nonfinite,  # type: ignore[arg-type]
            generator=self.generator, ascender=self.ascender,
        )

    @classmethod
    def from_preset(
        cls,
        name: str,
        model: nn.Module,
        sites: Mapping[str, SiteLike] | None = None,
        perturbations: Mapping[str, Perturbation] | None = None,
        **overrides: Any,
    ) -> VILLA:
        """`VILLA(model, sites, perturbations, preset=name, **overrides)`.

        Args:
            name: A preset name (see `advlab.presets`).
            model: The model.
            sites: Modality to site; needed unless the model has `perturbation_sites()`.
            perturbations: Modality to `Perturbation`; None = built from the preset.
            **overrides: Any other keyword argument of `VILLA`.

        Examples:
            >>> import torch
            >>> from torch import nn
            >>> from advlab import VILLA
            >>> villa = VILLA.from_preset("vqa-base", nn.Sequential(nn.Embedding(5, 2)), sites={"txt": "0"})
            >>> villa.steps, villa.kl_weight, villa.mode
            (3, 1.5, 'txt')
        """
        if sites is None and not callable(getattr(model, "perturbation_sites", None)):
            raise AdvlabTypeError(
                f"Expected `sites` because {type(model).__name__} has no `perturbation_sites()` method, but got "
                f"sites=None; pass them, e.g. VILLA.from_preset({name!r}, model, sites={{'txt': "
                "'embeddings.word_embeddings'}})."
            )
        return cls(model, sites, perturbations, preset=name, **overrides)

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
        return dict(perturbations)  # checked against the sites by `_context`

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
        check_callable(task_loss, "task_loss", ("output",))
        task_values: list[Tensor] = []
        kl_values: list[Tensor] = []
        with self._context(masks, scaler) as ft:
            ft.clean(forward)
            if self.clean_loss:
                ft.clean_loss(lambda out: task_loss(out) * scale)
            per_forward = len(self.groups) if self.flavour == "official" else 1
            weight = scale / (self.steps * per_forward)
            # one backward per forward frees each graph at once ("alter": two graphs never coexist);
            # the official structure and DDP keep one backward per step
            split = self.schedule != "retain" and not ft.distributed
            for step in ft:
                total: Tensor | float = 0.0
                step_task, step_kl = [], []
                for i, group in enumerate(step.groups):
                    output = ft.forward(forward, group)
                    task = check_scalar(task_loss(output), "`task_loss` output")
                    kl = check_scalar(self.regularizer(step.clean_logits, self.logits(output)), "`regularizer` output")
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
        return collect_stats(task_values, kl_values, norms, ft.skipped_steps, self.overrides, skip_reason=ft.skip_reason)
