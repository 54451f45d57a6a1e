"""`attn_implementation`: the SDPA path equals the eager path (float32, no dropout, padding masks), values and
gradients, for UNITER, every attention kind of LXMERT and MiniLM; the SDPA path really calls
`F.scaled_dot_product_attention` with the mask and the training-only dropout; bad values are refused."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from advlab import AdvlabValueError
from advlab.backbones.lxmert import LxmertConfig, LxmertModel
from advlab.backbones.uniter import UniterConfig, UniterForVQA, UniterModel
from advlab.pretrained.minilm import MiniLMConfig, MiniLMEncoder

TOL = {"rtol": 1e-5, "atol": 1e-5}


def pair(make, **kwargs):
    """(sdpa, eager) models holding the same random weights, in eval mode (attention dropout 0.1 stays off)."""
    torch.manual_seed(0)
    sdpa = make("sdpa", **kwargs).eval()
    eager = make("eager", **kwargs).eval()
    eager.load_state_dict(sdpa.state_dict())
    with torch.no_grad():  # non-trivial LayerNorms and biases, so that the comparison can fail
        gen = torch.Generator().manual_seed(1)
        for p_s, p_e in zip(sdpa.parameters(), eager.parameters()):
            p_s.add_(0.05 * torch.randn(p_s.shape, generator=gen))
            p_e.copy_(p_s)
    return sdpa, eager


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(sdpa, eager):
    g_s, g_e = grads(sdpa), grads(eager)
    assert g_s.keys() == g_e.keys() and g_s
    for name in g_s:
        assert_close(g_s[name], g_e[name], msg=lambda m, name=name: f"{name}: {m}", **TOL)


# ---------------------------------------------------------------------------------------------------- UNITER


def uniter_batch(cfg, gen):
    """Three rows with different text lengths and region counts, padded, UNITER's gather_index layout."""
    txt_lens, nbbs = [6, 3, 4], [4, 2, 1]
    b, lt, nr = len(txt_lens), max(txt_lens), max(nbbs)
    out = max(t + n for t, n in zip(txt_lens, nbbs))
    batch = {
        "input_ids": torch.zeros(b, lt, dtype=torch.long),
        "img_feat": torch.zeros(b, nr, cfg.img_dim),
        "img_pos_feat": torch.zeros(b, nr, 7),
        "attention_mask": torch.zeros(b, out),
        "gather_index": torch.arange(out).repeat(b, 1),
    }
    for i, (t, n) in enumerate(zip(txt_lens, nbbs)):
        batch["input_ids"][i, :t] = torch.randint(1, cfg.vocab_size, (t,), generator=gen)
        batch["img_feat"][i, :n] = torch.randn(n, cfg.img_dim, generator=gen)
        batch["img_pos_feat"][i, :n] = torch.rand(n, 7, generator=gen)
        batch["gather_index"][i, t : t + n] = torch.arange(lt, lt + n)
        batch["attention_mask"][i, : t + n] = 1
    return batch


def test_uniter_sdpa_equals_eager_with_padding_values_and_gradients():
    sdpa, eager = pair(lambda impl: UniterForVQA(UniterConfig.tiny(attn_implementation=impl), num_answers=5))
    batch = uniter_batch(sdpa.config, torch.Generator().manual_seed(2))
    out_s, out_e = sdpa(**batch), eager(**batch)
    assert_close(out_s.logits, out_e.logits, **TOL)
    assert_close(out_s.pooled_output, out_e.pooled_output, **TOL)
    weights = torch.randn(out_s.logits.shape, generator=torch.Generator().manual_seed(3))
    (out_s.logits * weights).sum().backward()
    (out_e.logits * weights).sum().backward()
    assert_same_grads(sdpa, eager)


def test_uniter_every_layer_matches_at_real_positions():
    sdpa, eager = pair(lambda impl: UniterModel(UniterConfig.tiny(attn_implementation=impl, num_hidden_layers=3)))
    batch = uniter_batch(sdpa.config, torch.Generator().manual_seed(4))
    with torch.no_grad():
        hs_s = sdpa(**batch, output_all_encoded_layers=True).hidden_states
        hs_e = eager(**batch, output_all_encoded_layers=True).hidden_states
    assert len(hs_s) == len(hs_e) == 3
    real = batch["attention_mask"].bool()
    for a, b in zip(hs_s, hs_e):
        assert_close(a[real], b[real], **TOL)


# ---------------------------------------------------------------------------------------------------- LXMERT


def lxmert_batch(cfg, gen, visual_mask=True):
    b, t, n = 3, 8, 6
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    batch = {
        "input_ids": torch.randint(1, cfg.vocab_size, (b, t), generator=gen) * mask,
        "visual_feats": torch.randn(b, n, cfg.visual_feat_dim, generator=gen),
        "visual_pos": torch.rand(b, n, 4, generator=gen),
        "attention_mask": mask,
    }
    if visual_mask:
        vmask = torch.ones(b, n, dtype=torch.long)
        vmask[0, 4:] = 0
        vmask[2, 1:] = 0
        batch["visual_attention_mask"] = vmask
    return batch


# each attention kind alone (language self-attention, relationship self-attention, cross-modality layers with
# their shared cross-attention and two self-attentions), then all three stacked
STAGES = {
    "language": {"l_layers": 2, "x_layers": 0, "r_layers": 0},
    "relationship": {"l_layers": 0, "x_layers": 0, "r_layers": 2},
    "cross": {"l_layers": 0, "x_layers": 2, "r_layers": 0},
    "all": {"l_layers": 2, "x_layers": 2, "r_layers": 2},
}


@pytest.mark.parametrize("visual_mask", [True, False], ids=["visual-mask", "no-visual-mask"])
@pytest.mark.parametrize("stage", list(STAGES))
def test_lxmert_sdpa_equals_eager_values_and_gradients(stage, visual_mask):
    sdpa, eager = pair(lambda impl: LxmertModel(LxmertConfig.tiny(attn_implementation=impl, **STAGES[stage])))
    batch = lxmert_batch(sdpa.config, torch.Generator().manual_seed(5), visual_mask)
    out_s, out_e = sdpa(**batch), eager(**batch)
    real_l = batch["attention_mask"].bool()
    real_v = (
        batch["visual_attention_mask"].bool()
        if visual_mask
        else torch.ones(out_s.vision_output.shape[:2], dtype=torch.bool)
    )
    assert_close(out_s.language_output[real_l], out_e.language_output[real_l], **TOL)
    assert_close(out_s.vision_output[real_v], out_e.vision_output[real_v], **TOL)
    assert_close(out_s.pooled_output, out_e.pooled_output, **TOL)
    gen = torch.Generator().manual_seed(6)
    w_l = torch.randn(out_s.language_output.shape, generator=gen) * real_l[..., None]
    w_v = torch.randn(out_s.vision_output.shape, generator=gen) * real_v[..., None]
    ((out_s.language_output * w_l).sum() + (out_s.vision_output * w_v).sum() + out_s.pooled_output.sum()).backward()
    ((out_e.language_output * w_l).sum() + (out_e.vision_output * w_v).sum() + out_e.pooled_output.sum()).backward()
    assert_same_grads(sdpa, eager)


# ---------------------------------------------------------------------------------------------------- MiniLM

MINI = {"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 32}


def test_minilm_sdpa_equals_eager_values_and_gradients():
    sdpa, eager = pair(lambda impl: MiniLMEncoder(MiniLMConfig(**MINI, attn_implementation=impl)))
    assert sdpa.encoder.layer[0].attention.self.attn_implementation == "sdpa"
    assert eager.encoder.layer[0].attention.self.attn_implementation == "eager"
    ids = torch.randint(1, 50, (3, 7), generator=torch.Generator().manual_seed(7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5], dtype=torch.bool)
    out_s, out_e = sdpa(ids, mask), eager(ids, mask)
    assert_close(out_s[mask], out_e[mask], **TOL)
    w = torch.randn(out_s.shape, generator=torch.Generator().manual_seed(8)) * mask[..., None]
    (out_s * w).sum().backward()
    (out_e * w).sum().backward()
    assert_same_grads(sdpa, eager)


def test_minilm_num_layers_keeps_the_implementation():
    encoder = MiniLMEncoder(MiniLMConfig(**MINI, attn_implementation="eager"), num_layers=1)
    assert encoder.config.attn_implementation == "eager"
    assert encoder.encoder.layer[0].attention.self.attn_implementation == "eager"


# ------------------------------------------------------------------------------------- the path really taken


class SdpaSpy:
    """Wraps F.scaled_dot_product_attention, recording whether a mask and which dropout_p each call got."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = F.scaled_dot_product_attention

        def spy(q, k, v, attn_mask=None, dropout_p=0.0, **kwargs):
            self.calls.append((attn_mask is not None, dropout_p))
            return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, **kwargs)

        monkeypatch.setattr(F, "scaled_dot_product_attention", spy)


def run_uniter(impl, train):
    model = UniterModel(UniterConfig.tiny(attn_implementation=impl, attention_probs_dropout_prob=0.25))
    model.train(train)
    model(**uniter_batch(model.config, torch.Generator().manual_seed(9)))


def run_lxmert(impl, train):
    model = LxmertModel(LxmertConfig.tiny(attn_implementation=impl, attention_probs_dropout_prob=0.25))
    model.train(train)
    model(**lxmert_batch(model.config, torch.Generator().manual_seed(9)))


# attention calls per forward: UNITER tiny 2 layers; LXMERT tiny 2 language + 2 relationship + 2 x (2 cross + 2 self)
CALLS = {"uniter": (run_uniter, 2), "lxmert": (run_lxmert, 12)}


@pytest.mark.parametrize("name", list(CALLS))
def test_sdpa_is_the_default_and_gets_the_mask_and_training_only_dropout(name, monkeypatch):
    run, n_calls = CALLS[name]
    assert UniterConfig().attn_implementation == LxmertConfig().attn_implementation == "sdpa"
    assert MiniLMConfig().attn_implementation == "sdpa"
    spy = SdpaSpy(monkeypatch)
    run("sdpa", train=True)
    assert spy.calls == [(True, 0.25)] * n_calls
    spy.calls.clear()
    run("sdpa", train=False)
    assert spy.calls == [(True, 0.0)] * n_calls
    spy.calls.clear()
    run("eager", train=True)
    assert spy.calls == []


def test_sdpa_dropout_is_active_in_training_only():
    model = UniterModel(UniterConfig.tiny(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.5))
    batch = uniter_batch(model.config, torch.Generator().manual_seed(10))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).last_hidden_state, model(**batch).last_hidden_state)
        model.train()
        torch.manual_seed(11)
        first = model(**batch).last_hidden_state
        torch.manual_seed(11)
        again = model(**batch).last_hidden_state
        second = model(**batch).last_hidden_state
    assert torch.equal(first, again)  # seeded: the global generator drives SDPA's dropout
    assert not torch.allclose(first, second)


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda v: UniterConfig.tiny(attn_implementation=v), "UniterConfig"),
        (lambda v: LxmertConfig.tiny(attn_implementation=v), "LxmertConfig"),
        (lambda v: MiniLMConfig(attn_implementation=v), "MiniLMConfig"),
    ],
    ids=["uniter", "lxmert", "minilm"],
)
@pytest.mark.parametrize("value", ["flash_attention_2", "SDPA", None])
def test_an_unknown_implementation_is_refused_naming_the_choices(make, name, value):
    with pytest.raises(AdvlabValueError) as err:
        make(value)
    message = str(err.value)
    assert f"`{name}.attn_implementation`" in message
    assert "'sdpa' or 'eager'" in message and repr(value) in message


@pytest.mark.slow  # a fresh Python process running the benchmark script
def test_bench_attention_quick_prints_both_paths():
    import math
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "bench_attention.py"), "--quick"],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| 0.1 |", "| 0.0 |"))]
    assert [r.split("|")[2].strip() for r in rows] == ["sdpa", "eager"] * 2
    for row in rows:
        numbers = [float(c) for c in row.strip("|").split("|")[2:] if c.strip() not in ("sdpa", "eager")]
        assert len(numbers) == 6 and all(math.isfinite(x) and x > 0 for x in numbers), row
    agreement = next(line for line in proc.stdout.splitlines() if line.startswith("max |SDPA - eager|"))
    assert float(agreement.split("logits ")[1].split(",")[0]) < 1e-4, agreement
