"""One training run of the classification experiment: the arm's recipe inside a Hugging Face Trainer.

The baseline is a plain `transformers.Trainer`; every other arm is the same Trainer with
`advlab.integrations.transformers.AdversarialTrainer` and the arm's recipe on the site
`bert.embeddings.word_embeddings`, masked by `attention_mask`. Optimizer (AdamW), linear
schedule with warm-up, batch order and the head's initialisation are the Trainer's and the
seed's, identical across the arms of a seed.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import torch

from advlab._errors import AdvlabValueError, NonFiniteError
from advlab.experiments.classification.config import ARM_UNITS, ARMS_FULL, SITE, ClassificationConfig
from advlab.experiments.classification.data import ClassificationData, collate

SMART_NOISE_STD = 1e-5  # mt-dnn adv_noise_var (a std), absolute: the published value is kept
FREELB_INIT_RATIO = 1.6  # FreeLB's GLUE launchers: adv-init-mag 1.6e-1 with adv-lr 1e-1
TRADES_BETA = 6.0  # Zhang et al. (2019)
VAT_WEIGHT = 1.0  # ALUM's alpha for fine-tuning


def absolute_size(arm: str, config: ClassificationConfig, scales: Mapping[str, float]) -> float:
    """The arm's main size in the unit its recipe takes: relative for `"row"` arms, else times the scale.

    Args:
        arm: An arm other than the baseline.
        config: The run's settings.
        scales: `embedding_scales` of the run (`"l2"`, `"elem"`).

    Returns:
        The size handed to the recipe.

    Examples:
        >>> absolute_size("smart", ClassificationConfig(sizes={"smart": 1e-3}), {"l2": 3.0, "elem": 0.05})
        5e-05
    """
    unit = ARM_UNITS[arm]
    size = config.size(arm)
    return size if unit == "row" else size * float(scales[unit])


def build_recipe(
    arm: str,
    model: Any,
    config: ClassificationConfig,
    scales: Mapping[str, float],
    *,
    generator: torch.Generator,
) -> Any:
    """The advlab recipe of `arm` on `model`'s word-embedding site.

    | arm | recipe | main size (unit) | other settings |
    |---|---|---|---|
    | noise | FreeLB, `direction="random"` | step (row) | FreeLB's init, K |
    | freelb | FreeLB | step η (row) | init U-magnitude 1.6 η, K = `adv_steps` |
    | villa | VILLA `preset="official"` | step (row) | K = 3, KL weight 1.5 |
    | smart | SMART `preset="mt-dnn"` | step (elem) | noise std 1e-5, 1 step, weight 1 |
    | r3f | R3F | uniform ε (elem) | λ = 1 |
    | vat | VAT, L-inf, symmetric KL (ALUM) | ε (elem) | ξ = 1e-3, weight 1 |
    | trades | TRADES, L2, 1 step | radius = step (l2) | β = 6 |
    | fastat | FastAT (FGSM, random start) | ε (elem) | step 1.25 ε |

    Args:
        arm: An arm other than `"baseline"`.
        model: The classifier.
        config: The run's settings.
        scales: `embedding_scales` of the run.
        generator: The recipe's randomness.

    Returns:
        The recipe.
    """
    import advlab

    sites = {"txt": SITE}
    size = absolute_size(arm, config, scales)
    if arm in ("freelb", "noise"):
        p = advlab.Perturbation(step_size=size, init=advlab.ScaledUniformSampler(FREELB_INIT_RATIO * size),
                                direction="random" if arm == "noise" else "gradient", relative=True)
        return advlab.FreeLB(model, sites, {"txt": p}, steps=config.adv_steps, generator=generator)
    if arm == "villa":
        p = advlab.Perturbation(step_size=size, relative=True)
        return advlab.VILLA(model, sites, {"txt": p}, preset="official", generator=generator)
    if arm == "smart":
        return advlab.SMART(model, sites, preset="mt-dnn", step_size=size, noise_std=SMART_NOISE_STD,
                            generator=generator)
    if arm == "r3f":
        return advlab.R3F(model, sites, eps=size, generator=generator)
    if arm == "vat":
        return advlab.VAT(model, sites, eps=size, norm="linf", divergence="symmetric_kl", weight=VAT_WEIGHT,
                          generator=generator)
    if arm == "trades":
        return advlab.TRADES(model, sites, steps=1, step_size=size, radius=size, norm="l2", beta=TRADES_BETA,
                             generator=generator)
    if arm == "fastat":
        return advlab.FastAT(model, sites, eps=size, generator=generator)
    raise AdvlabValueError(f"Expected an arm among {list(ARMS_FULL[1:])}, but got {arm!r}.")


@torch.no_grad()
def predict(model: Any, split: Any, batch_size: int = 128) -> torch.Tensor:
    """Predicted class of every caption of a split (eval mode; the model's mode is restored).

    Args:
        model: The classifier.
        split: A `Split`.
        batch_size: Captions per forward.

    Returns:
        Class indices. Shape [n].
    """
    was_training = model.training
    model.eval()
    try:
        out = []
        examples = split.examples()
        for i in range(0, len(examples), batch_size):
            batch = collate(examples[i : i + batch_size])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            if not torch.isfinite(logits).all():
                raise NonFiniteError("Expected finite logits at evaluation, but got NaN or inf.")
            out.append(logits.argmax(-1))
        return torch.cat(out)
    finally:
        model.train(was_training)


def train_run(
    model: Any,
    data: ClassificationData,
    arm: str,
    config: ClassificationConfig,
    *,
    seed: int,
    scales: Mapping[str, float],
    progress: bool = False,
    on_epoch: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train `model` on `data.train` for `config.epochs` epochs with the arm's recipe, through the Trainer.

    Args:
        model: The classifier (`build_model`), trained in place.
        data: The splits.
        arm: `"baseline"` (plain `Trainer`) or a recipe arm (`AdversarialTrainer`).
        config: The run's settings.
        seed: The Trainer's seed (batch order, dropout) and the recipe's generator seed.
        scales: `embedding_scales` for the absolute-size recipes.
        progress: The Trainer's tqdm bar.
        on_epoch: Called after each epoch with (epoch, mean training loss of the epoch).

    Returns:
        The mean training loss of each epoch (the Trainer's `loss` log).

    Raises:
        NonFiniteError: A training loss is NaN or inf.
    """
    import transformers
    from transformers import Trainer, TrainerCallback, TrainingArguments

    if arm not in ARMS_FULL:
        raise AdvlabValueError(f"Expected `arm` among {list(ARMS_FULL)}, but got {arm!r}.")
    losses: list[float] = []

    class _Epochs(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Mapping[str, float] | None = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                loss = float(logs["loss"])
                if not math.isfinite(loss):
                    raise NonFiniteError(f"{arm} seed {seed}: the training loss is {loss} at epoch {len(losses) + 1}.")
                losses.append(loss)
                if on_epoch is not None:
                    on_epoch(len(losses), loss)

    with tempfile.TemporaryDirectory(prefix="advlab-classification-") as tmp:
        args = TrainingArguments(
            tmp, num_train_epochs=config.epochs, per_device_train_batch_size=config.batch_size,
            learning_rate=config.lr, weight_decay=config.weight_decay, warmup_steps=config.warmup_ratio,
            lr_scheduler_type="linear", seed=seed, data_seed=seed, use_cpu=True, report_to=[], save_strategy="no",
            logging_strategy="epoch", disable_tqdm=not progress, remove_unused_columns=False,
            dataloader_num_workers=0,
        )
        kwargs: dict[str, Any] = {"model": model, "args": args, "train_dataset": data.train.examples(),
                                  "data_collator": collate, "callbacks": [_Epochs()]}
        if arm == "baseline":
            trainer = Trainer(**kwargs)
        else:
            from advlab.integrations.transformers import AdversarialTrainer

            generator = torch.Generator().manual_seed(10_000 + seed)
            recipe = build_recipe(arm, model, config, scales, generator=generator)
            trainer = AdversarialTrainer(**kwargs, recipe=recipe)
        trainer.remove_callback(transformers.PrinterCallback)
        if not progress:
            trainer.remove_callback(transformers.ProgressCallback)
        trainer.train()
    model.eval()
    return losses
