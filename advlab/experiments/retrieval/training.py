"""Training one run of the retrieval experiment: baseline or a perturbed arm; the loop both training stages share."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import ChainedScheduler, LinearLR

from advlab._errors import AdvlabValueError, NonFiniteError
from advlab._progress import progress_bar
from advlab.experiments.retrieval.config import ARMS_FULL, RetrievalConfig
from advlab.experiments.retrieval.data import RetrievalData, _batches
from advlab.experiments.retrieval.losses import _batch_forward, _kl, _task_loss
from advlab.experiments.retrieval.model import RetrievalModel
from advlab.free import free_training
from advlab.perturbation import Perturbation
from advlab.sites import ResolvedSites, resolve_sites


def _arm_perturbations(arm: str, config: RetrievalConfig) -> tuple[dict[str, Perturbation], str]:
    """The perturbations and the free-training mode of a perturbed arm.

    "zero" is VILLA joint with step size 0: the same loop, forwards, losses and KL, but δ stays 0.
    """
    direction = "random" if arm == "noise" else "gradient"
    scale = 0.0 if arm == "zero" else 1.0
    perts = {
        "txt": Perturbation(scale * config.txt_step, direction=direction, relative=config.relative),  # type: ignore[arg-type]
        "img": Perturbation(scale * config.img_step, direction=direction, relative=config.relative),  # type: ignore[arg-type]
    }
    mode = {"zero": "joint", "noise": "joint", "villa": "joint", "alter": "alter", "txt": "txt", "img": "img"}.get(arm)
    if mode is None:
        raise AdvlabValueError(f"Expected `arm` in {list(ARMS_FULL)}, but got {arm!r}.")
    return perts, mode


def _optimizer(
    model: RetrievalModel, config: RetrievalConfig, extra: Sequence[nn.Parameter] = ()
) -> torch.optim.Optimizer:
    """AdamW: MiniLM-initialised parameters at `lr`, fresh ones (and `extra`, e.g. pre-training heads) at `lr_fresh`."""
    pre = [p for n, p in model.named_parameters() if n in model.pretrained_names]
    fresh = [p for n, p in model.named_parameters() if n not in model.pretrained_names] + list(extra)
    groups = [{"params": fresh, "lr": config.lr_fresh}]
    if pre:
        groups.append({"params": pre, "lr": config.lr})
    return torch.optim.AdamW(groups, weight_decay=0.01)


@dataclass(frozen=True)
class _Stage:
    """What one training stage computes on a batch; `_fit` runs the loop (fine-tuning and pre-training share it).

    `state` holds what a batch keeps across its clean and perturbed forwards (mined negatives,
    drawn masks): `prepare` fills it once per batch, before the clean forward.
    """

    forward: Callable[[dict[str, Tensor], dict[str, Tensor]], Any]  # (batch, state) -> output
    loss: Callable[[Any, dict[str, Tensor]], Tensor]  # (output, batch) -> task loss
    kl: Callable[[Any, Any, dict[str, Tensor]], Tensor]  # (output, clean logits, batch) -> the VILLA KL
    logits: Callable[[Any], Any]  # output -> what the KL compares (free_training's `logits=`)
    prepare: Callable[[dict[str, Tensor], dict[str, Tensor]], None] | None = None  # (batch, state)
    parts: Callable[[Any, dict[str, Tensor]], dict[str, float]] | None = None  # per-task losses of the clean output


def train_run(
    model: RetrievalModel,
    data: RetrievalData,
    arm: str,
    config: RetrievalConfig,
    *,
    seed: int,
    progress: bool = True,
    desc: str = "",
    on_epoch: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train one arm: clean ITC + ITM, plus (perturbed arms) K free ascent steps with the KL.

    Args:
        model: The model, trained in place.
        data: The data (only `train` is used).
        arm: `"baseline"`, `"zero"` (VILLA's loop with step size 0), `"noise"` (random direction),
            `"villa"`, `"alter"`, `"txt"` or `"img"`.
        config: Run settings.
        seed: Seed of batch order, negative sampling, δ directions and dropout.
        progress: Show a tqdm bar.
        desc: Bar label.
        on_epoch: Called after each epoch with its number (from 1) and its mean training loss,
            e.g. to evaluate the validation split; it must not draw random numbers from torch's
            global generator (evaluation does not), or later epochs change.

    Returns:
        Mean training loss of each epoch.

    Raises:
        NonFiniteError: A training loss or gradient norm is NaN or inf; the message names the run
            (backbone, arm, seed), the epoch and the step.
    """
    torch.manual_seed(seed + 1)
    gen = torch.Generator().manual_seed(seed)
    perts, mode = (None, "") if arm == "baseline" else _arm_perturbations(arm, config)
    itm = config.itm_weight > 0
    stage = _Stage(
        forward=lambda batch, negatives: _batch_forward(model, batch, negatives, gen),
        loss=lambda out, batch: _task_loss(out, batch["caption_ids"], config.itm_weight),
        kl=lambda out, clean, batch: _kl(out.packed, clean, batch["caption_ids"].shape[0], itm),
        logits=lambda o: o.packed,
    )
    losses, _ = _fit(
        model, model, stage, data, config, epochs=config.epochs, gen=gen, perts=perts, mode=mode,
        sites=resolve_sites(model), optimizer=_optimizer(model, config), run=f"{model.backbone_name} {arm} seed {seed}",
        progress=progress, desc=desc or arm, on_epoch=on_epoch,
    )
    return losses


def _fit(
    model: RetrievalModel,
    trained: nn.Module,
    stage: _Stage,
    data: RetrievalData,
    config: RetrievalConfig,
    *,
    epochs: int,
    gen: torch.Generator,
    perts: dict[str, Perturbation] | None,
    mode: str,
    sites: ResolvedSites,
    optimizer: torch.optim.Optimizer,
    run: str,
    progress: bool,
    desc: str,
    on_epoch: Callable[[int, float], None] | None,
) -> tuple[list[float], list[dict[str, float]]]:
    """The training loop of both stages: `epochs` passes over the training split, plain or with VILLA's free steps.

    `trained` is the module whose parameters are clipped and whose gradients free training
    owns (the model, or the model with the pre-training heads). Returns the mean clean loss
    and the mean of `stage.parts` (empty without it) of each epoch.
    """
    opt = optimizer
    split = data.train
    steps_per_epoch = max(1, math.ceil(len(split) / config.batch_size))
    total = steps_per_epoch * epochs
    sched = _warmup_decay(opt, total)
    losses: list[float] = []
    parts: list[dict[str, float]] = []
    bar = progress_bar(total=total, enabled=progress, desc=desc, caller="train_run")
    trained.train()
    try:
        for epoch in range(epochs):
            order = torch.randperm(len(split), generator=gen)
            epoch_loss = []
            epoch_parts: dict[str, list[float]] = {}
            for step_i, batch in enumerate(_batches(split, order, config.batch_size)):
                where = f"{run}, epoch {epoch + 1}/{epochs}, step {step_i + 1}/{steps_per_epoch}"
                opt.zero_grad(set_to_none=True)
                state: dict[str, Tensor] = {}
                if stage.prepare is not None:
                    stage.prepare(batch, state)

                def fwd(batch: dict[str, Tensor] = batch, state: dict[str, Tensor] = state) -> Any:
                    return stage.forward(batch, state)

                if perts is None:
                    clean = fwd()
                    loss = stage.loss(clean, batch)
                    _check_finite(loss, "training loss", where)
                    loss.backward()
                    epoch_loss.append(float(loss.detach()))
                else:
                    try:
                        with free_training(
                            trained, sites, perts, steps=config.adv_steps, mode=mode,
                            masks={"txt": batch["attention_mask"]}, logits=stage.logits, generator=gen,
                        ) as ft:
                            clean = ft.clean(fwd)
                            clean_loss = stage.loss(clean, batch)
                            _check_finite(clean_loss, "training loss", where)
                            ft.clean_loss(clean_loss)
                            for step in ft:
                                total_loss: Tensor = torch.zeros(())
                                for group in step.groups:
                                    out = ft.forward(fwd, group)
                                    total_loss = total_loss + stage.loss(out, batch)
                                    total_loss = total_loss + config.kl_weight * stage.kl(out, step.clean_logits, batch)
                                ft.backward(total_loss / (len(step.groups) * ft.steps))
                    except NonFiniteError as err:
                        if str(err).startswith(run):
                            raise
                        raise NonFiniteError(f"{where}: {err}") from err
                    epoch_loss.append(float(clean_loss.detach()))
                if stage.parts is not None:
                    for name, value in stage.parts(clean, batch).items():
                        epoch_parts.setdefault(name, []).append(value)
                grad_norm = nn.utils.clip_grad_norm_(trained.parameters(), 2.0)
                _check_finite(grad_norm, "gradient norm", where)
                opt.step()
                sched.step()
                bar.update(1)
            losses.append(sum(epoch_loss) / max(1, len(epoch_loss)))
            parts.append({name: sum(v) / len(v) for name, v in epoch_parts.items()})
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if on_epoch is not None:
                on_epoch(epoch + 1, losses[-1])
                trained.train()
    finally:
        bar.close()
    return losses, parts


def _check_finite(value: Tensor, what: str, where: str) -> None:
    """Stop a run whose loss or gradient is NaN or inf, naming the run, the epoch and the step."""
    if not bool(torch.isfinite(value.detach()).all()):
        raise NonFiniteError(
            f"{where}: the {what} is {float(value.detach()):g}; training diverged or an input holds NaN or inf "
            "(check the features, or lower the learning rates or step sizes). No record is written for this run."
        )


def _warmup_decay(opt: torch.optim.Optimizer, total: int) -> ChainedScheduler:
    """Learning rate × min(1, (s + 1) / w) × (1 − s / total) at step s, with w = max(1, total // 10).

    A linear warm-up over the first tenth of the run and a linear decay to 0 over the whole run,
    both from step 0: `ChainedScheduler` multiplies the two `LinearLR` factors at every step.
    (`SequentialLR` would run them one after the other, a different schedule: up to 10 % more
    during the warm-up.) The rates equal the closed form to about 1e-14 relatively, not to the
    bit: `LinearLR` updates the rate step by step.
    """
    warm = max(1, total // 10)
    return ChainedScheduler(
        [
            LinearLR(opt, start_factor=1.0 / warm, end_factor=1.0, total_iters=warm - 1),  # (s + 1) / w up to 1
            LinearLR(opt, start_factor=1.0, end_factor=0.0, total_iters=total),  # 1 - s / total
        ],
        optimizer=opt,
    )
