"""Losses of the retrieval experiment: ITC, the batch forward with mined ITM negatives, and the KL VILLA adds."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from advlab.experiments.retrieval.model import RetrievalModel
from advlab.regularizers import symmetric_kl


def itc_loss(i2t: Tensor, t2i: Tensor, caption_ids: Tensor) -> Tensor:
    """In-batch contrastive loss; rows with the same caption are all positives (soft targets).

    Args:
        i2t: Image → caption logits (row i: image i against every caption). Shape [b, b].
        t2i: Caption → image logits. Shape [b, b].
        caption_ids: Caption identity of each row. Shape [b].

    Returns:
        The mean of the two cross-entropies.

    Examples:
        >>> logits = torch.eye(3) * 10
        >>> float(itc_loss(logits, logits, torch.tensor([0, 1, 2]))) < 1e-3
        True
    """
    same = (caption_ids[:, None] == caption_ids[None, :]).to(i2t.dtype)  # [b, b]
    targets = same / same.sum(dim=1, keepdim=True)
    loss_i2t = -(targets * F.log_softmax(i2t, dim=1)).sum(dim=1).mean()
    loss_t2i = -(targets * F.log_softmax(t2i, dim=1)).sum(dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


@dataclass
class _BatchOut:
    packed: Tensor  # [b, 2b + 6]: i2t row, t2i row, ITM logits of (pos, negative image, negative caption)

    def parts(self, b: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.packed[:, :b], self.packed[:, b : 2 * b], self.packed[:, 2 * b :].reshape(b, 3, 2)


def _mine_negatives(sim: Tensor, caption_ids: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Hard negatives drawn from the ITC softmax, never a row with the same caption (ALBEF's sampling)."""
    same = caption_ids[:, None] == caption_ids[None, :]  # symmetric: serves both directions

    def draw(scores: Tensor) -> Tensor:
        weights = F.softmax(scores.detach().float(), dim=1).masked_fill(same, 0.0) + 1e-9 * (~same)
        weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, torch.ones_like(weights))
        return torch.multinomial(weights, 1, generator=generator).squeeze(1)

    return draw(sim), draw(sim.t())  # a negative image per caption, then a negative caption per image


def _batch_forward(
    model: RetrievalModel, batch: Mapping[str, Tensor], negatives: dict[str, Tensor], generator: torch.Generator
) -> _BatchOut:
    """One forward: ITC logits of the batch and ITM logits of positives and mined negatives.

    Negatives are mined at the first call for a batch (the clean forward) and reused, so every
    perturbed forward scores the same pairs.
    """
    text = model.encode_text(batch["input_ids"], batch["attention_mask"])
    image = model.encode_image(batch["features"], batch["boxes"])
    sim = text.itc @ image.itc.t()  # [b, b], captions × images
    t2i = sim / model.config.temperature
    i2t = t2i.t()
    b = sim.shape[0]
    if "img" not in negatives:
        negatives["img"], negatives["txt"] = _mine_negatives(sim, batch["caption_ids"], generator)
    ar = torch.arange(b, device=sim.device)
    ti = torch.cat([ar, ar, negatives["txt"]])  # pos, (caption i, negative image), (negative caption, image i)
    vi = torch.cat([ar, negatives["img"], ar])
    if model.config.itm_weight > 0:
        itm = model.match(text, image, ti, vi).reshape(3, b, 2).transpose(0, 1)  # [b, 3, 2]
    else:
        itm = torch.zeros(b, 3, 2, dtype=sim.dtype, device=sim.device)
    return _BatchOut(torch.cat([i2t, t2i, itm.reshape(b, 6)], dim=1))


def _task_loss(out: _BatchOut, caption_ids: Tensor, itm_weight: float) -> Tensor:
    b = caption_ids.shape[0]
    i2t, t2i, itm = out.parts(b)
    loss = itc_loss(i2t, t2i, caption_ids)
    if itm_weight > 0:
        labels = torch.tensor([1, 0, 0], device=itm.device).repeat(b)
        loss = loss + itm_weight * F.cross_entropy(itm.reshape(3 * b, 2), labels)
    return loss


def _kl(out: Tensor, clean: Tensor, b: int, itm: bool) -> Tensor:
    """Symmetric KL on each distribution the losses use: ITC rows both ways, ITM 2-way."""
    kl = symmetric_kl(out[:, :b], clean[:, :b]) + symmetric_kl(out[:, b : 2 * b], clean[:, b : 2 * b])
    if itm:
        kl = kl + symmetric_kl(out[:, 2 * b :].reshape(3 * b, 2), clean[:, 2 * b :].reshape(3 * b, 2))
    return kl
