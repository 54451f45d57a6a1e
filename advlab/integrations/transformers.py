"""Hugging Face `Trainer` integration: an advlab recipe as the Trainer's training step.

`AdversarialTrainer` is a `transformers.Trainer` whose `training_step` hands the batch to a
recipe (`FreeLB`, `VILLA`, `SMART`, `R3F`, ...). The recipe runs the forwards and backwards
of the step; the Trainer keeps everything else: batch preparation, the optimizer and the
scheduler, gradient clipping, logging, evaluation, checkpoints and resuming. A Trainer script
changes in two lines:

```python
from advlab.integrations.transformers import AdversarialTrainer

recipe = advlab.FreeLB(model, sites={"txt": "bert.embeddings.word_embeddings"}, steps=3, step_size=1e-1)
trainer = AdversarialTrainer(model=model, args=TrainingArguments(...), train_dataset=ds, recipe=recipe)
trainer.train()
```

What carries over from the Trainer, and how:

- The loss of each forward is the Trainer's own `compute_loss` (the model's loss, label
  smoothing, `compute_loss_func`, `num_items_in_batch`).
- Gradient accumulation: each loss is scaled exactly as `Trainer.training_step` scales it (by
  1 / the number of micro-batches of the optimizer step, unless the Trainer deems the loss
  already normalised by `num_items_in_batch`), and the Trainer's `no_sync` over the first
  micro-batches composes with the recipe's own.
- Mixed precision: accelerate's `GradScaler` (fp16) is passed to the recipe as `scaler=`, so
  the loss scale is removed before δ moves; an overflow in any micro-batch skips the optimizer
  step as the Trainer's own overflow does. bf16 autocast covers every forward of the step.
- DDP (`torchrun`): the recipe gets the wrapped model, so its steps use advlab's
  one-reduction-per-step schedule.
- The recipe's statistics (`adv_task_loss`, `adv_regularizer`, `adv_delta_norm_<modality>`,
  `adv_skipped_steps`) are added to the Trainer's training logs, averaged over the steps since
  the last log and over processes.
- A recipe's `generator` state is saved in each checkpoint and restored on resume.

Needs the `transformers` extra: `pip install 'advlab[transformers]'` (transformers and accelerate).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

try:
    import accelerate  # noqa: F401 - the Trainer needs it; say so here rather than deep inside transformers
    import transformers
    from transformers.trainer import Trainer
except ImportError as _err:  # pragma: no cover - exercised by a test that hides the packages
    _missing = getattr(_err, "name", None) or "transformers"
    raise ImportError(
        f"advlab.integrations.transformers needs the `transformers` extra, but {_missing!r} cannot be imported; "
        "install it with: pip install 'advlab[transformers]' (transformers and accelerate)."
    ) from None

import torch
from torch import Tensor, nn

from advlab._errors import AdvlabTypeError, AdvlabValueError
from advlab.integrations import _describe_recipe, _make_scaler_skip_step, recipe_log_values
from advlab.sites import unwrap_model
from advlab.stats import StepStats

__all__ = ["AdversarialTrainer"]

_RNG_FILE = "advlab_recipe_rng_{}.pth"


def _check_recipe(recipe: Any) -> list[str]:
    """The recipe's modalities; refuses anything without `step`, `model` and `sites`."""
    step = getattr(recipe, "step", None)
    model = getattr(recipe, "model", None)
    sites = getattr(recipe, "sites", None)
    if not callable(step) or not isinstance(model, nn.Module) or not isinstance(sites, Mapping):
        raise AdvlabTypeError(
            "Expected `recipe` to be an advlab recipe (an object with `step(forward, task_loss, ...)`, a `model` and "
            f"`sites`, such as advlab.FreeLB, advlab.VILLA or advlab.SMART), but got {_describe_recipe(recipe)}."
        )
    return list(sites)


class _DefaultMaskKey(str):
    """The default `masks`, `"attention_mask"`, told apart from the same key named on purpose."""


_DEFAULT_MASKS = _DefaultMaskKey("attention_mask")


def _mask_keys(masks: str | Mapping[str, str | None] | None, modalities: list[str]) -> tuple[dict[str, str], bool]:
    """Modality -> batch key of its mask, and whether a missing key is an error.

    Only `"attention_mask"` (the default) may be missing from a batch (δ is then not masked);
    any other key was named on purpose, and a batch without it is an error, as in a mapping.
    The default is refused for a recipe with several modalities: one batch entry (the text's
    padding mask) would mask every modality's δ, silently wrong wherever the shapes happen to fit.
    """
    if masks is None:
        return {}, True
    if masks is _DEFAULT_MASKS and len(modalities) > 1:
        example = ", ".join(f"{m!r}: {'attention_mask' if i == 0 else None!r}" for i, m in enumerate(modalities))
        raise AdvlabValueError(
            f"Expected `masks` to name each modality's batch key for a recipe with several modalities {modalities}, "
            f"e.g. masks={{{example}}}, but it was left at the default 'attention_mask', which would mask every "
            "modality's δ with that one batch entry. Pass masks='attention_mask' to use it for all of them on "
            "purpose, or masks=None for no masks."
        )
    if isinstance(masks, str):
        return {m: masks for m in modalities}, masks != "attention_mask"
    if not isinstance(masks, Mapping):
        raise AdvlabTypeError(
            "Expected `masks` to be a batch key (str), a mapping modality -> batch key (or None), or None, "
            f"but got {type(masks).__name__}."
        )
    unknown = [m for m in masks if m not in modalities]
    if unknown:
        raise AdvlabValueError(f"Expected `masks` keys to be the recipe's modalities {modalities}, but got {unknown}.")
    bad = {m: k for m, k in masks.items() if k is not None and not isinstance(k, str)}
    if bad:
        raise AdvlabTypeError(f"Expected each `masks` value to be a batch key (str) or None, but got {bad}.")
    return {m: k for m, k in masks.items() if k is not None}, True


def _loss_and_outputs(result: Any, compute_loss: Any) -> tuple[Tensor, Any]:
    """`compute_loss(..., return_outputs=True)`'s `(loss, outputs)`; refuses a bare loss with a clear message."""
    if isinstance(result, (tuple, list)) and len(result) == 2:
        return result[0], result[1]
    if isinstance(result, Tensor):
        got = f"a Tensor of shape {tuple(result.shape)}"
    elif isinstance(result, (tuple, list)):
        got = f"a {type(result).__name__} of {len(result)}"
    else:
        got = type(result).__name__
    where = getattr(compute_loss, "__qualname__", "compute_loss")
    raise AdvlabTypeError(
        f"Expected `compute_loss(..., return_outputs=True)` ({where}) to return a pair (loss, model outputs), as "
        f"Trainer.compute_loss does, but got {got}; AdversarialTrainer needs each forward's outputs for the recipe. "
        "Return `(loss, outputs) if return_outputs else loss` from the override."
    )


def _not_a_scalar_loss(loss: Any, outputs: Any, trainer: Trainer) -> str:
    """The message for a `compute_loss` loss that is not one number, with where it came from."""
    got = f"shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
    if type(trainer).compute_loss is not AdversarialTrainer.compute_loss:
        source = f"the override {type(trainer).compute_loss.__qualname__}"
    elif trainer.compute_loss_func is not None:
        source = "`compute_loss_func`"
    elif trainer.label_smoother is not None:
        source = "the Trainer's label smoother"
    elif isinstance(outputs, Mapping):
        source = "the model's `loss` entry"
    elif isinstance(outputs, (tuple, list, Tensor)):
        source = f"the first element of the model's {type(outputs).__name__} output (the Trainer takes it as the loss)"
    else:
        source = "compute_loss"
    return (
        f"Expected compute_loss to give one scalar loss per forward, but got {got}, from {source}. Return the "
        "mean (or summed) loss first when labels are given, or pass `compute_loss_func=` to the Trainer."
    )


class AdversarialTrainer(Trainer):
    """A `transformers.Trainer` whose training step is an advlab recipe's step.

    Takes every argument of `transformers.Trainer`, plus `recipe` and `masks`. Build the
    recipe on the same `model` object that is given to the Trainer (before the Trainer wraps
    it); the recipe's sites are modules of that model.

    Args:
        *args: Positional arguments of `transformers.Trainer`.
        recipe: The advlab recipe (`advlab.FreeLB`, `advlab.VILLA`, `advlab.SMART`, ...), built on
            `model`.
        masks: Which batch entry masks each modality's δ (1 = real token): a batch key for every
            modality (default `"attention_mask"`, used when the batch has it; any other key
            missing from a batch is an error; a recipe with several modalities must name each
            modality's key), a mapping modality -> batch key (or None for no mask; a named key
            missing from a batch is an error), or None (no masks).
        **kwargs: Keyword arguments of `transformers.Trainer` (`model`, `args`, `train_dataset`,
            `eval_dataset`, `data_collator`, `compute_metrics`, ...). `model_init` is refused (a
            recipe is bound to one model object).

    Examples:
        >>> import torch, transformers, advlab
        >>> from transformers import BertConfig, BertForSequenceClassification, TrainingArguments
        >>> from advlab.integrations.transformers import AdversarialTrainer
        >>> _ = torch.manual_seed(0)
        >>> config = BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        ...                     intermediate_size=16, num_labels=2)
        >>> model = BertForSequenceClassification(config)
        >>> ds = [{"input_ids": torch.tensor([2, 5, 7, 0]), "attention_mask": torch.tensor([1, 1, 1, 0]),
        ...        "labels": torch.tensor(i % 2)} for i in range(8)]
        >>> recipe = advlab.FreeLB(model, sites={"txt": "bert.embeddings.word_embeddings"}, steps=2, step_size=0.1)
        >>> args = TrainingArguments("/tmp/advlab-doctest-trainer", max_steps=2, per_device_train_batch_size=4,
        ...                          use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
        >>> trainer = AdversarialTrainer(model=model, args=args, train_dataset=ds, recipe=recipe)
        >>> trainer.remove_callback(transformers.PrinterCallback)  # keeps this example's output short
        >>> trainer.train().global_step
        2
    """

    def __init__(
        self,
        *args: Any,
        recipe: Any,
        masks: str | Mapping[str, str | None] | None = _DEFAULT_MASKS,
        **kwargs: Any,
    ) -> None:
        modalities = _check_recipe(recipe)
        self.mask_keys, self._masks_required = _mask_keys(masks, modalities)
        if kwargs.get("model_init") is not None:
            raise AdvlabValueError(
                "Expected `model` (the model the recipe was built on), but got `model_init`: a recipe's sites are "
                "modules of one model object, which `model_init` would replace. Build the model and the recipe, "
                "and pass `model=`."
            )
        super().__init__(*args, **kwargs)
        if unwrap_model(recipe.model) is not unwrap_model(self.model):
            raise AdvlabValueError(
                f"Expected `recipe` to be built on the Trainer's `model` ({type(self.model).__name__}), but it was "
                f"built on another model object ({type(unwrap_model(recipe.model)).__name__}); build the recipe on "
                "the model passed to the Trainer."
            )
        if self.is_deepspeed_enabled:
            raise AdvlabValueError(
                "Expected a Trainer without DeepSpeed, but `args.deepspeed` is set: DeepSpeed runs its own backward "
                "and loss scaling, which a recipe's several backwards per step cannot go through. Use DDP or FSDP."
            )
        optim = str(getattr(self.args.optim, "value", self.args.optim))
        if "lomo" in optim or optim.endswith("_layerwise"):
            raise AdvlabValueError(
                f"Expected an optimizer that steps once per optimizer step, but `args.optim` is {optim!r}, which "
                "updates the weights inside each backward: a recipe runs several backwards per step (one per "
                "ascent step), and the weights would move between them. Use another `optim`, e.g. 'adamw_torch'."
            )
        self.recipe = recipe
        self._recipe_stats: list[StepStats] = []
        self._warned_unmasked = False  # the default mask key missing from a batch: said once

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.train`, starting with no recipe statistics left over from an earlier run.

        The statistics of steps after the last log of a run (`logging_steps` that does not divide
        the number of steps) are never logged; without this reset they would be averaged into
        the first log of the next `train()` call on the same Trainer.

        Args:
            *args: Positional arguments of `transformers.Trainer.train`.
            **kwargs: Keyword arguments of `transformers.Trainer.train` (`resume_from_checkpoint`, ...).

        Returns:
            The Trainer's `TrainOutput`.
        """
        self._recipe_stats = []
        return super().train(*args, **kwargs)

    # ------------------------------------------------------------------ the step
    def _recipe_masks(self, inputs: Mapping[str, Any]) -> dict[str, Tensor]:
        masks: dict[str, Tensor] = {}
        for modality, key in self.mask_keys.items():
            if key in inputs:
                masks[modality] = inputs[key]
            elif self._masks_required:
                raise AdvlabValueError(
                    f"Expected the batch to hold {key!r}, the mask of modality {modality!r} (from `masks`), but its "
                    f"keys are {sorted(inputs)}; pass masks={{{modality!r}: None}} for no mask, or check "
                    "`remove_unused_columns` and the data collator."
                )
            elif not self._warned_unmasked:
                self._warned_unmasked = True
                columns = getattr(self, "_signature_columns", None) or [key]
                why = (
                    f" If the data has it, `remove_unused_columns` drops it, because "
                    f"{type(unwrap_model(self.model)).__name__}.forward does not take {key!r}; to mask δ, give "
                    f"forward an {key!r} (or **kwargs) argument, which it may ignore."
                    if self.args.remove_unused_columns and key not in columns
                    else ""
                )
                warnings.warn(
                    f"The batch holds no {key!r} (its keys are {sorted(inputs)}), so δ of modality {modality!r} "
                    f"perturbs every position, padding included.{why} Pass masks=None to perturb everywhere "
                    "without this warning.",
                    UserWarning,
                    stacklevel=2,
                )
        return masks

    def _loss_scale(self, num_items_in_batch: Tensor | int | None) -> float:
        """The factor `Trainer.training_step` and `Accelerator.backward` apply to the loss of a micro-batch."""
        if self.loss_is_scaled_for_ga is not None:
            scaled = bool(self.loss_is_scaled_for_ga)
        else:  # as Trainer.training_step decides it
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None
            )
        scale = 1.0 if scaled else 1.0 / self.current_gradient_accumulation_steps
        return scale / self.accelerator.gradient_accumulation_steps  # Accelerator.backward (1 under the Trainer)

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor | Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        """One training step: the recipe's forwards and backwards on the Trainer's batch.

        Args:
            model: The model as the Trainer holds it (wrapped in DDP under `torchrun`).
            inputs: The batch, as the data collator returns it.
            num_items_in_batch: The number of label items over the optimizer step's micro-batches
                (the Trainer counts them when the model or `compute_loss_func` uses them).

        Returns:
            The mean task loss over the recipe's ascent steps, scaled as the Trainer scales a
            micro-batch's loss (what the Trainer's `loss` log averages).
        """
        if transformers.trainer.is_sagemaker_mp_enabled():
            raise AdvlabValueError("Expected a Trainer without SageMaker model parallelism, but it is enabled.")
        if self.args.n_gpu > 1:
            raise AdvlabValueError(
                f"Expected one device per process, but the Trainer uses {self.args.n_gpu} GPUs in one process "
                "(DataParallel), whose replicas would each draw their own δ; launch one process per GPU with "
                "`torchrun --nproc_per_node N` (DDP) instead."
            )
        cp_context, inputs = self._prepare_context_parallel_inputs(model, inputs)
        with cp_context():
            model.train()
            if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
                self.optimizer.train()
            inputs = self._prepare_inputs(inputs)
            masks = self._recipe_masks(inputs)
            scale = self._loss_scale(num_items_in_batch)
            losses: list[tuple[Any, Tensor]] = []  # (model output, its loss) of each forward of the step

            def forward() -> Any:
                with self.compute_loss_context_manager():  # compute_loss pops labels: give it its own dict
                    result = self.compute_loss(
                        model, dict(inputs), return_outputs=True, num_items_in_batch=num_items_in_batch
                    )
                loss, outputs = _loss_and_outputs(result, type(self).compute_loss)
                if not isinstance(loss, Tensor) or loss.numel() != 1:
                    raise AdvlabValueError(_not_a_scalar_loss(loss, outputs, self))
                losses.append((outputs, loss))
                return outputs

            def task_loss(outputs: Any) -> Tensor:
                for out, loss in reversed(losses):
                    if out is outputs:
                        return loss
                raise AdvlabValueError(
                    "Expected the recipe to ask for the loss of an output of this step's forward, but got another "
                    "object; AdversarialTrainer computes each loss with Trainer.compute_loss at its forward."
                )

            stats = self._recipe_step(model, forward, task_loss, masks, scale)
        losses.clear()  # the step's graphs are gone; drop the outputs
        if stats.skip_reason is not None and self.optimizer is not None:
            _make_scaler_skip_step(self.accelerator.scaler, [self.optimizer])
        self._recipe_stats.append(stats)
        return torch.tensor(stats.mean_task_loss * scale, device=self.args.device)

    def _recipe_step(
        self,
        model: nn.Module,
        forward: Callable[[], Any],
        task_loss: Callable[[Any], Tensor],
        masks: Mapping[str, Tensor],
        scale: float,
    ) -> StepStats:
        recipe = self.recipe
        own = recipe.model
        if unwrap_model(self.accelerator.unwrap_model(model)) is not unwrap_model(own):
            raise AdvlabValueError(
                "Expected the Trainer to train the model the recipe was built on, but it trains another object "
                f"({type(self.accelerator.unwrap_model(model)).__name__}); build the recipe on the Trainer's model."
            )
        recipe.model = model  # the wrapper (DDP) decides the reduction schedule; sites stay those of `own`
        try:
            return recipe.step(forward, task_loss, masks=masks, scale=scale, scaler=self.accelerator.scaler)
        except (AdvlabValueError, AdvlabTypeError) as err:  # a mask of the wrong shape or type: say where it came from
            found = re.match(r"Expected `masks\['([^']+)'\]`", str(err))
            key = self.mask_keys.get(found.group(1)) if found else None
            if key is None or type(err) not in (AdvlabValueError, AdvlabTypeError):
                raise
            raise type(err)(
                f"{err} That mask is the batch's {key!r}, which AdversarialTrainer's `masks=` gives modality "
                f"{found.group(1)!r} (the default `masks='attention_mask'` gives it to every modality); name each "
                f"modality's own batch key with masks={{{found.group(1)!r}: ...}}, or None for no mask."
            ) from err
        finally:
            recipe.model = own

    # ------------------------------------------------------------------ logs and checkpoints
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the recipe's statistics since the last training log to `logs` (averaged over processes)."""
        if "loss" in logs and self._recipe_stats:
            values = recipe_log_values(self._recipe_stats)
            self._recipe_stats = []
            if self.accelerator.num_processes > 1:  # every process logs here, after the same steps
                keys = list(values)
                t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.args.device)
                t = self.accelerator.reduce(t, reduction="sum")
                n = self.accelerator.num_processes
                values = {k: v if k == "adv_skipped_steps" else v / n for k, v in zip(keys, t.tolist())}
            logs.update(values)
        super().log(logs, start_time)

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        generator = getattr(self.recipe, "generator", None)
        if isinstance(generator, torch.Generator):
            path = os.path.join(output_dir, _RNG_FILE.format(self.args.process_index))
            torch.save({"generator": generator.get_state()}, path)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        generator = getattr(self.recipe, "generator", None)
        if checkpoint is None or not isinstance(generator, torch.Generator):
            return
        path = os.path.join(checkpoint, _RNG_FILE.format(self.args.process_index))
        if os.path.isfile(path):
            generator.set_state(torch.load(path, weights_only=True)["generator"])
        else:
            warnings.warn(
                f"Expected the checkpoint {checkpoint!r} to hold the recipe's generator state "
                f"({os.path.basename(path)}), but it does not (saved without a recipe generator, by another number "
                "of processes, or by a plain Trainer): the recipe's draws after the resume differ from an "
                "uninterrupted run.",
                UserWarning,
                stacklevel=2,
            )
