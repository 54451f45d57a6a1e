"""Named hyper-parameter sets for `VILLA`: the official code's, the paper's, and each released task.

The numbers come from the released VILLA configs (`zhegan27/VILLA`, `config/*.json` and
`reproducibility-vqa/hps.json`) and LXMERT-AdvTrain's run scripts. Every released config
uses the L2 norm, zero initialisation and no projection (`adv_max_norm = 0`), and equal text
and image step sizes, so one `step_size` covers both modalities.

| preset | mode | step size | K | KL weight | KL reduction |
|---|---|---|---|---|---|
| `official` | joint | 1e-3 | 3 | 1.5 | batchmean |
| `paper` | alter | 1e-3 | 3 | 1.0 | batchmean (ε required) |
| `vqa-base` | txt | 1e-3 | 3 | 1.5 | batchmean |
| `vqa-large` | txt | 2e-3 | 3 | 1.0 | batchmean |
| `vqa-large-best` | joint | 2e-3 | 3 | 1.0 | batchmean |
| `vcr-base` | joint | 1e-2 | 3 | 1.5 | mean |
| `vcr-large` | joint | 1e-1 | 3 | 1.0 | mean |
| `nlvr2` | txt | 1e-3 | 3 | 1.5 | batchmean |
| `ve` | txt | 1e-3 | 3 | 1.5 | batchmean |
| `lxmert-vqa` | txt | 1e-3 | 3 | 1.5 | batchmean |
| `lxmert-gqa` | txt | 1e-2 | 3 | 1.5 | batchmean |
| `lxmert-nlvr2` | txt | 1e-3 | 3 | 1.5 | batchmean |

"batchmean" is the official VQA / VE / NLVR2 scaling (KL summed over classes, averaged over
rows); VCR's `kl.mean()` over rows × 2 classes is "mean" (half the per-row KL).
"""

from __future__ import annotations

from advlab._errors import AdvlabValueError
from advlab.villa import (
    VILLA_PRESETS,
    Flavour,  # noqa: F401 (kept importable from here)
    VILLAConfig,
)

__all__ = ["VillaPreset", "PRESETS", "get_preset"]

VillaPreset = VILLAConfig
"""The numbers a `VILLA` preset fixes: `VILLAConfig` under its older name."""

PRESETS: dict[str, VILLAConfig] = VILLA_PRESETS
"""Preset name -> `VILLAConfig` (the same mapping as `VILLA.presets`)."""


def get_preset(name: str) -> VILLAConfig:
    """Look a preset up by name, with a clear error listing the known ones.

    Examples:
        >>> get_preset("nlvr2").mode
        'txt'
        >>> get_preset("vqa-large").step_size
        0.002
    """
    if name not in PRESETS:
        raise AdvlabValueError(f"Expected `preset` to be one of {sorted(PRESETS)}, but got {name!r}.")
    return PRESETS[name]

