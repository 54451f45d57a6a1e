"""End to end: each VILLA task preset runs one step on a tiny UNITER with synthetic data."""

import math

import pytest
import torch

import advlab
from advlab.backbones.uniter import (
    UniterConfig,
    UniterForNLVR2,
    UniterForVCR,
    UniterForVisualEntailment,
    UniterForVQA,
    nlvr2_loss,
    vcr_loss,
    ve_loss,
    vqa_loss,
)
from advlab.data.uniter_db import uniter_collate

CFG = UniterConfig.tiny()


def random_rows(gen, txt_lens, nbbs, vocab=CFG.vocab_size):
    rows = []
    for t, n in zip(txt_lens, nbbs):
        rows.append({
            "input_ids": torch.randint(1, vocab, (t,), generator=gen),
            "img_feat": torch.randn(n, CFG.img_dim, generator=gen),
            "img_pos_feat": torch.rand(n, 7, generator=gen),
        })
    return rows


def vqa_task(gen):
    rows = random_rows(gen, [5, 3, 4], [3, 4, 2])
    for row in rows:
        row["target"] = torch.rand(6, generator=gen) * (torch.rand(6, generator=gen) > 0.6)
    batch = uniter_collate(rows)
    return UniterForVQA(CFG, num_answers=6), batch, lambda out: vqa_loss(out, batch["targets"]), set()


def ve_task(gen):
    batch = uniter_collate(random_rows(gen, [4, 6], [2, 3]))
    labels = torch.tensor([0, 2])
    return UniterForVisualEntailment(CFG), batch, lambda out: ve_loss(out, labels), set()


def nlvr2_task(gen):
    # 2 examples -> 4 rows: (sentence, img0), (sentence, img1)
    rows = random_rows(gen, [5, 5, 3, 3], [3, 2, 4, 3])
    rows[1]["input_ids"] = rows[0]["input_ids"]
    rows[3]["input_ids"] = rows[2]["input_ids"]
    batch = uniter_collate(rows)
    labels = torch.tensor([1, 0])
    # paired-attn reads the sequence output, not the pooler
    return UniterForNLVR2(CFG, variant="paired-attn"), batch, lambda out: nlvr2_loss(out, labels), {"uniter.pooler."}


def vcr_task(gen):
    # 1 question x 4 candidates; text type 0 question, 2 answer; ids above the vocabulary are the 81 tags
    rows = random_rows(gen, [6, 5, 7, 6], [3, 3, 3, 3], vocab=CFG.vocab_size + 81)
    for row in rows:
        t = row["input_ids"].shape[0]
        row["txt_type_ids"] = torch.tensor([0] * 3 + [2] * (t - 3))
    batch = uniter_collate(rows)
    labels = torch.tensor([0, 0, 1, 0])
    return UniterForVCR(CFG), batch, lambda out: vcr_loss(out, labels), set()


TASKS = {"vqa-base": vqa_task, "ve": ve_task, "nlvr2": nlvr2_task, "vcr-base": vcr_task}


@pytest.mark.parametrize("mode", [None, "joint", "alter"])
@pytest.mark.parametrize("preset", sorted(TASKS))
def test_villa_step_on_tiny_uniter(preset, mode):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # dropout
    model, batch, loss_fn, unused_prefixes = TASKS[preset](gen)
    overrides = {} if mode is None else {"mode": mode}
    villa = advlab.VILLA.from_preset(preset, model, **overrides)
    inputs = batch["inputs"]
    stats = villa.step(lambda: model(**inputs), loss_fn, masks=batch["masks"])
    assert len(stats.task_loss) == 3
    assert all(math.isfinite(v) for v in stats.task_loss + stats.kl)
    released = advlab.presets.get_preset(preset).mode
    perturbed = {"txt"} if (mode or released) == "txt" else {"txt", "img"}
    assert {m for m, v in stats.delta_norm.items() if v > 0} == perturbed
    unused = ("uniter.img_embeddings.mask_embedding.", *unused_prefixes)  # MRM embedding: pre-training only
    total = 0.0
    for name, p in model.named_parameters():
        if name.startswith(unused):
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, name
            continue
        assert p.grad is not None, f"no gradient on {name}"
        assert torch.isfinite(p.grad).all(), name
        total += float(p.grad.abs().sum())
    assert total > 0


def test_villa_step_matches_plain_training_when_nothing_is_perturbed():
    """K = 1 with zero δ and no KL weight is ordinary training: the same parameter gradient."""
    gen = torch.Generator().manual_seed(1)
    model, batch, loss_fn, _ = vqa_task(gen)
    model.eval()  # no dropout, so both passes see the same function
    inputs = batch["inputs"]
    loss_fn(model(**inputs)).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    villa = advlab.VILLA.from_preset("vqa-base", model, steps=1, kl_weight=0.0)
    villa.step(lambda: model(**inputs), loss_fn, masks=batch["masks"])
    for name, grad in plain.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# examples/uniter_vqa_villa.py on small synthetic databases (written with raw lmdb / lz4 / msgpack / np.savez)
# --------------------------------------------------------------------------------------


def _write_lmdb(path, items):
    import lmdb

    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key, value in items.items():
            txn.put(key.encode("utf-8"), value)
    env.close()


def _synthetic_vqa_dbs(root, n_train=10, n_val=4, num_answers=5):
    import io
    import json

    import lz4.frame
    import msgpack
    import numpy as np

    rng = np.random.default_rng(0)
    img_dir = root / "img_db"
    img_dir.mkdir()
    images, nbb = {}, {}
    for j in range(3):
        n = 2 + j
        buf = io.BytesIO()
        np.savez_compressed(buf, features=rng.standard_normal((n, CFG.img_dim)).astype(np.float16),
                            norm_bb=rng.random((n, 6)).astype(np.float16), conf=rng.random((n, 1)).astype(np.float16))
        images[f"coco_{j}.npz"] = buf.getvalue()
        nbb[f"coco_{j}.npz"] = n
    _write_lmdb(img_dir / "feat_th0.2_max4_min1_compressed", images)
    (img_dir / "nbb_th0.2_max4_min1.json").write_text(json.dumps(nbb))
    dbs = []
    for name, count in (("train", n_train), ("val", n_val)):
        db = root / f"vqa_{name}.db"
        examples = {}
        for q in range(count):
            labels = sorted(set(rng.integers(0, num_answers, size=2).tolist()))
            examples[f"{name}{q}"] = {
                "input_ids": rng.integers(3, CFG.vocab_size, size=int(rng.integers(2, 6))).tolist(),
                "img_fname": f"coco_{q % 3}.npz",
                "target": {"labels": labels, "scores": [0.3 * (k + 1) for k in range(len(labels))]},
            }
        _write_lmdb(db, {k: lz4.frame.compress(msgpack.dumps(v, use_bin_type=True)) for k, v in examples.items()})
        (db / "meta.json").write_text(json.dumps({"bert": "bert-base-cased", "CLS": 1, "SEP": 2}))
        (db / "id2len.json").write_text(json.dumps({k: len(v["input_ids"]) for k, v in examples.items()}))
        dbs.append(db)
    return img_dir, dbs[0], dbs[1]


def _load_example():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "uniter_vqa_villa.py"
    spec = importlib.util.spec_from_file_location("uniter_vqa_villa", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_example_trains_evaluates_saves_and_resumes_exactly(tmp_path):
    example = _load_example()
    img_dir, train_db, val_db = _synthetic_vqa_dbs(tmp_path)
    common = [
        "--model-config", "tiny", "--num-answers", "5", "--train-txt-db", str(train_db), "--train-img-db",
        str(img_dir), "--val-txt-db", str(val_db), "--val-img-db", str(img_dir), "--compressed-db", "--min-bb", "1",
        "--max-bb", "4", "--batch-size", "2", "--grad-accum", "2", "--num-train-steps", "4", "--warmup-steps", "1",
        "--eval-every", "2", "--save-every", "2", "--num-workers", "0", "--log-every", "1", "--lr", "1e-3",
    ]
    straight = example.main([*common, "--output-dir", str(tmp_path / "a")])
    assert straight["step"] == 4
    assert [h["step"] for h in straight["history"]] == [2, 4]
    assert all(math.isfinite(h["val_loss"]) and 0 <= h["val_score"] <= 1 for h in straight["history"])
    for name in ("last.pt", "model_step_2.pt", "model_step_4.pt"):
        assert (tmp_path / "a" / name).exists()

    first = example.main([*common, "--output-dir", str(tmp_path / "b"), "--stop-after", "2"])  # interrupted
    assert first["step"] == 2
    resumed = example.main([*common, "--output-dir", str(tmp_path / "b")])
    assert resumed["step"] == 4 and resumed["history"] == straight["history"]
    a, b = straight["model"].state_dict(), resumed["model"].state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    initial = UniterForVQA(CFG, num_answers=5).state_dict()
    assert not torch.equal(a["vqa_output.3.weight"], initial["vqa_output.3.weight"])  # it did train

    reloaded = UniterForVQA.from_pretrained(tmp_path / "a" / "model_step_4.pt", CFG, num_answers=5)
    assert torch.equal(reloaded.vqa_output[3].weight, a["vqa_output.3.weight"])


def test_example_optimizer_groups_and_schedule():
    example = _load_example()
    args = example.parse_args(["--train-txt-db", "t", "--train-img-db", "i", "--val-txt-db", "v",
                               "--val-img-db", "i", "--output-dir", "o"])
    model = UniterForVQA(CFG, num_answers=5)
    opt = example.build_optimizer(model, args)
    by_id = {id(p): g for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_id[id(named["vqa_output.3.weight"])]["lr_mul"] == 10.0
    assert by_id[id(named["vqa_output.3.bias"])]["weight_decay"] == 0.0
    assert by_id[id(named["uniter.embeddings.LayerNorm.weight"])]["weight_decay"] == 0.0
    assert by_id[id(named["uniter.img_embeddings.img_layer_norm.weight"])]["weight_decay"] == 0.01  # as upstream
    assert by_id[id(named["uniter.encoder.layer.0.output.dense.weight"])]["lr_mul"] == 1.0
    assert example.lr_at(300, args) == pytest.approx(4e-5)
    assert example.lr_at(600, args) == pytest.approx(8e-5)
    assert example.lr_at(3300, args) == pytest.approx(4e-5)
    assert example.lr_at(6000, args) == 1e-8
