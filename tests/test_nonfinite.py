"""One non-finite rule for every recipe and for `free_training` itself.

A NaN or inf in any loss of a step (ascent, clean, δ-only) or in any δ gradient: with
`on_nonfinite="raise"` a `NonFiniteError` is raised and with `"skip"` the step is skipped, and
either way every parameter `.grad` is left exactly as it was before the step (the same tensor,
the same bits; None stays None).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import advlab
from tests.tiny_models import TinyVL, plain_symkl, tiny_batch

SITES = {"txt": "word", "img": advlab.Site("img_proj", where="input")}


class _Poison(torch.autograd.Function):
    """Identity forward; the backward sends `value` everywhere: a finite loss with a non-finite δ gradient."""

    value = float("nan")

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, _Poison.value)


def _recipe(name, model, on_nonfinite):
    if name == "villa-official":
        return advlab.VILLA(model, sites=SITES, on_nonfinite=on_nonfinite)
    if name == "villa-paper":
        return advlab.VILLA(model, sites=SITES, preset="paper", radius=0.5, on_nonfinite=on_nonfinite,
                            generator=torch.Generator().manual_seed(0))
    if name == "villa-retain":
        return advlab.VILLA(model, sites=SITES, schedule="retain", mode="alter", on_nonfinite=on_nonfinite)
    if name == "villa-lean":
        return advlab.VILLA(model, sites=SITES, schedule="lean", on_nonfinite=on_nonfinite)
    if name == "freelb":
        return advlab.FreeLB(model, {"txt": "word"}, steps=2, init_magnitude=0.1, on_nonfinite=on_nonfinite,
                             generator=torch.Generator().manual_seed(0))
    if name == "freelb-k1":  # one step: no δ update follows, the δ gradient is still checked
        return advlab.FreeLB(model, {"txt": "word"}, steps=1, on_nonfinite=on_nonfinite)
    if name == "smart-mt-dnn":
        return advlab.SMART(model, {"txt": "word"}, steps=2, step_size=0.1, noise_std=0.1, on_nonfinite=on_nonfinite,
                            generator=torch.Generator().manual_seed(0))
    if name == "smart-paper":
        return advlab.SMART(model, {"txt": "word"}, preset="paper", steps=2, on_nonfinite=on_nonfinite,
                            generator=torch.Generator().manual_seed(0))
    raise AssertionError(name)


RECIPES = ["villa-official", "villa-paper", "villa-retain", "villa-lean", "freelb", "freelb-k1", "smart-mt-dnn",
           "smart-paper"]
FAULTS = ["nan-loss", "inf-loss", "nan-delta-grad", "inf-delta-grad"]


def _grads_before(model, state):
    """Put `.grad` in a known state: all None, or existing tensors (an earlier micro-batch's)."""
    model.zero_grad(set_to_none=True)
    if state == "existing":
        g = torch.Generator().manual_seed(7)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    return {n: (p.grad, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}


def _assert_grads_unchanged(model, before):
    for n, p in model.named_parameters():
        obj, values = before[n]
        if obj is None:
            assert p.grad is None, f"{n}: .grad was None before the step, now it is set"
        else:
            assert p.grad is obj, f"{n}: .grad was replaced by another tensor"
            assert torch.equal(p.grad, values), f"{n}: .grad changed"


def _run(recipe_name, fault, policy, state):
    model = TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
    recipe = _recipe(recipe_name, model, policy)
    before = _grads_before(model, state)
    factor = {"nan-loss": float("nan"), "inf-loss": float("inf")}.get(fault, 1.0)
    task = lambda out: F.cross_entropy(out, y) * factor
    masks = {"txt": tm, "img": im} if recipe_name.startswith("villa") else {"txt": tm}
    handle = None
    if fault.endswith("delta-grad"):
        _Poison.value = float("nan") if fault.startswith("nan") else float("inf")
        handle = model.mix.register_forward_pre_hook(lambda m, a: (_Poison.apply(a[0]),))
    try:
        if policy == "raise":
            with pytest.raises(advlab.NonFiniteError, match="finite"):
                recipe.step(lambda: model(ids, img, tm, im), task, masks=masks)
            stats = None
        else:
            stats = recipe.step(lambda: model(ids, img, tm, im), task, masks=masks)
    finally:
        if handle is not None:
            handle.remove()
    _assert_grads_unchanged(model, before)
    return stats


@pytest.mark.parametrize("state", ["none", "existing"])
@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("recipe", RECIPES)
def test_raise_leaves_every_grad_as_it_was(recipe, fault, state):
    """Fails on the old code for SMART (NaN task loss raised nothing), for any loss at step > 0 (earlier
    steps had accumulated) and for a NaN δ gradient (its backward had already written the parameters)."""
    _run(recipe, fault, "raise", state)


@pytest.mark.parametrize("state", ["none", "existing"])
@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("recipe", RECIPES)
def test_skip_leaves_every_grad_as_it_was_and_says_so(recipe, fault, state):
    """Fails on the old code for VILLA(preset="paper") (its clean loss was still back-propagated), SMART
    (its clean task loss was never checked) and every NaN δ gradient."""
    stats = _run(recipe, fault, "skip", state)
    assert stats is not None and stats.skipped_steps >= 1


def test_finite_step_is_not_skipped_and_matches_a_fresh_run():
    """The checks change nothing when every value is finite (no restore, no skip)."""
    model = TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
    stats = advlab.VILLA(model, sites=SITES, on_nonfinite="skip").step(
        lambda: model(ids, img, tm, im), lambda out: F.cross_entropy(out, y))
    assert stats.skipped_steps == 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_error_names_the_first_non_finite_value_and_its_step():
    model = TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
    fwd = lambda: model(ids, img, tm, im)
    with pytest.raises(advlab.NonFiniteError, match="finite loss at ascent step 1"):
        with advlab.free_training(model, SITES, {"txt": advlab.Perturbation(0.1)}, steps=3) as ft:
            ft.clean(fwd)
            for step in ft:
                out = ft.forward(fwd)
                bad = float("nan") if step.index == 1 else 1.0
                ft.backward(F.cross_entropy(out, y) * bad + plain_symkl(out, step.clean_logits))
    assert all(p.grad is None for p in model.parameters())


def test_clean_loss_is_checked():
    """A NaN clean loss (VILLA paper's explicit clean loss, SMART's task loss) is caught like any other."""
    model = TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
    fwd = lambda: model(ids, img, tm, im)
    with pytest.raises(advlab.NonFiniteError, match=r"finite clean loss, but"):
        with advlab.free_training(model, SITES, {"txt": advlab.Perturbation(0.1)}, steps=2) as ft:
            ft.clean(fwd)
            ft.clean_loss(lambda out: F.cross_entropy(out, y) * float("nan"))
            for step in ft:
                ft.backward(F.cross_entropy(ft.forward(fwd), y))
    assert all(p.grad is None for p in model.parameters())


def test_skip_under_a_grad_scaler_restores_grads_and_lowers_the_scale():
    """An overflow of the scaled gradients: the scaler cannot see the discarded gradients, so the step lowers
    its scale by the backoff factor itself. With gradients from an earlier micro-batch the usual
    `scaler.step(opt); scaler.update()` then applies exactly those."""
    model = TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
    before = _grads_before(model, "existing")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    villa = advlab.VILLA(model, sites=SITES, steps=3, step_size=0.3)  # the default policy with a scaler: skip
    stats = villa.step(lambda: model(ids, img, tm, im), lambda out: F.cross_entropy(out, y) * 1e6,
                       masks={"txt": tm, "img": im}, scaler=scaler)
    assert stats.skipped_steps >= 1
    _assert_grads_unchanged(model, before)
    assert scaler.get_scale() == 2.0**126
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    scaler.step(opt)
    scaler.update()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), params[n] - 0.5 * before[n][1] / 2.0**126, rtol=0, atol=0)


def test_skip_reason_is_recorded():
    model = TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
    fwd = lambda: model(ids, img, tm, im)
    with advlab.free_training(model, SITES, {"txt": advlab.Perturbation(0.1)}, steps=2, on_nonfinite="skip") as ft:
        ft.clean(fwd)
        for step in ft:
            ft.backward(F.cross_entropy(ft.forward(fwd), y) * float("inf"))
    assert ft.skipped_steps == 2
    assert ft.skip_reason is not None and "loss at ascent step 0" in ft.skip_reason


def test_a_step_that_fails_midway_leaves_grads_as_they_were():
    model = TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
    fwd = lambda: model(ids, img, tm, im)
    with pytest.raises(KeyError):
        with advlab.free_training(model, SITES, {"txt": advlab.Perturbation(0.1)}, steps=3) as ft:
            ft.clean(fwd)
            for step in ft:
                ft.backward(F.cross_entropy(ft.forward(fwd), y) + plain_symkl(ft.forward(fwd), step.clean_logits))
                if step.index == 1:
                    raise KeyError("user code failed")
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_non_finite_parameter_gradient_above_the_sites_is_caught(policy):
    """A finite loss and finite δ gradients, but a NaN gradient reaching the head's weight only: fails on
    the old code, which checked losses and δ gradients only."""
    model = TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
    before = _grads_before(model, "existing")
    handle = model.head.weight.register_hook(lambda g: g * float("nan"))
    try:
        villa = advlab.VILLA(model, sites=SITES, on_nonfinite=policy)
        if policy == "raise":
            with pytest.raises(advlab.NonFiniteError, match="parameter gradient"):
                villa.step(lambda: model(ids, img, tm, im), lambda out: F.cross_entropy(out, y))
        else:
            stats = villa.step(lambda: model(ids, img, tm, im), lambda out: F.cross_entropy(out, y))
            assert stats.skipped_steps == 1
    finally:
        handle.remove()
    _assert_grads_unchanged(model, before)


@settings(max_examples=20, deadline=None)
@given(steps=st.integers(1, 3), bad_step=st.integers(0, 2), bad_value=st.sampled_from([float("nan"), float("inf")]),
       schedule=st.sampled_from(["deferred", "retain", "lean"]), policy=st.sampled_from(["raise", "skip"]),
       existing=st.booleans(), seed=st.integers(0, 2**16))
def test_any_non_finite_loss_leaves_grads_bitwise_as_they_were(steps, bad_step, bad_value, schedule, policy,
                                                              existing, seed):
    """Wherever the non-finite loss falls (any step, any schedule), .grad is the same object with the same bits;
    and when the loss is finite the step is not skipped."""
    model = TinyVL(seed=seed % 5)
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32, seed=seed)
    before = _grads_before(model, "existing" if existing else "none")
    fwd = lambda: model(ids, img, tm, im)
    poisoned = bad_step < steps

    def run():
        with advlab.free_training(model, SITES, {"txt": advlab.Perturbation(0.1), "img": advlab.Perturbation(0.1)},
                                  steps=steps, schedule=schedule, on_nonfinite=policy) as ft:
            ft.clean(fwd)
            for step in ft:
                out = ft.forward(fwd)
                factor = bad_value if step.index == bad_step else 1.0
                ft.backward((F.cross_entropy(out, y) * factor + plain_symkl(out, step.clean_logits)) / steps)
        return ft

    if poisoned and policy == "raise":
        with pytest.raises(advlab.NonFiniteError):
            run()
    else:
        ft = run()
        assert (ft.skipped_steps >= 1) == poisoned
    if poisoned:
        _assert_grads_unchanged(model, before)
    else:
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
