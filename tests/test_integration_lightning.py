"""`adversarial_step` (advlab.integrations.lightning) in a LightningModule with manual optimisation.

- precision="bf16-mixed": the forwards run under bf16 autocast and the weights equal a
  hand-written loop with the same recipe, data and optimizer under `torch.autocast("cpu",
  torch.bfloat16)` (≤ 1e-6); the recipe's statistics reach `trainer.callback_metrics`;
- precision="16-mixed" with a CPU GradScaler: the scale is passed to the recipe and removed;
- refusals (automatic optimisation, a recipe on a model the module does not hold), missing extra;
- strategy="ddp" on 2 CPU processes (slow): ranks end equal, each DDP bucket is reduced once
  per training step (Lightning alone would reduce at each of the K backwards), and the weights
  equal one process on the global batch.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision

import advlab
import tests._ddp_lightning_script as script
from advlab import AdvlabTypeError, AdvlabValueError
from advlab.integrations.lightning import adversarial_step

DATA = script.build_data()


def loader(batch: int = 2):
    return torch.utils.data.DataLoader(DATA, batch_size=batch, shuffle=False)


def hand_loop(model, *, steps: int = 2, batch: int = 2, autocast: bool = False, dtype=torch.bfloat16, sgd=False):
    recipe = script.build_recipe(model)
    if sgd:
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    for i in range(steps):
        rows = DATA[i * batch : (i + 1) * batch]
        b = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        opt.zero_grad()
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            recipe.step(lambda b=b: model(**b), lambda out: out.loss, masks={"txt": b["attention_mask"]})
        opt.step()
    return model


def max_diff(a, b) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_bf16_mixed_equals_hand_loop_under_autocast():
    module = script.Classifier(script.build_model())
    trainer = script.trainer(precision="bf16-mixed", devices=1)
    trainer.fit(module, loader())
    assert set(module.logit_dtypes) == {torch.bfloat16}  # every forward of the recipe ran under autocast
    assert len(module.logit_dtypes) == 2 * 2  # 2 steps x K = 2 forwards
    ref = hand_loop(script.build_model(), autocast=True)
    assert max_diff(module.model, ref) <= 1e-6
    fp32 = hand_loop(script.build_model(), autocast=False)
    assert max_diff(ref, fp32) > 1e-5  # autocast changes the numbers, so the comparison can fail
    metrics = trainer.callback_metrics
    assert metrics["adv_delta_norm_txt"] > 0 and metrics["adv_task_loss"] > 0


def test_16_mixed_scaler_reaches_the_recipe():
    """precision="16-mixed" with a CPU GradScaler (2^8; Lightning gives CPU none): SGD weights equal an unscaled float16-autocast loop."""
    module = script.Classifier(script.build_model(), sgd=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    trainer = script.trainer(devices=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert trainer.precision_plugin.scaler is scaler
    trainer.fit(module, loader())
    assert set(module.logit_dtypes) == {torch.float16}
    assert trainer.precision_plugin.scaler.get_scale() == 2.0**8  # no overflow, no skipped step
    ref = hand_loop(script.build_model(), autocast=True, dtype=torch.float16, sgd=True)
    moved = max_diff(ref, script.build_model())
    assert moved > 1e-2
    assert max_diff(module.model, ref) <= 2e-3 * moved  # float16 rounding only; a scale left in: off by 256x


def test_16_mixed_overflow_skips_the_step_as_manual_backward_does():
    """A CPU GradScaler at 2^20 overflows float16 for the first steps: a plain-training recipe (FreeLB, K = 1,
    δ = 0) gives the weights and scale of `manual_backward` (before: torch's 'No inf checks were recorded for
    this optimizer' at the first `opt.step()`)."""

    class Adversarial(script.Classifier):
        def __init__(self, model):
            super().__init__(model, sgd=True)
            self.recipe = advlab.FreeLB(model, sites=script.SITE, steps=1, step_size=0.0)

    class Plain(script.Classifier):
        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(self(batch).loss)
            opt.step()

    def run(module):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20, growth_interval=1)
        trainer = script.trainer(devices=1, max_steps=4, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
        trainer.fit(module, loader())
        return scaler.get_scale()

    adversarial, plain = Adversarial(script.build_model()), Plain(script.build_model(), sgd=True)
    scale, plain_scale = run(adversarial), run(plain)
    assert scale == plain_scale < 2.0**24  # grew by 2 at each stepped step, 4 steps: some were skipped
    assert max_diff(adversarial.model, plain.model) <= 1e-6
    assert max_diff(adversarial.model, script.build_model()) > 1e-3  # it trained


def test_refusals():
    module = script.Classifier(script.build_model())
    module.automatic_optimization = True
    with pytest.raises(AdvlabValueError, match="automatic_optimization = False"):
        adversarial_step(module, module.recipe, {}, lambda out: out.loss)
    module.automatic_optimization = False
    other = script.build_recipe(script.build_model())
    with pytest.raises(AdvlabValueError, match="built on `module` or one of its submodules"):
        adversarial_step(module, other, {}, lambda out: out.loss)
    with pytest.raises(AdvlabValueError, match="attached to a Trainer"):
        adversarial_step(module, module.recipe, {}, lambda out: out.loss)
    kwargs_style = script.Classifier(script.build_model())
    kwargs_style.forward = lambda input_ids, attention_mask, labels: None  # not `forward(batch)`
    with pytest.raises(AdvlabTypeError, match=r"forward` to take the batch.*`module\(batch\)`.*'attention_mask'"):
        adversarial_step(kwargs_style, kwargs_style.recipe, {"input_ids": None}, lambda out: out.loss)
    with pytest.raises(AdvlabTypeError, match=r"got the class FreeLB, not an instance.*FreeLB\(model, sites=\.\.\.\)"):
        adversarial_step(module, advlab.FreeLB, {}, lambda out: out.loss)


def test_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.delitem(sys.modules, "advlab.integrations.lightning")
    with pytest.raises(ImportError, match=r"pip install 'advlab\[lightning\]'"):
        importlib.import_module("advlab.integrations.lightning")


@pytest.mark.slow
def test_ddp_two_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    env.pop("MASTER_PORT", None)
    cmd = [sys.executable, str(Path(__file__).with_name("_ddp_lightning_script.py")), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for name, p in ranks[0]["weights"].items():
        assert torch.equal(p, ranks[1]["weights"][name]), name
    for r in ranks:  # one round per training step, though each step has K = 2 backwards
        assert r["buckets"] >= 1 and r["rounds"] == [[*range(r["buckets"])]] * 2, r["rounds"]
    # rank 0 gets rows 0, 2 and rank 1 rows 1, 3: together the global batch of one process
    ref = hand_loop(script.build_model(), batch=4)
    assert [t.tolist() for t in ranks[0]["seen"]] == [
        [DATA[i]["input_ids"][0].item() for i in (0, 2)],
        [DATA[i]["input_ids"][0].item() for i in (4, 6)],
    ]
    got = ranks[0]["weights"]
    assert max((got[n] - p).abs().max().item() for n, p in ref.state_dict().items()) <= 1e-5
