"""StepStats carries the reason a step was skipped, for every recipe built on free_training."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import advlab


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids).mean(1))


RECIPES = {
    "villa": lambda m: advlab.VILLA(m, sites={"txt": "emb"}, steps=2, on_nonfinite="skip",
                                    perturbations={"txt": advlab.Perturbation(step_size=0.1)}),
    "freelb": lambda m: advlab.FreeLB(m, sites={"txt": "emb"}, steps=2, step_size=0.1, on_nonfinite="skip"),
    "smart": lambda m: advlab.SMART(m, sites={"txt": "emb"}, on_nonfinite="skip"),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_skip_reason_reaches_step_stats(name: str) -> None:
    model = Tiny()
    ids = torch.randint(0, 10, (4, 5))
    recipe = RECIPES[name](model)
    ok = recipe.step(lambda: model(ids), lambda out: F.cross_entropy(out, torch.zeros(4, dtype=torch.long)))
    assert ok.skipped_steps == 0 and ok.skip_reason is None
    bad = recipe.step(lambda: model(ids), lambda out: F.cross_entropy(out, torch.zeros(4, dtype=torch.long)) * float("nan"))
    assert bad.skipped_steps >= 1
    assert isinstance(bad.skip_reason, str) and "non-finite" in bad.skip_reason
