"""The non-finite policy of `free_training`: device-side checks read once, and the gradients to put back.

Every loss and gradient of a step is checked with `torch.isfinite(...).all()` on its device;
`FiniteChecks.read` stacks the flags and reads them with one device-to-host copy at the end
of the step. If any is false, `GradSnapshot.restore` puts every parameter `.grad` back as it
was when the step began (the same tensor objects, the same bits; None stays None).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["FiniteChecks", "GradSnapshot"]


class FiniteChecks:
    """Device booleans, one per checked value of a step, read with a single host copy.

    Examples:
        >>> checks = FiniteChecks()
        >>> checks.note(0, "loss", torch.tensor(1.0))
        >>> checks.note(1, "loss", torch.tensor(float("nan")))
        >>> checks.read()  # (step, what) of each non-finite value
        [(1, 'loss')]
    """

    def __init__(self) -> None:
        self._records: list[tuple[int | None, str, Tensor]] = []

    def __len__(self) -> int:
        return len(self._records)

    def note(self, step: int | None, what: str, value: Tensor) -> None:
        """Record whether every element of `value` is finite (no host read)."""
        self._records.append((step, what, torch.isfinite(value.detach()).all()))

    def note_flag(self, step: int | None, what: str, finite: Tensor) -> None:
        """Record a finiteness flag computed by the caller (a bool tensor on the device)."""
        self._records.append((step, what, finite))

    def read(self, agree: Callable[[Tensor], Tensor] | None = None) -> list[tuple[int | None, str]]:
        """The (step, what) of every non-finite record, in order; one device-to-host copy.

        Args:
            agree: Combines the flags across processes before the read (DDP: a MIN all-reduce).
        """
        if not self._records:
            return []
        flags = torch.stack([c.to(self._records[0][2].device) for _, _, c in self._records])
        if agree is not None:
            flags = agree(flags)
        finite = flags.tolist()  # the one host read of the step
        return [(k, what) for (k, what, _), ok in zip(self._records, finite) if not ok]


class GradSnapshot:
    """Each trainable parameter with its `.grad` object and a copy of its values, to put back exactly.

    Args:
        model: The module whose trainable parameters are kept.

    Examples:
        >>> lin = torch.nn.Linear(2, 1)
        >>> snap = GradSnapshot(lin)
        >>> lin(torch.ones(1, 2)).sum().backward()
        >>> snap.restore(); lin.weight.grad is None
        True
    """

    def __init__(self, model: nn.Module) -> None:
        self.saved: list[tuple[nn.Parameter, Tensor | None, Tensor | None]] = []
        for p in model.parameters():
            if p.requires_grad:
                g = p.grad
                self.saved.append((p, g, None if g is None else g.detach().clone()))

    def __bool__(self) -> bool:
        return bool(self.saved)

    def present_grads(self) -> list[Tensor]:
        """The current `.grad` of every kept parameter that has one (FSDP2: this rank's shard)."""
        present = [p.grad for p, _, _ in self.saved if p.grad is not None]
        return [g.to_local() if hasattr(g, "to_local") else g for g in present]

    def restore(self) -> None:
        """Put every `.grad` back: the same tensor object with its old values, or None."""
        with torch.no_grad():
            for p, g, values in self.saved:
                if g is not None and values is not None:
                    g.copy_(values)
                p.grad = g
