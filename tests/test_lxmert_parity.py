"""advlab's LXMERT against transformers' LxmertModel (eager, offline), with the same random weights."""

import os
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
import transformers
from torch.testing import assert_close

from advlab.backbones.lxmert import LxmertConfig, LxmertForPreTraining, LxmertForQuestionAnswering, LxmertModel

TOL = {"rtol": 1e-5, "atol": 1e-5}


def hf_config(cfg: LxmertConfig) -> transformers.LxmertConfig:
    hf = transformers.LxmertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        l_layers=cfg.l_layers,
        x_layers=cfg.x_layers,
        r_layers=cfg.r_layers,
        visual_feat_dim=cfg.visual_feat_dim,
        visual_pos_dim=cfg.visual_pos_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        type_vocab_size=cfg.type_vocab_size,
        num_qa_labels=cfg.num_qa_labels,
        num_object_labels=cfg.num_object_labels,
        num_attr_labels=cfg.num_attr_labels,
    )
    hf._attn_implementation = "eager"  # LXMERT is eager-only in 5.24; set anyway so a future SDPA path is not used
    return hf


def randomise_(model: torch.nn.Module, seed: int) -> None:
    """Every parameter, LayerNorm gains and biases included, so the comparison cannot pass trivially."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            p.copy_(noise + 1.0 if name.endswith("LayerNorm.weight") or "layer_norm.weight" in name else noise)


def inputs(cfg: LxmertConfig, b: int = 3, t: int = 9, n: int = 7, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, cfg.vocab_size, (b, t), generator=gen)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 5:] = 0  # padded text
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    vmask = torch.ones(b, n, dtype=torch.long)
    vmask[0, -1] = 0  # one padded object
    vmask[2, 4:] = 0
    feats = torch.randn(b, n, cfg.visual_feat_dim, generator=gen) * vmask[..., None]
    xy = torch.rand(b, n, 2, generator=gen) * 0.5
    wh = torch.rand(b, n, 2, generator=gen) * 0.5
    boxes = torch.cat([xy, xy + wh], dim=-1)  # normalised x1, y1, x2, y2 in [0, 1]
    types = torch.zeros(b, t, dtype=torch.long)
    types[0, 4:] = 1
    return {
        "input_ids": ids,
        "visual_feats": feats,
        "visual_pos": boxes,
        "attention_mask": mask,
        "visual_attention_mask": vmask,
        "token_type_ids": types,
    }


def check_backbone(cfg: LxmertConfig, t: int, n: int) -> None:
    hf = transformers.LxmertModel(hf_config(cfg)).eval()
    randomise_(hf, seed=1)
    ours = LxmertModel.from_pretrained(hf.state_dict(), config=cfg)
    assert list(ours.state_dict()) == list(hf.state_dict())  # key for key, same order
    batch = inputs(cfg, t=t, n=n)
    with torch.no_grad():
        ref = hf(**batch, output_hidden_states=True)
        out = ours(**batch, output_hidden_states=True)
    assert_close(out.language_output, ref.language_output, **TOL)
    assert_close(out.vision_output, ref.vision_output, **TOL)
    assert_close(out.pooled_output, ref.pooled_output, **TOL)
    assert len(out.language_hidden_states) == len(ref.language_hidden_states) == cfg.l_layers + cfg.x_layers
    assert len(out.vision_hidden_states) == len(ref.vision_hidden_states) == cfg.r_layers + cfg.x_layers
    for mine, theirs in zip(
        out.language_hidden_states + out.vision_hidden_states, ref.language_hidden_states + ref.vision_hidden_states
    ):
        assert_close(mine, theirs, **TOL)


def test_tiny_backbone_matches_transformers_with_masks_and_padding():
    check_backbone(LxmertConfig.tiny(), t=9, n=7)


def test_tiny_backbone_without_visual_mask_matches():
    cfg = LxmertConfig.tiny(l_layers=1, x_layers=3, r_layers=0, visual_feat_dim=16)
    hf = transformers.LxmertModel(hf_config(cfg)).eval()
    randomise_(hf, seed=2)
    ours = LxmertModel.from_pretrained(hf.state_dict(), config=cfg)
    batch = inputs(cfg)
    batch.pop("visual_attention_mask")
    batch.pop("token_type_ids")
    with torch.no_grad():
        assert_close(ours(**batch).pooled_output, hf(**batch).pooled_output, **TOL)


def test_inputs_embeds_path_matches_input_ids():
    cfg = LxmertConfig.tiny(visual_feat_dim=16)
    ours = LxmertModel(cfg).eval()
    batch = inputs(cfg)
    with torch.no_grad():
        ref = ours(**batch).language_output
        embeds = ours.embeddings.word_embeddings(batch.pop("input_ids"))
        assert torch.equal(ours(inputs_embeds=embeds, **batch).language_output, ref)


def test_pretraining_heads_match_transformers_original_names():
    cfg = LxmertConfig.tiny()
    hf = transformers.LxmertForPreTraining(hf_config(cfg)).eval()
    randomise_(hf, seed=3)
    original = {"module." + k.replace("lxmert.", "bert.", 1): v for k, v in hf.state_dict().items()}
    ours = LxmertForPreTraining.from_pretrained(original, config=cfg)
    assert list(ours.state_dict()) == list(hf.state_dict())
    assert ours.cls.predictions.decoder.weight is ours.lxmert.embeddings.word_embeddings.weight
    batch = inputs(cfg)
    with torch.no_grad():
        ref = hf(**batch)
        out = ours(**batch)
    assert_close(out.lm_logits, ref.prediction_logits, **TOL)
    assert_close(out.match_logits, ref.cross_relationship_score, **TOL)
    assert_close(out.qa_logits, ref.question_answering_score, **TOL)


def test_question_answering_matches_transformers_key_for_key():
    cfg = LxmertConfig.tiny()
    hf = transformers.LxmertForQuestionAnswering(hf_config(cfg)).eval()
    randomise_(hf, seed=4)
    ours = LxmertForQuestionAnswering.from_pretrained(hf.state_dict(), config=cfg)
    assert list(ours.state_dict()) == list(hf.state_dict())
    assert ours.num_answers == cfg.num_qa_labels
    batch = inputs(cfg)
    with torch.no_grad():
        assert_close(ours(**batch).logits, hf(**batch).question_answering_score, **TOL)


@pytest.mark.slow
def test_base_shapes_backbone_matches_transformers():
    torch.manual_seed(0)
    check_backbone(replace(LxmertConfig.base(), attn_implementation="eager"), t=6, n=5)  # parity is checked on the eager path
