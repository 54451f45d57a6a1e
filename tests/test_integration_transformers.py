"""`AdversarialTrainer` (advlab.integrations.transformers) on a tiny random BertForSequenceClassification.

- N optimizer steps equal a hand-written loop with the same recipe, data order, optimizer and
  clipping (≤ 1e-6, float32), with and without gradient accumulation;
- the loss of each micro-batch is scaled by the Trainer's own rule: a recipe whose step is plain
  training (FreeLB, K = 1, δ = 0) gives the plain Trainer's weights, both when the Trainer
  divides by the accumulation steps and when it deems the loss normalised by num_items_in_batch;
- accelerate's GradScaler reaches the recipe (fp16 with a CPU scaler: scale 2^8 = scale 1);
- recipe statistics in the logs, masks from the batch, resume from a checkpoint, refusals;
- without transformers / accelerate, the import names the extra to install;
- `torchrun --nproc_per_node 2` (gloo): ranks end equal, one reduction round per optimizer step,
  weights equal one process on the global batch (slow).
"""

from __future__ import annotations

import copy
import importlib
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

import advlab
from advlab import AdvlabTypeError, AdvlabValueError
from advlab.integrations.transformers import AdversarialTrainer

SITE = {"txt": "bert.embeddings.word_embeddings"}
SEQ = 8
CONFIG = {
    "vocab_size": 40,
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 16,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "num_labels": 3,
}


def tiny_bert(seed: int = 0, *, loss_kwargs: bool = True) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(**CONFIG))
    if not loss_kwargs:  # the Trainer then divides each micro-batch's (mean) loss by the accumulation steps
        model.accepts_loss_kwargs = False
    return model


def dataset(n: int = 16, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = int(torch.randint(3, SEQ + 1, (), generator=g))
        ids = torch.zeros(SEQ, dtype=torch.long)
        ids[:length] = torch.randint(1, CONFIG["vocab_size"], (length,), generator=g)
        mask = (torch.arange(SEQ) < length).long()
        label = torch.randint(0, CONFIG["num_labels"], (), generator=g)
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": label, "idx": torch.tensor(i)})
    return rows  # "idx" is no model input: remove_unused_columns must drop it


def train_args(tmp_path: Path, **kw) -> TrainingArguments:
    base = {
        "per_device_train_batch_size": 2,
        "max_steps": 3,
        "learning_rate": 1e-2,
        "lr_scheduler_type": "constant",
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "use_cpu": True,
        "report_to": [],
        "save_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
        "train_sampling_strategy": "sequential",
        "seed": 0,
    }
    base.update(kw)
    return TrainingArguments(str(tmp_path / "out"), **base)


def freelb(model, **kw):
    kw = {"steps": 2, "step_size": 0.3, "init_magnitude": 0.05, "generator": torch.Generator().manual_seed(7)} | kw
    return advlab.FreeLB(model, sites=SITE, **kw)


def quiet(trainer: Trainer) -> Trainer:
    trainer.remove_callback(transformers.PrinterCallback)
    return trainer


def max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def hand_loop(model, recipe, data, *, steps, batch, accum, lr=1e-2, clip=1.0, scale=None):
    """The same training written out: sequential batches, AdamW, clipping, recipe.step per micro-batch."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    scale = 1.0 / accum if scale is None else scale
    it = iter(range(0, len(data), batch))
    model.train()
    for _ in range(steps):
        for _ in range(accum):
            start = next(it)
            rows = data[start : start + batch]
            ids = torch.stack([r["input_ids"] for r in rows])
            mask = torch.stack([r["attention_mask"] for r in rows])
            y = torch.stack([r["labels"] for r in rows])
            recipe.step(
                lambda ids=ids, mask=mask: model(input_ids=ids, attention_mask=mask),
                lambda out, y=y: F.cross_entropy(out.logits, y),
                masks={"txt": mask},
                scale=scale,
            )
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
    return model


def villa(model):
    """VILLA text-only, official preset (clean forward, symmetric KL), 2 ascent steps."""
    return advlab.VILLA(model, sites=SITE, steps=2, step_size=0.1, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize(
    "recipe,accum",
    [(freelb, 1), (freelb, 2), pytest.param(villa, 2, marks=pytest.mark.slow)],
    ids=["freelb-accum1", "freelb-accum2", "villa-accum2"],
)
def test_equals_hand_written_loop(tmp_path, recipe, accum):
    data = dataset()
    model = tiny_bert(loss_kwargs=False)
    start = copy.deepcopy(model)
    trainer = quiet(
        AdversarialTrainer(
            model=model,
            args=train_args(tmp_path, gradient_accumulation_steps=accum),
            train_dataset=data,
            recipe=recipe(model),
        )
    )
    trainer.train()
    ref = copy.deepcopy(start)
    hand_loop(ref, recipe(ref), data, steps=3, batch=2, accum=accum)
    assert max_diff(model, ref) <= 1e-6
    assert max_diff(model, start) > 1e-3  # it trained


def test_hand_loop_tells_accumulation_scales_apart(tmp_path):
    """The comparison above can fail: a loop that does not divide by the accumulation steps lands elsewhere."""
    data = dataset()
    a, b = tiny_bert(loss_kwargs=False), tiny_bert(loss_kwargs=False)
    hand_loop(a, freelb(a), data, steps=3, batch=2, accum=2, clip=1e9, lr=1e-1)
    hand_loop(b, freelb(b), data, steps=3, batch=2, accum=2, clip=1e9, lr=1e-1, scale=1.0)
    assert max_diff(a, b) > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("loss_kwargs", [True, False], ids=["num_items_rule", "divide_by_accum"])
def test_plain_step_recipe_equals_plain_trainer(tmp_path, loss_kwargs):
    """FreeLB with K = 1 and δ = 0 is plain training: the weights must be the plain Trainer's, whichever GA rule."""
    data = dataset()
    args = train_args(tmp_path, gradient_accumulation_steps=2, optim="sgd", learning_rate=0.5, max_grad_norm=0.0)
    plain = tiny_bert(loss_kwargs=loss_kwargs)
    quiet(Trainer(model=plain, args=args, train_dataset=data)).train()
    model = tiny_bert(loss_kwargs=loss_kwargs)
    recipe = advlab.FreeLB(model, sites=SITE, steps=1, step_size=0.0)
    quiet(AdversarialTrainer(model=model, args=args, train_dataset=data, recipe=recipe)).train()
    assert max_diff(model, plain) <= 1e-6
    if loss_kwargs:  # BertForSequenceClassification takes **kwargs: the Trainer does not divide its mean loss
        other = tiny_bert(loss_kwargs=False)
        quiet(Trainer(model=other, args=args, train_dataset=data)).train()
        assert max_diff(other, plain) > 1e-4  # the two rules differ, so this test tells them apart


@pytest.mark.slow
def test_fp16_scaler_reaches_the_recipe(tmp_path):
    """A CPU GradScaler in accelerate's place: SGD weights with scale 2^8 equal those with scale 1."""

    def run(init_scale: float) -> torch.nn.Module:
        model = tiny_bert(loss_kwargs=False)
        recipe = advlab.SMART(
            model,
            sites=SITE,
            steps=1,
            step_size=1e-2,
            noise_std=1e-3,
            weight=1.0,
            generator=torch.Generator().manual_seed(3),
        )
        args = train_args(tmp_path, fp16=True, optim="sgd", learning_rate=0.5, max_grad_norm=1.0, max_steps=2)
        trainer = quiet(AdversarialTrainer(model=model, args=args, train_dataset=dataset(), recipe=recipe))
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        trainer.accelerator.native_amp = True  # float16 autocast on CPU, unscaling before clipping
        calls = []
        step = recipe.step
        recipe.step = lambda *a, **kw: calls.append(kw["scaler"]) or step(*a, **kw)
        trainer.train()
        assert calls and all(s is trainer.accelerator.scaler for s in calls)
        assert trainer.accelerator.scaler.get_scale() == init_scale  # no overflow, no skipped step
        return model

    one, big = run(1.0), run(2.0**8)
    start = tiny_bert()
    moved = max_diff(one, start)
    assert moved > 1e-2
    assert max_diff(big, one) <= 2e-3 * moved  # float16 rounding only; a scale left in would be off by 256x


@pytest.mark.parametrize("accum", [1, 2])
def test_fp16_overflow_skips_the_optimizer_step_as_the_trainer_does(tmp_path, accum):
    """Scale 2^20 overflows float16 for the first steps: a plain-training recipe (FreeLB, K = 1, δ = 0) gives the
    plain Trainer's weights, scale, skipped steps and learning rates (before: torch's 'No inf checks were recorded
    for this optimizer' with one micro-batch per step, an optimizer step on the other micro-batches with two)."""

    def run(adversarial: bool):
        model = tiny_bert(loss_kwargs=False)
        args = train_args(
            tmp_path,
            fp16=True,
            optim="sgd",
            learning_rate=0.5,
            max_steps=4,
            gradient_accumulation_steps=accum,
            lr_scheduler_type="linear",
            logging_strategy="steps",
            logging_steps=1,
        )
        kw = {"model": model, "args": args, "train_dataset": dataset()}
        if adversarial:
            trainer = AdversarialTrainer(**kw, recipe=advlab.FreeLB(model, sites=SITE, steps=1, step_size=0.0))
        else:
            trainer = Trainer(**kw)
        quiet(trainer)
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20, growth_interval=1)
        trainer.accelerator.native_amp = True  # float16 autocast on CPU, unscaling before clipping
        trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h]
        return model, trainer.accelerator.scaler.get_scale(), logs

    model, scale, logs = run(True)
    plain, plain_scale, plain_logs = run(False)
    skipped = [h["grad_norm"] != h["grad_norm"] for h in logs]  # NaN grad norm: the scaler skipped the step
    assert 1 <= sum(skipped) < len(logs)  # some steps overflowed, some trained
    assert skipped == [h["grad_norm"] != h["grad_norm"] for h in plain_logs]
    assert [h["learning_rate"] for h in logs] == [h["learning_rate"] for h in plain_logs]  # no scheduler step
    assert scale == plain_scale
    assert max_diff(model, plain) <= 1e-6
    assert max_diff(model, tiny_bert()) > 1e-3  # it trained


def test_recipe_stats_in_logs(tmp_path):
    model = tiny_bert(loss_kwargs=False)
    recipe = advlab.SMART(
        model,
        sites=SITE,
        steps=1,
        step_size=1e-2,
        noise_std=1e-3,
        weight=1.0,
        generator=torch.Generator().manual_seed(3),
    )
    trainer = quiet(
        AdversarialTrainer(
            model=model,
            args=train_args(tmp_path, logging_steps=1, logging_strategy="steps", eval_strategy="steps", eval_steps=3),
            train_dataset=dataset(),
            eval_dataset=dataset(4, seed=2),
            recipe=recipe,
        )
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]  # the Trainer's evaluation, no recipe
    assert len(evals) == 1 and not any(k.startswith("adv_") for k in evals[0])
    for h in logs:
        assert h["adv_task_loss"] == pytest.approx(h["loss"], rel=1e-5)  # no accumulation: the same number
        assert h["adv_regularizer"] > 0
        assert h["adv_delta_norm_txt"] > 0
        assert h["adv_skipped_steps"] == 0


def test_no_recipe_stats_carried_into_the_next_train_call(tmp_path):
    """Steps after the last log of one `train()` are never logged, nor averaged into the next run's first log."""
    model = tiny_bert(loss_kwargs=False)
    trainer = quiet(
        AdversarialTrainer(
            model=model,
            args=train_args(tmp_path, logging_strategy="steps", logging_steps=10),  # 3 steps: no log
            train_dataset=dataset(),
            recipe=freelb(model),
        )
    )
    trainer.train()
    assert not [h for h in trainer.state.log_history if "loss" in h]
    trainer.args.logging_steps, trainer.args.max_steps = 1, 1
    trainer.train()
    (log,) = [h for h in trainer.state.log_history if "loss" in h]
    assert log["adv_task_loss"] == pytest.approx(log["loss"], rel=1e-5)  # this step's own, nothing older


class _Spy:
    """Records the masks the recipe gets."""

    def __init__(self, recipe):
        self.recipe, self.masks = recipe, []
        step = recipe.step
        recipe.step = lambda *a, **kw: self.masks.append(kw["masks"]) or step(*a, **kw)


def test_masks_from_attention_mask_by_default(tmp_path):
    data = dataset()
    model = tiny_bert()
    spy = _Spy(freelb(model))
    quiet(
        AdversarialTrainer(model=model, args=train_args(tmp_path, max_steps=1), train_dataset=data, recipe=spy.recipe)
    ).train()
    expected = torch.stack([data[0]["attention_mask"], data[1]["attention_mask"]])
    assert len(spy.masks) == 1 and torch.equal(spy.masks[0]["txt"], expected)
    assert not expected.all()  # padded rows: the mask matters


def test_masks_mapping_and_none(tmp_path):
    model = tiny_bert()
    spy = _Spy(freelb(model))
    quiet(
        AdversarialTrainer(
            model=model, args=train_args(tmp_path, max_steps=1), train_dataset=dataset(), recipe=spy.recipe, masks=None
        )
    ).train()
    assert spy.masks == [{}]
    missing = r"'token_mask', the mask of modality 'txt'.*'attention_mask'"
    wrong_shape = r"shape \(2, 8\).*got \(2,\)\. That mask is the batch's 'labels'.*masks="
    # a missing key named in a mapping or as a string (a typo must not turn masking off), and a key
    # of the wrong shape (the message says which batch key `masks=` took)
    for masks, match in (({"txt": "token_mask"}, missing), ("token_mask", missing), ({"txt": "labels"}, wrong_shape)):
        trainer = quiet(
            AdversarialTrainer(
                model=model,
                args=train_args(tmp_path, max_steps=1),
                train_dataset=dataset(),
                recipe=spy.recipe,
                masks=masks,
            )
        )
        with pytest.raises(AdvlabValueError, match=match):
            trainer.train()
    with pytest.raises(AdvlabValueError, match=r"recipe's modalities \['txt'\].*\['img'\]"):
        AdversarialTrainer(model=model, args=train_args(tmp_path), recipe=spy.recipe, masks={"img": "pixel_mask"})


def test_default_mask_refused_for_a_recipe_with_several_modalities(tmp_path):
    """Two sites of the same shape: the default would mask both with the text's mask, silently. Name each key."""
    model = tiny_bert()
    sites = {"txt": "bert.embeddings.word_embeddings", "typ": "bert.embeddings.token_type_embeddings"}
    recipe = advlab.FreeLB(model, sites=sites, steps=2, step_size=0.1)
    with pytest.raises(
        AdvlabValueError, match=r"several modalities \['txt', 'typ'\].*masks=\{'txt': 'attention_mask', 'typ': None\}"
    ):
        AdversarialTrainer(model=model, args=train_args(tmp_path), train_dataset=dataset(), recipe=recipe)
    for masks in ("attention_mask", {"txt": "attention_mask", "typ": None}, None):  # named on purpose: accepted
        trainer = AdversarialTrainer(
            model=model, args=train_args(tmp_path), train_dataset=dataset(), recipe=recipe, masks=masks
        )
        assert set(trainer.mask_keys) == ({"txt", "typ"} if masks == "attention_mask" else {"txt"} if masks else set())


def test_default_mask_missing_from_the_batch_warns_once(tmp_path):
    """A forward without `attention_mask`: remove_unused_columns drops it, δ goes on the padding too; say so once."""

    class NoMaskArg(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = torch.nn.Embedding(CONFIG["vocab_size"], 8), torch.nn.Linear(8, CONFIG["num_labels"])

        def forward(self, input_ids, labels):
            logits = self.head(self.emb(input_ids).mean(1))
            return {"loss": F.cross_entropy(logits, labels), "logits": logits}

    model = NoMaskArg()
    recipe = advlab.FreeLB(model, sites={"txt": "emb"}, steps=2)
    trainer = quiet(AdversarialTrainer(model=model, args=train_args(tmp_path), train_dataset=dataset(), recipe=recipe))
    with pytest.warns(
        UserWarning, match=r"no 'attention_mask'.*padding included.*NoMaskArg.forward does not take"
    ) as got:
        trainer.train()
    assert sum("no 'attention_mask'" in str(w.message) for w in got) == 1  # 3 steps, one warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        quiet(
            AdversarialTrainer(
                model=model, args=train_args(tmp_path), train_dataset=dataset(), recipe=recipe, masks=None
            )
        ).train()  # masks=None: perturbing everywhere is asked for, no warning


def test_refusals(tmp_path):
    model = tiny_bert()
    with pytest.raises(AdvlabValueError, match="built on another model object"):
        AdversarialTrainer(model=model, args=train_args(tmp_path), recipe=freelb(tiny_bert()))
    with pytest.raises(AdvlabTypeError, match="Expected `recipe` to be an advlab recipe"):
        AdversarialTrainer(model=model, args=train_args(tmp_path), recipe=lambda: None)
    with pytest.raises(AdvlabTypeError, match=r"got the class FreeLB, not an instance.*FreeLB\(model, sites=\.\.\.\)"):
        AdversarialTrainer(model=model, args=train_args(tmp_path), recipe=advlab.FreeLB)
    with pytest.raises(AdvlabValueError, match="`model_init`"):
        AdversarialTrainer(args=train_args(tmp_path), model_init=tiny_bert, recipe=freelb(model))
    for optim in ("lomo", "adalomo", "galore_adamw_layerwise"):  # they step inside each backward
        with pytest.raises(AdvlabValueError, match=rf"`args.optim` is '{optim}'.*several backwards per step"):
            AdversarialTrainer(model=model, args=train_args(tmp_path, optim=optim), recipe=freelb(model))


def test_compute_loss_override_without_outputs_is_refused(tmp_path):
    """An override that ignores `return_outputs` gets a message, not torch's 'iteration over a 0-d tensor'."""

    class LossOnly(AdversarialTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return model(**inputs).loss

    model = tiny_bert()
    trainer = quiet(
        LossOnly(model=model, args=train_args(tmp_path, max_steps=1), train_dataset=dataset(), recipe=freelb(model))
    )
    with pytest.raises(
        AdvlabTypeError, match=r"LossOnly.compute_loss.*pair \(loss, model outputs\).*Tensor of shape \(\)"
    ):
        trainer.train()
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0


@pytest.mark.parametrize("returns", ["logits", "per_row_loss"])
def test_loss_that_is_not_a_scalar_says_where_it_came_from(tmp_path, returns):
    """A plain module returning its logits (the Trainer takes outputs[0] as the loss) or a per-row loss."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = torch.nn.Embedding(CONFIG["vocab_size"], 8), torch.nn.Linear(8, CONFIG["num_labels"])

        def forward(self, input_ids, attention_mask, labels):
            logits = self.head(self.emb(input_ids).mean(1))
            if returns == "logits":
                return (logits,)
            return {"loss": F.cross_entropy(logits, labels, reduction="none"), "logits": logits}

    model = Net()
    recipe = advlab.FreeLB(model, sites={"txt": "emb"}, steps=2)
    trainer = quiet(AdversarialTrainer(model=model, args=train_args(tmp_path), train_dataset=dataset(), recipe=recipe))
    source = r"the first element of the model's tuple output" if returns == "logits" else r"the model's `loss` entry"
    shape = r"\(2, 3\)" if returns == "logits" else r"\(2,\)"
    with pytest.raises(AdvlabValueError, match=rf"one scalar loss per forward, but got shape {shape}, from {source}"):
        trainer.train()


def test_compute_loss_override_with_outputs_runs(tmp_path):
    """An override that honours `return_outputs` is what the recipe's loss is made of."""
    calls = []

    class Weighted(AdversarialTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            loss = 2.0 * F.cross_entropy(outputs.logits, labels)
            calls.append(return_outputs)
            return (loss, outputs) if return_outputs else loss

    model = tiny_bert(loss_kwargs=False)
    trainer = quiet(
        Weighted(
            model=model,
            args=train_args(tmp_path, max_steps=1, logging_strategy="steps", logging_steps=1),
            train_dataset=dataset(),
            recipe=freelb(model),
        )
    )
    trainer.train()
    (log,) = [h for h in trainer.state.log_history if "loss" in h]
    assert calls == [True, True]  # one forward per ascent step (K = 2)
    assert log["adv_task_loss"] == pytest.approx(log["loss"], rel=1e-5) and log["loss"] > 1.5  # 2 x ~ln 3


def test_data_parallel_refused(tmp_path, monkeypatch):
    model = tiny_bert()
    trainer = quiet(
        AdversarialTrainer(model=model, args=train_args(tmp_path), train_dataset=dataset(), recipe=freelb(model))
    )
    monkeypatch.setattr(TrainingArguments, "n_gpu", property(lambda self: 2))
    with pytest.raises(AdvlabValueError, match=r"2 GPUs in one process.*torchrun --nproc_per_node N"):
        trainer.training_step(model, dataset()[0])


@pytest.mark.slow
def test_resume_from_checkpoint_equals_uninterrupted(tmp_path):
    """4 steps straight = 2 steps, checkpoint, resume for 2 (random sampling, random δ init from a generator)."""
    data = dataset()
    kw = {"max_steps": 4, "train_sampling_strategy": "random", "save_strategy": "steps", "save_steps": 2}

    def trainer(out: str) -> AdversarialTrainer:
        model = tiny_bert(loss_kwargs=False)
        return quiet(
            AdversarialTrainer(
                model=model, args=train_args(tmp_path / out, **kw), train_dataset=data, recipe=freelb(model)
            )
        )

    straight = trainer("a")
    straight.train()
    first = trainer("b")
    first.args.max_steps = 2
    first.train()
    resumed = trainer("b")
    resumed.recipe.generator.manual_seed(12345)  # the checkpoint must restore it
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    assert max_diff(resumed.model, straight.model) <= 1e-6


def test_resume_without_the_recipe_generator_file_warns(tmp_path):
    """A checkpoint without advlab_recipe_rng_<rank>.pth (a plain Trainer's, say) cannot restore the draws: say so."""
    data = dataset()
    args = train_args(tmp_path, max_steps=1, save_strategy="steps", save_steps=1)
    model = tiny_bert()
    quiet(Trainer(model=model, args=args, train_dataset=data)).train()
    checkpoint = tmp_path / "out" / "checkpoint-1"
    assert checkpoint.is_dir() and not list(checkpoint.glob("advlab_recipe_rng_*"))
    args.max_steps = 2
    trainer = quiet(AdversarialTrainer(model=model, args=args, train_dataset=data, recipe=freelb(model)))
    with pytest.warns(UserWarning, match=r"recipe's generator state \(advlab_recipe_rng_0.pth\)"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 2


@pytest.mark.parametrize("hidden", ["transformers", "accelerate"])
def test_missing_extra_names_it(monkeypatch, hidden):
    monkeypatch.setitem(sys.modules, hidden, None)  # `import hidden` now raises ImportError
    monkeypatch.delitem(sys.modules, "advlab.integrations.transformers")
    with pytest.raises(ImportError, match=rf"'{hidden}' cannot be imported.*pip install 'advlab\[transformers\]'"):
        importlib.import_module("advlab.integrations.transformers")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    """torchrun, 2 CPU processes (gloo), accumulation 2, FreeLB K = 2."""
    script = Path(__file__).with_name("_ddp_trainer_script.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        str(script),
        str(tmp_path),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for name, p in ranks[0]["weights"].items():
        assert torch.equal(p, ranks[1]["weights"][name]), name
    for r in ranks:  # each bucket all-reduced once per optimizer step (2 micro-batches x 2 ascent steps each)
        assert r["buckets"] >= 1 and r["rounds"] == [[*range(r["buckets"])]] * 2, r["rounds"]
    # one process on the global batch (4 rows a micro-batch) reaches the same weights
    import tests._ddp_trainer_script as ddp

    model = ddp.build_model()
    args = ddp.build_args(str(tmp_path / "single"), batch=4, ddp_backend=None)
    quiet(
        AdversarialTrainer(model=model, args=args, train_dataset=ddp.build_data(), recipe=ddp.build_recipe(model))
    ).train()
    single = model.state_dict()
    assert max((single[n] - p).abs().max().item() for n, p in ranks[0]["weights"].items()) <= 1e-5


@pytest.mark.slow
def test_integrations_guide_code_runs(tmp_path, monkeypatch, capsys):
    """The ```python blocks of docs/integrations.md run in order (Trainer and Lightning examples)."""
    import re

    text = (Path(__file__).parents[1] / "docs" / "integrations.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/integrations.md", "exec"), namespace)  # noqa: S102
    out = capsys.readouterr().out
    assert "adv_delta_norm_txt" in out and "adv_task_loss" in out
