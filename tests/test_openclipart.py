"""Openclipart caption folder: metadata reading, caption rules, folder filter, images, set-up errors.

Most tests build a tiny openclipart-like tree (SVGs with RDF metadata, pre-rendered PNGs) in
tmp_path; the last one checks the folder scripts/setup_data.sh built from the real packages.
"""

import json
import warnings
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from advlab._errors import AdvlabTypeError, AdvlabValueError
from advlab.data import openclipart as oc
from advlab.data.captions import scan_caption_folder, split_by_caption
from advlab.data.openclipart import (
    DEFAULT_EXCLUDE,
    DEFAULT_FOLDERS,
    ClipartEntry,
    build_openclipart_folder,
    make_caption,
    openclipart_dir,
    read_svg_metadata,
)


def _svg(title="", description="", keywords=(), *, agent="Jane Doe"):
    items = "".join(f"<rdf:li>{k}</rdf:li>" for k in keywords)
    return f"""<?xml version="1.0" encoding="UTF-8" standalone="no"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:cc="http://web.resource.org/cc/"
     xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"
     width="100" height="100">
  <metadata><rdf:RDF><cc:Work rdf:about="">
    <dc:title>{title}</dc:title>
    <dc:description>{description}</dc:description>
    <dc:subject><rdf:Bag>{items}<rdf:li></rdf:li></rdf:Bag></dc:subject>
    <dc:creator><cc:Agent><dc:title>{agent}</dc:title></cc:Agent></dc:creator>
  </cc:Work></rdf:RDF></metadata>
  <rect x="10" y="10" width="20" height="20"/>
</svg>
"""


def _png(path: Path, size=(400, 300), box=(50, 40, 150, 90)):
    """A transparent page with one opaque red rectangle (the drawing) at `box`."""
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    image.paste((200, 0, 0, 255), box)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


# (relative path, title, description, keywords, has PNG)
TREE = [
    ("food/fruit/apple_01.svg", "Apple", "A red apple", ("fruit", "food"), True),
    ("food/pie.svg", "Apple Pie", "", ("dessert", "food", "pie", "hash"), True),
    ("food/cake1.svg", "cake1", "", (), True),  # file-name-like title: dropped
    ("food/untitled.svg", "", "nice", (), True),  # no title: dropped
    ("animals/birds/crow.svg", "Crow", "Created with Inkscape", ("bird",), True),  # tool stamp description
    ("animals/bear.svg", "Orso", "HASH(0x862bbb8)", (), True),
    ("animals/nicu.svg", "Clipart by Nicu Buculei - pear", "", (), True),  # collection stamp: dropped
    ("animals/blank.svg", "Ghost", "", (), "blank"),  # fully transparent PNG: dropped
    ("animals/svg_only.svg", "Snail", "A slow snail", (), False),  # no PNG: needs a renderer
    ("computer/icons/disk.svg", "Disk", "", (), True),  # folder not kept
    ("transportation/car.svg", "Red Car", "", (), True),
    ("transportation/roadsigns/stop.svg", "Stop Sign", "", (), True),  # excluded sub-folder
]


@pytest.fixture
def src(tmp_path):
    root = tmp_path / "unpacked"
    svg_root = root / "usr/share/openclipart/svg"
    png_root = root / "usr/share/openclipart/png"
    for rel, title, description, keywords, has_png in TREE:
        (svg_root / rel).parent.mkdir(parents=True, exist_ok=True)
        (svg_root / rel).write_text(_svg(title, description, keywords), encoding="utf-8")
        if has_png == "blank":
            _png(png_root / rel.replace(".svg", ".png"), box=(0, 0, 0, 0))
        elif has_png:
            _png(png_root / rel.replace(".svg", ".png"))
    (root / "usr/share/doc/openclipart-svg").mkdir(parents=True)
    (root / "usr/share/doc/openclipart-svg/copyright").write_text("public domain\n")
    return root


@pytest.fixture
def no_cairosvg(monkeypatch):
    monkeypatch.setattr(oc, "_cairosvg_renderer", lambda: None)


def _folders(folders=("food", "animals", "transportation"), exclude=("transportation/roadsigns",)):
    return {"folders": folders, "exclude": exclude}


def test_read_svg_metadata_takes_the_works_title_not_the_authors(tmp_path):
    path = tmp_path / "a.svg"
    path.write_text(_svg("  Apple\n  Pie ", "A  pie.", ("dessert", "food"), agent="Franck"))
    assert read_svg_metadata(path) == ClipartEntry("Apple Pie", "A pie.", ("dessert", "food"))
    path.write_text("<svg><metadata>not closed")
    assert read_svg_metadata(path) is None
    path.write_text('<svg xmlns="http://www.w3.org/2000/svg"><rect/></svg>')
    assert read_svg_metadata(path) is None
    assert read_svg_metadata(tmp_path / "missing.svg") is None


def test_caption_rules():
    assert make_caption(ClipartEntry("Apple", "A red apple")) == "Apple. A red apple"
    assert make_caption(ClipartEntry("Apple", "A red apple"), "title") == "Apple"
    assert make_caption(ClipartEntry("Apple?", "Yes.")) == "Apple? Yes."
    assert make_caption(ClipartEntry("Crawfish", "crawfish.")) == "Crawfish"  # the title again
    for stamp in [
        "Created with Inkscape",
        "Made with Sodipodi",
        "HASH(0x862bbb8)",
        "jean@example.com",
        "see http://x.org",
    ]:
        assert make_caption(ClipartEntry("Crow", stamp)) == "Crow", stamp
    for title in ["", "   ", "cake1", "horse#1", "arbre_modern_bw", "books-aj.svg", "AIGA_Symbol_Signs", "42"]:
        assert make_caption(ClipartEntry(title, "a fine drawing")) is None, title
    for title in ["Clipart by Nicu Buculei - pear", "Part of the Flat Icon Collection", "Lemon SVG theme",
                  "Various Cliparts", "R16 sibmission", "Homes Clipart", "SVG Road Signs", "Untitled 3"]:  # fmt: skip
        assert make_caption(ClipartEntry(title)) is None, title
    assert make_caption(ClipartEntry("Dog 01 Drawn With Straight Lines")) == "Dog 01 Drawn With Straight Lines"
    keywords = ("dessert", "food", "pie", "hash", "0x8b754fc", "united_nations", "Food", "")
    entry = ClipartEntry("Apple Pie", "Warm.", keywords)
    assert make_caption(entry, "title+keywords") == "Apple Pie (dessert, food, united nations)"
    assert make_caption(entry, "title+description+keywords") == "Apple Pie. Warm. (dessert, food, united nations)"
    assert make_caption(ClipartEntry("A b c", "d e f g"), max_words=5) == "A b c. d e"


def test_caption_argument_errors():
    with pytest.raises(AdvlabValueError, match="`caption` to be one of"):
        make_caption(ClipartEntry("x"), "title+tags")
    with pytest.raises(AdvlabValueError, match="`max_words`"):
        make_caption(ClipartEntry("x"), max_words=0)


@given(
    title=st.text(max_size=30),
    description=st.text(max_size=60),
    keywords=st.lists(st.text(max_size=10), max_size=4),
    mode=st.sampled_from(["title", "title+description", "title+keywords", "title+description+keywords"]),
    max_words=st.integers(1, 12),
)
def test_property_captions_are_one_clean_line(title, description, keywords, mode, max_words):
    caption = make_caption(ClipartEntry(title, description, tuple(keywords)), mode, max_words=max_words)
    if caption is not None:
        assert caption == " ".join(caption.split()) and caption  # one line, no stray whitespace
        assert len(caption.split()) <= max_words
        assert caption.split()[0].startswith(title.split()[0])  # the title leads (maybe with ". ")


def test_builder_output_works_with_the_caption_reader(src, tmp_path, no_cairosvg):
    with pytest.warns(UserWarning, match="Skipped 1 drawings with no usable pre-rendered PNG"):
        built = build_openclipart_folder(src, tmp_path / "pairs", **_folders(), max_side=32)
    out = tmp_path / "pairs"
    assert built.root == out and built.counts == {"food": 2, "animals": 2, "transportation": 1}
    assert built.dropped == {
        "file-name-like title": 1,
        "no title": 1,
        "collection stamp as title": 1,
        "blank image": 1,
        "no PNG and no SVG renderer": 1,
    }
    assert (out / "food" / "fruit__apple_01.txt").read_text() == "Apple. A red apple\n"
    assert (out / "food" / "pie.txt").read_text() == "Apple Pie\n"
    assert (out / "animals" / "birds__crow.txt").read_text() == "Crow\n"
    assert (out / "animals" / "bear.txt").read_text() == "Orso\n"
    assert (out / "copyright").read_text() == "public domain\n"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every image readable, every caption present
        items = scan_caption_folder(out)
    assert sorted(i.category for i in items) == ["animals", "animals", "food", "food", "transportation"]
    assert {i.caption for i in items} == {"Apple. A red apple", "Apple Pie", "Crow", "Orso", "Red Car"}
    assert len(split_by_caption(items, seed=0, fractions=(0.6, 0.2, 0.2)).train) == 3
    manifest = (out / "manifest.tsv").read_text().splitlines()
    assert manifest[0].split("\t") == ["name", "source", "title", "description", "keywords"]
    assert "food/pie\tfood/pie.svg\tApple Pie\t\tdessert, food, pie, hash" in manifest
    assert openclipart_dir(out) == out


def test_images_are_cropped_downscaled_and_keep_transparency(src, tmp_path, no_cairosvg):
    with pytest.warns(UserWarning):
        build_openclipart_folder(src, tmp_path / "a", **_folders(), max_side=32)
    with Image.open(tmp_path / "a" / "food" / "pie.png") as image:
        assert image.mode == "RGBA" and image.size == (32, 16)  # the 100 x 50 drawing, long side 32
        assert image.getpixel((16, 8)) == (200, 0, 0, 255)
    with pytest.warns(UserWarning):
        build_openclipart_folder(src, tmp_path / "b", **_folders(), max_side=256)
    with Image.open(tmp_path / "b" / "food" / "pie.png") as image:
        assert image.size == (100, 50)  # cropped to the drawing, never enlarged
    page = Image.new("RGBA", (300, 200), (0, 0, 0, 0))
    page.paste((0, 0, 255, 128), (10, 20, 30, 60))
    prepared = oc._prepare(page, 256)
    assert prepared.size == (20, 40) and prepared.getpixel((0, 0)) == (0, 0, 255, 128)


def test_svg_renderer_is_used_only_without_a_png(src, tmp_path):
    rendered = []

    def render(path):
        rendered.append(path.name)
        image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
        image.paste((0, 128, 0, 255), (8, 8, 40, 24))
        return image

    built = build_openclipart_folder(src, tmp_path / "pairs", **_folders(), render=render)
    assert rendered == ["svg_only.svg"]
    assert built.counts["animals"] == 3 and "no PNG and no SVG renderer" not in built.dropped
    assert (tmp_path / "pairs" / "animals" / "svg_only.txt").read_text() == "Snail. A slow snail\n"
    with Image.open(tmp_path / "pairs" / "animals" / "svg_only.png") as image:
        assert image.size == (32, 16)

    def broken(path):
        raise RuntimeError("cannot render")

    built = build_openclipart_folder(src, tmp_path / "other", **_folders(), render=broken)
    assert built.dropped["SVG failed to render"] == 1


def test_folder_filter(src, tmp_path, no_cairosvg):
    built = build_openclipart_folder(src, tmp_path / "food", folders=("food",), exclude=())
    assert built.counts == {"food": 2}
    with pytest.warns(UserWarning):
        built = build_openclipart_folder(
            src, tmp_path / "all", folders=("food", "animals", "transportation"), exclude=()
        )
    assert built.counts["transportation"] == 2  # the road sign comes back without the exclusion
    built = build_openclipart_folder(src, tmp_path / "sub", folders=("food/fruit",), exclude=())
    assert built.counts == {"food": 1}
    assert "computer" not in DEFAULT_FOLDERS and "signs_and_symbols" not in DEFAULT_FOLDERS
    assert all(e.split("/")[0] in DEFAULT_FOLDERS for e in DEFAULT_EXCLUDE)
    with pytest.raises(FileNotFoundError, match=r"\['kitchens'\].*holds \['animals', 'computer', 'food'"):
        build_openclipart_folder(src, tmp_path / "x", folders=("food", "kitchens"))


def test_idempotent_and_rebuilt_when_settings_change(src, tmp_path, no_cairosvg):
    out = tmp_path / "pairs"
    first = build_openclipart_folder(src, out, folders=("food",), exclude=())
    png = out / "food" / "pie.png"
    stamp = png.stat().st_mtime_ns
    again = build_openclipart_folder(src, out, folders=("food",), exclude=())
    assert again == first and png.stat().st_mtime_ns == stamp  # reused, nothing rewritten
    record = json.loads((out / oc._DONE).read_text())
    assert record["counts"] == {"food": 2} and record["settings"]["caption"] == "title+description"
    build_openclipart_folder(src, out, folders=("food",), exclude=(), caption="title")
    assert (out / "food" / "fruit__apple_01.txt").read_text() == "Apple\n"  # other settings: rebuilt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs", "unpacked"]  # no temporary folder left


def test_missing_source_and_missing_folder_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="(?s)No openclipart SVG folder.*scripts/setup_data.sh"):
        build_openclipart_folder(tmp_path, tmp_path / "pairs")
    with pytest.raises(FileNotFoundError, match="(?s)No openclipart caption folder.*scripts/setup_data.sh"):
        openclipart_dir(tmp_path / "pairs")
    monkeypatch.setenv("ADVLAB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "cache" / "openclipart" / "pairs")):
        openclipart_dir()


def test_bad_arguments(src, tmp_path):
    with pytest.raises(AdvlabTypeError, match="`folders`"):
        build_openclipart_folder(src, tmp_path / "p", folders="food")
    with pytest.raises(AdvlabTypeError, match="`exclude`"):
        build_openclipart_folder(src, tmp_path / "p", exclude=[3])
    with pytest.raises(AdvlabValueError, match="at least one folder"):
        build_openclipart_folder(src, tmp_path / "p", folders=())
    with pytest.raises(AdvlabValueError, match="`caption` to be one of"):
        build_openclipart_folder(src, tmp_path / "p", caption="keywords")
    with pytest.raises(AdvlabValueError, match="`max_side`"):
        build_openclipart_folder(src, tmp_path / "p", max_side=0)
    with pytest.raises(AdvlabTypeError, match="`src` to be a path"):
        build_openclipart_folder(3, tmp_path / "p")
    with pytest.raises(AdvlabTypeError, match="`dst` to be a path"):
        build_openclipart_folder(src, 3.5)
    with pytest.raises(AdvlabTypeError, match="`render`"):
        build_openclipart_folder(src, tmp_path / "p", render="cairosvg")
    with pytest.raises(AdvlabTypeError, match="`root` to be a path"):
        openclipart_dir(["pairs"])
    with pytest.raises(AdvlabTypeError, match="ClipartEntry"):
        make_caption("Apple Pie")
    with pytest.raises(AdvlabValueError, match="No drawing"):
        build_openclipart_folder(src, tmp_path / "p", folders=("computer",), exclude=("computer/icons",))
    assert not (tmp_path / "p").exists()


def test_real_openclipart_folder():
    root = openclipart_dir()  # built by scripts/setup_data.sh from Debian's openclipart-svg / -png
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        items = scan_caption_folder(root, check="none")
    assert 1200 < len(items) < 3000  # 1,778 pairs on Debian 12's 0.18 packages
    categories = {i.category for i in items}
    assert categories <= set(DEFAULT_FOLDERS) and {"animals", "food", "people"} <= categories
    captions = {i.caption.casefold() for i in items}
    assert len(captions) > 900  # 1,271 measured
    assert not any(c.startswith("clipart by") or oc._FILE_LIKE.fullmatch(c) for c in captions)
    with Image.open(items[0].path) as image:
        assert image.mode == "RGBA" and max(image.size) <= 256
