"""`StepStats`: what one recipe step reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["StepStats"]


@dataclass(frozen=True)
class StepStats:
    """Numbers from one training step of a recipe (one host sync to collect them).

    Attributes:
        task_loss: Task loss of each ascent step (mean over that step's forwards), unweighted.
        kl: Regulariser value of each ascent step (mean over that step's forwards), unweighted.
        delta_norm: Mean per-row norm of each modality's last perturbation.
        skipped_steps: Ascent steps skipped for a non-finite loss or δ gradient.
        overrides: Arguments that overrode the preset.

    Examples:
        >>> StepStats(task_loss=(0.7, 0.8), kl=(0.0, 0.1), delta_norm={"txt": 1e-3}).mean_task_loss
        0.75
    """

    task_loss: tuple[float, ...]
    kl: tuple[float, ...]
    delta_norm: dict[str, float]
    skipped_steps: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def mean_task_loss(self) -> float:
        """Task loss averaged over the ascent steps."""
        return sum(self.task_loss) / max(len(self.task_loss), 1)

    @property
    def mean_kl(self) -> float:
        """Regulariser averaged over the ascent steps."""
        return sum(self.kl) / max(len(self.kl), 1)


def collect_stats(
    task_loss: list[Any], kl: list[Any], delta_norm: dict[str, Any], skipped_steps: int, overrides: dict[str, Any]
) -> StepStats:
    """Turn per-step tensors into a `StepStats` with a single device-to-host copy."""
    import torch

    keys = list(delta_norm)
    values = [*task_loss, *kl, *(delta_norm[k] for k in keys)]
    flat = torch.stack([v.detach().float().reshape(()) for v in values]).tolist() if values else []
    n_task, n_kl = len(task_loss), len(kl)
    return StepStats(
        task_loss=tuple(flat[:n_task]),
        kl=tuple(flat[n_task : n_task + n_kl]),
        delta_norm=dict(zip(keys, flat[n_task + n_kl :])),
        skipped_steps=skipped_steps,
        overrides=dict(overrides),
    )
