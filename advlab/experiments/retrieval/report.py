"""Reports of the retrieval experiment: tables, paired differences and plots."""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from advlab.experiments.retrieval.config import ARM_LABELS, ARMS_FULL


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values) if values else float("nan")
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def _paired(records: Sequence[Mapping[str, Any]], backbone: str, arm: str, ref: str) -> list[float]:
    by = {(r["arm"], r["seed"]): r["test"]["r1"] for r in records if r["backbone"] == backbone}
    return [by[(arm, s)] - by[(ref, s)] for (a, s) in sorted(by) if a == arm and (ref, s) in by]


def summarize(records: Sequence[Mapping[str, Any]]) -> str:
    """A plain-text table: mean ± std per arm (test IR / TR R@1/5/10) and paired differences.

    Args:
        records: Run records from `run_experiment`.

    Returns:
        The table and the paired-difference lines ("no clear effect" when mean ± std covers 0).

    Examples:
        >>> rec = lambda arm, s, v: {"backbone": "uniter", "arm": arm, "seed": s, "val": {"r1": v},
        ...     "test": {k: v for k in ("ir_r1", "ir_r5", "ir_r10", "tr_r1", "tr_r5", "tr_r10", "r1")}}
        >>> print(summarize([rec("baseline", 0, 0.1), rec("villa", 0, 0.2)]).splitlines()[-1])
        uniter VILLA joint - baseline: R@1 +0.100 (1 seeds: +0.100); single seed, no spread
    """
    cols = ("ir_r1", "ir_r5", "ir_r10", "tr_r1", "tr_r5", "tr_r10")
    lines = []
    head = f"{'backbone':8} {'arm':17} {'seeds':>5} | " + " | ".join(
        f"{c.upper().replace('_R', ' R@'):>13}" for c in cols
    )
    lines += [head, "-" * len(head)]
    backbones = list(dict.fromkeys(r["backbone"] for r in records))
    for backbone in backbones:
        arms = [a for a in ARMS_FULL if any(r["arm"] == a and r["backbone"] == backbone for r in records)]
        for arm in arms:
            rs = [r for r in records if r["backbone"] == backbone and r["arm"] == arm]
            cells = []
            for c in cols:
                m, s = _mean_std([100 * r["test"][c] for r in rs])
                cells.append(f"{m:6.1f} ± {s:4.1f}")
            lines.append(f"{backbone:8} {ARM_LABELS[arm]:17} {len(rs):>5} | " + " | ".join(cells))
    lines.append("")
    for backbone in backbones:
        for arm in [a for a in ARMS_FULL if a not in ("baseline", "noise")]:
            for ref in ("baseline", "noise"):
                diffs = _paired(records, backbone, arm, ref)
                if not diffs:
                    continue
                m, s = _mean_std(diffs)
                if len(diffs) < 2:
                    verdict = "single seed, no spread"
                elif abs(m) <= s:
                    verdict = "no clear effect (the spread covers the difference)"
                else:
                    verdict = "clear at ±1 std" + (" (helps)" if m > 0 else " (hurts)")
                per = ", ".join(f"{d:+.3f}" for d in diffs)
                lines.append(
                    f"{backbone} {ARM_LABELS[arm]} - {ARM_LABELS[ref]}: R@1 {m:+.3f}"
                    + (f" ± {s:.3f}" if len(diffs) > 1 else "")
                    + f" ({len(diffs)} seeds: {per}); {verdict}"
                )
    return "\n".join(lines)


def results_markdown(records: Sequence[Mapping[str, Any]], *, wall_seconds: float | None = None) -> str:
    """The paper-shaped Markdown table (IR R@1/5/10, TR R@1/5/10; mean ± std in %) and paired differences.

    Args:
        records: Run records.
        wall_seconds: Total wall time to state, if known.

    Returns:
        Markdown text.
    """
    cols = ("ir_r1", "ir_r5", "ir_r10", "tr_r1", "tr_r5", "tr_r10")
    md = [
        "| backbone | arm | seeds | IR R@1 | IR R@5 | IR R@10 | TR R@1 | TR R@5 | TR R@10 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    backbones = list(dict.fromkeys(r["backbone"] for r in records))
    for backbone in backbones:
        for arm in ARMS_FULL:
            rs = [r for r in records if r["backbone"] == backbone and r["arm"] == arm]
            if not rs:
                continue
            cells = [
                "{:.1f} ± {:.1f}".format(*_mean_std([100 * r["test"][c] for r in rs])) for c in cols
            ]
            md.append(f"| {backbone} | {ARM_LABELS[arm]} | {len(rs)} | " + " | ".join(cells) + " |")
    text = "\n".join(md)
    diffs = summarize(records).split("\n\n", 1)
    if len(diffs) > 1 and diffs[1].strip():
        text += "\n\nPaired per-seed differences of test R@1 (mean of IR and TR):\n\n" + "\n".join(
            f"- {line}" for line in diffs[1].strip().splitlines()
        )
    if wall_seconds is not None:
        text += f"\n\nTotal wall time: {wall_seconds / 60:.1f} min."
    return text + "\n"


def draw_plot(records: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """A PNG of test R@1 (mean of IR and TR) per arm, one dot per seed and a bar at the mean.

    Drawn with Pillow; one panel per backbone.

    Args:
        records: Run records.
        path: Output PNG.

    Returns:
        The path written.
    """
    from PIL import Image, ImageDraw, ImageFont

    backbones = list(dict.fromkeys(r["backbone"] for r in records)) or ["uniter"]
    arms = [a for a in ARMS_FULL if any(r["arm"] == a for r in records)]
    values = [100 * r["test"]["r1"] for r in records] or [0.0]
    lo, hi = math.floor(min(values) - 1), math.ceil(max(values) + 1)
    pw, ph, ml, mt, mb = 110 * max(1, len(arms)) + 70, 320, 60, 40, 70
    img = Image.new("RGB", (pw * len(backbones), ph), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    colors = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]

    def y_of(v: float) -> float:
        return mt + (ph - mt - mb) * (1 - (v - lo) / max(1e-9, hi - lo))

    for p, backbone in enumerate(backbones):
        x0 = p * pw + ml
        draw.text((x0, 10), f"{backbone}-mini: test R@1 (mean of IR, TR), %", fill="black", font=font)
        draw.line([(x0, mt), (x0, ph - mb), (p * pw + pw - 10, ph - mb)], fill="black")
        for t in range(6):
            v = lo + (hi - lo) * t / 5
            draw.line([(x0 - 4, y_of(v)), (x0, y_of(v))], fill="black")
            draw.text((x0 - 45, y_of(v) - 6), f"{v:5.1f}", fill="black", font=font)
        for a, arm in enumerate(arms):
            cx = x0 + 55 + 110 * a
            rs = [100 * r["test"]["r1"] for r in records if r["backbone"] == backbone and r["arm"] == arm]
            label = ARM_LABELS[arm].replace("VILLA ", "VILLA\n")
            draw.multiline_text((cx - 35, ph - mb + 8), label, fill="black", font=font)
            if not rs:
                continue
            m = statistics.fmean(rs)
            draw.line([(cx - 30, y_of(m)), (cx + 30, y_of(m))], fill=colors[a % 6], width=3)
            for i, v in enumerate(rs):
                dx = (i - (len(rs) - 1) / 2) * 8
                draw.ellipse([cx + dx - 4, y_of(v) - 4, cx + dx + 4, y_of(v) + 4], outline=colors[a % 6], width=2)
            draw.text((cx - 30, ph - mb + 40), f"n={len(rs)}", fill="gray", font=font)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out
