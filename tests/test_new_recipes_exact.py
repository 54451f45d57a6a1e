"""R3F, NEFTune, TRADES, VAT/ALUM and FastAT against plain hand-written loops of their equations (float64),
plus properties: zero size equals plain training, masks, bounds, no hooks left, non-finite rule, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import advlab
from tests.test_villa_exact import assert_grads_equal
from tests.tiny_models import TinyVL, grads, plain_symkl, tiny_batch

SITES = {"txt": "word", "img": advlab.Site("img_proj", where="input")}
F64 = torch.float64


def _masks(batch):
    _ids, _img, tm, im, _y = batch
    return {"txt": tm, "img": im}


def _run(recipe, model, batch):
    ids, img, tm, im, y = batch
    model.zero_grad()
    return recipe.step(lambda: model(ids, img, tm, im), lambda out: F.cross_entropy(out, y), masks=_masks(batch))


def _shapes(model, batch):
    ids, img, _tm, _im, _y = batch
    return (*ids.shape, model.word.embedding_dim), tuple(img.shape)


def _uniform(g, shape, half, mask):
    return (2 * torch.rand(shape, generator=g, dtype=F64) - 1) * half * mask.unsqueeze(-1)


def _kl(p_logits, q_logits):
    """KL(p‖q), batchmean, written with F.kl_div (input log q, target p)."""
    return F.kl_div(F.log_softmax(q_logits, -1), F.softmax(p_logits, -1), reduction="batchmean")


def _row_norm(x, norm):
    flat = x.flatten(1)
    n = flat.norm(dim=1) if norm == "l2" else flat.abs().amax(1)
    return n.view(-1, *([1] * (x.dim() - 1)))


def _plain_grads(model, batch):
    ids, img, tm, im, y = batch
    model.zero_grad()
    F.cross_entropy(model(ids, img, tm, im), y).backward()
    return grads(model)


# ---------------------------------------------------------------------------------------------- R3F
def r3f_loop(model, batch, *, eps, noise, lam, seed, detach=False):
    """fairseq's R3F: noise on the embeddings, CE(clean) + λ · (KL(p‖q) + KL(q‖p)), nothing detached."""
    ids, img, tm, im, y = batch
    model.zero_grad()
    g = torch.Generator().manual_seed(seed)
    st_, si = _shapes(model, batch)
    if noise == "uniform":
        dt, di = _uniform(g, st_, eps, tm), _uniform(g, si, eps, im)
    else:
        dt = torch.randn(st_, generator=g, dtype=F64) * eps * tm.unsqueeze(-1)
        di = torch.randn(si, generator=g, dtype=F64) * eps * im.unsqueeze(-1)
    clean = model(ids, img, tm, im)
    if detach:  # fairseq's sentence criterion: token_embeddings.detach() + noise
        w = model.word(ids)
        dt = dt + (w.detach() - w)
    noised = model(ids, img, tm, im, dt, di)
    (F.cross_entropy(clean, y) + lam * plain_symkl(clean, noised)).backward()
    return grads(model)


@pytest.mark.parametrize("noise", ["uniform", "normal"])
def test_r3f_matches_hand_written_loop(noise):
    model, batch = TinyVL().double(), tiny_batch()
    ref = r3f_loop(model, batch, eps=0.3, noise=noise, lam=1.7, seed=4)
    r3f = advlab.R3F(model, SITES, eps=0.3, noise=noise, weight=1.7, generator=torch.Generator().manual_seed(4))
    _run(r3f, model, batch)
    assert_grads_equal(grads(model), ref, atol=1e-10)


def test_r3f_noised_branch_sends_gradient_to_the_embedding_table():
    """advlab's choice: the noised branch is not detached (unlike fairseq's sentence criterion).
    Kills: a site hook that adds δ to `output.detach()`."""
    model, batch = TinyVL().double(), tiny_batch()
    full = r3f_loop(model, batch, eps=0.5, noise="uniform", lam=3.0, seed=2)
    detached = r3f_loop(model, batch, eps=0.5, noise="uniform", lam=3.0, seed=2, detach=True)
    _run(advlab.R3F(model, SITES, eps=0.5, weight=3.0, generator=torch.Generator().manual_seed(2)), model, batch)
    ours = grads(model)
    torch.testing.assert_close(ours["word.weight"], full["word.weight"], rtol=0, atol=1e-10)
    assert (ours["word.weight"] - detached["word.weight"]).abs().max() > 1e-6


# ---------------------------------------------------------------------------------------------- NEFTune
def neftune_loop(model, batch, *, alpha, seed):
    """NEFTune: δ = U(-1, 1) · α / √(L·d), L = real positions of the row; CE(f(x + δ))."""
    ids, img, tm, im, y = batch
    model.zero_grad()
    g = torch.Generator().manual_seed(seed)
    deltas = []
    for shape, mask in zip(_shapes(model, batch), (tm, im)):
        mag = alpha / (mask.sum(1).to(F64) * shape[-1]).sqrt()
        deltas.append(_uniform(g, shape, 1.0, mask) * mag.view(-1, 1, 1))
    F.cross_entropy(model(ids, img, tm, im, *deltas), y).backward()
    return grads(model)


def test_neftune_matches_hand_written_loop():
    model, batch = TinyVL().double(), tiny_batch()
    ref = neftune_loop(model, batch, alpha=5.0, seed=6)
    _run(advlab.NEFTune(model, SITES, alpha=5.0, generator=torch.Generator().manual_seed(6)), model, batch)
    assert_grads_equal(grads(model), ref, atol=1e-10)


def test_neftune_in_eval_mode_is_plain_training():
    model, batch = TinyVL().double().eval(), tiny_batch()
    stats = _run(advlab.NEFTune(model, SITES, alpha=50.0), model, batch)
    assert_grads_equal(grads(model), _plain_grads(model, batch), atol=0)
    assert stats.delta_norm == {}


# ---------------------------------------------------------------------------------------------- TRADES
def _normalize(g, norm):
    return g / _row_norm(g, norm).clamp(min=1e-8)


def _project(d, norm, radius):
    if radius is None:
        return d
    if norm == "linf":
        return d.clamp(-radius, radius)
    n = _row_norm(d, "l2")
    return torch.where(n > radius, d * (radius / n), d)


def trades_loop(model, batch, *, K, eta, radius, norm, beta, seed, sign=False):
    """TRADES as issue 14 writes it: δ0 = 0.001·randn per modality (sites' order, masked),
    K steps δ ← Π(δ + η normalize(∇δ KL(sg p(x) ‖ p(x+δ)))), CE(clean) + β KL(p(x) ‖ p(x+δ))."""
    ids, img, tm, im, y = batch
    model.zero_grad()
    g = torch.Generator().manual_seed(seed)
    deltas = [0.001 * torch.randn(s, generator=g, dtype=F64) * m.unsqueeze(-1)
              for s, m in zip(_shapes(model, batch), (tm, im))]
    clean = model(ids, img, tm, im)
    for _ in range(K):
        deltas = [d.detach().requires_grad_() for d in deltas]
        adv = model(ids, img, tm, im, *deltas)
        gs = torch.autograd.grad(_kl(clean.detach(), adv), deltas)
        moves = [gr.sign() if sign else _normalize(gr, norm) for gr in gs]
        deltas = [_project(d.detach() + eta * mv, norm, radius) for d, mv in zip(deltas, moves)]
    adv = model(ids, img, tm, im, *deltas)
    (F.cross_entropy(clean, y) + beta * _kl(clean, adv)).backward()
    return grads(model)


@pytest.mark.parametrize("norm,radius", [("l2", None), ("l2", 0.05), ("linf", 0.02)])
@pytest.mark.parametrize("steps", [1, 3])
def test_trades_matches_hand_written_loop(steps, norm, radius):
    model, batch = TinyVL().double(), tiny_batch()
    ref = trades_loop(model, batch, K=steps, eta=0.04, radius=radius, norm=norm, beta=6.0, seed=8)
    trades = advlab.TRADES(model, SITES, steps=steps, step_size=0.04, radius=radius, norm=norm, beta=6.0,
                           generator=torch.Generator().manual_seed(8))
    _run(trades, model, batch)
    assert_grads_equal(grads(model), ref, atol=1e-10)


def test_trades_sign_direction_matches_hand_written_loop():
    """The reference code's L∞ attack: δ ← clamp(δ + η sign(g), ±ε)."""
    model, batch = TinyVL().double(), tiny_batch()
    ref = trades_loop(model, batch, K=3, eta=0.01, radius=0.02, norm="linf", beta=6.0, seed=8, sign=True)
    trades = advlab.TRADES(model, SITES, steps=3, step_size=0.01, radius=0.02, norm="linf", direction="sign",
                           generator=torch.Generator().manual_seed(8))
    _run(trades, model, batch)
    assert_grads_equal(grads(model), ref, atol=1e-10)


# ---------------------------------------------------------------------------------------------- VAT / ALUM
def vat_loop(model, batch, *, K, xi, eps, norm, alpha, divergence, seed):
    """VAT: r = ξ d/‖d‖, K power iterations on KL(sg p(x) ‖ p(x+r)), r* = ε g/‖g‖,
    CE(clean) + α D(p(x), p(x + r*)); D = KL(sg p(x) ‖ ·) or ALUM's symmetric KL with detached targets."""
    ids, img, tm, im, y = batch
    model.zero_grad()
    g = torch.Generator().manual_seed(seed)
    rs = [xi * _normalize(torch.randn(s, generator=g, dtype=F64) * m.unsqueeze(-1), norm)
          for s, m in zip(_shapes(model, batch), (tm, im))]
    tiny = torch.finfo(torch.float32).tiny  # VAT's direction: no 1e-8 clamp
    clean = model(ids, img, tm, im)
    for k in range(K):
        rs = [r.detach().requires_grad_() for r in rs]
        probe = model(ids, img, tm, im, *rs)
        gs = torch.autograd.grad(_kl(clean.detach(), probe), rs)
        size = eps if k == K - 1 else xi
        rs = [size * gr / _row_norm(gr, norm).clamp(min=tiny) for gr in gs]
    adv = model(ids, img, tm, im, *rs)
    if divergence == "kl":
        reg = _kl(clean.detach(), adv)
    else:
        reg = _kl(adv.detach(), clean) + _kl(clean.detach(), adv)
    (F.cross_entropy(clean, y) + alpha * reg).backward()
    return grads(model)


@pytest.mark.parametrize("norm,divergence", [("l2", "kl"), ("linf", "kl"), ("l2", "symmetric_kl")])
@pytest.mark.parametrize("steps", [1, 2])
def test_vat_matches_hand_written_loop(steps, norm, divergence):
    model, batch = TinyVL().double(), tiny_batch()
    ref = vat_loop(model, batch, K=steps, xi=1e-3, eps=0.2, norm=norm, alpha=2.0, divergence=divergence, seed=9)
    vat = advlab.VAT(model, SITES, eps=0.2, xi=1e-3, steps=steps, norm=norm, weight=2.0, divergence=divergence,
                     generator=torch.Generator().manual_seed(9))
    _run(vat, model, batch)
    assert_grads_equal(grads(model), ref, atol=1e-10)


@pytest.mark.parametrize("stage,alpha", [("pretraining", 10.0), ("finetuning", 1.0)])
def test_alum_preset_matches_hand_written_loop(stage, alpha):
    model, batch = TinyVL().double(), tiny_batch()
    ref = vat_loop(model, batch, K=1, xi=1e-5, eps=0.05, norm="linf", alpha=alpha, divergence="symmetric_kl", seed=1)
    alum = advlab.VAT.alum(model, SITES, stage=stage, eps=0.05, generator=torch.Generator().manual_seed(1))
    _run(alum, model, batch)
    assert_grads_equal(grads(model), ref, atol=1e-10)


# ---------------------------------------------------------------------------------------------- FastAT
def fast_loop(model, batch, *, eps, method, seed):
    """FGSM-RS: U(-ε, ε), α = 1.25ε, clamp to ±ε. N-FGSM: U(-2ε, 2ε), α = ε, no clamp. CE(f(x + δ)) only."""
    ids, img, tm, im, y = batch
    g = torch.Generator().manual_seed(seed)
    half, alpha = (eps, 1.25 * eps) if method == "fgsm_rs" else (2 * eps, eps)
    deltas = [_uniform(g, s, half, m).requires_grad_() for s, m in zip(_shapes(model, batch), (tm, im))]
    gs = torch.autograd.grad(F.cross_entropy(model(ids, img, tm, im, *deltas), y), deltas)
    deltas = [d.detach() + alpha * gr.sign() for d, gr in zip(deltas, gs)]
    if method == "fgsm_rs":
        deltas = [d.clamp(-eps, eps) for d in deltas]
    model.zero_grad()
    F.cross_entropy(model(ids, img, tm, im, *deltas), y).backward()
    return grads(model)


@pytest.mark.parametrize("method", ["fgsm_rs", "n_fgsm"])
def test_fast_at_matches_hand_written_loop(method):
    model, batch = TinyVL().double(), tiny_batch()
    ref = fast_loop(model, batch, eps=0.1, method=method, seed=12)
    _run(advlab.FastAT(model, SITES, eps=0.1, method=method, generator=torch.Generator().manual_seed(12)), model, batch)
    assert_grads_equal(grads(model), ref, atol=1e-10)


# ---------------------------------------------------------------------------------------------- properties
def _zero_size(name, seed):
    g = torch.Generator().manual_seed(seed)
    return {
        "r3f": lambda m: advlab.R3F(m, SITES, eps=0.0, weight=2.0, generator=g),
        "neftune": lambda m: advlab.NEFTune(m, SITES, alpha=0.0, generator=g),
        "trades": lambda m: advlab.TRADES(m, SITES, steps=2, step_size=0.1, beta=0.0, generator=g),
        "vat": lambda m: advlab.VAT(m, SITES, eps=0.0, weight=3.0, generator=g),
        "fgsm_rs": lambda m: advlab.FastAT(m, SITES, eps=0.0, generator=g),
        "n_fgsm": lambda m: advlab.FastAT(m, SITES, eps=0.0, method="n_fgsm", generator=g),
    }[name]


RECIPES = ["r3f", "neftune", "trades", "vat", "fgsm_rs", "n_fgsm"]


@pytest.mark.parametrize("name", RECIPES)
@given(seed=st.integers(0, 2**31 - 1))
def test_zero_size_equals_plain_training(name, seed):
    """ε = 0 (α = 0 for NEFTune, β = 0 for TRADES): the parameter gradients of plain training."""
    model, batch = TinyVL().double(), tiny_batch(seed=seed % 1000)
    ref = _plain_grads(model, batch)
    _run(_zero_size(name, seed)(model), model, batch)
    assert_grads_equal(grads(model), ref, atol=1e-12)


class Probe(nn.Module):
    """Embedding -> tap -> flatten -> linear: padding is not pooled away, so padded positions get
    gradient and a recipe must keep δ there at 0 itself."""

    def __init__(self, vocab=13, width=6, length=5):
        super().__init__()
        self.embed, self.tap, self.head = nn.Embedding(vocab, width), nn.Identity(), nn.Linear(width * length, 3)

    def forward(self, ids):
        return self.head(self.tap(self.embed(ids)).flatten(1))


def _probe_deltas(recipe_factory, seed):
    """δ of the last forward of one step, read at the tap, and the mask used."""
    torch.manual_seed(seed)
    model = Probe().double()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 13, (4, 5), generator=g)
    mask = torch.rand(4, 5, generator=g) > 0.3
    mask[:, 0] = True
    y = torch.randint(0, 3, (4,), generator=g)
    seen = []
    handle = model.tap.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        clean = model.embed(ids).detach()
        recipe_factory(model, g).step(lambda: model(ids), lambda out: F.cross_entropy(out, y), masks={"txt": mask})
    finally:
        handle.remove()
    return seen[-1] - clean, mask


BOUNDED = {
    "r3f": (lambda m, g: advlab.R3F(m, {"txt": "embed"}, eps=0.3, weight=1.0, generator=g),
            lambda d, mask: d.abs().amax() <= 0.3),
    "neftune": (lambda m, g: advlab.NEFTune(m, {"txt": "embed"}, alpha=5.0, generator=g),
                lambda d, mask: (d.abs().flatten(1).amax(1)
                                 <= 5.0 / (mask.sum(1).to(F64) * d.shape[-1]).sqrt() + 1e-12).all()),
    "trades": (lambda m, g: advlab.TRADES(m, {"txt": "embed"}, steps=3, step_size=0.5, radius=0.2, generator=g),
               lambda d, mask: (d.flatten(1).norm(dim=1) <= 0.2 + 1e-9).all()),
    "vat": (lambda m, g: advlab.VAT(m, {"txt": "embed"}, eps=0.2, xi=1e-3, steps=2, generator=g),
            lambda d, mask: torch.allclose(d.flatten(1).norm(dim=1), torch.full((4,), 0.2, dtype=F64), atol=1e-9)),
    "fgsm_rs": (lambda m, g: advlab.FastAT(m, {"txt": "embed"}, eps=0.1, generator=g),
                lambda d, mask: d.abs().amax() <= 0.1 + 1e-12),
    "n_fgsm": (lambda m, g: advlab.FastAT(m, {"txt": "embed"}, eps=0.1, method="n_fgsm", generator=g),
               lambda d, mask: d.abs().amax() <= 0.3 + 1e-12 and d[mask.unsqueeze(-1).expand_as(d)].abs().amax() > 0.2),
}


@pytest.mark.parametrize("name", list(BOUNDED))
@given(seed=st.integers(0, 2**31 - 1))
def test_masked_positions_stay_zero_and_delta_is_in_bounds(name, seed):
    """Kills: a sampler or ascender that ignores the mask (padding gets gradient in `Probe`), and
    a wrong bound (FGSM-RS without the clamp, NEFTune scaled by the padded length)."""
    factory, in_bounds = BOUNDED[name]
    delta, mask = _probe_deltas(factory, seed)
    assert (delta[~mask] == 0).all()
    assert in_bounds(delta, mask)


def _no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("name", RECIPES)
def test_hooks_leave_no_trace_also_on_error(name):
    model, batch = TinyVL().double(), tiny_batch()
    ids, img, tm, im, _y = batch
    before = model(ids, img, tm, im).detach()
    recipe = {
        "r3f": lambda: advlab.R3F(model, SITES, eps=0.1),
        "neftune": lambda: advlab.NEFTune(model, SITES),
        "trades": lambda: advlab.TRADES(model, SITES, step_size=0.1),
        "vat": lambda: advlab.VAT(model, SITES, eps=0.1),
        "fgsm_rs": lambda: advlab.FastAT(model, SITES, eps=0.1),
        "n_fgsm": lambda: advlab.FastAT(model, SITES, eps=0.1, method="n_fgsm"),
    }[name]()
    _run(recipe, model, batch)
    assert _no_hooks(model)
    assert torch.equal(model(ids, img, tm, im).detach(), before)

    def boom(out):
        raise KeyError("user loss failed")

    with pytest.raises(KeyError):
        recipe.step(lambda: model(ids, img, tm, im), boom)
    assert _no_hooks(model)
    assert torch.equal(model(ids, img, tm, im).detach(), before)


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_nonfinite_loss_leaves_every_grad_as_it_was(name, policy):
    """A NaN loss: `"raise"` raises NonFiniteError, `"skip"` returns; neither changes any .grad."""
    model, batch = TinyVL().double(), tiny_batch()
    ids, img, tm, im, y = batch
    kw = {"on_nonfinite": policy}
    recipe = {
        "r3f": lambda: advlab.R3F(model, SITES, eps=0.1, **kw),
        "neftune": lambda: advlab.NEFTune(model, SITES, **kw),
        "trades": lambda: advlab.TRADES(model, SITES, step_size=0.1, **kw),
        "vat": lambda: advlab.VAT(model, SITES, eps=0.1, **kw),
        "fgsm_rs": lambda: advlab.FastAT(model, SITES, eps=0.1, **kw),
        "n_fgsm": lambda: advlab.FastAT(model, SITES, eps=0.1, method="n_fgsm", **kw),
    }[name]()
    before = _plain_grads(model, batch)
    nan_loss = lambda out: F.cross_entropy(out, y) * float("nan")
    if policy == "raise":
        with pytest.raises(advlab.NonFiniteError):
            recipe.step(lambda: model(ids, img, tm, im), nan_loss, masks=_masks(batch))
    else:
        recipe.step(lambda: model(ids, img, tm, im), nan_loss, masks=_masks(batch))
    assert_grads_equal(grads(model), before, atol=0)


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("make,error,words", [
    (lambda m: advlab.R3F(m, SITES, noise="gaussian"), advlab.AdvlabValueError, "noise"),
    (lambda m: advlab.R3F(m, SITES, eps=-1.0), advlab.AdvlabValueError, "eps"),
    (lambda m: advlab.NEFTune(m, SITES, alpha=float("nan")), advlab.AdvlabValueError, "alpha"),
    (lambda m: advlab.TRADES(m, SITES, steps=0), advlab.AdvlabValueError, "steps"),
    (lambda m: advlab.TRADES(m, SITES, radius=0.0), advlab.AdvlabValueError, "radius"),
    (lambda m: advlab.TRADES(m, SITES, norm="l1"), advlab.AdvlabValueError, "norm"),
    (lambda m: advlab.VAT(m, SITES, eps=1.0, divergence="js"), advlab.AdvlabValueError, "divergence"),
    (lambda m: advlab.VAT.alum(m, SITES, stage="pre"), advlab.AdvlabValueError, "stage"),
    (lambda m: advlab.FastAT(m, SITES, eps=0.1, method="pgd"), advlab.AdvlabValueError, "method"),
    (lambda m: advlab.FastAT(m, SITES, eps="0.1"), advlab.AdvlabTypeError, "eps"),
    (lambda m: advlab.spectral_norm_head(m, "classifier"), advlab.AdvlabValueError, "head"),
    (lambda m: advlab.spectral_norm_head(m, "drop"), advlab.AdvlabValueError, "weight"),
])
def test_errors_name_the_argument(make, error, words):
    with pytest.raises(error, match=words):
        make(TinyVL().double())


# ---------------------------------------------------------------------------------------------- R4F
def test_spectral_norm_head_bounds_the_head_and_keeps_training():
    model, batch = TinyVL().double(), tiny_batch()
    original = model.head.weight
    head = advlab.spectral_norm_head(model, "head")
    assert head.parametrizations.weight.original is original  # an optimizer built before still updates it
    for _ in range(20):  # one power iteration per training forward
        model(*batch[:4])
    sigma = torch.linalg.matrix_norm(head.weight.detach(), ord=2)
    assert math.isclose(float(sigma), 1.0, rel_tol=1e-6)
    with pytest.raises(advlab.AdvlabValueError, match="once"):
        advlab.spectral_norm_head(model, "head")
    _run(advlab.R3F(model, SITES, eps=0.1), model, batch)
    assert original.grad is not None and torch.isfinite(original.grad).all()


def _recipe(name, model, **kw):
    g = torch.Generator().manual_seed(3)
    return {
        "r3f": lambda: advlab.R3F(model, SITES, eps=0.1, generator=g, **kw),
        "neftune": lambda: advlab.NEFTune(model, SITES, generator=g, **kw),
        "trades": lambda: advlab.TRADES(model, SITES, steps=2, step_size=0.1, generator=g, **kw),
        "vat": lambda: advlab.VAT(model, SITES, eps=0.1, steps=2, generator=g, **kw),
        "fgsm_rs": lambda: advlab.FastAT(model, SITES, eps=0.1, generator=g, **kw),
        "n_fgsm": lambda: advlab.FastAT(model, SITES, eps=0.1, method="n_fgsm", generator=g, **kw),
    }[name]()


@pytest.mark.parametrize("name", RECIPES)
def test_grad_scaler_scales_parameter_gradients_only(name):
    """With a GradScaler the parameter gradients are the unscaled ones times the scale, and δ moves
    as without it. Kills: a recipe that does not hand `scaler` to the engine."""

    def run(scaler):
        model, batch = TinyVL().double(), tiny_batch()
        ids, img, tm, im, y = batch
        model.zero_grad()
        _recipe(name, model).step(lambda: model(ids, img, tm, im), lambda o: F.cross_entropy(o, y),
                                  masks=_masks(batch), scaler=scaler)
        return grads(model)

    plain, scaled = run(None), run(torch.amp.GradScaler("cpu", init_scale=1024.0))
    assert_grads_equal({k: v / 1024.0 for k, v in scaled.items()}, plain, atol=1e-12)


def test_vat_warns_when_the_probe_is_below_float32_resolution():
    """ξ = 1e-6 spread over a row moves float32 logits by about their rounding error: the power
    iteration follows rounding. Kills a VAT that does so without a word; the default ξ is quiet."""
    model = TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)

    def step(**kw):
        vat = advlab.VAT(model, {"txt": "word"}, eps=1.0, generator=torch.Generator().manual_seed(0), **kw)
        return vat.step(lambda: model(ids, img, tm, im), lambda o: F.cross_entropy(o, y), masks={"txt": tm})

    with pytest.warns(UserWarning, match="increase `xi`"):
        step(xi=1e-6)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert step().delta_norm["txt"] == pytest.approx(1.0, rel=1e-5)
