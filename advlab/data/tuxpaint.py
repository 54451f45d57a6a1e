"""Locate the Tux Paint stamps: real images with human-written English captions, offline.

Debian's `tuxpaint-stamps-default` package holds about 950 photos and clip-art images
(`NAME.png` or `NAME.svg`), each with a caption on the first line of `NAME.txt` beside it
("A brown potato.", "A rhea."). The folder is the category (animals, food, symbols, ...).
[`tuxpaint_stamps_dir`][advlab.data.tuxpaint.tuxpaint_stamps_dir] finds an installed copy or
fetches and unpacks the package into a cache folder; read the result with
[`ImageCaptionFolder`][advlab.data.captions.ImageCaptionFolder].

Licence: the stamps are GPL-2 (the package's `copyright` file is unpacked beside them). advlab
builds everything from the package at run time and never commits the images or features
derived from them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

__all__ = ["PACKAGE", "SYSTEM_STAMPS_DIR", "default_cache_dir", "tuxpaint_stamps_dir"]

PACKAGE = "tuxpaint-stamps-default"
SYSTEM_STAMPS_DIR = Path("/usr/share/tuxpaint/stamps")  # where `apt-get install` puts the stamps

_STAMPS_IN_DEB = "usr/share/tuxpaint/stamps/"
_COPYRIGHT_IN_DEB = f"usr/share/doc/{PACKAGE}/copyright"
_KEPT_SUFFIXES = (".png", ".svg", ".txt")  # the .deb is 161 MB, mostly spoken captions (.ogg) we do not need
_DONE_MARKER = ".advlab-complete"


def default_cache_dir() -> Path:
    """The folder advlab unpacks the stamps into: `$ADVLAB_CACHE/tuxpaint`.

    `ADVLAB_CACHE` defaults to `$XDG_CACHE_HOME/advlab`, that is `~/.cache/advlab`.

    Returns:
        The path; it need not exist yet.

    Examples:
        >>> default_cache_dir().name
        'tuxpaint'
    """
    return _cache_root() / "tuxpaint"


def _cache_root() -> Path:
    """`$ADVLAB_CACHE`, else `$XDG_CACHE_HOME/advlab`, else `~/.cache/advlab` (also CRAFT's feature cache)."""
    root = os.environ.get("ADVLAB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "advlab"
    )
    return Path(root)


def _has_stamps(folder: Path) -> bool:
    return folder.is_dir() and any(folder.rglob("*.txt"))


def tuxpaint_stamps_dir(
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    keep_deb: bool = False,
) -> Path:
    """Return a folder of Tux Paint stamps, fetching the Debian package if needed.

    Looks, in order, at the installed copy (`/usr/share/tuxpaint/stamps`), at a copy unpacked
    earlier under `cache_dir`, at a `.deb` already in `cache_dir`, and (if `download`) runs `apt-get download tuxpaint-stamps-default`
    in `cache_dir` and unpacks the images, captions and `copyright` file of the package there
    (`dpkg-deb --fsys-tarfile`, keeping only `.png`, `.svg` and `.txt`: about 32 MB of the
    161 MB). Needs apt's package lists, not root. Calling it again reuses the unpacked copy.

    Args:
        cache_dir: Folder for the download and the unpacked stamps; None means
            [`default_cache_dir`][advlab.data.tuxpaint.default_cache_dir].
        download: If False, never run `apt-get`; only use existing copies (or a `.deb` already in `cache_dir`).
        keep_deb: Keep the downloaded `.deb` after unpacking it (it is deleted by default).

    Returns:
        The folder holding the category sub-folders (`animals/`, `food/`, ...).

    Raises:
        FileNotFoundError: No copy was found and none could be fetched; the message says
            what was tried and how to fix it.

    Examples:
        >>> import tempfile
        >>> try:  # offline and quick: an installed copy, or a clear error
        ...     folder = tuxpaint_stamps_dir(cache_dir=tempfile.mkdtemp(), download=False)
        ... except FileNotFoundError as err:
        ...     folder, message = None, str(err)
        >>> folder.is_dir() if folder is not None else "apt-get install" in message
        True
    """
    if _has_stamps(SYSTEM_STAMPS_DIR):
        return SYSTEM_STAMPS_DIR
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    stamps = cache / "stamps"
    if (stamps / _DONE_MARKER).is_file():
        return stamps
    tried = [f"no installed copy at {SYSTEM_STAMPS_DIR}", f"no unpacked copy at {stamps}"]
    if not download and not any(cache.glob(f"{PACKAGE}_*.deb")):
        tried.append(f"no downloaded {PACKAGE}_*.deb in {cache}, and downloading was disabled (download=False)")
        raise FileNotFoundError(_not_found_message(tried, cache))
    try:
        deb = _download_deb(cache)
        _unpack_deb(deb, stamps)
    except _FetchError as err:
        raise FileNotFoundError(_not_found_message(tried + [str(err)], cache)) from None
    if not keep_deb:
        deb.unlink(missing_ok=True)
    return stamps


class _FetchError(Exception):
    pass


def _not_found_message(tried: list[str], cache: Path) -> str:
    lines = "\n".join(f"  - {t}" for t in tried)
    return (
        f"Could not find the Tux Paint stamps (Debian package `{PACKAGE}`). Tried:\n{lines}\n"
        f"Fix one of these ways:\n"
        f"  - install it: `sudo apt-get install -y --no-install-recommends {PACKAGE}`\n"
        f"  - or fetch it without root: `sudo apt-get update` once, then rerun (advlab runs "
        f"`apt-get download {PACKAGE}` in {cache})\n"
        f"  - or run `scripts/setup_data.sh`\n"
        f"  - or pass any folder of images with a `.txt` caption beside each to ImageCaptionFolder."
    )


def _download_deb(cache: Path) -> Path:
    existing = sorted(cache.glob(f"{PACKAGE}_*.deb"))
    if existing:
        return existing[-1]
    if shutil.which("apt-get") is None:
        raise _FetchError("`apt-get` is not on PATH (not a Debian-based system?)")
    cache.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(
            ["apt-get", "download", PACKAGE], cwd=cache, capture_output=True, text=True, timeout=1800, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise _FetchError(f"`apt-get download {PACKAGE}` failed to run: {err}") from None
    found = sorted(cache.glob(f"{PACKAGE}_*.deb"))
    if proc.returncode != 0 or not found:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise _FetchError(
            f"`apt-get download {PACKAGE}` exited with {proc.returncode}: {detail[-1] if detail else 'no output'}"
        )
    return found[-1]


def _unpack_deb(deb: Path, stamps: Path) -> None:
    if shutil.which("dpkg-deb") is None:
        raise _FetchError("`dpkg-deb` is not on PATH, so the downloaded package cannot be unpacked")
    stamps.parent.mkdir(parents=True, exist_ok=True)
    # unpack into a temporary sibling and rename at the end, so an interrupted run leaves no half copy
    tmp = Path(tempfile.mkdtemp(prefix=".stamps-", dir=stamps.parent))
    proc: subprocess.Popen[bytes] | None = None
    try:
        proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        if proc.stdout is None:  # never with stdout=PIPE; narrows the type
            raise _FetchError("`dpkg-deb` gave no output pipe")
        with tarfile.open(fileobj=proc.stdout, mode="r|*") as archive:
            for member in archive:
                name = member.name.removeprefix("./")
                if not member.isfile():
                    continue
                if name.startswith(_STAMPS_IN_DEB) and name.endswith(_KEPT_SUFFIXES):
                    target = tmp / name[len(_STAMPS_IN_DEB) :]
                elif name == _COPYRIGHT_IN_DEB:
                    target = tmp / "copyright"
                else:
                    continue
                source = archive.extractfile(member)
                if source is None or ".." in Path(name).parts:
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "wb") as out:
                    shutil.copyfileobj(source, out)
                os.utime(target, (member.mtime, member.mtime))  # keep the package's dates: stable cache keys
        if proc.wait() != 0:
            raise _FetchError(f"`dpkg-deb --fsys-tarfile {deb}` exited with {proc.returncode}")
        if not _has_stamps(tmp):
            raise _FetchError(f"{deb} holds no stamps under /{_STAMPS_IN_DEB}")
        (tmp / _DONE_MARKER).write_text(f"unpacked from {deb.name}\n")
        tmp.chmod(0o755)  # mkdtemp made it private
        if stamps.exists():
            shutil.rmtree(stamps)
        tmp.rename(stamps)
    except (tarfile.TarError, OSError) as err:
        raise _FetchError(f"unpacking {deb} failed: {err}") from None
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
