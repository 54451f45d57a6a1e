"""benchmarks/bench_attack.py --quick runs and prints two tables of finite numbers (no timing targets)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _numbers(line: str) -> list[float]:
    out = []
    for cell in line.strip("|").split("|")[2:]:
        for part in cell.replace("(", " ").replace(")", " ").replace("/", " ").replace("%", " ").split():
            out.append(float(part))
    return out


def test_bench_attack_quick():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_attack.py"), "--quick"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    cost = [line for line in proc.stdout.splitlines() if line.startswith("| tiny")]
    assert len(cost) == 1
    values = _numbers(cost[0])
    assert len(values) == 12 and all(math.isfinite(v) and v > 0 for v in values)
    saved_train, saved_attack = values[-3], values[-2]
    assert saved_attack < saved_train  # no weight-gradient graph: fewer saved activations
    strength = [line for line in proc.stdout.splitlines() if line.startswith("| 5 |")]
    assert len(strength) == 1
    pgd_loss, apgd_loss = _numbers(strength[0])[2], _numbers(strength[0])[4]
    assert apgd_loss >= pgd_loss >= 0
