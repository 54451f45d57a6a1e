"""UNITER (Chen et al., ECCV 2020), the backbone VILLA was built on, in one file.

Read top to bottom: configuration, embeddings (text, image), the post-LN BERT encoder,
the pooler, `UniterModel`, the task heads (VQA, VE, NLVR2 in three variants, image-text
retrieval, VCR) and checkpoint loading. The task losses (`vqa_loss`, ...) live in
`advlab.backbones.losses`, shared with LXMERT, and are re-exported here.

Module and parameter names follow the official code (`ChenRocks/UNITER`, `model/model.py`,
`model/layer.py` and the task files) on purpose: the released `uniter-*.pt` / `villa-*.pt`
state dicts then load without a key map, only with the renames the official loaders do
(`bert` -> `uniter`, `gamma`/`beta` -> `weight`/`bias`). That is why names such as
`LayerNorm`, `img_layer_norm` and `attention.self.query` keep their original spelling.

Every model names its perturbation sites (`perturbation_sites()`), as VILLA places them:
text on the word-embedding lookup output (before position / type embeddings and the
embedding LayerNorm), image on the raw region feature entering `img_linear`.

Shape notation:
    - b: rows fed to UNITER (one text + one image each; NLVR2 paired uses 2 rows per
      example, VCR 4 rows per question)
    - lt: padded text length ([CLS] ... [SEP] included)
    - nr: padded number of regions
    - l: joint sequence length after `gather_index` (max over rows of text + regions)
    - h: hidden size; d: region feature size (2048 for the released models)
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advlab._errors import AdvlabTypeError, AdvlabValueError
from advlab.backbones._checkpoint import (
    LoadReport,
    check_shapes,
    config_json_beside,
    layer_count,
    majority_size,
    read_state_dict,
)
from advlab.backbones.losses import itm_loss, itm_rank_loss, nlvr2_loss, vcr_loss, ve_loss, vqa_loss, vqa_score
from advlab.sites import Site

__all__ = [
    "LoadReport",
    "UniterClassifierOutput",
    "UniterConfig",
    "UniterEncoder",
    "UniterForImageTextRetrieval",
    "UniterForNLVR2",
    "UniterForVCR",
    "UniterForVQA",
    "UniterForVisualEntailment",
    "UniterImageEmbeddings",
    "UniterModel",
    "UniterModelOutput",
    "UniterPooler",
    "UniterPreTrainedModel",
    "UniterRetrievalOutput",
    "UniterTextEmbeddings",
    "convert_uniter_state_dict",
    "itm_loss",
    "itm_rank_loss",
    "load_state_dict_file",
    "nlvr2_loss",
    "vcr_loss",
    "ve_loss",
    "vqa_loss",
    "vqa_score",
]

logger = logging.getLogger(__name__)

AttnImplementation = Literal["sdpa", "eager"]

# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UniterConfig:
    """Hyper-parameters of a UNITER backbone.

    The defaults are UNITER-base (`config/uniter-base.json`); use the presets.

    Args:
        vocab_size: Word-piece vocabulary (28996: bert-base-cased, not lower-cased).
        hidden_size: Hidden size h.
        num_hidden_layers: Transformer layers.
        num_attention_heads: Attention heads; must divide `hidden_size`.
        intermediate_size: Feed-forward inner size.
        hidden_dropout_prob: Dropout on embeddings and sub-layer outputs.
        attention_probs_dropout_prob: Dropout on attention probabilities.
        max_position_embeddings: Text positions.
        type_vocab_size: Token-type rows before any task growth (NLVR2 grows to 3, VCR to 4).
        initializer_range: Std of the normal init of Linear and Embedding weights.
        layer_norm_eps: Epsilon of every LayerNorm.
        img_dim: Region-feature size d (2048 for BUTD Faster R-CNN features).
        pos_dim: Box-feature size (7: x1, y1, x2, y2, w, h, w*h, all normalised).
        attn_implementation: `"sdpa"` computes attention with `torch.nn.functional.scaled_dot_product_attention`
            (a fused kernel; flash attention on GPU); `"eager"` with the explicit softmax of the official code.
            Both take the same weights and agree to float rounding; pick `"eager"` to reproduce results bit for bit.

    Examples:
        >>> UniterConfig.base().hidden_size, UniterConfig.large().num_hidden_layers
        (768, 24)
        >>> UniterConfig.tiny().attn_implementation, UniterConfig.tiny(attn_implementation="eager").attn_implementation
        ('sdpa', 'eager')
        >>> UniterConfig.tiny(num_hidden_layers=1).num_hidden_layers
        1
    """

    vocab_size: int = 28996  # bert-base-cased WordPiece (UNITER prepro default --toker bert-base-cased)
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12  # apex FusedLayerNorm eps in every UNITER LayerNorm
    img_dim: int = 2048  # IMG_DIM in utils/const.py
    pos_dim: int = 7  # 6 stored norm_bb values + area appended at load time
    attn_implementation: AttnImplementation = "sdpa"

    def __post_init__(self) -> None:
        if self.attn_implementation not in ("sdpa", "eager"):
            raise AdvlabValueError(
                f"Expected `UniterConfig.attn_implementation` to be 'sdpa' or 'eager', but got "
                f"{self.attn_implementation!r}."
            )
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "attn_implementation":
                continue
            if f.type in ("int", int):
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise AdvlabValueError(f"Expected `UniterConfig.{f.name}` to be an int >= 1, but got {value!r}.")
            else:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                    raise AdvlabValueError(f"Expected `UniterConfig.{f.name}` to be a float >= 0, but got {value!r}.")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if getattr(self, name) >= 1:
                raise AdvlabValueError(f"Expected `UniterConfig.{name}` to be < 1, but got {getattr(self, name)}.")
        if self.hidden_size % self.num_attention_heads:
            raise AdvlabValueError(
                f"Expected `UniterConfig.hidden_size` ({self.hidden_size}) to be a multiple of "
                f"`num_attention_heads` ({self.num_attention_heads})."
            )

    @classmethod
    def base(cls, **overrides: Any) -> UniterConfig:
        """UNITER-base: 768 hidden, 12 layers, 12 heads, 3072 FFN.

        Examples:
            >>> UniterConfig.base().num_attention_heads
            12
        """
        return replace(cls(), **overrides)

    @classmethod
    def large(cls, **overrides: Any) -> UniterConfig:
        """UNITER-large: 1024 hidden, 24 layers, 16 heads, 4096 FFN.

        Examples:
            >>> UniterConfig.large().intermediate_size
            4096
        """
        return replace(
            cls(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096), **overrides
        )

    @classmethod
    def tiny(cls, **overrides: Any) -> UniterConfig:
        """A tiny random-init configuration for tests and doctests (not a released model).

        Examples:
            >>> UniterConfig.tiny().hidden_size
            32
        """
        tiny = cls(
            vocab_size=99,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            img_dim=16,
        )
        return replace(tiny, **overrides)


# --------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------


class UniterTextEmbeddings(nn.Module):
    """Text embeddings: dropout(LayerNorm(word + position + token type)).

    The text perturbation site is the output of `word_embeddings`: VILLA adds its delta
    there, before position and type embeddings and before the LayerNorm.

    Args:
        config: The backbone configuration.

    Shape:
        input_ids: [b, lt]; position_ids: [1, lt] or [b, lt]; token_type_ids: [b, lt];
        inputs_embeds: [b, lt, h]. Output: [b, lt, h].

    Examples:
        >>> emb = UniterTextEmbeddings(UniterConfig.tiny())
        >>> emb(torch.tensor([[2, 5, 3]])).shape
        torch.Size([1, 3, 32])
    """

    def __init__(self, config: UniterConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        # "LayerNorm", not "layer_norm": the checkpoint name (TF-BERT heritage)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        input_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
    ) -> Tensor:
        """Embed the text; `inputs_embeds` replaces the word-embedding lookup (and its site)."""
        if inputs_embeds is None:
            if input_ids is None:
                raise AdvlabValueError("Expected `input_ids` or `inputs_embeds`, but got neither.")
            inputs_embeds = self.word_embeddings(input_ids)  # [b, lt, h]; the "txt" site
        b, lt = inputs_embeds.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(lt, device=inputs_embeds.device).unsqueeze(0)  # [1, lt]
        if token_type_ids is None:
            token_type_ids = torch.zeros(b, lt, dtype=torch.long, device=inputs_embeds.device)
        embeddings = inputs_embeds + self.position_embeddings(position_ids) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(embeddings))


class UniterImageEmbeddings(nn.Module):
    """Region embeddings: dropout(LN(LN_img(img_linear(f)) + LN_pos(pos_linear(p)) + type)).

    Regions get no sequence-position embedding; their type embedding comes from the text
    module's `token_type_embeddings` (type id 1 by default) and is passed in.
    `mask_embedding` is used only by masked-region pre-training: row 1 is added to masked
    regions (whose features are zeroed by the data); row 0 contributes nothing.

    The image perturbation site is the *input* of `img_linear`: the raw d-dim region
    feature (after the optional mask embedding), as in VILLA.

    Args:
        config: The backbone configuration.

    Shape:
        img_feat: [b, nr, d]; img_pos_feat: [b, nr, 7]; type_embeddings: [b, nr, h];
        img_masks: [b, nr] bool. Output: [b, nr, h].

    Examples:
        >>> cfg = UniterConfig.tiny()
        >>> emb = UniterImageEmbeddings(cfg)
        >>> emb(torch.zeros(2, 3, cfg.img_dim), torch.zeros(2, 3, 7), torch.zeros(2, 3, 32)).shape
        torch.Size([2, 3, 32])
    """

    def __init__(self, config: UniterConfig) -> None:
        super().__init__()
        self.img_linear = nn.Linear(config.img_dim, config.hidden_size)
        # named img_layer_norm / pos_layer_norm in the checkpoints; note that the official
        # weight-decay filter (names containing "LayerNorm") therefore decays them
        self.img_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pos_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pos_linear = nn.Linear(config.pos_dim, config.hidden_size)
        self.mask_embedding = nn.Embedding(2, config.img_dim, padding_idx=0)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        img_feat: Tensor,
        img_pos_feat: Tensor,
        type_embeddings: Tensor,
        img_masks: Tensor | None = None,
    ) -> Tensor:
        """Embed regions; see the class docstring."""
        if img_masks is not None:
            # the official code zeroes row 0 in place on every call; multiplying by the
            # mask gives the same output without mutating a parameter in forward
            keep = img_masks.unsqueeze(-1).to(img_feat.dtype)  # [b, nr, 1]
            img_feat = img_feat + self.mask_embedding(img_masks.long()) * keep
        transformed_img = self.img_layer_norm(self.img_linear(img_feat))  # the "img" site is this input
        transformed_pos = self.pos_layer_norm(self.pos_linear(img_pos_feat))
        return self.dropout(self.LayerNorm(transformed_img + transformed_pos + type_embeddings))


# --------------------------------------------------------------------------------------
# Encoder (post-LN BERT) and pooler
# --------------------------------------------------------------------------------------


class _SelfAttention(nn.Module):
    def __init__(self, config: UniterConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self.attn_implementation = config.attn_implementation

    def _split(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # [b, heads, n, hd]

    def forward(self, hidden: Tensor, extended_mask: Tensor) -> Tensor:
        q, k, v = self._split(self.query(hidden)), self._split(self.key(hidden)), self._split(self.value(hidden))
        if self.attn_implementation == "sdpa":
            # same additive mask (0 or -10000) and scale 1/sqrt(hd); dropout on the probabilities while training
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=extended_mask.to(q.dtype), dropout_p=self.dropout.p if self.training else 0.0
            )  # [b, heads, l, hd]
        else:
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # [b, heads, l, l]
            probs = self.dropout(torch.softmax(scores + extended_mask, dim=-1))
            context = probs @ v  # [b, heads, l, hd]
        b, _, n, _ = context.shape
        return context.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)  # [b, l, h]


class _Output(nn.Module):
    """LayerNorm(dropout(dense(x)) + residual): BERT's SelfOutput (x of width h) and Output (x of the FFN width)."""

    def __init__(self, config: UniterConfig, in_features: int) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class _Attention(nn.Module):
    def __init__(self, config: UniterConfig) -> None:
        super().__init__()
        self.self = _SelfAttention(config)
        self.output = _Output(config, config.hidden_size)

    def forward(self, hidden: Tensor, extended_mask: Tensor) -> Tensor:
        return self.output(self.self(hidden, extended_mask), hidden)


class _Intermediate(nn.Module):
    def __init__(self, config: UniterConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, hidden: Tensor) -> Tensor:
        return F.gelu(self.dense(hidden))  # the exact erf form, as in UNITER's layer.py and LXMERT's modeling.py


class _Layer(nn.Module):
    def __init__(self, config: UniterConfig) -> None:
        super().__init__()
        self.attention = _Attention(config)
        self.intermediate = _Intermediate(config)
        self.output = _Output(config, config.intermediate_size)

    def forward(self, hidden: Tensor, extended_mask: Tensor) -> Tensor:
        attended = self.attention(hidden, extended_mask)
        return self.output(self.intermediate(attended), attended)


class UniterEncoder(nn.Module):
    """A stack of post-LN BERT layers (`encoder.layer.{i}` in the checkpoints).

    Args:
        config: The backbone configuration.

    Shape:
        hidden: [b, l, h]; attention_mask: [b, l] of 0/1 (a key mask). Output: a list of
        [b, l, h], one per layer (only the last when `output_all_encoded_layers=False`).

    Examples:
        >>> enc = UniterEncoder(UniterConfig.tiny())
        >>> enc(torch.randn(2, 5, 32), torch.ones(2, 5))[-1].shape
        torch.Size([2, 5, 32])
    """

    def __init__(self, config: UniterConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(config) for _ in range(config.num_hidden_layers))

    def forward(self, hidden: Tensor, attention_mask: Tensor, output_all_encoded_layers: bool = False) -> list[Tensor]:
        """Run every layer; masked keys get -10000 added to their scores (UNITER's convention)."""
        extended = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * -10000.0  # [b, 1, 1, l]
        layers: list[Tensor] = []
        for layer in self.layer:
            hidden = layer(hidden, extended)
            if output_all_encoded_layers:
                layers.append(hidden)
        return layers if output_all_encoded_layers else [hidden]


class UniterPooler(nn.Module):
    """tanh(Linear(h[:, 0])): the [CLS] position.

    Args:
        config: The backbone configuration.

    Shape:
        hidden: [b, l, h]. Output: [b, h].

    Examples:
        >>> UniterPooler(UniterConfig.tiny())(torch.randn(2, 5, 32)).shape
        torch.Size([2, 32])
    """

    def __init__(self, config: UniterConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: Tensor) -> Tensor:
        """Pool the first position."""
        return torch.tanh(self.dense(hidden[:, 0]))


# --------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------


@dataclass
class UniterModelOutput:
    """What `UniterModel` returns.

    Attributes:
        last_hidden_state: [b, l, h], the last layer.
        pooler_output: [b, h], tanh(Linear) of position 0 ([CLS] when text is present).
        hidden_states: One [b, l, h] per layer with `output_all_encoded_layers=True`, else None.

    Examples:
        >>> out = UniterModelOutput(torch.zeros(1, 2, 4), torch.zeros(1, 4))
        >>> out.hidden_states is None
        True
    """

    last_hidden_state: Tensor
    pooler_output: Tensor
    hidden_states: tuple[Tensor, ...] | None = None


@dataclass
class UniterClassifierOutput:
    """What the classification heads (VQA, VE, NLVR2, VCR) return.

    Attributes:
        logits: [b, num_classes] scores (NLVR2 paired variants: [b / 2, 2]; VCR: [b, 2] per row).
            The distribution VILLA's KL term acts on.
        pooled_output: The representation the classifier read ([b, h] or [b / 2, 2h]).

    Examples:
        >>> UniterClassifierOutput(torch.zeros(2, 3)).logits.shape
        torch.Size([2, 3])
    """

    logits: Tensor
    pooled_output: Tensor | None = None


@dataclass
class UniterRetrievalOutput:
    """What `UniterForImageTextRetrieval` returns.

    Attributes:
        logits: [b, 1] rank scores (`rank_output`); sigmoid of them is the matching score.
        itm_logits: [b, 2] image-text matching logits (`itm_output`, 1 = match).

    Examples:
        >>> UniterRetrievalOutput(torch.zeros(2, 1), torch.zeros(2, 2)).itm_logits.shape
        torch.Size([2, 2])
    """

    logits: Tensor
    itm_logits: Tensor


# --------------------------------------------------------------------------------------
# Base class: init, perturbation sites, loading
# --------------------------------------------------------------------------------------


# pre-training heads of UniterForPretraining (MLM, MRFR, MRC, ITM): in the released files,
# not in any fine-tuning model
_PRETRAIN_PREFIXES = ("cls.", "feat_regress.", "region_classifier.", "itm_output.")
_TXT_TYPES = "uniter.embeddings.token_type_embeddings.weight"
_TXT_WORDS = "uniter.embeddings.word_embeddings.weight"


def load_state_dict_file(path: str | os.PathLike[str], *, expected_sha256: str | None = None) -> dict[str, Tensor]:
    """Read a flat state dict from a `.pt` / `.bin` (torch pickle) or `.safetensors` file, or a model folder.

    Pickles are read with `weights_only=True`. A folder must hold `model.safetensors` or
    `pytorch_model.bin`; a `{"state_dict": ...}` or `{"model": ...}` wrapper is unwrapped. A file that
    torch or safetensors cannot parse (truncated, not a checkpoint) raises an `AdvlabValueError` naming
    it. Neither format stores a checksum of the tensor bytes, so a flipped byte inside a tensor is only
    caught when `expected_sha256` is given.

    Args:
        path: The checkpoint file or folder.
        expected_sha256: The file's SHA-256 (64 hex digits); if given, checked before reading.

    Returns:
        Key to tensor, on CPU.

    Raises:
        FileNotFoundError: `path` does not exist (the error is also an `AdvlabValueError`).
        AdvlabValueError: The file cannot be read, holds no flat dict of tensors, or has another SHA-256.

    Examples:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "w.pt"
        >>> torch.save({"a": torch.ones(2)}, p)
        >>> load_state_dict_file(p)
        {'a': tensor([1., 1.])}
    """
    return read_state_dict(path, expected_sha256=expected_sha256)[0]


def convert_uniter_state_dict(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], int]:
    """Apply the official loaders' renames: `bert` -> `uniter`, `gamma`/`beta` -> `weight`/`bias`.

    The first is the training scripts' substring replacement (so raw BERT keys
    `bert.encoder...` become `uniter.encoder...`); the second maps TF-BERT LayerNorm names.

    Args:
        state_dict: Keys as stored in the file.

    Returns:
        The renamed dict and the number of keys changed.

    Examples:
        >>> convert_uniter_state_dict({"bert.embeddings.LayerNorm.gamma": torch.ones(1)})[0].keys()
        dict_keys(['uniter.embeddings.LayerNorm.weight'])
    """
    out: dict[str, Tensor] = {}
    renamed = 0
    for key, value in state_dict.items():
        new = key.replace("bert", "uniter")
        new = re.sub(r"(^|\.)gamma$", r"\1weight", new)
        new = re.sub(r"(^|\.)beta$", r"\1bias", new)
        renamed += new != key
        out[new] = value
    return out, renamed


def _resize_rows_(embedding: nn.Embedding, rows: int) -> None:
    """Resize an embedding table in place, keeping the module object (sites hold it)."""
    old = embedding.weight.data
    new = old.new_empty(rows, old.shape[1]).normal_(0.0, 0.02)
    new[: min(rows, old.shape[0])] = old[: min(rows, old.shape[0])]
    embedding.weight = nn.Parameter(new)
    embedding.num_embeddings = rows


# the released sizes: the number of heads is not in the weights, so only these hidden sizes identify it
_RELEASED: dict[int, tuple[str, UniterConfig]] = {
    768: ("UNITER-base", UniterConfig.base()),
    1024: ("UNITER-large", UniterConfig.large()),
}
_LAYER = "uniter.encoder.layer"


def _layer_suffixes() -> list[str]:
    """The keys one encoder layer holds, relative to `uniter.encoder.layer.N.`."""
    return list(_Layer(UniterConfig.tiny(num_hidden_layers=1)).state_dict())


def _infer_config(
    state: Mapping[str, Tensor],
    extra_words: int,
    source: str = "the state dict",
    declared: Mapping[str, Any] | None = None,
) -> UniterConfig:
    """The configuration of a UNITER state dict, or an error saying why it cannot be told for sure.

    `declared` is a `config.json` beside the checkpoint (UNITER's `config/uniter-*.json` keys, BERT's names): its
    head count is used, and its sizes must agree with the tensors.
    """
    needed = (_TXT_WORDS, "uniter.embeddings.position_embeddings.weight", "uniter.img_embeddings.img_linear.weight")
    absent = [k for k in needed if k not in state]
    if absent:
        raise AdvlabValueError(
            f"Expected a UNITER state dict in {source} to infer the configuration from, but it lacks {absent}; "
            "pass `config=` explicitly."
        )
    layers = layer_count(state, _LAYER, _layer_suffixes(), source=source)
    per_layer = [f"{_LAYER}.{i}." for i in range(layers)]
    hidden = majority_size(
        state,
        [_TXT_WORDS, "uniter.embeddings.position_embeddings.weight"]
        + [p + "attention.output.LayerNorm.weight" for p in per_layer]
        + [p + "output.LayerNorm.weight" for p in per_layer],
        -1,
        what="hidden size",
        source=source,
    )
    ffn = majority_size(
        state,
        [p + "intermediate.dense.weight" for p in per_layer] + [p + "intermediate.dense.bias" for p in per_layer],
        0,
        what="intermediate size",
        source=source,
    )
    majority_size(state, [p + "output.dense.weight" for p in per_layer], 1, what="intermediate size", source=source)
    vocab = state[_TXT_WORDS].shape[0]
    if extra_words and _TXT_TYPES in state and state[_TXT_TYPES].shape[0] >= 4:  # an already-grown VCR checkpoint
        vocab -= extra_words
    sizes = {
        "vocab_size": vocab,
        "max_position_embeddings": state["uniter.embeddings.position_embeddings.weight"].shape[0],
        "img_dim": state["uniter.img_embeddings.img_linear.weight"].shape[1],
    }
    found = f"num_hidden_layers={layers}, intermediate_size={ffn}, " + ", ".join(f"{k}={v}" for k, v in sizes.items())
    heads = (declared or {}).get("num_attention_heads")
    if isinstance(heads, int) and not isinstance(heads, bool) and heads > 0:
        shapes = {"hidden_size": hidden, "num_hidden_layers": layers, "intermediate_size": ffn, **sizes}
        clash = [
            f"{k} {declared[k]} in config.json, {v} in the tensors"
            for k, v in shapes.items()
            if declared and k in declared and declared[k] != v and k != "vocab_size"
        ]
        if clash:
            raise AdvlabValueError(
                f"Expected the config.json beside {source} to describe its tensors, but {'; '.join(clash)}. "
                "Pass `config=`."
            )
        known = {f.name for f in fields(UniterConfig)}
        rest = {k: v for k, v in declared.items() if k in known and k not in shapes}  # dropout, eps, ...
        return UniterConfig(**{**rest, **shapes, "num_attention_heads": heads})
    if hidden not in _RELEASED:
        raise AdvlabValueError(
            f"Cannot infer the UNITER configuration from {source}: the number of attention heads is not stored in "
            f"the weights (nor in a config.json beside them), and hidden size {hidden} is not that of a released model "
            "(768: UNITER-base, 12 heads; "
            f"1024: UNITER-large, 16 heads). Pass `config=UniterConfig(hidden_size={hidden}, {found}, "
            "num_attention_heads=...)` with the model's number of attention heads."
        )
    name, released = _RELEASED[hidden]
    if (layers, ffn) != (released.num_hidden_layers, released.intermediate_size):
        absent_layers = [f"{_LAYER}.{i}.*" for i in range(layers, released.num_hidden_layers)]
        raise AdvlabValueError(
            f"Cannot infer the UNITER configuration from {source}: hidden size {hidden} is {name}, which has "
            f"{released.num_hidden_layers} layers and intermediate size {released.intermediate_size}, but the "
            f"checkpoint has {layers} layers and intermediate size {ffn}"
            + (f" (missing: {absent_layers[:6]}{' ...' if len(absent_layers) > 6 else ''})" if absent_layers else "")
            + ". If the file is complete and the model really has this shape, pass `config=UniterConfig("
            f"hidden_size={hidden}, {found}, num_attention_heads=...)` with its number of attention heads."
        )
    logger.info(
        "Inferred the configuration of %s from its shapes: %s with %d attention heads (the head count is not stored "
        "in the weights; pass `config=` for another one).",
        source,
        name,
        released.num_attention_heads,
    )
    return replace(released, **sizes)


class UniterPreTrainedModel(nn.Module):
    """Shared by `UniterModel` and the heads: weight init, sites and `from_pretrained`.

    Subclasses hold the backbone as `self.uniter` (the checkpoint prefix), except
    `UniterModel`, which *is* the backbone and loads keys with the `uniter.` prefix stripped.

    Examples:
        >>> issubclass(UniterForVQA, UniterPreTrainedModel)
        True
    """

    config: UniterConfig
    # task growth of the text embedding tables after loading: (type rows, extra word rows)
    _type_rows: ClassVar[int] = 2
    _extra_words: ClassVar[int] = 0

    def _init_weights(self, module: nn.Module) -> None:
        # UNITER's init_weights: N(0, 0.02) overwrites Embedding padding rows too
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()
        if isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()

    @property
    def backbone(self) -> UniterModel:
        """The `UniterModel` inside (the model itself for `UniterModel`)."""
        return self if isinstance(self, UniterModel) else self.uniter  # type: ignore[return-value]

    @staticmethod
    def position_features(boxes: Tensor) -> Tensor:
        """UNITER's 7-d region position input `(x1, y1, x2, y2, w, h, w * h)`, normalised by the image size.

        From boxes `(x1, y1, x2, y2)` the width and height are computed; from the 6 values the
        released image DBs store (`norm_bb`: `x1, y1, x2, y2, w, h`) only the area is appended, as
        the official `_get_img_feat` does.

        Args:
            boxes: Normalised boxes, 4 or 6 values each.

        Returns:
            The position features (`img_pos_feat`).

        Raises:
            AdvlabValueError: The last dimension is neither 4 nor 6.

        Shape:
            boxes: [..., 4] or [..., 6]; result: [..., 7].

        Examples:
            >>> UniterModel.position_features(torch.tensor([[0.0, 0.5, 0.5, 1.0]]))
            tensor([[0.0000, 0.5000, 0.5000, 1.0000, 0.5000, 0.5000, 0.2500]])
        """
        if not isinstance(boxes, Tensor):
            raise AdvlabTypeError(f"Expected `boxes` to be a Tensor, but got {type(boxes).__name__}.")
        if boxes.dim() == 0 or boxes.shape[-1] not in (4, 6):
            raise AdvlabValueError(f"Expected `boxes` of shape [..., 4] or [..., 6], but got {tuple(boxes.shape)}.")
        if boxes.shape[-1] == 6:
            return torch.cat([boxes, boxes[..., 4:5] * boxes[..., 5:6]], dim=-1)
        w = boxes[..., 2] - boxes[..., 0]
        h = boxes[..., 3] - boxes[..., 1]
        return torch.cat([boxes, w[..., None], h[..., None], (w * h)[..., None]], dim=-1)

    def perturbation_sites(self) -> dict[str, Site]:
        """VILLA's sites: `txt` = word-embedding output, `img` = input of `img_linear`.

        Examples:
            >>> sites = UniterForVQA(UniterConfig.tiny()).perturbation_sites()
            >>> sorted(sites), sites["img"].where
            (['img', 'txt'], 'input')
        """
        backbone = self.backbone
        return {
            "txt": Site(backbone.embeddings.word_embeddings),
            "img": Site(backbone.img_embeddings.img_linear, where="input"),
        }

    def _grow_embeddings(self) -> list[str]:
        """Grow the type / word tables to what the task needs; names what was grown."""
        grown = []
        emb = self.backbone.embeddings
        if emb.token_type_embeddings.num_embeddings < self._type_rows:
            self.init_type_embedding()  # type: ignore[attr-defined]
            grown.append(_TXT_TYPES)
        if self._extra_words and emb.word_embeddings.num_embeddings < self.config.vocab_size + self._extra_words:
            self.init_word_embedding(self._extra_words)  # type: ignore[attr-defined]
            grown.append(_TXT_WORDS)
        return grown

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str | os.PathLike[str] | Mapping[str, Tensor],
        config: UniterConfig | None = None,
        *,
        strict: bool = True,
        output_loading_info: bool = False,
        expected_sha256: str | None = None,
        **head_kwargs: Any,
    ) -> Any:
        """Build the model and load a UNITER / VILLA state dict (a file or a dict).

        Keys are renamed as the official loaders do (`bert` -> `uniter`, `gamma`/`beta` ->
        `weight`/`bias`). Known pre-training head keys (`cls.*`, `feat_regress.*`,
        `region_classifier.*`, `itm_output.*` when the model has no ITM head) are dropped and
        reported; any other unexpected key raises. Missing backbone keys raise (with
        `strict=False` they are reported and stay freshly initialised); missing head keys
        are the fresh task head and are reported. Type / word tables smaller than the task
        needs (NLVR2: 3 type rows; VCR: 4 type rows, 81 extra words) are loaded, then grown
        as the official `init_type_embedding` / `init_word_embedding` do.

        Args:
            checkpoint: A `.pt` / `.bin` / `.safetensors` file, a folder holding `model.safetensors`
                or `pytorch_model.bin`, or a state dict.
            config: The backbone configuration. None infers it, but only where the checkpoint
                identifies it for sure: the number of attention heads is not stored in the weights,
                so the hidden size must be a released one (768: UNITER-base, 12 heads, 12 layers;
                1024: UNITER-large, 16 heads, 24 layers) and the layers must be that model's, each
                complete, numbered from 0. A `config.json` beside the file (or in the folder) with
                `num_attention_heads` (UNITER's `config/uniter-*.json` keys) is used instead, if its
                sizes agree with the tensors. Anything else raises and asks for `config=`.
            strict: Raise on missing backbone keys.
            output_loading_info: Also return a `LoadReport`.
            expected_sha256: The checkpoint file's SHA-256; if given, checked before reading (the
                formats carry no checksum of their own, so only this catches a flipped byte).
            **head_kwargs: Passed to the model constructor (`num_answers`, `variant`, ...).

        Returns:
            The model in eval mode (as transformers' `from_pretrained`; call `.train()` to
            fine-tune); with `output_loading_info`, `(model, LoadReport)`.

        Examples:
            >>> cfg = UniterConfig.tiny()
            >>> state = {"bert." + k[len("uniter."):]: v for k, v in UniterForVQA(cfg).state_dict().items()
            ...          if k.startswith("uniter.")}
            >>> model, report = UniterForVQA.from_pretrained(state, cfg, num_answers=5, output_loading_info=True)
            >>> len(report.fresh), report.fresh[0], report.renamed > 0
            (6, 'vqa_output.0.bias', True)
        """
        source = "the state dict"
        if isinstance(checkpoint, (str, os.PathLike)):
            raw, file = read_state_dict(checkpoint, expected_sha256=expected_sha256, argument="checkpoint")
            source = repr(file)
        elif isinstance(checkpoint, Mapping):
            if expected_sha256 is not None:
                raise AdvlabValueError("Expected `expected_sha256` only with a checkpoint file, but got a state dict.")
            raw = dict(checkpoint)
        else:
            raise AdvlabTypeError(
                f"Expected `checkpoint` to be a path or a state dict, but got {type(checkpoint).__name__}."
            )
        state, renamed = convert_uniter_state_dict(raw)
        if not any(k.startswith("uniter.") for k in state) and "embeddings.word_embeddings.weight" in state:
            state = {f"uniter.{k}": v for k, v in state.items()}  # a bare `UniterModel.state_dict()`
        if config is None:
            config = _infer_config(state, cls._extra_words, source, config_json_beside(checkpoint))
        elif not isinstance(config, UniterConfig):
            raise AdvlabTypeError(f"Expected `config` to be a UniterConfig or None, but got {type(config).__name__}.")
        model = cls(config, **head_kwargs)
        report = LoadReport(renamed=renamed)

        own = model.state_dict()
        prefix = "uniter." if cls is UniterModel else ""
        own = {prefix + k: v for k, v in own.items()}
        for key in list(state):
            if key not in own and key.startswith(_PRETRAIN_PREFIXES):
                report.dropped.append(key)
                del state[key]
        unexpected = sorted(set(state) - set(own))
        if unexpected:
            raise AdvlabValueError(
                f"Unexpected keys in {source} for {cls.__name__}: {unexpected[:20]}"
                + (f" (+{len(unexpected) - 20} more)" if len(unexpected) > 20 else "")
                + ". Expected UNITER backbone keys, known pre-training heads, or this model's head."
            )
        missing = sorted(set(own) - set(state))
        missing_backbone = [k for k in missing if k.startswith("uniter.")]
        if missing_backbone and strict:
            raise AdvlabValueError(
                f"Missing backbone keys in {source} for {cls.__name__}: {missing_backbone[:20]}"
                + (f" (+{len(missing_backbone) - 20} more)" if len(missing_backbone) > 20 else "")
                + ". Pass strict=False to initialise them freshly."
            )
        report.fresh = missing
        # tables the task grows: load at the checkpoint's size, grow afterwards
        emb = model.backbone.embeddings
        for key, table in ((_TXT_TYPES, emb.token_type_embeddings), (_TXT_WORDS, emb.word_embeddings)):
            if (
                key in state
                and state[key].shape[0] < table.num_embeddings
                and state[key].shape[1:] == table.weight.shape[1:]
            ):
                _resize_rows_(table, state[key].shape[0])
        own = {prefix + k: v for k, v in model.state_dict().items()}
        check_shapes(state, own, source=source, model=f"{cls.__name__}({config})")
        to_load = {k[len(prefix) :]: v for k, v in state.items()}
        model.load_state_dict(to_load, strict=False)
        report.grown = model._grow_embeddings()
        report.log(logger, cls.__name__, source)
        model.eval()  # as transformers' from_pretrained: call .train() to fine-tune
        return (model, report) if output_loading_info else model


# --------------------------------------------------------------------------------------
# The backbone
# --------------------------------------------------------------------------------------


class UniterModel(UniterPreTrainedModel):
    """The UNITER backbone: text + region embeddings, joined by `gather_index`, a BERT encoder.

    With both modalities, text [b, lt, h] and regions [b, nr, h] are concatenated and
    gathered row by row with `gather_index` into `[real text, real regions, junk]`; the
    junk is masked by `attention_mask` (see `advlab.data.uniter_db.get_gather_index`).
    Without `gather_index` they are simply concatenated (then `attention_mask` has
    lt + nr columns). Either modality may be omitted (text-only / image-only paths).

    Args:
        config: The backbone configuration.

    Shape:
        input_ids: [b, lt]; position_ids: [1, lt] or [b, lt]; img_feat: [b, nr, d];
        img_pos_feat: [b, nr, 7]; attention_mask: [b, l]; gather_index: [b, l];
        img_masks: [b, nr] bool; txt_type_ids: [b, lt]; img_type_ids: [b, nr];
        inputs_embeds: [b, lt, h].

    Examples:
        >>> cfg = UniterConfig.tiny()
        >>> model = UniterModel(cfg)
        >>> out = model(input_ids=torch.tensor([[2, 7, 3]]), img_feat=torch.randn(1, 4, cfg.img_dim),
        ...             img_pos_feat=torch.rand(1, 4, 7), attention_mask=torch.ones(1, 7))
        >>> out.last_hidden_state.shape, out.pooler_output.shape
        (torch.Size([1, 7, 32]), torch.Size([1, 32]))
    """

    def __init__(self, config: UniterConfig) -> None:
        super().__init__()
        if not isinstance(config, UniterConfig):
            raise AdvlabTypeError(f"Expected `config` to be a UniterConfig, but got {type(config).__name__}.")
        self.config = config
        self.embeddings = UniterTextEmbeddings(config)
        self.img_embeddings = UniterImageEmbeddings(config)
        self.encoder = UniterEncoder(config)
        self.pooler = UniterPooler(config)
        self.apply(self._init_weights)

    def forward(
        self,
        input_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        img_feat: Tensor | None = None,
        img_pos_feat: Tensor | None = None,
        attention_mask: Tensor | None = None,
        gather_index: Tensor | None = None,
        img_masks: Tensor | None = None,
        txt_type_ids: Tensor | None = None,
        img_type_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        output_all_encoded_layers: bool = False,
    ) -> UniterModelOutput:
        """Encode text and/or regions; see the class docstring for shapes."""
        has_txt = input_ids is not None or inputs_embeds is not None
        has_img = img_feat is not None
        if not has_txt and not has_img:
            raise AdvlabValueError("Expected `input_ids` / `inputs_embeds` and/or `img_feat`, but got none of them.")
        parts = []
        if has_txt:
            parts.append(self.embeddings(input_ids, position_ids, txt_type_ids, inputs_embeds))  # [b, lt, h]
        if has_img:
            if img_pos_feat is None:
                raise AdvlabValueError("Expected `img_pos_feat` [b, nr, 7] with `img_feat`, but got None.")
            if img_feat.shape[:2] != img_pos_feat.shape[:2] or img_feat.shape[-1] != self.config.img_dim:
                raise AdvlabValueError(
                    f"Expected `img_feat` [b, nr, {self.config.img_dim}] and `img_pos_feat` [b, nr, "
                    f"{self.config.pos_dim}], but got {tuple(img_feat.shape)} and {tuple(img_pos_feat.shape)}."
                )
            if img_type_ids is None:
                img_type_ids = torch.ones(img_feat.shape[:2], dtype=torch.long, device=img_feat.device)
            type_emb = self.embeddings.token_type_embeddings(img_type_ids)  # shared table, type 1 by default
            parts.append(self.img_embeddings(img_feat, img_pos_feat, type_emb, img_masks))  # [b, nr, h]
        embedded = torch.cat(parts, dim=1) if len(parts) == 2 else parts[0]  # [b, lt + nr, h]
        if gather_index is not None and len(parts) == 2:
            index = gather_index.unsqueeze(-1).expand(-1, -1, embedded.shape[-1])  # [b, l, h]
            embedded = torch.gather(embedded, 1, index)
        if attention_mask is None:
            attention_mask = torch.ones(embedded.shape[:2], dtype=embedded.dtype, device=embedded.device)
        if attention_mask.shape != embedded.shape[:2]:
            raise AdvlabValueError(
                f"Expected `attention_mask` to have shape {tuple(embedded.shape[:2])} (rows, joint length), "
                f"but got {tuple(attention_mask.shape)}."
            )
        layers = self.encoder(embedded, attention_mask, output_all_encoded_layers)
        last = layers[-1]
        return UniterModelOutput(
            last_hidden_state=last,
            pooler_output=self.pooler(last),
            hidden_states=tuple(layers) if output_all_encoded_layers else None,
        )


# --------------------------------------------------------------------------------------
# Task heads
# --------------------------------------------------------------------------------------

_BACKBONE_ARGS = (
    "input_ids",
    "position_ids",
    "img_feat",
    "img_pos_feat",
    "attention_mask",
    "gather_index",
    "img_masks",
    "txt_type_ids",
    "img_type_ids",
    "inputs_embeds",
)


class UniterForVQA(UniterPreTrainedModel):
    """VQA head (`model/vqa.py`): pooled [CLS] -> Linear(h, 2h), GELU, LayerNorm, Linear(2h, answers).

    Takes the backbone's arguments (`UniterModel.forward`) and returns logits; the
    loss is `vqa_loss` (BCE with logits on soft targets, summed over answers).

    Args:
        config: The backbone configuration.
        num_answers: Answer vocabulary (3129 for UNITER's `ans2label.json`).

    Shape:
        Output logits: [b, num_answers].

    Examples:
        >>> cfg = UniterConfig.tiny()
        >>> model = UniterForVQA(cfg, num_answers=10)
        >>> model(input_ids=torch.tensor([[2, 7, 3]]), img_feat=torch.randn(1, 4, cfg.img_dim),
        ...       img_pos_feat=torch.rand(1, 4, 7)).logits.shape
        torch.Size([1, 10])
    """

    def __init__(self, config: UniterConfig, num_answers: int = 3129) -> None:
        super().__init__()
        if isinstance(num_answers, bool) or not isinstance(num_answers, int) or num_answers < 1:
            raise AdvlabValueError(f"Expected `num_answers` to be an int >= 1, but got {num_answers!r}.")
        self.config = config
        self.uniter = UniterModel(config)
        h = config.hidden_size
        self.vqa_output = nn.Sequential(
            nn.Linear(h, 2 * h),
            nn.GELU(),
            nn.LayerNorm(2 * h, eps=config.layer_norm_eps),
            nn.Linear(2 * h, num_answers),
        )
        self.apply(self._init_weights)

    def forward(
        self,
        input_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        img_feat: Tensor | None = None,
        img_pos_feat: Tensor | None = None,
        attention_mask: Tensor | None = None,
        gather_index: Tensor | None = None,
        img_masks: Tensor | None = None,
        txt_type_ids: Tensor | None = None,
        img_type_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        **unexpected: Any,
    ) -> UniterClassifierOutput:
        """Score every answer; arguments as `UniterModel.forward` (any other keyword raises)."""
        _refuse_unexpected(unexpected, type(self))
        pooled = self.uniter(
            input_ids,
            position_ids,
            img_feat,
            img_pos_feat,
            attention_mask,
            gather_index,
            img_masks,
            txt_type_ids,
            img_type_ids,
            inputs_embeds,
        ).pooler_output
        return UniterClassifierOutput(logits=self.vqa_output(pooled), pooled_output=pooled)


class UniterForVisualEntailment(UniterForVQA):
    """SNLI-VE head: the VQA head with 3 classes (contradiction 0, entailment 1, neutral 2).

    Loss: `ve_loss` (the VQA BCE on one-hot targets, as the official scripts).

    Args:
        config: The backbone configuration.
        num_answers: Classes; 3.

    Shape:
        Output logits: [b, 3].

    Examples:
        >>> cfg = UniterConfig.tiny()
        >>> UniterForVisualEntailment(cfg)(input_ids=torch.tensor([[2, 3]]), img_feat=torch.randn(1, 2, cfg.img_dim),
        ...                                img_pos_feat=torch.rand(1, 2, 7)).logits.shape
        torch.Size([1, 3])
    """

    def __init__(self, config: UniterConfig, num_answers: int = 3) -> None:
        super().__init__(config, num_answers=num_answers)


class _AttentionPool(nn.Module):
    """Masked attention pooling of the NLVR2 paired-attn head (`attn_pool.fc.0` in checkpoints)."""

    def __init__(self, hidden_size: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(hidden_size, 1), nn.ReLU(), nn.Dropout(dropout))

    def forward(self, hidden: Tensor, pad_mask: Tensor) -> Tensor:
        score = self.fc(hidden).squeeze(-1)  # [b, l]
        score = score.masked_fill(pad_mask, -1e4)
        weight = torch.softmax(score, dim=-1)
        return (weight.unsqueeze(1) @ hidden).squeeze(1)  # [b, h]


Nlvr2Variant = Literal["paired", "triplet", "paired-attn"]


class UniterForNLVR2(UniterPreTrainedModel):
    """NLVR2 heads (`model/nlvr2.py`): `paired`, `triplet` and `paired-attn` (VILLA's).

    - `paired`: 2 rows per example (sentence + img0, sentence + img1); the two pooled
      vectors are concatenated -> `nlvr2_output` Linear(2h, 2).
    - `triplet`: one row holding both images (img type ids 1 and 2) -> Linear(h, 2).
    - `paired-attn`: 2 rows per example; bidirectional cross-attention between the two
      rows' sequences (`attn1`, `attn2`), `fc` over [attended; own], masked attention
      pooling, concatenation -> Linear(2h, 2).

    With `use_img_type`, the type table grows to 3 rows (row 2 = copy of row 1) and, in
    the paired variants, the img0 row's regions get type 1 and the img1 row's type 2
    unless `img_type_ids` is given. Loss: `nlvr2_loss` (cross-entropy).

    Args:
        config: The backbone configuration.
        variant: Which head.
        use_img_type: Distinguish the two images by type id (VILLA's configs: True).

    Shape:
        Paired variants take 2b rows (example i = rows 2i, 2i + 1) and return logits
        [b, 2]; triplet takes b rows and returns [b, 2].

    Examples:
        >>> cfg = UniterConfig.tiny()
        >>> model = UniterForNLVR2(cfg, variant="paired-attn")
        >>> model(input_ids=torch.tensor([[2, 7, 3]] * 4), img_feat=torch.randn(4, 2, cfg.img_dim),
        ...       img_pos_feat=torch.rand(4, 2, 7)).logits.shape
        torch.Size([2, 2])
    """

    _type_rows: ClassVar[int] = 3

    def __init__(self, config: UniterConfig, variant: Nlvr2Variant = "paired-attn", use_img_type: bool = True) -> None:
        super().__init__()
        if variant not in ("paired", "triplet", "paired-attn"):
            raise AdvlabValueError(
                f"Expected `variant` to be 'paired', 'triplet' or 'paired-attn', but got {variant!r}."
            )
        self.config = config
        self.variant = variant
        self.use_img_type = use_img_type
        self.uniter = UniterModel(config)
        h = config.hidden_size
        if variant == "paired-attn":
            # torch's MultiheadAttention keeps the official names: in_proj_weight [3h, h], in_proj_bias, out_proj
            self.attn1 = nn.MultiheadAttention(h, config.num_attention_heads, config.attention_probs_dropout_prob)
            self.attn2 = nn.MultiheadAttention(h, config.num_attention_heads, config.attention_probs_dropout_prob)
            self.fc = nn.Sequential(nn.Linear(2 * h, h), nn.ReLU(), nn.Dropout(config.hidden_dropout_prob))
            self.attn_pool = _AttentionPool(h, config.hidden_dropout_prob)
        self.nlvr2_output = nn.Linear(h if variant == "triplet" else 2 * h, 2)
        self.apply(self._init_weights)
        if use_img_type:
            self.init_type_embedding()

    def init_type_embedding(self) -> None:
        """Grow the type table to 3 rows, row 2 a copy of row 1 (the image type).

        Examples:
            >>> UniterForNLVR2(UniterConfig.tiny()).uniter.embeddings.token_type_embeddings.num_embeddings
            3
        """
        table = self.uniter.embeddings.token_type_embeddings
        if table.num_embeddings >= 3:
            return
        _resize_rows_(table, 3)
        with torch.no_grad():
            table.weight[2] = table.weight[1]

    def _grow_embeddings(self) -> list[str]:
        return super()._grow_embeddings() if self.use_img_type else []

    def forward(
        self,
        input_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        img_feat: Tensor | None = None,
        img_pos_feat: Tensor | None = None,
        attention_mask: Tensor | None = None,
        gather_index: Tensor | None = None,
        img_masks: Tensor | None = None,
        txt_type_ids: Tensor | None = None,
        img_type_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        **unexpected: Any,
    ) -> UniterClassifierOutput:
        """Score each example; arguments as `UniterModel.forward` (any other keyword raises)."""
        _refuse_unexpected(unexpected, type(self))
        if self.variant != "triplet":
            rows = _rows(input_ids, inputs_embeds, img_feat)
            if rows % 2:
                raise AdvlabValueError(
                    f"Expected an even number of rows (2 per example) for NLVR2 {self.variant!r}, but got {rows}."
                )
            if self.use_img_type and img_feat is not None and img_type_ids is None:
                img_type_ids = torch.ones(img_feat.shape[:2], dtype=torch.long, device=img_feat.device)
                img_type_ids[1::2] = 2  # the img1 rows
        out = self.uniter(
            input_ids,
            position_ids,
            img_feat,
            img_pos_feat,
            attention_mask,
            gather_index,
            img_masks,
            txt_type_ids,
            img_type_ids,
            inputs_embeds,
        )
        if self.variant == "triplet":
            pooled = out.pooler_output  # [b, h]
        elif self.variant == "paired":
            pooled = out.pooler_output.reshape(-1, 2 * self.config.hidden_size)  # [b/2, 2h]
        else:
            pooled = self._paired_attn(out.last_hidden_state, attention_mask)
        return UniterClassifierOutput(logits=self.nlvr2_output(pooled), pooled_output=pooled)

    def _paired_attn(self, hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
        rows, length, h = hidden.shape
        if attention_mask is None:
            attention_mask = hidden.new_ones(rows, length)
        pad = attention_mask == 0  # [2b, l]
        left, right = hidden.reshape(rows // 2, 2 * length, h).chunk(2, dim=1)  # each [b, l, h]
        left_pad, right_pad = pad.reshape(rows // 2, 2 * length).chunk(2, dim=1)  # each [b, l]
        # torch MHA is sequence-first by default, as the official copy
        left_t, right_t = left.transpose(0, 1), right.transpose(0, 1)  # [l, b, h]
        l2r, _ = self.attn1(left_t, right_t, right_t, key_padding_mask=right_pad, need_weights=False)
        r2l, _ = self.attn2(right_t, left_t, left_t, key_padding_mask=left_pad, need_weights=False)
        left = self.fc(torch.cat([l2r, left_t], dim=-1)).transpose(0, 1)  # [b, l, h]
        right = self.fc(torch.cat([r2l, right_t], dim=-1)).transpose(0, 1)
        return torch.cat([self.attn_pool(left, left_pad), self.attn_pool(right, right_pad)], dim=-1)  # [b, 2h]


class UniterForImageTextRetrieval(UniterPreTrainedModel):
    """Image-text retrieval (`model/itm.py`): `itm_output` Linear(h, 2) and `rank_output` Linear(h, 1).

    `rank_output` is initialised from row 1 (the "match" row) of `itm_output` by
    `init_output()`, which `from_pretrained` calls once the pre-trained `itm_output` is
    loaded. Loss: `itm_rank_loss` (hinge on sigmoid scores, margin 0.2) or `itm_loss`.
    (VILLA has no adversarial retrieval script; this head is UNITER's.)

    Args:
        config: The backbone configuration.

    Shape:
        Output logits: [b, 1] rank scores; itm_logits: [b, 2].

    Examples:
        >>> cfg = UniterConfig.tiny()
        >>> out = UniterForImageTextRetrieval(cfg)(input_ids=torch.tensor([[2, 3]]),
        ...       img_feat=torch.randn(1, 2, cfg.img_dim), img_pos_feat=torch.rand(1, 2, 7))
        >>> out.logits.shape, out.itm_logits.shape
        (torch.Size([1, 1]), torch.Size([1, 2]))
    """

    def __init__(self, config: UniterConfig) -> None:
        super().__init__()
        self.config = config
        self.uniter = UniterModel(config)
        self.itm_output = nn.Linear(config.hidden_size, 2)
        self.rank_output = nn.Linear(config.hidden_size, 1)
        self.apply(self._init_weights)
        self.init_output()

    def init_output(self) -> None:
        """Copy `itm_output` row 1 into `rank_output`.

        Examples:
            >>> m = UniterForImageTextRetrieval(UniterConfig.tiny())
            >>> torch.equal(m.rank_output.weight[0], m.itm_output.weight[1])
            True
        """
        with torch.no_grad():
            self.rank_output.weight.copy_(self.itm_output.weight[1:2])
            self.rank_output.bias.copy_(self.itm_output.bias[1:2])

    def _grow_embeddings(self) -> list[str]:
        self.init_output()  # after loading itm_output
        return []

    def forward(
        self,
        input_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        img_feat: Tensor | None = None,
        img_pos_feat: Tensor | None = None,
        attention_mask: Tensor | None = None,
        gather_index: Tensor | None = None,
        img_masks: Tensor | None = None,
        txt_type_ids: Tensor | None = None,
        img_type_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        **unexpected: Any,
    ) -> UniterRetrievalOutput:
        """Score each (text, image) row; arguments as `UniterModel.forward` (any other keyword raises)."""
        _refuse_unexpected(unexpected, type(self))
        pooled = self.uniter(
            input_ids,
            position_ids,
            img_feat,
            img_pos_feat,
            attention_mask,
            gather_index,
            img_masks,
            txt_type_ids,
            img_type_ids,
            inputs_embeds,
        ).pooler_output
        return UniterRetrievalOutput(logits=self.rank_output(pooled), itm_logits=self.itm_output(pooled))


class UniterForVCR(UniterPreTrainedModel):
    """VCR head (`model/vcr.py`): pooled -> Linear(h, 2h), ReLU, LayerNorm, Linear(2h, 2), per row.

    One row per (question, candidate) pair; each row is a 2-way classification (VILLA's
    version returns both logits; UNITER slices `[:, 1:]` to rank candidates at inference).
    The type table has 4 rows (0 question, 1 region, 2 answer, 3 rationale; rows 2 and 3
    copied from row 0) and the word table 81 extra rows (person / object tags, N(0, 0.02)).
    These shapes follow the reference description of the official code; they were **not**
    checked against a released VCR checkpoint.

    Args:
        config: The backbone configuration (`vocab_size` without the 81 extra words).

    Shape:
        Output logits: [b, 2] (b = 4 rows per question in the official data).

    Examples:
        >>> cfg = UniterConfig.tiny()
        >>> model = UniterForVCR(cfg)
        >>> model.uniter.embeddings.word_embeddings.num_embeddings
        180
        >>> model(input_ids=torch.tensor([[2, 150, 3]] * 4), txt_type_ids=torch.tensor([[0, 2, 0]] * 4),
        ...       img_feat=torch.randn(4, 2, cfg.img_dim), img_pos_feat=torch.rand(4, 2, 7)).logits.shape
        torch.Size([4, 2])
    """

    _type_rows: ClassVar[int] = 4
    _extra_words: ClassVar[int] = 81

    def __init__(self, config: UniterConfig) -> None:
        super().__init__()
        self.config = config
        self.uniter = UniterModel(config)
        h = config.hidden_size
        self.vcr_output = nn.Sequential(
            nn.Linear(h, 2 * h), nn.ReLU(), nn.LayerNorm(2 * h, eps=config.layer_norm_eps), nn.Linear(2 * h, 2)
        )
        self.apply(self._init_weights)
        self._grow_embeddings()

    def init_type_embedding(self) -> None:
        """Grow the type table to 4 rows; rows 2 and 3 are copies of row 0 (text).

        Examples:
            >>> UniterForVCR(UniterConfig.tiny()).uniter.embeddings.token_type_embeddings.num_embeddings
            4
        """
        table = self.uniter.embeddings.token_type_embeddings
        old = table.num_embeddings
        if old >= 4:
            return
        _resize_rows_(table, 4)
        with torch.no_grad():
            for row in range(max(old, 2), 4):
                table.weight[row] = table.weight[0]

    def init_word_embedding(self, num_special_tokens: int) -> None:
        """Append `num_special_tokens` word rows drawn from N(0, 0.02).

        Examples:
            >>> m = UniterForVCR(UniterConfig.tiny())
            >>> m.uniter.embeddings.word_embeddings.weight.shape[0] == 99 + 81
            True
        """
        table = self.uniter.embeddings.word_embeddings
        target = self.config.vocab_size + num_special_tokens
        if table.num_embeddings < target:
            _resize_rows_(table, target)  # new rows ~ N(0, 0.02)

    def forward(
        self,
        input_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        img_feat: Tensor | None = None,
        img_pos_feat: Tensor | None = None,
        attention_mask: Tensor | None = None,
        gather_index: Tensor | None = None,
        img_masks: Tensor | None = None,
        txt_type_ids: Tensor | None = None,
        img_type_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        **unexpected: Any,
    ) -> UniterClassifierOutput:
        """Score each (question, candidate) row; arguments as `UniterModel.forward` (any other keyword raises)."""
        _refuse_unexpected(unexpected, type(self))
        pooled = self.uniter(
            input_ids,
            position_ids,
            img_feat,
            img_pos_feat,
            attention_mask,
            gather_index,
            img_masks,
            txt_type_ids,
            img_type_ids,
            inputs_embeds,
        ).pooler_output
        return UniterClassifierOutput(logits=self.vcr_output(pooled), pooled_output=pooled)


def _refuse_unexpected(unexpected: Mapping[str, Any], cls: type) -> None:
    if unexpected:
        raise AdvlabTypeError(
            f"Expected {cls.__name__} keyword arguments among {list(_BACKBONE_ARGS)}, but got unknown "
            f"{sorted(unexpected)} (pass the collate's batch['inputs'], not the whole batch)."
        )


def _rows(input_ids: Tensor | None, inputs_embeds: Tensor | None, img_feat: Tensor | None) -> int:
    for value in (input_ids, inputs_embeds, img_feat):
        if value is not None:
            return int(value.shape[0])
    raise AdvlabValueError("Expected `input_ids`, `inputs_embeds` or `img_feat`, but got none of them.")
