"""advlab.attack on real models: the bundled UNITER and LXMERT (tiny random configs) and a Hugging Face
BERT classifier wrapped by site name."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import advlab
from advlab.backbones.lxmert import LxmertConfig, LxmertForGQA
from advlab.backbones.uniter import UniterConfig, UniterForVisualEntailment
from advlab.data.uniter_db import uniter_collate


def _state(model):
    return ({n: p.detach().clone() for n, p in model.named_parameters()},
            {n: p.requires_grad for n, p in model.named_parameters()}, model.training)


def _check(model, before, result, masks, perturbations):
    params, flags, training = before
    assert all(torch.equal(p.detach(), params[n]) and p.requires_grad == flags[n] and p.grad is None
               for n, p in model.named_parameters())
    assert model.training == training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert torch.isfinite(result.loss).all() and (result.loss >= result.clean_loss).all()
    assert (result.gain > 0).all()
    for m, delta in result.deltas.items():
        deltas = delta if isinstance(delta, tuple) else (delta,)
        call_masks = masks[m] if isinstance(masks[m], list) else [masks[m]] * len(deltas)
        for d, mask in zip(deltas, call_masks):
            p = perturbations[m]
            assert advlab.balls.Ball(p.norm, p.radius).contains(d, mask=mask, rtol=1e-5).all()
            assert (d[~mask.bool()] == 0).all()


def _uniter():
    torch.manual_seed(0)
    cfg = UniterConfig.tiny()
    gen = torch.Generator().manual_seed(1)
    rows = [{"input_ids": torch.randint(1, cfg.vocab_size, (t,), generator=gen),
             "img_feat": torch.randn(n, cfg.img_dim, generator=gen), "img_pos_feat": torch.rand(n, 7, generator=gen)}
            for t, n in [(5, 3), (3, 4), (6, 2)]]
    batch = uniter_collate(rows)
    model = UniterForVisualEntailment(cfg).train()
    labels = torch.tensor([0, 2, 1])
    return model, lambda: model(**batch["inputs"]), labels, batch["masks"]


def _lxmert():
    torch.manual_seed(0)
    cfg = LxmertConfig.tiny(visual_feat_dim=16, l_layers=1, r_layers=1, x_layers=1)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.vocab_size, (3, 6), generator=gen)
    txt_mask = torch.ones(3, 6, dtype=torch.bool)
    txt_mask[0, 4:] = False
    ids[~txt_mask] = 0
    img_mask = torch.ones(3, 4, dtype=torch.bool)
    img_mask[1, 3:] = False
    feats = torch.randn(3, 4, cfg.visual_feat_dim, generator=gen) * img_mask[..., None]
    xy = torch.rand(3, 4, 2, generator=gen) * 0.5
    boxes = torch.cat([xy, xy + 0.5 * torch.rand(3, 4, 2, generator=gen)], -1)
    model = LxmertForGQA(cfg, num_answers=7).train()
    labels = torch.tensor([1, 4, 6])

    def forward():
        return model(input_ids=ids, visual_feats=feats, visual_pos=boxes, attention_mask=txt_mask.long(),
                     visual_attention_mask=img_mask.long())

    return model, forward, labels, {"txt": txt_mask, "img": img_mask}


@pytest.mark.parametrize("method", ["pgd", "apgd"])
@pytest.mark.parametrize("make", [_uniter, _lxmert], ids=["uniter", "lxmert"])
def test_bundled_backbones(make, method):
    model, forward, labels, masks = make()
    perts = {"txt": advlab.Perturbation(step_size=0.1, radius=0.5, norm="l2"),
             "img": advlab.Perturbation(step_size=0.1, radius=0.5, norm="l2_token")}
    before = _state(model)
    result = advlab.attack(model, perturbations=perts, forward=forward, masks=masks, steps=5, method=method,
                           loss=lambda out: F.cross_entropy(out.logits, labels, reduction="none"),
                           logits=advlab.free.default_logits)
    _check(model, before, result, masks, perts)
    assert result.modalities == ("txt", "img")
    single = advlab.attack(model, perturbations=perts, forward=forward, masks=masks, steps=5, method=method,
                           mode="img", loss=lambda out: F.cross_entropy(out.logits, labels, reduction="none"))
    assert set(single.deltas) == {"img"} and (single.loss <= result.loss + 1e-6).all()


@pytest.mark.parametrize("method", ["pgd", "apgd"])
def test_hugging_face_bert_by_site_name(method):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16, num_labels=3)
    model = BertForSequenceClassification(cfg).train()
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 60, (4, 7), generator=gen)
    attention = torch.ones(4, 7, dtype=torch.long)
    attention[2, 5:] = 0
    labels = torch.tensor([0, 1, 2, 1])
    perts = {"txt": advlab.Perturbation(step_size=0.2, radius=0.3, norm="linf", direction="sign")}
    masks = {"txt": attention.bool()}
    before = _state(model)
    result = advlab.attack(
        model, sites={"txt": "bert.embeddings.word_embeddings"}, perturbations=perts,
        forward=lambda: model(input_ids=ids, attention_mask=attention), masks=masks, steps=5, method=method,
        loss=lambda out: F.cross_entropy(out.logits, labels, reduction="none"),
    )
    _check(model, before, result, masks, perts)
    # the same δ through inputs_embeds gives the same loss: the site is the word-embedding output
    model.eval()
    with torch.no_grad():
        embeds = model.bert.embeddings.word_embeddings(ids) + result.deltas["txt"]
        again = F.cross_entropy(model(inputs_embeds=embeds, attention_mask=attention).logits, labels, reduction="none")
    torch.testing.assert_close(again, result.loss, rtol=1e-5, atol=1e-6)
