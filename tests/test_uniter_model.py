import pytest
import torch
from torch.testing import assert_close

from advlab import AdvlabTypeError, AdvlabValueError, Site
from advlab.backbones.uniter import (
    UniterConfig,
    UniterForImageTextRetrieval,
    UniterForNLVR2,
    UniterForVCR,
    UniterForVisualEntailment,
    UniterForVQA,
    UniterModel,
    itm_loss,
    itm_rank_loss,
    nlvr2_loss,
    vcr_loss,
    ve_loss,
    vqa_loss,
    vqa_score,
)

CFG = UniterConfig.tiny()


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.slow
def test_parameter_counts_match_the_reference():
    assert n_params(UniterModel(UniterConfig.base())) == 109_898_752
    assert n_params(UniterForVQA(UniterConfig.base())) == 115_892_281


@pytest.mark.slow
def test_parameter_count_large():
    assert n_params(UniterModel(UniterConfig.large())) == 335_695_872


def test_config_validation_and_presets():
    assert UniterConfig.base().vocab_size == 28996
    assert UniterConfig.base().layer_norm_eps == 1e-12
    assert UniterConfig.large().hidden_size == 1024 and UniterConfig.large().num_attention_heads == 16
    with pytest.raises(AdvlabValueError, match="num_attention_heads"):
        UniterConfig.tiny(num_attention_heads=5)
    with pytest.raises(AdvlabValueError, match="hidden_size"):
        UniterConfig.tiny(hidden_size=0)
    with pytest.raises(TypeError):
        UniterConfig.tiny(hiden_size=8)  # a misspelt field is never ignored
    with pytest.raises(AdvlabTypeError, match="config"):
        UniterModel({"hidden_size": 8})


def make_rows(gen, txt_lens, nbbs, cfg=CFG):
    """Padded rows plus gather_index / attention mask built by the independent reference rule (uniter.md §4)."""
    b, lt, nr = len(txt_lens), max(txt_lens), max(nbbs)
    input_ids = torch.zeros(b, lt, dtype=torch.long)
    img_feat = torch.zeros(b, nr, cfg.img_dim)
    img_pos = torch.zeros(b, nr, 7)
    out = max(t + n for t, n in zip(txt_lens, nbbs))
    gather = torch.arange(out).repeat(b, 1)
    attn = torch.zeros(b, out)
    for i, (t, n) in enumerate(zip(txt_lens, nbbs)):
        input_ids[i, :t] = torch.randint(1, cfg.vocab_size, (t,), generator=gen)
        img_feat[i, :n] = torch.randn(n, cfg.img_dim, generator=gen)
        img_pos[i, :n] = torch.rand(n, 7, generator=gen)
        gather[i, t : t + n] = torch.arange(lt, lt + n)
        attn[i, : t + n] = 1
    return {"input_ids": input_ids, "img_feat": img_feat, "img_pos_feat": img_pos, "attention_mask": attn,
            "gather_index": gather}


def test_padded_batch_equals_each_row_alone():
    gen = torch.Generator().manual_seed(0)
    model = UniterModel(CFG).eval()
    txt_lens, nbbs = [5, 3], [3, 4]
    batch = make_rows(gen, txt_lens, nbbs)
    out = model(**batch).last_hidden_state
    for i, (t, n) in enumerate(zip(txt_lens, nbbs)):
        alone = model(
            input_ids=batch["input_ids"][i : i + 1, :t],
            img_feat=batch["img_feat"][i : i + 1, :n],
            img_pos_feat=batch["img_pos_feat"][i : i + 1, :n],
        ).last_hidden_state
        assert_close(out[i : i + 1, : t + n], alone, rtol=1e-5, atol=1e-5)


def test_image_regions_use_type_row_one_and_no_position_embedding():
    gen = torch.Generator().manual_seed(1)
    model = UniterModel(CFG).eval()
    feat, pos = torch.randn(1, 3, CFG.img_dim, generator=gen), torch.rand(1, 3, 7, generator=gen)
    base = model(img_feat=feat, img_pos_feat=pos).last_hidden_state
    with torch.no_grad():
        model.embeddings.position_embeddings.weight.add_(torch.randn(CFG.hidden_size, generator=gen))
        model.embeddings.token_type_embeddings.weight[0].add_(torch.randn(CFG.hidden_size, generator=gen))
    assert_close(model(img_feat=feat, img_pos_feat=pos).last_hidden_state, base, rtol=0, atol=0)
    with torch.no_grad():
        model.embeddings.token_type_embeddings.weight[1].add_(torch.randn(CFG.hidden_size, generator=gen))
    assert not torch.allclose(model(img_feat=feat, img_pos_feat=pos).last_hidden_state, base)


def test_mask_embedding_adds_row_one_to_masked_regions_only():
    gen = torch.Generator().manual_seed(2)
    emb = UniterModel(CFG).img_embeddings.eval()
    feat, pos = torch.randn(1, 2, CFG.img_dim, generator=gen), torch.rand(1, 2, 7, generator=gen)
    types = torch.zeros(1, 2, CFG.hidden_size)
    with torch.no_grad():
        emb.mask_embedding.weight[0].fill_(3.0)  # row 0 never contributes
    masks = torch.tensor([[True, False]])
    got = emb(feat, pos, types, masks)
    expected = emb(feat + torch.stack([emb.mask_embedding.weight[1].detach(), torch.zeros(CFG.img_dim)])[None], pos, types)
    assert_close(got, expected, rtol=1e-6, atol=1e-6)


HEADS = {
    "vqa": lambda: UniterForVQA(CFG, num_answers=7),
    "ve": lambda: UniterForVisualEntailment(CFG),
    "nlvr2-paired": lambda: UniterForNLVR2(CFG, variant="paired"),
    "nlvr2-triplet": lambda: UniterForNLVR2(CFG, variant="triplet"),
    "nlvr2-paired-attn": lambda: UniterForNLVR2(CFG, variant="paired-attn"),
    "itm": lambda: UniterForImageTextRetrieval(CFG),
    "vcr": lambda: UniterForVCR(CFG),
}
EXPECTED_LOGITS = {"vqa": (4, 7), "ve": (4, 3), "nlvr2-paired": (2, 2), "nlvr2-triplet": (4, 2),
                   "nlvr2-paired-attn": (2, 2), "itm": (4, 1), "vcr": (4, 2)}


@pytest.mark.parametrize("name", sorted(HEADS))
def test_heads_return_finite_logits_and_name_their_sites(name):
    gen = torch.Generator().manual_seed(3)
    model = HEADS[name]()
    out = model(**make_rows(gen, [4, 3, 4, 2], [3, 2, 2, 3]))
    assert tuple(out.logits.shape) == EXPECTED_LOGITS[name]
    assert torch.isfinite(out.logits).all(), "Output included NaN or inf"
    sites = model.perturbation_sites()
    assert set(sites) == {"txt", "img"}
    assert sites["txt"] == Site(model.uniter.embeddings.word_embeddings)
    assert sites["img"].module is model.uniter.img_embeddings.img_linear and sites["img"].where == "input"


@pytest.mark.parametrize("name", ["vqa", "nlvr2-paired-attn", "nlvr2-paired", "vcr", "itm"])
def test_gradients_at_padded_tokens_and_regions_are_exactly_zero(name):
    gen = torch.Generator().manual_seed(4)
    model = HEADS[name]()
    txt_lens, nbbs = [4, 2, 3, 2], [2, 3, 1, 3]
    batch = make_rows(gen, txt_lens, nbbs)
    deltas = {}

    def txt_hook(module, args, output):
        deltas["txt"] = torch.zeros_like(output, requires_grad=True)
        return output + deltas["txt"]

    def img_hook(module, args):
        deltas["img"] = torch.zeros_like(args[0], requires_grad=True)
        return (args[0] + deltas["img"],)

    sites = model.perturbation_sites()
    handles = [sites["txt"].module.register_forward_hook(txt_hook), sites["img"].module.register_forward_pre_hook(img_hook)]
    try:
        out = model(**batch)
    finally:
        for h in handles:
            h.remove()
    (out.logits * torch.randn(out.logits.shape, generator=gen)).sum().backward()
    g_txt, g_img = deltas["txt"].grad, deltas["img"].grad
    for i, (t, n) in enumerate(zip(txt_lens, nbbs)):
        assert torch.count_nonzero(g_txt[i, t:]) == 0
        assert torch.count_nonzero(g_img[i, n:]) == 0
        assert g_txt[i, :t].abs().sum() > 0
        assert g_img[i, :n].abs().sum() > 0


def test_nlvr2_type_table_and_image_type_ids():
    model = UniterForNLVR2(CFG, variant="paired")
    table = model.uniter.embeddings.token_type_embeddings.weight
    assert table.shape[0] == 3
    assert torch.equal(table[2], table[1])
    with pytest.raises(AdvlabValueError, match="even number of rows"):
        model(**make_rows(torch.Generator().manual_seed(0), [3, 3, 3], [2, 2, 2]))


def test_paired_attn_examples_are_independent():
    gen = torch.Generator().manual_seed(5)
    model = UniterForNLVR2(CFG, variant="paired-attn").eval()
    batch = make_rows(gen, [4, 3, 4, 2], [3, 2, 2, 3])
    both = model(**batch).logits
    first = model(**{k: v[:2] for k, v in batch.items()}).logits  # joint length 7 is set by row 0
    assert_close(both[:1], first, rtol=1e-5, atol=1e-5)


def test_vcr_tables():
    model = UniterForVCR(CFG)
    types = model.uniter.embeddings.token_type_embeddings.weight
    assert types.shape[0] == 4 and torch.equal(types[2], types[0]) and torch.equal(types[3], types[0])
    assert model.uniter.embeddings.word_embeddings.weight.shape[0] == CFG.vocab_size + 81


def test_itm_rank_output_starts_as_itm_row_one():
    model = UniterForImageTextRetrieval(CFG)
    assert torch.equal(model.rank_output.weight[0], model.itm_output.weight[1])
    assert torch.equal(model.rank_output.bias, model.itm_output.bias[1:])


def test_unknown_keyword_is_rejected():
    with pytest.raises(AdvlabTypeError, match="targets"):
        UniterForVQA(CFG, num_answers=3)(input_ids=torch.tensor([[2, 3]]), targets=torch.zeros(1, 3))
    with pytest.raises(AdvlabValueError, match="attention_mask"):
        UniterModel(CFG)(input_ids=torch.tensor([[2, 3]]), attention_mask=torch.ones(1, 5))
    with pytest.raises(AdvlabValueError, match="img_feat"):
        UniterModel(CFG)(img_feat=torch.zeros(1, 2, CFG.img_dim + 1), img_pos_feat=torch.zeros(1, 2, 7))


def test_losses_against_independent_formulas():
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(3, 5, generator=gen)
    target = torch.rand(3, 5, generator=gen)
    p = torch.sigmoid(logits)
    manual = -(target * p.log() + (1 - target) * (1 - p).log()).sum(1).mean()
    assert_close(vqa_loss(logits, target), manual, rtol=1e-5, atol=1e-6)
    assert_close(vqa_score(logits, target), target[torch.arange(3), logits.argmax(1)], rtol=0, atol=0)
    ve_logits = torch.randn(2, 3, generator=gen)
    assert_close(ve_loss(ve_logits, torch.tensor([2, 0])), vqa_loss(ve_logits, torch.tensor([[0.0, 0, 1], [1, 0, 0]])))
    two = torch.randn(4, 2, generator=gen)
    labels = torch.tensor([1, 0, 0, 1])
    manual_ce = -(two.log_softmax(1)[torch.arange(4), labels]).mean()
    assert_close(nlvr2_loss(two, labels), manual_ce)
    assert_close(vcr_loss(two, labels[:, None]), manual_ce)
    assert_close(itm_loss(two, labels), manual_ce)
    scores = torch.tensor([[0.0], [1.0], [2.0], [-1.0]])
    s = torch.sigmoid(scores.reshape(2, 2))
    assert_close(itm_rank_loss(scores, 2), torch.clamp(0.2 + s[:, 1] - s[:, 0], min=0).mean())
    with pytest.raises(AdvlabValueError, match="sample_size"):
        itm_rank_loss(scores, 3)
    with pytest.raises(AdvlabValueError, match="targets"):
        vqa_loss(logits, target[:, :2])


def _layer_norm(x, weight, bias, eps):
    """LN over the last dimension, written out: (x - mean) / sqrt(biased variance + eps) * w + b."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


@pytest.mark.parametrize("with_masks", [False, True])
def test_image_embedding_matches_its_equations(with_masks):
    """UniterModel's region embeddings against a float64 hand computation of uniter.md §3:
    LN(LN_img(W_img (f + μ M_1) + b_img) + LN_pos(W_pos p + b_pos) + T_1), read from the model's own
    parameters (random, not the identity LayerNorms of a fresh model)."""
    gen = torch.Generator().manual_seed(5)
    model = UniterModel(CFG).double().eval()
    with torch.no_grad():
        for p in model.img_embeddings.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
        model.embeddings.token_type_embeddings.weight.copy_(
            torch.randn(model.embeddings.token_type_embeddings.weight.shape, generator=gen, dtype=torch.float64))
    feat = torch.randn(2, 3, CFG.img_dim, generator=gen, dtype=torch.float64)
    pos = torch.rand(2, 3, 7, generator=gen, dtype=torch.float64)
    masks = torch.tensor([[True, False, True], [False, False, True]]) if with_masks else None
    seen = []
    handle = model.img_embeddings.register_forward_hook(lambda mod, args, out: seen.append(out))
    try:
        model(img_feat=feat, img_pos_feat=pos, img_masks=masks)
    finally:
        handle.remove()
    e = model.img_embeddings
    eps = CFG.layer_norm_eps
    f = feat if masks is None else feat + masks.unsqueeze(-1).double() * e.mask_embedding.weight[1]
    img = _layer_norm(f @ e.img_linear.weight.T + e.img_linear.bias, e.img_layer_norm.weight, e.img_layer_norm.bias, eps)
    box = _layer_norm(pos @ e.pos_linear.weight.T + e.pos_linear.bias, e.pos_layer_norm.weight, e.pos_layer_norm.bias,
                      eps)
    typ = model.embeddings.token_type_embeddings.weight[1]  # regions: type id 1 of the text table
    expected = _layer_norm(img + box + typ, e.LayerNorm.weight, e.LayerNorm.bias, eps)
    assert len(seen) == 1
    assert_close(seen[0], expected, rtol=1e-12, atol=1e-12)
