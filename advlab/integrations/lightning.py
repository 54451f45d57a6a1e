"""Lightning integration: an advlab recipe inside `LightningModule.training_step`.

A recipe runs several forwards and backwards per step, so the module uses Lightning's manual
optimisation and calls `adversarial_step` where it would call `manual_backward`:

```python
class Classifier(L.LightningModule):
    def __init__(self, model):
        super().__init__()
        self.automatic_optimization = False          # the recipe runs the backwards
        self.model = model
        self.recipe = advlab.FreeLB(model, sites={"txt": "bert.embeddings.word_embeddings"})

    def forward(self, batch):                        # adversarial_step calls the module on the batch
        return self.model(**batch)

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        stats = adversarial_step(self, self.recipe, batch, lambda out: out.loss,
                                 masks={"txt": batch["attention_mask"]})
        opt.step()
```

`adversarial_step` calls the module through the strategy's wrapper, so that under
`strategy="ddp"` the recipe's forwards go through DistributedDataParallel and its steps use
advlab's one-reduction-per-step schedule (Lightning itself would reduce at every backward of
manual optimisation). It passes the precision plugin's `GradScaler` (`precision="16-mixed"`)
to the recipe as `scaler=` (the loss scale never reaches δ); `"bf16-mixed"` autocast already
covers `training_step`. It logs the recipe's statistics with `module.log_dict`.

Needs the `lightning` extra: `pip install 'advlab[lightning]'`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

try:
    import lightning.pytorch as pl
except ImportError as _err:  # pragma: no cover - exercised by a test that hides the package
    _missing = getattr(_err, "name", None) or "lightning"
    raise ImportError(
        f"advlab.integrations.lightning needs the `lightning` extra, but {_missing!r} cannot be imported; "
        "install it with: pip install 'advlab[lightning]'."
    ) from None

from torch import Tensor

from advlab._errors import AdvlabTypeError, AdvlabValueError
from advlab.hooks import MaskLike
from advlab.integrations import _describe_recipe, _make_scaler_skip_step, recipe_log_values
from advlab.sites import unwrap_model
from advlab.stats import StepStats

__all__ = ["adversarial_step"]


def _check_forward_takes_batch(module: pl.LightningModule, batch: Any) -> None:
    """Refuse, before any hook goes on, a `forward` that cannot be called as `module(batch)`."""
    try:
        signature = inspect.signature(module.forward)
    except (TypeError, ValueError):  # no signature to read (a builtin, say): the call will tell
        return
    try:
        signature.bind(batch)
    except TypeError as err:
        raise AdvlabTypeError(
            f"Expected `{type(module).__name__}.forward` to take the batch as its one argument (adversarial_step "
            f"runs `module(batch)` at each ascent step), but forward{signature} cannot be called so: {err}. "
            "Write `def forward(self, batch): return self.model(**batch)` (or what the batch needs)."
        ) from None


def adversarial_step(
    module: pl.LightningModule,
    recipe: Any,
    batch: Any,
    task_loss: Callable[[Any], Tensor],
    *,
    masks: Mapping[str, MaskLike] | None = None,
    scale: float = 1.0,
    log: bool = True,
) -> StepStats:
    """Run one step of `recipe` inside `module.training_step` (manual optimisation).

    The forward of each ascent step is `module(batch)`, called through the strategy's wrapper
    (DDP under `strategy="ddp"`), so `module.forward` must take the batch and return what
    `task_loss` (and the recipe's logits) read. Parameter gradients are accumulated; the
    caller zeroes them before and steps the optimizer after, as in any manual optimisation.
    Under `precision="16-mixed"`, a step with an overflow makes the scaler skip the next
    `opt.step()` and lower the scale once, as an overflow in `manual_backward` does.

    Args:
        module: The LightningModule, with `automatic_optimization = False`, attached to a Trainer.
        recipe: An advlab recipe (`advlab.FreeLB`, `advlab.VILLA`, `advlab.SMART`, ...) built on
            `module` or on one of its submodules.
        batch: What `module.forward` takes.
        task_loss: Output of `module(batch)` -> scalar loss.
        masks: Modality -> mask (1 = real element), e.g. `{"txt": batch["attention_mask"]}`.
        scale: Factor on every loss, e.g. 1 / the number of micro-batches when accumulating.
        log: Log the recipe's statistics (`adv_task_loss`, `adv_regularizer`,
            `adv_delta_norm_<modality>`, `adv_skipped_steps`) with `module.log_dict`.

    Returns:
        The recipe's `StepStats`.

    Examples:
        >>> import torch, advlab, lightning.pytorch as pl
        >>> from torch import nn
        >>> from advlab.integrations.lightning import adversarial_step
        >>> class Module(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.automatic_optimization = False
        ...         self.net = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 2))
        ...         self.recipe = advlab.FreeLB(self.net, {"txt": "0"}, steps=2)
        ...     def forward(self, batch):
        ...         return self.net(batch[0])
        ...     def training_step(self, batch, batch_idx):
        ...         opt = self.optimizers()
        ...         opt.zero_grad()
        ...         adversarial_step(self, self.recipe, batch, lambda out: nn.functional.cross_entropy(out, batch[1]))
        ...         opt.step()
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> data = [(torch.tensor([1, 2]), torch.tensor(0)), (torch.tensor([3, 4]), torch.tensor(1))]
        >>> trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=2))
        >>> sorted(trainer.callback_metrics)
        ['adv_delta_norm_txt', 'adv_skipped_steps', 'adv_task_loss']
    """
    if not isinstance(module, pl.LightningModule):
        raise AdvlabTypeError(f"Expected `module` to be a LightningModule, but got {type(module).__name__}.")
    if module.automatic_optimization:
        raise AdvlabValueError(
            "Expected `module.automatic_optimization = False` (manual optimisation: the recipe runs the step's "
            "backwards), but it is True; set it in the module's __init__ and step the optimizer in training_step."
        )
    own = getattr(recipe, "model", None)
    if not callable(getattr(recipe, "step", None)) or own is None:
        raise AdvlabTypeError(
            "Expected `recipe` to be an advlab recipe (an object with `step(forward, task_loss, ...)` and a "
            f"`model`, such as advlab.FreeLB, advlab.VILLA or advlab.SMART), but got {_describe_recipe(recipe)}."
        )
    if not any(m is unwrap_model(own) for m in module.modules()):
        raise AdvlabValueError(
            f"Expected `recipe` to be built on `module` or one of its submodules, but it was built on a "
            f"{type(unwrap_model(own)).__name__} that `module` ({type(module).__name__}) does not hold."
        )
    _check_forward_takes_batch(module, batch)
    trainer = module._trainer
    if trainer is None:
        raise AdvlabValueError("Expected `module` to be attached to a Trainer (call from `training_step`).")
    wrapper = trainer.strategy.model
    if wrapper is None or unwrap_model(wrapper) is not module:
        wrapper = module
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    recipe.model = wrapper  # DDP decides the reduction schedule; the sites stay those of `own`
    try:
        stats: StepStats = recipe.step(lambda: wrapper(batch), task_loss, masks=masks, scale=scale, scaler=scaler)
    finally:
        recipe.model = own
    if stats.skip_reason is not None:
        _make_scaler_skip_step(scaler, trainer.optimizers, unwrap_model(own).parameters())
    if log:
        module.log_dict(recipe_log_values([stats]), on_step=True, on_epoch=False)
    return stats
