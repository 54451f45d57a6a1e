"""Sites as real models present them: channels-first conv outputs, float 0/1 masks, low-precision
embeddings, fixed δ that does not fit, and a step started inside another step's forward."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import advlab
from tests.strategies import generator
from tests.tiny_models import plain_symkl


class TinyPatches(nn.Module):
    """A ViLT-like image side: a strided conv gives [b, c, h, w] patches, pooled over real patches."""

    def __init__(self, channels: int = 4, classes: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.patch = nn.Conv2d(3, channels, kernel_size=2, stride=2)
        self.head = nn.Linear(channels, classes)

    def forward(self, pixels, patch_mask, delta=None):
        p = self.patch(pixels)  # [b, c, h, w]
        if delta is not None:  # delta: [b, h*w, c], the features-last form
            p = p + delta.transpose(1, 2).reshape(p.shape)
        tokens = p.flatten(2).transpose(1, 2)  # [b, h*w, c]
        m = patch_mask.reshape(p.shape[0], -1, 1).to(p.dtype)
        return self.head((torch.tanh(tokens) * m).sum(1) / m.sum(1))


def patch_batch(dtype=torch.float64):
    g = generator(0)
    pixels = torch.randn(3, 3, 6, 4, generator=g, dtype=dtype)  # patches: h=3, w=2
    mask = torch.ones(3, 3, 2)  # float 0/1, as transformers' examples build pixel masks
    mask[0, 2, :] = 0.0
    mask[2, :, 1] = 0.0
    y = torch.tensor([0, 2, 1])
    return pixels, mask, y


def l2_token_loop(model, pixels, mask, y, *, K, lr, kl_w):
    """VILLA's official loop at the patch output, one L2 ball per patch (over channels)."""
    model.zero_grad()
    real = mask.reshape(mask.shape[0], -1, 1).bool()
    clean = model(pixels, mask)
    c = model.patch.out_channels
    d = torch.zeros(pixels.shape[0], real.shape[1], c, dtype=pixels.dtype)
    for k in range(K):
        d.requires_grad_()
        out = model(pixels, mask, d)
        ((F.cross_entropy(out, y) + kl_w * plain_symkl(out, clean)) / K).backward(retain_graph=True)
        if k == K - 1:
            break
        g = d.grad * real
        d = (d.detach() + lr * g / g.pow(2).sum(-1, keepdim=True).sqrt().clamp(min=1e-8)) * real
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_channels_first_site_matches_hand_written_loop_with_a_float_mask():
    """Fails if channels are taken as positions (the per-patch ball would be over the wrong axis) or if
    the float 0/1 pixel mask is refused."""
    model = TinyPatches().double()
    pixels, mask, y = patch_batch()
    ref = l2_token_loop(model, pixels, mask, y, K=3, lr=0.3, kl_w=1.5)
    model.zero_grad()
    villa = advlab.VILLA(model, sites={"img": advlab.Site("patch", layout="channels_first")},
                         perturbations={"img": advlab.Perturbation(0.3, norm="l2_token")}, steps=3, kl_weight=1.5)
    villa.step(lambda: model(pixels, mask), lambda out: F.cross_entropy(out, y), masks={"img": mask})
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=0, atol=1e-10)


@pytest.mark.parametrize("mask_form", ["grid", "flat"])
def test_channels_first_delta_is_held_features_last_and_masked(mask_form):
    model = TinyPatches().double()
    pixels, mask, y = patch_batch()
    m = mask if mask_form == "grid" else mask.reshape(3, -1)
    site = {"img": advlab.Site("patch", layout="channels_first")}
    with advlab.free_training(model, site, {"img": advlab.Perturbation(0.5, norm="l2_token")}, steps=2,
                              masks={"img": m}) as ft:
        for _ in ft:
            ft.backward(F.cross_entropy(ft.forward(lambda: model(pixels, mask)), y))
        delta = ft.deltas("img")[0]
    assert delta.shape == (3, 6, 4)  # [b, h*w, c]
    real = mask.reshape(3, -1).bool()
    torch.testing.assert_close(delta.norm(dim=-1)[real], torch.full((int(real.sum()),), 0.5, dtype=torch.float64))
    assert torch.equal(delta[~real], torch.zeros_like(delta[~real]))


def test_channels_last_layout_flattens_positions():
    """[b, h, w, c] with layout='channels_last' gets the same δ as the [b, h*w, c] view."""
    x = torch.randn(2, 3, 2, 4, dtype=torch.float64, generator=generator(1))
    layer = nn.Linear(4, 2).double()
    w = torch.randn(2, dtype=torch.float64, generator=generator(2))
    got = {}
    for name, inp, site in (("grid", x, advlab.Site(layer, where="input", layout="channels_last")),
                            ("flat", x.reshape(2, 6, 4), advlab.Site(layer, where="input"))):
        with advlab.free_training(layer, {"x": site}, {"x": advlab.Perturbation(0.1)}, steps=2) as ft:
            for _ in ft:
                ft.backward((ft.forward(lambda inp=inp: layer(inp)) * w).sum())
            got[name] = ft.deltas("x")[0]
    torch.testing.assert_close(got["grid"], got["flat"], rtol=0, atol=0)


def test_four_d_site_without_layout_is_refused_saying_how():
    model = TinyPatches().double()
    pixels, mask, y = patch_batch()
    villa = advlab.VILLA(model, sites={"img": "patch"}, steps=2)
    with pytest.raises(advlab.AdvlabValueError, match=r"site 'patch'.*4-d.*\(3, 4, 3, 2\).*layout='channels_first'"):
        villa.step(lambda: model(pixels, mask), lambda out: F.cross_entropy(out, y))


@pytest.mark.parametrize("bad,error,match", [
    (0.5, advlab.AdvlabValueError, r"masks\['img'\].*only 0 and 1.*0\.5"),
    (2, advlab.AdvlabValueError, r"masks\['img'\].*only 0 and 1.*2"),
    (float("nan"), advlab.AdvlabValueError, r"masks\['img'\].*only 0 and 1.*nan"),
])
def test_non_binary_masks_are_refused(bad, error, match):
    model = TinyPatches().double()
    pixels, mask, y = patch_batch()
    m = mask.clone() if isinstance(bad, float) else mask.long()
    m[1, 0, 0] = bad
    villa = advlab.VILLA(model, sites={"img": advlab.Site("patch", layout="channels_first")}, steps=2)
    with pytest.raises(error, match=match):
        villa.step(lambda: model(pixels, mask), lambda out: F.cross_entropy(out, y), masks={"img": m})


def test_layout_mask_of_wrong_shape_names_both_forms():
    model = TinyPatches().double()
    pixels, mask, y = patch_batch()
    villa = advlab.VILLA(model, sites={"img": advlab.Site("patch", layout="channels_first")}, steps=2)
    with pytest.raises(advlab.AdvlabValueError, match=r"masks\['img'\].*\(3, 3, 2\) or \(3, 6\).*got \(3, 2, 3\)"):
        villa.step(lambda: model(pixels, mask), lambda out: F.cross_entropy(out, y),
                   masks={"img": torch.ones(3, 2, 3, dtype=torch.bool)})


def test_pixel_level_mask_at_a_patch_site_says_how_to_reduce_it():
    model = TinyPatches().double()
    pixels, mask, y = patch_batch()
    villa = advlab.VILLA(model, sites={"img": advlab.Site("patch", layout="channels_first")}, steps=2)
    with pytest.raises(advlab.AdvlabValueError, match=r"got \(3, 6, 4\); a pixel-level mask.*interpolate"):
        villa.step(lambda: model(pixels, mask), lambda out: F.cross_entropy(out, y),
                   masks={"img": torch.ones(3, 6, 4, dtype=torch.bool)})


def test_bad_layout_is_refused():
    with pytest.raises(advlab.AdvlabValueError, match="layout"):
        advlab.Site("patch", layout="nchw")


# ------------------------------------------------------------------------------------- perturb_sites


def test_perturb_sites_at_a_channels_first_site_takes_the_features_last_delta():
    model = TinyPatches().double()
    pixels, mask, _ = patch_batch()
    delta = torch.randn(3, 6, 4, dtype=torch.float64, generator=generator(3))
    with advlab.perturb_sites(model, {"img": delta}, sites={"img": advlab.Site("patch", layout="channels_first")}):
        out = model(pixels, mask)
    assert torch.equal(out, model(pixels, mask, delta))


@pytest.mark.parametrize("shape", [(3, 5, 4), (2, 6, 4), (4,)])
def test_perturb_sites_refuses_a_delta_that_does_not_broadcast(shape):
    """Fails on the old code, where a raw RuntimeError came out of the hook."""
    model = TinyPatches().double()
    pixels, mask, _ = patch_batch()
    site = {"img": advlab.Site("patch", layout="channels_first")} if len(shape) > 1 else {"img": "head"}
    delta = {"img": torch.zeros(shape, dtype=torch.float64)}
    with (pytest.raises(advlab.AdvlabValueError, match=r"deltas\['img'\].*site '(patch|head)'.*got shape"),
          advlab.perturb_sites(model, delta, sites=site)):
        model(pixels, mask)
    assert not model.patch._forward_hooks and not model.head._forward_hooks


def test_perturb_sites_refuses_a_non_tensor_delta():
    with (pytest.raises(advlab.AdvlabTypeError, match=r"deltas\['x'\].*floating tensor.*list"),
          advlab.perturb_sites(nn.Linear(2, 2), {"x": [0.0, 1.0]}, sites={"x": ""})):
        pass


# ------------------------------------------------------------------------------------- low precision


class HalfEmbedding(nn.Module):
    """A bfloat16 embedding (as under autocast) with entries of size about 10, then a float32 head."""

    def __init__(self, dtype=torch.bfloat16):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 16)
        with torch.no_grad():
            self.emb.weight.mul_(10.0)
        self.emb.to(dtype)
        self.head = nn.Linear(16, 3)

    def forward(self, ids):
        return self.head(self.emb(ids).float().mean(1))


def run_steps(model, perturbation, n=2):
    ids = torch.randint(0, 10, (4, 6), generator=generator(0))
    y = torch.tensor([0, 1, 2, 0])
    villa = advlab.VILLA(model, sites={"txt": "emb"}, perturbations={"txt": perturbation}, steps=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = [villa.step(lambda: model(ids), lambda o: F.cross_entropy(o, y)) for _ in range(n)]
    return stats, [w for w in caught if "reaches the model" in str(w.message)]


def test_bfloat16_site_reports_what_reaches_the_model_and_warns_once():
    """Fails on the old code: StepStats reported only the float32 δ, and nothing warned."""
    model = HalfEmbedding()
    stats, warned = run_steps(model, advlab.Perturbation(1e-3))
    s = stats[-1]
    assert s.effective_delta_norm["txt"] < 0.5 * s.delta_norm["txt"]
    assert len(warned) == 1  # once per site, not once per step
    message = str(warned[0].message)
    assert "'emb'" in message and "relative=True" in message and "bfloat16" in message
    assert warned[0].filename == __file__  # points at the caller of step()


def test_relative_sizes_get_through_a_bfloat16_site_without_warning():
    stats, warned = run_steps(HalfEmbedding(), advlab.Perturbation(1e-2, relative=True))
    s = stats[-1]
    assert s.effective_delta_norm["txt"] == pytest.approx(s.delta_norm["txt"], rel=0.02)
    assert not warned


def test_float32_site_reaches_the_model_whole():
    stats, warned = run_steps(HalfEmbedding(torch.float32), advlab.Perturbation(1e-3))
    s = stats[-1]
    assert s.effective_delta_norm["txt"] == pytest.approx(s.delta_norm["txt"], rel=1e-3)
    assert not warned


# ------------------------------------------------------------------------------------- re-entrance


def test_a_step_inside_another_steps_forward_says_what_happened():
    """The old message blamed Site(calls=2); the real mistake is a nested step."""
    model = HalfEmbedding(torch.float32)
    ids, y = torch.randint(0, 10, (4, 6), generator=generator(0)), torch.tensor([0, 1, 2, 0])
    outer = advlab.VILLA(model, sites={"txt": "emb"}, steps=2)
    inner = advlab.VILLA(model, sites={"txt": "emb"}, steps=2)

    def forward():
        inner.step(lambda: model(ids), lambda o: F.cross_entropy(o, y))
        return model(ids)

    with pytest.raises(advlab.AdvlabValueError, match=r"one adversarial forward at a time.*inside") as info:
        outer.step(forward, lambda o: F.cross_entropy(o, y))
    assert "calls=" not in str(info.value)
    assert not model.emb._forward_hooks
    outer.step(lambda: model(ids), lambda o: F.cross_entropy(o, y))  # nothing left behind: the next step runs


def test_effective_norm_ignores_non_finite_padding():
    """inf at a padded position (never perturbed) must not turn the reported norm into NaN."""

    class PadInf(nn.Module):
        def __init__(self):
            super().__init__()
            self.site = nn.Identity()
            self.head = nn.Linear(4, 2).double()

        def forward(self, x, mask):
            e = self.site(x)
            return self.head(torch.where(mask.unsqueeze(-1), e, torch.zeros((), dtype=e.dtype)).sum(1))

    model = PadInf()
    x = torch.randn(2, 3, 4, dtype=torch.float64, generator=generator(0))
    mask = torch.tensor([[True, True, False], [True, False, False]])
    x[~mask] = float("inf")
    villa = advlab.VILLA(model, sites={"x": "site"}, perturbations={"x": advlab.Perturbation(0.1)}, steps=2)
    stats = villa.step(lambda: model(x, mask), lambda o: F.cross_entropy(o, torch.tensor([0, 1])), masks={"x": mask})
    assert stats.effective_delta_norm["x"] == pytest.approx(stats.delta_norm["x"], rel=1e-12)


def test_bfloat16_autocast_at_a_conv_site_is_measured_and_warned():
    """Under CPU autocast the conv output is bfloat16: a small absolute step rounds away, and the stats say so."""
    model = TinyPatches()
    pixels, mask, y = patch_batch(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if model.patch(pixels).dtype != torch.bfloat16:
            pytest.skip("CPU autocast does not run conv2d in bfloat16 here")
    villa = advlab.VILLA(model, sites={"img": advlab.Site("patch", layout="channels_first")},
                         perturbations={"img": advlab.Perturbation(2e-4)}, steps=3)
    with warnings.catch_warnings(record=True) as caught, torch.autocast("cpu", dtype=torch.bfloat16):
        warnings.simplefilter("always")
        stats = villa.step(lambda: model(pixels, mask), lambda out: F.cross_entropy(out.float(), y),
                           masks={"img": mask})
    assert stats.effective_delta_norm["img"] < 0.5 * stats.delta_norm["img"]
    assert any("reaches the model" in str(w.message) for w in caught)


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), c=st.integers(1, 4), h=st.integers(1, 3), w=st.integers(1, 3),
       norm=st.sampled_from(["l2", "l2_token", "linf"]), seed=st.integers(0, 2**16), relative=st.booleans())
def test_channels_first_and_channels_last_views_of_one_tensor_get_the_same_delta(b, c, h, w, norm, seed, relative):
    """The layout only moves axes: [b, c, h, w] channels-first and its [b, h, w, c] permutation get one δ."""
    x = torch.randn(b, c, h, w, dtype=torch.float64, generator=generator(seed))
    mask = torch.rand(b, h, w, generator=generator(seed + 1)) > 0.3
    torch.manual_seed(seed)
    model = nn.ModuleDict({"site": nn.Identity(), "lin": nn.Linear(c, 2, bias=False).double()})
    site = model["site"]
    deltas = []
    for layout, inp, to_last in (("channels_first", x, lambda t: t.permute(0, 2, 3, 1)),
                                 ("channels_last", x.permute(0, 2, 3, 1).contiguous(), lambda t: t)):
        pert = advlab.Perturbation(0.3, radius=0.4, norm=norm, relative=relative)
        with advlab.free_training(model, {"x": advlab.Site(site, layout=layout)}, {"x": pert}, steps=3,
                                  masks={"x": mask.double()}) as ft:
            for _ in ft:
                out = ft.forward(lambda inp=inp, to_last=to_last: to_last(site(inp)))
                ft.backward(torch.tanh(model["lin"](out)).sum())
            deltas.append(ft.deltas("x")[0])
    torch.testing.assert_close(deltas[0], deltas[1], rtol=1e-12, atol=1e-15)
    flat = mask.reshape(b, -1)
    assert torch.equal(deltas[0][~flat], torch.zeros_like(deltas[0][~flat]))
