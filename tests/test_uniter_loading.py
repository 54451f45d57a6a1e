import logging

import pytest
import torch
from torch.testing import assert_close

from advlab import AdvlabTypeError, AdvlabValueError
from advlab.backbones.uniter import (
    UniterConfig,
    UniterForImageTextRetrieval,
    UniterForNLVR2,
    UniterForVCR,
    UniterForVQA,
    UniterModel,
    _infer_config,
    convert_uniter_state_dict,
    load_state_dict_file,
)

H, LAYERS, FFN, VOCAB, POS, IMG = 32, 2, 64, 99, 64, 16
CFG = UniterConfig.tiny()
assert (CFG.hidden_size, CFG.num_hidden_layers, CFG.intermediate_size, CFG.vocab_size, CFG.img_dim) == (
    H, LAYERS, FFN, VOCAB, IMG)


def released_pretrain_state(gen, prefix="uniter"):
    """The key names and shapes of uniter.md §8 (UniterForPretraining), spelled out, with tiny sizes."""
    shapes = {
        f"{prefix}.embeddings.word_embeddings.weight": (VOCAB, H),
        f"{prefix}.embeddings.position_embeddings.weight": (POS, H),
        f"{prefix}.embeddings.token_type_embeddings.weight": (2, H),
        f"{prefix}.embeddings.LayerNorm.weight": (H,),
        f"{prefix}.embeddings.LayerNorm.bias": (H,),
        f"{prefix}.img_embeddings.img_linear.weight": (H, IMG),
        f"{prefix}.img_embeddings.img_linear.bias": (H,),
        f"{prefix}.img_embeddings.img_layer_norm.weight": (H,),
        f"{prefix}.img_embeddings.img_layer_norm.bias": (H,),
        f"{prefix}.img_embeddings.pos_layer_norm.weight": (H,),
        f"{prefix}.img_embeddings.pos_layer_norm.bias": (H,),
        f"{prefix}.img_embeddings.pos_linear.weight": (H, 7),
        f"{prefix}.img_embeddings.pos_linear.bias": (H,),
        f"{prefix}.img_embeddings.mask_embedding.weight": (2, IMG),
        f"{prefix}.img_embeddings.LayerNorm.weight": (H,),
        f"{prefix}.img_embeddings.LayerNorm.bias": (H,),
        f"{prefix}.pooler.dense.weight": (H, H),
        f"{prefix}.pooler.dense.bias": (H,),
        # pre-training heads
        "cls.predictions.bias": (VOCAB,),
        "cls.predictions.transform.dense.weight": (H, H),
        "cls.predictions.transform.dense.bias": (H,),
        "cls.predictions.transform.LayerNorm.weight": (H,),
        "cls.predictions.transform.LayerNorm.bias": (H,),
        "cls.predictions.decoder.weight": (VOCAB, H),
        "feat_regress.weight": (H, IMG),
        "feat_regress.bias": (IMG,),
        "feat_regress.net.0.weight": (H, H),
        "feat_regress.net.0.bias": (H,),
        "feat_regress.net.2.weight": (H,),
        "feat_regress.net.2.bias": (H,),
        "region_classifier.net.0.weight": (H, H),
        "region_classifier.net.0.bias": (H,),
        "region_classifier.net.2.weight": (H,),
        "region_classifier.net.2.bias": (H,),
        "region_classifier.net.3.weight": (1601, H),
        "region_classifier.net.3.bias": (1601,),
        "itm_output.weight": (2, H),
        "itm_output.bias": (2,),
    }
    for i in range(LAYERS):
        layer = f"{prefix}.encoder.layer.{i}"
        for name in ("query", "key", "value"):
            shapes[f"{layer}.attention.self.{name}.weight"] = (H, H)
            shapes[f"{layer}.attention.self.{name}.bias"] = (H,)
        shapes[f"{layer}.attention.output.dense.weight"] = (H, H)
        shapes[f"{layer}.attention.output.dense.bias"] = (H,)
        shapes[f"{layer}.attention.output.LayerNorm.weight"] = (H,)
        shapes[f"{layer}.attention.output.LayerNorm.bias"] = (H,)
        shapes[f"{layer}.intermediate.dense.weight"] = (FFN, H)
        shapes[f"{layer}.intermediate.dense.bias"] = (FFN,)
        shapes[f"{layer}.output.dense.weight"] = (H, FFN)
        shapes[f"{layer}.output.dense.bias"] = (H,)
        shapes[f"{layer}.output.LayerNorm.weight"] = (H,)
        shapes[f"{layer}.output.LayerNorm.bias"] = (H,)
    return {k: torch.randn(s, generator=gen) for k, s in shapes.items()}


def backbone_keys(state):
    return {k for k in state if k.startswith("uniter.")}


def test_released_pretraining_state_dict_loads_into_every_head():
    state = released_pretrain_state(torch.Generator().manual_seed(0))
    model, report = UniterForVQA.from_pretrained(state, CFG, num_answers=5, output_loading_info=True)
    own = model.state_dict()
    for key in backbone_keys(state):
        assert torch.equal(own[key], state[key]), key
    assert sorted(report.dropped) == sorted(k for k in state if not k.startswith("uniter."))
    assert report.fresh == sorted(k for k in own if k.startswith("vqa_output."))

    backbone, report = UniterModel.from_pretrained(state, CFG, output_loading_info=True)
    assert torch.equal(backbone.encoder.layer[1].output.dense.weight, state["uniter.encoder.layer.1.output.dense.weight"])
    assert report.fresh == []

    itm, report = UniterForImageTextRetrieval.from_pretrained(state, CFG, output_loading_info=True)
    assert "itm_output.weight" not in report.dropped
    assert torch.equal(itm.itm_output.weight, state["itm_output.weight"])
    assert torch.equal(itm.rank_output.weight[0], state["itm_output.weight"][1])
    assert report.fresh == ["rank_output.bias", "rank_output.weight"]


def meta_state(model_cls, cfg, **kwargs):
    """A state dict with the right key names and shapes and no data (inference reads shapes only)."""
    with torch.device("meta"):
        return dict(model_cls(cfg, **kwargs).state_dict())


@pytest.mark.parametrize("preset", ["base", "large"])
def test_config_is_inferred_for_the_released_sizes(preset, caplog):
    cfg = getattr(UniterConfig, preset)(vocab_size=1000, img_dim=64)
    with caplog.at_level(logging.INFO, logger="advlab.backbones.uniter"):
        assert _infer_config(meta_state(UniterForVQA, cfg, num_answers=4), 0) == cfg
    assert f"UNITER-{preset} with {cfg.num_attention_heads} attention heads (the head count is not stored" in caplog.text
    grown = meta_state(UniterForVCR, cfg)  # 4 type rows and vocab + 81 words: vocab is inferred without the 81
    assert _infer_config(grown, UniterForVCR._extra_words) == cfg


def test_config_of_an_unreleased_size_is_refused_not_guessed():
    # hidden 64 could be 1 head of 64 or 4 of 16: the weights do not say (fails if heads = hidden // 64 comes back)
    cfg = UniterConfig.tiny(hidden_size=64, num_attention_heads=4, intermediate_size=96)
    state = {k: v.detach().clone() for k, v in UniterForVQA(cfg, num_answers=4).state_dict().items()}
    with pytest.raises(AdvlabValueError, match=r"attention heads is not stored.*hidden_size=64, num_hidden_layers=2, "
                       r"intermediate_size=96.*num_attention_heads=\.\.\."):
        UniterForVQA.from_pretrained(state, num_answers=4)
    assert UniterForVQA.from_pretrained(state, cfg, num_answers=4).config == cfg


def test_a_released_size_with_a_missing_last_layer_is_refused():
    # fails if the layer count is taken from the keys alone (an 11-layer model would be built silently)
    state = meta_state(UniterModel, UniterConfig.base())
    state = {k: v for k, v in state.items() if not k.startswith("encoder.layer.11.")}
    state = {f"uniter.{k}": v for k, v in state.items()}
    with pytest.raises(AdvlabValueError, match=r"UNITER-base, which has 12 layers.*has 11 layers.*layer\.11\.\*"):
        _infer_config(state, 0)


@pytest.mark.parametrize("drop", ["uniter.encoder.layer.0.", "uniter.encoder.layer.1.output.dense.weight"])
def test_missing_layer_keys_are_listed_when_inferring(drop):
    # a whole layer 0 gone (indices start at 1) or one key of the last layer gone: both refused, keys named
    state = {k: v for k, v in meta_state(UniterForVQA, UniterConfig.base(num_hidden_layers=2), num_answers=2).items()}
    state = {k: v for k, v in state.items() if not k.startswith(drop)}
    with pytest.raises(AdvlabValueError, match=r"keys are missing: \[.*" + drop.replace(".", r"\.")):
        UniterForVQA.from_pretrained(state, num_answers=2)


def test_a_corrupt_intermediate_weight_is_named():
    # one layer's FFN weight with a wrong shape: named, not 23 unrelated size mismatches from a wrong inferred size
    state = meta_state(UniterModel, UniterConfig.base())
    state = {f"uniter.{k}": v for k, v in state.items()}
    state["uniter.encoder.layer.0.intermediate.dense.weight"] = torch.empty(3000, 768, device="meta")
    with pytest.raises(AdvlabValueError, match=r"Corrupt tensor.*layer\.0\.intermediate\.dense\.weight has shape "
                       r"\(3000, 768\).*agree on intermediate size 3072"):
        _infer_config(state, 0)


def test_wrong_shapes_are_all_listed_with_their_keys():
    state = {k: v.clone() for k, v in UniterModel(CFG).state_dict().items()}
    state["encoder.layer.1.intermediate.dense.weight"] = torch.zeros(FFN + 1, H)
    state["pooler.dense.bias"] = torch.zeros(H + 1)
    with pytest.raises(AdvlabValueError, match=r"2 have another shape: .*layer\.1\.intermediate\.dense\.weight expected "
                       r"\(64, 32\), got \(65, 32\).*pooler\.dense\.bias"):
        UniterModel.from_pretrained(state, CFG)


def test_bert_and_tf_names_are_renamed():
    gen = torch.Generator().manual_seed(2)
    state = released_pretrain_state(gen, prefix="bert")
    state["bert.embeddings.LayerNorm.gamma"] = state.pop("bert.embeddings.LayerNorm.weight")
    state["bert.embeddings.LayerNorm.beta"] = state.pop("bert.embeddings.LayerNorm.bias")
    model, report = UniterModel.from_pretrained(state, CFG, output_loading_info=True)
    assert torch.equal(model.embeddings.LayerNorm.weight, state["bert.embeddings.LayerNorm.gamma"])
    assert report.renamed == len(backbone_keys(convert_uniter_state_dict(state)[0]))


def test_unexpected_missing_and_misshapen_keys_raise():
    gen = torch.Generator().manual_seed(3)
    state = released_pretrain_state(gen)
    with pytest.raises(AdvlabValueError, match="Unexpected keys.*uniter.extra.weight"):
        UniterModel.from_pretrained({**state, "uniter.extra.weight": torch.zeros(1)}, CFG)
    partial = dict(state)
    del partial["uniter.encoder.layer.1.output.LayerNorm.bias"]
    with pytest.raises(AdvlabValueError, match=r"Missing backbone keys.*layer\.1\.output\.LayerNorm\.bias"):
        UniterForVQA.from_pretrained(partial, CFG, num_answers=3)
    _, report = UniterForVQA.from_pretrained(partial, CFG, num_answers=3, strict=False, output_loading_info=True)
    assert "uniter.encoder.layer.1.output.LayerNorm.bias" in report.fresh
    bad = {**state, "uniter.pooler.dense.bias": torch.zeros(H + 1)}
    with pytest.raises(AdvlabValueError, match=r"uniter.pooler.dense.bias.*\(32,\).*\(33,\)"):
        UniterModel.from_pretrained(bad, CFG)
    with pytest.raises(AdvlabTypeError, match="checkpoint"):
        UniterModel.from_pretrained(42, CFG)
    # a VQA checkpoint's head into the VE head (3 answers) is a shape error, not silently dropped
    vqa = {k: v for k, v in UniterForVQA(CFG, num_answers=5).state_dict().items()}
    with pytest.raises(AdvlabValueError, match="vqa_output.3.weight"):
        UniterForVQA.from_pretrained(vqa, CFG, num_answers=3)


def test_nlvr2_and_vcr_tables_grow_after_loading():
    state = released_pretrain_state(torch.Generator().manual_seed(4))
    types = state["uniter.embeddings.token_type_embeddings.weight"]
    words = state["uniter.embeddings.word_embeddings.weight"]
    nlvr2, report = UniterForNLVR2.from_pretrained(state, CFG, variant="paired-attn", output_loading_info=True)
    table = nlvr2.uniter.embeddings.token_type_embeddings.weight
    assert table.shape[0] == 3 and torch.equal(table[:2], types) and torch.equal(table[2], types[1])
    assert report.grown == ["uniter.embeddings.token_type_embeddings.weight"]
    assert {k.split(".")[0] for k in report.fresh} == {"attn1", "attn2", "fc", "attn_pool", "nlvr2_output"}

    vcr = UniterForVCR.from_pretrained(state, CFG)
    table = vcr.uniter.embeddings.token_type_embeddings.weight
    assert table.shape[0] == 4 and torch.equal(table[:2], types)
    assert torch.equal(table[2], types[0]) and torch.equal(table[3], types[0])
    new_words = vcr.uniter.embeddings.word_embeddings.weight
    assert new_words.shape[0] == VOCAB + 81 and torch.equal(new_words[:VOCAB], words)
    # a checkpoint saved after growth loads as is
    again = UniterForVCR.from_pretrained(vcr.state_dict(), CFG)
    assert torch.equal(again.uniter.embeddings.word_embeddings.weight, new_words)


def test_pt_and_safetensors_files(tmp_path):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in UniterForVQA(CFG, num_answers=4).state_dict().items()}
    torch.save(state, tmp_path / "m.pt")
    save_file(state, str(tmp_path / "m.safetensors"))
    for name in ("m.pt", "m.safetensors"):
        model = UniterForVQA.from_pretrained(tmp_path / name, CFG, num_answers=4)
        assert torch.equal(model.vqa_output[3].weight, state["vqa_output.3.weight"])


@pytest.mark.parametrize("name", ["m.pt", "m.safetensors"])
def test_truncated_or_corrupt_files_name_the_file(tmp_path, name):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in UniterModel(CFG).state_dict().items()}
    path = tmp_path / name
    torch.save(state, path) if name.endswith(".pt") else save_file(state, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdvlabValueError, match=f"Could not read checkpoint .*{name}.*truncated"):
        UniterModel.from_pretrained(path, CFG)
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(AdvlabValueError, match=name):
        load_state_dict_file(path)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_state_dict_file(tmp_path / "missing.pt")


def test_non_state_dict_file(tmp_path):
    torch.save({"optimizer": {"lr": 1.0}, "step": 3}, tmp_path / "ckpt.pt")
    with pytest.raises(AdvlabValueError, match="ckpt.pt.*not tensors"):
        load_state_dict_file(tmp_path / "ckpt.pt")
    # a training checkpoint's model state dict is unwrapped, as the LXMERT reader does
    torch.save({"model": {"a": torch.zeros(1)}, "step": 3}, tmp_path / "train.pt")
    assert list(load_state_dict_file(tmp_path / "train.pt")) == ["a"]


def test_fresh_head_is_logged(caplog):
    state = released_pretrain_state(torch.Generator().manual_seed(5))
    with caplog.at_level(logging.INFO, logger="advlab.backbones.uniter"):
        UniterForVQA.from_pretrained(state, CFG, num_answers=3)
    text = caplog.text
    assert "vqa_output.3.weight" in text and "cls.predictions.bias" in text


@pytest.mark.slow  # importing transformers takes seconds
def test_text_only_path_matches_transformers_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)  # BertModel init draws from the global generator
    bert_cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=FFN,
        max_position_embeddings=POS, type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu",
        attn_implementation="eager",
    )
    bert = BertModel(bert_cfg).eval()
    assert bert.config._attn_implementation == "eager"
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():  # non-trivial LayerNorm parameters so the comparison can fail
        for name, p in bert.named_parameters():
            if "LayerNorm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    state = {f"bert.{k}": v for k, v in bert.state_dict().items() if "position_ids" not in k}
    img = {f"uniter.img_embeddings.{k}": v for k, v in UniterModel(CFG).img_embeddings.state_dict().items()}
    uniter = UniterModel.from_pretrained({**state, **img}, CFG).eval()

    ids = torch.randint(1, VOCAB, (3, 9), generator=gen)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 4:] = 0
    types = torch.randint(0, 2, (3, 9), generator=gen)
    ref = bert(input_ids=ids, attention_mask=mask, token_type_ids=types)
    got = uniter(input_ids=ids, attention_mask=mask, txt_type_ids=types)
    for i, n in enumerate([9, 6, 4]):
        assert_close(got.last_hidden_state[i, :n], ref.last_hidden_state[i, :n], rtol=1e-5, atol=1e-5)
    assert_close(got.pooler_output, ref.pooler_output, rtol=1e-5, atol=1e-5)


def test_a_config_json_beside_the_file_gives_the_heads(tmp_path):
    import json

    cfg = UniterConfig.tiny(hidden_size=64, num_attention_heads=4, intermediate_size=96, hidden_dropout_prob=0.2)
    state = UniterForVQA(cfg, num_answers=3).state_dict()
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(AdvlabValueError, match="nor in a config.json"):
        UniterForVQA.from_pretrained(tmp_path / "model.pt", num_answers=3)
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 4, "hidden_dropout_prob": 0.2,
                                                      "hidden_size": 64, "type_vocab_size": 2}))
    assert UniterForVQA.from_pretrained(tmp_path / "model.pt", num_answers=3).config == cfg
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 4, "num_hidden_layers": 3}))
    with pytest.raises(AdvlabValueError, match="num_hidden_layers 3 in config.json, 2 in the tensors"):
        UniterForVQA.from_pretrained(tmp_path / "model.pt", num_answers=3)
