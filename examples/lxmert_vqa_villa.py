"""Fine-tune LXMERT on VQA with VILLA (LXMERT-AdvTrain's recipe), with evaluation, checkpoints and exact resumption.

With the released files (airsplay/lxmert layout):

    python examples/lxmert_vqa_villa.py \
        --checkpoint snap/pretrained/model_LXRT.pth \
        --train data/vqa/train.json data/vqa/nominival.json --valid data/vqa/minival.json \
        --ans2label data/vqa/trainval_ans2label.json --pretrain-answers data/lxmert/all_ans.json \
        --features data/mscoco_imgfeat/train2014_obj36.tsv data/mscoco_imgfeat/val2014_obj36.tsv \
        --tokenizer bert-base-uncased --out runs/vqa_villa

Interrupt it and run the same command with `--resume`: training continues from `out/last.pt` exactly where it
stopped (same data order, same dropout masks), so an interrupted run ends with the same weights as an
uninterrupted one. `--synthetic` builds a tiny model and random data, to try the script without any download.

The original fine-tuning (`run/vqa_finetune.bash`): BertAdam lr 5e-5 with warm-up, batch 32, 4 epochs, 20 text
tokens, gradient clipping at 5, BCE-with-logits × number of answers. LXMERT-AdvTrain adds VILLA on the text
embeddings: 3 steps, KL weight 1.5, step 1e-3 (`--preset lxmert-vqa`; `--mode img|joint|alter` to change).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

import advlab
from advlab.backbones.lxmert import LxmertConfig, LxmertForVQA
from advlab.data.obj36 import Obj36Record, collate_obj36, load_obj36

MAX_TEXT = 20  # max_seq_length of the released VQA / GQA / NLVR2 scripts


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help="model_LXRT.pth (pre-trained) or a fine-tuned BEST.pth / HF folder")
    p.add_argument("--train", nargs="+", help="VQA question files (airsplay json)")
    p.add_argument("--valid", nargs="*", default=[], help="question files to evaluate on")
    p.add_argument("--ans2label", help="trainval_ans2label.json")
    p.add_argument("--pretrain-answers", help="all_ans.json: initialise the answer head from the 9500-way QA head")
    p.add_argument("--features", nargs="+", help="obj36 TSV files")
    p.add_argument("--limit-images", type=int, default=None, help="read at most this many images per TSV")
    p.add_argument("--tokenizer", default="bert-base-uncased", help="a BERT uncased WordPiece tokenizer name / path")
    p.add_argument("--out", required=True, help="folder for last.pt, best.pt and log.jsonl")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of steps with linear warm-up")
    p.add_argument("--clip", type=float, default=5.0)
    p.add_argument("--preset", default="lxmert-vqa")
    p.add_argument("--mode", default=None, choices=["txt", "img", "joint", "alter"], help="override the preset")
    p.add_argument("--no-adv", action="store_true", help="plain fine-tuning, for the baseline row")
    p.add_argument("--save-every", type=int, default=500, help="write last.pt every this many steps")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps in total")
    p.add_argument("--resume", action="store_true", help="continue from out/last.pt")
    p.add_argument("--seed", type=int, default=9595)
    p.add_argument("--synthetic", action="store_true", help="tiny model and random data (no downloads)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if not args.synthetic and not (args.train and args.ans2label and args.features):
        p.error("--train, --ans2label and --features are required (or --synthetic)")
    return args


# ------------------------------------------------------------------------------------------------ synthetic data


def write_synthetic(folder: str, seed: int, num_images: int = 12, num_answers: int = 10) -> dict[str, Any]:
    """Random obj36 TSV, question files and answer table in the released formats; returns the paths."""
    import base64

    import numpy as np

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    enc = lambda a: base64.b64encode(a.tobytes()).decode()
    lines = []
    for i in range(num_images):
        n, h, w = 6, 300, 400
        x1, y1 = rng.uniform(0, w / 2, n), rng.uniform(0, h / 2, n)
        boxes = np.stack([x1, y1, x1 + w / 3, y1 + h / 3], 1).astype(np.float32)
        lines.append(
            "\t".join(
                [
                    f"img{i}",
                    str(h),
                    str(w),
                    enc(rng.integers(0, 1600, n)),
                    enc(rng.random(n, dtype=np.float32)),
                    enc(rng.integers(0, 400, n)),
                    enc(rng.random(n, dtype=np.float32)),
                    str(n),
                    enc(boxes),
                    enc(rng.standard_normal((n, 16)).astype(np.float32)),
                ]
            )
        )
    with open(os.path.join(folder, "obj36.tsv"), "w") as f:
        f.write("\n".join(lines) + "\n")
    answers = [f"answer{k}" for k in range(num_answers)]
    words = ["what", "color", "is", "the", "cat", "dog", "how", "many", "people", "there"]

    def questions(count: int, start: int) -> list[dict[str, Any]]:
        out = []
        for q in range(count):
            label = {answers[int(k)]: float(s) for k, s in zip(rng.integers(0, num_answers, 2), (1.0, 0.3))}
            sent = " ".join(rng.choice(words, int(rng.integers(3, 8))))
            out.append(
                {
                    "question_id": start + q,
                    "img_id": f"img{int(rng.integers(num_images))}",
                    "sent": sent,
                    "label": label,
                }
            )
        return out

    paths = {
        "features": [os.path.join(folder, "obj36.tsv")],
        "train": [os.path.join(folder, "train.json")],
        "valid": [os.path.join(folder, "valid.json")],
        "ans2label": os.path.join(folder, "ans2label.json"),
    }
    for name, data in (
        ("train.json", questions(24, 0)),
        ("valid.json", questions(8, 1000)),
        ("ans2label.json", {a: k for k, a in enumerate(answers)}),
    ):
        with open(os.path.join(folder, name), "w") as f:
            json.dump(data, f)
    return paths


class HashTokenizer:
    """Stand-in for WordPiece in `--synthetic` runs: [CLS]=1, [SEP]=2, words hashed into the vocabulary."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def __call__(self, sents: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for s in sents:
            ids = [3 + sum(map(ord, w)) % (self.vocab_size - 3) for w in s.lower().split()][: max_length - 2]
            rows.append([1, *ids, 2])
        return _pad(rows, max_length)


class WordPieceTokenizer:
    """`[CLS] tokens [SEP]`, truncated to 20, padded with 0 (airsplay `entry.convert_sents_to_features`)."""

    def __init__(self, name: str) -> None:
        from transformers import AutoTokenizer  # only for real runs

        self.tok = AutoTokenizer.from_pretrained(name, do_lower_case=True)

    def __call__(self, sents: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.tok(s, truncation=True, max_length=max_length)["input_ids"] for s in sents]
        return _pad(rows, max_length)


def _pad(rows: list[list[int]], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.zeros(len(rows), max_length, dtype=torch.long)
    mask = torch.zeros(len(rows), max_length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


# ------------------------------------------------------------------------------------------------ data


def load_questions(paths: Sequence[str], features: dict[str, Obj36Record]) -> list[dict[str, Any]]:
    data = []
    for path in paths:
        with open(path) as f:
            data.extend(q for q in json.load(f) if q["img_id"] in features)
    return data


def make_batch(items, features, tokenizer, ans2label) -> dict[str, torch.Tensor]:
    ids, mask = tokenizer([q["sent"] for q in items], MAX_TEXT)
    feats, boxes, vmask = collate_obj36([features[q["img_id"]] for q in items])
    target = torch.zeros(len(items), len(ans2label))
    for i, q in enumerate(items):
        for ans, score in q.get("label", {}).items():
            if ans in ans2label:
                target[i, ans2label[ans]] = score
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "visual_feats": feats,
        "visual_pos": boxes,
        "visual_attention_mask": vmask,
        "target": target,
    }


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffle of one epoch depends only on (seed, epoch): resuming mid-epoch replays it exactly."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


def batches(data, order, batch_size, start) -> Iterator[list[dict[str, Any]]]:
    for i in range(start * batch_size, len(order), batch_size):
        yield [data[j] for j in order[i : i + batch_size]]


def progress(iterable, total: int, desc: str, disable: bool):
    if disable:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:  # a plain counter on stderr

        def plain():
            for i, x in enumerate(iterable, 1):
                print(f"\r{desc} {i}/{total}", end="", file=sys.stderr)
                yield x
            print(file=sys.stderr)

        return plain()
    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True)


# ------------------------------------------------------------------------------------------------ train / eval


def vqa_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The original: BCE-with-logits against soft scores, mean × number of answers."""
    return F.binary_cross_entropy_with_logits(logits, target) * logits.shape[1]


@torch.no_grad()
def evaluate(model, data, features, tokenizer, ans2label, batch_size, quiet) -> float:
    """VQA score: the target's soft score of the arg-max answer, averaged over questions."""
    if not data:
        return float("nan")
    model.eval()
    total = 0.0
    steps = math.ceil(len(data) / batch_size)
    for items in progress(batches(data, list(range(len(data))), batch_size, 0), steps, "eval", quiet):
        batch = make_batch(items, features, tokenizer, ans2label)
        target = batch.pop("target")
        best = model(**batch).logits.argmax(-1)
        total += target.gather(1, best[:, None]).sum().item()
    model.train()
    return total / len(data)


def save(path: str, state: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # an interrupted save never leaves a half-written last.pt


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    if args.synthetic:
        paths = write_synthetic(os.path.join(args.out, "synthetic"), args.seed)
        args.train, args.valid, args.features, args.ans2label = (
            paths["train"],
            paths["valid"],
            paths["features"],
            paths["ans2label"],
        )
    with open(args.ans2label) as f:
        ans2label: dict[str, int] = json.load(f)

    features: dict[str, Obj36Record] = {}
    for path in args.features:
        features.update(load_obj36(path, limit=args.limit_images))  # boxes normalised to [0, 1] x1 y1 x2 y2
    train, valid = load_questions(args.train, features), load_questions(args.valid, features)

    if args.synthetic:
        config = LxmertConfig.tiny(visual_feat_dim=16, l_layers=1, r_layers=1, x_layers=1)
        model = LxmertForVQA(config, num_answers=len(ans2label))
        tokenizer: Any = HashTokenizer(config.vocab_size)
    else:
        tokenizer = WordPieceTokenizer(args.tokenizer)
        if args.checkpoint and args.pretrain_answers:
            with open(args.pretrain_answers) as f:
                pre = json.load(f)  # all_ans.json: [{"ans": ..., ...}, ...] in row order
            pre_answers = [a["ans"] if isinstance(a, dict) else a for a in pre]
            model = LxmertForVQA.from_pretrained(args.checkpoint, answers=ans2label, pretrain_answers=pre_answers)
        elif args.checkpoint:
            model = LxmertForVQA.from_pretrained(args.checkpoint, num_answers=len(ans2label))
        else:
            model = LxmertForVQA(LxmertConfig.base(), num_answers=len(ans2label))
    model.train()

    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, int(args.warmup * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total_steps - s) / max(1, total_steps - warmup)))
    )
    villa = None
    if not args.no_adv:
        overrides = {"mode": args.mode} if args.mode else {}
        villa = advlab.VILLA.from_preset(args.preset, model, **overrides)

    epoch, start_batch, global_step, best = 0, 0, 0, -1.0
    last = os.path.join(args.out, "last.pt")
    if args.resume and os.path.exists(last):
        state = torch.load(last, map_location="cpu", weights_only=False)  # our own file: includes RNG states
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        epoch, start_batch, global_step, best = state["epoch"], state["batch"], state["global_step"], state["best"]
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])

    def checkpoint(next_epoch: int, next_batch: int) -> None:
        save(
            last,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": next_epoch,
                "batch": next_batch,
                "global_step": global_step,
                "best": best,
                "torch_rng": torch.get_rng_state(),
                "python_rng": random.getstate(),
            },
        )

    log = open(os.path.join(args.out, "log.jsonl"), "a")  # noqa: SIM115 - closed at the end, written all along
    stopped = False
    while epoch < args.epochs and not stopped:
        order = epoch_order(len(train), args.seed, epoch)
        bar = progress(
            batches(train, order, args.batch_size, start_batch),
            steps_per_epoch - start_batch,
            f"epoch {epoch}",
            args.no_progress,
        )
        for b, items in enumerate(bar, start=start_batch):
            batch = make_batch(items, features, tokenizer, ans2label)
            target = batch.pop("target")
            txt_mask, img_mask = batch["attention_mask"].bool(), batch["visual_attention_mask"].bool()
            if villa is not None:
                stats = villa.step(
                    lambda batch=batch: model(**batch),
                    lambda out, target=target: vqa_loss(out.logits, target),
                    masks={"txt": txt_mask, "img": img_mask},
                )
                loss_value = stats.mean_task_loss
            else:
                loss = vqa_loss(model(**batch).logits, target)
                loss.backward()
                loss_value = loss.item()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss_value:.4f}")
            log.write(json.dumps({"step": global_step, "loss": loss_value}) + "\n")
            if global_step % args.save_every == 0:
                checkpoint(epoch, b + 1)
            if args.max_steps is not None and global_step >= args.max_steps:
                checkpoint(epoch, b + 1)
                stopped = True
                break
        if stopped:
            break
        score = evaluate(model, valid, features, tokenizer, ans2label, args.batch_size, args.no_progress)
        log.write(json.dumps({"epoch": epoch, "valid_score": score}) + "\n")
        if score > best:
            best = score
            save(os.path.join(args.out, "best.pt"), {"model": model.state_dict(), "epoch": epoch, "score": score})
        epoch, start_batch = epoch + 1, 0
        checkpoint(epoch, 0)
    log.close()
    return {"global_step": global_step, "epoch": epoch, "best": best}


if __name__ == "__main__":
    print(main())
