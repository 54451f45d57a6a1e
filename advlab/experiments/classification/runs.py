"""Runs of the classification experiment: every (arm, seed), resumable records keyed by settings, tuning."""

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

from advlab._errors import AdvlabValueError, NonFiniteError
from advlab.experiments._grid import extension_side, mean_std, next_size
from advlab.experiments.classification.config import (
    ARM_UNITS,
    ARMS_FULL,
    ARMS_QUICK,
    TUNE_GRIDS,
    ClassificationConfig,
)
from advlab.experiments.classification.data import ClassificationData

# Bumped when a run's results change for the same settings, so that records of older code are recomputed.
RECORD_FORMAT = 1


def run_key(arm: str, seed: int, config: ClassificationConfig, data: ClassificationData,
            splits: Sequence[str]) -> str:
    """The settings key of a run: a hash of everything that changes its record.

    Other arms' sizes are left out, so tuning one arm never invalidates another's records.

    Args:
        arm: The arm.
        seed: The seed.
        config: The run's settings.
        data: The splits (their signature: class names, sizes, a hash of captions and labels).
        splits: The evaluated splits.

    Returns:
        16 hex digits.
    """
    cfg = asdict(config)
    cfg["sizes"] = {} if arm == "baseline" else {"size": config.size(arm)}
    payload = {"format": RECORD_FORMAT, "arm": arm, "seed": seed, "config": cfg, "data": data.signature(),
               "splits": list(splits)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _finite(rec: Mapping[str, Any]) -> bool:
    values = list(rec.get("losses", []))
    for part in ("val", "test", "robust"):
        values += list((rec.get(part) or {}).values())
    return all(_is_number(v) for v in values)


def _check_positions(model: Any, data: ClassificationData) -> None:
    """Refuse captions tokenised longer than the model has position embeddings (torch fails deep inside)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    width = max(int(split.input_ids.shape[1]) for split in (data.train, data.val, data.test))
    if isinstance(limit, int) and width > limit:
        raise AdvlabValueError(
            f"Expected captions tokenised to at most the model's {limit} positions (max_position_embeddings), but "
            f"the data is padded to max_length {width}; set a smaller `max_length` (the settings' 'base')."
        )


def cached_run(
    data: ClassificationData,
    arm: str,
    config: ClassificationConfig,
    seed: int,
    *,
    path: Path,
    splits: Sequence[str] = ("val", "test"),
    tokenizer: Any | None = None,
    model_factory: Callable[[int, int], Any] | None = None,
    progress: bool = False,
    dataset: str = "",
) -> dict[str, Any]:
    """One run, loaded from `path` if a record with the same settings key is there, else trained and written.

    Args:
        data: The splits.
        arm: The arm.
        config: The run's settings.
        seed: The seed.
        path: The record's JSON file (written atomically).
        splits: Splits evaluated (`("val",)` while tuning: test is never looked at).
        tokenizer: For the paraphrase column.
        model_factory: `(num_labels, seed) -> model`; default `build_model` with the MiniLM weights.
        progress: The Trainer's progress bar.
        dataset: Name of the data set, stored in the record.

    Returns:
        The record.

    Raises:
        AdvlabValueError: The data is tokenised longer than the model's position embeddings.
        NonFiniteError: The run diverged (no record is written).
    """
    from advlab.experiments.classification.metrics import evaluate_all, evaluate_split
    from advlab.experiments.classification.model import build_model, embedding_scales
    from advlab.experiments.classification.training import absolute_size, train_run

    key = run_key(arm, seed, config, data, splits)
    if path.is_file():
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            rec = {}
        if not isinstance(rec, dict):  # valid JSON but no record (a list, a number): trained again, overwritten
            rec = {}
        if rec.get("key") == key and rec.get("format") == RECORD_FORMAT and _finite(rec):
            rec["resumed"] = True
            return rec
    t0 = time.perf_counter()
    if model_factory is None:
        model = build_model(len(data.classes), attention=config.attention, seed=seed)
    else:
        model = model_factory(len(data.classes), seed)
    _check_positions(model, data)
    scales = embedding_scales(model, data.train.input_ids, data.train.attention_mask)
    curve: list[dict[str, float]] = []

    def after_epoch(epoch: int, loss: float) -> None:
        curve.append({"epoch": epoch, "loss": loss, "val_acc": evaluate_split(model, data.val, config)["acc"]})

    try:
        losses = train_run(model, data, arm, config, seed=seed, scales=scales, progress=progress,
                           on_epoch=after_epoch)
        metrics = evaluate_all(model, data, config, tokenizer=tokenizer, seed=seed, splits=splits)
    except NonFiniteError as err:
        raise NonFiniteError(f"{arm} seed {seed}: {err} No record is written.") from err
    rec: dict[str, Any] = {
        "arm": arm, "seed": seed, "key": key, "format": RECORD_FORMAT, "dataset": dataset,
        "config": asdict(config), "size": None if arm == "baseline" else config.size(arm),
        "unit": ARM_UNITS.get(arm), "absolute_size": None if arm == "baseline" else absolute_size(arm, config, scales),
        "scales": scales, "data": data.signature(), "splits": list(splits), "losses": losses, "curve": curve,
        **metrics, "seconds": time.perf_counter() - t0,
        # not in the key: the numbers repeat to the last digit only at the same thread count and torch
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=1))
    tmp.replace(path)  # atomic: a killed run never leaves a half-written record
    rec["resumed"] = False
    return rec


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    seeds = list(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds) or len(set(seeds)) < len(
        seeds
    ):
        raise AdvlabValueError(f"Expected `seeds` to be distinct integers >= 0 (at least one), but got {seeds}.")
    return seeds


def run_experiment(
    data: ClassificationData,
    *,
    arms: Sequence[str] = ARMS_QUICK,
    seeds: Sequence[int] = (0, 1),
    config: ClassificationConfig | None = None,
    out_dir: str | os.PathLike[str] = "runs/classification",
    tokenizer: Any | None = None,
    model_factory: Callable[[int, int], Any] | None = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
    dataset: str = "",
) -> list[dict[str, Any]]:
    """Train and evaluate every (arm, seed), resumably, seed by seed (an interrupted run leaves paired seeds).

    Each finished run is written at once to `out_dir/{arm}-seed{seed}.json`; a file whose
    settings key matches is loaded instead of recomputed.

    Args:
        data: The splits.
        arms: Arms to run (`"baseline"` must be among them: the differences are paired with it).
        seeds: Seeds; every arm uses the same ones.
        config: The settings (default `ClassificationConfig()`).
        out_dir: Folder of the per-run JSON files.
        tokenizer: For the paraphrase column (None: no column).
        model_factory: `(num_labels, seed) -> model` (tests: a tiny BERT).
        progress: The Trainer's progress bar.
        log: Where one line per run goes.
        dataset: Name stored in the records.

    Returns:
        One record per run.

    Raises:
        AdvlabValueError: An unknown arm, no baseline, or bad seeds.
        NonFiniteError: A run diverged; the message names it and no record is written for it.
    """
    arms = list(dict.fromkeys(arms))
    unknown = [a for a in arms if a not in ARMS_FULL]
    if unknown:
        raise AdvlabValueError(f"Expected `arms` among {list(ARMS_FULL)}, but got {unknown}.")
    if "baseline" not in arms:
        raise AdvlabValueError(f"Expected 'baseline' among the arms (differences are paired with it), but got {arms}.")
    seeds = _check_seeds(seeds)
    config = config or ClassificationConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for seed in seeds:
        for arm in ["baseline", *[a for a in arms if a != "baseline"]]:
            path = out / f"{arm}-seed{seed}.json"
            rec = cached_run(data, arm, config, seed, path=path, tokenizer=tokenizer, model_factory=model_factory,
                             progress=progress, dataset=dataset)
            records.append(rec)
            if rec["resumed"]:
                log(f"{arm} seed {seed}: loaded from {path}")
            else:
                robust = ", ".join(f"{r}: {v:.3f}" for r, v in rec["robust"].items())
                log(f"{arm} seed {seed}: val acc {rec['val']['acc']:.3f}, test acc {rec['test']['acc']:.3f} "
                    f"macro-F1 {rec['test']['f1']:.3f}, robust [{robust}] ({rec['seconds']:.0f} s)")
    return records


def record_problem(path: Path, rec: Any) -> str | None:
    """Why a JSON file in an output folder is not a finished run record of this code, or None if it is one.

    Args:
        path: The file (its name must be `{arm}-seed{seed}.json` of the record it holds).
        rec: Its parsed content.

    Returns:
        The reason, or None.

    Examples:
        >>> record_problem(Path("freelb-seed0.json"), {"arm": "baseline", "seed": 0, "format": RECORD_FORMAT})
        "holds arm 'baseline' seed 0, not what its name says"
    """
    if not isinstance(rec, dict):
        return f"not a JSON object but {type(rec).__name__}"
    if rec.get("format") != RECORD_FORMAT:
        return f"record format {rec.get('format')!r}, not this code's {RECORD_FORMAT}"
    arm, seed = rec.get("arm"), rec.get("seed")
    if arm not in ARMS_FULL:
        return f"unknown arm {arm!r}"
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        return f"seed {seed!r} is not an int >= 0"
    if path.name != f"{arm}-seed{seed}.json":
        return f"holds arm {arm!r} seed {seed}, not what its name says"
    for part, keys in (("test", ("acc", "f1")), ("val", ("acc",))):
        values = rec.get(part)
        if not isinstance(values, dict) or not all(_is_number(values.get(k)) for k in keys):
            return f"no finite {part} {'/'.join(keys)}" + (" (a tuning record?)" if part == "test" and not values else "")
    robust = rec.get("robust")
    if not isinstance(robust, dict) or not robust or not all(_is_number(v) for v in robust.values()):
        return "no finite robust accuracies"
    para = rec.get("paraphrase")
    if para is not None and not (isinstance(para, dict) and _is_number(para.get("acc"))):
        return "a paraphrase entry without a finite acc"
    if arm != "baseline" and not (_is_number(rec.get("size")) and isinstance(rec.get("unit"), str)):
        return "no size and unit"
    if not isinstance(rec.get("config"), dict) or not isinstance(rec.get("data"), dict):
        return "no config or data description"
    return None


def load_records(out_dir: str | os.PathLike[str], *, skipped: list[str] | None = None) -> list[dict[str, Any]]:
    """Every finished run record in `out_dir`, sorted by seed and arm; other `*-seed*.json` files are skipped.

    A file is skipped when it does not parse, is not a record of this code's format, names another
    (arm, seed) than it holds, or lacks a finite metric (see `record_problem`).

    Args:
        out_dir: The experiment's output folder.
        skipped: If given, one `"NAME: why"` is appended per skipped file.

    Returns:
        The records.
    """
    records = []
    for path in sorted(Path(out_dir).glob("*-seed*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            problem: str | None = f"unreadable ({type(err).__name__})"
        else:
            problem = record_problem(path, rec)
        if problem is None:
            records.append(rec)
        elif skipped is not None:
            skipped.append(f"{path.name}: {problem}")
    order = {a: i for i, a in enumerate(ARMS_FULL)}
    return sorted(records, key=lambda r: (r["seed"], order.get(r["arm"], 99)))


def check_comparable(records: Sequence[Mapping[str, Any]]) -> None:
    """Refuse records that cannot be tabulated together: another config, data set or attack, or one arm at two sizes.

    Paired differences need every run on the same data with the same settings; only the arms'
    own sizes may differ between arms (tuning one arm keeps the others' records).

    Args:
        records: Run records (e.g. from `load_records`).

    Raises:
        AdvlabValueError: Two records differ in their config (other than the sizes), data, evaluated
            splits or attack radii, or one arm's records hold different sizes; the message names them.

    Examples:
        >>> a = {"arm": "baseline", "seed": 0, "config": {"epochs": 6}, "data": {}, "robust": {"0.1": 0.5}}
        >>> check_comparable([a, {**a, "seed": 1, "config": {"epochs": 1}}])
        Traceback (most recent call last):
        ...
        advlab._errors.AdvlabValueError: Expected every record to share one config, data set and attack (paired differences need them), but baseline seed 0 and baseline seed 1 differ in config ['epochs']: 6 against 1. Report them from separate folders.
    """

    def parts(rec: Mapping[str, Any]) -> dict[str, Any]:
        config = {k: v for k, v in (rec.get("config") or {}).items() if k != "sizes"}
        return {"config": config, "data": rec.get("data") or {}, "splits": {"splits": rec.get("splits")},
                "robust radii": {"radii": sorted(rec.get("robust") or {})}}

    if not records:
        return
    first = records[0]
    ref = parts(first)
    for rec in records[1:]:
        for what, theirs in parts(rec).items():
            ours = ref[what]
            diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
            if diff:
                k = diff[0]
                raise AdvlabValueError(
                    f"Expected every record to share one config, data set and attack (paired differences need "
                    f"them), but {first['arm']} seed {first['seed']} and {rec['arm']} seed {rec['seed']} differ in "
                    f"{what} {diff}: {ours.get(k)!r} against {theirs.get(k)!r}. Report them from separate folders."
                )
    by_arm: dict[str, dict[Any, list[int]]] = {}
    for rec in records:
        by_arm.setdefault(rec["arm"], {}).setdefault(rec.get("size"), []).append(rec["seed"])
    for arm, sizes in by_arm.items():
        if len(sizes) > 1:
            ran = ", ".join(f"seeds {seeds} at {size:g}" for size, seeds in sizes.items())
            raise AdvlabValueError(
                f"Expected each arm's records to share one size, but {arm} ran {ran}; rerun it with one size "
                "or move the others away."
            )


def tune(
    data: ClassificationData,
    *,
    arms: Sequence[str],
    base: ClassificationConfig,
    seeds: Sequence[int] = (0, 1),
    grids: Mapping[str, Sequence[float]] = TUNE_GRIDS,
    out_dir: str | os.PathLike[str] = "runs/classification/tune",
    model_factory: Callable[[int, int], Any] | None = None,
    max_extensions: int = 3,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Pick each arm's main size on the validation split only (the test split is never evaluated).

    For each arm (the noise control is left out: it takes FreeLB's size) every size of its grid
    runs over `seeds`; the size with the highest mean validation accuracy (last epoch) is chosen,
    and on a tie the smaller size. When the best size is on the grid's edge, the grid grows one
    step past it (`next_size`: the 1-3-10 sequence, or the grid's own ratio at that edge), up
    to `max_extensions` times: upward when the largest size is among the best (a plateau that
    reaches the top), downward only when the smallest is best alone (`extension_side`); an arm
    still best at the edge is listed in `edge`. The baseline
    runs too, for reference. Every run is a record in `out_dir` (resumable).

    Args:
        data: The splits.
        arms: Arms to tune (the baseline and the noise control are skipped).
        base: Settings of the runs.
        seeds: Seeds of every point.
        grids: Arm -> sizes in the arm's relative unit.
        out_dir: Folder of the tuning records.
        model_factory: `(num_labels, seed) -> model` (tests).
        max_extensions: How often an arm's grid may grow past an edge optimum.
        progress: The Trainer's progress bar.
        log: Where one line per point goes.

    Returns:
        `{"sizes": {arm: chosen}, "points": [{"arm", "size", "val_acc": [per seed], "mean", "std"}],
        "baseline": point, "seeds", "epochs", "extended": {arm: [sizes added]}, "edge": [arms]}`.
    """
    seeds = _check_seeds(seeds)
    unknown = [a for a in arms if a not in ARMS_FULL]
    if unknown:
        raise AdvlabValueError(f"Expected `arms` among {list(ARMS_FULL)}, but got {unknown}.")
    if isinstance(max_extensions, bool) or not isinstance(max_extensions, int) or max_extensions < 0:
        raise AdvlabValueError(f"Expected `max_extensions` to be an int >= 0, but got {max_extensions!r}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def point(arm: str, size: float | None) -> dict[str, Any]:
        cfg = base if size is None else base.with_size(arm, size)
        vals = []
        for seed in seeds:
            name = f"{arm}-seed{seed}.json" if size is None else f"{arm}-size{size:g}-seed{seed}.json"
            rec = cached_run(data, arm, cfg, seed, path=out / name, splits=("val",), model_factory=model_factory,
                             progress=progress)
            vals.append(rec["val"]["acc"])
        mean, std = mean_std(vals)
        log(f"tune: {arm:8} size {'-' if size is None else f'{size:g}':<8} -> val acc {100 * mean:5.1f} ± "
            f"{100 * std:4.1f} ({len(vals)} seeds)")
        return {"arm": arm, "size": size, "val_acc": vals, "mean": mean, "std": std}

    baseline = point("baseline", None)
    points, chosen = [], {}
    extended: dict[str, list[float]] = {}
    edge: list[str] = []
    for arm in arms:
        if arm in ("baseline", "noise"):
            continue
        grid = sorted(float(x) for x in grids[arm])
        if not grid or any(not (math.isfinite(x) and x > 0) for x in grid):
            raise AdvlabValueError(f"Expected the grid of {arm!r} to hold positive sizes, but got {grid}.")
        arm_points = {size: point(arm, size) for size in grid}
        side = None
        for attempt in range(max_extensions + 1):
            ordered = sorted(arm_points)
            side = extension_side(ordered, [arm_points[x]["mean"] for x in ordered])
            if side is None or attempt == max_extensions:
                break
            down = side == "down"
            new = next_size(ordered[0] if down else ordered[-1], ordered, down=down)
            log(f"tune: {arm} is best at the grid's {'lower' if down else 'upper'} edge; adding {new:g}")
            extended.setdefault(arm, []).append(new)
            arm_points[new] = point(arm, new)
        ordered_points = [arm_points[size] for size in sorted(arm_points)]
        points += ordered_points
        chosen[arm] = max(ordered_points, key=lambda p: (p["mean"], -p["size"]))["size"]
        if side is not None:
            edge.append(arm)
    return {"sizes": chosen, "points": points, "baseline": baseline, "seeds": seeds, "epochs": base.epochs,
            "extended": extended, "edge": edge}
