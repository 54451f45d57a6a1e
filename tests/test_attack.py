"""advlab.attack: analytic optimum on linear models, hypothesis properties, state restoration, errors."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import advlab
from advlab._errors import AdvlabTypeError, AdvlabValueError, NonFiniteError
from tests.strategies import generator
from tests.tiny_models import TinyVL, tiny_batch

ROOT = Path(__file__).resolve().parents[1]
SITES = {"txt": "word", "img": advlab.Site("img_proj", where="input")}


# ---------------------------------------------------------------------------------- linear models
class LinearScore(nn.Module):
    """f(x) = <W, x> + c over positions and features; `embed` (an Identity) is the site."""

    def __init__(self, n: int, d: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Identity()
        self.weight = nn.Parameter(torch.randn(n, d, generator=g, dtype=torch.float64))
        self.bias = nn.Parameter(torch.randn((), generator=g, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.embed(x) * self.weight).sum(dim=(1, 2)) + self.bias


def _linear_case(seed: int = 0, b: int = 6, n: int = 4, d: int = 3):
    g = torch.Generator().manual_seed(seed + 100)
    model = LinearScore(n, d, seed)
    x = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    y = torch.where(torch.rand(b, generator=g) > 0.5, 1.0, -1.0).to(torch.float64)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, 2:] = False
    mask[4, 0] = False
    return model, x, y, mask


def _analytic_shift(w: torch.Tensor, mask: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Worst-case margin decrease per example: eps times the dual norm of W on the real positions."""
    wm = w.unsqueeze(0) * mask.unsqueeze(-1).to(w.dtype)  # [b, n, d]
    if norm == "l2":
        return eps * torch.linalg.vector_norm(wm, dim=(1, 2))  # dual of L2 is L2
    if norm == "linf":
        return eps * wm.abs().sum(dim=(1, 2))  # dual of L-inf is L1
    return eps * torch.linalg.vector_norm(wm, dim=-1).sum(dim=1)  # one L2 ball per position


@pytest.mark.parametrize("method", ["pgd", "apgd"])
@pytest.mark.parametrize("norm", ["l2", "l2_token", "linf"])
def test_linear_model_reaches_the_analytic_worst_case(norm, method):
    """Logistic loss of a linear score: the worst margin in the ball is margin - eps * ||W||_dual (float64)."""
    model, x, y, mask = _linear_case()
    eps = 0.3
    margin = (y * model(x)).detach()
    direction = "sign" if norm == "linf" else "gradient"
    result = advlab.attack(
        model, sites={"x": "embed"},
        perturbations={"x": advlab.Perturbation(step_size=0.05, radius=eps, norm=norm, direction=direction)},
        forward=lambda: model(x), loss=lambda out: F.softplus(-y * out),
        steps=20, masks={"x": mask}, method=method,
    )
    shift = _analytic_shift(model.weight.detach(), mask, norm, eps)
    want = F.softplus(-(margin - shift))
    error = (result.loss - want).abs().max()
    assert error < 1e-6  # the bound
    assert error < 1e-12  # measured 2e-16 to 2e-15: the optimum is a vertex / a sphere point, reached exactly
    # the δ returned gives that loss, and moves the margin by exactly the shift
    delta = result.deltas["x"]
    moved = (y * model(x + delta)).detach()
    torch.testing.assert_close(margin - moved, shift, rtol=0, atol=1e-12)
    assert (delta[~mask] == 0).all()


@pytest.mark.parametrize("method", ["pgd", "apgd"])
@pytest.mark.parametrize("norm", ["l2", "l2_token", "linf"])
def test_relative_radius_reaches_the_analytic_worst_case(norm, method):
    """relative=True: the ball's radius is r times the clean norm of each row (each position for l2_token)."""
    model, x, y, mask = _linear_case(seed=1)
    r = 0.05
    w = model.weight.detach()
    wm = w.unsqueeze(0) * mask.unsqueeze(-1).to(w.dtype)
    xm = x * mask.unsqueeze(-1).to(x.dtype)
    if norm == "l2":
        shift = r * torch.linalg.vector_norm(xm, dim=(1, 2)) * torch.linalg.vector_norm(wm, dim=(1, 2))
    elif norm == "linf":
        shift = r * xm.abs().amax(dim=(1, 2)) * wm.abs().sum(dim=(1, 2))
    else:
        shift = r * (torch.linalg.vector_norm(xm, dim=-1) * torch.linalg.vector_norm(wm, dim=-1)).sum(dim=1)
    pert = advlab.Perturbation(step_size=0.02, radius=r, norm=norm, relative=True,
                               direction="sign" if norm == "linf" else "gradient")
    result = advlab.attack(model, sites={"x": "embed"}, perturbations={"x": pert}, forward=lambda: model(x),
                           loss=lambda out: F.softplus(-y * out), steps=20, masks={"x": mask}, method=method)
    want = F.softplus(-((y * model(x)).detach() - shift))
    assert (result.loss - want).abs().max() < 1e-6
    assert (result.deltas["x"][~mask] == 0).all()


def test_linf_gradient_direction_converges_with_enough_steps():
    """The official g / max|g| direction reaches the L-inf vertex too, once every coordinate is clamped."""
    model, x, y, mask = _linear_case(seed=3)
    eps = 0.2
    w = model.weight.detach()
    steps = int(torch.ceil(eps * w.abs().max() / (0.05 * w.abs().min())).item()) + 1
    result = advlab.attack(
        model, sites={"x": "embed"},
        perturbations={"x": advlab.Perturbation(step_size=0.05, radius=eps, norm="linf")},
        forward=lambda: model(x), loss=lambda out: F.softplus(-y * out), steps=steps, masks={"x": mask},
    )
    want = F.softplus(-((y * model(x)).detach() - _analytic_shift(w, mask, "linf", eps)))
    assert (result.loss - want).abs().max() < 1e-6


def test_two_modalities_joint_add_their_shifts():
    """Joint mode moves both sites at once: the shifts of the two balls add up."""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = LinearScore(2, 3, seed=1), LinearScore(3, 2, seed=2)

        def forward(self, xa, xb):
            return self.a(xa) + self.b(xb)

    model = Two()
    g = torch.Generator().manual_seed(0)
    xa, xb = torch.randn(4, 2, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, 2, generator=g, dtype=torch.float64)
    y = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    perts = {"a": advlab.Perturbation(0.1, radius=0.2), "b": advlab.Perturbation(0.1, radius=0.5, norm="linf", direction="sign")}
    kw = dict(sites={"a": "a.embed", "b": "b.embed"}, perturbations=perts, forward=lambda: model(xa, xb),
              loss=lambda out: F.softplus(-y * out), steps=10)
    ones = {"a": torch.ones(4, 2, dtype=torch.bool), "b": torch.ones(4, 3, dtype=torch.bool)}
    shift_a = _analytic_shift(model.a.weight.detach(), ones["a"], "l2", 0.2)
    shift_b = _analytic_shift(model.b.weight.detach(), ones["b"], "linf", 0.5)
    margin = (y * model(xa, xb)).detach()
    for mode, shift in [("joint", shift_a + shift_b), ("a", shift_a), ("b", shift_b)]:
        for method in ("pgd", "apgd"):
            r = advlab.attack(model, mode=mode, method=method, **kw)
            assert (r.loss - F.softplus(-(margin - shift))).abs().max() < 1e-6, (mode, method)
            assert set(r.deltas) == ({"a", "b"} if mode == "joint" else {mode})


# ---------------------------------------------------------------------------------- properties
def _tiny(seed: int = 0, dropout: float = 0.0):
    model = TinyVL(seed=seed, dropout=dropout).double()
    ids, img, tm, im, y = tiny_batch()
    return model, (ids, img, tm, im), y


def _snapshot(model: nn.Module):
    return (
        {n: p.detach().clone() for n, p in model.named_parameters()},
        {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        {n: m.training for n, m in model.named_modules()},
    )


def _assert_same_state(model: nn.Module, before) -> None:
    params, grads, flags, modes = before
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), params[n]), n
        assert (p.grad is None) == (grads[n] is None), n
        if p.grad is not None:
            assert torch.equal(p.grad, grads[n]), n
        assert p.requires_grad == flags[n], n
    assert {n: m.training for n, m in model.named_modules()} == modes
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, "a hook survived"


def _prepare_state(model: nn.Module, pattern: int) -> None:
    """Mixed flags: some parameters frozen, some with a .grad, one submodule in eval mode."""
    for i, p in enumerate(model.parameters()):
        if (pattern >> (i % 4)) & 1:
            p.requires_grad_(False)
        if (pattern >> ((i + 1) % 4)) & 1:
            p.grad = torch.full_like(p, 0.5 + i)
    model.train()
    if pattern & 1:
        model.head.eval()


@pytest.mark.filterwarnings("ignore:restarts=2 with zero starts")
@given(
    seed=st.integers(0, 2**16),
    norm=st.sampled_from(["l2", "l2_token", "linf"]),
    radius=st.floats(0.01, 3.0),
    method=st.sampled_from(["pgd", "apgd"]),
    mode=st.sampled_from(["joint", "txt", "img"]),
    restarts=st.integers(1, 2),
    steps=st.integers(1, 4),
    init=st.sampled_from(["zero", "sphere", "uniform"]),
    pattern=st.integers(0, 15),
    relative=st.booleans(),
)
def test_properties(seed, norm, radius, method, mode, restarts, steps, init, pattern, relative):
    """δ in every ball, masked positions exactly 0, loss >= clean, the returned δ gives the loss,
    and the model's parameters, .grad, requires_grad and training flags are as before."""
    model, (ids, img, tm, im), y = _tiny(seed % 7)
    _prepare_state(model, pattern)
    before = _snapshot(model)
    sampler = {"zero": advlab.ZeroSampler(), "sphere": advlab.SphereSampler(2 * radius),
               "uniform": advlab.UniformSampler(radius)}[init]
    pert = advlab.Perturbation(step_size=radius / 2, radius=radius, norm=norm, init=sampler, relative=relative,
                               direction="sign" if norm == "linf" else "gradient")
    masks = {"txt": tm, "img": im}
    result = advlab.attack(
        model, sites=SITES, perturbations={"txt": pert, "img": pert},
        forward=lambda: model(ids, img, tm, im), loss=lambda out: F.cross_entropy(out, y, reduction="none"),
        steps=steps, restarts=restarts, mode=mode, masks=masks, method=method, generator=generator(seed),
    )
    _assert_same_state(model, before)
    assert result.loss.shape == result.clean_loss.shape == (4,)
    assert (result.loss >= result.clean_loss).all()
    clean = {"txt": model.word(ids).detach(), "img": img}
    for m, delta in result.deltas.items():
        bound = radius * (advlab.embedding_scale(clean[m], norm, mask=masks[m]) if relative else torch.ones((), dtype=torch.float64))
        size = advlab.balls.row_norm(delta, norm, mask=masks[m])
        assert (size <= bound.reshape(size.shape if relative else ()) * (1 + 1e-12)).all()
        assert (delta[~masks[m]] == 0).all()
    # the δ returned reproduces the loss returned (eval mode, as during the attack)
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), advlab.perturb_sites(model, result.deltas, sites=SITES):
            again = F.cross_entropy(model(ids, img, tm, im), y, reduction="none")
    finally:
        model.train(was)
    torch.testing.assert_close(again, result.loss, rtol=1e-12, atol=1e-12)


@given(seed=st.integers(0, 2**16), method=st.sampled_from(["pgd", "apgd"]), fail_at=st.integers(1, 4),
       pattern=st.integers(0, 15))
def test_state_restored_after_an_exception_in_forward(seed, method, fail_at, pattern):
    model, (ids, img, tm, im), y = _tiny(seed % 5)
    _prepare_state(model, pattern)
    before = _snapshot(model)
    calls = []

    def forward():
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("boom")
        return model(ids, img, tm, im)

    with pytest.raises(RuntimeError, match="boom"):
        advlab.attack(model, sites=SITES, perturbations={"txt": advlab.Perturbation(0.1, radius=0.5)},
                      forward=forward, loss=lambda out: F.cross_entropy(out, y, reduction="none"),
                      steps=5, method=method, masks={"txt": tm})
    _assert_same_state(model, before)


@given(seed=st.integers(0, 2**16), norm=st.sampled_from(["l2", "l2_token", "linf"]),
       method=st.sampled_from(["pgd", "apgd"]), mode=st.sampled_from(["joint", "txt"]))
def test_radius_zero_is_clean_exactly(seed, norm, method, mode):
    model, (ids, img, tm, im), y = _tiny(seed % 5)
    pert = advlab.Perturbation(0.1, radius=1.0, norm=norm, init=advlab.SphereSampler(1.0))
    result = advlab.attack(
        model, sites=SITES, perturbations={"txt": pert, "img": pert}, radius=0.0, mode=mode,
        forward=lambda: model(ids, img, tm, im), loss=lambda out: F.cross_entropy(out, y, reduction="none"),
        method=method, generator=generator(seed),
    )
    assert torch.equal(result.loss, result.clean_loss)
    assert all((d == 0).all() for d in result.deltas.values())
    assert result.forwards == 1 and result.modalities == ()
    model.eval()
    with torch.no_grad():
        plain = F.cross_entropy(model(ids, img, tm, im), y, reduction="none")
    assert torch.equal(result.clean_loss, plain)


def test_radius_zero_for_one_modality_leaves_it_unperturbed():
    model, (ids, img, tm, im), y = _tiny()
    pert = advlab.Perturbation(0.2, radius=0.5)
    result = advlab.attack(
        model, sites=SITES, perturbations={"txt": pert, "img": pert}, radius={"txt": 0.0},
        forward=lambda: model(ids, img, tm, im), loss=lambda out: F.cross_entropy(out, y, reduction="none"),
    )
    assert (result.deltas["txt"] == 0).all() and result.deltas["img"].abs().sum() > 0
    assert result.modalities == ("img",)
    only_img = advlab.attack(
        model, sites=SITES, perturbations={"img": pert}, mode="img",
        forward=lambda: model(ids, img, tm, im), loss=lambda out: F.cross_entropy(out, y, reduction="none"),
    )
    torch.testing.assert_close(result.loss, only_img.loss, rtol=0, atol=0)


def test_restarts_keep_the_per_example_worst():
    """restarts=3 equals the elementwise max of three single-restart runs drawing from the same generator."""
    model, (ids, img, tm, im), y = _tiny(1)
    pert = advlab.Perturbation(0.05, radius=0.4, init=advlab.SphereSampler(0.4))
    kw = dict(sites=SITES, perturbations={"txt": pert, "img": pert}, forward=lambda: model(ids, img, tm, im),
              loss=lambda out: F.cross_entropy(out, y, reduction="none"), steps=3, masks={"txt": tm, "img": im})
    three = advlab.attack(model, restarts=3, generator=generator(5), **kw)
    g = generator(5)
    singles = [advlab.attack(model, restarts=1, generator=g, **kw) for _ in range(3)]
    worst = torch.stack([s.loss for s in singles]).max(dim=0).values
    assert torch.equal(three.loss, worst)
    assert len({tuple(s.loss.tolist()) for s in singles}) == 3  # the restarts did differ
    pick = torch.stack([s.loss for s in singles]).argmax(dim=0)
    for i in range(4):
        assert torch.equal(three.deltas["img"][i], singles[int(pick[i])].deltas["img"][i])


def test_restarts_with_zero_start_warn():
    model, (ids, img, tm, im), y = _tiny()
    with pytest.warns(UserWarning, match="random `init`"):
        advlab.attack(model, sites=SITES, perturbations={"txt": advlab.Perturbation(0.1, radius=0.5)},
                      forward=lambda: model(ids, img, tm, im), restarts=2, steps=1,
                      loss=lambda out: F.cross_entropy(out, y, reduction="none"))


def test_eval_mode_during_the_attack_and_opt_out():
    model, (ids, img, tm, im), y = _tiny(dropout=0.5)
    model.train()
    seen = []

    def forward():
        seen.append((model.training, model.drop.training, any(p.requires_grad for p in model.parameters())))
        return model(ids, img, tm, im)

    kw = dict(sites=SITES, perturbations={"txt": advlab.Perturbation(0.1, radius=0.5)}, forward=forward,
              loss=lambda out: F.cross_entropy(out, y, reduction="none"), steps=2)
    r1 = advlab.attack(model, **kw)
    assert set(seen) == {(False, False, False)} and model.training and model.drop.training
    r2 = advlab.attack(model, **kw)
    assert torch.equal(r1.loss, r2.loss)  # no dropout in eval mode: repeatable
    seen.clear()
    advlab.attack(model, eval_mode=False, **kw)
    assert set(seen) == {(True, True, False)} and model.training


def test_no_parameter_gradient_is_computed():
    """requires_grad is off inside the attack, so no .grad is created and none is changed."""
    model, (ids, img, tm, im), y = _tiny()
    model.head.weight.grad = torch.ones_like(model.head.weight)
    advlab.attack(model, sites=SITES, perturbations={"img": advlab.Perturbation(0.1, radius=0.5)},
                  forward=lambda: model(ids, img, tm, im), mode="img",
                  loss=lambda out: F.cross_entropy(out, y, reduction="none"))
    assert torch.equal(model.head.weight.grad, torch.ones_like(model.head.weight))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "head.weight")


def test_works_under_no_grad_and_keeps_logits():
    model, (ids, img, tm, im), y = _tiny()
    with torch.no_grad():
        r = advlab.attack(model, sites=SITES, perturbations={"txt": advlab.Perturbation(0.2, radius=0.5)},
                          forward=lambda: model(ids, img, tm, im), logits=advlab.free.default_logits,
                          loss=lambda out: F.cross_entropy(out, y, reduction="none"), masks={"txt": tm})
    assert (r.loss > r.clean_loss).any()
    torch.testing.assert_close(F.cross_entropy(r.logits, y, reduction="none"), r.loss, rtol=0, atol=0)
    torch.testing.assert_close(F.cross_entropy(r.clean_logits, y, reduction="none"), r.clean_loss, rtol=0, atol=0)


def test_site_called_twice_gets_one_delta_per_call():
    class Siamese(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(3, 3).double()
            self.head = nn.Linear(6, 2).double()

        def forward(self, a, b):
            return self.head(torch.cat([self.embed(a), self.embed(b)], dim=-1))

    model = Siamese()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 3, generator=g, dtype=torch.float64), torch.randn(3, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 1])
    r = advlab.attack(model, sites={"x": advlab.Site("embed", calls=2)},
                      perturbations={"x": advlab.Perturbation(0.5, radius=0.3)}, forward=lambda: model(a, b),
                      loss=lambda out: F.cross_entropy(out, y, reduction="none"), steps=3, method="apgd")
    assert isinstance(r.deltas["x"], tuple) and len(r.deltas["x"]) == 2
    assert all(torch.linalg.vector_norm(d, dim=-1).max() <= 0.3 + 1e-12 for d in r.deltas["x"])
    assert all(d.abs().sum() > 0 for d in r.deltas["x"])


def test_apgd_beats_pgd_with_a_too_small_step():
    """Same budget: PGD with a step 100x too small barely moves; APGD sets its own step (2 eps) and does not."""
    model, (ids, img, tm, im), y = _tiny(2)
    pert = advlab.Perturbation(step_size=1e-3, radius=1.0)
    kw = dict(sites=SITES, perturbations={"txt": pert, "img": pert}, forward=lambda: model(ids, img, tm, im),
              loss=lambda out: F.cross_entropy(out, y, reduction="none"), steps=10, masks={"txt": tm, "img": im})
    pgd, apgd = advlab.attack(model, **kw), advlab.attack(model, method="apgd", **kw)
    assert pgd.forwards == apgd.forwards == 11
    assert (apgd.gain > 10 * pgd.gain).all()


# ---------------------------------------------------------------------------------- determinism
SCRIPT = """
import torch, torch.nn.functional as F, advlab
from tests.tiny_models import TinyVL, tiny_batch
model = TinyVL(seed=0).double()
ids, img, tm, im, y = tiny_batch()
pert = advlab.Perturbation(0.1, radius=0.5, init=advlab.SphereSampler(0.5))
r = advlab.attack(model, sites={"txt": "word", "img": advlab.Site("img_proj", where="input")},
                  perturbations={"img": pert, "txt": pert}, forward=lambda: model(ids, img, tm, im),
                  loss=lambda out: F.cross_entropy(out, y, reduction="none"), steps=3, restarts=2,
                  method="METHOD", masks={"txt": tm, "img": im}, generator=torch.Generator().manual_seed(SEED))
print(r.loss.tolist(), r.deltas["txt"].sum().item(), r.deltas["img"].sum().item())
"""


@pytest.mark.parametrize("method", ["pgd", "apgd"])
def test_same_generator_same_result_in_a_fresh_process(method):
    def run(seed: int, hashseed: str) -> str:
        code = SCRIPT.replace("METHOD", method).replace("SEED", str(seed))
        env = {"PYTHONHASHSEED": hashseed, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                             check=True)
        return out.stdout

    first, second, other = run(3, "1"), run(3, "2"), run(4, "1")
    assert first == second
    assert first != other


# ---------------------------------------------------------------------------------- errors
def _kw(model, inputs, y, **over):
    ids, img, tm, im = inputs
    kw = dict(sites=SITES, perturbations={"txt": advlab.Perturbation(0.1, radius=0.5)},
              forward=lambda: model(ids, img, tm, im), loss=lambda out: F.cross_entropy(out, y, reduction="none"),
              steps=2)
    kw.update(over)
    return kw


@pytest.mark.parametrize(
    ("over", "error", "match"),
    [
        ({"perturbations": {"txt": advlab.Perturbation(0.1)}}, AdvlabValueError, "radius for modality 'txt'"),
        ({"loss": lambda out: F.cross_entropy(out, torch.tensor([0, 1, 2, 0]))}, AdvlabValueError,
         r"reduction='none'"),
        ({"loss": lambda out: out}, AdvlabValueError, r"shape \(4,\)"),
        ({"loss": lambda out: 1.0}, AdvlabTypeError, "per-example losses"),
        ({"perturbations": {"audio": advlab.Perturbation(0.1, radius=0.5)}}, AdvlabValueError, "audio"),
        ({"perturbations": {"txt": "l2"}}, AdvlabTypeError, "advlab.Perturbation"),
        ({"mode": "txt", "perturbations": {"txt": advlab.Perturbation(0.1, radius=0.5),
                                           "audio": advlab.Perturbation(0.1, radius=0.5)}}, AdvlabValueError,
         r"\['audio'\] have none"),
        ({"perturbations": {}}, AdvlabValueError, "non-empty"),
        ({"mode": "alter"}, AdvlabValueError, "training schedule"),
        ({"mode": "img"}, AdvlabValueError, "one perturbed modality"),
        ({"method": "fgsm"}, AdvlabValueError, "method"),
        ({"steps": 0}, AdvlabValueError, "steps"),
        ({"restarts": 0}, AdvlabValueError, "restarts"),
        ({"radius": -1.0}, AdvlabValueError, "radius"),
        ({"radius": {"img": 1.0}}, AdvlabValueError, "radius"),
        ({"radius": float("inf")}, AdvlabValueError, "radius"),
        ({"step_size": -0.1}, AdvlabValueError, "step_size"),
        ({"forward": 3}, AdvlabTypeError, "forward"),
        ({"logits": lambda out: out[:2]}, AdvlabValueError, "4 rows"),
        ({"generator": 0}, AdvlabTypeError, "generator"),
        ({"eval_mode": "yes"}, AdvlabTypeError, "eval_mode"),
        ({"method": "apgd", "perturbations": {"txt": advlab.Perturbation(0.1, radius=0.5, direction="random")}},
         AdvlabValueError, "random"),
        ({"perturbations": {"txt": advlab.Perturbation(0.1, radius=0.5, init=lambda like, **kw: like[:1])}},
         AdvlabValueError, "sampler"),
        ({"masks": {"txt": torch.ones(4, 2, dtype=torch.bool)}}, AdvlabValueError, "masks"),
    ],
)
def test_errors_are_clear(over, error, match):
    model, inputs, y = _tiny()
    before = _snapshot(model)
    with pytest.raises(error, match=match):
        advlab.attack(model, **_kw(model, inputs, y, **over))
    _assert_same_state(model, before)


def test_nonfinite_loss_raises():
    model, inputs, y = _tiny()
    ids, img, tm, im = inputs
    calls = []

    def loss(out):
        calls.append(1)
        v = F.cross_entropy(out, y, reduction="none")
        return v if len(calls) < 3 else v * float("nan")

    with pytest.raises(NonFiniteError, match="step 2"):
        advlab.attack(model, **_kw(model, inputs, y, loss=loss, steps=3))
    with pytest.raises(NonFiniteError, match="clean"):
        advlab.attack(model, **_kw(model, inputs, y, loss=lambda out: F.cross_entropy(out, y, reduction="none") / 0))


def test_inference_mode_is_refused():
    model, inputs, y = _tiny()
    with torch.inference_mode(), pytest.raises(AdvlabValueError, match="inference_mode"):
        advlab.attack(model, **_kw(model, inputs, y))


@pytest.mark.parametrize("method", ["pgd", "apgd"])
def test_bfloat16_model(method):
    """δ is held in float32 on a bfloat16 site; the attack still raises the loss of every example."""
    model = TinyVL(seed=0).to(torch.bfloat16)
    ids, img, tm, im, y = tiny_batch(dtype=torch.bfloat16)
    result = advlab.attack(
        model, sites=SITES, perturbations={m: advlab.Perturbation(0.1, radius=0.5) for m in ("txt", "img")},
        forward=lambda: model(ids, img, tm, im), loss=lambda out: F.cross_entropy(out.float(), y, reduction="none"),
        masks={"txt": tm, "img": im}, method=method,
    )
    assert result.deltas["txt"].dtype == result.deltas["img"].dtype == torch.float32
    assert (result.gain > 0).all()
    assert all(p.dtype == torch.bfloat16 and p.requires_grad for p in model.parameters())


def test_channels_first_site_and_replay():
    """A conv site read channels-first: δ comes back as [b, h*w, c], per-patch L2 balls hold, and
    perturb_sites replays it to the loss the attack reported."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 2, stride=2), nn.Flatten(), nn.Linear(16, 3)).double()
    g = generator(0)
    x = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1])
    site = {"img": advlab.Site("0", layout="channels_first")}
    result = advlab.attack(model, sites=site, perturbations={"img": advlab.Perturbation(0.2, radius=0.3, norm="l2_token")},
                           forward=lambda: model(x), loss=lambda out: F.cross_entropy(out, y, reduction="none"), steps=5)
    delta = result.deltas["img"]
    assert delta.shape == (5, 4, 4)  # [b, h*w, c]
    assert (torch.linalg.vector_norm(delta, dim=-1) <= 0.3 * (1 + 1e-12)).all()
    model.eval()
    with torch.no_grad(), advlab.perturb_sites(model, result.deltas, sites=site):
        again = F.cross_entropy(model(x), y, reduction="none")
    torch.testing.assert_close(again, result.loss, rtol=0, atol=1e-12)


def test_warns_when_delta_rounds_away_at_a_bfloat16_site():
    model = TinyVL(seed=0).to(torch.bfloat16)
    ids, img, tm, im, y = tiny_batch(dtype=torch.bfloat16)
    kw = dict(sites=SITES, forward=lambda: model(ids, img, tm, im), masks={"txt": tm, "img": im}, steps=2,
              loss=lambda out: F.cross_entropy(out.float(), y, reduction="none"), mode="txt")
    with pytest.warns(RuntimeWarning, match="modality 'txt'"):
        advlab.attack(model, perturbations={"txt": advlab.Perturbation(1e-5, radius=1e-5)}, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        advlab.attack(model, perturbations={"txt": advlab.Perturbation(1e-2, radius=1e-2, relative=True)}, **kw)
