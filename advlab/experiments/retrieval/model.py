"""The retrieval model around UNITER-mini or LXMERT-mini, and region-grid pooling."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advlab._errors import AdvlabValueError
from advlab.experiments.retrieval.config import RetrievalConfig
from advlab.experiments.retrieval.data import RetrievalData
from advlab.sites import Site


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
    takes the `img_dim`-d region features (512 for CRAFT, 320 for EfficientNet-Lite0) and 7-d
    positions. LXMERT-mini: MiniLM's embeddings and
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
                pos_dim=7, attn_implementation=config.attention,
            ))
        else:
            from advlab.backbones.lxmert import LxmertConfig, LxmertModel

            self.net = LxmertModel(LxmertConfig(
                vocab_size=vocab_size, hidden_size=hidden_size, num_attention_heads=num_attention_heads,
                intermediate_size=intermediate_size, l_layers=config.layers, x_layers=config.x_layers,
                r_layers=config.r_layers, visual_feat_dim=img_dim, visual_pos_dim=4,
                attn_implementation=config.attention,
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


def build_model(
    backbone: str, config: RetrievalConfig, data: RetrievalData, *, seed: int, text_size: Mapping[str, int] | None = None
) -> RetrievalModel:
    """A fresh model for one run, seeded.

    The width of the image embedding's input is the width of the data's region features.

    Args:
        backbone: `"uniter"` or `"lxmert"`.
        config: Run settings.
        data: The data (vocabulary, feature size, MiniLM weights).
        seed: Seed of the fresh parameters.
        text_size: Overrides of `hidden_size`, `num_attention_heads`, `intermediate_size` (tiny tests).

    Returns:
        The model.

    Raises:
        AdvlabValueError: The data holds other named features than `config.features` (a record
            would otherwise carry the wrong label).
    """
    if data.image_features is not None and data.image_features != config.features:
        raise AdvlabValueError(
            f"Expected data prepared with the config's features {config.features!r}, but the data holds "
            f"{data.image_features!r} features; pass `prepare_data(..., features=config.features)`."
        )
    torch.manual_seed(seed)
    sizes = dict(text_size or {})
    return RetrievalModel(
        backbone, config, vocab_size=data.vocab_size, img_dim=int(data.train.features.shape[-1]),
        text_weights=data.text_weights, **sizes,
    )
