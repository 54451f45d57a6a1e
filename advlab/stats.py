"""`StepStats`: what one recipe step reports."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["StepStats"]


class DeltaNorms(dict):
    """Modality -> mean δ norm (a tensor), as `FreeTraining.delta_norms` returns it.

    `reached` holds, per modality, the mean norm of δ sent and of what reached the model
    (`(x + δ) - x` in the site's dtype) at the last perturbed forward; `collect_stats` reports
    the second as `StepStats.effective_delta_norm` and passes both floats to `on_collect`
    (the lost-δ warning).
    """

    def __init__(
        self,
        norms: Mapping[str, Any],
        reached: Mapping[str, tuple[Any, Any]] | None = None,
        on_collect: Callable[[dict[str, float], dict[str, float]], None] | None = None,
    ) -> None:
        super().__init__(norms)
        self.reached = dict(reached or {})
        self.on_collect = on_collect


@dataclass(frozen=True)
class StepStats:
    """Numbers from one training step of a recipe (one host sync to collect them).

    Attributes:
        task_loss: Task loss of each ascent step (mean over that step's forwards), unweighted.
        kl: Regulariser value of each ascent step (mean over that step's forwards), unweighted.
        delta_norm: Mean per-row norm of each modality's last perturbation.
        skipped_steps: Ascent steps skipped for a non-finite loss or δ gradient.
        skip_reason: None, or what was non-finite first and where (under
            `on_nonfinite="skip"`; parameter gradients were left as before the step).
        overrides: Arguments that overrode the preset.
        effective_delta_norm: Mean per-row norm of what δ changed in the site tensor at
            each modality's last perturbed forward, `(x + δ) - x` computed in the site's
            dtype. Equal to the norm of δ up to rounding for a float32 site; much smaller when
            a bfloat16 / float16 embedding rounds a small δ away (a warning is issued once per
            site when less than half of δ's norm gets through).

    Examples:
        >>> StepStats(task_loss=(0.7, 0.8), kl=(0.0, 0.1), delta_norm={"txt": 1e-3}).mean_task_loss
        0.75
    """

    task_loss: tuple[float, ...]
    kl: tuple[float, ...]
    delta_norm: dict[str, float]
    skipped_steps: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)
    effective_delta_norm: dict[str, float] = field(default_factory=dict)
    skip_reason: str | None = None

    @property
    def mean_task_loss(self) -> float:
        """Task loss averaged over the ascent steps."""
        return sum(self.task_loss) / max(len(self.task_loss), 1)

    @property
    def mean_kl(self) -> float:
        """Regulariser averaged over the ascent steps."""
        return sum(self.kl) / max(len(self.kl), 1)


def collect_stats(
    task_loss: list[Any],
    kl: list[Any],
    delta_norm: dict[str, Any],
    skipped_steps: int,
    overrides: dict[str, Any],
    *,
    skip_reason: str | None = None,
) -> StepStats:
    """Turn per-step tensors into a `StepStats` with a single device-to-host copy."""
    import torch

    keys = list(delta_norm)
    reached = delta_norm.reached if isinstance(delta_norm, DeltaNorms) else {}
    r_keys = list(reached)
    values = [
        *task_loss, *kl, *(delta_norm[k] for k in keys),
        *(reached[k][0] for k in r_keys), *(reached[k][1] for k in r_keys),
    ]
    flat = torch.stack([v.detach().float().reshape(()) for v in values]).tolist() if values else []
    n_task, n_kl, n_d, n_r = len(task_loss), len(kl), len(keys), len(r_keys)
    at = n_task + n_kl + n_d
    sent = dict(zip(r_keys, flat[at : at + n_r]))
    effective = dict(zip(r_keys, flat[at + n_r :]))
    if isinstance(delta_norm, DeltaNorms) and delta_norm.on_collect is not None:
        delta_norm.on_collect(sent, effective)
    return StepStats(
        task_loss=tuple(flat[:n_task]),
        kl=tuple(flat[n_task : n_task + n_kl]),
        delta_norm=dict(zip(keys, flat[n_task + n_kl : at])),
        skipped_steps=skipped_steps,
        overrides=dict(overrides),
        effective_delta_norm=effective,
        skip_reason=skip_reason,
    )
