"""torch.amp with advlab on CPU: autocast (bfloat16, float16) and a GradScaler passed to the step.

Checked: δ gradients are unscaled before normalisation (same δ trajectory for scale 1 and 2**16),
a non-finite δ gradient skips that ascent step (counted in stats) and the scaler then skips the
optimizer step, and δ is held in float32 while the site tensor stays in the autocast dtype.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import advlab
from tests.tiny_models import TinyVL, plain_symkl, tiny_batch

SITES = {"txt": "word", "img": advlab.Site("img_proj", where="input")}


def _cpu_autocast_supports(dtype: torch.dtype) -> bool:
    try:
        with torch.autocast("cpu", dtype=dtype):
            y = torch.nn.functional.linear(torch.randn(2, 3), torch.randn(4, 3))
        return y.dtype == dtype
    except Exception:  # pragma: no cover - depends on the build
        return False


def _autocast(dtype: torch.dtype | None):
    return contextlib.nullcontext() if dtype is None else torch.autocast("cpu", dtype=dtype)


def _delta_trajectory(dtype, init_scale, *, mode="joint", steps=3, sites=SITES, hidden=8):
    """Run one free_training step with a GradScaler; return δ after each ascent step and the
    unscaled parameter gradients."""
    model = TinyVL(hidden=hidden)
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    fwd = lambda: model(ids, img, tm, im)  # noqa: E731
    perts = {m: advlab.Perturbation(0.3) for m in sites}
    traj = []
    with _autocast(dtype):
        with advlab.free_training(model, sites, perts, steps=steps, mode=mode, scaler=scaler,
                                  masks={"txt": tm, "img": im} if "img" in sites else None) as ft:
            ft.clean(fwd)
            for step in ft:
                loss = 0.0
                for group in step.groups:
                    out = ft.forward(fwd, group).float()
                    loss = loss + F.cross_entropy(out, y) + 1.5 * plain_symkl(out, step.clean_logits.float())
                ft.backward(loss / (len(step.groups) * ft.steps))
                traj.append({m: [d.detach().clone() for d in ft.deltas(m) if d is not None] for m in ft.modalities})
            skipped = ft.skipped_steps
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler.unscale_(opt)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return traj, grads, skipped


def _assert_traj_close(a, b, atol, rtol):
    assert len(a) == len(b)
    for sa, sb in zip(a, b):
        assert sa.keys() == sb.keys()
        for m in sa:
            assert len(sa[m]) == len(sb[m]) > 0
            for da, db in zip(sa[m], sb[m]):
                assert da.dtype == torch.float32
                torch.testing.assert_close(da, db, atol=atol, rtol=rtol)


@pytest.mark.parametrize("mode", ["joint", "alter"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["float32", "bfloat16"])
def test_delta_updates_identical_for_scale_1_and_2_16(dtype, mode):
    if dtype is not None and not _cpu_autocast_supports(dtype):
        pytest.skip(f"CPU autocast does not support {dtype}")
    t1, g1, s1 = _delta_trajectory(dtype, 1.0, mode=mode)
    t2, g2, s2 = _delta_trajectory(dtype, 2.0**16, mode=mode)
    assert s1 == s2 == 0
    # scaling by a power of two is exact (no overflow / underflow here): bit-identical δ
    _assert_traj_close(t1, t2, atol=0, rtol=0)
    # δ actually moved (else the comparison would be vacuous)
    assert max(d.abs().max().item() for m in t1[0] for d in t1[0][m]) > 1e-3
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], atol=1e-6, rtol=1e-5, msg=lambda s, n=n: f"{n}: {s}")


@pytest.mark.parametrize("mode", ["joint", "alter"])
def test_delta_updates_float16_within_tolerance(mode):
    if not _cpu_autocast_supports(torch.float16):
        pytest.skip("CPU autocast does not support float16 in this build")
    t1, _, s1 = _delta_trajectory(torch.float16, 1.0, mode=mode)
    t2, _, s2 = _delta_trajectory(torch.float16, 2.0**16, mode=mode)
    assert s1 == s2 == 0
    # δ = η g/||g||: entries are O(η / sqrt(n)); float16 gradients differ by rounding/underflow
    _assert_traj_close(t1, t2, atol=5e-3, rtol=5e-2)


def test_nonfinite_delta_gradient_skips_ascent_step_and_scaler_skips_optimizer_step():
    """A scale (and loss) so large that the scaled gradients overflow: the ascent step is skipped (δ unchanged,
    counted), the optimizer step is skipped by the scaler, and the scale is lowered."""
    model = TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    villa = advlab.VILLA(model, sites=SITES, steps=3, mode="joint", step_size=0.3, kl_weight=1.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats = villa.step(lambda: model(ids, img, tm, im), lambda out: F.cross_entropy(out.float(), y) * 1e6,
                           masks={"txt": tm, "img": im}, scaler=scaler)
    assert stats.skipped_steps >= 1
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in stats.task_loss)
    assert any(not torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    scale_before = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < scale_before
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n], atol=0, rtol=0)


def test_skipped_ascent_step_leaves_delta_unchanged():
    model = TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    fwd = lambda: model(ids, img, tm, im)  # noqa: E731
    with advlab.free_training(model, {"txt": "word"}, {"txt": advlab.Perturbation(0.3)}, steps=2,
                              scaler=scaler) as ft:
        ft.clean(fwd)
        for step in ft:
            out = ft.forward(fwd)
            ft.backward(F.cross_entropy(out, y) * 1e3 + plain_symkl(out, step.clean_logits))
            if not step.last:
                assert all(d.abs().max().item() == 0 for d in ft.deltas("txt"))  # zero init, update skipped
        assert ft.skipped_steps == 1


def test_nonfinite_without_scaler_raises_by_default():
    model = TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
    fwd = lambda: model(ids, img, tm, im)  # noqa: E731
    with pytest.raises(advlab.NonFiniteError):
        with advlab.free_training(model, {"txt": "word"}, {"txt": advlab.Perturbation(0.3)}, steps=2) as ft:
            ft.clean(fwd)
            for _ in ft:
                ft.backward(ft.forward(fwd).sum() * float("inf"))


def test_delta_float32_while_site_output_is_bfloat16():
    if not _cpu_autocast_supports(torch.bfloat16):
        pytest.skip("CPU autocast does not support bfloat16")
    model = TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
    seen = []
    handle = model.mix.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    fwd = lambda: model(ids, img, tm, im)  # noqa: E731
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with advlab.free_training(model, {"h": "mix"}, {"h": advlab.Perturbation(0.3)}, steps=2,
                                      scaler=scaler) as ft:
                ft.clean(fwd)
                for step in ft:
                    out = ft.forward(fwd)
                    ft.backward(F.cross_entropy(out.float(), y) + plain_symkl(out.float(), step.clean_logits.float()))
                    deltas = [d for d in ft.deltas("h") if d is not None]
                    assert deltas and all(d.dtype == torch.float32 for d in deltas)
                    if not step.last:
                        assert deltas[0].abs().max().item() > 0
                assert ft.skipped_steps == 0
    finally:
        handle.remove()
    assert seen and all(dt == torch.bfloat16 for dt in seen)
