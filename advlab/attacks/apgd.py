"""APGD: projected gradient ascent with momentum and a self-tuned step size (Croce & Hein, 2020).

The step-size-free PGD at the core of AutoAttack, adapted to embedding balls. Per example:

- the step size starts at η = 2ε (ε the ball's radius) and is halved at checkpoints
  w_j = ⌈p_j N⌉ of the N steps, p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06),
  when either (1) the loss rose in fewer than ρ = 0.75 of the steps since the last
  checkpoint, or (2) the step size was not halved at the last checkpoint and the best loss
  has not improved since; after a halving the iterate jumps back to the best point seen;
- each update is z = P(x_k + η · u(∇f(x_k))), then
  x_{k+1} = P(x_k + α (z − x_k) + (1 − α)(x_k − x_{k−1})) with momentum α = 0.75
  (α = 1 at the first step), where u is the steepest-ascent direction of the ball
  (sign for L∞, the normalised gradient for L2 per row or per position) and P the projection.

In joint mode all modalities share one loss, so an example's step size halves in every
modality at once (each modality's η stays 2ε_m times the shared factor).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from advlab._checks import check_count
from advlab.attacks._engine import _Evaluation, _Problem, _rows, _Worst

__all__ = ["apgd_checkpoints"]

MOMENTUM = 0.75  # α of Croce & Hein (2020)
RHO = 0.75  # ρ: the fraction of steps that must raise the loss between checkpoints
FIRST_CHECKPOINT = 0.22  # p_1
SHRINK = 0.03  # the checkpoint interval shrinks by this fraction of N ...
MIN_INTERVAL = 0.06  # ... down to this fraction


def apgd_checkpoints(steps: int) -> tuple[int, ...]:
    """The steps after which APGD may halve its step size: w_j = ⌈p_j · steps⌉, j ≥ 1.

    Args:
        steps: The number of updates N.

    Returns:
        The checkpoints in increasing order, each in `1..steps`.

    Examples:
        >>> from advlab.attacks import apgd_checkpoints
        >>> apgd_checkpoints(100)
        (22, 41, 57, 70, 80, 87, 93, 99)
    """
    check_count(steps, "steps")
    p = [0.0, FIRST_CHECKPOINT]
    while True:
        nxt = p[-1] + max(p[-1] - p[-2] - SHRINK, MIN_INTERVAL)
        if nxt > 1.0 + 1e-9:
            break
        p.append(nxt)
    # the 1e-9 keeps a product like 0.22 * 100 = 22.000000000000004 from rounding up to 23
    return tuple(sorted({max(1, math.ceil(q * steps - 1e-9)) for q in p[1:]}))


def _eta(problem: _Problem, factor: Tensor) -> list[Tensor]:
    """Per-slot step sizes 2ε · factor (× the row norm for relative sizes), shaped to broadcast over δ."""
    etas = []
    for slot in problem.slots:
        eta = _rows(factor, slot.zero).to(slot.zero.dtype) * (2.0 * slot.radius)
        if slot.scale is not None:
            eta = eta * slot.scale.to(slot.zero.dtype)
        etas.append(eta)
    return etas


def run_apgd(
    problem: _Problem,
    worst: _Worst,
    *,
    steps: int,
    restarts: int,
    generator: torch.Generator | None,
    zero_start: _Evaluation | None,
) -> None:
    """Run APGD; `worst` is updated in place. `zero_start`: the clean evaluation, reused when a start is δ = 0."""
    checkpoints = set(apgd_checkpoints(steps))
    slots = problem.slots
    b = problem.batch
    device = slots[0].zero.device
    for restart in range(restarts):
        if restart == 0 and zero_start is not None:
            x, ev = [s.zero for s in slots], zero_start
        else:
            x = [s.draw(generator) for s in slots]
            ev = problem.evaluate(x, grad=True, where=f"at the start of restart {restart}")
            worst.update(ev, x)
        grads = ev.grads or [None] * len(slots)
        # restart-local best point: where a halving sends the iterate back to
        best_loss, best_x, best_g = ev.loss.clone(), list(x), list(grads)
        factor = torch.ones(b, dtype=torch.float64, device=device)
        x_prev = x
        f_prev = ev.loss
        rises = torch.zeros(b, dtype=torch.long, device=device)
        last_check, best_at_check = 0, best_loss.clone()
        halved_at_check = torch.zeros(b, dtype=torch.bool, device=device)
        for k in range(steps):
            etas = _eta(problem, factor)
            new_x = []
            for slot, xi, pi, gi, eta in zip(slots, x, x_prev, grads, etas):
                z = slot.project(xi + eta * slot.direction(gi))
                if k > 0:
                    z = slot.project(xi + MOMENTUM * (z - xi) + (1 - MOMENTUM) * (xi - pi))
                new_x.append(z)
            x_prev, x = x, new_x
            last = k == steps - 1
            ev = problem.evaluate(x, grad=not last, where=f"at step {k + 1} of restart {restart}")
            worst.update(ev, x)
            grads = ev.grads or [None] * len(slots)
            rises += (ev.loss > f_prev).long()
            f_prev = ev.loss
            better = ev.loss > best_loss
            best_loss = torch.where(better, ev.loss, best_loss)
            best_x = [torch.where(_rows(better, xi), xi, bx) for xi, bx in zip(x, best_x)]
            best_g = [g if bg is None else bg if g is None else torch.where(_rows(better, g), g, bg)
                      for g, bg in zip(grads, best_g)]
            if (k + 1) in checkpoints and not last:
                span = k + 1 - last_check
                halve = (rises.double() < RHO * span) | (~halved_at_check & (best_at_check >= best_loss))
                factor = torch.where(halve, factor / 2, factor)
                x = [torch.where(_rows(halve, xi), bx, xi) for xi, bx in zip(x, best_x)]
                grads = [g if bg is None else bg if g is None else torch.where(_rows(halve, g), bg, g)
                         for g, bg in zip(grads, best_g)]
                f_prev = torch.where(halve, best_loss, f_prev)
                halved_at_check, best_at_check = halve, best_loss.clone()
                rises.zero_()
                last_check = k + 1
