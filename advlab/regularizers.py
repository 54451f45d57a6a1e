"""Regularisers: divergences between the output distributions of two forwards.

Each takes *logits* (the last dimension is the class dimension; every leading dimension is
a row) and turns them into distributions by `"softmax"` over classes (the official VILLA
code does this even for VQA, whose task loss is a per-answer sigmoid) or by `"sigmoid"`
(one independent Bernoulli per class, the divergence summed over classes).

Reductions:

- `"batchmean"`: sum over classes, mean over rows (official VQA / VE / NLVR2 scaling);
- `"mean"`: mean over every element (the official VCR scaling: half the per-row KL for two classes);
- `"sum"`: sum over everything;
- `"none"`: one value per row.

Divergences are computed in at least float32 (float64 stays float64).

Masked-out classes given as −inf logits are supported: a class with probability 0 under
the expectation distribution contributes 0 (the convention 0 · log 0 = 0), with a zero
gradient. KL(p‖q) is +inf when p gives mass to a class whose logit in q is −inf (and so is
the symmetric KL): that is the divergence's true value, and the training engine reports
the infinite loss (`NonFiniteError` by default). Jensen–Shannon stays finite (at most
log 2 per row) in every such case. Sigmoid logits may be ±inf; a +inf logit under
`"softmax"`, or a NaN logit, gives NaN.

A softmax over a single class is always 1, so `[..., 1]` logits are refused under
`"softmax"` (the divergence would be 0 at every step): pass `distribution="sigmoid"` for
a single-logit head.

Shape notation:
    - b: rows (any number of leading dimensions); c: classes
"""

from __future__ import annotations

import math
from typing import Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advlab._checks import check_choice, check_float_tensor, compute_dtype
from advlab._errors import AdvlabValueError

__all__ = [
    "Reduction",
    "Distribution",
    "Detach",
    "kl_divergence",
    "symmetric_kl",
    "js_divergence",
    "KLRegularizer",
    "SymmetricKLRegularizer",
    "JSRegularizer",
    "Regularizer",
]

Reduction = Literal["batchmean", "mean", "sum", "none"]
Distribution = Literal["softmax", "sigmoid"]
Detach = Literal["none", "target"]
REDUCTIONS: tuple[str, ...] = ("batchmean", "mean", "sum", "none")
DISTRIBUTIONS: tuple[str, ...] = ("softmax", "sigmoid")
DETACH: tuple[str, ...] = ("none", "target")


def _check_pair(p_logits: Tensor, q_logits: Tensor, distribution: str) -> tuple[Tensor, Tensor]:
    p_logits = check_float_tensor(p_logits, "p_logits")
    q_logits = check_float_tensor(q_logits, "q_logits")
    if p_logits.shape != q_logits.shape:
        raise AdvlabValueError(
            f"Expected `p_logits` and `q_logits` to have the same shape, but got {tuple(p_logits.shape)} "
            f"and {tuple(q_logits.shape)}."
        )
    if distribution == "softmax" and p_logits.shape[-1] == 1:
        raise AdvlabValueError(
            f"Expected at least 2 classes in the last dimension of `p_logits` for distribution='softmax', but "
            f"got shape {tuple(p_logits.shape)}: the softmax of a single logit is always 1, so the divergence "
            "would be exactly 0 at every step. For one binary output per row (a single-logit head) pass "
            'distribution="sigmoid".'
        )
    dtype = torch.promote_types(compute_dtype(p_logits), compute_dtype(q_logits))
    return p_logits.to(dtype), q_logits.to(dtype)


def _log_probs(logits: Tensor, distribution: str) -> tuple[Tensor, ...]:
    """Log-probabilities of each outcome: (log p,) for softmax, (log p, log(1-p)) for sigmoid."""
    if distribution == "softmax":
        return (F.log_softmax(logits, dim=-1),)
    return (F.logsigmoid(logits), F.logsigmoid(-logits))


def _kl_terms(log_ps: tuple[Tensor, ...], log_qs: tuple[Tensor, ...]) -> Tensor:
    """Per-class KL(p‖q) terms, [..., c], from the outcome log-probabilities of `_log_probs`.

    An outcome with p = 0 (a −inf logit, or a probability below the dtype's range)
    contributes 0 (0 · log 0 = 0), with a zero gradient: both the difference and the product
    are selected away, so no 0 · inf is formed even where q's logit is −inf too.
    """
    terms = []
    for log_p, log_q in zip(log_ps, log_qs):
        p = log_p.exp()
        live = p != 0  # NaN stays live, and NaN
        terms.append(torch.where(live, p * torch.where(live, log_p - log_q, 0.0), 0.0))
    return sum(terms[1:], terms[0])


def _log_mixture(log_p: Tensor, log_q: Tensor) -> Tensor:
    """log((p + q) / 2), −inf where both are 0 (without the NaN gradient of logaddexp(−inf, −inf))."""
    both = (log_p == -math.inf) & (log_q == -math.inf)
    mixed = torch.logaddexp(log_p.masked_fill(both, 0.0), log_q.masked_fill(both, 0.0)) - math.log(2.0)
    return mixed.masked_fill(both, -math.inf)


def _reduce(elementwise: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return elementwise.sum(dim=-1)
    if reduction == "sum":
        return elementwise.sum()
    if reduction == "mean":
        return elementwise.mean()
    rows = elementwise.numel() // max(elementwise.shape[-1], 1)  # the logits are at least 1-D
    return elementwise.sum() / max(rows, 1)


def kl_divergence(
    p_logits: Tensor,
    q_logits: Tensor,
    *,
    distribution: Distribution = "softmax",
    reduction: Reduction = "batchmean",
) -> Tensor:
    """KL(p‖q) = Σ p (log p − log q), with p and q given by their logits.

    Args:
        p_logits: Logits of p (the distribution the expectation is taken under).
        q_logits: Logits of q.
        distribution: `"softmax"` over the last dimension or per-class `"sigmoid"`.
        reduction: `"batchmean"`, `"mean"`, `"sum"` or `"none"` (one value per row).

    Shape:
        - p_logits, q_logits: [..., c]
        - output: scalar, or [...] for `"none"`

    Examples:
        >>> import torch
        >>> from advlab.regularizers import kl_divergence
        >>> p = torch.tensor([[2.0, 0.0, -1.0]])
        >>> kl_divergence(p, p)
        tensor(0.)
        >>> kl_divergence(p, torch.zeros(1, 3))
        tensor(0.5743)

        A masked-out class (−inf logit) contributes nothing; mass where q has none gives inf:

        >>> masked = torch.tensor([[0.0, -float("inf")]])
        >>> kl_divergence(masked, torch.zeros(1, 2)), kl_divergence(torch.zeros(1, 2), masked)
        (tensor(0.6931), tensor(inf))

        A single-logit head needs `distribution="sigmoid"` (softmax over one class is refused):

        >>> kl_divergence(torch.tensor([[1.0]]), torch.tensor([[-1.0]]), distribution="sigmoid")
        tensor(0.4621)
    """
    check_choice(distribution, DISTRIBUTIONS, "distribution")
    check_choice(reduction, REDUCTIONS, "reduction")
    p_logits, q_logits = _check_pair(p_logits, q_logits, distribution)
    return _reduce(_kl_terms(_log_probs(p_logits, distribution), _log_probs(q_logits, distribution)), reduction)


def symmetric_kl(
    p_logits: Tensor,
    q_logits: Tensor,
    *,
    detach: Detach = "none",
    distribution: Distribution = "softmax",
    reduction: Reduction = "batchmean",
) -> Tensor:
    """Symmetric KL: KL(p‖q) + KL(q‖p).

    With `detach="none"` (VILLA) gradients flow through both sides of both terms. With
    `detach="target"` (SMART, ALUM) each term's expectation distribution is a constant:
    KL(sg(p)‖q) + KL(sg(q)‖p).

    Args:
        p_logits: Logits of p.
        q_logits: Logits of q.
        detach: `"none"` or `"target"`.
        distribution: `"softmax"` or `"sigmoid"`.
        reduction: `"batchmean"`, `"mean"`, `"sum"` or `"none"`.

    Shape:
        - p_logits, q_logits: [..., c]; output: scalar, or [...] for `"none"`

    Examples:
        >>> import torch
        >>> from advlab.regularizers import symmetric_kl
        >>> p, q = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]])
        >>> symmetric_kl(p, q), symmetric_kl(q, p)
        (tensor(1.8356), tensor(1.8356))
        >>> symmetric_kl(p, q, distribution="sigmoid")
        tensor(0.9927)
    """
    check_choice(detach, DETACH, "detach")
    check_choice(distribution, DISTRIBUTIONS, "distribution")
    check_choice(reduction, REDUCTIONS, "reduction")
    p_logits, q_logits = _check_pair(p_logits, q_logits, distribution)
    # Each term takes its own log-probabilities. Sharing them between the two terms saves two
    # log_softmax calls but changes the gradient's last bits, and with them every recorded
    # experiment run (docs/reproducing.md), so it is not done.
    stop = detach == "target"  # each term's expectation side is a constant
    forward = _kl_terms(_log_probs(p_logits.detach() if stop else p_logits, distribution),
                        _log_probs(q_logits, distribution))
    backward = _kl_terms(_log_probs(q_logits.detach() if stop else q_logits, distribution),
                         _log_probs(p_logits, distribution))
    return _reduce(forward + backward, reduction)


def js_divergence(
    p_logits: Tensor,
    q_logits: Tensor,
    *,
    distribution: Distribution = "softmax",
    reduction: Reduction = "batchmean",
) -> Tensor:
    """Jensen–Shannon divergence: ½ KL(p‖m) + ½ KL(q‖m), m = (p + q) / 2.

    Args:
        p_logits: Logits of p.
        q_logits: Logits of q.
        distribution: `"softmax"` or `"sigmoid"`.
        reduction: `"batchmean"`, `"mean"`, `"sum"` or `"none"`.

    Shape:
        - p_logits, q_logits: [..., c]; output: scalar, or [...] for `"none"`

    Examples:
        >>> import torch
        >>> from advlab.regularizers import js_divergence
        >>> p, q = torch.tensor([[9.0, -9.0]]), torch.tensor([[-9.0, 9.0]])
        >>> js_divergence(p, q)  # nearly disjoint: close to its bound log 2 = 0.6931
        tensor(0.6931)
        >>> js_divergence(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, -float("inf")]]))
        tensor(0.2158)
    """
    check_choice(distribution, DISTRIBUTIONS, "distribution")
    check_choice(reduction, REDUCTIONS, "reduction")
    p_logits, q_logits = _check_pair(p_logits, q_logits, distribution)
    log_p, log_q = _log_probs(p_logits, distribution), _log_probs(q_logits, distribution)
    log_m = tuple(_log_mixture(a, b) for a, b in zip(log_p, log_q))
    return _reduce(0.5 * (_kl_terms(log_p, log_m) + _kl_terms(log_q, log_m)), reduction)


class KLRegularizer(nn.Module):
    """Module form of `kl_divergence`.

    Args:
        distribution: `"softmax"` or `"sigmoid"`.
        reduction: `"batchmean"`, `"mean"`, `"sum"` or `"none"`.

    Examples:
        >>> import torch
        >>> from advlab.regularizers import KLRegularizer
        >>> KLRegularizer()(torch.zeros(2, 3), torch.zeros(2, 3))
        tensor(0.)
    """

    def __init__(self, *, distribution: Distribution = "softmax", reduction: Reduction = "batchmean") -> None:
        super().__init__()
        self.distribution = check_choice(distribution, DISTRIBUTIONS, "distribution")
        self.reduction = check_choice(reduction, REDUCTIONS, "reduction")

    def forward(self, p_logits: Tensor, q_logits: Tensor) -> Tensor:
        """KL(p‖q)."""
        return kl_divergence(p_logits, q_logits, distribution=self.distribution, reduction=self.reduction)  # type: ignore[arg-type]


class SymmetricKLRegularizer(nn.Module):
    """Module form of `symmetric_kl`.

    Args:
        detach: `"none"` (VILLA) or `"target"` (SMART).
        distribution: `"softmax"` or `"sigmoid"`.
        reduction: `"batchmean"`, `"mean"`, `"sum"` or `"none"`.

    Examples:
        >>> import torch
        >>> from advlab.regularizers import SymmetricKLRegularizer
        >>> SymmetricKLRegularizer(detach="target")(torch.zeros(2, 3), torch.zeros(2, 3))
        tensor(0.)
    """

    def __init__(
        self, *, detach: Detach = "none", distribution: Distribution = "softmax", reduction: Reduction = "batchmean"
    ) -> None:
        super().__init__()
        self.detach = check_choice(detach, DETACH, "detach")
        self.distribution = check_choice(distribution, DISTRIBUTIONS, "distribution")
        self.reduction = check_choice(reduction, REDUCTIONS, "reduction")

    def forward(self, p_logits: Tensor, q_logits: Tensor) -> Tensor:
        """KL(p‖q) + KL(q‖p)."""
        return symmetric_kl(
            p_logits, q_logits, detach=self.detach, distribution=self.distribution, reduction=self.reduction  # type: ignore[arg-type]
        )


class JSRegularizer(nn.Module):
    """Module form of `js_divergence`.

    Args:
        distribution: `"softmax"` or `"sigmoid"`.
        reduction: `"batchmean"`, `"mean"`, `"sum"` or `"none"`.

    Examples:
        >>> import torch
        >>> from advlab.regularizers import JSRegularizer
        >>> JSRegularizer()(torch.zeros(2, 3), torch.zeros(2, 3))
        tensor(0.)
    """

    def __init__(self, *, distribution: Distribution = "softmax", reduction: Reduction = "batchmean") -> None:
        super().__init__()
        self.distribution = check_choice(distribution, DISTRIBUTIONS, "distribution")
        self.reduction = check_choice(reduction, REDUCTIONS, "reduction")

    def forward(self, p_logits: Tensor, q_logits: Tensor) -> Tensor:
        """JS(p, q)."""
        return js_divergence(p_logits, q_logits, distribution=self.distribution, reduction=self.reduction)  # type: ignore[arg-type]


@runtime_checkable
class Regularizer(Protocol):
    """What a recipe calls to compare its clean and perturbed outputs.

    Any callable taking two logits tensors of the same shape and returning a scalar loss
    fits: the functions of this module (with their keyword arguments bound, e.g. by
    `functools.partial`), the module classes above, or a user's own function. The first
    argument is the clean forward's logits, the second the perturbed forward's; the loss
    should be differentiable with respect to both.

    Shape:
        - p_logits, q_logits: [..., c]
        - output: scalar

    Examples:
        >>> import functools
        >>> import torch
        >>> from advlab.regularizers import Regularizer, symmetric_kl
        >>> smart_loss = functools.partial(symmetric_kl, detach="target")
        >>> isinstance(smart_loss, Regularizer)
        True
        >>> p, q = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])
        >>> smart_loss(p, q)
        tensor(3.0464)
    """

    def __call__(self, p_logits: Tensor, q_logits: Tensor) -> Tensor:
        """The divergence between the distributions given by `p_logits` and `q_logits` (a scalar)."""
        ...
