"""Every mistake a user can make gives a clear advlab error naming the argument."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import advlab
from tests.tiny_models import TinyVL, tiny_batch

SITES = {"txt": "word", "img": advlab.Site("img_proj", where="input")}


def run_villa(model=None, masks=None, task=None, **kwargs):
    model = model or TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
    villa = advlab.VILLA(model, sites=kwargs.pop("sites", SITES), **kwargs)
    task = task or (lambda out: F.cross_entropy(out, y))
    return villa.step(lambda: model(ids, img, tm, im), task, masks=masks)


@pytest.mark.parametrize("radius", [-1.0, math.inf, math.nan])
def test_bad_radius(radius):  # 0.0 is accepted: δ ≡ 0 (tests/test_radius_zero.py)
    with pytest.raises(advlab.AdvlabValueError, match="radius"):
        advlab.Perturbation(radius=radius)


def test_negative_step_size():
    with pytest.raises(advlab.AdvlabValueError, match="step_size"):
        advlab.Perturbation(step_size=-1e-3)


@pytest.mark.parametrize("steps", [0, -1, 1.5, True])
def test_bad_steps(steps):
    with pytest.raises(advlab.AdvlabError, match="steps"):
        advlab.VILLA(TinyVL(), sites=SITES, steps=steps)


def test_unknown_mode_and_preset():
    with pytest.raises(advlab.AdvlabValueError, match="mode.*'both'"):
        advlab.VILLA(TinyVL(), sites=SITES, mode="both")
    with pytest.raises(advlab.AdvlabValueError, match="preset.*'vqa-huge'"):
        advlab.VILLA(TinyVL(), sites=SITES, preset="vqa-huge")


def test_perturbation_without_site():
    with pytest.raises(advlab.AdvlabValueError, match=r"perturbations\['audio'\]"):
        advlab.VILLA(TinyVL(), sites=SITES, perturbations={"audio": advlab.Perturbation()})


def test_mask_of_wrong_shape_names_both_shapes():
    with pytest.raises(advlab.AdvlabValueError, match=r"masks\['txt'\].*\(4, 5\).*\(4, 4\)"):
        run_villa(masks={"txt": torch.ones(4, 4, dtype=torch.bool)})


def test_mask_for_unknown_modality():
    with pytest.raises(advlab.AdvlabValueError, match="masks"):
        run_villa(masks={"audio": torch.ones(4, 5, dtype=torch.bool)})


def test_float_mask_must_hold_only_zeros_and_ones():
    run_villa(masks={"txt": torch.ones(4, 5)})  # 0/1 float masks, as transformers builds them, are accepted
    with pytest.raises(advlab.AdvlabValueError, match=r"masks\['txt'\].*only 0 and 1"):
        run_villa(masks={"txt": torch.full((4, 5), 0.5)})


def test_forward_closure_must_be_repeatable():
    model = TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
    lengths = iter([5, 4, 4, 4, 4])

    def forward():
        n = next(lengths)
        return model(ids[:, :n], img, tm[:, :n], im)

    with pytest.raises(advlab.AdvlabValueError, match="repeatable"):
        advlab.VILLA(model, sites=SITES).step(forward, lambda out: F.cross_entropy(out, y))


def test_nonfinite_loss_raises_by_default_and_skips_on_request():
    model = TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
    bad = lambda out: F.cross_entropy(out, y) * float("nan")
    with pytest.raises(advlab.NonFiniteError, match="finite loss"):
        advlab.VILLA(model, sites=SITES).step(lambda: model(ids, img, tm, im), bad)
    stats = advlab.VILLA(model, sites=SITES, on_nonfinite="skip").step(lambda: model(ids, img, tm, im), bad)
    assert stats.skipped_steps == 3


def test_nonfinite_delta_gradient_leaves_delta_unchanged_when_skipping():
    model = TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)

    class Poison(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return torch.full_like(g, float("inf"))

    h = model.mix.register_forward_pre_hook(lambda m, a: (Poison.apply(a[0]),))
    try:
        with pytest.raises(advlab.NonFiniteError, match="δ gradient"):
            advlab.VILLA(model, sites={"txt": "word"}).step(lambda: model(ids, img, tm, im),
                                                            lambda out: F.cross_entropy(out, y))
        stats = advlab.VILLA(model, sites={"txt": "word"}, on_nonfinite="skip").step(
            lambda: model(ids, img, tm, im), lambda out: F.cross_entropy(out, y))
    finally:
        h.remove()
    assert stats.skipped_steps == 3  # every step's δ gradient is non-finite (the last one's is checked too)
    assert stats.delta_norm["txt"] == 0.0


def test_logits_not_found():
    model = TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
    with pytest.raises(advlab.AdvlabTypeError, match="logits"):
        advlab.VILLA(model, sites=SITES).step(lambda: {"scores": model(ids, img, tm, im)}, lambda out: out["scores"].sum())


def test_non_scalar_task_loss():
    with pytest.raises(advlab.AdvlabValueError, match="scalar"):
        run_villa(task=lambda out: F.cross_entropy(out, torch.zeros(4, dtype=torch.long), reduction="none"))


def test_bad_option_values():
    with pytest.raises(advlab.AdvlabValueError, match="norm"):
        advlab.Perturbation(norm="l1")
    with pytest.raises(advlab.AdvlabValueError, match="direction"):
        advlab.Perturbation(direction="up")
    with pytest.raises(advlab.AdvlabTypeError, match="init"):
        advlab.Perturbation(init=0.1)
    with pytest.raises(advlab.AdvlabValueError, match="reduction"):
        advlab.kl_divergence(torch.zeros(2, 3), torch.zeros(2, 3), reduction="avg")
    with pytest.raises(advlab.AdvlabValueError, match="same shape"):
        advlab.kl_divergence(torch.zeros(2, 3), torch.zeros(2, 4))


def test_overrides_are_recorded_in_stats_and_repr():
    villa = advlab.VILLA.from_preset("vqa-base", TinyVL(), sites=SITES, kl_weight=0.5, mode="alter")
    assert "kl_weight" in repr(villa) and "alter" in repr(villa)
    stats = run_villa(preset="vqa-base", kl_weight=0.5, mode="alter")
    assert stats.overrides == {"kl_weight": 0.5, "mode": "alter"}


def test_mask_of_an_unperturbed_modality_is_checked_too():
    """mode="txt" never hooks the img site, yet a broken img mask is refused before any forward."""
    ids = torch.ones(4, 5, dtype=torch.bool)
    with pytest.raises(advlab.AdvlabValueError, match=r"masks\['img'\].*only 0 and 1"):
        run_villa(mode="txt", masks={"txt": ids, "img": torch.full((4, 3), 2.0)})
    with pytest.raises(advlab.AdvlabValueError, match=r"same batch size.*3 in masks\['img'\].*4 in masks\['txt'\]"):
        run_villa(mode="txt", masks={"txt": ids, "img": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(advlab.AdvlabTypeError, match=r"masks\['img'\].*bool tensor.*got str"):
        run_villa(mode="txt", masks={"txt": ids, "img": "all"})
    with pytest.raises(advlab.AdvlabValueError, match=r"masks\['img'\].*one tensor or 1 tensors.*got 2"):
        run_villa(mode="txt", masks={"txt": ids, "img": [ids, ids]})
    # a well-formed mask of an unperturbed modality is fine
    run_villa(mode="txt", masks={"txt": ids, "img": torch.ones(4, 3, dtype=torch.bool)})


@pytest.mark.parametrize("call", [
    lambda m: advlab.project(torch.ones(2, 3, 4), "l2", 0.5, mask=m),
    lambda m: advlab.normalize(torch.ones(2, 3, 4), "linf", mask=m),
    lambda m: advlab.NormalSampler(0.1)(torch.zeros(2, 3, 4), mask=m, generator=torch.Generator().manual_seed(0)),
], ids=["project", "normalize", "sampler"])
def test_pure_functions_take_masks_like_the_engine(call):
    """0/1 float and integer masks are accepted everywhere (the old pure functions refused floats and took any
    nonzero integer as True); other values are refused, naming the mask."""
    ref = call(torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool))
    for m in (torch.tensor([[1.0, 1, 0], [1, 0, 0]]), torch.tensor([[1, 1, 0], [1, 0, 0]])):
        assert torch.equal(call(m), ref)
    for bad in (torch.tensor([[0.5, 1, 0], [1, 0, 0]]), torch.tensor([[2, 1, 0], [1, 0, 0]])):
        with pytest.raises(advlab.AdvlabValueError, match=r"`mask` to hold only 0 and 1"):
            call(bad)
