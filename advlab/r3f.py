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
from typing import Any, Literal

import torch
from torch import Tensor, nn

from advlab._checks import check_choice, check_nonnegative
from advlab._errors import AdvlabTypeError, AdvlabValueError
from advlab.free import default_logits, free_training
from advlab.hooks import MaskLike
from advlab.perturbation import Perturbation
from advlab.regularizers import DISTRIBUTIONS, REDUCTIONS, Distribution, Reduction, symmetric_kl
from advlab.samplers import NormalSampler, UniformSampler
from advlab.sites import SiteLike, resolve_sites
from advlab.stats import StepStats, collect_stats

__all__ = ["R3F", "Noise", "spectral_norm_head"]

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


class R3F:
    """R3F: task loss on the clean input plus λ · symmetric KL to a noised forward.

    Args:
        model: The model.
        sites: Modality to site; None = `model.perturbation_sites()`.
        eps: Noise size ε: half-width of the uniform draw, or std of the normal draw
            (fairseq `--eps`, 1e-5).
        noise: `"uniform"` (fairseq default) or `"normal"`.
        weight: λ (fairseq `--r3f-lambda`, 1.0).
        distribution: `"softmax"` or `"sigmoid"` for the KL.
        reduction: KL reduction (`"batchmean"` as fairseq, which divides the summed KL by
            the batch size).
        logits: Output -> logits; default `default_logits`.
        on_nonfinite: `"raise"` (default without a scaler) or `"skip"`.
        generator: Randomness for the noise.

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

    def __init__(
        self,
        model: nn.Module,
        sites: Mapping[str, SiteLike] | None = None,
        *,
        eps: float = 1e-5,
        noise: Noise = "uniform",
        weight: float = 1.0,
        distribution: Distribution = "softmax",
        reduction: Reduction = "batchmean",
        logits: Callable[[Any], Tensor] | None = None,
        on_nonfinite: Literal["raise", "skip"] | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.model = model
        self.sites = resolve_sites(model, sites)  # once: steps reuse the resolved modules
        self.eps = check_nonnegative(eps, "eps")
        self.noise = check_choice(noise, NOISES, "noise")
        init = UniformSampler(self.eps) if noise == "uniform" else NormalSampler(self.eps)
        # "random" direction: δ needs no gradient (R3F never ascends)
        self.perturbations = {k: Perturbation(step_size=0.0, direction="random", init=init) for k in self.sites}
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
        """One R3F step: clean forward, one noised forward, one backward of L + λ·SymKL.

        Args:
            forward: Runs the model on the batch and returns its output.
            task_loss: Output -> scalar task loss.
            masks: Modality to bool mask (True = real element); masked noise is 0.
            scale: Multiplies the whole loss (e.g. 1 / gradient-accumulation steps).
            scaler: A `torch.amp.GradScaler`.

        Returns:
            The clean task loss, the symmetric KL and the noise norm.
        """
        scale = check_nonnegative(scale, "scale")
        with free_training(
            self.model, self.sites, self.perturbations, steps=1, masks=masks, logits=self.logits, scaler=scaler,
            on_nonfinite=self.on_nonfinite, generator=self.generator,
        ) as ft:
            task = task_loss(ft.clean(forward))
            ft.clean_loss(task * scale)
            for _ in ft:
                noised = self.logits(ft.forward(forward))
                reg = symmetric_kl(ft.clean_logits, noised, distribution=self.distribution,  # type: ignore[arg-type]
                                   reduction=self.reduction)  # type: ignore[arg-type]
                ft.backward(reg * (self.weight * scale))
            norms = ft.delta_norms()
        return collect_stats([task.detach()], [reg.detach()], norms, ft.skipped_steps, {}, skip_reason=ft.skip_reason)
