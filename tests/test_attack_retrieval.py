"""attack_retrieval and recall_from_ranks: the loss and ranks against a hand computation, targets, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import advlab
from advlab._errors import AdvlabValueError
from advlab.attacks import attack_retrieval, recall_from_ranks
from tests.strategies import generator


def _setup(seed: int = 0, b: int = 6, g: int = 9, d: int = 5, e: int = 4):
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, e)).double()
    gen = generator(seed)
    queries = torch.randn(b, d, generator=gen, dtype=torch.float64)
    gallery = torch.randn(g, e, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, g, (b,), generator=gen)
    return encoder, queries, gallery, targets


SITE = {"q": advlab.Site("0", where="input")}


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("method", ["pgd", "apgd"])
def test_loss_and_ranks_match_a_hand_computation(similarity, method):
    encoder, queries, gallery, targets = _setup()
    tau = 0.5
    out = attack_retrieval(
        encoder, sites=SITE, perturbations={"q": advlab.Perturbation(1.0, radius=3.0)},
        forward=lambda: encoder(queries), gallery=gallery, targets=targets, similarity=similarity,
        temperature=tau, steps=5, method=method,
    )

    def scores(delta):
        q = encoder(queries + delta).detach()
        gal = gallery
        if similarity == "cosine":
            q, gal = F.normalize(q, dim=-1), F.normalize(gallery, dim=-1)
        return q @ gal.t() / tau

    for delta, loss, ranks in [(out.result.deltas["q"], out.result.loss, out.ranks),
                               (torch.zeros_like(queries), out.result.clean_loss, out.clean_ranks)]:
        s = scores(delta)
        torch.testing.assert_close(loss, F.cross_entropy(s, targets, reduction="none"), rtol=0, atol=1e-12)
        true = s.gather(1, targets[:, None])
        assert torch.equal(ranks, (s > true).sum(dim=1))
    assert (out.result.loss >= out.result.clean_loss).all() and (out.result.gain > 0).any()
    assert out.ranks.float().mean() > out.clean_ranks.float().mean()
    assert out.recall(ks=(1, 5)) == recall_from_ranks(out.ranks, ks=(1, 5))


def test_several_true_items_per_query():
    """Bool targets: loss -log of the summed softmax over the true items, rank of the best true item."""
    encoder, queries, gallery, targets = _setup(seed=1)
    positives = F.one_hot(targets, gallery.shape[0]).bool()
    kw = dict(sites=SITE, perturbations={"q": advlab.Perturbation(0.3, radius=0.5)},
              forward=lambda: encoder(queries), gallery=gallery, steps=3)
    by_index = attack_retrieval(encoder, targets=targets, **kw)
    by_mask = attack_retrieval(encoder, targets=positives, **kw)
    torch.testing.assert_close(by_mask.result.loss, by_index.result.loss, rtol=0, atol=1e-12)
    assert torch.equal(by_mask.ranks, by_index.ranks)
    positives[:, 0] = True  # a second true item for every query
    multi = attack_retrieval(encoder, targets=positives, radius=0.0, **kw)
    s = (encoder(queries) @ gallery.t()).detach()
    want = torch.logsumexp(s, 1) - torch.logsumexp(s.masked_fill(~positives, float("-inf")), 1)
    torch.testing.assert_close(multi.result.clean_loss, want, rtol=0, atol=1e-12)
    best = s.masked_fill(~positives, float("-inf")).amax(1, keepdim=True)
    assert torch.equal(multi.clean_ranks, ((s > best) & ~positives).sum(1))


def test_radius_zero_keeps_the_clean_ranking():
    encoder, queries, gallery, targets = _setup(seed=2)
    out = attack_retrieval(encoder, sites=SITE, perturbations={"q": advlab.Perturbation(0.3, radius=0.5)},
                           forward=lambda: encoder(queries), gallery=gallery, targets=targets, radius=0.0)
    assert torch.equal(out.ranks, out.clean_ranks)
    assert out.recall() == out.clean_recall()


def test_recall_from_ranks_counts_ranks_below_k():
    assert recall_from_ranks(torch.tensor([0, 0, 1, 4, 5, 9, 10])) == {1: 2 / 7, 5: 4 / 7, 10: 6 / 7}
    with pytest.raises(AdvlabValueError, match="ks"):
        recall_from_ranks(torch.tensor([0]), ks=(0,))
    with pytest.raises(AdvlabValueError, match="ranks"):
        recall_from_ranks(torch.tensor([[0]]))


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"targets": torch.tensor([0, 1, 2, 3, 4, 99])}, "index the gallery"),
        ({"targets": torch.zeros(6, 9)}, "gallery indices"),
        ({"targets": torch.zeros(6, 9, dtype=torch.bool)}, "at least one true"),
        ({"targets": torch.zeros(6, 4, dtype=torch.bool)}, r"\(6, 9\)"),
        ({"gallery": torch.zeros(9)}, "gallery"),
        ({"gallery": torch.zeros(9, 3, dtype=torch.float64)}, "width"),
        ({"temperature": 0.0}, "temperature"),
        ({"similarity": "l2"}, "similarity"),
    ],
)
def test_errors(over, match):
    encoder, queries, gallery, targets = _setup()
    kw = dict(sites=SITE, perturbations={"q": advlab.Perturbation(0.3, radius=0.5)},
              forward=lambda: encoder(queries), gallery=gallery, targets=targets, steps=1)
    kw.update(over)
    with pytest.raises(AdvlabValueError, match=match):
        attack_retrieval(encoder, **kw)


def test_retrieval_experiment_model_both_directions():
    """The experiment's two-tower model: captions as queries (txt site, padding masked) against clean image
    embeddings, and images as queries against clean caption embeddings; relative sizes, APGD."""
    from advlab.experiments.retrieval import RetrievalConfig, RetrievalModel

    torch.manual_seed(0)
    model = RetrievalModel("uniter", RetrievalConfig(layers=1, proj_dim=8), vocab_size=20, hidden_size=16,
                           num_attention_heads=2, intermediate_size=32, img_dim=6)
    g = generator(0)
    ids = torch.randint(1, 20, (6, 5), generator=g)
    attention = torch.ones(6, 5, dtype=torch.long)
    attention[2, 3:] = 0
    ids[attention == 0] = 0
    feats = torch.randn(6, 5, 6, generator=g)
    boxes = torch.rand(6, 5, 4, generator=g).sort(-1).values
    model.eval()
    with torch.no_grad():
        images, captions = model.encode_image(feats, boxes).itc, model.encode_text(ids, attention).itc
    model.train()
    cases = [("txt", lambda: model.encode_text(ids, attention).itc, images, {"txt": attention.bool()}),
             ("img", lambda: model.encode_image(feats, boxes).itc, captions, None)]
    for mode, forward, gallery, masks in cases:
        out = attack_retrieval(model, perturbations={mode: advlab.Perturbation(0.01, radius=0.05, relative=True)},
                               mode=mode, forward=forward, gallery=gallery, targets=torch.arange(6), masks=masks,
                               temperature=0.05, steps=5, method="apgd")
        assert (out.result.gain > 0).all() and (out.ranks >= out.clean_ranks).float().mean() > 0.5
        if masks is not None:
            assert (out.result.deltas["txt"][2, 3:] == 0).all()
        assert model.training
