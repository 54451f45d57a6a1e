"""Reader for LXMERT's obj36 feature files (bottom-up-attention features, 36 boxes per image).

Format (airsplay/lxmert `src/utils.py`): one image per line, ten tab-separated fields, no header:

```text
img_id  img_h  img_w  objects_id  objects_conf  attrs_id  attrs_conf  num_boxes  boxes  features
```

`img_id` is a string, the next two and `num_boxes` are integers written as text, and each array field is the
base64 encoding of the raw little-endian bytes (numpy `tobytes`) of: `objects_id` int64 [n], `objects_conf`
float32 [n], `attrs_id` int64 [n], `attrs_conf` float32 [n], `boxes` float32 [n, 4] (pixel `x1, y1, x2, y2`)
and `features` float32 [n, 2048], with n = `num_boxes` (36 in the released files).

LXMERT's released weights expect the boxes divided by image width (x) and height (y): normalised `x1, y1, x2, y2`
in [0, 1], which is what this reader returns by default. numpy is imported only when a file is read.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from advlab._errors import AdvlabTypeError, AdvlabValueError

__all__ = ["OBJ36_FIELDS", "Obj36Record", "collate_obj36", "iter_obj36", "load_obj36"]

OBJ36_FIELDS = (
    "img_id",
    "img_h",
    "img_w",
    "objects_id",
    "objects_conf",
    "attrs_id",
    "attrs_conf",
    "num_boxes",
    "boxes",
    "features",
)

_RELEASED_WIDTH = 2048  # pool5_flat of the Caffe BUTD Faster R-CNN
_BOX_TOLERANCE = 1e-5  # the original loaders assert boxes in [0, 1] with this slack


@dataclass
class Obj36Record:
    """One image of an obj36 file.

    Attributes:
        img_id: Image id, e.g. `COCO_val2014_000000000042`.
        img_h: Image height in pixels.
        img_w: Image width in pixels.
        boxes: Normalised `x1, y1, x2, y2` in [0, 1] (pixels if read with `normalize_boxes=False`).
        features: RoI features (`pool5_flat`).
        objects_id: Visual Genome object class per box.
        objects_conf: Detector confidence per box.
        attrs_id: Visual Genome attribute class per box.
        attrs_conf: Attribute confidence per box.

    Shape:
        boxes: [n, 4]
        features: [n, f]
        objects_id, objects_conf, attrs_id, attrs_conf: [n]

    Examples:
        >>> r = Obj36Record("img", 10, 20, torch.zeros(2, 4), torch.zeros(2, 3),
        ...                 torch.zeros(2, dtype=torch.long), torch.ones(2), torch.zeros(2, dtype=torch.long), torch.ones(2))
        >>> r.num_boxes
        2
    """

    img_id: str
    img_h: int
    img_w: int
    boxes: Tensor
    features: Tensor
    objects_id: Tensor
    objects_conf: Tensor
    attrs_id: Tensor
    attrs_conf: Tensor

    @property
    def num_boxes(self) -> int:
        """Number of boxes (36 in the released files)."""
        return int(self.boxes.shape[0])


def _decode(field: str, b64: str, dtype: str, num_boxes: int, where: str, per_box: int | None = None) -> Tensor:
    import base64
    import binascii

    import numpy as np

    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise AdvlabValueError(f"{where}: expected field `{field}` to be base64, but it does not decode.") from None
    itemsize = np.dtype(dtype).itemsize
    if per_box is None:  # infer the width (features: 2048 in the released files)
        if num_boxes == 0 or not raw or len(raw) % (itemsize * num_boxes):
            raise AdvlabValueError(
                f"{where}: expected field `{field}` to hold {num_boxes} rows of {dtype}, but got {len(raw)} bytes."
            )
        per_box = len(raw) // (itemsize * num_boxes)
    if len(raw) != itemsize * num_boxes * per_box:
        raise AdvlabValueError(
            f"{where}: expected field `{field}` to hold {num_boxes * per_box} {dtype} values "
            f"({itemsize * num_boxes * per_box} bytes) for num_boxes={num_boxes}, but got {len(raw)} bytes."
        )
    array = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype)  # little-endian on disk
    shape = (num_boxes, per_box) if field in ("boxes", "features") else (num_boxes,)  # [n, 1] features stay 2-d
    return torch.from_numpy(array.reshape(shape))


def _parse_line(line: str, where: str, normalize_boxes: bool, feature_dim: int | None) -> Obj36Record:
    parts = line.rstrip("\r\n").split("\t")
    if len(parts) != len(OBJ36_FIELDS):
        raise AdvlabValueError(
            f"{where}: expected {len(OBJ36_FIELDS)} tab-separated fields ({', '.join(OBJ36_FIELDS)}), "
            f"but got {len(parts)}."
        )
    values = dict(zip(OBJ36_FIELDS, parts))
    ints: dict[str, int] = {}
    for name in ("img_h", "img_w", "num_boxes"):
        try:
            ints[name] = int(values[name])
        except ValueError:
            raise AdvlabValueError(
                f"{where}: expected field `{name}` to be an integer, but got {values[name][:40]!r}."
            ) from None
        if ints[name] < (0 if name == "num_boxes" else 1):
            raise AdvlabValueError(f"{where}: expected field `{name}` to be positive, but got {ints[name]}.")
    n = ints["num_boxes"]
    boxes = _decode("boxes", values["boxes"], "float32", n, where, per_box=4)
    features = _decode("features", values["features"], "float32", n, where, per_box=feature_dim)
    record = Obj36Record(
        img_id=values["img_id"],
        img_h=ints["img_h"],
        img_w=ints["img_w"],
        boxes=boxes,
        features=features,
        objects_id=_decode("objects_id", values["objects_id"], "int64", n, where, per_box=1),
        objects_conf=_decode("objects_conf", values["objects_conf"], "float32", n, where, per_box=1),
        attrs_id=_decode("attrs_id", values["attrs_id"], "int64", n, where, per_box=1),
        attrs_conf=_decode("attrs_conf", values["attrs_conf"], "float32", n, where, per_box=1),
    )
    if normalize_boxes:
        scale = torch.tensor([record.img_w, record.img_h, record.img_w, record.img_h], dtype=torch.float32)
        normed = boxes / scale  # x by width, y by height
        if n and not (normed.min() >= -_BOX_TOLERANCE and normed.max() <= 1 + _BOX_TOLERANCE):
            raise AdvlabValueError(
                f"{where}: expected pixel boxes inside the {record.img_w}x{record.img_h} image, but normalised "
                f"values span [{normed.min().item():.4f}, {normed.max().item():.4f}]."
            )
        record.boxes = normed.clamp_(0.0, 1.0)
    return record


def iter_obj36(
    path: str | os.PathLike[str],
    *,
    normalize_boxes: bool = True,
    feature_dim: int | None = None,
    limit: int | None = None,
) -> Iterator[Obj36Record]:
    r"""Read an obj36 TSV file one image at a time (a line is about 400 kB).

    Args:
        path: The `.tsv` file.
        normalize_boxes: Divide x by image width and y by height (what LXMERT expects); `False` keeps pixels.
        feature_dim: Expected feature width (2048 for the released files); `None` infers it from the first
            record and holds every later record to it.
        limit: Stop after this many images (the original's `topk`).

    Returns:
        An iterator of records.

    Raises:
        AdvlabValueError: A malformed line, named by file and line number: wrong field count, a field that is not
            base64 or whose decoded byte count is not `num_boxes` times the width, a feature width other than
            `feature_dim` (or than the first record's), or bytes that are not UTF-8. A file truncated at a base64
            boundary in its last line is caught this way whenever the width is known or another line gives it;
            a single-record file with no `feature_dim` cannot be checked, and a warning says so when its width is
            not 2048 and it does not end with a line break.

    Examples:
        >>> import base64, tempfile, os, numpy as np
        >>> enc = lambda a: base64.b64encode(a.tobytes()).decode()
        >>> n = 2
        >>> line = "\t".join(["img0", "100", "200", enc(np.zeros(n, np.int64)), enc(np.ones(n, np.float32)),
        ...     enc(np.zeros(n, np.int64)), enc(np.ones(n, np.float32)), str(n),
        ...     enc(np.array([[0, 0, 100, 50]] * n, np.float32)), enc(np.zeros((n, 8), np.float32))])
        >>> path = os.path.join(tempfile.mkdtemp(), "f.tsv")
        >>> _ = open(path, "w").write(line + "\n")
        >>> rec = next(iter_obj36(path))
        >>> rec.img_id, rec.features.shape, rec.boxes[0].tolist()
        ('img0', torch.Size([2, 8]), [0.0, 0.0, 0.5, 0.5])
    """
    if not isinstance(path, (str, os.PathLike)):
        raise AdvlabTypeError(f"Expected `path` to be a str or os.PathLike, but got {type(path).__name__}.")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise AdvlabValueError(f"Expected `limit` to be an int >= 0 or None, but got {limit!r}.")
    if feature_dim is not None and (
        isinstance(feature_dim, bool) or not isinstance(feature_dim, int) or feature_dim < 1
    ):
        raise AdvlabValueError(f"Expected `feature_dim` to be an int >= 1 or None, but got {feature_dim!r}.")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AdvlabValueError(f"Expected `path` to be an existing obj36 TSV file, but got {path!r}.")
    count = 0
    seen: tuple[int, int] | None = None  # (feature width, line) of the first record when the width is inferred
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if limit is not None and count >= limit:
                return
            where = f"{path}, line {lineno}"
            line = _text(raw, where)
            if not line.strip():
                continue
            record = _parse_line(line, where, normalize_boxes, feature_dim)
            unterminated = not raw.endswith(b"\n")
            if feature_dim is None:
                width = int(record.features.shape[1])
                if seen is None:
                    seen = (width, lineno)
                    if unterminated and width != _RELEASED_WIDTH:
                        warnings.warn(
                            f"{where}: the only record has {width}-wide features and no line break at the end of the "
                            "file, which may be truncated; pass `feature_dim=` to have the width checked.",
                            UserWarning,
                            stacklevel=2,
                        )
                elif width != seen[0]:
                    raise AdvlabValueError(
                        f"{where}: expected features of width {seen[0]} (as on line {seen[1]}), but the "
                        f"{record.num_boxes} boxes of this line decode to width {width}"
                        + (
                            "; the line has no line break at the end of the file, so the file looks truncated"
                            if unterminated
                            else ""
                        )
                        + ". Pass `feature_dim=` to state the width."
                    )
            yield record
            count += 1


def _text(raw: bytes, where: str) -> str:
    """A line of the file as text, or an error naming the field with the bytes that are not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        field = OBJ36_FIELDS[min(raw.count(b"\t", 0, err.start), len(OBJ36_FIELDS) - 1)]
        raise AdvlabValueError(
            f"{where}: expected UTF-8 text, but field `{field}` holds byte 0x{raw[err.start]:02x} at byte "
            f"{err.start} of the line, which is not valid UTF-8."
        ) from None


def load_obj36(
    path: str | os.PathLike[str],
    *,
    normalize_boxes: bool = True,
    feature_dim: int | None = None,
    limit: int | None = None,
) -> dict[str, Obj36Record]:
    r"""Read a whole obj36 TSV file into `img_id -> record`; arguments as `iter_obj36`.

    Examples:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "empty.tsv")
        >>> _ = open(path, "w").write("\n")
        >>> load_obj36(path)
        {}
    """
    records: dict[str, Obj36Record] = {}
    for record in iter_obj36(path, normalize_boxes=normalize_boxes, feature_dim=feature_dim, limit=limit):
        if record.img_id in records:
            raise AdvlabValueError(f"Expected each img_id once in {os.fspath(path)!r}, but {record.img_id!r} repeats.")
        records[record.img_id] = record
    return records


def collate_obj36(records: Sequence[Obj36Record]) -> tuple[Tensor, Tensor, Tensor]:
    """Stack records into LXMERT inputs, padding to the largest box count.

    Args:
        records: Records with the same feature width.

    Returns:
        `(visual_feats, visual_pos, visual_attention_mask)`; padded boxes are zeros with mask 0.

    Shape:
        visual_feats: [b, n, f]
        visual_pos: [b, n, 4]
        visual_attention_mask: [b, n]

    Examples:
        >>> mk = lambda n: Obj36Record("i", 1, 1, torch.rand(n, 4), torch.ones(n, 3), torch.zeros(n, dtype=torch.long),
        ...                            torch.ones(n), torch.zeros(n, dtype=torch.long), torch.ones(n))
        >>> feats, boxes, mask = collate_obj36([mk(2), mk(3)])
        >>> feats.shape, mask.tolist()
        (torch.Size([2, 3, 3]), [[1, 1, 0], [1, 1, 1]])
    """
    if not isinstance(records, Sequence) or len(records) == 0:
        raise AdvlabValueError(f"Expected `records` to be a non-empty sequence of Obj36Record, but got {records!r}.")
    dims = {r.features.shape[1] for r in records}
    if len(dims) != 1:
        raise AdvlabValueError(f"Expected one feature width across `records`, but got {sorted(dims)}.")
    n = max(r.num_boxes for r in records)
    b, f = len(records), dims.pop()
    feats = torch.zeros(b, n, f)
    boxes = torch.zeros(b, n, 4)
    mask = torch.zeros(b, n, dtype=torch.long)
    for i, r in enumerate(records):
        feats[i, : r.num_boxes] = r.features
        boxes[i, : r.num_boxes] = r.boxes
        mask[i, : r.num_boxes] = 1
    return feats, boxes, mask
