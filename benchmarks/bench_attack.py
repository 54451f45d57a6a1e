"""Cost of one attack step against one plain training step, and APGD against PGD at the same budget.

Part 1 (cost), on the benchmark UNITER models of `bench_villa.py` (dropout off), one run,
interleaved repeats, medians:

- plain training step: train mode, forward, per-example loss mean, backward with parameter gradients;
- `advlab.attack`: eval mode, parameters frozen, δ at both sites; the time of `steps` steps
  divided by `steps` (so the clean forward and the last, gradient-free forward are included);
  the marginal step is (t(10 steps) - t(2 steps)) / 8;
- a hand-written δ-only step: `perturb_sites` with leaf δ, forward, `autograd.grad` in δ.

Memory: peak bytes of tensors saved for backward and alive at once (deterministic; the
`SavedBytes` meter of `bench_villa.py`), for a training step and for an attack step.

Part 2 (strength): a tiny UNITER fitted (150 Adam steps) to 64 synthetic visual-entailment examples, attacked
with PGD (step 2.5 ε / steps) and APGD at the same number of steps, relative L2 radii on the
text side: mean loss, accuracy under attack, and the share of examples where APGD finds a
larger loss than PGD.

Usage:
    python benchmarks/bench_attack.py            # tiny and small UNITER, 10 repeats
    python benchmarks/bench_attack.py --quick    # smoke run: tiny UNITER, 2 repeats, short fit
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_villa import SavedBytes, make_batch, setups  # noqa: E402

import advlab  # noqa: E402
from advlab.backbones.uniter import UniterConfig, UniterForVisualEntailment, UniterForVQA  # noqa: E402

ATTACK_STEPS = 10


def per_example_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """VQA's soft-score BCE, summed over answers: one value per example."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(dim=1)


def perturbations(radius: float = 0.5) -> dict[str, advlab.Perturbation]:
    return {m: advlab.Perturbation(step_size=radius / 4, radius=radius) for m in ("txt", "img")}


# ---------------------------------------------------------------------------------- part 1: cost
def plain_step(model, inputs, targets):
    model.train()
    model.zero_grad(set_to_none=True)
    per_example_loss(model(**inputs).logits, targets).mean().backward()


def attack_steps(model, inputs, targets, steps, method="pgd"):
    return advlab.attack(model, perturbations=perturbations(), forward=lambda: model(**inputs), steps=steps,
                         loss=lambda out: per_example_loss(out.logits, targets), method=method)


def hand_delta_step(model, inputs, targets, shapes):
    """Floor: one forward and one backward in δ only, params frozen, eval mode, no attack bookkeeping."""
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        deltas = {m: torch.zeros(s, requires_grad=True) for m, s in shapes.items()}
        with advlab.perturb_sites(model, deltas):
            loss = per_example_loss(model(**inputs).logits, targets)
        torch.autograd.grad(loss.sum(), list(deltas.values()))
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train()


def cost(quick: bool, repeats: int) -> list[dict]:
    rows = []
    for s in setups(quick):
        torch.manual_seed(0)
        model = UniterForVQA(s.config, num_answers=s.answers).train()
        model.zero_grad(set_to_none=True)
        inputs, targets = make_batch(s)
        probe = attack_steps(model, inputs, targets, 1)
        shapes = {m: d.shape for m, d in probe.deltas.items()}
        methods = {
            "plain": lambda: plain_step(model, inputs, targets),
            "attack10": lambda: attack_steps(model, inputs, targets, ATTACK_STEPS),
            "attack2": lambda: attack_steps(model, inputs, targets, 2),
            "apgd10": lambda: attack_steps(model, inputs, targets, ATTACK_STEPS, "apgd"),
            "hand": lambda: hand_delta_step(model, inputs, targets, shapes),
        }
        for fn in methods.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {k: [] for k in methods}
        keys = list(methods)
        for r in range(repeats):
            for key in keys if r % 2 == 0 else keys[::-1]:
                t0 = time.perf_counter()
                methods[key]()
                times[key].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        meter = SavedBytes(model)
        plain_bytes = meter.measure(methods["plain"])
        attack_bytes = meter.measure(lambda: attack_steps(model, inputs, targets, 1))
        model.zero_grad(set_to_none=True)
        rows.append({
            "model": s.name, "batch": s.batch,
            "plain_ms": med["plain"] * 1e3,
            "attack_ms": med["attack10"] * 1e3 / ATTACK_STEPS,
            "apgd_ms": med["apgd10"] * 1e3 / ATTACK_STEPS,
            "marginal_ms": (med["attack10"] - med["attack2"]) * 1e3 / (ATTACK_STEPS - 2),
            "hand_ms": med["hand"] * 1e3,
            "plain_mib": plain_bytes / 2**20, "attack_mib": attack_bytes / 2**20,
        })
    return rows


def cost_table(rows: list[dict], repeats: int) -> str:
    lines = [
        "| model | batch | train step ms | attack step ms (ratio) | APGD step ms (ratio) | marginal step ms (ratio) "
        "| hand δ step ms (ratio) | saved MiB train / attack (ratio) |",
        "|" + "---|" * 8,
    ]
    for r in rows:
        p = r["plain_ms"]
        lines.append(
            f"| {r['model']} | {r['batch']} | {p:.1f} | {r['attack_ms']:.1f} ({r['attack_ms'] / p:.2f}) "
            f"| {r['apgd_ms']:.1f} ({r['apgd_ms'] / p:.2f}) | {r['marginal_ms']:.1f} ({r['marginal_ms'] / p:.2f}) "
            f"| {r['hand_ms']:.1f} ({r['hand_ms'] / p:.2f}) "
            f"| {r['plain_mib']:.2f} / {r['attack_mib']:.2f} ({r['attack_mib'] / r['plain_mib']:.2f}) |"
        )
    lines.append("")
    lines.append(f"Medians of {repeats} interleaved repeats; attack step = time of {ATTACK_STEPS} steps / "
                 f"{ATTACK_STEPS}; ratios against the training step.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- part 2: strength
def fitted_model(quick: bool):
    """A tiny UNITER fitted to 64 synthetic VE examples (random labels: a sharp, memorised landscape)."""
    cfg = UniterConfig.tiny(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = UniterForVisualEntailment(cfg)
    g = torch.Generator().manual_seed(1)
    n, t, r = 64, 8, 5
    inputs = {
        "input_ids": torch.randint(1, cfg.vocab_size, (n, t), generator=g),
        "img_feat": torch.randn(n, r, cfg.img_dim, generator=g),
        "img_pos_feat": torch.rand(n, r, 7, generator=g),
    }
    labels = torch.randint(0, 3, (n,), generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40 if quick else 150):
        opt.zero_grad()
        F.cross_entropy(model(**inputs).logits, labels).backward()
        opt.step()
    model.eval()
    return model, inputs, labels


def strength(quick: bool) -> list[dict]:
    model, inputs, labels = fitted_model(quick)
    rows = []
    for steps in ([5] if quick else [10, 50]):
        for radius in ([0.1] if quick else [0.03, 0.1, 0.3]):
            out = {}
            for method in ("pgd", "apgd"):
                pert = {"txt": advlab.Perturbation(step_size=2.5 * radius / steps, radius=radius, relative=True)}
                res = advlab.attack(model, perturbations=pert, forward=lambda: model(**inputs), steps=steps,
                                    mode="txt", method=method, logits=advlab.free.default_logits,
                                    loss=lambda o: F.cross_entropy(o.logits, labels, reduction="none"))
                out[method] = res
            pgd, apgd = out["pgd"], out["apgd"]
            rows.append({
                "steps": steps, "radius": radius,
                "clean_loss": float(pgd.clean_loss.mean()),
                "clean_acc": float((pgd.clean_logits.argmax(-1) == labels).float().mean()),
                "pgd_loss": float(pgd.loss.mean()), "apgd_loss": float(apgd.loss.mean()),
                "pgd_acc": float((pgd.logits.argmax(-1) == labels).float().mean()),
                "apgd_acc": float((apgd.logits.argmax(-1) == labels).float().mean()),
                "apgd_wins": float((apgd.loss > pgd.loss + 1e-6).float().mean()),
                "pgd_wins": float((pgd.loss > apgd.loss + 1e-6).float().mean()),
            })
    return rows


def strength_table(rows: list[dict]) -> str:
    lines = ["| steps | relative radius | clean loss / acc | PGD loss / acc | APGD loss / acc | APGD larger | PGD larger |",
             "|" + "---|" * 7]
    for r in rows:
        lines.append(
            f"| {r['steps']} | {r['radius']:g} | {r['clean_loss']:.4f} / {r['clean_acc']:.3f} "
            f"| {r['pgd_loss']:.4f} / {r['pgd_acc']:.3f} | {r['apgd_loss']:.4f} / {r['apgd_acc']:.3f} "
            f"| {r['apgd_wins']:.0%} | {r['pgd_wins']:.0%} |"
        )
    lines.append("")
    lines.append("64 examples; 'APGD larger': share of examples where APGD's loss exceeds PGD's by more than 1e-6.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny model, 2 repeats, short fit")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 10, 2 with --quick)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 10)
    print(f"torch {torch.__version__}, {platform.machine()} {platform.processor() or ''}, "
          f"{torch.get_num_threads()} threads, python {platform.python_version()}")
    t0 = time.perf_counter()
    print(cost_table(cost(args.quick, repeats), repeats))
    print()
    print(strength_table(strength(args.quick)))
    print(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
