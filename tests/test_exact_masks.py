"""Exactness where padding reaches the output: the masking of δ is compared, not carried along.

TinySumVL sums over every position, padded ones included, so δ's gradient is nonzero at
padded tokens and regions. advlab's documented semantics: masked elements of δ are 0, count
in no norm, and stay 0. The hand-written loops below apply the mask explicitly to the
initial δ, to the gradient before its norm, and after the projection; an engine that hands
the ascender no mask (or a loop that forgets one) moves padded δ and changes every gradient.
VILLA is compared for every schedule (deferred, retain, lean); FreeLB and SMART (mt-dnn) too,
all in float64 at 1e-10.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import advlab
from tests.tiny_models import TinySumVL, grads, plain_symkl, tiny_batch

SITES = {"txt": "word", "img": advlab.Site("img_proj", where="input")}
SCHEDULES = ["deferred", "retain", "lean"]


def _masked_step(d, g, mask, *, lr, norm, max_norm):
    """δ ← Π(δ + η g_μ / max(||g_μ||, 1e-8)), g_μ = g with padded elements zeroed; padded δ stays 0."""
    m = mask.unsqueeze(-1).to(g.dtype)
    g = g * m
    B = g.shape[0]
    if norm == "l2":
        d = d + lr * g / g.reshape(B, -1).norm(dim=1).clamp(min=1e-8).view(-1, 1, 1)
        if max_norm:
            dn = d.reshape(B, -1).norm(dim=1).view(-1, 1, 1)
            d = torch.where(dn > max_norm, d * max_norm / dn, d)
    elif norm == "l2_token":
        d = d + lr * g / g.norm(dim=-1, keepdim=True).clamp(min=1e-8)
        if max_norm:
            dn = d.norm(dim=-1, keepdim=True)
            d = torch.where(dn > max_norm, d * max_norm / dn, d)
    else:
        d = d + lr * g / g.reshape(B, -1).abs().amax(dim=1).clamp(min=1e-8).view(-1, 1, 1)
        if max_norm:
            d = d.clamp(-max_norm, max_norm)
    return (d * m).detach()


def official_loop(model, batch, *, K, mode, lr, kl_w, norm="l2", max_norm=0.0):
    """VILLA's official loop (zero δ, loss / K back-propagated each step) with masked ascent steps."""
    ids, img, tm, im, y = batch
    model.zero_grad()
    d_t = torch.zeros(*ids.shape, model.word.embedding_dim, dtype=img.dtype)
    d_i = torch.zeros_like(img)
    clean = model(ids, img, tm, im)
    for k in range(K):
        d_t.requires_grad_()
        d_i.requires_grad_()
        if mode != "alter":
            out = model(ids, img, tm, im, d_t if mode in ("txt", "joint") else None,
                        d_i if mode in ("img", "joint") else None)
            loss = (F.cross_entropy(out, y) + kl_w * plain_symkl(out, clean)) / K
        else:
            o1 = model(ids, img, tm, im, d_t, None)
            o2 = model(ids, img, tm, im, None, d_i)
            loss = (F.cross_entropy(o1, y) + F.cross_entropy(o2, y)
                    + kl_w * (plain_symkl(o1, clean) + plain_symkl(o2, clean))) / (2 * K)
        loss.backward(retain_graph=True)
        if k == K - 1:
            break
        active = {"txt": mode in ("txt", "joint", "alter"), "img": mode in ("img", "joint", "alter")}
        d_t = _masked_step(d_t, d_t.grad, tm, lr=lr, norm=norm, max_norm=max_norm) if active["txt"] else d_t.detach()
        d_i = _masked_step(d_i, d_i.grad, im, lr=lr, norm=norm, max_norm=max_norm) if active["img"] else d_i.detach()
    return grads(model)


def paper_loop(model, batch, *, K, mode, lr, eps, kl_w, seed):
    """VILLA Algorithm 1: δ_0 = μ U(-ε, ε) / √N (N = d · unmasked positions), clean loss in every step."""
    ids, img, tm, im, y = batch
    model.zero_grad()
    gen = torch.Generator().manual_seed(seed)
    mods = ["txt", "img"] if mode in ("alter", "joint") else [mode]
    shapes = {"txt": (*ids.shape, model.word.embedding_dim), "img": tuple(img.shape)}
    masks = {"txt": tm, "img": im}
    deltas = {}
    for m in mods:  # the hooks draw in forward order: txt, then img
        u = torch.rand(shapes[m], generator=gen, dtype=torch.float64)
        n = masks[m].sum(1).to(torch.float64) * shapes[m][-1]
        deltas[m] = ((2 * u - 1) * eps / n.sqrt().view(-1, 1, 1)) * masks[m].unsqueeze(-1)
    clean = model(ids, img, tm, im)
    clean_loss = F.cross_entropy(clean, y)
    for _ in range(K):
        for d in deltas.values():
            d.requires_grad_()
        total = clean_loss
        for grp in ([[m] for m in mods] if mode == "alter" else [mods]):
            out = model(ids, img, tm, im, deltas["txt"] if "txt" in grp else None,
                        deltas["img"] if "img" in grp else None)
            total = total + F.cross_entropy(out, y) + kl_w * plain_symkl(out, clean)
        (total / K).backward(retain_graph=True)
        deltas = {m: _masked_step(d, d.grad, masks[m], lr=lr, norm="l2", max_norm=eps) for m, d in deltas.items()}
    return grads(model)


def advlab_step(model, batch, *, schedule, **kwargs):
    ids, img, tm, im, y = batch
    model.zero_grad()
    villa = advlab.VILLA(model, sites=SITES, schedule=schedule, **kwargs)
    villa.step(lambda: model(ids, img, tm, im), lambda out: F.cross_entropy(out, y), masks={"txt": tm, "img": im})
    return grads(model)


def assert_grads_equal(a, b, atol=1e-10):
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=atol, msg=lambda m, n=n: f"{n}: {m}")


def test_padding_reaches_the_output_of_the_sum_model():
    """The premise: δ's gradient at padded positions is not 0 (with TinyVL's masked pooling it is)."""
    model = TinySumVL().double()
    ids, img, tm, im, y = tiny_batch()
    d_t = torch.zeros(*ids.shape, model.word.embedding_dim, dtype=torch.float64, requires_grad=True)
    d_i = torch.zeros_like(img, requires_grad=True)
    F.cross_entropy(model(ids, img, tm, im, d_t, d_i), y).backward()
    assert d_t.grad[~tm].abs().min() > 0 and d_i.grad[~im].abs().min() > 0


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("norm", ["l2", "l2_token", "linf"])
@pytest.mark.parametrize("mode", ["txt", "img", "joint", "alter"])
def test_official_with_padding_matches_the_masked_loop(mode, norm, schedule):
    model = TinySumVL().double()
    batch = tiny_batch()
    ref = official_loop(model, batch, K=3, mode=mode, lr=0.3, kl_w=1.5, norm=norm)
    got = advlab_step(model, batch, schedule=schedule, steps=3, mode=mode, step_size=0.3, kl_weight=1.5, norm=norm)
    assert_grads_equal(got, ref)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("norm,radius", [("l2", 0.2), ("l2_token", 0.1), ("linf", 0.05)])
@pytest.mark.parametrize("mode", ["joint", "alter"])
def test_official_with_padding_and_radius_matches_the_masked_loop(mode, norm, radius, schedule):
    model = TinySumVL().double()
    batch = tiny_batch()
    ref = official_loop(model, batch, K=4, mode=mode, lr=0.3, kl_w=1.0, norm=norm, max_norm=radius)
    got = advlab_step(model, batch, schedule=schedule, steps=4, mode=mode, step_size=0.3, kl_weight=1.0, norm=norm,
                      radius=radius)
    assert_grads_equal(got, ref)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("mode", ["alter", "joint", "txt", "img"])
def test_paper_with_padding_matches_the_masked_algorithm_1(mode, schedule):
    model = TinySumVL().double()
    batch = tiny_batch()
    ref = paper_loop(model, batch, K=3, mode=mode, lr=0.2, eps=0.3, kl_w=1.0, seed=7)
    got = advlab_step(model, batch, schedule=schedule, preset="paper", steps=3, mode=mode, step_size=0.2, radius=0.3,
                      generator=torch.Generator().manual_seed(7))
    assert_grads_equal(got, ref)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_an_unmasked_loop_gives_other_gradients(schedule):
    """Sanity: on this model, ignoring the mask changes the gradients by far more than the tolerance."""
    model = TinySumVL().double()
    ids, img, tm, im, y = batch = tiny_batch()
    ref = official_loop(model, batch, K=3, mode="joint", lr=0.3, kl_w=1.5)
    everything = torch.ones_like(tm), torch.ones_like(im)
    unmasked = official_loop(model, (ids, img, *everything, y), K=3, mode="joint", lr=0.3, kl_w=1.5)
    assert max((ref[n] - unmasked[n]).abs().max().item() for n in ref) > 1e-4


# ---------------------------------------------------------------------------------------------- FreeLB, SMART


def freelb_loop(model, batch, *, K, lr, init_mag, norm, max_norm, seed):
    """Hugging Face FreeLB on the text modality, with the mask applied to the gradient and the step."""
    ids, img, tm, im, y = batch
    model.zero_grad()
    gen = torch.Generator().manual_seed(seed)
    shape = (*ids.shape, model.word.embedding_dim)
    u = torch.rand(shape, generator=gen, dtype=torch.float64)
    if norm == "l2":
        n = tm.sum(1).to(torch.float64) * shape[-1]
        delta = (2 * u - 1) * tm.unsqueeze(-1) * (init_mag / n.sqrt()).view(-1, 1, 1)
    else:
        delta = (2 * u - 1) * init_mag * tm.unsqueeze(-1)
    for k in range(K):
        delta.requires_grad_()
        (F.cross_entropy(model(ids, img, tm, im, delta, None), y) / K).backward()
        if k == K - 1:
            break
        delta = _masked_step(delta, delta.grad, tm, lr=lr, norm=norm, max_norm=max_norm)
    return grads(model)


@pytest.mark.parametrize("norm,max_norm", [("l2", 0.0), ("l2", 0.15), ("linf", 0.0), ("linf", 0.04)])
def test_freelb_with_padding_matches_the_masked_loop(norm, max_norm):
    model = TinySumVL().double()
    ids, img, tm, im, y = batch = tiny_batch()
    ref = freelb_loop(model, batch, K=3, lr=0.1, init_mag=0.2, norm=norm, max_norm=max_norm, seed=3)
    model.zero_grad()
    freelb = advlab.FreeLB(model, {"txt": "word"}, steps=3, step_size=0.1, init_magnitude=0.2, norm=norm,
                           radius=max_norm or None, generator=torch.Generator().manual_seed(3))
    freelb.step(lambda: model(ids, img, tm, im), lambda out: F.cross_entropy(out, y), masks={"txt": tm})
    assert_grads_equal(grads(model), ref)


def smart_loop(model, batch, *, K, lr, std, eps, weight, seed):
    """mt-dnn's SMART with a plain KL, the mask applied to the noise and to each δ-only step."""
    ids, img, tm, im, y = batch
    model.zero_grad()
    gen = torch.Generator().manual_seed(seed)
    m = tm.unsqueeze(-1).to(torch.float64)
    noise = torch.randn(*ids.shape, model.word.embedding_dim, generator=gen, dtype=torch.float64) * std * m
    clean = model(ids, img, tm, im)
    for _ in range(K):
        noise.requires_grad_()
        adv = model(ids, img, tm, im, noise, None)
        kl = F.kl_div(F.log_softmax(adv, -1), F.softmax(clean.detach(), -1), reduction="none").sum(-1).mean()
        (gr,) = torch.autograd.grad(kl, noise)
        s = (noise + lr * gr * m).detach()
        noise = s / (s.abs().amax(-1, keepdim=True) + eps) * m
    adv = model(ids, img, tm, im, noise, None)
    sym = (F.kl_div(F.log_softmax(adv, -1), F.softmax(clean.detach(), -1), reduction="none").sum(-1).mean()
           + F.kl_div(F.log_softmax(clean, -1), F.softmax(adv.detach(), -1), reduction="none").sum(-1).mean())
    (F.cross_entropy(clean, y) + weight * sym).backward()
    return grads(model)


@pytest.mark.parametrize("steps", [1, 2])
def test_smart_with_padding_matches_the_masked_loop(steps):
    model = TinySumVL().double()
    ids, img, tm, im, y = batch = tiny_batch()
    ref = smart_loop(model, batch, K=steps, lr=0.3, std=0.1, eps=1e-6, weight=2.0, seed=5)
    model.zero_grad()
    smart = advlab.SMART(model, {"txt": "word"}, steps=steps, step_size=0.3, noise_std=0.1, weight=2.0,
                         generator=torch.Generator().manual_seed(5))
    smart.step(lambda: model(ids, img, tm, im), lambda out: F.cross_entropy(out, y), masks={"txt": tm})
    assert_grads_equal(grads(model), ref)
