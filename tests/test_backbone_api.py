"""The two backbones present one shape: explicit head arguments, a pre-trained base class, eval mode after loading."""

import inspect

import pytest
import torch

from advlab import AdvlabTypeError
from advlab.backbones.lxmert import (
    LxmertConfig,
    LxmertForNLVR2,
    LxmertForPreTraining,
    LxmertForVQA,
    LxmertModel,
    LxmertPreTrainedModel,
)
from advlab.backbones.uniter import (
    UniterConfig,
    UniterForImageTextRetrieval,
    UniterForNLVR2,
    UniterForVCR,
    UniterForVQA,
    UniterModel,
)

CFG = UniterConfig.tiny()
BACKBONE_ARGS = list(inspect.signature(UniterModel.forward).parameters)[1:11]


@pytest.mark.parametrize("cls", [UniterForVQA, UniterForNLVR2, UniterForImageTextRetrieval, UniterForVCR])
def test_uniter_heads_take_the_backbone_arguments_explicitly(cls):
    # the heads used to take **inputs: no names in the signature, no positional call
    assert list(inspect.signature(cls.forward).parameters)[1:11] == BACKBONE_ARGS
    model = cls(CFG).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, CFG.vocab_size, (2, 5), generator=gen)
    feat = torch.randn(2, 3, CFG.img_dim, generator=gen)
    pos = torch.rand(2, 3, 7, generator=gen)
    with torch.no_grad():
        by_name = model(input_ids=ids, img_feat=feat, img_pos_feat=pos).logits
        by_position = model(ids, None, feat, pos).logits
    assert torch.equal(by_name, by_position)
    with pytest.raises(AdvlabTypeError, match=r"unknown \['targets'\].*batch\['inputs'\]"):
        model(input_ids=ids, img_feat=feat, img_pos_feat=pos, targets=torch.zeros(2))


def test_lxmert_models_share_one_pretrained_base():
    for cls in (LxmertModel, LxmertForVQA, LxmertForNLVR2, LxmertForPreTraining):
        assert issubclass(cls, LxmertPreTrainedModel)
    assert LxmertForNLVR2.from_pretrained.__func__ is LxmertPreTrainedModel.from_pretrained.__func__
    assert LxmertForPreTraining.from_pretrained.__func__ is LxmertPreTrainedModel.from_pretrained.__func__
    cfg = LxmertConfig.tiny(visual_feat_dim=8)
    vqa = LxmertForVQA(cfg, 3)
    assert vqa.config is cfg and vqa.backbone is vqa.lxmert and LxmertModel(cfg).backbone.config is cfg
    assert LxmertForNLVR2(cfg).perturbation_sites()["txt"].calls == 2
    assert vqa.perturbation_sites()["img"].calls == 1


def test_position_features_live_on_the_backbones_and_agree_with_the_data_helpers():
    from advlab import AdvlabValueError
    from advlab.data.uniter_db import pos_feat_from_norm_bb
    from advlab.pretrained.craft import lxmert_position_features, uniter_position_features

    gen = torch.Generator().manual_seed(3)
    xy = torch.rand(2, 5, 2, generator=gen) * 0.5
    boxes = torch.cat([xy, xy + torch.rand(2, 5, 2, generator=gen) * 0.5], dim=-1)  # [2, 5, 4]
    seven = UniterModel.position_features(boxes)
    w, h = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    assert torch.equal(seven, torch.cat([boxes, w[..., None], h[..., None], (w * h)[..., None]], dim=-1))
    assert torch.equal(uniter_position_features(boxes), seven)
    norm_bb = seven[0, :, :6]  # what the image DBs store
    assert torch.equal(pos_feat_from_norm_bb(norm_bb), UniterModel.position_features(norm_bb))
    assert torch.equal(UniterModel.position_features(norm_bb), seven[0])
    assert torch.equal(LxmertModel.position_features(boxes * 1.5 - 0.1), (boxes * 1.5 - 0.1).clamp(0, 1))
    assert torch.equal(lxmert_position_features(boxes), LxmertForVQA.position_features(boxes))
    with pytest.raises(AdvlabValueError, match=r"\[\.\.\., 4\] or \[\.\.\., 6\], but got \(3, 5\)"):
        UniterForVQA.position_features(torch.zeros(3, 5))
    with pytest.raises(AdvlabValueError, match=r"\[\.\.\., 4\], but got \(3, 6\)"):
        LxmertModel.position_features(torch.zeros(3, 6))


def test_task_losses_live_in_one_module_and_take_both_backbones_outputs():
    from advlab.backbones import losses, uniter
    from advlab.backbones.lxmert import LxmertClassifierOutput

    for name in ("vqa_loss", "vqa_score", "ve_loss", "nlvr2_loss", "vcr_loss", "itm_loss", "itm_rank_loss"):
        assert getattr(uniter, name) is getattr(losses, name)  # re-exported, not a second copy
    gen = torch.Generator().manual_seed(4)
    logits, targets = torch.randn(3, 5, generator=gen), torch.rand(3, 5, generator=gen)
    out = LxmertClassifierOutput(logits=logits, pooled_output=torch.zeros(3, 2))
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets) * 5  # LXMERT's vqa.py
    assert torch.equal(losses.vqa_loss(out, targets), losses.vqa_loss(logits, targets))
    torch.testing.assert_close(losses.vqa_loss(out, targets), expected, rtol=1e-6, atol=0)
    with pytest.raises(AdvlabTypeError, match="itm_logits"):
        losses.itm_loss([0.0, 1.0], torch.tensor([1]))
