"""`TRADES`: the robustness-accuracy trade-off regulariser (Zhang et al., ICML 2019), in embedding space.

One step on a batch:

    δ_0 = 0.001 · N(0, 1)  per modality, in the sites' order (masked elements 0)
    K times:  δ ← Π_ε(δ + η · normalize(∇δ KL(sg(p(x)) ‖ p(x + δ))))   (or η · sign(∇δ ...))
    loss = L(f(x), y) + β · KL(p(x) ‖ p(x + δ))

The ascent steps move δ only (no parameter gradient); the loss has no stop-gradient (the
reference code's `criterion_kl(log_softmax(model(x_adv)), softmax(model(x_natural)))`, whose
target is not detached), batchmean reduction. The reference code attacks in eval mode;
advlab leaves the model's mode as the caller set it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from advlab._checks import check_choice, check_count, check_nonnegative, check_radius
from advlab.balls import NORMS, Norm
from advlab.free import default_logits, free_training
from advlab.hooks import MaskLike
from advlab.perturbation import Perturbation
from advlab.regularizers import DISTRIBUTIONS, Distribution, kl_divergence
from advlab.samplers import NormalSampler
from advlab.sites import SiteLike, resolve_sites
from advlab.stats import StepStats, collect_stats

__all__ = ["TRADES"]

INIT_STD = 0.001  # the reference code's `x_natural + 0.001 * torch.randn(...)`


class TRADES:
    """TRADES: clean task loss plus β · KL(p(x) ‖ p(x + δ)) at an adversarial δ.

    Args:
        model: The model.
        sites: Modality to site; None = `model.perturbation_sites()`.
        steps: Ascent steps K (the reference CIFAR-10 setting uses 10).
        step_size: η of each normalised step.
        radius: ε of the ball δ is projected onto; None = unbounded.
        norm: `"l2"`, `"l2_token"` or `"linf"`: geometry of the normalisation and the
            projection.
        direction: `"gradient"` (normalize(g), as above) or `"sign"` (sign(g), the reference
            code's L∞ attack).
        beta: β (the reference code's default, 6.0).
        distribution: `"softmax"` or `"sigmoid"` for the KL.
        logits: Output -> logits; default `default_logits`.
        on_nonfinite: `"raise"` (default without a scaler) or `"skip"`.
        generator: Randomness for δ_0, drawn per modality in the sites' order (the order of `sites`, call
            0, 1, ... within a site), whatever order the model runs them in: the clean forward records
            every site's shape, and all δ_0 are drawn before the first perturbed forward when the model
            runs the sites in another order.

    Shape:
        - the site tensors: [b, n, d] or [b, d]; masks: [b, n] or [b]

    Examples:
        >>> import torch, advlab
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 2))
        >>> ids, y = torch.tensor([[1, 2], [3, 4]]), torch.tensor([0, 1])
        >>> trades = advlab.TRADES(model, {"txt": "0"}, steps=2, step_size=0.1, radius=0.2,
        ...                        generator=torch.Generator().manual_seed(0))
        >>> stats = trades.step(lambda: model(ids), lambda out: nn.functional.cross_entropy(out, y))
        >>> stats.delta_norm["txt"] <= 0.2 + 1e-6
        True
    """

    def __init__(
        self,
        model: nn.Module,
        sites: Mapping[str, SiteLike] | None = None,
        *,
        steps: int = 1,
        step_size: float = 1e-3,
        radius: float | None = None,
        norm: Norm = "l2",
        direction: Literal["gradient", "sign"] = "gradient",
        beta: float = 6.0,
        distribution: Distribution = "softmax",
        logits: Callable[[Any], Tensor] | None = None,
        on_nonfinite: Literal["raise", "skip"] | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.model = model
        self.sites = resolve_sites(model, sites)  # once: steps reuse the resolved modules
        self.steps = check_count(steps, "steps")
        check_choice(norm, NORMS, "norm")
        check_choice(direction, ("gradient", "sign"), "direction")
        self.perturbations = {
            k: Perturbation(step_size=step_size, radius=check_radius(radius), norm=norm, direction=direction,
                            init=NormalSampler(INIT_STD))
            for k in self.sites
        }
        self.beta = check_nonnegative(beta, "beta")
        self.distribution = check_choice(distribution, DISTRIBUTIONS, "distribution")
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
        """One TRADES step: K δ-only ascent steps, then one backward of L + β·KL.

        Args:
            forward: Runs the model on the batch and returns its output.
            task_loss: Output -> scalar task loss.
            masks: Modality to bool mask (True = real element); masked δ stays 0.
            scale: Multiplies the whole loss (e.g. 1 / gradient-accumulation steps).
            scaler: A `torch.amp.GradScaler`.

        Returns:
            The clean task loss, the KL at the final δ and δ's norm.
        """
        scale = check_nonnegative(scale, "scale")
        kw = {"distribution": self.distribution, "reduction": "batchmean"}
        with free_training(
            self.model, self.sites, self.perturbations, steps=1, masks=masks, logits=self.logits, scaler=scaler,
            on_nonfinite=self.on_nonfinite, generator=self.generator,
        ) as ft:
            task = task_loss(ft.clean(forward))
            ft.clean_loss(task * scale)
            target = ft.clean_logits.detach()
            for _ in range(self.steps):
                adv = self.logits(ft.forward(forward))
                ft.ascend(kl_divergence(target, adv, **kw))  # type: ignore[arg-type]
            for _ in ft:
                adv = self.logits(ft.forward(forward))
                reg = kl_divergence(ft.clean_logits, adv, **kw)  # type: ignore[arg-type]
                ft.backward(reg * (self.beta * scale))
            norms = ft.delta_norms()
        return collect_stats([task.detach()], [reg.detach()], norms, ft.skipped_steps, {}, skip_reason=ft.skip_reason)
