"""Metrics of the retrieval experiment: Recall@K, ITM re-ranking, evaluation of a split, robustness, the gate.

Robustness of a trained model on the test split (`evaluate_robustness`) has two parts:

- **paraphrases**: R@1 with every test caption replaced by its paraphrase (WordNet synonym
  substitution, `paraphrase_split`), against R@1 on the original captions; also over only the
  captions whose model input changed;
- **attacks**: robust R@1 under embedding-space PGD (`advlab.attacks.attack_retrieval`) on the
  query side, at radii relative to each row's clean norm at the site: a text attack on the
  captions (image retrieval) and an image attack on the region features (text retrieval).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from advlab._errors import AdvlabError, AdvlabTypeError, AdvlabValueError, NonFiniteError
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


def _ranks(scores: Tensor) -> Tensor:
    """0-based rank of each query's true item (the diagonal): gallery items scoring strictly higher."""
    _require_finite(scores, "scores")
    return (scores > scores.diagonal().unsqueeze(1)).sum(dim=1)  # [n]


def _encode_split(model: RetrievalModel, split: SplitTensors, config: RetrievalConfig) -> tuple[_Encoded, _Encoded]:
    """Text and image encodings of a whole split, `eval_batch` pairs per forward."""
    texts, images = [], []
    for i in range(0, len(split), config.eval_batch):
        sl = slice(i, i + config.eval_batch)
        texts.append(model.encode_text(split.input_ids[sl], split.attention_mask[sl]))
        images.append(model.encode_image(split.features[sl], split.boxes[sl]))
    text = _Encoded(torch.cat([t.joint_in for t in texts]), torch.cat([t.mask for t in texts]),  # type: ignore[misc]
                    torch.cat([t.itc for t in texts]))
    image = _Encoded(torch.cat([v.joint_in for v in images]), None, torch.cat([v.itc for v in images]))
    return text, image


@torch.no_grad()
def split_ranks(model: RetrievalModel, split: SplitTensors, config: RetrievalConfig) -> dict[str, Tensor]:
    """Per-query 0-based ranks of the true item: image retrieval (IR) and text retrieval (TR), final and ITC-only.

    The ranking is `evaluate`'s: the full gallery by ITC, each query's ITC top-`rerank_k`
    re-ranked by ITM when `itm_weight` > 0. Ties favour the true item.

    Args:
        model: The trained model (evaluated in eval mode, left in train mode).
        split: A split with one image per caption.
        config: Run settings (`rerank_k`, `eval_batch`, `itm_weight`).

    Returns:
        `ir`, `tr` (final ranks) and `itc_ir`, `itc_tr` (ITC only): caption i's query in IR is
        row i, image i's query in TR is row i.

    Raises:
        NonFiniteError: The model's ITC similarities or ITM scores hold NaN or inf.

    Shape:
        - every output: [n], n = len(split)
    """
    model.eval()
    try:
        text, image = _encode_split(model, split, config)
        sim = text.itc @ image.itc.t()  # [n, n] captions × images
        _require_finite(sim, f"ITC similarities of the {model.backbone_name} model on this {len(split)}-pair split")
        n = sim.shape[0]
        out = {"itc_ir": _ranks(sim), "itc_tr": _ranks(sim.t())}
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
            out[name] = _ranks(final)
        return out
    finally:
        model.train()


def _recall(ranks: Tensor, k: int) -> float:
    return int((ranks < k).sum()) / ranks.numel()


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
    ranks = split_ranks(model, split, config)
    out: dict[str, float] = {"n": float(len(split))}
    out["itc_ir_r1"], out["itc_tr_r1"] = _recall(ranks["itc_ir"], 1), _recall(ranks["itc_tr"], 1)
    for name in ("ir", "tr"):
        for kk in (1, 5, 10):
            out[f"{name}_r{kk}"] = _recall(ranks[name], kk)
    out["r1"] = (out["ir_r1"] + out["tr_r1"]) / 2
    return out


# ----------------------------------------------------------------------------------------------------------
# Robustness: paraphrased captions and embedding-space PGD
# ----------------------------------------------------------------------------------------------------------


class _Paraphrase(Protocol):
    text: str
    substitutions: Sequence[tuple[str, str]]


class Paraphraser(Protocol):
    """Anything with `paraphrase_all(captions)` -> one result per caption, each with `text` and `substitutions`.

    `advlab.data.paraphrase.WordNetParaphraser` is one.
    """

    def paraphrase_all(self, captions: Sequence[str]) -> Sequence[_Paraphrase]:
        """One paraphrase per caption, in order, deterministic."""
        ...


Tokenizer = Callable[[list[str]], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class ParaphrasedCaptions:
    """A split's captions after paraphrasing, tokenised like the split.

    A caption with no substitution keeps its original token ids bit for bit. `changed` marks the
    captions whose model input differs from the original (a substitution past the token limit,
    or one that tokenises the same, changes nothing).

    Attributes:
        input_ids: Token ids of the paraphrased captions. Shape [n, L].
        attention_mask: True at real tokens. Shape [n, L].
        changed: True where the input ids differ from the original. Shape [n].
        texts: The paraphrased captions.
        substitutions: Each caption's `(word, synonym)` pairs.
        source: What made them (the paraphraser's class name).
        key: Digest of the token ids and masks (records store it: other paraphrases, other key).

    Examples:
        >>> ids = torch.tensor([[1, 5, 2], [1, 6, 2]])
        >>> p = ParaphrasedCaptions(ids, ids != 0, torch.tensor([False, True]), ("a", "b"), ((), (("x", "y"),)), "test")
        >>> p.n_changed, len(p.key)
        (1, 16)
    """

    input_ids: Tensor
    attention_mask: Tensor
    changed: Tensor
    texts: tuple[str, ...]
    substitutions: tuple[tuple[tuple[str, str], ...], ...]
    source: str
    key: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.key:
            digest = hashlib.sha256()
            for t in (self.input_ids, self.attention_mask):
                digest.update(str(tuple(t.shape)).encode())
                digest.update(t.to(torch.int64).contiguous().numpy().tobytes())
            object.__setattr__(self, "key", digest.hexdigest()[:16])

    @property
    def n_changed(self) -> int:
        """Captions whose model input changed."""
        return int(self.changed.sum())


def _pad_to(t: Tensor, width: int) -> Tensor:
    return t if t.shape[1] >= width else F.pad(t, (0, width - t.shape[1]))


def paraphrase_split(
    split: SplitTensors, captions: Sequence[str], *, paraphraser: Paraphraser, tokenizer: Tokenizer
) -> ParaphrasedCaptions:
    """Paraphrase a split's captions and tokenise the changed ones; the others keep their token ids.

    Args:
        split: The split (its `input_ids` are the originals' tokens).
        captions: The split's caption texts, in its row order.
        paraphraser: Gives each caption's paraphrase (`paraphrase_all`, deterministic).
        tokenizer: texts -> (ids [m, L'], mask [m, L']), the one that tokenised the split.

    Returns:
        The paraphrased captions.

    Raises:
        AdvlabValueError: `captions` has not one caption per row, the paraphraser returned another
            number of results, or `tokenizer` does not give the split's tokens for the
            original captions (the captions are not the split's).

    Shape:
        - captions: n = len(split); output tensors: [n, max(L, L')]

    Examples:
        >>> from types import SimpleNamespace as NS
        >>> vocab = {"a": 3, "red": 4, "crimson": 5, "cat": 6}
        >>> def tok(texts):
        ...     ids = torch.zeros(len(texts), 4, dtype=torch.long)
        ...     for i, t in enumerate(texts):
        ...         ids[i, : len(t.split())] = torch.tensor([vocab[w] for w in t.split()])
        ...     return ids, ids != 0
        >>> class Swap:
        ...     def paraphrase_all(self, caps):
        ...         return [NS(text=c.replace("red", "crimson"), substitutions=(("red", "crimson"),) if "red" in c else ())
        ...                 for c in caps]
        >>> caps = ["a red cat", "a cat"]
        >>> ids, mask = tok(caps)
        >>> split = SplitTensors(ids, mask, torch.zeros(2, 1, 1), torch.zeros(2, 1, 4), torch.arange(2))
        >>> p = paraphrase_split(split, caps, paraphraser=Swap(), tokenizer=tok)
        >>> p.input_ids.tolist(), p.changed.tolist(), p.substitutions
        ([[3, 5, 6, 0], [3, 6, 0, 0]], [True, False], ((('red', 'crimson'),), ()))
    """
    captions = list(captions)
    n = len(split)
    if len(captions) != n:
        raise AdvlabValueError(f"Expected one caption per row of the split ({n}), but got {len(captions)}.")
    if not hasattr(paraphraser, "paraphrase_all"):
        raise AdvlabTypeError(
            f"Expected `paraphraser` to have `paraphrase_all(captions)`, but got {type(paraphraser).__name__}."
        )
    ids0, _ = tokenizer(captions)
    if tuple(ids0.shape) != tuple(split.input_ids.shape) or not torch.equal(ids0, split.input_ids):
        raise AdvlabValueError(
            "Expected `tokenizer` to give the split's token ids for `captions`, but they differ "
            f"(shapes {tuple(ids0.shape)} and {tuple(split.input_ids.shape)}): these are not the split's captions, "
            "or not its tokenizer."
        )
    results = list(paraphraser.paraphrase_all(captions))
    if len(results) != n:
        raise AdvlabValueError(f"Expected the paraphraser to return {n} results, one per caption, but got {len(results)}.")
    subs = tuple(tuple((str(a), str(b)) for a, b in r.substitutions) for r in results)
    texts = tuple(r.text if s else c for r, s, c in zip(results, subs, captions))
    rows = [i for i, s in enumerate(subs) if s]
    width = split.input_ids.shape[1]
    new_ids, new_mask = split.input_ids.clone(), split.attention_mask.clone()
    if rows:
        ids1, mask1 = tokenizer([texts[i] for i in rows])
        width = max(width, ids1.shape[1])
        new_ids, new_mask = _pad_to(new_ids, width), _pad_to(new_mask, width)
        new_ids[rows] = _pad_to(ids1, width).to(new_ids.dtype)
        new_mask[rows] = _pad_to(mask1, width).to(new_mask.dtype)
    changed = (new_ids != _pad_to(split.input_ids, width)).any(dim=1)
    return ParaphrasedCaptions(new_ids, new_mask, changed, texts, subs, type(paraphraser).__name__)


# Relative l2 radii of the attacks: fractions of each caption's (image's) clean norm at the site
# (median ≈ 3.0 for a caption's word embeddings, ≈ 23 for an image's 5 CRAFT regions), chosen on
# the quick default's baseline seed 0: 0.01 leaves R@1 at 60-70 % of clean, 0.05 at 10-20 %, 0.1
# at 0 (docs/reproducing.md, Robustness).
TEXT_RADII: tuple[float, ...] = (0.005, 0.01, 0.02, 0.05)
IMAGE_RADII: tuple[float, ...] = (0.005, 0.01, 0.02, 0.05)


@dataclass(frozen=True)
class RobustnessSpec:
    """What `evaluate_robustness` measures: attack radii and steps, and the paraphrased test captions.

    The attacks are PGD in the l2 ball of relative radius ε (a fraction of each row's clean
    norm at the site, `Perturbation(relative=True)`), from δ = 0, `steps` normalised-gradient
    steps of `step_factor × ε / steps`, deterministic. Robust R@1 at ε counts a query as lost
    when any radius up to ε found a δ that ranks its true item below first (a δ inside a smaller
    ball is inside the larger one), so it never increases with ε.

    Args:
        text_radii: Relative radii of the text attack (on the captions: image retrieval).
        image_radii: Relative radii of the image attack (on the region features: text retrieval).
        steps: PGD steps per radius.
        step_factor: The step size is `step_factor × radius / steps`.
        paraphrased: The test split's paraphrased captions; None: no paraphrase column.
        paraphrase_missing: Why there is no paraphrase column (shown in the report).

    Raises:
        AdvlabValueError: Empty, negative, non-finite or repeated radii, `steps` < 1, or a
            non-positive `step_factor`.

    Examples:
        >>> RobustnessSpec(text_radii=(0.2, 0.1)).text_radii
        (0.1, 0.2)
        >>> RobustnessSpec(image_radii=())
        Traceback (most recent call last):
        ...
        advlab._errors.AdvlabValueError: Expected `image_radii` to be distinct finite numbers >= 0 (at least one), but got ().
    """

    text_radii: tuple[float, ...] = TEXT_RADII
    image_radii: tuple[float, ...] = IMAGE_RADII
    steps: int = 10
    step_factor: float = 2.5  # Madry et al.'s 2.5 ε / steps: the ball's far side is reachable from its centre
    paraphrased: ParaphrasedCaptions | None = None
    paraphrase_missing: str | None = None

    def __post_init__(self) -> None:
        for name in ("text_radii", "image_radii"):
            radii = tuple(getattr(self, name))
            ok = bool(radii) and all(
                not isinstance(r, bool) and isinstance(r, (int, float)) and math.isfinite(r) and r >= 0 for r in radii
            )
            if not ok or len(set(radii)) < len(radii):
                raise AdvlabValueError(
                    f"Expected `{name}` to be distinct finite numbers >= 0 (at least one), but got {radii!r}."
                )
            object.__setattr__(self, name, tuple(sorted(float(r) for r in radii)))
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise AdvlabValueError(f"Expected `steps` to be an int >= 1, but got {self.steps!r}.")
        if not (isinstance(self.step_factor, (int, float)) and math.isfinite(self.step_factor) and self.step_factor > 0):
            raise AdvlabValueError(f"Expected `step_factor` to be a finite number > 0, but got {self.step_factor!r}.")

    @property
    def attack_key(self) -> str:
        """Digest of the attack settings (records computed with other settings are recomputed)."""
        blob = repr(("pgd", "l2", "relative", "zero-start", self.text_radii, self.image_radii, self.steps,
                     float(self.step_factor)))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def complete(self, block: Any) -> bool:
        """Whether a record's robustness entry (`last` or `best`) holds everything this spec measures.

        Args:
            block: The entry, or None.

        Returns:
            True when its attack key matches and, if this spec has paraphrases, its paraphrase
            key matches too.
        """
        if not isinstance(block, dict) or block.get("attack", {}).get("key") != self.attack_key:
            return False
        if self.paraphrased is None:
            return True
        return bool(block.get("paraphrase", {}).get("key") == self.paraphrased.key)


def split_captions(folder: str | os.PathLike[str], which: str = "test", *, split_seed: int = 0) -> list[str]:
    """The caption texts of one split of an image–caption folder, in the row order `prepare_data` gives it.

    Args:
        folder: The folder `prepare_data` read.
        which: `"train"`, `"val"` or `"test"`.
        split_seed: The split's seed (`prepare_data`'s `split_seed`).

    Returns:
        The captions (`paraphrase_split` checks them against the split's token ids).
    """
    from advlab.data.captions import ImageCaptionFolder

    if which not in ("train", "val", "test"):
        raise AdvlabValueError(f"Expected `which` to be 'train', 'val' or 'test', but got {which!r}.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # prepare_data already warned about skipped files
        splits = ImageCaptionFolder(folder).split(seed=split_seed)
    return [item.caption for item in getattr(splits, which)]


def robustness_spec(
    split: SplitTensors,
    captions: Sequence[str] | None,
    tokenizer: Tokenizer | None,
    *,
    paraphraser: Paraphraser | Callable[[], Paraphraser] | None = None,
    **settings: Any,
) -> RobustnessSpec:
    """A `RobustnessSpec` with the split's paraphrased captions, or without them and the reason why.

    This never raises for a missing paraphraser: WordNet not set up, `advlab.data.paraphrase`
    or nltk not importable, or captions that do not match the split, each leave the paraphrase
    column out with the error's message (the runs still finish, and the report says why).

    Args:
        split: The test split.
        captions: Its caption texts in row order (None: no paraphrases).
        tokenizer: The tokenizer that made the split's token ids.
        paraphraser: A paraphraser, a function making one, or None for
            `advlab.data.paraphrase.WordNetParaphraser()`.
        **settings: Other `RobustnessSpec` fields (radii, steps, step_factor).

    Returns:
        The spec.

    Examples:
        >>> def no_wordnet():
        ...     raise LookupError("WordNet not found; run scripts/setup_data.sh")
        >>> split = SplitTensors(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool),
        ...                      torch.zeros(2, 1, 1), torch.zeros(2, 1, 4), torch.arange(2))
        >>> spec = robustness_spec(split, ["a", "b"], lambda t: (torch.ones(len(t), 3, dtype=torch.long), None),
        ...                        paraphraser=no_wordnet)
        >>> spec.paraphrased is None, spec.paraphrase_missing
        (True, 'WordNet not found; run scripts/setup_data.sh')
    """
    try:
        if captions is None or tokenizer is None:
            raise AdvlabValueError("the test captions or their tokenizer were not given")
        if paraphraser is None:
            from advlab.data.paraphrase import WordNetParaphraser

            paraphraser = WordNetParaphraser()
        elif not hasattr(paraphraser, "paraphrase_all") and callable(paraphraser):
            paraphraser = paraphraser()
        paraphrased = paraphrase_split(split, captions, paraphraser=paraphraser, tokenizer=tokenizer)  # type: ignore[arg-type]
    except ImportError as err:
        return RobustnessSpec(**settings, paraphrase_missing=(
            f"{err}; the paraphrases need advlab.data.paraphrase and nltk (`pip install advlab[data]`)"))
    except (AdvlabError, LookupError, OSError) as err:
        return RobustnessSpec(**settings, paraphrase_missing=str(err))
    return RobustnessSpec(**settings, paraphrased=paraphrased)


def folder_robustness_spec(
    split: SplitTensors,
    folder: str | os.PathLike[str],
    *,
    max_length: int = 16,
    split_seed: int = 0,
    paraphraser: Paraphraser | Callable[[], Paraphraser] | None = None,
    **settings: Any,
) -> RobustnessSpec:
    """`robustness_spec` for the test split `prepare_data(folder)` made with its default MiniLM tokenizer.

    The captions are read again from `folder` and checked against the split's token ids; when
    they cannot be (another folder layout, another tokenizer), the paraphrase column is left out
    with the reason, as when WordNet is missing.

    Args:
        split: The test split.
        folder: The image–caption folder.
        max_length: `prepare_data`'s token limit.
        split_seed: `prepare_data`'s split seed.
        paraphraser: See `robustness_spec` (None: WordNet).
        **settings: Other `RobustnessSpec` fields.

    Returns:
        The spec.
    """
    try:
        from advlab.experiments.retrieval.data import _default_tokenizer

        captions: list[str] | None = split_captions(folder, "test", split_seed=split_seed)
        tokenizer: Tokenizer | None = _default_tokenizer(max_length)
    except (AdvlabError, ImportError, OSError) as err:
        return RobustnessSpec(**settings, paraphrase_missing=f"the test captions could not be read again: {err}")
    return robustness_spec(split, captions, tokenizer, paraphraser=paraphraser, **settings)


def _attack_side(
    model: RetrievalModel, split: SplitTensors, config: RetrievalConfig, spec: RobustnessSpec, modality: str
) -> dict[str, Any]:
    """One attack's clean R@1 and cumulative robust R@1 per radius; only queries still ranked first are attacked."""
    from advlab.attacks.retrieval import attack_retrieval
    from advlab.perturbation import Perturbation

    with torch.no_grad():
        model.eval()
        try:
            text, image = _encode_split(model, split, config)
        finally:
            model.train()
    sim = text.itc @ image.itc.t()  # [n, n] captions × images, as `split_ranks` ranks them
    worst = _ranks(sim if modality == "txt" else sim.t())  # clean ITC ranks of the queries
    clean_r1 = _r1(worst)
    gallery = image.itc if modality == "txt" else text.itc  # the other side, clean
    site = {modality: model.perturbation_sites()[modality]}
    radii = spec.text_radii if modality == "txt" else spec.image_radii
    r1, attacked = [], []
    for radius in radii:
        # a query already off first place stays lost (a δ of a smaller ball is inside this one): attack the others
        alive = (worst == 0).nonzero().flatten()
        attacked.append(int(alive.numel()))
        for i in range(0, alive.numel(), config.eval_batch):
            rows = alive[i : i + config.eval_batch]
            if modality == "txt":
                mask = split.attention_mask[rows]
                forward: Callable[[], Any] = partial(model.encode_text, split.input_ids[rows], mask)
                masks: dict[str, Tensor] | None = {"txt": mask}
            else:
                forward = partial(model.encode_image, split.features[rows], split.boxes[rows])
                masks = None
            out = attack_retrieval(
                model, sites=site, forward=forward, embed=lambda e: e.itc, gallery=gallery, targets=rows,
                perturbations={modality: Perturbation(spec.step_factor * radius / spec.steps, radius=radius,
                                                      relative=True)},
                temperature=config.temperature, steps=spec.steps, masks=masks,
            )
            worst[rows] = torch.maximum(worst[rows], out.ranks)
        r1.append(_r1(worst))
    return {"task": "ir" if modality == "txt" else "tr", "radii": list(radii), "clean_r1": clean_r1, "r1": r1,
            "attacked": attacked}


def _r1(ranks: Tensor) -> float:
    return int((ranks < 1).sum()) / ranks.numel()


def attack_robustness(
    model: RetrievalModel, split: SplitTensors, config: RetrievalConfig, spec: RobustnessSpec
) -> dict[str, Any]:
    """Robust R@1 under the text attack (image retrieval) and the image attack (text retrieval) at every radius.

    Ranks are by ITC (the attack moves the query; the gallery is embedded clean). A query counts
    as lost at ε when it is not first clean or an attack at any radius up to ε ranks its true item
    below first, so robust R@1 never increases with ε and never exceeds clean R@1. Radii are
    attacked from the smallest up, each on the queries still ranked first (the others are lost
    already), which makes the evaluation cheap when R@1 is low.

    Args:
        model: The trained model (attacked in eval mode; its parameters and mode are restored).
        split: The split (test).
        config: Run settings (`temperature` of the attack's cross-entropy, `eval_batch`).
        spec: Radii and steps.

    Returns:
        `{"key", "relative": True, "norm": "l2", "steps", "step_factor", "txt": side, "img": side}`;
        a side is `{"task": "ir" | "tr", "radii", "clean_r1" (ITC), "r1" (per radius),
        "attacked" (queries attacked per radius)}`, fractions of queries.
    """
    out: dict[str, Any] = {"key": spec.attack_key, "relative": True, "norm": "l2", "steps": spec.steps,
                           "step_factor": float(spec.step_factor)}
    for modality in ("txt", "img"):
        out[modality] = _attack_side(model, split, config, spec, modality)
    return out


def paraphrase_robustness(
    model: RetrievalModel, split: SplitTensors, config: RetrievalConfig, paraphrased: ParaphrasedCaptions
) -> dict[str, Any]:
    """Test R@1 on the original and on the paraphrased captions, overall and over the changed captions.

    Image retrieval's queries are the captions; text retrieval's gallery is the captions (a
    changed caption then is image i's true item). Over the changed captions, IR counts their
    queries and TR the queries of their images, each against the whole gallery.

    Args:
        model: The trained model.
        split: The split whose captions were paraphrased (same images).
        config: Run settings.
        paraphrased: `paraphrase_split(split, ...)`.

    Returns:
        `{"key", "source", "n", "n_changed", "n_substituted", "share_changed", "original",
        "paraphrased", "original_changed", "paraphrased_changed"}`; each of the last four is
        `{"ir_r1", "tr_r1", "r1"}` (None over the changed captions when none changed).

    Raises:
        AdvlabValueError: `paraphrased` has another number of rows than `split`.
    """
    n = len(split)
    if paraphrased.input_ids.shape[0] != n:
        raise AdvlabValueError(
            f"Expected paraphrased captions for the {n} rows of the split, but got {paraphrased.input_ids.shape[0]}."
        )
    para_split = replace(split, input_ids=paraphrased.input_ids, attention_mask=paraphrased.attention_mask)
    rows = paraphrased.changed
    out: dict[str, Any] = {
        "key": paraphrased.key, "source": paraphrased.source, "n": n, "n_changed": paraphrased.n_changed,
        "n_substituted": sum(1 for s in paraphrased.substitutions if s), "share_changed": paraphrased.n_changed / n,
    }
    for name, s in (("original", split), ("paraphrased", para_split)):
        ranks = split_ranks(model, s, config)
        ir, tr = _r1(ranks["ir"]), _r1(ranks["tr"])
        out[name] = {"ir_r1": ir, "tr_r1": tr, "r1": (ir + tr) / 2}
        if bool(rows.any()):
            ir, tr = _r1(ranks["ir"][rows]), _r1(ranks["tr"][rows])
            out[name + "_changed"] = {"ir_r1": ir, "tr_r1": tr, "r1": (ir + tr) / 2}
        else:
            out[name + "_changed"] = None
    return out


def evaluate_robustness(
    model: RetrievalModel, split: SplitTensors, config: RetrievalConfig, spec: RobustnessSpec
) -> dict[str, Any]:
    """Both robustness measurements of one model on one split, and their time.

    Args:
        model: The trained model.
        split: The test split.
        config: Run settings.
        spec: What to measure.

    Returns:
        `{"attack": attack_robustness(...), "paraphrase": paraphrase_robustness(...) or
        {"missing": reason}, "seconds"}`.

    Examples:
        >>> cfg = RetrievalConfig(layers=1, proj_dim=8)
        >>> m = RetrievalModel("uniter", cfg, vocab_size=20, hidden_size=16, num_attention_heads=2,
        ...                    intermediate_size=32, img_dim=6)
        >>> g = torch.Generator().manual_seed(0)
        >>> split = SplitTensors(torch.randint(1, 20, (6, 4), generator=g), torch.ones(6, 4, dtype=torch.bool),
        ...                      torch.randn(6, 5, 6, generator=g), torch.rand(6, 5, 4, generator=g).sort(-1).values,
        ...                      torch.arange(6))
        >>> out = evaluate_robustness(m, split, cfg, RobustnessSpec(text_radii=(0.0, 1.0), image_radii=(0.0, 1.0)))
        >>> side = out["attack"]["txt"]
        >>> side["r1"][0] == side["clean_r1"] >= side["r1"][1], out["paraphrase"]
        (True, {'missing': 'no paraphraser was given'})
    """
    t0 = time.perf_counter()
    out: dict[str, Any] = {"attack": attack_robustness(model, split, config, spec)}
    if spec.paraphrased is not None:
        out["paraphrase"] = paraphrase_robustness(model, split, config, spec.paraphrased)
    else:
        out["paraphrase"] = {"missing": spec.paraphrase_missing or "no paraphraser was given"}
    out["seconds"] = time.perf_counter() - t0
    return out


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
