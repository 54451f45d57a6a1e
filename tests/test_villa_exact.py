"""VILLA's parameter gradients against plain hand-written loops of its defining equations (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import advlab
from tests.tiny_models import TinyVL, grads, plain_symkl, tiny_batch

MODES = ["txt", "img", "joint", "alter"]


def official_loop(model, batch, *, K, mode, lr, kl_w, norm="l2", max_norm=0.0):
    """The official `train_vqa_adv.py` structure: clean forward kept, K backward passes with
    retain_graph=True, per-row normalised steps with the 1e-8 clamp, optional projection."""
    ids, img, tm, im, y = batch
    model.zero_grad()
    d_t = torch.zeros(*ids.shape, model.word.embedding_dim, dtype=img.dtype)
    d_i = torch.zeros_like(img)
    clean = model(ids, img, tm, im)
    for k in range(K):
        d_t.requires_grad_()
        d_i.requires_grad_()
        if mode != "alter":
            out = model(ids, img, tm, im, d_t if mode in ("txt", "joint") else None, d_i if mode in ("img", "joint") else None)
            loss = (F.cross_entropy(out, y) + kl_w * plain_symkl(out, clean)) / K
        else:
            o1 = model(ids, img, tm, im, d_t, None)
            o2 = model(ids, img, tm, im, None, d_i)
            loss = (F.cross_entropy(o1, y) + F.cross_entropy(o2, y) + kl_w * (plain_symkl(o1, clean) + plain_symkl(o2, clean))) / (2 * K)
        loss.backward(retain_graph=True)
        if k == K - 1:
            break
        new = []
        for d, active in ((d_t, mode in ("txt", "joint", "alter")), (d_i, mode in ("img", "joint", "alter"))):
            if not active:
                new.append(torch.zeros_like(d).detach())
                continue
            g = d.grad
            B = g.shape[0]
            if norm == "l2":
                denorm = torch.norm(g.view(B, -1), dim=1).view(-1, 1, 1).clamp(min=1e-8)
                d = (d + lr * g / denorm).detach()
                if max_norm > 0:
                    dn = torch.norm(d.view(B, -1), p=2, dim=1)
                    exceed = (dn > max_norm).to(d.dtype)
                    re = (max_norm / dn * exceed + (1 - exceed)).view(-1, 1, 1)
                    d = (d * re).detach()
            else:
                denorm = torch.norm(g.view(B, -1), dim=1, p=float("inf")).view(-1, 1, 1).clamp(min=1e-8)
                d = (d + lr * g / denorm).detach()
                if max_norm > 0:
                    d = torch.clamp(d, -max_norm, max_norm).detach()
            new.append(d)
        d_t, d_i = new
    return grads(model)


def advlab_step(model, batch, *, schedule="deferred", **villa_kwargs):
    ids, img, tm, im, y = batch
    model.zero_grad()
    villa = advlab.VILLA(model, sites={"txt": "word", "img": advlab.Site("img_proj", where="input")},
                         schedule=schedule, **villa_kwargs)
    stats = villa.step(lambda: model(ids, img, tm, im), lambda out: F.cross_entropy(out, y),
                       masks={"txt": tm, "img": im})
    return grads(model), stats


def assert_grads_equal(a, b, atol):
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=atol, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("schedule", ["deferred", "retain"])
@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("mode", MODES)
def test_official_matches_hand_written_loop(mode, norm, schedule):
    model = TinyVL().double()
    batch = tiny_batch()
    ref = official_loop(model, batch, K=3, mode=mode, lr=0.3, kl_w=1.5, norm=norm)
    got, stats = advlab_step(model, batch, schedule=schedule, steps=3, mode=mode, step_size=0.3, kl_weight=1.5, norm=norm)
    assert_grads_equal(got, ref, atol=1e-10)
    assert len(stats.task_loss) == 3 and stats.skipped_steps == 0


@pytest.mark.parametrize("norm,radius", [("l2", 0.2), ("linf", 0.05)])
@pytest.mark.parametrize("mode", ["joint", "alter"])
def test_official_with_radius_override(mode, norm, radius):
    model = TinyVL().double()
    batch = tiny_batch()
    ref = official_loop(model, batch, K=4, mode=mode, lr=0.3, kl_w=1.0, norm=norm, max_norm=radius)
    got, stats = advlab_step(model, batch, steps=4, mode=mode, step_size=0.3, kl_weight=1.0, norm=norm, radius=radius)
    assert_grads_equal(got, ref, atol=1e-10)
    assert stats.overrides["radius"] == radius


def test_perturbation_changes_the_gradient():
    """The exactness tests would pass trivially if δ never moved: check it matters."""
    model = TinyVL().double()
    batch = tiny_batch()
    still, _ = advlab_step(model, batch, steps=3, mode="joint", step_size=0.0, kl_weight=1.5)
    moved, stats = advlab_step(model, batch, steps=3, mode="joint", step_size=0.3, kl_weight=1.5)
    assert max((still[n] - moved[n]).abs().max().item() for n in still) > 1e-4
    assert stats.delta_norm["txt"] > 0 and stats.delta_norm["img"] > 0


def test_k1_zero_init_equals_clean_training_plus_zero_kl():
    model = TinyVL().double()
    ids, img, tm, im, y = batch = tiny_batch()
    got, _ = advlab_step(model, batch, steps=1, mode="joint", step_size=0.5, kl_weight=1.5)
    model.zero_grad()
    F.cross_entropy(model(ids, img, tm, im), y).backward()
    assert_grads_equal(got, grads(model), atol=1e-12)


def paper_loop(model, batch, *, K, mode, lr, eps, kl_w, seed):
    """Algorithm 1 as printed: δ_0 = U(-ε, ε)/√N, explicit clean loss, projection onto the ε-ball,
    g = (1/K) Σ_t ∇[L_clean + Σ_m (L_m + w·KL_m)]."""
    ids, img, tm, im, y = batch
    model.zero_grad()
    g = torch.Generator().manual_seed(seed)
    mods = ["txt", "img"] if mode in ("alter", "joint") else [mode]
    shapes = {"txt": (*ids.shape, model.word.embedding_dim), "img": tuple(img.shape)}
    masks = {"txt": tm, "img": im}
    deltas = {}
    for m in mods:  # hooks draw in forward order: txt first, then img
        u = torch.rand(shapes[m], generator=g, dtype=torch.float64)
        n = masks[m].sum(1).to(torch.float64) * shapes[m][-1]
        deltas[m] = ((2 * u - 1) * eps / n.sqrt().view(-1, 1, 1)) * masks[m].unsqueeze(-1)
    clean = model(ids, img, tm, im)
    clean_loss = F.cross_entropy(clean, y)
    for t in range(K):
        for d in deltas.values():
            d.requires_grad_()
        total = clean_loss
        groups = [[m] for m in mods] if mode == "alter" else [mods]
        for grp in groups:
            out = model(ids, img, tm, im, deltas["txt"] if "txt" in grp else None, deltas["img"] if "img" in grp else None)
            total = total + F.cross_entropy(out, y) + kl_w * plain_symkl(out, clean)
        (total / K).backward(retain_graph=True)
        for m, d in deltas.items():
            gr = d.grad
            step = d + lr * gr / gr.flatten(1).norm(dim=1).clamp_min(1e-8).view(-1, 1, 1)
            nrm = step.flatten(1).norm(dim=1).view(-1, 1, 1)
            deltas[m] = torch.where(nrm > eps, step * eps / nrm, step).detach()
    return grads(model)


@pytest.mark.parametrize("schedule", ["deferred", "retain"])
@pytest.mark.parametrize("mode", ["alter", "joint", "txt"])
def test_paper_matches_algorithm_1(mode, schedule):
    model = TinyVL().double()
    batch = tiny_batch()
    ref = paper_loop(model, batch, K=3, mode=mode, lr=0.2, eps=0.3, kl_w=1.0, seed=7)
    got, _ = advlab_step(model, batch, schedule=schedule, preset="paper", steps=3, mode=mode, step_size=0.2, radius=0.3,
                         generator=torch.Generator().manual_seed(7))
    assert_grads_equal(got, ref, atol=1e-10)


def test_paper_requires_epsilon():
    with pytest.raises(advlab.AdvlabValueError, match="radius"):
        advlab.VILLA(TinyVL(), sites={"txt": "word"}, preset="paper")


@pytest.mark.parametrize("preset,mode", [("official", "alter"), ("official", "joint"), ("paper", "alter")])
def test_lean_schedule_equals_deferred_with_dropout_and_restores_rng(preset, mode):
    """The lean schedule recomputes the clean forward replaying the RNG: same dropout masks, same
    gradients as the default schedule, and the RNG stream afterwards is the one the default leaves."""
    model = TinyVL(dropout=0.3).double().train()
    batch = tiny_batch()
    kwargs = dict(preset=preset, steps=3, mode=mode, step_size=0.2, radius=0.5 if preset == "paper" else None)
    results = {}
    for schedule in ("deferred", "lean"):
        torch.manual_seed(123)
        results[schedule] = advlab_step(model, batch, schedule=schedule, generator=torch.Generator().manual_seed(1),
                                        **kwargs)[0], torch.rand(3)
    assert_grads_equal(results["lean"][0], results["deferred"][0], atol=1e-10)
    torch.testing.assert_close(results["lean"][1], results["deferred"][1], rtol=0, atol=0)


def test_dropout_makes_schedules_differ_only_through_rng():
    """Sanity check that dropout is on: two seeds give different gradients."""
    model = TinyVL(dropout=0.3).double().train()
    batch = tiny_batch()
    torch.manual_seed(1)
    a = advlab_step(model, batch, steps=2, mode="joint")[0]
    torch.manual_seed(2)
    b = advlab_step(model, batch, steps=2, mode="joint")[0]
    assert max((a[n] - b[n]).abs().max().item() for n in a) > 1e-6


def _peak_saved_bytes(fn):
    """Peak bytes of tensors saved for backward while `fn` runs (each save counted while its graph lives)."""
    state = {"cur": 0, "peak": 0}

    class Saved:
        def __init__(self, t):
            self.t, self.n = t, t.untyped_storage().nbytes()
            state["cur"] += self.n
            state["peak"] = max(state["peak"], state["cur"])

        def __del__(self):
            state["cur"] -= self.n

    with torch.autograd.graph.saved_tensors_hooks(Saved, lambda s: s.t):
        fn()
    return state["peak"]


def test_alter_mode_never_keeps_two_adversarial_graphs():
    """VILLA back-propagates each forward of an "alter" step at once: its peak of saved tensors is
    the joint mode's (clean graph + one adversarial graph), not one graph more."""
    model = TinyVL(hidden=64).double()
    batch = tiny_batch()
    peaks = {mode: _peak_saved_bytes(lambda mode=mode: advlab_step(model, batch, steps=3, mode=mode))
             for mode in ("joint", "alter")}
    official = _peak_saved_bytes(lambda: advlab_step(model, batch, steps=3, mode="alter", schedule="retain"))
    assert peaks["alter"] <= peaks["joint"] * 1.05
    assert official > peaks["alter"] * 1.3
