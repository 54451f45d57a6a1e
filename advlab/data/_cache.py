"""The cache folder of the data set-up and feature caches, and path-argument checking.

One home for the `$ADVLAB_CACHE` rule used by the Tux Paint, openclipart and WordNet locators
and by the region-feature caches of `advlab.pretrained`.
"""

from __future__ import annotations

import os
from pathlib import Path

from advlab._errors import AdvlabTypeError

__all__ = ["as_path", "cache_root"]


def cache_root() -> Path:
    """`$ADVLAB_CACHE`, else `$XDG_CACHE_HOME/advlab`, else `~/.cache/advlab`.

    Returns:
        The folder; it need not exist yet.

    Examples:
        >>> isinstance(cache_root(), Path)
        True
    """
    root = os.environ.get("ADVLAB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "advlab"
    )
    return Path(root)


def as_path(name: str, value: object) -> Path:
    """`value` as a `Path`, or a clear error naming the argument `name`.

    Args:
        name: The argument's name, for the message.
        value: A str or os.PathLike.

    Returns:
        The path.

    Raises:
        AdvlabTypeError: `value` is not a str or os.PathLike.

    Examples:
        >>> as_path("root", "/tmp")
        PosixPath('/tmp')
    """
    if not isinstance(value, (str, os.PathLike)):
        raise AdvlabTypeError(f"Expected `{name}` to be a path (str or os.PathLike), but got {type(value).__name__}.")
    return Path(value)
