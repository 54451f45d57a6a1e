"""Openclipart drawings with their human-written titles, as an image-caption folder.

Debian's `openclipart-svg` package holds 8,121 public-domain drawings in 22 top-level folders;
`openclipart-png` holds the same drawings pre-rendered. Each SVG carries its title, description
and keywords in RDF / Dublin Core metadata (`<cc:Work><dc:title>Apple Pie</dc:title>...`).
[`build_openclipart_folder`][advlab.data.openclipart.build_openclipart_folder] turns them into
the folder layout [`scan_caption_folder`][advlab.data.captions.scan_caption_folder] reads:
`<top-level folder>/<name>.png` beside `<name>.txt`, whose first line is the caption. The
category is the top-level folder. [`openclipart_dir`][advlab.data.openclipart.openclipart_dir]
finds the folder that `scripts/setup_data.sh` built (the library never runs a package manager).

Captions (`caption="title+description"`, the default):

* the title, plus the description where there is one that adds something (not empty, not the
  title again, not a tool's stamp such as "Created with Inkscape", no e-mail address or URL,
  no Perl `HASH(0x...)` residue), joined as `"Title. Description"`; whitespace is collapsed and
  the caption is cut at `max_words` words;
* `caption="title"` uses the title only; `"title+keywords"` and `"title+description+keywords"`
  append the keywords as `" (kw1, kw2)"` (underscores become spaces; `hash` and hex residue,
  keywords already in the title, and repeats are left out);
* entries are dropped (and counted) when the title is missing, is only a file-name-like token
  (one token with `_`, a file ending, or letters then digits: "cake1", "arbre_modern_bw"), or is
  a collection's stamp shared by many unrelated drawings ("Clipart by Nicu Buculei - pear",
  "Part of the Flat Icon Collection", "Lemon SVG theme", "Various Cliparts", "Homes Clipart",
  "SVG Road Signs", "R16 sibmission").

Folders: [`DEFAULT_FOLDERS`][advlab.data.openclipart.DEFAULT_FOLDERS] keeps object-like top-level
folders and [`DEFAULT_EXCLUDE`][advlab.data.openclipart.DEFAULT_EXCLUDE] drops their symbol-like
sub-folders (icons, shapes, flags, signs, maps, gradients and patterns are left out).

Images: the pre-rendered PNG is used where it exists (and has at most 40 megapixels: a few of
the package's PNGs have 169); otherwise the SVG is rendered with `cairosvg` (`pip install
cairosvg`, needs the system Cairo library) if it is installed, else the entry is skipped and
counted. Each image is cropped to the box of its non-transparent pixels
(many are drawn on an empty A4 page) and downscaled to at most `max_side` pixels on its long
side, keeping transparency (RGBA PNG).

Licence: openclipart drawings are in the public domain (the package's `copyright` file is
copied beside the folder). The folder is still built at set-up time rather than committed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from advlab._errors import AdvlabTypeError, AdvlabValueError
from advlab.data._cache import as_path, cache_root

__all__ = [
    "DEFAULT_EXCLUDE",
    "DEFAULT_FOLDERS",
    "CaptionMode",
    "ClipartEntry",
    "OpenclipartBuild",
    "build_openclipart_folder",
    "make_caption",
    "openclipart_dir",
    "read_svg_metadata",
]

CaptionMode = Literal["title", "title+description", "title+keywords", "title+description+keywords"]

# Object-like top-level folders of openclipart 0.18: drawings in the package -> pairs kept by the
# caption rules and DEFAULT_EXCLUDE (1,778 in all, 1,271 distinct captions), measured on Debian
# 12's openclipart-svg / openclipart-png 1:0.18+dfsg-19.
DEFAULT_FOLDERS: tuple[str, ...] = (
    "animals",  # 316 -> 269
    "buildings",  # 70 -> 45 (houses, furniture)
    "containers",  # 16 -> 12
    "decorations",  # 26 -> 24
    "education",  # 54 -> 42 (books, pens)
    "electronics",  # 43 -> 34
    "food",  # 366 -> 274
    "office",  # 142 -> 122
    "people",  # 400 -> 281 (also clothing and body parts)
    "plants",  # 95 -> 79
    "recreation",  # 614 -> 321 (music, sports, toys, games)
    "science",  # 21 -> 21
    "tools",  # 149 -> 134
    "transportation",  # 369 -> 120
)
"""Top-level openclipart folders kept by default: those of objects, animals, people and plants.

Drawings in the package and pairs kept (Debian 12, 0.18): animals 316 / 269, buildings 70 / 45,
containers 16 / 12, decorations 26 / 24, education 54 / 42, electronics 43 / 34, food 366 / 274,
office 142 / 122, people 400 / 281, plants 95 / 79, recreation 614 / 321, science 21 / 21,
tools 149 / 134, transportation 369 / 120: 1,778 pairs with 1,271 distinct captions. Left out:
computer (2,158 drawings, icons and buttons), shapes (1,645), signs_and_symbols (1,113, flags and
map symbols), special (225, gradients and patterns), geography (135, maps), unsorted (154),
logos (7), buttons (3).
"""
DEFAULT_EXCLUDE: tuple[str, ...] = (
    "transportation/aiga-symbols",  # 122 pictograms, all titled "AIGA_Symbol_Signs"
    "transportation/roadsigns",  # 73 road signs
    "recreation/games/cards",  # 239 playing cards, mostly titled "card"
    "people/smilies",  # 44 smiley faces
)
"""Sub-folders of `DEFAULT_FOLDERS` left out: pictograms, road signs, playing cards, smileys."""

_SVG_DIRS = ("svg", "usr/share/openclipart/svg")  # relative to `src`: an openclipart folder, or an unpacked root
_COPYRIGHT = ("usr/share/doc/openclipart-svg/copyright", "usr/share/doc/openclipart-png/copyright")
_DONE = ".advlab-complete"
_SETUP_HINT = "Run `scripts/setup_data.sh` (it fetches Debian's openclipart-svg and openclipart-png, no root needed)"

_NS_DC = "http://purl.org/dc/elements/1.1/"
_NS_RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
_FILE_LIKE = re.compile(r"\S*(_|\.(svg|png|jpe?g|gif)$)\S*|[A-Za-z]+[-#]?\d+[A-Za-z]?|\d+", re.IGNORECASE)
_STAMP_TITLE = re.compile(
    r"^clip\s*art by .* - |\b(clip\s*arts?|collection|icons|iconset|theme|sibmission|submission)\b|^untitled\b|^svg\b"
    r"|^(new )?(drawing|document|image|layer)\s*\d*$|^symbol signs?$",
    re.IGNORECASE,
)
_STAMP_DESCRIPTION = re.compile(
    r"^(made|created|drawn|done) (with|in|using) \w+\.?$|HASH\(0x[0-9a-f]+\)|\S+@\S+\.\w+|https?://|www\.",
    re.IGNORECASE,
)
_MAX_PNG_PIXELS = 40_000_000  # 7 PNGs of the package have about 169 Mpx; decoding one takes 0.7 GB
_JUNK_KEYWORD = re.compile(r"^(hash|0x[0-9a-f]+|\d+)$", re.IGNORECASE)


def openclipart_dir(root: str | os.PathLike[str] | None = None) -> Path:
    """The caption folder built from openclipart by `scripts/setup_data.sh`.

    Args:
        root: The folder to check; None means `${ADVLAB_CACHE:-~/.cache/advlab}/openclipart/pairs`.

    Returns:
        The folder: pass it to [`ImageCaptionFolder`][advlab.data.captions.ImageCaptionFolder]
        or the retrieval experiment's `--data DIR`.

    Raises:
        FileNotFoundError: No finished folder is there; the message says how to build it.
        AdvlabTypeError: `root` is not a path.

    Examples:
        >>> import tempfile
        >>> try:
        ...     openclipart_dir(tempfile.mkdtemp())
        ... except FileNotFoundError as err:
        ...     print(str(err)[:37])
        No openclipart caption folder at /tmp
    """
    folder = as_path("root", root) if root is not None else cache_root() / "openclipart" / "pairs"
    if not (folder / _DONE).is_file():
        raise FileNotFoundError(
            f"No openclipart caption folder at {folder} (no {_DONE} marker: not built, or interrupted).\n"
            f"{_SETUP_HINT}, or call advlab.data.openclipart.build_openclipart_folder(src, dst) on the "
            f"unpacked packages."
        )
    return folder


@dataclass(frozen=True)
class ClipartEntry:
    """The metadata of one openclipart SVG.

    Attributes:
        title: `dc:title` of the work, whitespace collapsed (`""` if none).
        description: `dc:description`, whitespace collapsed (`""` if none).
        keywords: The `rdf:li` items of `dc:subject`, in file order, blanks left out.

    Examples:
        >>> ClipartEntry("Apple Pie", "", ("dessert", "food")).keywords
        ('dessert', 'food')
    """

    title: str
    description: str = ""
    keywords: tuple[str, ...] = ()


def _text(element: ET.Element | None) -> str:
    return " ".join("".join(element.itertext()).split()) if element is not None else ""


def read_svg_metadata(path: str | os.PathLike[str]) -> ClipartEntry | None:
    """Read the title, description and keywords of an SVG's RDF / Dublin Core metadata.

    The values are those of the first `Work` element (openclipart's `cc:Work`); the `dc:title`
    of its creator or publisher (a `cc:Agent`) is not the drawing's title.

    Args:
        path: The SVG file.

    Returns:
        The entry, or None if the file is not well-formed XML or has no `Work` metadata.

    Examples:
        >>> import tempfile
        >>> svg = ('<svg xmlns="http://www.w3.org/2000/svg" xmlns:cc="http://web.resource.org/cc/" '
        ...        'xmlns:dc="http://purl.org/dc/elements/1.1/" '
        ...        'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><metadata><rdf:RDF><cc:Work>'
        ...        '<dc:title>Apple  Pie</dc:title><dc:subject><rdf:Bag><rdf:li>dessert</rdf:li>'
        ...        '<rdf:li>food</rdf:li></rdf:Bag></dc:subject></cc:Work></rdf:RDF></metadata></svg>')
        >>> with tempfile.NamedTemporaryFile("w", suffix=".svg", delete=False) as f:
        ...     _ = f.write(svg)
        >>> read_svg_metadata(f.name)
        ClipartEntry(title='Apple Pie', description='', keywords=('dessert', 'food'))
    """
    try:
        tree = ET.parse(path)
    except (ET.ParseError, OSError, ValueError):
        return None
    work = next((el for el in tree.iter() if isinstance(el.tag, str) and el.tag.endswith("}Work")), None)
    if work is None:
        return None
    subject = work.find(f"{{{_NS_DC}}}subject")
    keywords = tuple(kw for li in subject.iter(f"{{{_NS_RDF}}}li") if (kw := _text(li))) if subject is not None else ()
    return ClipartEntry(
        title=_text(work.find(f"{{{_NS_DC}}}title")),
        description=_text(work.find(f"{{{_NS_DC}}}description")),
        keywords=keywords,
    )


def _drop_reason(title: str) -> str | None:
    if not title:
        return "no title"
    if _FILE_LIKE.fullmatch(title):
        return "file-name-like title"
    if _STAMP_TITLE.search(title):
        return "collection stamp as title"
    return None


def make_caption(entry: ClipartEntry, mode: CaptionMode = "title+description", *, max_words: int = 32) -> str | None:
    """The caption of one entry under the module's rules, or None if the entry is dropped.

    Args:
        entry: The SVG's metadata.
        mode: Which fields go into the caption.
        max_words: Cut the caption after this many words.

    Returns:
        The caption, or None for a missing, file-name-like or stamp title.

    Raises:
        AdvlabTypeError: `entry` is not a ClipartEntry.
        AdvlabValueError: Unknown `mode`, or `max_words` below 1.

    Examples:
        >>> make_caption(ClipartEntry("Bulldog", "A bulldog puppy, sitting."))
        'Bulldog. A bulldog puppy, sitting.'
        >>> make_caption(ClipartEntry("Crawfish", "crawfish")), make_caption(ClipartEntry("cake1"))
        ('Crawfish', None)
        >>> make_caption(ClipartEntry("Apple Pie", "", ("dessert", "food", "pie", "hash")), "title+keywords")
        'Apple Pie (dessert, food)'
    """
    if not isinstance(entry, ClipartEntry):
        raise AdvlabTypeError(f"Expected `entry` to be a ClipartEntry, but got {type(entry).__name__}.")
    if mode not in get_args(CaptionMode):
        raise AdvlabValueError(f"Expected `caption` to be one of {get_args(CaptionMode)}, but got {mode!r}.")
    if not isinstance(max_words, int) or isinstance(max_words, bool) or max_words < 1:
        raise AdvlabValueError(f"Expected `max_words` to be a positive int, but got {max_words!r}.")
    title = " ".join(entry.title.split())
    if _drop_reason(title) is not None:
        return None
    caption = title
    description = " ".join(entry.description.split())
    if (
        "description" in mode
        and description
        and not _STAMP_DESCRIPTION.search(description)
        and description.casefold().strip(" .") not in title.casefold()
    ):
        caption += ("" if title[-1] in ".!?:;" else ".") + " " + description
    if "keywords" in mode:
        seen = set(title.casefold().split())
        kept = []
        for raw in entry.keywords:
            keyword = " ".join(raw.replace("_", " ").split())
            if keyword and not _JUNK_KEYWORD.match(keyword) and keyword.casefold() not in seen:
                seen.add(keyword.casefold())
                kept.append(keyword)
        if kept:
            caption += f" ({', '.join(kept)})"
    words = caption.split()
    return " ".join(words[:max_words]) if len(words) > max_words else caption


@dataclass(frozen=True)
class OpenclipartBuild:
    """What [`build_openclipart_folder`][advlab.data.openclipart.build_openclipart_folder] made.

    Attributes:
        root: The caption folder.
        counts: Pairs written per top-level folder.
        dropped: Entries left out, by reason.
        settings: The arguments the folder was built with (compared on the next call).

    Examples:
        >>> OpenclipartBuild(Path("pairs"), {"food": 3}, {"no title": 1}, {}).n_pairs
        3
    """

    root: Path
    counts: dict[str, int]
    dropped: dict[str, int]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def n_pairs(self) -> int:
        """Pairs written in all."""
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line: pairs per folder and drops per reason.

        Returns:
            For example `"12 pairs (food 7, animals 5); dropped: 2 no title"`.

        Examples:
            >>> OpenclipartBuild(Path("p"), {"food": 7, "animals": 5}, {"no title": 2}).summary()
            '12 pairs (food 7, animals 5); dropped: 2 no title'
        """
        kept = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])))
        dropped = ", ".join(f"{v} {k}" for k, v in sorted(self.dropped.items())) or "none"
        return f"{self.n_pairs} pairs ({kept}); dropped: {dropped}"


def _svg_root(src: Path) -> Path:
    for rel in _SVG_DIRS:
        if (src / rel).is_dir():
            return src / rel
    raise FileNotFoundError(
        f"No openclipart SVG folder in {src}: expected {src / _SVG_DIRS[1]} (unpack openclipart-svg there with "
        f"`dpkg-deb -x`, or pass `/` for the installed package) or {src / _SVG_DIRS[0]}. {_SETUP_HINT}."
    )


def _cairosvg_renderer() -> Callable[[Path], Any] | None:
    try:
        import cairosvg  # optional: only for SVGs without a pre-rendered PNG
    except (ImportError, OSError):  # OSError: the package is there but the system Cairo library is not
        return None

    def render(path: Path) -> Any:
        import io

        from PIL import Image

        return Image.open(io.BytesIO(cairosvg.svg2png(url=str(path), output_width=512, unsafe=True)))

    return render


def _prepare(image: Any, max_side: int) -> Any | None:
    """RGBA, cropped to the non-transparent box, long side at most `max_side`; None if blank."""
    from PIL import Image

    image = image.convert("RGBA")
    box = image.getchannel("A").getbbox()
    if box is None:
        return None
    image = image.crop(box)
    if max(image.size) > max_side:
        scale = max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image


def _check_folders(name: str, value: Sequence[str]) -> tuple[str, ...]:
    if isinstance(value, str) or not all(isinstance(v, str) and v.strip("/") for v in value):
        raise AdvlabTypeError(f"Expected `{name}` to be a sequence of folder names like ('food',), but got {value!r}.")
    return tuple(v.strip("/") for v in value)


def build_openclipart_folder(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str] | None = None,
    *,
    folders: Sequence[str] = DEFAULT_FOLDERS,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    caption: CaptionMode = "title+description",
    max_words: int = 32,
    max_side: int = 256,
    render: Callable[[Path], Any] | None = None,
) -> OpenclipartBuild:
    r"""Build an image-caption folder from unpacked openclipart packages.

    Reads every SVG under `folders` (and not under `exclude`), makes its caption with
    [`make_caption`][advlab.data.openclipart.make_caption], and writes
    `DST/<top-level folder>/<name>.png` and `<name>.txt` (the caption and a newline), where
    `<name>` is the SVG's path below its top-level folder with `/` as `__`. A `manifest.tsv`
    (name, source path, title, description, keywords) and the packages' `copyright` file go to
    `DST`. The folder is written under a temporary name and renamed at the end; a finished folder
    built with the same settings is reused as is, one built with other settings is replaced.

    Args:
        src: Where `openclipart-svg` (and `openclipart-png`) were unpacked (`dpkg-deb -x`),
            `/` for installed packages, or an openclipart folder holding `svg/` (and `png/`).
        dst: The caption folder; None means `${ADVLAB_CACHE:-~/.cache/advlab}/openclipart/pairs`.
        folders: Top-level folders (or deeper paths) of the SVG tree to keep.
        exclude: Paths below `folders` to leave out.
        caption: Which metadata fields make the caption (see the module docs).
        max_words: Cut captions after this many words.
        max_side: Downscale images to at most this many pixels on the long side.
        render: Turns an SVG path into a PIL image when there is no pre-rendered PNG; None uses
            `cairosvg` if installed (and otherwise skips such drawings, counted).

    Returns:
        The folder and its counts ([`OpenclipartBuild`][advlab.data.openclipart.OpenclipartBuild]).

    Raises:
        FileNotFoundError: `src` holds no openclipart SVG folder, or a folder in `folders` is
            not in it.
        AdvlabValueError: Bad `caption`, `max_words` or `max_side`, or nothing was kept.
        AdvlabTypeError: `src` or `dst` is not a path, `folders` or `exclude` is not a sequence
            of folder names, or `render` is not callable.

    Examples:
        >>> import tempfile
        >>> try:
        ...     build_openclipart_folder(tempfile.mkdtemp(), tempfile.mkdtemp())
        ... except FileNotFoundError as err:
        ...     print(str(err)[:33])
        No openclipart SVG folder in /tmp
    """
    src_path = as_path("src", src)
    if dst is not None:
        as_path("dst", dst)
    if render is not None and not callable(render):
        raise AdvlabTypeError(f"Expected `render` to be a callable (path -> PIL image) or None, but got {render!r}.")
    svg_root = _svg_root(src_path)
    png_root = svg_root.parent / "png"
    keep = _check_folders("folders", folders)
    drop = _check_folders("exclude", exclude)
    if not keep:
        raise AdvlabValueError("Expected `folders` to name at least one folder, but got an empty sequence.")
    make_caption(ClipartEntry("check"), caption, max_words=max_words)  # validates `caption` and `max_words`
    if not isinstance(max_side, int) or isinstance(max_side, bool) or max_side < 8:
        raise AdvlabValueError(f"Expected `max_side` to be an int of at least 8 pixels, but got {max_side!r}.")
    absent = [f for f in keep if not (svg_root / f).is_dir()]
    if absent:
        present = sorted(p.name for p in svg_root.iterdir() if p.is_dir())
        raise FileNotFoundError(f"`folders` names {absent}, which {svg_root} lacks; it holds {present}.")
    out = as_path("dst", dst) if dst is not None else cache_root() / "openclipart" / "pairs"
    settings = {
        "source": str(svg_root.resolve()),
        "folders": list(keep),
        "exclude": list(drop),
        "caption": caption,
        "max_words": max_words,
        "max_side": max_side,
        "version": 1,
    }
    marker = out / _DONE
    if marker.is_file():
        try:
            done = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            done = {}
        if done.get("settings") == settings:
            return OpenclipartBuild(out, done["counts"], done["dropped"], settings)
    renderer = render if render is not None else _cairosvg_renderer()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    counts: dict[str, int] = {}
    dropped: dict[str, int] = {}
    manifest = ["name\tsource\ttitle\tdescription\tkeywords\n"]
    try:
        svgs = sorted(
            {p for f in keep for p in (svg_root / f).rglob("*.svg")}, key=lambda p: p.relative_to(svg_root).as_posix()
        )
        for svg in svgs:
            rel = svg.relative_to(svg_root)
            rel_posix = rel.as_posix()
            if any(rel_posix.startswith(f"{d}/") for d in drop) or not svg.is_file():
                continue
            entry = read_svg_metadata(svg)
            if entry is None:
                dropped["unreadable metadata"] = dropped.get("unreadable metadata", 0) + 1
                continue
            text = make_caption(entry, caption, max_words=max_words)
            if text is None:
                reason = _drop_reason(entry.title) or "no title"
                dropped[reason] = dropped.get(reason, 0) + 1
                continue
            image = _load_image(png_root / rel.with_suffix(".png"), svg, renderer)
            if isinstance(image, str):
                dropped[image] = dropped.get(image, 0) + 1
                continue
            prepared = _prepare(image, max_side)
            if prepared is None:
                dropped["blank image"] = dropped.get("blank image", 0) + 1
                continue
            top, name = rel.parts[0], "__".join(rel.with_suffix("").parts[1:]) or rel.stem
            (tmp / top).mkdir(exist_ok=True)
            stem, n = name, 1
            while (tmp / top / f"{name}.png").exists():  # "a/b__c.svg" and "a/b/c.svg" would share a name
                n += 1
                name = f"{stem}__{n}"
            prepared.save(tmp / top / f"{name}.png")
            (tmp / top / f"{name}.txt").write_text(text + "\n", encoding="utf-8")
            counts[top] = counts.get(top, 0) + 1
            fields = (f"{top}/{name}", rel_posix, entry.title, entry.description, ", ".join(entry.keywords))
            manifest.append("\t".join(v.replace("\t", " ") for v in fields) + "\n")
        if not counts:
            raise AdvlabValueError(
                f"No drawing under {svg_root} / {list(keep)} had a usable title and image (dropped: {dropped})."
            )
        unrendered = dropped.get("no PNG and no SVG renderer", 0) + dropped.get("oversized PNG and no SVG renderer", 0)
        if unrendered:
            warnings.warn(
                f"Skipped {unrendered} drawings with no usable pre-rendered PNG: unpack openclipart-png beside "
                f"openclipart-svg, or `pip install cairosvg` to render their SVGs.",
                UserWarning,
                stacklevel=2,
            )
        (tmp / "manifest.tsv").write_text("".join(manifest), encoding="utf-8")
        for rel_copyright in _COPYRIGHT:
            if (src_path / rel_copyright).is_file():
                shutil.copyfile(src_path / rel_copyright, tmp / "copyright")
                break
        record = {"settings": settings, "counts": counts, "dropped": dropped}
        (tmp / _DONE).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return OpenclipartBuild(out, counts, dropped, settings)


def _load_image(png: Path, svg: Path, renderer: Callable[[Path], Any] | None) -> Any:
    """A loaded PIL image, or the reason (a str) it could not be had."""
    from PIL import Image  # lazy: Pillow is in the `data` extra

    if png.is_file():
        try:
            with warnings.catch_warnings():  # the package's own files; huge ones are skipped below, not decoded
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(png)
            with image:
                if image.width * image.height <= _MAX_PNG_PIXELS:
                    image.load()
                    return image.copy()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            return "unreadable PNG"
        if renderer is None:
            return "oversized PNG and no SVG renderer"
    elif renderer is None:
        return "no PNG and no SVG renderer"
    try:
        image = renderer(svg)
        image.load()
        return image
    except Exception:  # noqa: BLE001 - a renderer may fail in many ways on odd SVGs; count and go on
        return "SVG failed to render"
