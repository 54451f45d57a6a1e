"""Integrations with training frameworks, each in its own module and imported from there.

- `advlab.integrations.transformers`: `AdversarialTrainer`, a Hugging Face `Trainer` whose
  training step is an advlab recipe's step (extra: `pip install 'advlab[transformers]'`).
- `advlab.integrations.lightning`: `adversarial_step`, a recipe's step inside a
  `LightningModule.training_step` with manual optimisation (extra: `pip install 'advlab[lightning]'`).

Neither is imported here, so `import advlab.integrations` never needs the optional packages;
this module holds only what both share.
"""

from __future__ import annotations

from advlab.stats import StepStats

__all__ = ["describe_recipe", "recipe_log_values"]


def describe_recipe(recipe: object) -> str:
    """What was given where a recipe was expected, for error messages (a class is named as one).

    Args:
        recipe: The object given as `recipe`.

    Examples:
        >>> import advlab
        >>> describe_recipe(advlab.FreeLB)
        'the class FreeLB, not an instance (build it on the model first: FreeLB(model, sites=...))'
        >>> describe_recipe(None)
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
