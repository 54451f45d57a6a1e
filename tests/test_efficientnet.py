"""EfficientNet-Lite0: parity with the reference package, weights' SHA-256, TF "SAME" padding, regions, cache."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.testing import assert_close

from advlab._errors import AdvlabValueError
from advlab.data.captions import ImageCaptionFolder
from advlab.data.tuxpaint import tuxpaint_stamps_dir
from advlab.experiments.retrieval.model import pool_grid
from advlab.pretrained._regions import box_weights
from advlab.pretrained.craft import _box_pool, letterbox, load_image
from advlab.pretrained.efficientnet import (
    EFFNET_LITE0_SHA256,
    EfficientNetLite0,
    EffnetRegionExtractor,
    _SameConv2d,
    effnet_checkpoint_path,
    effnet_feature_cache_key,
    extract_effnet_features,
    load_efficientnet_lite0,
)


@pytest.fixture(scope="module")
def net() -> EfficientNetLite0:
    return load_efficientnet_lite0()


def _reference(px: int) -> torch.nn.Module:
    """The reference implementation (`efficientnet-lite-pytorch` 0.1.0) with the same weights, eval mode."""
    from efficientnet_lite_pytorch import EfficientNet

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(effnet_checkpoint_path()),
                                           image_size=px)
    return ref.eval()


def _scaled(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels * 255.0 - 127.0) / 128.0


def _real_stamps(px: int, n: int = 8) -> torch.Tensor:
    items = list(ImageCaptionFolder(tuxpaint_stamps_dir()))
    step = max(1, len(items) // n)
    return torch.stack([letterbox(load_image(it.path), px=px)[0] for it in items[::step][:n]])


@pytest.mark.parametrize("px", [224, 160])
def test_matches_the_reference_package_on_random_and_real_images(net: EfficientNetLite0, px: int) -> None:
    ref = _reference(px)
    random = torch.rand(3, 3, px, px, generator=torch.Generator().manual_seed(px))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        real = _real_stamps(px)
    with torch.no_grad():
        for pixels in (random, real):
            x = _scaled(pixels)
            assert_close(net.feature_map(x, "head"), ref.extract_features(x), rtol=0, atol=1e-5)
            assert_close(net(x), ref(x), rtol=0, atol=1e-5)


def test_last_block_map_matches_the_reference_blocks(net: EfficientNetLite0) -> None:
    ref = _reference(224)
    x = _scaled(torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        h = ref._swish(ref._bn0(ref._conv_stem(x)))
        for block in ref._blocks:
            h = block(h)
        assert_close(net.feature_map(x, "blocks"), h, rtol=0, atol=1e-5)
    assert h.shape == (2, 320, 7, 7)


def test_weights_are_frozen_in_eval_mode_and_keys_match_exactly(net: EfficientNetLite0) -> None:
    raw = torch.load(effnet_checkpoint_path(), map_location="cpu", weights_only=True)
    assert set(raw) == set(net.state_dict())
    assert_close(net._blocks[15]._project_conv.weight, raw["_blocks.15._project_conv.weight"], rtol=0, atol=0)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert 4.6e6 < sum(p.numel() for p in net.parameters()) < 4.7e6


def test_sha256_is_checked(tmp_path: Path) -> None:
    copy = tmp_path / "lite0.pth"
    shutil.copyfile(effnet_checkpoint_path(), copy)
    load_efficientnet_lite0(copy, expected_sha256=EFFNET_LITE0_SHA256)  # the same bytes pass
    with open(copy, "r+b") as f:  # flip one byte inside the tensor data
        f.seek(10_000_000)
        byte = f.read(1)
        f.seek(10_000_000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(AdvlabValueError, match="SHA-256|sha256"):
        load_efficientnet_lite0(copy, expected_sha256=EFFNET_LITE0_SHA256)


def test_a_checkpoint_of_another_network_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "other.pth"
    torch.save({"_conv_stem.weight": torch.zeros(32, 3, 3, 3)}, bad)
    with pytest.raises(AdvlabValueError, match="missing keys"):
        load_efficientnet_lite0(bad)


@given(side=st.integers(1, 40), kernel=st.sampled_from([1, 3, 5]), stride=st.sampled_from([1, 2]),
       seed=st.integers(0, 2**31 - 1))
def test_same_padding_matches_tensorflow_rule(side: int, kernel: int, stride: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    conv = _SameConv2d(2, 3, kernel, stride=stride)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
    x = torch.randn(1, 2, side, side + 1, generator=gen, dtype=torch.float32)
    out = conv(x)
    # TensorFlow "SAME": output ceil(n / s); total padding max((out - 1) s + k - n, 0), the extra pixel after
    expected_shape = (1, 3, math.ceil(side / stride), math.ceil((side + 1) / stride))
    assert out.shape == expected_shape
    pads = []
    for n in (side + 1, side):
        total = max((math.ceil(n / stride) - 1) * stride + kernel - n, 0)
        pads += [total // 2, total - total // 2]
    by_hand = F.conv2d(F.pad(x, pads), conv.weight, stride=stride)
    assert_close(out, by_hand, rtol=0, atol=0)


@given(seed=st.integers(0, 2**31 - 1), m=st.integers(1, 8))
def test_box_weights_average_like_the_craft_box_pool(seed: int, m: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    fmap = torch.randn(3, 5, m, m, generator=gen, dtype=torch.float64)
    boxes = torch.rand(3, 4, generator=gen, dtype=torch.float64)
    boxes = torch.cat([torch.minimum(boxes[:, :2], boxes[:, 2:]), torch.maximum(boxes[:, :2], boxes[:, 2:])], 1)
    mine = torch.einsum("bcij,bij->bc", fmap, box_weights(boxes, m))
    assert_close(mine, _box_pool(fmap, boxes), rtol=0, atol=1e-12)


def test_regions_are_area_weighted_means_of_the_map_by_hand() -> None:
    """A 7 x 7 map: the object box and every cell of a 4 x 4 grid against a plain double loop, float64."""
    net = EfficientNetLite0().double().eval()
    ex = EffnetRegionExtractor(net, px=224, grid=4, layer="blocks").double()
    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, 224, 224, generator=gen, dtype=torch.float64)
    obj = torch.tensor([[0.1, 0.2, 0.65, 0.9], [0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    with torch.no_grad():
        feats, boxes = ex(pixels, obj)
        fmap = net.feature_map(_scaled(pixels), "blocks")

    def by_hand(b: int, box: list[float]) -> torch.Tensor:
        m = fmap.shape[-1]
        total, acc = 0.0, torch.zeros(fmap.shape[1], dtype=torch.float64)
        for i in range(m):
            for j in range(m):
                oy = max(0.0, min((i + 1) / m, box[3]) - max(i / m, box[1]))
                ox = max(0.0, min((j + 1) / m, box[2]) - max(j / m, box[0]))
                acc += ox * oy * fmap[b, :, i, j]
                total += ox * oy
        return acc / total

    for b in range(2):
        assert_close(feats[b, 0], by_hand(b, obj[b].tolist()), rtol=0, atol=1e-10)
        for c in range(16):
            assert_close(feats[b, 1 + c], by_hand(b, boxes[b, 1 + c].tolist()), rtol=0, atol=1e-10)
    assert feats.shape == (2, 17, 320)
    assert_close(boxes[:, 0], obj)


def test_a_grid_of_4_pooled_to_2_equals_extracting_a_grid_of_2() -> None:
    net = EfficientNetLite0().eval()
    pixels = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    obj = torch.tensor([[0.2, 0.1, 0.8, 0.7]] * 2)
    with torch.no_grad():
        f4, b4 = EffnetRegionExtractor(net, px=224, grid=4)(pixels, obj)
        f2, b2 = EffnetRegionExtractor(net, px=224, grid=2)(pixels, obj)
    pf, pb = pool_grid(f4, b4, 2)
    assert_close(pf, f2, rtol=1e-5, atol=1e-6)
    assert_close(pb, b2)


@pytest.fixture()
def pngs(tmp_path: Path) -> list[Path]:
    from PIL import Image

    a = Image.new("RGBA", (30, 20), (0, 0, 0, 0))
    a.paste(Image.new("RGBA", (10, 8), (200, 40, 40, 255)), (5, 6))
    b = Image.new("RGB", (12, 40), (10, 120, 200))
    paths = []
    for name, image in (("a.png", a), ("b.png", b)):
        image.save(tmp_path / name)
        paths.append(tmp_path / name)
    return paths


def test_extraction_is_cached_and_the_key_names_every_setting(pngs: list[Path], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = extract_effnet_features(pngs, px=64, grid=2, cache_dir=cache, progress=False)
    again = extract_effnet_features(pngs, px=64, grid=2, cache_dir=cache, progress=False)
    assert not first.from_cache and again.from_cache
    assert_close(first.features, again.features, rtol=0, atol=0)
    assert first.cache_path is not None and first.cache_path.name.startswith("effnet-lite0-blocks-64px-g2-")
    assert first.features.shape == (2, 5, 320)
    head = extract_effnet_features(pngs, px=64, grid=2, layer="head", cache_dir=cache, progress=False)
    assert head.features.shape == (2, 5, 1280) and not head.from_cache
    keys = {effnet_feature_cache_key(pngs, px=64, grid=2), effnet_feature_cache_key(pngs, px=96, grid=2),
            effnet_feature_cache_key(pngs, px=64, grid=1), effnet_feature_cache_key(pngs, px=64, grid=2, layer="head"),
            effnet_feature_cache_key(pngs, px=64, grid=2, background=0.0), effnet_feature_cache_key(pngs[:1], px=64)}
    assert len(keys) == 6
    # the object box of the transparent 30 x 20 stamp is its opaque 10 x 8 block at (5, 6), letter-boxed into
    # 64 x 64: width 64, height round(20 * 64 / 30) = 43 starting at row (64 - 43) // 2 = 10
    sy = 43 / 20
    expected = torch.tensor([5 / 30, (10 + 6 * sy) / 64, 15 / 30, (10 + 14 * sy) / 64])
    assert_close(first.boxes[0, 0], expected, rtol=0, atol=1e-6)


def test_a_corrupt_cache_file_is_recomputed_with_a_warning(pngs: list[Path], tmp_path: Path) -> None:
    first = extract_effnet_features(pngs, px=64, grid=2, cache_dir=tmp_path, progress=False)
    stored = torch.load(first.cache_path, weights_only=True)
    stored["features"] = stored["features"] + 1.0  # the stored SHA-256 no longer matches
    torch.save(stored, first.cache_path)
    with pytest.warns(UserWarning, match="SHA-256"):
        again = extract_effnet_features(pngs, px=64, grid=2, cache_dir=tmp_path, progress=False)
    assert not again.from_cache
    assert_close(again.features, first.features, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"px": 100}, "`px` to be a positive multiple of 32"), ({"px": 0}, "`px`"),
     ({"px": 64, "grid": 3}, "`grid` to be an int from 1 to 2"), ({"grid": 0}, "`grid`"),
     ({"layer": "fc"}, "`layer` to be one of"), ({"batch_size": 0}, "`batch_size`")],
)
def test_bad_settings_are_named(pngs: list[Path], kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(AdvlabValueError, match=message):
        extract_effnet_features(pngs, use_cache=False, progress=False, **kwargs)  # type: ignore[arg-type]


def test_bad_inputs_are_named(pngs: list[Path], tmp_path: Path) -> None:
    with pytest.raises(AdvlabValueError, match="non-empty sequence"):
        extract_effnet_features([], progress=False)
    with pytest.raises(AdvlabValueError, match="non-empty sequence"):
        extract_effnet_features(str(pngs[0]), progress=False)
    with pytest.raises(AdvlabValueError, match="existing file"):
        extract_effnet_features([tmp_path / "missing.png"], progress=False)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(AdvlabValueError, match="image Pillow can read"):
        extract_effnet_features([tmp_path / "junk.png"], use_cache=False, progress=False)
    ex = EffnetRegionExtractor(EfficientNetLite0().eval(), px=64, grid=2)
    with pytest.raises(AdvlabValueError, match=r"\[b, 3, 64, 64\]"):
        ex(torch.zeros(1, 3, 32, 32), torch.zeros(1, 4))


def test_the_cache_key_is_pinned_to_its_material(pngs: list[Path], tmp_path: Path) -> None:
    # fails if the key's material changes in any way: every existing cache file would then be missed
    ckpt = tmp_path / "weights.pth"
    ckpt.write_bytes(b"not a real checkpoint")
    times = [1_700_000_000_123_456_789 + i for i in range(len(pngs))]
    for p, t in zip(pngs, times, strict=True):
        os.utime(p, ns=(t, t))
    material = {
        "background": 1.0,
        "checkpoint_sha256": hashlib.sha256(b"not a real checkpoint").hexdigest(),
        "extractor": "efficientnet-lite0",
        "files": [[str(p.resolve()), p.stat().st_size, t] for p, t in zip(pngs, times, strict=True)],
        "format": 1,
        "grid": 4,
        "layer": "blocks",
        "px": 224,
    }
    expected = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
    assert effnet_feature_cache_key(pngs, checkpoint=ckpt) == expected
    head = effnet_feature_cache_key(pngs, px=160, grid=2, layer="head", checkpoint=ckpt, background=0.5)
    material.update(px=160, grid=2, layer="head", background=0.5)
    assert head == hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def test_a_progress_bar_without_tqdm_is_refused_before_the_network_loads(
    pngs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails as if tqdm were not installed
    monkeypatch.setattr("advlab.pretrained.efficientnet.load_efficientnet_lite0", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(ModuleNotFoundError, match=r"extract_effnet_features\(progress=True\).*pip install tqdm"):
        extract_effnet_features(pngs, px=64, grid=2, cache_dir=tmp_path, progress=True)
