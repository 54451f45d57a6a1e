"""Per-modality embedding hooks: the only place advlab registers and removes hooks.

`SiteHooks` puts one hook on each site module, stores the perturbation δ of every call of
every site, adds it (cast to the site tensor's dtype) when the modality is active, counts
calls and checks shapes. It also measures, at every perturbed forward, how much of δ
actually reaches the model: `(x + δ) - x` computed in the site's dtype, whose norm is
smaller than δ's when a bfloat16 / float16 embedding rounds a small δ away. For a relative
`Perturbation` it measures the clean embedding's norm per row (`embedding_scale`) at the
first forward. `perturb_sites` is the public context manager for adding fixed
perturbations (for example to evaluate a trained model under attack).

On a model prepared with `advlab.compiled.prepare_for_compile` (to be compiled), `SiteHooks`
registers nothing: the model's permanent hooks add δ, which `SiteHooks` hands them before
each forward, and it draws every δ₀ a forward needs before that forward, in the sites' order.

Site tensors are `[b, n, d]` or `[b, d]`; a site with a `layout` may have more dimensions
(`[b, c, h, w]` with `layout="channels_first"`), which are viewed as `[b, h*w, c]`.

Draw order of the initial δ₀. Each call of each perturbed site draws its δ₀ once per
`SiteHooks` (one step), from its `Perturbation`'s `init` sampler and the `generator`, in the
sites' order: modality by modality as the sites are listed (the order of `resolve_sites`),
call 0, 1, ... within a modality, the order in which random directions are drawn too. A δ₀
is drawn only when the δ₀ listed before it are drawn: a perturbed forward first draws every
earlier-listed δ₀ still missing, also of a modality it does not perturb (which keeps it for
a later forward of the step). When an earlier forward (a recipe's clean forward) recorded
the shapes and the model runs the sites in another order than listed, every δ₀ that
forward needs is drawn, in the sites' order, before it starts; when the model runs them in
the listed order, each δ₀ is drawn at its site's call, so the random streams are unchanged
(also the global RNG's, with `generator=None`, between the model's own dropout draws).

Limitation: where no earlier forward of the step recorded a site's shape (the first
perturbed forward of FreeLB and FastAT, or of `free_training` without `ft.clean`), its δ₀
cannot be drawn before the site runs. A model that runs a later-listed site first then
draws that site's δ₀ first, in the order it runs the sites, and `SiteHooks` warns once per
site (unless one of the two samplers is a `ZeroSampler`). List the sites in the order the
model runs them, or run a clean forward first, to draw in the listed order.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from advlab._checks import apply_mask, as_bool_mask, broadcast_mask, check_tensor, compute_dtype
from advlab._errors import AdvlabTypeError, AdvlabValueError
from advlab.perturbation import Perturbation, embedding_scale
from advlab.samplers import ZeroSampler
from advlab.sites import Site, SiteLike, _add_fixed, _from_positions, _positions_shape, _to_positions, resolve_sites

__all__ = ["SiteHooks", "perturb_sites", "check_not_compiled"]

MaskLike = Tensor | Sequence[Tensor] | None
LOST_FRACTION_WARNING = 0.5  # warn when less than this fraction of δ's norm reaches the model

_running = threading.local()  # the SiteHooks whose forward runs now in this thread (re-entrance check)
_warned_lost: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()
_warned_order: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()


def _mean_norm(x: Tensor, norm: str) -> Tensor:
    """Mean per-row (per-position for "l2_token") norm of a [b, n, d] / [b, d] tensor, in float32 or more."""
    x = x.to(compute_dtype(x))
    if norm == "l2_token":
        return torch.linalg.vector_norm(x, dim=-1).mean()
    dims = tuple(range(1, x.dim()))
    if norm == "l2":
        return torch.linalg.vector_norm(x, dim=dims).mean()
    return x.abs().amax(dim=dims).mean()


def check_not_compiled(model: nn.Module) -> None:
    """Raise if `model` or a submodule is compiled without `prepare_for_compile` first.

    Hooks added after compilation are ignored by the compiled graph, so a compiled model
    trains adversarially only when its site hooks were installed before compiling
    (`advlab.compiled.prepare_for_compile`). A prepared model passes; which of its sites are
    prepared is checked when the sites are known (`SiteHooks`). DistributedDataParallel
    around a compiled model is refused.

    Args:
        model: The model a recipe, `free_training` or an attack was given.

    Examples:
        >>> check_not_compiled(nn.Linear(2, 2))
    """
    from advlab.compiled import compiled_modules, is_prepared

    names = compiled_modules(model)
    if not names:
        return
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        raise AdvlabValueError(
            "Expected an uncompiled model under DistributedDataParallel, but it wraps a compiled module: adversarial "
            "training of a compiled model under DDP is not supported. Train the uncompiled module under DDP."
        )
    if is_prepared(model):
        return
    where = "the model" if "" in names else f"submodule {names[0]!r}"
    raise AdvlabValueError(
        f"Expected an uncompiled model, but {where} is compiled with torch.compile: compiled graphs "
        "silently ignore or freeze hooks added after compilation, so the perturbation would not be "
        "applied. Run adversarial training on the uncompiled module, or prepare the model before compiling it: "
        "`model = advlab.compiled.prepare_for_compile(model, sites)`, then `torch.compile(model)`."
    )


@dataclass
class _SiteState:
    modality: str
    site: Site
    module: nn.Module
    name: str
    perturbation: Perturbation
    mask_arg: MaskLike = None
    calls_this_forward: int = 0
    total_calls: int = 0
    shapes: list[torch.Size | None] = field(default_factory=list)
    kinds: list[tuple[torch.dtype, torch.device] | None] = field(default_factory=list)  # at the last call
    masks: list[Tensor | None] = field(default_factory=list)
    deltas: list[Tensor | None] = field(default_factory=list)
    scales: list[Tensor | None] = field(default_factory=list)  # relative sizes: clean norm per row
    sent: list[Tensor | None] = field(default_factory=list)  # δ added at the last perturbed forward
    reached: list[Tensor | None] = field(default_factory=list)  # mean norm of (x + δ) - x, site dtype
    reach_inputs: list[tuple[Tensor, Tensor] | None] = field(default_factory=list)  # (x, δ): reached, measured lazily
    dtype: torch.dtype | None = None


class SiteHooks:
    """Hooks on every site; holds δ per modality and call, counts calls, checks shapes.

    Low-level: `free_training` and `perturb_sites` own an instance. Hooks exist between
    `install()` and `remove()` only.

    Args:
        model: The model the sites resolve against.
        sites: Modality to site (or None for `model.perturbation_sites()`).
        perturbations: Modality to `Perturbation`; only these modalities are hooked.
        masks: Modality to mask (True or 1 = real element; bool, or integer / float holding
            only 0 and 1), or a sequence of masks, one per call, for `Site(..., calls=n)`.
        generator: Randomness for the initial δ (δ is held in float32, float64 for float64 sites).

    Examples:
        >>> model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 2))
        >>> hooks = SiteHooks(model, {"txt": "0"}, {"txt": Perturbation()})
        >>> hooks.install()
        >>> out = hooks.run(lambda: model(torch.tensor([[1, 2]])), active=("txt",))
        >>> hooks.deltas("txt")[0].shape
        torch.Size([1, 2, 3])
        >>> hooks.remove()
    """

    def __init__(
        self,
        model: nn.Module,
        sites: Mapping[str, SiteLike] | None,
        perturbations: Mapping[str, Perturbation],
        *,
        masks: Mapping[str, MaskLike] | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        resolved = resolve_sites(model, sites)
        _check_perturbations(perturbations, resolved)
        masks = dict(masks or {})
        for modality in masks:
            if modality not in resolved:
                raise AdvlabValueError(
                    f"Expected `masks` keys to be modalities with a site {sorted(resolved)}, but got {modality!r}."
                )
        masks = _check_masks_eagerly(masks, {m: site.calls for m, (site, _) in resolved.items()})
        self._states: dict[str, _SiteState] = {}
        for modality, (site, module) in resolved.items():
            if modality not in perturbations:
                continue  # a site without a perturbation is simply not perturbed
            label = resolved.labels.get(modality) or type(module).__name__
            n = site.calls
            self._states[modality] = _SiteState(
                modality, site, module, label, perturbations[modality], masks.get(modality),
                shapes=[None] * n, kinds=[None] * n, masks=[None] * n, deltas=[None] * n, scales=[None] * n,
                sent=[None] * n, reached=[None] * n, reach_inputs=[None] * n,
            )
        self._generator = generator
        self._handles: list[RemovableHandle] = []
        self._active: frozenset[str] = frozenset()
        self._requires_grad: set[str] = set()
        self._running = False
        self._visits: list[tuple[str, int]] = []  # (modality, call) in the order the model first ran them
        self._slots = _prepared_slots(model, {m: (st.site, st.module, st.name) for m, st in self._states.items()})  # modality -> slot of a model prepared for compiling
        self._gates: dict[tuple[str, torch.dtype, torch.device, bool], Tensor] = {}

    # ------------------------------------------------------------------ lifetime
    def install(self) -> None:
        """Register one hook per perturbed site (a prepared model's permanent hooks serve instead)."""
        if self._handles or self._slots:
            return
        try:
            for state in self._states.values():
                if state.site.where == "output":
                    handle = state.module.register_forward_hook(self._output_hook(state))
                else:
                    handle = state.module.register_forward_pre_hook(self._input_hook(state), with_kwargs=True)
                self._handles.append(handle)
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Remove every hook this object registered (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    # ------------------------------------------------------------------ queries
    @property
    def modalities(self) -> tuple[str, ...]:
        """Perturbed modalities, in the order the sites were given."""
        return tuple(self._states)

    def deltas(self, modality: str) -> list[Tensor | None]:
        """Current δ of each call of `modality` (None before its first active forward)."""
        return self._states[modality].deltas

    def masks(self, modality: str) -> list[Tensor | None]:
        """Broadcast masks ([b, n, 1]) of each call of `modality`."""
        return self._states[modality].masks

    def scales(self, modality: str) -> list[Tensor | None]:
        """Clean embedding norm of each call of `modality` for a relative perturbation, else None.

        Measured by `embedding_scale` on the clean site tensor at its first forward:
        [b, 1, 1], or [b, n, 1] for `"l2_token"`.
        """
        return self._states[modality].scales

    def reached_norms(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Per modality: (mean norm of δ sent, mean norm of what reached the model) at its last perturbed forward.

        Both are per-row norms in the perturbation's norm, averaged over rows and calls; the
        second is `(x + δ) - x` computed in the site tensor's dtype.
        """
        out: dict[str, tuple[Tensor, Tensor]] = {}
        for m, st in self._states.items():
            for i, pending in enumerate(st.reach_inputs):
                if pending is not None:  # a prepared model's forward: measured now, outside the compiled graph
                    x, delta = pending
                    added = x + _from_positions(delta.to(x.dtype), x.shape, st.site.layout)
                    st.reached[i] = _reached_norm(st, i, x, added)
                    st.reach_inputs[i] = None
            pairs = [(a, b) for a, b in zip(st.sent, st.reached) if a is not None and b is not None]
            if pairs:
                sent = torch.stack([_mean_norm(a, st.perturbation.norm) for a, _ in pairs]).mean()
                out[m] = (sent, torch.stack([b for _, b in pairs]).mean())
        return out

    def warn_if_lost(self, sent: Mapping[str, float], reached: Mapping[str, float]) -> None:
        """Warn once per site when less than half of δ's norm reached the model."""
        for m, value in sent.items():
            got = reached.get(m)
            state = self._states.get(m)
            if state is None or got is None or not value > 0 or got >= LOST_FRACTION_WARNING * value:
                continue
            seen = _warned_lost.setdefault(state.module, set())
            if m in seen:
                continue
            seen.add(m)
            warnings.warn(
                f"Only {got / value:.0%} of the perturbation's norm reaches the model at site {state.name!r} "
                f"(modality {m!r}): added to the {state.dtype} embedding, most of δ (norm {value:.3g}) rounds away, "
                "so training is hardly adversarial. Use sizes relative to the embedding, "
                "Perturbation(..., relative=True) (in bfloat16 a relative step_size of 1e-3 or more gets through), "
                "or a larger step_size; or compute the site in float32.",
                RuntimeWarning,
                stacklevel=4,  # warn_if_lost <- collect_stats <- a recipe's step <- the caller
            )

    def total_calls(self) -> dict[str, int]:
        """How many times each site's hook ran since this object was made."""
        return {m: s.total_calls for m, s in self._states.items()}

    def set_delta(self, modality: str, call: int, delta: Tensor) -> None:
        """Replace δ of one call of `modality`."""
        self._states[modality].deltas[call] = delta

    def set_requires_grad(self, modalities: set[str]) -> None:
        """Make δ of these modalities fresh leaves that require grad; others plain tensors."""
        self._requires_grad = set(modalities)
        for modality, state in self._states.items():
            for i, d in enumerate(state.deltas):
                if d is not None:
                    state.deltas[i] = d.detach().requires_grad_(modality in self._requires_grad)

    # ------------------------------------------------------------------ running
    def run(self, forward: Callable[[], Any], active: Sequence[str] = ()) -> Any:
        """Run `forward()` once with δ added at the `active` modalities; check calls and shapes."""
        unknown = [m for m in active if m not in self._states]
        if unknown:
            raise AdvlabValueError(f"Expected active modalities among {list(self._states)}, but got {unknown}.")
        outer = getattr(_running, "hooks", None)
        if outer is not None:
            raise AdvlabValueError(
                "Expected one adversarial forward at a time, but a forward perturbing sites "
                f"{self._site_names()} started while the forward of another one (sites {outer._site_names()}) was "
                "still running: a recipe step (VILLA / FreeLB / SMART `.step`), a `free_training` forward or an "
                "attack was called from inside the model's forward or the forward closure of another. Run such "
                "steps one after the other, outside any model forward."
            )
        for state in self._states.values():
            state.calls_this_forward = 0
        if self._slots:
            return self._run_prepared(forward, frozenset(active))
        self._active = frozenset(active)
        self._draw_ahead()
        self._running = True
        _running.hooks = self
        try:
            output = forward()
        finally:
            _running.hooks = None
            self._running = False
            self._active = frozenset()
        self._check_after_forward()
        return output

    # ------------------------------------------------------------------ prepared (compiled) models
    def _run_prepared(self, forward: Callable[[], Any], active: frozenset[str]) -> Any:
        """`run` on a model prepared for compiling: δ goes to the permanent hooks' slots as graph inputs."""
        for m, slot in self._slots.items():
            if slot.fixed or slot.in_use:
                raise AdvlabValueError(
                    f"Expected one perturbation at a time at the prepared site {slot.label!r} (modality {m!r}), but "
                    "a perturb_sites block or another adversarial forward holds it; run them one after the other."
                )
        self._active = active
        try:
            if active:
                self._draw_before_forward()
            for m, state in self._states.items():
                slot = self._slots[m]
                slot.deltas, slot.gate = self._slot_inputs(state) if active else (None, None)
                slot.seen = []
                slot.in_use = True
            self._running = True
            _running.hooks = self
            try:
                output = forward()
            finally:
                _running.hooks = None
                self._running = False
                for slot in self._slots.values():
                    slot.deltas, slot.gate, slot.in_use = None, None, False
            for m, state in self._states.items():
                self._read_slot(state, self._slots[m])
        finally:
            self._active = frozenset()
        self._check_after_forward()
        return output

    def _draw_before_forward(self) -> None:
        """Draw, in the sites' order, every δ₀ a perturbed forward needs (the hooks in a graph cannot draw)."""
        pending = self._pending()
        needed = [k for k, (st, _) in enumerate(pending) if st.modality in self._active]
        if not needed:
            return
        for st, i in pending[: needed[-1] + 1]:
            perturbed = st.modality in self._active
            if st.shapes[i] is None and not self._remember_shape(st, i):
                if perturbed:
                    raise AdvlabValueError(
                        f"Expected the shape of site {st.name!r} (modality {st.modality!r}) to be known before its "
                        "first perturbed forward, but the model prepared for compiling has not run yet: δ₀ is drawn "
                        "before the forward. Run one forward of the model first (`ft.clean(...)`, or a plain call "
                        "on a batch of the training shape)."
                    )
                continue  # drawn when its shape is known
            if st.perturbation.relative and st.scales[i] is None:
                if perturbed:
                    raise AdvlabValueError(
                        f"Expected the clean embedding norm of site {st.name!r} (modality {st.modality!r}) before "
                        "its first perturbed forward, for Perturbation(relative=True): with a model prepared for "
                        "compiling δ₀ is drawn before the forward, so run `ft.clean(...)` first (VILLA and SMART "
                        "do; FreeLB and FastAT need absolute sizes on a compiled model)."
                    )
                continue
            st.deltas[i] = self._initial_delta(st, i)

    def _remember_shape(self, state: _SiteState, call: int) -> bool:
        """Take the shape of `call` from the model's last forward (FreeLB's first forward of a step)."""
        seen = self._slots[state.modality].seen
        x = seen[call] if call < len(seen) else None
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
            return False
        self._check_and_record(state, call, x, scale=False)  # the next forward's site tensor is checked against it
        return True

    def _slot_inputs(self, state: _SiteState) -> tuple[list[Tensor | None] | None, Tensor | None]:
        """δ of every call (zeros where not drawn yet) and the gate, as the compiled graph takes them."""
        grad = state.modality in self._requires_grad
        deltas: list[Tensor | None] = []
        for i, d in enumerate(state.deltas):
            shape, kind = state.shapes[i], state.kinds[i]
            if d is None and shape is not None and kind is not None:  # not perturbed in this forward: gate 0
                positions = _to_positions(torch.empty(shape, device="meta"), state.site.layout).shape
                dtype = torch.float64 if kind[0] == torch.float64 else torch.float32
                d = torch.zeros(positions, dtype=dtype, device=kind[1]).requires_grad_(grad)
            deltas.append(d)
        present = [d for d in deltas if d is not None]
        if not present:
            return None, None
        # one gate tensor per modality and value: two modalities never share one (dynamo would guard the alias)
        key = (state.modality, present[0].dtype, present[0].device, state.modality in self._active)
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = torch.full((), float(key[3]), dtype=key[1], device=key[2])
        return deltas, gate

    def _read_slot(self, state: _SiteState, slot: Any) -> None:
        """After a prepared forward: count the calls, check and record each site tensor, keep what reached."""
        seen = slot.seen
        calls = len(seen)
        state.calls_this_forward = calls
        state.total_calls += calls
        if calls > state.site.calls:
            raise AdvlabValueError(
                f"Expected site {state.name!r} (modality {state.modality!r}) to run {state.site.calls} time(s) in one "
                f"forward, but it was called {calls} times; use Site(..., calls={calls}) for one independent "
                "perturbation per call."
            )
        for i, x in enumerate(seen):
            if x is None:
                raise AdvlabValueError(
                    f"Expected site {state.name!r} (modality {state.modality!r}) to receive argument "
                    f"{state.site.arg!r}, but the module was called without it."
                )
            self._check_and_record(state, i, x)
            delta = state.deltas[i]
            if state.modality in self._active and delta is not None:
                state.sent[i] = delta.detach()
                state.reached[i] = None
                state.reach_inputs[i] = (x.detach(), delta.detach())
        slot.seen = [x.detach() if isinstance(x, Tensor) else x for x in seen]  # shapes for the next step only

    def _pending(self) -> list[tuple[_SiteState, int]]:
        """(state, call) whose δ₀ is not drawn yet, in the sites' order (the draw order)."""
        return [(st, i) for st in self._states.values() for i, d in enumerate(st.deltas) if d is None]

    def _draw_ahead(self) -> None:
        """Before a perturbed forward: draw in the sites' order the δ₀ that drawing at each call would misorder.

        Needs the shapes an earlier forward recorded. When the model's recorded call order
        already gives the sites' order, nothing is drawn here (each δ₀ is drawn at its call,
        bit-identical to drawing there unconditionally, also with the global RNG).
        """
        pending = self._pending()
        needed = [k for k, (st, _) in enumerate(pending) if st.modality in self._active]
        if not needed:
            return
        prefix = pending[: needed[-1] + 1]
        if any(st.shapes[i] is None for st, i in prefix):
            return  # not every shape is known: drawn at the calls (see the module docstring)
        rank = {key: r for r, key in enumerate(self._visits)}
        at_calls = sorted((pending[k] for k in needed), key=lambda e: rank[(e[0].modality, e[1])])
        if [(st.modality, i) for st, i in at_calls] == [(st.modality, i) for st, i in prefix]:
            return
        for st, i in prefix:
            st.deltas[i] = self._initial_delta(st, i)

    def _draw_at_call(self, state: _SiteState, call: int) -> Tensor:
        """δ₀ of `call` of `state`, drawn when the site runs; δ₀ listed before it are drawn first where possible."""
        missing: list[_SiteState] = []
        for st, i in self._pending():
            if st is state and i == call:
                break
            if st.shapes[i] is None:
                missing.append(st)
            else:
                st.deltas[i] = self._initial_delta(st, i)
        if missing:
            self._warn_order(state, missing)
        return self._initial_delta(state, call)

    def _warn_order(self, state: _SiteState, earlier: list[_SiteState]) -> None:
        if isinstance(state.perturbation.init, ZeroSampler):
            return
        random = [st for st in earlier if not isinstance(st.perturbation.init, ZeroSampler)]
        if not random:
            return
        seen = _warned_order.setdefault(state.module, set())
        if state.modality in seen:
            return
        seen.add(state.modality)
        labels = {st.modality: st.name for st in random}  # a site with calls=n is named once
        names = ", ".join(f"{m!r} (site {name!r})" for m, name in labels.items())
        warnings.warn(
            f"The initial δ of modality {state.modality!r} (site {state.name!r}) is drawn before that of {names}, "
            "listed before it: the model runs its site first, and no earlier forward of the step (a clean forward) "
            "recorded the shape of the other, so the random draws follow the order the model runs the sites, not "
            "the listed order. List the sites in the order the model runs them, or run a clean forward "
            "(`ft.clean`) before the first perturbed forward, for the listed order.",
            RuntimeWarning,
            stacklevel=2,
        )

    def _site_names(self) -> list[str]:
        return [st.name for st in self._states.values()]

    def _check_after_forward(self) -> None:
        for state in self._states.values():
            if state.calls_this_forward != state.site.calls:
                if state.calls_this_forward == 0:
                    hint = (
                        " A model prepared for compiling runs the hooks only if its graph was compiled after "
                        "prepare_for_compile: compile the prepared model, not one compiled before. Dynamo also "
                        "reuses the graph of an unprepared compiled model of the same class that ran earlier in "
                        "this process (it does not guard on hooks): call torch._dynamo.reset() before the first "
                        "step, or set torch._dynamo.config.skip_nnmodule_hook_guards = False before compiling either."
                        if self._slots else ""
                    )
                    raise AdvlabValueError(
                        f"Expected site {state.name!r} (modality {state.modality!r}) to run during the forward, "
                        f"but it was not called; check the site name and that the forward closure runs the model.{hint}"
                    )
                raise AdvlabValueError(
                    f"Expected site {state.name!r} (modality {state.modality!r}) to run {state.site.calls} time(s) "
                    f"in one forward, but it ran {state.calls_this_forward} time(s)."
                )
        batch = {
            (m if len(st.shapes) == 1 else f"{m}[call {i}]"): tuple(shape)
            for m, st in self._states.items()
            for i, shape in enumerate(st.shapes)
            if shape is not None
        }
        if len({shape[0] for shape in batch.values()}) > 1:
            raise AdvlabValueError(
                "Expected every site tensor to be batch-first with the same batch size (dimension 0), but got "
                f"shapes {batch}."
            )

    def _visit(self, state: _SiteState, x: object) -> Tensor | None:
        if not self._running:
            return None  # the model ran outside `run` (e.g. a user's own call inside the context): leave it alone
        i = state.calls_this_forward
        state.calls_this_forward += 1
        state.total_calls += 1
        if i >= state.site.calls:
            raise AdvlabValueError(
                f"Expected site {state.name!r} (modality {state.modality!r}) to run {state.site.calls} time(s) in one "
                f"forward, but it was called {i + 1} times; use Site(..., calls={i + 1}) for one independent "
                "perturbation per call."
            )
        self._check_and_record(state, i, x)
        assert isinstance(x, Tensor)
        layout = state.site.layout
        if state.modality not in self._active:
            return None
        delta = state.deltas[i]
        if delta is None:
            delta = self._draw_at_call(state, i)
            state.deltas[i] = delta
        if delta.device != x.device:
            raise AdvlabValueError(
                f"Expected δ of modality {state.modality!r} on {x.device}, but it is on {delta.device}."
            )
        out = x + _from_positions(delta.to(x.dtype), x.shape, layout)
        state.reached[i] = _reached_norm(state, i, x.detach(), out.detach())
        state.reach_inputs[i] = None
        state.sent[i] = delta.detach()  # its norm is taken once per step, in `reached_norms`
        return out

    def _check_and_record(self, state: _SiteState, i: int, x: object, *, scale: bool = True) -> None:
        """Check the site tensor of call `i`; record its shape, mask and scale at the first call of the step.

        `scale=False` records the shape only (x is another batch's tensor): no clean norm is measured.
        """
        layout = state.site.layout
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
            got = f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise AdvlabValueError(
                f"Expected the {state.site.where} of site {state.name!r} (modality {state.modality!r}) to be a "
                f"batch-first floating tensor [batch, length, dim] or [batch, dim], but got {got}."
            )
        if layout is None and x.dim() > 3:
            raise AdvlabValueError(
                f"Expected the {state.site.where} of site {state.name!r} (modality {state.modality!r}) to be "
                f"[batch, length, dim] or [batch, dim], but got a {x.dim()}-d tensor of shape {tuple(x.shape)}; "
                "for a channels-first tensor such as a convolution's [b, c, h, w] use "
                "Site(..., layout='channels_first'), for [b, *positions, dim] use Site(..., layout='channels_last')."
            )
        xv = _to_positions(x, layout)
        recorded = state.shapes[i]
        state.kinds[i] = (x.dtype, x.device)  # a δ₀ drawn at this call is drawn like x, as always
        if recorded is None:
            state.shapes[i] = x.shape
            state.dtype = x.dtype
            self._visits.append((state.modality, i))
            mask = broadcast_mask(self._mask_for(state, i, x), xv, f"masks[{state.modality!r}]")
            state.masks[i] = mask
            if state.perturbation.relative and scale:
                state.scales[i] = embedding_scale(
                    xv, state.perturbation.norm, mask=None if mask is None else mask.squeeze(-1)
                )
        elif x.shape != recorded:
            raise AdvlabValueError(
                f"Expected site {state.name!r} (modality {state.modality!r}) to see the same shape in every forward "
                f"of one step (the forward closure must be repeatable), but got {tuple(x.shape)} after "
                f"{tuple(recorded)}."
            )

    def _mask_for(self, state: _SiteState, call: int, x: Tensor) -> Tensor | None:
        mask = state.mask_arg  # its type, values and per-call count were checked in __init__
        mask = mask if mask is None or isinstance(mask, Tensor) else mask[call]
        if mask is None or state.site.layout is None or x.dim() <= 3:
            return mask
        positions = _positions_shape(x.shape, state.site.layout)
        if tuple(mask.shape) == (x.shape[0], *positions):
            return mask.reshape(x.shape[0], -1)  # [b, h, w] -> [b, h*w]
        flat = (x.shape[0], int(torch.Size(positions).numel()))
        if tuple(mask.shape) != flat:
            hint = ""
            if mask.dim() == len(positions) + 1 and all(m >= p for m, p in zip(mask.shape[1:], positions)):
                hint = (
                    "; a pixel-level mask (such as ViLT's pixel_mask) must first be reduced to the patch grid, e.g. "
                    f"F.interpolate(mask[:, None].float(), size={positions}).bool()[:, 0]"
                )
            raise AdvlabValueError(
                f"Expected `masks[{state.modality!r}]` of site {state.name!r} (layout {state.site.layout!r}, tensor "
                f"shape {tuple(x.shape)}) to have shape {(x.shape[0], *positions)} or {flat}, but got "
                f"{tuple(mask.shape)}{hint}."
            )
        return mask

    def _initial_delta(self, state: _SiteState, call: int) -> Tensor:
        """Draw δ₀ of one call, shaped like its site tensor, on the device and in the dtype of its last call."""
        shape, kind = state.shapes[call], state.kinds[call]
        assert shape is not None and kind is not None
        site_dtype, device = kind
        dtype = torch.float64 if site_dtype == torch.float64 else torch.float32  # compute_dtype of the site tensor
        positions = _to_positions(torch.empty(shape, device="meta"), state.site.layout).shape
        like = torch.zeros(positions, dtype=dtype, device=device)
        mask = state.masks[call]
        flat_mask = None if mask is None else mask.squeeze(-1)
        delta = state.perturbation.init(like, mask=flat_mask, generator=self._generator)
        if not isinstance(delta, Tensor) or delta.shape != like.shape:
            raise AdvlabValueError(
                f"Expected the sampler of modality {state.modality!r} to return a tensor of shape {tuple(like.shape)}, "
                f"but got {getattr(delta, 'shape', type(delta).__name__)}."
            )
        delta = delta.to(dtype).detach()
        scale = state.scales[call]
        if scale is not None:
            delta = delta * scale.to(dtype)  # a relative perturbation's draw is in units of the clean norm
        return delta.requires_grad_(state.modality in self._requires_grad)

    def _output_hook(self, state: _SiteState) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            return self._visit(state, output)

        return hook

    def _input_hook(self, state: _SiteState) -> Callable[..., Any]:
        arg = state.site.arg

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if not self._running:
                return None
            if isinstance(arg, int):
                if arg >= len(args):
                    raise AdvlabValueError(
                        f"Expected site {state.name!r} (modality {state.modality!r}) to receive positional argument "
                        f"{arg}, but it was called with {len(args)} positional argument(s) and keywords "
                        f"{sorted(kwargs)}; use Site(..., arg='<keyword>')."
                    )
                new = self._visit(state, args[arg])
                return None if new is None else (args[:arg] + (new,) + args[arg + 1 :], kwargs)
            if arg not in kwargs:
                raise AdvlabValueError(
                    f"Expected site {state.name!r} (modality {state.modality!r}) to receive keyword argument {arg!r}, "
                    f"but it was called with keywords {sorted(kwargs)}."
                )
            new = self._visit(state, kwargs[arg])
            return None if new is None else (args, {**kwargs, arg: new})

        return hook


@contextmanager
def perturb_sites(
    model: nn.Module,
    deltas: Mapping[str, Tensor],
    sites: Mapping[str, SiteLike] | None = None,
) -> Iterator[None]:
    """Add fixed perturbations at the sites for every forward inside the block.

    The hooks are removed on exit, also when the block raises. A delta is added as is
    (cast to the site tensor's dtype); it must broadcast against the site tensor, or a
    clear error names the site. At a site with a `layout`, a δ with fewer dimensions than
    the site tensor is read in the features-last form `[b, h*w, c]` that `SiteHooks.deltas`
    holds, and moved back to the site's layout.

    Args:
        model: The model.
        deltas: Modality to δ, a floating tensor.
        sites: Modality to site; None = `model.perturbation_sites()`.

    Examples:
        >>> model = nn.Sequential(nn.Linear(2, 2, bias=False))
        >>> with torch.no_grad():
        ...     _ = model[0].weight.copy_(torch.eye(2))
        >>> with perturb_sites(model, {"x": torch.tensor([[1.0, 0.0]])}, sites={"x": Site("0", where="input")}):
        ...     model(torch.zeros(1, 2)).detach()
        tensor([[1., 0.]])
        >>> model(torch.zeros(1, 2)).detach()
        tensor([[0., 0.]])
    """
    check_not_compiled(model)
    resolved = resolve_sites(model, sites)
    if not isinstance(deltas, Mapping):
        raise AdvlabTypeError(f"Expected `deltas` to map modality -> δ tensor, but got {type(deltas).__name__}.")
    handles: list[RemovableHandle] = []
    held: list[Any] = []  # slots of a model prepared for compiling, given back in `finally`
    try:
        for modality, delta in deltas.items():
            if modality not in resolved:
                raise AdvlabValueError(f"Expected `deltas` keys among the sites {sorted(resolved)}, but got {modality!r}.")
            if not isinstance(delta, Tensor) or not delta.is_floating_point():
                got = f"dtype {delta.dtype}" if isinstance(delta, Tensor) else type(delta).__name__
                raise AdvlabTypeError(f"Expected `deltas[{modality!r}]` to be a floating tensor, but got {got}.")
            site, module = resolved[modality]
            label = resolved.labels.get(modality) or type(module).__name__
            slot = _prepared_slots(model, {modality: (site, module, label)}).get(modality)
            if slot is not None:  # the permanent hook adds δ (broadcast as below) inside the compiled graph
                if slot.fixed or slot.in_use:
                    raise AdvlabValueError(
                        f"Expected one perturbation at a time at the prepared site {label!r} (modality {modality!r}), "
                        "but another perturb_sites block or an adversarial forward holds it."
                    )
                slot.fixed, slot.deltas, slot.modality = True, [delta], modality
                held.append(slot)
                continue

            def add(x: Tensor, delta: Tensor = delta, modality: str = modality, site: Site = site,
                    label: str = label) -> Tensor:
                return _add_fixed(x, delta, modality, site, label)

            if site.where == "output":
                handles.append(module.register_forward_hook(lambda m, a, out, add=add: add(out)))
            else:
                arg = site.arg

                def pre(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], add=add, arg=arg) -> Any:
                    if isinstance(arg, int):
                        return args[:arg] + (add(args[arg]),) + args[arg + 1 :], kwargs
                    return args, {**kwargs, arg: add(kwargs[arg])}

                handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for slot in held:
            slot.fixed, slot.deltas = False, None


def _reached_norm(state: _SiteState, call: int, x: Tensor, out: Tensor) -> Tensor:
    """Mean norm of what reached the model, `out - x` in the site's dtype (padding may hold inf or NaN)."""
    with torch.no_grad():
        reached = apply_mask(_to_positions(out - x, state.site.layout), state.masks[call])
        return _mean_norm(reached, state.perturbation.norm)


def _prepared_slots(model: nn.Module, sites: Mapping[str, tuple[Site, nn.Module, str]]) -> dict[str, Any]:
    """Modality -> slot when the model was prepared for compiling (every site must be), else empty."""
    from advlab.compiled import _find_slot, compiled_modules, is_prepared

    slots = {m: _find_slot(module, site) for m, (site, module, _) in sites.items()}
    if not any(s is not None for s in slots.values()) and not is_prepared(model) and not compiled_modules(model):
        return {}
    missing = [f"{m!r} (site {name!r})" for m, (_, _, name) in sites.items() if slots[m] is None]
    if missing:
        raise AdvlabValueError(
            "Expected every perturbed site of a model prepared for compiling (or compiled) to be prepared, but "
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: hooks added after compilation are "
            "ignored. Call `advlab.compiled.prepare_for_compile(model, sites)` with every site before compiling."
        )
    return slots


def _check_perturbations(perturbations: Mapping[str, object], sites: Mapping[str, object]) -> None:
    """Every perturbation is an `advlab.Perturbation` of a modality that has a site."""
    for modality, pert in perturbations.items():
        if modality not in sites:
            raise AdvlabValueError(
                f"Expected every perturbation to have a site, but `perturbations[{modality!r}]` has none; "
                f"sites are {sorted(sites)}."
            )
        if not isinstance(pert, Perturbation):
            raise AdvlabTypeError(
                f"Expected `perturbations[{modality!r}]` to be an advlab.Perturbation, but got {type(pert).__name__}."
            )


def _check_masks_eagerly(masks: Mapping[str, MaskLike], calls: Mapping[str, int]) -> dict[str, MaskLike]:
    """Type, values and batch size of every mask, before any forward; returns them as bool masks.

    A mask's full shape is checked against its site tensor when the site runs perturbed; this
    catches, up front, a mistake in a mask of a modality the current mode never perturbs.
    """
    batch: dict[int, list[str]] = {}
    out: dict[str, MaskLike] = {}
    for modality, mask in masks.items():
        if mask is None:
            out[modality] = None
            continue
        parts = [mask] if isinstance(mask, Tensor) else list(mask) if isinstance(mask, (list, tuple)) else None
        if parts is None:
            raise AdvlabTypeError(
                f"Expected `masks[{modality!r}]` to be a bool tensor or a list of {calls[modality]} (one per call), "
                f"but got {type(mask).__name__}."
            )
        if not isinstance(mask, Tensor) and len(parts) != calls[modality]:
            raise AdvlabValueError(
                f"Expected `masks[{modality!r}]` to be one tensor or {calls[modality]} tensors (one per call), "
                f"but got {len(parts)}."
            )
        converted = []
        for i, part in enumerate(parts):
            name = f"masks[{modality!r}]" if isinstance(mask, Tensor) else f"masks[{modality!r}][{i}]"
            part = check_tensor(part, name)
            if part.dim() < 1:
                raise AdvlabValueError(f"Expected `{name}` to have a batch dimension, but got a 0-d tensor.")
            converted.append(as_bool_mask(part, name))
            batch.setdefault(int(part.shape[0]), []).append(name)
        out[modality] = converted[0] if isinstance(mask, Tensor) else converted
    if len(batch) > 1:
        seen = "; ".join(f"{b} in {', '.join(names)}" for b, names in sorted(batch.items()))
        raise AdvlabValueError(f"Expected every mask to have the same batch size (dimension 0), but got {seen}.")
    return out

