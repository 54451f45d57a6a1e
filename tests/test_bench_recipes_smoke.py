"""benchmarks/bench_recipes.py runs and prints one finite table (no timing targets here)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_recipes_quick_prints_one_finite_table():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_recipes.py"), "--quick", "--repeats", "1"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| tiny")]
    assert len(rows) == 12 and proc.stdout.count("| model |") == 1
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        numbers = [float(x) for cell in cells[2:] for x in cell.replace("(", " ").replace(")", " ").split()]
        assert all(math.isfinite(x) and x > 0 for x in numbers), line
        saved = numbers[-1]
        # NEFTune keeps one graph like plain; R3F, TRADES, VAT and SMART keep the clean and the perturbed graph
        if "NEFTune" in line or "| plain |" in line:
            assert saved < 1.05, line
        if "R3F" in line or "TRADES" in line or "VAT" in line:
            assert 1.9 < saved < 2.1, line
