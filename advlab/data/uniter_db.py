"""Readers for UNITER's feature and text databases, VQA targets, and the batch collate.

UNITER ships its data pre-processed (the formats its `ChenRocks/UNITER` code reads in
`data/data.py`, `DetectFeatLmdb` and `TxtTokLmdb`):

- `img_db/<split>/`: an LMDB of region features, one record per image, keyed by the
  `.npz` file name; values are `np.savez_compressed` bytes (`_compressed` databases) or
  msgpack with `msgpack_numpy` array encoding. Arrays: `features` (n, 2048), `norm_bb`
  (n, 6), `conf` (n, 1), `soft_labels` (n, 1601), float16, pre-truncated to nbb rows;
  a sidecar `nbb_th{conf_th}_max{max_bb}_min{min_bb}.json` gives nbb per image.
- `txt_db/<name>.db/`: an LMDB of lz4-frame-compressed msgpack example dicts keyed by
  example id, with `meta.json`, `id2len.json` and `txt2img.json` beside it.

`UniterImgDb` / `UniterTxtDb` read them, `UniterVqaDataset` joins them into VQA examples,
and `uniter_collate` pads a list of rows into the model's inputs plus the per-modality
masks advlab's `masks=` takes. `lmdb`, `msgpack`, `lz4` and `numpy` (the `data` extra)
are imported inside the functions that need them, so `import advlab` never needs them.
"""

from __future__ import annotations

import io
import json
import os
import stat
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from advlab._errors import AdvlabTypeError, AdvlabValueError
from advlab.backbones.uniter import UniterModel

__all__ = [
    "UniterImgDb",
    "UniterTxtDb",
    "UniterVqaDataset",
    "get_gather_index",
    "pos_feat_from_norm_bb",
    "uniter_collate",
    "vqa_target",
]


def pos_feat_from_norm_bb(norm_bb: Tensor) -> Tensor:
    """Append the box area to the 6 stored box values: the 7-d position feature.

    `norm_bb` holds `x1/W, y1/H, x2/W, y2/H, w/W, h/H`; the result adds `(w/W) * (h/H)`,
    as UNITER's `_get_img_feat` does at load time.

    Args:
        norm_bb: Normalised boxes.

    Shape:
        norm_bb: [n, 6]. Output: [n, 7].

    Examples:
        >>> pos_feat_from_norm_bb(torch.tensor([[0.1, 0.2, 0.5, 0.6, 0.4, 0.4]]))
        tensor([[0.1000, 0.2000, 0.5000, 0.6000, 0.4000, 0.4000, 0.1600]])
    """
    if not isinstance(norm_bb, Tensor) or norm_bb.dim() != 2 or norm_bb.shape[1] != 6:
        raise AdvlabValueError(f"Expected `norm_bb` to have shape [n, 6], but got {tuple(norm_bb.shape)}.")
    return UniterModel.position_features(norm_bb)


def vqa_target(labels: Sequence[int], scores: Sequence[float], num_answers: int = 3129) -> Tensor:
    """Scatter UNITER's sparse VQA target (`labels`, soft `scores`) into a dense vector.

    Questions whose answers are all outside the vocabulary have empty lists: all zeros.

    Args:
        labels: Answer indices into `ans2label.json`.
        scores: Their soft scores (0.3 / 0.6 / 0.9 / 1.0 for 1 / 2 / 3 / >= 4 of 10
            annotators in the usual VQA pre-processing, e.g. `compute_softscore.py` of
            hengyuan-hu/bottom-up-attention-vqa).
        num_answers: Answer vocabulary size.

    Shape:
        Output: [num_answers].

    Examples:
        >>> vqa_target([2, 0], [0.3, 1.0], num_answers=4)
        tensor([1.0000, 0.0000, 0.3000, 0.0000])
    """
    labels_t = torch.as_tensor(list(labels), dtype=torch.long)
    scores_t = torch.as_tensor(list(scores), dtype=torch.float32)
    if labels_t.shape != scores_t.shape:
        raise AdvlabValueError(
            f"Expected `labels` and `scores` of equal length, but got {labels_t.numel()} and {scores_t.numel()}."
        )
    if labels_t.numel() and (labels_t.min() < 0 or labels_t.max() >= num_answers):
        raise AdvlabValueError(f"Expected `labels` in [0, {num_answers}), but got {labels_t.tolist()}.")
    target = torch.zeros(num_answers)
    target.scatter_(0, labels_t, scores_t)
    return target


def get_gather_index(txt_lens: Sequence[int], num_bbs: Sequence[int], max_txt_len: int, out_size: int) -> Tensor:
    """Index that compacts `[padded text, padded regions]` into `[text, regions, junk]` per row.

    Row i starts as `arange(out_size)`; positions `tl_i .. tl_i + nbb_i - 1` are overwritten
    with `max_txt_len .. max_txt_len + nbb_i - 1` (where the regions start once the padded
    text and regions are concatenated). Positions past `tl_i + nbb_i` are junk, masked by
    the attention mask.

    Args:
        txt_lens: Text length per row ([CLS] and [SEP] included).
        num_bbs: Regions per row.
        max_txt_len: The padded text length.
        out_size: The joint length, `max(txt_lens[i] + num_bbs[i])`.

    Shape:
        Output: [b, out_size], long.

    Examples:
        >>> get_gather_index([5, 3], [3, 4], max_txt_len=5, out_size=8)
        tensor([[0, 1, 2, 3, 4, 5, 6, 7],
                [0, 1, 2, 5, 6, 7, 8, 7]])
    """
    if len(txt_lens) != len(num_bbs):
        raise AdvlabValueError(
            f"Expected `txt_lens` and `num_bbs` of equal length, but got {len(txt_lens)} and {len(num_bbs)}."
        )
    index = torch.arange(out_size, dtype=torch.long).unsqueeze(0).repeat(len(txt_lens), 1)
    for i, (tl, nbb) in enumerate(zip(txt_lens, num_bbs)):
        index[i, tl : tl + nbb] = torch.arange(max_txt_len, max_txt_len + nbb, dtype=torch.long)
    return index


# --------------------------------------------------------------------------------------
# LMDB plumbing
# --------------------------------------------------------------------------------------


def _decode_msgpack_numpy(obj: dict) -> Any:
    """Object hook for msgpack_numpy's array encoding: {nd, type, kind, shape, data}."""
    import numpy as np

    def get(name: str) -> Any:
        return obj.get(name.encode(), obj.get(name))

    nd = get("nd")
    if nd is None:
        return obj
    dtype = get("type")
    dtype = dtype.decode() if isinstance(dtype, bytes) else dtype
    data = get("data")
    if nd:
        return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(get("shape"))
    return np.frombuffer(data, dtype=np.dtype(dtype))[0]  # a numpy scalar


def _read_json_object(path: str) -> dict:
    """A JSON object from a file, or an error naming the file (malformed JSON, not UTF-8, not an object)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdvlabValueError(f"Malformed JSON in {path!r}: {err}.") from None
    if not isinstance(data, dict):
        raise AdvlabValueError(f"Expected {path!r} to hold a JSON object, but got {type(data).__name__}.")
    return data


# LMDB's meta pages (mdb.c, 64-bit little-endian builds): pages 0 and 1 each hold a 16-byte page header, then
# MDB_meta: mm_magic u32 @16, mm_version u32 @20, mm_address @24, mm_mapsize @32, mm_dbs[2] (48 bytes each,
# the first one's md_pad u32 @40 stores the page size), mm_last_pg u64 @136, mm_txnid u64 @144.
_MDB_MAGIC = 0xBEEFC0DE
_META_END = 152


def _check_lmdb_size(path: str) -> None:
    """Refuse a `data.mdb` shorter than its newest meta page says it is.

    LMDB maps the file and reads pages by pointer: a page beyond the end of a truncated file is not an
    error but a SIGBUS that kills the process. The newest meta page (highest transaction id) records
    the last page in use, so the file must hold at least `(last_pg + 1) * page_size` bytes.
    """
    import struct

    data_file = os.path.join(path, "data.mdb")
    try:
        st = os.stat(data_file)
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block the read below
            raise AdvlabValueError(f"Expected {data_file!r} to be a regular LMDB data file, but it is not one.")
        size = st.st_size
        with open(data_file, "rb") as f:
            head = f.read(_META_END)
            if len(head) < _META_END or struct.unpack_from("<I", head, 16)[0] != _MDB_MAGIC:
                raise AdvlabValueError(
                    f"Expected {data_file!r} to be an LMDB data file (magic 0xBEEFC0DE after the first page header), "
                    f"but it is not one, or it is truncated to {size} bytes."
                )
            page_size = struct.unpack_from("<I", head, 40)[0]
            if page_size < _META_END or page_size & (page_size - 1):  # a power of two, as LMDB requires
                raise AdvlabValueError(f"Expected a power-of-two page size in {data_file!r}, but got {page_size}.")
            f.seek(page_size)
            second = f.read(_META_END)
    except FileNotFoundError:
        return  # lmdb.open reports the missing file
    metas = [head] + ([second] if len(second) == _META_END else [])
    newest = max(metas, key=lambda m: struct.unpack_from("<Q", m, 144)[0])
    last_pg = struct.unpack_from("<Q", newest, 136)[0]
    needed = (last_pg + 1) * page_size
    if size < needed:
        raise AdvlabValueError(
            f"The LMDB file {data_file!r} is truncated: its meta page says {last_pg + 1} pages of {page_size} bytes "
            f"({needed} bytes) are in use, but the file has {size} bytes. Reading it would crash the process "
            "(SIGBUS); copy or download the database again."
        )


def _open_lmdb(path: str) -> Any:
    import lmdb

    if not os.path.isdir(path):
        raise FileNotFoundError(f"Expected an LMDB directory at {path!r}, but it does not exist.")
    _check_lmdb_size(path)
    try:
        return lmdb.open(path, readonly=True, create=False, lock=False, readahead=False, max_readers=512)
    except lmdb.Error as err:
        raise AdvlabValueError(f"Could not open the LMDB at {path!r}: {err}.") from None


_ENVS: dict[tuple[int, str], Any] = {}  # one environment per (process, path): LMDB refuses a second open


class _Lmdb:
    """A read-only LMDB opened lazily in each process (DataLoader workers fork) and shared by readers."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._key = os.path.realpath(path)
        self._env()  # fail early on a bad path

    def _env(self) -> Any:
        key = (os.getpid(), self._key)
        if key not in _ENVS:
            _ENVS[key] = _open_lmdb(self.path)
        return _ENVS[key]

    def get(self, key: str) -> bytes | None:
        with self._env().begin(buffers=False) as txn:
            return txn.get(key.encode("utf-8"))

    def close(self) -> None:
        env = _ENVS.pop((os.getpid(), self._key), None)
        if env is not None:
            env.close()


# --------------------------------------------------------------------------------------
# Image features
# --------------------------------------------------------------------------------------


_USED_ARRAYS = ("features", "norm_bb", "conf")  # never `soft_labels` [n, 1601], as in the official reader


class UniterImgDb:
    """UNITER's region-feature LMDB (`DetectFeatLmdb`): features and 7-d box features per image.

    The database directory is `{img_dir}/feat_th{conf_th}_max{max_bb}_min{min_bb}` (or
    `feat_numbb{num_bb}` when `conf_th == -1`), with a `_compressed` suffix when
    `compressed`; `db_name` overrides the name. Regions are stored in descending detector
    confidence and read as the first nbb rows: nbb comes from the sidecar
    `nbb_th{conf_th}_max{max_bb}_min{min_bb}.json` or, when it is missing, from the
    record's `conf` as `clamp(#(conf > conf_th), min_bb, max_bb)` (the official reader
    crashes there).

    Args:
        img_dir: The split directory (`img_db/coco_train2014`).
        conf_th: Confidence threshold; -1 means a fixed `num_bb` regions.
        max_bb: Most regions per image.
        min_bb: Fewest regions per image.
        num_bb: Regions per image when `conf_th == -1`.
        compressed: Values are `np.savez_compressed` bytes rather than msgpack.
        db_name: The LMDB directory name inside `img_dir`, if not the default.

    Shape:
        `db[fname]` returns features [nbb, d] and position features [nbb, 7], float32.

    Examples:
        >>> import tempfile, lmdb, msgpack, numpy as np
        >>> d = tempfile.mkdtemp()
        >>> env = lmdb.open(f"{d}/feat_numbb2", map_size=1 << 20)
        >>> arr = lambda a: {b"nd": True, b"type": a.dtype.str, b"kind": b"", b"shape": a.shape, b"data": a.tobytes()}
        >>> rec = {"features": arr(np.ones((2, 4), np.float16)), "norm_bb": arr(np.full((2, 6), 0.5, np.float16))}
        >>> with env.begin(write=True) as txn:
        ...     _ = txn.put(b"img0.npz", msgpack.dumps(rec, use_bin_type=True))
        >>> env.close()
        >>> feat, pos = UniterImgDb(d, conf_th=-1, num_bb=2)["img0.npz"]
        >>> feat.shape, pos[0, 6].item()
        (torch.Size([2, 4]), 0.25)
    """

    def __init__(
        self,
        img_dir: str | os.PathLike[str],
        *,
        conf_th: float = 0.2,
        max_bb: int = 100,
        min_bb: int = 10,
        num_bb: int = 36,
        compressed: bool = False,
        db_name: str | None = None,
    ) -> None:
        self.img_dir = os.fspath(img_dir)
        if not 1 <= min_bb <= max_bb:
            raise AdvlabValueError(f"Expected 1 <= `min_bb` <= `max_bb`, but got min_bb={min_bb}, max_bb={max_bb}.")
        self.conf_th, self.max_bb, self.min_bb, self.num_bb, self.compressed = (
            conf_th,
            max_bb,
            min_bb,
            num_bb,
            compressed,
        )
        fixed = conf_th == -1
        if db_name is None:
            db_name = f"feat_numbb{num_bb}" if fixed else f"feat_th{conf_th}_max{max_bb}_min{min_bb}"
            db_name += "_compressed" if compressed else ""
        self.db_name = db_name
        self.name2nbb: dict[str, int] | None = None
        sidecar = os.path.join(self.img_dir, f"nbb_th{conf_th}_max{max_bb}_min{min_bb}.json")
        if not fixed and os.path.isfile(sidecar):
            self.name2nbb = _read_json_object(sidecar)
        self._db = _Lmdb(os.path.join(self.img_dir, db_name))

    def _record(self, fname: str) -> Mapping[str, Any]:
        raw = self._db.get(fname)
        if raw is None:
            raise KeyError(f"Image {fname!r} is not in the image DB {self._db.path!r}.")
        try:
            if self.compressed:
                import numpy as np

                with np.load(io.BytesIO(raw), allow_pickle=False) as npz:  # each array inflates on access
                    return {k: npz[k] for k in npz.files if k in _USED_ARRAYS}
            import msgpack

            record = msgpack.loads(raw, raw=False, object_hook=_decode_msgpack_numpy)
        except Exception as err:  # noqa: BLE001 - any decoder failure is a malformed record
            kind = "np.savez_compressed" if self.compressed else "msgpack"
            raise AdvlabValueError(
                f"Malformed record {fname!r} in {self._db.path!r}: expected {kind} bytes "
                f"({type(err).__name__}: {str(err)[:120]}). Is `compressed` set right?"
            ) from None
        if not isinstance(record, Mapping):
            raise AdvlabValueError(f"Malformed record {fname!r} in {self._db.path!r}: expected a dict of arrays.")
        return record

    def nbb(self, fname: str, record: Mapping[str, Any] | None = None) -> int:
        """Number of regions read for `fname` (see the class docstring)."""
        if self.conf_th == -1:
            return self.num_bb
        if self.name2nbb is not None:
            if fname not in self.name2nbb:
                raise KeyError(f"Image {fname!r} is not in the nbb sidecar of {self.img_dir!r}.")
            return int(self.name2nbb[fname])
        record = self._record(fname) if record is None else record
        if "conf" not in record:
            raise AdvlabValueError(
                f"Record {fname!r} has no `conf` array and {self.img_dir!r} has no nbb sidecar; cannot count regions."
            )
        above = int((torch.as_tensor(record["conf"].astype("float32")) > self.conf_th).sum())
        return max(self.min_bb, min(above, self.max_bb))

    def __getitem__(self, fname: str) -> tuple[Tensor, Tensor]:
        """Features [nbb, d] and 7-d position features [nbb, 7] of one image, float32."""
        record = self._record(fname)
        for name in ("features", "norm_bb"):
            if name not in record:
                raise AdvlabValueError(
                    f"Malformed record {fname!r} in {self._db.path!r}: missing array {name!r} (has {sorted(record)})."
                )
        nbb = self.nbb(fname, record)
        feat = torch.from_numpy(record["features"][:nbb].astype("float32"))
        norm_bb = torch.from_numpy(record["norm_bb"][:nbb].astype("float32"))
        if feat.shape[0] != nbb or norm_bb.shape[0] != nbb:
            raise AdvlabValueError(
                f"Malformed record {fname!r} in {self._db.path!r}: expected {nbb} regions, "
                f"but features has {feat.shape[0]} and norm_bb {norm_bb.shape[0]}."
            )
        return feat, pos_feat_from_norm_bb(norm_bb)

    def close(self) -> None:
        """Close the LMDB environment (it reopens on the next read)."""
        self._db.close()


# --------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------


class UniterTxtDb:
    """UNITER's text LMDB (`TxtTokLmdb`): lz4-compressed msgpack example dicts by id.

    Reads `meta.json` (needs `CLS` and `SEP`), `id2len.json` (ids longer than
    `max_txt_len` word pieces are dropped; -1 keeps all) and, if present, `txt2img.json`.

    Args:
        db_dir: The `<name>.db` directory (an LMDB environment with the JSON sidecars).
        max_txt_len: Longest text kept, in word pieces without [CLS] / [SEP]; -1 for all.

    Examples:
        >>> import tempfile, json, lmdb, msgpack, lz4.frame
        >>> d = tempfile.mkdtemp()
        >>> env = lmdb.open(d, map_size=1 << 20)
        >>> with env.begin(write=True) as txn:
        ...     _ = txn.put(b"q1", lz4.frame.compress(msgpack.dumps({"input_ids": [7, 8]}, use_bin_type=True)))
        >>> env.close()
        >>> _ = open(f"{d}/meta.json", "w").write(json.dumps({"CLS": 101, "SEP": 102}))
        >>> _ = open(f"{d}/id2len.json", "w").write(json.dumps({"q1": 2}))
        >>> db = UniterTxtDb(d)
        >>> db.ids, db.combine_inputs(db["q1"]["input_ids"])
        (['q1'], [101, 7, 8, 102])
    """

    def __init__(self, db_dir: str | os.PathLike[str], *, max_txt_len: int = 60) -> None:
        self.db_dir = os.fspath(db_dir)
        self.meta = self._json("meta.json")
        for key in ("CLS", "SEP"):
            if key not in self.meta:
                raise AdvlabValueError(f"Expected key {key!r} in {os.path.join(self.db_dir, 'meta.json')!r}.")
        self.cls_id, self.sep_id = int(self.meta["CLS"]), int(self.meta["SEP"])
        id2len = self._json("id2len.json")
        self.ids = [i for i, n in id2len.items() if max_txt_len == -1 or n <= max_txt_len]
        self.lens = [int(id2len[i]) for i in self.ids]
        txt2img = os.path.join(self.db_dir, "txt2img.json")
        self.txt2img: dict[str, Any] = self._json("txt2img.json") if os.path.isfile(txt2img) else {}
        self._db = _Lmdb(self.db_dir)

    def _json(self, name: str) -> dict:
        path = os.path.join(self.db_dir, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Expected {name} in the text DB {self.db_dir!r}, but {path!r} does not exist.")
        return _read_json_object(path)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, id_: str) -> dict[str, Any]:
        """The example dict stored under `id_`."""
        raw = self._db.get(id_)
        if raw is None:
            raise KeyError(f"Example {id_!r} is not in the text DB {self.db_dir!r}.")
        try:
            import lz4.frame
            import msgpack

            example = msgpack.loads(lz4.frame.decompress(raw), raw=False, object_hook=_decode_msgpack_numpy)
        except Exception as err:  # noqa: BLE001 - any decoder failure is a malformed record
            raise AdvlabValueError(
                f"Malformed record {id_!r} in {self.db_dir!r}: expected lz4-frame-compressed msgpack "
                f"({type(err).__name__}: {str(err)[:120]})."
            ) from None
        if not isinstance(example, dict):
            raise AdvlabValueError(f"Malformed record {id_!r} in {self.db_dir!r}: expected a dict.")
        return example

    def combine_inputs(self, input_ids: Sequence[int]) -> list[int]:
        """`[CLS] + input_ids + [SEP]`."""
        return [self.cls_id, *[int(i) for i in input_ids], self.sep_id]

    def close(self) -> None:
        """Close the LMDB environment (it reopens on the next read)."""
        self._db.close()


# --------------------------------------------------------------------------------------
# VQA dataset and the collate
# --------------------------------------------------------------------------------------


class UniterVqaDataset(torch.utils.data.Dataset):
    """VQA examples from a text DB and an image DB.

    Each item is a dict: `id`, `input_ids` ([CLS] question [SEP]), `img_feat`,
    `img_pos_feat` and `target` (dense soft scores; all zeros for a record without
    `target`, e.g. test questions).

    Args:
        txt_db: The questions.
        img_db: The image features.
        num_answers: Answer vocabulary (3129).

    Shape:
        input_ids: [lt]; img_feat: [nbb, d]; img_pos_feat: [nbb, 7]; target: [num_answers].

    Examples:
        >>> issubclass(UniterVqaDataset, torch.utils.data.Dataset)
        True
    """

    def __init__(self, txt_db: UniterTxtDb, img_db: UniterImgDb, *, num_answers: int = 3129) -> None:
        if not isinstance(txt_db, UniterTxtDb) or not isinstance(img_db, UniterImgDb):
            raise AdvlabTypeError(
                f"Expected a UniterTxtDb and a UniterImgDb, but got {type(txt_db).__name__} and {type(img_db).__name__}."
            )
        self.txt_db, self.img_db, self.num_answers = txt_db, img_db, num_answers

    def __len__(self) -> int:
        return len(self.txt_db)

    def __getitem__(self, i: int) -> dict[str, Any]:
        qid = self.txt_db.ids[i]
        example = self.txt_db[qid]
        if "input_ids" not in example:
            raise AdvlabValueError(f"Malformed record {qid!r} in {self.txt_db.db_dir!r}: no `input_ids`.")
        fname = example.get("img_fname", self.txt_db.txt2img.get(qid))
        if fname is None:
            raise AdvlabValueError(f"Example {qid!r} has no `img_fname` and is not in txt2img.json.")
        feat, pos = self.img_db[fname]
        target = example.get("target")
        if target is None:
            dense = torch.zeros(self.num_answers)
        else:
            dense = vqa_target(target.get("labels", []), target.get("scores", []), self.num_answers)
        return {
            "id": qid,
            "input_ids": torch.tensor(self.txt_db.combine_inputs(example["input_ids"]), dtype=torch.long),
            "img_feat": feat,
            "img_pos_feat": pos,
            "target": dense,
        }


def _pad(seqs: Sequence[Tensor], value: float = 0) -> Tensor:
    return torch.nn.utils.rnn.pad_sequence(list(seqs), batch_first=True, padding_value=value)


def uniter_collate(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Pad rows into UNITER inputs, with `gather_index`, the joint attention mask and masks.

    Each row needs `input_ids` [lt_i] and `img_feat` [nbb_i, d] with `img_pos_feat`
    [nbb_i, 7]; optional `txt_type_ids` [lt_i], `img_type_ids` [nbb_i], `target`, `id`.
    NLVR2 paired models and VCR take several rows per example: expand examples into
    rows (row 2i = sentence + img0, 2i + 1 = sentence + img1; VCR: one row per candidate)
    before calling this.

    Args:
        rows: The rows of one batch.

    Returns:
        `{"inputs": ..., "targets": ..., "masks": ..., "ids": ...}`: `inputs` are the
        keyword arguments of the UNITER models (`model(**batch["inputs"])`), `targets` the
        stacked `target`s (None if absent), `masks` the bool masks `{"txt": [b, lt],
        "img": [b, nr]}` of real tokens and regions, `ids` the row ids (None if absent).

    Shape:
        input_ids: [b, lt]; position_ids: [1, lt]; img_feat: [b, nr, d];
        img_pos_feat: [b, nr, 7]; attention_mask, gather_index: [b, l] with
        l = max(lt_i + nbb_i).

    Examples:
        >>> rows = [{"input_ids": torch.tensor([1, 5, 5, 5, 2]), "img_feat": torch.ones(3, 4),
        ...          "img_pos_feat": torch.ones(3, 7)},
        ...         {"input_ids": torch.tensor([1, 5, 2]), "img_feat": torch.ones(4, 4),
        ...          "img_pos_feat": torch.ones(4, 7)}]
        >>> batch = uniter_collate(rows)
        >>> batch["inputs"]["gather_index"][1].tolist(), batch["masks"]["txt"][1].tolist()
        ([0, 1, 2, 5, 6, 7, 8, 7], [True, True, True, False, False])
    """
    if not rows:
        raise AdvlabValueError("Expected at least one row, but got an empty batch.")
    for i, row in enumerate(rows):
        for key in ("input_ids", "img_feat", "img_pos_feat"):
            if key not in row:
                raise AdvlabValueError(f"Expected key {key!r} in row {i}, but it has {sorted(row)}.")
    txt_lens = [int(r["input_ids"].shape[0]) for r in rows]
    num_bbs = [int(r["img_feat"].shape[0]) for r in rows]
    input_ids = _pad([r["input_ids"] for r in rows], 0)  # [b, lt]
    lt = input_ids.shape[1]
    img_feat = _pad([r["img_feat"] for r in rows], 0)  # [b, nr, d]
    img_pos_feat = _pad([r["img_pos_feat"] for r in rows], 0)  # [b, nr, 7]
    nr = img_feat.shape[1]
    out_size = max(t + n for t, n in zip(txt_lens, num_bbs))
    attention_mask = torch.zeros(len(rows), out_size, dtype=torch.long)
    for i, (t, n) in enumerate(zip(txt_lens, num_bbs)):
        attention_mask[i, : t + n] = 1
    inputs: dict[str, Tensor] = {
        "input_ids": input_ids,
        "position_ids": torch.arange(lt, dtype=torch.long).unsqueeze(0),  # [1, lt], shared by the batch
        "img_feat": img_feat,
        "img_pos_feat": img_pos_feat,
        "attention_mask": attention_mask,
        "gather_index": get_gather_index(txt_lens, num_bbs, lt, out_size),
    }
    if any("txt_type_ids" in r for r in rows):
        inputs["txt_type_ids"] = _pad(
            [r.get("txt_type_ids", torch.zeros(t, dtype=torch.long)) for r, t in zip(rows, txt_lens)], 0
        )
    if any("img_type_ids" in r for r in rows):
        inputs["img_type_ids"] = _pad(
            [r.get("img_type_ids", torch.ones(n, dtype=torch.long)) for r, n in zip(rows, num_bbs)], 1
        )
    masks = {
        "txt": torch.arange(lt).unsqueeze(0) < torch.tensor(txt_lens).unsqueeze(1),  # [b, lt]
        "img": torch.arange(nr).unsqueeze(0) < torch.tensor(num_bbs).unsqueeze(1),  # [b, nr]
    }
    targets = None
    if all("target" in r for r in rows):
        targets = torch.stack([torch.as_tensor(r["target"]) for r in rows])
    ids = [r["id"] for r in rows] if all("id" in r for r in rows) else None
    return {"inputs": inputs, "targets": targets, "masks": masks, "ids": ids}
