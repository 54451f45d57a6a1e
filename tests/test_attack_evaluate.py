"""evaluate_robustness and RobustnessTable: aggregation against a hand loop, radius 0, files, plot, errors."""

from __future__ import annotations

import csv
import json
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import advlab
from advlab._errors import AdvlabValueError
from advlab.attacks import RobustnessTable, accuracy
from tests.strategies import generator
from tests.tiny_models import TinyVL, tiny_batch

SITES = {"txt": "word", "img": advlab.Site("img_proj", where="input")}


def _data(sizes=(4, 3, 5)):
    model = TinyVL(seed=0).double()
    batches = []
    for i, b in enumerate(sizes):
        ids, img, tm, im, y = tiny_batch(batch=b, seed=10 + i)
        batches.append({"ids": ids, "img": img, "tm": tm, "im": im, "labels": y})
    return model, batches


def _forward(model):
    return lambda batch: model(batch["ids"], batch["img"], batch["tm"], batch["im"])


PERTS = {"txt": advlab.Perturbation(norm="l2"), "img": advlab.Perturbation(norm="linf", direction="sign")}


def test_table_matches_a_hand_loop_over_batches_of_different_sizes():
    """Metric and losses are averaged over examples, not over batches (sizes 4, 3, 5)."""
    model, batches = _data()
    radii = [0.0, 0.3, 1.0]
    table = advlab.evaluate_robustness(
        model, batches, sites=SITES, perturbations=PERTS, radii=radii, forward=_forward(model), modes=("joint", "img"),
        masks=lambda b: {"txt": b["tm"], "img": b["im"]}, steps=4, radius_scale={"img": 0.5}, progress=False,
    )
    assert [(r["modality"], r["radius"]) for r in table] == [(m, r) for m in ("joint", "img") for r in radii]
    for row in table:
        adv, clean, losses, n = [], [], [], 0
        for batch in batches:
            group = ["txt", "img"] if row["modality"] == "joint" else [row["modality"]]
            radius = {m: row["radius"] * (0.5 if m == "img" else 1.0) for m in group}
            res = advlab.attack(
                model, sites=SITES, perturbations=PERTS, forward=lambda b=batch: _forward(model)(b),
                loss=lambda out, y=batch["labels"]: F.cross_entropy(out, y, reduction="none"), steps=4,
                mode=row["modality"], masks={"txt": batch["tm"], "img": batch["im"]}, radius=radius,
                step_size={m: 2.5 / 4 * r for m, r in radius.items()}, logits=advlab.free.default_logits,
            )
            adv.append(accuracy(res.logits, batch["labels"]))
            clean.append(accuracy(res.clean_logits, batch["labels"]))
            losses.append(res.loss)
            n += len(batch["labels"])
        assert row["n"] == n == 12
        assert row["metric"] == pytest.approx(float(torch.cat(adv).double().mean()), abs=1e-12)
        assert row["clean_metric"] == pytest.approx(float(torch.cat(clean).double().mean()), abs=1e-12)
        assert row["loss"] == pytest.approx(float(torch.cat(losses).mean()), abs=1e-12)
        if row["radius"] == 0:
            assert row["metric"] == row["clean_metric"] and row["loss"] == row["clean_loss"]
        else:
            assert row["loss"] > row["clean_loss"]


def test_scalar_metric_is_weighted_by_batch_size():
    model, batches = _data(sizes=(3, 6))
    kw = dict(perturbations=PERTS, radii=[0.5], forward=_forward(model), steps=2, progress=False,
              masks=lambda b: {"txt": b["tm"], "img": b["im"]}, sites=SITES)
    per_example = advlab.evaluate_robustness(model, batches, **kw)
    batch_mean = advlab.evaluate_robustness(model, batches, metric=lambda lg, y: accuracy(lg, y).mean(), **kw)
    assert batch_mean.rows[0]["metric"] == pytest.approx(per_example.rows[0]["metric"], abs=1e-12)
    assert batch_mean.rows[0]["clean_metric"] == pytest.approx(per_example.rows[0]["clean_metric"], abs=1e-12)


def test_model_state_is_untouched_and_tuple_batches_work():
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    model.train()
    g = generator(0)
    data = [(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(2)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = advlab.evaluate_robustness(model, data, sites={"x": advlab.Site("0", where="input")},
                                       perturbations={"x": advlab.Perturbation()}, radii=[0.0, 1.0],
                                       forward=lambda b: model(b[0]), steps=3, progress=False)
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert table.rows[0]["n"] == 16


def test_files_round_trip_and_plot(tmp_path):
    model, batches = _data(sizes=(4,))
    kw = dict(perturbations=PERTS, radii=[0.0, 0.5], forward=_forward(model), steps=2, progress=False,
              sites=SITES, modes=("txt", "img"))
    table = advlab.evaluate_robustness(model, batches, label="a", **kw) + advlab.evaluate_robustness(
        model, batches, label="b", method="apgd", **kw)
    assert len(table) == 8
    back = RobustnessTable.from_json(table.to_json(tmp_path / "t.json"))
    assert back.rows == json.loads(json.dumps(table.rows))
    with open(table.to_csv(tmp_path / "t.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and rows[0]["model"] == "a" and float(rows[1]["radius"]) == 0.5
    assert "| a | txt | 0.5 |" in table.to_markdown()
    fig = table.plot(tmp_path / "t.png", title="tiny")
    assert (tmp_path / "t.png").stat().st_size > 1000
    assert len(fig.axes[0].get_lines()) == 4  # 2 models x 2 modalities


def test_plot_without_matplotlib_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"advlab\[plot\]"):
        RobustnessTable([]).plot()


def test_progress_bar_and_missing_tqdm(monkeypatch, capsys):
    model, batches = _data(sizes=(4,))
    kw = dict(perturbations=PERTS, radii=[0.5], forward=_forward(model), steps=1, sites=SITES)
    advlab.evaluate_robustness(model, batches, progress=True, **kw)
    assert "attack" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with pytest.raises(ImportError, match="pip install tqdm"):
        advlab.evaluate_robustness(model, batches, progress=True, **kw)
    advlab.evaluate_robustness(model, batches, progress=False, **kw)  # no tqdm needed


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"radii": []}, "radii"),
        ({"radii": 0.5}, "radii"),
        ({"radii": [-1.0]}, "radii"),
        ({"modes": ("alter",)}, "modes"),
        ({"modes": "joint"}, "modes"),
        ({"radius_scale": {"audio": 2.0}}, "radius_scale"),
        ({"radius_scale": {"img": 0.0}}, "radius_scale"),
        ({"metric": lambda lg, y: lg}, "metric"),
        ({"targets": lambda b: b["nope"]}, "nope"),
    ],
)
def test_errors(over, match):
    model, batches = _data(sizes=(4,))
    kw = dict(perturbations=PERTS, radii=[0.5], forward=_forward(model), steps=1, sites=SITES, progress=False)
    kw.update(over)
    with pytest.raises((AdvlabValueError, KeyError), match=match):
        advlab.evaluate_robustness(model, batches, **kw)


def test_default_targets_need_labels():
    model, batches = _data(sizes=(4,))
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    with pytest.raises(AdvlabValueError, match="targets="):
        advlab.evaluate_robustness(model, batches, perturbations=PERTS, radii=[0.5], forward=_forward(model),
                                   sites=SITES, progress=False)
