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

from dataclasses import dataclass
from typing import Literal

from advlab._errors import AdvlabValueError
from advlab.regularizers import Distribution, Reduction

__all__ = ["VillaPreset", "PRESETS", "get_preset"]

Flavour = Literal["official", "paper"]


@dataclass(frozen=True)
class VillaPreset:
    """The numbers a `VILLA` preset fixes (explicit arguments override them).

    Attributes:
        name: Preset name.
        flavour: `"official"` (the released code's objective) or `"paper"` (Algorithm 1).
        mode: `"joint"`, `"alter"` or a modality name (`"txt"`, `"img"`).
        step_size: Ascent step η for every modality.
        steps: K.
        kl_weight: Weight of the symmetric-KL term.
        kl_reduction: Reduction of the KL term.
        distribution: How logits become distributions for the KL (`"softmax"` in all released code).
        source: Where the numbers come from.

    Examples:
        >>> get_preset("vqa-large").step_size
        0.002
    """

    name: str
    flavour: Flavour
    mode: str
    step_size: float
    steps: int = 3
    kl_weight: float = 1.5
    kl_reduction: Reduction = "batchmean"
    distribution: Distribution = "softmax"
    source: str = ""


PRESETS: dict[str, VillaPreset] = {
    p.name: p
    for p in [
        VillaPreset("official", "official", "joint", 1e-3, source="official code, VQA-base numbers, both modalities"),
        VillaPreset("paper", "paper", "alter", 1e-3, kl_weight=1.0, source="Algorithm 1 as printed (no KL weight)"),
        VillaPreset("vqa-base", "official", "txt", 1e-3, source="config/train-vqa-base-4gpu-adv.json"),
        VillaPreset("vqa-large", "official", "txt", 2e-3, kl_weight=1.0, source="config/train-vqa-large-8gpu-adv.json"),
        VillaPreset("vqa-large-best", "official", "joint", 2e-3, kl_weight=1.0, source="reproducibility-vqa/hps.json"),
        VillaPreset("vcr-base", "official", "joint", 1e-2, kl_reduction="mean", source="config/train-vcr-base-4gpu-adv.json"),
        VillaPreset("vcr-large", "official", "joint", 1e-1, kl_weight=1.0, kl_reduction="mean",
                    source="config/train-vcr-large-4gpu-adv.json"),
        VillaPreset("nlvr2", "official", "txt", 1e-3, source="config/train-nlvr2-base-1gpu-adv.json"),
        VillaPreset("ve", "official", "txt", 1e-3, source="config/train-ve-base-2gpu-adv.json"),
        VillaPreset("lxmert-vqa", "official", "txt", 1e-3, source="LXMERT-AdvTrain run/vqa_adv_finetune.bash"),
        VillaPreset("lxmert-gqa", "official", "txt", 1e-2, source="LXMERT-AdvTrain run/gqa_adv_finetune.bash"),
        VillaPreset("lxmert-nlvr2", "official", "txt", 1e-3, source="LXMERT-AdvTrain run/nlvr2_adv_finetune.bash"),
    ]
}


def get_preset(name: str) -> VillaPreset:
    """Look a preset up by name, with a clear error listing the known ones.

    Examples:
        >>> get_preset("nlvr2").mode
        'txt'
    """
    if name not in PRESETS:
        raise AdvlabValueError(f"Expected `preset` to be one of {sorted(PRESETS)}, but got {name!r}.")
    return PRESETS[name]
