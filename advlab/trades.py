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
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from advlab._checks import check_choice, check_count, check_nonnegative, check_radius, check_scalar
from advlab.ascent import Ascender
from advlab.balls import NORMS, Norm
from advlab.free import FreeTraining, default_logits
from advlab.hooks import MaskLike
from advlab.perturbation import Perturbation
from advlab.recipe import Recipe, refuse_together
from advlab.regularizers import DISTRIBUTIONS, Distribution, Regularizer, kl_divergence
from advlab.samplers import NormalSampler
from advlab.sites import SiteLike

__all__ = ["TRADES", "TRADESConfig"]

INIT_STD = 0.001  # the reference code's `x_natural + 0.001 * torch.randn(...)`


@dataclass(frozen=True)
class TRADESConfig:
    """The numbers of a `TRADES` step.

    Attributes:
        steps: Ascent steps K (the reference CIFAR-10 setting uses 10).
        step_size: η of each normalised step.
        radius: ε of the ball δ is projected onto; None = unbounded.
        norm: `"l2"`, `"l2_token"` or `"linf"`: geometry of the normalisation and the
            projection.
        direction: `"gradient"` (normalize(g), as above) or `"sign"` (sign(g), the reference
            code's L∞ attack).
        beta: β (the reference code's default, 6.0).
        distribution: `"softmax"` or `"sigmoid"` for the KL.

    Examples:
        >>> TRADESConfig(steps=10, radius=0.1).beta
        6.0
    """

    steps: int = 1
    step_size: float = 1e-3
    radius: float | None = None
    norm: Norm = "l2"
    direction: Literal["gradient", "sign"] = "gradient"
    beta: float = 6.0
    distribution: Distribution = "softmax"

    def __post_init__(self) -> None:
        check_count(self.steps, "steps")
        object.__setattr__(self, "step_size", check_nonnegative(self.step_size, "step_size"))
        object.__setattr__(self, "radius", check_radius(self.radius))
        check_choice(self.norm, NORMS, "norm")
        check_choice(self.direction, ("gradient", "sign"), "direction")
        object.__setattr__(self, "beta", check_nonnegative(self.beta, "beta"))
        check_choice(self.distribution, DISTRIBUTIONS, "distribution")


class TRADES(Recipe):
    """TRADES: clean task loss plus β · KL(p(x) ‖ p(x + δ)) at an adversarial δ.

    Args:
        model: The model.
        sites: Modality to site; None = `model.perturbation_sites()`.
        config: A `TRADESConfig`; default `TRADESConfig()`.
        logits: Output -> logits; default `default_logits`.
        regularizer: `(clean_logits, perturbed_logits) -> scalar`, the trained term,
            replacing β's KL(p(x) ‖ p(x + δ)) (refused together with `distribution`).
        ascent_regularizer: What δ ascends, given the clean logits detached; default
            `regularizer` (the KL when none is given).
        ascender: Replaces the δ update built from `step_size`, `radius`, `norm` and
            `direction` (refused together with `step_size` or `radius`).
        on_nonfinite: `"raise"` (default without a scaler) or `"skip"`.
        generator: Randomness for δ_0, drawn per modality in the sites' order (the order of `sites`, call
            0, 1, ... within a site), whatever order the model runs them in: the clean forward records
            every site's shape, and all δ_0 are drawn before the first perturbed forward when the model
            runs the sites in another order.
        **overrides: Fields of `TRADESConfig`: `steps`, `step_size`, `radius`, `norm`,
            `direction`, `beta`, `distribution`.

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

    _config_class = TRADESConfig

    def __init__(
        self,
        model: nn.Module,
        sites: Mapping[str, SiteLike] | None = None,
        *,
        config: TRADESConfig | None = None,
        logits: Callable[[Any], Tensor] | None = None,
        regularizer: Regularizer | None = None,
        ascent_regularizer: Regularizer | None = None,
        ascender: Ascender | Mapping[str, Ascender] | None = None,
        on_nonfinite: Literal["raise", "skip"] | None = None,
        generator: torch.Generator | None = None,
        **overrides: Any,
    ) -> None:
        if ascender is not None:
            refuse_together("TRADES", overrides, ("step_size", "radius"), "ascender",
                            "which configure the default ascender")
        self._take_regularizers(overrides, ("distribution",), regularizer, ascent_regularizer, default=self._kl)
        c = self._setup(model, sites, config, None, overrides, on_nonfinite=on_nonfinite, generator=generator)
        self.steps, self.beta, self.distribution = c.steps, c.beta, c.distribution
        self.perturbations = {
            k: Perturbation(step_size=c.step_size, radius=c.radius, norm=c.norm, direction=c.direction,
                            init=NormalSampler(INIT_STD))
            for k in self.sites
        }
        self.ascender = ascender
        self.logits = logits or default_logits
        self._context()  # checks sites, perturbations, the policy and that the model is not compiled, now

    def _kl(self, clean: Tensor, adv: Tensor) -> Tensor:
        """KL(p(x) ‖ p(x + δ)), batchmean, no stop-gradient (the reference code's `criterion_kl`)."""
        return kl_divergence(clean, adv, distribution=self.distribution, reduction="batchmean")  # type: ignore[arg-type]

    def _engine_options(self) -> dict[str, Any]:
        return {"steps": 1, "logits": self.logits, "ascender": self.ascender}

    def _step_context(self, masks: Mapping[str, MaskLike] | None, scaler: Any | None) -> FreeTraining:
        return self._context(masks, scaler, delta_steps=self.steps)

    def _run(self, ft: FreeTraining, forward: Callable[[], Any], task_loss: Callable[[Any], Tensor],
             scale: float) -> tuple[list[Tensor], list[Tensor]]:
        """K δ-only ascent steps, then one backward of L + β·KL."""
        task = self._clean_task_loss(ft, forward, task_loss, scale)
        target = ft.clean_logits.detach()
        for step in ft:
            adv = self.logits(ft.forward(forward))
            if step.delta_only:
                ft.backward(check_scalar(self.ascent_regularizer(target, adv), "`regularizer` output"))
            else:
                reg = check_scalar(self.regularizer(ft.clean_logits, adv), "`regularizer` output")
                ft.backward(reg * (self.beta * scale))
        return [task.detach()], [reg.detach()]
