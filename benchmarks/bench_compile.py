"""Side-by-side time of a compiled and an eager VILLA step (K = 3, joint) on CPU.

The compiled model is prepared with `advlab.compiled.prepare_for_compile` and compiled with
`torch.compile` (inductor); the eager model is an identical copy trained through advlab's
ordinary hooks. Both run in one process, with interleaved repeats (each repeat times every
method once, alternating the order), and the table reports medians. Compilation is timed
separately: the first compiled VILLA step (it compiles the clean and the perturbed graph and
their backward graphs), then a plain compiled step. Printed as well: the largest parameter
gradient difference between the compiled and the eager VILLA step, and how many graphs were
compiled during the timed repeats (the recompilations after warm-up; 0 expected).

The shape is the UNITER-small shape of `bench_villa.py` (hidden 256, 4 layers, batch 16,
20 tokens + 16 regions, 3129 answers, no dropout).

Usage:
    python benchmarks/bench_compile.py            # UNITER-small, 10 repeats
    python benchmarks/bench_compile.py --quick    # smoke run: tiny UNITER, 2 repeats
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_villa import grads, make_batch, make_villa, max_diff, plain_step, setups

from advlab.backbones.uniter import UniterForVQA, vqa_loss
from advlab.compiled import prepare_for_compile

K = 3
MODE = "joint"


def villa_step(villa, model, call, inputs, targets) -> None:
    model.zero_grad(set_to_none=True)
    villa.step(lambda: call(**inputs), lambda out: vqa_loss(out, targets))


def run(quick: bool, repeats: int) -> dict:
    import torch._dynamo
    from torch._dynamo.utils import counters

    s = setups(quick)[0] if quick else setups(False)[1]
    torch.manual_seed(0)
    eager = UniterForVQA(s.config, num_answers=s.answers).train()
    model = prepare_for_compile(copy.deepcopy(eager))
    compiled = torch.compile(model)
    inputs, targets = make_batch(s)
    villa_eager = make_villa(eager, K=K, mode=MODE)
    villa_compiled = make_villa(compiled, K=K, mode=MODE)

    torch._dynamo.reset()
    counters.clear()
    t0 = time.perf_counter()
    villa_step(villa_compiled, model, compiled, inputs, targets)  # compiles the clean and the perturbed graphs
    compile_villa = time.perf_counter() - t0
    t0 = time.perf_counter()
    _plain(model, compiled, inputs, targets)  # the clean graph is shared: nothing new to compile
    compile_plain = time.perf_counter() - t0
    villa_step(villa_eager, eager, eager, inputs, targets)
    ref = grads(eager)
    villa_step(villa_compiled, model, compiled, inputs, targets)
    diff = max_diff(grads(model), ref)
    graphs_warm = counters["stats"]["unique_graphs"]
    breaks = sum(counters["graph_break"].values())

    methods = {
        "villa eager": lambda: villa_step(villa_eager, eager, eager, inputs, targets),
        "villa compiled": lambda: villa_step(villa_compiled, model, compiled, inputs, targets),
        "plain eager": lambda: plain_step(eager, inputs, targets),
        "plain compiled": lambda: _plain(model, compiled, inputs, targets),
    }
    for fn in methods.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in methods}
    keys = list(methods)
    for r in range(repeats):
        for key in keys if r % 2 == 0 else keys[::-1]:
            t0 = time.perf_counter()
            methods[key]()
            times[key].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "setup": s, "med": med, "compile_villa": compile_villa, "compile_plain": compile_plain, "diff": diff,
        "recompiles": counters["stats"]["unique_graphs"] - graphs_warm, "graphs": graphs_warm, "breaks": breaks,
    }


def _plain(model, call, inputs, targets) -> None:
    model.zero_grad(set_to_none=True)
    vqa_loss(call(**inputs).logits, targets).backward()


def report(res: dict, repeats: int) -> str:
    med, s = res["med"], res["setup"]
    lines = [
        f"model: {s.name}, batch {s.batch}, {s.tokens} tokens + {s.regions} regions, VILLA K = {K}, {MODE}",
        "",
        "| step | eager ms | compiled ms | eager / compiled |",
        "|---|---|---|---|",
    ]
    for what in ("villa", "plain"):
        e, c = med[f"{what} eager"], med[f"{what} compiled"]
        lines.append(f"| {what} | {e * 1e3:.1f} | {c * 1e3:.1f} | {e / c:.2f} |")
    ratio = med["villa eager"] / med["villa compiled"]
    lines += [
        "",
        f"compiled / eager VILLA step time: {1 / ratio:.3f} (speed-up {ratio:.2f}x)",
        (f"VILLA compiled / plain compiled: {med['villa compiled'] / med['plain compiled']:.2f}; "
         f"VILLA eager / plain eager: {med['villa eager'] / med['plain eager']:.2f}"),
        (f"compilation: first compiled VILLA step {res['compile_villa']:.1f} s, then first plain step "
         f"{res['compile_plain']:.1f} s; {res['graphs']} graphs, {res['breaks']} graph breaks"),
        f"max abs parameter-gradient difference, compiled vs eager VILLA step: {res['diff']:.1e}",
        f"recompilations after warm-up: {res['recompiles']}",
        f"medians of {repeats} interleaved repeats",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny UNITER, 2 repeats")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 10, 2 with --quick)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 10)
    print(f"torch {torch.__version__}, {platform.machine()} {platform.processor() or ''}, "
          f"{torch.get_num_threads()} threads, python {platform.python_version()}")
    t0 = time.perf_counter()
    print(report(run(args.quick, repeats), repeats))
    print(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
