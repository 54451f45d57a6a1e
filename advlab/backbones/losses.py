"""Task losses of the vision-and-language heads, for UNITER and LXMERT alike.

Each takes a head's output (anything with `.logits`, such as `UniterClassifierOutput` or
`LxmertClassifierOutput`) or the logits themselves, and reduces as the official training scripts
do. VQA is binary cross-entropy with logits against soft scores, averaged and then multiplied by
the number of answers, in UNITER's `train_vqa.py` and LXMERT's `vqa.py` alike. NLVR2, VCR and
image-text matching use cross-entropy.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from advlab._errors import AdvlabTypeError, AdvlabValueError

__all__ = ["HasLogits", "itm_loss", "itm_rank_loss", "nlvr2_loss", "vcr_loss", "ve_loss", "vqa_loss", "vqa_score"]


class HasLogits(Protocol):
    """A head output with a `logits` tensor (`UniterClassifierOutput`, `LxmertClassifierOutput`, ...)."""

    logits: Tensor


def _logits(output: Tensor | Any) -> Tensor:
    logits = getattr(output, "logits", output)
    if not isinstance(logits, Tensor):
        raise AdvlabTypeError(
            f"Expected logits as a Tensor or an output with `.logits`, but got {type(output).__name__}."
        )
    return logits


def vqa_loss(logits: Tensor | HasLogits, targets: Tensor) -> Tensor:
    """VQA loss: BCE with logits against soft targets, `.mean() * num_answers`.

    That is, the sum over answers averaged over questions (UNITER / VILLA `train_vqa.py`).

    Args:
        logits: Head output or its logits.
        targets: Soft scores in [0, 1].

    Shape:
        logits, targets: [b, num_answers]. Output: scalar.

    Examples:
        >>> vqa_loss(torch.zeros(2, 4), torch.zeros(2, 4))
        tensor(2.7726)
    """
    logits = _logits(logits)
    if logits.shape != targets.shape:
        raise AdvlabValueError(
            f"Expected `targets` to have the shape of the logits {tuple(logits.shape)}, but got {tuple(targets.shape)}."
        )
    loss = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")
    return loss.mean() * logits.shape[1]


def vqa_score(logits: Tensor | HasLogits, targets: Tensor) -> Tensor:
    """VQA accuracy: the soft score of the argmax answer, per question.

    Args:
        logits: Head output or its logits.
        targets: Soft scores.

    Shape:
        logits, targets: [b, num_answers]. Output: [b].

    Examples:
        >>> vqa_score(torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 0.3]]))
        tensor([0.3000])
    """
    logits = _logits(logits)
    return targets.gather(1, logits.argmax(dim=1, keepdim=True)).squeeze(1)


def ve_loss(logits: Tensor | HasLogits, labels: Tensor) -> Tensor:
    """SNLI-VE loss: `vqa_loss` on one-hot targets (the official VE scripts), i.e. x 3.

    Args:
        logits: Head output or its logits.
        labels: Class ids (contradiction 0, entailment 1, neutral 2) or one-hot targets.

    Shape:
        logits: [b, 3]; labels: [b] or [b, 3]. Output: scalar.

    Examples:
        >>> ve_loss(torch.zeros(1, 3), torch.tensor([1]))
        tensor(2.0794)
    """
    logits = _logits(logits)
    if labels.dim() == 1:
        labels = F.one_hot(labels.long(), logits.shape[1]).to(logits.dtype)
    return vqa_loss(logits, labels)


def nlvr2_loss(logits: Tensor | HasLogits, labels: Tensor) -> Tensor:
    """NLVR2 loss: cross-entropy, mean over examples.

    Shape:
        logits: [b, 2]; labels: [b]. Output: scalar.

    Args:
        logits: Head output or its logits.
        labels: 0 = False, 1 = True.

    Examples:
        >>> nlvr2_loss(torch.zeros(2, 2), torch.tensor([0, 1]))
        tensor(0.6931)
    """
    return F.cross_entropy(_logits(logits), labels.long())


def vcr_loss(logits: Tensor | HasLogits, labels: Tensor) -> Tensor:
    """VCR loss: cross-entropy over rows, each (question, candidate) row a 2-way problem.

    Args:
        logits: Head output or its logits.
        labels: 1 for the right candidate's row, else 0; [b] or [b, 1].

    Shape:
        logits: [b, 2]; labels: [b] or [b, 1]. Output: scalar.

    Examples:
        >>> vcr_loss(torch.zeros(4, 2), torch.tensor([0, 1, 0, 0]))
        tensor(0.6931)
    """
    return F.cross_entropy(_logits(logits), labels.reshape(-1).long())


def itm_loss(itm_logits: Tensor | Any, labels: Tensor) -> Tensor:
    """Image-text matching loss on `itm_output` logits: cross-entropy (1 = match).

    Args:
        itm_logits: [b, 2] logits, or an output with `itm_logits` (`UniterRetrievalOutput`).
        labels: [b].

    Shape:
        itm_logits: [b, 2]; labels: [b]. Output: scalar.

    Examples:
        >>> itm_loss(torch.zeros(2, 2), torch.tensor([1, 0]))
        tensor(0.6931)
    """
    itm_logits = getattr(itm_logits, "itm_logits", itm_logits)
    if not isinstance(itm_logits, Tensor):
        raise AdvlabTypeError(
            f"Expected `itm_logits` as a Tensor or an output with `.itm_logits`, but got {type(itm_logits).__name__}."
        )
    return F.cross_entropy(itm_logits, labels.long())


def itm_rank_loss(rank_logits: Tensor | HasLogits, sample_size: int, *, margin: float = 0.2) -> Tensor:
    """Retrieval hinge loss: mean of clamp(margin + neg - pos, 0) on sigmoid scores.

    Rows come in groups of `sample_size`: the positive pair first, then its negatives
    (UNITER's `train_itm.py` layout).

    Args:
        rank_logits: [b, 1] rank scores or the head output.
        sample_size: 1 + negatives per positive.
        margin: Hinge margin (0.2 in UNITER's configs).

    Shape:
        rank_logits: [b, 1] or [b], b a multiple of `sample_size`. Output: scalar.

    Examples:
        >>> itm_rank_loss(torch.tensor([[5.0], [-5.0], [5.0], [-5.0]]), 2)
        tensor(0.)
    """
    scores = torch.sigmoid(_logits(rank_logits).reshape(-1))
    if sample_size < 2 or scores.numel() % sample_size:
        raise AdvlabValueError(
            f"Expected `sample_size` >= 2 dividing the {scores.numel()} rows, but got {sample_size}."
        )
    scores = scores.view(-1, sample_size)  # [groups, 1 + negatives]
    return torch.clamp(margin + scores[:, 1:] - scores[:, :1], min=0).mean()
