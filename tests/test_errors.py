"""Every mistake a user can make gives a clear advlab error naming the argument."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import advlab
from tests.tiny_models import TinyVL, tiny_batch

SITES = {"txt": "word", "img": advlab.Site("img_proj", where="input")}


def run_villa(model=None, masks=None, task=None, **kwargs):
    model = model or TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
    villa = advlab.VILLA(model, sites=kwargs.pop("sites", SITES), **kwargs)
    task = task or (lambda out: F.cross_entropy(out, y))
    return villa.step(lambda: model(ids, img, tm, im), task, masks=masks)


def test_unknown_site_name_suggests_close_names():
    with pytest.raises(advlab.AdvlabValueError, match=r"'wrd'.*not"):
        advlab.VILLA(TinyVL(), sites={"txt": "wrd"})


def test_site_module_not_in_model():
    with pytest.raises(advlab.AdvlabValueError, match="not part of it"):
        advlab.VILLA(TinyVL(), sites={"txt": nn.Linear(2, 2)})


def test_model_without_sites_or_protocol():
    with pytest.raises(advlab.AdvlabTypeError, match="perturbation_sites"):
        advlab.VILLA(TinyVL())


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


def test_site_without_perturbation_is_not_perturbed():
    model = TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
    with advlab.free_training(model, SITES, {"txt": advlab.Perturbation(0.1)}, steps=2) as ft:
        ft.clean(lambda: model(ids, img, tm, im))
        for _ in ft:
            ft.backward(F.cross_entropy(ft.forward(lambda: model(ids, img, tm, im)), y))
        assert ft.modalities == ("txt",)
        assert ft.hook_calls == {"txt": 3}


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


def test_site_tensor_not_batch_first():
    class WrongBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Embedding(5, 3), nn.Linear(3, 2)

        def forward(self, ids):
            return self.b(self.a(ids)).sum(1) + self.b(self.a(ids.T)).sum(0)

    model = WrongBatch()
    ids = torch.tensor([[1, 2, 3], [3, 4, 0]])
    villa = advlab.VILLA(model, sites={"x": "a"})
    with pytest.raises(advlab.AdvlabValueError, match="called 2 times"):
        villa.step(lambda: model(ids), lambda out: out.sum())
    with pytest.raises(advlab.AdvlabValueError, match="batch-first"):
        advlab.VILLA(model, sites={"x": advlab.Site("a", calls=2)}).step(lambda: model(ids), lambda out: out.sum())


def test_one_dimensional_site_tensor():
    model = nn.Sequential(nn.Linear(3, 1), nn.Flatten(0))
    with pytest.raises(advlab.AdvlabValueError, match=r"batch-first.*\(4,\)"):
        advlab.VILLA(model, sites={"x": "1"}).step(lambda: model(torch.ones(4, 3)), lambda out: out.sum())


def test_site_not_called():
    model = TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
    villa = advlab.VILLA(model, sites={"txt": "word", "extra": "head"}, mode="joint")
    with pytest.raises(advlab.AdvlabValueError, match="'head'.*not called"):
        villa.step(lambda: model.word(ids).sum(-1), lambda out: out.sum())


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


def test_context_used_after_exit():
    model = TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
    with advlab.free_training(model, SITES, {"txt": advlab.Perturbation()}) as ft:
        ft.clean(lambda: model(ids, img, tm, im))
        for _ in ft:
            ft.backward(F.cross_entropy(ft.forward(lambda: model(ids, img, tm, im)), y))
    with pytest.raises(advlab.ContextExitedError, match="exited"):
        ft.forward(lambda: model(ids, img, tm, im))
    with pytest.raises(advlab.ContextExitedError):
        ft.__enter__()


def test_step_without_backward():
    model = TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
    with pytest.raises(advlab.AdvlabValueError, match="backward"):
        with advlab.free_training(model, SITES, {"txt": advlab.Perturbation()}, steps=2) as ft:
            for _ in ft:
                ft.forward(lambda: model(ids, img, tm, im))


def test_clean_loss_after_the_last_backward_raises():
    """It would never be back-propagated (the clean backward has run): refused, not dropped silently."""
    model = TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
    with advlab.free_training(model, SITES, {"txt": advlab.Perturbation()}, steps=2) as ft:
        ft.clean(lambda: model(ids, img, tm, im))
        ft.clean_loss(lambda out: F.cross_entropy(out, y))  # before: fine
        for _ in ft:
            ft.backward(F.cross_entropy(ft.forward(lambda: model(ids, img, tm, im)), y))
        with pytest.raises(advlab.AdvlabValueError, match="before the last `backward`"):
            ft.clean_loss(lambda out: F.cross_entropy(out, y))


def test_deferred_schedule_explains_a_clean_graph_reused():
    model = TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
    with pytest.raises(advlab.AdvlabValueError, match="clean_logits"):
        with advlab.free_training(model, SITES, {"txt": advlab.Perturbation()}, steps=3) as ft:
            clean = ft.clean(lambda: model(ids, img, tm, im))
            for _ in ft:
                out = ft.forward(lambda: model(ids, img, tm, im))
                ft.backward(advlab.symmetric_kl(out, clean) + F.cross_entropy(out, y))


def test_logits_not_found():
    model = TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
    with pytest.raises(advlab.AdvlabTypeError, match="logits"):
        advlab.VILLA(model, sites=SITES).step(lambda: {"scores": model(ids, img, tm, im)}, lambda out: out["scores"].sum())


def test_non_scalar_task_loss():
    with pytest.raises(advlab.AdvlabValueError, match="scalar"):
        run_villa(task=lambda out: F.cross_entropy(out, torch.zeros(4, dtype=torch.long), reduction="none"))


def test_compiled_model_is_refused():
    model = TinyVL()
    compiled = torch.compile(model)
    with pytest.raises(advlab.AdvlabValueError, match="torch.compile"):
        advlab.free_training(compiled, SITES, {"txt": advlab.Perturbation()})
    model.mix.compile()
    with pytest.raises(advlab.AdvlabValueError, match="'mix'"):
        advlab.free_training(model, SITES, {"txt": advlab.Perturbation()})


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
    with pytest.raises(advlab.AdvlabValueError, match="schedule"):
        advlab.free_training(TinyVL(), SITES, {"txt": advlab.Perturbation()}, schedule="fast")
    with pytest.raises(advlab.AdvlabValueError, match="on_nonfinite"):
        advlab.free_training(TinyVL(), SITES, {"txt": advlab.Perturbation()}, on_nonfinite="ignore")
    with pytest.raises(advlab.AdvlabTypeError, match="Site.module"):
        advlab.Site(3)
    with pytest.raises(advlab.AdvlabValueError, match="where"):
        advlab.Site("word", where="inside")
    with pytest.raises(advlab.AdvlabValueError, match="calls"):
        advlab.Site("word", calls=0)


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


def test_clean_graph_misuse_is_caught_at_its_first_backward_without_reading_messages():
    """The real clean logits in a deferred step's loss: refused inside step 0's backward (a hook on the clean
    logits, not the text of torch's 'backward a second time' error) and the gradients are put back; the
    retain schedule, which back-propagates the clean graph every step, accepts the same loop."""
    model = TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
    fwd = lambda: model(ids, img, tm, im)
    reached = []
    with pytest.raises(advlab.AdvlabValueError, match="step.clean_logits"):
        with advlab.free_training(model, SITES, {"txt": advlab.Perturbation()}, steps=3) as ft:
            clean = ft.clean(fwd)
            for step in ft:
                reached.append(step.index)
                out = ft.forward(fwd)
                ft.backward(advlab.symmetric_kl(out, clean) + F.cross_entropy(out, y))
    assert reached == [0]
    assert all(p.grad is None for p in model.parameters())
    with advlab.free_training(model, SITES, {"txt": advlab.Perturbation()}, steps=3, schedule="retain") as ft:
        clean = ft.clean(fwd)
        for step in ft:
            out = ft.forward(fwd)
            ft.backward(advlab.symmetric_kl(out, clean) + F.cross_entropy(out, y))
    assert all(p.grad is not None for p in model.parameters())
