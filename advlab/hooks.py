"""Per-modality embedding hooks: the only place advlab registers and removes hooks.

`SiteHooks` puts one hook on each site module, stores the perturbation δ of every call of
every site, adds it (cast to the site tensor's dtype) when the modality is active, counts
calls and checks shapes. `perturb_sites` is the public context manager for adding fixed
perturbations (for example to evaluate a trained model under attack).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from advlab._checks import broadcast_mask, check_tensor, compute_dtype
from advlab._errors import AdvlabTypeError, AdvlabValueError
from advlab.perturbation import Perturbation
from advlab.sites import Site, SiteLike, resolve_sites

__all__ = ["SiteHooks", "perturb_sites", "check_not_compiled"]

MaskLike = Tensor | Sequence[Tensor] | None


def check_not_compiled(model: nn.Module) -> None:
    """Raise if `model` or any submodule is compiled: hooks added after compilation are ignored.

    Examples:
        >>> check_not_compiled(nn.Linear(2, 2))
    """
    import sys

    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    if dynamo is None:
        return  # torch.compile and Module.compile import dynamo: never imported => nothing is compiled
    optimized = getattr(dynamo, "OptimizedModule", ())
    for name, module in [("", model), *model.named_modules()]:
        if (optimized and isinstance(module, optimized)) or getattr(module, "_compiled_call_impl", None) is not None:
            where = f"submodule {name!r}" if name else "the model"
            raise AdvlabValueError(
                f"Expected an uncompiled model, but {where} is compiled with torch.compile: compiled graphs "
                "silently ignore or freeze hooks added after compilation, so the perturbation would not be "
                "applied. Run adversarial training on the uncompiled module."
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
    masks: list[Tensor | None] = field(default_factory=list)
    deltas: list[Tensor | None] = field(default_factory=list)


class SiteHooks:
    """Hooks on every site; holds δ per modality and call, counts calls, checks shapes.

    Low-level: `free_training` and `perturb_sites` own an instance. Hooks exist between
    `install()` and `remove()` only.

    Args:
        model: The model the sites resolve against.
        sites: Modality to site (or None for `model.perturbation_sites()`).
        perturbations: Modality to `Perturbation`; only these modalities are hooked.
        masks: Modality to bool mask (True = real element), or a sequence of masks, one per
            call, for `Site(..., calls=n)`.
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
        _check_masks_eagerly(masks, {m: site.calls for m, (site, _) in resolved.items()})
        self._states: dict[str, _SiteState] = {}
        for modality, (site, module) in resolved.items():
            if modality not in perturbations:
                continue  # a site without a perturbation is simply not perturbed
            label = resolved.labels.get(modality) or type(module).__name__
            n = site.calls
            self._states[modality] = _SiteState(
                modality, site, module, label, perturbations[modality], masks.get(modality),
                shapes=[None] * n, masks=[None] * n, deltas=[None] * n,
            )
        self._generator = generator
        self._handles: list[RemovableHandle] = []
        self._active: frozenset[str] = frozenset()
        self._requires_grad: set[str] = set()
        self._running = False

    # ------------------------------------------------------------------ lifetime
    def install(self) -> None:
        """Register one hook per perturbed site."""
        if self._handles:
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
        for state in self._states.values():
            state.calls_this_forward = 0
        self._active = frozenset(active)
        self._running = True
        try:
            output = forward()
        finally:
            self._running = False
            self._active = frozenset()
        self._check_after_forward()
        return output

    def _check_after_forward(self) -> None:
        for state in self._states.values():
            if state.calls_this_forward != state.site.calls:
                if state.calls_this_forward == 0:
                    raise AdvlabValueError(
                        f"Expected site {state.name!r} (modality {state.modality!r}) to run during the forward, "
                        "but it was not called; check the site name and that the forward closure runs the model."
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
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
            got = f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise AdvlabValueError(
                f"Expected the {state.site.where} of site {state.name!r} (modality {state.modality!r}) to be a "
                f"batch-first floating tensor [batch, length, dim] or [batch, dim], but got {got}."
            )
        recorded = state.shapes[i]
        if recorded is None:
            state.shapes[i] = x.shape
            state.masks[i] = broadcast_mask(self._mask_for(state, i), x, f"masks[{state.modality!r}]")
        elif x.shape != recorded:
            raise AdvlabValueError(
                f"Expected site {state.name!r} (modality {state.modality!r}) to see the same shape in every forward "
                f"of one step (the forward closure must be repeatable), but got {tuple(x.shape)} after "
                f"{tuple(recorded)}."
            )
        if state.modality not in self._active:
            return None
        delta = state.deltas[i]
        if delta is None:
            delta = self._initial_delta(state, i, x)
            state.deltas[i] = delta
        if delta.device != x.device:
            raise AdvlabValueError(
                f"Expected δ of modality {state.modality!r} on {x.device}, but it is on {delta.device}."
            )
        return x + delta.to(x.dtype)

    def _mask_for(self, state: _SiteState, call: int) -> Tensor | None:
        mask = state.mask_arg  # its type and per-call count were checked in __init__
        return mask if mask is None or isinstance(mask, Tensor) else mask[call]

    def _initial_delta(self, state: _SiteState, call: int, x: Tensor) -> Tensor:
        dtype = compute_dtype(x)
        like = torch.zeros(x.shape, dtype=dtype, device=x.device)
        mask = state.masks[call]
        flat_mask = None if mask is None else mask.squeeze(-1)
        delta = state.perturbation.init(like, mask=flat_mask, generator=self._generator)
        if not isinstance(delta, Tensor) or delta.shape != like.shape:
            raise AdvlabValueError(
                f"Expected the sampler of modality {state.modality!r} to return a tensor of shape {tuple(like.shape)}, "
                f"but got {getattr(delta, 'shape', type(delta).__name__)}."
            )
        delta = delta.to(dtype).detach()
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
    (cast to the site tensor's dtype); it must broadcast against the site tensor.

    Args:
        model: The model.
        deltas: Modality to δ.
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
    handles: list[RemovableHandle] = []
    try:
        for modality, delta in deltas.items():
            if modality not in resolved:
                raise AdvlabValueError(f"Expected `deltas` keys among the sites {sorted(resolved)}, but got {modality!r}.")
            site, module = resolved[modality]

            def add(x: Tensor, delta: Tensor = delta) -> Tensor:
                return x + delta.to(device=x.device, dtype=x.dtype)

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


def _check_masks_eagerly(masks: Mapping[str, MaskLike], calls: Mapping[str, int]) -> None:
    """Type, dtype and batch size of every mask, before any forward.

    A mask's full shape is checked against its site tensor when the site runs perturbed; this
    catches, up front, a mistake in a mask of a modality the current mode never perturbs.
    """
    batch: dict[int, list[str]] = {}
    for modality, mask in masks.items():
        if mask is None:
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
        for i, part in enumerate(parts):
            name = f"masks[{modality!r}]" if isinstance(mask, Tensor) else f"masks[{modality!r}][{i}]"
            part = check_tensor(part, name)
            if part.is_floating_point() or part.is_complex():
                raise AdvlabTypeError(f"Expected `{name}` to be a bool (or 0/1 integer) tensor, but got dtype {part.dtype}.")
            if part.dim() < 1:
                raise AdvlabValueError(f"Expected `{name}` to have a batch dimension, but got a 0-d tensor.")
            batch.setdefault(int(part.shape[0]), []).append(name)
    if len(batch) > 1:
        seen = "; ".join(f"{b} in {', '.join(names)}" for b, names in sorted(batch.items()))
        raise AdvlabValueError(f"Expected every mask to have the same batch size (dimension 0), but got {seen}.")

