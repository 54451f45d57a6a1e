"""The docs site stays honest: every public name has an API page, and the guide's code runs.

Independent of mkdocs (the strict build is a separate CI step): the API check reads the
`::: advlab.<module>` lines of `docs/api/*.md`; the code check executes the ```python blocks
of the guide pages in order, one namespace per page.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

import advlab

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GUIDE_PAGES = ["quickstart.md", "concepts.md", "recipes.md", "choosing_sizes.md"]


def api_pages() -> dict[str, str]:
    """Module rendered by a `::: advlab.<module>` directive -> the text of its API page."""
    found = {}
    for page in (DOCS / "api").glob("*.md"):
        text = page.read_text(encoding="utf-8")
        for module in re.findall(r"^:::\s+(advlab(?:\.[\w.]+)?)\s*$", text, re.MULTILINE):
            found[module] = text
    return found


def home_module(name: str, obj: object, modules: set[str]) -> str | None:
    home = getattr(obj, "__module__", None)
    if isinstance(home, str) and home.startswith("advlab"):
        return home
    # typing aliases (Literal[...]) and plain constants: the module whose __all__ exports them
    return next((m for m in sorted(modules) if name in getattr(importlib.import_module(m), "__all__", ())), None)


def test_every_public_name_has_an_api_page():
    """Each name in `advlab.__all__` is exported by a module with a `:::` page; griffe renders
    members without a docstring (type aliases, constants) only with `show_if_no_docstring`."""
    pages = api_pages()
    problems = []
    for name in advlab.__all__:
        obj = getattr(advlab, name)
        home = home_module(name, obj, set(pages))
        if home not in pages or name not in getattr(importlib.import_module(home), "__all__", ()):
            problems.append(f"{name}: defined in {home}, which has no API page or does not list it in __all__")
            continue
        has_doc = (inspect.isclass(obj) or inspect.isfunction(obj)) and bool(inspect.getdoc(obj))
        if not has_doc and "show_if_no_docstring: true" not in pages[home]:
            problems.append(f"{name}: no docstring, and the page of {home} lacks `show_if_no_docstring: true`")
    assert not problems, "\n".join(problems)


# modules whose pages need an optional extra; the strict docs build checks those pages
OPTIONAL = ("advlab.backbones", "advlab.data", "advlab.pretrained", "advlab.experiments", "advlab.integrations")


def core_pages() -> dict[str, str]:
    return {module: text for module, text in api_pages().items() if not module.startswith(OPTIONAL)}


def test_every_name_a_module_exports_is_rendered_on_its_page():
    """Names that left the top level stay documented: each name in the `__all__` of a module with
    a `:::` page is defined there and has a docstring, or the page shows undocumented members."""
    problems = []
    for module, text in core_pages().items():
        mod = importlib.import_module(module)
        for name in getattr(mod, "__all__", ()):
            if not hasattr(mod, name):
                problems.append(f"{module}.{name}: listed in __all__ but not defined")
                continue
            obj = getattr(mod, name)
            has_doc = (inspect.isclass(obj) or inspect.isfunction(obj)) and bool(inspect.getdoc(obj))
            if not has_doc and "show_if_no_docstring: true" not in text:
                problems.append(f"{module}.{name}: no docstring, and its page lacks `show_if_no_docstring: true`")
    assert not problems, "\n".join(problems)


def test_api_index_lists_every_public_name():
    """The index lists the top level and every name the core modules export."""
    listed = set(re.findall(r"`(\w+)`", (DOCS / "api" / "index.md").read_text(encoding="utf-8")))
    missing = [name for name in advlab.__all__ if name not in listed]
    assert not missing, f"docs/api/index.md does not list {missing}"
    for module in core_pages():
        missing = [name for name in getattr(importlib.import_module(module), "__all__", ()) if name not in listed]
        assert not missing, f"docs/api/index.md does not list {missing} (exported by {module})"


def test_every_api_directive_names_an_importable_module():
    for module in api_pages():
        if module.startswith(("advlab.backbones", "advlab.data", "advlab.pretrained")):
            continue  # optional dependencies; their pages are checked by the strict docs build
        importlib.import_module(module)


def python_blocks(page: str) -> list[str]:
    text = (DOCS / page).read_text(encoding="utf-8")
    return re.findall(r"^```python\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


@pytest.mark.parametrize("page", GUIDE_PAGES)
def test_guide_code_runs(page, capsys):
    assert (DOCS / page).is_file(), f"docs/{page} is missing: the guide page and its code examples must exist"
    assert python_blocks(page), f"docs/{page} has no ```python block: its examples would go unchecked"
    namespace: dict[str, object] = {"__name__": f"docs_{page[:-3]}"}
    for i, block in enumerate(python_blocks(page)):
        try:
            exec(compile(block, f"docs/{page}[block {i}]", "exec"), namespace)  # noqa: S102 - our own docs
        except Exception as err:  # pragma: no cover - the message is the point
            raise AssertionError(f"docs/{page}, python block {i} failed: {err!r}\n{block}") from err


def test_every_page_in_the_site_navigation_exists():
    """A page listed in mkdocs.yml's nav but deleted or renamed fails here, not only in the strict build."""
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8").split("\nnav:", 1)[1]
    nav = re.split(r"^\S", nav, maxsplit=1, flags=re.MULTILINE)[0]  # up to the next top-level key
    pages = re.findall(r"^\s*-\s*(?:[^:\n]+:\s*)?([\w./-]+\.md)\s*$", nav, re.MULTILINE)
    assert set(GUIDE_PAGES) <= set(pages)
    missing = [page for page in pages if not (DOCS / page).is_file()]
    assert not missing, f"pages in mkdocs.yml's nav without a file under docs/: {missing}"
