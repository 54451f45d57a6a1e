"""One VILLA step end to end on a tiny LXMERT with synthetic data: the released presets and every mode."""

import pytest
import torch
import torch.nn.functional as F

import advlab
from advlab.backbones.lxmert import LxmertConfig, LxmertForGQA, LxmertForNLVR2, LxmertForVQA

CFG = LxmertConfig.tiny(visual_feat_dim=16, l_layers=1, r_layers=1, x_layers=1)
B, T, N = 3, 6, 4


def make(task, seed=0):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(3, CFG.vocab_size, (B, T), generator=gen)
    txt_mask = torch.ones(B, T, dtype=torch.bool)
    txt_mask[0, 4:] = False
    ids[~txt_mask] = 0
    lead = (B, 2) if task == "nlvr2" else (B,)
    img_mask = torch.ones(*lead, N, dtype=torch.bool)
    img_mask[..., -1] = False
    feats = torch.randn(*lead, N, CFG.visual_feat_dim, generator=gen) * img_mask[..., None]
    xy = torch.rand(*lead, N, 2, generator=gen) * 0.5
    boxes = torch.cat([xy, xy + 0.5 * torch.rand(*lead, N, 2, generator=gen)], -1)
    batch = {
        "input_ids": ids,
        "visual_feats": feats,
        "visual_pos": boxes,
        "attention_mask": txt_mask.long(),
        "visual_attention_mask": img_mask.long(),
    }
    if task == "vqa":
        model = LxmertForVQA(CFG, num_answers=9)
        target = torch.rand(B, 9, generator=gen) * (torch.rand(B, 9, generator=gen) > 0.7)  # soft VQA scores

        def loss(out):  # the original: BCE-with-logits mean x number of answers
            return F.binary_cross_entropy_with_logits(out.logits, target) * out.logits.shape[1]
    elif task == "gqa":
        model = LxmertForGQA(CFG, num_answers=7)
        target = torch.randint(0, 7, (B,), generator=gen)

        def loss(out):
            return F.cross_entropy(out.logits, target)
    else:
        model = LxmertForNLVR2(CFG)
        target = torch.randint(0, 2, (B,), generator=gen)

        def loss(out):
            return F.cross_entropy(out.logits, target)

    if task == "nlvr2":
        masks = {"txt": txt_mask, "img": [img_mask[:, 0], img_mask[:, 1]]}  # one mask per call
    else:
        masks = {"txt": txt_mask, "img": img_mask}
    return model.train(), batch, loss, masks


PRESET = {"vqa": "lxmert-vqa", "gqa": "lxmert-gqa", "nlvr2": "lxmert-nlvr2"}


@pytest.mark.parametrize("task", ["vqa", "gqa", "nlvr2"])
def test_presets_are_the_released_numbers(task):
    model, *_ = make(task)
    villa = advlab.VILLA.from_preset(PRESET[task], model)
    assert (villa.mode, villa.steps, villa.kl_weight) == ("txt", 3, 1.5)
    assert villa.kl_reduction == "batchmean"  # summed over classes, averaged over rows
    assert {m: p.step_size for m, p in villa.perturbations.items()} == {
        m: 1e-2 if task == "gqa" else 1e-3 for m in ("txt", "img")
    }
    assert set(villa.sites) == {"txt", "img"}


@pytest.mark.parametrize("mode", ["txt", "img", "joint", "alter"])
@pytest.mark.parametrize("task", ["vqa", "gqa", "nlvr2"])
def test_one_villa_step_in_every_mode(task, mode):
    model, batch, loss, masks = make(task)
    villa = advlab.VILLA.from_preset(PRESET[task], model, mode=mode)
    stats = villa.step(lambda: model(**batch), loss, masks=masks)
    assert len(stats.task_loss) == 3 and all(torch.isfinite(torch.tensor(stats.task_loss)))
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.lxmert.encoder.x_layers[0].visual_attention.att.query.weight.grad.abs().sum() > 0
    active = {"txt": {"txt"}, "img": {"img"}}.get(mode, {"txt", "img"})
    for modality in active:
        assert stats.delta_norm[modality] > 0, (modality, stats.delta_norm)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.answer_head.logit_fc[3].weight.clone() if task != "nlvr2" else model.logit_fc[3].weight.clone()
    opt.step()
    opt.zero_grad()
    after = model.answer_head.logit_fc[3].weight if task != "nlvr2" else model.logit_fc[3].weight
    assert not torch.equal(before, after)


def test_first_ascent_step_has_the_step_size_as_row_norm():
    model, batch, loss, masks = make("vqa")
    villa = advlab.VILLA.from_preset("lxmert-vqa", model, steps=2)  # δ_1 = η g / ||g||: row norm exactly η
    stats = villa.step(lambda: model(**batch), loss, masks=masks)
    assert stats.delta_norm["txt"] == pytest.approx(1e-3, rel=1e-4)


def test_one_step_without_dropout_equals_plain_training():
    """K = 1, zero init, no dropout: the KL term is zero and the gradient is the task gradient."""
    model, batch, loss, masks = make("gqa")
    model.eval()
    loss(model(**batch)).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    advlab.VILLA.from_preset("lxmert-gqa", model, steps=1, mode="joint").step(lambda: model(**batch), loss, masks=masks)
    for name, grad in plain.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=0, atol=0)


def test_text_perturbation_changes_the_output_through_the_word_lookup():
    model, batch, loss, masks = make("vqa")
    model.eval()
    villa = advlab.VILLA.from_preset("lxmert-vqa", model, step_size=1.0, steps=2)
    with torch.no_grad():
        clean = model(**batch).logits
    seen = []

    def forward():
        out = model(**batch)
        seen.append(out.logits.detach().clone())
        return out

    stats = villa.step(forward, loss, masks=masks)
    assert stats.delta_norm["txt"] > 0 and stats.delta_norm.get("img", 0.0) == 0.0  # the preset is text only
    assert torch.equal(seen[0], clean)  # the first pass is clean (δ starts at zero, no dropout)
    assert any(not torch.allclose(logits, clean) for logits in seen[1:])  # a perturbed pass changed the output
    with torch.no_grad():  # hooks are gone after the step: outputs are clean again, bit for bit
        assert torch.equal(model(**batch).logits, clean)


# ---------------------------------------------------------------- the example script, on synthetic data


def _load_example():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "lxmert_vqa_villa.py"
    spec = importlib.util.spec_from_file_location("lxmert_vqa_villa", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # three short training runs, ~15 VILLA steps in all
def test_example_trains_evaluates_checkpoints_and_resumes_exactly(tmp_path):
    example = _load_example()
    common = ["--synthetic", "--epochs", "2", "--batch-size", "8", "--seed", "3"]
    full = example.main([*common, "--out", str(tmp_path / "full")])
    assert full == {"global_step": 6, "epoch": 2, "best": full["best"]} and full["best"] >= 0
    assert (tmp_path / "full" / "best.pt").exists()
    log = (tmp_path / "full" / "log.jsonl").read_text().splitlines()
    assert sum('"valid_score"' in line for line in log) == 2

    part = tmp_path / "part"
    first = example.main([*common, "--out", str(part), "--max-steps", "4", "--no-progress"])
    assert first["global_step"] == 4  # stopped in the middle of the second epoch
    second = example.main([*common, "--out", str(part), "--resume", "--no-progress"])
    assert second["global_step"] == 6

    a = torch.load(tmp_path / "full" / "last.pt", weights_only=False)
    b = torch.load(part / "last.pt", weights_only=False)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key  # bit-for-bit: same data order, dropout and optimizer
    assert a["best"] == b["best"]
