"""The retrieval experiment: R@K, re-ranking, the gate, resumability and a tiny end-to-end smoke run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.testing import assert_close

from advlab._errors import AdvlabValueError
from advlab.experiments import retrieval as R
from advlab.experiments.retrieval import (
    GateError,
    RetrievalConfig,
    check_gate,
    draw_plot,
    itc_loss,
    pool_grid,
    prepare_data,
    recall_at_k,
    rerank_scores,
    results_markdown,
    run_experiment,
    runs,
    summarize,
)

TINY = {"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}
WORDS = ["red", "blue", "green", "cat", "dog", "car", "tree", "sun", "a", "big", "small", "boat"]


def _tokenizer(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Word -> id from WORDS (3 + index), [CLS]=1 ... [SEP]=2, padded with 0 to 8."""
    ids = torch.zeros(len(texts), 8, dtype=torch.long)
    for i, text in enumerate(texts):
        toks = [1] + [3 + WORDS.index(w) for w in text.lower().rstrip(".").split() if w in WORDS][:6] + [2]
        ids[i, : len(toks)] = torch.tensor(toks)
    return ids, ids != 0


def _features(paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """A 1 + 4x4 'region' set per image from its mean colour, so captions are learnable."""
    feats, boxes = [], []
    for p in paths:
        rgb = torch.tensor(Image.open(p).convert("RGB").getpixel((0, 0)), dtype=torch.float32) / 255
        f = torch.zeros(17, 6)
        f[:, :3] = rgb
        f[:, 3:] = torch.linspace(0, 1, 17)[:, None]
        feats.append(f)
        boxes.append(torch.rand(17, 4, generator=torch.Generator().manual_seed(len(feats))).sort(-1).values)
    return torch.stack(feats), torch.stack(boxes)


def make_folder(root: Path) -> Path:
    """12 one-colour images, each with a caption naming its colour and a thing (shared by the retrieval tests)."""
    colours = {"red": (220, 20, 20), "blue": (20, 20, 220), "green": (20, 200, 20)}
    things = ["cat", "dog", "car", "tree"]
    for c, rgb in colours.items():
        for t in things:
            Image.new("RGB", (6, 6), rgb).save(root / f"{c}_{t}.png")
            (root / f"{c}_{t}.txt").write_text(f"A {c} {t}.\nfr.utf8=Un {t}.\n")
    return root


def make_data(root: Path) -> R.RetrievalData:
    """The tiny fixture's splits: word-list tokenizer, colour features, random text weights."""
    return prepare_data(root, tokenizer=_tokenizer, features=_features, text_weights=None, vocab_size=len(WORDS) + 3)


def tiny_config(**kw: object) -> RetrievalConfig:
    """A 1-layer, 1-epoch config for the tiny fixture (16-wide model with TINY)."""
    base = {"layers": 1, "epochs": 1, "batch_size": 4, "proj_dim": 8, "rerank_k": 2, "eval_batch": 8, "adv_steps": 2,
                "txt_step": 0.1, "img_step": 0.1, "kl_weight": 1.5, "relative": False, "features": "craft"}
    base.update(kw)  # KL, absolute sizes and features pinned: the library's defaults may move, these tests may not
    return RetrievalConfig(**base)  # type: ignore[arg-type]


_config = tiny_config


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("captions"))


@pytest.fixture(scope="module")
def data(folder: Path) -> R.RetrievalData:
    return make_data(folder)


def test_recall_at_k_hand_computed() -> None:
    # query 0: true 0.9 is top -> rank 0; query 1: 0.5 < 0.8 -> rank 1; query 2: 0.1 below 0.3, 0.2 -> rank 2
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.3, 0.2, 0.1]])
    assert recall_at_k(scores, ks=(1, 2, 3)) == {1: 1 / 3, 2: 2 / 3, 3: 1.0}
    # ties count for the true item
    assert recall_at_k(torch.ones(2, 2), ks=(1,)) == {1: 1.0}
    with pytest.raises(AdvlabValueError, match="square"):
        recall_at_k(torch.ones(2, 3))


def test_rerank_moves_itm_choice_to_the_top_and_keeps_the_rest() -> None:
    itc = torch.tensor([[0.5, 0.9, 0.8, 0.1]])
    top = itc.topk(2, dim=1).indices  # items 1, 2
    out = rerank_scores(itc, torch.tensor([[-3.0, 2.0]]), top)  # ITM prefers item 2
    assert out.argsort(dim=1, descending=True).tolist() == [[2, 1, 0, 3]]


def test_itc_loss_treats_same_caption_rows_as_positives() -> None:
    # rows 0 and 1 share a caption and each picks the other: a hard loss punishes that, the soft one half as much
    logits = torch.tensor([[-5.0, 5.0, -5.0], [5.0, -5.0, -5.0], [-5.0, -5.0, 5.0]], dtype=torch.float64)
    soft = itc_loss(logits, logits, torch.tensor([0, 0, 1]))
    hard = itc_loss(logits, logits, torch.tensor([0, 1, 2]))
    p = torch.softmax(logits, dim=1)
    expected_soft = -(0.5 * p[0].log()[:2].sum() + 0.5 * p[1].log()[:2].sum() + p[2].log()[2]) / 3
    assert_close(soft, expected_soft, rtol=1e-9, atol=1e-9)
    assert float(hard) > float(soft)


def test_pool_grid_matches_block_means() -> None:
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(2, 17, 3, generator=gen)
    b = torch.rand(2, 17, 4, generator=gen)
    pf, pb = pool_grid(f, b, 2)
    assert pf.shape == (2, 5, 3) and pb.shape == (2, 5, 4)
    assert_close(pf[:, 0], f[:, 0], rtol=0, atol=0)
    cells = f[:, 1:].reshape(2, 4, 4, 3)
    assert_close(pf[:, 1], cells[:, :2, :2].mean(dim=(1, 2)), rtol=1e-6, atol=1e-6)


def test_gate_refuses(data: R.RetrievalData, tmp_path: Path) -> None:
    ok, line = check_gate([0.01, 0.02], 64)
    assert not ok and "FAIL" in line
    # a baseline that cannot pass (factor impossible to reach: R@1 <= 1 < 3 x chance when chance = 1)
    tiny_val = R.SplitTensors(*(t[:1] for t in (data.val.input_ids, data.val.attention_mask, data.val.features,
                                                 data.val.boxes, data.val.caption_ids)))
    one = R.RetrievalData(data.train, tiny_val, data.test, data.vocab_size)
    with pytest.raises(GateError, match="refusing"):
        run_experiment(one, arms=("baseline", "villa"), seeds=(0,), configs={"uniter": _config(itm_weight=0.0)},
                       out_dir=tmp_path, text_size=TINY, progress=False, log=lambda s: None)
    assert not list(tmp_path.glob("uniter-villa-*.json"))  # the compared arm never ran


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["uniter", "lxmert"])
def test_smoke_whole_experiment_and_resume(data: R.RetrievalData, tmp_path: Path, backbone: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    configs = {backbone: _config(itm_weight=1.0)}  # the ITM path too
    arms = R.ARMS_FULL
    lines: list[str] = []
    # the tiny validation split has one caption (chance 1/1), so no baseline can reach 3 x chance: factor 0
    records = run_experiment(data, backbones=(backbone,), arms=arms, seeds=(0, 1), configs=configs,
                             out_dir=tmp_path, text_size=TINY, progress=False, log=lines.append, save_weights=True,
                             gate_factor=0.0)
    assert any("gate:" in line and "PASS" in line for line in lines)
    assert [(r["arm"], r["seed"]) for r in records] == (
        [("baseline", 0), ("baseline", 1)] + [(a, s) for s in (0, 1) for a in arms if a != "baseline"]
    )
    for r in records:
        t = r["test"]
        assert t["n"] == len(data.test)
        for side in ("ir", "tr"):
            assert 0.0 <= t[f"{side}_r1"] <= t[f"{side}_r5"] <= t[f"{side}_r10"] <= 1.0
        assert t["r1"] == (t["ir_r1"] + t["tr_r1"]) / 2
        # the record's numbers are those of the saved model, evaluated again
        model = R.build_model(backbone, configs[backbone], data, seed=0, text_size=TINY)
        model.load_state_dict(torch.load(tmp_path / f"{backbone}-{r['arm']}-seed{r['seed']}.pt", weights_only=True))
        assert R.evaluate(model, data.test, configs[backbone]) == t
        assert R.evaluate(model, data.val, configs[backbone]) == r["val"]
    text = summarize(records)
    assert "VILLA joint - baseline" in text and "VILLA joint - noise control" in text
    md = results_markdown(records, wall_seconds=12.0)
    assert md.startswith("Image retrieval (caption → image), test split") and "| backbone | arm | seeds | R@1 |" in md
    png = draw_plot(records, tmp_path / "r1.png")
    assert Image.open(png).size[0] > 100
    assert R.main(["--report", "--out", str(tmp_path)]) == 0  # tabulates finished runs without training
    assert (tmp_path / "results.md").read_text().startswith("Image retrieval")

    # resumability: finished runs are loaded, never recomputed
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished run was recomputed")

    monkeypatch.setattr(runs, "train_run", boom)
    again = run_experiment(data, backbones=(backbone,), arms=arms, seeds=(0, 1), configs=configs,
                           out_dir=tmp_path, text_size=TINY, progress=False, log=lambda s: None, gate_factor=0.0)
    assert all(r["resumed"] for r in again) and len(again) == len(records)
    monkeypatch.undo()

    # a deleted record is recomputed, and the new run reproduces the old one (all but the wall time)
    old = json.loads((tmp_path / f"{backbone}-villa-seed1.json").read_text())
    (tmp_path / f"{backbone}-villa-seed1.json").unlink()
    third = run_experiment(data, backbones=(backbone,), arms=arms, seeds=(0, 1), configs=configs,
                           out_dir=tmp_path, text_size=TINY, progress=False, log=lambda s: None, gate_factor=0.0)
    redone = [r for r in third if not r["resumed"]]
    assert [(r["arm"], r["seed"]) for r in redone] == [("villa", 1)]
    new = json.loads((tmp_path / f"{backbone}-villa-seed1.json").read_text())
    old.pop("seconds"), new.pop("seconds")
    assert new == old


@pytest.mark.slow
def test_resume_skips_finished_and_recomputes_changed_settings(data: R.RetrievalData, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(itm_weight=0.0)
    calls: list[str] = []
    real = R.train_run

    def counting(model: R.RetrievalModel, d: R.RetrievalData, arm: str, *a: object, **k: object) -> list[float]:
        calls.append(arm)
        return real(model, d, arm, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(runs, "train_run", counting)
    kw = {"arms": ("baseline",), "seeds": (0,), "out_dir": tmp_path, "text_size": TINY, "progress": False, "log": lambda s: None}
    run_experiment(data, configs={"uniter": cfg}, **kw)  # type: ignore[arg-type]
    run_experiment(data, configs={"uniter": cfg}, **kw)  # type: ignore[arg-type]
    assert calls == ["baseline"]
    run_experiment(data, configs={"uniter": cfg.with_steps(0.2, 0.2)}, **kw)  # type: ignore[arg-type]
    assert calls == ["baseline", "baseline"]


def test_cli_reports_missing_data_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert R.main(["--data", str(tmp_path / "nope"), "--no-progress"]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_split_has_no_caption_leakage(data: R.RetrievalData) -> None:
    assert len(data.train) + len(data.val) + len(data.test) == 12
    ids = [set(s.caption_ids.tolist()) for s in (data.train, data.val, data.test)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])


def capture_cli_run(monkeypatch: pytest.MonkeyPatch, data: R.RetrievalData) -> dict[str, object]:
    """Make the command line use `data` and stop at its first `run_experiment` (exit 3); returns what that call got."""
    from advlab.experiments.retrieval import cli

    seen: dict[str, object] = {}

    def fake_run(d: R.RetrievalData, **kw: object) -> list[dict[str, object]]:
        seen.update(kw)
        raise R.GateError("stop here")

    monkeypatch.setattr(cli, "prepare_data", lambda folder, **kw: data)
    monkeypatch.setattr(cli, "run_experiment", fake_run)
    return seen
