"""Checkpoint formats, key mapping, failures and the QA-head row remapping."""

import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import save_file

import advlab
from advlab.backbones.lxmert import (
    LxmertConfig,
    LxmertForNLVR2,
    LxmertForPreTraining,
    LxmertForQuestionAnswering,
    LxmertForVQA,
    LxmertModel,
    convert_lxmert_state_dict,
    load_lxmert_state_dict,
    remap_answer_rows,
)

CFG = LxmertConfig.tiny(visual_feat_dim=16, l_layers=3, r_layers=1, x_layers=2)


def donor(cls=LxmertForPreTraining, *args, seed=0):
    torch.manual_seed(seed)
    return cls(CFG, *args)


def original_format(model):
    """model_LXRT.pth naming: DataParallel `module.` + `bert.` for the backbone."""
    return {"module." + k.replace("lxmert.", "bert.", 1): v for k, v in model.state_dict().items()}


def same_weights(a, b, prefix_a="", prefix_b=""):
    sa, sb = a.state_dict(), b.state_dict()
    keys = [k for k in sa if k.startswith(prefix_a)]
    assert keys
    for k in keys:
        assert torch.equal(sa[k], sb[prefix_b + k[len(prefix_a) :]]), k


def test_original_pretraining_names_load_key_for_key():
    src = donor()
    sd = original_format(src)
    assert len(sd) == len(src.state_dict())
    model = LxmertForPreTraining.from_pretrained(sd, CFG)
    same_weights(model, src)
    assert model.cls.predictions.decoder.weight is model.lxmert.embeddings.word_embeddings.weight
    assert not model.training


def test_tied_decoder_may_be_absent():
    src = donor()
    sd = original_format(src)
    del sd["module.cls.predictions.decoder.weight"]
    model = LxmertForPreTraining.from_pretrained(sd, CFG)
    assert torch.equal(model.cls.predictions.decoder.weight, src.lxmert.embeddings.word_embeddings.weight)


def test_pretraining_file_into_backbone_reports_the_24_kinds_of_head_keys(caplog):
    sd = original_format(donor())
    with caplog.at_level(logging.INFO, logger="advlab.backbones.lxmert"):
        model, report = LxmertModel.from_pretrained(sd, CFG, output_loading_info=True)
    assert "dropped 24 keys this model has no place for" in caplog.text
    assert len(report.dropped) == 24 and report.fresh == [] and report.mismatched == []
    assert report.renamed == len(sd)  # every key loses `module.` and `bert.` becomes `lxmert.`
    assert not model.training
    same_weights(model, donor(), prefix_b="lxmert.")


def test_layer_counts_are_inferred_from_the_keys_with_config_json(tmp_path):
    import json

    torch.save(donor(LxmertModel).state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 4}))
    model = LxmertModel.from_pretrained(tmp_path)
    assert (model.config.l_layers, model.config.r_layers, model.config.x_layers) == (3, 1, 2)
    assert model.config.visual_feat_dim == 16 and model.config.vocab_size == 99


def meta_state(cfg):
    with torch.device("meta"):
        return dict(LxmertModel(cfg).state_dict())


def test_the_released_size_is_inferred_without_config_json():
    from advlab.backbones.lxmert import _infer_config

    cfg = LxmertConfig.base()
    assert _infer_config({f"lxmert.{k}": v for k, v in meta_state(cfg).items()}, {}, "sd") == cfg


def test_an_unreleased_size_without_config_json_is_refused_not_guessed():
    # fails if heads = hidden // 64 comes back: the tiny donor has 4 heads of 8, a guess would build 1 head
    with pytest.raises(advlab.AdvlabValueError, match=r"attention heads is not stored.*hidden_size=32.*l_layers=3, "
                       r"x_layers=2, r_layers=1, num_attention_heads=\.\.\."):
        LxmertModel.from_pretrained(donor(LxmertModel).state_dict())


@pytest.mark.parametrize("stage", ["r_layers", "x_layers", "layer"])
def test_a_released_size_with_a_missing_last_layer_is_refused(stage):
    # fails if the layer counts come from the keys alone (r_layers=4 or 1 would be built silently)
    from advlab.backbones.lxmert import _infer_config

    last = {"r_layers": 4, "x_layers": 4, "layer": 8}[stage]
    sd = {f"lxmert.{k}": v for k, v in meta_state(LxmertConfig.base()).items()}
    sd = {k: v for k, v in sd.items() if not k.startswith(f"lxmert.encoder.{stage}.{last}.")}
    with pytest.raises(advlab.AdvlabValueError, match=rf"released model.*missing: \['lxmert\.encoder\.{stage}\.{last}\.\*'\]"):
        _infer_config(sd, {}, "sd")


def test_a_missing_middle_layer_or_key_is_listed_when_inferring():
    sd = {f"lxmert.{k}": v for k, v in meta_state(LxmertConfig.base()).items()}
    from advlab.backbones.lxmert import _infer_config

    gap = {k: v for k, v in sd.items() if not k.startswith("lxmert.encoder.r_layers.2.")}
    with pytest.raises(advlab.AdvlabValueError, match=r"layers \[2\] have no keys.*r_layers\.2\.attention"):
        _infer_config(gap, {}, "sd")
    one = {k: v for k, v in sd.items() if k != "lxmert.encoder.x_layers.4.visn_output.LayerNorm.bias"}
    with pytest.raises(advlab.AdvlabValueError, match=r"1 keys are missing: \['lxmert.encoder.x_layers.4.visn_output"):
        _infer_config(one, {"num_attention_heads": 12}, "sd")


def test_a_corrupt_intermediate_weight_is_named():
    # one FFN weight of a wrong width: named, instead of a wrong inferred size and 23 unrelated mismatches
    from advlab.backbones.lxmert import _infer_config

    sd = {f"lxmert.{k}": v for k, v in meta_state(LxmertConfig.base()).items()}
    sd["lxmert.encoder.layer.0.intermediate.dense.weight"] = torch.empty(3000, 768, device="meta")
    with pytest.raises(advlab.AdvlabValueError, match=r"Corrupt tensor.*layer\.0\.intermediate\.dense\.weight has "
                       r"shape \(3000, 768\).*other 23 tensors of its kind agree on intermediate size 3072"):
        _infer_config(sd, {}, "sd")


def test_wrong_shapes_with_a_config_are_all_named():
    sd = donor(LxmertModel).state_dict()
    sd["encoder.r_layers.0.intermediate.dense.weight"] = torch.zeros(65, 32)
    with pytest.raises(advlab.AdvlabValueError, match=r"1 have another shape: encoder\.r_layers\.0\."
                       r"intermediate\.dense\.weight expected \(64, 32\), got \(65, 32\)\.$"):
        LxmertModel.from_pretrained(sd, CFG)


def test_config_json_that_disagrees_with_the_tensors_is_refused(tmp_path):
    import json

    torch.save(donor(LxmertModel).state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 4, "hidden_size": 64}))
    with pytest.raises(advlab.AdvlabValueError, match="hidden_size 64 in config.json, 32 in the tensors"):
        LxmertModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("module_prefix", ["", "module."])
def test_finetuned_vqa_checkpoint(module_prefix):
    src = donor(LxmertForVQA, 7)
    sd = {}
    for k, v in src.state_dict().items():
        if k.startswith("lxmert."):
            sd["lxrt_encoder.model." + module_prefix + "bert." + k[len("lxmert.") :]] = v
        else:
            sd[k[len("answer_head.") :]] = v  # task checkpoints keep the head as `logit_fc.*`
    model = LxmertForVQA.from_pretrained(sd, CFG)
    assert model.num_answers == 7
    same_weights(model, src)


def test_finetuned_nlvr2_checkpoint_head_recognised_by_width():
    src = donor(LxmertForNLVR2)
    sd = {k.replace("lxmert.", "lxrt_encoder.model.bert.", 1): v for k, v in src.state_dict().items()}
    assert "logit_fc.0.weight" in convert_lxmert_state_dict(sd)
    same_weights(LxmertForNLVR2.from_pretrained(sd, CFG), src)


def test_hugging_face_names_prefixed_and_bare():
    src = donor()
    model = LxmertForPreTraining.from_pretrained(src.state_dict(), CFG)  # lxmert.*, cls.*, ...
    same_weights(model, src)
    bare = {k[len("lxmert.") :]: v for k, v in src.state_dict().items() if k.startswith("lxmert.")}
    same_weights(LxmertModel.from_pretrained(bare, CFG), src, prefix_b="lxmert.")


def test_gamma_beta_layer_norm_names_are_accepted():
    src = donor(LxmertModel)
    sd = {}
    for k, v in src.state_dict().items():
        if "LayerNorm" in k or "layer_norm" in k:
            k = k.replace(".weight", ".gamma").replace(".bias", ".beta")
        sd["bert." + k] = v
    same_weights(LxmertModel.from_pretrained(sd, CFG), src)


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin", ".safetensors"])
def test_file_formats(tmp_path, suffix):
    src = donor()
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        sd = {k: v.contiguous() for k, v in src.state_dict().items() if k != "cls.predictions.decoder.weight"}
        save_file(sd, str(path))
    else:
        torch.save(original_format(src), path)
    same_weights(LxmertForPreTraining.from_pretrained(path, CFG), src)
    assert set(load_lxmert_state_dict(path)) <= set(original_format(src)) | set(src.state_dict())


def test_wrapped_state_dict_file(tmp_path):
    src = donor(LxmertModel)
    torch.save({"state_dict": {"bert." + k: v for k, v in src.state_dict().items()}}, tmp_path / "w.pt")
    same_weights(LxmertModel.from_pretrained(tmp_path / "w.pt", CFG), src)


@pytest.mark.slow  # importing transformers and building twice: ~4 s
def test_hugging_face_folder_saved_by_transformers(tmp_path):
    import transformers

    hf_cfg = transformers.LxmertConfig(
        vocab_size=99,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        l_layers=1,
        x_layers=1,
        r_layers=1,
        visual_feat_dim=16,
        max_position_embeddings=40,
        num_qa_labels=5,
        num_object_labels=6,
        num_attr_labels=3,
    )
    torch.manual_seed(0)
    hf = transformers.LxmertForPreTraining(hf_cfg)
    hf.save_pretrained(tmp_path)  # model.safetensors without the tied decoder, and config.json
    model = LxmertForPreTraining.from_pretrained(tmp_path)  # heads (4) read from config.json
    assert model.config.num_attention_heads == 4 and model.config.num_qa_labels == 5
    assert list(model.state_dict()) == list(hf.state_dict())
    for k, v in hf.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_missing_backbone_keys_raise_and_are_listed():
    sd = original_format(donor())
    del sd["module.bert.encoder.x_layers.1.lang_output.dense.weight"]
    del sd["module.bert.pooler.dense.bias"]
    with pytest.raises(advlab.AdvlabValueError, match=r"2 are missing.*pooler\.dense\.bias"):
        LxmertForPreTraining.from_pretrained(sd, CFG)


def test_unknown_keys_raise():
    sd = original_format(donor())
    sd["module.vision_tower.proj.weight"] = torch.zeros(2)
    with pytest.raises(advlab.AdvlabValueError, match="vision_tower"):
        LxmertForPreTraining.from_pretrained(sd, CFG)
    sd = original_format(donor())
    sd["module.bert.encoder.mystery.weight"] = torch.zeros(2)
    with pytest.raises(advlab.AdvlabValueError, match="mystery"):
        LxmertModel.from_pretrained(sd, CFG)


def test_wrong_config_raises_with_context():
    sd = original_format(donor())
    with pytest.raises(advlab.AdvlabValueError, match="missing"):
        LxmertModel.from_pretrained(sd, LxmertConfig.tiny(visual_feat_dim=16))  # 2 r_layers, file has 1
    with pytest.raises(advlab.AdvlabValueError, match="fit"):
        LxmertModel.from_pretrained(sd, LxmertConfig.tiny(visual_feat_dim=8, l_layers=3, r_layers=1, x_layers=2))


def test_corrupt_and_truncated_files_name_the_file(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(original_format(donor(LxmertModel)), good)
    data = good.read_bytes()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(advlab.AdvlabValueError, match="truncated.pth.*corrupt or truncated"):
        LxmertModel.from_pretrained(bad)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01not a safetensors file")
    with pytest.raises(advlab.AdvlabValueError, match="junk.safetensors"):
        load_lxmert_state_dict(junk)
    with pytest.raises(advlab.AdvlabValueError, match="nope.pth"):
        load_lxmert_state_dict(tmp_path / "nope.pth")
    with pytest.raises(advlab.AdvlabValueError, match="model.safetensors or pytorch_model.bin"):
        load_lxmert_state_dict(tmp_path)
    with pytest.raises(advlab.AdvlabTypeError, match="source"):
        LxmertModel.from_pretrained(3)


def test_non_state_dict_file(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(advlab.AdvlabValueError, match="list.pt.*state dict"):
        load_lxmert_state_dict(path)


# ---------------------------------------------------------------- QA head remapping (--loadLXMERTQA)


def test_remap_copies_matching_rows_and_zeros_the_rest():
    weight = torch.arange(12.0).reshape(4, 3)
    bias = torch.tensor([10.0, 11.0, 12.0, 13.0])
    w, b = remap_answer_rows(
        weight, bias, answers={"yes": 1, "cat": 0, "zebra crossing": 2}, source_answers=["no", "yes", "cat", "2"]
    )
    torch.testing.assert_close(w, torch.tensor([[6.0, 7.0, 8.0], [3.0, 4.0, 5.0], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(b, torch.tensor([12.0, 11.0, 0.0]))


def test_remap_normalize_and_errors():
    weight, bias = torch.eye(2), torch.ones(2)
    w, _ = remap_answer_rows(
        weight, bias, answers=["Two."], source_answers=["one", "two"], normalize=lambda a: a.lower().rstrip(".")
    )
    assert torch.equal(w, torch.tensor([[0.0, 1.0]]))
    with pytest.raises(advlab.AdvlabValueError, match="source_answers"):
        remap_answer_rows(weight, bias, answers=["a"], source_answers=["a"])
    with pytest.raises(advlab.AdvlabValueError, match="bias"):
        remap_answer_rows(weight, torch.ones(3), answers=["a"], source_answers=["a", "b"])
    with pytest.raises(advlab.AdvlabValueError, match="answers"):
        remap_answer_rows(weight, bias, answers={"a": 0, "b": 5}, source_answers=["a", "b"])
    with pytest.raises(advlab.AdvlabTypeError, match="answers"):
        remap_answer_rows(weight, bias, answers="ab", source_answers=["a", "b"])


def test_pretraining_file_into_vqa_with_answer_remap():
    src = donor()  # 11-way pre-training QA head
    pre = [f"ans{i}" for i in range(11)]
    model, report = LxmertForVQA.from_pretrained(
        original_format(src), CFG, answers=["ans7", "new", "ans0"], pretrain_answers=pre, output_loading_info=True
    )
    assert report.dropped and all(k.startswith(("cls.", "obj_predict_head.")) for k in report.dropped)
    head, ref = model.answer_head.logit_fc, src.answer_head.logit_fc
    assert model.num_answers == 3
    assert torch.equal(head[0].weight, ref[0].weight) and torch.equal(head[2].bias, ref[2].bias)
    assert torch.equal(head[3].weight[0], ref[3].weight[7]) and torch.equal(head[3].weight[2], ref[3].weight[0])
    assert head[3].weight[1].abs().sum() == 0 and head[3].bias[1] == 0
    same_weights(model, src, prefix_a="lxmert.", prefix_b="lxmert.")


def test_pretraining_file_into_vqa_without_remap_warns_and_keeps_random_head(caplog):
    with caplog.at_level(logging.WARNING, logger="advlab.backbones.lxmert"):
        model, report = LxmertForVQA.from_pretrained(
            original_format(donor()), CFG, num_answers=3, output_loading_info=True
        )
    assert "dropped 2 head keys of another size" in caplog.text and "freshly initialised 2 keys" in caplog.text
    assert report.fresh == ["answer_head.logit_fc.3.bias", "answer_head.logit_fc.3.weight"]
    assert model.answer_head.logit_fc[3].weight.shape == (3, 64)
    with pytest.raises(advlab.AdvlabValueError, match="pretrain_answers"):
        LxmertForQuestionAnswering.from_pretrained(original_format(donor()), CFG, answers=["a"])
