"""Reports of the retrieval experiment: tables, paired differences against baseline and both controls, plots.

Every number is in points of R@1 (percent of queries), mean ± sample std over seeds. A paired
difference subtracts, seed by seed, the reference arm's test R@1 from the arm's, so that both
share the seed's initialisation, batch order and negatives. A difference is *beyond the
spread* when its mean exceeds its std over seeds (|mean| > std, needs >= 2 seeds).

Two claims are kept apart:

- **the loop helps**: zero δ − baseline is positive beyond the spread (extra forwards with
  their own dropout masks plus the KL consistency term, with no perturbation at all);
- **adversarial training helps**: a VILLA arm beats the baseline *and* both controls (zero δ
  and the noise control at the same sizes) beyond the spread.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Mapping, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

from advlab._errors import AdvlabError
from advlab.experiments._grid import mean_std
from advlab.experiments.retrieval.config import ARM_LABELS, ARMS_FULL, ARMS_PRETRAIN, CONTROLS

Measure = Literal["last", "best"]
_COLS = ("ir_r1", "ir_r5", "ir_r10", "tr_r1", "tr_r5", "tr_r10")
_REFS = ("baseline", *CONTROLS)
_MEASURE_TEXT = {"last": "last epoch", "best": "epoch of best validation R@1"}


def _test(record: Mapping[str, Any], measure: Measure) -> Mapping[str, float]:
    """A record's test metrics at its last epoch or at its best-validation epoch."""
    if measure == "best":
        return record.get("test_at_best", record["test"])  # type: ignore[no-any-return]
    return record["test"]  # type: ignore[no-any-return]


def _paired(
    records: Sequence[Mapping[str, Any]], backbone: str, arm: str, ref: str, measure: Measure = "last"
) -> list[float]:
    """Seed-by-seed test R@1 differences arm − ref, in points, over the seeds both have."""
    by = {(r["arm"], r["seed"]): 100 * _test(r, measure)["r1"] for r in records if r["backbone"] == backbone}
    return [by[(arm, s)] - by[(ref, s)] for (a, s) in sorted(by) if a == arm and (ref, s) in by]


def _beyond(diffs: Sequence[float]) -> int:
    """+1 / -1 when the mean difference is positive / negative beyond the spread, else 0."""
    if len(diffs) < 2:
        return 0
    m, s = mean_std(diffs)
    return 0 if abs(m) <= s else (1 if m > 0 else -1)


def _fmt_diff(diffs: Sequence[float]) -> str:
    m, s = mean_std(diffs)
    per = ", ".join(f"{d:+.1f}" for d in diffs)
    return f"{m:+.1f} ± {s:.1f} ({len(diffs)} seed{'s' if len(diffs) != 1 else ''}: {per})"


def _backbones(records: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["backbone"] for r in records))


def _arms(records: Sequence[Mapping[str, Any]], backbone: str | None = None) -> list[str]:
    return [a for a in ARMS_FULL if any(r["arm"] == a and backbone in (None, r["backbone"]) for r in records)]


def _runs(records: Sequence[Mapping[str, Any]], backbone: str, arm: str) -> list[Mapping[str, Any]]:
    return [r for r in records if r["backbone"] == backbone and r["arm"] == arm]


def paired_lines(records: Sequence[Mapping[str, Any]], measure: Measure = "last") -> list[str]:
    """Paired differences of test R@1 in points: each control against the baseline, each VILLA arm against all three.

    Args:
        records: Run records.
        measure: `"last"` (the last epoch) or `"best"` (the epoch of best validation R@1).

    Returns:
        One line per (arm, reference) pair with at least one shared seed.

    Examples:
        >>> rec = lambda arm, s, v: {"backbone": "uniter", "arm": arm, "seed": s, "test": {"r1": v}}
        >>> rs = [rec("baseline", 0, 0.10), rec("villa", 0, 0.12), rec("baseline", 1, 0.11), rec("villa", 1, 0.12)]
        >>> paired_lines(rs)
        ['uniter VILLA joint - baseline: +1.5 ± 0.7 (2 seeds: +2.0, +1.0)']
    """
    lines = []
    for backbone in _backbones(records):
        for arm in _arms(records, backbone):
            refs = ["baseline"] if arm in CONTROLS else ([] if arm == "baseline" else list(_REFS))
            for ref in refs:
                diffs = _paired(records, backbone, arm, ref, measure)
                if diffs:
                    lines.append(f"{backbone} {ARM_LABELS[arm]} - {ARM_LABELS[ref]}: {_fmt_diff(diffs)}")
    return lines


def verdict_lines(records: Sequence[Mapping[str, Any]], measure: Measure = "last") -> list[str]:
    """The two claims, each stated with its criterion: "the loop helps" and "adversarial training helps".

    Args:
        records: Run records.
        measure: `"last"` or `"best"` (see `paired_lines`).

    Returns:
        One line for the loop (zero δ − baseline) and one per VILLA arm, per backbone.

    Examples:
        >>> rec = lambda arm, s, v: {"backbone": "uniter", "arm": arm, "seed": s, "test": {"r1": v}}
        >>> r1 = {"baseline": (0.10, 0.11), "zero": (0.12, 0.125), "noise": (0.12, 0.14), "villa": (0.125, 0.13)}
        >>> rs = [rec(arm, s, v[s]) for arm, v in r1.items() for s in (0, 1)]
        >>> for line in verdict_lines(rs):
        ...     print(line)
        uniter: the loop helps: yes (zero δ - baseline +1.8 ± 0.4)
        uniter: VILLA joint beats baseline and both controls beyond the spread: no (- baseline +2.2 ± 0.4, - zero δ +0.5 ± 0.0, - noise control -0.3 ± 1.1)
    """
    lines = []
    for backbone in _backbones(records):
        zero = _paired(records, backbone, "zero", "baseline", measure)
        if zero:
            m, s = mean_std(zero)
            word = {1: "yes", -1: "no, it hurts", 0: "not shown"}[_beyond(zero)]
            lines.append(f"{backbone}: the loop helps: {word} (zero δ - baseline {m:+.1f} ± {s:.1f})")
        for arm in _arms(records, backbone):
            if arm == "baseline" or arm in CONTROLS:
                continue
            parts, signs = [], []
            for ref in _REFS:
                diffs = _paired(records, backbone, arm, ref, measure)
                if not diffs:
                    continue
                m, s = mean_std(diffs)
                parts.append(f"- {ARM_LABELS[ref]} {m:+.1f} ± {s:.1f}")
                signs.append(_beyond(diffs))
            if not parts:
                continue
            complete = len(signs) == len(_REFS)
            word = "yes" if complete and all(x == 1 for x in signs) else "no"
            if not complete:
                word = "undecided (not every control ran)"
            lines.append(
                f"{backbone}: {ARM_LABELS[arm]} beats baseline and both controls beyond the spread: {word} "
                f"({', '.join(parts)})"
            )
    return lines


def summarize(records: Sequence[Mapping[str, Any]]) -> str:
    """A plain-text report: test R@K per arm, R@1 last vs best-validation epoch, paired differences, verdicts.

    Args:
        records: Run records from `run_experiment`.

    Returns:
        The tables and lines, in points of R@1.

    Examples:
        >>> rec = lambda arm, s, v: {"backbone": "uniter", "arm": arm, "seed": s, "val": {"r1": v},
        ...     "test": {k: v for k in ("ir_r1", "ir_r5", "ir_r10", "tr_r1", "tr_r5", "tr_r10", "r1")}}
        >>> print(summarize([rec("baseline", 0, 0.1), rec("villa", 0, 0.2)]).splitlines()[-1])
        uniter: VILLA joint beats baseline and both controls beyond the spread: undecided (not every control ran) (- baseline +10.0 ± 0.0)
    """
    lines = ["Test split, last epoch: mean ± std over seeds, points of R@K"]
    head = f"{'backbone':8} {'arm':17} {'seeds':>5} | " + " | ".join(
        f"{c.upper().replace('_R', ' R@'):>11}" for c in _COLS
    )
    lines += [head, "-" * len(head)]
    for backbone in _backbones(records):
        for arm in _arms(records, backbone):
            rs = _runs(records, backbone, arm)
            cells = ["{:5.1f} ± {:3.1f}".format(*mean_std([100 * r["test"][c] for r in rs])) for c in _COLS]
            lines.append(f"{backbone:8} {ARM_LABELS[arm]:17} {len(rs):>5} | " + " | ".join(cells))
    lines += ["", "Test R@1 (mean of IR and TR), points: at the last epoch and at the epoch of best validation R@1"]
    head = f"{'backbone':8} {'arm':17} {'seeds':>5} | {'last epoch':>11} | {'best val':>11} | chosen epochs"
    lines += [head, "-" * len(head)]
    for backbone in _backbones(records):
        for arm in _arms(records, backbone):
            rs = _runs(records, backbone, arm)
            last = "{:5.1f} ± {:3.1f}".format(*mean_std([100 * r["test"]["r1"] for r in rs]))
            best = "{:5.1f} ± {:3.1f}".format(*mean_std([100 * _test(r, "best")["r1"] for r in rs]))
            chosen = ", ".join(str(r.get("best_epoch", "-")) for r in rs)
            lines.append(f"{backbone:8} {ARM_LABELS[arm]:17} {len(rs):>5} | {last} | {best} | {chosen}")
    for measure in ("last", "best"):
        pairs = paired_lines(records, measure)
        if pairs:
            lines += ["", f"Paired per-seed differences of test R@1 (mean of IR and TR), points, {_MEASURE_TEXT[measure]}:"]
            lines += pairs
    verdicts = verdict_lines(records, "last")
    if verdicts:
        lines += [
            "",
            "Verdict (last epoch; a difference counts when |mean| > std over seeds, i.e. beyond the spread):",
            *verdicts,
        ]
    lines += pretrain_lines(records)
    lines += robustness_lines(records)
    return "\n".join(lines)


def results_markdown(records: Sequence[Mapping[str, Any]], *, wall_seconds: float | None = None) -> str:
    """Markdown tables (IR and TR R@1/5/10, R@1 last vs best-validation epoch), paired differences, verdicts.

    Args:
        records: Run records.
        wall_seconds: Total wall time to state, if known.

    Returns:
        Markdown text; all numbers in points, mean ± std over seeds.
    """
    md = []
    for side, name in (("ir", "Image retrieval (caption → image)"), ("tr", "Text retrieval (image → caption)")):
        md += [f"{name}, test split, last epoch:", "", "| backbone | arm | seeds | R@1 | R@5 | R@10 |", "|---|---|---|---|---|---|"]
        for backbone in _backbones(records):
            for arm in _arms(records, backbone):
                rs = _runs(records, backbone, arm)
                cells = [
                    "{:.1f} ± {:.1f}".format(*mean_std([100 * r["test"][f"{side}_r{k}"] for r in rs])) for k in (1, 5, 10)
                ]
                md.append(f"| {backbone} | {ARM_LABELS[arm]} | {len(rs)} | " + " | ".join(cells) + " |")
        md.append("")
    md += ["Test R@1 (mean of IR and TR) at the last epoch and at the epoch of best validation R@1:", "",
           "| backbone | arm | seeds | last epoch | best validation epoch | chosen epochs |", "|---|---|---|---|---|---|"]
    for backbone in _backbones(records):
        for arm in _arms(records, backbone):
            rs = _runs(records, backbone, arm)
            last = "{:.1f} ± {:.1f}".format(*mean_std([100 * r["test"]["r1"] for r in rs]))
            best = "{:.1f} ± {:.1f}".format(*mean_std([100 * _test(r, "best")["r1"] for r in rs]))
            chosen = ", ".join(str(r.get("best_epoch", "-")) for r in rs)
            md.append(f"| {backbone} | {ARM_LABELS[arm]} | {len(rs)} | {last} | {best} | {chosen} |")
    for measure in ("last", "best"):
        pairs = paired_lines(records, measure)
        if pairs:
            md += ["", f"Paired per-seed differences of test R@1 in points, {_MEASURE_TEXT[measure]}:", ""]
            md += [f"- {line}" for line in pairs]
    verdicts = verdict_lines(records, "last")
    if verdicts:
        md += ["", "Verdict (last epoch; a difference counts when |mean| > std over seeds):", ""]
        md += [f"- {line}" for line in verdicts]
    md += pretrain_markdown(records)
    md += robustness_markdown(records)
    if wall_seconds is not None:
        md += ["", f"Total wall time: {wall_seconds / 60:.1f} min."]
    return "\n".join(md) + "\n"


# ----------------------------------------------------------------------------------------------------------
# Both stages of VILLA: pre-training (standard / adversarial) x fine-tuning (standard / adversarial)
# ----------------------------------------------------------------------------------------------------------

_PT_REF = "pt-std/ft-std"
_STAGES = (("std", "standard"), ("adv", "VILLA"))


def _cell(rs: Sequence[Mapping[str, Any]]) -> str:
    """`last / best (n)`: mean test R@1 in points at the last and at the best-validation epoch."""
    if not rs:
        return "-"
    last, _ = mean_std([100 * r["test"]["r1"] for r in rs])
    best, _ = mean_std([100 * _test(r, "best")["r1"] for r in rs])
    return f"{last:.1f} / {best:.1f} ({len(rs)})"


def _pt_pairs(records: Sequence[Mapping[str, Any]], backbone: str) -> list[str]:
    """Paired differences of each pt arm against pt-std/ft-std, of adversarial against standard pre-training
    under VILLA fine-tuning, and of pt-std/ft-std against the baseline."""
    lines = []
    pairs = [(arm, _PT_REF) for arm in ARMS_PRETRAIN if arm != _PT_REF]
    pairs += [("pt-adv/ft-adv", "pt-std/ft-adv"), (_PT_REF, "baseline")]
    for arm, ref in pairs:
        parts = [f"{_MEASURE_TEXT[m]} {_fmt_diff(d)}" for m in ("last", "best")
                 if (d := _paired(records, backbone, arm, ref, m))]  # type: ignore[arg-type]
        if parts:
            lines.append(f"{backbone} {ARM_LABELS[arm]} - {ARM_LABELS[ref]}: " + "; ".join(parts))
    return lines


def _pt_losses(records: Sequence[Mapping[str, Any]], backbone: str) -> list[str]:
    """Mean pre-training losses at the last pre-training epoch, per pre-training arm (one per seed)."""
    lines = []
    for stage, name in _STAGES:
        blocks = {r["seed"]: r["pretrain"] for r in records if r["backbone"] == backbone and "pretrain" in r
                  and r["arm"].startswith(f"pt-{stage}/")}
        if not blocks:
            continue
        last = [b["epochs"][-1] for b in blocks.values() if b.get("epochs")]
        tasks = [t for t in ("loss", "mlm", "itm", "mrfr") if last and all(t in e for e in last)]
        values = ", ".join(f"{'total' if t == 'loss' else t.upper()} {mean_std([e[t] for e in last])[0]:.3f}" for t in tasks)
        epochs = last[0]["epoch"] if last else 0
        lines.append(f"{backbone} pre-training {name}: {epochs} epoch(s), {len(blocks)} seed(s); last-epoch losses {values}")
    return lines


def _pt_table(records: Sequence[Mapping[str, Any]]) -> tuple[list[tuple[str, str, str, str]], list[str], list[str]]:
    """The 2 x 2 table's rows (backbone, pre-training, FT standard cell, FT VILLA cell), paired lines, loss lines."""
    rows: list[tuple[str, str, str, str]] = []
    pairs: list[str] = []
    losses: list[str] = []
    for backbone in _backbones([r for r in records if r["arm"] in ARMS_PRETRAIN]):
        for pt, name in _STAGES:
            std, adv = (_cell(_runs(records, backbone, f"pt-{pt}/ft-{ft}")) for ft, _ in _STAGES)
            rows.append((backbone, name, std, adv))
        pairs += _pt_pairs(records, backbone)
        losses += _pt_losses(records, backbone)
    return rows, pairs, losses


def pretrain_lines(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The 2 x 2 table of VILLA's two stages (pre-training rows, fine-tuning columns) and its paired differences.

    Each cell is the mean test R@1 (mean of IR and TR) in points at the last epoch and at the
    epoch of best validation R@1, with the number of seeds. The paired per-seed differences are
    taken against standard pre-training + standard fine-tuning; adversarial pre-training is also
    paired against standard pre-training when both are fine-tuned with VILLA; and standard
    pre-training + standard fine-tuning against the baseline (no pre-training).

    Args:
        records: Run records.

    Returns:
        The lines; empty when no record of a pre-training arm exists.

    Examples:
        >>> rec = lambda arm, s, v: {"backbone": "uniter", "arm": arm, "seed": s, "test": {"r1": v}}
        >>> rs = [rec("pt-std/ft-std", s, 0.10 + s / 100) for s in (0, 1)]
        >>> rs += [rec("pt-adv/ft-adv", s, 0.13 + s / 50) for s in (0, 1)]
        >>> for line in pretrain_lines(rs)[1:]:
        ...     print(line)
        Both stages of VILLA: test R@1 (mean of IR and TR), points, last epoch / best validation epoch (seeds)
        backbone pre-training | FT standard        | FT VILLA
        -----------------------------------------------------
        uniter   standard     | 10.5 / 10.5 (2)    | -
        uniter   VILLA        | -                  | 14.0 / 14.0 (2)
        Paired per-seed differences of test R@1, points:
        uniter PT VILLA + FT VILLA - PT std + FT std: last epoch +3.5 ± 0.7 (2 seeds: +3.0, +4.0); epoch of best validation R@1 +3.5 ± 0.7 (2 seeds: +3.0, +4.0)
    """
    if not any(r["arm"] in ARMS_PRETRAIN for r in records):
        return []
    lines = ["", "Both stages of VILLA: test R@1 (mean of IR and TR), points, last epoch / best validation epoch (seeds)"]
    head = f"{'backbone':8} {'pre-training':12} | {'FT standard':18} | FT VILLA"
    lines += [head, "-" * len(head)]
    rows, pairs, losses = _pt_table(records)
    lines += [f"{backbone:8} {name:12} | {std:18} | {adv}" for backbone, name, std, adv in rows]
    if pairs:
        lines += ["Paired per-seed differences of test R@1, points:", *pairs]
    return lines + losses


def pretrain_markdown(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The 2 x 2 table of `pretrain_lines` as Markdown lines.

    Args:
        records: Run records.

    Returns:
        Markdown lines; empty when no record of a pre-training arm exists.
    """
    if not any(r["arm"] in ARMS_PRETRAIN for r in records):
        return []
    md = ["", ("Both stages of VILLA (pre-training rows, fine-tuning columns): test R@1 (mean of IR and TR), points, "
               "last epoch / best validation epoch (seeds):"), "",
          "| backbone | pre-training | FT standard | FT VILLA |", "|---|---|---|---|"]
    rows, pairs, losses = _pt_table(records)
    md += [f"| {backbone} | {name} | {std} | {adv} |" for backbone, name, std, adv in rows]
    if pairs:
        md += ["", "Paired per-seed differences of test R@1, points:", "", *[f"- {line}" for line in pairs]]
    if losses:
        md += ["", *[f"- {line}" for line in losses]]
    return md


# ----------------------------------------------------------------------------------------------------------
# Robustness: paraphrased captions and PGD at several radii (records' `robustness` block)
# ----------------------------------------------------------------------------------------------------------

_PARA_COLS = (("original", "original"), ("paraphrased", "paraphrased"), ("drop", "drop"),
              ("original_changed", "chg. orig."), ("paraphrased_changed", "chg. para."), ("drop_changed", "chg. drop"))


def _rob_entry(record: Mapping[str, Any], measure: Measure) -> Mapping[str, Any] | None:
    block = record.get("robustness")
    return block.get(measure) if isinstance(block, Mapping) else None


def _rob_values(record: Mapping[str, Any], measure: Measure) -> dict[str, float]:
    """A record's robustness numbers by column name, fractions (empty when it has none at `measure`)."""
    entry = _rob_entry(record, measure)
    if entry is None:
        return {}
    out: dict[str, float] = {}
    para = entry.get("paraphrase", {})
    if "missing" not in para:
        out["original"], out["paraphrased"] = para["original"]["r1"], para["paraphrased"]["r1"]
        out["drop"] = out["original"] - out["paraphrased"]
        if para.get("original_changed") is not None:
            out["original_changed"] = para["original_changed"]["r1"]
            out["paraphrased_changed"] = para["paraphrased_changed"]["r1"]
            out["drop_changed"] = out["original_changed"] - out["paraphrased_changed"]
    for modality in ("txt", "img"):
        side = entry["attack"][modality]
        out[f"{modality}@0"] = side["clean_r1"]
        for radius, value in zip(side["radii"], side["r1"]):
            out[f"{modality}@{radius:g}"] = value
    return out


def _attack_cols(records: Sequence[Mapping[str, Any]], measure: Measure) -> list[tuple[str, str]]:
    """Attack columns present in any record, text then image, by radius: (key, header)."""
    keys = {k for r in records for k in _rob_values(r, measure) if "@" in k}
    cols = []
    for modality in ("txt", "img"):
        radii = sorted(float(k.split("@")[1]) for k in keys if k.startswith(modality + "@"))
        cols += [(f"{modality}@{x:g}", f"{modality} {'clean' if x == 0 else f'{x:g}'}") for x in radii]
    return cols


def _rob_cell(values: Sequence[float], paired: bool) -> str:
    if not values:
        return "-"
    m, s = mean_std(values)
    if paired:
        return f"{m:+.1f} ± {s:.1f}" + ("*" if _beyond(values) else "")
    return f"{m:.1f} ± {s:.1f}"


def _rob_rows(
    records: Sequence[Mapping[str, Any]], cols: Sequence[tuple[str, str]], measure: Measure, paired: bool
) -> list[tuple[str, str, int, list[str]]]:
    """(backbone, arm label, seeds, cells) per arm: mean ± std in points, or paired differences against the baseline."""
    rows = []
    for backbone in _backbones(records):
        by = {(r["arm"], r["seed"]): _rob_values(r, measure) for r in records if r["backbone"] == backbone}
        for arm in _arms(records, backbone):
            if paired and arm == "baseline":
                continue
            seeds = sorted(s for (a, s), v in by.items() if a == arm and v)
            if not seeds:
                continue
            cells = []
            for key, _ in cols:
                if paired:
                    vals = [100 * (by[(arm, s)][key] - by[("baseline", s)][key]) for s in seeds
                            if key in by[(arm, s)] and key in by.get(("baseline", s), {})]
                else:
                    vals = [100 * by[(arm, s)][key] for s in seeds if key in by[(arm, s)]]
                cells.append(_rob_cell(vals, paired))
            rows.append((backbone, ARM_LABELS[arm], len(seeds), cells))
    return rows


def _missing_reasons(records: Sequence[Mapping[str, Any]]) -> list[str]:
    reasons = []
    for r in records:
        entry = _rob_entry(r, "last")
        if entry is not None and "missing" in entry.get("paraphrase", {}):
            reasons.append(entry["paraphrase"]["missing"])
    return list(dict.fromkeys(reasons))


def _rob_sections(records: Sequence[Mapping[str, Any]]) -> list[tuple[str, list[tuple[str, str]], Measure, bool]]:
    """The robustness tables to show: (title, columns, measure, paired)."""
    sections: list[tuple[str, list[tuple[str, str]], Measure, bool]] = []
    for measure in ("last", "best"):
        if not any(_rob_values(r, measure) for r in records):  # type: ignore[arg-type]
            continue
        where = _MEASURE_TEXT[measure]  # type: ignore[index]
        para = [c for c in _PARA_COLS if any(c[0] in _rob_values(r, measure) for r in records)]  # type: ignore[arg-type]
        att = _attack_cols(records, measure)  # type: ignore[arg-type]
        for paired in (False, True):
            what = ("paired per-seed differences against the baseline, points (* beyond the spread: |mean| > std)"
                    if paired else "points, mean ± std over seeds")
            if para:
                sections.append((f"Paraphrase robustness, test R@1 (mean of IR and TR), {where}: {what}", para,
                                 measure, paired))  # type: ignore[arg-type]
            title = (f"Attack robustness, robust test R@1 under PGD at radius ε (txt: text attack, image retrieval; "
                     f"img: image attack, text retrieval; ε relative to the clean row norm), {where}: {what}")
            sections.append((title, att, measure, paired))  # type: ignore[arg-type]
    return sections


def _rob_footer(records: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = []
    shares = [(e["paraphrase"]["n_changed"], e["paraphrase"]["n"]) for r in records
              if (e := _rob_entry(r, "last")) is not None and "missing" not in e.get("paraphrase", {})]
    if shares:
        lines.append(f"Paraphrased captions: {shares[0][0]} of {shares[0][1]} test captions changed "
                     f"({100 * shares[0][0] / shares[0][1]:.0f} %; 'chg.' columns: over those only); the others are "
                     "scored as they are. Drop = original - paraphrased.")
    lines += [f"No paraphrase column: {why}" for why in _missing_reasons(records)]
    notes = {r["robustness"]["note"] for r in records if isinstance(r.get("robustness"), Mapping)}
    if any("not kept" in n for n in notes):
        lines.append("Some runs kept no best-validation weights: their robustness is at the last epoch only.")
    att = next((e["attack"] for r in records if (e := _rob_entry(r, "last")) is not None), None)
    if att is not None:
        lines.append(f"PGD: l2 ball of radius ε × the clean row norm at the site, {att['steps']} steps of "
                     f"{att['step_factor']:g} ε / {att['steps']} from δ = 0; a query counts as lost at ε when any "
                     "radius up to ε ranks its true item below first. Ranks by ITC.")
    return lines


def robustness_lines(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Plain-text robustness tables: values per arm and paired differences against the baseline, in points.

    Args:
        records: Run records; those without a `robustness` block are left out.

    Returns:
        The lines (empty when no record has robustness numbers).

    Examples:
        >>> att = lambda c, v: {"steps": 10, "step_factor": 2.5, "txt": {"radii": [0.1], "clean_r1": c, "r1": [v]},
        ...                     "img": {"radii": [0.1], "clean_r1": c, "r1": [v]}}
        >>> para = {"missing": "WordNet not found"}
        >>> rec = lambda arm, s, v: {"backbone": "uniter", "arm": arm, "seed": s, "robustness": {"note": "",
        ...     "last": {"attack": att(0.2, v), "paraphrase": para}}}
        >>> lines = robustness_lines([rec("baseline", 0, 0.05), rec("villa", 0, 0.08)])
        >>> print(lines[-4])
        uniter   VILLA joint           1 |  +0.0 ± 0.0 |  +3.0 ± 0.0 |  +0.0 ± 0.0 |  +3.0 ± 0.0
        >>> lines[-2]
        'No paraphrase column: WordNet not found'
    """
    lines: list[str] = []
    for title, cols, measure, paired in _rob_sections(records):
        head = f"{'backbone':8} {'arm':17} {'seeds':>5} | " + " | ".join(f"{h:>11}" for _, h in cols)
        lines += ["", title, head, "-" * len(head)]
        for backbone, arm, n, cells in _rob_rows(records, cols, measure, paired):
            lines.append(f"{backbone:8} {arm:17} {n:>5} | " + " | ".join(f"{c:>11}" for c in cells))
    if lines:
        lines += ["", *_rob_footer(records)]
    return lines


def robustness_markdown(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The robustness tables of `robustness_lines` as Markdown lines.

    Args:
        records: Run records.

    Returns:
        Markdown lines (empty when no record has robustness numbers).
    """
    md: list[str] = []
    for title, cols, measure, paired in _rob_sections(records):
        md += ["", f"{title}:", "", "| backbone | arm | seeds | " + " | ".join(h for _, h in cols) + " |",
               "|---|---|---|" + "---|" * len(cols)]
        for backbone, arm, n, cells in _rob_rows(records, cols, measure, paired):
            md.append(f"| {backbone} | {arm} | {n} | " + " | ".join(cells) + " |")
    if md:
        md += [""] + [f"- {line}" for line in _rob_footer(records)]
    return md


def draw_robustness(records: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """A PNG of robust test R@1 against the relative radius: one line per arm (mean), one dot per seed.

    One panel per row: the text attack (image retrieval) and the image attack (text retrieval),
    per backbone; radius 0 is clean ITC R@1; last epoch. 7 in wide at 150 dpi.

    Args:
        records: Run records with a `robustness` block.
        path: Output PNG.

    Returns:
        The path written.

    Raises:
        AdvlabError: No record has robustness numbers, or matplotlib is missing.
    """
    with_rob = [r for r in records if _rob_values(r, "last")]
    if not with_rob:
        raise AdvlabError("No run record has robustness numbers to plot.")
    backbones = _backbones(with_rob)
    panels = [(b, m) for b in backbones for m in ("txt", "img")]
    fig = _figure(7.0, 3.0 * len(panels))
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (backbone, modality) in zip(axes, panels):
        arms = _arms(with_rob, backbone)
        for k, arm in enumerate(arms):
            rs = _runs(with_rob, backbone, arm)
            color = _COLORS.get(arm, "black")
            curves = []
            for r in rs:
                side = _rob_entry(r, "last")["attack"][modality]  # type: ignore[index]
                xs, ys = [0.0, *side["radii"]], [100 * side["clean_r1"], *(100 * v for v in side["r1"])]
                curves.append((xs, ys))
                gap = min((b - a for a, b in pairwise(xs)), default=1.0)
                jitter = (k - (len(arms) - 1) / 2) * 0.12 * gap  # side by side, never past the next radius
                ax.scatter([x + jitter for x in xs], ys, s=12, color=color, alpha=0.6, zorder=3)
            xs = curves[0][0]
            same = [c for c in curves if c[0] == xs]
            mean = [statistics.fmean(v) for v in zip(*(c[1] for c in same))]
            ax.plot(xs, mean, color=color, linewidth=2, marker="o", markersize=3,
                    label=f"{ARM_LABELS[arm]} ({len(rs)} seed{'s' if len(rs) != 1 else ''})")
        task = ("text attack on the captions: image retrieval" if modality == "txt"
                else "image attack on the region features: text retrieval")
        ax.set_title(f"{backbone}-mini, {task}, last epoch", fontsize=10)
        ax.set_xlabel("radius ε (fraction of the clean row norm at the site)", fontsize=10)
        ax.set_ylabel("robust test R@1, points", fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=9)
        ax.legend(fontsize=8, loc="upper right")
    return _save(fig, path)


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise AdvlabError("Plots need matplotlib: `python -m pip install matplotlib`.") from None
    fig = Figure(figsize=(width, height), dpi=150, layout="constrained")
    return fig


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150)
    return out


_COLORS = {"baseline": "#444444", "zero": "#8c6d31", "noise": "#1f77b4", "villa": "#d62728", "alter": "#9467bd",
           "txt": "#2ca02c", "img": "#ff7f0e"}


def draw_plot(records: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """A PNG of test R@1 (mean of IR and TR, points) per arm: one dot per seed, a bar at the mean.

    One panel per backbone with the arms it ran, 8 x 4 in at 150 dpi (wider with more arms), panel
    widths in proportion to their arms; filled dots are the last epoch, open circles the epoch of
    best validation R@1. The pre-training arms are left out (the report's 2 x 2 table has them).

    Args:
        records: Run records.
        path: Output PNG.

    Returns:
        The path written.
    """
    backbones = _backbones(records) or ["uniter"]
    per_panel = [_arms(records, b) or ["baseline"] for b in backbones]  # each panel shows only its own arms
    widths = [len(arms) for arms in per_panel]
    fig = _figure(max(8.0, 1.1 * sum(widths) + 1.5), 4.0)
    axes = fig.subplots(1, len(backbones), squeeze=False, sharey=True, width_ratios=widths)[0]
    for ax, backbone, arms in zip(axes, backbones, per_panel):
        for x, arm in enumerate(arms):
            rs = _runs(records, backbone, arm)
            if not rs:
                continue
            last = [100 * r["test"]["r1"] for r in rs]
            best = [100 * _test(r, "best")["r1"] for r in rs]
            offsets = [(i - (len(rs) - 1) / 2) * 0.08 for i in range(len(rs))]
            color = _COLORS.get(arm, "black")
            ax.scatter([x - 0.12 + o for o in offsets], last, s=28, color=color, zorder=3,
                       label="last epoch" if x == 0 else None)
            ax.scatter([x + 0.12 + o for o in offsets], best, s=28, facecolors="none", edgecolors=color, zorder=3,
                       label="best-validation epoch" if x == 0 else None)
            ax.hlines(statistics.fmean(last), x - 0.3, x + 0.05, color=color, linewidth=2)
            ax.hlines(statistics.fmean(best), x - 0.05, x + 0.3, color=color, linewidth=1, linestyle="--")
        ax.set_xticks(range(len(arms)), [ARM_LABELS[a].replace("VILLA ", "VILLA\n") for a in arms], fontsize=9)
        ax.set_title(f"{backbone}-mini: test R@1 (mean of IR and TR)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(labelsize=9)
    axes[0].set_ylabel("R@1, points", fontsize=10)
    axes[0].legend(fontsize=9, loc="best")
    return _save(fig, path)


def draw_curves(records: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """A PNG of learning curves: validation R@1 (points) and training loss after each epoch, per arm.

    One column per backbone; a thick line is the mean over seeds, thin lines the seeds. Records
    without per-epoch entries are left out.

    Args:
        records: Run records (with `epochs`).
        path: Output PNG.

    Returns:
        The path written.
    """
    with_curves = [r for r in records if r.get("epochs")]
    backbones = _backbones(with_curves) or ["uniter"]
    fig = _figure(max(8.0, 4.5 * len(backbones)), 6.0)
    axes = fig.subplots(2, len(backbones), squeeze=False, sharex="col")
    for col, backbone in enumerate(backbones):
        top, bottom = axes[0][col], axes[1][col]
        for arm in _arms(with_curves, backbone):
            rs = _runs(with_curves, backbone, arm)
            color = _COLORS.get(arm, "black")
            n = min(len(r["epochs"]) for r in rs)
            xs = [e["epoch"] for e in rs[0]["epochs"][:n]]
            for key, ax in (("val", top), ("loss", bottom)):
                ys = [[100 * e["val"]["r1"] if key == "val" else e["loss"] for e in r["epochs"][:n]] for r in rs]
                for y in ys:
                    ax.plot(xs, y, color=color, linewidth=0.6, alpha=0.5)
                mean = [statistics.fmean(v) for v in zip(*ys)]
                ax.plot(xs, mean, color=color, linewidth=2, label=ARM_LABELS[arm] if key == "val" else None)
        top.set_title(f"{backbone}-mini", fontsize=10)
        top.set_ylabel("validation R@1, points", fontsize=10)
        bottom.set_ylabel("training loss (clean)", fontsize=10)
        bottom.set_xlabel("epoch", fontsize=10)
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=9)
        top.legend(fontsize=9, loc="best")
    return _save(fig, path)


def tuning_table(result: Mapping[str, Any], backbone: str = "uniter") -> str:
    """The tuning grid as text: validation R@1 (points, mean ± std over seeds) per relative size and arm.

    Args:
        result: What `tune` returned (or the stored JSON).
        backbone: Its backbone, for the title.

    Returns:
        The table, the bands, the KL rows and the choice.

    Examples:
        >>> pt = lambda arm, step, kl, m: {"arm": arm, "step": step, "kl_weight": kl, "val_r1": [m], "mean": m, "std": 0.0}
        >>> res = {"grid": [pt("villa", 1e-3, 1.5, 0.12), pt("noise", 1e-3, 1.5, 0.13)], "baseline": pt("baseline", 0, 0, 0.1),
        ...        "zero": pt("zero", 0, 1.5, 0.11), "kl": [], "step": 1e-3, "kl_weight": 1.5, "seeds": [0],
        ...        "extended": [], "edge": False}
        >>> print(tuning_table(res))
        uniter: validation R@1 (points) by relative step size, 1 seed each
        relative step |  VILLA joint | noise control
               0.001  |  12.0 ±  0.0 |   13.0 ±  0.0
        baseline 10.0 ± 0.0; zero δ (KL 1.5) 11.0 ± 0.0
        chosen: relative step 0.001, KL weight 1.5
    """
    seeds = len(result.get("seeds", [])) or len(result["baseline"]["val_r1"])
    lines = [f"{backbone}: validation R@1 (points) by relative step size, {seeds} seed{'s' if seeds != 1 else ''} each",
             f"{'relative step':>13} | {ARM_LABELS['villa']:>12} | {ARM_LABELS['noise']:>13}"]
    by = {(p["step"], p["arm"]): p for p in result["grid"]}
    for step in sorted({p["step"] for p in result["grid"]}):
        cells = []
        for arm in ("villa", "noise"):
            p = by.get((step, arm))
            cells.append(f"{100 * p['mean']:5.1f} ± {100 * p['std']:4.1f}" if p else "-")
        lines.append(f"{step:>12g}  | {cells[0]:>12} | {cells[1]:>13}")
    b, z = result["baseline"], result["zero"]
    lines.append(f"baseline {100 * b['mean']:.1f} ± {100 * b['std']:.1f}; zero δ (KL {z['kl_weight']:g}) "
                 f"{100 * z['mean']:.1f} ± {100 * z['std']:.1f}")
    for p in result.get("kl", []):
        if p not in result["grid"]:
            lines.append(f"at step {p['step']:g}, KL {p['kl_weight']:g}: {ARM_LABELS[p['arm']]} "
                         f"{100 * p['mean']:.1f} ± {100 * p['std']:.1f}")
    if result.get("extended"):
        lines.append("grid extended past its edge: " + ", ".join(f"{x:g}" for x in result["extended"]))
    if result.get("edge"):
        lines.append("the best size is still on the grid's edge (extensions exhausted)")
    if result.get("floor"):
        lines.append("the best size is the smallest, and zero δ (the same loop at step 0) scores at least as high: "
                     "no perturbation size beats the loop without one")
    lines.append(f"chosen: relative step {result['step']:g}, KL weight {result['kl_weight']:g}")
    return "\n".join(lines)


def draw_tuning(result: Mapping[str, Any], path: str | os.PathLike[str], *, backbone: str = "uniter") -> Path:
    """A PNG of validation R@1 against the relative step size: VILLA and the noise control, baseline and zero δ as bands.

    8 x 4 in at 150 dpi, log x axis; dots are seeds, lines join the means, bands are mean ± std.

    Args:
        result: What `tune` returned.
        path: Output PNG.
        backbone: For the title.

    Returns:
        The path written.
    """
    fig = _figure(8.0, 4.0)
    ax = fig.subplots()
    steps = sorted({p["step"] for p in result["grid"]})
    lo, hi = min(steps) / 1.5, max(steps) * 1.5
    for name, color in (("baseline", _COLORS["baseline"]), ("zero", _COLORS["zero"])):
        p = result[name]
        m, s = 100 * p["mean"], 100 * p["std"]
        label = f"{ARM_LABELS[name]} (mean ± std)" + (f", KL {p['kl_weight']:g}" if name == "zero" else "")
        ax.axhspan(m - s, m + s, xmin=0, xmax=1, color=color, alpha=0.15)
        ax.axhline(m, color=color, linewidth=1, linestyle="--", label=label)
    for arm in ("villa", "noise"):
        pts = sorted((p for p in result["grid"] if p["arm"] == arm), key=lambda p: p["step"])
        color = _COLORS[arm]
        for p in pts:
            ax.scatter([p["step"]] * len(p["val_r1"]), [100 * v for v in p["val_r1"]], s=14, color=color, alpha=0.5)
        ax.plot([p["step"] for p in pts], [100 * p["mean"] for p in pts], color=color, linewidth=2, marker="o",
                label=f"{ARM_LABELS[arm]} (KL {pts[0]['kl_weight']:g})" if pts else None)
    ax.axvline(result["step"], color="black", linewidth=0.8, linestyle=":", label=f"chosen {result['step']:g}")
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.set_xlabel("relative step size (fraction of the clean row norm)", fontsize=10)
    ax.set_ylabel("validation R@1, points", fontsize=10)
    ax.set_title(f"{backbone}-mini: tuning on validation, {len(result.get('seeds', []))} seeds per point", fontsize=10)
    ax.tick_params(labelsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="best")
    return _save(fig, path)
