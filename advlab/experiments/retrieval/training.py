"""Training one run of the retrieval experiment: baseline or a perturbed arm."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import ChainedScheduler, LinearLR

from advlab._errors import AdvlabValueError, NonFiniteError
from advlab._progress import progress_bar
from advlab.experiments.retrieval.config import ARMS_FULL, RetrievalConfig
from advlab.experiments.retrieval.data import RetrievalData, _batches
from advlab.experiments.retrieval.losses import _batch_forward, _BatchOut, _kl, _task_loss
from advlab.experiments.retrieval.model import RetrievalModel
from advlab.free import free_training
from advlab.perturbation import Perturbation
from advlab.sites import resolve_sites


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


def _optimizer(model: RetrievalModel, config: RetrievalConfig) -> torch.optim.Optimizer:
    pre = [p for n, p in model.named_parameters() if n in model.pretrained_names]
    fresh = [p for n, p in model.named_parameters() if n not in model.pretrained_names]
    groups = [{"params": fresh, "lr": config.lr_fresh}]
    if pre:
        groups.append({"params": pre, "lr": config.lr})
    return torch.optim.AdamW(groups, weight_decay=0.01)


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
    opt = _optimizer(model, config)
    split = data.train
    steps_per_epoch = max(1, math.ceil(len(split) / config.batch_size))
    total = steps_per_epoch * config.epochs
    sched = _warmup_decay(opt, total)
    perts, mode = (None, "") if arm == "baseline" else _arm_perturbations(arm, config)
    sites = resolve_sites(model)  # once per run, not at every step
    itm = config.itm_weight > 0
    losses: list[float] = []
    bar = progress_bar(total=total, enabled=progress, desc=desc or arm, caller="train_run")
    model.train()
    run = f"{model.backbone_name} {arm} seed {seed}"
    try:
        for epoch in range(config.epochs):
            order = torch.randperm(len(split), generator=gen)
            epoch_loss = []
            for step_i, batch in enumerate(_batches(split, order, config.batch_size)):
                where = f"{run}, epoch {epoch + 1}/{config.epochs}, step {step_i + 1}/{steps_per_epoch}"
                opt.zero_grad(set_to_none=True)
                negatives: dict[str, Tensor] = {}
                b = batch["caption_ids"].shape[0]

                def fwd(batch: dict[str, Tensor] = batch, negatives: dict[str, Tensor] = negatives) -> _BatchOut:
                    return _batch_forward(model, batch, negatives, gen)

                if perts is None:
                    loss = _task_loss(fwd(), batch["caption_ids"], config.itm_weight)
                    _check_finite(loss, "training loss", where)
                    loss.backward()
                    epoch_loss.append(float(loss.detach()))
                else:
                    try:
                        with free_training(
                            model, sites, perts, steps=config.adv_steps, mode=mode,
                            masks={"txt": batch["attention_mask"]}, logits=lambda o: o.packed, generator=gen,
                        ) as ft:
                            clean = ft.clean(fwd)
                            clean_loss = _task_loss(clean, batch["caption_ids"], config.itm_weight)
                            _check_finite(clean_loss, "training loss", where)
                            ft.clean_loss(clean_loss)
                            for step in ft:
                                total_loss: Tensor = torch.zeros(())
                                for group in step.groups:
                                    out = ft.forward(fwd, group)
                                    total_loss = total_loss + _task_loss(out, batch["caption_ids"], config.itm_weight)
                                    total_loss = total_loss + config.kl_weight * _kl(
                                        out.packed, step.clean_logits, b, itm
                                    )
                                ft.backward(total_loss / (len(step.groups) * ft.steps))
                    except NonFiniteError as err:
                        if str(err).startswith(run):
                            raise
                        raise NonFiniteError(f"{where}: {err}") from err
                    epoch_loss.append(float(clean_loss.detach()))
                grad_norm = nn.utils.clip_grad_norm_(model.parameters(), 2.0)
                _check_finite(grad_norm, "gradient norm", where)
                opt.step()
                sched.step()
                bar.update(1)
            losses.append(sum(epoch_loss) / max(1, len(epoch_loss)))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if on_epoch is not None:
                on_epoch(epoch + 1, losses[-1])
                model.train()
    finally:
        bar.close()
    return losses


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
