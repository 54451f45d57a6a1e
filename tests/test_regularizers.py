"""The regulariser classes (`advlab.regularizers`) as what they are for: plug-ins a recipe takes.

Each class is its function with the options bound (bit for bit), fits the `Regularizer`
Protocol, and changes a VILLA step exactly as the bound function does when passed as
`regularizer=` (float64 gradients). The divergences' own properties are in
test_properties_regularizers.py.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import advlab
from advlab.regularizers import Regularizer
from tests.strategies import generator, seeds
from tests.tiny_models import TinyVL, grads, tiny_batch

CLASSES = {
    "kl": (advlab.KLRegularizer, advlab.kl_divergence),
    "symmetric_kl": (advlab.SymmetricKLRegularizer, advlab.symmetric_kl),
    "js": (advlab.JSRegularizer, advlab.js_divergence),
}
SITES = {"txt": "word", "img": advlab.Site("img_proj", where="input")}


@pytest.mark.parametrize("name", list(CLASSES))
@given(
    seed=seeds,
    shape=st.sampled_from([(3, 4), (2, 3, 5), (6, 1)]),
    distribution=st.sampled_from(["softmax", "sigmoid"]),
    reduction=st.sampled_from(["batchmean", "mean", "sum", "none"]),
)
def test_each_class_is_its_function_with_the_options_bound(name, seed, shape, distribution, reduction):
    if shape[-1] == 1 and distribution == "softmax":
        distribution = "sigmoid"  # a softmax over one class is refused (test_properties_regularizers.py)
    cls, fn = CLASSES[name]
    gen = generator(seed)
    p, q = (3 * torch.randn(shape, generator=gen) for _ in range(2))
    module = cls(distribution=distribution, reduction=reduction)
    assert isinstance(module, Regularizer)
    assert torch.equal(module(p, q), fn(p, q, distribution=distribution, reduction=reduction))


def _villa_grads(regularizer):
    model = TinyVL().double()
    ids, img, tm, im, y = tiny_batch()
    villa = advlab.VILLA(model, sites=SITES, steps=2, mode="joint", step_size=0.3, kl_weight=1.5,
                         regularizer=regularizer, generator=torch.Generator().manual_seed(0))
    villa.step(lambda: model(ids, img, tm, im), lambda out: F.cross_entropy(out, y), masks={"txt": tm, "img": im})
    return grads(model)


def test_a_class_passed_as_regularizer_changes_the_step_as_its_function_does():
    default = _villa_grads(None)
    symmetric = _villa_grads(advlab.SymmetricKLRegularizer())
    for n in default:  # SymKL(clean, adv) for the default's SymKL(adv, clean): the sum in the other order
        torch.testing.assert_close(symmetric[n], default[n], rtol=0, atol=1e-12)
    for name in ("kl", "js"):
        cls, fn = CLASSES[name]
        as_class = _villa_grads(cls())
        as_function = _villa_grads(functools.partial(fn))
        assert as_class.keys() == default.keys()
        for n in as_class:
            assert torch.equal(as_class[n], as_function[n]), (name, n)
        assert any(not torch.allclose(as_class[n], default[n], rtol=0, atol=1e-8) for n in as_class), name
