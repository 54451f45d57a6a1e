"""The ```python blocks of docs/robustness.md run, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

import torch

PAGE = Path(__file__).resolve().parents[1] / "docs" / "robustness.md"


def test_robustness_page_code_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), re.DOTALL)
    assert len(blocks) >= 5
    namespace: dict = {}
    torch.manual_seed(0)
    for i, code in enumerate(blocks):
        exec(compile(code, f"robustness.md block {i}", "exec"), namespace)  # noqa: S102
    assert "| TinyVL | joint | 0 |" in capsys.readouterr().out
