"""The machinery every attack shares: model state, the δ slots, one evaluation, the running worst case.

An attack owns no optimiser and no parameter gradient. `_attack_state` puts the model in
eval mode and turns `requires_grad` off on every parameter (so a backward computes only
the gradient of δ), and restores both exactly on exit, also when the forward raises.
`_Problem` runs `forward` through `SiteHooks` with the current δ of every slot (one slot per
call of each perturbed site) and returns the per-example loss and, on request, its gradient
with respect to each δ. `_Worst` keeps, per example, the largest loss seen and the δ (and
the kept logits) that gave it.

Shape notation:
    - b: batch size (rows); n: positions; d: features
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from advlab._errors import AdvlabTypeError, AdvlabValueError, NonFiniteError
from advlab.balls import normalize, normalize_sign, project
from advlab.hooks import SiteHooks
from advlab.perturbation import Perturbation


@contextmanager
def _attack_state(model: nn.Module, eval_mode: bool) -> Iterator[None]:
    """Eval mode (optional) and no parameter gradients inside; every flag restored exactly on exit."""
    modes = [(module, module.training) for module in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        if eval_mode:
            model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for module, training in modes:
            module.training = training  # per module: a submodule the user froze in eval stays so


@dataclass
class _Slot:
    """One δ: one call of one perturbed modality, with its settings resolved."""

    modality: str
    call: int
    perturbation: Perturbation
    radius: float  # > 0; a fraction of the row norm when `scale` is set
    step_size: float
    zero: Tensor  # zeros shaped like δ, in δ's dtype (float32, or float64 for float64 sites)
    mask: Tensor | None  # [b, n] (or [b]) bool, as the balls take it
    scale: Tensor | None = None  # relative sizes: the clean row norm, broadcastable to δ

    @property
    def label(self) -> str:
        return self.modality if self.call == 0 else f"{self.modality}[call {self.call}]"

    def project(self, delta: Tensor) -> Tensor:
        """Projection onto this slot's ball (radius × scale when relative); masked elements 0."""
        norm = self.perturbation.norm
        if self.scale is None:
            return project(delta, norm, self.radius, mask=self.mask)
        # the ball of radius r·s is s times the ball of radius r; rows with s = 0 come out 0
        s = self.scale.to(delta.dtype)
        safe = torch.where(s > 0, s, torch.ones_like(s))
        inside = project(delta / safe, norm, self.radius, mask=self.mask) * safe
        return torch.where(s > 0, inside, torch.zeros_like(inside))

    def direction(self, grad: Tensor | None) -> Tensor:
        """Steepest-ascent direction of unit norm: sign for "linf", the normalised gradient otherwise."""
        if grad is None:
            return torch.zeros_like(self.zero)
        if self.perturbation.norm == "linf":
            return normalize_sign(grad, mask=self.mask)
        return normalize(grad, self.perturbation.norm, mask=self.mask)

    def draw(self, generator: torch.Generator | None) -> Tensor:
        """A start drawn from the perturbation's sampler (× scale when relative), projected into the ball."""
        delta = self.perturbation.init(self.zero, mask=self.mask, generator=generator)
        if not isinstance(delta, Tensor) or delta.shape != self.zero.shape:
            raise AdvlabValueError(
                f"Expected the sampler of modality {self.modality!r} to return a tensor of shape "
                f"{tuple(self.zero.shape)}, but got {getattr(delta, 'shape', type(delta).__name__)}."
            )
        delta = delta.detach().to(device=self.zero.device, dtype=self.zero.dtype)
        if self.scale is not None:
            delta = delta * self.scale.to(delta.dtype)
        return self.project(delta)


@dataclass
class _Evaluation:
    loss: Tensor  # [b], detached
    grads: list[Tensor | None] | None  # one per slot; None when not asked for
    kept: Tensor | None  # logits(output), detached


def _check_loss(value: object, batch: int, where: str) -> Tensor:
    """The loss callable's result: a finite floating tensor of shape [b]."""
    if not isinstance(value, Tensor):
        raise AdvlabTypeError(
            f"Expected `loss` to return a torch.Tensor of per-example losses, but got {type(value).__name__}."
        )
    if tuple(value.shape) != (batch,):
        hint = " (a mean or sum: use reduction='none')" if value.dim() == 0 else ""
        raise AdvlabValueError(
            f"Expected `loss` to return one value per example, shape ({batch},) (the site tensors' batch size), "
            f"but got shape {tuple(value.shape)}{hint}."
        )
    if not value.is_floating_point():
        raise AdvlabTypeError(f"Expected `loss` to return a floating-point tensor, but got dtype {value.dtype}.")
    finite = torch.isfinite(value.detach())
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        raise NonFiniteError(f"Expected a finite loss {where}, but it is NaN or infinite for examples {bad[:10]}.")
    return value


def _rows(flags: Tensor, like: Tensor) -> Tensor:
    """A [b] bool tensor shaped to broadcast over `like`'s trailing dimensions."""
    return flags.reshape(flags.shape[0], *([1] * (like.dim() - 1)))


class _Problem:
    """`forward` through the hooks with given δ; the loss per example and its gradient in δ."""

    def __init__(
        self,
        hooks: SiteHooks,
        forward: Callable[[], Any],
        loss: Callable[[Any], Tensor],
        logits: Callable[[Any], Tensor] | None,
    ) -> None:
        self.hooks = hooks
        self.forward = forward
        self.loss = loss
        self.logits = logits
        self.slots: list[_Slot] = []
        self.active: tuple[str, ...] = ()
        self.batch = 0
        self.forwards = 0

    def _keep(self, output: Any) -> Tensor | None:
        if self.logits is None:
            return None
        kept = self.logits(output)
        if not isinstance(kept, Tensor) or kept.dim() < 1 or kept.shape[0] != self.batch:
            got = f"shape {tuple(kept.shape)}" if isinstance(kept, Tensor) else type(kept).__name__
            raise AdvlabValueError(
                f"Expected `logits` to return a batch-first tensor with {self.batch} rows, but got {got}."
            )
        return kept.detach()

    def clean(self, active: Sequence[str], leaves_for: set[str]) -> tuple[Any, Tensor, list[Tensor], Tensor | None]:
        """The forward with δ = 0 at `active` (the hooks create the zeros); gradient in the δ of `leaves_for`."""
        self.hooks.set_requires_grad(set(leaves_for))
        grad_ctx = torch.enable_grad() if leaves_for else torch.no_grad()
        with grad_ctx:
            output = self.hooks.run(self.forward, active=tuple(active))
            self.forwards += 1
            zeros = [d for m in active for d in self.hooks.deltas(m)]
            self.batch = int(zeros[0].shape[0]) if zeros else 0
            value = self.loss(output)
            if not zeros:
                self.batch = int(value.shape[0]) if isinstance(value, Tensor) and value.dim() == 1 else -1
            value = _check_loss(value, self.batch, "at δ = 0 (the clean forward)")
        self.hooks.set_requires_grad(set())
        return output, value, zeros, self._keep(output)

    def grads_of(self, value: Tensor, leaves: list[Tensor]) -> list[Tensor | None]:
        with torch.enable_grad():  # the sum joins the graph also when the caller runs under no_grad
            grads = torch.autograd.grad(value.sum(), leaves, allow_unused=True)
        for slot, g in zip(self.slots, grads):
            if g is not None and not bool(torch.isfinite(g).all()):
                raise NonFiniteError(f"Expected a finite gradient of the loss in δ of {slot.label!r}, but it is not.")
        return list(grads)

    def evaluate(self, deltas: Sequence[Tensor], *, grad: bool, where: str) -> _Evaluation:
        """Loss per example at `deltas` (one per slot) and, with `grad`, its gradient in each δ."""
        leaves = [d.detach().requires_grad_(grad) for d in deltas]
        for slot, leaf in zip(self.slots, leaves):
            self.hooks.set_delta(slot.modality, slot.call, leaf)
        with torch.enable_grad() if grad else torch.no_grad():
            output = self.hooks.run(self.forward, active=self.active)
            self.forwards += 1
            value = _check_loss(self.loss(output), self.batch, where)
            grads = self.grads_of(value, leaves) if grad else None
        return _Evaluation(value.detach(), grads, self._keep(output))


class _Worst:
    """Per example, the largest loss seen so far and the δ (and kept logits) that gave it."""

    def __init__(self, loss: Tensor, deltas: list[Tensor], kept: Tensor | None) -> None:
        self.loss = loss.detach().clone()
        self.deltas = [d.detach().clone() for d in deltas]
        self.kept = kept

    def update(self, ev: _Evaluation, deltas: Sequence[Tensor]) -> None:
        better = ev.loss > self.loss
        if not bool(better.any()):
            return
        self.loss = torch.where(better, ev.loss, self.loss)
        self.deltas = [torch.where(_rows(better, d), d.detach(), old) for d, old in zip(deltas, self.deltas)]
        if self.kept is not None and ev.kept is not None:
            self.kept = torch.where(_rows(better, ev.kept), ev.kept, self.kept)
