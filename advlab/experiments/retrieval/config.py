"""Settings of the retrieval experiment: the arms, the run configuration and the committed settings file."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from advlab._errors import AdvlabTypeError, AdvlabValueError
from advlab.experiments._args import check_fields

Backbone = Literal["uniter", "lxmert"]
Features = Literal["craft", "effnet"]
FEATURES: tuple[str, ...] = ("craft", "effnet")
Arm = Literal["baseline", "zero", "noise", "villa", "alter", "txt", "img"]
ARMS_QUICK: tuple[str, ...] = ("baseline", "zero", "noise", "villa")
ARMS_FULL: tuple[str, ...] = ("baseline", "zero", "noise", "villa", "alter", "txt", "img")
# The two controls of a VILLA arm: "zero" runs VILLA's loop unchanged with step size 0 (K + 1 forwards with
# their own dropout masks, the same losses and KL, δ stays 0); "noise" moves δ in a random direction of the
# same size. A gain over both, beyond the spread, is what adversarial training can claim.
CONTROLS: tuple[str, ...] = ("zero", "noise")
# The two stages of VILLA: in-domain pre-training (MLM + ITM + MRFR on the training split, standard or
# adversarial) then the usual ITC fine-tuning (the baseline's, or VILLA joint). "std" fine-tuning is the
# baseline arm's training, "adv" the villa arm's; both start from the same cached pre-trained weights.
ARMS_PRETRAIN: tuple[str, ...] = ("pt-std/ft-std", "pt-std/ft-adv", "pt-adv/ft-std", "pt-adv/ft-adv")
PRETRAIN_ARMS: tuple[str, ...] = ("std", "adv")
# What `--full` runs on each backbone: the four core arms everywhere; the modality ablations and VILLA's
# two stages on UNITER-mini only (they are what the paper ablates, and each costs as much as the core).
FULL_PLAN: dict[str, tuple[str, ...]] = {"uniter": ARMS_FULL + ARMS_PRETRAIN, "lxmert": ARMS_QUICK}
ARM_LABELS: dict[str, str] = {
    "baseline": "baseline",
    "zero": "zero δ",
    "noise": "noise control",
    "villa": "VILLA joint",
    "alter": "VILLA alter",
    "txt": "VILLA text-only",
    "img": "VILLA image-only",
    "pt-std/ft-std": "PT std + FT std",
    "pt-std/ft-adv": "PT std + FT VILLA",
    "pt-adv/ft-std": "PT VILLA + FT std",
    "pt-adv/ft-adv": "PT VILLA + FT VILLA",
}
SETTINGS_PATH = Path(__file__).with_name("settings.json")
# minimum of each integer field (a batch needs 2 pairs for in-batch negatives; LXMERT may drop r-layers)
_COUNTS = {"layers": 1, "x_layers": 1, "r_layers": 0, "epochs": 1, "batch_size": 2, "rerank_k": 1, "proj_dim": 1,
           "adv_steps": 1, "max_length": 2, "eval_batch": 1, "grid": 1, "pretrain_epochs": 0, "mask_token_id": 0,
           "random_token_low": 0}
# float fields: True where 0 is not allowed
_REALS = {"lr": True, "lr_fresh": True, "temperature": True, "itm_weight": False, "kl_weight": False,
          "txt_step": False, "img_step": False, "pretrain_mlm_weight": False, "pretrain_itm_weight": False,
          "pretrain_mrfr_weight": False}
_RATES = ("pretrain_mlm_rate", "pretrain_region_rate")  # open interval (0, 1)
# the fields that only the pre-training stage reads: left out of a run's key when pretrain_epochs is 0
PRETRAIN_FIELDS: tuple[str, ...] = ("pretrain_epochs", "pretrain_mlm_rate", "pretrain_region_rate", "pretrain_mlm_weight",
                                    "pretrain_itm_weight", "pretrain_mrfr_weight", "mask_token_id", "random_token_low")


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
        kl_weight: Weight of the symmetric KL in the perturbed arms (default 0, UNITER-mini's
            tuned weight; VILLA's released configs use 1.5).
        txt_step: Step size of the text perturbation (l2 over a caption's word embeddings;
            default 0.1, UNITER-mini's tuned relative step).
        img_step: Step size of the image perturbation (l2 over an image's raw region features).
        relative: Read `txt_step` and `img_step` as fractions of each row's clean norm at the
            site (the default; `advlab.Perturbation(relative=True)`: a step's l2 norm is the
            fraction times the caption's or the image's clean embedding norm); False: absolute
            sizes.
        attention: The backbone's attention kernel, `"eager"` (the default: the recorded runs
            were computed with it) or `"sdpa"` (`scaled_dot_product_attention`, faster; its
            results differ in the last bits, which training amplifies).
        max_length: Token limit of a caption, [CLS] and [SEP] included.
        eval_batch: Pairs per forward at evaluation.
        grid: Grid cells per side of the region features (2: 1 object + 4 cells, 4: 1 + 16),
            pooled from the cached 4 x 4 grid.
        features: The frozen image features: `"effnet"` (the default: 320-d, the last block of
            the ImageNet EfficientNet-Lite0 at 224 px,
            [`advlab.pretrained.efficientnet`][advlab.pretrained.efficientnet]; 10.6 points of
            baseline validation R@1 above CRAFT) or `"craft"` (512-d, the VGG16-BN trunk of the
            CRAFT text detector at 64 px, [`advlab.pretrained.craft`][advlab.pretrained.craft]).
            The data must hold the same features (`prepare_data(..., features=config.features)`).
        freeze_word_embeddings: Keep MiniLM's word-embedding table fixed (CPU time).
        pretrain_epochs: Epochs of the in-domain pre-training stage of the `pt-*` arms (MLM, ITM,
            MRFR on the training split, `advlab.experiments.retrieval.pretraining`); 0 (the
            default) means no pre-training, and the `pt-*` arms are refused.
        pretrain_mlm_rate: Fraction of a caption's word-pieces masked for MLM (UNITER's 0.15).
        pretrain_region_rate: Fraction of an image's regions zeroed for MRFR (UNITER's 0.15).
        pretrain_mlm_weight: Weight of the MLM loss in the pre-training sum (0 drops the task).
        pretrain_itm_weight: Weight of the ITM loss in the pre-training sum (0 drops the task).
        pretrain_mrfr_weight: Weight of the MRFR loss in the pre-training sum (0 drops the task).
        mask_token_id: The tokenizer's [MASK] id (MiniLM's uncased WordPiece: 103).
        random_token_low: MLM's random replacements are drawn from ids `random_token_low` to
            `vocab_size - 1` (MiniLM: 999, the first id after the special and unused entries,
            as UNITER's `v_range`).

    Raises:
        AdvlabValueError: A count below its minimum, or a rate, weight or size that is negative,
            zero where it must be positive, or not finite; a mask rate outside (0, 1); every
            pre-training weight 0.
        AdvlabTypeError: A field of the wrong type.

    Examples:
        >>> RetrievalConfig().with_steps(0.5, 8.0).txt_step
        0.5
        >>> RetrievalConfig(epochs=0)
        Traceback (most recent call last):
        ...
        advlab._errors.AdvlabValueError: Expected `epochs` to be an int >= 1, but got 0.
    """

    layers: int = 2
    x_layers: int = 1
    r_layers: int = 1
    epochs: int = 15  # the baseline's validation curve peaks at 15 with EfficientNet-Lite0 (docs/reproducing.md)
    batch_size: int = 32
    lr: float = 1e-4
    lr_fresh: float = 1e-3
    temperature: float = 0.05
    itm_weight: float = 0.0  # ITM re-ranking hurt within the budget (docs/reproducing.md)
    rerank_k: int = 10
    proj_dim: int = 256
    adv_steps: int = 2
    kl_weight: float = 0.0  # UNITER-mini's tuned weight (VILLA's released configs: 1.5)
    txt_step: float = 0.1  # UNITER-mini's tuned relative step (docs/reproducing.md)
    img_step: float = 0.1
    max_length: int = 16
    eval_batch: int = 256
    grid: int = 2
    freeze_word_embeddings: bool = True
    relative: bool = True  # sizes as fractions of each row's clean norm; False: absolute sizes
    attention: Literal["eager", "sdpa"] = "eager"  # eager: the recorded runs' numbers, bit for bit
    features: Features = "effnet"  # 10.6 points of baseline validation R@1 above CRAFT (docs/reproducing.md)
    pretrain_epochs: int = 0  # 0: no pre-training stage (every earlier record's key is unchanged)
    pretrain_mlm_rate: float = 0.15  # UNITER / BERT
    pretrain_region_rate: float = 0.15  # UNITER's mrm_prob
    pretrain_mlm_weight: float = 1.0  # the three tasks are summed at every step (UNITER samples one per batch)
    pretrain_itm_weight: float = 1.0
    pretrain_mrfr_weight: float = 1.0
    mask_token_id: int = 103  # MiniLM's [MASK]
    random_token_low: int = 999  # MiniLM's "!": ids below it are special or unused

    def __post_init__(self) -> None:
        check_fields(self, _COUNTS, _REALS)
        if self.features not in FEATURES:
            raise AdvlabValueError(f"Expected `features` to be one of {list(FEATURES)}, but got {self.features!r}.")
        if self.attention not in ("eager", "sdpa"):
            raise AdvlabValueError(f"Expected `attention` to be 'eager' or 'sdpa', but got {self.attention!r}.")
        for name in ("freeze_word_embeddings", "relative"):
            if not isinstance(getattr(self, name), bool):
                raise AdvlabTypeError(f"Expected `{name}` to be a bool, but got {getattr(self, name)!r}.")
        for name in _RATES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise AdvlabTypeError(f"Expected `{name}` to be a float, but got {value!r}.")
            if not 0 < value < 1:
                raise AdvlabValueError(f"Expected `{name}` to be in the open interval (0, 1), but got {value!r}.")
        if not (self.pretrain_mlm_weight or self.pretrain_itm_weight or self.pretrain_mrfr_weight):
            raise AdvlabValueError(
                "Expected at least one of `pretrain_mlm_weight`, `pretrain_itm_weight`, `pretrain_mrfr_weight` "
                "to be > 0, but all are 0."
            )

    def with_steps(self, txt_step: float, img_step: float) -> RetrievalConfig:
        """A copy with other perturbation step sizes.

        Args:
            txt_step: Text step size.
            img_step: Image step size.

        Returns:
            The new config.
        """
        return replace(self, txt_step=float(txt_step), img_step=float(img_step))


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
    """Per-backbone configs: `base` with the settings' sizes (LXMERT falls back to UNITER's).

    An entry written by `--tune` holds `relative: true`, one relative `step` for both
    modalities and the chosen `kl_weight`; an older entry holds absolute `txt_step` and
    `img_step`.

    Args:
        settings: Content of the settings file.
        base: Defaults for everything else.

    Returns:
        Backbone -> config.

    Examples:
        >>> s = {"uniter": {"txt_step": 0.3, "img_step": 5.0}}
        >>> old = configs_from_settings(s, RetrievalConfig())["lxmert"]  # an older, absolute entry
        >>> old.img_step, old.relative
        (5.0, False)
        >>> c = configs_from_settings({"uniter": {"relative": True, "step": 3e-3, "kl_weight": 0.0}}, RetrievalConfig())
        >>> c["uniter"].relative, c["uniter"].txt_step, c["uniter"].img_step, c["uniter"].kl_weight
        (True, 0.003, 0.003, 0.0)
    """
    out = {}
    for backbone in ("uniter", "lxmert"):
        entry = settings.get(backbone) or settings.get("uniter") or {}
        cfg = base
        if entry.get("relative"):
            cfg = replace(cfg.with_steps(entry["step"], entry["step"]), relative=True,
                          kl_weight=float(entry.get("kl_weight", cfg.kl_weight)))
        elif "txt_step" in entry:  # an older entry: absolute sizes
            cfg = replace(cfg.with_steps(entry["txt_step"], entry["img_step"]), relative=False)
        out[backbone] = cfg
    return out
