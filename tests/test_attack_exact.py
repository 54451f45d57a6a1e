"""attack against plain hand-written loops of PGD and APGD (Croce & Hein 2020) on a tiny float64 model.

The loops below pass δ through the model's own `delta_img` argument (no hooks) and write each
update from its defining equation, per example, with the paper's checkpoint rule.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import advlab
from tests.tiny_models import TinyVL, tiny_batch


def _problem(seed=0):
    model = TinyVL(seed=seed).double().eval()
    ids, img, tm, im, y = tiny_batch()
    mask = im[..., None].to(torch.float64)  # [b, n, 1]

    def f(delta):
        return F.cross_entropy(model(ids, img, tm, im, delta_img=delta), y, reduction="none")

    def f_and_grad(delta):
        delta = delta.detach().requires_grad_(True)
        value = f(delta)
        (grad,) = torch.autograd.grad(value.sum(), delta)
        return value.detach(), grad

    def run(method, **kw):
        return advlab.attack(model, sites={"img": advlab.Site("img_proj", where="input")},
                             forward=lambda: model(ids, img, tm, im), masks={"img": im}, method=method,
                             loss=lambda out: F.cross_entropy(out, y, reduction="none"), **kw)

    return f, f_and_grad, mask, img, run


def _row_norm(x):
    return x.flatten(1).norm(dim=1).reshape(-1, *([1] * (x.dim() - 1)))


def _project_l2(x, eps, mask):
    x = x * mask
    n = _row_norm(x)
    return torch.where(n > eps, x * (eps / n), x)


def _unit(g, mask):
    g = g * mask
    return g / _row_norm(g).clamp_min(1e-8)


def hand_pgd(f_and_grad, f, x0, eps, eta, steps, mask):
    delta = x0
    best_f, best_x = f(torch.zeros_like(x0)).detach(), torch.zeros_like(x0)
    for t in range(steps + 1):
        value, grad = f_and_grad(delta)
        better = value > best_f
        best_f = torch.where(better, value, best_f)
        best_x = torch.where(better[:, None, None], delta, best_x)
        if t < steps:
            delta = _project_l2(delta + eta * _unit(grad, mask), eps, mask)
    return best_f, best_x


def paper_checkpoints(n):
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return [math.ceil(round(q * n, 9)) for q in p]  # w_0 = 0, w_1, ...


def hand_apgd(f_and_grad, f, eps, steps, mask, img):
    """Algorithm 1 of Croce & Hein (2020), one example at a time, L2 ball, start δ = 0.

    Returns the best loss and δ per example (the clean point counts) and the number of halvings.
    """
    b = img.shape[0]
    w = paper_checkpoints(steps)
    out_f, out_x, halvings = [], [], 0
    clean = f(torch.zeros_like(img)).detach()
    for i in range(b):
        def fi(row, i=i):
            full = torch.zeros_like(img)
            full[i] = row[0]
            value, grad = f_and_grad(full)  # rows are independent: loss i depends on δ_i only
            return value[i], grad[i:i + 1]

        m = mask[i:i + 1]
        x = [torch.zeros_like(img[i:i + 1])]
        f0, g0 = fi(x[0])
        vals, grads, eta = [f0], [g0], [2 * eps]
        f_max, x_max, g_max = f0, x[0], g0
        f_max_hist = [f_max]
        best_f, best_x = (clean[i], x[0]) if clean[i] >= f0 else (f0, x[0])
        for k in range(steps):
            z = _project_l2(x[k] + eta[k] * _unit(grads[k], m), eps, m)
            if k == 0:
                nxt = z
            else:
                nxt = _project_l2(x[k] + 0.75 * (z - x[k]) + 0.25 * (x[k] - x[k - 1]), eps, m)
            fn, gn = fi(nxt)
            x.append(nxt)
            vals.append(fn)
            grads.append(gn)
            eta.append(eta[k])
            if fn > best_f:
                best_f, best_x = fn, nxt
            if fn > f_max:
                f_max, x_max, g_max = fn, nxt, gn
            f_max_hist.append(f_max)
            if k + 1 in w[1:] and k + 1 < steps:
                lo = w[w.index(k + 1) - 1]
                rises = sum(1 for s in range(lo, k + 1) if vals[s + 1] > vals[s])
                cond1 = rises < 0.75 * (k + 1 - lo)
                # η^(w_{j-1}) = η^(w_j): the step size in force when reaching w_{j-1} (eta[lo - 1], before
                # any halving there) is the one in force now (eta[k]); i.e. no halving at w_{j-1}
                eta_then = eta[lo - 1] if lo > 0 else eta[0]
                cond2 = eta_then == eta[k] and f_max_hist[lo] == f_max_hist[k + 1]
                if cond1 or cond2:
                    halvings += 1
                    eta[k + 1] = eta[k + 1] / 2
                    x[k + 1], vals[k + 1], grads[k + 1] = x_max, f_max, g_max
        out_f.append(best_f)
        out_x.append(best_x)
    return torch.stack(out_f), torch.cat(out_x), halvings


@pytest.mark.parametrize("steps", [1, 4, 12])
def test_pgd_equals_a_hand_loop(steps):
    f, f_and_grad, mask, img, run = _problem()
    eps, eta = 0.7, 0.3
    want_f, want_x = hand_pgd(f_and_grad, f, torch.zeros_like(img), eps, eta, steps, mask)
    got = run("pgd", perturbations={"img": advlab.Perturbation(step_size=eta, radius=eps)}, steps=steps)
    torch.testing.assert_close(got.loss, want_f, rtol=0, atol=1e-10)
    torch.testing.assert_close(got.deltas["img"], want_x, rtol=0, atol=1e-10)


@pytest.mark.parametrize(("steps", "eps", "seed"), [(5, 0.5, 0), (12, 10.0, 1), (25, 3.0, 2), (25, 0.2, 3), (40, 1.0, 0), (20, 10.0, 3)])
def test_apgd_equals_the_papers_algorithm(steps, eps, seed):
    f, f_and_grad, mask, img, run = _problem(seed)
    want_f, want_x, halvings = hand_apgd(f_and_grad, f, eps, steps, mask, img)
    got = run("apgd", perturbations={"img": advlab.Perturbation(radius=eps)}, steps=steps)
    torch.testing.assert_close(got.loss, want_f, rtol=0, atol=1e-10)
    torch.testing.assert_close(got.deltas["img"], want_x, rtol=0, atol=1e-10)
    if steps >= 12:
        assert halvings > 0  # the step-size rule is exercised, not only the first steps


def test_checkpoints_are_the_papers():
    for n in (1, 5, 12, 20, 25, 100, 1000):
        assert advlab.attacks.apgd_checkpoints(n) == tuple(sorted(set(paper_checkpoints(n)[1:])))


def test_apgd_equals_the_papers_algorithm_on_an_oscillating_loss():
    """A loss with many local maxima along the ball: the second halving condition (step size
    unchanged and no new best since the last checkpoint) fires here, unlike on the tiny model,
    also right after a halving (where it must not count)."""
    g = torch.Generator().manual_seed(11)
    b, d = 16, 3
    torch.manual_seed(11)
    model = nn.Sequential(nn.Identity(), nn.Linear(d, 2)).double()
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    k = torch.rand(b, generator=g, dtype=torch.float64) * 20 + 1
    phase = torch.rand(b, generator=g, dtype=torch.float64) * 6.3

    def loss(out):
        return torch.sin(k * out[:, 0] + phase) + 0.3 * torch.cos(3 * k * out[:, 1]) + 0.05 * out[:, 0]

    def f(delta):
        return loss(model(x + delta))

    def f_and_grad(delta):
        delta = delta.detach().requires_grad_(True)
        value = f(delta)
        (grad,) = torch.autograd.grad(value.sum(), delta)
        return value.detach(), grad

    eps, steps = 0.3, 20
    want_f, want_x, halvings = hand_apgd(f_and_grad, f, eps, steps, torch.ones(b, 1, dtype=torch.float64),
                                         torch.zeros_like(x))
    got = advlab.attack(model, sites={"x": "0"}, perturbations={"x": advlab.Perturbation(radius=eps)},
                        forward=lambda: model(x), loss=loss, steps=steps, method="apgd")
    assert halvings > 0
    torch.testing.assert_close(got.loss, want_f, rtol=0, atol=1e-10)
    torch.testing.assert_close(got.deltas["x"], want_x, rtol=0, atol=1e-10)
