"""torch.amp with the recipes on CPU: a GradScaler passed to `step`.

Checked: δ gradients are divided by the scale before the ascender sees them. Where the ascent
normalises the gradient (VILLA, FreeLB) the scale cancels anyway, so the tests that can fail
without the unscale are the un-normalised ascents: SMART's δ + η g and a raw δ + η g ascender,
bit-identical δ paths for no scaler and scale 2**16. A non-finite δ gradient in a VILLA step
skips the step (counted in stats, gradients put back, scale lowered). The engine's own
mixed-precision tests (autocast dtypes, δ in float32, the raw ascender in `free_training`)
are in test_free.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import advlab
from tests.tiny_models import TinyVL, tiny_batch

SITES = {"txt": "word", "img": advlab.Site("img_proj", where="input")}


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
