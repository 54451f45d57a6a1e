"""Run by tests/test_integration_transformers.py under `torchrun --nproc_per_node 2` (CPU, gloo).

Trains a tiny BertForSequenceClassification with `AdversarialTrainer` (FreeLB, K = 2,
gradient accumulation 2) and saves, per rank, the final weights and the DDP buckets reduced
in each optimizer step (counted by a communication hook) to `<outdir>/rank<r>.pt`.
"""

from __future__ import annotations

import sys

import torch
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

import advlab
from advlab.integrations.transformers import AdversarialTrainer

CONFIG = {
    "vocab_size": 40,
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 16,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "num_labels": 3,
}


def build_model() -> BertForSequenceClassification:
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**CONFIG))
    model.accepts_loss_kwargs = False  # mean loss per micro-batch: the Trainer divides by the accumulation steps
    return model


def build_data(n: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(n):
        length = int(torch.randint(3, 9, (), generator=g))
        ids = torch.zeros(8, dtype=torch.long)
        ids[:length] = torch.randint(1, 40, (length,), generator=g)
        rows.append(
            {
                "input_ids": ids,
                "attention_mask": (torch.arange(8) < length).long(),
                "labels": torch.randint(0, 3, (), generator=g),
            }
        )
    return rows


def build_recipe(model: torch.nn.Module) -> advlab.FreeLB:
    return advlab.FreeLB(model, sites={"txt": "bert.embeddings.word_embeddings"}, steps=2, step_size=0.3)


def build_args(out: str, *, batch: int = 2, ddp_backend: str | None = "gloo") -> TrainingArguments:
    return TrainingArguments(
        out,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=2,
        max_steps=2,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        train_sampling_strategy="sequential",
        ddp_backend=ddp_backend,
        average_tokens_across_devices=False,
        seed=0,
    )


class CountingTrainer(AdversarialTrainer):
    """Registers a communication hook on the DDP model at the first step; one list of buckets per optimizer step."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        from torch.nn.parallel import DistributedDataParallel

        if not hasattr(self, "rounds"):
            if not isinstance(model, DistributedDataParallel):
                raise RuntimeError(f"expected a DDP model under torchrun, got {type(model).__name__}")
            self.rounds: list[list[int]] = []

            def hook(state, bucket):
                state.append(bucket.index())
                return default_hooks.allreduce_hook(None, bucket)

            self.calls: list[int] = []
            model.register_comm_hook(self.calls, hook)
        return super().training_step(model, inputs, num_items_in_batch)

    def optimizer_step_done(self) -> None:
        self.rounds.append(sorted(self.calls))
        self.calls.clear()


def main(outdir: str) -> None:
    from transformers import TrainerCallback

    model = build_model()
    trainer = CountingTrainer(
        model=model, args=build_args(outdir + "/ddp"), train_dataset=build_data(), recipe=build_recipe(model)
    )

    class AfterStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            trainer.optimizer_step_done()

    trainer.add_callback(AfterStep())
    trainer.train()
    rank = trainer.args.process_index
    buckets = len({i for r in trainer.rounds for i in r})
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"weights": weights, "rounds": trainer.rounds, "buckets": buckets}, f"{outdir}/rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
