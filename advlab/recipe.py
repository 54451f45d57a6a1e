"""`Recipe`: what every training recipe shares, a frozen config and one `step` per batch.

A recipe (`VILLA`, `FreeLB`, `SMART`, `VAT`, `TRADES`, `R3F`, `NEFTune`, `FastAT`) is a
config dataclass of numbers (`VILLAConfig`, `FreeLBConfig`, ...), the pieces it is handed
(`regularizer=`, `ascender=`, `logits=`), and the loss it runs inside `free_training`. Every
recipe is built the same way:

```python
VILLA(model, sites)                                   # the default preset
VILLA(model, sites, preset="vqa-large")               # a named preset: VILLA.presets["vqa-large"]
VILLA(model, sites, steps=2, kl_weight=1.0)           # keyword overrides of the preset's fields
VILLA(model, sites, config=dataclasses.replace(VILLA.presets["vcr-base"], steps=2))
```

Overrides are checked against the config's fields (a misspelt name is refused with the list of
known ones) and the values by the config itself; an override of None keeps the preset's value.

Shape notation:
    - b: batch size; n: positions; d: features
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from advlab._checks import check_callable, check_module, check_nonnegative, check_scalar
from advlab._errors import AdvlabTypeError, AdvlabValueError
from advlab.free import FreeTraining, free_training
from advlab.hooks import MaskLike
from advlab.perturbation import Perturbation
from advlab.sites import SiteLike, resolve_sites
from advlab.stats import StepStats, collect_stats

__all__ = ["Recipe", "build_config"]


def build_config(
    owner: str,
    config_class: type,
    presets: Mapping[str, Any],
    config: Any | None,
    preset: str | None,
    overrides: Mapping[str, Any],
    *,
    default_preset: str | None = None,
) -> Any:
    """The config a recipe runs with: `config` or a preset, with keyword overrides applied.

    Args:
        owner: The recipe's name, for error messages.
        config_class: The recipe's frozen config dataclass.
        presets: Preset name -> config instance.
        config: A config instance, or None.
        preset: A preset name, or None (then `default_preset`, or the class's defaults).
        overrides: Field name -> value; None values keep the base value.
        default_preset: Preset used when neither `config` nor `preset` is given.

    Returns:
        A `config_class` instance (validated by its `__post_init__`).

    Examples:
        >>> from advlab.freelb import FreeLBConfig
        >>> build_config("FreeLB", FreeLBConfig, {}, None, None, {"steps": 2}).steps
        2
        >>> build_config("FreeLB", FreeLBConfig, {}, None, None, {"stepz": 2})
        Traceback (most recent call last):
        ...
        advlab._errors.AdvlabTypeError: Expected the keyword arguments of `FreeLB` to be fields of FreeLBConfig ['steps', 'step_size', 'init_magnitude', 'radius', 'norm', 'mode'] (or its other arguments), but got ['stepz'].
    """
    names = [f.name for f in dataclasses.fields(config_class)]
    unknown = [k for k in overrides if k not in names]
    if unknown:
        raise AdvlabTypeError(
            f"Expected the keyword arguments of `{owner}` to be fields of {config_class.__name__} {names} (or its "
            f"other arguments), but got {unknown}."
        )
    changes = {k: v for k, v in overrides.items() if v is not None}
    if config is not None and preset is not None:
        raise AdvlabValueError(f"Expected either `config` or `preset` for `{owner}`, but got both.")
    if config is not None:
        if not isinstance(config, config_class):
            raise AdvlabTypeError(
                f"Expected `config` to be a {config_class.__name__}, but got {type(config).__name__}."
            )
        base = config
    else:
        name = default_preset if preset is None else preset
        if name is not None and name not in presets:
            raise AdvlabValueError(f"Expected `preset` to be one of {sorted(presets)}, but got {name!r}.")
        base = presets[name] if name is not None else None
    if base is not None:
        return dataclasses.replace(base, **changes) if changes else base
    try:
        return config_class(**changes)
    except TypeError as error:  # a required field is missing
        missing = [f.name for f in dataclasses.fields(config_class)
                   if f.name not in changes and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        raise AdvlabTypeError(f"Expected `{owner}` to get {', '.join(f'`{m}`' for m in missing)}, but got none.") \
            if missing else error


def refuse_together(owner: str, given: Mapping[str, Any], names: tuple[str, ...], other: str, why: str) -> None:
    """Refuse settings that `other` (an injected piece) would make meaningless, when both are given."""
    if any(given.get(k) is not None for k in names):
        raise AdvlabValueError(
            f"Expected either `{other}` or {' / '.join(f'`{k}`' for k in names)} ({why}) for `{owner}`, but got both."
        )


class Recipe:
    """Base class of the recipes: one `step` per batch, inside `free_training`.

    A subclass sets `_config_class` (and `presets`), builds `self.perturbations` and the
    engine options in `__init__`, and writes the body of one step in `_run`.

    Attributes:
        model: The model the recipe trains.
        sites: The resolved perturbation sites.
        config: The recipe's frozen config (numbers and choices only).
        overrides: The keyword overrides given to the constructor (reported in `StepStats`).
        perturbations: Modality -> `Perturbation` used by the engine.
    """

    _config_class: ClassVar[type]  # the recipe's frozen config dataclass
    presets: ClassVar[Mapping[str, Any]] = {}
    """Preset name -> config (instances of the config dataclass)."""
    _default_preset: ClassVar[str | None] = None  # the preset used when neither `config` nor `preset` is given

    model: nn.Module
    sites: Mapping[str, Any]
    config: Any
    overrides: dict[str, Any]
    perturbations: dict[str, Perturbation]
    on_nonfinite: str | None
    generator: torch.Generator | None

    def _setup(
        self,
        model: nn.Module,
        sites: Mapping[str, SiteLike] | None,
        config: Any | None,
        preset: str | None,
        overrides: Mapping[str, Any],
        *,
        on_nonfinite: str | None,
        generator: torch.Generator | None,
    ) -> Any:
        """Check the model, resolve the sites and the config; return the config."""
        self.model = check_module(model)
        self.config = build_config(type(self).__name__, self._config_class, self.presets, config, preset, overrides,
                                   default_preset=self._default_preset)
        self.overrides = {k: v for k, v in overrides.items() if v is not None}
        self.sites = resolve_sites(model, sites)  # once: steps reuse the resolved modules
        self.on_nonfinite, self.generator = on_nonfinite, generator
        return self.config

    def _take_regularizers(
        self,
        overrides: Mapping[str, Any],
        configures: tuple[str, ...],
        regularizer: Any | None,
        ascent_regularizer: Any | None = None,
        *,
        default: Callable[[Any, Any], Tensor],
        default_ascent: Callable[[Any, Any], Tensor] | None = None,
    ) -> None:
        """Set `self.regularizer` (the trained term) and `self.ascent_regularizer` (what δ ascends).

        An injected regulariser is checked and refused together with the overrides in
        `configures` (which only configure the default); the ascent follows the injected
        `ascent_regularizer`, else the injected `regularizer`, else `default_ascent`, else
        `default`.
        """
        owner = type(self).__name__
        if regularizer is not None:
            refuse_together(owner, overrides, configures, "regularizer", "which configure the default regulariser")
            check_callable(regularizer, "regularizer", ("clean_logits", "perturbed_logits"))
        if ascent_regularizer is not None:
            check_callable(ascent_regularizer, "ascent_regularizer", ("clean_logits", "perturbed_logits"))
        self.regularizer = regularizer if regularizer is not None else default
        self.ascent_regularizer = next(r for r in (ascent_regularizer, regularizer, default_ascent, default) if r is not None)

    def _engine_options(self) -> dict[str, Any]:
        """Keyword arguments of `free_training` beyond the model, sites, masks and scaler."""
        return {}

    def _context(self, masks: Mapping[str, MaskLike] | None = None, scaler: Any | None = None,
                 **engine: Any) -> FreeTraining:
        options = {"on_nonfinite": self.on_nonfinite, "generator": self.generator, **self._engine_options(), **engine}
        return free_training(self.model, self.sites, self.perturbations, masks=masks, scaler=scaler, **options)

    def _run(self, ft: FreeTraining, forward: Callable[[], Any], task_loss: Callable[[Any], Tensor],
             scale: float) -> tuple[list[Tensor], list[Tensor]]:
        """One step's forwards and backwards inside `ft`; returns the task and regulariser values."""
        raise NotImplementedError

    @staticmethod
    def _clean_task_loss(ft: FreeTraining, forward: Callable[[], Any], task_loss: Callable[[Any], Tensor],
                         scale: float) -> Tensor:
        """Run the clean forward and add its task loss (times `scale`) to the step; return the loss."""
        task = check_scalar(task_loss(ft.clean(forward)), "`task_loss` output")
        ft.clean_loss(task * scale)
        return task

    def _step_context(self, masks: Mapping[str, MaskLike] | None, scaler: Any | None) -> FreeTraining:
        """The context `step` runs in (a recipe with δ-only ascent steps asks for them here)."""
        return self._context(masks, scaler)

    def step(
        self,
        forward: Callable[[], Any],
        task_loss: Callable[[Any], Tensor],
        *,
        masks: Mapping[str, MaskLike] | None = None,
        scale: float = 1.0,
        scaler: Any | None = None,
    ) -> StepStats:
        """One training step on a batch: accumulates parameter gradients (no optimizer step).

        Args:
            forward: Runs the model once on the batch and returns its output; every call
                must see the same inputs.
            task_loss: Output -> scalar task loss, weighted as wanted (e.g. VQA's BCE mean × 3129).
            masks: Modality to bool (or 0/1) mask, True at real elements ([b, n] for a
                [b, n, d] site); masked elements of δ stay 0.
            scale: Multiplies every loss (e.g. 1 / gradient-accumulation steps).
            scaler: A `torch.amp.GradScaler` (losses scaled, δ gradients unscaled).

        Returns:
            `StepStats`: the task loss and regulariser of each step, δ's norm, and whether
            the step was skipped for a non-finite value.

        Examples:
            >>> import torch
            >>> from torch import nn
            >>> import advlab
            >>> model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 2))
            >>> ids, y = torch.tensor([[1, 2], [3, 4]]), torch.tensor([0, 1])
            >>> recipe = advlab.FreeLB(model, {"txt": "0"}, steps=2)
            >>> stats = recipe.step(lambda: model(ids), lambda out: nn.functional.cross_entropy(out, y))
            >>> len(stats.task_loss), model[2].weight.grad.shape
            (2, torch.Size([2, 8]))
        """
        scale = check_nonnegative(scale, "scale")
        check_callable(task_loss, "task_loss", ("output",))
        with self._step_context(masks, scaler) as ft:
            task_values, reg_values = self._run(ft, forward, task_loss, scale)
            norms = ft.delta_norms()
        return collect_stats(task_values, reg_values, norms, ft.skipped_steps, self.overrides,
                             skip_reason=ft.skip_reason)
