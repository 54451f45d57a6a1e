"""The pre-training stage of the retrieval experiment: masking, MLM / MRFR against hand-written equations, the
zero-δ adversarial loop, unchanged keys and fine-tuning without pre-training, the 2 x 2 arms end to end, bad inputs."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.testing import assert_close

from advlab._errors import AdvlabValueError
from advlab.experiments import retrieval as R
from advlab.experiments.retrieval import cli, runs, training
from advlab.experiments.retrieval import pretraining as P
from advlab.experiments.retrieval.data import _batches, prepare_data
from advlab.experiments.retrieval.losses import _batch_forward, _kl, _task_loss
from advlab.regularizers import symmetric_kl
from tests.test_retrieval import (
    TINY,
    WORDS,
    _features,
    _tokenizer,
    capture_cli_run,
    make_data,
    make_folder,
    tiny_config,
)

MASK_ID = len(WORDS) + 3  # one id past the tiny tokenizer's words: its [MASK]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("captions"))


@pytest.fixture(scope="module")
def data(folder: Path) -> R.RetrievalData:
    """The tiny fixture with one more vocabulary row, the [MASK] id."""
    return prepare_data(folder, tokenizer=_tokenizer, features=_features, text_weights=None, vocab_size=MASK_ID + 1)


def pt_config(**kw: object) -> R.RetrievalConfig:
    base: dict[str, object] = {"pretrain_epochs": 1, "mask_token_id": MASK_ID, "random_token_low": 3}
    base.update(kw)
    return tiny_config(**base)


def _double(data: R.RetrievalData) -> R.RetrievalData:
    train = replace(data.train, features=data.train.features.double(), boxes=data.train.boxes.double())
    return replace(data, train=train)


# ------------------------------------------------------------------------------------------------ masking


def _captions(seed: int, rows: int, low: int, high: int) -> tuple[Tensor, Tensor]:
    """Right-padded ids [CLS]=1 ... [SEP]=2 with real lengths in [low, high] and word ids 3..999."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (rows,), generator=gen)
    width = int(lengths.max()) + 2
    ids = torch.randint(3, 1000, (rows, width), generator=gen)
    real = torch.arange(width)[None, :] < lengths[:, None]
    ids = torch.where(real, ids, torch.zeros_like(ids))
    ids[:, 0] = 1
    ids[torch.arange(rows), lengths - 1] = 2
    return ids, real


@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(32, 64), low=st.integers(2, 12), rate=st.sampled_from([0.15, 0.3]))
def test_mask_tokens_rates_and_never_specials_or_padding(seed: int, rows: int, low: int, rate: float) -> None:
    ids, real = _captions(seed, rows, low, low + 20)
    gen = torch.Generator().manual_seed(seed + 1)
    masked, labels = P.mask_tokens(ids, real, rate=rate, mask_token_id=1000, random_low=3, vocab_size=1001, generator=gen)
    chosen = labels != -100
    lengths = real.sum(1)
    candidate = real.clone()
    candidate[:, 0] = False
    candidate[torch.arange(rows), lengths - 1] = False
    assert not (chosen & ~candidate).any()  # never [CLS], [SEP] or padding
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(masked[~chosen], ids[~chosen])
    n = candidate.sum(1).double()
    assert bool((chosen.any(1) | (n == 0)).all())  # at least one per caption that has a candidate
    # expected count: n p per caption, plus the forced one when nothing was drawn ((1 - p)^n)
    expected = float((n * rate + (1 - rate) ** n * (n > 0)).sum())
    sigma = math.sqrt(float((n * rate * (1 - rate)).sum()))
    assert abs(int(chosen.sum()) - expected) < 6 * sigma + 1
    again = P.mask_tokens(ids, real, rate=rate, mask_token_id=1000, random_low=3, vocab_size=1001,
                          generator=torch.Generator().manual_seed(seed + 1))
    assert torch.equal(again[0], masked) and torch.equal(again[1], labels)


def test_mask_tokens_splits_80_10_10() -> None:
    ids, real = _captions(0, 400, 30, 40)
    masked, labels = P.mask_tokens(ids, real, mask_token_id=5000, random_low=3000, vocab_size=5001,
                                   generator=torch.Generator().manual_seed(0))
    chosen = labels != -100
    m = int(chosen.sum())
    as_mask = int((masked[chosen] == 5000).sum())
    as_random = int(((masked[chosen] != 5000) & (masked[chosen] != ids[chosen])).sum())  # words are < 1000: never equal
    kept = m - as_mask - as_random
    for count, p in ((as_mask, 0.8), (as_random, 0.1), (kept, 0.1)):
        assert abs(count - p * m) < 5 * math.sqrt(m * p * (1 - p))
    replaced = masked[chosen & (masked != 5000) & (masked != ids)]
    assert bool(((replaced >= 3000) & (replaced < 5000)).all())


@given(seed=st.integers(0, 2**31 - 1), regions=st.integers(1, 17))
def test_mask_regions_at_least_one_and_the_rate(seed: int, regions: int) -> None:
    m = P.mask_regions(400, regions, rate=0.15, generator=torch.Generator().manual_seed(seed))
    assert bool(m.any(1).all())
    expected = 400 * (regions * 0.15 + 0.85**regions)
    assert abs(int(m.sum()) - expected) < 6 * math.sqrt(400 * regions * 0.15 * 0.85) + 1


# ------------------------------------------------------------------------------------------------ hand-written losses


def _gelu(x: Tensor) -> Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _layer_norm(x: Tensor, norm: nn.LayerNorm) -> Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


@pytest.mark.parametrize("backbone", ["uniter", "lxmert"])
def test_mlm_and_mrfr_match_their_equations(data: R.RetrievalData, backbone: str) -> None:
    cfg = pt_config(grid=2)
    model = R.build_model(backbone, cfg, data, seed=0, text_size=TINY).double().eval()
    heads = P.PretrainHeads(16, data.vocab_size, 6, generator=torch.Generator().manual_seed(3)).double()
    with torch.no_grad():  # non-trivial affine LayerNorms
        for norm in (heads.mlm_norm, heads.mrfr[2]):
            norm.weight.normal_(1.0, 0.3, generator=torch.Generator().manual_seed(4))
            norm.bias.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(5))
        heads.mlm_bias.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(6))
    train = _double(data).train
    batch = next(iter(_batches(train, torch.arange(len(train)), 4)))
    state: dict[str, Tensor] = {}
    P._prepare(batch, state, cfg, data.vocab_size, torch.Generator().manual_seed(1))
    out = P._pretrain_forward(model, heads, batch, state, torch.Generator().manual_seed(2))
    losses = P._task_losses(out)

    # by hand: zero the chosen regions, encode, run the joint stage, apply the heads' equations
    feats, boxes = R.pool_grid(batch["features"], batch["boxes"], cfg.grid)
    regions = state["region_mask"]
    zeroed = feats * (~regions).unsqueeze(-1).double()
    net = model.net
    with torch.no_grad():
        text = model.encode_text(batch["input_ids"], batch["attention_mask"])
        clean_img = model.encode_image(feats, boxes)
        masked_img = model.encode_image(zeroed, boxes)
        masked_txt = model.encode_text(state["masked_ids"], batch["attention_mask"])
        length = text.joint_in.shape[1]

        def joint(t: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            if backbone == "uniter":
                mask = torch.cat([batch["attention_mask"].double(), torch.ones(v.shape[:2], dtype=torch.float64)], 1)
                hidden = net.encoder(torch.cat([t, v], 1), mask)[-1]
                return hidden[:, :length], hidden[:, length:]
            ext = (1.0 - batch["attention_mask"].double())[:, None, None, :] * torch.finfo(torch.float64).min
            for layer in net.encoder.x_layers:
                t, v = layer(t, ext, v, None)
            return t, v

        _, v_states = joint(text.joint_in, masked_img.joint_in)
        x = v_states[regions]
        lin1, _, norm, lin2 = heads.mrfr
        pred = _layer_norm(_gelu(x @ lin1.weight.T + lin1.bias), norm) @ lin2.weight.T + lin2.bias
        target = feats[regions]
        mrfr = ((pred - target) ** 2).sum() / target.numel()

        t_states, _ = joint(masked_txt.joint_in, clean_img.joint_in)
        chosen = state["mlm_labels"] != -100
        h = _layer_norm(_gelu(t_states[chosen] @ heads.mlm_dense.weight.T + heads.mlm_dense.bias), heads.mlm_norm)
        logits = h @ net.embeddings.word_embeddings.weight.T + heads.mlm_bias
        labels = batch["input_ids"][chosen]
        mlm = -(logits.log_softmax(-1).gather(1, labels[:, None])).mean()
    assert int(regions.sum()) >= 4 and int(chosen.sum()) >= 4  # at least one per row
    assert_close(losses["mrfr"], mrfr, rtol=0, atol=1e-10)
    assert_close(losses["mlm"], mlm, rtol=0, atol=1e-10)
    assert_close(P.mrfr_loss(pred, target), mrfr, rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------------ the adversarial loop


def _zero_delta_by_hand(model: R.RetrievalModel, data: R.RetrievalData, cfg: R.RetrievalConfig, seed: int) -> list[float]:
    """Adversarial pre-training with δ ≡ 0 written out: a clean forward, K more, loss_clean + Σ (loss_k + λ KL_k) / K."""
    torch.manual_seed(seed + 1)
    gen = torch.Generator().manual_seed(seed)
    mask_gen = torch.Generator().manual_seed(seed + P._MASK_SEED)
    heads = P.PretrainHeads(16, data.vocab_size, 6, generator=torch.Generator().manual_seed(seed + P._HEAD_SEED)).double()
    params = [*model.parameters(), *heads.parameters()]
    opt = training._optimizer(model, cfg, list(heads.parameters()))
    steps = math.ceil(len(data.train) / cfg.batch_size)
    sched = training._warmup_decay(opt, steps * cfg.pretrain_epochs)
    model.train()
    means = []
    for _ in range(cfg.pretrain_epochs):
        order = torch.randperm(len(data.train), generator=gen)
        seen = []
        for batch in _batches(data.train, order, cfg.batch_size):
            opt.zero_grad(set_to_none=True)
            state: dict[str, Tensor] = {}
            P._prepare(batch, state, cfg, data.vocab_size, mask_gen)
            clean = P._pretrain_forward(model, heads, batch, state, gen)
            clean_loss = P._pretrain_loss(clean, cfg)
            total = clean_loss
            for _k in range(cfg.adv_steps):
                out = P._pretrain_forward(model, heads, batch, state, gen)
                kl = sum(symmetric_kl(p, q) for p, q in zip(P._distributions(out), P._distributions(clean)))
                total = total + (P._pretrain_loss(out, cfg) + cfg.kl_weight * kl) / cfg.adv_steps
            total.backward()
            nn.utils.clip_grad_norm_(params, 2.0)
            opt.step()
            sched.step()
            seen.append(float(clean_loss.detach()))
        means.append(sum(seen) / len(seen))
    return means


@pytest.mark.parametrize("backbone", ["uniter", "lxmert"])
def test_adversarial_pretraining_with_step_size_0_is_the_zero_delta_loop(data: R.RetrievalData, backbone: str) -> None:
    cfg = pt_config(pretrain_epochs=2, adv_steps=2, kl_weight=1.5).with_steps(0.0, 0.0)
    d = _double(data)
    engine = R.build_model(backbone, cfg, d, seed=0, text_size=TINY).double()
    hooks_before = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in engine.modules()]
    epochs = R.pretrain_run(engine, d, "adv", cfg, seed=0, progress=False)
    hand = R.build_model(backbone, cfg, d, seed=0, text_size=TINY).double()
    hand_losses = _zero_delta_by_hand(hand, d, cfg, seed=0)
    assert_close(torch.tensor([e["loss"] for e in epochs], dtype=torch.float64), torch.tensor(hand_losses, dtype=torch.float64),
                 rtol=0, atol=1e-10)
    for (name, a), b in zip(engine.state_dict().items(), hand.state_dict().values()):
        assert_close(a, b, rtol=0, atol=1e-10, msg=name)
    # hooks leave no trace
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in engine.modules()] == hooks_before
    # and the check can fail: standard pre-training (no extra forwards, no KL) ends elsewhere
    std = R.build_model(backbone, cfg, d, seed=0, text_size=TINY).double()
    R.pretrain_run(std, d, "std", cfg, seed=0, progress=False)
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(std.state_dict().values(), hand.state_dict().values()))


def test_adversarial_pretraining_perturbs_both_calls_of_both_sites(data: R.RetrievalData,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = pt_config(adv_steps=2, txt_step=0.1, img_step=0.1)
    model = R.build_model("uniter", cfg, data, seed=0, text_size=TINY)
    norms: dict[str, list[list[float]]] = {"txt": [], "img": []}
    real = training.free_training

    def spy(*a: object, **k: object):  # type: ignore[no-untyped-def]
        ctx = real(*a, **k)  # type: ignore[arg-type]
        original = ctx.backward

        def backward(loss: Tensor) -> None:
            original(loss)
            for m, seen in norms.items():
                seen.append([float(d.detach().norm()) if d is not None else 0.0 for d in ctx.deltas(m)])

        ctx.backward = backward  # type: ignore[method-assign]
        return ctx

    monkeypatch.setattr(training, "free_training", spy)
    R.pretrain_run(model, data, "adv", cfg, seed=0, progress=False)
    for m in ("txt", "img"):  # after the first (non-final) backward of each step, δ of both calls has moved
        assert all(len(calls) == 2 for calls in norms[m])
        assert all(calls[0] > 0 and calls[1] > 0 for calls in norms[m][::2])


def test_pretraining_is_deterministic_and_changes_the_weights(data: R.RetrievalData) -> None:
    cfg = pt_config(pretrain_epochs=2)
    states = []
    for _ in range(2):
        model = R.build_model("lxmert", cfg, data, seed=1, text_size=TINY)
        epochs = R.pretrain_run(model, data, "adv", cfg, seed=1, progress=False)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    fresh = R.build_model("lxmert", cfg, data, seed=1, text_size=TINY).state_dict()
    assert all(torch.equal(states[0][k], states[1][k]) for k in fresh)
    assert any(not torch.equal(states[0][k], fresh[k]) for k in fresh)
    assert [e["epoch"] for e in epochs] == [1, 2] and {"loss", "mlm", "itm", "mrfr"} <= set(epochs[0])
    assert all(math.isfinite(v) for e in epochs for v in e.values())


# ------------------------------------------------------------------------------------------------ nothing changes at 0


def _old_train_run(model: R.RetrievalModel, data: R.RetrievalData, arm: str, config: R.RetrievalConfig, seed: int) -> list[float]:
    """The fine-tuning loop as it was before the stages shared `training._fit` (the reference, kept verbatim in spirit)."""
    from advlab.free import free_training
    from advlab.sites import resolve_sites

    torch.manual_seed(seed + 1)
    gen = torch.Generator().manual_seed(seed)
    opt = training._optimizer(model, config)
    split = data.train
    total = max(1, math.ceil(len(split) / config.batch_size)) * config.epochs
    sched = training._warmup_decay(opt, total)
    perts, mode = (None, "") if arm == "baseline" else training._arm_perturbations(arm, config)
    sites = resolve_sites(model)
    itm = config.itm_weight > 0
    losses = []
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(split), generator=gen)
        epoch_loss = []
        for batch in _batches(split, order, config.batch_size):
            opt.zero_grad(set_to_none=True)
            negatives: dict[str, Tensor] = {}
            b = batch["caption_ids"].shape[0]

            def fwd(batch: dict[str, Tensor] = batch, negatives: dict[str, Tensor] = negatives):  # type: ignore[no-untyped-def]
                return _batch_forward(model, batch, negatives, gen)

            if perts is None:
                loss = _task_loss(fwd(), batch["caption_ids"], config.itm_weight)
                loss.backward()
                epoch_loss.append(float(loss.detach()))
            else:
                with free_training(model, sites, perts, steps=config.adv_steps, mode=mode,
                                   masks={"txt": batch["attention_mask"]}, logits=lambda o: o.packed, generator=gen) as ft:
                    clean = ft.clean(fwd)
                    clean_loss = _task_loss(clean, batch["caption_ids"], config.itm_weight)
                    ft.clean_loss(clean_loss)
                    for step in ft:
                        step_loss: Tensor = torch.zeros(())
                        for group in step.groups:
                            out = ft.forward(fwd, group)
                            step_loss = step_loss + _task_loss(out, batch["caption_ids"], config.itm_weight)
                            step_loss = step_loss + config.kl_weight * _kl(out.packed, step.clean_logits, b, itm)
                        ft.backward(step_loss / (len(step.groups) * ft.steps))
                epoch_loss.append(float(clean_loss.detach()))
            nn.utils.clip_grad_norm_(model.parameters(), 2.0)
            opt.step()
            sched.step()
        losses.append(sum(epoch_loss) / max(1, len(epoch_loss)))
    return losses


@pytest.mark.parametrize(("backbone", "arm", "itm_weight"),
                         [("uniter", "baseline", 0.0), ("uniter", "villa", 1.0), ("lxmert", "alter", 0.0)])
def test_fine_tuning_is_bit_identical_to_the_loop_before_pretraining(data: R.RetrievalData, backbone: str, arm: str,
                                                                     itm_weight: float) -> None:
    cfg = tiny_config(epochs=2, itm_weight=itm_weight)
    new = R.build_model(backbone, cfg, data, seed=0, text_size=TINY)
    old = R.build_model(backbone, cfg, data, seed=0, text_size=TINY)
    assert R.train_run(new, data, arm, cfg, seed=0, progress=False) == _old_train_run(old, data, arm, cfg, 0)
    assert all(torch.equal(a, b) for a, b in zip(new.state_dict().values(), old.state_dict().values()))


def test_pretrain_epochs_0_keeps_every_key_and_run(folder: Path, tmp_path: Path) -> None:
    plain = make_data(folder)  # the data every earlier retrieval test uses
    # keys computed by the code before the pre-training fields existed
    assert runs._config_key("uniter", "villa", tiny_config(), plain) == "390dfcdca978b07c"
    old = {"epochs": 10, "kl_weight": 1.5, "txt_step": 0.45, "img_step": 7.5}  # RetrievalConfig's defaults then
    assert runs._config_key("uniter", "baseline", R.RetrievalConfig(**old, relative=False, features="craft"),
                            plain) == "35f67be3215837ab"
    assert runs._config_key("lxmert", "baseline", R.RetrievalConfig(**old, features="effnet", relative=True), plain) == (
        "ec8cc1002d225420")
    # the other arms never read the pre-training settings: their keys leave them out whatever they are
    for arm in ("baseline", "villa", "noise"):
        assert runs._config_key("uniter", arm, pt_config(pretrain_epochs=4, pretrain_mlm_rate=0.3), plain) == (
            runs._config_key("uniter", arm, tiny_config(), plain))
    # a pt arm's key does depend on them
    a, b = pt_config(pretrain_epochs=1), pt_config(pretrain_epochs=2)
    assert runs._config_key("uniter", "pt-adv/ft-std", a, plain) != runs._config_key("uniter", "pt-adv/ft-std", b, plain)
    # a tiny baseline run with pretrain_epochs set is the run without it, bit for bit
    kw = {"arms": ("baseline",), "seeds": (0,), "text_size": TINY, "progress": False, "log": lambda s: None}
    rec0 = R.run_experiment(plain, configs={"uniter": tiny_config()}, out_dir=tmp_path / "a", **kw)[0]
    rec3 = R.run_experiment(plain, configs={"uniter": pt_config(pretrain_epochs=3)}, out_dir=tmp_path / "b", **kw)[0]
    assert rec0["key"] == rec3["key"] and rec0["losses"] == rec3["losses"] and rec0["epochs"] == rec3["epochs"]
    assert "pretrain" not in rec3


# ------------------------------------------------------------------------------------------------ the 2 x 2, end to end


def test_two_by_two_writes_four_records_shares_pretraining_and_resumes(data: R.RetrievalData, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"pretrain": 0, "train": 0}
    real_pre, real_train = runs.pretrain_run, runs.train_run

    def count_pre(*a: object, **k: object) -> list[dict[str, float]]:
        calls["pretrain"] += 1
        return real_pre(*a, **k)  # type: ignore[arg-type]

    def count_train(*a: object, **k: object) -> list[float]:
        calls["train"] += 1
        return real_train(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(runs, "pretrain_run", count_pre)
    monkeypatch.setattr(runs, "train_run", count_train)
    cfg = pt_config(pretrain_epochs=2)
    kw = {"arms": ("baseline", *R.ARMS_PRETRAIN), "seeds": (0, 1), "configs": {"uniter": cfg}, "out_dir": tmp_path,
          "text_size": TINY, "progress": False, "log": lambda s: None, "gate_factor": 0.0}
    recs = R.run_experiment(data, **kw)  # type: ignore[arg-type]
    pt = [r for r in recs if r["arm"] in R.ARMS_PRETRAIN]
    assert len(pt) == 8 and calls == {"pretrain": 4, "train": 10}  # one pre-training per (pt arm, seed)
    assert sorted(p.name for p in tmp_path.glob("uniter-pt-*.json")) == sorted(
        f"uniter-{a.replace('/', '_')}-seed{s}.json" for a in R.ARMS_PRETRAIN for s in (0, 1))
    assert len(list((tmp_path / "pretrained").glob("*.pt"))) == 4
    for r in pt:
        assert [e["epoch"] for e in r["pretrain"]["epochs"]] == [1, 2]
        assert r["pretrain"]["arm"] == r["arm"][3:6]
        assert r["pretrain"]["resumed"] == r["arm"].endswith("ft-adv")  # the second fine-tuning loads the first's
    by = {(r["arm"], r["seed"]): r for r in recs}
    assert by[("pt-std/ft-std", 0)]["losses"] != by[("baseline", 0)]["losses"]  # pre-training changed the start
    assert by[("pt-std/ft-std", 0)]["pretrain"]["epochs"] != by[("pt-adv/ft-std", 0)]["pretrain"]["epochs"]

    again = R.run_experiment(data, **kw)  # type: ignore[arg-type]
    assert all(r["resumed"] for r in again) and calls == {"pretrain": 4, "train": 10}

    # a lost fine-tuning record is redone from the cached pre-training, to the same numbers
    path = tmp_path / "uniter-pt-adv_ft-adv-seed1.json"
    before = json.loads(path.read_text())
    path.unlink()
    redone = next(r for r in R.run_experiment(data, **kw) if r["arm"] == "pt-adv/ft-adv" and r["seed"] == 1)  # type: ignore[arg-type]
    assert calls == {"pretrain": 4, "train": 11} and redone["pretrain"]["resumed"]
    assert redone["losses"] == before["losses"] and redone["epochs"] == before["epochs"]

    text = R.summarize(again)
    assert "Both stages of VILLA" in text and "PT VILLA + FT VILLA - PT std + FT std" in text
    assert "PT std + FT std - baseline" in text
    assert "| uniter | VILLA |" in R.results_markdown(again)
    assert [r["arm"] for r in R.load_records(tmp_path) if r["seed"] == 0] == ["baseline", *R.ARMS_PRETRAIN]


def test_pretrain_lines_pair_the_pretraining_stage_under_villa_fine_tuning() -> None:
    """PT VILLA + FT VILLA is paired against PT std + FT VILLA, per seed, next to the other pairs."""
    test = {("pt-std/ft-std", 0): 0.10, ("pt-std/ft-std", 1): 0.12, ("pt-std/ft-adv", 0): 0.20,
            ("pt-std/ft-adv", 1): 0.15, ("pt-adv/ft-adv", 0): 0.17, ("pt-adv/ft-adv", 1): 0.19}
    recs = [{"backbone": "uniter", "arm": a, "seed": s, "test": {"r1": v}} for (a, s), v in test.items()]
    pairs = [line for line in R.pretrain_lines(recs) if " - " in line]
    adv = [line for line in pairs if "PT VILLA + FT VILLA - PT std + FT VILLA" in line]
    assert len(adv) == 1 and "last epoch +0.5 ± 4.9 (2 seeds: -3.0, +4.0)" in adv[0]
    assert any("PT std + FT VILLA - PT std + FT std: last epoch +6.5" in line for line in pairs)


# ------------------------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize(
    ("kw", "message"),
    [({"pretrain_epochs": -1}, "`pretrain_epochs` to be an int >= 0, but got -1"),
     ({"pretrain_mlm_rate": 1.0}, r"`pretrain_mlm_rate` to be in the open interval \(0, 1\), but got 1.0"),
     ({"pretrain_region_rate": 0.0}, "`pretrain_region_rate` to be in the open interval"),
     ({"pretrain_mlm_rate": float("nan")}, "`pretrain_mlm_rate`"),
     ({"pretrain_mlm_weight": -1.0}, "`pretrain_mlm_weight`"),
     ({"pretrain_mlm_weight": 0.0, "pretrain_itm_weight": 0.0, "pretrain_mrfr_weight": 0.0}, "at least one of"),
     ({"mask_token_id": -1}, "`mask_token_id` to be an int >= 0")],
)
def test_config_refuses_bad_pretraining_settings(kw: dict[str, object], message: str) -> None:
    with pytest.raises(AdvlabValueError, match=message):
        R.RetrievalConfig(**kw)  # type: ignore[arg-type]


def test_pretrain_run_refuses_bad_inputs(data: R.RetrievalData, tmp_path: Path) -> None:
    model = R.build_model("uniter", pt_config(), data, seed=0, text_size=TINY)
    with pytest.raises(AdvlabValueError, match=r"one of \['std', 'adv'\], but got 'villa'"):
        R.pretrain_run(model, data, "villa", pt_config(), seed=0, progress=False)
    with pytest.raises(AdvlabValueError, match="`pretrain_epochs` >= 1 to pre-train, but got 0"):
        R.pretrain_run(model, data, "std", pt_config(pretrain_epochs=0), seed=0, progress=False)
    with pytest.raises(AdvlabValueError, match=r"`mask_token_id` \(103\).*vocabulary \(0 to 15\)"):
        R.pretrain_run(model, data, "std", pt_config(mask_token_id=103), seed=0, progress=False)
    only_mrfr = pt_config(pretrain_mlm_weight=0.0, pretrain_itm_weight=0.0)
    with pytest.raises(AdvlabValueError, match="MLM or ITM in adversarial pre-training"):
        R.pretrain_run(model, data, "adv", only_mrfr, seed=0, progress=False)
    with pytest.raises(AdvlabValueError, match=r"`pretrain_epochs` >= 1 in the config of \['uniter'\]"):
        R.run_experiment(data, arms=("baseline", "pt-std/ft-std"), seeds=(0,), configs={"uniter": tiny_config()},
                         out_dir=tmp_path, text_size=TINY, progress=False, log=lambda s: None)
    with pytest.raises(AdvlabValueError, match="Expected `arms` among"):
        R.run_experiment(data, arms=("baseline", "pt-x/ft-std"), seeds=(0,), out_dir=tmp_path, text_size=TINY,
                         progress=False, log=lambda s: None)
    ids = torch.tensor([[1, 4, 5, 2]])
    with pytest.raises(AdvlabValueError, match="open interval"):
        P.mask_tokens(ids, ids > 0, rate=0.0, mask_token_id=3, random_low=3, vocab_size=9,
                      generator=torch.Generator())
    with pytest.raises(AdvlabValueError, match="same shape"):
        P.mask_tokens(ids, ids[:, :3] > 0, mask_token_id=3, random_low=3, vocab_size=9, generator=torch.Generator())
    with pytest.raises(AdvlabValueError, match="same shape"):
        P.mrfr_loss(torch.zeros(2, 3), torch.zeros(2, 4))


@pytest.mark.parametrize(("argv", "epochs"), [(["--pretrain-epochs", "2"], 2), ([], 5)])
def test_cli_passes_the_pt_arms_and_pretrain_epochs(data: R.RetrievalData, tmp_path: Path, argv: list[str], epochs: int,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    seen = capture_cli_run(monkeypatch, data)
    code = cli.main(["--data", str(tmp_path), "--out", str(tmp_path / "out"), "--arms", "baseline", "pt-adv/ft-std",
                     *argv, "--no-progress"])
    assert code == 3 and seen["arms"] == ["baseline", "pt-adv/ft-std"]
    assert all(c.pretrain_epochs == epochs for c in seen["configs"].values())  # type: ignore[attr-defined]


def test_cli_refuses_pretrain_epochs_0(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--pretrain-epochs", "0", "--no-progress"])
    assert exit_info.value.code == 2 and "argument --pretrain-epochs" in capsys.readouterr().err
