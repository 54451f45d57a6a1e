"""Samplers: the initial perturbation of each ascent loop.

A sampler is any callable `sampler(like, *, mask=None, generator=None) -> Tensor` that
returns a tensor with `like`'s shape, dtype and device, exactly 0 wherever `mask` is False
(so a fully masked row gets 0, never NaN). Randomness comes only from the keyword-only
`generator` (the global torch RNG when it is None).

| sampler | draws | used by |
|---|---|---|
| `ZeroSampler` | 0 | official VILLA, LXMERT-AdvTrain |
| `ScaledUniformSampler(m)` | U(-m, m) / sqrt(N), N = unmasked elements of the row | VILLA paper (m = epsilon), FreeLB L2 (`adv_init_mag`) |
| `UniformSampler(m)` | U(-m, m) | FreeLB L-inf |
| `NormalSampler(std)` | N(0, std^2) | SMART, ALUM (`noise_var` is a std) |
| `SphereSampler(r)` | a random direction with L2 norm r per row | random-start PGD |

Note that FreeLB's `adv_init_mag` is the half-width of the uniform draw, not the initial
norm: the expected L2 norm of `ScaledUniformSampler(m)` is about m / sqrt(3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from advlab._checks import apply_mask, broadcast_mask, check_float_tensor, check_nonnegative, compute_dtype

__all__ = ["Sampler", "ZeroSampler", "ScaledUniformSampler", "UniformSampler", "NormalSampler", "SphereSampler"]


@runtime_checkable
class Sampler(Protocol):
    """Anything that draws an initial perturbation shaped like `like`."""

    def __call__(self, like: Tensor, *, mask: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Return a tensor with `like`'s shape, dtype and device, 0 where `mask` is False."""
        ...


def _rand(like: Tensor, generator: torch.Generator | None, kind: str) -> Tensor:
    device = generator.device if generator is not None else like.device
    dtype = compute_dtype(like)
    draw = torch.rand if kind == "uniform" else torch.randn
    return draw(like.shape, generator=generator, dtype=dtype, device=device).to(like.device)


def _unmasked_count(like: Tensor, mask: Tensor | None) -> Tensor:
    """Number of unmasked elements per row, shaped to broadcast against `like`."""
    per_element = torch.ones_like(like, dtype=compute_dtype(like))
    counted = apply_mask(per_element, mask)
    return counted.sum(dim=tuple(range(1, like.dim())), keepdim=True)


@dataclass(frozen=True)
class ZeroSampler:
    """δ = 0 (the official VILLA initialisation).

    Examples:
        >>> ZeroSampler()(torch.ones(2, 3))
        tensor([[0., 0., 0.],
                [0., 0., 0.]])
    """

    def __call__(self, like: Tensor, *, mask: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Zeros shaped like `like`."""
        like = check_float_tensor(like, "like")
        broadcast_mask(mask, like)
        return torch.zeros_like(like)


@dataclass(frozen=True)
class ScaledUniformSampler:
    """δ = U(-m, m) / sqrt(N), N = number of unmasked elements in the row.

    VILLA's Algorithm 1 (m = epsilon) and FreeLB's L2 initialisation (m = `adv_init_mag`).

    Args:
        magnitude: Half-width m of the uniform draw, before the 1/sqrt(N) scaling.

    Shape:
        - like: [b, n, d] or [b, d]; mask: [b, n] or [b]; output: like's shape.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> d = ScaledUniformSampler(1.0)(torch.zeros(2, 4, 8), generator=g)
        >>> bool(d.abs().max() <= 1.0 / (4 * 8) ** 0.5)
        True
    """

    magnitude: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "magnitude", check_nonnegative(self.magnitude, "magnitude"))

    def __call__(self, like: Tensor, *, mask: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Draw the scaled uniform initialisation."""
        like = check_float_tensor(like, "like", min_dim=2)  # rows: a 1-D tensor has none
        m = broadcast_mask(mask, like)
        u = (2 * _rand(like, generator, "uniform") - 1) * self.magnitude
        scaled = u / _unmasked_count(like, m).clamp_min(1).sqrt()
        return apply_mask(scaled, m).to(like.dtype)


@dataclass(frozen=True)
class UniformSampler:
    """δ = U(-m, m) elementwise (FreeLB's L-inf initialisation).

    Args:
        magnitude: Half-width m.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> bool(UniformSampler(0.1)(torch.zeros(3, 5), generator=g).abs().max() <= 0.1)
        True
    """

    magnitude: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "magnitude", check_nonnegative(self.magnitude, "magnitude"))

    def __call__(self, like: Tensor, *, mask: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Draw the uniform initialisation."""
        like = check_float_tensor(like, "like")
        m = broadcast_mask(mask, like)
        u = (2 * _rand(like, generator, "uniform") - 1) * self.magnitude
        return apply_mask(u, m).to(like.dtype)


@dataclass(frozen=True)
class NormalSampler:
    """δ = N(0, std²) elementwise (SMART / ALUM, whose `noise_var` is this std).

    Args:
        std: Standard deviation.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> d = NormalSampler(1e-5)(torch.zeros(2, 3, 4), mask=torch.tensor([[1, 1, 0], [1, 0, 0]]), generator=g)
        >>> bool((d[0, 2] == 0).all() and (d[1, 1:] == 0).all())
        True
    """

    std: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "std", check_nonnegative(self.std, "std"))

    def __call__(self, like: Tensor, *, mask: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Draw the normal initialisation."""
        like = check_float_tensor(like, "like")
        m = broadcast_mask(mask, like)
        return apply_mask(_rand(like, generator, "normal") * self.std, m).to(like.dtype)


@dataclass(frozen=True)
class SphereSampler:
    """δ = a uniformly random direction with L2 (Frobenius) norm `radius` per row.

    Args:
        radius: Norm of every row that has at least one unmasked element.

    Shape:
        - like: [b, n, d] or [b, d]; mask: [b, n] or [b]; output: like's shape.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> d = SphereSampler(0.5)(torch.zeros(3, 4, 2), generator=g)
        >>> torch.linalg.vector_norm(d, dim=(1, 2))
        tensor([0.5000, 0.5000, 0.5000])
    """

    radius: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "radius", check_nonnegative(self.radius, "radius"))

    def __call__(self, like: Tensor, *, mask: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Draw a random point on the sphere of each row."""
        like = check_float_tensor(like, "like", min_dim=2)  # rows: a 1-D tensor has none
        m = broadcast_mask(mask, like)
        z = apply_mask(_rand(like, generator, "normal"), m)
        norm = torch.linalg.vector_norm(z, dim=tuple(range(1, like.dim())), keepdim=True)
        safe = torch.where(norm > 0, norm, torch.ones_like(norm))
        return (z * (self.radius / safe)).to(like.dtype)

