"""Quickstart: a tiny two-modality classifier trained with and without VILLA, in seconds.

The task is synthetic: a "caption" of token ids and a set of "region" features; the label
depends on both. Both arms train for the same number of epochs from the same initial
weights; we report clean test accuracy and accuracy under an embedding-space PGD attack
(both modalities, L2 ball per row), measured with advlab's own pieces. Numbers are printed
as they come out, whatever they are.

    python examples/quickstart.py [--epochs 8] [--seeds 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import advlab


class TinyVL(nn.Module):
    """Word embeddings + projected region features -> one mixing layer -> mean pool -> classes."""

    def __init__(self, vocab: int = 50, img_dim: int = 16, hidden: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden)
        self.img_linear = nn.Linear(img_dim, hidden)
        self.mix = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(0.1))
        self.head = nn.Linear(hidden, classes)

    def perturbation_sites(self) -> dict[str, advlab.Site]:
        return {"txt": advlab.Site(self.word_embeddings), "img": advlab.Site(self.img_linear, where="input")}

    def forward(self, ids: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.word_embeddings(ids), self.img_linear(img)], dim=1)  # [b, n_txt + n_img, h]
        return self.head(self.mix(x).mean(dim=1))


def make_data(n: int, seed: int, vocab: int = 50, length: int = 6, regions: int = 4, img_dim: int = 16):
    """Labels from a fixed random linear "teacher" reading the mean token one-hot and the mean region."""
    teacher = torch.Generator().manual_seed(1234)
    w_txt, w_img = torch.randn(vocab, 4, generator=teacher), torch.randn(img_dim, 4, generator=teacher)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    img = torch.randn(n, regions, img_dim, generator=g)
    score = F.one_hot(ids, vocab).float().mean(1) @ w_txt + img.mean(1) @ w_img  # [n, 4]
    return ids, img, score.argmax(-1)


def attacked_accuracy(model: nn.Module, ids, img, y, *, radius_txt: float, radius_img: float, steps: int = 5) -> float:
    """Accuracy under a PGD attack on both embeddings (advlab's hooks, balls and ascent step)."""
    model.eval()
    pert = {"txt": advlab.Perturbation(step_size=radius_txt / 2, radius=radius_txt),
            "img": advlab.Perturbation(step_size=radius_img / 2, radius=radius_img)}
    with advlab.free_training(model, None, pert, steps=steps + 1, mode="joint") as ft:
        for step in ft:
            out = ft.forward(lambda: model(ids, img))
            ft.backward(F.cross_entropy(out, y))
        deltas = {m: ft.deltas(m)[0].detach() for m in ft.modalities}
    model.zero_grad()
    with torch.no_grad(), advlab.perturb_sites(model, deltas):
        return (model(ids, img).argmax(-1) == y).float().mean().item()


def train(arm: str, seed: int, epochs: int, data, test) -> tuple[float, float]:
    torch.manual_seed(seed)
    model = TinyVL()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    villa = advlab.VILLA(model, steps=2, kl_weight=1.0, mode="joint",
                         perturbations={"txt": advlab.Perturbation(step_size=0.1), "img": advlab.Perturbation(step_size=0.4)})
    ids, img, y = data
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 128):
            b = perm[i : i + 128]
            fwd = lambda b=b: model(ids[b], img[b])
            if arm == "VILLA":
                villa.step(fwd, lambda out, b=b: F.cross_entropy(out, y[b]))
            else:
                F.cross_entropy(fwd(), y[b]).backward()
            opt.step()
            opt.zero_grad()
    t_ids, t_img, t_y = test
    model.eval()
    with torch.no_grad():
        clean = (model(t_ids, t_img).argmax(-1) == t_y).float().mean().item()
    robust = attacked_accuracy(model, t_ids, t_img, t_y, radius_txt=0.2, radius_img=0.8)
    return clean, robust


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(2)
    data, test = make_data(2048, seed=0), make_data(512, seed=1)
    print(f"{'arm':<10}{'clean acc':>12}{'attacked acc':>15}{'seconds':>10}")
    for arm in ("baseline", "VILLA"):
        start = time.perf_counter()
        runs = [train(arm, seed, args.epochs, data, test) for seed in range(args.seeds)]
        clean = [c for c, _ in runs]
        robust = [r for _, r in runs]
        sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0
        print(f"{arm:<10}{statistics.mean(clean):>7.3f}±{sd(clean):.3f}{statistics.mean(robust):>10.3f}±{sd(robust):.3f}"
              f"{time.perf_counter() - start:>10.1f}")


if __name__ == "__main__":
    main()
