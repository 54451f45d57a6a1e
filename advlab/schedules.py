"""Backward schedules of `free_training`: when the clean forward's graph is back-propagated.

All three give the same parameter gradients; they differ in cost and memory.

- `DeferredSchedule` (`"deferred"`, the default): the losses see a detached copy of the
  clean logits; the gradient they send to it is accumulated, and one backward through the
  clean graph at the last step applies it. Each graph is back-propagated once.
- `RetainSchedule` (`"retain"`): the official code's structure; every step back-propagates
  through the clean graph again (`retain_graph=True`).
- `LeanSchedule` (`"lean"`): the clean forward runs under `no_grad` (only its logits are
  kept); at the end it is recomputed with gradients, with the RNG state of the first run
  replayed so that dropout masks match, and back-propagated once. One extra forward; one
  graph alive at a time.

A schedule object serves one `free_training` context (the lean one keeps that step's clean
forward and RNG state).

Shape notation:
    - b: batch size; c: classes
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from advlab._checks import check_choice

__all__ = [
    "Schedule", "SCHEDULES", "BackwardSchedule", "DeferredSchedule", "RetainSchedule", "LeanSchedule", "make_schedule",
]

Schedule = Literal["deferred", "retain", "lean"]
SCHEDULES: tuple[str, ...] = ("deferred", "retain", "lean")


class BackwardSchedule:
    """What a backward schedule decides; subclasses are the three schedules.

    Attributes:
        name: The schedule's name (`"deferred"`, `"retain"`, `"lean"`).
        retain_graph: Every ascent step's backward keeps its graph (the clean graph is
            back-propagated at every step).
        guards_clean_graph: A gradient reaching the clean forward's own logits before the
            last backward is a mistake (the loss used them instead of `step.clean_logits`).
        recomputes_clean: The clean forward is run again, with gradients, at the end (so a
            clean loss must be a function of the output, and DDP is refused).
    """

    name: ClassVar[str]
    retain_graph: ClassVar[bool] = False
    guards_clean_graph: ClassVar[bool] = False
    recomputes_clean: ClassVar[bool] = False

    def run_clean(self, run: Callable[[], Any]) -> Any:
        """Run the clean forward (`run` adds no δ) and return its output."""
        return run()

    def clean_leaves(self, parts: list[Tensor]) -> list[Tensor | None]:
        """For each clean logits tensor, the detached leaf the losses see, or None (the tensor itself)."""
        return [None for _ in parts]

    def last_loss(
        self, scaled: Tensor, leaves: list[Tensor | None], leaf_grads: list[Tensor | None],
        tensors: list[Tensor], grads: list[Tensor | None],
    ) -> list[Tensor | None]:
        """Take the last loss into the final backward; return the gradients at the clean leaves.

        `tensors` and `grads` collect what the one final `torch.autograd.backward` call gets.
        """
        live = [leaf for leaf in leaves if leaf is not None]
        if live and scaled.requires_grad:
            # this loss's gradient at the clean logits: a walk down the regulariser only
            lasts = iter(torch.autograd.grad(scaled, live, retain_graph=True, allow_unused=True))
            merged: list[Tensor | None] = []
            for leaf, before in zip(leaves, leaf_grads):
                last = None if leaf is None else next(lasts)
                merged.append(before if last is None else last if before is None else before + last)
            leaf_grads = merged
        tensors.append(scaled)
        grads.append(None)
        return leaf_grads

    def recompute(self) -> Any:
        """The clean forward again, with gradients (`recomputes_clean` schedules only)."""
        raise NotImplementedError


class DeferredSchedule(BackwardSchedule):
    """One backward through the clean graph, at the last step: 1 + 3MK + 2 cost units instead of 1 + K(3M + 2).

    Examples:
        >>> import torch
        >>> leaf, = DeferredSchedule().clean_leaves([torch.ones(2, 3, requires_grad=True)])
        >>> leaf.is_leaf, leaf.requires_grad
        (True, True)
    """

    name = "deferred"
    guards_clean_graph = True

    def clean_leaves(self, parts: list[Tensor]) -> list[Tensor | None]:
        """A detached leaf per clean logits tensor that has a graph (it collects the losses' gradient)."""
        return [p.detach().requires_grad_(True) if p.requires_grad else None for p in parts]


class RetainSchedule(BackwardSchedule):
    """The official structure: every step back-propagates through the clean graph (`retain_graph=True`).

    Examples:
        >>> RetainSchedule().retain_graph
        True
    """

    name = "retain"
    retain_graph = True


class LeanSchedule(BackwardSchedule):
    """The clean forward without a graph, recomputed with gradients and the same RNG stream at the end.

    Examples:
        >>> import torch
        >>> lean = LeanSchedule()
        >>> first = lean.run_clean(lambda: torch.nn.functional.dropout(torch.ones(4), 0.5))
        >>> torch.equal(lean.recompute(), first)  # the same dropout mask, replayed
        True
    """

    name = "lean"
    recomputes_clean = True

    def __init__(self) -> None:
        self._run: Callable[[], Any] | None = None
        self._rng: _RngSnapshot | None = None

    def run_clean(self, run: Callable[[], Any]) -> Any:
        """Run the clean forward without a graph, keeping it and the RNG state for `recompute`."""
        self._run, self._rng = run, _RngSnapshot.take()
        with torch.no_grad():
            return run()

    def clean_leaves(self, parts: list[Tensor]) -> list[Tensor | None]:
        """A detached leaf per clean logits tensor (the clean forward kept no graph)."""
        return [p.detach().requires_grad_(torch.is_grad_enabled()) for p in parts]

    def last_loss(
        self, scaled: Tensor, leaves: list[Tensor | None], leaf_grads: list[Tensor | None],
        tensors: list[Tensor], grads: list[Tensor | None],
    ) -> list[Tensor | None]:
        """Back-propagate the last loss now, which fills the clean leaves' gradients."""
        scaled.backward()  # fills the clean leaves' gradients first
        return [None if leaf is None else leaf.grad for leaf in leaves]

    def recompute(self) -> Any:
        """The clean forward again, with gradients, replaying the first run's RNG state."""
        if self._run is None or self._rng is None:
            raise RuntimeError("LeanSchedule.recompute before run_clean")  # an engine bug, not a user error
        with self._rng.replay():
            return self._run()


def make_schedule(name: str) -> BackwardSchedule:
    """A fresh schedule object by name, with a clear error for an unknown one.

    Examples:
        >>> make_schedule("retain").name
        'retain'
    """
    check_choice(name, SCHEDULES, "schedule")
    return {"deferred": DeferredSchedule, "retain": RetainSchedule, "lean": LeanSchedule}[name]()


class _RngSnapshot:
    """CPU and CUDA RNG states at one moment, to replay a forward's dropout masks."""

    def __init__(self, cpu: Tensor, cuda: list[Tensor] | None) -> None:
        self.cpu, self.cuda = cpu, cuda

    @classmethod
    def take(cls) -> _RngSnapshot:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return cls(torch.get_rng_state(), cuda)

    @contextmanager
    def replay(self) -> Iterator[None]:
        devices = list(range(len(self.cuda))) if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):  # restores the current state on exit
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
            yield
