"""Run by tests/test_integration_lightning.py: Lightning, strategy="ddp", 2 CPU processes (gloo).

A LightningModule with a tiny BertForSequenceClassification calls `adversarial_step` (FreeLB,
K = 2) in `training_step` (manual optimisation); per rank, the final weights and the DDP
buckets reduced in each training step (counted by a communication hook) go to
`<outdir>/rank<r>.pt`. Lightning starts the second process by running this script again.
"""

from __future__ import annotations

import sys

import lightning.pytorch as pl
import torch
from transformers import BertConfig, BertForSequenceClassification

import advlab
from advlab.integrations.lightning import adversarial_step

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
SITE = {"txt": "bert.embeddings.word_embeddings"}


def build_model() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**CONFIG))


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
    return advlab.FreeLB(model, sites=SITE, steps=2, step_size=0.3)


class Classifier(pl.LightningModule):
    def __init__(self, model: torch.nn.Module, *, count: bool = False, sgd: bool = False) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.model = model
        self.recipe = build_recipe(model)
        self.count, self.sgd = count, sgd
        self.calls: list[int] = []
        self.rounds: list[list[int]] = []
        self.logit_dtypes: list[torch.dtype] = []
        self.seen: list[torch.Tensor] = []  # the first token of each row of each batch

    def forward(self, batch):
        out = self.model(**batch)
        self.logit_dtypes.append(out.logits.dtype)
        return out

    def on_train_start(self) -> None:
        if self.count:
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            def hook(state, bucket):
                state.append(bucket.index())
                return default_hooks.allreduce_hook(None, bucket)

            self.trainer.strategy.model.register_comm_hook(self.calls, hook)

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["input_ids"][:, 0].clone())
        opt = self.optimizers()
        opt.zero_grad()
        adversarial_step(self, self.recipe, batch, lambda out: out.loss, masks={"txt": batch["attention_mask"]})
        opt.step()
        self.rounds.append(sorted(self.calls))
        self.calls.clear()

    def train_dataloader(self):  # rank r gets rows r, r + 2, ...: rows 0-3 make the first global batch
        sampler = torch.utils.data.DistributedSampler(
            build_data(), num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
        )
        return torch.utils.data.DataLoader(build_data(), batch_size=2, sampler=sampler)

    def configure_optimizers(self):
        if self.sgd:
            return torch.optim.SGD(self.parameters(), lr=0.5)
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.0)


def trainer(**kw) -> pl.Trainer:
    base = {
        "max_steps": 2,
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return pl.Trainer(**(base | kw))


def main(outdir: str) -> None:
    module = Classifier(build_model(), count=True)
    t = trainer(strategy="ddp", devices=2, use_distributed_sampler=False)
    t.fit(module)
    buckets = len({i for r in module.rounds for i in r})
    weights = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    torch.save(
        {"weights": weights, "rounds": module.rounds, "buckets": buckets, "seen": module.seen},
        f"{outdir}/rank{t.global_rank}.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1])
