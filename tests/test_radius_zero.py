"""Radius 0 means δ ≡ 0: accepted by Perturbation, project, pgd_step and attack; training warns."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import advlab
from advlab.ascent import pgd_step
from advlab.balls import project


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids).mean(1))


@pytest.mark.parametrize("norm", ["l2", "l2_token", "linf"])
def test_project_and_pgd_step_with_radius_zero_give_exact_zeros(norm: str) -> None:
    delta = torch.randn(3, 5, 4, dtype=torch.float64)
    assert torch.equal(project(delta, norm, 0.0), torch.zeros_like(delta))
    out = pgd_step(delta, torch.randn_like(delta), step_size=0.5, norm=norm, radius=0.0)
    assert torch.equal(out, torch.zeros_like(delta))
    scaled = pgd_step(delta, torch.randn_like(delta), step_size=0.5, norm=norm, radius=0.0,
                      scale=torch.ones(3, 5, 1, dtype=torch.float64) if norm == "l2_token" else torch.ones(3, 1, 1,
                      dtype=torch.float64))
    assert torch.equal(scaled, torch.zeros_like(delta))


@pytest.mark.parametrize("radius", [-1.0, float("nan"), float("inf")])
def test_negative_or_nonfinite_radius_is_refused(radius: float) -> None:
    with pytest.raises(advlab.AdvlabValueError, match="radius"):
        advlab.Perturbation(step_size=0.1, radius=radius)


def test_attack_with_a_zero_radius_perturbation_returns_the_clean_loss_exactly() -> None:
    model = Tiny().double()
    ids = torch.randint(0, 10, (4, 6))
    y = torch.tensor([0, 1, 2, 0])
    result = advlab.attack(
        model, sites={"txt": "emb"}, perturbations={"txt": advlab.Perturbation(step_size=0.1, radius=0.0)},
        forward=lambda: model(ids), loss=lambda out: F.cross_entropy(out, y, reduction="none"), steps=3,
    )
    assert torch.equal(result.loss, result.clean_loss)
    assert torch.equal(result.deltas["txt"], torch.zeros_like(result.deltas["txt"]))


def test_training_with_a_zero_radius_warns_and_equals_plain_training() -> None:
    model = Tiny().double()
    ids = torch.randint(0, 10, (4, 6))
    y = torch.tensor([0, 1, 2, 0])
    with pytest.warns(UserWarning, match="adv_max_norm = 0"):
        recipe = advlab.FreeLB(model, sites={"txt": "emb"}, steps=2,
                               perturbations={"txt": advlab.Perturbation(step_size=0.5, radius=0.0)})
    recipe.step(lambda: model(ids), lambda out: F.cross_entropy(out, y))
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    F.cross_entropy(model(ids), y).backward()
    for g, p in zip(got, model.parameters()):
        assert torch.allclose(g, p.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("norm", ["l2", "l2_token", "linf"])
def test_every_radius_taker_accepts_zero_as_the_point_ball(norm: str) -> None:
    x = torch.randn(2, 3, 4)
    assert torch.equal(advlab.balls.Ball(norm, 0.0).project(x), torch.zeros_like(x))
    assert torch.equal(advlab.PGDAscender(0.1, norm, 0.0)(x, torch.randn_like(x)), torch.zeros_like(x))
    assert advlab.Perturbation(0.1, radius=-0.0, norm=norm).radius == 0.0
