"""`VAT`: virtual adversarial training (Miyato et al., 2018), with the ALUM preset (Liu et al., 2020).

One step on a batch:

    r = ξ · d / ‖d‖,  d ~ N(0, I)  (masked elements 0)
    K power iterations:  g = ∇r KL(sg(p(x)) ‖ p(x + r));  r ← ξ · g / ‖g‖  (the last: r* = ε · g / ‖g‖)
    loss = L(f(x), y) + α · D(p(x), p(x + r*))

with D = KL(sg(p(x)) ‖ p(x + r*)) (VAT) or the symmetric KL with each term's expectation
side detached, KL(sg(p(x + r*)) ‖ p(x)) + KL(sg(p(x)) ‖ p(x + r*)) (ALUM). The norm is per
row (`"l2"`, `"linf"`) or per position (`"l2_token"`). The power iterations move r only (no
parameter gradient). ALUM (`VAT.alum`) is symmetric KL, an L∞ step and α = 10 for
pre-training or 1 for fine-tuning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from advlab._checks import check_choice, check_count, check_nonnegative
from advlab._errors import AdvlabValueError
from advlab.ascent import random_direction
from advlab.balls import NORMS, Norm, normalize
from advlab.free import default_logits, free_training
from advlab.hooks import MaskLike
from advlab.perturbation import Perturbation
from advlab.regularizers import DISTRIBUTIONS, Distribution, kl_divergence, symmetric_kl
from advlab.sites import SiteLike, resolve_sites
from advlab.stats import StepStats, collect_stats

__all__ = ["VAT", "Divergence"]

Divergence = Literal["kl", "symmetric_kl"]
DIVERGENCES: tuple[str, ...] = ("kl", "symmetric_kl")
ALUM_STAGES: dict[str, float] = {"pretraining": 10.0, "finetuning": 1.0}  # ALUM's α
TINY = torch.finfo(torch.float32).tiny  # only guards 0 / 0: a zero gradient gives r = 0
PROBE_ULPS = 100  # a probe must move the logits by more than this many ulps (about 1% direction error)


@dataclass(frozen=True)
class _RandomStart:
    """Sampler: ξ times a random unit direction (per row, or per position for `"l2_token"`)."""

    xi: float
    norm: str

    def __call__(self, like: Tensor, *, mask: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        return self.xi * random_direction(like, self.norm, mask=mask, generator=generator)  # type: ignore[arg-type]


class _PowerIteration:
    """Ascender: r ← size · g / ‖g‖; `size` is ξ during the power iterations and ε for r*.

    The norm is clamped only against division by zero (not at `normalize`'s 1e-8): with ALUM's
    ξ = 1e-5 the gradient at the probe can be smaller than 1e-8, and r* must still have size ε.
    """

    def __init__(self, norm: str, size: float) -> None:
        self.norm, self.size = norm, size

    def __call__(
        self, delta: Tensor, grad: Tensor | None, *, mask: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        if grad is None:
            raise AdvlabValueError("Expected a gradient for VAT's power iteration, but got None.")
        direction = normalize(grad, self.norm, mask=mask, eps=TINY)  # type: ignore[arg-type]
        return (self.size * direction).to(delta.dtype)


class VAT:
    """VAT: clean task loss plus α · divergence at the virtual adversarial direction.

    Args:
        model: The model.
        sites: Modality to site; None = `model.perturbation_sites()`.
        eps: ε, the size of r* (scale-dependent: choose it for your embeddings; Miyato et
            al. 2017 use 5.0 on unit-normalised word embeddings).
        xi: ξ, the size of the finite-difference probe. The reference code's 1e-6 is lost
            in float32 once spread over a sequence's positions (x + r rounds to x, the
            direction follows rounding error; advlab warns when the probe moves the logits by
            under 100 ulps), so
            the default is 1e-3.
        steps: K power iterations (1 in the papers).
        norm: `"l2"` (per row, Miyato), `"l2_token"` (per position) or `"linf"` (ALUM).
        weight: α.
        divergence: `"kl"` (VAT) or `"symmetric_kl"` (ALUM), see the module docstring.
        distribution: `"softmax"` or `"sigmoid"` for the KL.
        logits: Output -> logits; default `default_logits`.
        on_nonfinite: `"raise"` (default without a scaler) or `"skip"`.
        generator: Randomness for the random start d.

    Shape:
        - the site tensors: [b, n, d] or [b, d]; masks: [b, n] or [b]

    Examples:
        >>> import torch, advlab
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 2))
        >>> ids, y = torch.tensor([[1, 2], [3, 4]]), torch.tensor([0, 1])
        >>> vat = advlab.VAT(model, {"txt": "0"}, eps=0.5, generator=torch.Generator().manual_seed(0))
        >>> stats = vat.step(lambda: model(ids), lambda out: nn.functional.cross_entropy(out, y))
        >>> round(stats.delta_norm["txt"], 4)  # every row of r* has norm ε
        0.5
    """

    def __init__(
        self,
        model: nn.Module,
        sites: Mapping[str, SiteLike] | None = None,
        *,
        eps: float,
        xi: float = 1e-3,
        steps: int = 1,
        norm: Norm = "l2",
        weight: float = 1.0,
        divergence: Divergence = "kl",
        distribution: Distribution = "softmax",
        logits: Callable[[Any], Tensor] | None = None,
        on_nonfinite: Literal["raise", "skip"] | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.model = model
        self.sites = resolve_sites(model, sites)  # once: steps reuse the resolved modules
        self.eps = check_nonnegative(eps, "eps")
        self.xi = check_nonnegative(xi, "xi")
        self.steps = check_count(steps, "steps")
        self.norm = check_choice(norm, NORMS, "norm")
        self.perturbations = {
            k: Perturbation(step_size=self.xi, norm=norm, init=_RandomStart(self.xi, norm)) for k in self.sites
        }
        self.weight = check_nonnegative(weight, "weight")
        self.divergence = check_choice(divergence, DIVERGENCES, "divergence")
        self.distribution = check_choice(distribution, DISTRIBUTIONS, "distribution")
        self.logits = logits or default_logits
        self.on_nonfinite, self.generator = on_nonfinite, generator

    @classmethod
    def alum(
        cls,
        model: nn.Module,
        sites: Mapping[str, SiteLike] | None = None,
        *,
        stage: Literal["pretraining", "finetuning"] = "finetuning",
        eps: float = 1e-5,
        xi: float = 1e-5,
        **overrides: Any,
    ) -> VAT:
        """ALUM as a VAT preset: symmetric KL, an L∞ step, α = 10 (pre-training) or 1 (fine-tuning).

        Args:
            model: The model.
            sites: Modality to site; None = `model.perturbation_sites()`.
            stage: `"pretraining"` (α = 10, `alum_train.sh`'s `--adv_alpha 10`) or
                `"finetuning"` (α = 1).
            eps: ε (ALUM's 1e-5).
            xi: ξ, the size of the random start (ALUM's noise σ, 1e-5).
            **overrides: Any other `VAT` argument (`weight` overrides the stage's α).

        Examples:
            >>> import torch, advlab
            >>> from torch import nn
            >>> model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 2))
            >>> alum = advlab.VAT.alum(model, {"txt": "0"}, stage="pretraining")
            >>> alum.weight, alum.norm, alum.divergence
            (10.0, 'linf', 'symmetric_kl')
        """
        check_choice(stage, tuple(ALUM_STAGES), "stage")
        settings: dict[str, Any] = {"norm": "linf", "divergence": "symmetric_kl", "weight": ALUM_STAGES[stage]}
        settings.update(overrides)
        return cls(model, sites, eps=eps, xi=xi, **settings)

    def _check_probe(self, probe: Tensor, clean: Tensor) -> None:
        """Warn when the probe moved the logits by under 100 ulps: its gradient is then mostly rounding."""
        moved = float((probe.detach() - clean).abs().amax())
        resolution = PROBE_ULPS * torch.finfo(probe.dtype).eps * max(float(clean.abs().amax()), 1.0)
        if moved < resolution:
            warnings.warn(
                f"VAT: the probe ξ·d (ξ = {self.xi:g}) moved the logits by {moved:.2g}, under {PROBE_ULPS} ulps of "
                f"{probe.dtype} ({resolution:.2g}), so the power iteration follows rounding error, not the "
                "model's most sensitive direction; increase `xi`.",
                stacklevel=3,
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
        """One VAT step: K power iterations (r only), then one backward of L + α·D.

        Args:
            forward: Runs the model on the batch and returns its output.
            task_loss: Output -> scalar task loss.
            masks: Modality to bool mask (True = real element); masked r stays 0.
            scale: Multiplies the whole loss (e.g. 1 / gradient-accumulation steps).
            scaler: A `torch.amp.GradScaler`.

        Returns:
            The clean task loss, the divergence at r* and r*'s norm.
        """
        scale = check_nonnegative(scale, "scale")
        kw = {"distribution": self.distribution, "reduction": "batchmean"}
        power = _PowerIteration(self.norm, self.xi)
        with free_training(
            self.model, self.sites, self.perturbations, steps=1, masks=masks, logits=self.logits, scaler=scaler,
            on_nonfinite=self.on_nonfinite, generator=self.generator, ascender=power,
        ) as ft:
            task = task_loss(ft.clean(forward))
            ft.clean_loss(task * scale)
            target = ft.clean_logits.detach()
            for k in range(self.steps):
                power.size = self.eps if k == self.steps - 1 else self.xi
                probe = self.logits(ft.forward(forward))
                if k == 0:
                    self._check_probe(probe, target)
                ft.ascend(kl_divergence(target, probe, **kw))  # type: ignore[arg-type]
            for _ in ft:
                adv = self.logits(ft.forward(forward))
                if self.divergence == "kl":
                    reg = kl_divergence(ft.clean_logits.detach(), adv, **kw)  # type: ignore[arg-type]
                else:
                    reg = symmetric_kl(adv, ft.clean_logits, detach="target", **kw)  # type: ignore[arg-type]
                ft.backward(reg * (self.weight * scale))
            norms = ft.delta_norms()
        return collect_stats([task.detach()], [reg.detach()], norms, ft.skipped_steps, {}, skip_reason=ft.skip_reason)
