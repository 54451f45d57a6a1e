"""`AttackResult`: what an attack found, per example.

Shape notation:
    - b: batch size (rows); n: positions; d: features
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["AttackResult"]


@dataclass(frozen=True)
class AttackResult:
    """The worst case an attack found for each example of a batch.

    Attributes:
        loss: The largest loss found for each example over every step and restart (never
            below `clean_loss`: the clean point δ = 0 counts as a candidate).
        clean_loss: The loss with δ = 0.
        deltas: Modality to the δ that gave `loss` (in float32, float64 for a float64
            site), inside its ball, exactly 0 at masked positions. A site called several
            times in one forward (`Site(..., calls=n)`) gives a tuple with one δ per call.
            A modality attacked with radius 0 gets zeros. At a `Site(..., layout=...)`, δ
            is in the features-last view the balls use (`[b, h*w, c]` for a
            channels-first `[b, c, h, w]` site), which `advlab.perturb_sites` accepts.
        logits: With `attack(..., logits=fn)`: `fn(output)` at each example's worst case
            (row i comes from the forward that gave `loss[i]`); None otherwise.
        clean_logits: With `attack(..., logits=fn)`: `fn(output)` of the clean forward.
        method: `"pgd"` or `"apgd"`.
        steps: Updates of δ per restart.
        restarts: Restarts run.
        forwards: Forward passes run, the clean one included.
        modalities: The modalities perturbed (radius > 0), in site order.

    Shape:
        - loss, clean_loss: [b]
        - deltas: each like its site tensor, [b, n, d] or [b, d]
        - logits, clean_logits: [b, ...]

    Examples:
        >>> import torch
        >>> from advlab.attacks import AttackResult
        >>> r = AttackResult(loss=torch.tensor([1.5, 0.7]), clean_loss=torch.tensor([1.0, 0.7]), deltas={})
        >>> r.gain
        tensor([0.5000, 0.0000])
    """

    loss: Tensor
    clean_loss: Tensor
    deltas: dict[str, Tensor | tuple[Tensor, ...]]
    logits: Tensor | None = None
    clean_logits: Tensor | None = None
    method: str = "pgd"
    steps: int = 0
    restarts: int = 0
    forwards: int = 0
    modalities: tuple[str, ...] = field(default=())

    @property
    def gain(self) -> Tensor:
        """`loss - clean_loss`, per example (>= 0)."""
        return self.loss - self.clean_loss
