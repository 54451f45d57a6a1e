"""Recipe arguments: what is refused (and how the message reads), and what injection makes possible."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import advlab
from tests.test_villa_exact import assert_grads_equal
from tests.tiny_models import TinyVL, grads, plain_symkl, tiny_batch

SITES = {"txt": "word", "img": advlab.Site("img_proj", where="input")}


def _villa_step(model, forward, **kwargs):
    y = torch.tensor([0, 1, 2, 0])
    task = kwargs.pop("task", lambda out: F.cross_entropy(out if isinstance(out, torch.Tensor) else out[-1], y))
    return advlab.VILLA(model, sites=kwargs.pop("sites", SITES), **kwargs).step(forward, task)


# ----------------------------------------------------------------------------------------------- logits rule
@pytest.mark.parametrize("wrap", [lambda h, z: (h, z), lambda h, z: (z.sum(), z), lambda h, z: [h, z],
                                  lambda h, z: {"hidden": h, "logits": z}],
                         ids=["(hidden, logits)", "hf (loss, logits)", "list", "dict"])
def test_default_logits_refuses_what_it_cannot_identify(wrap):
    """Fails on the old rule, which took element 0 of a tuple: the KL of `(hidden, logits)` was computed on
    the hidden states without a word."""
    model = TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
    with pytest.raises(advlab.AdvlabTypeError, match=r"`logits=`"):
        _villa_step(model, lambda: wrap(torch.ones(4, 5, 8), model(ids, img, tm, im)),
                    task=lambda out: F.cross_entropy(out["logits"] if isinstance(out, dict) else out[1], y))


def test_default_logits_keeps_tensors_and_dot_logits():
    class Out:
        def __init__(self, logits):
            self.logits = logits

    z = torch.randn(2, 3)
    assert advlab.free.default_logits(z) is z
    assert advlab.free.default_logits(Out(z)) is z
    with pytest.raises(advlab.AdvlabTypeError, match=r"`\.logits` is NoneType"):
        advlab.free.default_logits(Out(None))


def test_logits_callable_picks_the_element():
    model = TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
    stats = _villa_step(model, lambda: (torch.ones(4, 5, 8), model(ids, img, tm, im)), logits=lambda out: out[1],
                        task=lambda out: F.cross_entropy(out[1], y))
    assert len(stats.kl) == 3 and stats.kl[-1] > 0


# ------------------------------------------------------------------------------------- multi-output models
class TwoHeads(TinyVL):
    """TinyVL with a second head (a 2-way match score next to the 3-way answer), like a retrieval model's
    ITC and ITM outputs."""

    def __init__(self):
        super().__init__()
        self.match = nn.Linear(3, 2)

    def forward(self, ids, img, txt_mask, img_mask, delta_txt=None, delta_img=None):
        answer = super().forward(ids, img, txt_mask, img_mask, delta_txt, delta_img)
        return {"answer": answer, "match": self.match(torch.tanh(answer))}


def _two_head_loop(model, batch, *, K, lr, w):
    """The official VILLA loop (text only) with the sum of two symmetric KLs, one per output."""
    ids, img, tm, im, y = batch
    model.zero_grad()
    clean = model(ids, img, tm, im)
    delta = torch.zeros(*ids.shape, model.word.embedding_dim, dtype=torch.float64)
    for k in range(K):
        delta.requires_grad_()
        out = model(ids, img, tm, im, delta, None)
        kl = plain_symkl(out["answer"], clean["answer"]) + plain_symkl(out["match"], clean["match"])
        ((F.cross_entropy(out["answer"], y) + w * kl) / K).backward(retain_graph=True)
        if k == K - 1:
            break
        g = delta.grad
        delta = (delta + lr * g / g.flatten(1).norm(dim=1).clamp(min=1e-8).view(-1, 1, 1)).detach()
    return grads(model)


@pytest.mark.parametrize("schedule", ["deferred", "retain", "lean"])
@pytest.mark.parametrize("structure", ["tuple", "dict"])
def test_villa_regularizer_on_several_outputs_matches_hand_written_loop(schedule, structure):
    """A `logits=` callable returning several tensors plus a `regularizer=` that takes them is enough: no packing
    into one tensor. Fails if the engine drops the clean-side gradient of any output (deferred/lean)."""
    model = TwoHeads().double()
    ids, img, tm, im, y = batch = tiny_batch()
    ref = _two_head_loop(model, batch, K=3, lr=0.2, w=1.5)
    model.zero_grad()
    if structure == "tuple":
        logits = lambda out: (out["answer"], out["match"])
        reg = lambda c, p: plain_symkl(p[0], c[0]) + plain_symkl(p[1], c[1])
    else:
        logits = lambda out: out
        reg = lambda c, p: plain_symkl(p["answer"], c["answer"]) + plain_symkl(p["match"], c["match"])
    villa = advlab.VILLA(model, sites={"txt": "word"}, steps=3, step_size=0.2, kl_weight=1.5, mode="txt",
                         logits=logits, regularizer=reg, schedule=schedule)
    villa.step(lambda: model(ids, img, tm, im), lambda out: F.cross_entropy(out["answer"], y))
    assert_grads_equal(grads(model), ref, atol=1e-10)


def _retrieval_style_loop(model, batch, *, K, lr, w):
    """The retrieval experiment's objective: an explicit clean task loss plus the official averaged
    perturbed losses (each forward's task + w · KL, divided by the forwards and K), alter mode."""
    ids, img, tm, im, y = batch
    model.zero_grad()
    clean = model(ids, img, tm, im)
    F.cross_entropy(clean["answer"], y).backward(retain_graph=True)
    dt = torch.zeros(*ids.shape, model.word.embedding_dim, dtype=torch.float64)
    di = torch.zeros_like(img)
    for k in range(K):
        dt.requires_grad_()
        di.requires_grad_()
        total = 0.0
        for d_t, d_i in ((dt, None), (None, di)):
            out = model(ids, img, tm, im, d_t, d_i)
            kl = plain_symkl(out["answer"], clean["answer"]) + plain_symkl(out["match"], clean["match"])
            total = total + F.cross_entropy(out["answer"], y) + w * kl
        (total / (2 * K)).backward(retain_graph=True)
        if k == K - 1:
            break
        gt, gi = dt.grad, di.grad
        dt = (dt + lr * gt / gt.flatten(1).norm(dim=1).clamp(min=1e-8).view(-1, 1, 1)).detach()
        di = (di + lr * gi / gi.flatten(1).norm(dim=1).clamp(min=1e-8).view(-1, 1, 1)).detach()
    return grads(model)


def test_villa_runs_the_retrieval_objective():
    """clean_loss=True on an official preset, a tuple of outputs and a regulariser over them: the retrieval
    experiment's objective, without re-implementing VILLA's loop. Fails if clean_loss is ignored."""
    model = TwoHeads().double()
    ids, img, tm, im, y = batch = tiny_batch()
    ref = _retrieval_style_loop(model, batch, K=2, lr=0.2, w=1.5)
    model.zero_grad()
    villa = advlab.VILLA(model, sites=SITES, steps=2, step_size=0.2, kl_weight=1.5, mode="alter", clean_loss=True,
                         logits=lambda out: (out["answer"], out["match"]),
                         regularizer=lambda c, p: plain_symkl(p[0], c[0]) + plain_symkl(p[1], c[1]))
    villa.step(lambda: model(ids, img, tm, im), lambda out: F.cross_entropy(out["answer"], y))
    assert_grads_equal(grads(model), ref, atol=1e-10)


def test_default_regularizer_is_the_symmetric_kl_bit_for_bit():
    model = TinyVL().double()
    ids, img, tm, im, y = tiny_batch()
    got = []
    for reg in (None, lambda c, p: advlab.symmetric_kl(p, c)):
        model.zero_grad()
        advlab.VILLA(model, sites=SITES, regularizer=reg).step(lambda: model(ids, img, tm, im),
                                                               lambda out: F.cross_entropy(out, y))
        got.append(grads(model))
    assert_grads_equal(got[0], got[1], atol=0)


# -------------------------------------------------------------------------------------- given both ways
@pytest.mark.parametrize("arg", [{"step_size": 0.1}, {"radius": 0.5}, {"norm": "linf"},
                                 {"init": advlab.NormalSampler(0.1)}])
def test_villa_refuses_a_per_modality_setting_given_both_ways(arg):
    """Fails on the old code, which ignored `step_size` (and applied the others over the Perturbations)."""
    name = next(iter(arg))
    with pytest.raises(advlab.AdvlabValueError, match=rf"`{name}`.*`perturbations`.*both"):
        advlab.VILLA(TinyVL(), sites=SITES, perturbations={"txt": advlab.Perturbation(1e-2)}, **arg)


@pytest.mark.parametrize("arg", [{"step_size": 0.1}, {"init_magnitude": 0.1}, {"radius": 0.5}, {"norm": "linf"}])
def test_freelb_refuses_a_per_modality_setting_given_both_ways(arg):
    name = next(iter(arg))
    with pytest.raises(advlab.AdvlabValueError, match=rf"`{name}`.*both"):
        advlab.FreeLB(TinyVL(), {"txt": "word"}, perturbations={"txt": advlab.Perturbation(1e-2)}, **arg)


@pytest.mark.parametrize("arg", [{"step_size": 0.1}, {"radius": 0.5}])
@pytest.mark.parametrize("recipe", [advlab.VILLA, advlab.FreeLB])
def test_ascender_refused_with_the_default_ascenders_settings(recipe, arg):
    """The ascender replaces the update built from step_size / radius: both given, one would be ignored."""
    with pytest.raises(advlab.AdvlabValueError, match="ascender.*step_size.*both"):
        recipe(TinyVL(), {"txt": "word"}, ascender=advlab.ascent.PGDAscender(0.2), **arg)


def test_injected_ascender_moves_delta():
    model = TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
    seen = []

    def ascender(delta, grad, *, mask=None, generator=None):
        seen.append(grad.shape)
        return delta + 0.01 * grad.sign()

    stats = advlab.FreeLB(model, {"txt": "word"}, steps=2, ascender=ascender).step(
        lambda: model(ids, img, tm, im), lambda out: F.cross_entropy(out, y), masks={"txt": tm})
    assert seen == [torch.Size([4, 5, 8])]
    assert stats.delta_norm["txt"] > 0


@pytest.mark.parametrize("recipe", ["villa", "freelb", "smart"])
def test_task_loss_and_regularizer_must_return_scalars(recipe):
    """The message names the callable that returned the wrong thing (before: "`loss`", a name the user never
    wrote, or a raw error for an int)."""
    model = TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
    make = {"villa": lambda **kw: advlab.VILLA(model, sites={"txt": "word"}, **kw),
            "freelb": lambda **kw: advlab.FreeLB(model, {"txt": "word"}),
            "smart": lambda **kw: advlab.SMART(model, {"txt": "word"}, **kw)}[recipe]
    per_row = lambda out: F.cross_entropy(out, y, reduction="none")
    with pytest.raises(advlab.AdvlabValueError, match=r"`task_loss` output to be a scalar.*shape \(4,\)"):
        make().step(lambda: model(ids, img, tm, im), per_row)
    with pytest.raises(advlab.AdvlabValueError, match=r"`task_loss` output to be a scalar.*int"):
        make().step(lambda: model(ids, img, tm, im), lambda out: 1)
    if recipe != "freelb":
        reg = lambda c, p: advlab.symmetric_kl(p, c, reduction="none")
        with pytest.raises(advlab.AdvlabValueError, match=r"`regularizer` output to be a scalar"):
            make(regularizer=reg).step(lambda: model(ids, img, tm, im), lambda out: F.cross_entropy(out, y))


def test_regularizer_refused_with_the_default_regularizers_settings():
    with pytest.raises(advlab.AdvlabValueError, match="regularizer.*kl_reduction"):
        advlab.VILLA(TinyVL(), sites=SITES, regularizer=advlab.symmetric_kl, kl_reduction="mean")
    with pytest.raises(advlab.AdvlabTypeError, match="regularizer.*callable"):
        advlab.VILLA(TinyVL(), sites=SITES, regularizer="kl")


def test_perturbations_checked_at_construction():
    with pytest.raises(advlab.AdvlabValueError, match="audio"):
        advlab.VILLA(TinyVL(), sites=SITES, perturbations={"audio": advlab.Perturbation()})
    with pytest.raises(advlab.AdvlabTypeError, match=r"perturbations\['txt'\]"):
        advlab.FreeLB(TinyVL(), {"txt": "word"}, perturbations={"txt": 0.1})
    with pytest.raises(advlab.AdvlabValueError, match="on_nonfinite"):
        advlab.FreeLB(TinyVL(), {"txt": "word"}, on_nonfinite="ignore")


# --------------------------------------------------------------------------------------------- compile
@pytest.mark.parametrize("make", [lambda m: advlab.VILLA(m, sites=SITES), lambda m: advlab.FreeLB(m, {"txt": "word"}),
                                  lambda m: advlab.SMART(m, {"txt": "word"})], ids=["villa", "freelb", "smart"])
def test_compiled_model_refused_at_construction(make):
    """Fails on the old code, which refused only at the first step()."""
    model = TinyVL()
    model.mix.compile()
    with pytest.raises(advlab.AdvlabValueError, match="torch.compile"):
        make(model)


# ------------------------------------------------------------------------------------------ from_preset
def test_from_preset_takes_sites_and_perturbations():
    model = TinyVL()
    with pytest.raises(advlab.AdvlabTypeError, match=r"sites=.*from_preset\('vqa-base'"):
        advlab.VILLA.from_preset("vqa-base", model)
    villa = advlab.VILLA.from_preset("vqa-base", model, {"txt": "word"})
    assert (villa.mode, villa.steps, villa.perturbations["txt"].step_size) == ("txt", 3, 1e-3)
    villa = advlab.VILLA.from_preset("vcr-base", model, sites=SITES,
                                     perturbations={"txt": advlab.Perturbation(0.5), "img": advlab.Perturbation(0.2)})
    assert villa.perturbations["img"].step_size == 0.2 and villa.kl_reduction == "mean"


# ------------------------------------------------------------------------------- nothing to train
@pytest.mark.parametrize("direction", ["gradient", "random"])
@pytest.mark.parametrize("recipe", ["villa", "freelb", "smart"])
def test_no_trainable_parameter_is_refused(recipe, direction):
    """Fails on the old code: it did nothing silently (gradient) or died inside autograd (random)."""
    model = TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
    model.requires_grad_(False)
    pert = {"txt": advlab.Perturbation(0.1, direction=direction)}
    if recipe == "villa":
        r = advlab.VILLA(model, sites={"txt": "word"}, perturbations=pert)
    elif recipe == "freelb":
        r = advlab.FreeLB(model, {"txt": "word"}, perturbations=pert)
    else:
        r = advlab.SMART(model, {"txt": "word"})
    with pytest.raises(advlab.AdvlabValueError, match="requires_grad=True"):
        r.step(lambda: model(ids, img, tm, im), lambda out: F.cross_entropy(out, y))


def test_loss_reaching_no_trainable_parameter_is_refused():
    """The model has trainable parameters, but the loss reaches only frozen ones (random δ: no gradient)."""
    model = TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    extra = nn.Linear(2, 2)  # trainable, but not reached by the loss
    model.unused = extra
    villa = advlab.VILLA(model, sites={"txt": "word"}, perturbations={"txt": advlab.Perturbation(0.1, direction="random")})
    with pytest.raises(advlab.AdvlabValueError, match="does not require grad"):
        villa.step(lambda: model(ids, img, tm, im), lambda out: F.cross_entropy(out, y))


def test_step_under_no_grad_is_refused():
    model = TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
    with torch.no_grad(), pytest.raises(advlab.AdvlabValueError, match="no_grad"):
        _villa_step(model, lambda: model(ids, img, tm, im))


# ------------------------------------------------------------------------------------ careless arguments
def _probe_inputs():
    model = TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
    return model, (lambda: model(ids, img, tm, im)), (lambda out: F.cross_entropy(out, y)), tm


@pytest.mark.parametrize("case", [
    ("model is a function", lambda m, f, t, tm: advlab.VILLA(lambda x: x, sites={"txt": "word"}), "`model`.*nn.Module"),
    ("generator is a str", lambda m, f, t, tm: advlab.FreeLB(m, {"txt": "word"}, generator="0"), "`generator`"),
    ("logits is a str", lambda m, f, t, tm: advlab.VILLA(m, sites={"txt": "word"}, logits="logits"), "`logits`"),
    ("forward is a str", lambda m, f, t, tm: advlab.SMART(m, {"txt": "word"}).step("f", t), "`forward`"),
    ("task_loss is a str", lambda m, f, t, tm: advlab.VILLA(m, sites={"txt": "word"}).step(f, "ce"), "`task_loss`"),
    ("scaler is True", lambda m, f, t, tm: advlab.FreeLB(m, {"txt": "word"}).step(f, t, scaler=True), "`scaler`"),
    ("masks is a list", lambda m, f, t, tm: advlab.FreeLB(m, {"txt": "word"}).step(f, t, masks=[tm]), "`masks`"),
    ("regularizer takes one argument", lambda m, f, t, tm: advlab.SMART(m, {"txt": "word"}, regularizer=lambda a: a),
     r"`regularizer`.*regularizer\(clean_logits, perturbed_logits\)"),
], ids=lambda c: c[0] if isinstance(c, tuple) else None)
def test_careless_arguments_get_advlab_errors(case):
    """Each raised a raw TypeError / AttributeError / ValueError from inside torch or Python before."""
    _, call, pattern = case
    model, fwd, task, tm = _probe_inputs()
    with pytest.raises(advlab.AdvlabError, match=pattern):
        call(model, fwd, task, tm)
