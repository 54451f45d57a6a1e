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

from advlab._checks import check_choice, check_count, check_nonnegative, check_scalar
from advlab._errors import AdvlabValueError
from advlab.ascent import random_direction
from advlab.balls import NORMS, Norm, normalize
from advlab.free import FreeTraining, default_logits
from advlab.hooks import MaskLike
from advlab.perturbation import Perturbation
from advlab.recipe import Recipe
from advlab.regularizers import DISTRIBUTIONS, Distribution, Regularizer, kl_divergence, symmetric_kl
from advlab.sites import SiteLike

__all__ = ["VAT", "VATConfig", "Divergence"]

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


@dataclass(frozen=True)
class VATConfig:
    """The numbers of a `VAT` step; ALUM's two stages are instances (`VAT_CONFIGS`).

    Attributes:
        eps: ε, the size of r* (scale-dependent: choose it for your embeddings; Miyato et
            al. 2017 use 5.0 on unit-normalised word embeddings). Required.
        xi: ξ, the size of the finite-difference probe. The reference code's 1e-6 is lost
            in float32 once spread over a sequence's positions (x + r rounds to x, the
            direction follows rounding error; advlab warns when the probe moves the logits
            by under 100 ulps), so the default is 1e-3.
        steps: K power iterations (1 in the papers).
        norm: `"l2"` (per row, Miyato), `"l2_token"` (per position) or `"linf"` (ALUM).
        weight: α.
        divergence: `"kl"` (VAT) or `"symmetric_kl"` (ALUM), see the module docstring.
        distribution: `"softmax"` or `"sigmoid"` for the KL.

    Examples:
        >>> VAT_CONFIGS["alum-pretraining"].weight, VATConfig(eps=0.5).xi
        (10.0, 0.001)
    """

    eps: float
    xi: float = 1e-3
    steps: int = 1
    norm: Norm = "l2"
    weight: float = 1.0
    divergence: Divergence = "kl"
    distribution: Distribution = "softmax"

    def __post_init__(self) -> None:
        object.__setattr__(self, "eps", check_nonnegative(self.eps, "eps"))
        object.__setattr__(self, "xi", check_nonnegative(self.xi, "xi"))
        check_count(self.steps, "steps")
        check_choice(self.norm, NORMS, "norm")
        object.__setattr__(self, "weight", check_nonnegative(self.weight, "weight"))
        check_choice(self.divergence, DIVERGENCES, "divergence")
        check_choice(self.distribution, DISTRIBUTIONS, "distribution")


# ALUM (Liu et al., 2020): symmetric KL, an L∞ step, ε = ξ = 1e-5, α = 10 (pre-training) or 1 (fine-tuning)
VAT_CONFIGS: dict[str, VATConfig] = {
    f"alum-{stage}": VATConfig(eps=1e-5, xi=1e-5, norm="linf", weight=alpha, divergence="symmetric_kl")
    for stage, alpha in ALUM_STAGES.items()
}


class VAT(Recipe):
    """VAT: clean task loss plus α · divergence at the virtual adversarial direction.

    Args:
        model: The model.
        sites: Modality to site; None = `model.perturbation_sites()`.
        preset: `"alum-pretraining"` or `"alum-finetuning"` (`VAT_CONFIGS`); default none.
        config: A `VATConfig` instead of a preset.
        logits: Output -> logits; default `default_logits`.
        regularizer: `(clean_logits, perturbed_logits) -> scalar`, the trained term D,
            replacing the config's `divergence` (refused together with `divergence` or
            `distribution`); it gets the clean logits undetached.
        ascent_regularizer: The divergence the power iterations follow, given the clean
            logits detached; default `regularizer` when one is given, else KL(sg(p(x)) ‖ p(x + r)).
        on_nonfinite: `"raise"` (default without a scaler) or `"skip"`.
        generator: Randomness for the random start d.
        **overrides: Fields of `VATConfig`: `eps` (required unless a preset or config
            gives it), `xi`, `steps`, `norm`, `weight`, `divergence`, `distribution`.

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

    _config_class = VATConfig
    presets = VAT_CONFIGS
    """Preset name -> config (instances of the config dataclass)."""

    def __init__(
        self,
        model: nn.Module,
        sites: Mapping[str, SiteLike] | None = None,
        *,
        preset: str | None = None,
        config: VATConfig | None = None,
        logits: Callable[[Any], Tensor] | None = None,
        regularizer: Regularizer | None = None,
        ascent_regularizer: Regularizer | None = None,
        on_nonfinite: Literal["raise", "skip"] | None = None,
        generator: torch.Generator | None = None,
        **overrides: Any,
    ) -> None:
        self._take_regularizers(overrides, ("divergence", "distribution"), regularizer, ascent_regularizer,
                                default=self._default_regularizer, default_ascent=self._kl)
        c = self._setup(model, sites, config, preset, overrides, on_nonfinite=on_nonfinite, generator=generator)
        self.eps, self.xi, self.steps, self.norm = c.eps, c.xi, c.steps, c.norm
        self.weight, self.divergence, self.distribution = c.weight, c.divergence, c.distribution
        self.perturbations = {
            k: Perturbation(step_size=self.xi, norm=self.norm, init=_RandomStart(self.xi, self.norm)) for k in self.sites
        }
        self.logits = logits or default_logits
        self._context()  # checks sites, perturbations, the policy and that the model is not compiled, now

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
        return cls(model, sites, preset=f"alum-{stage}", eps=eps, xi=xi, **overrides)

    def _kl(self, clean: Tensor, adv: Tensor) -> Tensor:
        """KL(p(x) ‖ p(x + r)), batchmean: the power iterations' divergence (clean side given detached)."""
        return kl_divergence(clean, adv, distribution=self.distribution, reduction="batchmean")  # type: ignore[arg-type]

    def _default_regularizer(self, clean: Tensor, adv: Tensor) -> Tensor:
        """D: KL(sg(p(x)) ‖ p(x + r*)) (VAT) or each term's target detached (ALUM)."""
        if self.divergence == "kl":
            return self._kl(clean.detach(), adv)
        return symmetric_kl(adv, clean, detach="target", distribution=self.distribution,  # type: ignore[arg-type]
                            reduction="batchmean")

    def _check_probe(self, probe: Tensor, clean: Tensor) -> None:
        """Warn when the probe moved the logits by under 100 ulps: its gradient is then mostly rounding."""
        moved, largest = torch.stack([(probe.detach() - clean).abs().amax(), clean.abs().amax()]).tolist()  # one read
        resolution = PROBE_ULPS * torch.finfo(probe.dtype).eps * max(largest, 1.0)
        if moved < resolution:
            warnings.warn(
                f"VAT: the probe ξ·d (ξ = {self.xi:g}) moved the logits by {moved:.2g}, under {PROBE_ULPS} ulps of "
                f"{probe.dtype} ({resolution:.2g}), so the power iteration follows rounding error, not the "
                "model's most sensitive direction; increase `xi`.",
                stacklevel=4,
            )

    def _engine_options(self) -> dict[str, Any]:
        return {"steps": 1, "logits": self.logits}

    def _step_context(self, masks: Mapping[str, MaskLike] | None, scaler: Any | None) -> FreeTraining:
        self._power = _PowerIteration(self.norm, self.xi)  # its size changes to ε for the last iteration
        return self._context(masks, scaler, ascender=self._power, delta_steps=self.steps)

    def _run(self, ft: FreeTraining, forward: Callable[[], Any], task_loss: Callable[[Any], Tensor],
             scale: float) -> tuple[list[Tensor], list[Tensor]]:
        """K power iterations (r only), then one backward of L + α·D."""
        task = self._clean_task_loss(ft, forward, task_loss, scale)
        target = ft.clean_logits.detach()
        for step in ft:
            if step.delta_only:
                self._power.size = self.eps if step.index == self.steps - 1 else self.xi
                probe = self.logits(ft.forward(forward))
                if step.index == 0:
                    self._check_probe(probe, target)
                ft.backward(check_scalar(self.ascent_regularizer(target, probe), "`regularizer` output"))
            else:
                adv = self.logits(ft.forward(forward))
                reg = check_scalar(self.regularizer(ft.clean_logits, adv), "`regularizer` output")
                ft.backward(reg * (self.weight * scale))
        return [task.detach()], [reg.detach()]
