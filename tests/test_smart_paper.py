"""SMART's two presets: the paper's Algorithm 1 against a hand-written float64 loop, and what sets
them apart (δ's size follows `radius` in the paper's version; it is about 1 per position in mt-dnn's)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import advlab
from tests.test_villa_exact import assert_grads_equal
from tests.tiny_models import TinyVL, grads, plain_symkl, tiny_batch


def smart_paper_loop(model, batch, *, K, lr, std, radius, weight, seed):
    """SMART, Jiang et al. 2020, Algorithm 1 (one mini-batch, no Bregman term): ν ~ N(0, σ²) on the text
    embedding; K times g = ∇ℓ_s(f(x), f(x + ν)), ν ← clamp(ν + η g / max|g| over the row, -ε, ε); then
    task(clean) + w · ℓ_s(f(x), f(x + ν)) back-propagated through both sides."""
    ids, img, tm, im, y = batch
    model.zero_grad()
    g = torch.Generator().manual_seed(seed)
    shape = (*ids.shape, model.word.embedding_dim)
    noise = torch.randn(shape, generator=g, dtype=torch.float64) * std * tm.unsqueeze(-1)
    clean = model(ids, img, tm, im)
    for _ in range(K):
        noise.requires_grad_()
        adv = model(ids, img, tm, im, noise, None)
        (gr,) = torch.autograd.grad(plain_symkl(adv, clean.detach()), noise)
        step = gr / gr.flatten(1).abs().amax(1).clamp(min=1e-8).view(-1, 1, 1)
        noise = (noise + lr * step).clamp(-radius, radius).detach()
    adv = model(ids, img, tm, im, noise, None)
    (F.cross_entropy(clean, y) + weight * plain_symkl(adv, clean)).backward()
    return grads(model), noise


@pytest.mark.parametrize("steps,radius", [(1, 0.05), (2, 0.05), (2, 10.0)])
def test_smart_paper_matches_hand_written_loop(steps, radius):
    """Fails if the paper preset normalises the sum (mt-dnn), skips the projection, normalises per position,
    or detaches a side of the final symmetric KL."""
    model = TinyVL().double()
    ids, img, tm, im, y = batch = tiny_batch()
    ref, ref_noise = smart_paper_loop(model, batch, K=steps, lr=0.3, std=0.02, radius=radius, weight=2.0, seed=5)
    model.zero_grad()
    smart = advlab.SMART(model, {"txt": "word"}, preset="paper", steps=steps, step_size=0.3, noise_std=0.02,
                         radius=radius, weight=2.0, generator=torch.Generator().manual_seed(5))
    stats = smart.step(lambda: model(ids, img, tm, im), lambda out: F.cross_entropy(out, y), masks={"txt": tm})
    assert_grads_equal(grads(model), ref, atol=1e-10)
    norm = (ref_noise.flatten(1).abs().amax(1)).mean().item()
    assert stats.delta_norm["txt"] == pytest.approx(norm, rel=1e-6)  # δ's mean per-row L2 is reported
    if radius < 1:
        assert ref_noise.abs().max().item() == pytest.approx(radius)  # the projection was active


def test_delta_size_follows_radius_in_paper_and_not_in_mt_dnn():
    """mt-dnn's normalisation makes every position of δ max-abs ~1 whatever the step size; the paper's
    projection keeps it within ε."""
    model = TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
    seen = {}
    for preset, kw in [("mt-dnn", {"step_size": 1e-5}), ("paper", {"radius": 1e-3})]:
        smart = advlab.SMART(model, {"txt": "word"}, preset=preset, generator=torch.Generator().manual_seed(0), **kw)
        with smart._context({"txt": tm}) as ft:
            clean = ft.clean(lambda: model(ids, img, tm, im))
            ft.clean_loss(F.cross_entropy(clean, y))
            ft.ascend(smart._ascent_loss(ft.clean_logits, ft.forward(lambda: model(ids, img, tm, im))))
            seen[preset] = ft.deltas("txt")[0].abs().amax(-1)[tm]
            for _ in ft:
                ft.backward(F.cross_entropy(ft.forward(lambda: model(ids, img, tm, im)), y))
    assert seen["mt-dnn"].min().item() > 0.8  # noise 1e-5 over (1e-5 + eps 1e-6): about 0.9
    assert seen["paper"].max().item() <= 1e-3 + 1e-9


def test_preset_arguments_are_not_mixed():
    model = TinyVL()
    with pytest.raises(advlab.AdvlabValueError, match="radius.*mt-dnn"):
        advlab.SMART(model, {"txt": "word"}, radius=0.1)
    with pytest.raises(advlab.AdvlabValueError, match="eps.*paper"):
        advlab.SMART(model, {"txt": "word"}, preset="paper", eps=1e-6)
    with pytest.raises(advlab.AdvlabValueError, match="preset"):
        advlab.SMART(model, {"txt": "word"}, preset="alum")
    with pytest.raises(advlab.AdvlabValueError, match="regularizer.*distribution"):
        advlab.SMART(model, {"txt": "word"}, regularizer=advlab.symmetric_kl, distribution="sigmoid")
    with pytest.raises(advlab.AdvlabValueError, match="ascender.*step_size"):
        advlab.SMART(model, {"txt": "word"}, ascender=advlab.ascent.PGDAscender(0.1), step_size=0.1)


def test_injected_regularizer_is_ascended_and_added():
    """regularizer= replaces both the ascended loss (clean side detached) and the final term."""
    model = TinyVL().double()
    ids, img, tm, im, y = batch = tiny_batch()
    ref, _ = smart_paper_loop(model, batch, K=2, lr=0.3, std=0.02, radius=0.05, weight=1.0, seed=5)
    model.zero_grad()
    calls = []

    def reg(clean, adv):
        calls.append(clean.requires_grad)
        return plain_symkl(adv, clean)

    smart = advlab.SMART(model, {"txt": "word"}, preset="paper", steps=2, step_size=0.3, noise_std=0.02, radius=0.05,
                         regularizer=reg, generator=torch.Generator().manual_seed(5))
    smart.step(lambda: model(ids, img, tm, im), lambda out: F.cross_entropy(out, y), masks={"txt": tm})
    assert calls == [False, False, True]
    assert_grads_equal(grads(model), ref, atol=1e-10)
