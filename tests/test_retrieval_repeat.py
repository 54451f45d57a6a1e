"""Every retrieval run repeats to the last bit: two fresh processes, different hash seeds, same records and weights.

A set iterated in hash order, an unseeded draw or a dict keyed by object id would make the two
processes differ (the noise arm once drew its directions in a set's order); the records are
compared whole (only the wall-clock `seconds` may differ) and the weights bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from advlab.experiments import retrieval as R

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch

    torch.set_num_threads(1)
    from advlab.experiments import retrieval as R
    from tests.test_retrieval import TINY, make_data, make_folder, tiny_config

    out = Path(sys.argv[1])
    (out / "captions").mkdir(parents=True)
    data = make_data(make_folder(out / "captions"))
    configs = {b: tiny_config(itm_weight=1.0, epochs=2) for b in ("uniter", "lxmert")}
    R.run_experiment(data, backbones=("uniter", "lxmert"), arms=R.ARMS_FULL, seeds=(0, 1), configs=configs,
                     out_dir=out / "runs", text_size=TINY, progress=False, log=lambda s: None, save_weights=True,
                     gate_factor=0.0)
    """
)


def _run(out: Path, hash_seed: str) -> Path:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", SCRIPT, str(out)], cwd=ROOT, env=env, check=True, timeout=600)
    return out / "runs"


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.slow
def test_two_processes_with_different_hash_seeds_give_identical_records_and_weights(tmp_path: Path) -> None:
    a, b = _run(tmp_path / "a", "1"), _run(tmp_path / "b", "4242")
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    records = [n for n in names if n.endswith(".json")]
    weights = [n for n in names if n.endswith(".pt")]
    assert len(records) == len(weights) == 2 * 2 * len(R.ARMS_FULL)  # backbones x seeds x arms
    for name in records:
        ra, rb = json.loads((a / name).read_text()), json.loads((b / name).read_text())
        ra.pop("seconds"), rb.pop("seconds")
        assert ra == rb, name
    differ_between_arms = set()
    for name in weights:
        wa = torch.load(a / name, weights_only=True)
        wb = torch.load(b / name, weights_only=True)
        assert list(wa) == list(wb), name
        for key in wa:
            assert wa[key].dtype == wb[key].dtype and wa[key].shape == wb[key].shape, (name, key)
            assert _bits(wa[key]) == _bits(wb[key]), (name, key)
        differ_between_arms.add(_bits(wa["image_proj.weight"]))
    # the comparison can see a difference: the arms and seeds train different weights
    assert len(differ_between_arms) == len(weights)
