"""Unmodified Hugging Face models as users wrap them: ViLT's channels-first patch projection with
its pixel mask, and BERT's word embeddings with the integer / float attention mask users pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import advlab
from tests.strategies import generator

transformers = pytest.importorskip("transformers")


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, hidden: int):
        super().__init__()
        self.backbone, self.head = backbone, nn.Linear(hidden, 3)

    def forward(self, **batch):
        return self.head(self.backbone(**batch).pooler_output)


def tiny_vilt():
    cfg = transformers.ViltConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=64,
        patch_size=16, max_image_length=-1, vocab_size=100, max_position_embeddings=16,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    return Classifier(transformers.ViltModel(cfg), 32)


def test_vilt_patch_projection_as_a_channels_first_site_with_its_pixel_mask():
    """Before layouts, the [b, c, h, w] projection output was taken as [b, c] rows of h*w 'features'."""
    model = tiny_vilt()
    g = generator(0)
    batch = {"input_ids": torch.randint(0, 100, (2, 5), generator=g), "pixel_values": torch.randn(2, 3, 64, 64, generator=g)}
    pixel_mask = torch.ones(2, 64, 64, dtype=torch.long)
    pixel_mask[1, :, 32:] = 0  # the right half of image 1 is padding
    batch["pixel_mask"] = pixel_mask
    patch_mask = F.interpolate(pixel_mask[:, None].float(), size=(4, 4)).bool()[:, 0]  # [b, 4, 4] patch grid
    site = advlab.Site("backbone.embeddings.patch_embeddings.projection", layout="channels_first")
    y = torch.tensor([0, 2])
    with advlab.free_training(model, {"img": site}, {"img": advlab.Perturbation(0.05, relative=True)}, steps=2,
                              masks={"img": patch_mask.float()}) as ft:
        ft.clean(lambda: model(**batch))
        for step in ft:
            out = ft.forward(lambda: model(**batch))
            ft.backward(F.cross_entropy(out, y) + advlab.symmetric_kl(out, step.clean_logits))
        delta = ft.deltas("img")[0]
        scale = ft._hooks.scales("img")[0]
    assert delta.shape == (2, 16, 32)  # [b, h*w patches, c channels]
    real = patch_mask.reshape(2, 16)
    assert torch.equal(delta[~real], torch.zeros_like(delta[~real]))
    torch.testing.assert_close(delta.flatten(1).norm(dim=1), 0.05 * scale.flatten(), rtol=1e-5, atol=0)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_vilt_patch_projection_without_layout_is_refused():
    model = tiny_vilt()
    batch = {"input_ids": torch.ones(1, 5, dtype=torch.long), "pixel_values": torch.zeros(1, 3, 64, 64)}
    villa = advlab.VILLA(model, sites={"img": "backbone.embeddings.patch_embeddings.projection"}, steps=2)
    with pytest.raises(advlab.AdvlabValueError, match="layout='channels_first'"):
        villa.step(lambda: model(**batch), lambda out: F.cross_entropy(out, torch.tensor([1])))


@pytest.mark.parametrize("dtype", [torch.long, torch.float32, torch.bool])
def test_bert_word_embeddings_with_the_attention_mask_users_pass(dtype):
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = Classifier(transformers.BertModel(cfg), 32)
    ids = torch.randint(1, 100, (2, 6), generator=generator(1))
    attention_mask = torch.ones(2, 6, dtype=dtype)
    attention_mask[0, 4:] = 0
    batch = {"input_ids": ids, "attention_mask": attention_mask.long()}
    villa = advlab.VILLA(model, sites={"txt": "backbone.embeddings.word_embeddings"}, steps=2,
                         perturbations={"txt": advlab.Perturbation(1e-2, relative=True)})
    stats = villa.step(lambda: model(**batch), lambda out: F.cross_entropy(out, torch.tensor([0, 1])),
                       masks={"txt": attention_mask})
    assert stats.delta_norm["txt"] > 0
    assert stats.effective_delta_norm["txt"] == pytest.approx(stats.delta_norm["txt"], rel=1e-3)
