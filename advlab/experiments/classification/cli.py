"""Command line of the classification experiment: `python -m advlab.experiments.classification`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from advlab._errors import AdvlabError, NonFiniteError
from advlab.experiments._args import count
from advlab.experiments.classification.config import (
    ARMS_FULL,
    ARMS_QUICK,
    SETTINGS_PATH,
    config_from_settings,
    load_settings,
)
from advlab.experiments.classification.report import (
    draw_accuracy,
    draw_robust,
    draw_tuning,
    results_markdown,
    summarize,
    tuning_table,
)
from advlab.experiments.classification.runs import check_comparable, load_records, run_experiment, tune

DESCRIPTION = ("Caption -> category classification with the whole MiniLM-L6 (BertForSequenceClassification), "
               "trained through AdversarialTrainer: baseline vs a noise control vs FreeLB, SMART, VILLA, R3F, VAT, "
               "TRADES, FastAT.")
QUICK_SEEDS = 1
FULL_SEEDS = 5




def _plots(records: Sequence[Mapping[str, Any]], out: Path) -> str:
    try:
        a, b = draw_accuracy(records, out / "accuracy.png"), draw_robust(records, out / "robust.png")
    except AdvlabError as err:
        return f" (no plots: {err})"
    return f", {a} and {b}"


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: quick default, `--tune`, `--full`, `--report`; see `--help`.

    Args:
        argv: Arguments (default `sys.argv[1:]`).

    Returns:
        Exit status: 0 ok, 2 a bad argument or missing set-up (the message names it), 4 a run
        diverged (NaN or inf).
    """
    parser = argparse.ArgumentParser(prog="python -m advlab.experiments.classification", description=DESCRIPTION)
    job = parser.add_mutually_exclusive_group()
    job.add_argument("--full", action="store_true", help=f"all nine arms, {FULL_SEEDS} seeds, the settings' epochs")
    job.add_argument("--tune", action="store_true",
                     help="pick each arm's size on validation (2 seeds by default) and write the settings file")
    job.add_argument("--report", action="store_true", help="train nothing: tabulate the finished runs in --out")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--dataset", choices=["tuxpaint", "openclipart"], default="tuxpaint",
                        help="captions labelled by top-level folder (default: the Tux Paint stamps)")
    source.add_argument("--data", type=Path, default=None,
                        help="any image-caption folder (an image with a .txt caption beside it); the label of a "
                             "caption is the top-level subfolder its image is in")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder, resumable (default runs/classification/<dataset>)")
    parser.add_argument("--seeds", type=count, default=None,
                        help=f"number of seeds: 0 .. N-1 (quick {QUICK_SEEDS}, full {FULL_SEEDS}, tune 2)")
    parser.add_argument("--epochs", type=count, default=None, help="override the settings' epochs")
    parser.add_argument("--arms", nargs="+", default=None, choices=list(ARMS_FULL),
                        help="arms to run; 'baseline' is always added (the differences are paired with it)")
    parser.add_argument("--settings", type=Path, default=SETTINGS_PATH, help="settings JSON (read; --tune writes)")
    parser.add_argument("--progress", action="store_true", help="the Trainer's tqdm bars")
    args = parser.parse_args(argv)
    name = args.dataset if args.data is None else f"folder-{args.data.resolve().name}"
    if args.data is not None and not args.data.is_dir():
        parser.error(f"argument --data: {args.data} is not a folder")
    out: Path = args.out if args.out is not None else Path("runs/classification") / name
    if out.exists() and not out.is_dir():
        parser.error(f"argument --out: {out} exists and is not a folder")
    if args.tune and args.arms and all(a in ("baseline", "noise") for a in args.arms):
        parser.error(f"argument --arms: --tune tunes arms with their own size (not baseline or noise, which takes "
                     f"FreeLB's), but got {' '.join(args.arms)}")
    if args.report and (args.arms or args.seeds or args.epochs):
        parser.error("argument --report: takes no --arms, --seeds or --epochs (it reads every record in --out)")
    if not args.tune and not args.report and not args.settings.is_file():
        parser.error(f"argument --settings: no such file: {args.settings}")
    if args.tune and not args.settings.parent.is_dir():
        parser.error(f"argument --settings: the folder {args.settings.parent} does not exist (--tune writes the file)")
    if args.tune and args.settings.exists() and not args.settings.is_file():
        parser.error(f"argument --settings: {args.settings} exists and is not a file (--tune writes the file)")
    try:
        settings = load_settings(args.settings)
        config = config_from_settings(settings, args.settings)
    except AdvlabError as err:
        parser.error(f"argument --settings: {err}")
    if args.tune and not isinstance(settings.get("tuned", {}), dict):
        parser.error(f"argument --settings: {args.settings}: expected 'tuned' to be a JSON object (arm -> note), "
                     f"but got {type(settings['tuned']).__name__} (--tune adds to it)")
    if not args.report:  # the runs write there: a path that cannot be a folder stops before any work
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            parser.error(f"argument --out: cannot create the folder {out}: {err.strerror or err}")
    if args.report:
        skipped: list[str] = []
        records = load_records(out, skipped=skipped)
        if skipped:
            print(f"note: skipped {len(skipped)} file(s) in {out} that are not finished run records: "
                  + "; ".join(skipped), file=sys.stderr)
        if not records:
            print(f"error: no finished runs in {out}", file=sys.stderr)
            return 2
        try:
            check_comparable(records)
        except AdvlabError as err:
            print(f"error: {out}: {err}", file=sys.stderr)
            return 2
        print(summarize(records))
        (out / "results.md").write_text(results_markdown(records))
        print(f"wrote {out / 'results.md'}{_plots(records, out)}")
        return 0
    torch.set_num_threads(min(2, torch.get_num_threads()))
    wall0 = time.perf_counter()
    try:
        from advlab.experiments.classification.data import caption_tokenizer, dataset_folder, prepare_data

        folder = dataset_folder(args.dataset) if args.data is None else args.data
        tokenizer = caption_tokenizer(config.max_length)
        data = prepare_data(folder, tokenizer=tokenizer, max_length=config.max_length)
    except (AdvlabError, ModuleNotFoundError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"data: {folder}: {data.summary}")
    epochs = args.epochs or config.epochs  # the quick default's runs are the full run's seed 0
    config = replace(config, epochs=epochs)
    try:
        if args.tune:
            arms = [a for a in (args.arms or ARMS_FULL) if a not in ("baseline", "noise")]
            seeds = list(range(args.seeds or 2))
            result = tune(data, arms=arms, base=config, seeds=seeds, out_dir=out / "tune", progress=args.progress)
            result["tuned_on"] = f"validation split only, {len(seeds)} seeds, {epochs} epochs; {data.summary}"
            (out / "tune" / "tune.json").write_text(json.dumps(result, indent=1) + "\n")
            print(tuning_table(result))
            try:
                plot = f" and {draw_tuning(result, out / 'tune' / 'tune.png')}"
            except AdvlabError as err:
                plot = f" (no plot: {err})"
            new = dict(settings)
            new["sizes"] = {**settings.get("sizes", {}), **result["sizes"]}
            new["tuned"] = {**settings.get("tuned", {}), **{a: result["tuned_on"] for a in result["sizes"]}}
            args.settings.write_text(json.dumps(new, indent=1) + "\n")
            print(f"wrote {args.settings} and {out / 'tune' / 'tune.json'}{plot} "
                  f"({(time.perf_counter() - wall0) / 60:.1f} min)")
            return 0
        arms = ["baseline", *[a for a in (args.arms or (ARMS_FULL if args.full else ARMS_QUICK)) if a != "baseline"]]
        n_seeds = args.seeds or (FULL_SEEDS if args.full else QUICK_SEEDS)
        records = run_experiment(data, arms=arms, seeds=range(n_seeds), config=config, out_dir=out,
                                 tokenizer=tokenizer, progress=args.progress, dataset=name)
    except NonFiniteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 4
    except AdvlabError as err:  # e.g. max_length beyond the model's positions: refused before the run trains
        print(f"error: {err}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - wall0
    print()
    print(summarize(records))
    (out / "results.md").write_text(results_markdown(records, wall_seconds=wall, data_summary=data.summary))
    resumed = sum(r.get("resumed", False) for r in records)
    print(f"\nwall time {wall / 60:.1f} min ({resumed} of {len(records)} runs loaded from {out})")
    print(f"wrote {out / 'results.md'}{_plots(records, out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
