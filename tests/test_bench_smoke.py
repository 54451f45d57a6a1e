"""`benchmarks/bench_villa.py --quick` runs and prints its table (no timing targets here)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_prints_one_finite_table():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_villa.py"), "--quick"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("| tiny")]
    assert len(lines) == 6  # 2 modes x K = 1, 2, 3
    assert proc.stdout.count("| model |") == 1  # one table
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        numbers = []
        for cell in cells[3:]:
            for part in cell.replace("(", " ").replace(")", " ").split():
                numbers.append(float(part))
        assert all(math.isfinite(x) and x > 0 for x in numbers[:-1]), line
        grad_diff = numbers[-1]
        assert grad_diff < 1e-4, line  # advlab, official and hand-written loops agree
        mem_default, mem_lean, mem_official = numbers[-4:-1]
        # saved bytes are deterministic: lean <= default <= official structure (+ rounding)
        assert mem_lean <= mem_default + 0.01 and mem_default <= mem_official + 0.02, line
