"""Runs of the retrieval experiment: every (backbone, arm, seed), the gate, resumable records, tuning."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from advlab._errors import AdvlabError, AdvlabValueError, NonFiniteError
from advlab.experiments.retrieval.config import ARMS_FULL, ARMS_QUICK, RetrievalConfig
from advlab.experiments.retrieval.data import RetrievalData
from advlab.experiments.retrieval.metrics import check_gate, evaluate
from advlab.experiments.retrieval.model import build_model
from advlab.experiments.retrieval.training import train_run


class GateError(AdvlabError):
    """The baseline did not learn enough (validation R@1 below the gate); arms are not compared."""


# ----------------------------------------------------------------------------------------------------------
# The experiment: runs, resumability, report
# ----------------------------------------------------------------------------------------------------------


# Bumped when an arm's results change for the same settings, so that records of older code are
# not resumed. noise 2: random directions are drawn in the sites' order (before, a set's order,
# which changed with PYTHONHASHSEED from one process to the next).
_ARM_REVISIONS = {"noise": 2}
# Bumped when a record gains or changes fields; older records are recomputed, not resumed.
# 2: validation and test after every epoch (`epochs`), `best_epoch`, `test_at_best`.
RECORD_FORMAT = 2


def _config_key(backbone: str, arm: str, config: RetrievalConfig, data: RetrievalData) -> str:
    fields: dict[str, Any] = {"backbone": backbone, "arm": arm, "config": asdict(config), "data": data.summary}
    if arm in _ARM_REVISIONS:
        fields["revision"] = _ARM_REVISIONS[arm]
    blob = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def best_epoch(epochs: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The epoch entry with the highest validation R@1 (the earliest on a tie): model selection on validation only.

    Args:
        epochs: A record's per-epoch entries (`epoch`, `loss`, `val`, `test`).

    Returns:
        The chosen entry.

    Examples:
        >>> e = [{"epoch": i, "val": {"r1": v}} for i, v in [(1, 0.1), (2, 0.3), (3, 0.3), (4, 0.2)]]
        >>> best_epoch(e)["epoch"]
        2
    """
    if not epochs:
        raise AdvlabValueError("Expected at least one epoch entry, but got none.")
    return max(epochs, key=lambda e: (e["val"]["r1"], -e["epoch"]))


def _finite_record(rec: Mapping[str, Any]) -> bool:
    """False for a record holding a NaN or inf loss or metric (never resumed: it is recomputed)."""
    entries = [rec, *rec.get("epochs", [])]
    values = list(rec.get("losses", [])) + [v for e in entries for part in ("val", "test") for v in e.get(part, {}).values()]
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def _run_path(out_dir: Path, backbone: str, arm: str, seed: int) -> Path:
    return out_dir / f"{backbone}-{arm}-seed{seed}.json"


def run_experiment(
    data: RetrievalData,
    *,
    backbones: Sequence[str] = ("uniter",),
    arms: Sequence[str] = ARMS_QUICK,
    seeds: Sequence[int] = (0, 1),
    configs: Mapping[str, RetrievalConfig] | None = None,
    out_dir: str | os.PathLike[str] = "runs/retrieval",
    text_size: Mapping[str, int] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    save_weights: bool = False,
    gate_factor: float = 3.0,
) -> list[dict[str, Any]]:
    """Train and evaluate every (backbone, arm, seed), resumably; baseline seeds first, then the gate.

    Each finished run is written at once to `out_dir/{backbone}-{arm}-seed{seed}.json`; a file
    whose settings key matches is loaded instead of recomputed. Runs are deterministic on a
    given machine and library version: the same settings give the same record and weights bit
    for bit, in any process (tests/test_retrieval_repeat.py checks this).

    Args:
        data: Prepared splits.
        backbones: `"uniter"` and/or `"lxmert"`.
        arms: Arms to run (`"baseline"` must be among them).
        seeds: Seeds; every arm uses the same ones.
        configs: Backbone -> settings (default `RetrievalConfig()`).
        out_dir: Folder of the per-run JSON files.
        text_size: Overrides of the text sizes (tiny tests).
        progress: tqdm bars.
        log: Where progress lines go.
        save_weights: Also write each trained model's state dict beside its record
            (`{backbone}-{arm}-seed{seed}.pt`); a finished run without that file is then
            recomputed rather than resumed.
        gate_factor: The gate's multiple of chance (see `check_gate`); 0 lets any baseline pass.

    Returns:
        One record per run (backbone, arm, seed, val, test, losses, seconds, resumed).

    Raises:
        GateError: A backbone's baseline fails the gate while other arms were asked for; none
            of them is run.
        NonFiniteError: A run's training loss, gradient or evaluation scores are NaN or inf; the
            message names the run, and no record is written for it.
        AdvlabValueError: An unknown backbone or arm, no baseline among the arms, or seeds that
            are not distinct integers >= 0.
    """
    if "baseline" not in arms:
        raise AdvlabValueError(f"Expected 'baseline' among the arms (the gate needs it), but got {list(arms)}.")
    unknown = [a for a in arms if a not in ARMS_FULL]
    if unknown:
        raise AdvlabValueError(f"Expected `arms` among {list(ARMS_FULL)}, but got {unknown}.")
    bad = [b for b in backbones if b not in ("uniter", "lxmert")]
    if bad or not backbones:
        raise AdvlabValueError(f"Expected `backbones` among ['uniter', 'lxmert'] (at least one), but got {list(backbones)}.")
    seeds = list(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds) or len(set(seeds)) < len(
        seeds
    ):
        raise AdvlabValueError(f"Expected `seeds` to be distinct integers >= 0 (at least one), but got {seeds}.")
    arms = list(dict.fromkeys(arms))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    configs = {b: (configs or {}).get(b, RetrievalConfig()) for b in backbones}

    def one(backbone: str, arm: str, seed: int) -> None:
        config = configs[backbone]
        key = _config_key(backbone, arm, config, data)
        path = _run_path(out, backbone, arm, seed)
        if path.is_file():
            try:
                rec = json.loads(path.read_text())
            except (OSError, ValueError):
                rec = {}
            weights_ok = not save_weights or path.with_suffix(".pt").is_file()
            current = rec.get("format") == RECORD_FORMAT
            if rec.get("key") == key and current and _finite_record(rec) and weights_ok:
                rec["resumed"] = True
                records.append(rec)
                log(f"[{backbone}] {arm} seed {seed}: loaded from {path}")
                return
        t0 = time.perf_counter()
        model = build_model(backbone, config, data, seed=seed, text_size=text_size)
        epochs: list[dict[str, Any]] = []

        def after_epoch(epoch: int, loss: float) -> None:
            try:
                val = evaluate(model, data.val, config)
                test = evaluate(model, data.test, config)
            except NonFiniteError as err:
                raise NonFiniteError(
                    f"{backbone} {arm} seed {seed}, evaluation after epoch {epoch}: {err} No record is written."
                ) from err
            epochs.append({"epoch": epoch, "loss": loss, "val": val, "test": test})

        losses = train_run(model, data, arm, config, seed=seed, progress=progress, desc=f"{backbone} {arm} s{seed}",
                           on_epoch=after_epoch)
        val, test = epochs[-1]["val"], epochs[-1]["test"]
        best = best_epoch(epochs)
        rec = {
            "backbone": backbone, "arm": arm, "seed": seed, "key": key, "config": asdict(config),
            "format": RECORD_FORMAT, "val": val, "test": test, "losses": losses, "epochs": epochs,
            "best_epoch": best["epoch"], "test_at_best": best["test"],
            "seconds": time.perf_counter() - t0, "resumed": False,
        }
        if save_weights:
            tmp_pt = path.with_suffix(".pt.tmp")
            torch.save(model.state_dict(), tmp_pt)
            tmp_pt.replace(path.with_suffix(".pt"))
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=1))
        tmp.replace(path)  # atomic: a killed run never leaves a half-written record
        records.append(rec)
        log(f"[{backbone}] {arm} seed {seed}: val R@1 {val['r1']:.3f}, test IR R@1 {test['ir_r1']:.3f} "
            f"TR R@1 {test['tr_r1']:.3f} (best validation epoch {best['epoch']}: test R@1 {best['test']['r1']:.3f}; "
            f"{rec['seconds']:.0f} s)")

    # every baseline first: the gate must pass before any arm is run or compared
    for backbone in backbones:
        for seed in seeds:
            one(backbone, "baseline", seed)
        base = [r["val"]["r1"] for r in records if r["backbone"] == backbone and r["arm"] == "baseline"]
        ok, line = check_gate(base, len(data.val), factor=gate_factor)
        log(f"[{backbone}] {line}")
        if not ok and any(a != "baseline" for a in arms):
            raise GateError(f"[{backbone}] the baseline did not pass the gate; refusing to compare arms. {line}")
    # then seed-major, so that an interrupted run leaves complete paired seeds behind
    for seed in seeds:
        for backbone in backbones:
            for arm in arms:
                if arm != "baseline":
                    one(backbone, arm, seed)
    return records


def load_records(out_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every finished run record in `out_dir` (the per-run JSON files), sorted by backbone, seed, arm.

    Args:
        out_dir: The experiment's output folder.

    Returns:
        The records (unreadable files are skipped).
    """
    records = []
    for path in sorted(Path(out_dir).glob("*-seed*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if {"backbone", "arm", "seed", "test"} <= set(rec):
            records.append(rec)
    order = {a: i for i, a in enumerate(ARMS_FULL)}
    return sorted(records, key=lambda r: (r["backbone"] != "uniter", r["seed"], order.get(r["arm"], 99)))


def tune(
    data: RetrievalData,
    *,
    backbone: str = "uniter",
    base: RetrievalConfig,
    scales: Sequence[float] = (0.05, 0.15, 0.3),
    seed: int = 0,
    typical_norms: tuple[float, float] = (3.0, 50.0),
    text_size: Mapping[str, int] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Pick VILLA's step sizes on the validation split only (test is never evaluated).

    Each scale s sets the steps to s × `typical_norms` (word embeddings of a caption ≈ 3.0; the
    cached 1 + 4 x 4 raw region set ≈ 50, its 1 + 2 x 2 pooling at the `img` site ≈ 25). One seed,
    `base.epochs` epochs, VILLA joint.

    Args:
        data: Prepared splits.
        backbone: Backbone to tune.
        base: Settings of the runs.
        scales: The grid.
        seed: The seed.
        typical_norms: (text, image) typical norms.
        text_size: Overrides of text sizes (tests).
        progress: tqdm bars.
        log: Where lines go.

    Returns:
        `{"txt_step", "img_step", "scale", "grid": [{scale, txt_step, img_step, val_r1}]}`.
    """
    grid = []
    for s in scales:
        cfg = base.with_steps(s * typical_norms[0], s * typical_norms[1])
        model = build_model(backbone, cfg, data, seed=seed, text_size=text_size)
        t0 = time.perf_counter()
        train_run(model, data, "villa", cfg, seed=seed, progress=progress, desc=f"tune {backbone} s={s}")
        val = evaluate(model, data.val, cfg)
        grid.append({"scale": s, "txt_step": cfg.txt_step, "img_step": cfg.img_step, "val_r1": val["r1"],
                     "seconds": round(time.perf_counter() - t0, 1)})
        log(f"tune {backbone}: scale {s} (txt {cfg.txt_step:.3g}, img {cfg.img_step:.3g}) -> val R@1 {val['r1']:.3f}")
    best = max(grid, key=lambda g: g["val_r1"])
    return {"txt_step": best["txt_step"], "img_step": best["img_step"], "scale": best["scale"], "grid": grid}
