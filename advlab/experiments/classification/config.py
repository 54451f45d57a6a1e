"""Settings of the classification experiment: the arms, their sizes, the run configuration and the settings file.

Sizes are relative to the clean embedding, in one of three units (`Unit`):

- `"row"`: a fraction of each caption's own l2 norm over its word embeddings (advlab's
  `Perturbation(relative=True)`), for the recipes that take `Perturbation`s (FreeLB, the
  noise control, VILLA);
- `"l2"`: a fraction of the mean caption norm over the training captions, measured once on the
  pretrained embedding table (TRADES, whose radius is an absolute l2 size);
- `"elem"`: a fraction of the root-mean-square of one embedding element over the training
  captions (SMART, R3F, VAT/ALUM and FastAT, whose sizes are per element).

The published setting of each method, converted to these units with the MiniLM-L6 scales
(mean caption norm 3.22, element RMS 0.0596 on the Tux Paint training captions), is in every
tuning grid; see `PUBLISHED`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from advlab._errors import AdvlabTypeError, AdvlabValueError
from advlab.experiments._args import check_fields

Unit = Literal["row", "l2", "elem"]
Dataset = Literal["tuxpaint", "openclipart"]

SITE = "bert.embeddings.word_embeddings"  # the embedding site: δ is added to the word embeddings
ARMS_FULL: tuple[str, ...] = ("baseline", "noise", "freelb", "smart", "villa", "r3f", "vat", "trades", "fastat")
ARMS_QUICK: tuple[str, ...] = ("baseline", "freelb", "noise")
ARM_LABELS: dict[str, str] = {
    "baseline": "baseline",
    "noise": "noise control",
    "freelb": "FreeLB",
    "smart": "SMART",
    "villa": "VILLA text",
    "r3f": "R3F",
    "vat": "VAT (ALUM)",
    "trades": "TRADES",
    "fastat": "FastAT",
}
ARM_UNITS: dict[str, Unit] = {
    "noise": "row", "freelb": "row", "villa": "row", "trades": "l2",
    "smart": "elem", "r3f": "elem", "vat": "elem", "fastat": "elem",
}
# MiniLM-L6 on the Tux Paint training captions (pretrained word embeddings): used to convert published
# absolute sizes into the relative units above; runs measure their own scales (recorded).
MINILM_ROW_NORM = 3.22
MINILM_ELEM_RMS = 0.0596
# Published setting of each method's main size, absolute, and where it comes from.
PUBLISHED: dict[str, tuple[float, str]] = {
    "freelb": (1e-1, "FreeLB fairseq RoBERTa GLUE launchers: adv-lr 1e-1, adv-init-mag 1.6e-1, 2 steps"),
    "villa": (1e-3, "VILLA official code: adv_lr_txt 1e-3, 3 steps, KL weight 1.5"),
    "smart": (1e-5, "mt-dnn SMART: adv_step_size 1e-5, adv_noise_var 1e-5, 1 step, adv_alpha 1"),
    "r3f": (1e-5, "fairseq R3F: eps 1e-5 uniform noise, r3f-lambda 1"),
    "vat": (1e-3, "ALUM: step size 1e-3 (L-inf), symmetric KL, alpha 1 for fine-tuning"),
}
# The grids (relative units). Each holds the published size converted (rounded to 2 digits):
# FreeLB 0.1 / 3.22 = 0.031, VILLA 1e-3 / 3.22 = 3.1e-4, SMART and R3F 1e-5 / 0.0596 = 1.7e-4,
# ALUM 1e-3 / 0.0596 = 0.017. TRADES and FastAT have no published text setting.
TUNE_GRIDS: dict[str, tuple[float, ...]] = {
    "freelb": (0.01, 0.031, 0.1),
    "villa": (3.1e-4, 3.1e-3, 0.031),
    "smart": (1.7e-4, 1.7e-3, 0.017),
    "r3f": (1.7e-4, 1.7e-3, 0.017),
    "vat": (1.7e-3, 0.017, 0.17),
    "trades": (0.01, 0.031, 0.1),
    "fastat": (0.03, 0.1, 0.3),
}
DEFAULT_SIZES: dict[str, float] = {  # untuned: the published setting (the middle of the grids without one)
    "freelb": 0.031, "villa": 3.1e-4, "smart": 1.7e-4, "r3f": 1.7e-4, "vat": 0.017, "trades": 0.031, "fastat": 0.1,
}
SETTINGS_PATH = Path(__file__).with_name("settings.json")

_COUNTS = {"epochs": 1, "batch_size": 2, "max_length": 3, "adv_steps": 1, "attack_steps": 1, "eval_batch": 1}
_REALS = {"lr": True, "weight_decay": False, "warmup_ratio": False}


@dataclass(frozen=True)
class ClassificationConfig:
    """Settings of one training run, shared by every arm (the arm's own size is in `sizes`).

    Args:
        epochs: Passes over the training captions.
        batch_size: Captions per optimizer step.
        lr: AdamW learning rate (the Trainer's; linear decay after warm-up).
        weight_decay: AdamW weight decay.
        warmup_ratio: Fraction of the steps with a linear warm-up.
        max_length: Token limit of a caption, [CLS] and [SEP] included.
        adv_steps: Ascent steps K of FreeLB, the noise control and VILLA (SMART, R3F, VAT,
            TRADES and FastAT use their own published step counts: 1).
        sizes: Arm -> its main size in the arm's relative unit (`ARM_UNITS`); missing arms take
            `DEFAULT_SIZES`.
        radii: Radii of the robustness attack, fractions of each caption's clean l2 norm.
        attack_steps: PGD steps of the robustness attack.
        eval_batch: Captions per forward at evaluation.
        attention: The encoder's attention kernel (`"sdpa"` or `"eager"`).

    Raises:
        AdvlabValueError: A count below its minimum, a rate or size out of range, an unknown arm.
        AdvlabTypeError: A field of the wrong type.

    Examples:
        >>> ClassificationConfig().size("freelb")
        0.031
        >>> ClassificationConfig(epochs=0)
        Traceback (most recent call last):
        ...
        advlab._errors.AdvlabValueError: Expected `epochs` to be an int >= 1, but got 0.
    """

    epochs: int = 6
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_length: int = 32  # the longest Tux Paint caption is 32 WordPieces with [CLS] and [SEP]
    adv_steps: int = 2  # FreeLB's GLUE launchers use 2 or 3
    sizes: Mapping[str, float] = field(default_factory=dict)
    radii: tuple[float, ...] = (0.02, 0.05, 0.1)
    attack_steps: int = 5
    eval_batch: int = 32
    attention: Literal["sdpa", "eager"] = "sdpa"

    def __post_init__(self) -> None:
        check_fields(self, _COUNTS, _REALS)
        if self.warmup_ratio >= 1:
            raise AdvlabValueError(f"Expected `warmup_ratio` to be < 1, but got {self.warmup_ratio!r}.")
        if not isinstance(self.sizes, Mapping):
            raise AdvlabTypeError(f"Expected `sizes` to be a mapping arm -> size, but got {type(self.sizes).__name__}.")
        unknown = [a for a in self.sizes if a not in DEFAULT_SIZES]
        if unknown:
            hint = " (the noise control takes FreeLB's size: set 'freelb')" if "noise" in unknown else ""
            raise AdvlabValueError(f"Expected `sizes` keys among {sorted(DEFAULT_SIZES)}{hint}, but got {unknown}.")
        bad = {a: v for a, v in self.sizes.items()
               if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0}
        if bad:
            raise AdvlabValueError(f"Expected every size to be a finite float > 0, but got {bad}.")
        object.__setattr__(self, "sizes", {a: float(v) for a, v in sorted(self.sizes.items())})
        radii = tuple(self.radii) if isinstance(self.radii, (list, tuple)) else None
        if not radii or any(isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0
                            for r in radii):
            raise AdvlabValueError(f"Expected `radii` to be finite floats > 0 (at least one), but got {self.radii!r}.")
        object.__setattr__(self, "radii", tuple(float(r) for r in radii))
        if self.attention not in ("sdpa", "eager"):
            raise AdvlabValueError(f"Expected `attention` to be 'sdpa' or 'eager', but got {self.attention!r}.")

    def size(self, arm: str) -> float:
        """The arm's main size in its relative unit (the noise control takes FreeLB's).

        Args:
            arm: An arm other than the baseline.

        Returns:
            The size.
        """
        key = "freelb" if arm == "noise" else arm
        if key not in DEFAULT_SIZES:
            raise AdvlabValueError(f"Expected an arm with a size, one of {sorted(ARM_UNITS)}, but got {arm!r}.")
        return float(self.sizes.get(key, DEFAULT_SIZES[key]))

    def with_size(self, arm: str, size: float) -> ClassificationConfig:
        """A copy with another main size for `arm`.

        Args:
            arm: The arm (the noise control shares FreeLB's size).
            size: The new size.

        Returns:
            The new config.

        Examples:
            >>> ClassificationConfig().with_size("smart", 1e-3).size("smart")
            0.001
        """
        key = "freelb" if arm == "noise" else arm
        return replace(self, sizes={**self.sizes, key: float(size)})


def load_settings(path: str | os.PathLike[str] = SETTINGS_PATH) -> dict[str, Any]:
    """The committed settings (`base` config fields, `sizes`, tuning notes); empty if the file is missing.

    Args:
        path: The JSON file.

    Returns:
        Its content.
    """
    p = Path(path)
    if not p.is_file():
        return {}
    try:
        content = json.loads(p.read_text())
    except ValueError as err:
        raise AdvlabValueError(f"Expected {p} to hold JSON settings, but it does not parse: {err}.") from None
    if not isinstance(content, dict):
        raise AdvlabValueError(f"Expected {p} to hold a JSON object, but got {type(content).__name__}.")
    return content


def config_from_settings(settings: Mapping[str, Any], path: str | os.PathLike[str] = "settings") -> ClassificationConfig:
    """The settings' `base` fields and `sizes` as a config; unknown or bad fields are named with the file.

    Args:
        settings: Content of the settings file.
        path: The file's name, for messages.

    Returns:
        The config.

    Raises:
        AdvlabValueError: `base` or `sizes` is not a JSON object, a field is unknown, or a value is
            out of range or of the wrong type (the message starts with `path`).

    Examples:
        >>> config_from_settings({"base": {"epochs": 2}, "sizes": {"freelb": 0.1}}).size("noise")
        0.1
        >>> config_from_settings({"sizes": [0.1]}, "s.json")
        Traceback (most recent call last):
        ...
        advlab._errors.AdvlabValueError: s.json: expected 'sizes' to be a JSON object (arm -> size), but got list [0.1].
    """
    if not isinstance(settings, Mapping):
        raise AdvlabValueError(f"{path}: expected a JSON object, but got {type(settings).__name__}.")
    for part in ("base", "sizes"):
        value = settings.get(part, {})
        if not isinstance(value, Mapping):
            what = "field -> value" if part == "base" else "arm -> size"
            raise AdvlabValueError(
                f"{path}: expected '{part}' to be a JSON object ({what}), but got {type(value).__name__} {value!r}."
            )
    base = dict(settings.get("base", {}))
    known = {f.name for f in fields(ClassificationConfig)} - {"sizes"}
    unknown = sorted(set(base) - known)
    if unknown:
        raise AdvlabValueError(f"{path}: unknown field(s) {unknown} in 'base'; known: {sorted(known)}.")
    if "radii" in base and isinstance(base["radii"], list):
        base["radii"] = tuple(base["radii"])
    try:
        return ClassificationConfig(**base, sizes=dict(settings.get("sizes", {})))
    except (AdvlabValueError, AdvlabTypeError) as err:
        raise AdvlabValueError(f"{path}: {err}") from None
