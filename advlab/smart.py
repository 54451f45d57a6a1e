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
from typing import Any, Literal

import torch
from torch import Tensor, nn

from advlab._checks import (
    check_callable,
    check_choice,
    check_count,
    check_module,
    check_nonnegative,
    check_radius,
    check_scalar,
)
from advlab._errors import AdvlabValueError
from advlab.ascent import PGDAscender, SMARTAscender
from advlab.free import Ascender, FreeTraining, default_logits, free_training
from advlab.hooks import MaskLike
from advlab.perturbation import Perturbation
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
from advlab.sites import SiteLike, resolve_sites
from advlab.stats import StepStats, collect_stats

__all__ = ["SMART", "SmartPreset"]

SmartPreset = Literal["mt-dnn", "paper"]
SMART_PRESETS: tuple[str, ...] = ("mt-dnn", "paper")
# (step size η, noise std σ, radius ε): mt-dnn `train.py` adv_step_size / adv_noise_var; the paper's settings
_DEFAULTS: dict[str, tuple[float, float, float | None]] = {"mt-dnn": (1e-5, 1e-5, None), "paper": (1e-3, 1e-5, 1e-5)}


class SMART:
    """SMART's adversarial smoothness regulariser added to the task loss.

    Args:
        model: The model.
        sites: Modality to site; None = `model.perturbation_sites()`.
        preset: `"mt-dnn"` (mt-dnn's update: normalise the sum per position) or
            `"paper"` (Algorithm 1: normalised gradient step, projection onto the ε-ball).
        steps: Ascent steps K (mt-dnn `adv_k`, default 1).
        step_size: η; default 1e-5 (mt-dnn `adv_step_size`) or 1e-3 (paper).
        noise_std: σ of the initial noise (mt-dnn `adv_noise_var`, which is a std); default 1e-5.
        eps: `"mt-dnn"` only: added to the per-position max-abs norm (`adv_epsilon`, 1e-6).
        radius: `"paper"` only: the L-inf radius ε of the ball around the clean input
            (default 1e-5).
        weight: w (`adv_alpha`, 1).
        distribution: `"softmax"` (default) or `"sigmoid"` for the default regulariser.
        reduction: Reduction of the default regulariser (default `"batchmean"`).
        logits: Output -> logits; default: a Tensor or an object's `.logits`.
        regularizer: `(clean_logits, perturbed_logits) -> scalar`, replacing the default
            (see the presets above). The ascent maximises it with the clean side detached;
            the final term uses it as is. Refused together with `distribution` or `reduction`.
        ascender: Replaces the preset's δ update (an `Ascender`, e.g. `PGDAscender`);
            refused together with `step_size`, `eps` or `radius`.
        on_nonfinite: `"raise"` or `"skip"` (see `free_training`).
        generator: Randomness for the initial noise.

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

    def __init__(
        self,
        model: nn.Module,
        sites: Mapping[str, SiteLike] | None = None,
        *,
        preset: SmartPreset = "mt-dnn",
        steps: int = 1,
        step_size: float | None = None,
        noise_std: float | None = None,
        eps: float | None = None,
        radius: float | None = None,
        weight: float = 1.0,
        distribution: Distribution | None = None,
        reduction: Reduction | None = None,
        logits: Callable[[Any], Tensor] | None = None,
        regularizer: Regularizer | None = None,
        ascender: Ascender | None = None,
        on_nonfinite: str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.preset = check_choice(preset, SMART_PRESETS, "preset")
        eta, sigma, eps_ball = _DEFAULTS[preset]
        if preset == "paper" and eps is not None:
            raise AdvlabValueError(
                "Expected no `eps` with preset='paper' (it is the mt-dnn normalisation's guard), but got "
                f"{eps!r}; the paper's ball radius is `radius`."
            )
        if preset == "mt-dnn" and radius is not None:
            raise AdvlabValueError(
                f"Expected no `radius` with preset='mt-dnn' (its update normalises δ instead of projecting it), but got "
                f"{radius!r}; use preset='paper' for the ε-ball."
            )
        if ascender is not None and any(v is not None for v in (step_size, eps, radius)):
            raise AdvlabValueError(
                "Expected either `ascender` or `step_size` / `eps` / `radius` (which configure the preset's "
                "ascender), but got both."
            )
        if regularizer is not None:
            if distribution is not None or reduction is not None:
                raise AdvlabValueError(
                    "Expected either `regularizer` or `distribution` / `reduction` (which configure the default "
                    "regulariser), but got both."
                )
            check_callable(regularizer, "regularizer", ("clean_logits", "perturbed_logits"))
        self.model = check_module(model)
        self.sites = resolve_sites(model, sites)  # once: steps reuse the resolved modules
        self.steps = check_count(steps, "steps")
        step_size = check_nonnegative(eta if step_size is None else step_size, "step_size")
        self.noise_std = check_nonnegative(sigma if noise_std is None else noise_std, "noise_std")
        ball = check_radius(eps_ball if radius is None else radius) if preset == "paper" else None
        if ascender is not None:
            self.ascender: Ascender = ascender
        elif preset == "mt-dnn":
            self.ascender = SMARTAscender(step_size, 1e-6 if eps is None else eps)
        else:
            self.ascender = PGDAscender(step_size, "linf", ball)
        # the paper's δ lives in an L-inf ball, so its size is reported in that norm (the init is not projected)
        norm = "linf" if preset == "paper" else "l2"
        self.perturbations = {
            k: Perturbation(step_size=step_size, radius=ball, norm=norm, init=NormalSampler(self.noise_std))
            for k in self.sites
        }
        self.weight = check_nonnegative(weight, "weight")
        self.distribution = check_choice("softmax" if distribution is None else distribution, DISTRIBUTIONS,
                                         "distribution")
        self.reduction = check_choice("batchmean" if reduction is None else reduction, REDUCTIONS[:3], "reduction")
        self.regularizer = regularizer
        self.logits = logits or default_logits
        self.on_nonfinite, self.generator = on_nonfinite, generator
        self._context()  # checks sites, perturbations, the policy and that the model is not compiled, now

    def _context(self, masks: Mapping[str, MaskLike] | None = None, scaler: Any | None = None) -> FreeTraining:
        return free_training(
            self.model, self.sites, self.perturbations, steps=1, masks=masks, logits=self.logits, scaler=scaler,
            on_nonfinite=self.on_nonfinite, generator=self.generator, ascender=self.ascender,  # type: ignore[arg-type]
        )

    def _ascent_loss(self, clean: Tensor, adv: Tensor) -> Tensor:
        kw = {"distribution": self.distribution, "reduction": self.reduction}
        if self.regularizer is not None:
            return self.regularizer(clean.detach(), adv)
        if self.preset == "mt-dnn":
            return kl_divergence(clean.detach(), adv, **kw)  # type: ignore[arg-type]
        return symmetric_kl(adv, clean.detach(), **kw)  # type: ignore[arg-type]

    def _final_loss(self, clean: Tensor, adv: Tensor) -> Tensor:
        kw = {"distribution": self.distribution, "reduction": self.reduction}
        if self.regularizer is not None:
            return self.regularizer(clean, adv)
        detach = "target" if self.preset == "mt-dnn" else "none"
        return symmetric_kl(adv, clean, detach=detach, **kw)  # type: ignore[arg-type]

    def step(
        self,
        forward: Callable[[], Any],
        task_loss: Callable[[Any], Tensor],
        *,
        masks: Mapping[str, MaskLike] | None = None,
        scale: float = 1.0,
        scaler: Any | None = None,
    ) -> StepStats:
        """One step: clean task loss + w · SMART regulariser, back-propagated once.

        Args:
            forward: Runs the model once on the batch and returns its output.
            task_loss: Output -> scalar task loss.
            masks: Modality to mask, True (or 1) at real elements.
            scale: Multiplies every loss (e.g. 1 / accumulation steps).
            scaler: A `torch.amp.GradScaler`.

        Returns:
            `StepStats` with the clean task loss and the regulariser.
        """
        scale = check_nonnegative(scale, "scale")
        check_callable(task_loss, "task_loss", ("output",))
        with self._context(masks, scaler) as ft:
            clean_output = ft.clean(forward)
            clean = ft.clean_logits
            task = check_scalar(task_loss(clean_output), "`task_loss` output")
            ft.clean_loss(task * scale)
            for _ in range(self.steps):
                adv = self.logits(ft.forward(forward))
                ft.ascend(check_scalar(self._ascent_loss(clean, adv), "`regularizer` output"))
            for _ in ft:  # one step: under DDP its forward and backward run outside no_sync (one all-reduce)
                adv = self.logits(ft.forward(forward))
                reg = check_scalar(self._final_loss(ft.clean_logits, adv), "`regularizer` output")
                ft.backward(reg * (self.weight * scale))
            norms = ft.delta_norms()
        return collect_stats([task.detach()], [reg.detach()], norms, ft.skipped_steps, {}, skip_reason=ft.skip_reason)
