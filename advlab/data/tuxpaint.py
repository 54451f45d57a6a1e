"""Locate the Tux Paint stamps: real images with human-written English captions, offline.

Debian's `tuxpaint-stamps-default` package holds about 950 photos and clip-art images
(`NAME.png` or `NAME.svg`), each with a caption on the first line of `NAME.txt` beside it
("A brown potato.", "A rhea."). The folder is the category (animals, food, symbols, ...).
[`tuxpaint_stamps_dir`][advlab.data.tuxpaint.tuxpaint_stamps_dir] finds an installed copy or the
copy `scripts/setup_data.sh` unpacked into a cache folder (it fetches the package with
`apt-get download`; the library itself never runs a package manager); read the result with
[`ImageCaptionFolder`][advlab.data.captions.ImageCaptionFolder].

Licence: the stamps are GPL-2 (the package's `copyright` file is unpacked beside them). advlab
builds everything from the package at run time and never commits the images or features
derived from them.
"""

from __future__ import annotations

import os
from pathlib import Path

from advlab.data._cache import cache_root

__all__ = ["PACKAGE", "SYSTEM_STAMPS_DIR", "default_cache_dir", "tuxpaint_stamps_dir"]

PACKAGE = "tuxpaint-stamps-default"
SYSTEM_STAMPS_DIR = Path("/usr/share/tuxpaint/stamps")  # where `apt-get install` puts the stamps

_DONE_MARKER = ".advlab-complete"  # written last by scripts/fetch_tuxpaint.sh


def default_cache_dir() -> Path:
    """The folder `scripts/setup_data.sh` unpacks the stamps into: `$ADVLAB_CACHE/tuxpaint`.

    `ADVLAB_CACHE` defaults to `$XDG_CACHE_HOME/advlab`, that is `~/.cache/advlab`.

    Returns:
        The path; it need not exist yet.

    Examples:
        >>> default_cache_dir().name
        'tuxpaint'
    """
    return cache_root() / "tuxpaint"


def _has_stamps(folder: Path) -> bool:
    return folder.is_dir() and any(folder.rglob("*.txt"))


def tuxpaint_stamps_dir(*, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the folder of Tux Paint stamps set up on this machine.

    Looks at the installed copy (`/usr/share/tuxpaint/stamps`, from `apt-get install`), then at
    the copy `scripts/setup_data.sh` unpacks under `cache_dir` (`stamps/`, complete once its
    `.advlab-complete` marker is written). advlab never downloads or unpacks anything itself.

    Args:
        cache_dir: Folder holding `stamps/`; None means
            [`default_cache_dir`][advlab.data.tuxpaint.default_cache_dir].

    Returns:
        The folder holding the category sub-folders (`animals/`, `food/`, ...).

    Raises:
        FileNotFoundError: Neither copy is there; the message names both places and the
            commands that set the stamps up.

    Examples:
        >>> import tempfile
        >>> try:  # an installed copy, or a clear error
        ...     folder = tuxpaint_stamps_dir(cache_dir=tempfile.mkdtemp())
        ... except FileNotFoundError as err:
        ...     folder, message = None, str(err)
        >>> folder.is_dir() if folder is not None else "scripts/setup_data.sh" in message
        True
    """
    if _has_stamps(SYSTEM_STAMPS_DIR):
        return SYSTEM_STAMPS_DIR
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    stamps = cache / "stamps"
    if (stamps / _DONE_MARKER).is_file():
        return stamps
    half = " (it exists but was not completed: run the script again)" if stamps.exists() else ""
    if cache == default_cache_dir():
        script = "`scripts/setup_data.sh`"
    elif cache.name == "tuxpaint":  # the scripts unpack into $ADVLAB_CACHE/tuxpaint/stamps
        script = f"`ADVLAB_CACHE={cache.parent} scripts/setup_data.sh`"
    else:
        script = f"`scripts/setup_data.sh` (it unpacks into $ADVLAB_CACHE/tuxpaint/stamps, not under {cache})"
    raise FileNotFoundError(
        f"Could not find the Tux Paint stamps (Debian package `{PACKAGE}`): no installed copy at "
        f"{SYSTEM_STAMPS_DIR}, and no unpacked copy at {stamps}{half}. Set them up one of these ways:\n"
        f"  - run {script} from the advlab repository (or only its Tux Paint step, `scripts/fetch_tuxpaint.sh`): "
        f"it fetches the package with `apt-get download` (no root; apt's package lists must exist) and unpacks "
        f"the images and captions\n"
        f"  - or install it: `sudo apt-get install -y --no-install-recommends {PACKAGE}`\n"
        f"  - or pass any folder of images with a `.txt` caption beside each to ImageCaptionFolder."
    )
