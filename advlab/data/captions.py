"""Image–caption folders: any folder tree of images with a `.txt` caption beside each.

The layout is the one Tux Paint's stamps use: `animals/birds/crow.png` beside
`animals/birds/crow.txt`, whose first line is the caption ("A crow."); later lines are ignored
(Tux Paint keeps translations there). The folder an image sits in is its category.

[`ImageCaptionFolder`][advlab.data.captions.ImageCaptionFolder] reads such a tree;
[`split_by_caption`][advlab.data.captions.split_by_caption] splits it for retrieval:

* by caption, not by image: every image whose caption is identical (after case folding and
  whitespace clean-up) lands in the same split, so templated families ("The letter A.") cannot
  leak from training into testing;
* deterministically: a caption's place depends only on the seed and the caption text, never on
  the file system's listing order;
* the validation and test galleries keep one image per caption (the first by path), so a caption
  has exactly one correct image and R@K is well defined.

Images Pillow cannot read, images with no (or an empty) caption file, and files that are not
regular files (a FIFO, socket or device named like an image or a caption is never opened) are
skipped and counted in one warning; nothing crashes or hangs. Captions that are not UTF-8 are read
as Windows-1252 and counted in the same warning. SVG files are not rasterised: those without a
raster twin of the same name are counted as skipped.
Pillow is imported only when images are checked (`pip install pillow`).
"""

from __future__ import annotations

import codecs
import hashlib
import os
import stat
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, overload

from advlab._errors import AdvlabTypeError, AdvlabValueError

__all__ = [
    "IMAGE_SUFFIXES",
    "CaptionSplits",
    "CaptionedImage",
    "ImageCaptionFolder",
    "caption_key",
    "read_caption",
    "scan_caption_folder",
    "split_by_caption",
]

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_VECTOR_SUFFIXES = (".svg",)  # recognised as images, but not rasterised: counted as skipped
ImageCheck = Literal["load", "verify", "none"]


@dataclass(frozen=True)
class CaptionedImage:
    """One image and its caption.

    Attributes:
        path: The image file.
        caption: First line of the `.txt` file beside it, stripped.
        category: The image's folder relative to the scanned root, with `/` separators
            (`""` for images directly in the root).

    Examples:
        >>> CaptionedImage(Path("animals/crow.png"), "A crow.", "animals").caption
        'A crow.'
    """

    path: Path
    caption: str
    category: str


@dataclass(frozen=True)
class CaptionSplits:
    """Train / validation / test lists from [`split_by_caption`][advlab.data.captions.split_by_caption].

    Attributes:
        train: Every image of the training captions.
        val: One image per validation caption.
        test: One image per test caption: the retrieval gallery.
        seed: The seed that made the split.

    Examples:
        >>> items = [CaptionedImage(Path(f"{i}.png"), f"Caption {i}.", "") for i in range(10)]
        >>> splits = split_by_caption(items, seed=0)
        >>> len(splits.train), len(splits.val), len(splits.test)
        (7, 1, 2)
    """

    train: tuple[CaptionedImage, ...]
    val: tuple[CaptionedImage, ...]
    test: tuple[CaptionedImage, ...]
    seed: int

    def summary(self) -> str:
        """One line with the image and caption counts of each split.

        Returns:
            For example `"train 7 images / 7 captions, val 1 / 1, test 2 / 2"`.

        Examples:
            >>> items = [CaptionedImage(Path(f"{i % 5}-{i}.png"), f"C{i % 5}", "") for i in range(10)]
            >>> split_by_caption(items, seed=0, fractions=(0.6, 0.2, 0.2)).summary()
            'train 6 images / 3 captions, val 1 / 1, test 1 / 1'
        """

        def n_captions(items: Sequence[CaptionedImage]) -> int:
            return len({caption_key(item.caption) for item in items})

        return (
            f"train {len(self.train)} images / {n_captions(self.train)} captions, "
            f"val {len(self.val)} / {n_captions(self.val)}, test {len(self.test)} / {n_captions(self.test)}"
        )


def caption_key(caption: str) -> str:
    """The form under which two captions count as identical: case-folded, whitespace collapsed.

    Args:
        caption: A caption.

    Returns:
        The key.

    Examples:
        >>> caption_key("  The letter  A. ") == caption_key("the letter a.")
        True
    """
    return " ".join(caption.split()).casefold()


def read_caption(path: str | os.PathLike[str]) -> str | None:
    r"""Read the caption in a `.txt` file: its first line, stripped.

    The text is read as UTF-8 (a byte-order mark is ignored; UTF-16 with a byte-order mark is
    read too). A first line that is not valid UTF-8 is read as Windows-1252 (Latin-1 for the five
    bytes Windows-1252 leaves undefined), the encoding of most older text files;
    [`scan_caption_folder`][advlab.data.captions.scan_caption_folder] counts such captions in its
    warning. A FIFO, device or folder named `*.txt` is never opened for reading (it could block).

    Args:
        path: The text file.

    Returns:
        The caption, or None if the file is missing, not a regular file, unreadable, or its first
        line is blank.

    Examples:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = (Path(tmp) / "crow.txt").write_text("A crow.\nfr.utf8=Un corbeau.\n")
        ...     _ = (Path(tmp) / "cafe.txt").write_bytes(b"Caf\xe9 au lait.\n")
        ...     read_caption(Path(tmp) / "crow.txt"), read_caption(Path(tmp) / "cafe.txt")
        ('A crow.', 'Café au lait.')
    """
    return _caption(path)[0]


_CAPTION_BYTES = 1 << 16  # a caption is one short line; never read more than this


def _caption(path: str | os.PathLike[str]) -> tuple[str | None, str]:
    """(caption or None, how): how is "utf-8", "legacy" (not UTF-8), or why there is no caption."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # non-blocking: a FIFO must not hang
    except FileNotFoundError:
        return None, "no caption file"
    except OSError:
        return None, "unreadable caption file"
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None, "caption file not a regular file"
        chunks, size = [], 0
        while size < _CAPTION_BYTES and (chunk := os.read(fd, _CAPTION_BYTES - size)):
            chunks.append(chunk)
            size += len(chunk)
    except OSError:
        return None, "unreadable caption file"
    finally:
        os.close(fd)
    data = b"".join(chunks)
    how = "utf-8"
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            first = data.decode("utf-16").splitlines()[0] if data[2:] else ""
        except UnicodeDecodeError:
            return None, "unreadable caption file"
    else:
        line = data.split(b"\n", 1)[0].removeprefix(codecs.BOM_UTF8)
        try:
            first = line.decode("utf-8")
        except UnicodeDecodeError:
            how = "legacy"
            try:
                first = line.decode("cp1252")
            except UnicodeDecodeError:
                first = line.decode("latin-1")
    first = " ".join(first.split())
    return (first, how) if first else (None, "blank caption")


def _image_is_readable(path: Path, check: ImageCheck) -> bool:
    if check == "none":
        return True
    from PIL import Image  # lazy: Pillow is only needed to check (and later to load) images

    try:
        with Image.open(path) as image:
            if check == "verify":
                image.verify()  # headers and checksums only: fast, misses some truncated files
            else:
                image.load()  # a full decode
    except (OSError, SyntaxError, ValueError, TypeError, EOFError, Image.DecompressionBombError):
        return False  # Pillow raises all of these for broken, truncated or hostile files
    return True


def scan_caption_folder(
    root: str | os.PathLike[str],
    *,
    suffixes: Sequence[str] = IMAGE_SUFFIXES,
    check: ImageCheck = "load",
) -> list[CaptionedImage]:
    r"""List the captioned images under `root`, skipping bad files with one warning.

    An image is `DIR/NAME.EXT` with `EXT` in `suffixes` (any case); its caption is the first line
    of `DIR/NAME.txt` (see [`read_caption`][advlab.data.captions.read_caption]). Images without a
    caption file, with a blank first line, that Pillow cannot read, or where the image or its
    caption is not a regular file (a FIFO, socket, device or broken link) are skipped; so are SVG
    files (counted when no raster twin of the same name exists). One `UserWarning` counts what was
    skipped and why, and how many captions were not UTF-8 (read as Windows-1252).

    Args:
        root: The folder to scan, recursively.
        suffixes: Image file endings to accept, with the dot.
        check: How to test that an image is readable: `"load"` decodes it fully (about 1 s for
            800 small PNGs), `"verify"` checks headers and checksums only, `"none"` trusts the files.

    Returns:
        The images sorted by their path relative to `root`.

    Raises:
        AdvlabValueError: `root` is not a folder, `suffixes` is empty, or `check` is unknown.

    Examples:
        >>> import tempfile, warnings
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     (Path(tmp) / "birds").mkdir()
        ...     _ = (Path(tmp) / "birds" / "crow.txt").write_text("A crow.\n")
        ...     _ = (Path(tmp) / "birds" / "crow.png").write_bytes(b"not a png")
        ...     with warnings.catch_warnings(record=True) as caught:
        ...         warnings.simplefilter("always")
        ...         items = scan_caption_folder(tmp)
        ...     len(items), len(caught)
        (0, 1)
    """
    return _scan(root, suffixes, check, stacklevel=3)


def _scan(
    root: str | os.PathLike[str], suffixes: Sequence[str], check: ImageCheck, *, stacklevel: int
) -> list[CaptionedImage]:
    root_path = Path(root)
    if not root_path.is_dir():
        raise AdvlabValueError(f"Expected `root` to be an existing folder, but got {str(root)!r}.")
    if isinstance(suffixes, str) or not suffixes:
        raise AdvlabValueError(f"Expected `suffixes` to be a non-empty sequence like ('.png',), but got {suffixes!r}.")
    if check not in ("load", "verify", "none"):
        raise AdvlabValueError(f"Expected `check` to be one of 'load', 'verify', 'none', but got {check!r}.")
    wanted = tuple(s.lower() for s in suffixes)
    skipped: dict[str, int] = {}
    legacy = 0
    items: list[CaptionedImage] = []
    for path in sorted(root_path.rglob("*"), key=lambda p: p.relative_to(root_path).as_posix()):
        suffix = path.suffix.lower()
        if suffix in _VECTOR_SUFFIXES and suffix not in wanted and path.is_file():
            # Tux Paint ships a PNG twin for some SVGs: only an SVG with no accepted twin is a loss
            if not any(path.with_suffix(s).is_file() for s in wanted):
                skipped["svg without a raster twin"] = skipped.get("svg without a raster twin", 0) + 1
            continue
        if suffix not in wanted or path.is_dir():
            continue
        if not path.is_file():  # a FIFO, socket, device or broken link: never opened
            skipped["image not a regular file"] = skipped.get("image not a regular file", 0) + 1
            continue
        caption, how = _caption(path.with_suffix(".txt"))
        if caption is None:
            skipped[how] = skipped.get(how, 0) + 1
            continue
        if not _image_is_readable(path, check):
            skipped["unreadable image"] = skipped.get("unreadable image", 0) + 1
            continue
        legacy += how == "legacy"
        category = path.parent.relative_to(root_path).as_posix()
        items.append(CaptionedImage(path=path, caption=caption, category="" if category == "." else category))
    if skipped or legacy:
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(skipped.items()))
        notes = [f"Skipped {sum(skipped.values())} files under {str(root_path)!r} ({reasons})"] if skipped else []
        if legacy:
            notes.append(
                f"read {legacy} captions under {str(root_path)!r} that are not UTF-8 as Windows-1252 / Latin-1"
            )
        warnings.warn(f"{'; '.join(notes)}; kept {len(items)} images.", UserWarning, stacklevel=stacklevel)
    return items


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3 or any(not isinstance(f, (int, float)) or f < 0 for f in fractions):
        raise AdvlabValueError(
            f"Expected `fractions` to be three non-negative numbers (train, val, test), but got {fractions!r}."
        )
    total = float(sum(fractions))
    if abs(total - 1.0) > 1e-6:
        raise AdvlabValueError(f"Expected `fractions` to sum to 1, but got {fractions!r} (sum {total}).")
    return float(fractions[0]), float(fractions[1]), float(fractions[2])


def split_by_caption(
    items: Sequence[CaptionedImage],
    *,
    seed: int = 0,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
) -> CaptionSplits:
    """Split captioned images into train / validation / test by caption.

    Distinct captions (by [`caption_key`][advlab.data.captions.caption_key]) are ordered by a
    SHA-256 hash of the seed and the caption; the first `round(0.7 n)` go to training, the next
    `round(0.1 n)` to validation, the rest to testing. Training keeps every image of its captions;
    validation and test keep one image per caption (the first by path), so each caption has
    exactly one correct image in its gallery.

    Args:
        items: The images, e.g. from [`scan_caption_folder`][advlab.data.captions.scan_caption_folder].
        seed: Any integer; the same seed and captions always give the same split.
        fractions: Train, validation and test shares of the distinct captions; they sum to 1.

    Returns:
        The three splits.

    Raises:
        AdvlabTypeError: `seed` is not an int.
        AdvlabValueError: `fractions` is not three non-negative numbers summing to 1.

    Examples:
        >>> items = [CaptionedImage(Path(f"{i}.png"), f"A {i % 4}.", "") for i in range(8)]
        >>> splits = split_by_caption(items, seed=1, fractions=(0.5, 0.25, 0.25))
        >>> sorted(x.path.name for x in splits.train)
        ['0.png', '2.png', '4.png', '6.png']
        >>> sorted(x.path.name for x in splits.test)  # "A 1." has two images, 1 and 5: the gallery keeps one
        ['1.png']
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise AdvlabTypeError(f"Expected `seed` to be an int, but got {type(seed).__name__}.")
    f_train, f_val, _ = _check_fractions(fractions)
    by_key: dict[str, list[CaptionedImage]] = {}
    for item in sorted(items, key=lambda x: x.path.as_posix()):
        by_key.setdefault(caption_key(item.caption), []).append(item)
    keys = sorted(by_key, key=lambda k: hashlib.sha256(f"{seed}\0{k}".encode()).hexdigest())
    n_train = round(f_train * len(keys))
    n_val = min(round(f_val * len(keys)), len(keys) - n_train)
    train = tuple(x for k in keys[:n_train] for x in by_key[k])
    val = tuple(by_key[k][0] for k in keys[n_train : n_train + n_val])
    test = tuple(by_key[k][0] for k in keys[n_train + n_val :])
    return CaptionSplits(train=train, val=val, test=test, seed=seed)


class ImageCaptionFolder(Sequence[CaptionedImage]):
    r"""A folder tree of images with a `.txt` caption beside each, as a map-style dataset.

    Scans once at construction (see [`scan_caption_folder`][advlab.data.captions.scan_caption_folder]
    for what is skipped); indexing returns [`CaptionedImage`][advlab.data.captions.CaptionedImage]
    records, so it works with `torch.utils.data.DataLoader` and with plain loops.

    Args:
        root: The folder to scan, recursively.
        suffixes: Image file endings to accept.
        check: How to test that images are readable (`"load"`, `"verify"` or `"none"`).

    Examples:
        >>> import tempfile
        >>> from PIL import Image
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     for i in range(5):
        ...         Image.new("RGBA", (8, 8)).save(Path(tmp) / f"s{i}.png")
        ...         _ = (Path(tmp) / f"s{i}.txt").write_text(f"Stamp {i}.\n")
        ...     folder = ImageCaptionFolder(tmp)
        ...     len(folder), folder[0].caption, folder.n_captions
        (5, 'Stamp 0.', 5)
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        suffixes: Sequence[str] = IMAGE_SUFFIXES,
        check: ImageCheck = "load",
    ) -> None:
        self.root = Path(root)
        self.items: tuple[CaptionedImage, ...] = tuple(_scan(root, suffixes, check, stacklevel=3))

    def __len__(self) -> int:
        return len(self.items)

    @overload
    def __getitem__(self, index: int) -> CaptionedImage: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[CaptionedImage, ...]: ...
    def __getitem__(self, index: int | slice) -> CaptionedImage | tuple[CaptionedImage, ...]:
        return self.items[index]

    def __iter__(self) -> Iterator[CaptionedImage]:
        return iter(self.items)

    @property
    def n_captions(self) -> int:
        """Number of distinct captions (by [`caption_key`][advlab.data.captions.caption_key])."""
        return len({caption_key(item.caption) for item in self.items})

    def split(self, *, seed: int = 0, fractions: Sequence[float] = (0.7, 0.1, 0.2)) -> CaptionSplits:
        r"""Split by caption; see [`split_by_caption`][advlab.data.captions.split_by_caption].

        Args:
            seed: Any integer; the same seed and folder always give the same split.
            fractions: Train, validation and test shares of the distinct captions.

        Returns:
            The three splits.

        Examples:
            >>> import tempfile
            >>> with tempfile.TemporaryDirectory() as tmp:
            ...     for i in range(10):
            ...         _ = (Path(tmp) / f"s{i}.png").write_bytes(b"")
            ...         _ = (Path(tmp) / f"s{i}.txt").write_text(f"Stamp {i}.\n")
            ...     ImageCaptionFolder(tmp, check="none").split(seed=0).summary()
            'train 7 images / 7 captions, val 1 / 1, test 2 / 2'
        """
        return split_by_caption(self.items, seed=seed, fractions=fractions)
