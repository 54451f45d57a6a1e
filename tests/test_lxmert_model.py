"""Architecture, heads, masks and perturbation sites of advlab's LXMERT."""

import pytest
import torch
from torch.testing import assert_close

import advlab
from advlab.backbones.lxmert import (
    MASK_VALUE,
    LxmertClassifierOutput,
    LxmertConfig,
    LxmertForGQA,
    LxmertForNLVR2,
    LxmertForPreTraining,
    LxmertForQuestionAnswering,
    LxmertForVQA,
    LxmertModel,
)

CFG = LxmertConfig.tiny(visual_feat_dim=16)


def batch(cfg=CFG, b=2, t=6, n=5, seed=0, pair=False):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, cfg.vocab_size, (b, t), generator=gen)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[-1, 4:] = 0
    ids[mask == 0] = 0
    lead = (b, 2) if pair else (b,)
    feats = torch.randn(*lead, n, cfg.visual_feat_dim, generator=gen)
    xy = torch.rand(*lead, n, 2, generator=gen) * 0.5
    boxes = torch.cat([xy, xy + 0.4 * torch.rand(*lead, n, 2, generator=gen)], dim=-1)
    return {"input_ids": ids, "visual_feats": feats, "visual_pos": boxes, "attention_mask": mask}


def seeded(cls, *args, seed=0, **kwargs):
    torch.manual_seed(seed)
    return cls(*args, **kwargs).eval()


# ---------------------------------------------------------------- pinned sizes (meta device: no memory, instant)


def test_base_backbone_has_449_keys_and_207936768_parameters():
    with torch.device("meta"):
        model = LxmertModel(LxmertConfig.base())
    assert len(model.state_dict()) == 449
    assert sum(p.numel() for p in model.parameters()) == 207_936_768


def test_base_with_pretraining_heads_has_473_keys_and_228051752_unique_parameters():
    with torch.device("meta"):
        model = LxmertForPreTraining(LxmertConfig.base())
    assert len(model.state_dict()) == 473  # the tied decoder key counted, as in model_LXRT.pth
    unique = sum(p.numel() for p in model.parameters())  # parameters() yields the tied weight once
    assert unique == 228_051_752
    assert round(unique * 4 / 2**20, 2) == 869.95  # the README's "870 MB" of float32
    heads = [k for k in model.state_dict() if not k.startswith("lxmert.")]
    assert len(heads) == 24


def test_base_vqa_parameter_count():
    with torch.device("meta"):
        model = LxmertForVQA(LxmertConfig.base())
    assert sum(p.numel() for p in model.parameters()) == 213_930_297
    assert LxmertForGQA(CFG).num_answers == 1842


def test_base_layer_counts_and_key_example():
    cfg = LxmertConfig.base()
    assert (cfg.l_layers, cfg.r_layers, cfg.x_layers, cfg.hidden_size, cfg.vocab_size) == (9, 5, 5, 768, 30522)
    assert (cfg.visual_feat_dim, cfg.visual_pos_dim) == (2048, 4)
    with torch.device("meta"):
        keys = LxmertModel(cfg).state_dict().keys()
    assert "encoder.x_layers.0.visual_attention.att.query.weight" in keys
    assert not any("lang_attention" in k or "visn_attention" in k for k in keys)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"hidden_size": 30}, "num_attention_heads"),
        ({"l_layers": -1}, "l_layers"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"hidden_dropout_prob": 1.5}, "hidden_dropout_prob"),
        ({"vocab_size": 2.5}, "vocab_size"),
    ],
)
def test_config_rejects_bad_values(kwargs, word):
    with pytest.raises(advlab.AdvlabValueError, match=word):
        LxmertConfig.tiny(**kwargs)


def test_model_rejects_non_config():
    with pytest.raises(advlab.AdvlabTypeError, match="config"):
        LxmertModel({"hidden_size": 32})


# ---------------------------------------------------------------- forward


def test_shapes_hidden_states_and_finite():
    model = seeded(LxmertModel, CFG)
    out = model(**batch(), output_hidden_states=True)
    assert out.language_output.shape == (2, 6, 32)
    assert out.vision_output.shape == (2, 5, 32)
    assert out.pooled_output.shape == (2, 32)
    assert len(out.language_hidden_states) == 4 and len(out.vision_hidden_states) == 4
    assert out.language_hidden_states[-1] is out.language_output
    assert model(**batch()).language_hidden_states is None


@pytest.mark.parametrize(
    "cls, shape",
    [
        (LxmertModel, None),
        (LxmertForVQA, (2, 3129)),
        (LxmertForGQA, (2, 1842)),
        (LxmertForNLVR2, (2, 2)),
        (LxmertForPreTraining, (2, 11)),
    ],
)
def test_every_model_is_finite_and_has_logits(cls, shape):
    model = seeded(cls, CFG)
    out = model(**batch(pair=cls is LxmertForNLVR2))
    if shape is None:
        assert torch.isfinite(out.pooled_output).all(), "Output included NaN or inf"
        return
    assert out.logits.shape == shape
    assert torch.isfinite(out.logits).all(), "Output included NaN or inf"


def test_padded_text_and_objects_do_not_change_real_outputs():
    model = seeded(LxmertModel, CFG)
    b = batch()
    vmask = torch.ones(2, 5, dtype=torch.long)
    vmask[:, 3:] = 0
    ref = model(**b, visual_attention_mask=vmask)
    b2 = {k: v.clone() for k, v in b.items()}
    b2["input_ids"][-1, 4:] = 7  # garbage in padded text slots
    b2["visual_feats"][:, 3:] = 100.0  # garbage in padded objects
    out = model(**b2, visual_attention_mask=vmask)
    assert_close(out.pooled_output, ref.pooled_output, rtol=1e-6, atol=1e-6)
    assert_close(out.language_output[1, :4], ref.language_output[1, :4], rtol=1e-6, atol=1e-6)
    assert_close(out.vision_output[:, :3], ref.vision_output[:, :3], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fully_masked_rows_stay_finite_in_half_precision(dtype):
    # -10000 is finite in fp16; finfo.min + a negative score overflows to -inf and a fully masked row gives NaN.
    assert MASK_VALUE == -10000.0
    model = seeded(LxmertModel, LxmertConfig.tiny(visual_feat_dim=8, l_layers=1, r_layers=1, x_layers=1)).to(dtype)
    b = batch(LxmertConfig.tiny(visual_feat_dim=8), b=1, t=3, n=2)
    out = model(
        b["input_ids"],
        b["visual_feats"].to(dtype),
        b["visual_pos"].to(dtype),
        attention_mask=torch.zeros(1, 3, dtype=torch.long),
        visual_attention_mask=torch.zeros(1, 2, dtype=torch.long),
    )
    assert torch.isfinite(out.language_output).all() and torch.isfinite(out.vision_output).all()


def test_cross_attention_is_shared_both_ways():
    model = seeded(LxmertModel, CFG)
    calls = []
    handle = model.encoder.x_layers[0].visual_attention.register_forward_hook(lambda m, a, o: calls.append(o.shape))
    try:
        model(**batch())
    finally:
        handle.remove()
    assert calls == [torch.Size([2, 6, 32]), torch.Size([2, 5, 32])]  # language side, then vision side


def test_input_errors_name_the_argument():
    model = seeded(LxmertModel, CFG)
    b = batch()
    with pytest.raises(advlab.AdvlabValueError, match="visual_pos"):
        model(b["input_ids"], b["visual_feats"], b["visual_pos"][..., :2])
    with pytest.raises(advlab.AdvlabValueError, match="visual_feats"):
        model(b["input_ids"], b["visual_feats"][..., :8], b["visual_pos"])
    with pytest.raises(advlab.AdvlabValueError, match="exactly one"):
        model(visual_feats=b["visual_feats"], visual_pos=b["visual_pos"])
    with pytest.raises(advlab.AdvlabValueError, match="attention_mask"):
        model(**{**b, "attention_mask": b["attention_mask"][:, :2]})
    with pytest.raises(advlab.AdvlabValueError, match="visual_feats"):
        seeded(LxmertForNLVR2, CFG)(**b)
    with pytest.raises(advlab.AdvlabValueError, match="num_answers"):
        LxmertForQuestionAnswering(CFG, num_answers=0)


def test_position_and_type_row_zero_get_no_gradient_like_the_original():
    model = seeded(LxmertModel, CFG).train()
    model(**batch()).pooled_output.sum().backward()
    emb = model.embeddings
    assert emb.position_embeddings.weight.grad[0].abs().sum() == 0
    assert emb.token_type_embeddings.weight.grad[0].abs().sum() == 0
    assert emb.position_embeddings.weight.grad[1].abs().sum() > 0


def test_nlvr2_concatenates_the_two_pooled_vectors():
    model = seeded(LxmertForNLVR2, CFG)
    b = batch(pair=True)
    out = model(**b)
    p0 = model.lxmert(b["input_ids"], b["visual_feats"][:, 0], b["visual_pos"][:, 0], b["attention_mask"]).pooled_output
    p1 = model.lxmert(b["input_ids"], b["visual_feats"][:, 1], b["visual_pos"][:, 1], b["attention_mask"]).pooled_output
    assert isinstance(out, LxmertClassifierOutput)
    assert_close(out.logits, model.logit_fc(torch.cat([p0, p1], -1)))


def test_pretraining_heads_are_optional_and_tied():
    model = seeded(LxmertForPreTraining, CFG, obj_predict=False, qa=False, matched=False)
    assert not hasattr(model, "obj_predict_head") and not hasattr(model, "answer_head")
    assert model.cls.predictions.decoder.weight is model.lxmert.embeddings.word_embeddings.weight
    out = model(**batch())
    assert out.lm_logits.shape == (2, 6, 99) and out.match_logits is None and out.logits is None
    full = seeded(LxmertForPreTraining, CFG)(**batch())
    assert full.feat_predictions.shape == (2, 5, 16) and full.attr_logits.shape == (2, 5, 7)
    assert full.match_logits.shape == (2, 2)


# ---------------------------------------------------------------- perturbation sites


@pytest.mark.parametrize("cls", [LxmertModel, LxmertForVQA, LxmertForGQA, LxmertForNLVR2, LxmertForPreTraining])
def test_perturbation_sites_resolve_to_the_word_lookup_and_visn_fc(cls):
    model = seeded(cls, CFG)
    resolved = advlab.sites.resolve_sites(model)
    backbone = model if isinstance(model, LxmertModel) else model.lxmert
    assert resolved["txt"][1] is backbone.embeddings.word_embeddings
    assert resolved["img"][1] is backbone.encoder.visn_fc.visn_fc
    assert resolved["txt"][0].where == "output" and resolved["img"][0].where == "input"
    assert isinstance(model, advlab.sites.HasPerturbationSites)
    calls = 2 if cls is LxmertForNLVR2 else 1
    assert resolved["txt"][0].calls == resolved["img"][0].calls == calls


def test_site_perturbations_equal_perturbing_the_inputs():
    """A hook adding d_txt to the lookup / d_img to visn_fc's input == inputs_embeds + d_txt, feats + d_img."""
    model = seeded(LxmertForVQA, CFG, 4)
    b = batch()
    gen = torch.Generator().manual_seed(5)
    d_txt = torch.randn(2, 6, 32, generator=gen)
    d_img = torch.randn(2, 5, 16, generator=gen)
    sites = model.perturbation_sites()
    h1 = sites["txt"].module.register_forward_hook(lambda m, a, o: o + d_txt)
    h2 = sites["img"].module.register_forward_pre_hook(lambda m, a: (a[0] + d_img,) + a[1:])
    try:
        hooked = model(**b).logits
    finally:
        h1.remove()
        h2.remove()
    words = model.lxmert.embeddings.word_embeddings(b["input_ids"])
    direct = model(
        inputs_embeds=words + d_txt,
        visual_feats=b["visual_feats"] + d_img,
        visual_pos=b["visual_pos"],
        attention_mask=b["attention_mask"],
    ).logits
    assert_close(hooked, direct, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(hooked, model(**b).logits)
