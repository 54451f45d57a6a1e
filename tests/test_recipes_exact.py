"""FreeLB, SMART and a Hugging Face BERT wrapped by site name, against hand-written loops (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import advlab
from tests.tiny_models import TinyVL, grads, plain_symkl, tiny_batch
from tests.test_villa_exact import assert_grads_equal, official_loop


def freelb_loop(model, batch, *, K, lr, init_mag, norm, max_norm, seed):
    """Hugging Face FreeLB (`run_glue_freelb.py`) on the text modality."""
    ids, img, tm, im, y = batch
    model.zero_grad()
    g = torch.Generator().manual_seed(seed)
    shape = (*ids.shape, model.word.embedding_dim)
    u = torch.rand(shape, generator=g, dtype=torch.float64)
    if norm == "l2":
        dims = tm.sum(1).to(torch.float64) * shape[-1]
        delta = (2 * u - 1) * tm.unsqueeze(-1) * (init_mag / dims.sqrt()).view(-1, 1, 1)
    else:
        delta = (2 * u - 1) * init_mag * tm.unsqueeze(-1)
    for k in range(K):
        delta.requires_grad_()
        out = model(ids, img, tm, im, delta, None)
        (F.cross_entropy(out, y) / K).backward()
        if k == K - 1:
            break
        gr = delta.grad
        B = gr.shape[0]
        if norm == "l2":
            delta = (delta + lr * gr / gr.view(B, -1).norm(dim=1).view(-1, 1, 1).clamp(min=1e-8)).detach()
            if max_norm > 0:
                dn = delta.view(B, -1).norm(dim=1)
                exceed = (dn > max_norm).to(delta.dtype)
                delta = (delta * (max_norm / dn * exceed + (1 - exceed)).view(-1, 1, 1)).detach()
        else:
            delta = (delta + lr * gr / gr.view(B, -1).abs().max(1).values.view(-1, 1, 1).clamp(min=1e-8)).detach()
            if max_norm > 0:
                delta = delta.clamp(-max_norm, max_norm).detach()
    return grads(model)


@pytest.mark.parametrize("norm,max_norm", [("l2", 0.0), ("l2", 0.15), ("linf", 0.0), ("linf", 0.04)])
def test_freelb_matches_hand_written_loop(norm, max_norm):
    model = TinyVL().double()
    ids, img, tm, im, y = batch = tiny_batch()
    ref = freelb_loop(model, batch, K=3, lr=0.1, init_mag=0.2, norm=norm, max_norm=max_norm, seed=3)
    model.zero_grad()
    freelb = advlab.FreeLB(model, {"txt": "word"}, steps=3, step_size=0.1, init_magnitude=0.2, norm=norm,
                           radius=max_norm or None, generator=torch.Generator().manual_seed(3))
    freelb.step(lambda: model(ids, img, tm, im), lambda out: F.cross_entropy(out, y), masks={"txt": tm})
    assert_grads_equal(grads(model), ref, atol=1e-10)


def smart_loop(model, batch, *, K, lr, std, eps, weight, seed):
    """mt-dnn's SMART structure with a plain KL: noise N(0, std²) on the text embedding, K δ-only
    steps δ ← (δ + η g)/(max-abs per token + eps), then task(clean) + w · SymKL with detached targets."""
    ids, img, tm, im, y = batch
    model.zero_grad()
    g = torch.Generator().manual_seed(seed)
    shape = (*ids.shape, model.word.embedding_dim)
    noise = torch.randn(shape, generator=g, dtype=torch.float64) * std * tm.unsqueeze(-1)
    clean = model(ids, img, tm, im)
    for _ in range(K):
        noise.requires_grad_()
        adv = model(ids, img, tm, im, noise, None)
        kl = F.kl_div(F.log_softmax(adv, -1), F.softmax(clean.detach(), -1), reduction="none").sum(-1).mean()
        (gr,) = torch.autograd.grad(kl, noise)
        s = (noise + lr * gr).detach()
        noise = s / (s.abs().amax(-1, keepdim=True) + eps)
    adv = model(ids, img, tm, im, noise, None)
    sym = (F.kl_div(F.log_softmax(adv, -1), F.softmax(clean.detach(), -1), reduction="none").sum(-1).mean()
           + F.kl_div(F.log_softmax(clean, -1), F.softmax(adv.detach(), -1), reduction="none").sum(-1).mean())
    (F.cross_entropy(clean, y) + weight * sym).backward()
    return grads(model)


@pytest.mark.parametrize("steps", [1, 2])
def test_smart_matches_hand_written_loop(steps):
    model = TinyVL().double()
    ids, img, tm, im, y = batch = tiny_batch()
    ref = smart_loop(model, batch, K=steps, lr=0.3, std=0.1, eps=1e-6, weight=2.0, seed=5)
    model.zero_grad()
    smart = advlab.SMART(model, {"txt": "word"}, steps=steps, step_size=0.3, noise_std=0.1, weight=2.0,
                         generator=torch.Generator().manual_seed(5))
    smart.step(lambda: model(ids, img, tm, im), lambda out: F.cross_entropy(out, y), masks={"txt": tm})
    assert_grads_equal(grads(model), ref, atol=1e-10)


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     num_labels=3, attn_implementation="eager")
    torch.manual_seed(0)
    return BertForSequenceClassification(cfg).double().eval()


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_hugging_face_bert_by_site_name(norm):
    """A tiny BertForSequenceClassification, wrapped by the dotted site name, against a loop that
    passes `inputs_embeds = word_embeddings(ids) + δ` (position/type + LayerNorm applied after)."""
    model = _tiny_bert()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 40, (3, 6), generator=g)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0
    y = torch.tensor([0, 2, 1])
    K, lr, w = 3, 0.05, 1.5

    model.zero_grad()
    clean = model(input_ids=ids, attention_mask=mask).logits
    delta = torch.zeros(3, 6, 16, dtype=torch.float64)
    for k in range(K):
        delta.requires_grad_()
        embeds = model.bert.embeddings.word_embeddings(ids) + delta
        out = model(inputs_embeds=embeds, attention_mask=mask).logits
        ((F.cross_entropy(out, y) + w * plain_symkl(out, clean)) / K).backward(retain_graph=True)
        if k == K - 1:
            break
        gr = delta.grad
        denom = gr.flatten(1).norm(dim=1) if norm == "l2" else gr.flatten(1).abs().amax(1)
        delta = (delta + lr * gr / denom.clamp(min=1e-8).view(-1, 1, 1)).detach()
    ref = grads(model)

    model.zero_grad()
    villa = advlab.VILLA(model, sites={"txt": "bert.embeddings.word_embeddings"}, steps=K, step_size=lr, kl_weight=w,
                         norm=norm)
    villa.step(lambda: model(input_ids=ids, attention_mask=mask), lambda out: F.cross_entropy(out.logits, y))
    assert_grads_equal(grads(model), ref, atol=1e-10)


def test_freelb_and_villa_kl0_agree_with_zero_init():
    """FreeLB with zero init is VILLA with no KL term (a cross-check between recipes)."""
    model = TinyVL().double()
    ids, img, tm, im, y = batch = tiny_batch()
    ref = official_loop(model, batch, K=3, mode="txt", lr=0.2, kl_w=0.0)
    model.zero_grad()
    advlab.FreeLB(model, {"txt": "word"}, steps=3, step_size=0.2).step(
        lambda: model(ids, img, tm, im), lambda out: F.cross_entropy(out, y))
    assert_grads_equal(grads(model), ref, atol=1e-10)
