"""Adversarial training on `torch.compile`'d models: site hooks installed once, before compiling.

`torch.compile` traces a module's hooks into its graph when it compiles and ignores hooks
registered afterwards, so the hooks that `SiteHooks` adds for one step never reach a
compiled model. `prepare_for_compile` installs one permanent hook per site *before*
compilation. The hook reads the perturbation from a slot that advlab fills before each
forward with tensors, which the compiled graph takes as inputs:

- a clean forward (or any call outside advlab): the slot holds no δ and the hook adds
  nothing;
- a perturbed forward: the slot holds δ of every call of every perturbed modality and a 0-d
  gate per modality, 1 where the modality is perturbed in this forward and 0 where it is
  not; the hook adds `gate * δ`.

The perturbed forwards of a step (joint, or one modality at a time in `"alter"`) therefore
share one graph, and new δ tensors of the same shape do not recompile. A compiled model
meets a handful of graph variants (clean and perturbed, with and without gradients, train
and eval), each compiled once during the first steps and reused afterwards (measured in
`tests/test_compile.py`).

The hook also keeps the site tensor of each call (before δ is added) in the slot, so that
shapes, masks and norms are checked and measured outside the graph, after the forward.

What a prepared model needs:

- Fixed shapes: a batch of a new shape recompiles (as for any compiled model); pad to a
  fixed length.
- δ₀ is drawn before the forward, so the shape of each perturbed site must be known: from
  an earlier forward of the step (`ft.clean`, as VILLA and SMART run), else from the last
  forward of the model (FreeLB and FastAT, whose first forward is perturbed). Before the
  model's very first forward, and for relative sizes without a clean forward, the step is
  refused with a message.
- Random numbers inside the compiled graph (dropout) come from the compiler's kernels, not
  the eager stream, so a compiled step equals the eager one only without dropout. Inductor
  draws their seeds from torch's generator, so the `"lean"` schedule's replay of the RNG
  state gives the same dropout masks (tested).

Not supported (refused with a message): `DistributedDataParallel` around a compiled model.

Shape notation:
    - b: batch size; n: positions; d: features
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from advlab._errors import AdvlabTypeError, AdvlabValueError
from advlab.sites import Site, SiteLike, _add_fixed, _from_positions, _to_positions, resolve_sites, unwrap_model

__all__ = ["compiled_modules", "is_prepared", "prepare_for_compile", "unprepare_for_compile"]


class _Slot:
    """What the permanent hook of one site reads and writes; advlab fills it around each forward.

    Attributes:
        seen: The site tensor of each call of the last forward, before δ (written by the hook).
        deltas: None (add nothing), or one δ (or None) per call.
        gate: 0-d tensor multiplying δ (1 perturbed, 0 not), or None with `fixed`.
        fixed: δ broadcasts against the site tensor and is added as is (`perturb_sites`).
        in_use: Whether an advlab forward is running with this slot.
    """

    def __init__(self, site: Site, module: nn.Module, label: str) -> None:
        self.site = site
        self.label = label
        self.module_ref = weakref.ref(module)
        self.seen: list[Any] = []
        self.deltas: list[Tensor | None] | None = None
        self.gate: Tensor | None = None
        self.fixed = False
        self.modality = ""  # the modality name used in messages while `fixed`
        self.in_use = False


@dataclass
class _Prepared:
    slots: list[_Slot] = field(default_factory=list)
    handles: list[RemovableHandle] = field(default_factory=list)


_PREPARED: weakref.WeakKeyDictionary[nn.Module, _Prepared] = weakref.WeakKeyDictionary()
_SLOTS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, int | str], _Slot]] = weakref.WeakKeyDictionary()


def _key(site: Site) -> tuple[str, int | str]:
    return (site.where, site.arg if site.where == "input" else 0)


def _find_slot(module: nn.Module, site: Site) -> _Slot | None:
    """The prepared slot of `site` on `module`, or None if the site was not prepared."""
    return _SLOTS.get(module, {}).get(_key(site))


def _optimized_module_type() -> type | tuple[()]:
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    return getattr(dynamo, "OptimizedModule", ()) if dynamo is not None else ()


def compiled_modules(model: nn.Module) -> list[str]:
    """Names of the compiled modules in `model` (`""` for the model itself).

    A module counts as compiled when it is a `torch.compile` wrapper or was compiled in place
    with `Module.compile()`. Dynamo is never imported here: if it is not loaded, nothing is
    compiled.

    Args:
        model: Any module.

    Examples:
        >>> from torch import nn
        >>> compiled_modules(nn.Linear(2, 2))
        []
    """
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    if dynamo is None:
        return []  # torch.compile and Module.compile import dynamo: never imported => nothing is compiled
    optimized = _optimized_module_type()
    out = []
    for name, module in model.named_modules(remove_duplicate=False):
        if (optimized and isinstance(module, optimized)) or getattr(module, "_compiled_call_impl", None) is not None:
            out.append(name)
    return out


def is_prepared(model: nn.Module) -> bool:
    """Whether `prepare_for_compile` prepared `model` or one of its submodules.

    Args:
        model: A module, a `torch.compile` wrapper, or a DDP / DataParallel wrapper.

    Examples:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 2))
        >>> is_prepared(model)
        False
        >>> is_prepared(prepare_for_compile(model, {"txt": "0"}))
        True
    """
    return any(m in _PREPARED for m in unwrap_model(model).modules())


def prepare_for_compile(model: nn.Module, sites: Mapping[str, SiteLike] | None = None) -> nn.Module:
    """Install advlab's site hooks permanently, so that the model can be compiled and trained adversarially.

    Call it once, before `torch.compile` (or `model.compile()`), with every site any recipe
    or attack will perturb; then compile the returned model and hand the compiled model to
    the recipe as usual. The hooks add nothing outside advlab's forwards (a plain forward
    returns what the unprepared model returns). `unprepare_for_compile` removes them.

    Args:
        model: The uncompiled model (a DDP / DataParallel wrapper is unwrapped).
        sites: Modality to site; None = `model.perturbation_sites()`. Calling again with
            more sites adds them (before compiling).

    Returns:
        `model` itself, prepared.

    Raises:
        AdvlabValueError: If `model` or a submodule is already compiled (hooks installed
            now would not be in its graph).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> import advlab
        >>> from advlab.compiled import prepare_for_compile
        >>> model = prepare_for_compile(nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 2)), {"txt": "0"})
        >>> compiled = torch.compile(model)  # train `compiled` with any recipe
        >>> ft = advlab.free_training(compiled, {"txt": "0"}, {"txt": advlab.Perturbation()})
    """
    if not isinstance(model, nn.Module):
        raise AdvlabTypeError(f"Expected `model` to be an nn.Module, but got {type(model).__name__}.")
    names = compiled_modules(model)
    if names:
        where = "the model" if "" in names else f"submodule {names[0]!r}"
        raise AdvlabValueError(
            f"Expected an uncompiled model, but {where} is already compiled: hooks installed after compilation are "
            "not part of its graph. Call prepare_for_compile on the uncompiled model, then compile it."
        )
    root = unwrap_model(model)
    resolved = resolve_sites(root, sites)
    prepared = _PREPARED.get(root)
    if prepared is None:
        prepared = _Prepared()
        # first pre-hook of the root: every forward starts with empty `seen` lists (no guard on their length)
        prepared.handles.append(root.register_forward_pre_hook(_reset_hook(prepared), prepend=True))
        _PREPARED[root] = prepared
    for modality, (site, module) in resolved.items():
        if _find_slot(module, site) is not None:
            continue
        slot = _Slot(site, module, resolved.labels.get(modality) or type(module).__name__)
        if site.where == "output":
            handle = module.register_forward_hook(_output_hook(slot))
        else:
            handle = module.register_forward_pre_hook(_input_hook(slot), with_kwargs=True)
        _SLOTS.setdefault(module, {})[_key(site)] = slot
        prepared.slots.append(slot)
        prepared.handles.append(handle)
    return model


def unprepare_for_compile(model: nn.Module) -> None:
    """Remove the hooks `prepare_for_compile` installed (idempotent); recompile afterwards.

    Args:
        model: The prepared model (or a wrapper of it).

    Examples:
        >>> from torch import nn
        >>> model = prepare_for_compile(nn.Sequential(nn.Embedding(5, 3)), {"txt": "0"})
        >>> unprepare_for_compile(model)
        >>> is_prepared(model)
        False
    """
    root = unwrap_model(model)
    for module in list(root.modules()):
        prepared = _PREPARED.pop(module, None)
        if prepared is None:
            continue
        for handle in prepared.handles:
            handle.remove()
        for slot in prepared.slots:
            site_module = slot.module_ref()
            if site_module is not None:
                _SLOTS.get(site_module, {}).pop(_key(slot.site), None)


# ---------------------------------------------------------------- the hooks (traced by dynamo)
def _reset_hook(prepared: _Prepared) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        for slot in prepared.slots:
            slot.seen = []

    return hook


def _perturb(slot: _Slot, x: Any) -> Any:
    """The site tensor with the slot's δ added (x itself when the slot holds none)."""
    slot.seen.append(x)
    deltas = slot.deltas
    if deltas is None:
        return x
    if slot.fixed:  # perturb_sites: one δ for every call, broadcast against the site tensor
        return _add_fixed(x, deltas[0], slot.modality, slot.site, slot.label)
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        return x  # a wrong site tensor is reported after the forward, with the eager path's message
    i = len(slot.seen) - 1
    if i >= len(deltas):
        return x  # one call too many: reported after the forward
    delta = deltas[i]
    if delta is None:
        return x
    layout = slot.site.layout
    positions = _to_positions(x, layout).shape
    if tuple(delta.shape) != tuple(positions):
        raise AdvlabValueError(
            f"Expected site {slot.label!r} to see a tensor of shape {tuple(delta.shape)} (features last), the shape "
            f"δ was drawn for, but got {tuple(positions)}: with a prepared (compiled) model δ₀ is drawn before the "
            "forward, from the shape of an earlier forward; run `ft.clean` first, or keep shapes fixed (pad to a "
            "fixed length)."
        )
    return x + _from_positions((slot.gate * delta).to(x.dtype), x.shape, layout)


def _output_hook(slot: _Slot) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        return _perturb(slot, output)

    return hook


def _input_hook(slot: _Slot) -> Callable[..., Any]:
    arg = slot.site.arg

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if isinstance(arg, int):
            if arg >= len(args):
                slot.seen.append(None)
                return None
            return args[:arg] + (_perturb(slot, args[arg]),) + args[arg + 1 :], kwargs
        if arg not in kwargs:
            slot.seen.append(None)
            return None
        return args, {**kwargs, arg: _perturb(slot, kwargs[arg])}

    return hook
