"""`FastAT`: single-step adversarial training, FGSM-RS (Wong et al., 2020) and N-FGSM (de Jorge et al., 2022).

One step on a batch:

    FGSM-RS:  δ_0 ~ U(-ε, ε);   δ = clamp(δ_0 + α · sign(∇δ L(f(x + δ_0), y)), -ε, ε),  α = 1.25 ε
    N-FGSM:   δ_0 ~ U(-2ε, 2ε); δ = δ_0 + ε · sign(∇δ L(f(x + δ_0), y))  (no projection)
    loss = L(f(x + δ), y)

Masked elements stay 0. The attack's backward moves δ only: its parameter gradient is thrown
away (the reference code calls `opt.zero_grad()` before the training backward), so the
parameter gradient is that of the one training loss. The reference code also clips x + δ to
the image range [0, 1], which has no counterpart in embedding space.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from advlab._checks import check_choice, check_nonnegative, check_scalar
from advlab.ascent import Ascender, PGDAscender
from advlab.free import FreeTraining
from advlab.hooks import MaskLike
from advlab.perturbation import Perturbation
from advlab.recipe import Recipe, refuse_together
from advlab.samplers import UniformSampler
from advlab.sites import SiteLike

__all__ = ["FastAT", "FastATConfig", "FastMethod"]

FastMethod = Literal["fgsm_rs", "n_fgsm"]
METHODS: tuple[str, ...] = ("fgsm_rs", "n_fgsm")


@dataclass(frozen=True)
class FastATConfig:
    """The numbers of a `FastAT` step.

    Attributes:
        eps: ε (L∞ radius for FGSM-RS; noise half-width is ε (FGSM-RS) or 2ε (N-FGSM)). Required.
        method: `"fgsm_rs"` or `"n_fgsm"`.
        step_size: α; None = 1.25ε (FGSM-RS) or ε (N-FGSM).
        init_factor: Noise half-width in units of ε; None = 1 (FGSM-RS) or 2 (N-FGSM's k).

    Examples:
        >>> FastATConfig(eps=0.1).alpha, FastATConfig(eps=0.1, method="n_fgsm").k
        (0.125, 2.0)
    """

    eps: float
    method: FastMethod = "fgsm_rs"
    step_size: float | None = None  # None: 1.25 ε (FGSM-RS, Wong et al.) or ε (N-FGSM)
    init_factor: float | None = None  # None: 1 (FGSM-RS) or 2 (N-FGSM)

    def __post_init__(self) -> None:
        object.__setattr__(self, "eps", check_nonnegative(self.eps, "eps"))
        check_choice(self.method, METHODS, "method")
        if self.step_size is not None:
            object.__setattr__(self, "step_size", check_nonnegative(self.step_size, "step_size"))
        if self.init_factor is not None:
            object.__setattr__(self, "init_factor", check_nonnegative(self.init_factor, "init_factor"))

    @property
    def alpha(self) -> float:
        """The step size in use: `step_size`, or the method's default (0 when ε = 0 under FGSM-RS)."""
        rs = self.method == "fgsm_rs"
        if rs and self.eps == 0:
            return 0.0  # the ball of radius 0: δ stays 0
        return (1.25 * self.eps if rs else self.eps) if self.step_size is None else self.step_size

    @property
    def k(self) -> float:
        """The noise half-width in units of ε: `init_factor`, or the method's default."""
        return (1.0 if self.method == "fgsm_rs" else 2.0) if self.init_factor is None else self.init_factor

    @property
    def radius(self) -> float | None:
        """The projection radius: ε for FGSM-RS (None when ε = 0), None (no projection) for N-FGSM."""
        return self.eps if self.method == "fgsm_rs" and self.eps > 0 else None


class FastAT(Recipe):
    """Fast adversarial training: one random start, one signed gradient step, train on x + δ.

    `step` reports the task loss at δ_0 and at the final δ (two entries), and δ's norm
    (L∞ per row); `scale` multiplies the training loss only.

    Args:
        model: The model.
        sites: Modality to site; None = `model.perturbation_sites()`.
        config: A `FastATConfig` (or give `eps` and the other fields as keywords).
        ascender: Replaces the signed step (refused together with `step_size`).
        on_nonfinite: `"raise"` (default without a scaler) or `"skip"`.
        generator: Randomness for δ_0.
            With several modalities in joint mode and no earlier forward in the step, δ₀ is drawn
            at each site's first call: list the sites in the order the model runs them (a
            model that runs a later-listed site first draws in its own order, with a warning).
        **overrides: Fields of `FastATConfig`: `eps` (required unless `config` gives it),
            `method`, `step_size`, `init_factor`.

    Shape:
        - the site tensors: [b, n, d] or [b, d]; masks: [b, n] or [b]

    Examples:
        >>> import torch, advlab
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 2))
        >>> ids, y = torch.tensor([[1, 2], [3, 4]]), torch.tensor([0, 1])
        >>> fast = advlab.FastAT(model, {"txt": "0"}, eps=0.1, generator=torch.Generator().manual_seed(0))
        >>> stats = fast.step(lambda: model(ids), lambda out: nn.functional.cross_entropy(out, y))
        >>> round(stats.delta_norm["txt"], 6)  # mean per-row max-abs: FGSM-RS clamps to ε
        0.1
    """

    _config_class = FastATConfig

    def __init__(
        self,
        model: nn.Module,
        sites: Mapping[str, SiteLike] | None = None,
        *,
        config: FastATConfig | None = None,
        ascender: Ascender | Mapping[str, Ascender] | None = None,
        on_nonfinite: Literal["raise", "skip"] | None = None,
        generator: torch.Generator | None = None,
        **overrides: Any,
    ) -> None:
        if ascender is not None:
            refuse_together("FastAT", overrides, ("step_size",), "ascender", "which configures the signed step")
        c = self._setup(model, sites, config, None, overrides, on_nonfinite=on_nonfinite, generator=generator)
        self.eps, self.method = c.eps, c.method
        self.step_size, self.init_factor = c.alpha, c.k
        self.ascender = ascender if ascender is not None else PGDAscender(c.alpha, "linf", c.radius, "sign")
        self.perturbations = {
            m: Perturbation(step_size=c.alpha, radius=c.radius, norm="linf", direction="sign",
                            init=UniformSampler(c.k * self.eps))
            for m in self.sites
        }
        self._context()  # checks sites, perturbations, the policy and that the model is not compiled, now

    def _engine_options(self) -> dict[str, Any]:
        return {"steps": 1, "ascender": self.ascender}

    def _step_context(self, masks: Mapping[str, MaskLike] | None, scaler: Any | None) -> FreeTraining:
        return self._context(masks, scaler, delta_steps=1)

    def _run(self, ft: FreeTraining, forward: Callable[[], Any], task_loss: Callable[[Any], Tensor],
             scale: float) -> tuple[list[Tensor], list[Tensor]]:
        """The attack's forward and δ-only backward, then the training forward and backward."""
        values: list[Tensor] = []
        for step in ft:
            task = check_scalar(task_loss(ft.forward(forward)), "`task_loss` output")
            ft.backward(task if step.delta_only else task * scale)
            values.append(task.detach())
        return values, []
