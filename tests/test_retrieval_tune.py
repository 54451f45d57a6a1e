"""Relative step sizes in the retrieval experiment and `--tune`: validation only, controls at the same sizes, edge extension, resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from advlab._errors import AdvlabValueError
from advlab.experiments import retrieval as R
from advlab.experiments.retrieval import cli, runs, training
from tests.test_retrieval import TINY, make_data, make_folder, tiny_config


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> R.RetrievalData:
    return make_data(make_folder(tmp_path_factory.mktemp("captions")))


def test_relative_config_builds_relative_perturbations_for_every_perturbed_arm() -> None:
    cfg = tiny_config(relative=True, txt_step=2e-3, img_step=2e-3)
    for arm in ("zero", "noise", "villa", "alter", "txt", "img"):
        perts, _ = training._arm_perturbations(arm, cfg)
        assert all(p.relative for p in perts.values())
        assert [p.step_size for p in perts.values()] == ([0.0, 0.0] if arm == "zero" else [2e-3, 2e-3])
    absolute, _ = training._arm_perturbations("villa", tiny_config())
    assert not any(p.relative for p in absolute.values())


def test_relative_training_differs_from_absolute_at_the_same_number(data: R.RetrievalData) -> None:
    def weights(cfg: R.RetrievalConfig) -> torch.Tensor:
        model = R.build_model("uniter", cfg, data, seed=0, text_size=TINY)
        R.train_run(model, data, "villa", cfg, seed=0, progress=False)
        return model.image_proj.weight.detach().clone()

    assert not torch.equal(weights(tiny_config(txt_step=0.1, img_step=0.1)),
                           weights(tiny_config(txt_step=0.1, img_step=0.1, relative=True)))


def test_absolute_records_keep_their_cache_keys(data: R.RetrievalData) -> None:
    # the key of an absolute config is computed without the `relative` field, as before it existed
    import hashlib
    from dataclasses import asdict

    cfg = tiny_config()
    fields = asdict(cfg)
    del fields["relative"], fields["attention"]
    if fields["features"] == "craft":
        del fields["features"]  # CRAFT, what every earlier record used, is also left out of the key
    for name in R.config.PRETRAIN_FIELDS:  # no pre-training stage (pretrain_epochs 0): left out as well
        del fields[name]
    blob = json.dumps({"backbone": "uniter", "arm": "villa", "config": fields, "data": data.summary}, sort_keys=True)
    assert runs._config_key("uniter", "villa", cfg, data) == hashlib.sha256(blob.encode()).hexdigest()[:16]
    assert runs._config_key("uniter", "villa", tiny_config(relative=True), data) != runs._config_key(
        "uniter", "villa", cfg, data)


@pytest.mark.slow
def test_tune_uses_validation_only_runs_controls_at_the_same_sizes_and_resumes(
    data: R.RetrievalData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    evaluated: list[str] = []
    real_eval = runs.evaluate

    def spy(model: R.RetrievalModel, split: R.SplitTensors, config: R.RetrievalConfig) -> dict[str, float]:
        evaluated.append("val" if split is data.val else "test" if split is data.test else "other")
        return real_eval(model, split, config)

    monkeypatch.setattr(runs, "evaluate", spy)
    lines: list[str] = []
    kw = {"backbone": "uniter", "base": tiny_config(epochs=2), "sizes": (1e-3, 1e-2), "seeds": (0, 1), "out_dir": tmp_path,
              "text_size": TINY, "progress": False, "log": lines.append, "max_extensions": 0}
    result = R.tune(data, **kw)  # type: ignore[arg-type]
    assert set(evaluated) == {"val"}  # the test split is never touched
    points = {(p["arm"], p["step"], p["kl_weight"]) for p in result["grid"]}
    assert points == {(a, s, 1.5) for a in ("villa", "noise") for s in (1e-3, 1e-2)}
    assert {(p["arm"], p["step"], p["kl_weight"]) for p in result["kl"]} == {
        (a, result["step"], w) for a in ("villa", "noise") for w in (0.0, 1.5)}
    assert all(len(p["val_r1"]) == 2 for p in result["grid"] + result["kl"])
    assert result["relative"] and result["step"] in (1e-3, 1e-2) and result["kl_weight"] in (0.0, 1.5)
    best = max((p for p in result["kl"] if p["arm"] == "villa"), key=lambda p: p["mean"])
    assert result["kl_weight"] == best["kl_weight"]
    # every run's record says relative sizes at the point's step, for both sites
    recs = [json.loads(p.read_text()) for p in tmp_path.glob("uniter-villa-rel*.json")]
    assert recs and all(r["config"]["relative"] and r["config"]["txt_step"] == r["config"]["img_step"] for r in recs)
    assert not any("test" in r for r in recs)
    # resumable: a second call trains nothing
    monkeypatch.setattr(runs, "train_run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    assert R.tune(data, **kw) == result  # type: ignore[arg-type]
    text = R.tuning_table(result)
    assert "chosen: relative step" in text and "zero δ" in text
    w, h = Image.open(R.draw_tuning(result, tmp_path / "t.png")).size
    assert w >= 1200 and h >= 600


def _fake_runs(monkeypatch: pytest.MonkeyPatch, score: dict[str, object]) -> list[float]:
    """Replace training by a score of the size: records without any model (fast)."""
    sizes: list[float] = []

    def fake(data: object, backbone: str, arm: str, config: R.RetrievalConfig, seed: int, **kw: object) -> dict:
        sizes.append(config.txt_step)
        f = score[arm]
        return {"val": {"r1": f(config.txt_step) if callable(f) else f}}

    monkeypatch.setattr(runs, "_cached_run", fake)
    return sizes


@pytest.mark.parametrize(
    ("shape", "expected_extra", "best"),
    [
        (lambda s: -s, [3e-5, 1e-5], 1e-5),  # smaller is always better: grows downward until the budget ends
        (lambda s: s, [0.3, 1.0], 1.0),  # larger is always better: grows upward
        (lambda s: -abs(s - 1e-3), [], 1e-3),  # an inside optimum: no extension
        (lambda s: -abs(s - 3e-5), [3e-5, 1e-5], 3e-5),  # one step outside: stops once the optimum is inside
    ],
)
def test_tune_extends_the_grid_while_the_optimum_is_on_its_edge(
    data: R.RetrievalData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shape: object, expected_extra: list,
    best: float
) -> None:
    # zero δ far below every size: the lower edge is not bracketed by step 0 (see the floor test below)
    _fake_runs(monkeypatch, {"villa": shape, "noise": 0.0, "baseline": 0.0, "zero": -10.0})
    result = R.tune(data, base=tiny_config(), out_dir=tmp_path, progress=False, log=lambda s: None, max_extensions=2)
    assert result["extended"] == expected_extra and not result["floor"]
    assert result["step"] == best
    assert result["edge"] == (best in (1e-5, 1.0))
    assert sorted({p["step"] for p in result["grid"]}) == sorted([*R.TUNE_SIZES, *expected_extra])


@pytest.mark.parametrize(("zero", "floor"), [(0.0, True), (-1e-4, True), (-2e-4, False)])
def test_tune_does_not_extend_below_a_smallest_size_that_zero_delta_matches(
    data: R.RetrievalData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, zero: float, floor: bool
) -> None:
    # smaller is better all the way down; VILLA at the smallest size (1e-4) scores -1e-4
    _fake_runs(monkeypatch, {"villa": lambda s: -s, "noise": 0.0, "baseline": 0.0, "zero": zero})
    lines: list[str] = []
    result = R.tune(data, base=tiny_config(), out_dir=tmp_path, progress=False, log=lines.append, max_extensions=2)
    assert result["floor"] is floor
    if floor:  # step 0 (zero δ) is at least as good: the grid is bracketed below, nothing is added
        assert result["extended"] == [] and result["step"] == 1e-4 and not result["edge"]
        assert any("bracketed below by step 0" in line for line in lines)
        assert "no perturbation size beats the loop without one" in R.tuning_table(result, "uniter")
    else:  # VILLA at 1e-4 beats zero δ: a smaller size may do better still
        assert result["extended"] == [3e-5, 1e-5]


def test_tune_refuses_bad_grids(data: R.RetrievalData, tmp_path: Path) -> None:
    for sizes in ((), (0.0, 1e-3), (float("nan"),)):
        with pytest.raises(AdvlabValueError, match="sizes"):
            R.tune(data, base=tiny_config(), sizes=sizes, out_dir=tmp_path, progress=False)


def test_cli_tune_writes_relative_settings_that_the_next_run_uses(
    data: R.RetrievalData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake_runs(monkeypatch, {"villa": lambda s: -abs(s - 3e-3), "noise": 0.01, "baseline": 0.02, "zero": 0.03})
    monkeypatch.setattr(cli, "prepare_data", lambda folder, **kw: data)
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"base": {"epochs": 4}}))
    code = cli.main(["--tune", "--data", str(tmp_path), "--out", str(tmp_path / "out"), "--settings", str(settings),
                     "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "chose relative step 0.003" in printed and "relative step |" in printed
    stored = json.loads(settings.read_text())
    assert stored["base"]["epochs"] == 4 and stored["uniter"]["relative"] and stored["uniter"]["step"] == 3e-3
    assert (tmp_path / "out" / "tune" / "uniter.json").is_file() and (tmp_path / "out" / "tune" / "uniter.png").is_file()
    cfg = R.configs_from_settings(stored, R.RetrievalConfig())["uniter"]
    assert cfg.relative and cfg.txt_step == cfg.img_step == 3e-3 and cfg.kl_weight == stored["uniter"]["kl_weight"]


def test_cli_sizes_only_with_tune(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--sizes", "1e-3"])
    assert "argument --sizes: only with --tune" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--tune", "--sizes", "0"])
    assert "argument --sizes" in capsys.readouterr().err


def test_default_attention_is_eager_the_kernel_of_the_recorded_runs(data: R.RetrievalData) -> None:
    def weights(cfg: R.RetrievalConfig) -> torch.Tensor:
        model = R.build_model("uniter", cfg, data, seed=0, text_size=TINY)
        assert model.net.config.attn_implementation == cfg.attention
        R.train_run(model, data, "villa", cfg, seed=0, progress=False)
        return model.image_proj.weight.detach().clone()

    default = weights(tiny_config())
    assert torch.equal(default, weights(tiny_config(attention="eager")))
    assert not torch.equal(default, weights(tiny_config(attention="sdpa")))  # sdpa differs in the last bits
    assert runs._config_key("uniter", "villa", tiny_config(attention="sdpa"), data) != runs._config_key(
        "uniter", "villa", tiny_config(), data)
    with pytest.raises(AdvlabValueError, match="attention"):
        tiny_config(attention="flash")


def test_cli_tune_keeps_what_changed_the_settings_while_it_ran(
    data: R.RetrievalData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a tuning takes hours; an edit made meanwhile (another backbone's tune, a quick budget) must survive its write
    _fake_runs(monkeypatch, {"villa": lambda s: -abs(s - 3e-3), "noise": 0.01, "baseline": 0.02, "zero": 0.03})
    monkeypatch.setattr(cli, "prepare_data", lambda folder, **kw: data)
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"base": {"epochs": 4, "layers": 2}}))
    other = {"relative": True, "step": 0.03, "kl_weight": 1.5}
    real_tune = cli.tune

    def tune_while_edited(*args: object, **kw: object) -> dict[str, object]:
        settings.write_text(json.dumps({"base": {"epochs": 4, "layers": 3}, "quick": {"epochs": 2}, "lxmert": other}))
        return real_tune(*args, **kw)

    monkeypatch.setattr(cli, "tune", tune_while_edited)
    assert cli.main(["--tune", "--data", str(tmp_path), "--out", str(tmp_path / "out"), "--settings", str(settings),
                     "--no-progress"]) == 0
    stored = json.loads(settings.read_text())
    assert stored["lxmert"] == other and stored["quick"] == {"epochs": 2} and stored["base"]["layers"] == 3
    assert stored["uniter"]["step"] == 3e-3 and stored["base"]["epochs"] == 4
