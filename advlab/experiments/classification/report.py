"""Reports of the classification experiment: tables, paired per-seed differences against the baseline, plots.

Every number is in points (percent), mean ± sample std over seeds. A paired difference
subtracts, seed by seed, the baseline's value from the arm's: both share the seed's head
initialisation and batch order. A difference is *beyond the spread* when |mean| > std over
seeds (needs >= 2 seeds). An adversarial arm can claim a gain only when it beats the baseline
and the noise control (a random direction of FreeLB's size) beyond the spread.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from advlab._errors import AdvlabError
from advlab.experiments._grid import mean_std
from advlab.experiments.classification.config import ARM_LABELS, ARMS_FULL


def _value(rec: Mapping[str, Any], column: str) -> float | None:
    """A record's value of a column, in points: `acc`, `f1`, `para`, or `robust:<radius>`."""
    if column == "acc":
        return 100 * rec["test"]["acc"]
    if column == "f1":
        return 100 * rec["test"]["f1"]
    if column == "val":
        return 100 * rec["val"]["acc"]
    if column == "para":
        para = rec.get("paraphrase")
        return None if not para else 100 * para["acc"]
    if column.startswith("robust:"):
        value = (rec.get("robust") or {}).get(column[7:])
        return None if value is None else 100 * value
    raise AdvlabError(f"Expected a column among acc, f1, val, para, robust:<radius>, but got {column!r}.")


def _arms(records: Sequence[Mapping[str, Any]]) -> list[str]:
    present = {r["arm"] for r in records}
    return [a for a in ARMS_FULL if a in present]


def _radii(records: Sequence[Mapping[str, Any]]) -> list[str]:
    radii: list[str] = []
    for r in records:
        for k in r.get("robust") or {}:
            if k not in radii:
                radii.append(k)
    return sorted(radii, key=float)


def paired(records: Sequence[Mapping[str, Any]], arm: str, column: str, ref: str = "baseline") -> list[float]:
    """Seed-by-seed differences arm − ref of a column, in points, over the seeds both have.

    Args:
        records: Run records.
        arm: The arm.
        column: `acc`, `f1`, `val`, `para` or `robust:<radius>`.
        ref: The reference arm.

    Returns:
        One difference per shared seed.

    Examples:
        >>> recs = [{"arm": a, "seed": s, "test": {"acc": v, "f1": v}} for a, s, v in
        ...         [("baseline", 0, 0.5), ("freelb", 0, 0.6), ("baseline", 1, 0.7), ("freelb", 1, 0.7)]]
        >>> [round(d, 6) for d in paired(recs, "freelb", "acc")]
        [10.0, 0.0]
    """
    by = {(r["arm"], r["seed"]): _value(r, column) for r in records}
    return [v - by[(ref, s)] for (a, s), v in sorted(by.items())  # type: ignore[operator]
            if a == arm and v is not None and by.get((ref, s)) is not None]


def _fmt(values: Sequence[float], sign: bool = False) -> str:
    if not values:
        return "–"
    m, s = mean_std(values)
    if len(values) == 1:  # one seed: no spread to show
        return f"{m:+.1f}" if sign else f"{m:.1f}"
    return f"{m:+.1f} ± {s:.1f}" if sign else f"{m:.1f} ± {s:.1f}"


def _verdict(diffs: Sequence[float]) -> str:
    if len(diffs) < 2:
        return "one seed"
    m, s = mean_std(diffs)
    if abs(m) <= s:
        return "within spread"
    return "above" if m > 0 else "below"


def summarize(records: Sequence[Mapping[str, Any]]) -> str:
    """Markdown tables: per arm mean ± std of every test metric, then paired differences against the baseline.

    Args:
        records: Run records (any arms and seeds).

    Returns:
        The tables.
    """
    arms, radii = _arms(records), _radii(records)
    has_para = any(r.get("paraphrase") for r in records)
    cols = ["acc", "f1", *[f"robust:{x}" for x in radii], *(["para"] if has_para else [])]
    names = ["test acc", "macro-F1", *[f"robust acc ε={x}" for x in radii], *(["paraphrase acc"] if has_para else [])]
    lines = ["| arm | seeds | size (unit) | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(cols)]
    for arm in arms:
        rows = [r for r in records if r["arm"] == arm]
        size = "–" if arm == "baseline" else f"{rows[0]['size']:g} ({rows[0]['unit']})"
        cells = [_fmt([v for r in rows if (v := _value(r, c)) is not None]) for c in cols]
        lines.append(f"| {ARM_LABELS[arm]} | {len(rows)} | {size} | " + " | ".join(cells) + " |")
    lines += ["", "Paired per-seed differences against the baseline (points; verdict: |mean| > std over seeds):", "",
              "| arm − baseline | " + " | ".join(names) + " | verdict (acc) | vs noise control (acc) |",
              "|---|" + "---|" * (len(cols) + 2)]
    for arm in arms:
        if arm == "baseline":
            continue
        diffs = [_fmt(paired(records, arm, c), sign=True) for c in cols]
        acc = paired(records, arm, "acc")
        vs_noise = "–" if arm == "noise" else _fmt(paired(records, arm, "acc", ref="noise"), sign=True)
        lines.append(f"| {ARM_LABELS[arm]} | " + " | ".join(diffs) + f" | {_verdict(acc)} | {vs_noise} |")
    if not has_para:
        lines += ["", "No paraphrase column: advlab.data.paraphrase (WordNet) was not available to these runs."]
    return "\n".join(lines)


def _records_data_line(records: Sequence[Mapping[str, Any]]) -> str:
    """The data line from the records alone: the data set, its classes and split sizes."""
    if not records:
        return ""
    name, data = records[0].get("dataset", ""), records[0].get("data") or {}
    classes, sizes = data.get("classes"), data.get("sizes")
    if not classes or not sizes or len(sizes) != 3:
        return name
    return (f"{name}: {len(classes)} classes ({', '.join(classes)}), train {sizes[0]} / val {sizes[1]} / "
            f"test {sizes[2]} distinct captions")


def results_markdown(records: Sequence[Mapping[str, Any]], *, wall_seconds: float | None = None,
                     data_summary: str = "") -> str:
    """The `results.md` of an output folder: what ran, the tables, the per-run lines.

    Args:
        records: Run records.
        wall_seconds: Wall time of the invocation (None: not stated).
        data_summary: The data line.

    Returns:
        Markdown.
    """
    seeds = sorted({r["seed"] for r in records})
    cfg = records[0]["config"] if records else {}
    head = [
        "# Caption → category classification: results", "",
        f"Data: {data_summary or _records_data_line(records)}", "",
        (f"Seeds {seeds}; {cfg.get('epochs')} epochs, batch {cfg.get('batch_size')}, lr {cfg.get('lr')}; robust "
        f"accuracy: PGD with {cfg.get('attack_steps')} steps on the word embeddings, L2 radius ε a fraction of "
        "each caption's clean norm. Numbers in points (%), mean ± std over seeds, at the last epoch."), "",
    ]
    if wall_seconds is not None:
        head += [f"Wall time of this invocation: {wall_seconds / 60:.1f} min.", ""]
    per_run = ["", "## Runs", "", "| arm | seed | val acc | test acc | macro-F1 | seconds |", "|---|---|---|---|---|---|"]
    for r in records:
        per_run.append(f"| {ARM_LABELS.get(r['arm'], r['arm'])} | {r['seed']} | {100 * r['val']['acc']:.1f} | "
                       f"{100 * r['test']['acc']:.1f} | {100 * r['test']['f1']:.1f} | {r.get('seconds', 0):.0f} |")
    return "\n".join(head) + summarize(records) + "\n" + "\n".join(per_run) + "\n"


def tuning_table(result: Mapping[str, Any]) -> str:
    """The tuning grid as Markdown: validation accuracy (points) per arm and size, the chosen size marked.

    Args:
        result: What `tune` returned.

    Returns:
        The table.
    """
    base = result["baseline"]
    lines = [(f"Baseline validation accuracy {100 * base['mean']:.1f} ± {100 * base['std']:.1f} "
             f"({len(base['val_acc'])} seeds)."), "", "| arm | size | val acc | chosen |", "|---|---|---|---|"]
    for p in result["points"]:
        mark = "✓" if result["sizes"].get(p["arm"]) == p["size"] else ""
        lines.append(f"| {ARM_LABELS[p['arm']]} | {p['size']:g} | {100 * p['mean']:.1f} ± {100 * p['std']:.1f} | "
                     f"{mark} |")
    for arm, added in result.get("extended", {}).items():
        lines.append(f"\n{ARM_LABELS[arm]}: best at the grid's edge, grid extended by {', '.join(f'{x:g}' for x in added)}.")
    for arm in result.get("edge", []):
        lines.append(f"\n{ARM_LABELS[arm]}: still best at the grid's edge after the extensions; its optimum may lie "
                     "further out.")
    return "\n".join(lines)


def _figure() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise AdvlabError("matplotlib is not installed: pip install 'advlab[plot]'") from None
    return plt


def draw_accuracy(records: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Test accuracy per arm, one dot per seed and the mean as a bar.

    Args:
        records: Run records.
        path: The PNG file.

    Returns:
        The path.
    """
    plt = _figure()
    arms = _arms(records)
    fig, ax = plt.subplots(figsize=(7, 3.5), constrained_layout=True)
    for i, arm in enumerate(arms):
        vals = [100 * r["test"]["acc"] for r in records if r["arm"] == arm]
        ax.bar(i, statistics.fmean(vals), color="#cfd8e3", width=0.6, label="mean" if i == 0 else None)
        ax.scatter([i] * len(vals), vals, color="#1f4e79", s=18, zorder=3, label="one seed" if i == 0 else None)
    ax.set_xticks(range(len(arms)), [ARM_LABELS[a] for a in arms], rotation=30, ha="right")
    ax.set_ylabel("test accuracy (%)")
    low = min(100 * r["test"]["acc"] for r in records)
    ax.set_ylim(max(0.0, low - 10), min(100.0, max(100 * r["test"]["acc"] for r in records) + 5))
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return Path(path)


def draw_robust(records: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Robust test accuracy against the attack radius, one line per arm (mean over seeds; radius 0 = clean).

    Args:
        records: Run records.
        path: The PNG file.

    Returns:
        The path.
    """
    plt = _figure()
    radii = _radii(records)
    fig, ax = plt.subplots(figsize=(7, 3.5), constrained_layout=True)
    for arm in _arms(records):
        rows = [r for r in records if r["arm"] == arm]
        xs = [0.0, *[float(x) for x in radii]]
        ys = [statistics.fmean(100 * r["test"]["acc"] for r in rows)]
        ys += [statistics.fmean(100 * r["robust"][x] for r in rows) for x in radii]
        ax.plot(xs, ys, marker="o", label=ARM_LABELS[arm])
    ax.set_xlabel("attack radius ε (fraction of the caption's embedding norm)")
    ax.set_ylabel("test accuracy under attack (%)")
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return Path(path)


def draw_tuning(result: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Validation accuracy against the size, one panel per tuned arm; the baseline as a band.

    Log x axis in the arm's relative unit; dots are seeds, the line joins the means, the dotted
    line is the chosen size and the dashed one the method's published setting converted
    (`config.PUBLISHED`, where there is one).

    Args:
        result: What `runs.tune` returned.
        path: The PNG file.

    Returns:
        The path.
    """
    from advlab.experiments.classification.config import ARM_UNITS, MINILM_ELEM_RMS, MINILM_ROW_NORM, PUBLISHED

    plt = _figure()
    from matplotlib.ticker import NullFormatter

    arms = list(dict.fromkeys(p["arm"] for p in result["points"]))
    if not arms:
        raise AdvlabError("Expected at least one tuned arm in the result, but its points are empty.")
    cols = min(4, len(arms))
    rows = -(-len(arms) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), constrained_layout=True, squeeze=False)
    base = result["baseline"]
    m, s = 100 * base["mean"], 100 * base["std"]
    for ax, arm in zip(axes.flat, arms):
        pts = sorted((p for p in result["points"] if p["arm"] == arm), key=lambda p: p["size"])
        ax.axhspan(m - s, m + s, color="#888888", alpha=0.2)
        ax.axhline(m, color="#555555", linestyle="--", linewidth=1, label="baseline")
        for p in pts:
            ax.scatter([p["size"]] * len(p["val_acc"]), [100 * v for v in p["val_acc"]], s=12, color="#1f4e79",
                       alpha=0.5)
        ax.plot([p["size"] for p in pts], [100 * p["mean"] for p in pts], color="#1f4e79", marker="o", linewidth=1.5)
        if arm in result["sizes"]:
            ax.axvline(result["sizes"][arm], color="black", linestyle=":", linewidth=1, label="chosen")
        if arm in PUBLISHED:
            unit = ARM_UNITS[arm]
            scale = MINILM_ELEM_RMS if unit == "elem" else MINILM_ROW_NORM
            ax.axvline(PUBLISHED[arm][0] / scale, color="#c00000", linestyle="--", linewidth=1, label="published")
        ax.set_xscale("log")
        sizes = [p["size"] for p in pts]
        ax.set_xlim(min(sizes) / 2, max(sizes) * 2)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{ARM_LABELS[arm]} ({ARM_UNITS[arm]})", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(arms):]:
        ax.set_visible(False)
    axes.flat[0].set_ylabel("validation accuracy (%)", fontsize=8)
    axes.flat[0].legend(fontsize=6, loc="lower left")
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return Path(path)
