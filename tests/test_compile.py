"""Adversarial training on torch.compile'd models (advlab.compiled.prepare_for_compile).

Fast tests: the refusals, and a prepared but uncompiled model against the plain hooks
(float64, exact). Slow tests compile: a compiled VILLA / FreeLB / SMART step against the
eager step (float32, 1e-5, parameters and δ gradients), and zero recompilations after
warm-up over 24 steps that alternate modes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import TinyVL, grads, tiny_batch

import advlab
from advlab.ascent import PGDAscender
from advlab.compiled import compiled_modules, is_prepared, prepare_for_compile, unprepare_for_compile

ROOT = Path(__file__).resolve().parents[1]
SITES = {"txt": "word", "img": advlab.Site("img_proj", where="input")}


def _loss(y):
    return lambda out: F.cross_entropy(out, y)


class RecordingAscender:
    """PGD with a fixed step that keeps every δ gradient it is given (the δ gradients of a step)."""

    def __init__(self, step_size: float = 0.1) -> None:
        self.inner = PGDAscender(step_size, "l2", None, "gradient")
        self.grads: list[torch.Tensor] = []

    def __call__(self, delta, grad, *, mask=None, generator=None):
        self.grads.append(grad.detach().clone())
        return self.inner(delta, grad, mask=mask, generator=generator)


def _step(recipe_name: str, model, call, batch, *, mode="joint", sites=SITES, seed=0, **kw):
    """One recipe step on `call` (the model itself or its compiled wrapper); parameter and δ gradients."""
    ids, img, tm, im, y = batch
    model.zero_grad()
    gen = torch.Generator().manual_seed(seed)
    ascender = RecordingAscender()
    if recipe_name == "villa":
        recipe = advlab.VILLA(call, sites=sites, steps=3, mode=mode, ascender=ascender, generator=gen, **kw)
    elif recipe_name == "freelb":
        recipe = advlab.FreeLB(call, sites, steps=3, init_magnitude=0.2, mode=mode, ascender=ascender, generator=gen,
                               **kw)
    else:
        recipe = advlab.SMART(call, {"txt": "word"}, steps=2, noise_std=0.1, weight=2.0, ascender=ascender,
                              generator=gen, **kw)
    masks = {"txt": tm, "img": im} if recipe_name != "smart" else {"txt": tm}
    recipe.step(lambda: call(ids, img, tm, im), _loss(y), masks=masks)
    return grads(model), ascender.grads


def _assert_same(a, b, atol):
    (pa, da), (pb, db) = a, b
    assert pa.keys() == pb.keys() and len(da) == len(db) > 0
    for n in pa:
        torch.testing.assert_close(pa[n], pb[n], rtol=0, atol=atol, msg=lambda m, n=n: f"{n}: {m}")
    for k, (x, y) in enumerate(zip(da, db)):
        torch.testing.assert_close(x, y, rtol=0, atol=atol, msg=lambda m, k=k: f"δ gradient {k}: {m}")


# ------------------------------------------------------------------------------------ refusals (fast)
def test_unprepared_compiled_model_is_refused_with_how_to_prepare():
    model = TinyVL()
    compiled = torch.compile(model)  # lazy: nothing is compiled until the first call
    with pytest.raises(advlab.AdvlabValueError, match=r"is compiled with torch.compile.*prepare_for_compile"):
        advlab.VILLA(compiled, sites=SITES)
    with pytest.raises(advlab.AdvlabValueError, match="prepare_for_compile"), \
            advlab.perturb_sites(compiled, {"txt": torch.zeros(1, 1, 8)}, sites=SITES):
        pass
    model.compile()  # in place: the module itself is compiled
    assert compiled_modules(model) == [""]
    with pytest.raises(advlab.AdvlabValueError, match=r"the model is compiled"):
        advlab.FreeLB(model, SITES)


def test_prepare_after_compile_is_refused():
    model = TinyVL()
    model.mix.compile()
    with pytest.raises(advlab.AdvlabValueError, match=r"submodule 'mix' is already compiled"):
        prepare_for_compile(model, SITES)
    with pytest.raises(advlab.AdvlabTypeError, match="nn.Module"):
        prepare_for_compile("model")  # type: ignore[arg-type]


def test_model_compiled_and_run_before_preparing_is_caught_at_the_first_step():
    """A torch.compile wrapper that already ran holds a graph without the hooks; preparing the
    module afterwards cannot reach it (dynamo skips hook guards), and the step says so."""
    ids, img, tm, im, y = tiny_batch(torch.float32)
    model = TinyVL()
    compiled = torch.compile(model, backend="aot_eager")
    compiled(ids, img, tm, im)
    prepare_for_compile(model, SITES)
    with pytest.raises(advlab.AdvlabValueError, match=r"not called.*compile the prepared model"):
        advlab.VILLA(compiled, sites=SITES).step(lambda: compiled(ids, img, tm, im), _loss(y))


@pytest.mark.slow
def test_graph_of_an_unprepared_model_of_the_same_class_is_caught_and_the_remedy_works():
    """Dynamo does not guard on module hooks by default, so a prepared model can be handed the graph an
    unprepared instance of the same class compiled earlier: the step says so and names the remedies."""
    import torch._dynamo

    ids, img, tm, im, y = tiny_batch(torch.float32)
    torch._dynamo.reset()
    plain = torch.compile(TinyVL(), backend="aot_eager")
    plain(ids, img, tm, im)
    model = prepare_for_compile(TinyVL(), SITES)
    compiled = torch.compile(model, backend="aot_eager")
    with pytest.raises(advlab.AdvlabValueError, match=r"same class.*skip_nnmodule_hook_guards"):
        advlab.VILLA(compiled, sites=SITES).step(lambda: compiled(ids, img, tm, im), _loss(y))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
        plain(ids, img, tm, im)
        advlab.VILLA(compiled, sites=SITES).step(lambda: compiled(ids, img, tm, im), _loss(y))
        plain(ids, img, tm, im)
    torch._dynamo.reset()


def test_site_not_prepared_is_refused():
    model = prepare_for_compile(TinyVL(), {"txt": "word"})
    compiled = torch.compile(model)
    with pytest.raises(advlab.AdvlabValueError, match=r"'img' \(site 'img_proj'\) is not"):
        advlab.VILLA(compiled, sites=SITES).step(lambda: compiled(*tiny_batch()[:4]), _loss(tiny_batch()[4]))


def test_ddp_around_a_compiled_model_is_refused(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = prepare_for_compile(TinyVL(), SITES)
        ddp = torch.nn.parallel.DistributedDataParallel(torch.compile(model))
        with pytest.raises(advlab.AdvlabValueError, match="DistributedDataParallel"):
            advlab.VILLA(ddp, sites=SITES)
    finally:
        dist.destroy_process_group()


def test_first_perturbed_forward_needs_a_known_shape_and_relative_sizes_a_clean_forward():
    model = prepare_for_compile(TinyVL(), SITES)
    ids, img, tm, im, y = tiny_batch(torch.float32)
    freelb = advlab.FreeLB(model, SITES, steps=2)
    with pytest.raises(advlab.AdvlabValueError, match=r"has not run yet.*ft.clean"):
        freelb.step(lambda: model(ids, img, tm, im), _loss(y))
    model(ids, img, tm, im)  # one plain forward: the shapes are known from now on
    freelb.step(lambda: model(ids, img, tm, im), _loss(y))
    relative = {m: advlab.Perturbation(step_size=1e-2, relative=True) for m in SITES}
    with pytest.raises(advlab.AdvlabValueError, match=r"relative=True.*ft.clean"):
        advlab.FreeLB(model, SITES, relative, steps=2).step(lambda: model(ids, img, tm, im), _loss(y))
    advlab.VILLA(model, SITES, relative).step(lambda: model(ids, img, tm, im), _loss(y))


def test_shape_change_without_clean_forward_is_reported():
    model = prepare_for_compile(TinyVL(), SITES)
    ids, img, tm, im, _ = tiny_batch(torch.float32)
    model(ids, img, tm, im)
    ids2, img2, tm2, im2, y2 = tiny_batch(torch.float32, length=7)
    with pytest.raises(advlab.AdvlabValueError, match=r"shape \(4, 5, 8\).*got \(4, 7, 8\).*fixed length"):
        advlab.FreeLB(model, SITES, steps=2).step(lambda: model(ids2, img2, tm2, im2), _loss(y2))
    advlab.VILLA(model, sites=SITES).step(lambda: model(ids2, img2, tm2, im2), _loss(y2))  # a clean forward first


# --------------------------------------------------------------- prepared, not compiled: exact (fast)
@pytest.mark.parametrize(("recipe", "mode"), [("villa", "joint"), ("villa", "alter"), ("villa", "txt"),
                                              ("freelb", "joint"), ("freelb", "alter"), ("smart", "joint")])
def test_prepared_model_equals_plain_hooks_exactly(recipe, mode):
    batch = tiny_batch(torch.float64)
    plain = TinyVL().double()
    prepared = prepare_for_compile(TinyVL().double(), SITES)
    plain(*batch[:4]), prepared(*batch[:4])  # FreeLB's first forward is perturbed: the shapes must be known
    for seed in range(2):
        want = _step(recipe, plain, plain, batch, mode=mode, seed=seed)
        got = _step(recipe, prepared, prepared, batch, mode=mode, seed=seed)
        _assert_same(got, want, atol=0.0)


@pytest.mark.parametrize("method", ["pgd", "apgd"])
def test_attack_on_a_prepared_model_equals_plain_hooks(method):
    ids, img, tm, im, y = tiny_batch(torch.float64)
    losses = []
    for prepare in (False, True):
        model = TinyVL().double()
        if prepare:
            prepare_for_compile(model, SITES)
            model(ids, img, tm, im)  # an attack's first forward is perturbed: the shapes must be known
        result = advlab.attack(
            model, perturbations={m: advlab.Perturbation(radius=0.5, step_size=0.1) for m in SITES}, sites=SITES,
            forward=lambda model=model: model(ids, img, tm, im), loss=lambda out: F.cross_entropy(out, y, reduction="none"),
            masks={"txt": tm, "img": im}, steps=5, method=method, generator=torch.Generator().manual_seed(0))
        losses.append((result.loss, result.clean_loss))
    assert torch.equal(losses[0][0], losses[1][0]) and torch.equal(losses[0][1], losses[1][1])
    assert (losses[0][0] > losses[0][1]).any()  # the attack moved something


class _Siamese(torch.nn.Module):
    """One module called twice per forward (`Site(calls=2)`)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Linear(3, 4)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, a, b):
        return self.head(torch.cat([torch.tanh(self.embed(a)), torch.tanh(self.embed(b))], -1).mean(1))


class _Patches(torch.nn.Module):
    """A convolution's [b, c, h, w] output as the site (`Site(layout="channels_first")`)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.patch = torch.nn.Conv2d(3, 4, kernel_size=2, stride=2)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, pixels, _unused):
        return self.head(torch.tanh(self.patch(pixels)).flatten(2).mean(-1))


@pytest.mark.parametrize(("make", "site", "inputs", "hooked_calls"), [
    (_Siamese, advlab.Site("embed", calls=2), lambda g: (torch.randn(2, 3, 3, generator=g, dtype=torch.float64),
                                                         torch.randn(2, 3, 3, generator=g, dtype=torch.float64)), 8),
    (_Patches, advlab.Site("patch", layout="channels_first"),
     lambda g: (torch.randn(2, 3, 6, 4, generator=g, dtype=torch.float64), None), 4),
])
def test_prepared_site_called_twice_or_with_a_layout_equals_plain_hooks(make, site, inputs, hooked_calls):
    a, b = inputs(torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1])
    results = []
    for prepare in (False, True):
        model = make().double()
        if prepare:
            prepare_for_compile(model, {"x": site})
        init = advlab.UniformSampler(0.1)
        with advlab.free_training(model, {"x": site}, {"x": advlab.Perturbation(0.2, init=init)}, steps=3,
                                  generator=torch.Generator().manual_seed(1)) as ft:
            ft.clean(lambda model=model: model(a, b))
            for _ in ft:
                ft.backward(F.cross_entropy(ft.forward(lambda model=model: model(a, b)), y))
            results.append(([d.detach() for d in ft.deltas("x")], grads(model), ft.hook_calls))
    (d_plain, g_plain, calls_plain), (d_prep, g_prep, calls_prep) = results
    assert calls_plain == calls_prep == {"x": hooked_calls}
    assert all(torch.equal(x, y) for x, y in zip(d_plain, d_prep)) and len(d_prep) == site.calls
    assert all(torch.equal(g_plain[n], g_prep[n]) for n in g_plain)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.0, 10.0))
def test_prepared_model_outside_advlab_and_perturb_sites_are_unchanged(seed, scale):
    gen = torch.Generator().manual_seed(seed)
    plain = TinyVL().double()
    prepared = prepare_for_compile(TinyVL().double(), SITES)
    ids, img, tm, im, _ = tiny_batch(torch.float64, seed=seed % 1000)
    assert torch.equal(prepared(ids, img, tm, im), plain(ids, img, tm, im))
    deltas = {"txt": scale * torch.randn(4, 5, 8, generator=gen, dtype=torch.float64),
              "img": scale * torch.randn(1, 5, generator=gen, dtype=torch.float64)}  # broadcasts
    with advlab.perturb_sites(plain, deltas, sites=SITES):
        want = plain(ids, img, tm, im)
    with advlab.perturb_sites(prepared, deltas, sites=SITES):
        got = prepared(ids, img, tm, im)
    assert torch.equal(got, want)
    assert torch.equal(prepared(ids, img, tm, im), plain(ids, img, tm, im))  # nothing left behind


def test_unprepare_removes_every_hook():
    model = TinyVL()
    before = (len(model._forward_pre_hooks), len(model.word._forward_hooks), len(model.img_proj._forward_pre_hooks))
    prepare_for_compile(model, SITES)
    prepare_for_compile(model, SITES)  # again: nothing added twice
    assert is_prepared(model) and len(model.word._forward_hooks) == before[1] + 1
    unprepare_for_compile(model)
    assert not is_prepared(model)
    after = (len(model._forward_pre_hooks), len(model.word._forward_hooks), len(model.img_proj._forward_pre_hooks))
    assert after == before


# ----------------------------------------------------------------------------- compiled (slow)
def _fresh_dynamo():
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    return counters


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["villa", "freelb"])
def test_compiled_step_equals_eager_with_inductor(recipe):
    """A VILLA step (K = 3, joint) and a FreeLB step compiled with inductor (the default backend) give the
    eager step's parameter and δ gradients within 1e-5 in float32, without a graph break."""
    counters = _fresh_dynamo()
    batch = tiny_batch(torch.float32)
    eager = TinyVL()
    model = prepare_for_compile(TinyVL(), SITES)
    compiled = torch.compile(model)
    eager(*batch[:4]), compiled(*batch[:4])  # the shapes FreeLB's first (perturbed) forward needs
    for seed in range(2):
        got = _step(recipe, model, compiled, batch, seed=seed)
        _assert_same(got, _step(recipe, eager, eager, batch, seed=seed), atol=1e-5)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] <= 2  # clean and perturbed


@pytest.mark.slow
def test_lean_schedule_replays_dropout_in_compiled_graphs():
    """schedule="lean" recomputes the clean forward with the RNG state of the first one. Inductor draws the
    seeds of its random kernels from torch's generator, so the replay gives the same dropout masks: the
    gradients equal the deferred schedule's (dropout 0.3, which changes the gradients from seed to seed)."""
    counters = _fresh_dynamo()
    ids, img, tm, im, y = tiny_batch(torch.float32)
    model = prepare_for_compile(TinyVL(dropout=0.3), SITES)
    compiled = torch.compile(model)

    def step(schedule, seed):
        model.zero_grad()
        torch.manual_seed(seed)
        advlab.VILLA(compiled, sites=SITES, steps=3, schedule=schedule).step(
            lambda: compiled(ids, img, tm, im), _loss(y))
        return grads(model)

    by_seed = [(step("deferred", seed), step("lean", seed)) for seed in range(2)]
    for deferred, lean in by_seed:
        for n in deferred:
            torch.testing.assert_close(lean[n], deferred[n], rtol=0, atol=1e-6)
    assert any(not torch.allclose(by_seed[0][0][n], by_seed[1][0][n]) for n in by_seed[0][0])  # dropout acts
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.slow
def test_zero_recompilations_after_warmup_across_modes():
    """24 steps alternating VILLA joint / alter / text-only, FreeLB, SMART, plain training forwards and
    eval under `error_on_recompile`: no graph is compiled after the warm-up, no graph break. Recompilation
    is decided by dynamo's guards, before the backend: "aot_eager" (AOTAutograd, no code generation) keeps
    the test short; SMART is compared with eager here too."""
    import torch._dynamo

    counters = _fresh_dynamo()
    batch = tiny_batch(torch.float32)
    ids, img, tm, im, _ = batch
    eager = TinyVL()
    model = prepare_for_compile(TinyVL(), SITES)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break would raise
    eager(ids, img, tm, im), compiled(ids, img, tm, im)
    runs = [("villa", "joint"), ("villa", "alter"), ("villa", "txt"), ("freelb", "joint"), ("smart", "joint")]
    for recipe, mode in runs:  # warm-up: each graph variant compiles here, once
        _assert_same(_step(recipe, model, compiled, batch, mode=mode), _step(recipe, eager, eager, batch, mode=mode),
                     atol=1e-5)
    model.eval()
    with torch.no_grad():
        compiled(ids, img, tm, im)
    model.train()
    graphs = counters["stats"]["unique_graphs"]
    assert graphs <= 5  # clean, perturbed (joint and alter share it), text-only, eval; SMART's no-grad clean
    with torch._dynamo.config.patch(error_on_recompile=True):
        for k in range(24):
            recipe, mode = runs[k % len(runs)]
            _step(recipe, model, compiled, batch, mode=mode, seed=k)
            if k % 4 == 0:
                compiled(ids, img, tm, im).sum().backward()  # a plain training forward
            if k % 6 == 0:
                model.eval()
                with torch.no_grad():
                    compiled(ids, img, tm, im)
                model.train()
    assert counters["stats"]["unique_graphs"] == graphs
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.slow
def test_bench_compile_smoke():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_compile.py"), "--quick"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compiled / eager" in proc.stdout and "recompilations after warm-up: 0" in proc.stdout, proc.stdout
