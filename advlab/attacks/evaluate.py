"""`evaluate_robustness`: a metric under attack over a data loader, for a list of radii.

The result is a tidy `RobustnessTable`: one row per (radius, modality) with the metric
under attack beside the clean metric, which saves as CSV or JSON and draws the metric
against the radius with matplotlib (one line per model and modality).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advlab._checks import check_count, check_nonnegative
from advlab._errors import AdvlabTypeError, AdvlabValueError
from advlab._progress import progress_bar
from advlab.attacks.core import Method, attack
from advlab.free import default_logits
from advlab.hooks import MaskLike
from advlab.perturbation import Perturbation
from advlab.sites import SiteLike

__all__ = ["RobustnessTable", "accuracy", "evaluate_robustness"]

COLUMNS = ("model", "modality", "radius", "metric", "clean_metric", "loss", "clean_loss", "n", "method", "steps",
           "restarts")


def accuracy(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-example top-1 accuracy: 1.0 where `logits.argmax(-1) == targets`, else 0.0.

    Args:
        logits: Class scores.
        targets: Class indices.

    Shape:
        - logits: [b, c]; targets: [b]; output: [b]

    Examples:
        >>> import torch
        >>> from advlab.attacks import accuracy
        >>> accuracy(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0]))
        tensor([1., 0.])
    """
    return (logits.argmax(dim=-1) == targets).to(torch.float32)


def _per_example_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits, targets, reduction="none")


def _default_targets(batch: Any) -> Any:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[-1]
    if isinstance(batch, Mapping):
        for key in ("labels", "label", "targets", "target", "y"):
            if key in batch:
                return batch[key]
    raise AdvlabValueError(
        "Expected a batch that is a (inputs..., targets) tuple or a dict with a 'labels' key, but got "
        f"{type(batch).__name__}; pass `targets=` a function batch -> targets."
    )


@dataclass
class RobustnessTable:
    """The tidy result of `evaluate_robustness`: one row per model, modality and radius.

    Columns: `model`, `modality` (`"joint"` or a modality's name), `radius`, `metric` (under
    attack), `clean_metric`, `loss` and `clean_loss` (means over examples), `n` (examples),
    `method`, `steps`, `restarts`. Tables of several models concatenate with `+`.

    Examples:
        >>> from advlab.attacks import RobustnessTable
        >>> t = RobustnessTable([{"model": "a", "modality": "txt", "radius": 0.5, "metric": 0.25,
        ...                       "clean_metric": 0.75, "loss": 1.2, "clean_loss": 0.6, "n": 8,
        ...                       "method": "pgd", "steps": 10, "restarts": 1}])
        >>> row = t.rows[0]
        >>> row["metric"], row["clean_metric"], len(t + t)
        (0.25, 0.75, 2)
    """

    rows: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def __add__(self, other: RobustnessTable) -> RobustnessTable:
        if not isinstance(other, RobustnessTable):
            return NotImplemented
        return RobustnessTable([*self.rows, *other.rows])

    def to_csv(self, path: str | os.PathLike[str]) -> Path:
        """Write the rows as CSV (a header line, then one line per row); returns the path."""
        path = Path(path)
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
            writer.writeheader()
            for row in self.rows:
                writer.writerow({k: row.get(k) for k in COLUMNS})
        return path

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        """Write the rows as a JSON list of objects; returns the path."""
        path = Path(path)
        path.write_text(json.dumps(self.rows, indent=1) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> RobustnessTable:
        """Read a table written by `to_json`."""
        rows = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise AdvlabValueError(f"Expected {str(path)!r} to hold a JSON list of row objects, but it does not.")
        return cls(rows)

    def to_markdown(self, digits: int = 4) -> str:
        """The table as Markdown: model, modality, radius, metric under attack, clean metric, n."""
        lines = ["| model | modality | radius | metric | clean metric | n |", "|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r['model']} | {r['modality']} | {r['radius']:g} | {r['metric']:.{digits}f} | "
                         f"{r['clean_metric']:.{digits}f} | {r['n']} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()

    def plot(self, path: str | os.PathLike[str] | None = None, *, ylabel: str = "accuracy under attack",
             xlabel: str = "radius ε", title: str | None = None) -> Any:
        """Draw the metric against the radius, one line per model and modality.

        Needs matplotlib (`pip install 'advlab[plot]'`); the figure is built without pyplot, so
        no display or backend is needed.

        Args:
            path: Where to save the figure (PNG at 150 dpi, or any suffix matplotlib knows); None: do not save.
            ylabel: Label of the y axis (the metric).
            xlabel: Label of the x axis.
            title: Optional title.

        Returns:
            The `matplotlib.figure.Figure`.
        """
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise ImportError(
                "RobustnessTable.plot needs matplotlib, which is not installed: pip install 'advlab[plot]'"
            ) from None
        fig = Figure(figsize=(7, 3.5), constrained_layout=True)
        ax = fig.add_subplot()
        lines: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for r in self.rows:
            lines.setdefault((str(r["model"]), str(r["modality"])), []).append((float(r["radius"]), float(r["metric"])))
        several_models = len({m for m, _ in lines}) > 1
        for (model, modality), points in lines.items():
            points.sort()
            label = f"{model}, {modality}" if several_models else modality
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if title:
            ax.set_title(title)
        ax.grid(alpha=0.3)
        if lines:
            ax.legend()
        if path is not None:
            fig.savefig(path, dpi=150)
        return fig


def _mean_metric(value: object, batch: int, name: str) -> tuple[float, int]:
    """A metric's value on one batch as (sum over examples, examples): per-example [b] or a batch mean."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value) * batch, batch
    if isinstance(value, Tensor) and value.dim() == 0:
        return float(value) * batch, batch
    if isinstance(value, Tensor) and tuple(value.shape) == (batch,):
        return float(value.detach().to(torch.float64).sum()), batch
    got = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
    raise AdvlabValueError(
        f"Expected `{name}` to return one value per example (shape ({batch},)) or one number for the batch, "
        f"but got {got}."
    )


def evaluate_robustness(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    perturbations: Mapping[str, Perturbation],
    radii: Sequence[float],
    forward: Callable[[Any], Any],
    targets: Callable[[Any], Any] | None = None,
    loss: Callable[[Tensor, Any], Tensor] | None = None,
    metric: Callable[[Tensor, Any], Tensor | float] | None = None,
    logits: Callable[[Any], Tensor] = default_logits,
    sites: Mapping[str, SiteLike] | None = None,
    masks: Callable[[Any], Mapping[str, MaskLike] | None] | None = None,
    modes: Sequence[str] = ("joint",),
    method: Method = "pgd",
    steps: int = 20,
    restarts: int = 1,
    step_fraction: float | None = None,
    radius_scale: Mapping[str, float] | None = None,
    generator: torch.Generator | None = None,
    label: str = "model",
    progress: bool = True,
    eval_mode: bool = True,
) -> RobustnessTable:
    """Attack every batch of `loader` at each radius and modality; the metric under attack and clean.

    For each batch, mode and radius this runs `advlab.attack` with the per-example loss
    `loss(logits(output), targets)`, keeps the logits at each example's worst case, and
    averages `metric(logits, targets)` over the data set. Radius 0 gives the clean metric
    exactly.

    Args:
        model: The model; left as it was (see `advlab.attack`).
        loader: Batches (a `DataLoader` or any iterable).
        perturbations: Modality to `Perturbation`: its norm, direction, start sampler and
            `relative` flag are used; its radius and step size are replaced by `radii` and
            `step_fraction`.
        radii: The radii ε to evaluate (0 is allowed: the clean point). With `relative=True`
            perturbations, fractions of each row's clean embedding norm.
        forward: Batch to model output (`lambda batch: model(batch["ids"], batch["feats"])`).
        targets: Batch to targets; None takes `batch[-1]` of a tuple or `batch["labels"]`.
        loss: `(logits, targets)` to per-example loss [b], the quantity the attack raises;
            None = cross-entropy.
        metric: `(logits, targets)` to a per-example value [b] or a batch mean; None =
            top-1 accuracy (`advlab.attacks.accuracy`).
        logits: Output to the logits the loss and the metric read; default
            `advlab.free.default_logits` (a Tensor, `.logits`, or element 0 of a tuple).
        sites: Modality to site; None = `model.perturbation_sites()`.
        masks: Batch to the modality masks of that batch, or None.
        modes: Which attacks to run: `"joint"` and/or modality names; one table row each.
        method: `"pgd"` or `"apgd"`.
        steps: Updates of δ per restart.
        restarts: Restarts per attack.
        step_fraction: PGD's step size as a fraction of the radius (per modality); None =
            2.5 / steps, the rule of thumb of Madry et al. (2018). APGD ignores it.
        radius_scale: Modality to a factor on every radius, for modalities whose
            embeddings have different norms (for example `{"img": 10.0}`); None = 1.
        generator: Randomness of the starts.
        label: The `model` column, to tell models apart in a combined table and plot.
        progress: Show a tqdm progress bar (needs tqdm).
        eval_mode: Attack in eval mode (default).

    Returns:
        A `RobustnessTable` with one row per mode and radius, in the order given.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> import advlab
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(2)]
        >>> table = advlab.evaluate_robustness(
        ...     model, data, sites={"x": advlab.Site("0", where="input")},
        ...     perturbations={"x": advlab.Perturbation(norm="l2")}, radii=[0.0, 0.5, 2.0],
        ...     forward=lambda batch: model(batch[0]), steps=5, progress=False)
        >>> tuple(row["radius"] for row in table)
        (0.0, 0.5, 2.0)
        >>> clean, _, far = table.rows
        >>> clean["metric"] == clean["clean_metric"]
        True
        >>> far["metric"] <= clean["metric"]
        True
    """
    if not isinstance(model, nn.Module):
        raise AdvlabTypeError(f"Expected `model` to be an nn.Module, but got {type(model).__name__}.")
    if isinstance(radii, (int, float)) or not isinstance(radii, Sequence) or len(radii) == 0:
        raise AdvlabValueError(f"Expected `radii` to be a non-empty sequence of floats >= 0, but got {radii!r}.")
    radii = [check_nonnegative(r, "radii[]") for r in radii]
    if isinstance(modes, str) or not isinstance(modes, Sequence) or len(modes) == 0:
        raise AdvlabValueError(f"Expected `modes` to be a non-empty sequence such as ('joint', 'txt'), but got {modes!r}.")
    for mode in modes:
        if mode != "joint" and mode not in perturbations:
            raise AdvlabValueError(
                f"Expected each of `modes` to be 'joint' or a perturbed modality {list(perturbations)}, but got {mode!r}."
            )
    check_count(steps, "steps")
    fraction = 2.5 / steps if step_fraction is None else check_nonnegative(step_fraction, "step_fraction")
    scale = dict(radius_scale or {})
    for m, s in scale.items():
        if m not in perturbations:
            raise AdvlabValueError(f"Expected `radius_scale` keys among {list(perturbations)}, but got {m!r}.")
        if check_nonnegative(s, f"radius_scale[{m!r}]") == 0:
            raise AdvlabValueError(f"Expected `radius_scale[{m!r}]` > 0, but got 0.")
    get_targets = targets or _default_targets
    loss_fn = loss or _per_example_cross_entropy
    metric_fn = metric or accuracy
    try:
        total: int | None = len(loader) * len(modes) * len(radii)  # type: ignore[arg-type]
    except TypeError:  # a loader without len
        total = None
    bar = progress_bar(total=total, enabled=progress, desc="attack", unit="attack", caller="evaluate_robustness")
    sums: dict[tuple[str, float], list[float]] = {(mode, r): [0.0, 0.0, 0.0, 0.0, 0] for mode in modes for r in radii}
    try:
        for batch in loader:
            y = get_targets(batch)
            batch_masks = masks(batch) if masks is not None else None
            for mode in modes:
                for r in radii:
                    group = list(perturbations) if mode == "joint" else [mode]
                    per_modality = {m: r * scale.get(m, 1.0) for m in group}
                    result = attack(
                        model, sites=sites, perturbations=perturbations,
                        forward=lambda batch=batch: forward(batch),
                        loss=lambda out, y=y: loss_fn(logits(out), y),
                        steps=steps, restarts=restarts, mode=mode, masks=batch_masks, generator=generator,
                        method=method, radius=per_modality,
                        step_size={m: fraction * v for m, v in per_modality.items()},
                        logits=logits, eval_mode=eval_mode,
                    )
                    b = int(result.loss.shape[0])
                    adv, n = _mean_metric(metric_fn(result.logits, y), b, "metric")  # type: ignore[arg-type]
                    clean, _ = _mean_metric(metric_fn(result.clean_logits, y), b, "metric")  # type: ignore[arg-type]
                    acc = sums[(mode, r)]
                    acc[0] += adv
                    acc[1] += clean
                    acc[2] += float(result.loss.to(torch.float64).sum())
                    acc[3] += float(result.clean_loss.to(torch.float64).sum())
                    acc[4] += n
                    bar.update(1)
    finally:
        bar.close()
    rows = []
    for (mode, r), (adv, clean, lsum, csum, n) in sums.items():
        adv, clean, lsum, csum = (v / n if n else math.nan for v in (adv, clean, lsum, csum))
        rows.append({
            "model": label, "modality": mode, "radius": r, "metric": adv, "clean_metric": clean,
            "loss": lsum, "clean_loss": csum, "n": int(n), "method": method, "steps": steps,
            "restarts": restarts,
        })
    return RobustnessTable(rows)


