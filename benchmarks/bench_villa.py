"""Side-by-side cost of one VILLA step: advlab vs a plain step, the official retained-graph loop,
and a hand-written loop doing advlab's deferred math.

Everything is measured in one run with interleaved repeats (each repeat times every method of
every configuration once, in turn), and the table reports medians. Memory is measured
deterministically: the bytes of tensors saved for backward (`torch.autograd.graph.saved_tensors_hooks`),
alive at once, peak over the step, each storage counted once, parameters excluded.

Cost model (forward = 1, backward = 2 units; M = forwards per ascent step: 1 in `joint`, 2 in `alter`):
plain 3; official (retained graph) 1 + K(3M + 2); deferred (advlab default) 1 + 3MK + 2.

Usage:
    python benchmarks/bench_villa.py             # tiny and small UNITER, 10 repeats
    python benchmarks/bench_villa.py --quick     # smoke run: tiny UNITER, 2 repeats
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import advlab  # noqa: E402
from advlab.backbones.uniter import UniterConfig, UniterForVQA, vqa_loss  # noqa: E402

KL_WEIGHT = 1.5
STEP_SIZE = 1e-1


# ---------------------------------------------------------------------------------- models
@dataclass(frozen=True)
class Setup:
    name: str
    config: UniterConfig
    answers: int
    batch: int
    tokens: int = 20
    regions: int = 16


def setups(quick: bool) -> list[Setup]:
    no_drop = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    tiny = Setup("tiny (H64, L2)", UniterConfig.tiny(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                      intermediate_size=256, **no_drop), answers=100,
                 batch=4 if quick else 16)
    small = Setup("small (H256, L4)", UniterConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                                    intermediate_size=1024, **no_drop), answers=3129, batch=16)
    return [tiny] if quick else [tiny, small]


def make_batch(s: Setup, seed: int = 0) -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "input_ids": torch.randint(1, s.config.vocab_size, (s.batch, s.tokens), generator=g),
        "img_feat": torch.randn(s.batch, s.regions, s.config.img_dim, generator=g),
        "img_pos_feat": torch.rand(s.batch, s.regions, 7, generator=g),
    }
    targets = torch.rand(s.batch, s.answers, generator=g) * (torch.rand(s.batch, s.answers, generator=g) > 0.99)
    return inputs, targets


# ---------------------------------------------------------------------------------- steps
def plain_step(model, inputs, targets):
    model.zero_grad(set_to_none=True)
    vqa_loss(model(**inputs).logits, targets).backward()


def _symkl(a, b):  # official: kl_div(log p_a, p_b, batchmean) + kl_div(log p_b, p_a, batchmean)
    return (F.kl_div(F.log_softmax(a, -1), F.softmax(b, -1), reduction="batchmean")
            + F.kl_div(F.log_softmax(b, -1), F.softmax(a, -1), reduction="batchmean"))


def _adv_forward(model, inputs, d_txt, d_img):
    """The official plumbing: δ_txt added to the word embeddings, δ_img to the region features."""
    words = model.uniter.embeddings.word_embeddings(inputs["input_ids"])
    if d_txt is not None:
        words = words + d_txt
    img = inputs["img_feat"] if d_img is None else inputs["img_feat"] + d_img
    return model(inputs_embeds=words, img_feat=img, img_pos_feat=inputs["img_pos_feat"]).logits


def _groups(mode):
    return [("txt", "img")] if mode == "joint" else [("txt",), ("img",)]


def _update(d, lr=STEP_SIZE):
    g = d.grad
    denorm = g.flatten(1).norm(dim=1).clamp(min=1e-8).view(-1, 1, 1)
    return (d + lr * g / denorm).detach()


def _init_deltas(model, inputs):
    b, n = inputs["input_ids"].shape
    device = inputs["img_feat"].device
    return (torch.zeros(b, n, model.config.hidden_size, device=device), torch.zeros_like(inputs["img_feat"]))


def official_step(model, inputs, targets, *, K, mode):
    """The official `train_vqa_adv.py` structure: K backwards through the retained clean graph."""
    model.zero_grad(set_to_none=True)
    d_t, d_i = _init_deltas(model, inputs)
    clean = model(**inputs).logits
    groups = _groups(mode)
    for k in range(K):
        d_t.requires_grad_()
        d_i.requires_grad_()
        loss = 0.0
        for grp in groups:
            out = _adv_forward(model, inputs, d_t if "txt" in grp else None, d_i if "img" in grp else None)
            loss = loss + vqa_loss(out, targets) + KL_WEIGHT * _symkl(out, clean)
        (loss / (len(groups) * K)).backward(retain_graph=True)
        if k < K - 1:
            d_t, d_i = _update(d_t), _update(d_i)
    del clean


def hand_deferred_step(model, inputs, targets, *, K, mode):
    """advlab's default math written out: KL terms of steps 0..K-2 see a detached leaf of the clean
    logits whose gradient is accumulated; one backward through the clean graph at the last step."""
    model.zero_grad(set_to_none=True)
    d_t, d_i = _init_deltas(model, inputs)
    clean = model(**inputs).logits
    leaf = clean.detach().requires_grad_()
    groups = _groups(mode)
    for k in range(K):
        last = k == K - 1
        target = clean if last else leaf
        d_t.requires_grad_()
        d_i.requires_grad_()
        loss = 0.0
        for grp in groups:
            out = _adv_forward(model, inputs, d_t if "txt" in grp else None, d_i if "img" in grp else None)
            loss = loss + vqa_loss(out, targets) + KL_WEIGHT * _symkl(out, target)
        loss = loss / (len(groups) * K)
        if not last:
            loss.backward()
            d_t, d_i = _update(d_t), _update(d_i)
        elif leaf.grad is not None:
            torch.autograd.backward([loss, clean], [None, leaf.grad])
        else:
            loss.backward()


def advlab_step(villa, model, inputs, targets):
    model.zero_grad(set_to_none=True)
    villa.step(lambda: model(**inputs), lambda out: vqa_loss(out, targets))


def make_villa(model, *, K, mode, schedule="deferred"):
    return advlab.VILLA(model, steps=K, mode=mode, step_size=STEP_SIZE, kl_weight=KL_WEIGHT, schedule=schedule)


# ---------------------------------------------------------------------------------- memory
class SavedBytes:
    """Peak bytes of tensors saved for backward and alive at once; each storage counted once;
    parameters (saved by reference, not extra memory) excluded."""

    def __init__(self, model):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.live: dict[int, list[int]] = {}  # storage ptr -> [refcount, nbytes]
        self.current = self.peak = 0

    def _pack(self, t):
        box = _Box(t)
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.params or storage.nbytes() == 0:
            return box
        entry = self.live.get(key)
        if entry is None:
            self.live[key] = [1, storage.nbytes()]
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        else:
            entry[0] += 1
        weakref.finalize(box, self._release, key)
        return box

    def _release(self, key):
        entry = self.live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.live[key]

    def measure(self, fn) -> int:
        self.current = self.peak = 0
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda box: box.t):
            fn()
        return self.peak


class _Box:
    __slots__ = ("t", "__weakref__")

    def __init__(self, t):
        self.t = t


# ---------------------------------------------------------------------------------- the run
def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def max_diff(a, b):
    return max((a[n] - b[n]).abs().max().item() for n in a)


def run(quick: bool, repeats: int, ks: list[int], modes: list[str]) -> list[dict]:
    rows = []
    for s in setups(quick):
        torch.manual_seed(0)
        model = UniterForVQA(s.config, num_answers=s.answers).train()
        inputs, targets = make_batch(s)
        methods = {"plain": lambda: plain_step(model, inputs, targets)}
        configs = [(mode, K) for mode in modes for K in ks]
        for mode, K in configs:
            villa = make_villa(model, K=K, mode=mode)
            methods[("advlab", mode, K)] = lambda v=villa: advlab_step(v, model, inputs, targets)
            methods[("official", mode, K)] = lambda m=mode, k=K: official_step(model, inputs, targets, K=k, mode=m)
            methods[("hand", mode, K)] = lambda m=mode, k=K: hand_deferred_step(model, inputs, targets, K=k, mode=m)
        # correctness sanity check (same gradients), then warm-up
        diffs = {}
        for mode, K in configs:
            methods[("official", mode, K)]()
            ref = grads(model)
            methods[("advlab", mode, K)]()
            d_adv = max_diff(grads(model), ref)
            methods[("hand", mode, K)]()
            diffs[(mode, K)] = max(d_adv, max_diff(grads(model), ref))
        for fn in methods.values():
            fn()
        # interleaved timing
        times: dict = {key: [] for key in methods}
        keys = list(methods)
        for r in range(repeats):
            order = keys if r % 2 == 0 else keys[::-1]  # alternate direction: no method always follows another
            for key in order:
                t0 = time.perf_counter()
                methods[key]()
                times[key].append(time.perf_counter() - t0)
        med = {key: statistics.median(v) for key, v in times.items()}
        # deterministic memory
        meter = SavedBytes(model)
        plain_bytes = meter.measure(methods["plain"])
        for mode, K in configs:
            M = 1 if mode == "joint" else 2
            mem_default = meter.measure(methods[("advlab", mode, K)])
            lean = make_villa(model, K=K, mode=mode, schedule="lean")
            mem_lean = meter.measure(lambda v=lean: advlab_step(v, model, inputs, targets))
            mem_official = meter.measure(methods[("official", mode, K)])
            official_units, deferred_units = 1 + K * (3 * M + 2), 1 + 3 * M * K + 2
            rows.append({
                "model": s.name, "mode": mode, "K": K,
                "plain_ms": med["plain"] * 1e3, "advlab_ms": med[("advlab", mode, K)] * 1e3,
                "adv_plain": med[("advlab", mode, K)] / med["plain"], "adv_plain_model": deferred_units / 3,
                "official_plain": med[("official", mode, K)] / med["plain"], "official_plain_model": official_units / 3,
                "adv_official": med[("advlab", mode, K)] / med[("official", mode, K)],
                "adv_official_model": deferred_units / official_units,
                "adv_hand": med[("advlab", mode, K)] / med[("hand", mode, K)],
                "mem_default": mem_default / plain_bytes, "mem_lean": mem_lean / plain_bytes,
                "mem_official": mem_official / plain_bytes, "plain_mib": plain_bytes / 2**20,
                "grad_diff": diffs[(mode, K)],
            })
    return rows


def table(rows: list[dict], repeats: int) -> str:
    head = ("| model | mode | K | plain ms | advlab/plain (model) | official/plain (model) | advlab/official (model) "
            "| advlab/hand | saved/plain default | saved/plain lean | saved/plain official | max abs grad diff |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['K']} | {r['plain_ms']:.1f} "
            f"| {r['adv_plain']:.2f} ({r['adv_plain_model']:.2f}) | {r['official_plain']:.2f} ({r['official_plain_model']:.2f}) "
            f"| {r['adv_official']:.3f} ({r['adv_official_model']:.3f}) | {r['adv_hand']:.3f} "
            f"| {r['mem_default']:.2f} | {r['mem_lean']:.2f} | {r['mem_official']:.2f} | {r['grad_diff']:.1e} |"
        )
    plain_mem = ", ".join(f"{m}: {mib:.2f} MiB" for m, mib in dict((r["model"], r["plain_mib"]) for r in rows).items())
    lines.append("")
    lines.append(f"Medians of {repeats} interleaved repeats; (model) = cost-model ratio; saved = peak bytes saved "
                 f"for backward, plain step = {plain_mem}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny model, 2 repeats")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 10, 2 with --quick)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads (default 1: on a shared 2-core machine 2 threads oversubscribe "
                         "and the timings turn erratic, 10-100x slower)")
    ap.add_argument("--k", default="1,2,3", help="comma-separated K values")
    ap.add_argument("--modes", default="joint,alter")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 10)
    print(f"torch {torch.__version__}, {platform.machine()} {platform.processor() or ''}, "
          f"{torch.get_num_threads()} threads, python {platform.python_version()}")
    t0 = time.perf_counter()
    rows = run(args.quick, repeats, [int(k) for k in args.k.split(",")], args.modes.split(","))
    print(table(rows, repeats))
    print(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
