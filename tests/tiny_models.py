"""Tiny models shared by the core tests: deltas can be passed as arguments (the official code's
plumbing) or left to advlab's hooks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyVL(nn.Module):
    """Two modalities: word ids -> embedding (txt site: its output), region features -> img_proj
    (img site: its input). Padded tokens and regions are excluded by masked mean pooling, so
    they get exactly zero gradient, as in UNITER."""

    def __init__(self, vocab: int = 13, img_dim: int = 5, hidden: int = 8, classes: int = 3, seed: int = 0,
                 dropout: float = 0.0):
        super().__init__()
        torch.manual_seed(seed)
        self.word = nn.Embedding(vocab, hidden)
        self.img_proj = nn.Linear(img_dim, hidden)
        self.mix = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, ids, img, txt_mask, img_mask, delta_txt=None, delta_img=None):
        w = self.word(ids)
        if delta_txt is not None:
            w = w + delta_txt
        if delta_img is not None:
            img = img + delta_img
        v = self.img_proj(img)
        x = torch.cat([w, v], dim=1)
        m = torch.cat([txt_mask, img_mask], dim=1).to(x.dtype).unsqueeze(-1)
        h = self.drop(torch.tanh(self.mix(x)))
        pooled = (h * m).sum(1) / m.sum(1)
        return self.head(torch.tanh(pooled) + pooled)


def tiny_batch(dtype=torch.float64, batch: int = 4, length: int = 5, regions: int = 3, img_dim: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 13, (batch, length), generator=g)
    txt_mask = torch.ones(batch, length, dtype=torch.bool)
    txt_mask[0, 3:] = False
    txt_mask[2, 4:] = False
    ids = ids.masked_fill(~txt_mask, 0)
    img = torch.randn(batch, regions, img_dim, generator=g, dtype=dtype)
    img_mask = torch.ones(batch, regions, dtype=torch.bool)
    img_mask[1, 2:] = False
    img = img.masked_fill(~img_mask.unsqueeze(-1), 0.0)
    y = torch.randint(0, 3, (batch,), generator=g)
    return ids, img, txt_mask, img_mask, y


def plain_symkl(a, b):
    """Official symmetric KL: kl_div(logp_a, p_b) + kl_div(logp_b, p_a), summed over classes, mean over rows."""
    t1 = F.kl_div(F.log_softmax(a, -1), F.softmax(b, -1), reduction="none").sum(-1).mean()
    t2 = F.kl_div(F.log_softmax(b, -1), F.softmax(a, -1), reduction="none").sum(-1).mean()
    return t1 + t2


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


class TinySumVL(TinyVL):
    """TinyVL whose output sums over *every* position, padding included.

    Padded tokens and regions therefore reach the logits and get a nonzero gradient, so a
    loop that forgets the mask (in the ascent's norm, step or projection) gives different
    numbers: the masking of the exactness loops is compared, not just carried along.
    """

    def forward(self, ids, img, txt_mask, img_mask, delta_txt=None, delta_img=None):
        w = self.word(ids)
        if delta_txt is not None:
            w = w + delta_txt
        if delta_img is not None:
            img = img + delta_img
        x = torch.cat([w, self.img_proj(img)], dim=1)
        h = self.drop(torch.tanh(self.mix(x)))
        pooled = h.sum(1) / h.shape[1]  # no mask: padding counts
        return self.head(torch.tanh(pooled) + pooled)
