"""`NEFTune`: noisy embeddings for instruction fine-tuning (Jain et al., 2023).

One step on a batch, a single forward and backward:

    δ = U(-1, 1) · α / √(L·d)  (masked elements 0)
    loss = L(f(x + δ), y)

with L the number of real (unmasked) positions of the row and d the feature width, so the
noise is `advlab.ScaledUniformSampler(α)`. There is no clean forward: the noised forward is
the only one. As in the reference code (the NEFTune repository and the hook in Hugging Face
transformers / TRL), the noise is added only while the model is in training mode; in eval
mode a step is plain training.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from advlab._checks import check_nonnegative, check_scalar
from advlab.free import FreeTraining
from advlab.perturbation import Perturbation
from advlab.recipe import Recipe
from advlab.samplers import ScaledUniformSampler
from advlab.sites import SiteLike

__all__ = ["NEFTune", "NEFTuneConfig"]


@dataclass(frozen=True)
class NEFTuneConfig:
    """The number of a `NEFTune` step.

    Attributes:
        alpha: Noise scale α (the paper uses 5, 10 and 15; Hugging Face's
            `neftune_noise_alpha`).

    Examples:
        >>> NEFTuneConfig(alpha=10).alpha
        10.0
    """

    alpha: float = 5.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", check_nonnegative(self.alpha, "alpha"))


class NEFTune(Recipe):
    """NEFTune: train on the task loss of embeddings plus scaled uniform noise.

    `step` runs one noised forward (a clean one in eval mode) and its backward; it reports
    the task loss and the noise norm (no KL; `delta_norm` is empty in eval mode), and the
    masks' True positions are the L of the noise scale.

    Args:
        model: The model.
        sites: Modality to site (the token embedding output); None = `model.perturbation_sites()`.
        config: A `NEFTuneConfig`; default α = 5.
        on_nonfinite: `"raise"` (default without a scaler) or `"skip"`.
        generator: Randomness for the noise.
        **overrides: Fields of `NEFTuneConfig`: `alpha`.

    Shape:
        - the site tensors: [b, n, d] or [b, d]; masks: [b, n] or [b]

    Examples:
        >>> import torch, advlab
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 2))
        >>> ids, y = torch.tensor([[1, 2], [3, 0]]), torch.tensor([0, 1])
        >>> neft = advlab.NEFTune(model, {"txt": "0"}, alpha=5.0, generator=torch.Generator().manual_seed(0))
        >>> mask = torch.tensor([[True, True], [True, False]])
        >>> stats = neft.step(lambda: model(ids), lambda out: nn.functional.cross_entropy(out, y), masks={"txt": mask})
        >>> len(stats.task_loss), stats.kl, round(stats.delta_norm["txt"], 2)  # mean row norm; E ≈ α/√3
        (1, (), 1.93)
    """

    _config_class = NEFTuneConfig

    def __init__(
        self,
        model: nn.Module,
        sites: Mapping[str, SiteLike] | None = None,
        *,
        config: NEFTuneConfig | None = None,
        on_nonfinite: Literal["raise", "skip"] | None = None,
        generator: torch.Generator | None = None,
        **overrides: Any,
    ) -> None:
        c = self._setup(model, sites, config, None, overrides, on_nonfinite=on_nonfinite, generator=generator)
        self.alpha = c.alpha
        # "random" direction: δ needs no gradient (NEFTune never ascends)
        self.perturbations = {
            k: Perturbation(step_size=0.0, direction="random", init=ScaledUniformSampler(self.alpha)) for k in self.sites
        }
        self._context()  # checks sites, perturbations, the policy and that the model is not compiled, now

    def _engine_options(self) -> dict[str, Any]:
        return {"steps": 1}

    def _run(self, ft: FreeTraining, forward: Callable[[], Any], task_loss: Callable[[Any], Tensor],
             scale: float) -> tuple[list[Tensor], list[Tensor]]:
        """One noised forward (clean in eval mode) and its backward."""
        noisy = () if not self.model.training else None  # None: every modality
        for _ in ft:
            task = check_scalar(task_loss(ft.forward(forward, noisy)), "`task_loss` output")
            ft.backward(task * scale)
        return [task.detach()], []
