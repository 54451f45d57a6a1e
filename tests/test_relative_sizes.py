"""Relative perturbation sizes: step and radius in units of the clean embedding's norm per row.

A hand-written float64 loop of VILLA's equations with η·||x_row|| and ε·||x_row|| pins the
engine (1e-10); hypothesis properties pin the step's norm, the ball, the masks and the
zero-δ control for every norm.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import advlab
from tests.strategies import generator, masks, norms, seeds
from tests.tiny_models import TinyVL, grads, plain_symkl, tiny_batch

SITES = {"txt": "word", "img": advlab.Site("img_proj", where="input")}


def clean_scale(x, mask, norm):
    """||x_row|| over real positions (per position for l2_token), written out: [b, 1, 1] or [b, n, 1]."""
    x = x * mask.unsqueeze(-1).to(x.dtype)
    b = x.shape[0]
    if norm == "l2":
        return x.reshape(b, -1).pow(2).sum(1).sqrt().view(-1, 1, 1)
    if norm == "linf":
        return x.reshape(b, -1).abs().max(1).values.view(-1, 1, 1)
    return x.pow(2).sum(-1, keepdim=True).sqrt()


def relative_loop(model, batch, *, K, mode, lr, kl_w, norm, radius=None):
    """VILLA's official loop (clean forward kept, K backwards) with η and ε times the clean row norm."""
    ids, img, tm, im, y = batch
    model.zero_grad()
    with torch.no_grad():
        s_t, s_i = clean_scale(model.word(ids), tm, norm), clean_scale(img, im, norm)
    d_t = torch.zeros(*ids.shape, model.word.embedding_dim, dtype=img.dtype)
    d_i = torch.zeros_like(img)
    clean = model(ids, img, tm, im)
    for k in range(K):
        d_t.requires_grad_()
        d_i.requires_grad_()
        if mode == "joint":
            out = model(ids, img, tm, im, d_t, d_i)
            loss = (F.cross_entropy(out, y) + kl_w * plain_symkl(out, clean)) / K
        else:
            o1, o2 = model(ids, img, tm, im, d_t, None), model(ids, img, tm, im, None, d_i)
            loss = (F.cross_entropy(o1, y) + F.cross_entropy(o2, y)
                    + kl_w * (plain_symkl(o1, clean) + plain_symkl(o2, clean))) / (2 * K)
        loss.backward(retain_graph=True)
        if k == K - 1:
            break
        new = []
        for d, s, m in ((d_t, s_t, tm), (d_i, s_i, im)):
            g = d.grad * m.unsqueeze(-1).to(d.dtype)
            b = g.shape[0]
            if norm == "l2":
                size = g.reshape(b, -1).pow(2).sum(1).sqrt().view(-1, 1, 1)
            elif norm == "linf":
                size = g.reshape(b, -1).abs().max(1).values.view(-1, 1, 1)
            else:
                size = g.pow(2).sum(-1, keepdim=True).sqrt()
            d = d.detach() + lr * s * g / size.clamp(min=1e-8)
            if radius is not None:
                r = radius * s
                if norm == "linf":
                    d = torch.maximum(torch.minimum(d, r), -r)
                else:
                    dn = (d.reshape(b, -1).pow(2).sum(1).sqrt().view(-1, 1, 1) if norm == "l2"
                          else d.pow(2).sum(-1, keepdim=True).sqrt())
                    d = torch.where(dn > r, d * r / dn, d)
            new.append(d.detach())
        d_t, d_i = new
    return grads(model)


def villa_step(model, batch, perturbation, **kwargs):
    ids, img, tm, im, y = batch
    model.zero_grad()
    villa = advlab.VILLA(model, sites=SITES, perturbations={"txt": perturbation, "img": perturbation}, **kwargs)
    stats = villa.step(lambda: model(ids, img, tm, im), lambda out: F.cross_entropy(out, y),
                       masks={"txt": tm, "img": im})
    return grads(model), stats


@pytest.mark.parametrize("norm,radius", [("l2", None), ("l2", 0.03), ("linf", 0.02), ("l2_token", None),
                                         ("l2_token", 0.05)])
@pytest.mark.parametrize("mode", ["joint", "alter"])
def test_relative_villa_matches_hand_written_loop(mode, norm, radius):
    """Fails if the scale is dropped, measured with padding counted, or applied to the step but not the ball."""
    model = TinyVL().double()
    batch = tiny_batch()
    ref = relative_loop(model, batch, K=3, mode=mode, lr=0.02, kl_w=1.5, norm=norm, radius=radius)
    pert = advlab.Perturbation(step_size=0.02, radius=radius, norm=norm, relative=True)
    got, _ = villa_step(model, batch, pert, steps=3, mode=mode, kl_weight=1.5)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=0, atol=1e-10, msg=lambda m, n=n: f"{n}: {m}")
    absolute, _ = villa_step(model, batch, dataclasses.replace(pert, relative=False), steps=3, mode=mode,
                             kl_weight=1.5)
    assert max((absolute[n] - got[n]).abs().max().item() for n in got) > 1e-6  # the scale matters here


def one_update(x, mask, norm, step_size, radius=None, steps=2, init=None):
    """δ after `steps - 1` updates of free_training at the input of a linear layer with clean input x."""
    torch.manual_seed(0)
    layer = nn.Linear(x.shape[-1], 3).double()
    w = torch.randn(3, dtype=torch.float64, generator=generator(1))
    pert = advlab.Perturbation(step_size=step_size, radius=radius, norm=norm, relative=True,
                               init=init or advlab.ZeroSampler())
    with advlab.free_training(layer, {"x": advlab.Site(layer, where="input")}, {"x": pert}, steps=steps,
                              masks=None if mask is None else {"x": mask}, generator=generator(2)) as ft:
        for _ in ft:
            ft.backward((ft.forward(lambda: layer(x)) * w).sum())
        return ft.deltas("x")[0].detach(), ft._hooks.scales("x")[0]


@st.composite
def site_inputs(draw):
    """(x [b, n, d] float64, mask [b, n]) with rows of very different sizes."""
    shape = (draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 6)))
    seed = draw(seeds)
    row_size = 10.0 ** torch.empty(shape[0], 1, 1, dtype=torch.float64).uniform_(-3, 3, generator=generator(seed))
    x = torch.randn(shape, dtype=torch.float64, generator=generator(seed + 1)) * row_size
    return x, draw(masks(shape))


def ref_norms(x, mask, norm):
    """Per row ([b]) or per position ([b, n]) norm over real elements."""
    return clean_scale(x, mask, norm).squeeze(-1).squeeze(-1) if norm != "l2_token" else clean_scale(x, mask, norm)[..., 0]


@settings(max_examples=60, deadline=None)
@given(data=site_inputs(), norm=norms, eta=st.floats(1e-5, 1.0))
def test_a_step_has_norm_eta_times_the_clean_row_norm(data, norm, eta):
    """Fails if the step is absolute, if the scale counts masked positions, or if masked positions move."""
    x, mask = data
    delta, _ = one_update(x, mask, norm, eta)
    torch.testing.assert_close(ref_norms(delta, mask, norm), eta * ref_norms(x, mask, norm), rtol=1e-12, atol=0)
    assert torch.equal(delta[~mask], torch.zeros_like(delta[~mask]))  # masked positions are not perturbed


@settings(max_examples=60, deadline=None)
@given(data=site_inputs(), norm=norms, eta=st.floats(1e-3, 10.0), eps=st.floats(1e-3, 1.0))
def test_delta_stays_inside_the_relative_ball(data, norm, eta, eps):
    """Fails if the radius is absolute or scaled differently from the step."""
    x, mask = data
    delta, _ = one_update(x, mask, norm, eta, radius=eps, steps=4)
    assert (ref_norms(delta, mask, norm) <= eps * ref_norms(x, mask, norm) * (1 + 1e-12)).all()


@settings(max_examples=40, deadline=None)
@given(data=site_inputs(), norm=norms, c=st.floats(1e-3, 1e3))
def test_the_step_scales_with_the_embedding(data, norm, c):
    """pgd_step with scale c·s is c times the step with scale s (relative sizes transfer across scales)."""
    x, mask = data
    s = advlab.embedding_scale(x, norm, mask=mask)
    g = torch.randn(x.shape, dtype=torch.float64, generator=generator(3))
    d0 = advlab.ascent.pgd_step(torch.zeros_like(x), g, step_size=0.1, norm=norm, radius=0.05, mask=mask, scale=s)
    d1 = advlab.ascent.pgd_step(torch.zeros_like(x), g, step_size=0.1, norm=norm, radius=0.05, mask=mask, scale=c * s)
    torch.testing.assert_close(d1, c * d0, rtol=1e-12, atol=1e-300)


@settings(max_examples=30, deadline=None)
@given(data=site_inputs(), norm=norms)
def test_zero_step_keeps_delta_exactly_zero(data, norm):
    """The zero-δ control stays a zero-δ control with relative sizes."""
    x, mask = data
    delta, _ = one_update(x, mask, norm, 0.0, radius=0.1, steps=3)
    assert torch.equal(delta, torch.zeros_like(delta))


def test_a_zero_row_gets_no_perturbation_and_no_nan():
    x = torch.randn(3, 4, 5, dtype=torch.float64, generator=generator(0))
    x[1] = 0.0
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[2] = False  # a row with no real position: its scale is 0 too
    for norm in ("l2", "l2_token", "linf"):
        delta, _ = one_update(x, mask, norm, 0.1, radius=0.5)
        assert torch.isfinite(delta).all()
        assert torch.equal(delta[1:], torch.zeros_like(delta[1:]))
        assert (delta[0].abs() > 0).any()


def test_the_scale_is_measured_on_the_clean_input_before_delta():
    """With K=4 steps the scale stays the clean norm, not the norm of x + δ seen at later forwards."""
    x = torch.randn(2, 3, 4, dtype=torch.float64, generator=generator(0))
    _, scale = one_update(x, None, "l2", 0.5, steps=4)
    torch.testing.assert_close(scale, clean_scale(x, torch.ones(2, 3, dtype=torch.bool), "l2"), rtol=1e-14, atol=0)


def test_sampler_draw_is_in_units_of_the_clean_norm():
    """SphereSampler(r) under relative sizes starts at norm r·||x_row||; fails if the draw is not scaled."""
    x = torch.randn(3, 4, 5, dtype=torch.float64, generator=generator(0)) * torch.tensor([1e-2, 1.0, 1e2]).view(3, 1, 1)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[0, 2:] = False
    delta, _ = one_update(x, mask, "l2", 0.0, steps=1, init=advlab.SphereSampler(0.1))
    torch.testing.assert_close(ref_norms(delta, mask, "l2"), 0.1 * ref_norms(x, mask, "l2"), rtol=1e-12, atol=0)


def test_scale_for_and_embedding_scale():
    x = torch.tensor([[[3.0, 4.0], [6.0, 8.0]]])
    mask = torch.tensor([[True, False]])
    assert advlab.Perturbation(relative=False).scale_for(x) is None
    assert advlab.Perturbation(norm="linf", relative=True).scale_for(x, mask=mask).item() == 4.0
    assert advlab.embedding_scale(x, "l2").item() == pytest.approx(125 ** 0.5)
    assert advlab.embedding_scale(x.bfloat16(), "l2").dtype == torch.float32


def test_bad_scale_and_relative_flag_are_refused():
    with pytest.raises(advlab.AdvlabTypeError, match="relative"):
        advlab.Perturbation(relative=1)
    delta = torch.zeros(2, 3, 4)
    with pytest.raises(advlab.AdvlabValueError, match=r"`scale`.*\(2,\).*got \(3,\)"):
        advlab.ascent.pgd_step(delta, torch.ones_like(delta), step_size=0.1, scale=torch.ones(3))
    with pytest.raises(advlab.AdvlabValueError, match="finite and >= 0"):
        advlab.ascent.pgd_step(delta, torch.ones_like(delta), step_size=0.1, scale=-torch.ones(2))


def test_relative_sizes_with_an_ascender_without_scale_are_refused():
    layer = nn.Linear(4, 2)
    pert = advlab.Perturbation(step_size=1e-3, relative=True)
    with pytest.raises(advlab.AdvlabValueError, match=r"ascender of modality 'x'.*scale=.*SMARTAscender"):
        advlab.free_training(layer, {"x": advlab.Site(layer, where="input")}, {"x": pert},
                             ascender=advlab.SMARTAscender())


@pytest.mark.parametrize("norm", ["l2", "l2_token", "linf"])
def test_zero_relative_step_is_bit_identical_to_the_zero_delta_control(norm):
    """relative=True with η = 0 is the same loop as absolute η = 0: the scale adds nothing but δ = 0."""
    model = TinyVL().double()
    batch = tiny_batch()
    rel, _ = villa_step(model, batch, advlab.Perturbation(0.0, radius=0.1, norm=norm, relative=True), steps=3,
                        mode="alter", kl_weight=1.5)
    ab, _ = villa_step(model, batch, advlab.Perturbation(0.0, radius=0.1, norm=norm), steps=3, mode="alter",
                       kl_weight=1.5)
    assert all(torch.equal(rel[n], ab[n]) for n in ab)
