"""Sites (`advlab.sites`): naming the modules to perturb, resolving them, and the errors when a site is wrong.

A site is a module name, a module or a `Site`; a wrong name suggests close ones, and a site tensor
that is not batch-first, or a site the forward never calls, is refused with the site's name.
Layouts (`Site(layout=)`) are in test_site_layouts.py, Hugging Face models in test_hf_sites.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import advlab
from tests.tiny_models import TinyVL, tiny_batch


def test_unknown_site_name_suggests_close_names():
    with pytest.raises(advlab.AdvlabValueError, match=r"'wrd'.*not"):
        advlab.VILLA(TinyVL(), sites={"txt": "wrd"})

def test_site_module_not_in_model():
    with pytest.raises(advlab.AdvlabValueError, match="not part of it"):
        advlab.VILLA(TinyVL(), sites={"txt": nn.Linear(2, 2)})

def test_model_without_sites_or_protocol():
    with pytest.raises(advlab.AdvlabTypeError, match="perturbation_sites"):
        advlab.VILLA(TinyVL())


def test_bad_site_options():
    with pytest.raises(advlab.AdvlabTypeError, match="Site.module"):
        advlab.Site(3)
    with pytest.raises(advlab.AdvlabValueError, match="where"):
        advlab.Site("word", where="inside")
    with pytest.raises(advlab.AdvlabValueError, match="calls"):
        advlab.Site("word", calls=0)


def test_site_tensor_not_batch_first():
    class WrongBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Embedding(5, 3), nn.Linear(3, 2)

        def forward(self, ids):
            return self.b(self.a(ids)).sum(1) + self.b(self.a(ids.T)).sum(0)

    model = WrongBatch()
    ids = torch.tensor([[1, 2, 3], [3, 4, 0]])
    villa = advlab.VILLA(model, sites={"x": "a"})
    with pytest.raises(advlab.AdvlabValueError, match="called 2 times"):
        villa.step(lambda: model(ids), lambda out: out.sum())
    with pytest.raises(advlab.AdvlabValueError, match="batch-first"):
        advlab.VILLA(model, sites={"x": advlab.Site("a", calls=2)}).step(lambda: model(ids), lambda out: out.sum())

def test_one_dimensional_site_tensor():
    model = nn.Sequential(nn.Linear(3, 1), nn.Flatten(0))
    with pytest.raises(advlab.AdvlabValueError, match=r"batch-first.*\(4,\)"):
        advlab.VILLA(model, sites={"x": "1"}).step(lambda: model(torch.ones(4, 3)), lambda out: out.sum())

def test_site_not_called():
    model = TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
    villa = advlab.VILLA(model, sites={"txt": "word", "extra": "head"}, mode="joint")
    with pytest.raises(advlab.AdvlabValueError, match="'head'.*not called"):
        villa.step(lambda: model.word(ids).sum(-1), lambda out: out.sum())
