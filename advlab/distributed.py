"""DistributedDataParallel in `free_training`: one object owns `no_sync`, one all-reduce agrees on flags.

Under DDP a step's forwards and backwards before the last one run under `model.no_sync()`,
so the gradients are all-reduced once, by the last backward. `GradSync` enters `no_sync` at
most once per step and leaves it before the last step; it also leaves it when the step ends
early, by an error or otherwise.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["is_ddp", "GradSync"]


def is_ddp(model: nn.Module) -> bool:
    """Whether `model` is a DistributedDataParallel wrapper (its steps then run under `no_sync`).

    Examples:
        >>> is_ddp(torch.nn.Linear(2, 2))
        False
    """
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, DistributedDataParallel)


class GradSync:
    """The `no_sync` of one free-training step: `hold` enters it once, `release` leaves it.

    For a model that is not DDP every method does nothing (and `agree` returns the flags).

    Args:
        model: The model the step trains (possibly a DDP wrapper).

    Examples:
        >>> sync = GradSync(torch.nn.Linear(2, 2))
        >>> sync.distributed, sync.held
        (False, False)
        >>> sync.hold(); sync.held  # nothing to hold outside DDP
        False
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.distributed = is_ddp(model)
        self._stack = ExitStack()
        self.held = False

    def hold(self) -> None:
        """Enter `model.no_sync()` (once; a no-op when already held or not DDP)."""
        if self.distributed and not self.held:
            self._stack.enter_context(self.model.no_sync())  # type: ignore[operator]
            self.held = True

    def release(self) -> None:
        """Leave `no_sync`: the next backward is all-reduced."""
        self._stack.close()
        self.held = False

    def agree(self, flags: Tensor) -> Tensor:
        """Every rank's minimum of `flags` (one all-reduce under DDP), so that all take the same decision."""
        if not self.distributed:
            return flags
        import torch.distributed as dist

        flags = flags.to(torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        return flags

    def __enter__(self) -> GradSync:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
