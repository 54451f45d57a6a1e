"""`attack_retrieval`: attack the query side of a ranking, and robust Recall@K.

Queries (captions in image retrieval, images in text retrieval) are embedded with δ added
at their site; the gallery is fixed, embedded clean beforehand. The attack raises each
query's cross-entropy of its true item(s) against the whole gallery,
`-log Σ_{pos} softmax(s / τ)`, with `s` the query's similarities to every gallery item;
the ranks under the worst case found give robust Recall@K.

Shape notation:
    - b: queries in the batch; g: gallery items; e: embedding size
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advlab._checks import check_nonnegative
from advlab._errors import AdvlabTypeError, AdvlabValueError
from advlab.attacks.core import Method, attack
from advlab.attacks.result import AttackResult
from advlab.hooks import MaskLike
from advlab.perturbation import Perturbation
from advlab.sites import SiteLike

__all__ = ["RetrievalAttackResult", "Similarity", "attack_retrieval", "recall_from_ranks"]

Similarity = Literal["dot", "cosine"]


def recall_from_ranks(ranks: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Recall@K from 0-based ranks of the true item: the fraction of queries with rank < K.

    Args:
        ranks: Rank of each query's (best) true item, 0 = first.
        ks: The K values.

    Shape:
        - ranks: [b]

    Examples:
        >>> import torch
        >>> from advlab.attacks import recall_from_ranks
        >>> recall_from_ranks(torch.tensor([0, 3, 12, 0]), ks=(1, 5, 10))
        {1: 0.5, 5: 0.75, 10: 0.75}
    """
    if not isinstance(ranks, Tensor) or ranks.dim() != 1 or ranks.numel() == 0:
        raise AdvlabValueError(f"Expected `ranks` to be a non-empty 1-d tensor, but got {ranks!r}.")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise AdvlabValueError(f"Expected every K in `ks` to be an int >= 1, but got {k!r}.")
    return {int(k): int((ranks < k).sum()) / ranks.numel() for k in ks}


@dataclass(frozen=True)
class RetrievalAttackResult:
    """Ranks of the true items before and under the attack, and the attack itself.

    Attributes:
        ranks: 0-based rank of each query's best true item under the worst case found
            (items scoring strictly higher that are not true items; ties favour the true item).
        clean_ranks: The same, clean.
        result: The `AttackResult`: per-query cross-entropy `loss`, `clean_loss`, `deltas`;
            its `logits` are the scaled similarities to the gallery at the worst case.

    Shape:
        - ranks, clean_ranks: [b]

    Examples:
        >>> import torch
        >>> from advlab.attacks import AttackResult, RetrievalAttackResult
        >>> r = RetrievalAttackResult(torch.tensor([0, 7]), torch.tensor([0, 0]),
        ...                           AttackResult(torch.zeros(2), torch.zeros(2), {}))
        >>> r.recall(ks=(1, 5)), r.clean_recall(ks=(1,))
        ({1: 0.5, 5: 0.5}, {1: 1.0})
    """

    ranks: Tensor
    clean_ranks: Tensor
    result: AttackResult

    def recall(self, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
        """Robust Recall@K: fraction of queries whose true item ranks in the top K under attack."""
        return recall_from_ranks(self.ranks, ks)

    def clean_recall(self, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
        """Clean Recall@K."""
        return recall_from_ranks(self.clean_ranks, ks)


def _positives(targets: Tensor, b: int, g: int, device: torch.device) -> Tensor:
    """Targets as a [b, g] bool matrix of true items."""
    if not isinstance(targets, Tensor):
        raise AdvlabTypeError(f"Expected `targets` to be a tensor, but got {type(targets).__name__}.")
    if targets.dtype == torch.bool:
        if tuple(targets.shape) != (b, g):
            raise AdvlabValueError(
                f"Expected bool `targets` of shape ({b}, {g}) (queries x gallery), but got {tuple(targets.shape)}."
            )
        if not bool(targets.any(dim=1).all()):
            raise AdvlabValueError("Expected every query to have at least one true gallery item in `targets`.")
        return targets.to(device)
    if targets.is_floating_point() or tuple(targets.shape) != (b,):
        raise AdvlabValueError(
            f"Expected `targets` to be gallery indices, an integer tensor of shape ({b},), or a bool matrix "
            f"({b}, {g}), but got dtype {targets.dtype} and shape {tuple(targets.shape)}."
        )
    if bool(((targets < 0) | (targets >= g)).any()):
        raise AdvlabValueError(f"Expected `targets` to index the gallery (0..{g - 1}), but got {targets.tolist()}.")
    return F.one_hot(targets.to(device).long(), g).bool()


def _rank(scores: Tensor, positives: Tensor) -> Tensor:
    """0-based rank of the best true item: non-true items scoring strictly higher."""
    best = scores.masked_fill(~positives, float("-inf")).amax(dim=1, keepdim=True)  # [b, 1]
    return ((scores > best) & ~positives).sum(dim=1)


def attack_retrieval(
    model: nn.Module,
    *,
    perturbations: Mapping[str, Perturbation],
    forward: Callable[[], Any],
    gallery: Tensor,
    targets: Tensor,
    embed: Callable[[Any], Tensor] | None = None,
    similarity: Similarity = "dot",
    temperature: float = 1.0,
    sites: Mapping[str, SiteLike] | None = None,
    steps: int = 20,
    restarts: int = 1,
    mode: str = "joint",
    masks: Mapping[str, MaskLike] | None = None,
    generator: torch.Generator | None = None,
    method: Method = "pgd",
    radius: float | Mapping[str, float] | None = None,
    step_size: float | Mapping[str, float] | None = None,
    eval_mode: bool = True,
) -> RetrievalAttackResult:
    """Attack a batch of queries against a fixed gallery; ranks of the true items, clean and attacked.

    The loss raised for query i is `-log Σ_{j true} softmax_j(s_i / temperature)` over the
    whole gallery, where `s_i` holds its similarities to every gallery item. Everything else
    (sites, balls, restarts, PGD or APGD, state restoration) is `advlab.attack`.

    Args:
        model: The model that embeds the queries.
        perturbations: Modality to `Perturbation` at the query side's sites.
        forward: Embeds the batch of queries (δ is added at their sites).
        gallery: Embeddings of the gallery, computed clean beforehand (not perturbed).
        targets: The true gallery item of each query (indices), or a bool matrix with one
            or more true items per query (text retrieval with several captions per image).
        embed: Output to query embeddings; None = the output itself.
        similarity: `"dot"` (for embeddings that are already normalised) or `"cosine"`.
        temperature: τ > 0 of the cross-entropy.
        sites: Modality to site; None = `model.perturbation_sites()`.
        steps: Updates of δ per restart.
        restarts: Restarts, each example keeping its worst case.
        mode: `"joint"` or one modality's name.
        masks: Modality to bool mask of the queries' positions.
        generator: Randomness of the starts.
        method: `"pgd"` or `"apgd"`.
        radius: Overrides the perturbations' radii (0 = clean).
        step_size: Overrides the perturbations' PGD step sizes.
        eval_mode: Attack in eval mode (default).

    Returns:
        A `RetrievalAttackResult` (`recall()`, `clean_recall()`, `ranks`, `result`).

    Shape:
        - forward() (or embed(forward())): [b, e]
        - gallery: [g, e]
        - targets: [b] (int) or [b, g] (bool)

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> import advlab
        >>> from advlab.attacks import attack_retrieval
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> encoder = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 4))
        >>> queries = torch.randn(8, 6)
        >>> gallery = encoder(queries + 0.1 * torch.randn(8, 6)).detach()   # item i matches query i
        >>> out = attack_retrieval(
        ...     encoder, sites={"q": advlab.Site("0", where="input")},
        ...     perturbations={"q": advlab.Perturbation(step_size=0.2, radius=1.0)},
        ...     forward=lambda: encoder(queries), gallery=gallery, targets=torch.arange(8),
        ...     similarity="cosine", temperature=0.1, steps=10)
        >>> out.clean_recall(ks=(1,))[1] >= out.recall(ks=(1,))[1]
        True
        >>> bool((out.ranks >= out.clean_ranks).float().mean() > 0.5)
        True
    """
    if not isinstance(gallery, Tensor) or gallery.dim() != 2 or not gallery.is_floating_point():
        got = f"shape {tuple(gallery.shape)}, dtype {gallery.dtype}" if isinstance(gallery, Tensor) else type(gallery).__name__
        raise AdvlabValueError(f"Expected `gallery` to be a floating [g, e] tensor of embeddings, but got {got}.")
    if similarity not in ("dot", "cosine"):
        raise AdvlabValueError(f"Expected `similarity` to be 'dot' or 'cosine', but got {similarity!r}.")
    temperature = check_nonnegative(temperature, "temperature")
    if temperature == 0:
        raise AdvlabValueError("Expected `temperature` > 0, but got 0.")
    gal = gallery.detach()
    if similarity == "cosine":
        gal = F.normalize(gal, dim=-1)
    g = gal.shape[0]
    cache: dict[str, Tensor] = {}

    def scores(output: Any) -> Tensor:
        q = embed(output) if embed is not None else output
        if not isinstance(q, Tensor) or q.dim() != 2 or q.shape[1] != gal.shape[1]:
            got = f"shape {tuple(q.shape)}" if isinstance(q, Tensor) else type(q).__name__
            raise AdvlabValueError(
                f"Expected the query embeddings to have shape [b, {gal.shape[1]}] (the gallery's width), but got {got}."
            )
        if similarity == "cosine":
            q = F.normalize(q, dim=-1)
        return q @ gal.to(q.dtype).t() / temperature  # [b, g]

    def loss(output: Any) -> Tensor:
        s = scores(output)
        if "pos" not in cache:
            cache["pos"] = _positives(targets, s.shape[0], g, s.device)
        pos = cache["pos"]
        return torch.logsumexp(s, dim=1) - torch.logsumexp(s.masked_fill(~pos, float("-inf")), dim=1)

    result = attack(
        model, sites=sites, perturbations=perturbations, forward=forward, loss=loss, steps=steps, restarts=restarts,
        mode=mode, masks=masks, generator=generator, method=method, radius=radius, step_size=step_size,
        logits=scores, eval_mode=eval_mode,
    )
    pos = cache["pos"]  # logits=scores: both score matrices are set
    return RetrievalAttackResult(_rank(result.logits, pos), _rank(result.clean_logits, pos), result)  # type: ignore[arg-type]
