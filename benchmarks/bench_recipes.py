"""Side-by-side cost of one step of each recipe (R3F, NEFTune, TRADES, VAT/ALUM, FastAT, SMART, full
SMART, AWP) against a plain step, on one model in one run.

Every method is timed once per repeat, in turn (interleaved, direction alternating), and the
table reports medians. Memory is the peak bytes of tensors saved for backward, alive at once,
each storage counted once, parameters excluded (`bench_villa.SavedBytes`).

Cost model (forward = 1, backward = 2 units, a δ-only backward counted as a full one):
plain 3; NEFTune 3; R3F 2 forwards + 1 backward through both = 6; FastAT 1 + 2 + 1 + 2 = 6;
TRADES, VAT and SMART with K steps 1 + 3K + 1 + 4 = 6 + 3K; full SMART +1 (reference forward,
no graph); AWP +3 (its ascent forward and backward) on top of the recipe it wraps.

Usage:
    python benchmarks/bench_recipes.py             # tiny UNITER, 15 repeats
    python benchmarks/bench_recipes.py --quick     # smoke run, 2 repeats
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_villa import SavedBytes, make_batch, setups

import advlab
from advlab.backbones.uniter import UniterForVQA, vqa_loss


def recipes(model, inputs, targets) -> dict[str, tuple[object, float]]:
    """Name -> (zero-argument step, cost-model units)."""
    sites = model.perturbation_sites()
    forward = lambda: model(**inputs)
    task = lambda out: vqa_loss(out.logits, targets)
    g = torch.Generator().manual_seed(0)

    def run(recipe):
        def step():
            model.zero_grad(set_to_none=True)
            recipe.step(forward, task)

        return step

    def plain():
        model.zero_grad(set_to_none=True)
        task(forward()).backward()

    ema = advlab.ReferenceModel(model, decay=0.99)
    smart = advlab.SMART(model, sites, step_size=1e-3, noise_std=1e-5, generator=g)

    def full_smart():
        model.zero_grad(set_to_none=True)
        target = ema(forward).logits
        smart.step(forward, lambda out: task(out) + advlab.symmetric_kl(out.logits, target))

    awp = advlab.AWP(model, gamma=5e-3)
    fgsm = advlab.FastAT(model, sites, eps=1e-2, generator=g)

    def awp_fgsm():
        model.zero_grad(set_to_none=True)
        with awp.perturbed(lambda: task(forward())):
            fgsm.step(forward, task)

    return {
        "plain": (plain, 3),
        "NEFTune (txt)": (run(advlab.NEFTune(model, {"txt": sites["txt"]}, alpha=5.0, generator=g)), 3),
        "R3F": (run(advlab.R3F(model, sites, eps=1e-5, generator=g)), 6),
        "FastAT FGSM-RS": (run(fgsm), 6),
        "FastAT N-FGSM": (run(advlab.FastAT(model, sites, eps=1e-2, method="n_fgsm", generator=g)), 6),
        "TRADES K=1": (run(advlab.TRADES(model, sites, steps=1, step_size=1e-2, generator=g)), 9),
        "TRADES K=3": (run(advlab.TRADES(model, sites, steps=3, step_size=1e-2, generator=g)), 15),
        "VAT K=1": (run(advlab.VAT(model, sites, eps=1e-2, generator=g)), 9),
        "ALUM": (run(advlab.VAT.alum(model, sites, xi=1e-3)), 9),
        "SMART K=1": (run(smart), 9),
        "full SMART K=1": (full_smart, 10),
        "AWP + FGSM-RS": (awp_fgsm, 9),
    }


def run_all(quick: bool, repeats: int) -> list[dict]:
    s = setups(quick)[0]
    torch.manual_seed(0)
    model = UniterForVQA(s.config, num_answers=s.answers).train()
    inputs, targets = make_batch(s)
    methods = recipes(model, inputs, targets)
    for fn, _ in methods.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in methods}
    keys = list(methods)
    for r in range(repeats):
        for key in keys if r % 2 == 0 else keys[::-1]:
            t0 = time.perf_counter()
            methods[key][0]()
            times[key].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    meter = SavedBytes(model)
    plain_bytes = meter.measure(methods["plain"][0])
    rows = []
    for key, (fn, units) in methods.items():
        rows.append({"model": s.name, "recipe": key, "ms": med[key] * 1e3, "time": med[key] / med["plain"],
                     "model_ratio": units / 3, "saved": meter.measure(fn) / plain_bytes,
                     "plain_mib": plain_bytes / 2**20})
    return rows


def table(rows: list[dict], repeats: int) -> str:
    lines = ["| model | recipe | ms | time / plain (model) | saved / plain |", "|" + "---|" * 5]
    for r in rows:
        lines.append(f"| {r['model']} | {r['recipe']} | {r['ms']:.1f} | {r['time']:.2f} ({r['model_ratio']:.2f}) "
                     f"| {r['saved']:.2f} |")
    lines.append("")
    lines.append(f"Medians of {repeats} interleaved repeats; (model) = cost-model ratio; saved = peak bytes saved "
                 f"for backward, plain step = {rows[0]['plain_mib']:.2f} MiB.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: batch 4, 2 repeats")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 15, 2 with --quick)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1, as bench_villa.py)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 15)
    print(f"torch {torch.__version__}, {platform.machine()} {platform.processor() or ''}, "
          f"{torch.get_num_threads()} threads, python {platform.python_version()}")
    t0 = time.perf_counter()
    print(table(run_all(args.quick, repeats), repeats))
    print(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
