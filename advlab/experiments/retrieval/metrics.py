"""Metrics of the retrieval experiment: Recall@K, ITM re-ranking, evaluation of a split and the baseline gate."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from advlab._errors import AdvlabValueError, NonFiniteError
from advlab.experiments.retrieval.config import RetrievalConfig
from advlab.experiments.retrieval.data import SplitTensors
from advlab.experiments.retrieval.model import RetrievalModel, _Encoded


def recall_at_k(scores: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Recall@K of a square score matrix whose true match of query i is gallery item i.

    The rank of the true item is the number of gallery items scoring strictly higher
    (ties favour the true item). Non-finite scores are refused: NaN compares False with
    everything, so a NaN matrix would rank every true item first.

    Args:
        scores: Query × gallery scores.
        ks: The K values.

    Returns:
        K -> fraction of queries whose true item ranks in the top K.

    Raises:
        AdvlabValueError: `scores` is not square.
        NonFiniteError: `scores` holds NaN or inf.

    Shape:
        scores: [n, n].

    Examples:
        >>> s = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.3, 0.2, 0.1]])
        >>> recall_at_k(s, ks=(1, 2))
        {1: 0.3333333333333333, 2: 0.6666666666666666}
    """
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise AdvlabValueError(f"Expected a square [n, n] score matrix, but got shape {tuple(scores.shape)}.")
    _require_finite(scores, "scores")
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


def _require_finite(scores: Tensor, what: str) -> None:
    bad = ~torch.isfinite(scores)
    if bool(bad.any()):
        rows = int(bad.any(dim=-1).sum()) if scores.dim() > 1 else 1
        raise NonFiniteError(
            f"Expected finite {what}, but {int(bad.sum())} of {scores.numel()} are NaN or inf ({rows} of "
            f"{scores.shape[0] if scores.dim() else 1} rows); a model with non-finite outputs has no rank."
        )


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

    Raises:
        NonFiniteError: The model's ITC similarities or ITM scores hold NaN or inf (for example
            after training diverged): such a model is refused, never ranked.
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
        _require_finite(sim, f"ITC similarities of the {model.backbone_name} model on this {len(split)}-pair split")
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
                _require_finite(itm, f"ITM match scores of the {model.backbone_name} model")
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

    Raises:
        AdvlabValueError: A value is not a finite number in [0, 1], or `n_val` < 1.

    Examples:
        >>> check_gate([0.10, 0.12], 64)[0], check_gate([0.02], 64)[0]
        (True, False)
    """
    if n_val < 1:
        raise AdvlabValueError(f"Expected `n_val` >= 1 (the validation gallery size), but got {n_val}.")
    bad = [v for v in val_r1 if not (math.isfinite(v) and 0.0 <= v <= 1.0)]
    if bad:
        raise AdvlabValueError(f"Expected `val_r1` values that are finite fractions in [0, 1], but got {bad}.")
    chance = 1.0 / n_val
    mean = sum(val_r1) / max(1, len(val_r1))
    ok = bool(val_r1) and mean >= factor * chance
    line = (
        f"gate: baseline validation R@1 {mean:.3f} vs {factor:g} x chance {factor * chance:.3f} "
        f"(chance 1/{n_val}) -> {'PASS' if ok else 'FAIL'}"
    )
    return ok, line
