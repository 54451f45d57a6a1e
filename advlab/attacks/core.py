"""`attack`: the worst-case loss of a model under bounded perturbations at its embedding sites.

The attack adds δ at the same sites that adversarial training perturbs (through
`SiteHooks`), maximises a per-example loss over δ inside each modality's ball, and keeps
each example's worst case over every step and restart. The model's parameters are never
touched: it runs in eval mode with `requires_grad` off on every parameter, and both are
restored on exit, also when the forward raises.

Shape notation:
    - b: batch size (rows); n: positions; d: features
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from advlab._checks import check_choice, check_count, check_nonnegative
from advlab._errors import AdvlabTypeError, AdvlabValueError
from advlab.attacks._engine import _attack_state, _Evaluation, _Problem, _Slot, _Worst
from advlab.attacks.apgd import run_apgd
from advlab.attacks.pgd import run_pgd
from advlab.attacks.result import AttackResult
from advlab.hooks import MaskLike, SiteHooks, check_not_compiled
from advlab.perturbation import Perturbation
from advlab.samplers import ZeroSampler
from advlab.sites import SiteLike, resolve_sites, unwrap_model

__all__ = ["Method", "attack"]

Method = Literal["pgd", "apgd"]
METHODS: tuple[str, ...] = ("pgd", "apgd")

SizeLike = float | Mapping[str, float] | None


def _per_modality(value: SizeLike, modalities: list[str], name: str) -> dict[str, float | None]:
    """A float for every modality, a mapping modality -> float, or None; each checked >= 0 and finite."""
    if value is None:
        return {m: None for m in modalities}
    if isinstance(value, Mapping):
        unknown = [m for m in value if m not in modalities]
        if unknown:
            raise AdvlabValueError(f"Expected `{name}` keys among the attacked modalities {modalities}, but got {unknown}.")
        return {m: (None if value.get(m) is None else check_nonnegative(value[m], f"{name}[{m!r}]")) for m in modalities}
    return {m: check_nonnegative(value, name) for m in modalities}  # type: ignore[arg-type]


def _check_mode(mode: object, modalities: list[str]) -> list[str]:
    if mode == "joint":
        return list(modalities)
    if isinstance(mode, str) and mode in modalities:
        return [mode]
    extra = " ('alter' is a training schedule: attack each modality with mode=<its name>)" if mode == "alter" else ""
    raise AdvlabValueError(
        f"Expected `mode` to be 'joint' or one perturbed modality {modalities}, but got {mode!r}{extra}."
    )


def attack(
    model: nn.Module,
    *,
    perturbations: Mapping[str, Perturbation],
    forward: Callable[[], Any],
    loss: Callable[[Any], Tensor],
    sites: Mapping[str, SiteLike] | None = None,
    steps: int = 20,
    restarts: int = 1,
    mode: str = "joint",
    masks: Mapping[str, MaskLike] | None = None,
    generator: torch.Generator | None = None,
    method: Method = "pgd",
    radius: float | Mapping[str, float] | None = None,
    step_size: float | Mapping[str, float] | None = None,
    logits: Callable[[Any], Tensor] | None = None,
    eval_mode: bool = True,
) -> AttackResult:
    """Find, per example, the largest loss within a ball around each modality's embedding.

    δ is added at each modality's site (as in adversarial training) and moved by `method`:

    - `"pgd"`: `steps` projected steps `δ ← project(δ + η · direction(∇δ loss))` with each
      perturbation's `step_size` η and `direction` (use `direction="sign"` for L∞);
    - `"apgd"`: APGD (Croce & Hein, 2020), which needs no step size: it starts at 2ε,
      halves it per example when progress stalls, and adds momentum (see `advlab.attacks.apgd`).

    Both evaluate the loss `steps + 1` times per restart and back-propagate `steps` times
    (the clean forward is reused as the first iterate when the start is δ = 0). The clean
    point and every iterate count: `result.loss >= result.clean_loss` per example.

    Args:
        model: The attacked model; its parameters are not changed, and neither are their
            `.grad`, their `requires_grad` flags or the modules' training flags once the
            call returns (or raises).
        perturbations: Modality to `Perturbation` (norm, step size, direction, start sampler,
            radius). Every attacked modality needs a radius, here or in `radius`.
        forward: Runs the model on the batch and returns its output (called once per
            iterate; it must be repeatable).
        loss: Output to per-example loss, shape [b]; the attack maximises it.
        sites: Modality to site; None = `model.perturbation_sites()`.
        steps: Updates of δ per restart.
        restarts: Independent runs; each example keeps its worst case over all of them.
            Restart 0 starts from each perturbation's `init` sampler (zeros by default),
            later restarts draw it again from `generator`, so give a random sampler
            (for example `SphereSampler`) for restarts to differ.
        mode: `"joint"` (every modality at once) or one modality's name (only it).
        masks: Modality to bool mask (True = real position), as in training; masked
            positions of δ stay exactly 0 and count in no norm.
        generator: Randomness of the starts (and of `direction="random"`).
        method: `"pgd"` or `"apgd"`.
        radius: Overrides the perturbations' radii: one float for all modalities or a
            mapping (a fraction of the clean row norm for `relative=True`). 0 is allowed
            here and means δ ≡ 0 for that modality (no forward is spent on it; with every
            radius 0, `result.loss` equals `result.clean_loss`).
        step_size: Overrides the perturbations' PGD step sizes (one float or a mapping).
        logits: Output to a batch-first tensor to keep at each example's worst case
            (`result.logits`) and clean (`result.clean_logits`), e.g. `advlab.free.default_logits`.
        eval_mode: Run the model in eval mode (default). False keeps its current mode:
            dropout then makes the loss random, and batch-norm running statistics update.

    Returns:
        An `AttackResult`: `loss`, `clean_loss`, `deltas` and, with `logits`, the kept logits.

    Raises:
        AdvlabValueError: A modality without a radius, an unknown mode or method, a loss
            that is not one value per example, a site that does not run.
        NonFiniteError: The loss or its gradient in δ is NaN or infinite.

    Shape:
        - loss(output): [b]
        - result.loss, result.clean_loss: [b]
        - result.deltas[m]: like modality m's site tensor, [b, n, d] or [b, d]

    Examples:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> import advlab
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 3))
        >>> ids, y = torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([0, 2])
        >>> result = advlab.attack(
        ...     model, sites={"txt": "0"},
        ...     perturbations={"txt": advlab.Perturbation(step_size=0.1, radius=0.5, norm="l2")},
        ...     forward=lambda: model(ids),
        ...     loss=lambda out: F.cross_entropy(out, y, reduction="none"),
        ...     steps=10)
        >>> bool((result.loss >= result.clean_loss).all())
        True
        >>> torch.linalg.vector_norm(result.deltas["txt"], dim=(1, 2)).round(decimals=4)
        tensor([0.5000, 0.5000])
    """
    if not isinstance(model, nn.Module):
        raise AdvlabTypeError(f"Expected `model` to be an nn.Module, but got {type(model).__name__}.")
    if not isinstance(perturbations, Mapping) or not perturbations:
        raise AdvlabValueError(
            f"Expected `perturbations` to be a non-empty mapping modality -> Perturbation, but got {perturbations!r}."
        )
    for m, p in perturbations.items():
        if not isinstance(p, Perturbation):
            raise AdvlabTypeError(
                f"Expected `perturbations[{m!r}]` to be an advlab.Perturbation, but got {type(p).__name__}."
            )
    for name, fn in (("forward", forward), ("loss", loss)):
        if not callable(fn):
            raise AdvlabTypeError(f"Expected `{name}` to be callable, but got {type(fn).__name__}.")
    if logits is not None and not callable(logits):
        raise AdvlabTypeError(f"Expected `logits` to be callable or None, but got {type(logits).__name__}.")
    steps = check_count(steps, "steps")
    restarts = check_count(restarts, "restarts")
    check_choice(method, METHODS, "method")
    if not isinstance(eval_mode, bool):
        raise AdvlabTypeError(f"Expected `eval_mode` to be a bool, but got {eval_mode!r}.")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise AdvlabTypeError(f"Expected `generator` to be a torch.Generator or None, but got {type(generator).__name__}.")
    if torch.is_inference_mode_enabled():
        raise AdvlabValueError(
            "Expected to run outside torch.inference_mode(): an attack needs gradients with respect to δ "
            "(torch.no_grad() around the call is fine)."
        )
    group = _check_mode(mode, list(perturbations))
    radii = _per_modality(radius, group, "radius")
    steps_override = _per_modality(step_size, group, "step_size")
    for m in group:
        if radii[m] is None:
            radii[m] = perturbations[m].radius
        if radii[m] is None:
            raise AdvlabValueError(
                f"Expected a radius for modality {m!r}: an attack without a bound has no worst case. Give "
                f"`Perturbation(radius=...)` or `attack(..., radius=...)`; got radius=None."
            )
        if not math.isfinite(radii[m]):  # type: ignore[arg-type]
            raise AdvlabValueError(f"Expected a finite radius for modality {m!r}, but got {radii[m]!r}.")
    if method == "apgd":
        for m in group:
            if perturbations[m].direction == "random" and radii[m]:
                raise AdvlabValueError(
                    f"Expected a gradient direction for method='apgd', but `perturbations[{m!r}]` has "
                    "direction='random'; use method='pgd' for a random-noise baseline."
                )
    attacked = [m for m in group if radii[m]]
    if restarts > 1 and attacked and all(isinstance(perturbations[m].init, ZeroSampler) for m in attacked):
        warnings.warn(
            f"restarts={restarts} with zero starts repeats one deterministic attack; give the perturbations a "
            "random `init` (for example advlab.SphereSampler) for restarts to differ.",
            stacklevel=2,
        )
    check_not_compiled(model)
    resolved = resolve_sites(unwrap_model(model), sites)
    missing = [m for m in perturbations if m not in resolved]
    if missing:
        raise AdvlabValueError(
            f"Expected every perturbation to have a site, but {missing} have none; sites are {sorted(resolved)}."
        )
    # δ = 0 at the start of the clean forward; the attack draws its own starts
    zero_init = {m: replace(perturbations[m], init=ZeroSampler()) for m in group}
    hooks = SiteHooks(unwrap_model(model), resolved, zero_init, masks=masks)
    problem = _Problem(hooks, forward, loss, logits)
    zero_first = bool(attacked) and all(isinstance(perturbations[m].init, ZeroSampler) for m in attacked)
    grad_first = set(attacked) if zero_first and (method == "apgd" or any(
        perturbations[m].direction != "random" for m in attacked)) else set()
    with _attack_state(model, eval_mode):
        hooks.install()
        try:
            _, clean_loss, zeros, clean_kept = problem.clean(group, grad_first)
            slots, leaves = _slots(hooks, group, attacked, perturbations, radii, steps_override, zeros)
            problem.slots, problem.active = slots, tuple(attacked)
            worst = _Worst(clean_loss.detach(), [s.zero for s in slots], clean_kept)
            if slots:
                zero_start = None
                if zero_first:
                    grads = problem.grads_of(clean_loss, leaves) if grad_first else None
                    zero_start = _Evaluation(clean_loss.detach(), grads, clean_kept)
                runner = run_pgd if method == "pgd" else run_apgd
                runner(problem, worst, steps=steps, restarts=restarts, generator=generator, zero_start=zero_start)
                _warn_if_rounded_away(hooks, attacked)
        finally:
            hooks.remove()
    return AttackResult(
        loss=worst.loss,
        clean_loss=clean_loss.detach(),
        deltas=_collect(hooks, group, slots, worst),
        logits=worst.kept,
        clean_logits=clean_kept,
        method=method,
        steps=steps,
        restarts=restarts if slots else 0,
        forwards=problem.forwards,
        modalities=tuple(attacked),
    )


def _warn_if_rounded_away(hooks: SiteHooks, attacked: list[str]) -> None:
    """Warn when less than half of δ's norm reached the model at the last step (a low-precision site)."""
    for m, (sent, reached) in hooks.reached_norms().items():
        if m in attacked and float(sent) > 0 and float(reached) < 0.5 * float(sent):
            warnings.warn(
                f"Only {float(reached) / float(sent):.0%} of δ's norm reaches the model at modality {m!r}: added to "
                "a low-precision (bfloat16 / float16) embedding, most of it rounds away, so the attack is weaker "
                "than its radius says. Use sizes relative to the embedding (Perturbation(relative=True)), a larger "
                "radius, or compute the site in float32.",
                RuntimeWarning,
                stacklevel=3,
            )


def _slots(
    hooks: SiteHooks,
    group: list[str],
    attacked: list[str],
    perturbations: Mapping[str, Perturbation],
    radii: Mapping[str, float | None],
    steps_override: Mapping[str, float | None],
    zeros: list[Tensor],
) -> tuple[list[_Slot], list[Tensor]]:
    """One slot per call of each attacked modality; `zeros` are the clean forward's δ (all of `group`)."""
    slots: list[_Slot] = []
    leaves: list[Tensor] = []
    i = 0
    for m in group:
        for call, mask in enumerate(hooks.masks(m)):
            leaf = zeros[i]
            i += 1
            if m not in attacked:
                continue
            p = perturbations[m]
            step = steps_override.get(m)
            slots.append(_Slot(
                modality=m, call=call, perturbation=p, radius=float(radii[m]),  # type: ignore[arg-type]
                step_size=p.step_size if step is None else step,
                zero=torch.zeros_like(leaf.detach()),
                mask=None if mask is None else mask.squeeze(-1),
                scale=hooks.scales(m)[call] if p.relative else None,  # measured on the clean forward
            ))
            leaves.append(leaf)
    return slots, leaves


def _collect(hooks: SiteHooks, group: list[str], slots: list[_Slot], worst: _Worst) -> dict[str, Tensor | tuple[Tensor, ...]]:
    """Modality to its worst-case δ (zeros for radius 0); a tuple for a site called several times."""
    found = {(s.modality, s.call): d for s, d in zip(slots, worst.deltas)}
    out: dict[str, Tensor | tuple[Tensor, ...]] = {}
    for m in group:
        calls = [
            found.get((m, c), torch.zeros_like(d.detach()) if d is not None else None)
            for c, d in enumerate(hooks.deltas(m))
        ]
        out[m] = calls[0] if len(calls) == 1 else tuple(calls)  # type: ignore[assignment]
    return out
