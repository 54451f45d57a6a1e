"""Integrations with training frameworks, each in its own module and imported from there.

- `advlab.integrations.transformers`: `AdversarialTrainer`, a Hugging Face `Trainer` whose
  training step is an advlab recipe's step (extra: `pip install 'advlab[transformers]'`).
- `advlab.integrations.lightning`: `adversarial_step`, a recipe's step inside a
  `LightningModule.training_step` with manual optimisation (extra: `pip install 'advlab[lightning]'`).

Neither is imported here, so `import advlab.integrations` never needs the optional packages;
this module holds only what both share.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from advlab.stats import StepStats

__all__ = ["recipe_log_values"]


def _describe_recipe(recipe: object) -> str:
    """What was given where a recipe was expected, for error messages (a class is named as one).

    Args:
        recipe: The object given as `recipe`.

    Examples:
        >>> import advlab
        >>> _describe_recipe(advlab.FreeLB)
        'the class FreeLB, not an instance (build it on the model first: FreeLB(model, sites=...))'
        >>> _describe_recipe(None)
        'NoneType'
    """
    if isinstance(recipe, type):
        name = recipe.__name__
        return f"the class {name}, not an instance (build it on the model first: {name}(model, sites=...))"
    return type(recipe).__name__


def recipe_log_values(stats: list[StepStats]) -> dict[str, float]:
    """Average a list of `StepStats` into the values the integrations log.

    `AdversarialTrainer` and `adversarial_step` log these keys: `adv_task_loss` (mean task
    loss over ascent steps), `adv_regularizer` (mean regulariser, only for recipes that have
    one), `adv_delta_norm_<modality>` (mean δ norm) and `adv_skipped_steps` (total ascent steps
    skipped for a non-finite value).

    Args:
        stats: The statistics of the training steps since the last log.

    Examples:
        >>> from advlab import StepStats
        >>> recipe_log_values([StepStats((0.5,), (), {"txt": 0.1}), StepStats((0.7,), (), {"txt": 0.3})])
        {'adv_task_loss': 0.6, 'adv_delta_norm_txt': 0.2, 'adv_skipped_steps': 0.0}
    """
    if not stats:
        return {}
    n = len(stats)
    out = {"adv_task_loss": sum(s.mean_task_loss for s in stats) / n}
    if any(s.kl for s in stats):
        out["adv_regularizer"] = sum(s.mean_kl for s in stats) / n
    for m in stats[0].delta_norm:
        values = [s.delta_norm[m] for s in stats if m in s.delta_norm]
        out[f"adv_delta_norm_{m}"] = sum(values) / max(len(values), 1)
    out["adv_skipped_steps"] = float(sum(s.skipped_steps for s in stats))
    return out


def _make_scaler_skip_step(
    scaler: Any, optimizers: Iterable[torch.optim.Optimizer], params: Iterable[nn.Parameter] | None = None
) -> None:
    """After a step the recipe skipped under fp16, make the framework's `scaler.step` skip the optimizer step.

    On an overflow the recipe puts the parameter gradients back as they were and lowers the
    scale, which suits a hand loop that then leaves `scaler.step` out. A Trainer (Hugging Face
    or Lightning) calls `scaler.step` anyway: it would step on the other micro-batches'
    gradients only, and with none left torch fails ("No inf checks were recorded for this
    optimizer"). An overflow in the framework's own backward instead reaches the gradients, so
    the scaler skips the step and lowers the scale once. This does the same: the scale goes
    back to the step's own (the scaler lowers it once, at its next `update`) and, in each
    optimizer, one gradient is set to NaN for the scaler to find. Without an enabled scaler
    (float32, bf16) nothing changes.

    Args:
        scaler: The framework's `torch.amp.GradScaler`, or None.
        optimizers: The optimizers the framework steps next.
        params: If given, only these parameters' gradients are candidates (the recipe's model's).

    Examples:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.SGD([w], lr=0.1)
        >>> scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
        >>> _ = scaler.scale(w.sum())  # the step's losses were scaled; the recipe then lowered the scale
        >>> _make_scaler_skip_step(scaler, [opt])
        >>> scaler.get_scale(), w.grad.isnan().all().item()
        (8.0, True)
        >>> scaler.step(opt); scaler.update(); scaler.get_scale(), w.tolist()  # skipped, scale lowered once
        (4.0, [1.0, 1.0])
    """
    if scaler is None or not scaler.is_enabled():
        return
    scaler.update(float(scaler.get_scale()) / float(scaler.get_backoff_factor()))
    owned = None if params is None else {id(p) for p in params}
    for optimizer in optimizers:
        candidates = (p for group in optimizer.param_groups for p in group["params"])
        param = next((p for p in candidates if p.requires_grad and (owned is None or id(p) in owned)), None)
        if param is None:
            continue
        with torch.no_grad():
            if param.grad is None:
                param.grad = torch.empty_like(param)
            param.grad.fill_(float("nan"))
