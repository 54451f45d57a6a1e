"""The non-finite rule under DistributedDataParallel (2 processes, gloo, CPU): a NaN on one rank only.

Both ranks must take the same decision (the flags are all-reduced), restore their gradients and
raise or skip together; nothing may hang. Without the all-reduce of the flags, a NaN loss whose
gradients are finite is seen by rank 0 only: rank 1 would keep its gradients and step while
rank 0 skips, and the replicas would drift apart.
"""

from __future__ import annotations

import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import advlab
from tests.tiny_models import TinyVL, tiny_batch

pytestmark = pytest.mark.slow

WORLD = 2
SITES = {"txt": "word", "img": advlab.Site("img_proj", where="input")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, outdir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results: dict = {}
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = TinyVL()
        ddp = DDP(model)
        ids, img, tm, im, y = tiny_batch(dtype=torch.float32, seed=rank)
        bad = float("nan") if rank == 0 else 0.0  # only rank 0 sees a NaN loss, at the last step
        for policy in ("skip", "raise"):
            ddp.zero_grad(set_to_none=True)
            villa = advlab.VILLA(ddp, sites=SITES, steps=2, on_nonfinite=policy)
            calls = []

            def task(out, calls=calls):
                calls.append(None)  # VILLA's official steps call the task loss once each: NaN at the last step
                # an additive constant: the loss is NaN but every gradient stays finite, so only the
                # all-reduced flags can tell rank 1 that rank 0 skipped
                return F.cross_entropy(out, y) + (bad if len(calls) == 2 else 0.0)

            try:
                stats = villa.step(lambda: ddp(ids, img, tm, im), task, masks={"txt": tm, "img": im})
                results[policy] = ("skipped", stats.skipped_steps)
            except advlab.NonFiniteError:
                results[policy] = ("raised", None)
            results[policy + "-grads-none"] = all(p.grad is None for p in model.parameters())
        # then a finite step still all-reduces normally on both ranks
        ddp.zero_grad(set_to_none=True)
        advlab.VILLA(ddp, sites=SITES, steps=2).step(lambda: ddp(ids, img, tm, im), lambda out: F.cross_entropy(out, y),
                                                     masks={"txt": tm, "img": im})
        results["after"] = {n: p.grad.clone() for n, p in model.named_parameters()}
    except Exception:  # noqa: BLE001
        results["error"] = traceback.format_exc()
    finally:
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("ddp_nonfinite"))
    mp.spawn(_worker, args=(_free_port(), outdir), nprocs=WORLD, join=True)
    out = [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    for r in out:
        assert "error" not in r, r.get("error")
    return out


def test_both_ranks_skip_and_restore(ranks):
    for r in ranks:
        assert r["skip"][0] == "skipped" and r["skip"][1] >= 1
        assert r["skip-grads-none"]


def test_both_ranks_raise_and_restore(ranks):
    for r in ranks:
        assert r["raise"] == ("raised", None)
        assert r["raise-grads-none"]


def test_training_goes_on_in_step_after_a_skip(ranks):
    for n, g in ranks[0]["after"].items():
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, ranks[1]["after"][n], rtol=0, atol=0)
