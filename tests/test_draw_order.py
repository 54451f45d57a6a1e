"""δ₀ is drawn in the sites' order, not in the order the model runs the sites (float64).

`ImgFirstVL` runs the image site before the text site while the sites are listed
{"txt": ..., "img": ...}. Recipes with a clean forward (TRADES, VILLA; also SMART, VAT,
R3F) know every site's shape before the first perturbed forward and draw every δ₀ there in
the listed order; the references below draw with plain torch.rand / torch.randn from the
same generator in the listed order (masked positions zero) and must give the same
parameter gradients. FreeLB's first forward is perturbed (no clean forward): in "alter"
mode each forward draws one modality, in the listed order; in "joint" mode a model that
runs a later-listed site first draws in the order it runs the sites and warns (the
documented limitation, pinned here).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import advlab
from tests.test_new_recipes_exact import _kl, _normalize, _project
from tests.test_villa_exact import assert_grads_equal
from tests.tiny_models import TinyVL, grads, plain_symkl, tiny_batch

SITES = {"txt": "word", "img": advlab.Site("img_proj", where="input")}  # listed: txt, then img
F64 = torch.float64
LISTED = ("txt", "img")
MODEL_ORDER = ("img", "txt")


class ImgFirstVL(TinyVL):
    """TinyVL whose forward runs the img site (img_proj's input) before the txt site (word's output)."""

    def forward(self, ids, img, txt_mask, img_mask, delta_txt=None, delta_img=None):
        if delta_img is not None:
            img = img + delta_img
        v = self.img_proj(img)  # the img site runs first
        w = self.word(ids)
        if delta_txt is not None:
            w = w + delta_txt
        x = torch.cat([w, v], dim=1)
        m = torch.cat([txt_mask, img_mask], dim=1).to(x.dtype).unsqueeze(-1)
        h = self.drop(torch.tanh(self.mix(x)))
        pooled = (h * m).sum(1) / m.sum(1)
        return self.head(torch.tanh(pooled) + pooled)


def _call(model, batch, deltas=None):
    ids, img, tm, im, _y = batch
    deltas = deltas or {}
    return model(ids, img, tm, im, deltas.get("txt"), deltas.get("img"))


def _draws(model, batch, seed, order, kind, size):
    """δ₀ per modality drawn with plain torch calls from one generator in `order`, masked positions 0."""
    ids, img, tm, im, _y = batch
    g = torch.Generator().manual_seed(seed)
    shapes = {"txt": (*ids.shape, model.word.embedding_dim), "img": tuple(img.shape)}
    masks = {"txt": tm, "img": im}
    out = {}
    for m in order:
        mask = masks[m].unsqueeze(-1)
        if kind == "normal":  # TRADES: 0.001 · N(0, 1)
            out[m] = size * torch.randn(shapes[m], generator=g, dtype=F64) * mask
        else:  # VILLA paper / FreeLB L2: U(-m, m) / sqrt(N), N = unmasked elements of the row
            u = torch.rand(shapes[m], generator=g, dtype=F64)
            n = masks[m].sum(1).to(F64) * shapes[m][-1]
            out[m] = (2 * u - 1) * mask * (size / n.sqrt()).view(-1, 1, 1)
    return out


def trades_ref(model, batch, d0, *, K, eta, radius, norm, beta):
    """TRADES (issue 14) from given δ₀: K δ-only steps on KL(sg p(x) ‖ p(x+δ)), then CE + β KL."""
    y = batch[-1]
    model.zero_grad()
    deltas = dict(d0)
    clean = _call(model, batch)
    for _ in range(K):
        deltas = {m: d.detach().requires_grad_() for m, d in deltas.items()}
        adv = _call(model, batch, deltas)
        gs = torch.autograd.grad(_kl(clean.detach(), adv), list(deltas.values()))
        deltas = {m: _project(d.detach() + eta * _normalize(gr, norm), norm, radius)
                  for (m, d), gr in zip(deltas.items(), gs)}
    (F.cross_entropy(clean, y) + beta * _kl(clean, _call(model, batch, deltas))).backward()
    return grads(model)


def villa_paper_ref(model, batch, d0, *, K, mode, lr, eps, kl_w):
    """VILLA Algorithm 1 (as tests/test_villa_exact.py::paper_loop) from given δ₀."""
    y = batch[-1]
    model.zero_grad()
    deltas = dict(d0)
    clean = _call(model, batch)
    clean_loss = F.cross_entropy(clean, y)
    groups = [["txt"], ["img"]] if mode == "alter" else [["txt", "img"]]
    for _ in range(K):
        for d in deltas.values():
            d.requires_grad_()
        total = clean_loss
        for grp in groups:
            out = _call(model, batch, {m: deltas[m] for m in grp})
            total = total + F.cross_entropy(out, y) + kl_w * plain_symkl(out, clean)
        (total / K).backward(retain_graph=True)
        for m, d in deltas.items():
            step = d + lr * d.grad / d.grad.flatten(1).norm(dim=1).clamp_min(1e-8).view(-1, 1, 1)
            nrm = step.flatten(1).norm(dim=1).view(-1, 1, 1)
            deltas[m] = torch.where(nrm > eps, step * eps / nrm, step).detach()
    return grads(model)


def freelb_ref(model, batch, d0, *, K, mode, lr):
    """FreeLB L2, unbounded, from given δ₀: K forwards, (Σ CE) / (K · forwards per step), normalised steps."""
    y = batch[-1]
    model.zero_grad()
    deltas = dict(d0)
    groups = [["txt"], ["img"]] if mode == "alter" else [["txt", "img"]]
    for k in range(K):
        for d in deltas.values():
            d.requires_grad_()
        total = sum(F.cross_entropy(_call(model, batch, {m: deltas[m] for m in grp}), y) for grp in groups)
        (total / (K * len(groups))).backward()
        if k == K - 1:
            break
        deltas = {m: (d + lr * d.grad / d.grad.flatten(1).norm(dim=1).clamp_min(1e-8).view(-1, 1, 1)).detach()
                  for m, d in deltas.items()}
    return grads(model)


def _step(recipe, model, batch):
    ids, img, tm, im, y = batch
    model.zero_grad()
    recipe.step(lambda: model(ids, img, tm, im), lambda out: F.cross_entropy(out, y), masks={"txt": tm, "img": im})
    return grads(model)


def _differ(a, b):
    return max(float((a[n] - b[n]).abs().max()) for n in a)


MODELS = [pytest.param(TinyVL, id="listed-order-model"), pytest.param(ImgFirstVL, id="img-first-model")]


@pytest.mark.parametrize("cls", MODELS)
@pytest.mark.parametrize("steps,norm,radius", [(1, "l2", None), (3, "l2", 0.05), (3, "linf", 0.02)])
def test_trades_draws_in_listed_order(cls, steps, norm, radius):
    """Kills: δ₀ drawn lazily at each site's first call (img first on ImgFirstVL: gradients differ ~1e-4)."""
    model, batch = cls().double(), tiny_batch()
    kw = {"K": steps, "eta": 0.04, "radius": radius, "norm": norm, "beta": 6.0}
    ref = trades_ref(model, batch, _draws(model, batch, 8, LISTED, "normal", 0.001), **kw)
    swapped = trades_ref(model, batch, _draws(model, batch, 8, MODEL_ORDER, "normal", 0.001), **kw)
    assert _differ(ref, swapped) > 1e-7  # the draw order is visible in the gradients
    trades = advlab.TRADES(model, SITES, steps=steps, step_size=0.04, radius=radius, norm=norm, beta=6.0,
                           generator=torch.Generator().manual_seed(8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean forward precedes: no draw-order warning
        got = _step(trades, model, batch)
    assert_grads_equal(got, ref, atol=1e-10)


@pytest.mark.parametrize("cls", MODELS)
@pytest.mark.parametrize("mode", ["joint", "alter"])
def test_villa_paper_random_init_draws_in_listed_order(cls, mode):
    """VILLA's paper preset (δ₀ = U(-ε, ε)/√N). Kills the lazy draw in "joint" mode on ImgFirstVL."""
    model, batch = cls().double(), tiny_batch()
    kw = {"K": 3, "mode": mode, "lr": 0.2, "eps": 0.3, "kl_w": 1.0}
    ref = villa_paper_ref(model, batch, _draws(model, batch, 7, LISTED, "uniform", 0.3), **kw)
    swapped = villa_paper_ref(model, batch, _draws(model, batch, 7, MODEL_ORDER, "uniform", 0.3), **kw)
    assert _differ(ref, swapped) > 1e-7
    villa = advlab.VILLA(model, SITES, preset="paper", steps=3, mode=mode, step_size=0.2, radius=0.3,
                         generator=torch.Generator().manual_seed(7))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _step(villa, model, batch)
    assert_grads_equal(got, ref, atol=1e-10)


@pytest.mark.parametrize("schedule", ["deferred", "retain", "lean"])
def test_free_training_draws_in_listed_order(schedule):
    """free_training with ft.clean (the "lean" schedule's clean forward runs without gradients): the δ₀ of the
    first perturbed forward equal plain torch.randn draws in the listed order."""
    model, batch = ImgFirstVL().double(), tiny_batch()
    ids, img, tm, im, y = batch
    pert = advlab.Perturbation(step_size=0.1, init=advlab.NormalSampler(0.05))
    with advlab.free_training(model, SITES, {"txt": pert, "img": pert}, masks={"txt": tm, "img": im},
                              schedule=schedule, generator=torch.Generator().manual_seed(4)) as ft:
        ft.clean(lambda: model(ids, img, tm, im))
        for _ in ft:
            out = ft.forward(lambda: model(ids, img, tm, im))
            got = {m: ft.deltas(m)[0].detach().clone() for m in LISTED}
            ft.backward(F.cross_entropy(out, y))
    want = _draws(model, batch, 4, LISTED, "normal", 0.05)
    for m in LISTED:
        torch.testing.assert_close(got[m], want[m], rtol=0, atol=0)


@pytest.mark.parametrize("cls", MODELS)
def test_freelb_alter_draws_in_listed_order(cls):
    """No clean forward, but one modality per forward, in the listed order."""
    model, batch = cls().double(), tiny_batch()
    ref = freelb_ref(model, batch, _draws(model, batch, 3, LISTED, "uniform", 0.2), K=3, mode="alter", lr=0.1)
    freelb = advlab.FreeLB(model, SITES, steps=3, step_size=0.1, init_magnitude=0.2, mode="alter",
                           generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _step(freelb, model, batch)
    assert_grads_equal(got, ref, atol=1e-10)


def test_freelb_joint_listed_order_model_draws_in_listed_order():
    model, batch = TinyVL().double(), tiny_batch()
    ref = freelb_ref(model, batch, _draws(model, batch, 3, LISTED, "uniform", 0.2), K=3, mode="joint", lr=0.1)
    freelb = advlab.FreeLB(model, SITES, steps=3, step_size=0.1, init_magnitude=0.2, mode="joint",
                           generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _step(freelb, model, batch)
    assert_grads_equal(got, ref, atol=1e-10)


def test_freelb_joint_img_first_model_is_the_documented_limitation():
    """No forward before the first perturbed one records the txt shape: img's δ₀ is drawn at its call, first,
    and SiteHooks warns once per site. Pinned so that a change of this behaviour is noticed."""
    model, batch = ImgFirstVL().double(), tiny_batch()
    ref = freelb_ref(model, batch, _draws(model, batch, 3, MODEL_ORDER, "uniform", 0.2), K=3, mode="joint", lr=0.1)
    freelb = advlab.FreeLB(model, SITES, steps=3, step_size=0.1, init_magnitude=0.2, mode="joint",
                           generator=torch.Generator().manual_seed(3))
    with pytest.warns(RuntimeWarning, match=r"modality 'img' .* drawn before that of 'txt'.*List the sites"):
        got = _step(freelb, model, batch)
    assert_grads_equal(got, ref, atol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per site
        _step(freelb, model, batch)


def test_freelb_joint_zero_init_does_not_warn():
    model, batch = ImgFirstVL().double(), tiny_batch()
    freelb = advlab.FreeLB(model, SITES, steps=2, step_size=0.1, mode="joint")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step(freelb, model, batch)


def test_site_hooks_draw_ahead_after_a_clean_forward():
    """SiteHooks directly: a clean forward records the shapes; a perturbed forward that needs only img draws
    txt's δ₀ first, as txt is listed before it."""
    model, batch = ImgFirstVL().double(), tiny_batch()
    ids, img, tm, im, _y = batch
    pert = advlab.Perturbation(init=advlab.NormalSampler(1.0))
    hooks = advlab.hooks.SiteHooks(model, SITES, {"txt": pert, "img": pert}, masks={"txt": tm, "img": im},
                                   generator=torch.Generator().manual_seed(0))
    hooks.install()
    try:
        hooks.run(lambda: model(ids, img, tm, im))
        assert hooks.deltas("txt") == [None] and hooks.deltas("img") == [None]
        hooks.run(lambda: model(ids, img, tm, im), active=("img",))  # needs img; txt is listed before it
        got = {m: hooks.deltas(m)[0] for m in LISTED}
    finally:
        hooks.remove()
    want = _draws(model, batch, 0, LISTED, "normal", 1.0)
    for m in LISTED:
        torch.testing.assert_close(got[m], want[m], rtol=0, atol=0)


class TwoCallVL(nn.Module):
    """The txt site (word) runs twice, with the img site between its calls: word, img_proj, word."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.word = nn.Embedding(13, 4)
        self.img_proj = nn.Linear(5, 4)

    def forward(self, ids, img):
        return torch.cat([self.word(ids), self.img_proj(img), self.word(ids.flip(1))], dim=1).sum()


def test_site_with_two_calls_draws_call_0_then_call_1_then_the_next_modality():
    """Sites' order is per modality, call 0, 1, ... (the random directions' order): txt[0], txt[1], img.
    Kills the lazy draw, which follows the calls: txt[0], img, txt[1]."""
    model = TwoCallVL().double()
    ids, img = torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.randn(2, 2, 5, dtype=F64)
    sites = {"txt": advlab.Site("word", calls=2), "img": advlab.Site("img_proj", where="input")}
    pert = advlab.Perturbation(init=advlab.NormalSampler(1.0))
    hooks = advlab.hooks.SiteHooks(model, sites, {"txt": pert, "img": pert}, generator=torch.Generator().manual_seed(0))
    hooks.install()
    try:
        hooks.run(lambda: model(ids, img))
        hooks.run(lambda: model(ids, img), active=("txt", "img"))
        got = [*hooks.deltas("txt"), *hooks.deltas("img")]
    finally:
        hooks.remove()
    g = torch.Generator().manual_seed(0)
    want = [torch.randn(2, 3, 4, generator=g, dtype=F64), torch.randn(2, 3, 4, generator=g, dtype=F64),
            torch.randn(2, 2, 5, generator=g, dtype=F64)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
