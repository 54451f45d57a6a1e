"""torch.amp with advlab on CPU: autocast (bfloat16, float16) and a GradScaler passed to the step.

Checked: δ gradients are divided by the scale before the ascender sees them. Where the ascent
normalises the gradient (VILLA, FreeLB) the scale cancels anyway, so the tests that can fail
without the unscale are the un-normalised ascents: SMART's δ + η g and a raw δ + η g ascender,
bit-identical δ paths for no scaler (or scale 1) and scale 2**16. A non-finite δ gradient skips
the step (counted in stats, gradients put back, scale lowered), and δ is held in float32 while
the site tensor stays in the autocast dtype.
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
    # δ = η g/||g||, entries at most η = 0.3. At scale 1 the float16 backward rounds (and underflows)
    # gradients the scaled run keeps, so the directions differ by float16 rounding: measured at most
    # 1.9e-5 (2-core CPU). Allowed: 2 float16 epsilons of η (2.9e-4); the old bound was 5 % of each entry.
    eta, eps16 = 0.3, torch.finfo(torch.float16).eps
    _assert_traj_close(t1, t2, atol=2 * eps16 * eta, rtol=0)


def test_nonfinite_delta_gradient_skips_the_step_and_lowers_the_scale():
    """A scale (and loss) so large that the scaled gradients overflow: the step is skipped (counted),
    every parameter .grad is put back as it was (None here), and the scaler's scale is lowered by its
    backoff factor, as scaler.step / scaler.update would have done."""
    model = TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    villa = advlab.VILLA(model, sites=SITES, steps=3, mode="joint", step_size=0.3, kl_weight=1.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats = villa.step(lambda: model(ids, img, tm, im), lambda out: F.cross_entropy(out.float(), y) * 1e6,
                           masks={"txt": tm, "img": im}, scaler=scaler)
    assert stats.skipped_steps >= 1
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in stats.task_loss)
    assert all(p.grad is None for p in model.parameters())  # put back: no gradient reaches the optimizer
    assert scaler.get_scale() == 2.0**127 * scaler.get_backoff_factor()
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
        assert ft.skipped_steps >= 1  # the ascent steps with a non-finite δ gradient


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


# -------------------------------------------------------------- unscaling where the gradient's size matters


class _Recorder:
    """Wraps an ascender and records the δ gradient it is given and the δ it returns."""

    def __init__(self, inner):
        self.inner, self.grads, self.deltas, self.inputs = inner, [], [], []

    def __call__(self, delta, grad, *, mask=None, generator=None):
        new = self.inner(delta, grad, mask=mask, generator=generator)
        self.inputs.append((delta.detach().clone(), mask))
        self.grads.append(None if grad is None else grad.detach().clone())
        self.deltas.append(new.detach().clone())
        return new


def _raw_step(eta):
    """An un-normalised ascender: δ + η g (its step grows with the gradient, so with an unremoved scale)."""
    return lambda delta, grad, *, mask=None, generator=None: delta + eta * grad.masked_fill(~mask.unsqueeze(-1), 0.0)


def _smart_run(preset, init_scale, ascender):
    model = TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
    scaler = None if init_scale is None else torch.amp.GradScaler("cpu", init_scale=init_scale)
    rec = _Recorder(ascender)
    smart = advlab.SMART(model, SITES, preset=preset, steps=2, ascender=rec, noise_std=0.1,
                         generator=torch.Generator().manual_seed(3))
    stats = smart.step(lambda: model(ids, img, tm, im), lambda out: F.cross_entropy(out, y),
                       masks={"txt": tm, "img": im}, scaler=scaler)
    if scaler is not None:
        scaler.unscale_(torch.optim.SGD(model.parameters(), lr=0.1))
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return rec, grads, stats


@pytest.mark.parametrize(
    "preset,ascender",
    [
        ("mt-dnn", advlab.SMARTAscender(1.0, 1e-6)),  # SMART's δ + η g: g's size decides the step
        ("paper", _raw_step(1.0)),
    ],
    ids=["smart-eta-g", "raw-eta-g"],
)
def test_scaler_is_removed_from_the_delta_gradient_before_an_unnormalised_ascent(preset, ascender):
    """δ + η g with a GradScaler at 2^16 moves δ exactly as without a scaler: g is divided by the scale.

    Scaling by a power of two is exact in float32 (no overflow or underflow here), so the δ
    path, the gradients the ascender sees and the unscaled parameter gradients are bit-identical.
    Without the unscale, g would be 65536 times larger and η g would dominate δ.
    """
    plain, g_plain, s_plain = _smart_run(preset, None, ascender)
    scaled, g_scaled, s_scaled = _smart_run(preset, 2.0**16, ascender)
    assert s_plain.skipped_steps == s_scaled.skipped_steps == 0
    assert len(plain.deltas) == len(scaled.deltas) == 2 * len(SITES)
    for a, b in zip(plain.grads, scaled.grads):
        assert torch.equal(a, b)
    for a, b in zip(plain.deltas, scaled.deltas):
        assert torch.equal(a, b)
    # the gradient's size reaches δ: the same step with g still scaled by 2^16 lands elsewhere
    for (delta, mask), g, new in zip(plain.inputs, plain.grads, plain.deltas):
        assert not torch.equal(ascender(delta, g * 2.0**16, mask=mask), new)
    assert g_plain.keys() == g_scaled.keys()
    for n in g_plain:
        torch.testing.assert_close(g_scaled[n], g_plain[n], rtol=0, atol=0, msg=lambda s, n=n: f"{n}: {s}")


@pytest.mark.parametrize("mode", ["joint", "alter"])
def test_free_training_with_a_raw_ascender_is_scale_free(mode):
    """free_training (VILLA's loop) with δ + η g: scale 2^16 and scale 1 give the same δ at every step."""
    paths = []
    for init_scale in (1.0, 2.0**16):
        model = TinyVL()
        ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        fwd = lambda: model(ids, img, tm, im)  # noqa: E731
        perts = {m: advlab.Perturbation(0.3) for m in SITES}
        path = []
        with advlab.free_training(model, SITES, perts, steps=3, mode=mode, scaler=scaler, ascender=_raw_step(0.5),
                                  masks={"txt": tm, "img": im}) as ft:
            ft.clean(fwd)
            for step in ft:
                loss = sum(F.cross_entropy(ft.forward(fwd, g), y) for g in step.groups)
                ft.backward(loss)
                path.append([d.detach().clone() for m in ft.modalities for d in ft.deltas(m) if d is not None])
        paths.append(path)
    assert any(float(d.abs().max()) > 1e-4 for d in paths[0][0])  # δ moved
    for a, b in zip(*paths):
        assert len(a) == len(b) > 0
        for da, db in zip(a, b):
            assert torch.equal(da, db)
