"""Fine-tune UNITER / VILLA on VQA with VILLA adversarial training (advlab only).

The official recipe (VILLA `train_vqa_adv.py` with `config/train-vqa-base-4gpu-adv.json`,
the released VILLA configuration): AdamW (betas 0.9, 0.98), lr 8e-5 with linear warm-up over 600 steps and
linear decay to 0 at 6000, the VQA head at 10x the learning rate, weight decay 0.01 except
on names containing `bias` / `LayerNorm.weight`, gradient clipping at 2.0, VILLA preset
`vqa-base` (text, K = 3, step 1e-3, KL weight 1.5). One difference: batches are counted in
questions here, the official sampler in tokens (5120 tokens per GPU x 4 GPUs x 5
accumulation steps, roughly 32 questions per GPU and micro-batch).

    python examples/uniter_vqa_villa.py \\
        --checkpoint pretrained/villa-base.pt \\
        --train-txt-db txt_db/vqa_train.db txt_db/vqa_trainval.db txt_db/vqa_vg.db \\
        --train-img-db img_db/coco_train2014 img_db/coco_val2014 img_db/vg \\
        --val-txt-db txt_db/vqa_devval.db --val-img-db img_db/coco_val2014 \\
        --output-dir runs/vqa-villa-base

Rerunning the same command resumes from `<output-dir>/last.pt` exactly: model, optimizer,
schedule, data position and random state.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import fields
from typing import Any

import torch
from torch import nn

import advlab
from advlab.backbones.uniter import UniterConfig, UniterForVQA, vqa_loss, vqa_score
from advlab.data.uniter_db import UniterImgDb, UniterTxtDb, UniterVqaDataset, uniter_collate


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help="uniter-*.pt / villa-*.pt (or .safetensors); omit for random init")
    p.add_argument("--model-config", default=None,
                   help="base | large | tiny | a JSON file of UniterConfig fields; default: inferred from --checkpoint")
    p.add_argument("--train-txt-db", nargs="+", required=True)
    p.add_argument("--train-img-db", nargs="+", required=True, help="one per --train-txt-db")
    p.add_argument("--val-txt-db", required=True)
    p.add_argument("--val-img-db", required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--num-answers", type=int, default=3129)
    p.add_argument("--max-txt-len", type=int, default=60)
    p.add_argument("--conf-th", type=float, default=0.2)
    p.add_argument("--max-bb", type=int, default=100)
    p.add_argument("--min-bb", type=int, default=10)
    p.add_argument("--num-bb", type=int, default=36)
    p.add_argument("--compressed-db", action="store_true")
    p.add_argument("--batch-size", type=int, default=32, help="questions per micro-batch")
    p.add_argument("--val-batch-size", type=int, default=128)
    p.add_argument("--grad-accum", type=int, default=5)
    p.add_argument("--lr", type=float, default=8e-5)
    p.add_argument("--lr-mul", type=float, default=10.0, help="learning-rate multiplier of the VQA head")
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.98))
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--grad-norm", type=float, default=2.0)
    p.add_argument("--warmup-steps", type=int, default=600)
    p.add_argument("--num-train-steps", type=int, default=6000)
    p.add_argument("--preset", default="vqa-base", help="advlab VILLA preset (vqa-base, vqa-large, vqa-large-best)")
    p.add_argument("--mode", default=None, help="override the preset's mode: txt, img, joint, alter")
    p.add_argument("--no-adv", action="store_true", help="plain fine-tuning (the UNITER baseline)")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--stop-after", type=int, default=None, help="stop this run after N optimizer steps (to split a run)")
    args = p.parse_args(argv)
    if len(args.train_txt_db) != len(args.train_img_db):
        p.error("give one --train-img-db per --train-txt-db")
    return args


def build_config(args: argparse.Namespace) -> UniterConfig | None:
    if args.model_config is None:
        if args.checkpoint is None:
            raise SystemExit("--model-config is required without --checkpoint")
        return None  # inferred from the checkpoint's shapes
    if args.model_config in ("base", "large", "tiny"):
        return getattr(UniterConfig, args.model_config)()
    with open(args.model_config) as f:
        raw = json.load(f)
    known = {f.name for f in fields(UniterConfig)}
    return UniterConfig(**{k: v for k, v in raw.items() if k in known})  # BERT-style JSONs carry extra keys


def build_model(args: argparse.Namespace) -> UniterForVQA:
    config = build_config(args)
    if args.checkpoint:
        return UniterForVQA.from_pretrained(args.checkpoint, config, num_answers=args.num_answers)
    print("no --checkpoint: training from random initialisation", file=sys.stderr)
    return UniterForVQA(config, num_answers=args.num_answers)


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """The official groups: head / backbone x decay / no decay; the head gets lr x lr_mul."""
    no_decay = ("bias", "LayerNorm.bias", "LayerNorm.weight")  # so img_layer_norm weights *are* decayed, as upstream
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {(h, d): [] for h in (True, False) for d in (True, False)}
    for name, param in model.named_parameters():
        groups[(name.startswith("vqa_output"), not any(nd in name for nd in no_decay))].append(param)
    param_groups = [
        {"params": groups[(head, decay)], "weight_decay": args.weight_decay if decay else 0.0,
         "lr_mul": args.lr_mul if head else 1.0}
        for head in (True, False) for decay in (True, False)
    ]
    return torch.optim.AdamW(param_groups, lr=args.lr, betas=tuple(args.betas))


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then linear decay to 0 at `num_train_steps`; floored at 1e-8 (optim/sched.py)."""
    if step < args.warmup_steps:
        factor = step / args.warmup_steps
    else:
        factor = max(0.0, (args.num_train_steps - step) / max(1, args.num_train_steps - args.warmup_steps))
    return max(args.lr * factor, 1e-8)


def build_dataset(txt_db: str, img_db: str, args: argparse.Namespace, max_txt_len: int) -> UniterVqaDataset:
    return UniterVqaDataset(
        UniterTxtDb(txt_db, max_txt_len=max_txt_len),
        UniterImgDb(img_db, conf_th=args.conf_th, max_bb=args.max_bb, min_bb=args.min_bb, num_bb=args.num_bb,
                    compressed=args.compressed_db),
        num_answers=args.num_answers,
    )


def batches(dataset: torch.utils.data.Dataset, args: argparse.Namespace, epoch: int, skip: int) -> Iterator[dict]:
    """One epoch of micro-batches in a seed-determined order, skipping the first `skip` (for resumption)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
    chunks = [order[i : i + args.batch_size] for i in range(0, len(order), args.batch_size)][skip:]
    loader = torch.utils.data.DataLoader(
        chunks, batch_size=None, collate_fn=lambda idx: uniter_collate([dataset[i] for i in idx]),
        num_workers=args.num_workers,
        generator=torch.Generator().manual_seed(args.seed + epoch),  # keeps the global RNG (dropout) untouched
    )
    yield from loader


@torch.no_grad()
def evaluate(model: nn.Module, dataset: UniterVqaDataset, args: argparse.Namespace) -> dict[str, float]:
    was_training = model.training
    model.eval()
    loss_sum, score_sum, n = 0.0, 0.0, 0
    for start in range(0, len(dataset), args.val_batch_size):
        batch = uniter_collate([dataset[i] for i in range(start, min(start + args.val_batch_size, len(dataset)))])
        logits = model(**batch["inputs"]).logits
        rows = logits.shape[0]
        loss_sum += float(vqa_loss(logits, batch["targets"])) * rows  # BCE summed over answers, per question
        score_sum += float(vqa_score(logits, batch["targets"]).sum())
        n += rows
    model.train(was_training)
    return {"val_loss": loss_sum / max(n, 1), "val_score": score_sum / max(n, 1)}


def save_checkpoint(path: str, state: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # never leave a half-written last.pt


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    torch.manual_seed(args.seed)
    model = build_model(args)
    model.train()
    optimizer = build_optimizer(model, args)
    villa = None if args.no_adv else advlab.VILLA.from_preset(
        args.preset, model, **({} if args.mode is None else {"mode": args.mode}))
    train_sets = [build_dataset(t, i, args, args.max_txt_len) for t, i in zip(args.train_txt_db, args.train_img_db)]
    train = torch.utils.data.ConcatDataset(train_sets)
    val = build_dataset(args.val_txt_db, args.val_img_db, args, max_txt_len=-1)

    step, epoch, micro_in_epoch = 0, 0, 0
    history: list[dict[str, float]] = []
    last = os.path.join(args.output_dir, "last.pt")
    if os.path.exists(last):
        ckpt = torch.load(last, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, epoch, micro_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["micro_in_epoch"]
        history = ckpt["history"]
        torch.set_rng_state(ckpt["torch_rng"])
        print(f"resumed from {last} at step {step}", file=sys.stderr)

    try:
        from tqdm import tqdm

        bar = tqdm(total=args.num_train_steps, initial=step, desc="VQA+VILLA", dynamic_ncols=True)
    except ImportError:
        bar = None
    stop_at = args.num_train_steps if args.stop_after is None else min(args.num_train_steps, step + args.stop_after)
    started, running, pending = time.time(), None, 0  # pending: micro-batches accumulated since the last step
    while step < stop_at:
        for batch in batches(train, args, epoch, micro_in_epoch):
            micro_in_epoch += 1
            pending += 1
            inputs, targets = batch["inputs"], batch["targets"]
            if villa is None:
                loss_value = vqa_loss(model(**inputs), targets)
                (loss_value / args.grad_accum).backward()
                loss_value = float(loss_value)
            else:
                # the forward closure is called several times and must see the same inputs
                stats = villa.step(
                    lambda inputs=inputs: model(**inputs),
                    lambda out, targets=targets: vqa_loss(out, targets) / args.grad_accum,
                    masks=batch["masks"],
                )
                loss_value = stats.mean_task_loss * args.grad_accum
            running = loss_value if running is None else 0.95 * running + 0.05 * loss_value
            if pending < args.grad_accum:
                continue
            step, pending = step + 1, 0
            lr = lr_at(step, args)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_mul"]
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{running:.3f}", lr=f"{lr:.2e}")
            elif step % args.log_every == 0 or step == stop_at:
                print(f"step {step}/{args.num_train_steps} loss {running:.4f} lr {lr:.2e} "
                      f"{time.time() - started:.0f}s", flush=True)
            if step % args.eval_every == 0 or step == args.num_train_steps:
                metrics = {"step": step, **evaluate(model, val, args)}
                history.append(metrics)
                print(json.dumps(metrics), flush=True)
            if step % args.save_every == 0 or step == stop_at:
                torch.save(model.state_dict(), os.path.join(args.output_dir, f"model_step_{step}.pt"))
                save_checkpoint(last, {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
                    "micro_in_epoch": micro_in_epoch, "history": history, "torch_rng": torch.get_rng_state(),
                    "args": vars(args),
                })
            if step >= stop_at:
                break
        else:
            epoch, micro_in_epoch = epoch + 1, 0
    if bar is not None:
        bar.close()
    return {"step": step, "history": history, "model": model}


if __name__ == "__main__":
    main()
