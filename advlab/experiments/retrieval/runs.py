"""Runs of the retrieval experiment: every (backbone, arm, seed), the gate, resumable records, tuning."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from advlab._errors import AdvlabError, AdvlabValueError, NonFiniteError
from advlab.experiments._grid import extension_side, mean_std, next_size
from advlab.experiments.retrieval.config import (
    ARMS_FULL,
    ARMS_PRETRAIN,
    ARMS_QUICK,
    PRETRAIN_FIELDS,
    RetrievalConfig,
)
from advlab.experiments.retrieval.data import RetrievalData
from advlab.experiments.retrieval.metrics import RobustnessSpec, check_gate, evaluate, evaluate_robustness
from advlab.experiments.retrieval.model import RetrievalModel, build_model
from advlab.experiments.retrieval.pretraining import pretrain_run
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
    cfg = asdict(config)
    if not cfg["relative"]:
        del cfg["relative"]  # absolute runs are computed as before the field existed: same keys
    if cfg["attention"] == "eager":
        del cfg["attention"]  # eager attention is how every earlier record was computed: same keys
    if cfg.get("features") == "craft":
        del cfg["features"]  # CRAFT features are what every earlier record used: same keys
    if cfg["pretrain_epochs"] == 0 or arm not in ARMS_PRETRAIN:
        for name in PRETRAIN_FIELDS:  # no pre-training stage: computed as before these fields existed, same keys
            del cfg[name]
    fields: dict[str, Any] = {"backbone": backbone, "arm": arm, "config": cfg, "data": data.summary}
    if arm in _ARM_REVISIONS:
        fields["revision"] = _ARM_REVISIONS[arm]
    blob = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Bumped when the pre-training stage computes something else for the same settings (cached weights are redone).
PRETRAIN_REVISION = 1
# a pt arm's fine-tuning stage: "std" is the baseline arm's training, "adv" VILLA joint's
_FINETUNE_ARMS = {"std": "baseline", "adv": "villa"}


def _split_arm(arm: str) -> tuple[str | None, str]:
    """(pre-training arm or None, fine-tuning arm of `train_run`): `"pt-adv/ft-std"` -> `("adv", "baseline")`.

    Examples:
        >>> _split_arm("pt-adv/ft-std"), _split_arm("villa")
        (('adv', 'baseline'), (None, 'villa'))
    """
    if arm not in ARMS_PRETRAIN:
        return None, arm
    pt, ft = arm.split("/")
    return pt.removeprefix("pt-"), _FINETUNE_ARMS[ft.removeprefix("ft-")]


def _pretrain_key(backbone: str, pt_arm: str, config: RetrievalConfig, data: RetrievalData) -> str:
    """Key of a pre-training stage: the settings it reads (not the fine-tuning epochs or evaluation's)."""
    cfg = asdict(config)
    for name in ("epochs", "eval_batch", "rerank_k", "itm_weight"):  # fine-tuning and evaluation only
        del cfg[name]
    fields = {"stage": "pretrain", "backbone": backbone, "arm": pt_arm, "config": cfg, "data": data.summary,
              "revision": PRETRAIN_REVISION}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _pretrained(
    model: RetrievalModel,
    data: RetrievalData,
    backbone: str,
    pt_arm: str,
    config: RetrievalConfig,
    seed: int,
    *,
    folder: Path,
    progress: bool,
) -> dict[str, Any]:
    """Load the cached pre-trained weights of (backbone, pre-training arm, seed, settings) into `model`, or pre-train and cache them.

    The cache is `folder/{backbone}-pt-{arm}-seed{seed}-{key}.pt` (the trainable parameters;
    frozen ones equal a fresh model's) with a `.json` of the per-epoch losses, so that the two
    fine-tunings of a pre-training arm share one pre-training. Returns the record's `pretrain`
    block: `{"arm", "key", "epochs": [{"epoch", "loss", "mlm", "itm", "mrfr"}], "seconds", "resumed"}`.
    """
    key = _pretrain_key(backbone, pt_arm, config, data)
    stem = folder / f"{backbone}-pt-{pt_arm}-seed{seed}-{key}"
    weights, info_path = Path(f"{stem}.pt"), Path(f"{stem}.json")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    if weights.is_file() and info_path.is_file():
        try:
            info = json.loads(info_path.read_text())
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except (OSError, ValueError, RuntimeError):
            info, state = {}, {}
        expected = set(model.state_dict()) - frozen
        if info.get("key") == key and set(state) == expected:
            model.load_state_dict(state, strict=False)
            info["resumed"] = True
            return info  # type: ignore[no-any-return]
    t0 = time.perf_counter()
    epochs = pretrain_run(model, data, pt_arm, config, seed=seed, progress=progress,
                          desc=f"{backbone} pre-train {pt_arm} s{seed}")
    info = {"arm": pt_arm, "key": key, "epochs": epochs, "seconds": time.perf_counter() - t0}
    folder.mkdir(parents=True, exist_ok=True)
    _save_state({k: v for k, v in model.state_dict().items() if k not in frozen}, weights)
    _write_record(info, info_path)
    info["resumed"] = False
    return info


def _best_weights_path(path: Path) -> Path:
    return path.with_suffix(".best.pt")


def _robustness_complete(rec: Mapping[str, Any], spec: RobustnessSpec) -> bool:
    """The record's robustness block measures everything `spec` asks, at the last epoch (and best, if it has one)."""
    block = rec.get("robustness")
    if not isinstance(block, dict) or not spec.complete(block.get("last")):
        return False
    return block.get("best") is None or spec.complete(block["best"])


def _robustness(
    model: RetrievalModel,
    data: RetrievalData,
    config: RetrievalConfig,
    spec: RobustnessSpec,
    *,
    last_epoch: int,
    best_epoch_no: int,
    best_state: Mapping[str, torch.Tensor] | None,
    computed: str,
) -> dict[str, Any]:
    """Robustness on the test split at the last epoch (the model as it is) and at the best-validation epoch.

    `best_state` holds the best epoch's parameters that differ from the last (None: not kept);
    the model is left holding them when they are loaded.
    """
    t0 = time.perf_counter()
    last = evaluate_robustness(model, data.test, config, spec)
    if best_epoch_no == last_epoch:
        best, note = last, "the best validation epoch is the last"
    elif best_state is not None:
        model.load_state_dict(best_state, strict=False)
        best, note = evaluate_robustness(model, data.test, config, spec), "best validation epoch's weights"
    else:
        best, note = None, "the best validation epoch's weights were not kept: last epoch only"
    return {"last": last, "best": best, "best_epoch": best_epoch_no, "note": note, "computed": computed,
            "seconds": time.perf_counter() - t0}


def _write_record(rec: Mapping[str, Any], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=1))
    tmp.replace(path)  # atomic: a killed run never leaves a half-written record


def _save_state(state: Mapping[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(dict(state), tmp)
    tmp.replace(path)


def _cached_run(
    data: RetrievalData,
    backbone: str,
    arm: str,
    config: RetrievalConfig,
    seed: int,
    *,
    path: Path,
    splits: tuple[str, ...],
    save_weights: bool = False,
    text_size: Mapping[str, int] | None = None,
    progress: bool = True,
    robustness: RobustnessSpec | None = None,
) -> dict[str, Any]:
    """Load the run's record from `path` if its key, format and numbers are valid, else train, evaluate and write it.

    `splits` are evaluated after every epoch (`("val",)` for tuning: the test split is never
    touched). With `robustness`, the record gets a `robustness` block (test split, last epoch
    and best-validation epoch); a valid record without a complete block gets it from the saved
    weights (`.pt`, `.best.pt`) if they exist, else the run is recomputed. The record is
    written atomically, so a killed run never leaves half a file.
    """
    key = _config_key(backbone, arm, config, data)
    if path.is_file():
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            rec = {}
        weights = path.with_suffix(".pt")
        weights_ok = not save_weights or weights.is_file()
        current = rec.get("format") == RECORD_FORMAT and tuple(rec.get("splits", ("val", "test"))) == splits
        if rec.get("key") == key and current and _finite_record(rec) and weights_ok:
            if robustness is None or _robustness_complete(rec, robustness):
                rec["resumed"] = True
                return rec  # type: ignore[no-any-return]
            if weights.is_file():
                model = build_model(backbone, config, data, seed=seed, text_size=text_size)
                model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
                best_path = _best_weights_path(path)
                best_state = torch.load(best_path, map_location="cpu", weights_only=True) if best_path.is_file() else None
                rec["robustness"] = _robustness(
                    model, data, config, robustness, last_epoch=rec["epochs"][-1]["epoch"],
                    best_epoch_no=rec["best_epoch"], best_state=best_state, computed="from the saved weights",
                )
                rec["resumed"] = True
                _write_record(rec, path)
                rec["robustness_added"] = True  # in this call (not written: a later load is a plain resume)
                return rec  # type: ignore[no-any-return]
    t0 = time.perf_counter()
    model = build_model(backbone, config, data, seed=seed, text_size=text_size)
    pt_arm, ft_arm = _split_arm(arm)
    pretrain = None
    if pt_arm is not None:  # the pre-trained weights, shared by the arm's two fine-tunings
        pretrain = _pretrained(model, data, backbone, pt_arm, config, seed, folder=path.parent / "pretrained",
                               progress=progress)
    epochs: list[dict[str, Any]] = []
    # the best validation epoch's trainable parameters (frozen ones never change), for its robustness
    best_kept: dict[str, Any] = {"r1": -math.inf, "state": None}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}

    def after_epoch(epoch: int, loss: float) -> None:
        entry: dict[str, Any] = {"epoch": epoch, "loss": loss}
        for split in splits:
            try:
                entry[split] = evaluate(model, getattr(data, split), config)
            except NonFiniteError as err:
                raise NonFiniteError(
                    f"{backbone} {arm} seed {seed}, evaluation after epoch {epoch}: {err} No record is written."
                ) from err
        epochs.append(entry)
        if robustness is not None and "val" in entry and entry["val"]["r1"] > best_kept["r1"]:  # earliest on a tie
            best_kept["r1"] = entry["val"]["r1"]
            best_kept["state"] = {k: v.detach().clone() for k, v in model.state_dict().items() if k not in frozen}

    losses = train_run(model, data, ft_arm, config, seed=seed, progress=progress, desc=f"{backbone} {arm} s{seed}",
                       on_epoch=after_epoch)
    best = best_epoch(epochs)
    rec: dict[str, Any] = {
        "backbone": backbone, "arm": arm, "seed": seed, "key": key, "config": asdict(config),
        "format": RECORD_FORMAT, "splits": list(splits), **{split: epochs[-1][split] for split in splits},
        "losses": losses, "epochs": epochs, "best_epoch": best["epoch"],
    }
    if "test" in splits:
        rec["test_at_best"] = best["test"]
    if pretrain is not None:
        rec["pretrain"] = pretrain
    rec["seconds"] = time.perf_counter() - t0
    # not in the key: the numbers repeat to the last digit only at the same thread count and torch
    rec["threads"], rec["torch"] = torch.get_num_threads(), torch.__version__
    rec["resumed"] = False
    if save_weights:
        _save_state(model.state_dict(), path.with_suffix(".pt"))
        _best_weights_path(path).unlink(missing_ok=True)  # an older run's
    if robustness is not None and "test" in splits:
        if save_weights and best["epoch"] != epochs[-1]["epoch"] and best_kept["state"] is not None:
            _save_state(best_kept["state"], _best_weights_path(path))
        rec["robustness"] = _robustness(
            model, data, config, robustness, last_epoch=epochs[-1]["epoch"], best_epoch_no=best["epoch"],
            best_state=best_kept["state"], computed="after training",
        )
    _write_record(rec, path)
    return rec


def robustness_line(block: Mapping[str, Any]) -> str:
    """One line of a robustness entry: robust R@1 per radius of each attack, and the paraphrase R@1.

    Args:
        block: A record's `robustness["last"]` (or `["best"]`).

    Returns:
        The line, fractions of queries as points.

    Examples:
        >>> att = {"txt": {"radii": [0.1], "clean_r1": 0.2, "r1": [0.05]}, "img": {"radii": [0.1], "clean_r1": 0.1, "r1": [0.0]}}
        >>> robustness_line({"attack": att, "paraphrase": {"missing": "WordNet not found"}})
        'text attack IR R@1 20.0 -> 5.0 (ε 0.1); image attack TR R@1 10.0 -> 0.0 (ε 0.1); paraphrases: none (WordNet not found)'
    """
    parts = []
    for modality, name in (("txt", "text attack IR"), ("img", "image attack TR")):
        side = block["attack"][modality]
        parts.append(f"{name} R@1 {100 * side['clean_r1']:.1f} -> " + "/".join(f"{100 * v:.1f}" for v in side["r1"])
                     + " (ε " + "/".join(f"{r:g}" for r in side["radii"]) + ")")
    para = block.get("paraphrase", {})
    if "missing" in para:
        parts.append(f"paraphrases: none ({para['missing']})")
    else:
        parts.append(f"paraphrased R@1 {100 * para['paraphrased']['r1']:.1f} vs original {100 * para['original']['r1']:.1f} "
                     f"({para['n_changed']} of {para['n']} captions changed)")
    return "; ".join(parts)


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
    return out_dir / f"{backbone}-{arm.replace('/', '_')}-seed{seed}.json"  # pt-std/ft-adv -> pt-std_ft-adv


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
    robustness: RobustnessSpec | None = None,
) -> list[dict[str, Any]]:
    """Train and evaluate every (backbone, arm, seed), resumably; baseline seeds first, then the gate.

    Each finished run is written at once to `out_dir/{backbone}-{arm}-seed{seed}.json`; a file
    whose settings key matches is loaded instead of recomputed. Runs are deterministic on a
    given machine and library version: the same settings give the same record and weights bit
    for bit, in any process (tests/test_retrieval_repeat.py checks this).

    Args:
        data: Prepared splits.
        backbones: `"uniter"` and/or `"lxmert"`.
        arms: Arms to run (`"baseline"` must be among them). The pre-training arms
            (`ARMS_PRETRAIN`, e.g. `"pt-adv/ft-std"`) pre-train first (`pretraining.pretrain_run`,
            needs `pretrain_epochs` >= 1), caching the weights under `out_dir/pretrained/`
            for the arm's other fine-tuning; their record holds a `pretrain` block (per-epoch
            losses) and is written to `{backbone}-pt-adv_ft-std-seed{seed}.json`.
        seeds: Seeds; every arm uses the same ones.
        configs: Backbone -> settings (default `RetrievalConfig()`).
        out_dir: Folder of the per-run JSON files.
        text_size: Overrides of the text sizes (tiny tests).
        progress: tqdm bars.
        log: Where progress lines go.
        save_weights: Also write each trained model's state dict beside its record
            (`{backbone}-{arm}-seed{seed}.pt`); a finished run without that file is then
            recomputed rather than resumed. With `robustness`, the best-validation epoch's
            trainable parameters also go to `{...}-seed{seed}.best.pt` when it is not the last.
        gate_factor: The gate's multiple of chance (see `check_gate`); 0 lets any baseline pass.
        robustness: Also measure each run's robustness on the test split (paraphrased captions,
            PGD at several radii; `metrics.evaluate_robustness`), at the last epoch and at the
            best-validation epoch, into the record's `robustness` block. A finished record
            without it gets it from the saved weights if there are any, else is recomputed.

    Returns:
        One record per run (backbone, arm, seed, val, test, losses, seconds, resumed).

    Raises:
        GateError: A backbone's baseline fails the gate while other arms were asked for; none
            of them is run.
        NonFiniteError: A run's training loss, gradient or evaluation scores are NaN or inf; the
            message names the run, and no record is written for it.
        AdvlabValueError: An unknown backbone or arm, no baseline among the arms, seeds that
            are not distinct integers >= 0, or a pre-training arm with `pretrain_epochs` 0.
    """
    if "baseline" not in arms:
        raise AdvlabValueError(f"Expected 'baseline' among the arms (the gate needs it), but got {list(arms)}.")
    unknown = [a for a in arms if a not in ARMS_FULL + ARMS_PRETRAIN]
    if unknown:
        raise AdvlabValueError(f"Expected `arms` among {list(ARMS_FULL + ARMS_PRETRAIN)}, but got {unknown}.")
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
    no_pretrain = [b for b in backbones if configs[b].pretrain_epochs == 0]
    if no_pretrain and any(a in ARMS_PRETRAIN for a in arms):
        raise AdvlabValueError(
            f"Expected `pretrain_epochs` >= 1 in the config of {no_pretrain} to run the pre-training arms "
            f"{[a for a in arms if a in ARMS_PRETRAIN]}, but got 0."
        )

    if robustness is not None and robustness.paraphrased is None:
        log(f"robustness: no paraphrase column: {robustness.paraphrase_missing or 'no paraphraser was given'}")

    def one(backbone: str, arm: str, seed: int) -> None:
        rec = _cached_run(data, backbone, arm, configs[backbone], seed, path=_run_path(out, backbone, arm, seed),
                          splits=("val", "test"), save_weights=save_weights, text_size=text_size, progress=progress,
                          robustness=robustness)
        records.append(rec)
        rob = rec.get("robustness") if robustness is not None else None
        if rec["resumed"]:
            how = f" (robustness added from the saved weights, {rob['seconds']:.1f} s)" if rec.get("robustness_added") else ""
            log(f"[{backbone}] {arm} seed {seed}: loaded from {_run_path(out, backbone, arm, seed)}{how}")
            return
        val, test, best = rec["val"], rec["test"], rec["test_at_best"]
        log(f"[{backbone}] {arm} seed {seed}: val R@1 {val['r1']:.3f}, test IR R@1 {test['ir_r1']:.3f} "
            f"TR R@1 {test['tr_r1']:.3f} (best validation epoch {rec['best_epoch']}: test R@1 {best['r1']:.3f}; "
            f"{rec['seconds']:.0f} s)")
        if rob:
            log(f"[{backbone}] {arm} seed {seed}: {robustness_line(rob['last'])} ({rob['seconds']:.1f} s)")

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
    order = {a: i for i, a in enumerate(ARMS_FULL + ARMS_PRETRAIN)}
    return sorted(records, key=lambda r: (r["backbone"] != "uniter", r["seed"], order.get(r["arm"], 99)))


TUNE_SIZES: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
TUNE_KL_WEIGHTS: tuple[float, ...] = (0.0, 1.5)


def _tune_path(out: Path, backbone: str, arm: str, size: float, kl: float, seed: int) -> Path:
    return out / f"{backbone}-{arm}-rel{size:g}-kl{kl:g}-seed{seed}.json"


def tune(
    data: RetrievalData,
    *,
    backbone: str = "uniter",
    base: RetrievalConfig,
    sizes: Sequence[float] = TUNE_SIZES,
    seeds: Sequence[int] = (0, 1, 2),
    kl_weights: Sequence[float] = TUNE_KL_WEIGHTS,
    out_dir: str | os.PathLike[str] = "runs/retrieval/tune",
    max_extensions: int = 3,
    text_size: Mapping[str, int] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Pick VILLA's relative step size and KL weight on the validation split only (test is never evaluated).

    Sizes are relative (`Perturbation(relative=True)`): one fraction η of each row's clean norm,
    for the text and the image site alike. For each η of the grid, VILLA joint and the noise
    control at the same η run with `base.kl_weight`, over `seeds`; the baseline and the zero-δ
    control (which has no size) give the bands. The best η is the one with the highest mean
    validation R@1 of VILLA (last epoch); if it sits on the grid's edge, the grid is extended
    outward by one 1-3-10 step, up to `max_extensions` times (`extension_side`: upward when the
    largest size is among the best, downward only when the smallest is best alone). The lower
    edge is not extended
    when the zero-δ control (the same loop at step 0) scores at least as high as the smallest
    size (`floor`): step 0 then brackets the grid from below. At the best η, VILLA and the noise
    control also run with every weight of `kl_weights`, and the better weight is chosen. Every
    run is a record in `out_dir` (resumable: a finished run is loaded, not recomputed).

    Args:
        data: Prepared splits.
        backbone: Backbone to tune.
        base: Settings of the runs (`relative` is set; `kl_weight` is the grid's weight).
        sizes: The relative step sizes.
        seeds: Seeds of every point (3 or more for a choice worth the name).
        kl_weights: KL weights tried at the best size.
        out_dir: Folder of the tuning records.
        max_extensions: How often the grid may grow past an edge optimum.
        text_size: Overrides of text sizes (tests).
        progress: tqdm bars.
        log: Where lines go.

    Returns:
        `{"relative": True, "step", "kl_weight", "seeds", "epochs", "grid": [point], "baseline", "zero",
        "kl": [point], "extended": [sizes added], "edge": bool, "floor": bool}`; a point is `{"arm", "step", "kl_weight",
        "val_r1": [per seed], "mean", "std"}` in fractions of R@1 (the report prints points).

    Raises:
        AdvlabValueError: Empty or non-positive sizes, no seeds, or a negative KL weight.
    """
    if not sizes or any(not (isinstance(x, (int, float)) and math.isfinite(x) and x > 0) for x in sizes):
        raise AdvlabValueError(f"Expected `sizes` to be positive finite numbers (at least one), but got {list(sizes)}.")
    if not seeds:
        raise AdvlabValueError("Expected at least one seed, but got none.")
    if not kl_weights or any(not (math.isfinite(w) and w >= 0) for w in kl_weights):
        raise AdvlabValueError(f"Expected `kl_weights` to be finite numbers >= 0, but got {list(kl_weights)}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rel = replace(base, relative=True)

    def point(arm: str, size: float, kl: float) -> dict[str, Any]:
        cfg = replace(rel.with_steps(size, size), kl_weight=float(kl))
        vals = []
        for seed in seeds:
            rec = _cached_run(data, backbone, arm, cfg, seed, path=_tune_path(out, backbone, arm, size, kl, seed),
                              splits=("val",), text_size=text_size, progress=progress)
            vals.append(rec["val"]["r1"])
        mean, std = mean_std(vals)
        log(f"tune {backbone}: {arm:8} rel step {size:<7g} KL {kl:<4g} -> val R@1 {100 * mean:5.1f} ± {100 * std:4.1f} "
            f"({len(vals)} seeds)")
        return {"arm": arm, "step": size, "kl_weight": float(kl), "val_r1": vals, "mean": mean, "std": std}

    kl0 = float(rel.kl_weight)
    baseline = point("baseline", 0.0, 0.0)
    zero = point("zero", 0.0, kl0)
    grid: dict[float, dict[str, dict[str, Any]]] = {}
    todo = sorted(float(x) for x in sizes)
    extended: list[float] = []
    while True:
        for size in todo:
            if size not in grid:
                grid[size] = {arm: point(arm, size, kl0) for arm in ("villa", "noise")}
        ordered = sorted(grid)
        best = max(ordered, key=lambda x: grid[x]["villa"]["mean"])
        side = extension_side(ordered, [grid[x]["villa"]["mean"] for x in ordered])
        # size 0 is measured: the zero-δ control is VILLA's loop at step 0. When the smallest size is best and
        # zero δ scores at least as high, the grid is bracketed below; smaller sizes only approach zero δ.
        floor = best == ordered[0] and grid[best]["villa"]["mean"] <= zero["mean"]
        if floor and side == "down":
            side = None
            log(f"tune {backbone}: the best size {best:g} is the smallest, and the zero-δ control (step 0) scores at "
                "least as high: the grid is bracketed below by step 0, not extended")
        edge = side is not None
        if not edge or len(extended) >= max_extensions:
            break
        new = next_size(ordered[0] if side == "down" else ordered[-1], ordered, down=side == "down")
        log(f"tune {backbone}: the best size {best:g} is on the grid's edge; adding {new:g}")
        extended.append(new)
        todo = [new]
    kl_points = [grid[best]["villa"], grid[best]["noise"]]
    for kl in kl_weights:
        if float(kl) != kl0:
            kl_points += [point("villa", best, kl), point("noise", best, kl)]
    chosen = max((p for p in kl_points if p["arm"] == "villa"), key=lambda p: p["mean"])
    return {
        "relative": True, "step": best, "kl_weight": chosen["kl_weight"], "seeds": list(seeds), "epochs": rel.epochs,
        "grid": [grid[x][arm] for x in sorted(grid) for arm in ("villa", "noise")],
        "baseline": baseline, "zero": zero, "kl": kl_points, "extended": extended, "edge": edge, "floor": floor,
    }
