"""Metrics of the classification experiment: accuracy, macro-F1, robust accuracy, paraphrase accuracy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from advlab._errors import AdvlabError, AdvlabValueError
from advlab.experiments.classification.config import SITE, ClassificationConfig
from advlab.experiments.classification.data import ClassificationData, Split, _tokenize, collate


def _check_pair(predictions: Tensor, targets: Tensor) -> None:
    if predictions.dim() != 1 or predictions.shape != targets.shape or predictions.numel() == 0:
        raise AdvlabValueError(
            f"Expected `predictions` and `targets` to be non-empty 1-d tensors of one shape, but got "
            f"{tuple(predictions.shape)} and {tuple(targets.shape)}."
        )


def accuracy(predictions: Tensor, targets: Tensor) -> float:
    """Fraction of correct predictions.

    Args:
        predictions: Predicted class indices.
        targets: True class indices.

    Shape:
        predictions, targets: [n].

    Examples:
        >>> accuracy(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]))
        0.75
    """
    _check_pair(predictions, targets)
    return float((predictions == targets).double().mean())


def macro_f1(predictions: Tensor, targets: Tensor) -> float:
    """Unweighted mean over classes of F1 = 2 TP / (2 TP + FP + FN).

    The classes are those that occur in `targets` or `predictions` (a class neither present nor
    predicted has no F1), as scikit-learn's `f1_score(average="macro")` does.

    Args:
        predictions: Predicted class indices.
        targets: True class indices.

    Shape:
        predictions, targets: [n].

    Examples:
        >>> round(macro_f1(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 1])), 4)  # F1 2/3, 1/2, 0
        0.3889
    """
    _check_pair(predictions, targets)
    scores = []
    for c in torch.unique(torch.cat([predictions, targets])).tolist():
        tp = int(((predictions == c) & (targets == c)).sum())
        fp = int(((predictions == c) & (targets != c)).sum())
        fn = int(((predictions != c) & (targets == c)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def robust_accuracy(
    model: Any, split: Split, config: ClassificationConfig, *, seed: int = 0
) -> dict[str, float]:
    """Accuracy under a PGD attack on the word embeddings at each of `config.radii`.

    `advlab.evaluate_robustness` with an L2 ball per caption whose radius is a fraction of the
    caption's clean embedding norm (`Perturbation(relative=True)`), `config.attack_steps` PGD
    steps of 2.5 / steps of the radius, masked by `attention_mask`, in eval mode.

    Args:
        model: The classifier.
        split: The split attacked (the test split in the experiment).
        config: Radii, steps and batch size.
        seed: Seed of the attack's generator.

    Returns:
        `{f"{radius:g}": accuracy}`.
    """
    import advlab

    # batches of captions of similar length: less padding to attack (accuracy is a per-caption mean)
    order = split.attention_mask.sum(1).argsort(stable=True).tolist()
    examples = [split.examples()[i] for i in order]
    batches = [collate(examples[i : i + config.eval_batch]) for i in range(0, len(examples), config.eval_batch)]
    table = advlab.evaluate_robustness(
        model, batches, perturbations={"txt": advlab.Perturbation(norm="l2", relative=True)}, radii=config.radii,
        forward=lambda b: model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]),
        targets=lambda b: b["labels"], sites={"txt": SITE},
        masks=lambda b: {"txt": b["attention_mask"].bool()}, steps=config.attack_steps,
        generator=torch.Generator().manual_seed(seed), progress=False,
    )
    return {f"{row['radius']:g}": float(row["metric"]) for row in table.rows}


def paraphrased(split: Split, tokenizer: Any) -> tuple[Split, int] | None:
    """The split with WordNet-paraphrased captions (same labels) and how many captions changed; None without WordNet.

    Args:
        split: The split.
        tokenizer: The configured `tokenizers.Tokenizer` of the experiment.

    Returns:
        The paraphrased split and the count of changed captions, or None when
        `advlab.data.paraphrase` or its WordNet data is not available.
    """
    try:
        from advlab.data.paraphrase import WordNetParaphraser

        paraphraser = WordNetParaphraser()
    except (ImportError, OSError, LookupError, AdvlabError):  # module, WordNet files or nltk missing
        return None
    results = paraphraser.paraphrase_all(split.texts)
    texts = [p.text for p in results]
    ids, mask = _tokenize(tokenizer, texts)
    changed = sum(t != s for t, s in zip(texts, split.texts))
    return Split(texts, split.labels, ids, mask), changed


def evaluate_split(model: Any, split: Split, config: ClassificationConfig) -> dict[str, float]:
    """Accuracy and macro-F1 of the model on a split (eval mode).

    Args:
        model: The classifier.
        split: The split.
        config: Evaluation batch size.

    Returns:
        `{"acc", "f1"}` in fractions.
    """
    from advlab.experiments.classification.training import predict

    pred = predict(model, split, config.eval_batch)
    return {"acc": accuracy(pred, split.labels), "f1": macro_f1(pred, split.labels)}


def evaluate_all(
    model: Any,
    data: ClassificationData,
    config: ClassificationConfig,
    *,
    tokenizer: Any | None,
    seed: int,
    splits: Sequence[str] = ("val", "test"),
) -> dict[str, Any]:
    """Every metric of a finished run: clean metrics per split; on test also robust and paraphrase accuracy.

    Args:
        model: The trained classifier.
        data: The splits.
        config: The run's settings.
        tokenizer: For the paraphrased captions (None: no paraphrase column).
        seed: Seed of the attack.
        splits: Which splits to evaluate (`"val"` only while tuning).

    Returns:
        `{"val": {...}, "test": {...}, "robust": {radius: acc}, "paraphrase": {...} or None}`.
    """
    out: dict[str, Any] = {s: evaluate_split(model, getattr(data, s), config) for s in splits}
    if "test" in splits:
        out["robust"] = robust_accuracy(model, data.test, config, seed=seed)
        para = paraphrased(data.test, tokenizer) if tokenizer is not None else None
        out["paraphrase"] = None if para is None else {**evaluate_split(model, para[0], config), "changed": para[1]}
    return out
