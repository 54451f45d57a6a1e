"""ReferenceModel (frozen / EMA weights; full SMART's proximal term) and AWP against hand-written float64 loops,
plus restoration properties (weights, training flags and RNG as they were, also on error) and errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import advlab
from tests.test_new_recipes_exact import SITES, _run, r3f_loop
from tests.test_villa_exact import assert_grads_equal
from tests.tiny_models import TinyVL, grads, plain_symkl, tiny_batch

F64 = torch.float64


def _nudge(model, seed, size=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(size * torch.randn(p.shape, generator=g, dtype=p.dtype))


# ---------------------------------------------------------------------------------------------- ReferenceModel
def test_ema_reference_matches_a_hand_written_moving_average():
    """θ̃ ← β θ̃ + (1 − β) θ after each update; the reference forward is the copy's forward.
    Kills: an update with β and 1 − β swapped, and a reference that reads the live weights."""
    model, batch = TinyVL().double(), tiny_batch()
    ids, img, tm, im, _y = batch
    ema = advlab.ReferenceModel(model, decay=0.9)
    shadow = copy.deepcopy(model)
    for step in range(3):
        _nudge(model, step)
        ema.update()
        with torch.no_grad():
            for s, p in zip(shadow.parameters(), model.parameters()):
                s.copy_(0.9 * s + 0.1 * p)
    ours = ema(lambda: model(ids, img, tm, im))
    torch.testing.assert_close(ours, shadow(ids, img, tm, im).detach(), rtol=0, atol=1e-12)
    assert not ours.requires_grad
    assert (model(ids, img, tm, im) - ours).abs().max() > 1e-3


def test_frozen_reference_keeps_the_weights_it_was_made_with_and_refuses_update():
    model, batch = TinyVL().double(), tiny_batch()
    ids, img, tm, im, _y = batch
    first = model(ids, img, tm, im).detach()
    frozen = advlab.ReferenceModel(model)
    _nudge(model, 0)
    torch.testing.assert_close(frozen(lambda: model(ids, img, tm, im)), first, rtol=0, atol=0)
    with pytest.raises(advlab.AdvlabValueError, match="frozen"):
        frozen.update()


@given(seed=st.integers(0, 2**31 - 1), raise_inside=st.booleans())
def test_reference_forward_leaves_weights_modes_and_rng_as_they_were(seed, raise_inside):
    """Same parameter objects and bits, same training flags, same global RNG state after a reference
    forward in a dropout model, also when the forward raises. Kills: a swap whose weights or training
    flags are not put back, and a reference forward that runs in train mode (draws dropout masks)."""
    model = TinyVL(dropout=0.5).double().train()
    model.head.eval()  # a mixed-mode model: each flag must come back as it was
    ids, img, tm, im, _y = tiny_batch(seed=seed % 1000)
    ema = advlab.ReferenceModel(model, decay=0.99)
    _nudge(model, seed)
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()

    def forward():
        out = model(ids, img, tm, im)
        if raise_inside:
            raise KeyError("boom")
        return out

    if raise_inside:
        with pytest.raises(KeyError):
            ema(forward)
    else:
        ema(forward)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == modes
    for n, p in model.named_parameters():
        assert p is before[n][0] and torch.equal(p, before[n][1])


def full_smart_loop(model, shadow, batch, *, lr, std, eps, weight, mu, seed):
    """SMART as in tests/test_recipes_exact.py::smart_loop (K = 1) plus μ · SymKL(f_θ(x), f_θ̃(x))."""
    ids, img, tm, im, y = batch
    model.zero_grad()
    g = torch.Generator().manual_seed(seed)
    shape = (*ids.shape, model.word.embedding_dim)
    noise = torch.randn(shape, generator=g, dtype=F64) * std * tm.unsqueeze(-1)
    with torch.no_grad():
        ref = shadow(ids, img, tm, im)
    clean = model(ids, img, tm, im)
    noise.requires_grad_()
    adv = model(ids, img, tm, im, noise, None)
    kl = F.kl_div(F.log_softmax(adv, -1), F.softmax(clean.detach(), -1), reduction="none").sum(-1).mean()
    (gr,) = torch.autograd.grad(kl, noise)
    s = (noise + lr * gr).detach()
    noise = s / (s.abs().amax(-1, keepdim=True) + eps)
    adv = model(ids, img, tm, im, noise, None)
    sym = (F.kl_div(F.log_softmax(adv, -1), F.softmax(clean.detach(), -1), reduction="none").sum(-1).mean()
           + F.kl_div(F.log_softmax(clean, -1), F.softmax(adv.detach(), -1), reduction="none").sum(-1).mean())
    (F.cross_entropy(clean, y) + weight * sym + mu * plain_symkl(clean, ref)).backward()
    return grads(model)


def test_full_smart_with_the_ema_reference_matches_hand_written_loop():
    model, batch = TinyVL().double(), tiny_batch()
    ids, img, tm, im, y = batch
    ema = advlab.ReferenceModel(model, decay=0.99)
    shadow = copy.deepcopy(model)
    _nudge(model, 3, size=0.5)
    ema.update()
    with torch.no_grad():
        for s, p in zip(shadow.parameters(), model.parameters()):
            s.copy_(0.99 * s + 0.01 * p)
    ref = full_smart_loop(model, shadow, batch, lr=0.3, std=0.1, eps=1e-6, weight=2.0, mu=1.0, seed=5)

    model.zero_grad()
    forward = lambda: model(ids, img, tm, im)
    target = ema(forward)
    smart = advlab.SMART(model, {"txt": "word"}, steps=1, step_size=0.3, noise_std=0.1, weight=2.0,
                         generator=torch.Generator().manual_seed(5))
    smart.step(forward, lambda out: F.cross_entropy(out, y) + 1.0 * advlab.symmetric_kl(out, target),
               masks={"txt": tm})
    assert_grads_equal(grads(model), ref, atol=1e-10)


@pytest.mark.parametrize("make,error,words", [
    (lambda m: advlab.ReferenceModel(m, decay=1.5), advlab.AdvlabValueError, "decay"),
    (lambda m: advlab.ReferenceModel(m, decay="0.9"), advlab.AdvlabValueError, "decay"),
    (lambda m: advlab.ReferenceModel("model"), advlab.AdvlabTypeError, "model"),
    (lambda m: advlab.ReferenceModel(torch.nn.ReLU()), advlab.AdvlabValueError, "parameters"),
])
def test_reference_errors(make, error, words):
    with pytest.raises(error, match=words):
        make(TinyVL().double())


def test_reference_refuses_a_model_cast_after_it_was_made():
    model = TinyVL().double()
    ema = advlab.ReferenceModel(model, decay=0.5)
    model.float()
    with pytest.raises(advlab.AdvlabValueError, match="dtype"):
        ema.update()


# ---------------------------------------------------------------------------------------------- AWP
def awp_reference_directions(model, loss_fn, gamma):
    """csdongxian/AWP: a proxy copy takes one SGD step on −loss, diff = proxy − w for weights with
    dim > 1, rescaled to ‖w‖ / (‖diff‖ + 1e-20) · diff, then w += γ · diff."""
    proxy = copy.deepcopy(model)
    opt = torch.optim.SGD(proxy.parameters(), lr=0.01)
    opt.zero_grad()
    (-loss_fn(proxy)).backward()
    opt.step()
    out = {}
    for (name, w), (_, pw) in zip(model.named_parameters(), proxy.named_parameters()):
        if w.dim() > 1:
            diff = (pw - w).detach()
            out[name] = gamma * (w.detach().norm() / (diff.norm() + 1e-20)) * diff
    return out


def test_awp_matches_the_reference_proxy_step_and_restores_w():
    model, batch = TinyVL().double(), tiny_batch()
    ids, img, tm, im, y = batch
    task = lambda m: F.cross_entropy(m(ids, img, tm, im), y)
    diffs = awp_reference_directions(model, task, 5e-3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in diffs:
                p.add_(diffs[n])
    model.zero_grad()
    task(model).backward()
    ref = grads(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in diffs:
                p.sub_(diffs[n])

    model = TinyVL().double()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    awp = advlab.AWP(model, gamma=5e-3)
    assert sorted(awp.params) == sorted(diffs)
    model.zero_grad()
    with awp.perturbed(lambda: task(model)) as added:
        task(model).backward()
    assert_grads_equal(grads(model), ref, atol=1e-10)
    assert_grads_equal({n: added[n] for n in diffs}, diffs, atol=1e-12)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_awp_composes_with_a_recipe():
    """AWP around an R3F step: R3F's gradient taken at w' (the hand-written R3F loop at w')."""
    model, batch = TinyVL().double(), tiny_batch()
    ids, img, tm, im, y = batch
    task = lambda: F.cross_entropy(model(ids, img, tm, im), y)
    awp = advlab.AWP(model, ["word.weight", "mix.weight", "head.bias"], gamma=1e-2)
    diffs = awp.directions(task())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in diffs:
                p.add_(diffs[n])
    ref = r3f_loop(model, batch, eps=0.3, noise="uniform", lam=1.5, seed=2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in diffs:
                p.sub_(diffs[n])
    model.zero_grad()
    with awp.perturbed(task):
        _run(advlab.R3F(model, SITES, eps=0.3, weight=1.5, generator=torch.Generator().manual_seed(2)), model, batch)
    assert_grads_equal(grads(model), ref, atol=1e-10)


@given(seed=st.integers(0, 2**31 - 1), gamma=st.floats(0.0, 0.1))
def test_awp_size_is_gamma_times_the_weight_norm_and_w_comes_back_on_error(seed, gamma):
    model, batch = TinyVL(seed=seed % 100).double(), tiny_batch(seed=seed % 1000)
    ids, img, tm, im, y = batch
    awp = advlab.AWP(model, gamma=gamma)
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    with pytest.raises(KeyError), awp.perturbed(lambda: F.cross_entropy(model(ids, img, tm, im), y)) as added:
        for n, d in added.items():
            w = before[n][1]
            torch.testing.assert_close(d.norm(), gamma * w.norm(), rtol=1e-9, atol=1e-15)
            torch.testing.assert_close(awp.params[n].detach(), w + d, rtol=0, atol=0)
        raise KeyError("user code failed")
    for n, p in model.named_parameters():
        assert p is before[n][0] and torch.equal(p, before[n][1])
        assert p.grad is None


def test_awp_gamma_zero_is_plain_training():
    model, batch = TinyVL().double(), tiny_batch()
    ids, img, tm, im, y = batch
    model.zero_grad()
    F.cross_entropy(model(ids, img, tm, im), y).backward()
    ref = grads(model)
    model.zero_grad()
    with advlab.AWP(model, gamma=0.0).perturbed(lambda: F.cross_entropy(model(ids, img, tm, im), y)):
        F.cross_entropy(model(ids, img, tm, im), y).backward()
    assert_grads_equal(grads(model), ref, atol=0)


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_awp_nonfinite_loss_changes_no_weight(policy):
    model, batch = TinyVL().double(), tiny_batch()
    ids, img, tm, im, y = batch
    awp = advlab.AWP(model, on_nonfinite=policy)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    nan = lambda: F.cross_entropy(model(ids, img, tm, im), y) * float("nan")
    if policy == "raise":
        with pytest.raises(advlab.NonFiniteError), awp.perturbed(nan):
            pass
    else:
        with awp.perturbed(nan) as added:
            assert added == {}
            assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
        assert awp.skipped_steps == 1
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in model.named_parameters())


@pytest.mark.parametrize("make,error,words", [
    (lambda m: advlab.AWP(m, ["nope.weight"]), advlab.AdvlabValueError, "nope.weight"),
    (lambda m: advlab.AWP(m, "head.weight"), advlab.AdvlabTypeError, "params"),
    (lambda m: advlab.AWP(m, lambda n, p: False), advlab.AdvlabValueError, "none"),
    (lambda m: advlab.AWP(m, gamma=-1.0), advlab.AdvlabValueError, "gamma"),
    (lambda m: advlab.AWP(m, on_nonfinite="ignore"), advlab.AdvlabValueError, "on_nonfinite"),
])
def test_awp_errors(make, error, words):
    with pytest.raises(error, match=words):
        make(TinyVL().double())


def test_awp_direction_does_not_depend_on_a_grad_scaler():
    """Kills an AWP whose perturbation grows with the loss scale (a missing normalisation)."""
    model, batch = TinyVL().double(), tiny_batch()
    ids, img, tm, im, y = batch
    awp = advlab.AWP(model)
    loss = lambda: F.cross_entropy(model(ids, img, tm, im), y)
    with awp.perturbed(loss) as plain:
        plain = {n: d.clone() for n, d in plain.items()}
    with awp.perturbed(loss, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**16)) as scaled:
        assert_grads_equal(scaled, plain, atol=1e-15)
