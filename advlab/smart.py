"""`SMART`: smoothness-inducing adversarial regularisation (Jiang et al., ACL 2020).

Two presets. Both draw δ_0 ~ N(0, σ²) (masked elements 0), take K ascent steps that move δ
only (no parameter gradient: SMART is not "free"), then back-propagate once

    loss = L(f(x), y) + w · R(f(x), f(x + δ_K))

`preset="mt-dnn"` (default) is SMART as mt-dnn's `SmartPerturbation` runs it:

    δ ← (δ + η ∇δ KL(sg(p(x)) ‖ p(x + δ))) / (max-abs per position + ε_num)
    R = KL(sg(p(x + δ)) ‖ p(x)) + KL(sg(p(x)) ‖ p(x + δ))          (each term's target detached)

The division normalises δ instead of projecting it: after one step every position of δ has
max-abs close to 1 whatever η is (about 0.9 with the default noise 1e-5 and ε_num 1e-6; on a
fresh BERT-base that is over ten times its largest word-embedding value), so `step_size`
barely changes δ's size. The ascent uses the plain KL with a detached clean target, not
mt-dnn's "stable KL" form.

`preset="paper"` is Algorithm 1 of the paper: normalise the gradient, step, and project
onto the L-inf ball of radius ε around the clean input, with the symmetric KL ℓ_s:

    δ ← Π_{‖δ‖∞ ≤ ε}(δ + η g / ‖g‖∞),  g = ∇δ ℓ_s(f(x), f(x + δ))   (‖g‖∞ over each row)
    R = ℓ_s(f(x), f(x + δ)) = KL(p(x) ‖ p(x + δ)) + KL(p(x + δ) ‖ p(x))  (no stop-gradient)

with the paper's reported settings as defaults: ε = σ = 1e-5, η = 1e-3, K = 1. The initial
noise is not projected. Neither preset includes SMART's other half, the Bregman proximal
point (momentum teacher) update of the optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from advlab._checks import check_choice, check_count, check_nonnegative, check_radius, check_scalar
from advlab._errors import AdvlabValueError
from advlab.ascent import Ascender, PGDAscender, SMARTAscender
from advlab.free import FreeTraining, default_logits
from advlab.hooks import MaskLike
from advlab.perturbation import Perturbation
from advlab.recipe import Recipe, refuse_together
from advlab.regularizers import (
    DISTRIBUTIONS,
    REDUCTIONS,
    Distribution,
    Reduction,
    Regularizer,
    kl_divergence,
    symmetric_kl,
)
from advlab.samplers import NormalSampler
from advlab.sites import SiteLike

__all__ = ["SMART", "SMARTConfig", "SmartPreset"]

SmartPreset = Literal["mt-dnn", "paper"]
SMART_PRESETS: tuple[str, ...] = ("mt-dnn", "paper")


@dataclass(frozen=True)
class SMARTConfig:
    """The numbers of a `SMART` step; the two presets are instances (`SMART_CONFIGS`).

    Attributes:
        flavour: `"mt-dnn"` (mt-dnn's update: normalise the sum per position) or
            `"paper"` (Algorithm 1: normalised gradient step, projection onto the ε-ball).
        steps: Ascent steps K (mt-dnn `adv_k`, 1).
        step_size: η (mt-dnn `adv_step_size` 1e-5; the paper's 1e-3).
        noise_std: σ of the initial noise (mt-dnn `adv_noise_var`, which is a std; 1e-5).
        eps: `"mt-dnn"` only: added to the per-position max-abs norm (`adv_epsilon`, 1e-6).
        radius: `"paper"` only: the L-inf radius ε of the ball around the clean input (1e-5).
        weight: w (`adv_alpha`, 1).
        distribution: `"softmax"` or `"sigmoid"` for the default regulariser.
        reduction: Reduction of the default regulariser (`"batchmean"`).

    Examples:
        >>> SMART_CONFIGS["paper"].radius, SMART_CONFIGS["mt-dnn"].eps
        (1e-05, 1e-06)
    """

    flavour: SmartPreset = "mt-dnn"
    steps: int = 1
    step_size: float = 1e-5  # mt-dnn train.py adv_step_size
    noise_std: float = 1e-5  # mt-dnn adv_noise_var
    eps: float | None = 1e-6  # mt-dnn adv_epsilon
    radius: float | None = None
    weight: float = 1.0
    distribution: Distribution = "softmax"
    reduction: Reduction = "batchmean"

    def __post_init__(self) -> None:
        check_choice(self.flavour, SMART_PRESETS, "preset")
        if self.flavour == "paper" and self.eps is not None:
            raise AdvlabValueError(
                "Expected no `eps` with preset='paper' (it is the mt-dnn normalisation's guard), but got "
                f"{self.eps!r}; the paper's ball radius is `radius`."
            )
        if self.flavour == "mt-dnn" and self.radius is not None:
            raise AdvlabValueError(
                f"Expected no `radius` with preset='mt-dnn' (its update normalises δ instead of projecting it), but "
                f"got {self.radius!r}; use preset='paper' for the ε-ball."
            )
        check_count(self.steps, "steps")
        object.__setattr__(self, "step_size", check_nonnegative(self.step_size, "step_size"))
        object.__setattr__(self, "noise_std", check_nonnegative(self.noise_std, "noise_std"))
        if self.flavour == "mt-dnn":
            object.__setattr__(self, "eps", check_nonnegative(1e-6 if self.eps is None else self.eps, "eps"))
        object.__setattr__(self, "radius", check_radius(self.radius))
        object.__setattr__(self, "weight", check_nonnegative(self.weight, "weight"))
        check_choice(self.distribution, DISTRIBUTIONS, "distribution")
        check_choice(self.reduction, REDUCTIONS[:3], "reduction")


SMART_CONFIGS: dict[str, SMARTConfig] = {
    "mt-dnn": SMARTConfig("mt-dnn"),
    "paper": SMARTConfig("paper", step_size=1e-3, eps=None, radius=1e-5),  # the paper's reported settings
}


class SMART(Recipe):
    """SMART's adversarial smoothness regulariser added to the task loss.

    Args:
        model: The model.
        sites: Modality to site; None = `model.perturbation_sites()`.
        preset: `"mt-dnn"` (default) or `"paper"` (see the module docstring).
        config: A `SMARTConfig` instead of a preset.
        logits: Output -> logits; default: a Tensor or an object's `.logits`.
        regularizer: `(clean_logits, perturbed_logits) -> scalar`, the trained term,
            replacing the preset's (see above). Refused together with `distribution` or
            `reduction`.
        ascent_regularizer: The term δ ascends, given the clean logits detached; default
            `regularizer` when one is given, else the preset's.
        ascender: Replaces the preset's δ update (an `Ascender`, e.g. `PGDAscender`);
            refused together with `step_size`, `eps` or `radius`.
        on_nonfinite: `"raise"` or `"skip"` (see `free_training`).
        generator: Randomness for the initial noise.
        **overrides: Fields of `SMARTConfig`: `steps`, `step_size`, `noise_std`, `eps`
            (`"mt-dnn"` only), `radius` (`"paper"` only), `weight`, `distribution`,
            `reduction`.

    Shape:
        - logits: [b, c] (any leading dimensions); δ has the shape of each site's tensor.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from advlab import SMART
        >>> model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 2))
        >>> ids, y = torch.tensor([[1, 2], [3, 4]]), torch.tensor([0, 1])
        >>> smart = SMART(model, {"txt": "0"}, preset="paper", generator=torch.Generator().manual_seed(0))
        >>> stats = smart.step(lambda: model(ids), lambda out: nn.functional.cross_entropy(out, y))
        >>> len(stats.kl), stats.skipped_steps
        (1, 0)
    """

    _config_class = SMARTConfig
    presets = SMART_CONFIGS
    """Preset name -> config (instances of the config dataclass)."""
    _default_preset = "mt-dnn"

    def __init__(
        self,
        model: nn.Module,
        sites: Mapping[str, SiteLike] | None = None,
        *,
        preset: SmartPreset | None = None,
        config: SMARTConfig | None = None,
        logits: Callable[[Any], Tensor] | None = None,
        regularizer: Regularizer | None = None,
        ascent_regularizer: Regularizer | None = None,
        ascender: Ascender | None = None,
        on_nonfinite: str | None = None,
        generator: torch.Generator | None = None,
        **overrides: Any,
    ) -> None:
        if ascender is not None:
            refuse_together("SMART", overrides, ("step_size", "eps", "radius"), "ascender",
                            "which configure the preset's ascender")
        self._take_regularizers(overrides, ("distribution", "reduction"), regularizer, ascent_regularizer,
                                default=self._default_regularizer, default_ascent=self._default_ascent_regularizer)
        c = self._setup(model, sites, config, preset, overrides, on_nonfinite=on_nonfinite, generator=generator)
        self.preset: str = c.flavour
        self.steps, self.noise_std, self.weight = c.steps, c.noise_std, c.weight
        self.distribution, self.reduction = c.distribution, c.reduction
        if ascender is not None:
            self.ascender: Ascender = ascender
        elif c.flavour == "mt-dnn":
            self.ascender = SMARTAscender(c.step_size, c.eps)  # type: ignore[arg-type]
        else:
            self.ascender = PGDAscender(c.step_size, "linf", c.radius)
        # the paper's δ lives in an L-inf ball, so its size is reported in that norm (the init is not projected)
        norm = "linf" if c.flavour == "paper" else "l2"
        self.perturbations = {
            k: Perturbation(step_size=c.step_size, radius=c.radius, norm=norm, init=NormalSampler(c.noise_std))
            for k in self.sites
        }
        self.logits = logits or default_logits
        self._context()  # checks sites, perturbations, the policy and that the model is not compiled, now

    def _default_regularizer(self, clean: Tensor, adv: Tensor) -> Tensor:
        """The preset's R: each term's target detached (mt-dnn), or nothing detached (paper)."""
        detach = "target" if self.preset == "mt-dnn" else "none"
        return symmetric_kl(adv, clean, detach=detach, distribution=self.distribution,  # type: ignore[arg-type]
                            reduction=self.reduction)  # type: ignore[arg-type]

    def _default_ascent_regularizer(self, clean: Tensor, adv: Tensor) -> Tensor:
        """What δ ascends: KL(sg(p(x)) ‖ p(x + δ)) (mt-dnn) or the symmetric KL (paper)."""
        kw = {"distribution": self.distribution, "reduction": self.reduction}
        if self.preset == "mt-dnn":
            return kl_divergence(clean, adv, **kw)  # type: ignore[arg-type]
        return symmetric_kl(adv, clean, **kw)  # type: ignore[arg-type]

    def _engine_options(self) -> dict[str, Any]:
        return {"steps": 1, "logits": self.logits, "ascender": self.ascender}

    def _step_context(self, masks: Mapping[str, MaskLike] | None, scaler: Any | None) -> FreeTraining:
        return self._context(masks, scaler, delta_steps=self.steps)

    def _ascent_loss(self, clean: Tensor, adv: Tensor) -> Tensor:
        return self.ascent_regularizer(clean.detach(), adv)

    def _final_loss(self, clean: Tensor, adv: Tensor) -> Tensor:
        return self.regularizer(clean, adv)

    def _run(self, ft: FreeTraining, forward: Callable[[], Any], task_loss: Callable[[Any], Tensor],
             scale: float) -> tuple[list[Tensor], list[Tensor]]:
        """Clean task loss, K δ-only ascent steps, then w · regulariser, back-propagated once."""
        task = self._clean_task_loss(ft, forward, task_loss, scale)
        clean = ft.clean_logits
        for step in ft:  # the training step: under DDP its forward and backward run outside no_sync
            adv = self.logits(ft.forward(forward))
            if step.delta_only:
                ft.backward(check_scalar(self._ascent_loss(clean, adv), "`regularizer` output"))
            else:
                reg = check_scalar(self._final_loss(ft.clean_logits, adv), "`regularizer` output")
                ft.backward(reg * (self.weight * scale))
        return [task.detach()], [reg.detach()]
