"""In-domain pre-training of the retrieval model (VILLA's first stage): MLM, ITM with hard negatives, MRFR.

The `pt-*` arms pre-train on the training split only, then fine-tune with ITC as every other
arm does. The three tasks follow UNITER's pre-training:

- **MLM**: 15 % of a caption's word-pieces are chosen (never [CLS], [SEP] or padding; at least
  one per caption, as UNITER's `data/mlm.py`); of those 80 % become [MASK], 10 % a random
  word-piece, 10 % stay. The joint (caption + image) encoding at a chosen position predicts
  the original id through a transform (dense, GELU, LayerNorm) and a decoder tied to the
  word-embedding table plus a bias (BERT's and UNITER's head). Tied rather than a fresh linear:
  the table is MiniLM's pre-trained one (frozen by default), and a fresh 384 x 30522 decoder
  would add 11.7 M parameters to train from scratch on a few hundred captions.
- **ITM**: each caption with its image, with a hard negative image and each image with a hard
  negative caption, both drawn from the in-batch ITC softmax (the fine-tuning stage's
  `losses._mine_negatives`), scored by the model's own ITM head.
- **MRFR**: 15 % of an image's regions (after pooling to `config.grid`; at least one) are
  zeroed; the joint encoding at those positions regresses, through a head (linear, GELU,
  LayerNorm, linear to the feature width), onto the unmasked input features: the mean squared
  error over the masked regions' features. LXMERT-mini gets the same regression on its
  cross-modality vision output (LXMERT's own pre-training regresses the masked objects'
  features there too).

Conditional masking, as UNITER's: MLM sees the masked caption with the whole image, MRFR the
masked image with the whole caption. The three losses are summed at every step with
`config.pretrain_{mlm,itm,mrfr}_weight` (UNITER samples one task per mini-batch; the sum is
deterministic and lets one δ pair serve all three tasks).

Adversarial pre-training (`"adv"`) runs VILLA's free loop of the fine-tuning stage
(`training._fit`, VILLA joint at `config.txt_step` / `img_step`, `relative`, `adv_steps`,
`kl_weight`). Each site runs twice per forward, each call with its own δ: call 0 perturbs
the clean caption and image (ITM; the image side of MLM and the caption side of MRFR), call 1
the masked caption (MLM) and the masked image (MRFR). The KL compares the clean and perturbed
MLM distributions at the masked positions and the ITM distributions; MRFR has no
distribution and adds no KL term. No released code defines adversarial pre-training (VILLA's
was announced and never published), so this is advlab's reading of it.

Shape notation:
    - b: batch size; L: text positions; r: regions; h: hidden width; V: vocabulary;
      m: masked word-pieces in a batch; k: masked regions in a batch; d: feature width
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advlab._errors import AdvlabValueError
from advlab.experiments.retrieval.config import PRETRAIN_ARMS, RetrievalConfig
from advlab.experiments.retrieval.data import RetrievalData
from advlab.experiments.retrieval.losses import _mine_negatives
from advlab.experiments.retrieval.model import RetrievalModel, _Encoded, pool_grid
from advlab.experiments.retrieval.training import _arm_perturbations, _fit, _optimizer, _Stage
from advlab.regularizers import symmetric_kl
from advlab.sites import resolve_sites

__all__ = ["PretrainHeads", "mask_regions", "mask_tokens", "mrfr_loss", "pretrain_run"]

_MASK_SEED = 7_919  # the masking generator's seed is the run's seed + this (its own stream)
_HEAD_SEED = 104_729  # the heads' initialisation generator: seed + this


def _check_rate(rate: float, name: str) -> None:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate < 1:
        raise AdvlabValueError(f"Expected `{name}` to be in the open interval (0, 1), but got {rate!r}.")


def mask_tokens(
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    rate: float = 0.15,
    mask_token_id: int,
    random_low: int,
    vocab_size: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """BERT's masking as UNITER applies it: choose word-pieces, then 80 % [MASK], 10 % random, 10 % kept.

    A word-piece is a candidate when it is a real token (`attention_mask`) other than the first
    ([CLS]) and the last real one ([SEP]), as MiniLM's tokenizer lays a caption out (padding on
    the right). Each candidate is chosen with probability `rate`; a caption with candidates of
    which none was chosen gets one, drawn uniformly among them (UNITER's rule). Random
    replacements are drawn uniformly from `random_low` to `vocab_size - 1`.

    Args:
        input_ids: Token ids.
        attention_mask: True (or 1) at real tokens, a prefix of each row.
        rate: Probability of choosing a candidate, in (0, 1).
        mask_token_id: The [MASK] id.
        random_low: First id a random replacement may take.
        vocab_size: Rows of the word-embedding table.
        generator: The masking generator (every draw comes from it).

    Returns:
        The masked ids, and the labels: the original id at chosen positions, -100 elsewhere
        (`F.cross_entropy`'s `ignore_index`).

    Shape:
        - input_ids, attention_mask: [b, L]; both outputs: [b, L]

    Raises:
        AdvlabValueError: Shapes differ, a rate outside (0, 1), or token ids outside the vocabulary.

    Examples:
        >>> ids = torch.tensor([[1, 5, 6, 7, 2, 0]])
        >>> masked, labels = mask_tokens(ids, ids != 0, mask_token_id=3, random_low=4, vocab_size=9,
        ...                              generator=torch.Generator().manual_seed(0))
        >>> labels[0, 0].item(), labels[0, 4:].tolist(), int((labels != -100).sum()) >= 1
        (-100, [-100, -100], True)
    """
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise AdvlabValueError(
            f"Expected `input_ids` and `attention_mask` of the same shape [b, L], but got {tuple(input_ids.shape)} "
            f"and {tuple(attention_mask.shape)}."
        )
    _check_rate(rate, "rate")
    if not 0 <= mask_token_id < vocab_size or not 0 <= random_low < vocab_size:
        raise AdvlabValueError(
            f"Expected `mask_token_id` ({mask_token_id}) and `random_low` ({random_low}) to be ids of the "
            f"vocabulary (0 to {vocab_size - 1}), but one is not; set RetrievalConfig.mask_token_id / "
            "random_token_low for this tokenizer."
        )
    b, length = input_ids.shape
    real = attention_mask.bool()
    pos = torch.arange(length, device=input_ids.device)
    last = real.sum(1, keepdim=True) - 1  # [b, 1]: the [SEP] position
    candidate = real & (pos > 0) & (pos < last)
    chosen = (torch.rand(b, length, generator=generator) < rate).to(input_ids.device) & candidate
    # a caption with candidates but nothing chosen: choose one of its candidates uniformly
    pick = torch.rand(b, length, generator=generator).to(input_ids.device).masked_fill(~candidate, -1.0).argmax(1)
    none = candidate.any(1) & ~chosen.any(1)
    chosen[none, pick[none]] = True
    kind = torch.rand(b, length, generator=generator).to(input_ids.device)
    random_ids = torch.randint(random_low, vocab_size, (b, length), generator=generator).to(input_ids.device)
    masked = torch.where(chosen & (kind < 0.8), torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(chosen & (kind >= 0.8) & (kind < 0.9), random_ids, masked)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    return masked, labels


def mask_regions(batch: int, regions: int, *, rate: float = 0.15, generator: torch.Generator) -> Tensor:
    """Which regions MRFR zeroes: each with probability `rate`, at least one per image (UNITER's rule).

    Args:
        batch: Images.
        regions: Regions per image.
        rate: Probability of masking a region, in (0, 1).
        generator: The masking generator.

    Returns:
        True at masked regions. Shape [batch, regions].

    Raises:
        AdvlabValueError: A rate outside (0, 1), or no region.

    Examples:
        >>> m = mask_regions(3, 5, generator=torch.Generator().manual_seed(0))
        >>> m.shape, bool(m.any(1).all())
        (torch.Size([3, 5]), True)
    """
    _check_rate(rate, "rate")
    if regions < 1:
        raise AdvlabValueError(f"Expected at least one region per image, but got {regions}.")
    chosen = torch.rand(batch, regions, generator=generator) < rate
    pick = torch.rand(batch, regions, generator=generator).argmax(1)
    none = ~chosen.any(1)
    chosen[none, pick[none]] = True
    return chosen


def mrfr_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """Masked region feature regression: the mean squared error over the masked regions' features.

    Args:
        prediction: The regression head's output at the masked regions.
        target: The unmasked input features there (a constant: no gradient flows into it).

    Returns:
        The mean over regions and features of the squared difference (0 for no region).

    Shape:
        - prediction, target: [k, d]; output: scalar

    Examples:
        >>> mrfr_loss(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]]))
        tensor(2.5000)
    """
    if prediction.shape != target.shape:
        raise AdvlabValueError(
            f"Expected `prediction` and `target` of the same shape, but got {tuple(prediction.shape)} and "
            f"{tuple(target.shape)}."
        )
    if prediction.numel() == 0:
        return prediction.sum()
    return F.mse_loss(prediction, target.detach())


class PretrainHeads(nn.Module):
    """The pre-training heads: MLM's transform and bias (decoder tied to the word table) and MRFR's regressor.

    Initialised as UNITER's `init_weights` does (linear weights N(0, 0.02), biases 0, LayerNorm
    1 and 0), from `generator` so that a run's heads do not depend on the global generator.

    Args:
        hidden_size: Width of the joint encoding.
        vocab_size: Rows of the word-embedding table (the MLM bias).
        img_dim: Width of a region feature (MRFR's target).
        generator: Initialisation generator.

    Examples:
        >>> heads = PretrainHeads(8, 11, 5, generator=torch.Generator().manual_seed(0))
        >>> heads.mlm_logits(torch.zeros(3, 8), torch.zeros(11, 8)).shape, heads.regress(torch.zeros(2, 8)).shape
        (torch.Size([3, 11]), torch.Size([2, 5]))
    """

    def __init__(self, hidden_size: int, vocab_size: int, img_dim: int, *, generator: torch.Generator) -> None:
        super().__init__()
        self.mlm_dense = nn.Linear(hidden_size, hidden_size)
        self.mlm_norm = nn.LayerNorm(hidden_size, eps=1e-12)
        self.mlm_bias = nn.Parameter(torch.zeros(vocab_size))
        self.mrfr = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.LayerNorm(hidden_size, eps=1e-12),
            nn.Linear(hidden_size, img_dim),
        )
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    module.weight.normal_(0.0, 0.02, generator=generator)
                    module.bias.zero_()

    def mlm_logits(self, hidden: Tensor, word_weight: Tensor) -> Tensor:
        """Vocabulary logits: LayerNorm(GELU(dense(hidden))) @ word_weightᵀ + bias.

        Shape:
            - hidden: [m, h]; word_weight: [V, h]; output: [m, V]
        """
        return F.linear(self.mlm_norm(F.gelu(self.mlm_dense(hidden))), word_weight, self.mlm_bias)

    def regress(self, hidden: Tensor) -> Tensor:
        """Predicted region features.

        Shape:
            - hidden: [k, h]; output: [k, d]
        """
        return self.mrfr(hidden)  # type: ignore[no-any-return]


class _Pretrainer(nn.Module):
    """The model and its heads as one module: free training owns (and restores) the gradients of both."""

    def __init__(self, model: RetrievalModel, heads: PretrainHeads) -> None:
        super().__init__()
        self.model = model
        self.heads = heads


@dataclass
class _PretrainOut:
    """One forward's outputs and their (constant) targets; a task whose weight is 0 holds None."""

    mlm: Tensor | None  # [m, V] logits at the masked word-pieces
    mlm_labels: Tensor | None  # [m]
    itm: Tensor | None  # [3b, 2]: positives, (caption, negative image), (negative caption, image)
    mrfr: Tensor | None  # [k, d] predicted features at the masked regions
    mrfr_target: Tensor | None  # [k, d]


def _joint_states(model: RetrievalModel, text: _Encoded, image: _Encoded) -> tuple[Tensor, Tensor]:
    """The joint encoding of each caption with its image: the text and the region positions.

    The same computation as `RetrievalModel.match` on the pairs (i, i), before pooling.

    Shape:
        - outputs: [b, L, h] and [b, r, h]
    """
    net: Any = model.net
    t, tm, v = text.joint_in, text.mask, image.joint_in
    if model.backbone_name == "uniter":
        mask = torch.cat([tm.to(t.dtype), torch.ones(v.shape[:2], dtype=t.dtype, device=t.device)], dim=1)  # type: ignore[union-attr]
        hidden = net.encoder(torch.cat([t, v], dim=1), mask)[-1]  # [b, L + r, h]
        return hidden[:, : t.shape[1]], hidden[:, t.shape[1] :]
    from advlab.backbones.lxmert import _extended_mask

    ext = _extended_mask(tm, t.dtype)
    for layer in net.encoder.x_layers:
        t, v = layer(t, ext, v, None)
    return t, v


def _prepare(batch: dict[str, Tensor], state: dict[str, Tensor], config: RetrievalConfig, vocab_size: int,
             mask_gen: torch.Generator) -> None:
    """Draw a batch's masks once (every forward of the step sees the same), pool its regions."""
    feats, boxes = pool_grid(batch["features"], batch["boxes"], config.grid)
    state["features"], state["boxes"] = feats, boxes
    if config.pretrain_mlm_weight > 0:
        state["masked_ids"], state["mlm_labels"] = mask_tokens(
            batch["input_ids"], batch["attention_mask"], rate=config.pretrain_mlm_rate,
            mask_token_id=config.mask_token_id, random_low=config.random_token_low, vocab_size=vocab_size,
            generator=mask_gen,
        )
    if config.pretrain_mrfr_weight > 0:
        regions = mask_regions(feats.shape[0], feats.shape[1], rate=config.pretrain_region_rate, generator=mask_gen)
        state["region_mask"] = regions
        state["masked_features"] = feats.masked_fill(regions.unsqueeze(-1), 0.0)


def _pretrain_forward(model: RetrievalModel, heads: PretrainHeads, batch: Mapping[str, Tensor],
                      state: dict[str, Tensor], gen: torch.Generator) -> _PretrainOut:
    """One forward of the three tasks; negatives are mined at the first (clean) forward of a batch and reused."""
    config = model.config
    text = model.encode_text(batch["input_ids"], batch["attention_mask"])  # txt call 0
    image = model.encode_image(state["features"], state["boxes"])  # img call 0
    itm = mlm = labels = mrfr = target = None
    if config.pretrain_itm_weight > 0:
        b = text.itc.shape[0]
        if "img" not in state:
            sim = text.itc @ image.itc.t()  # [b, b], captions × images
            state["img"], state["txt"] = _mine_negatives(sim, batch["caption_ids"], gen)
        ar = torch.arange(b, device=text.itc.device)
        ti = torch.cat([ar, ar, state["txt"]])
        vi = torch.cat([ar, state["img"], ar])
        itm = model.match(text, image, ti, vi)  # [3b, 2]
    if config.pretrain_mlm_weight > 0:
        masked = model.encode_text(state["masked_ids"], batch["attention_mask"])  # txt call 1
        txt_states, _ = _joint_states(model, masked, image)
        chosen = state["mlm_labels"] != -100
        word = model.net.embeddings.word_embeddings.weight  # type: ignore[union-attr]
        mlm = heads.mlm_logits(txt_states[chosen], word)  # type: ignore[arg-type]
        labels = state["mlm_labels"][chosen]
    if config.pretrain_mrfr_weight > 0:
        masked_img = model.encode_image(state["masked_features"], state["boxes"])  # img call 1
        _, img_states = _joint_states(model, text, masked_img)
        mrfr = heads.regress(img_states[state["region_mask"]])
        target = state["features"][state["region_mask"]]
    return _PretrainOut(mlm, labels, itm, mrfr, target)


def _task_losses(out: _PretrainOut) -> dict[str, Tensor]:
    """Each task's loss (the tasks present in `out`)."""
    losses = {}
    if out.mlm is not None and out.mlm_labels is not None:
        losses["mlm"] = F.cross_entropy(out.mlm, out.mlm_labels) if out.mlm_labels.numel() else out.mlm.sum()
    if out.itm is not None:
        b = out.itm.shape[0] // 3
        labels = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(2 * b, dtype=torch.long)]).to(out.itm.device)
        losses["itm"] = F.cross_entropy(out.itm, labels)
    if out.mrfr is not None and out.mrfr_target is not None:
        losses["mrfr"] = mrfr_loss(out.mrfr, out.mrfr_target)
    return losses


def _parts(out: _PretrainOut) -> dict[str, float]:
    """Each task's clean loss as a number, for the record."""
    with torch.no_grad():
        return {name: float(loss) for name, loss in _task_losses(out).items()}


def _pretrain_loss(out: _PretrainOut, config: RetrievalConfig) -> Tensor:
    weights = {"mlm": config.pretrain_mlm_weight, "itm": config.pretrain_itm_weight, "mrfr": config.pretrain_mrfr_weight}
    total: Tensor | None = None
    for name, loss in _task_losses(out).items():
        total = weights[name] * loss if total is None else total + weights[name] * loss
    return total  # type: ignore[return-value]  # config refuses all weights 0


def _distributions(out: _PretrainOut) -> tuple[Tensor, ...]:
    """What the KL compares: MLM's vocabulary distributions at the masked positions, ITM's 2-way ones."""
    return tuple(x for x in (out.mlm, out.itm) if x is not None)


def _pretrain_kl(out: _PretrainOut, clean: tuple[Tensor, ...]) -> Tensor:
    kl: Tensor = torch.zeros(())
    for p, q in zip(_distributions(out), clean):
        if p.shape[0]:
            kl = kl + symmetric_kl(p, q)
    return kl


def _check_pretrain(arm: str, config: RetrievalConfig, data: RetrievalData) -> None:
    if arm not in PRETRAIN_ARMS:
        raise AdvlabValueError(f"Expected the pre-training arm to be one of {list(PRETRAIN_ARMS)}, but got {arm!r}.")
    if config.pretrain_epochs < 1:
        raise AdvlabValueError(
            f"Expected `pretrain_epochs` >= 1 to pre-train, but got {config.pretrain_epochs} (0 means no pre-training)."
        )
    if config.pretrain_mlm_weight > 0 and not (
        0 <= config.mask_token_id < data.vocab_size and 0 <= config.random_token_low < data.vocab_size
    ):
        raise AdvlabValueError(
            f"Expected `mask_token_id` ({config.mask_token_id}) and `random_token_low` ({config.random_token_low}) "
            f"to be ids of the data's vocabulary (0 to {data.vocab_size - 1}), but one is not; set them for this "
            "tokenizer in RetrievalConfig."
        )
    if arm == "adv" and config.pretrain_mlm_weight == 0 and config.pretrain_itm_weight == 0:
        raise AdvlabValueError(
            "Expected MLM or ITM in adversarial pre-training (its KL compares their distributions; MRFR has none), "
            "but `pretrain_mlm_weight` and `pretrain_itm_weight` are both 0."
        )


def pretrain_run(
    model: RetrievalModel,
    data: RetrievalData,
    arm: str,
    config: RetrievalConfig,
    *,
    seed: int,
    progress: bool = True,
    desc: str = "",
) -> list[dict[str, float]]:
    """Pre-train `model` in place on the training split: MLM + ITM + MRFR, standard or adversarial.

    The optimiser, the learning rates, the warm-up and decay schedule and the gradient clipping
    are the fine-tuning stage's, over `config.pretrain_epochs` epochs; the heads are trained at
    `lr_fresh` and dropped afterwards (fine-tuning does not use them). Deterministic given
    `seed`: batch order, mined negatives and δ come from one generator as in fine-tuning,
    the masks from their own, the heads' initial weights from a third.

    Args:
        model: The model (as `build_model` returns it), trained in place.
        data: The data (only `train` is used).
        arm: `"std"` (plain training) or `"adv"` (VILLA joint: K free steps, KL on MLM and ITM).
        config: Run settings: `pretrain_*`, `mask_token_id`, `random_token_low`, and the
            fine-tuning stage's optimiser and perturbation settings.
        seed: Seed of the stage.
        progress: Show a tqdm bar.
        desc: Bar label.

    Returns:
        One entry per epoch: `{"epoch", "loss", "mlm", "itm", "mrfr"}` (mean clean losses; a task
        whose weight is 0 is absent).

    Raises:
        AdvlabValueError: An unknown arm, `pretrain_epochs` 0, token ids outside the data's
            vocabulary, or adversarial pre-training without MLM and ITM.
        NonFiniteError: A loss or gradient norm is NaN or inf (the message names the run, epoch and step).

    Examples:
        >>> pretrain_run(None, None, "fgsm", RetrievalConfig(pretrain_epochs=1), seed=0)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        advlab._errors.AdvlabValueError: Expected the pre-training arm to be one of ['std', 'adv'], but got 'fgsm'.
    """
    _check_pretrain(arm, config, data)
    torch.manual_seed(seed + 1)
    gen = torch.Generator().manual_seed(seed)
    mask_gen = torch.Generator().manual_seed(seed + _MASK_SEED)
    first = next(model.parameters())
    hidden = model.net.embeddings.word_embeddings.weight.shape[1]  # type: ignore[union-attr]
    heads = PretrainHeads(hidden, data.vocab_size, int(data.train.features.shape[-1]),
                          generator=torch.Generator().manual_seed(seed + _HEAD_SEED)).to(first.dtype)
    trained = _Pretrainer(model, heads)
    perts, mode = (None, "") if arm == "std" else _arm_perturbations("villa", config)
    calls = {"txt": 2 if config.pretrain_mlm_weight > 0 else 1, "img": 2 if config.pretrain_mrfr_weight > 0 else 1}
    sites = resolve_sites(trained, {m: replace(s, calls=calls[m]) for m, s in model.perturbation_sites().items()})
    stage = _Stage(
        forward=lambda batch, state: _pretrain_forward(model, heads, batch, state, gen),
        loss=lambda out, batch: _pretrain_loss(out, config),
        kl=lambda out, clean, batch: _pretrain_kl(out, clean),
        logits=_distributions,
        prepare=lambda batch, state: _prepare(batch, state, config, data.vocab_size, mask_gen),
        parts=lambda out, batch: _parts(out),
    )
    losses, parts = _fit(
        model, trained, stage, data, config, epochs=config.pretrain_epochs, gen=gen, perts=perts, mode=mode,
        sites=sites, optimizer=_optimizer(model, config, list(heads.parameters())),
        run=f"{model.backbone_name} pre-training {arm} seed {seed}", progress=progress, desc=desc or f"pre-train {arm}",
        on_epoch=None,
    )
    return [{"epoch": i + 1, "loss": loss, **part} for i, (loss, part) in enumerate(zip(losses, parts))]
