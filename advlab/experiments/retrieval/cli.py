"""Command line of the retrieval experiment: `python -m advlab.experiments.retrieval`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch

from advlab._errors import AdvlabError, AdvlabValueError, NonFiniteError
from advlab.experiments._args import count, positive_size
from advlab.experiments.retrieval.config import (
    ARMS_FULL,
    ARMS_PRETRAIN,
    ARMS_QUICK,
    FEATURES,
    FULL_PLAN,
    SETTINGS_PATH,
    RetrievalConfig,
    configs_from_settings,
    load_settings,
)
from advlab.experiments.retrieval.data import DATASETS, _check_wheels, dataset_folders, prepare_data
from advlab.experiments.retrieval.report import (
    draw_curves,
    draw_plot,
    draw_tuning,
    results_markdown,
    summarize,
    tuning_table,
)
from advlab.experiments.retrieval.runs import TUNE_SIZES, GateError, load_records, run_experiment, tune


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse argument combinations that would run something else than asked (exits with 2)."""
    if args.arms is not None:
        args.arms = list(dict.fromkeys(args.arms))
        if "baseline" not in args.arms and not args.tune:
            parser.error(f"argument --arms: 'baseline' must be among the arms (the gate needs it), got {args.arms}")
    if args.backbones is not None:
        args.backbones = list(dict.fromkeys(args.backbones))
    if args.sizes is not None and not args.tune:
        parser.error("argument --sizes: only with --tune")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"argument --out: {args.out} exists and is not a folder")
    if not args.tune and not args.report and not args.settings.is_file():
        parser.error(f"argument --settings: no such file: {args.settings}")
    if args.tune and not args.settings.parent.is_dir():
        parser.error(f"argument --settings: the folder {args.settings.parent} does not exist (--tune writes the file)")


def _base_config(settings: Mapping[str, Any], path: Path) -> RetrievalConfig:
    """The settings file's `base` entry as a config; unknown or bad fields are named with the file."""
    entry = settings.get("base", {})
    known = {f.name for f in fields(RetrievalConfig)}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise AdvlabValueError(f"{path}: unknown field(s) {unknown} in 'base'; known: {sorted(known)}.")
    try:
        return RetrievalConfig(**entry)
    except AdvlabError as err:
        raise AdvlabValueError(f"{path}: 'base': {err}") from None


def _quick_config(settings: Mapping[str, Any], base: RetrievalConfig, path: Path) -> RetrievalConfig:
    """The quick default's config: `base` with the settings' `quick` entry (only `epochs`) applied."""
    quick = settings.get("quick", {})
    if not isinstance(quick, Mapping) or set(quick) - {"epochs", "note"}:
        raise AdvlabValueError(f"{path}: Expected 'quick' to be an object with 'epochs' (and a 'note'), but got {quick!r}.")
    if "epochs" not in quick:
        return base
    try:
        return replace(base, epochs=quick["epochs"])
    except AdvlabError as err:
        raise AdvlabValueError(f"{path}: 'quick': {err}") from None


def _plots(records: Sequence[Mapping[str, Any]], out: Path) -> str:
    """Draw r1.png and curves.png; the text that names them, or why there are none (matplotlib missing)."""
    try:
        plot, curves = draw_plot(records, out / "r1.png"), draw_curves(records, out / "curves.png")
    except AdvlabError as err:
        return f" (no plots: {err})"
    if any("robustness" in r for r in records):  # robust R@1 against the radius, per arm
        from advlab.experiments.retrieval.report import draw_robustness

        curves = f"{curves}, {draw_robustness(records, out / 'robustness.png')}"
    return f", {plot} and {curves}"


DEFAULT_PRETRAIN_EPOCHS = 5  # pt-* arms, when neither --pretrain-epochs nor the settings' base entry sets it
DESCRIPTION = "Image–caption retrieval with UNITER-mini / LXMERT-mini: baseline vs zero-δ and noise controls vs VILLA."


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: quick default, `--tune`, `--full`; see `--help`.

    Args:
        argv: Arguments (default `sys.argv[1:]`).

    Returns:
        Exit status: 0 ok, 2 set-up missing or a bad argument (argparse's usage error also exits
        with 2, naming the argument), 3 the baseline failed the gate, 4 a run diverged (NaN or inf).
    """
    parser = argparse.ArgumentParser(prog="python -m advlab.experiments.retrieval", description=DESCRIPTION)
    job = parser.add_mutually_exclusive_group()
    job.add_argument("--full", action="store_true", help="5 seeds; baseline, zero δ, noise control and VILLA joint on both backbones, plus VILLA "
                          "alter, text-only, image-only and the four pt-*/ft-* arms on UNITER-mini (with --arms: "
                          "those arms on both backbones)")
    job.add_argument("--tune", action="store_true",
                     help="pick the relative step size and KL weight on validation (3 seeds), write the settings")
    job.add_argument("--report", action="store_true",
                     help="train nothing: tabulate the finished runs in --out (e.g. of an interrupted --full)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", type=Path, default=None, help="any image-caption folder (default: --dataset tuxpaint)")
    source.add_argument("--dataset", default=None, choices=list(DATASETS),
                        help="a data set set up by scripts/setup_data.sh: Tux Paint stamps (default), openclipart, "
                             "or both pooled before the split by caption")
    parser.add_argument("--out", type=Path, default=Path("runs/retrieval"), help="output folder (resumable)")
    parser.add_argument("--seeds", type=count, default=None,
                        help="number of seeds, an integer >= 1: seeds 0 .. N-1 (quick 2, full 5)")
    parser.add_argument("--epochs", type=count, default=None, help="override the settings' epochs (>= 1)")
    parser.add_argument("--backbones", nargs="+", default=None, choices=["uniter", "lxmert"])
    parser.add_argument("--arms", nargs="+", default=None, choices=list(ARMS_FULL + ARMS_PRETRAIN),
                        help="arms to run; 'baseline' must be among them (the gate and the paired differences); "
                             "pt-{std,adv}/ft-{std,adv}: in-domain pre-training (MLM, ITM, MRFR on the training split; "
                             "standard or VILLA) then fine-tuning (baseline or VILLA joint)")
    parser.add_argument("--pretrain-epochs", type=count, default=None,
                        help=f"epochs of the pt-* arms' pre-training stage (>= 1; default: the settings' base entry, "
                             f"else {DEFAULT_PRETRAIN_EPOCHS}); other arms ignore it")
    parser.add_argument("--sizes", nargs="+", type=positive_size, default=None,
                        help="--tune: relative step sizes to try (default 1e-4 3e-4 1e-3 3e-3 1e-2 3e-2 1e-1)")
    parser.add_argument("--features", default=None, choices=list(FEATURES),
                        help="frozen image features: craft (CRAFT VGG16-BN, 512-d) or effnet (EfficientNet-Lite0, "
                             "320-d); default: the settings' base entry")
    parser.add_argument("--settings", type=Path, default=SETTINGS_PATH, help="settings JSON (read; --tune writes)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    args = parser.parse_args(argv)
    _check_args(parser, args)
    if args.report:
        records = load_records(args.out)
        if not records:
            print(f"error: no finished runs in {args.out}", file=sys.stderr)
            return 2
        print(summarize(records))
        (args.out / "results.md").write_text(results_markdown(records))
        print(f"wrote {args.out / 'results.md'}{_plots(records, args.out)}")
        return 0
    torch.set_num_threads(min(2, torch.get_num_threads()))
    wall0 = time.perf_counter()
    progress = not args.no_progress
    try:
        settings = load_settings(args.settings)
        base = _base_config(settings, args.settings)
    except AdvlabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # json.JSONDecodeError
        print(f"error: {args.settings} is not valid JSON: {err}", file=sys.stderr)
        return 2
    if args.epochs is not None:
        base = replace(base, epochs=args.epochs)
    elif not (args.full or args.tune):  # the quick default (README's first command) may have its own budget
        try:
            base = _quick_config(settings, base, args.settings)
        except AdvlabError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    if args.features is not None:
        base = replace(base, features=args.features)
    # read by the pt-* arms only: the other arms' run keys leave the pre-training settings out
    base = replace(base, pretrain_epochs=args.pretrain_epochs or base.pretrain_epochs or DEFAULT_PRETRAIN_EPOCHS)
    try:
        if args.data is None:
            _check_wheels(base.features)
            folders = dataset_folders(args.dataset or "tuxpaint")
        else:
            if not args.data.is_dir():
                raise AdvlabError(f"--data {args.data} is not a folder.")
            _check_wheels(base.features)
            folders = [args.data]
        data = prepare_data(folders[0] if len(folders) == 1 else folders, features=base.features, progress=progress)
    except (AdvlabError, ModuleNotFoundError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"data: {' + '.join(str(f) for f in folders)}: {data.summary}; image features {base.features}")
    print("phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in data.timings.items()))
    if args.tune:
        backbones = args.backbones or ["uniter"]
        new: dict[str, Any] = {}
        seeds = list(range(args.seeds or 3))
        tune_dir = args.out / "tune"
        try:
            for backbone in backbones:
                result = tune(data, backbone=backbone, base=base, sizes=args.sizes or TUNE_SIZES, seeds=seeds,
                              out_dir=tune_dir, progress=progress)
                result["tuned_on"] = (f"validation split only, {len(seeds)} seeds, {base.epochs} epochs, "
                                      f"VILLA joint; {data.summary}")
                new[backbone] = result
                print(tuning_table(result, backbone))
                (tune_dir / f"{backbone}.json").write_text(json.dumps(result, indent=1) + "\n")
                try:
                    plot = f" and {draw_tuning(result, tune_dir / f'{backbone}.png', backbone=backbone)}"
                except AdvlabError as err:
                    plot = f" (no plot: {err})"
                print(f"{backbone}: chose relative step {result['step']:g}, KL weight {result['kl_weight']:g}; "
                      f"wrote {tune_dir / (backbone + '.json')}{plot}")
        except NonFiniteError as err:
            print(f"error: {err}", file=sys.stderr)
            return 4
        # read the file again: a tuning takes hours, and whatever else changed it meanwhile is kept
        latest = load_settings(args.settings)
        latest["base"] = {**latest.get("base", {}), "epochs": base.epochs,
                          "features": base.features}  # the sizes are tuned for these features
        args.settings.write_text(json.dumps({**latest, **new}, indent=1) + "\n")
        print(f"wrote {args.settings} ({(time.perf_counter() - wall0) / 60:.1f} min)")
        return 0
    backbones = args.backbones or (["uniter", "lxmert"] if args.full else ["uniter"])
    if args.arms is not None:
        plan = {b: list(args.arms) for b in backbones}
    else:
        plan = {b: list(FULL_PLAN[b] if args.full else ARMS_QUICK) for b in backbones}
    n_seeds = args.seeds or (5 if args.full else 2)
    configs = configs_from_settings(settings, base)
    from advlab.experiments.retrieval.metrics import RobustnessSpec, folder_robustness_spec  # test-split robustness

    if len(folders) == 1:
        robustness = folder_robustness_spec(data.test, folders[0])  # no WordNet: no paraphrase column, the reason printed
    else:  # the paraphrase column reads the test captions again from one folder
        robustness = RobustnessSpec(paraphrase_missing="the test captions of pooled data sets (--dataset both) are not "
                                                       "read again")
    try:
        records = [rec for backbone, arms in plan.items()
                   for rec in run_experiment(data, backbones=[backbone], arms=arms, seeds=range(n_seeds),
                                             configs=configs, out_dir=args.out, progress=progress,
                                             robustness=robustness)]
    except GateError as err:
        print(f"REFUSED: {err}", file=sys.stderr)
        return 3
    except NonFiniteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 4
    wall = time.perf_counter() - wall0
    table = summarize(records)
    print()
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    computed = sum(r["seconds"] for r in records)
    resumed = sum(r.get("resumed", False) for r in records)
    (args.out / "results.md").write_text(results_markdown(records, wall_seconds=wall))
    plots = _plots(records, args.out)
    print(f"\nwall time {wall / 60:.1f} min this invocation ({resumed} of {len(records)} runs loaded from "
          f"{args.out}; training+evaluation time of all runs {computed / 60:.1f} min)")
    print(f"wrote {args.out / 'results.md'}{plots}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
