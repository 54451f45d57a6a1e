"""Where a perturbation enters a model: sites, and resolving them against a module.

A *site* names the place where one modality's embedding is formed: the output of a
module (the default) or one input of a module. advlab adds the perturbation there
through a forward hook, so the model itself is never edited.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol, Union, runtime_checkable

import torch
from torch import Tensor, nn

from advlab._checks import check_count
from advlab._errors import AdvlabTypeError, AdvlabValueError

__all__ = ["Site", "SiteLike", "Layout", "HasPerturbationSites", "ResolvedSites", "resolve_sites", "unwrap_model"]

Where = Literal["output", "input"]
Layout = Literal["channels_last", "channels_first"]
LAYOUTS: tuple[str, ...] = ("channels_last", "channels_first")


@dataclass(frozen=True)
class Site:
    """One place in a model where a modality's embedding is formed.

    Args:
        module: The module, or its dotted name relative to the model the site is
            resolved against (`"bert.embeddings.word_embeddings"`).
        where: `"output"` perturbs what the module returns; `"input"` perturbs one of
            its inputs.
        arg: With `where="input"`: the position of the positional argument (int) or the
            name of the keyword argument (str) to perturb.
        calls: How many times the module runs in one forward. Each call gets its own,
            independent perturbation, in call order (siamese towers, two images through
            one module).
        layout: How the site tensor's dimensions are read. None (default): `[b, n, d]` or
            `[b, d]` only; a tensor with more dimensions is refused. `"channels_first"`:
            `[b, d, *positions]`, such as a convolution's `[b, c, h, w]` output (ViLT's patch
            projection); `"channels_last"`: `[b, *positions, d]`. With a layout, the
            positions are flattened and the features moved last (`[b, h*w, c]`) for masks,
            norms and the ball, and moved back before δ is added; masks are then `[b, h, w]`
            or `[b, h*w]`, and δ (`SiteHooks.deltas`) is held as `[b, h*w, c]`.

    Examples:
        >>> from advlab import Site
        >>> Site("bert.embeddings.word_embeddings")
        Site(module='bert.embeddings.word_embeddings', where='output', arg=0, calls=1)
        >>> Site("img_proj", where="input").where
        'input'
        >>> Site("vilt.embeddings.patch_embeddings.projection", layout="channels_first").layout
        'channels_first'
    """

    module: str | nn.Module
    where: Where = "output"
    arg: int | str = 0
    calls: int = 1
    layout: Layout | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.module, (str, nn.Module)):
            raise AdvlabTypeError(
                f"Expected `Site.module` to be a dotted module name or an nn.Module, but got {type(self.module).__name__}."
            )
        if self.where not in ("output", "input"):
            raise AdvlabValueError(f"Expected `Site.where` to be 'output' or 'input', but got {self.where!r}.")
        if isinstance(self.arg, bool) or not isinstance(self.arg, (int, str)):
            raise AdvlabTypeError(f"Expected `Site.arg` to be an int position or a keyword name, but got {self.arg!r}.")
        if isinstance(self.arg, int) and self.arg < 0:
            raise AdvlabValueError(f"Expected `Site.arg` to be >= 0, but got {self.arg}.")
        check_count(self.calls, "Site.calls")
        if self.layout is not None and self.layout not in LAYOUTS:
            raise AdvlabValueError(
                f"Expected `Site.layout` to be None, 'channels_last' or 'channels_first', but got {self.layout!r}."
            )

    def __repr__(self) -> str:
        module = self.module if isinstance(self.module, str) else f"<{type(self.module).__name__}>"
        layout = f", layout={self.layout!r}" if self.layout is not None else ""
        return f"Site(module={module!r}, where={self.where!r}, arg={self.arg!r}, calls={self.calls}{layout})"


SiteLike = Union[str, nn.Module, Site]


@runtime_checkable
class HasPerturbationSites(Protocol):
    """A model that names its own perturbation sites (the bundled backbones do).

    Examples:
        >>> class Tiny(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.embed = nn.Embedding(10, 4)
        ...     def perturbation_sites(self):
        ...         return {"txt": Site(self.embed)}
        >>> isinstance(Tiny(), HasPerturbationSites)
        True
    """

    def perturbation_sites(self) -> dict[str, Site]:
        """Map each modality to the site where its embedding is formed."""
        ...


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the module that a DDP / DataParallel wrapper or a `torch.compile` wrapper wraps.

    Sites resolve against the original module: a compiled model's module names are those
    of the module it compiles.

    Examples:
        >>> inner = nn.Linear(2, 2)
        >>> unwrap_model(nn.DataParallel(inner)) is inner
        True
    """
    import sys

    from torch.nn.parallel import DataParallel, DistributedDataParallel

    dynamo = sys.modules.get("torch._dynamo.eval_frame")  # never imported => nothing is compiled
    optimized = getattr(dynamo, "OptimizedModule", ()) if dynamo is not None else ()
    while True:
        if isinstance(model, (DataParallel, DistributedDataParallel)):
            model = model.module
        elif optimized and isinstance(model, optimized):
            model = model._orig_mod
        else:
            return model


def _as_site(modality: str, site: SiteLike) -> Site:
    if isinstance(site, Site):
        return site
    if isinstance(site, (str, nn.Module)):
        return Site(site)
    raise AdvlabTypeError(
        f"Expected `sites[{modality!r}]` to be a dotted name, an nn.Module or an advlab.Site, "
        f"but got {type(site).__name__}."
    )


class ResolvedSites(dict):
    """Modality to `(site, module)`, as `resolve_sites` returns it; `labels` names each site.

    Passing one back to `resolve_sites` (or to `free_training`) skips the resolution, so a
    recipe resolves its sites once, not at every step.
    """

    def __init__(self, items: dict[str, tuple[Site, nn.Module]], labels: dict[str, str]) -> None:
        super().__init__(items)
        self.labels = labels


def resolve_sites(model: nn.Module, sites: Mapping[str, SiteLike] | None = None) -> ResolvedSites:
    """Resolve each modality's site to the module it names.

    Args:
        model: The model the sites belong to; a DDP / DataParallel wrapper is unwrapped.
        sites: Modality to site. `None` asks the model (`model.perturbation_sites()`).

    Returns:
        Modality to `(site, module)` (a `ResolvedSites`; one given is returned as is).

    Examples:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
        >>> resolved = resolve_sites(model, {"x": "0"})
        >>> resolved["x"][1]
        Linear(in_features=3, out_features=4, bias=True)
    """
    if isinstance(sites, ResolvedSites):
        return sites
    model = unwrap_model(model)
    if sites is None:
        if not isinstance(model, HasPerturbationSites):
            raise AdvlabTypeError(
                f"Expected `sites` (modality -> module name) because {type(model).__name__} has no "
                "`perturbation_sites()` method, but got sites=None."
            )
        sites = model.perturbation_sites()
    if not isinstance(sites, Mapping) or len(sites) == 0:
        raise AdvlabValueError(f"Expected `sites` to be a non-empty mapping modality -> site, but got {sites!r}.")
    names: dict[int, str] | None = None  # id(module) -> its name, built only if a site is a module object
    resolved: dict[str, tuple[Site, nn.Module]] = {}
    labels: dict[str, str] = {}
    for modality, raw in sites.items():
        if not isinstance(modality, str):
            raise AdvlabTypeError(f"Expected modality names to be str, but got {modality!r}.")
        site = _as_site(modality, raw)
        if isinstance(site.module, str):
            try:
                module = model.get_submodule(site.module)
            except AttributeError:
                names = [n for n, _ in model.named_modules() if n]
                close = [n for n in names if site.module.split(".")[-1] in n][:5]
                hint = f" Modules with a similar name: {close}." if close else ""
                raise AdvlabValueError(
                    f"Expected `sites[{modality!r}]` to name a submodule of {type(model).__name__}, "
                    f"but {site.module!r} is not one.{hint}"
                ) from None
        else:
            module = site.module
            if names is None:
                names = {id(m): n for n, m in model.named_modules()}
            if id(module) not in names:
                raise AdvlabValueError(
                    f"Expected `sites[{modality!r}]` to be a submodule of {type(model).__name__}, "
                    f"but the {type(module).__name__} given is not part of it."
                )
        labels[modality] = site.module if isinstance(site.module, str) else (names or {}).get(id(module), "")
        resolved[modality] = (site, module)
    seen: dict[tuple[int, str, int | str], str] = {}
    for modality, (site, module) in resolved.items():
        key = (id(module), site.where, site.arg if site.where == "input" else 0)
        if key in seen:
            raise AdvlabValueError(
                f"Expected each site to be distinct, but modalities {seen[key]!r} and {modality!r} name the same "
                f"{site.where} of the same module; use `Site(..., calls=n)` for a module called several times."
            )
        seen[key] = modality
    return ResolvedSites(resolved, labels)


# ---------------------------------------------------------------- site tensors (used by hooks and compiled)
def _to_positions(x: Tensor, layout: str | None) -> Tensor:
    """View a site tensor as [b, n, d] (or [b, d]): features last, positions flattened."""
    if layout == "channels_first" and x.dim() >= 3:
        return x.flatten(2).transpose(1, 2)  # [b, c, *pos] -> [b, prod(pos), c]
    if layout == "channels_last" and x.dim() > 3:
        return x.flatten(1, -2)  # [b, *pos, d] -> [b, prod(pos), d]
    return x


def _from_positions(d: Tensor, shape: torch.Size, layout: str | None) -> Tensor:
    """Inverse of `_to_positions` for a tensor shaped like its output."""
    if layout == "channels_first" and len(shape) >= 3:
        return d.transpose(1, 2).reshape(shape)  # [b, prod(pos), c] -> [b, c, *pos]
    if layout == "channels_last" and len(shape) > 3:
        return d.reshape(shape)
    return d


def _positions_shape(shape: torch.Size, layout: str | None) -> tuple[int, ...]:
    """The site tensor's positions, unflattened: (h, w) for a channels-first [b, c, h, w]."""
    if layout == "channels_first":
        return tuple(shape[2:])
    return tuple(shape[1:-1])


def _add_fixed(x: object, delta: Tensor, modality: str, site: Site, label: str) -> Tensor:
    """`x + delta` for `perturb_sites`, after checking that δ broadcasts against the site tensor."""
    where = f"the {site.where} of site {label!r} (modality {modality!r})"
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = f"dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise AdvlabValueError(f"Expected {where} to be a floating tensor, but got {got}.")
    positions = site.layout is not None and delta.dim() < x.dim()
    target = _to_positions(x, site.layout) if positions else x
    try:
        fits = torch.broadcast_shapes(delta.shape, target.shape) == target.shape
    except RuntimeError:
        fits = False
    if not fits:
        form = " in the features-last form" if positions else ""
        raise AdvlabValueError(
            f"Expected `deltas[{modality!r}]` to broadcast against {where}{form}, shape {tuple(target.shape)}, "
            f"but got shape {tuple(delta.shape)}."
        )
    d = delta.to(device=x.device, dtype=x.dtype)
    if positions:
        d = _from_positions(d.expand(target.shape), x.shape, site.layout)
    return x + d
