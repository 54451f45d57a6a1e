"""`AdversarialTrainer` on sequence classifiers of other architectures than BERT (tiny random configs).

Each architecture names its own embedding site; advlab needs nothing else. For each: a FreeLB
run through the Trainer equals the hand-written loop of tests/test_integration_transformers.py
(≤ 1e-10 in float64, dropout off; in float32 ≤ 1e-6 with the hand loop's optimizer, `optim="adamw_torch"`:
the Trainer's default fused AdamW rounds otherwise, up to 1.7e-6 after 2 steps), δ respects the
padding mask, and no hook is left on any module.
T5 runs its encoder's embedding: `transformer.shared` is tied to it by weight, but it is another
module, which the forward never calls (advlab says so).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

import advlab
from advlab import AdvlabValueError
from advlab.integrations.transformers import AdversarialTrainer
from tests.test_integration_transformers import hand_loop, max_diff, quiet, train_args

VOCAB, SEQ = 40, 8
_SMALL = {"vocab_size": VOCAB, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
          "intermediate_size": 32, "num_labels": 3}
_NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
ARCHS = {
    "distilbert": ("distilbert.embeddings.word_embeddings",
                   {"vocab_size": VOCAB, "dim": 16, "n_layers": 1, "n_heads": 2, "hidden_dim": 32, "num_labels": 3,
                    "dropout": 0.0, "attention_dropout": 0.0, "seq_classif_dropout": 0.0}),
    "roberta": ("roberta.embeddings.word_embeddings",
                {**_SMALL, **_NO_DROPOUT, "max_position_embeddings": SEQ + 4, "pad_token_id": 1}),
    "albert": ("albert.embeddings.word_embeddings",
               {**_SMALL, **_NO_DROPOUT, "embedding_size": 8, "classifier_dropout_prob": 0.0}),
    "gpt2": ("transformer.wte", {"vocab_size": VOCAB, "n_embd": 16, "n_layer": 1, "n_head": 2, "num_labels": 3,
                                 "pad_token_id": 0, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}),
    "t5": ("transformer.encoder.embed_tokens",
           {"vocab_size": VOCAB, "d_model": 16, "d_kv": 8, "d_ff": 32, "num_layers": 1, "num_heads": 2,
            "num_labels": 3, "dropout_rate": 0.0, "classifier_dropout": 0.0, "decoder_start_token_id": 0,
            "pad_token_id": 0, "eos_token_id": 1}),
}


def model_of(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(arch, **ARCHS[arch][1]))
    model.accepts_loss_kwargs = False  # the Trainer divides each micro-batch's loss, as the hand loop does
    return model


def rows(n: int = 12, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Right-padded captions with pad id 0 and the eos id 1 last (T5 needs one), 2 .. SEQ tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, SEQ + 1, (), generator=g))
        ids = torch.zeros(SEQ, dtype=torch.long)
        ids[: length - 1] = torch.randint(2, VOCAB, (length - 1,), generator=g)
        ids[length - 1] = 1
        out.append({"input_ids": ids, "attention_mask": (torch.arange(SEQ) < length).long(),
                    "labels": torch.randint(0, 3, (), generator=g)})
    return out


def freelb(model: torch.nn.Module, site: str) -> advlab.FreeLB:
    return advlab.FreeLB(model, sites={"txt": site}, steps=2, step_size=0.3, init_magnitude=0.05,
                         generator=torch.Generator().manual_seed(7))


def hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("arch", list(ARCHS))
def test_trainer_equals_the_hand_loop_and_leaves_no_hook(tmp_path, arch):
    site = ARCHS[arch][0]
    data = rows()
    model = model_of(arch).double()  # float64 with the Trainer's default optimizer (fused AdamW), see below
    start, before = copy.deepcopy(model), hooks(model)
    trainer = quiet(AdversarialTrainer(model=model, args=train_args(tmp_path, max_steps=2), train_dataset=data,
                                       recipe=freelb(model, site)))
    trainer.train()
    ref = copy.deepcopy(start)
    hand_loop(ref, freelb(ref, site), data, steps=2, batch=2, accum=1)
    assert max_diff(model, ref) <= 1e-10
    assert max_diff(model, start) > 1e-4  # it trained
    assert hooks(model) == before


@pytest.mark.parametrize("arch", list(ARCHS))
def test_float32_equals_the_hand_loop_with_the_same_adamw(tmp_path, arch):
    """In float32 the Trainer's default `optim="adamw_torch_fused"` rounds otherwise than `torch.optim.AdamW()`
    (GPT-2: 1.7e-6 after 2 steps); with `optim="adamw_torch"`, the hand loop's optimizer, the weights are equal."""
    site = ARCHS[arch][0]
    data = rows()
    model = model_of(arch)
    start = copy.deepcopy(model)
    args = train_args(tmp_path, max_steps=2, optim="adamw_torch")
    quiet(AdversarialTrainer(model=model, args=args, train_dataset=data, recipe=freelb(model, site))).train()
    ref = copy.deepcopy(start)
    hand_loop(ref, freelb(ref, site), data, steps=2, batch=2, accum=1)
    assert max_diff(model, ref) <= 1e-6
    assert max_diff(model, start) > 1e-4  # it trained


@pytest.mark.parametrize(("arch", "consumer"), [("roberta", "roberta.embeddings.LayerNorm"),
                                              ("gpt2", "transformer.h.0.ln_1")])
def test_delta_stays_off_the_padding(arch, consumer):
    """With the mask from attention_mask, the first module after the embedding sums sees no change at padding."""
    site = ARCHS[arch][0]
    model = model_of(arch).double().eval()
    data = rows(4)
    ids = torch.stack([r["input_ids"] for r in data])
    mask = torch.stack([r["attention_mask"] for r in data])
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(consumer).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    model(input_ids=ids, attention_mask=mask)
    recipe = freelb(model, site)
    recipe.step(lambda: model(input_ids=ids, attention_mask=mask),
                lambda out: torch.nn.functional.cross_entropy(out.logits, torch.zeros(4, dtype=torch.long)),
                masks={"txt": mask})
    handle.remove()
    clean, perturbed = seen[0], seen[1:]
    changes = [x - clean for x in perturbed]
    assert max(c[mask == 1].abs().max().item() for c in changes) > 1e-3  # δ reached the real tokens
    assert all(c[mask == 0].abs().max().item() == 0 for c in changes)  # and never the padding


def test_t5_shared_table_is_not_the_called_module(tmp_path):
    model = model_of("t5")
    recipe = freelb(model, "transformer.shared")
    data = rows(4)
    with pytest.raises(AdvlabValueError, match="not called"):
        recipe.step(lambda: model(input_ids=torch.stack([r["input_ids"] for r in data])),
                    lambda out: out.logits.sum())
    assert hooks(model) == 0
