"""Image–caption folder reader and the caption-level split."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from advlab._errors import AdvlabTypeError, AdvlabValueError
from advlab.data.captions import (
    CaptionedImage,
    ImageCaptionFolder,
    caption_key,
    read_caption,
    scan_caption_folder,
    split_by_caption,
)


def _png(path: Path, size: tuple[int, int] = (6, 4)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGBA", size, (255, 0, 0, 128)).save(path)


@pytest.fixture()
def messy_folder(tmp_path):
    """Good stamps in nested folders plus every kind of bad file."""
    _png(tmp_path / "animals" / "birds" / "crow.png")
    (tmp_path / "animals" / "birds" / "crow.txt").write_text("A crow.\nfr.utf8=Un corbeau.\n", encoding="utf-8")
    _png(tmp_path / "food" / "potato.png")
    (tmp_path / "food" / "potato.txt").write_bytes("\ufeffA brown  potato. \n".encode())  # BOM, spaces
    _png(tmp_path / "top.png")
    (tmp_path / "top.txt").write_text("A spinning top.")  # no newline at all
    _png(tmp_path / "food" / "latin1.png")
    (tmp_path / "food" / "latin1.txt").write_bytes(b"Caf\xe9 au lait.\n")  # not UTF-8: read as Windows-1252
    # bad: no caption file, empty caption, broken PNG, truncated PNG
    _png(tmp_path / "food" / "nocaption.png")
    _png(tmp_path / "food" / "empty.png")
    (tmp_path / "food" / "empty.txt").write_text("\nde.utf8=Leer\n")
    (tmp_path / "food" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "food" / "broken.txt").write_text("A broken file.\n")
    _png(tmp_path / "food" / "cut.png", size=(64, 64))
    (tmp_path / "food" / "cut.png").write_bytes((tmp_path / "food" / "cut.png").read_bytes()[:60])
    (tmp_path / "food" / "cut.txt").write_text("A truncated file.\n")
    # ignored without counting: an SVG with a PNG twin, a text file alone, a non-image file
    (tmp_path / "top.svg").write_text("<svg/>")
    (tmp_path / "food" / "orphan.txt").write_text("No image here.\n")
    (tmp_path / "food" / "notes.dat").write_text("x")
    # counted: an SVG with no raster twin
    (tmp_path / "animals" / "vector.svg").write_text("<svg/>")
    (tmp_path / "animals" / "vector.txt").write_text("A vector.\n")
    return tmp_path


def test_reader_skips_bad_files_with_one_warning(messy_folder):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = scan_caption_folder(messy_folder)
    assert [(x.path.relative_to(messy_folder).as_posix(), x.caption, x.category) for x in items] == [
        ("animals/birds/crow.png", "A crow.", "animals/birds"),
        ("food/latin1.png", "Café au lait.", "food"),
        ("food/potato.png", "A brown potato.", "food"),
        ("top.png", "A spinning top.", ""),
    ]
    assert len(caught) == 1
    message = str(caught[0].message)
    assert caught[0].category is UserWarning and caught[0].filename == __file__  # points at the caller
    assert "Skipped 5 files" in message
    assert "1 no caption file" in message and "1 blank caption" in message
    assert "2 unreadable image" in message and "1 svg without a raster twin" in message
    assert "read 1 captions" in message and "not UTF-8 as Windows-1252" in message and "kept 4 images" in message


def test_verify_mode_catches_broken_header_and_none_trusts_files(messy_folder):
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        verified = scan_caption_folder(messy_folder, check="verify")
        trusted = scan_caption_folder(messy_folder, check="none")
    assert "food/broken.png" not in {x.path.relative_to(messy_folder).as_posix() for x in verified}
    assert len(trusted) == 6  # only caption problems are skipped


def test_clean_folder_warns_nothing(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("A.\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folder = ImageCaptionFolder(tmp_path)
    assert len(folder) == 1 and folder[0].caption == "A." and folder.n_captions == 1


def test_reader_argument_errors(tmp_path):
    with pytest.raises(AdvlabValueError, match="root"):
        scan_caption_folder(tmp_path / "nope")
    with pytest.raises(AdvlabValueError, match="suffixes"):
        scan_caption_folder(tmp_path, suffixes=".png")
    with pytest.raises(AdvlabValueError, match="check"):
        scan_caption_folder(tmp_path, check="maybe")  # type: ignore[arg-type]


def test_read_caption_edge_cases(tmp_path):
    (tmp_path / "x.txt").write_text("  A   cat \r\nsecond line\n")
    assert read_caption(tmp_path / "x.txt") == "A cat"
    assert read_caption(tmp_path / "missing.txt") is None


def _templated_items() -> list[CaptionedImage]:
    """Like Tux Paint: families sharing one caption (letters drawn in several styles), plus singletons."""
    items = []
    for letter in "ABCDEFGHIJ":
        for style in ("filled", "outline", "cartoon"):
            items.append(CaptionedImage(Path(f"symbols/{style}/{letter}.png"), f"The letter {letter}.", style))
    for i in range(60):
        items.append(CaptionedImage(Path(f"animals/a{i:02d}.png"), f"Animal number {i}.", "animals"))
    # same caption up to case and spacing counts as identical
    items.append(CaptionedImage(Path("symbols/odd/a_lower.png"), "the  letter a.", "odd"))
    return items


def _keys(items) -> set[str]:
    return {caption_key(x.caption) for x in items}


def test_no_caption_crosses_splits_and_galleries_are_unique():
    items = _templated_items()
    splits = split_by_caption(items, seed=0)
    train, val, test = _keys(splits.train), _keys(splits.val), _keys(splits.test)
    assert not (train & val) and not (train & test) and not (val & test)
    assert train | val | test == _keys(items)
    n = len(_keys(items))  # 70 distinct captions
    assert (len(train), len(val), len(test)) == (round(0.7 * n), round(0.1 * n), n - round(0.7 * n) - round(0.1 * n))
    # training keeps every image of its captions; the galleries one image per caption
    assert len(splits.train) == sum(caption_key(x.caption) in train for x in items)
    assert len(splits.test) == len(test) and len(splits.val) == len(val)
    # the kept gallery image is the first by path
    for x in splits.test:
        same = sorted(y.path.as_posix() for y in items if caption_key(y.caption) == caption_key(x.caption))
        assert x.path.as_posix() == same[0]


def test_split_is_deterministic_and_order_independent():
    items = _templated_items()
    a = split_by_caption(items, seed=3)
    b = split_by_caption(list(reversed(items)), seed=3)
    assert a == b
    assert split_by_caption(items, seed=4) != a


@given(
    n_captions=st.integers(1, 40),
    copies=st.lists(st.integers(1, 4), min_size=40, max_size=40),
    seed=st.integers(0, 2**31),
)
def test_split_properties(n_captions, copies, seed):
    items = [
        CaptionedImage(Path(f"c{c:02d}_{k}.png"), f"Caption {c}.", "")
        for c in range(n_captions)
        for k in range(copies[c])
    ]
    splits = split_by_caption(items, seed=seed)
    sets = [_keys(splits.train), _keys(splits.val), _keys(splits.test)]
    assert sum(len(s) for s in sets) == n_captions and len(set.union(*sets)) == n_captions
    for gallery in (splits.val, splits.test):
        assert len(gallery) == len(_keys(gallery))


def test_split_argument_errors():
    items = _templated_items()
    with pytest.raises(AdvlabValueError, match="fractions"):
        split_by_caption(items, fractions=(0.7, 0.2, 0.2))
    with pytest.raises(AdvlabValueError, match="fractions"):
        split_by_caption(items, fractions=(0.5, 0.5))
    with pytest.raises(AdvlabTypeError, match="seed"):
        split_by_caption(items, seed=1.5)  # type: ignore[arg-type]


def test_folder_split_end_to_end(tmp_path):
    for i in range(20):
        _png(tmp_path / f"group{i % 3}" / f"img{i:02d}.png")
        (tmp_path / f"group{i % 3}" / f"img{i:02d}.txt").write_text(f"Thing {i % 10}.\n")
    folder = ImageCaptionFolder(tmp_path)
    splits = folder.split(seed=0)
    assert len(folder) == 20 and folder.n_captions == 10
    assert splits.summary().startswith("train ")
    assert not (_keys(splits.train) & _keys(splits.test))
    assert len(splits.test) == len(_keys(splits.test)) == 2


# --- Tux Paint locator (advlab.data.tuxpaint) ---------------------------------------------------


REPO = Path(__file__).resolve().parents[1]
PACKAGE_DATE = 1_654_300_800  # 2022-06-04, the stand-in package's file dates


def _fake_deb(tmp_path: Path) -> Path:
    """A tiny stand-in for tuxpaint-stamps-default built with dpkg-deb, in `$ADVLAB_CACHE/tuxpaint`.

    Two captioned PNG stamps (one with a space and accents in its name), a captioned SVG, a mirror
    variant without caption, a sound, a symbolic link and the copyright file. Returns the ADVLAB_CACHE root.
    """
    import os
    import shutil
    import subprocess

    assert shutil.which("dpkg-deb") is not None, "dpkg-deb is needed to build the stand-in package (Debian's dpkg)"
    pkg = tmp_path / "pkg"
    stamps = pkg / "usr/share/tuxpaint/stamps"
    _png(stamps / "food" / "potato.png")
    (stamps / "food" / "potato.txt").write_text("A brown potato.\nfr.utf8=Une pomme de terre.\n")
    _png(stamps / "food" / "crème brûlée.png")
    (stamps / "food" / "crème brûlée.txt").write_text("A crème brûlée.\n")
    (stamps / "symbols" / "star.svg").parent.mkdir(parents=True)
    (stamps / "symbols" / "star.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    (stamps / "symbols" / "star.txt").write_text("A star.\n")
    _png(stamps / "animals" / "crow_mirror.png")  # Tux Paint's mirror variants have no caption
    (stamps / "animals" / "crow.ogg").write_bytes(b"OggS")
    (stamps / "animals" / "alias.png").symlink_to("crow_mirror.png")  # not a regular file: not unpacked
    (pkg / "usr/share/doc/tuxpaint-stamps-default").mkdir(parents=True)
    (pkg / "usr/share/doc/tuxpaint-stamps-default/copyright").write_text("GPL-2\n")
    for path in pkg.rglob("*"):
        os.utime(path, (PACKAGE_DATE, PACKAGE_DATE), follow_symlinks=False)
    (pkg / "DEBIAN").mkdir()
    (pkg / "DEBIAN/control").write_text(
        "Package: tuxpaint-stamps-default\nVersion: 0.0-test\nArchitecture: all\n"
        "Maintainer: advlab tests <t@example.org>\nDescription: test stand-in\n"
    )
    root = tmp_path / "cache"
    (root / "tuxpaint").mkdir(parents=True)
    deb = root / "tuxpaint" / "tuxpaint-stamps-default_0.0-test_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(pkg), str(deb)], check=True, capture_output=True)
    return root


def _fetch(tmp_path: Path, root: Path, path_prefix: Path | None = None):
    """Run scripts/fetch_tuxpaint.sh with ADVLAB_CACHE=root and no installed copy."""
    import os
    import subprocess

    env = {**os.environ, "ADVLAB_CACHE": str(root), "TUXPAINT_SYSTEM_STAMPS": str(tmp_path / "not-installed")}
    env.pop("KEEP_DEB", None)
    if path_prefix is not None:
        env["PATH"] = f"{path_prefix}{os.pathsep}{env['PATH']}"
    return subprocess.run(["bash", str(REPO / "scripts" / "fetch_tuxpaint.sh")], env=env, capture_output=True,
                          text=True, check=False)


def test_fetch_script_unpacks_only_the_stamps_and_the_library_finds_them(tmp_path, monkeypatch):
    from advlab.data import tuxpaint

    root = _fake_deb(tmp_path)
    done = _fetch(tmp_path, root)  # the .deb is already in the cache: no apt-get download
    assert done.returncode == 0, done.stderr
    folder = root / "tuxpaint" / "stamps"
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())
    assert files == [".advlab-complete", "animals/crow_mirror.png", "copyright", "food/crème brûlée.png",
                     "food/crème brûlée.txt", "food/potato.png", "food/potato.txt", "symbols/star.svg",
                     "symbols/star.txt"]  # no sound, no link
    assert (folder / "copyright").read_text() == "GPL-2\n"
    assert all(p.stat().st_mtime == PACKAGE_DATE for p in folder.rglob("*.*") if p.name != ".advlab-complete")
    assert not list((root / "tuxpaint").glob("*.deb"))  # deleted once unpacked
    assert not list((root / "tuxpaint").glob(".stamps-*"))  # no temporary folder left
    again = _fetch(tmp_path, root)
    assert again.returncode == 0 and "already unpacked" in again.stdout

    monkeypatch.setattr(tuxpaint, "SYSTEM_STAMPS_DIR", tmp_path / "not-installed")
    monkeypatch.setenv("ADVLAB_CACHE", str(root))
    assert tuxpaint.tuxpaint_stamps_dir() == folder
    assert tuxpaint.tuxpaint_stamps_dir(cache_dir=root / "tuxpaint") == folder
    with pytest.warns(UserWarning, match="1 no caption"):
        items = scan_caption_folder(folder, check="none")  # the SVG is recognised, not rasterised
    assert sorted((x.caption, x.category) for x in items) == [("A brown potato.", "food"), ("A crème brûlée.", "food")]


def test_fetch_script_names_the_fix_when_apt_get_download_fails(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "apt-get"  # apt without package lists, as on a fresh container
    fake.write_text("#!/bin/sh\necho 'E: Unable to locate package tuxpaint-stamps-default' >&2\nexit 100\n")
    fake.chmod(0o755)
    root = tmp_path / "cache"
    done = _fetch(tmp_path, root, path_prefix=bin_dir)
    assert done.returncode != 0
    assert "sudo apt-get update" in done.stderr and "apt-get install -y --no-install-recommends" in done.stderr
    assert not (root / "tuxpaint" / "stamps").exists()


def test_tuxpaint_missing_gives_a_clear_message(tmp_path, monkeypatch):
    from advlab.data import tuxpaint

    monkeypatch.setattr(tuxpaint, "SYSTEM_STAMPS_DIR", tmp_path / "not-installed")
    cache = tmp_path / "cache" / "tuxpaint"
    with pytest.raises(FileNotFoundError, match="apt-get install -y --no-install-recommends tuxpaint-stamps-default"):
        tuxpaint.tuxpaint_stamps_dir(cache_dir=cache)
    with pytest.raises(FileNotFoundError, match=rf"`ADVLAB_CACHE={tmp_path / 'cache'} scripts/setup_data.sh`"):
        tuxpaint.tuxpaint_stamps_dir(cache_dir=cache)
    (cache / "stamps" / "food").mkdir(parents=True)  # an interrupted copy: no completion marker
    (cache / "stamps" / "food" / "potato.txt").write_text("A brown potato.\n")
    with pytest.raises(FileNotFoundError, match="not completed"):
        tuxpaint.tuxpaint_stamps_dir(cache_dir=cache)


def test_the_library_never_runs_a_package_manager(tmp_path, monkeypatch):
    import subprocess

    from advlab.data import tuxpaint

    def refuse(*args, **kwargs):
        raise AssertionError(f"advlab.data.tuxpaint ran a command: {args}")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(tuxpaint, "SYSTEM_STAMPS_DIR", tmp_path / "not-installed")
    with pytest.raises(FileNotFoundError, match="scripts/setup_data.sh"):
        tuxpaint.tuxpaint_stamps_dir(cache_dir=tmp_path / "cache")
    assert "subprocess" not in vars(tuxpaint)


@pytest.mark.slow  # ~2 s: decodes every PNG of the real package
def test_real_tuxpaint_folder():
    from advlab.data.tuxpaint import tuxpaint_stamps_dir

    root = tuxpaint_stamps_dir()  # installed, cached, or fetched with apt-get download (scripts/setup_data.sh)
    with pytest.warns(UserWarning, match="Skipped"):
        folder = ImageCaptionFolder(root)
    assert 700 <= len(folder) <= 900 and 550 <= folder.n_captions <= 850  # ranges: releases differ
    splits = folder.split(seed=0)
    assert not (_keys(splits.train) & _keys(splits.test)) and not (_keys(splits.val) & _keys(splits.test))
    assert len(splits.test) == len(_keys(splits.test)) >= 100


def test_non_regular_files_are_skipped_counted_and_never_opened(tmp_path):
    # a FIFO named *.txt blocked the old reader forever (open() waits for a writer); run it in a thread with a timeout
    import os
    import threading

    _png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("A.\n")
    _png(tmp_path / "fifo_caption.png")
    os.mkfifo(tmp_path / "fifo_caption.txt")
    os.mkfifo(tmp_path / "fifo_image.png")
    (tmp_path / "fifo_image.txt").write_text("A pipe.\n")
    (tmp_path / "dir_caption.png").write_bytes(b"")
    (tmp_path / "dir_caption.txt").mkdir()
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "dangling.txt").write_text("Gone.\n")
    result = {}

    def scan():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result["items"] = scan_caption_folder(tmp_path, check="none")
        result["warnings"] = [str(w.message) for w in caught]

    worker = threading.Thread(target=scan, daemon=True)
    worker.start()
    worker.join(timeout=20)
    if worker.is_alive():  # unblock the old reader's open() so the thread ends, then fail
        with open(tmp_path / "fifo_caption.txt", "w"):
            pass
        pytest.fail("scan_caption_folder blocked on a FIFO named *.txt")
    assert [x.path.name for x in result["items"]] == ["a.png"]
    (message,) = result["warnings"]
    assert "Skipped 4 files" in message
    assert "2 caption file not a regular file" in message and "2 image not a regular file" in message
    assert read_caption(tmp_path / "fifo_caption.txt") is None


def test_read_caption_encodings(tmp_path):
    # fails on the old reader, which returned None (counted as "no caption") for any non-UTF-8 byte
    (tmp_path / "cp.txt").write_bytes(b"\x93Quoted\x94 caf\xe9.\nfr.utf8=Caf\xc3\xa9\n")
    assert read_caption(tmp_path / "cp.txt") == "\u201cQuoted\u201d café."
    (tmp_path / "u16.txt").write_bytes("A crow.\nsecond\n".encode("utf-16"))
    assert read_caption(tmp_path / "u16.txt") == "A crow."
    (tmp_path / "undefined.txt").write_bytes(b"x\x81y\n")  # undefined in Windows-1252: Latin-1
    assert read_caption(tmp_path / "undefined.txt") == "x\x81y"
    (tmp_path / "utf8_later.txt").write_bytes(b"A crow.\nde=\xff\n")  # only the first line is decoded
    assert read_caption(tmp_path / "utf8_later.txt") == "A crow."
