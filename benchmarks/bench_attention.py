"""Side-by-side cost of UNITER's two attention paths: `attn_implementation="sdpa"` against `"eager"`.

One training step (forward + backward of the VQA loss) of UniterForVQA at the UNITER-base shape (hidden 768,
12 layers, 12 heads, FFN 3072) with batch 8, 60 text tokens and 36 regions (96 positions; text rows padded to
different lengths, so the attention mask is not all ones). Both models hold the same weights and see the same
batch. Each repeat times every (dropout, path) pair once, in turn, and the table reports medians of the
process's CPU time (`time.process_time`, one thread: what other jobs on a shared machine disturb least) and of
wall time.

Memory is measured deterministically, as in `bench_villa.py`: the peak bytes of tensors saved for backward and
alive at once (`torch.autograd.graph.saved_tensors_hooks`), each storage counted once, parameters excluded.
Before timing, the script checks that the two paths agree (dropout off): max |SDPA - eager| of the loss, the
logits and every parameter gradient is printed.

Usage:
    python benchmarks/bench_attention.py             # UNITER-base shape, 7 repeats
    python benchmarks/bench_attention.py --quick     # smoke run: a 2-layer, 128-wide model, 2 repeats
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_villa import SavedBytes

from advlab.backbones.uniter import UniterConfig, UniterForVQA, vqa_loss

PATHS = ("sdpa", "eager")
ANSWERS = 3129


# ---------------------------------------------------------------------------------- models and batch
def make_config(quick: bool, path: str, dropout: float) -> UniterConfig:
    drop = {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    if quick:
        return UniterConfig.tiny(
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=512,
            img_dim=2048,
            vocab_size=28996,
            attn_implementation=path,
            **drop,
        )
    return UniterConfig.base(attn_implementation=path, **drop)


def make_batch(cfg: UniterConfig, batch: int, tokens: int, regions: int) -> dict:
    """Text rows of 60 down to 30 real tokens (padded to 60), 36 regions each, UNITER's gather_index layout."""
    gen = torch.Generator().manual_seed(0)
    txt_lens = [tokens - (i * (tokens // 2)) // max(batch - 1, 1) for i in range(batch)]
    out = tokens + regions
    inputs = {
        "input_ids": torch.zeros(batch, tokens, dtype=torch.long),
        "img_feat": torch.randn(batch, regions, cfg.img_dim, generator=gen),
        "img_pos_feat": torch.rand(batch, regions, 7, generator=gen),
        "attention_mask": torch.zeros(batch, out),
        "gather_index": torch.arange(out).repeat(batch, 1),
    }
    for i, t in enumerate(txt_lens):
        inputs["input_ids"][i, :t] = torch.randint(1, cfg.vocab_size, (t,), generator=gen)
        inputs["gather_index"][i, t : t + regions] = torch.arange(tokens, tokens + regions)
        inputs["attention_mask"][i, : t + regions] = 1
    targets = (torch.rand(batch, ANSWERS, generator=gen) < 2.0 / ANSWERS).float()
    return {"inputs": inputs, "targets": targets}


def step(model, batch) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    out = model(**batch["inputs"])
    loss = vqa_loss(out.logits, batch["targets"])
    loss.backward()
    return loss.detach()


def agreement(models, batch) -> dict[str, float]:
    """max |SDPA - eager| of the loss, the logits and the parameter gradients, dropout off (eval mode)."""
    got = {}
    for path, model in models.items():
        model.eval()
        model.zero_grad(set_to_none=True)
        out = model(**batch["inputs"])
        loss = vqa_loss(out.logits, batch["targets"])
        loss.backward()
        got[path] = (
            loss.detach(),
            out.logits.detach(),
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        )
        model.train()
    (ls, zs, gs), (le, ze, ge) = got["sdpa"], got["eager"]
    return {
        "loss": (ls - le).abs().item(),
        "logits": (zs - ze).abs().max().item(),
        "gradients": max((gs[n] - ge[n]).abs().max().item() for n in gs),
        "largest gradient": max(g.abs().max().item() for g in ge.values()),
    }


# ---------------------------------------------------------------------------------- the run
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 repeats (smoke test)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 7, or 2 with --quick)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (default 1: on a shared 2-core machine 2 threads oversubscribe)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 7)
    batch_size, tokens, regions = (2, 12, 6) if args.quick else (8, 60, 36)
    print(
        f"torch {torch.__version__}, {platform.machine()} {platform.processor() or ''}, "
        f"{torch.get_num_threads()} threads ({os.cpu_count()} CPUs visible), python {platform.python_version()}"
    )

    dropouts = (0.1, 0.0)  # the configs' default (training) and none
    models = {}
    for dropout in dropouts:
        torch.manual_seed(0)
        reference = UniterForVQA(make_config(args.quick, "sdpa", dropout), num_answers=ANSWERS)
        for path in PATHS:
            model = UniterForVQA(make_config(args.quick, path, dropout), num_answers=ANSWERS)
            model.load_state_dict(reference.state_dict())
            models[dropout, path] = model.train()
    cfg = models[dropouts[0], "sdpa"].config
    batch = make_batch(cfg, batch_size, tokens, regions)
    print(
        f"UNITER h={cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads; batch "
        f"{batch_size}, {tokens} tokens + {regions} regions; VQA head ({ANSWERS} answers); fwd + bwd per step"
    )

    diff = agreement({p: models[0.0, p] for p in PATHS}, batch)
    print("max |SDPA - eager| (float32, dropout off): " + ", ".join(f"{k} {v:.2e}" for k, v in diff.items()))

    saved = {key: SavedBytes(m).measure(lambda m=m: step(m, batch)) for key, m in models.items()}
    for model in models.values():  # warm-up
        step(model, batch)
    wall: dict[tuple, list[float]] = {key: [] for key in models}
    cpu: dict[tuple, list[float]] = {key: [] for key in models}
    for _ in range(repeats):
        for key, model in models.items():  # interleaved: sdpa, eager, sdpa, eager, ...
            w0, c0 = time.perf_counter(), time.process_time()
            step(model, batch)
            cpu[key].append(time.process_time() - c0)
            wall[key].append(time.perf_counter() - w0)

    print()
    print(
        "| attention dropout | path | CPU time (s) | CPU time / eager | wall (s) | wall / eager "
        "| saved for backward (MiB) | memory / eager |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for dropout in dropouts:
        eager_c, eager_w = statistics.median(cpu[dropout, "eager"]), statistics.median(wall[dropout, "eager"])
        for path in PATHS:
            c, w = statistics.median(cpu[dropout, path]), statistics.median(wall[dropout, path])
            print(
                f"| {dropout} | {path} | {c:.3f} | {c / eager_c:.2f} | {w:.3f} | {w / eager_w:.2f} "
                f"| {saved[dropout, path] / 2**20:.1f} | {saved[dropout, path] / saved[dropout, 'eager']:.2f} |"
            )
    print(
        f"\nMedians of {repeats} interleaved repeats (after one warm-up step each). CPU time is this process's "
        "(time.process_time), less disturbed than wall time by other jobs on a shared machine."
    )


if __name__ == "__main__":
    main()
