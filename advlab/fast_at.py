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
from typing import Any, Literal

import torch
from torch import Tensor, nn

from advlab._checks import check_choice, check_nonnegative
from advlab.ascent import PGDAscender
from advlab.free import free_training
from advlab.hooks import MaskLike
from advlab.perturbation import Perturbation
from advlab.samplers import UniformSampler
from advlab.sites import SiteLike, resolve_sites
from advlab.stats import StepStats, collect_stats

__all__ = ["FastAT", "FastMethod"]

FastMethod = Literal["fgsm_rs", "n_fgsm"]
METHODS: tuple[str, ...] = ("fgsm_rs", "n_fgsm")


class FastAT:
    """Fast adversarial training: one random start, one signed gradient step, train on x + δ.

    Args:
        model: The model.
        sites: Modality to site; None = `model.perturbation_sites()`.
        eps: ε (L∞ radius for FGSM-RS; noise half-width is ε (FGSM-RS) or 2ε (N-FGSM)).
        method: `"fgsm_rs"` or `"n_fgsm"`.
        step_size: α; None = 1.25ε (FGSM-RS) or ε (N-FGSM).
        init_factor: Noise half-width in units of ε; None = 1 (FGSM-RS) or 2 (N-FGSM's k).
        on_nonfinite: `"raise"` (default without a scaler) or `"skip"`.
        generator: Randomness for δ_0.
            With several modalities in joint mode and no earlier forward in the step, δ₀ is drawn
            at each site's first call: list the sites in the order the model runs them (a
            model that runs a later-listed site first draws in its own order, with a warning).

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

    def __init__(
        self,
        model: nn.Module,
        sites: Mapping[str, SiteLike] | None = None,
        *,
        eps: float,
        method: FastMethod = "fgsm_rs",
        step_size: float | None = None,
        init_factor: float | None = None,
        on_nonfinite: Literal["raise", "skip"] | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.model = model
        self.sites = resolve_sites(model, sites)  # once: steps reuse the resolved modules
        self.eps = check_nonnegative(eps, "eps")
        self.method = check_choice(method, METHODS, "method")
        rs = method == "fgsm_rs"
        alpha = (1.25 * self.eps if rs else self.eps) if step_size is None else check_nonnegative(step_size, "step_size")
        k = (1.0 if rs else 2.0) if init_factor is None else check_nonnegative(init_factor, "init_factor")
        radius = self.eps if rs and self.eps > 0 else None
        if rs and self.eps == 0:
            alpha = 0.0  # the ball of radius 0: δ stays 0
        self.step_size, self.init_factor = alpha, k
        self.ascender = PGDAscender(alpha, "linf", radius, "sign")
        self.perturbations = {
            m: Perturbation(step_size=alpha, radius=radius, norm="linf", direction="sign",
                            init=UniformSampler(k * self.eps))
            for m in self.sites
        }
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
        """One step: attack forward and δ-only backward, then the training forward and backward.

        Args:
            forward: Runs the model on the batch and returns its output.
            task_loss: Output -> scalar task loss.
            masks: Modality to bool mask (True = real element); masked δ stays 0.
            scale: Multiplies the training loss (e.g. 1 / gradient-accumulation steps).
            scaler: A `torch.amp.GradScaler`.

        Returns:
            The task loss at δ_0 and at the final δ (two entries), and δ's norm (L∞ per row).
        """
        scale = check_nonnegative(scale, "scale")
        with free_training(
            self.model, self.sites, self.perturbations, steps=1, masks=masks, scaler=scaler,
            on_nonfinite=self.on_nonfinite, generator=self.generator, ascender=self.ascender,
        ) as ft:
            start = task_loss(ft.forward(forward))
            ft.ascend(start)
            for _ in ft:
                task = task_loss(ft.forward(forward))
                ft.backward(task * scale)
            norms = ft.delta_norms()
        return collect_stats([start.detach(), task.detach()], [], norms, ft.skipped_steps, {}, skip_reason=ft.skip_reason)
