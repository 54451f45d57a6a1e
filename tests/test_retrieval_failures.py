"""The retrieval experiment never reports a number from a broken run: non-finite scores, diverged training, bad arguments."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from advlab._errors import AdvlabValueError, NonFiniteError
from advlab.experiments import retrieval as R
from advlab.experiments.retrieval import cli, losses, runs, training
from tests.test_retrieval import TINY, capture_cli_run, make_data, make_folder, tiny_config


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> R.RetrievalData:
    return make_data(make_folder(tmp_path_factory.mktemp("captions")))


def _poisoned(data: R.RetrievalData, row: int = 0) -> R.RetrievalData:
    """A copy whose training image `row` has NaN features (the loss of its batch is NaN)."""
    feats = data.train.features.clone()
    feats[row] = float("nan")
    return replace(data, train=replace(data.train, features=feats))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_recall_at_k_refuses_non_finite_scores(bad: float) -> None:
    scores = torch.eye(3)
    scores[1, 2] = bad
    with pytest.raises(NonFiniteError, match="1 of 9 are NaN or inf"):
        R.recall_at_k(scores)
    # all-NaN used to rank every true item first: R@1 = 1.0
    with pytest.raises(NonFiniteError):
        R.recall_at_k(torch.full((4, 4), float("nan")))


@pytest.mark.parametrize("itm_weight", [0.0, 1.0])
def test_evaluate_refuses_a_model_with_nan_weights(data: R.RetrievalData, itm_weight: float) -> None:
    cfg = tiny_config(itm_weight=itm_weight)
    model = R.build_model("uniter", cfg, data, seed=0, text_size=TINY)
    with torch.no_grad():
        model.image_proj.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="ITC similarities of the uniter model"):
        R.evaluate(model, data.test, cfg)


def test_evaluate_refuses_non_finite_itm_scores(data: R.RetrievalData) -> None:
    cfg = tiny_config(itm_weight=1.0)
    model = R.build_model("uniter", cfg, data, seed=0, text_size=TINY)
    with torch.no_grad():
        model.itm_head.bias.fill_(float("nan"))  # ITC is finite, only the re-ranking scores are NaN
    with pytest.raises(NonFiniteError, match="ITM match scores"):
        R.evaluate(model, data.test, cfg)


@pytest.mark.parametrize("arm", ["baseline", "villa", "noise"])
def test_training_with_a_nan_loss_stops_naming_run_epoch_and_step(data: R.RetrievalData, arm: str) -> None:
    bad = _poisoned(data)
    cfg = tiny_config(epochs=2)
    model = R.build_model("uniter", cfg, bad, seed=3, text_size=TINY)
    with pytest.raises(NonFiniteError, match=rf"uniter {arm} seed 3, epoch 1/2, step [12]/2: the training loss is nan"):
        R.train_run(model, bad, arm, cfg, seed=3, progress=False)


def test_training_with_a_nan_gradient_stops(data: R.RetrievalData, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config()
    model = R.build_model("lxmert", cfg, data, seed=0, text_size=TINY)
    # a finite loss whose gradient is NaN: sqrt(|z|) at z = 0 has an infinite derivative, times dz/dlogits = 0

    def task_loss(out: losses._BatchOut, caption_ids: torch.Tensor, itm_weight: float) -> torch.Tensor:
        z = out.packed.sum() * 0.0
        return losses._task_loss(out, caption_ids, itm_weight) + z.abs().sqrt()

    monkeypatch.setattr(training, "_task_loss", task_loss)
    with pytest.raises(NonFiniteError, match=r"lxmert baseline seed 0, epoch 1/1, step 1/2: the gradient norm is"):
        R.train_run(model, data, "baseline", cfg, seed=0, progress=False)


def test_run_experiment_writes_no_record_for_a_diverged_run(data: R.RetrievalData, tmp_path: Path) -> None:
    with pytest.raises(NonFiniteError, match="uniter baseline seed 0"):
        R.run_experiment(_poisoned(data), arms=("baseline",), seeds=(0,), configs={"uniter": tiny_config()},
                         out_dir=tmp_path, text_size=TINY, progress=False, log=lambda s: None)
    assert not list(tmp_path.glob("*.json"))


def test_a_record_with_nan_numbers_is_recomputed_not_resumed(data: R.RetrievalData, tmp_path: Path) -> None:
    kw = {"arms": ("baseline",), "seeds": (0,), "configs": {"uniter": tiny_config()}, "out_dir": tmp_path, "text_size": TINY,
              "progress": False, "log": lambda s: None}
    first = R.run_experiment(data, **kw)  # type: ignore[arg-type]
    path = tmp_path / "uniter-baseline-seed0.json"
    rec = json.loads(path.read_text())
    rec["losses"][0] = float("nan")
    path.write_text(json.dumps(rec))
    again = R.run_experiment(data, **kw)  # type: ignore[arg-type]
    assert not again[0]["resumed"] and math.isfinite(again[0]["losses"][0])
    assert again[0]["test"] == first[0]["test"]


@pytest.mark.parametrize(
    ("seeds", "message"),
    [([0, 0], "distinct"), ([-1], "distinct integers >= 0"), ([], "at least one"), ([True], "integers")],
)
def test_run_experiment_refuses_bad_seeds(data: R.RetrievalData, tmp_path: Path, seeds: list[int], message: str) -> None:
    with pytest.raises(AdvlabValueError, match=message):
        R.run_experiment(data, seeds=seeds, out_dir=tmp_path, text_size=TINY, progress=False, log=lambda s: None)


def test_run_experiment_refuses_unknown_arms_and_backbones(data: R.RetrievalData, tmp_path: Path) -> None:
    with pytest.raises(AdvlabValueError, match="'villla'"):
        R.run_experiment(data, arms=("baseline", "villla"), out_dir=tmp_path, progress=False, log=lambda s: None)
    with pytest.raises(AdvlabValueError, match="'bert'"):
        R.run_experiment(data, backbones=("bert",), out_dir=tmp_path, progress=False, log=lambda s: None)


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--seeds", "0"], "argument --seeds: expected an integer >= 1, got 0"),
        (["--seeds", "-1"], "argument --seeds"),
        (["--seeds", "two"], "argument --seeds"),
        (["--epochs", "-1"], "argument --epochs: expected an integer >= 1, got -1"),
        (["--epochs", "0"], "argument --epochs"),
        (["--arms", "villa", "noise"], "argument --arms: 'baseline' must be among the arms"),
        (["--full", "--tune"], "not allowed with argument"),
        (["--settings", "/nonexistent/settings.json"], "argument --settings: no such file"),
    ],
)
def test_cli_names_the_bad_argument_before_any_work(argv: list[str], named: str, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def no_work(*a: object, **k: object) -> None:
        raise AssertionError("the data were prepared although an argument was bad")

    monkeypatch.setattr(cli, "prepare_data", no_work)
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--no-progress"])
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


def test_cli_out_must_be_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        cli.main(["--out", str(tmp_path / "file")])
    assert "argument --out" in capsys.readouterr().err


@pytest.mark.parametrize(("n", "expected"), [("1", [0]), ("3", [0, 1, 2])])
def test_cli_seeds_n_runs_seeds_0_to_n_minus_1(data: R.RetrievalData, tmp_path: Path, n: str, expected: list[int],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    seen = capture_cli_run(monkeypatch, data)
    assert cli.main(["--data", str(tmp_path), "--out", str(tmp_path / "out"), "--seeds", n, "--no-progress"]) == 3
    assert list(seen["seeds"]) == expected  # type: ignore[call-overload]


def test_cli_reports_a_diverged_run_with_its_own_status(data: R.RetrievalData, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "prepare_data", lambda folder, **kw: _poisoned(data))
    monkeypatch.setattr(cli, "configs_from_settings", lambda s, base: {"uniter": tiny_config()})
    monkeypatch.setattr(runs, "build_model", lambda b, c, d, seed, text_size: R.build_model(b, c, d, seed=seed,
                                                                                            text_size=TINY))
    code = cli.main(["--data", str(tmp_path), "--out", str(tmp_path / "out"), "--seeds", "1", "--no-progress"])
    assert code == 4
    assert "uniter baseline seed 0, epoch 1/1" in capsys.readouterr().err


def test_settings_file_with_an_unknown_field_is_named(tmp_path: Path, data: R.RetrievalData,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "s.json"
    bad.write_text(json.dumps({"base": {"epoch": 3}}))
    monkeypatch.setattr(cli, "prepare_data", lambda folder, **kw: data)
    assert cli.main(["--data", str(tmp_path), "--settings", str(bad), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "'epoch'" in err


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("epochs", 0, "`epochs` to be an int >= 1"), ("batch_size", 1, "`batch_size` to be an int >= 2"),
     ("lr", -1e-4, "`lr` to be a finite float > 0"), ("temperature", 0.0, "`temperature`"),
     ("txt_step", float("nan"), "`txt_step` to be a finite float >= 0"), ("kl_weight", -1.0, "`kl_weight`"),
     ("adv_steps", 0, "`adv_steps`")],
)
def test_config_refuses_bad_values(field: str, value: object, message: str) -> None:
    with pytest.raises(AdvlabValueError, match=message):
        R.RetrievalConfig(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(("extra", "expected"), [
    (["--full"], {"uniter": list(R.FULL_PLAN["uniter"]), "lxmert": list(R.FULL_PLAN["lxmert"])}),
    (["--full", "--arms", "baseline", "villa"], {"uniter": ["baseline", "villa"], "lxmert": ["baseline", "villa"]}),
    (["--full", "--backbones", "lxmert"], {"lxmert": list(R.FULL_PLAN["lxmert"])}),
    ([], {"uniter": list(R.ARMS_QUICK)}),
])
def test_cli_full_runs_the_plan_per_backbone(data: R.RetrievalData, tmp_path: Path, extra: list[str],
                                            expected: dict[str, list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    calls: dict[str, list[str]] = {}

    def fake_run(d: R.RetrievalData, **kw: object) -> list[dict[str, object]]:
        (backbone,) = kw["backbones"]  # type: ignore[misc]
        calls[backbone] = list(kw["arms"])  # type: ignore[call-overload]
        return []

    monkeypatch.setattr(cli, "prepare_data", lambda folder, **kw: data)
    monkeypatch.setattr(cli, "run_experiment", fake_run)
    monkeypatch.setattr(cli, "summarize", lambda records: "")
    monkeypatch.setattr(cli, "results_markdown", lambda records, **kw: "")
    monkeypatch.setattr(cli, "_plots", lambda records, out: "")
    assert cli.main(["--data", str(tmp_path), "--out", str(tmp_path / "out"), "--no-progress", *extra]) == 0
    assert calls == expected
    assert set(R.FULL_PLAN["uniter"]) >= {"alter", "txt", "img", *R.ARMS_PRETRAIN} and "alter" not in R.FULL_PLAN["lxmert"]


@pytest.mark.parametrize(("quick", "extra", "expected"), [
    ({"epochs": 4}, [], 4),  # the quick default takes the quick budget
    ({"epochs": 4}, ["--epochs", "2"], 2),  # --epochs wins
    ({"epochs": 4}, ["--full"], 7),  # --full keeps the base budget
    (None, [], 7),
])
def test_cli_quick_default_takes_the_settings_quick_epochs(data: R.RetrievalData, tmp_path: Path, quick: object,
                                                           extra: list[str], expected: int,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    settings = {"base": {"epochs": 7}, **({} if quick is None else {"quick": quick})}
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(settings))
    seen = capture_cli_run(monkeypatch, data)
    assert cli.main(["--data", str(tmp_path), "--out", str(tmp_path / "out"), "--settings", str(path),
                     "--no-progress", *extra]) == 3
    assert {c.epochs for c in seen["configs"].values()} == {expected}  # type: ignore[attr-defined]


@pytest.mark.parametrize("quick", [{"epochs": 0}, {"epoch": 3}, [3], {"epochs": "ten"}])
def test_cli_refuses_a_bad_quick_entry(tmp_path: Path, quick: object, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch, data: R.RetrievalData) -> None:
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"base": {"epochs": 7}, "quick": quick}))
    monkeypatch.setattr(cli, "prepare_data", lambda folder, **kw: data)
    assert cli.main(["--data", str(tmp_path), "--out", str(tmp_path / "out"), "--settings", str(path)]) == 2
    assert "quick" in capsys.readouterr().err
