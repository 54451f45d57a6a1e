"""VILLA on a GPU: base-size UNITER (VQA head), float32 and bfloat16 autocast, side by side.

One run, interleaved repeats, medians. For each precision it times a plain step, advlab's VILLA
step (default `deferred` schedule, and `lean`), the official retained-graph loop written out by
hand, and a hand-written loop of advlab's deferred math; peak CUDA memory of each step is read
with `torch.cuda.max_memory_allocated()` above what the model and its inputs hold. Before
timing it checks, in float32 with TF32 off, that advlab's gradients equal the official loop's,
and under float16 autocast with a `GradScaler` that the step is finite and its gradient points
where the float32 one does.

Usage (on a CUDA machine):
    python benchmarks/bench_gpu.py                 # base UNITER, batch 32, K = 1, 2, 3
    python benchmarks/bench_gpu.py --size large --batch 16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import advlab  # noqa: E402
from advlab.backbones.uniter import UniterConfig, UniterForVQA, vqa_loss  # noqa: E402
from benchmarks.bench_villa import (  # noqa: E402
    Setup,
    advlab_step,
    grads,
    hand_deferred_step,
    make_batch,
    make_villa,
    official_step,
    plain_step,
)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def _sync_time(fn, autocast_dtype) -> float:
    ctx = torch.autocast("cuda", dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with ctx:
        fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def _peak_bytes(model, fn, autocast_dtype) -> int:
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    _sync_time(fn, autocast_dtype)
    return torch.cuda.max_memory_allocated() - before


def _cosine(a: dict, b: dict) -> float:
    x = torch.cat([a[n].flatten().double() for n in a])
    y = torch.cat([b[n].flatten().double() for n in a])
    return float(x @ y / (x.norm() * y.norm()))


def check_exactness(model, inputs, targets, ks, modes) -> list[str]:
    """float32, TF32 off: advlab == official loop; fp16 + GradScaler: finite, aligned with fp32."""
    lines = []
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        for mode in modes:
            K = max(ks)
            official_step(model, inputs, targets, K=K, mode=mode)
            ref = grads(model)
            advlab_step(make_villa(model, K=K, mode=mode), model, inputs, targets)
            got = grads(model)
            diff = max((got[n] - ref[n]).abs().max().item() for n in ref)
            scale = max(ref[n].abs().max().item() for n in ref)
            lines.append(f"exactness fp32 (TF32 off) {mode} K={K}: max |advlab - official| grad {diff:.2e} "
                         f"(largest grad {scale:.2e})")
            # GradScaler starts at 2**16 and backs off on overflow: step (lr 0, parameters unchanged)
            # until a step is finite, as a training loop would
            scaler = torch.amp.GradScaler("cuda")
            villa = make_villa(model, K=K, mode=mode)
            frozen = torch.optim.SGD(model.parameters(), lr=0.0)
            for attempt in range(1, 17):
                model.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.float16):
                    stats = villa.step(lambda: model(**inputs), lambda out: vqa_loss(out, targets), scaler=scaler)
                scale_used = float(scaler.get_scale())
                fp16 = {n: g / scale_used for n, g in grads(model).items()}
                finite = all(bool(torch.isfinite(g).all()) for g in fp16.values())
                if stats.skipped_steps:  # gradients were left as before the step; advlab lowered the scale
                    continue
                scaler.step(frozen)
                scaler.update()
                if finite:
                    break
            lines.append(f"fp16 autocast + GradScaler {mode} K={K}: finite {finite} at attempt {attempt} (scale "
                         f"{scale_used:g}), skipped ascent steps {stats.skipped_steps}, "
                         f"cosine(grad fp16, grad fp32) {_cosine(fp16, ref):.5f}")
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                advlab_step(make_villa(model, K=K, mode=mode), model, inputs, targets)
            lines.append(f"bf16 autocast {mode} K={K}: cosine(grad bf16, grad fp32) {_cosine(grads(model), ref):.5f}")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    return lines


def run(size: str, batch: int, repeats: int, ks: list[int], modes: list[str]) -> list[str]:
    config = (UniterConfig.base if size == "base" else UniterConfig.large)(
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    setup = Setup(f"UNITER-{size}", config, answers=3129, batch=batch, tokens=20, regions=36)
    torch.manual_seed(0)
    model = UniterForVQA(setup.config, num_answers=setup.answers).cuda().train()
    inputs, targets = make_batch(setup)
    inputs = {k: v.cuda() for k, v in inputs.items()}
    targets = targets.cuda()
    out = [f"{setup.name}: batch {batch}, {setup.tokens} tokens, {setup.regions} regions of {config.img_dim}-d, "
           f"{sum(p.numel() for p in model.parameters()):,} parameters"]
    out += check_exactness(model, inputs, targets, ks, modes)

    methods = {"plain": lambda: plain_step(model, inputs, targets)}
    for mode in modes:
        for K in ks:
            v, lean = make_villa(model, K=K, mode=mode), make_villa(model, K=K, mode=mode, schedule="lean")
            methods[("advlab", mode, K)] = lambda v=v: advlab_step(v, model, inputs, targets)
            methods[("lean", mode, K)] = lambda v=lean: advlab_step(v, model, inputs, targets)
            methods[("official", mode, K)] = lambda m=mode, k=K: official_step(model, inputs, targets, K=k, mode=m)
            methods[("hand", mode, K)] = lambda m=mode, k=K: hand_deferred_step(model, inputs, targets, K=k, mode=m)
    for prec, dtype in PRECISIONS.items():
        for fn in methods.values():  # warm-up (kernels, allocator)
            _sync_time(fn, dtype)
        times: dict = {key: [] for key in methods}
        keys = list(methods)
        for r in range(repeats):
            for key in keys if r % 2 == 0 else keys[::-1]:
                times[key].append(_sync_time(methods[key], dtype))
        med = {key: statistics.median(v) for key, v in times.items()}
        mem = {key: _peak_bytes(model, fn, dtype) for key, fn in methods.items()}
        out.append("")
        out.append(f"### {prec}{' autocast' if dtype is not None else ' (TF32 matmuls as PyTorch defaults)'}: "
                   f"plain step {med['plain'] * 1e3:.1f} ms, {batch / med['plain']:.0f} examples/s, "
                   f"peak {mem['plain'] / 2**30:.2f} GiB")
        out.append("")
        out.append("| mode | K | advlab ms | advlab/plain | official/plain | advlab/official | advlab/hand "
                   "| lean/plain | mem advlab/plain | mem lean/plain | mem official/plain |")
        out.append("|" + "---|" * 11)
        for mode in modes:
            for K in ks:
                a, lo, o, h = (("advlab", mode, K), ("lean", mode, K), ("official", mode, K), ("hand", mode, K))
                out.append(
                    f"| {mode} | {K} | {med[a] * 1e3:.1f} | {med[a] / med['plain']:.2f} | {med[o] / med['plain']:.2f} "
                    f"| {med[a] / med[o]:.3f} | {med[a] / med[h]:.3f} | {med[lo] / med['plain']:.2f} "
                    f"| {mem[a] / mem['plain']:.2f} | {mem[lo] / mem['plain']:.2f} | {mem[o] / mem['plain']:.2f} |"
                )
    out.append("")
    out.append(f"Medians of {repeats} interleaved repeats; memory = peak allocated during the step above the "
               "model, its optimizer-free state and the batch.")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("base", "large"), default="base")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--k", default="1,2,3")
    ap.add_argument("--modes", default="joint,alter")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("Expected a CUDA device for bench_gpu.py, but torch.cuda.is_available() is False; "
                         "use benchmarks/bench_villa.py on CPU.")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, advlab {advlab.__version__}")
    t0 = time.perf_counter()
    for line in run(args.size, args.batch, args.repeats, [int(k) for k in args.k.split(",")], args.modes.split(",")):
        print(line, flush=True)
    print(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
