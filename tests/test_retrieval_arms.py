"""The zero-δ control, per-epoch validation in the records, the report's paired differences and verdicts, the plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from advlab.experiments import retrieval as R
from advlab.experiments.retrieval import report
from tests.test_retrieval import TINY, make_data, make_folder, tiny_config


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> R.RetrievalData:
    return make_data(make_folder(tmp_path_factory.mktemp("captions")))


def _trained(data: R.RetrievalData, arm: str, cfg: R.RetrievalConfig, **kw: object) -> tuple[list[float], dict]:
    model = R.build_model("uniter", cfg, data, seed=0, text_size=TINY)
    losses = R.train_run(model, data, arm, cfg, seed=0, progress=False, **kw)  # type: ignore[arg-type]
    return losses, {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("itm_weight", [0.0, 1.0])
def test_zero_arm_is_the_villa_loop_with_step_size_zero(data: R.RetrievalData, itm_weight: float) -> None:
    cfg = tiny_config(epochs=2, itm_weight=itm_weight, txt_step=0.3, img_step=0.3)
    zero = _trained(data, "zero", cfg)
    villa_at_0 = _trained(data, "villa", cfg.with_steps(0.0, 0.0))
    assert zero[0] == villa_at_0[0] and _same(zero[1], villa_at_0[1])
    # and it is neither the baseline (extra forwards and the KL) nor VILLA at the configured sizes
    assert not _same(zero[1], _trained(data, "baseline", cfg)[1])
    assert not _same(zero[1], _trained(data, "villa", cfg)[1])


def test_zero_arm_runs_k_plus_1_forwards_with_delta_zero(data: R.RetrievalData, monkeypatch: pytest.MonkeyPatch) -> None:
    from advlab.experiments.retrieval import training

    cfg = tiny_config(adv_steps=3)
    model = R.build_model("uniter", cfg, data, seed=0, text_size=TINY)
    steps = -(-len(data.train) // cfg.batch_size)
    embeds: list[int] = []
    handle = model.net.embeddings.register_forward_hook(lambda m, i, o: embeds.append(1))
    norms: list[float] = []
    real = training.free_training

    def spy(*a: object, **k: object):  # type: ignore[no-untyped-def]
        ctx = real(*a, **k)  # type: ignore[arg-type]
        original = ctx.backward

        def backward(loss: torch.Tensor) -> None:
            original(loss)
            norms.extend(float(d.detach().norm()) for m in ("txt", "img") for d in ctx.deltas(m) if d is not None)

        ctx.backward = backward  # type: ignore[method-assign]
        return ctx

    monkeypatch.setattr(training, "free_training", spy)
    try:
        R.train_run(model, data, "zero", cfg, seed=0, progress=False)
    finally:
        handle.remove()
    assert len(embeds) == (cfg.adv_steps + 1) * steps  # the clean forward and K perturbed ones
    assert len(norms) == 2 * cfg.adv_steps * steps and all(n == 0.0 for n in norms)


def test_records_hold_validation_and_test_after_every_epoch(data: R.RetrievalData, tmp_path: Path) -> None:
    cfg = tiny_config(epochs=3, itm_weight=1.0)
    records = R.run_experiment(data, arms=("baseline", "villa"), seeds=(0,), configs={"uniter": cfg},
                               out_dir=tmp_path, text_size=TINY, progress=False, log=lambda s: None,
                               save_weights=True, gate_factor=0.0)
    for rec in records:
        assert rec["format"] == R.RECORD_FORMAT
        assert rec["threads"] == torch.get_num_threads() and rec["torch"] == torch.__version__
        assert [e["epoch"] for e in rec["epochs"]] == [1, 2, 3]
        assert [e["loss"] for e in rec["epochs"]] == rec["losses"]
        assert rec["epochs"][-1]["val"] == rec["val"] and rec["epochs"][-1]["test"] == rec["test"]
        best = max(rec["epochs"], key=lambda e: (e["val"]["r1"], -e["epoch"]))
        assert rec["best_epoch"] == best["epoch"] and rec["test_at_best"] == best["test"]
        # evaluating after each epoch does not change training: same losses and weights as a run without it
        losses, weights = _trained(data, rec["arm"], cfg)
        assert losses == rec["losses"]
        saved = torch.load(tmp_path / f"uniter-{rec['arm']}-seed0.pt", weights_only=True)
        assert _same(weights, saved)


def test_best_epoch_uses_validation_only_and_the_earliest_tie() -> None:
    epochs = [{"epoch": i, "val": {"r1": v}, "test": {"r1": t}} for i, v, t in
              [(1, 0.2, 0.9), (2, 0.5, 0.1), (3, 0.5, 0.8), (4, 0.1, 0.95)]]
    assert R.best_epoch(epochs)["epoch"] == 2


def test_old_format_records_are_recomputed(data: R.RetrievalData, tmp_path: Path) -> None:
    kw = {"arms": ("baseline",), "seeds": (0,), "configs": {"uniter": tiny_config()}, "out_dir": tmp_path, "text_size": TINY,
              "progress": False, "log": lambda s: None, "gate_factor": 0.0}
    R.run_experiment(data, **kw)  # type: ignore[arg-type]
    path = tmp_path / "uniter-baseline-seed0.json"
    rec = json.loads(path.read_text())
    for k in ("format", "epochs", "best_epoch", "test_at_best"):
        rec.pop(k)
    path.write_text(json.dumps(rec))
    again = R.run_experiment(data, **kw)  # type: ignore[arg-type]
    assert not again[0]["resumed"] and again[0]["epochs"]


def _rec(arm: str, seed: int, last: float, best: float | None = None, backbone: str = "uniter") -> dict:
    keys = ("ir_r1", "ir_r5", "ir_r10", "tr_r1", "tr_r5", "tr_r10", "r1")
    test = dict.fromkeys(keys, last)
    rec = {"backbone": backbone, "arm": arm, "seed": seed, "val": {"r1": last}, "test": test}
    if best is not None:
        rec.update(best_epoch=3, test_at_best=dict.fromkeys(keys, best),
                   epochs=[{"epoch": e, "loss": 1.0 / e, "val": {"r1": last * e / 3}, "test": test} for e in (1, 2, 3)])
    return rec


def test_report_gives_points_against_baseline_and_both_controls() -> None:
    # per seed (0, 1) test R@1: baseline 10/12, zero 13/14, noise 13/16, villa 14/15 (points)
    table = {"baseline": (0.10, 0.12), "zero": (0.13, 0.14), "noise": (0.13, 0.16), "villa": (0.14, 0.15)}
    recs = [_rec(arm, s, v[s], best=v[s] + 0.01) for arm, v in table.items() for s in (0, 1)]
    pairs = R.paired_lines(recs)
    assert pairs == [
        "uniter zero δ - baseline: +2.5 ± 0.7 (2 seeds: +3.0, +2.0)",
        "uniter noise control - baseline: +3.5 ± 0.7 (2 seeds: +3.0, +4.0)",
        "uniter VILLA joint - baseline: +3.5 ± 0.7 (2 seeds: +4.0, +3.0)",
        "uniter VILLA joint - zero δ: +1.0 ± 0.0 (2 seeds: +1.0, +1.0)",
        "uniter VILLA joint - noise control: +0.0 ± 1.4 (2 seeds: +1.0, -1.0)",
    ]
    verdicts = R.verdict_lines(recs)
    assert verdicts[0].startswith("uniter: the loop helps: yes")
    assert "beats baseline and both controls beyond the spread: no" in verdicts[1]
    text = R.summarize(recs)
    assert "a difference counts when |mean| > std over seeds" in text
    assert "epoch of best validation R@1" in text
    md = R.results_markdown(recs)
    assert "| uniter | zero δ | 2 | 11.0 ± 1.4 | 11.0 ± 1.4 | 11.0 ± 1.4 |" not in md  # not fractions, not baseline
    assert "| uniter | baseline | 2 | 11.0 ± 1.4 | 11.0 ± 1.4 | 11.0 ± 1.4 |" in md
    assert "| uniter | baseline | 2 | 11.0 ± 1.4 | 12.0 ± 1.4 | 3, 3 |" in md


def test_villa_counts_only_when_it_beats_every_control() -> None:
    table = {"baseline": (0.10, 0.11), "zero": (0.10, 0.11), "noise": (0.10, 0.11), "villa": (0.12, 0.13)}
    recs = [_rec(arm, s, v[s]) for arm, v in table.items() for s in (0, 1)]
    verdicts = R.verdict_lines(recs)
    assert verdicts[0].startswith("uniter: the loop helps: not shown")
    assert "beyond the spread: yes" in verdicts[1]
    # without the zero-δ control no claim is made
    partial = [r for r in recs if r["arm"] != "zero"]
    assert "undecided (not every control ran)" in R.verdict_lines(partial)[0]


def test_plots_are_readable_size(tmp_path: Path) -> None:
    recs = [_rec(arm, s, 0.1 + 0.01 * s, best=0.12, backbone=b) for b in ("uniter", "lxmert")
            for arm in R.ARMS_QUICK for s in (0, 1, 2)]
    png = R.draw_plot(recs, tmp_path / "r1.png")
    w, h = Image.open(png).size
    assert w >= 1200 and h >= 600  # 8 x 4 in at 150 dpi or larger
    curves = R.draw_curves(recs, tmp_path / "curves.png")
    w, h = Image.open(curves).size
    assert w >= 1200 and h >= 900


def test_r1_plot_panels_show_only_their_own_arms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # --full runs the ablations on UNITER-mini only: LXMERT-mini's panel must not list them as empty columns
    recs = [_rec(arm, s, 0.1 + 0.01 * s, best=0.12, backbone="uniter") for arm in R.ARMS_FULL for s in (0, 1)]
    recs += [_rec(arm, s, 0.1 + 0.01 * s, best=0.12, backbone="lxmert") for arm in R.ARMS_QUICK for s in (0, 1)]
    figures = []
    monkeypatch.setattr(report, "_save", lambda fig, path: figures.append(fig) or Path(path))
    R.draw_plot(recs, tmp_path / "r1.png")
    uniter, lxmert = figures[0].axes
    assert len(uniter.get_xticks()) == len(R.ARMS_FULL)
    assert [t.get_text().replace("\n", " ") for t in lxmert.get_xticklabels()] == [R.ARM_LABELS[a] for a in R.ARMS_QUICK]


def test_report_without_matplotlib_still_writes_the_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from advlab._errors import AdvlabError
    from advlab.experiments.retrieval import report

    for arm in R.ARMS_QUICK:
        for s in (0, 1):
            (tmp_path / f"uniter-{arm}-seed{s}.json").write_text(json.dumps(_rec(arm, s, 0.1 + 0.01 * s, best=0.12)))

    def missing(*a: object) -> None:
        raise AdvlabError("Plots need matplotlib: `python -m pip install matplotlib`.")

    monkeypatch.setattr(report, "_figure", missing)
    assert R.main(["--report", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "no plots: Plots need matplotlib" in out and "zero δ - baseline" in out
    assert (tmp_path / "results.md").is_file() and not (tmp_path / "r1.png").exists()
