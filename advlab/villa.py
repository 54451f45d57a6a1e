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
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from advlab._checks import check_choice, check_count, check_nonnegative, check_radius, check_scalar
from advlab._errors import AdvlabTypeError, AdvlabValueError
from advlab.ascent import Ascender
from advlab.balls import NORMS, Norm
from advlab.free import FreeTraining, Schedule, default_logits, forward_groups
from advlab.perturbation import Perturbation
from advlab.recipe import Recipe, refuse_together
from advlab.regularizers import DISTRIBUTIONS, REDUCTIONS, Distribution, Reduction, Regularizer, symmetric_kl
from advlab.samplers import Sampler, ScaledUniformSampler
from advlab.sites import SiteLike

__all__ = ["VILLA", "VILLAConfig"]

Flavour = Literal["official", "paper"]


@dataclass(frozen=True)
class VILLAConfig:
    """The numbers of a `VILLA` step; every preset is an instance (see `VILLA_PRESETS`).

    Attributes:
        name: Preset name (`"custom"` for a config built by hand).
        flavour: `"official"` (the released code's objective) or `"paper"` (Algorithm 1).
        mode: `"joint"`, `"alter"` or a modality name (`"txt"`, `"img"`).
        step_size: Ascent step η for every modality.
        steps: K.
        kl_weight: Weight w of the regulariser.
        kl_reduction: Reduction of the default symmetric KL (`"batchmean"`, `"mean"`, `"sum"`).
        distribution: How logits become distributions for the default KL (`"softmax"` in
            all released code, or `"sigmoid"`).
        source: Where the numbers come from.
        radius: Ball radius ε (required by the `"paper"` flavour; None = unbounded).
        norm: `"l2"`, `"l2_token"` or `"linf"`.
        init: Sampler of δ_0; None = zeros (U(-ε, ε)/√N for `"paper"`).
        clean_loss: Add the clean forward's task loss; None = True for `"paper"`, False otherwise.

    Examples:
        >>> import dataclasses
        >>> dataclasses.replace(VILLA_PRESETS["vqa-large"], steps=2).step_size
        0.002
    """

    name: str = "custom"
    flavour: Flavour = "official"
    mode: str = "joint"
    step_size: float = 1e-3  # VILLA VQA-base adv_lr_txt / adv_lr_img
    steps: int = 3
    kl_weight: float = 1.5
    kl_reduction: Reduction = "batchmean"
    distribution: Distribution = "softmax"
    source: str = ""
    radius: float | None = None  # None = unbounded (adv_max_norm = 0 in every released config)
    norm: Norm = "l2"
    init: Sampler | None = None
    clean_loss: bool | None = None

    def __post_init__(self) -> None:
        check_choice(self.flavour, ("official", "paper"), "flavour")
        if not isinstance(self.mode, str):
            raise AdvlabTypeError(f"Expected `mode` to be a str, but got {type(self.mode).__name__}.")
        object.__setattr__(self, "step_size", check_nonnegative(self.step_size, "step_size"))
        check_count(self.steps, "steps")
        object.__setattr__(self, "kl_weight", check_nonnegative(self.kl_weight, "kl_weight"))
        check_choice(self.kl_reduction, REDUCTIONS[:3], "kl_reduction")
        check_choice(self.distribution, DISTRIBUTIONS, "distribution")
        object.__setattr__(self, "radius", check_radius(self.radius, allow_zero=True))
        check_choice(self.norm, NORMS, "norm")
        if self.init is not None and not callable(self.init):
            raise AdvlabTypeError(f"Expected `init` to be a Sampler (callable) or None, but got {type(self.init).__name__}.")
        if self.clean_loss is not None and not isinstance(self.clean_loss, bool):
            raise AdvlabTypeError(f"Expected `clean_loss` to be a bool or None, but got {self.clean_loss!r}.")


VILLA_PRESETS: dict[str, VILLAConfig] = {
    p.name: p
    for p in [
        VILLAConfig("official", "official", "joint", 1e-3, source="official code, VQA-base numbers, both modalities"),
        VILLAConfig("paper", "paper", "alter", 1e-3, kl_weight=1.0, source="Algorithm 1 as printed (no KL weight)"),
        VILLAConfig("vqa-base", "official", "txt", 1e-3, source="config/train-vqa-base-4gpu-adv.json"),
        VILLAConfig("vqa-large", "official", "txt", 2e-3, kl_weight=1.0, source="config/train-vqa-large-8gpu-adv.json"),
        VILLAConfig("vqa-large-best", "official", "joint", 2e-3, kl_weight=1.0, source="reproducibility-vqa/hps.json"),
        VILLAConfig("vcr-base", "official", "joint", 1e-2, kl_reduction="mean", source="config/train-vcr-base-4gpu-adv.json"),
        VILLAConfig("vcr-large", "official", "joint", 1e-1, kl_weight=1.0, kl_reduction="mean",
                    source="config/train-vcr-large-4gpu-adv.json"),
        VILLAConfig("nlvr2", "official", "txt", 1e-3, source="config/train-nlvr2-base-1gpu-adv.json"),
        VILLAConfig("ve", "official", "txt", 1e-3, source="config/train-ve-base-2gpu-adv.json"),
        VILLAConfig("lxmert-vqa", "official", "txt", 1e-3, source="LXMERT-AdvTrain run/vqa_adv_finetune.bash"),
        VILLAConfig("lxmert-gqa", "official", "txt", 1e-2, source="LXMERT-AdvTrain run/gqa_adv_finetune.bash"),
        VILLAConfig("lxmert-nlvr2", "official", "txt", 1e-3, source="LXMERT-AdvTrain run/nlvr2_adv_finetune.bash"),
    ]
}


class VILLA(Recipe):
    """VILLA on any nn.Module: a preset plus overrides, and `step` for one batch.

    Args:
        model: The model; sites resolve against it (a DDP wrapper is unwrapped).
        sites: Modality to site; None = `model.perturbation_sites()`.
        perturbations: Modality to `Perturbation`; None = one per site, built from the
            config's `step_size`, `radius`, `norm` and `init` (which are then refused as
            overrides: set them on each `Perturbation`).
        preset: A name in `VILLA_PRESETS` (`VILLA.presets`): `"official"` (default),
            `"paper"` or a task preset (see `advlab.presets`).
        config: A `VILLAConfig` instead of a preset (e.g. `dataclasses.replace` of one).
        logits: Output -> logits for the regulariser; default `default_logits` (a Tensor,
            or an object's `.logits`). It may return a tuple, list or dict of tensors for a
            model with several outputs, given a `regularizer` that takes them.
        regularizer: `(clean_logits, perturbed_logits) -> scalar` (a `Regularizer`);
            default the symmetric KL with the config's `distribution` and `kl_reduction`
            (both refused as overrides together with a `regularizer`).
        ascender: Replaces the δ update built from each `Perturbation` (one `Ascender` for
            every modality, or a mapping modality -> `Ascender`); refused together with
            `step_size` or `radius`, which only configure the default one.
        schedule: `"deferred"` (default), `"retain"` (official structure) or `"lean"`
            (memory-lean: clean forward recomputed); same gradients.
        on_nonfinite: `"raise"` or `"skip"`; default raise, skip with a GradScaler (see
            `free_training`: either way the parameter gradients are left as they were).
        generator: Randomness for δ_0.
        **overrides: Fields of `VILLAConfig`: `steps` (K, preset 3), `kl_weight` (w, 1.5;
            1.0 for `"paper"`), `mode`, `step_size` (η), `radius` (ε, required by
            `"paper"`), `norm`, `init`, `kl_reduction`, `distribution` and `clean_loss`
            (add the clean forward's task loss, weight 1 times `scale`, as the paper's
            Algorithm 1 does; default True for `"paper"` and False otherwise, where the
            official code's step 0 with δ = 0 plays the clean loss; True with an official
            preset keeps its averaging over forwards and steps).

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

    _config_class = VILLAConfig
    presets = VILLA_PRESETS
    """Preset name -> config (instances of the config dataclass)."""
    _default_preset = "official"

    def __init__(
        self,
        model: nn.Module,
        sites: Mapping[str, SiteLike] | None = None,
        perturbations: Mapping[str, Perturbation] | None = None,
        *,
        preset: str | None = None,
        config: VILLAConfig | None = None,
        logits: Callable[[Any], Any] | None = None,
        regularizer: Regularizer | None = None,
        ascender: Ascender | Mapping[str, Ascender] | None = None,
        schedule: Schedule = "deferred",
        on_nonfinite: str | None = None,
        generator: torch.Generator | None = None,
        **overrides: Any,
    ) -> None:
        if perturbations is not None:
            both = [k for k in ("step_size", "radius", "norm", "init") if overrides.get(k) is not None]
            if both:
                raise AdvlabValueError(
                    f"Expected {', '.join(f'`{k}`' for k in both)} either as {'an argument' if len(both) == 1 else 'arguments'} "
                    "or inside each `Perturbation` of `perturbations`, but got both; set "
                    f"`Perturbation({both[0]}=...)` per modality."
                )
        if ascender is not None:
            refuse_together("VILLA", overrides, ("step_size", "radius"), "ascender",
                            "which configure the default ascender built from each Perturbation; the ascender would "
                            "ignore them")
        self._take_regularizers(overrides, ("kl_reduction", "distribution"), regularizer, default=self._symmetric_kl)
        c = self._setup(model, sites, config, preset, overrides, on_nonfinite=on_nonfinite, generator=generator)
        if perturbations is not None:
            self.overrides["perturbations"] = dict(perturbations)
        self.preset = c
        self.flavour = c.flavour
        self.clean_loss: bool = self.flavour == "paper" if c.clean_loss is None else c.clean_loss
        self.steps, self.kl_weight, self.mode = c.steps, c.kl_weight, c.mode
        self.kl_reduction, self.distribution = c.kl_reduction, c.distribution
        self.perturbations = self._build_perturbations(perturbations)
        self.groups = forward_groups(self.mode, list(self.perturbations))  # validates the mode now
        self.logits = logits or default_logits
        self.ascender = ascender
        self.schedule: Schedule = schedule
        self._context()  # checks perturbations against sites, schedule, policy, ascender, no compile: now
        if self.flavour == "paper" and any(q.radius is None for q in self.perturbations.values()):
            raise AdvlabValueError("Expected every perturbation to have a `radius` (ε) with preset='paper', but got None.")

    def _symmetric_kl(self, clean: Tensor, perturbed: Tensor) -> Tensor:
        """The default regulariser: SymKL(perturbed, clean), neither side detached (the official code)."""
        return symmetric_kl(perturbed, clean, distribution=self.distribution,  # type: ignore[arg-type]
                            reduction=self.kl_reduction)  # type: ignore[arg-type]

    def _engine_options(self) -> dict[str, Any]:
        return {"steps": self.steps, "mode": self.mode, "schedule": self.schedule, "logits": self.logits,
                "ascender": self.ascender}

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

    def _build_perturbations(self, perturbations: Mapping[str, Perturbation] | None) -> dict[str, Perturbation]:
        c = self.config
        if perturbations is not None:
            if not isinstance(perturbations, Mapping):
                raise AdvlabTypeError(
                    f"Expected `perturbations` to map modality -> Perturbation, but got {type(perturbations).__name__}."
                )
            return dict(perturbations)  # checked against the sites by `_context`
        if self.flavour == "paper" and c.radius is None:
            raise AdvlabValueError(
                "Expected `radius` (the ε of Algorithm 1) with preset='paper', but got None: the paper's values "
                "are not available, so ε must be given."
            )
        changes: dict[str, Any] = {"radius": c.radius, "norm": c.norm}
        if c.init is not None:
            changes["init"] = c.init
        elif self.flavour == "paper":
            changes["init"] = ScaledUniformSampler(c.radius)  # δ_0 = U(-ε, ε) / sqrt(N)
        return {m: Perturbation(step_size=c.step_size, **changes) for m in self.sites}

    def __repr__(self) -> str:
        extra = f", overrides={self.overrides}" if self.overrides else ""
        return (
            f"VILLA(preset={self.preset.name!r}, mode={self.mode!r}, steps={self.steps}, kl_weight={self.kl_weight}, "
            f"perturbations={self.perturbations}{extra})"
        )

    def _run(self, ft: FreeTraining, forward: Callable[[], Any], task_loss: Callable[[Any], Tensor],
             scale: float) -> tuple[list[Tensor], list[Tensor]]:
        """The clean forward, then K steps of task loss + w · regulariser, each forward's loss / (M·K)."""
        task_values: list[Tensor] = []
        kl_values: list[Tensor] = []
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
        return task_values, kl_values
