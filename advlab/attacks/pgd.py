"""Projected gradient ascent (PGD) on the δ of every slot, with restarts.

Each restart starts from the perturbation's sampler (projected into the ball) and takes
`steps` updates `δ ← project(δ + η · direction(∇δ loss))` with `advlab.ascent.pgd_step`, the step
of VILLA and FreeLB: the direction is the normalised gradient (`"gradient"`), its sign
(`"sign"`, standard L∞ PGD) or a random unit direction (`"random"`, a noise baseline).
Every iterate, the start included, is a candidate for the per-example worst case.
"""

from __future__ import annotations

import torch
from torch import Tensor

from advlab.ascent import pgd_step
from advlab.attacks._engine import _Evaluation, _Problem, _Worst


def _pgd_move(problem: _Problem, deltas: list[Tensor], grads: list[Tensor | None] | None,
              generator: torch.Generator | None) -> list[Tensor]:
    moved = []
    for slot, delta, grad in zip(problem.slots, deltas, grads or [None] * len(deltas)):
        p = slot.perturbation
        if grad is None and p.direction != "random":
            grad = torch.zeros_like(delta)  # a δ the loss does not depend on stays where it is
        kwargs = {} if slot.scale is None else {"scale": slot.scale}
        moved.append(pgd_step(delta, grad, step_size=slot.step_size, norm=p.norm, radius=slot.radius,
                              direction=p.direction, mask=slot.mask, generator=generator, **kwargs))
    return moved


def run_pgd(
    problem: _Problem,
    worst: _Worst,
    *,
    steps: int,
    restarts: int,
    generator: torch.Generator | None,
    zero_start: _Evaluation | None,
) -> None:
    """Run PGD; `worst` is updated in place. `zero_start`: the clean evaluation, reused when a start is δ = 0."""
    needs_grad = any(s.perturbation.direction != "random" for s in problem.slots)
    for restart in range(restarts):
        if restart == 0 and zero_start is not None:
            deltas, ev = [s.zero for s in problem.slots], zero_start
        else:
            deltas = [s.draw(generator) for s in problem.slots]
            ev = problem.evaluate(deltas, grad=needs_grad and steps > 0, where=f"at the start of restart {restart}")
            worst.update(ev, deltas)
        for t in range(steps):
            deltas = _pgd_move(problem, deltas, ev.grads, generator)
            last = t == steps - 1
            ev = problem.evaluate(deltas, grad=needs_grad and not last, where=f"at step {t + 1} of restart {restart}")
            worst.update(ev, deltas)
