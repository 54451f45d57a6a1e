"""Seeded runs repeat exactly across processes: random draws never follow a Python set's order.

String hashing is salted per process (PYTHONHASHSEED), so iterating a set of modality names
gives a different order in different processes. Random δ directions come from one generator,
so the order of draws must be the sites' order, or a seeded noise-control run would change
from one process to the next (it did: the retrieval experiment's noise arm, before the fix).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import advlab
from tests.tiny_models import TinyVL, tiny_batch

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import torch, torch.nn.functional as F, advlab
from tests.tiny_models import TinyVL, tiny_batch
torch.manual_seed(0)
model = TinyVL(seed=0).double()
ids, img, tm, im, y = tiny_batch()
perts = {m: advlab.Perturbation(0.3, direction="random") for m in ("txt", "img")}
sites = {"txt": "word", "img": advlab.Site("img_proj", where="input")}
g = torch.Generator().manual_seed(7)
with advlab.free_training(model, sites, perts, steps=3, mode="MODE", masks={"txt": tm, "img": im}, generator=g) as ft:
    clean = ft.clean(lambda: model(ids, img, tm, im))
    ft.clean_loss(F.cross_entropy(clean, y))
    for step in ft:
        loss = 0
        for group in step.groups:
            out = ft.forward(lambda: model(ids, img, tm, im), group)
            loss = loss + F.cross_entropy(out, y) + advlab.symmetric_kl(out, step.clean_logits)
        ft.backward(loss / (len(step.groups) * ft.steps))
# every element of every gradient, exactly (float.hex), not a per-parameter sum
print([[v.hex() for v in p.grad.flatten().tolist()] for p in model.parameters()])
"""


def _grads_in_fresh_process(hash_seed: int, mode: str) -> str:
    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed)}
    done = subprocess.run([sys.executable, "-c", SCRIPT.replace("MODE", mode)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _salts_giving_both_set_orders() -> list[int]:
    """Two PYTHONHASHSEED values under which the set {"txt", "img"} iterates in opposite orders."""
    by_order: dict[str, int] = {}
    for salt in range(64):
        env = {**os.environ, "PYTHONHASHSEED": str(salt)}
        order = subprocess.run([sys.executable, "-c", "s = set(); s.update(('txt', 'img')); print(list(s))"],
                               env=env, capture_output=True, text=True, check=True).stdout
        by_order.setdefault(order, salt)
        if len(by_order) == 2:
            return list(by_order.values())
    raise AssertionError(f"Expected both set orders within 64 salts, but saw only {list(by_order)}.")


@pytest.mark.slow
def test_random_direction_runs_repeat_across_hash_seeds() -> None:
    salts = _salts_giving_both_set_orders()
    for mode in ("joint", "alter"):
        outs = {_grads_in_fresh_process(s, mode) for s in salts}
        assert len(outs) == 1, f"mode={mode}: seeded runs differ between processes: {outs}"
        grads = eval(outs.pop())  # noqa: S307 - our own script's list of lists of hex strings
        sizes = [p.numel() for p in TinyVL(seed=0).parameters()]
        assert [len(g) for g in grads] == sizes  # full gradients, not sums
        assert any(float.fromhex(v) != 0 for g in grads for v in g)


def _hand_random_direction(shape, mask, g):
    """Unit-L2 random direction per row, written out: N(0, 1) float64 draws, padded elements 0."""
    z = torch.randn(shape, generator=g, dtype=torch.float64) * mask.unsqueeze(-1)
    return z / z.flatten(1).norm(dim=1).clamp_min(1e-8).view(-1, 1, 1)


def test_random_directions_are_drawn_in_site_order() -> None:
    """Hand-written: zero init, then each non-final step adds η · random_direction, drawn txt then img."""
    model = TinyVL(seed=0).double()
    ids, img, tm, im, y = tiny_batch()
    eta = {"txt": 0.3, "img": 0.5}
    perts = {m: advlab.Perturbation(eta[m], direction="random") for m in ("txt", "img")}
    sites = {"txt": "word", "img": advlab.Site("img_proj", where="input")}
    seen: dict[str, list[torch.Tensor]] = {"txt": [], "img": []}
    with advlab.free_training(model, sites, perts, steps=3, mode="joint", masks={"txt": tm, "img": im},
                              generator=torch.Generator().manual_seed(7)) as ft:
        clean = ft.clean(lambda: model(ids, img, tm, im))
        ft.clean_loss(F.cross_entropy(clean, y))
        for _step in ft:
            out = ft.forward(lambda: model(ids, img, tm, im))
            for m in seen:
                seen[m].append(ft.deltas(m)[0].detach().clone())
            ft.backward(F.cross_entropy(out, y) / ft.steps)

    g = torch.Generator().manual_seed(7)
    d_t = torch.zeros(*ids.shape, model.word.embedding_dim, dtype=torch.float64)
    d_i = torch.zeros_like(img)
    for k in range(3):
        torch.testing.assert_close(seen["txt"][k], d_t, rtol=0, atol=1e-12)
        torch.testing.assert_close(seen["img"][k], d_i, rtol=0, atol=1e-12)
        d_t = d_t + eta["txt"] * _hand_random_direction(d_t.shape, tm, g)
        d_i = d_i + eta["img"] * _hand_random_direction(d_i.shape, im, g)


def test_ascend_moves_random_directions_from_the_first_step() -> None:
    """δ-only ascent (`ft.ascend`) moves a "random" δ at every call, as `backward` does, drawn in site
    order; a context whose only δ is random can ascend too."""
    model = TinyVL(seed=0).double()
    ids, img, tm, im, y = tiny_batch()
    fwd = lambda: model(ids, img, tm, im)  # noqa: E731
    sites = {"txt": "word", "img": advlab.Site("img_proj", where="input")}
    masks = {"txt": tm, "img": im}
    for perturbed in (("txt", "img"), ("txt",)):
        perts = {m: advlab.Perturbation(0.3, direction="random") for m in perturbed}
        seen: list[dict[str, torch.Tensor]] = []
        with advlab.free_training(model, {m: sites[m] for m in perturbed}, perts, masks={m: masks[m] for m in perturbed},
                                  generator=torch.Generator().manual_seed(7)) as ft:
            ft.clean(fwd)
            for _ in range(2):
                ft.ascend(F.cross_entropy(ft.forward(fwd), y))
                seen.append({m: ft.deltas(m)[0].detach().clone() for m in perturbed})
            for _step in ft:
                ft.backward(F.cross_entropy(ft.forward(fwd), y))
        g = torch.Generator().manual_seed(7)
        d = {"txt": torch.zeros(*ids.shape, model.word.embedding_dim, dtype=torch.float64), "img": torch.zeros_like(img)}
        for after in seen:
            for m in perturbed:
                d[m] = d[m] + 0.3 * _hand_random_direction(d[m].shape, masks[m], g)
                torch.testing.assert_close(after[m], d[m], rtol=0, atol=1e-12)
