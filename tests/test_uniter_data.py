"""Reader tests. Fixtures are written with raw lmdb / msgpack / lz4 / np.savez calls following
uniter.md §10 (and msgpack_numpy's array encoding), never with advlab code."""

import io
import json

import lmdb
import lz4.frame
import msgpack
import numpy as np
import pytest
import torch
from torch.testing import assert_close

from advlab import AdvlabValueError
from advlab.backbones.uniter import UniterConfig, UniterForVQA
from advlab.data.uniter_db import (
    UniterImgDb,
    UniterTxtDb,
    UniterVqaDataset,
    get_gather_index,
    pos_feat_from_norm_bb,
    uniter_collate,
    vqa_target,
)

D = 16  # tiny feature size (2048 in the released DBs)


def msgpack_numpy_array(a):
    # msgpack_numpy's encoding of an ndarray
    return {b"nd": True, b"type": a.dtype.str, b"kind": b"", b"shape": list(a.shape), b"data": a.tobytes()}


def image_record(rng, n, conf):
    return {
        "features": rng.standard_normal((n, D)).astype(np.float16),
        "norm_bb": rng.random((n, 6)).astype(np.float16),
        "conf": np.asarray(conf, dtype=np.float16).reshape(n, 1),
        "soft_labels": rng.random((n, 1601)).astype(np.float16),
    }


def write_lmdb(path, items):
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key, value in items.items():
            txn.put(key.encode("utf-8"), value)
    env.close()


@pytest.fixture
def compressed_img_dir(tmp_path):
    rng = np.random.default_rng(0)
    records = {"coco_1.npz": image_record(rng, 4, [0.9, 0.8, 0.5, 0.3]), "coco_2.npz": image_record(rng, 3, [0.9, 0.2, 0.1])}
    values = {}
    for name, rec in records.items():
        buf = io.BytesIO()
        np.savez_compressed(buf, **rec)
        values[name] = buf.getvalue()
    values["__keys__"] = json.dumps(sorted(records)).encode()
    write_lmdb(tmp_path / "feat_th0.2_max100_min10_compressed", values)
    (tmp_path / "nbb_th0.2_max100_min10.json").write_text(json.dumps({"coco_1.npz": 3, "coco_2.npz": 3}))
    return tmp_path, records


def test_compressed_img_db_reads_nbb_rows_and_appends_area(compressed_img_dir):
    img_dir, records = compressed_img_dir
    db = UniterImgDb(img_dir, compressed=True)
    feat, pos = db["coco_1.npz"]
    rec = records["coco_1.npz"]
    assert feat.dtype == torch.float32 and feat.shape == (3, D)
    assert_close(feat, torch.from_numpy(rec["features"][:3].astype(np.float32)), rtol=0, atol=0)
    bb = rec["norm_bb"][:3].astype(np.float32)
    expected = np.concatenate([bb, bb[:, 4:5] * bb[:, 5:6]], axis=1)
    assert_close(pos, torch.from_numpy(expected), rtol=1e-6, atol=1e-6)
    assert db.nbb("coco_2.npz") == 3
    assert sorted(db._record("coco_1.npz")) == ["conf", "features", "norm_bb"]  # soft_labels is never inflated
    again = UniterImgDb(img_dir, compressed=True)  # a second reader of the same LMDB (train and val share it)
    assert torch.equal(again["coco_1.npz"][0], feat)
    with pytest.raises(KeyError, match="coco_9.npz"):
        db["coco_9.npz"]


def test_msgpack_img_db_without_sidecar_counts_confident_boxes(tmp_path):
    rng = np.random.default_rng(1)
    many = image_record(rng, 6, [0.9, 0.8, 0.7, 0.6, 0.1, 0.05])
    few = image_record(rng, 6, [0.9, 0.1, 0.1, 0.1, 0.1, 0.1])
    pack = lambda rec: msgpack.dumps({k: msgpack_numpy_array(v) for k, v in rec.items()}, use_bin_type=True)
    write_lmdb(tmp_path / "feat_th0.5_max3_min2", {"many.npz": pack(many), "few.npz": pack(few)})
    db = UniterImgDb(tmp_path, conf_th=0.5, max_bb=3, min_bb=2)
    assert db.nbb("many.npz") == 3  # 4 above 0.5, clamped to max_bb
    assert db.nbb("few.npz") == 2  # 1 above 0.5, raised to min_bb
    feat, pos = db["many.npz"]
    assert_close(feat, torch.from_numpy(many["features"][:3].astype(np.float32)), rtol=0, atol=0)
    assert pos.shape == (3, 7)


def test_fixed_num_bb_db_name(tmp_path):
    rng = np.random.default_rng(2)
    rec = image_record(rng, 5, [0.1] * 5)
    pack = msgpack.dumps({k: msgpack_numpy_array(v) for k, v in rec.items()}, use_bin_type=True)
    write_lmdb(tmp_path / "feat_numbb5", {"gt.npz": pack})
    feat, _ = UniterImgDb(tmp_path, conf_th=-1, num_bb=5)["gt.npz"]
    assert feat.shape == (5, D)


def test_malformed_image_records(tmp_path):
    rng = np.random.default_rng(3)
    rec = image_record(rng, 3, [0.9] * 3)
    no_feat = {k: msgpack_numpy_array(v) for k, v in rec.items() if k != "features"}
    write_lmdb(tmp_path / "feat_th0.2_max100_min1", {
        "junk.npz": b"\xc1not msgpack",
        "nofeat.npz": msgpack.dumps(no_feat, use_bin_type=True),
    })
    db = UniterImgDb(tmp_path, min_bb=1)
    with pytest.raises(AdvlabValueError, match="Malformed record 'junk.npz'"):
        db["junk.npz"]
    with pytest.raises(AdvlabValueError, match="missing array 'features'"):
        db["nofeat.npz"]
    with pytest.raises(FileNotFoundError, match="feat_th0.3_max100_min10"):
        UniterImgDb(tmp_path, conf_th=0.3)
    (tmp_path / "nbb_th0.2_max100_min1.json").write_text(json.dumps({"nofeat.npz": 9}))
    db.close()
    write_lmdb(tmp_path / "feat_th0.2_max100_min1", {
        "nofeat.npz": msgpack.dumps({k: msgpack_numpy_array(v) for k, v in rec.items()}, use_bin_type=True)})
    with pytest.raises(AdvlabValueError, match="expected 9 regions"):
        UniterImgDb(tmp_path, min_bb=1)["nofeat.npz"]


def txt_value(example):
    return lz4.frame.compress(msgpack.dumps(example, use_bin_type=True))


@pytest.fixture
def vqa_dbs(tmp_path, compressed_img_dir):
    img_dir, _ = compressed_img_dir
    txt = tmp_path / "vqa_train.db"
    examples = {
        "q1": {"input_ids": [11, 12, 13], "img_fname": "coco_1.npz", "target": {"labels": [2, 0], "scores": [0.3, 1.0]}},
        "q2": {"input_ids": [14], "img_fname": "coco_2.npz", "target": {"labels": [], "scores": []}},
        "q3": {"input_ids": list(range(20, 30)), "img_fname": "coco_2.npz", "target": {"labels": [1], "scores": [0.9]}},
    }
    write_lmdb(txt, {k: txt_value(v) for k, v in examples.items()} | {"bad": b"not lz4"})
    (txt / "meta.json").write_text(json.dumps({"bert": "bert-base-cased", "CLS": 101, "SEP": 102, "MASK": 103,
                                               "UNK": 100, "v_range": [999, 28996]}))
    (txt / "id2len.json").write_text(json.dumps({k: len(v["input_ids"]) for k, v in examples.items()} | {"bad": 1}))
    (txt / "txt2img.json").write_text(json.dumps({k: v["img_fname"] for k, v in examples.items()}))
    return txt, img_dir, examples


def test_txt_db_filters_by_length_and_decodes(vqa_dbs):
    txt, _, examples = vqa_dbs
    db = UniterTxtDb(txt, max_txt_len=5)
    assert db.ids == ["q1", "q2", "bad"] and db.lens == [3, 1, 1]
    assert UniterTxtDb(txt, max_txt_len=-1).ids == ["q1", "q2", "q3", "bad"]
    assert db["q1"] == examples["q1"]
    assert db.txt2img["q2"] == "coco_2.npz"
    with pytest.raises(AdvlabValueError, match="Malformed record 'bad'"):
        db["bad"]
    with pytest.raises(KeyError, match="q7"):
        db["q7"]


def test_txt_db_sidecar_errors(tmp_path):
    write_lmdb(tmp_path, {"a": txt_value({"input_ids": [1]})})
    with pytest.raises(FileNotFoundError, match="meta.json"):
        UniterTxtDb(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"toker": "bert-base-cased", "CLS": 101}))
    with pytest.raises(AdvlabValueError, match="'SEP'.*meta.json"):
        UniterTxtDb(tmp_path)


def test_vqa_dataset_collate_and_model(vqa_dbs):
    txt, img_dir, _ = vqa_dbs
    dataset = UniterVqaDataset(UniterTxtDb(txt, max_txt_len=12), UniterImgDb(img_dir, compressed=True), num_answers=5)
    first = dataset[0]
    assert first["input_ids"].tolist() == [101, 11, 12, 13, 102]
    assert_close(first["target"], torch.tensor([1.0, 0, 0.3, 0, 0]))
    rows = [dataset[i] for i in range(3)]
    batch = uniter_collate(rows)
    inputs = batch["inputs"]
    assert batch["ids"] == ["q1", "q2", "q3"]
    assert inputs["input_ids"].shape == (3, 12) and inputs["img_feat"].shape == (3, 3, D)
    assert batch["masks"]["txt"].sum(1).tolist() == [5, 3, 12]
    assert batch["masks"]["img"].sum(1).tolist() == [3, 3, 3]
    assert inputs["attention_mask"].sum(1).tolist() == [8, 6, 15]
    assert inputs["position_ids"].tolist() == [list(range(12))]
    assert batch["targets"].shape == (3, 5) and batch["targets"][1].sum() == 0

    model = UniterForVQA(UniterConfig.tiny(img_dim=D, vocab_size=200), num_answers=5).eval()
    logits = model(**inputs).logits
    for i, row in enumerate(rows):
        alone = model(input_ids=row["input_ids"][None], img_feat=row["img_feat"][None],
                      img_pos_feat=row["img_pos_feat"][None]).logits
        assert_close(logits[i : i + 1], alone, rtol=1e-5, atol=1e-5)


def test_gather_index_worked_example_from_the_reference():
    got = get_gather_index([5, 3], [3, 4], max_txt_len=5, out_size=8)
    assert got.tolist() == [list(range(8)), [0, 1, 2, 5, 6, 7, 8, 7]]


def test_collate_type_ids_and_errors():
    rows = [
        {"input_ids": torch.tensor([1, 2, 3]), "img_feat": torch.ones(2, D), "img_pos_feat": torch.ones(2, 7),
         "txt_type_ids": torch.tensor([0, 2, 2]), "img_type_ids": torch.tensor([1, 2])},
        {"input_ids": torch.tensor([1, 2]), "img_feat": torch.ones(3, D), "img_pos_feat": torch.ones(3, 7)},
    ]
    inputs = uniter_collate(rows)["inputs"]
    assert inputs["txt_type_ids"].tolist() == [[0, 2, 2], [0, 0, 0]]
    assert inputs["img_type_ids"].tolist() == [[1, 2, 1], [1, 1, 1]]
    assert uniter_collate(rows)["targets"] is None
    with pytest.raises(AdvlabValueError, match="'img_pos_feat' in row 0"):
        uniter_collate([{"input_ids": torch.tensor([1]), "img_feat": torch.ones(1, D)}])
    with pytest.raises(AdvlabValueError, match="empty batch"):
        uniter_collate([])


def test_target_and_position_helpers():
    with pytest.raises(AdvlabValueError, match="labels"):
        vqa_target([7], [1.0], num_answers=5)
    with pytest.raises(AdvlabValueError, match="norm_bb"):
        pos_feat_from_norm_bb(torch.zeros(2, 7))


def test_a_truncated_lmdb_is_refused_before_it_is_mapped(tmp_path):
    # the old reader mapped the file and died of SIGBUS on the first page past the end (this test then crashes)
    rng = np.random.default_rng(4)
    values = {f"img_{i}.npz": msgpack.dumps({k: msgpack_numpy_array(v) for k, v in image_record(rng, 3, [0.9] * 3).items()},
                                           use_bin_type=True) for i in range(40)}
    db_dir = tmp_path / "feat_th0.2_max100_min1"
    write_lmdb(db_dir, values)
    data = db_dir / "data.mdb"
    env = lmdb.open(str(db_dir), readonly=True, lock=False)
    pages, page_size = env.info()["last_pgno"] + 1, env.stat()["psize"]
    env.close()
    assert data.stat().st_size >= pages * page_size > 8 * page_size
    full = data.read_bytes()
    data.write_bytes(full[: (pages // 2) * page_size])
    with pytest.raises(AdvlabValueError, match=rf"data.mdb' is truncated: its meta page says {pages} pages of "
                       rf"{page_size} bytes .* but the file has {(pages // 2) * page_size} bytes"):
        UniterImgDb(tmp_path, min_bb=1)
    data.write_bytes(full[:100])
    with pytest.raises(AdvlabValueError, match="to be an LMDB data file"):
        UniterImgDb(tmp_path, min_bb=1)
    data.write_bytes(full)  # whole again: it opens and reads
    feat, _ = UniterImgDb(tmp_path, min_bb=1)["img_39.npz"]
    assert feat.shape == (3, D)


def test_non_utf8_sidecars_and_a_fifo_data_file_are_named(tmp_path):
    # the old readers raised a raw UnicodeDecodeError for a Latin-1 JSON sidecar, and would block on a FIFO data.mdb
    import os

    rng = np.random.default_rng(5)
    rec = image_record(rng, 3, [0.9] * 3)
    write_lmdb(tmp_path / "feat_th0.2_max100_min1", {
        "a.npz": msgpack.dumps({k: msgpack_numpy_array(v) for k, v in rec.items()}, use_bin_type=True)})
    (tmp_path / "nbb_th0.2_max100_min1.json").write_bytes(b'{"caf\xe9.npz": 3}')
    with pytest.raises(AdvlabValueError, match=r"Malformed JSON in .*nbb_th0.2_max100_min1.json.*utf-8"):
        UniterImgDb(tmp_path, min_bb=1)
    txt = tmp_path / "txt.db"
    write_lmdb(txt, {"q1": txt_value({"input_ids": [1, 2]})})
    (txt / "meta.json").write_bytes(b'{"CLS": 101, "SEP": 102, "note": "\xe9"}')
    (txt / "id2len.json").write_text(json.dumps({"q1": 2}))
    with pytest.raises(AdvlabValueError, match=r"Malformed JSON in .*meta.json"):
        UniterTxtDb(txt)
    fifo_db = tmp_path / "fifo.db"
    fifo_db.mkdir()
    os.mkfifo(fifo_db / "data.mdb")
    (fifo_db / "meta.json").write_text(json.dumps({"CLS": 101, "SEP": 102}))
    (fifo_db / "id2len.json").write_text(json.dumps({"q1": 2}))
    with pytest.raises(AdvlabValueError, match="data.mdb' to be a regular LMDB data file"):
        UniterTxtDb(fifo_db)
