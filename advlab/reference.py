"""`ReferenceModel`: a frozen or exponential-moving-average copy of a model's weights, to evaluate.

Methods that compare the model with a reference need the reference's prediction on the same
batch: full SMART's Bregman proximal point term μ · SymKL(f_θ(x), f_θ̃(x)) with θ̃ an EMA of θ
(Jiang et al., 2020, β = 0.99), or a frozen pre-trained model (FARE, PMG-AFT style).

`ReferenceModel` keeps only a copy of the parameters (not of the module) and runs *your*
forward closure with those weights swapped in, under `torch.no_grad()` and in eval mode by
default; the model's own parameters (the same tensor objects, the same bits), its training
flags and the global RNG are as before afterwards, also when the forward raises. Buffers
(batch-norm statistics) are the model's own.

Full SMART with advlab's `SMART` recipe: the proximal term goes into the task loss, which
SMART applies to the clean output f_θ(x):

```python
ema = ReferenceModel(model, decay=0.99)
ref = ema(forward)                                           # f_θ̃(x), no graph
smart.step(forward, lambda out: task(out) + mu * symmetric_kl(out, ref))
optimizer.step(); ema.update()                               # θ̃ ← β θ̃ + (1 − β) θ
```
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from advlab._errors import AdvlabTypeError, AdvlabValueError
from advlab.sites import unwrap_model

__all__ = ["ReferenceModel"]


class ReferenceModel:
    """A frozen (`decay=None`) or EMA (`decay=β`) copy of `model`'s parameters, evaluated on demand.

    Args:
        model: The model whose parameters to copy (a DDP / DataParallel wrapper is unwrapped).
        decay: β of the moving average θ̃ ← β θ̃ + (1 − β) θ applied by `update`; None keeps
            the copy frozen (SMART's β is 0.99).
        eval_mode: Run the reference forward in eval mode (no dropout, and the global RNG
            is not consumed); False keeps each module's training flag.

    Examples:
        >>> import torch, advlab
        >>> from torch import nn
        >>> model = nn.Linear(2, 1)
        >>> ema = advlab.ReferenceModel(model, decay=0.5)
        >>> x = torch.ones(1, 2)
        >>> with torch.no_grad():
        ...     _ = model.bias.add_(1.0)
        >>> round(float((model(x) - ema(lambda: model(x))).detach()), 4)  # the reference still has the old bias
        1.0
        >>> ema.update()  # θ̃ moves half-way to θ
        >>> round(float((model(x) - ema(lambda: model(x))).detach()), 4)
        0.5
    """

    def __init__(self, model: nn.Module, *, decay: float | None = None, eval_mode: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise AdvlabTypeError(f"Expected `model` to be an nn.Module, but got {type(model).__name__}.")
        if decay is not None:
            if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
                raise AdvlabValueError(f"Expected `decay` to be a float in [0, 1] or None (frozen), but got {decay!r}.")
            decay = float(decay)
        self.model = unwrap_model(model)
        self.decay = decay
        self.eval_mode = bool(eval_mode)
        self._names = [name for name, _ in self.model.named_parameters()]
        if not self._names:
            raise AdvlabValueError("Expected `model` to have parameters to copy, but it has none.")
        self.params: dict[str, Tensor] = {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def _live(self) -> dict[str, nn.Parameter]:
        live = dict(self.model.named_parameters())
        if list(live) != self._names:
            raise AdvlabValueError(
                "Expected the model to have the parameters it had when the reference was made, but "
                f"{sorted(set(live) ^ set(self._names))} were added or removed."
            )
        for name, p in live.items():
            ref = self.params[name]
            if p.shape != ref.shape or p.dtype != ref.dtype or p.device != ref.device:
                raise AdvlabValueError(
                    f"Expected parameter {name!r} to keep shape {tuple(ref.shape)}, dtype {ref.dtype} and device "
                    f"{ref.device} (the reference copy's), but it has {tuple(p.shape)}, {p.dtype}, {p.device}; "
                    "make the reference after moving or casting the model."
                )
        return live

    @torch.no_grad()
    def update(self) -> None:
        """θ̃ ← β θ̃ + (1 − β) θ (call after each optimizer step); a frozen reference refuses."""
        if self.decay is None:
            raise AdvlabValueError("Expected an EMA reference (decay=β) to update, but this one is frozen (decay=None).")
        for name, p in self._live().items():
            ref = self.params[name]
            ref.mul_(self.decay).add_(p.detach(), alpha=1.0 - self.decay)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside the block the model computes with the reference weights (no gradient).

        The model's parameter tensors are put back on exit, also when the block raises.
        """
        live = self._live()
        originals = {name: p.data for name, p in live.items()}
        modes = [(m, m.training) for m in self.model.modules()]
        try:
            with torch.no_grad():
                for name, p in live.items():
                    p.data = self.params[name]
                if self.eval_mode:
                    self.model.eval()
                yield
        finally:
            for name, p in live.items():
                p.data = originals[name]
            for module, training in modes:
                module.training = training

    def __call__(self, forward: Callable[[], Any]) -> Any:
        """Run `forward()` (a closure over the model) with the reference weights; no graph is kept.

        Args:
            forward: Runs the model on the batch and returns its output.

        Returns:
            The output of `forward()` at the reference weights.
        """
        with self.swapped():
            return forward()
