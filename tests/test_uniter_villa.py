"""End to end: each VILLA task preset runs one step on a tiny UNITER with synthetic data."""

import math

import pytest
import torch

import advlab
from advlab.backbones.uniter import (
    UniterConfig,
    UniterForNLVR2,
    UniterForVCR,
    UniterForVisualEntailment,
    UniterForVQA,
    nlvr2_loss,
    vcr_loss,
    ve_loss,
    vqa_loss,
)
from advlab.data.uniter_db import uniter_collate

CFG = UniterConfig.tiny()


def random_rows(gen, txt_lens, nbbs, vocab=CFG.vocab_size):
    rows = []
    for t, n in zip(txt_lens, nbbs):
        rows.append({
            "input_ids": torch.randint(1, vocab, (t,), generator=gen),
            "img_feat": torch.randn(n, CFG.img_dim, generator=gen),
            "img_pos_feat": torch.rand(n, 7, generator=gen),
        })
    return rows


def vqa_task(gen):
    rows = random_rows(gen, [5, 3, 4], [3, 4, 2])
    for row in rows:
        row["target"] = torch.rand(6, generator=gen) * (torch.rand(6, generator=gen) > 0.6)
    batch = uniter_collate(rows)
    return UniterForVQA(CFG, num_answers=6), batch, lambda out: vqa_loss(out, batch["targets"]), set()


def ve_task(gen):
    batch = uniter_collate(random_rows(gen, [4, 6], [2, 3]))
    labels = torch.tensor([0, 2])
    return UniterForVisualEntailment(CFG), batch, lambda out: ve_loss(out, labels), set()


def nlvr2_task(gen):
    # 2 examples -> 4 rows: (sentence, img0), (sentence, img1)
    rows = random_rows(gen, [5, 5, 3, 3], [3, 2, 4, 3])
    rows[1]["input_ids"] = rows[0]["input_ids"]
    rows[3]["input_ids"] = rows[2]["input_ids"]
    batch = uniter_collate(rows)
    labels = torch.tensor([1, 0])
    # paired-attn reads the sequence output, not the pooler
    return UniterForNLVR2(CFG, variant="paired-attn"), batch, lambda out: nlvr2_loss(out, labels), {"uniter.pooler."}


def vcr_task(gen):
    # 1 question x 4 candidates; text type 0 question, 2 answer; ids above the vocabulary are the 81 tags
    rows = random_rows(gen, [6, 5, 7, 6], [3, 3, 3, 3], vocab=CFG.vocab_size + 81)
    for row in rows:
        t = row["input_ids"].shape[0]
        row["txt_type_ids"] = torch.tensor([0] * 3 + [2] * (t - 3))
    batch = uniter_collate(rows)
    labels = torch.tensor([0, 0, 1, 0])
    return UniterForVCR(CFG), batch, lambda out: vcr_loss(out, labels), set()


TASKS = {"vqa-base": vqa_task, "ve": ve_task, "nlvr2": nlvr2_task, "vcr-base": vcr_task}


@pytest.mark.parametrize("mode", [None, "joint", "alter"])
@pytest.mark.parametrize("preset", sorted(TASKS))
def test_villa_step_on_tiny_uniter(preset, mode):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # dropout
    model, batch, loss_fn, unused_prefixes = TASKS[preset](gen)
    overrides = {} if mode is None else {"mode": mode}
    villa = advlab.VILLA.from_preset(preset, model, **overrides)
    inputs = batch["inputs"]
    stats = villa.step(lambda: model(**inputs), loss_fn, masks=batch["masks"])
    assert len(stats.task_loss) == 3
    assert all(math.isfinite(v) for v in stats.task_loss + stats.kl)
    released = advlab.presets.get_preset(preset).mode
    perturbed = {"txt"} if (mode or released) == "txt" else {"txt", "img"}
    assert {m for m, v in stats.delta_norm.items() if v > 0} == perturbed
    unused = ("uniter.img_embeddings.mask_embedding.", *unused_prefixes)  # MRM embedding: pre-training only
    total = 0.0
    for name, p in model.named_parameters():
        if name.startswith(unused):
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, name
            continue
        assert p.grad is not None, f"no gradient on {name}"
        assert torch.isfinite(p.grad).all(), name
        total += float(p.grad.abs().sum())
    assert total > 0


def test_villa_step_matches_plain_training_when_nothing_is_perturbed():
    """K = 1 with zero δ and no KL weight is ordinary training: the same parameter gradient."""
    gen = torch.Generator().manual_seed(1)
    model, batch, loss_fn, _ = vqa_task(gen)
    model.eval()  # no dropout, so both passes see the same function
    inputs = batch["inputs"]
    loss_fn(model(**inputs)).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    villa = advlab.VILLA.from_preset("vqa-base", model, steps=1, kl_weight=0.0)
    villa.step(lambda: model(**inputs), loss_fn, masks=batch["masks"])
    for name, grad in plain.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=1e-5, atol=1e-6)
