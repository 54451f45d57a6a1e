#!/usr/bin/env bash
# Fetch the Tux Paint stamps for advlab.data.tuxpaint (step 3 of scripts/setup_data.sh).
#
# Debian's tuxpaint-stamps-default (GPL-2) holds about 950 images, each with an English caption
# beside it. An installed copy (/usr/share/tuxpaint/stamps, from `apt-get install`) is used as
# is. Otherwise the package is fetched with `apt-get download` (no root, but apt's package lists
# must exist: `sudo apt-get update` once) into ${ADVLAB_CACHE:-~/.cache/advlab}/tuxpaint, and only
# its .png, .svg and .txt stamp files and its copyright file are unpacked, into .../tuxpaint/stamps
# (about 32 MB of the 161 MB package, which is mostly spoken captions). The files keep the
# package's dates, so feature caches keyed by them stay valid. A completion marker is written
# last; the .deb is deleted afterwards unless KEEP_DEB=1. Run it again at any time: a finished
# copy is kept.
#
# Usage: scripts/fetch_tuxpaint.sh
# Environment: ADVLAB_CACHE (else XDG_CACHE_HOME/advlab, else ~/.cache/advlab); KEEP_DEB=1;
#   TUXPAINT_SYSTEM_STAMPS (default /usr/share/tuxpaint/stamps: where apt-get install puts them).
set -euo pipefail

PACKAGE=tuxpaint-stamps-default
SYSTEM="${TUXPAINT_SYSTEM_STAMPS:-/usr/share/tuxpaint/stamps}"
CACHE="${ADVLAB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/advlab}/tuxpaint"
STAMPS="$CACHE/stamps"
MARKER=.advlab-complete  # advlab.data.tuxpaint trusts a cached copy only with this file
IN_DEB=./usr/share/tuxpaint/stamps/
COPYRIGHT_IN_DEB="./usr/share/doc/$PACKAGE/copyright"

fail() { echo "  $*" >&2; exit 1; }

if [[ -n "$(find "$SYSTEM" -name '*.txt' -print -quit 2>/dev/null)" ]]; then
    echo "  installed copy: $SYSTEM"; exit 0
fi
if [[ -f "$STAMPS/$MARKER" ]]; then
    echo "  already unpacked: $STAMPS"; exit 0
fi
for tool in dpkg-deb tar; do
    command -v "$tool" >/dev/null || fail "\`$tool\` is not on PATH (a Debian-based system is needed), or install the stamps: sudo apt-get install -y --no-install-recommends $PACKAGE"
done

mkdir -p "$CACHE"
find_deb() { find "$CACHE" -maxdepth 1 -name "${PACKAGE}_*.deb" | sort | tail -n 1; }
deb="$(find_deb)"
if [[ -z "$deb" ]]; then
    command -v apt-get >/dev/null || fail "\`apt-get\` is not on PATH (not a Debian-based system?)"
    echo "  apt-get download $PACKAGE (161 MB) into $CACHE"
    (cd "$CACHE" && apt-get download "$PACKAGE") \
        || fail "\`apt-get download $PACKAGE\` failed: run \`sudo apt-get update\` once (apt's package lists), or install it: sudo apt-get install -y --no-install-recommends $PACKAGE"
    deb="$(find_deb)"
    [[ -n "$deb" ]] || fail "\`apt-get download $PACKAGE\` left no ${PACKAGE}_*.deb in $CACHE"
fi

# unpack into a temporary sibling and move it in place at the end: an interrupted run leaves no half copy
tmp="$(mktemp -d "$CACHE/.stamps-XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
# the regular files to keep (tar -tv lines start with the type: '-' is a regular file)
# names are listed escaped (\303\251 for é in the C locale) and unescaped again by -T (--unquote)
dpkg-deb --fsys-tarfile "$deb" | tar -tv --quoting-style=escape \
    | awk -v dir="$IN_DEB" -v cr="$COPYRIGHT_IN_DEB" '
        /^-/ { name = substr($0, index($0, " ./") + 1)
               if ((index(name, dir) == 1 && name ~ /\.(png|svg|txt)$/) || name == cr) print name }' \
    > "$tmp/.members"
[[ -s "$tmp/.members" ]] || fail "$deb holds no stamps under ${IN_DEB#.}"
dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tmp" --no-same-owner --unquote -T "$tmp/.members"  # every line starts with ./
src="$tmp/${IN_DEB#./}"
[[ -n "$(find "$src" -name '*.txt' -print -quit)" ]] || fail "$deb holds no stamp captions (.txt) under ${IN_DEB#.}"
if [[ -f "$tmp/${COPYRIGHT_IN_DEB#./}" ]]; then mv "$tmp/${COPYRIGHT_IN_DEB#./}" "$src/copyright"; fi
echo "unpacked from $(basename "$deb")" > "$src/$MARKER"
chmod 755 "$src"
rm -rf "$STAMPS"
mv "$src" "$STAMPS"
if [[ "${KEEP_DEB:-0}" != 1 ]]; then rm -f "$deb"; fi
echo "  unpacked: $STAMPS ($(find "$STAMPS" -name '*.png' | wc -l) PNG files)"
