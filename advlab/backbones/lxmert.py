"""LXMERT (Tan & Bansal, 2019), the reference two-stream backbone, with its task heads and checkpoint loaders.

The module tree and every parameter name follow the original `airsplay/lxmert` code (which Hugging Face's
`LxmertModel` also keeps), so the released `model_LXRT.pth`, fine-tuned task checkpoints and Hugging Face
files load by a pure rename of prefixes, with no per-tensor surgery:

```text
LxmertModel
├── embeddings        word / position / token-type lookups -> LayerNorm -> dropout
├── encoder
│   ├── visn_fc       visual feature encoder: (LN(visn_fc(feats)) + LN(box_fc(boxes))) / 2 -> dropout
│   ├── layer[l]      language self-attention layers (9 in the released model)
│   ├── r_layers[r]   object-relationship self-attention layers on the visual stream (5)
│   └── x_layers[x]   cross-modality layers (5), one *shared* cross-attention used in both directions
└── pooler            tanh(Linear) on the language [CLS] output
```

Shape notation:
    - b: batch size
    - t: text length (20 in the released fine-tuning scripts)
    - n: number of objects per image (36 BUTD boxes)
    - h: hidden size (768)
    - f: visual feature size (2048)

Visual inputs are 2048-d bottom-up-attention RoI features and **normalised boxes `x1, y1, x2, y2` in [0, 1]**
(pixel corners divided by image width and height). This is what the released weights were trained on; the
Hugging Face config docstring's "(x, y, width, height)" is wrong for them.

Perturbation sites (VILLA, LXMERT-AdvTrain): the text perturbation is added to the *output of the word-embedding
lookup*, before position / type embeddings and the embedding LayerNorm; the image perturbation is added to the
*input of* `encoder.visn_fc.visn_fc`, i.e. the raw 2048-d features. Boxes are never perturbed.

Task losses (`vqa_loss` for VQA's soft scores, `nlvr2_loss`, ...) take these heads' outputs too; they live in
`advlab.backbones.losses`, shared with UNITER.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, TypeVar

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
from advlab.sites import Site

__all__ = [
    "GQA_NUM_ANSWERS",
    "PRETRAIN_NUM_ANSWERS",
    "VQA_NUM_ANSWERS",
    "LxmertClassifierOutput",
    "LxmertConfig",
    "LxmertForGQA",
    "LxmertForNLVR2",
    "LxmertForPreTraining",
    "LxmertForQuestionAnswering",
    "LxmertForVQA",
    "LxmertModel",
    "LxmertOutput",
    "LxmertPreTrainedModel",
    "LxmertPreTrainingOutput",
    "convert_lxmert_state_dict",
    "load_lxmert_state_dict",
    "remap_answer_rows",
]

logger = logging.getLogger(__name__)

VQA_NUM_ANSWERS = 3129  # data/vqa/trainval_ans2label.json
GQA_NUM_ANSWERS = 1842  # data/gqa/trainval_ans2label.json
PRETRAIN_NUM_ANSWERS = 9500  # data/lxmert/all_ans.json, the pre-training QA head

# Added to the attention scores of masked keys. The original code uses -10000: large enough that exp() underflows
# to exactly 0 in float32 (so outputs equal a masked softmax), yet finite in float16. `torch.finfo(dtype).min`
# (what transformers 5 uses) turns into -inf after adding a negative score in float16, and a row whose keys are
# all masked then becomes softmax(-inf, ..., -inf) = NaN.
MASK_VALUE = -10000.0

AttnImplementation = Literal["sdpa", "eager"]


# --------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LxmertConfig:
    """Sizes of an LXMERT model; `LxmertConfig.base()` is the released `lxr955` model.

    Args:
        vocab_size: WordPiece vocabulary (bert-base-uncased: 30522).
        hidden_size: Width of both streams.
        num_attention_heads: Heads in every attention module; must divide `hidden_size`.
        intermediate_size: Width of the feed-forward layers.
        l_layers: Language self-attention layers.
        x_layers: Cross-modality layers.
        r_layers: Object-relationship (visual self-attention) layers.
        visual_feat_dim: Size of one RoI feature.
        visual_pos_dim: Size of one box (4: normalised x1, y1, x2, y2).
        max_position_embeddings: Rows of the position table.
        type_vocab_size: Rows of the token-type table.
        hidden_dropout_prob: Dropout after embeddings, attention outputs and FFNs.
        attention_probs_dropout_prob: Dropout on attention probabilities.
        initializer_range: Std of the normal initialisation.
        layer_norm_eps: LayerNorm epsilon (hard-coded 1e-12 in the original and in transformers).
        num_qa_labels: Answers of the pre-training QA head.
        num_object_labels: Visual Genome object classes of the pre-training object head.
        num_attr_labels: Visual Genome attribute classes of the pre-training attribute head.
        attn_implementation: `"sdpa"` computes every attention (language, relationship and cross-modality) with
            `torch.nn.functional.scaled_dot_product_attention` (a fused kernel; flash attention on GPU); `"eager"`
            with the explicit softmax of the original code. Both take the same weights and agree to float
            rounding; pick `"eager"` to reproduce results bit for bit.

    Examples:
        >>> LxmertConfig.base().l_layers, LxmertConfig.base().r_layers, LxmertConfig.base().x_layers
        (9, 5, 5)
        >>> LxmertConfig.tiny().hidden_size
        32
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    l_layers: int = 9  # README: "lxr955 (used in current pre-trained model)"; the class default 12/5/0 is not it
    x_layers: int = 5
    r_layers: int = 5
    visual_feat_dim: int = 2048  # pool5_flat of the Caffe BUTD Faster R-CNN
    visual_pos_dim: int = 4  # normalised x1, y1, x2, y2 (not x, y, w, h)
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    num_qa_labels: int = PRETRAIN_NUM_ANSWERS
    num_object_labels: int = 1600
    num_attr_labels: int = 400
    attn_implementation: AttnImplementation = "sdpa"

    def __post_init__(self) -> None:
        if self.attn_implementation not in ("sdpa", "eager"):
            raise AdvlabValueError(
                f"Expected `LxmertConfig.attn_implementation` to be 'sdpa' or 'eager', but got "
                f"{self.attn_implementation!r}."
            )
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "attn_implementation":
                continue
            if f.type in ("int", int):
                minimum = 0 if f.name.endswith("_layers") else 1
                if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                    raise AdvlabValueError(
                        f"Expected `LxmertConfig.{f.name}` to be an int >= {minimum}, but got {value!r}."
                    )
            else:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                    raise AdvlabValueError(f"Expected `LxmertConfig.{f.name}` to be a float >= 0, but got {value!r}.")
        if self.hidden_size % self.num_attention_heads:
            raise AdvlabValueError(
                f"Expected `LxmertConfig.hidden_size` ({self.hidden_size}) to be a multiple of "
                f"`num_attention_heads`, but got {self.num_attention_heads}."
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if getattr(self, name) >= 1:
                raise AdvlabValueError(
                    f"Expected `LxmertConfig.{name}` to be in [0, 1), but got {getattr(self, name)}."
                )

    @classmethod
    def base(cls) -> LxmertConfig:
        """The released model: 9 language, 5 relationship, 5 cross layers, hidden 768, BERT-base vocabulary.

        Examples:
            >>> LxmertConfig.base().hidden_size
            768
        """
        return cls()

    @classmethod
    def tiny(cls, **overrides: Any) -> LxmertConfig:
        """A small config for tests: hidden 32, 4 heads, 2 layers per stage, vocabulary 99, 2048-d features.

        Args:
            **overrides: Fields to change, e.g. `visual_feat_dim=16`.

        Examples:
            >>> LxmertConfig.tiny(l_layers=1).l_layers
            1
        """
        tiny = cls(
            vocab_size=99,
            hidden_size=32,
            num_attention_heads=4,
            intermediate_size=64,
            l_layers=2,
            x_layers=2,
            r_layers=2,
            max_position_embeddings=40,
            num_qa_labels=11,
            num_object_labels=13,
            num_attr_labels=7,
        )
        return replace(tiny, **overrides)


# --------------------------------------------------------------------------------------------------------------
# Output containers
# --------------------------------------------------------------------------------------------------------------


@dataclass
class LxmertOutput:
    """What `LxmertModel` returns.

    Attributes:
        language_output: Last cross-modality layer, language stream.
        vision_output: Last cross-modality layer, vision stream.
        pooled_output: tanh(Linear) of `language_output[:, 0]`.
        language_hidden_states: With `output_hidden_states=True`: the output of each language layer, then of each
            cross layer (`l_layers + x_layers` tensors, no embedding output, as in transformers).
        vision_hidden_states: Same for vision: each relationship layer, then each cross layer.

    Shape:
        language_output: [b, t, h]
        vision_output: [b, n, h]
        pooled_output: [b, h]

    Examples:
        >>> out = LxmertOutput(torch.zeros(1, 3, 4), torch.zeros(1, 2, 4), torch.zeros(1, 4))
        >>> out.pooled_output.shape
        torch.Size([1, 4])
    """

    language_output: Tensor
    vision_output: Tensor
    pooled_output: Tensor
    language_hidden_states: tuple[Tensor, ...] | None = None
    vision_hidden_states: tuple[Tensor, ...] | None = None


@dataclass
class LxmertClassifierOutput:
    """What the task heads return.

    Attributes:
        logits: Answer scores (VQA / GQA: sigmoid / softmax over answers) or NLVR2's two classes.
        pooled_output: The pooled vector the classifier read (for NLVR2: both images' vectors, concatenated).

    Shape:
        logits: [b, num_answers] (NLVR2: [b, 2])
        pooled_output: [b, h] (NLVR2: [b, 2h])

    Examples:
        >>> LxmertClassifierOutput(torch.zeros(2, 5), torch.zeros(2, 4)).logits.shape
        torch.Size([2, 5])
    """

    logits: Tensor
    pooled_output: Tensor


@dataclass
class LxmertPreTrainingOutput:
    """What `LxmertForPreTraining` returns; `None` for the heads that were not built.

    Attributes:
        lm_logits: Masked-LM scores over the vocabulary (transformers: `prediction_logits`).
        match_logits: Image-text matching scores (transformers: `cross_relationship_score`).
        qa_logits: Pre-training QA scores (transformers: `question_answering_score`); also `.logits`.
        obj_logits: Visual Genome object class scores per region.
        attr_logits: Visual Genome attribute scores per region.
        feat_predictions: Regressed RoI features per region.
        backbone: The backbone's own output.

    Shape:
        lm_logits: [b, t, vocab_size]
        match_logits: [b, 2]
        qa_logits: [b, num_qa_labels]
        obj_logits: [b, n, num_object_labels]
        attr_logits: [b, n, num_attr_labels]
        feat_predictions: [b, n, f]

    Examples:
        >>> out = LxmertPreTrainingOutput(qa_logits=torch.zeros(1, 3))
        >>> out.logits.shape
        torch.Size([1, 3])
    """

    lm_logits: Tensor | None = None
    match_logits: Tensor | None = None
    qa_logits: Tensor | None = None
    obj_logits: Tensor | None = None
    attr_logits: Tensor | None = None
    feat_predictions: Tensor | None = None
    backbone: LxmertOutput | None = None

    @property
    def logits(self) -> Tensor | None:
        """The QA answer scores, so generic code that reads `.logits` works."""
        return self.qa_logits


# --------------------------------------------------------------------------------------------------------------
# Building blocks (attribute names are the original ones: they are the checkpoint keys)
# --------------------------------------------------------------------------------------------------------------


def _layer_norm(config: LxmertConfig, width: int | None = None) -> nn.LayerNorm:
    return nn.LayerNorm(width or config.hidden_size, eps=config.layer_norm_eps)


class _Embeddings(nn.Module):
    """BERT text embeddings. `padding_idx=0` on all three tables, as in the original (row 0 gets no gradient)."""

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size, padding_idx=0)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size, padding_idx=0)
        self.LayerNorm = _layer_norm(config)  # capitalised: the checkpoint key
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: Tensor | None, token_type_ids: Tensor, inputs_embeds: Tensor | None) -> Tensor:
        # The text perturbation site is this lookup's output (a hook on `word_embeddings`).
        words = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds  # [b, t, h]
        positions = torch.arange(words.shape[1], device=words.device)
        x = words + self.position_embeddings(positions)[None] + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class _Attention(nn.Module):
    """Multi-head attention of `hidden` (queries) over `context` (keys, values): SDPA or eager softmax."""

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_size = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self.attn_implementation = config.attn_implementation

    def _split(self, x: Tensor) -> Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.num_heads, self.head_size).transpose(1, 2)  # [b, heads, s, d]

    def forward(self, hidden: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        q, k, v = self._split(self.query(hidden)), self._split(self.key(context)), self._split(self.value(context))
        if self.attn_implementation == "sdpa":
            # same additive mask ([b, 1, 1, s_k], 0 or MASK_VALUE) and scale; dropout on the probabilities in training
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=None if mask is None else mask.to(q.dtype),
                dropout_p=self.dropout.p if self.training else 0.0,
            )  # [b, heads, s_q, d]
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_size)  # [b, heads, s_q, s_k]
            if mask is not None:
                scores = scores + mask  # [b, 1, 1, s_k] additive, 0 or MASK_VALUE
            probs = self.dropout(torch.softmax(scores, dim=-1))
            out = torch.matmul(probs, v)  # [b, heads, s_q, d]
        b, _, s, _ = out.shape
        return out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_size)  # [b, s_q, h]


# Copied from advlab.backbones.uniter._Output with UniterConfig->LxmertConfig
class _Output(nn.Module):
    """LayerNorm(dropout(dense(x)) + residual): BERT's SelfOutput (x of width h) and Output (x of the FFN width)."""

    def __init__(self, config: LxmertConfig, in_features: int) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class _CrossAttLayer(nn.Module):
    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.att = _Attention(config)
        self.output = _Output(config, config.hidden_size)

    def forward(self, hidden: Tensor, context: Tensor, context_mask: Tensor | None) -> Tensor:
        return self.output(self.att(hidden, context, context_mask), hidden)


class _SelfAttLayer(nn.Module):
    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.self = _Attention(config)  # `self.self`: the original (BERT) key name `attention.self.query...`
        self.output = _Output(config, config.hidden_size)

    def forward(self, hidden: Tensor, mask: Tensor | None) -> Tensor:
        return self.output(self.self(hidden, hidden, mask), hidden)


# Copied from advlab.backbones.uniter._Intermediate with UniterConfig->LxmertConfig
class _Intermediate(nn.Module):
    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, hidden: Tensor) -> Tensor:
        return F.gelu(self.dense(hidden))  # the exact erf form, as in UNITER's layer.py and LXMERT's modeling.py


class _Layer(nn.Module):
    """A post-LN BERT layer: self-attention, then FFN. Used for the language and relationship stages."""

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.attention = _SelfAttLayer(config)
        self.intermediate = _Intermediate(config)
        self.output = _Output(config, config.intermediate_size)

    def forward(self, hidden: Tensor, mask: Tensor | None) -> Tensor:
        hidden = self.attention(hidden, mask)
        return self.output(self.intermediate(hidden), hidden)


class _XLayer(nn.Module):
    """Cross-modality layer: shared cross-attention both ways, then self-attention and FFN per stream."""

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        # ONE module for both directions: the original's misleading name `visual_attention` is the checkpoint key.
        self.visual_attention = _CrossAttLayer(config)
        self.lang_self_att = _SelfAttLayer(config)
        self.visn_self_att = _SelfAttLayer(config)
        self.lang_inter = _Intermediate(config)
        self.lang_output = _Output(config, config.intermediate_size)
        self.visn_inter = _Intermediate(config)
        self.visn_output = _Output(config, config.intermediate_size)

    def forward(
        self, lang: Tensor, lang_mask: Tensor | None, visn: Tensor, visn_mask: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        # Both directions read the layer's *inputs* (computed in parallel, not one after the other).
        lang_x = self.visual_attention(lang, visn, visn_mask)
        visn_x = self.visual_attention(visn, lang, lang_mask)
        lang_x = self.lang_self_att(lang_x, lang_mask)
        visn_x = self.visn_self_att(visn_x, visn_mask)
        lang_out = self.lang_output(self.lang_inter(lang_x), lang_x)
        visn_out = self.visn_output(self.visn_inter(visn_x), visn_x)
        return lang_out, visn_out


class _VisualFeatEncoder(nn.Module):
    """(LN(visn_fc(feats)) + LN(box_fc(boxes))) / 2, then dropout. `visn_fc`'s input is the image site."""

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.visn_fc = nn.Linear(config.visual_feat_dim, config.hidden_size)
        self.visn_layer_norm = _layer_norm(config)
        self.box_fc = nn.Linear(config.visual_pos_dim, config.hidden_size)
        self.box_layer_norm = _layer_norm(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, feats: Tensor, boxes: Tensor) -> Tensor:
        x = self.visn_layer_norm(self.visn_fc(feats))  # [b, n, h]
        y = self.box_layer_norm(self.box_fc(boxes))  # [b, n, h]
        return self.dropout((x + y) / 2)


class _Encoder(nn.Module):
    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.visn_fc = _VisualFeatEncoder(config)
        self.layer = nn.ModuleList(_Layer(config) for _ in range(config.l_layers))
        self.x_layers = nn.ModuleList(_XLayer(config) for _ in range(config.x_layers))
        self.r_layers = nn.ModuleList(_Layer(config) for _ in range(config.r_layers))


class _Pooler(nn.Module):
    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, lang: Tensor) -> Tensor:
        return torch.tanh(self.dense(lang[:, 0]))  # [b, h] from the [CLS] position


def _init_weights(module: nn.Module, std: float) -> None:
    """The original `init_bert_weights`: N(0, std) weights, zero biases, unit LayerNorms.

    Embedding padding rows are not re-zeroed (the released weights keep random row-0 values).
    """
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _extended_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if mask is None:
        return None
    return (1.0 - mask[:, None, None, :].to(dtype)) * MASK_VALUE  # [b, 1, 1, s]


def _check_config(config: object) -> LxmertConfig:
    if not isinstance(config, LxmertConfig):
        raise AdvlabTypeError(f"Expected `config` to be an LxmertConfig, but got {type(config).__name__}.")
    return config


# --------------------------------------------------------------------------------------------------------------
# Backbone
# --------------------------------------------------------------------------------------------------------------


class LxmertPreTrainedModel(nn.Module):
    """Shared by `LxmertModel` and the heads: the backbone, perturbation sites and `from_pretrained`.

    Subclasses hold the backbone as `self.lxmert` (the checkpoint prefix) and their sizes as `self.config`,
    except `LxmertModel`, which *is* the backbone.

    Examples:
        >>> issubclass(LxmertForVQA, LxmertPreTrainedModel), issubclass(LxmertModel, LxmertPreTrainedModel)
        (True, True)
    """

    config: LxmertConfig

    @property
    def backbone(self) -> LxmertModel:
        """The `LxmertModel` inside (the model itself for `LxmertModel`)."""
        return self if isinstance(self, LxmertModel) else self.lxmert  # type: ignore[return-value]

    @staticmethod
    def position_features(boxes: Tensor) -> Tensor:
        """LXMERT's 4-d region position input `(x1, y1, x2, y2)` in [0, 1]: a clamped copy of the boxes.

        Args:
            boxes: `(x1, y1, x2, y2)` normalised by the image size.

        Returns:
            The boxes clamped to [0, 1] (`visual_pos`).

        Raises:
            AdvlabValueError: The last dimension is not 4.

        Shape:
            boxes: [..., 4]; result: [..., 4].

        Examples:
            >>> LxmertModel.position_features(torch.tensor([[-0.01, 0.2, 0.5, 1.02]]))
            tensor([[0.0000, 0.2000, 0.5000, 1.0000]])
        """
        if not isinstance(boxes, Tensor):
            raise AdvlabTypeError(f"Expected `boxes` to be a Tensor, but got {type(boxes).__name__}.")
        if boxes.dim() == 0 or boxes.shape[-1] != 4:
            raise AdvlabValueError(f"Expected `boxes` of shape [..., 4], but got {tuple(boxes.shape)}.")
        return boxes.clamp(0.0, 1.0)

    def perturbation_sites(self) -> dict[str, Site]:
        """The backbone's sites (one call each per forward).

        Examples:
            >>> LxmertForVQA(LxmertConfig.tiny(visual_feat_dim=8), 3).perturbation_sites()["txt"].calls
            1
        """
        return self.backbone.perturbation_sites()

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike[str] | Mapping[str, Tensor],
        config: LxmertConfig | None = None,
        *,
        expected_sha256: str | None = None,
        output_loading_info: bool = False,
    ) -> Any:
        """Build the model and load any LXMERT checkpoint into it.

        Backbone keys must all be present. Head keys in the file load into the model's heads where the name and
        shape match; the rest are reported and dropped, and heads the file lacks stay randomly initialised (see
        `LoadReport`).

        Args:
            source: A file (`model_LXRT.pth`, a fine-tuned `BEST.pth`, `pytorch_model.bin`, `.safetensors`),
                a Hugging Face model folder, or a state dict. Original (`module.bert.*`), fine-tuned
                (`lxrt_encoder.model[.module].bert.*`) and Hugging Face (`lxmert.*`, or no prefix) names.
            config: Sizes; by default inferred, but only where that is unambiguous. The number of attention heads
                is not stored in the weights: it (and the layer counts) is read from a Hugging Face `config.json`
                beside the weights; without one, only the released size is inferred (hidden 768, 12 heads, FFN
                3072, 9 language / 5 cross-modality / 5 relationship layers). Layer indices must run from 0 and
                every layer must be complete; a layer whose size disagrees with the others is named as corrupt.
                Anything else raises and asks for `config` (the tiny test configs, for one).
            expected_sha256: The checkpoint file's SHA-256; if given, checked before reading (the formats carry no
                checksum of their own, so only this catches a flipped byte inside a tensor).
            output_loading_info: Also return a `LoadReport` (unused head keys are logged at INFO, keys left
                randomly initialised or dropped for another size at WARNING, on the `advlab.backbones.lxmert`
                logger).

        Returns:
            The model in eval mode (call `.train()` to fine-tune); with `output_loading_info`, `(model, LoadReport)`.

        Examples:
            >>> donor = LxmertModel(LxmertConfig.tiny(visual_feat_dim=8))
            >>> sd = {"module.bert." + k: v for k, v in donor.state_dict().items()}
            >>> model = LxmertModel.from_pretrained(sd, config=donor.config)
            >>> torch.equal(model.pooler.dense.weight, donor.pooler.dense.weight)
            True
        """
        return _from_pretrained(
            cls, source, config, heads={}, expected_sha256=expected_sha256, output_loading_info=output_loading_info
        )


class LxmertModel(LxmertPreTrainedModel):
    """The LXMERT backbone (language, object-relationship and cross-modality encoders, pooler).

    Args:
        config: Sizes; `LxmertConfig.base()` for the released model.

    Shape:
        input_ids: [b, t] (or `inputs_embeds` [b, t, h])
        visual_feats: [b, n, f]
        visual_pos: [b, n, 4], normalised `x1, y1, x2, y2` in [0, 1]
        attention_mask: [b, t], 1 for real tokens, 0 for padding
        visual_attention_mask: [b, n], 1 for real objects (optional: the checkpoint never saw masked objects)
        token_type_ids: [b, t]

    Examples:
        >>> model = LxmertModel(LxmertConfig.tiny(visual_feat_dim=16)).eval()
        >>> out = model(torch.tensor([[1, 7, 2]]), torch.randn(1, 5, 16), torch.rand(1, 5, 4))
        >>> out.language_output.shape, out.vision_output.shape, out.pooled_output.shape
        (torch.Size([1, 3, 32]), torch.Size([1, 5, 32]), torch.Size([1, 32]))
        >>> sorted(model.perturbation_sites())
        ['img', 'txt']
    """

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.config = _check_config(config)
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)
        self.pooler = _Pooler(config)
        self.apply(lambda m: _init_weights(m, config.initializer_range))

    def perturbation_sites(self) -> dict[str, Site]:
        """VILLA's sites: `txt` = the word-embedding lookup's output; `img` = the raw features entering `visn_fc`.

        Examples:
            >>> sites = LxmertModel(LxmertConfig.tiny(visual_feat_dim=8)).perturbation_sites()
            >>> sites["img"].where, sites["txt"].where
            ('input', 'output')
        """
        return {
            "txt": Site(self.embeddings.word_embeddings),
            "img": Site(self.encoder.visn_fc.visn_fc, where="input"),
        }

    def forward(
        self,
        input_ids: Tensor | None = None,
        visual_feats: Tensor | None = None,
        visual_pos: Tensor | None = None,
        attention_mask: Tensor | None = None,
        visual_attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> LxmertOutput:
        """Encode a batch of (text, image) pairs.

        Args:
            input_ids: WordPiece ids, `[CLS] ... [SEP]` then padding id 0.
            visual_feats: RoI features.
            visual_pos: Boxes as normalised `x1, y1, x2, y2` in [0, 1] (corners divided by image width / height).
            attention_mask: Text mask; defaults to all ones.
            visual_attention_mask: Object mask; `None` attends to every object, as in pre-training.
            token_type_ids: Segment ids; default zeros.
            inputs_embeds: Replaces the word-embedding lookup only (position / type embeddings and the LayerNorm
                are still applied). The `txt` perturbation site is the lookup, so it is bypassed by this.
            output_hidden_states: Also return every layer's output (see `LxmertOutput`).

        Returns:
            The two streams and the pooled vector.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise AdvlabValueError(
                "Expected exactly one of `input_ids` and `inputs_embeds`, but got "
                f"{'both' if input_ids is not None else 'neither'}."
            )
        if visual_feats is None or visual_pos is None:
            raise AdvlabValueError("Expected `visual_feats` and `visual_pos` (features and boxes), but got None.")
        text = input_ids if input_ids is not None else inputs_embeds
        assert text is not None
        b, t = text.shape[0], text.shape[1]
        if (
            visual_feats.dim() != 3
            or visual_feats.shape[0] != b
            or visual_feats.shape[-1] != self.config.visual_feat_dim
        ):
            raise AdvlabValueError(
                f"Expected `visual_feats` to have shape [{b}, n, {self.config.visual_feat_dim}], "
                f"but got {tuple(visual_feats.shape)}."
            )
        n = visual_feats.shape[1]
        if tuple(visual_pos.shape) != (b, n, self.config.visual_pos_dim):
            raise AdvlabValueError(
                f"Expected `visual_pos` to have shape {(b, n, self.config.visual_pos_dim)} (normalised x1, y1, x2, "
                f"y2), but got {tuple(visual_pos.shape)}."
            )
        if t > self.config.max_position_embeddings:
            raise AdvlabValueError(
                f"Expected at most {self.config.max_position_embeddings} text positions, but got `input_ids` of "
                f"length {t}."
            )
        for name, mask, shape in (
            ("attention_mask", attention_mask, (b, t)),
            ("token_type_ids", token_type_ids, (b, t)),
            ("visual_attention_mask", visual_attention_mask, (b, n)),
        ):
            if mask is not None and tuple(mask.shape) != shape:
                raise AdvlabValueError(f"Expected `{name}` to have shape {shape}, but got {tuple(mask.shape)}.")

        if attention_mask is None:
            attention_mask = torch.ones(b, t, dtype=torch.long, device=text.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros(b, t, dtype=torch.long, device=text.device)
        dtype = self.embeddings.LayerNorm.weight.dtype
        lang_mask = _extended_mask(attention_mask, dtype)
        visn_mask = _extended_mask(visual_attention_mask, dtype)

        lang = self.embeddings(input_ids, token_type_ids, inputs_embeds)  # [b, t, h]
        visn = self.encoder.visn_fc(visual_feats, visual_pos)  # [b, n, h]
        lang_states: list[Tensor] = []
        visn_states: list[Tensor] = []
        for layer in self.encoder.layer:
            lang = layer(lang, lang_mask)
            lang_states.append(lang)
        for layer in self.encoder.r_layers:
            visn = layer(visn, visn_mask)
            visn_states.append(visn)
        for layer in self.encoder.x_layers:
            lang, visn = layer(lang, lang_mask, visn, visn_mask)
            lang_states.append(lang)
            visn_states.append(visn)
        return LxmertOutput(
            language_output=lang,
            vision_output=visn,
            pooled_output=self.pooler(lang),
            language_hidden_states=tuple(lang_states) if output_hidden_states else None,
            vision_hidden_states=tuple(visn_states) if output_hidden_states else None,
        )


# --------------------------------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------------------------------


class _AnswerHead(nn.Module):
    """`logit_fc = Sequential(Linear(d, 2h), GELU, LayerNorm(2h), Linear(2h, out))`, the original's classifier."""

    def __init__(self, config: LxmertConfig, in_features: int, num_outputs: int) -> None:
        super().__init__()
        hid = 2 * config.hidden_size
        self.logit_fc = nn.Sequential(
            nn.Linear(in_features, hid), nn.GELU(), _layer_norm(config, hid), nn.Linear(hid, num_outputs)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.logit_fc(x)


def _check_num(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AdvlabValueError(f"Expected `{name}` to be an int >= 1, but got {value!r}.")
    return value


class LxmertForQuestionAnswering(LxmertPreTrainedModel):
    """Backbone + answer classifier on the pooled vector (the original VQA / GQA model).

    Parameter names are Hugging Face's `LxmertForQuestionAnswering` ones (`lxmert.*`, `answer_head.logit_fc.*`);
    fine-tuned `logit_fc.*` keys load into `answer_head`.

    Args:
        config: Backbone sizes.
        num_answers: Size of the answer vocabulary (VQA 3129, GQA 1842).

    Shape:
        Inputs as `LxmertModel`; `logits`: [b, num_answers].

    Examples:
        >>> model = LxmertForQuestionAnswering(LxmertConfig.tiny(visual_feat_dim=8), num_answers=5).eval()
        >>> model(torch.tensor([[1, 2]]), torch.randn(1, 3, 8), torch.rand(1, 3, 4)).logits.shape
        torch.Size([1, 5])
    """

    default_num_answers: int = VQA_NUM_ANSWERS

    def __init__(self, config: LxmertConfig, num_answers: int | None = None) -> None:
        super().__init__()
        self.config = config = _check_config(config)
        self.num_answers = _check_num("num_answers", self.default_num_answers if num_answers is None else num_answers)
        self.lxmert = LxmertModel(config)
        self.answer_head = _AnswerHead(config, config.hidden_size, self.num_answers)
        self.answer_head.apply(lambda m: _init_weights(m, config.initializer_range))

    def forward(
        self,
        input_ids: Tensor | None = None,
        visual_feats: Tensor | None = None,
        visual_pos: Tensor | None = None,
        attention_mask: Tensor | None = None,
        visual_attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
    ) -> LxmertClassifierOutput:
        """Score every answer; arguments as `LxmertModel.forward`."""
        pooled = self.lxmert(
            input_ids, visual_feats, visual_pos, attention_mask, visual_attention_mask, token_type_ids, inputs_embeds
        ).pooled_output
        return LxmertClassifierOutput(logits=self.answer_head(pooled), pooled_output=pooled)

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike[str] | Mapping[str, Tensor],
        config: LxmertConfig | None = None,
        num_answers: int | None = None,
        *,
        answers: Sequence[str] | Mapping[str, int] | None = None,
        pretrain_answers: Sequence[str] | Mapping[str, int] | None = None,
        expected_sha256: str | None = None,
        output_loading_info: bool = False,
    ) -> Any:
        """Load a backbone and, where the file has one of the right size, the answer head.

        From a fine-tuned checkpoint the head is loaded as is. From the pre-training file (9500-way QA head), pass
        `answers` (this task's labels) and `pretrain_answers` (`all_ans.json`'s) to initialise the head the way the
        original `--loadLXMERTQA` does (see `remap_answer_rows`); without them the head stays randomly
        initialised and a warning says so.

        Args:
            source: As `LxmertModel.from_pretrained`.
            config: Backbone sizes; inferred by default.
            num_answers: Answer vocabulary size; by default the file's head size, else the class default.
            answers: This task's answers, in label order (or answer -> label).
            pretrain_answers: The checkpoint head's answers, in row order (or answer -> row).
            expected_sha256: As `LxmertModel.from_pretrained`.
            output_loading_info: Also return a `LoadReport`.

        Returns:
            The model in eval mode; with `output_loading_info`, `(model, LoadReport)`.

        Examples:
            >>> cfg = LxmertConfig.tiny(visual_feat_dim=8)
            >>> donor = LxmertForPreTraining(cfg)  # 11-answer pre-training QA head in the tiny config
            >>> sd = {"module." + k.replace("lxmert.", "bert.", 1): v for k, v in donor.state_dict().items()}
            >>> pre = [f"a{i}" for i in range(11)]
            >>> model, report = LxmertForVQA.from_pretrained(
            ...     sd, cfg, 2, answers=["a3", "zzz"], pretrain_answers=pre, output_loading_info=True
            ... )
            >>> report.dropped[0], report.fresh
            ('cls.predictions.bias', [])
            >>> torch.equal(model.answer_head.logit_fc[3].weight[0], donor.answer_head.logit_fc[3].weight[3])
            True
        """
        if (answers is None) != (pretrain_answers is None):
            raise AdvlabValueError(
                "Expected both `answers` and `pretrain_answers` (to remap the QA head) or neither, but got only "
                f"{'answers' if answers is not None else 'pretrain_answers'}."
            )
        if num_answers is None and answers is not None:
            num_answers = len(answers)
        remap = None if answers is None else (answers, pretrain_answers)
        return _from_pretrained(
            cls,
            source,
            config,
            heads={"num_answers": num_answers},
            remap=remap,
            expected_sha256=expected_sha256,
            output_loading_info=output_loading_info,
        )


class LxmertForVQA(LxmertForQuestionAnswering):
    """`LxmertForQuestionAnswering` with VQA's 3129 answers by default (train with BCE on soft scores).

    Examples:
        >>> LxmertForVQA(LxmertConfig.tiny(visual_feat_dim=8)).num_answers
        3129
    """

    default_num_answers = VQA_NUM_ANSWERS


class LxmertForGQA(LxmertForQuestionAnswering):
    """`LxmertForQuestionAnswering` with GQA's 1842 answers by default (train with cross-entropy).

    Examples:
        >>> LxmertForGQA(LxmertConfig.tiny(visual_feat_dim=8)).num_answers
        1842
    """

    default_num_answers = GQA_NUM_ANSWERS


class LxmertForNLVR2(LxmertPreTrainedModel):
    """NLVR2: the sentence is encoded with each of the two images; the two pooled vectors, concatenated, are classified.

    The backbone runs twice per forward (once per image), so each perturbation site is called twice and gets an
    independent perturbation per image, as in VILLA's paired NLVR2 setting (`Site(..., calls=2)`). Parameter names
    are the original's (`lxmert.*` for the backbone, `logit_fc.*`).

    Args:
        config: Backbone sizes.

    Shape:
        input_ids: [b, t]
        visual_feats: [b, 2, n, f]
        visual_pos: [b, 2, n, 4]
        visual_attention_mask: [b, 2, n]
        logits: [b, 2]

    Examples:
        >>> model = LxmertForNLVR2(LxmertConfig.tiny(visual_feat_dim=8)).eval()
        >>> out = model(torch.tensor([[1, 5, 2]]), torch.randn(1, 2, 4, 8), torch.rand(1, 2, 4, 4))
        >>> out.logits.shape, out.pooled_output.shape
        (torch.Size([1, 2]), torch.Size([1, 64]))
    """

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.config = config = _check_config(config)
        self.lxmert = LxmertModel(config)
        self.logit_fc = _AnswerHead(config, 2 * config.hidden_size, 2).logit_fc
        self.logit_fc.apply(lambda m: _init_weights(m, config.initializer_range))

    def perturbation_sites(self) -> dict[str, Site]:
        """The backbone's sites, each called twice per forward (first image, then second).

        Examples:
            >>> LxmertForNLVR2(LxmertConfig.tiny(visual_feat_dim=8)).perturbation_sites()["img"].calls
            2
        """
        sites = self.lxmert.perturbation_sites()
        return {k: replace(s, calls=2) for k, s in sites.items()}

    def forward(
        self,
        input_ids: Tensor | None = None,
        visual_feats: Tensor | None = None,
        visual_pos: Tensor | None = None,
        attention_mask: Tensor | None = None,
        visual_attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
    ) -> LxmertClassifierOutput:
        """Classify (sentence, image pair) as true / false; image tensors carry a pair axis of size 2."""
        for name, value, dims in (("visual_feats", visual_feats, 4), ("visual_pos", visual_pos, 4)):
            if value is None or value.dim() != dims or value.shape[1] != 2:
                got = None if value is None else tuple(value.shape)
                raise AdvlabValueError(f"Expected `{name}` to have shape [b, 2, n, d] (two images), but got {got}.")
        if visual_attention_mask is not None and (
            visual_attention_mask.dim() != 3 or visual_attention_mask.shape[1] != 2
        ):
            raise AdvlabValueError(
                f"Expected `visual_attention_mask` to have shape [b, 2, n], but got {tuple(visual_attention_mask.shape)}."
            )
        assert visual_feats is not None and visual_pos is not None
        pooled = []
        for i in range(2):
            vmask = None if visual_attention_mask is None else visual_attention_mask[:, i]
            out = self.lxmert(
                input_ids, visual_feats[:, i], visual_pos[:, i], attention_mask, vmask, token_type_ids, inputs_embeds
            )
            pooled.append(out.pooled_output)
        both = torch.cat(pooled, dim=-1)  # [b, 2h]
        return LxmertClassifierOutput(logits=self.logit_fc(both), pooled_output=both)


class _PredictionHeadTransform(nn.Module):
    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = _layer_norm(config)

    def forward(self, x: Tensor) -> Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class _LMPredictionHead(nn.Module):
    def __init__(self, config: LxmertConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.transform = _PredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight  # tied, as in the original (stored once by torch.save)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.transform(x)) + self.bias


class _PreTrainingHeads(nn.Module):
    def __init__(self, config: LxmertConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.predictions = _LMPredictionHead(config, word_embeddings)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


class _VisualObjHead(nn.Module):
    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.transform = _PredictionHeadTransform(config)
        self.decoder_dict = nn.ModuleDict(
            {
                "obj": nn.Linear(config.hidden_size, config.num_object_labels),
                "attr": nn.Linear(config.hidden_size, config.num_attr_labels),
                "feat": nn.Linear(config.hidden_size, config.visual_feat_dim),
            }
        )

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.transform(x)
        return {k: m(x) for k, m in self.decoder_dict.items()}


class LxmertForPreTraining(LxmertPreTrainedModel):
    """Backbone + the pre-training heads (the model `model_LXRT.pth` stores).

    Heads: masked LM (decoder tied to the word embeddings), image-text matching, object / attribute
    classification and feature regression per region, and the 9500-way QA answer head. Each can be left out.
    Parameter names are Hugging Face's `LxmertForPreTraining` ones.

    Args:
        config: Sizes.
        mask_lm: Build `cls.predictions` (and `cls.seq_relationship` goes with `matched`).
        matched: Build the matching head `cls.seq_relationship`.
        obj_predict: Build `obj_predict_head` (obj / attr / feat).
        qa: Build `answer_head` (`config.num_qa_labels` answers).

    Shape:
        See `LxmertPreTrainingOutput`.

    Examples:
        >>> model = LxmertForPreTraining(LxmertConfig.tiny(visual_feat_dim=8)).eval()
        >>> out = model(torch.tensor([[1, 5, 2]]), torch.randn(1, 4, 8), torch.rand(1, 4, 4))
        >>> out.lm_logits.shape, out.obj_logits.shape, out.logits.shape
        (torch.Size([1, 3, 99]), torch.Size([1, 4, 13]), torch.Size([1, 11]))
    """

    def __init__(
        self,
        config: LxmertConfig,
        *,
        mask_lm: bool = True,
        matched: bool = True,
        obj_predict: bool = True,
        qa: bool = True,
    ) -> None:
        super().__init__()
        self.config = config = _check_config(config)
        self.lxmert = LxmertModel(config)
        std = config.initializer_range
        if mask_lm or matched:
            self.cls = _PreTrainingHeads(config, self.lxmert.embeddings.word_embeddings)
            self.cls.predictions.transform.apply(lambda m: _init_weights(m, std))
            _init_weights(self.cls.seq_relationship, std)
            if not mask_lm:
                del self.cls.predictions
            if not matched:
                del self.cls.seq_relationship
        if obj_predict:
            self.obj_predict_head = _VisualObjHead(config)
            self.obj_predict_head.apply(lambda m: _init_weights(m, std))
        if qa:
            self.answer_head = _AnswerHead(config, config.hidden_size, config.num_qa_labels)
            self.answer_head.apply(lambda m: _init_weights(m, std))

    def forward(
        self,
        input_ids: Tensor | None = None,
        visual_feats: Tensor | None = None,
        visual_pos: Tensor | None = None,
        attention_mask: Tensor | None = None,
        visual_attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
    ) -> LxmertPreTrainingOutput:
        """Run the backbone and every head that was built; arguments as `LxmertModel.forward`."""
        out = self.lxmert(
            input_ids, visual_feats, visual_pos, attention_mask, visual_attention_mask, token_type_ids, inputs_embeds
        )
        result = LxmertPreTrainingOutput(backbone=out)
        cls_heads = getattr(self, "cls", None)
        if cls_heads is not None and hasattr(cls_heads, "predictions"):
            result.lm_logits = cls_heads.predictions(out.language_output)
        if cls_heads is not None and hasattr(cls_heads, "seq_relationship"):
            result.match_logits = cls_heads.seq_relationship(out.pooled_output)
        if hasattr(self, "obj_predict_head"):
            visual = self.obj_predict_head(out.vision_output)
            result.obj_logits, result.attr_logits = visual["obj"], visual["attr"]
            result.feat_predictions = visual["feat"]
        if hasattr(self, "answer_head"):
            result.qa_logits = self.answer_head(out.pooled_output)
        return result


# --------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------

_HEAD_PREFIXES = ("cls.", "obj_predict_head.", "answer_head.", "logit_fc.")
_BACKBONE_ROOTS = ("embeddings.", "encoder.", "pooler.")


def load_lxmert_state_dict(path: str | os.PathLike[str], *, expected_sha256: str | None = None) -> dict[str, Tensor]:
    """Read the tensors of a checkpoint file or a Hugging Face model folder, on CPU, without running any pickle code.

    Neither torch files nor safetensors store a checksum of the tensor bytes: a file that cannot be parsed
    (truncated, not a checkpoint) raises, but a flipped byte inside a tensor is only caught when
    `expected_sha256` is given.

    Args:
        path: `.pth` / `.pt` / `.bin` (torch) or `.safetensors` file, or a folder holding `model.safetensors` or
            `pytorch_model.bin`. A `{"state_dict": ...}` or `{"model": ...}` wrapper is unwrapped.
        expected_sha256: The file's SHA-256 (64 hex digits); if given, checked before reading.

    Returns:
        Key -> tensor, names as stored.

    Raises:
        FileNotFoundError: `path` does not exist (the error is also an `AdvlabValueError`).
        AdvlabValueError: The file cannot be read, holds no state dict, or has another SHA-256.

    Examples:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "w.pt")
        >>> torch.save({"module.bert.pooler.dense.bias": torch.zeros(2)}, path)
        >>> list(load_lxmert_state_dict(path))
        ['module.bert.pooler.dense.bias']
    """
    return read_state_dict(path, expected_sha256=expected_sha256)[0]


def convert_lxmert_state_dict(state_dict: Mapping[str, Tensor], *, hidden_size: int | None = None) -> dict[str, Tensor]:
    """Rename any LXMERT checkpoint's keys to advlab's (= Hugging Face's `LxmertForPreTraining`) names.

    Rules: every `module.` is dropped (DataParallel, anywhere in the key); a leading `lxrt_encoder.model.` is
    dropped; a leading `bert.` becomes `lxmert.`; bare backbone keys (`embeddings.*`, `encoder.*`, `pooler.*`,
    transformers' `LxmertModel`) get `lxmert.`; LayerNorm `gamma` / `beta` become `weight` / `bias`; a fine-tuned
    task head `logit_fc.*` becomes `answer_head.logit_fc.*` (QA) or stays `logit_fc.*` (NLVR2, recognised by its
    2h-wide input). `cls.*`, `obj_predict_head.*` and `answer_head.*` are kept.

    Args:
        state_dict: Keys as stored.
        hidden_size: Backbone width, to tell an NLVR2 head from a QA head; by default read from the embeddings.

    Returns:
        A new dict; tensors are shared, not copied.

    Examples:
        >>> sd = {"lxrt_encoder.model.module.bert.pooler.dense.bias": torch.zeros(4),
        ...       "logit_fc.0.weight": torch.zeros(8, 4)}
        >>> sorted(convert_lxmert_state_dict(sd, hidden_size=4))
        ['answer_head.logit_fc.0.weight', 'lxmert.pooler.dense.bias']
    """
    if not isinstance(state_dict, Mapping):
        raise AdvlabTypeError(f"Expected `state_dict` to be a mapping, but got {type(state_dict).__name__}.")
    renamed: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise AdvlabTypeError(f"Expected state-dict keys to be str, but got {key!r}.")
        new = ".".join(part for part in key.split(".") if part != "module")
        new = new.removeprefix("lxrt_encoder.model.")
        if new.startswith("bert."):
            new = "lxmert." + new[len("bert.") :]
        elif new.startswith(_BACKBONE_ROOTS):
            new = "lxmert." + new
        new = re.sub(r"\.gamma$", ".weight", new)
        new = re.sub(r"\.beta$", ".bias", new)
        if new in renamed:
            raise AdvlabValueError(f"Expected distinct keys after renaming, but {key!r} maps onto {new!r} twice.")
        renamed[new] = value
    if any(k.startswith("logit_fc.") for k in renamed):
        if hidden_size is None:
            words = renamed.get("lxmert.embeddings.word_embeddings.weight")
            hidden_size = None if words is None else words.shape[1]
        first = renamed.get("logit_fc.0.weight")
        is_nlvr2 = first is not None and hidden_size is not None and first.shape[1] == 2 * hidden_size
        if not is_nlvr2:
            renamed = {("answer_head." + k if k.startswith("logit_fc.") else k): v for k, v in renamed.items()}
    return renamed


_STAGES = {"l_layers": "layer", "x_layers": "x_layers", "r_layers": "r_layers"}


def _stage_suffixes(stage: str) -> list[str]:
    """The keys one layer of a stage holds, relative to `lxmert.encoder.{stage}.N.`."""
    cfg = LxmertConfig.tiny(l_layers=1, x_layers=1, r_layers=1)
    return list((_XLayer(cfg) if stage == "x_layers" else _Layer(cfg)).state_dict())


def _infer_config(sd: Mapping[str, Tensor], declared: Mapping[str, Any], source: str) -> LxmertConfig:
    """The configuration of an LXMERT state dict, or an error saying why it cannot be told for sure.

    `declared` is a Hugging Face `config.json` (possibly empty): its head and layer counts are used. Without it,
    the weights say nothing about the heads, so only the released size (hidden 768, 9/5/5 layers) is accepted.
    """

    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise AdvlabValueError(
                f"Expected the checkpoint {source} to contain backbone key {key!r} (needed to infer the config), but "
                "it is missing; is this an LXMERT checkpoint? Pass `config=` to load it anyway."
            )
        return tuple(sd[key].shape)

    vocab = shape("lxmert.embeddings.word_embeddings.weight")[0]
    counts = {
        name: layer_count(sd, f"lxmert.encoder.{stage}", _stage_suffixes(stage), source=source, allow_empty=True)
        for name, stage in _STAGES.items()
    }
    hidden = majority_size(
        sd,
        ["lxmert.embeddings.word_embeddings.weight", "lxmert.embeddings.position_embeddings.weight"]
        + [k for k in sd if k.startswith("lxmert.encoder.") and k.endswith("LayerNorm.weight")],
        -1,
        what="hidden size",
        source=source,
    )
    inter_keys = [
        k for k in sd if k.startswith("lxmert.") and k.endswith(("intermediate.dense.weight", "_inter.dense.weight"))
    ]
    inter = majority_size(sd, inter_keys, 0, what="intermediate size", source=source) if inter_keys else 4 * hidden
    kwargs: dict[str, Any] = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        **counts,
        "visual_feat_dim": shape("lxmert.encoder.visn_fc.visn_fc.weight")[1],
        "visual_pos_dim": shape("lxmert.encoder.visn_fc.box_fc.weight")[1],
        "max_position_embeddings": shape("lxmert.embeddings.position_embeddings.weight")[0],
        "type_vocab_size": shape("lxmert.embeddings.token_type_embeddings.weight")[0],
    }
    for key, field_name in (
        ("answer_head.logit_fc.3.weight", "num_qa_labels"),
        ("obj_predict_head.decoder_dict.obj.weight", "num_object_labels"),
        ("obj_predict_head.decoder_dict.attr.weight", "num_attr_labels"),
    ):
        if key in sd:
            kwargs[field_name] = sd[key].shape[0]
    heads = declared.get("num_attention_heads")
    if isinstance(heads, int) and not isinstance(heads, bool) and heads > 0:
        # a Hugging Face folder: its config.json says how many heads and layers; missing layer keys are then listed
        for name in _STAGES:
            value = declared.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                kwargs[name] = value
        clash = [
            f"{name} {declared[name]} in config.json, {kwargs[name]} in the tensors"
            for name in ("vocab_size", "hidden_size", "intermediate_size", "visual_feat_dim")
            if name in declared and declared[name] != kwargs[name]
        ]
        if clash:
            raise AdvlabValueError(
                f"Expected the config.json beside {source} to describe its tensors, but {'; '.join(clash)}. "
                "Pass `config=`."
            )
        return LxmertConfig(**kwargs, num_attention_heads=heads)
    base = LxmertConfig.base()
    found = ", ".join(f"{k}={kwargs[k]}" for k in ("hidden_size", "intermediate_size", *_STAGES))
    if hidden != base.hidden_size:
        raise AdvlabValueError(
            f"Cannot infer the LXMERT configuration from {source}: the number of attention heads is not stored in the "
            f"weights, there is no Hugging Face config.json beside them, and hidden size {hidden} is not the released "
            f"model's (768, 12 heads). Pass `config=LxmertConfig({found}, num_attention_heads=..., ...)` with the "
            "model's number of attention heads."
        )
    released = (base.intermediate_size, base.l_layers, base.x_layers, base.r_layers)
    if (inter, counts["l_layers"], counts["x_layers"], counts["r_layers"]) != released:
        absent = [
            f"lxmert.encoder.{stage}.{i}.*"
            for name, stage in _STAGES.items()
            for i in range(counts[name], getattr(base, name))
        ]
        raise AdvlabValueError(
            f"Cannot infer the LXMERT configuration from {source}: hidden size 768 is the released model, which has "
            f"intermediate size 3072 and 9 language, 5 cross-modality and 5 relationship layers, but the checkpoint "
            f"has {found}"
            + (f" (missing: {absent[:6]}{' ...' if len(absent) > 6 else ''})" if absent else "")
            + ". If the file is complete and the model really has this shape, pass `config=LxmertConfig("
            f"{found}, num_attention_heads=...)` with its number of attention heads."
        )
    logger.info(
        "Inferred the configuration of %s from its shapes: the released LXMERT with %d attention heads (the head "
        "count is not stored in the weights; pass `config=` for another one).",
        source,
        base.num_attention_heads,
    )
    return LxmertConfig(**kwargs, num_attention_heads=base.num_attention_heads)


_M = TypeVar("_M", bound=nn.Module)


def _from_pretrained(
    cls: type[_M],
    source: str | os.PathLike[str] | Mapping[str, Tensor],
    config: LxmertConfig | None,
    heads: dict[str, Any],
    remap: tuple[Sequence[str] | Mapping[str, int], Sequence[str] | Mapping[str, int] | None] | None = None,
    expected_sha256: str | None = None,
    output_loading_info: bool = False,
) -> Any:
    name = "the state dict given"
    if isinstance(source, (str, os.PathLike)):
        raw, file = read_state_dict(source, expected_sha256=expected_sha256, argument="source")
        name = repr(file)
    elif isinstance(source, Mapping):
        if expected_sha256 is not None:
            raise AdvlabValueError("Expected `expected_sha256` only with a checkpoint file, but got a state dict.")
        raw = dict(source)
    else:
        raise AdvlabTypeError(
            f"Expected `source` to be a checkpoint path or a state dict, but got {type(source).__name__}."
        )
    if config is not None:
        _check_config(config)
    sd = convert_lxmert_state_dict(raw, hidden_size=None if config is None else config.hidden_size)
    unknown = sorted(k for k in sd if not k.startswith(("lxmert.", *_HEAD_PREFIXES)))
    if unknown:
        raise AdvlabValueError(
            f"Expected only LXMERT backbone and head keys in {name}, but got {len(unknown)} unknown: {unknown[:10]}"
            f"{' ...' if len(unknown) > 10 else ''}."
        )
    if config is None:
        config = _infer_config(sd, config_json_beside(source), name)

    # Build the model asked for; the QA head takes the file's size unless told otherwise.
    if issubclass(cls, LxmertForQuestionAnswering):
        num = heads.get("num_answers")
        if num is None and remap is None and "answer_head.logit_fc.3.weight" in sd:
            num = sd["answer_head.logit_fc.3.weight"].shape[0]
        model: nn.Module = cls(config, num)
    else:
        model = cls(config)

    expected = model.state_dict()
    prefix = "" if isinstance(model, LxmertModel) else "lxmert."
    target: dict[str, Tensor] = {}
    backbone = {k[len("lxmert.") :]: v for k, v in sd.items() if k.startswith("lxmert.")}
    bb_keys = [k[len(prefix) :] for k in expected if k.startswith(prefix)]
    missing = sorted(k for k in bb_keys if k not in backbone)
    if missing:
        raise AdvlabValueError(
            f"Expected every backbone key in {name}, but {len(missing)} are missing: {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}. Check the layer counts (the released model is 9/5/5)."
        )
    extra_bb = sorted(k for k in backbone if k not in bb_keys)
    if extra_bb:
        raise AdvlabValueError(
            f"Expected only backbone keys of a {config.l_layers}/{config.r_layers}/{config.x_layers}-layer LXMERT "
            f"under `bert.` / `lxmert.` in {name}, but got {len(extra_bb)} unknown: {extra_bb[:10]}."
        )
    for k in bb_keys:
        target[prefix + k] = backbone[k]

    head_sd = {k: v for k, v in sd.items() if not k.startswith("lxmert.")}
    if remap is not None:
        weight, bias = head_sd.get("answer_head.logit_fc.3.weight"), head_sd.get("answer_head.logit_fc.3.bias")
        if weight is None or bias is None:
            raise AdvlabValueError(
                f"Expected a QA answer head (`answer_head.logit_fc.3`) in {name} to remap, but none."
            )
        answers, pretrain_answers = remap
        assert pretrain_answers is not None
        head_sd["answer_head.logit_fc.3.weight"], head_sd["answer_head.logit_fc.3.bias"] = remap_answer_rows(
            weight, bias, answers=answers, source_answers=pretrain_answers
        )
    dropped: list[str] = []
    mismatched: list[str] = []
    for k, v in head_sd.items():
        if k not in expected:
            dropped.append(k)
        elif tuple(expected[k].shape) != tuple(v.shape):
            mismatched.append(f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}")
        else:
            target[k] = v
    tied = "cls.predictions.decoder.weight"
    if tied in expected and tied not in target:
        target[tied] = target["lxmert.embeddings.word_embeddings.weight"]  # tied: absent from safetensors files
    report = LoadReport(
        renamed=sum(old != new for old, new in zip(raw, sd)),
        dropped=sorted(dropped),
        fresh=sorted(k for k in expected if k not in target),
        mismatched=mismatched,
    )
    check_shapes(target, expected, source=name, model=f"{cls.__name__}({config})")
    model.load_state_dict(target, strict=False)
    report.log(logger, cls.__name__, name)
    model.eval()  # as transformers' from_pretrained: call .train() to fine-tune
    return (model, report) if output_loading_info else model  # type: ignore[return-value]


def remap_answer_rows(
    weight: Tensor,
    bias: Tensor,
    *,
    answers: Sequence[str] | Mapping[str, int],
    source_answers: Sequence[str] | Mapping[str, int],
    normalize: Callable[[str], str] | None = None,
) -> tuple[Tensor, Tensor]:
    """Build a task's answer-classifier rows from a pre-trained QA head, as the original `--loadLXMERTQA` does.

    Row `i` of the result (the task's answer with label `i`) is a copy of the source row of the same answer if the
    source has it, and zeros otherwise. (The original also normalises the task's answer strings first: pass that
    function as `normalize`.)

    Args:
        weight: Source classifier weight (`answer_head.logit_fc.3.weight`, 9500 rows in `model_LXRT.pth`).
        bias: Source classifier bias.
        answers: The task's answers in label order, or answer -> label (`trainval_ans2label.json`).
        source_answers: The source head's answers in row order, or answer -> row (`all_ans.json`).
        normalize: Applied to each task answer before the look-up.

    Returns:
        `(weight, bias)` for the task head; new tensors.

    Shape:
        weight: [s, d] -> [len(answers), d]
        bias: [s] -> [len(answers)]

    Examples:
        >>> w, b = remap_answer_rows(torch.eye(3), torch.arange(3.0), answers=["c", "x"], source_answers=["a", "b", "c"])
        >>> w
        tensor([[0., 0., 1.],
                [0., 0., 0.]])
        >>> b
        tensor([2., 0.])
    """
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise AdvlabValueError(f"Expected `weight` to be a 2-d tensor, but got {getattr(weight, 'shape', weight)}.")
    if not isinstance(bias, Tensor) or tuple(bias.shape) != (weight.shape[0],):
        raise AdvlabValueError(
            f"Expected `bias` to have shape {(weight.shape[0],)}, but got {tuple(getattr(bias, 'shape', ()))}."
        )

    def as_index(name: str, table: Sequence[str] | Mapping[str, int]) -> dict[str, int]:
        if isinstance(table, Mapping):
            index = dict(table)
        elif isinstance(table, Sequence) and not isinstance(table, str):
            index = {a: i for i, a in enumerate(table)}
        else:
            raise AdvlabTypeError(
                f"Expected `{name}` to be a list of answers or a mapping answer -> index, but got {type(table).__name__}."
            )
        if sorted(index.values()) != list(range(len(index))):
            raise AdvlabValueError(f"Expected the indices of `{name}` to be 0..{len(index) - 1}, each once.")
        return index

    target, source = as_index("answers", answers), as_index("source_answers", source_answers)
    if len(source) != weight.shape[0]:
        raise AdvlabValueError(
            f"Expected `source_answers` to list one answer per row of `weight` ({weight.shape[0]}), but got {len(source)}."
        )
    new_w = weight.new_zeros(len(target), weight.shape[1])
    new_b = bias.new_zeros(len(target))
    for answer, label in target.items():
        key = normalize(answer) if normalize is not None else answer
        row = source.get(key)
        if row is not None:
            new_w[label] = weight[row]
            new_b[label] = bias[row]
    return new_w, new_b
