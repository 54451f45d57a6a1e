"""`R3F`: random-noise trust-region regularisation (Aghajanyan et al., ICLR 2021).

One step on a batch, with no ascent (the perturbation is noise only):

    δ ~ U(-ε, ε) or N(0, ε²)  (masked elements 0)
    loss = L(f(x), y) + λ · [ KL(p(x) ‖ p(x + δ)) + KL(p(x + δ) ‖ p(x)) ]

neither side of the symmetric KL detached, batchmean reduction (fairseq's
`sentence_prediction_r3f` criterion, `--eps 1e-5 --r3f-lambda 1.0 --noise-type uniform`).

The noised branch starts from the site tensor *with* its gradient: the modules before the
site (the embedding table) get gradient from both branches, the full gradient of the
objective above. fairseq's sentence-level criterion adds the noise to a detached copy of the
token embeddings instead (its seq2seq criterion does not detach); see `docs/recipes.md`.

R4F adds a spectral-normalised classification head (`spectral_norm_head`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from advlab._checks import check_choice, check_nonnegative, check_scalar
from advlab._errors import AdvlabTypeError, AdvlabValueError
from advlab.free import FreeTraining, default_logits
from advlab.perturbation import Perturbation
from advlab.recipe import Recipe
from advlab.regularizers import DISTRIBUTIONS, REDUCTIONS, Distribution, Reduction, Regularizer, symmetric_kl
from advlab.samplers import NormalSampler, UniformSampler
from advlab.sites import SiteLike

__all__ = ["R3F", "R3FConfig", "Noise", "spectral_norm_head"]

Noise = Literal["uniform", "normal"]
NOISES: tuple[str, ...] = ("uniform", "normal")


def spectral_norm_head(model: nn.Module, name: str) -> nn.Module:
    """Spectral-normalise the weight of the module `name` in place (R4F's head); return it.

    Call it once, before the optimizer is built: the weight becomes a parametrisation whose
    trainable tensor is `<name>.parametrizations.weight.original` (the same Parameter object,
    so an optimizer built earlier still updates it, but state dict keys change).

    Args:
        model: The model.
        name: Dotted name of a module with a `weight` (the classification head).

    Returns:
        The module, now spectral-normalised (`torch.nn.utils.parametrizations.spectral_norm`).

    Examples:
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        >>> head = spectral_norm_head(model, "1")
        >>> torch.nn.utils.parametrize.is_parametrized(head, "weight")
        True
    """
    if not isinstance(model, nn.Module):
        raise AdvlabTypeError(f"Expected `model` to be an nn.Module, but got {type(model).__name__}.")
    try:
        module = model.get_submodule(name)
    except AttributeError:
        names = [n for n, m in model.named_modules() if n and isinstance(getattr(m, "weight", None), Tensor)]
        raise AdvlabValueError(
            f"Expected `spectral_norm_head` to name a submodule with a weight, but {name!r} is not a submodule; "
            f"modules with a weight: {names}."
        ) from None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() < 2:
        got = "no weight" if weight is None else f"a weight of shape {tuple(getattr(weight, 'shape', ()))}"
        raise AdvlabValueError(
            f"Expected module {name!r} to have a weight with at least 2 dimensions to spectral-normalise, but it "
            f"has {got}."
        )
    if torch.nn.utils.parametrize.is_parametrized(module, "weight"):
        raise AdvlabValueError(f"Expected module {name!r} to be spectral-normalised once, but its weight is already parametrised.")
    return torch.nn.utils.parametrizations.spectral_norm(module)


@dataclass(frozen=True)
class R3FConfig:
    """The numbers of an `R3F` step (fairseq's `sentence_prediction_r3f` defaults).

    Attributes:
        eps: Noise size ε: half-width of the uniform draw, or std of the normal draw
            (fairseq `--eps`, 1e-5).
        noise: `"uniform"` (fairseq default) or `"normal"`.
        weight: λ (fairseq `--r3f-lambda`, 1.0).
        distribution: `"softmax"` or `"sigmoid"` for the KL.
        reduction: KL reduction (`"batchmean"` as fairseq, which divides the summed KL by
            the batch size).

    Examples:
        >>> R3FConfig().noise
        'uniform'
    """

    eps: float = 1e-5
    noise: Noise = "uniform"
    weight: float = 1.0
    distribution: Distribution = "softmax"
    reduction: Reduction = "batchmean"

    def __post_init__(self) -> None:
        object.__setattr__(self, "eps", check_nonnegative(self.eps, "eps"))
        check_choice(self.noise, NOISES, "noise")
        object.__setattr__(self, "weight", check_nonnegative(self.weight, "weight"))
        check_choice(self.distribution, DISTRIBUTIONS, "distribution")
        check_choice(self.reduction, REDUCTIONS[:3], "reduction")


class R3F(Recipe):
    """R3F: task loss on the clean input plus λ · symmetric KL to a noised forward.

    Args:
        model: The model.
        sites: Modality to site; None = `model.perturbation_sites()`.
        config: An `R3FConfig`; default `R3FConfig()` (fairseq's defaults).
        logits: Output -> logits; default `default_logits`.
        regularizer: `(clean_logits, noised_logits) -> scalar`, replacing the symmetric KL
            (refused together with `distribution` or `reduction`).
        on_nonfinite: `"raise"` (default without a scaler) or `"skip"`.
        generator: Randomness for the noise.
        **overrides: Fields of `R3FConfig`: `eps`, `noise`, `weight`, `distribution`,
            `reduction`.

    Shape:
        - the site tensors: [b, n, d] or [b, d]; masks: [b, n] or [b]

    Examples:
        >>> import torch, advlab
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 2))
        >>> ids, y = torch.tensor([[1, 2], [3, 4]]), torch.tensor([0, 1])
        >>> r3f = advlab.R3F(model, {"txt": "0"}, eps=1e-2, generator=torch.Generator().manual_seed(0))
        >>> stats = r3f.step(lambda: model(ids), lambda out: nn.functional.cross_entropy(out, y))
        >>> len(stats.task_loss), len(stats.kl), stats.kl[0] >= 0
        (1, 1, True)
    """

    _config_class = R3FConfig

    def __init__(
        self,
        model: nn.Module,
        sites: Mapping[str, SiteLike] | None = None,
        *,
        config: R3FConfig | None = None,
        logits: Callable[[Any], Tensor] | None = None,
        regularizer: Regularizer | None = None,
        on_nonfinite: Literal["raise", "skip"] | None = None,
        generator: torch.Generator | None = None,
        **overrides: Any,
    ) -> None:
        self._take_regularizers(overrides, ("distribution", "reduction"), regularizer, default=self._symmetric_kl)
        c = self._setup(model, sites, config, None, overrides, on_nonfinite=on_nonfinite, generator=generator)
        self.eps, self.noise, self.weight = c.eps, c.noise, c.weight
        self.distribution, self.reduction = c.distribution, c.reduction
        init = UniformSampler(self.eps) if self.noise == "uniform" else NormalSampler(self.eps)
        # "random" direction: δ needs no gradient (R3F never ascends)
        self.perturbations = {k: Perturbation(step_size=0.0, direction="random", init=init) for k in self.sites}
        self.logits = logits or default_logits
        self._context()  # checks sites, perturbations, the policy and that the model is not compiled, now

    def _symmetric_kl(self, clean: Tensor, noised: Tensor) -> Tensor:
        """KL(p(x) ‖ p(x + δ)) + KL(p(x + δ) ‖ p(x)), neither side detached."""
        return symmetric_kl(clean, noised, distribution=self.distribution,  # type: ignore[arg-type]
                            reduction=self.reduction)  # type: ignore[arg-type]

    def _engine_options(self) -> dict[str, Any]:
        return {"steps": 1, "logits": self.logits}

    def _run(self, ft: FreeTraining, forward: Callable[[], Any], task_loss: Callable[[Any], Tensor],
             scale: float) -> tuple[list[Tensor], list[Tensor]]:
        """Clean forward, one noised forward, one backward of L + λ·SymKL."""
        task = self._clean_task_loss(ft, forward, task_loss, scale)
        for _ in ft:
            noised = self.logits(ft.forward(forward))
            reg = check_scalar(self.regularizer(ft.clean_logits, noised), "`regularizer` output")
            ft.backward(reg * (self.weight * scale))
        return [task.detach()], [reg.detach()]
