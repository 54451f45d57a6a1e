"""Private validation helpers shared by the pieces and the engine."""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import Tensor, nn

from advlab._errors import AdvlabTypeError, AdvlabValueError


def check_tensor(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise AdvlabTypeError(f"Expected `{name}` to be a torch.Tensor, but got {type(x).__name__}.")
    return x


def check_float_tensor(x: object, name: str, min_dim: int = 1) -> Tensor:
    x = check_tensor(x, name)
    if not x.is_floating_point():
        raise AdvlabTypeError(f"Expected `{name}` to be a floating-point tensor, but got dtype {x.dtype}.")
    if x.dim() < min_dim:
        raise AdvlabValueError(f"Expected `{name}` to have at least {min_dim} dimensions, but got shape {tuple(x.shape)}.")
    return x


def check_callable(fn: Any, name: str, args: tuple[str, ...] = ()) -> Any:
    """`fn` if it is callable and, where its signature can be read, accepts the positional `args`."""
    if not callable(fn):
        raise AdvlabTypeError(f"Expected `{name}` to be callable, but got {type(fn).__name__}.")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins and some C callables have none: trust them
        return fn
    try:
        signature.bind(*args)
    except TypeError:
        want = f"({', '.join(args)})" if args else "()"
        raise AdvlabTypeError(
            f"Expected `{name}` to be callable as {name}{want}, but its signature is {signature}."
        ) from None
    return fn


def check_module(model: object, name: str = "model") -> nn.Module:
    if not isinstance(model, nn.Module):
        raise AdvlabTypeError(f"Expected `{name}` to be an nn.Module, but got {type(model).__name__}.")
    return model


def check_scalar(x: object, name: str) -> Tensor:
    """`x` as a one-element floating tensor; `name` says where it came from (e.g. "`task_loss` output")."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.numel() != 1:
        got = f"shape {tuple(x.shape)} ({x.dtype})" if isinstance(x, Tensor) else type(x).__name__
        raise AdvlabValueError(f"Expected the {name} to be a scalar floating tensor, but got {got}.")
    return x


def check_radius(radius: float | None, name: str = "radius", *, allow_zero: bool = False) -> float | None:
    if radius is None:
        return None
    if isinstance(radius, bool) or not isinstance(radius, (int, float)):
        raise AdvlabTypeError(f"Expected `{name}` to be a positive float or None, but got {radius!r}.")
    if allow_zero and radius == 0:
        return 0.0
    if not math.isfinite(radius) or radius <= 0:
        kind = "a finite float >= 0" if allow_zero else "a positive finite float"
        raise AdvlabValueError(
            f"Expected `{name}` to be {kind} or None (unbounded), but got {radius!r}; "
            "the official configs' `adv_max_norm = 0` means None."
        )
    return float(radius)


def check_nonnegative(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AdvlabTypeError(f"Expected `{name}` to be a float >= 0, but got {value!r}.")
    if not math.isfinite(value) or value < 0:
        raise AdvlabValueError(f"Expected `{name}` to be a finite float >= 0, but got {value!r}.")
    return float(value)


def check_count(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AdvlabValueError(f"Expected `{name}` to be an int >= 1, but got {value!r}.")
    return value


def check_choice(value: object, choices: tuple[str, ...], name: str) -> str:
    if value not in choices:
        raise AdvlabValueError(f"Expected `{name}` to be one of {list(choices)}, but got {value!r}.")
    return value  # type: ignore[return-value]


def as_bool_mask(mask: Tensor, name: str = "mask") -> Tensor:
    """A bool mask from a bool, integer or float one (as transformers builds them): True = real element.

    Integer and float masks must hold only 0 and 1 (one host read checks it; bool masks cost none):
    a weight such as 0.5 is not a mask, and treating it as one would be silently wrong.
    """
    mask = check_tensor(mask, name)
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise AdvlabTypeError(f"Expected `{name}` to be a bool (or 0/1 integer or float) tensor, but got dtype {mask.dtype}.")
    binary = (mask == 0) | (mask == 1)
    if not bool(binary.all()):
        bad = mask[~binary].flatten()[:3].tolist()
        raise AdvlabValueError(
            f"Expected `{name}` to hold only 0 and 1 (1 = real element) as a {mask.dtype} mask, but it holds {bad}; "
            "pass a bool mask, or (mask > 0) if the values are weights."
        )
    return mask != 0


def broadcast_mask(mask: Tensor | None, like: Tensor, name: str = "mask") -> Tensor | None:
    """Return `mask` ([b, n] for a [b, n, d] tensor) as a bool tensor broadcastable to `like`."""
    if mask is None:
        return None
    mask = check_tensor(mask, name)
    expected = tuple(like.shape[:-1]) if like.dim() >= 2 else tuple(like.shape)
    if tuple(mask.shape) != expected:
        raise AdvlabValueError(
            f"Expected `{name}` to have shape {expected} (the perturbed tensor's dimensions before the feature "
            f"dimension; tensor shape {tuple(like.shape)}), but got {tuple(mask.shape)}."
        )
    mask = as_bool_mask(mask, name).to(like.device)
    return mask.unsqueeze(-1) if like.dim() >= 2 else mask


def compute_dtype(x: Tensor) -> torch.dtype:
    """Norms are computed in at least float32: float64 stays float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def apply_mask(x: Tensor, mask: Tensor | None) -> Tensor:
    """Zero `x` where the broadcast `mask` is False (exact zeros, also for NaN inputs)."""
    if mask is None:
        return x
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
