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
from typing import Any, Literal

import torch
from torch import Tensor, nn

from advlab._checks import check_nonnegative
from advlab.free import free_training
from advlab.hooks import MaskLike
from advlab.perturbation import Perturbation
from advlab.samplers import ScaledUniformSampler
from advlab.sites import SiteLike, resolve_sites
from advlab.stats import StepStats, collect_stats

__all__ = ["NEFTune"]


class NEFTune:
    """NEFTune: train on the task loss of embeddings plus scaled uniform noise.

    Args:
        model: The model.
        sites: Modality to site (the token embedding output); None = `model.perturbation_sites()`.
        alpha: Noise scale α (the paper uses 5, 10 and 15; Hugging Face's
            `neftune_noise_alpha`).
        on_nonfinite: `"raise"` (default without a scaler) or `"skip"`.
        generator: Randomness for the noise.

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

    def __init__(
        self,
        model: nn.Module,
        sites: Mapping[str, SiteLike] | None = None,
        *,
        alpha: float = 5.0,
        on_nonfinite: Literal["raise", "skip"] | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.model = model
        self.sites = resolve_sites(model, sites)  # once: steps reuse the resolved modules
        self.alpha = check_nonnegative(alpha, "alpha")
        # "random" direction: δ needs no gradient (NEFTune never ascends)
        self.perturbations = {
            k: Perturbation(step_size=0.0, direction="random", init=ScaledUniformSampler(self.alpha)) for k in self.sites
        }
        self.on_nonfinite, self.generator = on_nonfinite, generator

    def step(
        self,
        forward: Callable[[], Any],
        task_loss: Callable[[Any], Tensor],
        *,
        masks: Mapping[str, MaskLike] | None = None,
        scale: float = 1.0,
        scaler: Any | None = None,
    ) -> StepStats:
        """One NEFTune step: one noised forward (clean in eval mode) and its backward.

        Args:
            forward: Runs the model on the batch and returns its output.
            task_loss: Output -> scalar task loss.
            masks: Modality to bool mask (True = real token); L counts the True positions.
            scale: Multiplies the loss (e.g. 1 / gradient-accumulation steps).
            scaler: A `torch.amp.GradScaler`.

        Returns:
            The task loss and the noise norm (no KL; `delta_norm` is empty in eval mode).
        """
        scale = check_nonnegative(scale, "scale")
        noisy = () if not self.model.training else None  # None: every modality
        with free_training(
            self.model, self.sites, self.perturbations, steps=1, masks=masks, scaler=scaler,
            on_nonfinite=self.on_nonfinite, generator=self.generator,
        ) as ft:
            for _ in ft:
                task = task_loss(ft.forward(forward, noisy))
                ft.backward(task * scale)
            norms = ft.delta_norms()
        return collect_stats([task.detach()], [], norms, ft.skipped_steps, {}, skip_reason=ft.skip_reason)
