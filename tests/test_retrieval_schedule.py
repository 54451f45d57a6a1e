"""The retrieval experiment's learning-rate schedule: torch's LinearLR warm-up and decay, chained.

Reference: the closed form the experiment used before, lr × min(1, (s + 1) / w) × max(0, 1 − s / T)
with w = max(1, T // 10), evaluated in float64 for every optimizer step s < T.
"""

from __future__ import annotations

import pytest
import torch

from advlab.experiments.retrieval.training import _warmup_decay


def closed_form(base: float, s: int, total: int) -> float:
    return base * min(1.0, (s + 1) / max(1, total // 10)) * max(0.0, 1 - s / total)


@pytest.mark.parametrize("total", [1, 2, 5, 9, 10, 11, 37, 120, 1000])
def test_rates_per_step_equal_the_warmup_times_decay_closed_form(total):
    bases = (1e-4, 5e-4)  # the experiment's two parameter groups have different rates
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in bases]
    opt = torch.optim.AdamW([{"params": [p], "lr": b} for p, b in zip(params, bases)])
    sched = _warmup_decay(opt, total)
    for s in range(total):
        for group, base in zip(opt.param_groups, bases):
            # LinearLR updates the rate step by step: equal to the closed form up to rounding (1.0e-14 measured)
            assert group["lr"] == pytest.approx(closed_form(base, s, total), rel=1e-12, abs=1e-30), (total, s)
        opt.step()
        sched.step()


def test_warmup_and_decay_apply_together_not_one_after_the_other():
    """At the end of the warm-up the decay has already lowered the rate: a sequence would not."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = _warmup_decay(opt, 100)
    rates = []
    for _ in range(100):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates[0] == pytest.approx(0.1 * 1.0)
    assert rates[9] == pytest.approx(1.0 * (1 - 9 / 100))  # the peak, already decayed by 9 %
    assert rates[99] == pytest.approx(0.01)
    assert max(rates) == rates[9]
