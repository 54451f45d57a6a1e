"""`SMART`: smoothness-inducing adversarial regularisation (Jiang et al., ACL 2020), as mt-dnn runs it.

One step on a batch:

    δ_0 ~ N(0, σ²);  for k = 1..K:  δ ← (δ + η ∇δ KL(sg(p(x)) ‖ p(x + δ))) / (||·||∞ per position + ε)
    loss = L(f(x), y) + w · [ KL(sg(p(x)) ‖ p(x + δ)) + KL(sg(p(x + δ)) ‖ p(x)) ]

The ascent steps move δ only (no parameter gradient: SMART is not "free"); the update
normalises the sum (mt-dnn's `SmartPerturbation`, token-level L-inf) instead of projecting.
The ascent uses the plain KL with a detached clean target, not mt-dnn's "stable KL" form.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from advlab._checks import check_choice, check_count, check_nonnegative
from advlab.ascent import SMARTAscender
from advlab.free import default_logits, free_training
from advlab.hooks import MaskLike
from advlab.perturbation import Perturbation
from advlab.regularizers import DISTRIBUTIONS, REDUCTIONS, Distribution, Reduction, kl_divergence, symmetric_kl
from advlab.samplers import NormalSampler
from advlab.sites import SiteLike, resolve_sites
from advlab.stats import StepStats, collect_stats

__all__ = ["SMART"]


class SMART:
    """SMART's adversarial smoothness regulariser added to the task loss.

    Args:
        model: The model.
        sites: Modality to site; None = `model.perturbation_sites()`.
        steps: Ascent steps K (mt-dnn `adv_k`, default 1).
        step_size: η (`adv_step_size`, 1e-5).
        noise_std: σ of the initial noise (`adv_noise_var`, which is a std, 1e-5).
        eps: Added to the per-position max-abs norm (`adv_epsilon`, 1e-6).
        weight: w (`adv_alpha`, 1).
        distribution: `"softmax"` or `"sigmoid"`.
        reduction: KL reduction.
        logits: Output -> logits.
        generator: Randomness for the initial noise.

    Examples:
        >>> model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 2))
        >>> ids, y = torch.tensor([[1, 2], [3, 4]]), torch.tensor([0, 1])
        >>> smart = SMART(model, {"txt": "0"}, generator=torch.Generator().manual_seed(0))
        >>> stats = smart.step(lambda: model(ids), lambda out: nn.functional.cross_entropy(out, y))
        >>> len(stats.kl)
        1
    """

    def __init__(
        self,
        model: nn.Module,
        sites: Mapping[str, SiteLike] | None = None,
        *,
        steps: int = 1,
        step_size: float = 1e-5,
        noise_std: float = 1e-5,
        eps: float = 1e-6,
        weight: float = 1.0,
        distribution: Distribution = "softmax",
        reduction: Reduction = "batchmean",
        logits: Callable[[Any], Tensor] | None = None,
        on_nonfinite: str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.model = model
        self.sites = resolve_sites(model, sites)  # once: steps reuse the resolved modules
        self.steps = check_count(steps, "steps")
        self.ascender = SMARTAscender(step_size, eps)
        self.perturbations = {
            k: Perturbation(step_size=step_size, init=NormalSampler(noise_std)) for k in self.sites
        }
        self.weight = check_nonnegative(weight, "weight")
        self.distribution = check_choice(distribution, DISTRIBUTIONS, "distribution")
        self.reduction = check_choice(reduction, REDUCTIONS[:3], "reduction")
        self.logits = logits or default_logits
        self.on_nonfinite, self.generator = on_nonfinite, generator

    def step(
        self,
        forward: Callable[[], Any],
        task_loss: Callable[[Any], Tensor],
        *,
        masks: Mapping[str, MaskLike] | None = None,
        scale: float = 1.0,
        scaler: Any | None = None,
    ) -> StepStats:
        """One step: clean task loss + w · SMART regulariser, back-propagated once."""
        scale = check_nonnegative(scale, "scale")
        kw = {"distribution": self.distribution, "reduction": self.reduction}
        with free_training(
            self.model, self.sites, self.perturbations, steps=1, masks=masks, logits=self.logits, scaler=scaler,
            on_nonfinite=self.on_nonfinite, generator=self.generator, ascender=self.ascender,  # type: ignore[arg-type]
        ) as ft:
            clean_output = ft.clean(forward)
            clean = ft.clean_logits
            task = task_loss(clean_output)
            ft.clean_loss(task * scale)
            for _ in range(self.steps):
                adv = self.logits(ft.forward(forward))
                ft.ascend(kl_divergence(clean.detach(), adv, **kw))  # type: ignore[arg-type]
            for _ in ft:  # one step: under DDP its forward and backward run outside no_sync (one all-reduce)
                adv = self.logits(ft.forward(forward))
                reg = symmetric_kl(adv, ft.clean_logits, detach="target", **kw)  # type: ignore[arg-type]
                ft.backward(reg * (self.weight * scale))
            norms = ft.delta_norms()
        return collect_stats([task.detach()], [reg.detach()], norms, ft.skipped_steps, {})
