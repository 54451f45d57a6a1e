"""Free adversarial training: the K-step ascent loop as a context manager.

`free_training` owns the hooks, the perturbations and the backward schedule; recipes
(`VILLA`, `FreeLB`, `SMART`) are short loops over it. A step of VILLA as its official code
runs it (each loss divided by the number of forwards of the step and by K, δ starting at 0
so that step 0 plays the clean loss) reads as follows; the paper's printed Algorithm 1
differs (an explicit clean loss, the modalities summed, δ_0 drawn in the ε-ball) and is
`VILLA(preset="paper")`:

```python
with advlab.free_training(model, sites, perturbations, steps=3, mode="alter") as ft:
    clean = ft.clean(lambda: model(**batch))              # clean forward, δ inactive
    for step in ft:                                       # K ascent steps
        loss = 0
        for group in step.groups:                         # ("txt",), ("img",) in "alter"
            out = ft.forward(lambda: model(**batch), group)
            loss = loss + task(out) + 1.5 * symmetric_kl(out, step.clean_logits)
        ft.backward(loss / (len(step.groups) * ft.steps)) # param grads accumulate; δ ascends
```

Backward schedules (identical parameter gradients):

- `"deferred"` (default): the KL terms see a detached copy of the clean logits; the
  gradient they send to it is accumulated, and one backward through the clean graph at the
  last step (`backward([loss_K, clean_logits], [1, g_clean])`) applies it.
  Each graph is back-propagated once: 1 + 3MK + 2 cost units instead of 1 + K(3M + 2).
- `"retain"`: the official code's structure, every step back-propagates through the clean
  graph again (`retain_graph=True`).
- `"lean"`: memory-lean. The clean forward runs under `no_grad` (only its logits are kept);
  at the end the clean forward is recomputed with gradients, replaying the RNG state so that
  dropout masks match (as activation checkpointing does), and back-propagated once. The RNG
  state is restored afterwards. Costs one extra forward; keeps one graph alive at a time.

Shape notation:
    - b: batch size; n: positions; d: features
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from advlab._checks import check_callable, check_choice, check_count
from advlab._errors import AdvlabTypeError, AdvlabValueError, ContextExitedError, NonFiniteError
from advlab.ascent import Ascender, PGDAscender  # Ascender stays importable from here (listed in __all__)
from advlab.balls import row_norm
from advlab.distributed import GradSync
from advlab.finite import FiniteChecks, GradSnapshot
from advlab.hooks import MaskLike, SiteHooks, check_not_compiled
from advlab.perturbation import Perturbation
from advlab.schedules import SCHEDULES, BackwardSchedule, Schedule, make_schedule  # noqa: F401 (SCHEDULES: kept importable)
from advlab.sites import SiteLike, unwrap_model
from advlab.stats import DeltaNorms

__all__ = ["Ascender", "AscentStep", "FreeTraining", "Schedule", "default_logits", "forward_groups", "free_training"]

NonFinitePolicy = Literal["raise", "skip"]


_MISSING = object()


def default_logits(output: Any) -> Tensor:
    """The logits in a model output, only where they are certain: a Tensor, or an object's `.logits` Tensor.

    Anything else is refused, tuples and lists included: `(hidden, logits)`, or Hugging Face's
    `(loss, logits)` with `return_dict=False`, do not say which element is the logits, and
    taking the wrong one would compute the regulariser on the wrong tensor without a word.
    Pass `logits=` a callable output -> logits for those.

    Args:
        output: What the forward returned.

    Examples:
        >>> import torch
        >>> from advlab.free import default_logits
        >>> default_logits(torch.ones(1, 2))
        tensor([[1., 1.]])
        >>> default_logits((torch.zeros(1, 4), torch.ones(1, 2)))
        Traceback (most recent call last):
        ...
        advlab._errors.AdvlabTypeError: Expected the forward to return a Tensor of logits or an object with a `.logits` Tensor, but got a tuple of 2 (which element is the logits is not certain); pass `logits=`, e.g. logits=lambda out: out[1].
    """
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", _MISSING)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)):
        got = f"a {type(output).__name__} of {len(output)} (which element is the logits is not certain)"
        hint = "logits=lambda out: out[1]"
    elif isinstance(output, Mapping):
        got = f"a mapping with keys {list(output)[:6]}"
        hint = "logits=lambda out: out['logits']"
    else:
        got = type(output).__name__
        if logits is not _MISSING:
            got += f" whose `.logits` is {type(logits).__name__}"
        hint = "logits=lambda out: out.scores"
    raise AdvlabTypeError(
        f"Expected the forward to return a Tensor of logits or an object with a `.logits` Tensor, but got {got}; "
        f"pass `logits=`, e.g. {hint}."
    )


def _logit_parts(logits: Any) -> tuple[list[Tensor], Callable[[list[Tensor]], Any]]:
    """The tensors of a logits value (a Tensor, or a tuple / list / dict of them) and how to rebuild it."""
    if isinstance(logits, Tensor):
        parts: list[Any] = [logits]
        rebuild: Callable[[list[Tensor]], Any] = lambda ps: ps[0]
    elif isinstance(logits, (tuple, list)) and logits:
        parts = list(logits)
        rebuild = (lambda ps: list(ps)) if isinstance(logits, list) else (lambda ps: tuple(ps))
    elif isinstance(logits, Mapping) and logits:
        keys = list(logits)
        parts = [logits[k] for k in keys]
        rebuild = lambda ps: dict(zip(keys, ps))
    else:
        parts = [logits]
        rebuild = lambda ps: ps[0]
    bad = [p for p in parts if not isinstance(p, Tensor) or not p.is_floating_point()]
    if bad:
        got = type(bad[0]).__name__ if not isinstance(bad[0], Tensor) else f"a {bad[0].dtype} tensor"
        raise AdvlabTypeError(
            "Expected the logits to be a floating tensor (or a non-empty tuple, list or dict of floating tensors, "
            f"from a `logits=` callable, for a model with several outputs), but got {got}."
        )
    return parts, rebuild


def forward_groups(mode: str, modalities: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    """Which modalities each forward of an ascent step perturbs.

    Args:
        mode: `"joint"` (all in one forward), `"alter"` (one forward per modality) or one
            modality's name (only it).
        modalities: The perturbed modalities.

    Examples:
        >>> forward_groups("alter", ["txt", "img"])
        (('txt',), ('img',))
        >>> forward_groups("joint", ["txt", "img"])
        (('txt', 'img'),)
    """
    if not modalities:
        raise AdvlabValueError("Expected at least one perturbed modality, but `perturbations` is empty.")
    if mode == "joint":
        return (tuple(modalities),)
    if mode == "alter":
        return tuple((m,) for m in modalities)
    if mode in modalities:
        return ((mode,),)
    raise AdvlabValueError(
        f"Expected `mode` to be 'joint', 'alter' or a perturbed modality {list(modalities)}, but got {mode!r}."
    )


@dataclass(frozen=True)
class AscentStep:
    """One of the K ascent steps yielded by iterating a `FreeTraining` context.

    Attributes:
        index: 0-based step number (counted separately for δ-only and training steps).
        last: True for training step K-1 (no δ update follows it).
        groups: Modalities perturbed by each forward of this step (mode-dependent).
        delta_only: True for the δ-only ascent steps (`delta_steps`) that come before the
            training steps: their `ft.backward(loss)` moves δ along the gradient of `loss`
            and leaves every parameter gradient untouched.
    """

    index: int
    last: bool
    groups: tuple[tuple[str, ...], ...]
    _owner: FreeTraining
    delta_only: bool = False

    @property
    def clean_logits(self) -> Any:
        """The clean logits to use in this step's losses (see `FreeTraining.clean_logits`)."""
        return self._owner.clean_logits


class FreeTraining:
    """The context returned by `free_training`; see that function for the arguments.

    Methods, in the order a step uses them: `clean`, iteration (`for step in ft`),
    `forward`, `accumulate` (optional, one part of a step), `backward` (or `ascend` for a
    δ-only ascent step), `clean_loss`.

    Attributes:
        skipped_steps: After the last backward: 0, or (with `on_nonfinite="skip"`) the
            number of ascent steps that had a NaN or inf; the whole step's parameter
            gradients were then put back as they were on entry.
        skip_reason: None, or what was non-finite first and where.
    """

    def __init__(
        self,
        model: nn.Module,
        sites: Mapping[str, SiteLike] | None,
        perturbations: Mapping[str, Perturbation],
        *,
        steps: int = 1,
        mode: str = "joint",
        masks: Mapping[str, MaskLike] | None = None,
        schedule: Schedule = "deferred",
        logits: Callable[[Any], Tensor] | None = None,
        scaler: Any | None = None,
        on_nonfinite: NonFinitePolicy | None = None,
        generator: torch.Generator | None = None,
        ascender: Ascender | Mapping[str, Ascender] | None = None,
        delta_steps: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise AdvlabTypeError(f"Expected `model` to be an nn.Module, but got {type(model).__name__}.")
        check_count(steps, "steps")
        if isinstance(delta_steps, bool) or not isinstance(delta_steps, int) or delta_steps < 0:
            raise AdvlabValueError(f"Expected `delta_steps` to be an int >= 0, but got {delta_steps!r}.")
        if logits is not None:
            check_callable(logits, "logits", ("output",))
        if generator is not None and not isinstance(generator, torch.Generator):
            raise AdvlabTypeError(f"Expected `generator` to be a torch.Generator or None, but got {type(generator).__name__}.")
        if scaler is not None and not (callable(getattr(scaler, "scale", None)) and callable(getattr(scaler, "get_scale", None))):
            raise AdvlabTypeError(f"Expected `scaler` to be a torch.amp.GradScaler or None, but got {type(scaler).__name__}.")
        if masks is not None and not isinstance(masks, Mapping):
            raise AdvlabTypeError(f"Expected `masks` to map modality -> mask, but got {type(masks).__name__}.")
        if not isinstance(perturbations, Mapping) or not perturbations:
            raise AdvlabValueError(
                f"Expected `perturbations` to be a non-empty mapping modality -> Perturbation, but got {perturbations!r}."
            )
        self._schedule: BackwardSchedule = make_schedule(schedule)
        if on_nonfinite is None:
            on_nonfinite = "skip" if scaler is not None else "raise"
        check_choice(on_nonfinite, ("raise", "skip"), "on_nonfinite")
        check_not_compiled(model)
        self.model = model
        self.steps = steps
        self.delta_steps = delta_steps
        self.mode = mode
        self.schedule: Schedule = schedule
        self.on_nonfinite: NonFinitePolicy = on_nonfinite
        self.scaler = scaler
        self.generator = generator
        self._logits = logits or default_logits
        groups = forward_groups(mode, list(perturbations))
        perturbed = {m for g in groups for m in g}
        active_perts = {m: p for m, p in perturbations.items() if m in perturbed}
        self._hooks = SiteHooks(unwrap_model(model), sites, active_perts, masks=masks, generator=generator)
        self.groups = groups
        self.perturbations: dict[str, Perturbation] = active_perts
        zero = [m for m, p in active_perts.items() if p.radius == 0]
        if zero:
            warnings.warn(
                f"Perturbation(radius=0) keeps δ ≡ 0 for {zero}: no perturbation reaches the model (a zero-δ "
                "control). A released config's `adv_max_norm = 0` means unbounded: use radius=None for that.",
                stacklevel=3,
            )
        # δ whose gradient is used: a "random" direction ignores it
        self._needs_grad = {m for m, p in active_perts.items() if p.direction != "random"}
        self._ascenders = self._make_ascenders(ascender)
        self._phase = "new"
        self._k: int | None = None  # the training step running (None outside them and in δ-only steps)
        self._delta_only = False
        self._stepped = False
        self._active_in_step: set[str] = set()
        self._clean_real: Any = None  # the clean logits (a Tensor, or a tuple / list / dict of tensors)
        self._clean_parts: list[Tensor] = []
        self._clean_leaves: list[Tensor | None] = []  # a detached leaf per part (deferred, lean) or None
        self._clean_view: Any = None  # what `clean_logits` returns
        self._clean_guards: list[Any] = []  # hooks on the clean logits that refuse an early backward through them
        self._in_final_backward = False
        self._clean_losses: list[Tensor] = []
        self._clean_loss_fns: list[Callable[[Any], Tensor]] = []
        self._clean_output: Any = None
        self._final_done = False
        self._sync = GradSync(model)  # owns DDP's no_sync: held from the first forward, released for the last step
        self.skipped_steps = 0
        self.skip_reason: str | None = None
        # finiteness of every loss and δ gradient of the step, as device booleans: read once, at the end
        self._checks = FiniteChecks()
        self._saved_grads: GradSnapshot | None = None
        self._loss_scale: float | None = None  # the GradScaler's scale, to unscale δ gradients
        self._settled = False

    def _make_ascenders(self, ascender: Ascender | Mapping[str, Ascender] | None) -> dict[str, Ascender]:
        if ascender is None:
            return {
                m: PGDAscender(p.step_size, p.norm, p.radius, p.direction) for m, p in self.perturbations.items()
            }
        if isinstance(ascender, Mapping):
            missing = [m for m in self.perturbations if m not in ascender]
            if missing:
                raise AdvlabValueError(f"Expected an ascender for every perturbed modality, but {missing} have none.")
            chosen = {m: ascender[m] for m in self.perturbations}
        elif not callable(ascender):
            raise AdvlabTypeError(f"Expected `ascender` to be callable, but got {type(ascender).__name__}.")
        else:
            chosen = {m: ascender for m in self.perturbations}
        for m, a in chosen.items():  # relative sizes reach the ascender as `scale=`
            if self.perturbations[m].relative and not _takes_scale(a):
                raise AdvlabValueError(
                    f"Expected the ascender of modality {m!r} to accept `scale=` (the clean embedding norm per row) "
                    f"because its Perturbation has relative=True, but {type(a).__name__} does not; use the default "
                    "ascender (PGDAscender) or absolute sizes."
                )
        return chosen

    # ------------------------------------------------------------------ context
    def __enter__(self) -> FreeTraining:
        if self._phase != "new":
            raise ContextExitedError("Expected a fresh free_training context, but this one was already entered.")
        if not torch.is_grad_enabled():
            raise AdvlabValueError(
                "Expected gradients to be enabled, but the step runs under torch.no_grad() or "
                "torch.inference_mode(): adversarial training needs the parameter and δ gradients."
            )
        self._saved_grads = GradSnapshot(unwrap_model(self.model))
        if not self._saved_grads:
            raise AdvlabValueError(
                f"Expected `model` ({type(self.model).__name__}) to have a parameter with requires_grad=True, but "
                "every parameter is frozen: the step would accumulate no gradient. Unfreeze the parameters to "
                "train (e.g. `model.requires_grad_(True)`)."
            )
        self._hooks.install()
        self._hooks.set_requires_grad(self._needs_grad)
        self._phase = "open"
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None and self._phase == "open":
                self._finish()
            elif self._phase == "open" and not self._settled and self._saved_grads is not None:
                self._saved_grads.restore()  # a step that failed midway adds nothing to the gradients
        finally:
            for guard in self._clean_guards:
                guard.remove()
            self._hooks.remove()
            self._sync.release()
            self._phase = "closed"

    def _require_open(self) -> None:
        if self._phase == "closed":
            raise ContextExitedError("Expected to be inside the free_training block, but it has exited.")
        if self._phase == "new":
            raise ContextExitedError("Expected `with free_training(...) as ft:` before use, but it was not entered.")

    # ------------------------------------------------------------------ properties
    @property
    def modalities(self) -> tuple[str, ...]:
        """The perturbed modalities."""
        return tuple(self.perturbations)

    @property
    def distributed(self) -> bool:
        """Whether `model` is DistributedDataParallel: the last step's losses then go to one `backward`."""
        return self._sync.distributed

    @property
    def hook_calls(self) -> dict[str, int]:
        """How many times each site's hook ran in this context."""
        return self._hooks.total_calls()

    def deltas(self, modality: str) -> list[Tensor | None]:
        """Current δ of each call of `modality` (None before its δ₀ is drawn)."""
        return self._hooks.deltas(modality)

    def delta_norms(self) -> DeltaNorms:
        """Mean per-row norm (in each perturbation's norm) of the current δ of each modality.

        The result also carries what reached the model at the last perturbed forward
        (`collect_stats` reports it as `StepStats.effective_delta_norm` and warns once per
        site when less than half of δ's norm got through a low-precision embedding).
        """
        out: dict[str, Tensor] = {}
        for m, p in self.perturbations.items():
            norms = [
                row_norm(d.detach(), p.norm, mask=None if mk is None else mk.squeeze(-1)).mean()
                for d, mk in zip(self._hooks.deltas(m), self._hooks.masks(m))
                if d is not None
            ]
            if norms:
                out[m] = torch.stack(norms).mean()
        return DeltaNorms(out, self._hooks.reached_norms(), self._hooks.warn_if_lost)

    @property
    def clean_logits(self) -> Any:
        """The clean logits to use in a loss.

        With the `"deferred"` and `"lean"` schedules this is a detached leaf that collects
        the gradient the losses send to the clean prediction; the last backward applies that
        gradient to the clean forward's graph once. With `"retain"` it is the clean forward's
        own logits (every backward goes through the clean graph, as in the official code).
        A `logits` callable that returns a tuple, list or dict of tensors gets the same
        structure back.
        """
        self._require_open()
        if self._clean_real is None:
            raise AdvlabValueError("Expected `ft.clean(forward)` to run before the clean logits are used.")
        return self._clean_view

    # ------------------------------------------------------------------ the step
    def clean(self, forward: Callable[[], Any]) -> Any:
        """Run the clean forward (no δ) and keep its logits for the regularisers.

        Args:
            forward: Runs the model once and returns its output.

        Returns:
            The output of `forward()` (computed without gradients in the `"lean"` schedule).
        """
        self._require_open()
        check_callable(forward, "forward")
        if self._clean_real is not None:
            raise AdvlabValueError("Expected one clean forward per context, but `clean` was called twice.")
        if self._sync.distributed and self._schedule.recomputes_clean:
            raise AdvlabValueError(
                f"Expected schedule 'deferred' or 'retain' under DistributedDataParallel, but got {self.schedule!r}: "
                "its recomputed clean forward would need a second DDP forward before one backward."
            )
        self._sync.hold()
        output = self._schedule.run_clean(lambda: self._hooks.run(forward, active=()))
        logits = self._logits(output)
        parts, rebuild = _logit_parts(logits)
        leaves = self._schedule.clean_leaves(parts)
        self._clean_real, self._clean_parts, self._clean_leaves = logits, parts, leaves
        if self._schedule.guards_clean_graph and self.steps > 1:
            self._clean_guards = [p.register_hook(self._guard_clean_graph) for p in parts if p.requires_grad]
        self._clean_view = rebuild([p if leaf is None else leaf for p, leaf in zip(parts, leaves)])
        self._clean_output = output
        return output

    def clean_loss(self, loss: Tensor | Callable[[Any], Tensor]) -> None:
        """Add a loss on the clean output; it is back-propagated with the last backward.

        Args:
            loss: The loss, or a function clean output -> loss (required by the `"lean"`
                schedule, which recomputes the clean forward at the end).
        """
        self._require_open()
        if self._final_done:
            raise AdvlabValueError(
                "Expected `clean_loss` before the last `backward` (it is back-propagated with it), but the last "
                "backward has run, so the loss would be dropped."
            )
        if callable(loss) and not isinstance(loss, Tensor):
            self._clean_loss_fns.append(loss)
            return
        if self._schedule.recomputes_clean:
            raise AdvlabValueError(
                f"Expected `clean_loss` to get a function output -> loss with schedule={self.schedule!r} (the clean "
                "forward is recomputed at the end), but got a tensor."
            )
        self._check_loss(loss)
        self._clean_losses.append(loss)

    def __iter__(self) -> Iterator[AscentStep]:
        self._require_open()
        try:
            for j in range(self.delta_steps):  # δ-only ascent steps: no parameter gradient, no DDP traffic
                self._delta_only = True
                self._stepped = False
                self._active_in_step = set()
                self._hooks.set_requires_grad(self._needs_grad)
                yield AscentStep(j, False, self.groups, self, delta_only=True)
                if not self._stepped:
                    raise AdvlabValueError(f"Expected δ-only step {j} to end with `ft.backward(loss)`, but it did not.")
            self._delta_only = False
            for k in range(self.steps):
                self._k = k
                self._stepped = False
                self._active_in_step = set()
                if k == 0 and self._clean_real is None and self.steps > 1:
                    self._sync.hold()  # no clean forward (FreeLB): steps 0..K-2 local
                if k == self.steps - 1:
                    self._sync.release()  # the last forward and the one backward outside no_sync: one all-reduce
                self._hooks.set_requires_grad(self._needs_grad)
                yield AscentStep(k, k == self.steps - 1, self.groups, self)
                if not self._stepped:
                    raise AdvlabValueError(f"Expected ascent step {k} to end with `ft.backward(loss)`, but it did not.")
        finally:
            self._k = None
            self._delta_only = False

    def forward(self, forward: Callable[[], Any], modalities: Sequence[str] | None = None) -> Any:
        """Run `forward()` with δ added at `modalities` (default: every perturbed modality).

        Args:
            forward: Runs the model once and returns its output; must see the same inputs
                at every call.
            modalities: Which modalities to perturb in this forward.
        """
        self._require_open()
        check_callable(forward, "forward")
        active = self.modalities if modalities is None else tuple(modalities)
        if isinstance(modalities, str):
            active = (modalities,)
        unknown = [m for m in active if m not in self.perturbations]
        if unknown:
            raise AdvlabValueError(f"Expected modalities among {list(self.perturbations)}, but got {unknown}.")
        output = self._hooks.run(forward, active=active)
        self._active_in_step.update(active)
        return output

    def accumulate(self, loss: Tensor) -> None:
        """Back-propagate one part of the current step's loss now, keeping the step open.

        Use it to free each forward's graph as soon as its loss is known (one part per
        forward in `"alter"` mode): parameter and δ gradients accumulate, and the step's last
        part goes to `backward`, which moves δ. Under DDP the last step's parts must go to one
        `backward` (a part back-propagated outside `no_sync` would be all-reduced early).

        Args:
            loss: Scalar part of this step's loss, weighted as it should enter the gradient.
        """
        self._require_open()
        self._check_loss(loss)
        if self._delta_only:
            raise AdvlabValueError(
                "Expected `ft.backward(loss)` in a δ-only step (it moves δ only), but got `accumulate`, which adds "
                "parameter gradients."
            )
        if self._k is None:
            raise AdvlabValueError("Expected `accumulate` inside `for step in ft:`, but no ascent step is running.")
        if self._k == self.steps - 1 and self._sync.distributed:
            raise AdvlabValueError(
                "Expected the last ascent step's loss in one `backward` under DistributedDataParallel, but got "
                "`accumulate`: its backward would be all-reduced before the rest of the step."
            )
        self._note_finite(loss, "loss")
        self._plain_backward(loss)

    def backward(self, loss: Tensor) -> None:
        """Back-propagate one ascent step's loss (or its last part) and move δ.

        Parameter gradients accumulate (".grad += ..."); δ takes one ascent step unless this
        is the last step. At the last step (or outside the iteration) the pending clean
        backward runs too, in the same backward call. In a δ-only step (`step.delta_only`)
        this is `ascend`: δ moves and no parameter gradient changes. With a `scaler`, the
        loss is scaled and δ's gradient unscaled.

        Args:
            loss: Scalar loss of this step, already weighted as it should enter the
                parameter gradient (e.g. divided by K).
        """
        self._require_open()
        if self._delta_only:
            self.ascend(loss)
            self._stepped = True
            return
        self._check_loss(loss)
        final = self._k is None or self._k == self.steps - 1
        self._stepped = True
        self._note_finite(loss, "loss")
        if final:
            self._backward_final(loss)
        else:
            self._plain_backward(loss)
            self._update_deltas(self._delta_grads_from_leaves())

    def _plain_backward(self, loss: Tensor) -> None:
        self._scale(loss).backward(retain_graph=self._schedule.retain_graph)

    def _guard_clean_graph(self, grad: Tensor) -> None:
        """Hook on the clean logits (deferred schedule): a gradient may reach them only in the last backward."""
        if not self._in_final_backward:
            raise AdvlabValueError(
                "Expected the step's loss to use `step.clean_logits` (or `ft.clean_logits`) for the clean "
                f"prediction, not the logits of the clean output itself: with schedule={self.schedule!r} the "
                "clean graph is back-propagated once, at the last step."
            )

    def ascend(self, loss: Tensor) -> None:
        """δ-only ascent step: move δ along the gradient of `loss`; no parameter gradient.

        What `backward` does in the δ-only steps that `delta_steps` adds to the iteration
        (SMART, VAT, TRADES and FastAT, whose ascent steps are not "free"); callable on its
        own as well, before the training steps.
        """
        self._require_open()
        self._check_loss(loss)
        self._note_finite(loss, "loss")
        active = [
            (m, i, d) for m in self._active_in_order() for i, d in enumerate(self._hooks.deltas(m)) if d is not None
        ]
        if not active:
            raise AdvlabValueError("Expected a perturbed forward (`ft.forward`) before `ascend`, but none ran.")
        leaves = [(m, i, d) for m, i, d in active if d.requires_grad]  # a "random" δ moves without its gradient
        grads = torch.autograd.grad(self._scale(loss), [d for _, _, d in leaves], allow_unused=True) if leaves else ()
        found = {(m, i): g for (m, i, _), g in zip(leaves, grads)}
        self._update_deltas({(m, i): found.get((m, i)) for m, i, _ in active})
        self._hooks.set_requires_grad(self._needs_grad)
        self._active_in_step = set()

    # ------------------------------------------------------------------ internals
    def _check_loss(self, loss: Tensor) -> None:
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            got = f"shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
            raise AdvlabValueError(f"Expected `loss` to be a scalar tensor, but got {got}.")
        if not loss.requires_grad:
            raise AdvlabValueError(
                "Expected `loss` to depend on a parameter with requires_grad=True (or on δ), but it does not "
                "require grad: the model's parameters the loss reaches are frozen, or the loss was computed "
                "without gradients (torch.no_grad, .detach(), .item())."
            )

    def _note_finite(self, value: Tensor, what: str, *, in_step: bool = True) -> None:
        """Record, on the device, whether `value` is finite; `_settle` reads every record at once."""
        self._checks.note(self._k if in_step else None, what, value)

    def _settle(self) -> None:
        """Apply the non-finite policy to the whole step, with one device-to-host read.

        Every loss and δ gradient of the step was recorded by `_note_finite`. If any is NaN
        or inf, the parameter gradients are put back exactly as they were when the context
        was entered (bitwise, None stays None), then `"raise"` raises and `"skip"` counts
        the ascent steps that had a non-finite value in `skipped_steps`.
        """
        if self._settled:
            return
        self._settled = True
        bad = self._checks.read(self._sync.agree)  # every rank takes the same decision (gradients were all-reduced)
        if not bad:
            return
        assert self._saved_grads is not None
        self._saved_grads.restore()
        if self.scaler is not None and getattr(self.scaler, "_scale", None) is not None:
            # the gradients the scaler would have found non-finite are gone: lower the scale as it would
            self.scaler.update(float(self.scaler.get_scale()) * float(self.scaler.get_backoff_factor()))
        k, what = bad[0]
        where = "" if k is None else f" at ascent step {k}"
        if self.on_nonfinite == "raise":
            raise NonFiniteError(
                f"Expected a finite {what}{where}, but it contains NaN or inf; the parameter gradients were left "
                "as they were before the step. Pass on_nonfinite='skip' to skip such steps (the default with a "
                "GradScaler)."
            )
        self.skipped_steps = max(1, len({k for k, _ in bad if k is not None}))  # ≥ 1 whenever the step is skipped
        self.skip_reason = f"non-finite {what}{where}; parameter gradients left as before the step"

    def _scale(self, loss: Tensor) -> Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def _backward_final(self, loss: Tensor | None) -> None:
        tensors: list[Tensor] = []
        grads: list[Tensor | None] = []
        leaves = self._clean_leaves
        leaf_grads = [None if leaf is None else leaf.grad for leaf in leaves]
        if loss is not None:
            leaf_grads = self._schedule.last_loss(self._scale(loss), leaves, leaf_grads, tensors, grads)
        clean_parts, clean_output = self._clean_parts, self._clean_output
        if self._schedule.recomputes_clean and (any(g is not None for g in leaf_grads) or self._clean_loss_fns):
            clean_output = self._schedule.recompute()
            clean_parts = _logit_parts(self._logits(clean_output))[0]
        for part, leaf_grad in zip(clean_parts, leaf_grads):
            if leaf_grad is not None:
                self._note_finite(leaf_grad, "gradient at the clean logits")
                tensors.append(part)
                grads.append(leaf_grad)
        for fn in self._clean_loss_fns:
            clean = fn(clean_output)
            self._check_loss(clean)
            self._note_finite(clean, "clean loss", in_step=False)
            tensors.append(self._scale(clean))
            grads.append(None)
        for clean in self._clean_losses:
            self._note_finite(clean, "clean loss", in_step=False)
            tensors.append(self._scale(clean))
            grads.append(None)
        if tensors:
            self._in_final_backward = True
            try:
                torch.autograd.backward(tensors, grads)  # type: ignore[arg-type]
            finally:
                self._in_final_backward = False
        self._clean_losses, self._clean_loss_fns = [], []
        for leaf in self._clean_leaves:
            if leaf is not None:
                leaf.grad = None
        self._final_done = True
        for d in self._delta_grads_from_leaves().values():  # the last step's δ gradient moves nothing, but is checked
            if d is not None:
                self._note_finite(d, "δ gradient")
        self._note_param_grads()
        self._settle()

    def _note_param_grads(self) -> None:
        """Record whether every parameter gradient is finite (a largest magnitude: no overflow, NaN propagates).

        This catches what the loss and δ checks cannot see: a finite loss whose gradient is
        non-finite only above the sites.
        """
        present = self._saved_grads.present_grads() if self._saved_grads is not None else []
        if present:
            largest = torch.nn.utils.get_total_norm(present, norm_type=float("inf"))
            self._checks.note(None, "parameter gradient (after the step's backward)", largest)

    def _finish(self) -> None:
        pending = self._clean_losses or self._clean_loss_fns or any(
            leaf is not None and leaf.grad is not None for leaf in self._clean_leaves
        )
        if pending and not self._final_done:
            self._backward_final(None)
        self._settle()

    def _active_in_order(self) -> list[str]:
        # the sites' order, never the set's: set order of strings changes with PYTHONHASHSEED, and
        # random directions are drawn from one generator in this order
        return [m for m in self._hooks.modalities if m in self._active_in_step]

    def _delta_grads_from_leaves(self) -> dict[tuple[str, int], Tensor | None]:
        out: dict[tuple[str, int], Tensor | None] = {}
        for m in self._active_in_order():
            for i, d in enumerate(self._hooks.deltas(m)):
                if d is not None:
                    out[(m, i)] = d.grad
        return out

    def _update_deltas(self, grads: Mapping[tuple[str, int], Tensor | None]) -> None:
        if not grads:
            return
        if self._loss_scale is None:  # read once per step (a host read): the scale changes only in scaler.update
            self._loss_scale = float(self.scaler.get_scale()) if self.scaler is not None else 1.0
        scale = self._loss_scale
        unscaled: dict[tuple[str, int], Tensor | None] = {}
        for key, g in grads.items():
            if g is None:
                unscaled[key] = None if self.perturbations[key[0]].direction == "random" else torch.zeros_like(
                    self._hooks.deltas(key[0])[key[1]]  # type: ignore[arg-type]
                )
            else:
                g = g.detach().to(self._hooks.deltas(key[0])[key[1]].dtype)  # type: ignore[union-attr]
                unscaled[key] = g / scale if scale != 1.0 else g
        present = [g for g in unscaled.values() if g is not None]
        # a non-finite δ gradient leaves every δ unchanged (decided on the device: no host read here)
        finite = torch.stack([torch.isfinite(g).all() for g in present]).all() if present else None
        if finite is not None:
            self._checks.note_flag(self._k, "δ gradient", finite)
        for (m, i), g in unscaled.items():
            delta = self._hooks.deltas(m)[i]
            assert delta is not None
            mask = self._hooks.masks(m)[i]
            if finite is not None and g is not None:
                g = torch.where(finite, g, torch.zeros((), dtype=g.dtype, device=g.device))
            scale = self._hooks.scales(m)[i]  # relative sizes: the clean norm per row, else None
            extra = {} if scale is None else {"scale": scale}
            new = self._ascenders[m](delta.detach(), g, mask=None if mask is None else mask.squeeze(-1),
                                     generator=self.generator, **extra)
            if finite is not None:
                new = torch.where(finite, new, delta.detach())
            self._hooks.set_delta(m, i, new.detach())


def _takes_scale(ascender: Any) -> bool:
    """Whether `ascender(..., scale=...)` is accepted (a `scale` keyword or **kwargs)."""
    import inspect

    try:
        params = inspect.signature(ascender).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "scale" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def free_training(
    model: nn.Module,
    sites: Mapping[str, SiteLike] | None,
    perturbations: Mapping[str, Perturbation],
    *,
    steps: int = 1,
    mode: str = "joint",
    masks: Mapping[str, MaskLike] | None = None,
    schedule: Schedule = "deferred",
    logits: Callable[[Any], Tensor] | None = None,
    scaler: Any | None = None,
    on_nonfinite: NonFinitePolicy | None = None,
    generator: torch.Generator | None = None,
    ascender: Ascender | Mapping[str, Ascender] | None = None,
    delta_steps: int = 0,
) -> FreeTraining:
    """Context manager for K free ascent steps whose parameter gradients accumulate.

    Hooks exist only inside the `with` block and are removed on every exit, also on an
    exception or KeyboardInterrupt.

    Args:
        model: Any nn.Module (a DDP / DataParallel wrapper is unwrapped to find the sites;
            under DDP the clean forward and steps 0..K-2 run under `no_sync`).
        sites: Modality to dotted module name, module, or `Site`; None asks
            `model.perturbation_sites()`.
        perturbations: Modality to `Perturbation`. A site without a perturbation is not
            perturbed; a perturbation without a site is an error.
        steps: K ≥ 1 ascent steps.
        mode: `"joint"`, `"alter"` or one modality's name (see `forward_groups`).
        masks: Modality to bool mask, True at real elements, shaped like the site tensor's
            dimensions before the feature dimension ([b, n] for [b, n, d]).
        schedule: `"deferred"` (one clean backward), `"retain"` (official structure) or
            `"lean"` (clean forward without a graph, recomputed at the end).
        logits: Output -> logits; default `default_logits` (a Tensor, or an object's
            `.logits`; anything else is refused). A callable may return a tuple, list or
            dict of tensors for a model with several outputs: `clean_logits` then has the
            same structure, and each part's clean-side gradient is handled like a single
            tensor's.
        scaler: A `torch.amp.GradScaler`: losses are scaled, δ gradients unscaled.
        on_nonfinite: What a NaN or inf in any loss of the step (ascent, clean or δ-only)
            or in any δ gradient does. Either way every parameter `.grad` of `model` is
            put back exactly as it was when the context was entered (the same tensor with
            the same bits; None stays None), and a non-finite δ gradient leaves δ unchanged.
            `"raise"` (the default without a scaler) then raises `NonFiniteError` naming the
            first non-finite value; `"skip"` (the default with a scaler) counts the ascent
            steps that had one in `skipped_steps`, describes it in `skip_reason`, and with a
            scaler lowers its scale by its backoff factor, as the scaler would have. The
            checks stay on the device and are read once, at the last backward (under DDP
            the ranks agree on the outcome through one all-reduce of the flags). Keeping
            the old gradients costs one copy of every `.grad` that exists on entry (none
            after `zero_grad(set_to_none=True)`). After a skipped step whose parameters had
            no gradient, do not call `scaler.step` / `scaler.update` (GradScaler refuses a
            step in which no parameter has a gradient; the scale is already lowered):
            `if not stats.skipped_steps: scaler.step(opt); scaler.update()`.
        generator: Randomness for initial δ and random directions.
        ascender: Override of the δ update (one for all modalities or one per modality);
            default `PGDAscender` from each `Perturbation`.
        delta_steps: δ-only ascent steps that iteration yields before the K training steps
            (`step.delta_only` is True): each ends with `ft.backward(loss)`, which moves δ
            along the gradient of `loss` and changes no parameter gradient (SMART, VAT,
            TRADES, FastAT).

    Returns:
        A `FreeTraining` context.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from advlab import Perturbation, free_training, symmetric_kl
        >>> model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
        >>> ids, y = torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([0, 1])
        >>> fwd = lambda: model(ids)
        >>> with free_training(model, {"txt": "0"}, {"txt": Perturbation(1e-2)}, steps=2) as ft:
        ...     _ = ft.clean(fwd)
        ...     for step in ft:
        ...         out = ft.forward(fwd)
        ...         loss = nn.functional.cross_entropy(out, y) + symmetric_kl(out, step.clean_logits)
        ...         ft.backward(loss / ft.steps)
        >>> model[2].weight.grad.shape
        torch.Size([2, 12])
    """
    return FreeTraining(
        model, sites, perturbations, steps=steps, mode=mode, masks=masks, schedule=schedule, logits=logits,
        scaler=scaler, on_nonfinite=on_nonfinite, generator=generator, ascender=ascender, delta_steps=delta_steps,
    )
