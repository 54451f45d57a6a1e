"""obj36 TSV reader; fixture lines are written here with base64 and numpy directly."""

import base64

import numpy as np
import pytest
import torch

import advlab
from advlab.data.obj36 import collate_obj36, iter_obj36, load_obj36


def b64(array: np.ndarray) -> str:
    return base64.b64encode(array.tobytes()).decode("ascii")


def fixture_line(img_id="COCO_1", h=480, w=640, n=36, dim=2048, seed=0):
    rng = np.random.default_rng(seed)
    x1 = rng.uniform(0, w / 2, n)
    y1 = rng.uniform(0, h / 2, n)
    boxes = np.stack([x1, y1, x1 + rng.uniform(1, w / 2, n), y1 + rng.uniform(1, h / 2, n)], 1).astype(np.float32)
    arrays = {
        "objects_id": rng.integers(0, 1600, n).astype(np.int64),
        "objects_conf": rng.uniform(0, 1, n).astype(np.float32),
        "attrs_id": rng.integers(0, 400, n).astype(np.int64),
        "attrs_conf": rng.uniform(0, 1, n).astype(np.float32),
        "boxes": boxes,
        "features": rng.standard_normal((n, dim)).astype(np.float32),
    }
    fields = [
        img_id,
        str(h),
        str(w),
        b64(arrays["objects_id"]),
        b64(arrays["objects_conf"]),
        b64(arrays["attrs_id"]),
        b64(arrays["attrs_conf"]),
        str(n),
        b64(arrays["boxes"]),
        b64(arrays["features"]),
    ]
    return "\t".join(fields), arrays


def write(tmp_path, lines, name="feats.tsv"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_reads_36_boxes_and_normalises_by_width_and_height(tmp_path):
    line, arrays = fixture_line()
    records = load_obj36(write(tmp_path, [line]))
    rec = records["COCO_1"]
    assert (rec.img_h, rec.img_w, rec.num_boxes) == (480, 640, 36)
    assert rec.features.shape == (36, 2048) and rec.features.dtype == torch.float32
    np.testing.assert_array_equal(rec.features.numpy(), arrays["features"])
    np.testing.assert_array_equal(rec.objects_id.numpy(), arrays["objects_id"])
    np.testing.assert_array_equal(rec.attrs_conf.numpy(), arrays["attrs_conf"])
    expected = arrays["boxes"] / np.array([640, 480, 640, 480], np.float32)  # x / width, y / height
    np.testing.assert_allclose(rec.boxes.numpy(), expected, rtol=1e-6)
    assert rec.boxes.min() >= 0 and rec.boxes.max() <= 1
    assert (rec.boxes[:, 2] > rec.boxes[:, 0]).all() and (rec.boxes[:, 3] > rec.boxes[:, 1]).all()  # x1 y1 x2 y2


def test_pixel_boxes_kept_when_asked(tmp_path):
    line, arrays = fixture_line(n=3, dim=8)
    rec = next(iter_obj36(write(tmp_path, [line]), normalize_boxes=False))
    np.testing.assert_array_equal(rec.boxes.numpy(), arrays["boxes"])


def test_several_lines_limit_and_collate(tmp_path):
    lines = [fixture_line(f"img{i}", n=4 + i, dim=8, seed=i)[0] for i in range(3)]
    path = write(tmp_path, lines + [""])
    assert list(load_obj36(path)) == ["img0", "img1", "img2"]
    assert len(load_obj36(path, limit=2)) == 2
    feats, boxes, mask = collate_obj36(list(load_obj36(path).values()))
    assert feats.shape == (3, 6, 8) and boxes.shape == (3, 6, 4)
    assert mask.sum(1).tolist() == [4, 5, 6]
    assert feats[0, 4:].abs().sum() == 0


def test_feature_dim_is_checked(tmp_path):
    line, _ = fixture_line(n=2, dim=8)
    path = write(tmp_path, [line])
    assert next(iter_obj36(path, feature_dim=8)).features.shape == (2, 8)
    with pytest.raises(advlab.AdvlabValueError, match="line 1.*features"):
        next(iter_obj36(path, feature_dim=2048))
    narrow = write(tmp_path, [fixture_line(n=2, dim=1)[0]], name="narrow.tsv")
    assert next(iter_obj36(narrow)).features.shape == (2, 1)  # a width-1 feature is still [n, f]


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda parts: parts[:9], "expected 10 tab-separated fields"),
        (lambda parts: parts[:1] + ["tall"] + parts[2:], "img_h"),
        (lambda parts: parts[:7] + ["3"] + parts[8:], "boxes"),  # num_boxes disagrees with the arrays
        (lambda parts: parts[:9] + [parts[9][:-8]], "features"),  # truncated base64 payload
        (lambda parts: parts[:3] + ["@@not base64@@"] + parts[4:], "objects_id.*base64"),
        (lambda parts: parts[:2] + ["10"] + parts[3:], "inside the 10x480 image"),  # boxes beyond the width
    ],
)
def test_malformed_line_names_file_and_line_number(tmp_path, corrupt, message):
    good, _ = fixture_line("ok", n=2, dim=8)
    bad = "\t".join(corrupt(fixture_line("bad", n=2, dim=8, seed=1)[0].split("\t")))
    path = write(tmp_path, [good, good.replace("ok", "ok2"), bad])
    records = iter_obj36(path)
    next(records), next(records)
    with pytest.raises(
        advlab.AdvlabValueError, match=rf"feats\.tsv, line 3: {message}|feats\.tsv, line 3: .*{message}"
    ):
        next(records)


def test_duplicate_ids_and_bad_arguments(tmp_path):
    line, _ = fixture_line(n=2, dim=8)
    with pytest.raises(advlab.AdvlabValueError, match="repeats"):
        load_obj36(write(tmp_path, [line, line]))
    with pytest.raises(advlab.AdvlabValueError, match="limit"):
        load_obj36(write(tmp_path, [line]), limit=-1)
    with pytest.raises(advlab.AdvlabValueError, match="missing.tsv"):
        load_obj36(tmp_path / "missing.tsv")
    with pytest.raises(advlab.AdvlabTypeError, match="path"):
        load_obj36(3)
    with pytest.raises(advlab.AdvlabValueError, match="records"):
        collate_obj36([])


def truncated_last_line(n=3, dim=8, keep_width=4):
    """A line cut inside `features` at a base64 boundary where the bytes still split into n rows of floats."""
    line, _ = fixture_line("COCO_2", n=n, dim=dim, seed=1)
    head, features = line.rsplit("\t", 1)
    kept = n * keep_width * 4  # bytes of a narrower feature matrix; a multiple of 3 keeps base64 valid
    assert kept % 3 == 0
    return head + "\t" + features[: kept // 3 * 4]


def test_a_last_line_truncated_at_a_base64_boundary_is_refused(tmp_path):
    # fails if each line's width is inferred on its own (the old reader returned width 4 for line 2 without a word)
    good, _ = fixture_line("COCO_1", n=3, dim=8)
    path = tmp_path / "cut.tsv"
    path.write_text(good + "\n" + truncated_last_line())  # no line break at the end: the file was cut
    with pytest.raises(advlab.AdvlabValueError, match=r"cut.tsv, line 2: expected features of width 8 \(as on line 1\)"
                       r".*decode to width 4; the line has no line break at the end of the file, so the file looks "
                       r"truncated"):
        load_obj36(path)
    with pytest.raises(advlab.AdvlabValueError, match="line 2"):
        load_obj36(path, feature_dim=8)


def test_a_lone_truncated_record_warns_without_feature_dim(tmp_path):
    path = tmp_path / "one.tsv"
    path.write_text(truncated_last_line())
    with pytest.warns(UserWarning, match="only record has 4-wide features and no line break"):
        assert load_obj36(path)["COCO_2"].features.shape == (3, 4)
    with pytest.raises(advlab.AdvlabValueError, match="one.tsv, line 1"):
        load_obj36(path, feature_dim=8)


def test_a_non_utf8_img_id_names_the_file_line_and_field(tmp_path):
    # fails on the old reader, which raised a raw UnicodeDecodeError from the text-mode file
    good, _ = fixture_line("COCO_1", n=2, dim=4)
    bad, _ = fixture_line("COCO_2", n=2, dim=4)
    path = tmp_path / "latin.tsv"
    path.write_bytes(good.encode() + b"\n" + b"caf\xe9" + bad.encode()[len("COCO_2"):] + b"\n")
    with pytest.raises(advlab.AdvlabValueError, match=r"latin.tsv, line 2: expected UTF-8 text, but field `img_id` "
                       r"holds byte 0xe9 at byte 3"):
        load_obj36(path)


def test_an_empty_feature_field_is_refused_even_alone(tmp_path):
    # a line cut right after the last tab decoded to [n, 0] features without a word
    line, _ = fixture_line("COCO_3", n=2, dim=4)
    path = tmp_path / "empty.tsv"
    path.write_text(line.rsplit("\t", 1)[0] + "\t\n")
    with pytest.raises(advlab.AdvlabValueError, match=r"empty.tsv, line 1: expected field `features` to hold 2 rows"):
        load_obj36(path)
