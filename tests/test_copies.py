"""`# Copied from` markers in the backbones: the marked class must equal its source after the stated renames.

As in the Hugging Face modeling files, a block shared by two one-file models is copied, not imported, and marked;
this test keeps the copies from drifting apart.
"""

import importlib
import inspect
import re
from pathlib import Path

import pytest

import advlab.backbones

BACKBONES = sorted(Path(advlab.backbones.__file__).parent.glob("[!_]*.py"))
MARKER = re.compile(r"^# Copied from (advlab\.backbones\.\w+)\.(\w+)(?: with (.+))?\n(?:class|def) (\w+)", re.MULTILINE)


def markers():
    found = []
    for path in BACKBONES:
        for m in MARKER.finditer(path.read_text()):
            found.append((f"advlab.backbones.{path.stem}", *m.groups()))
    return found


def test_there_are_marked_copies():
    assert len(markers()) >= 2


@pytest.mark.parametrize("module, source_module, source_name, renames, name", markers())
def test_copy_matches_its_source(module, source_module, source_name, renames, name):
    source = inspect.getsource(getattr(importlib.import_module(source_module), source_name))
    for pair in (renames or "").split(","):
        if pair.strip():
            old, new = (part.strip() for part in pair.split("->"))
            source = source.replace(old, new)
    source = source.replace(f"class {source_name}", f"class {name}", 1).replace(f"def {source_name}", f"def {name}", 1)
    copy = inspect.getsource(getattr(importlib.import_module(module), name))
    assert copy == source, f"{module}.{name} drifted from {source_module}.{source_name}: re-copy it or drop the marker"
