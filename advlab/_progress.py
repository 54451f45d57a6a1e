"""The progress bar of the library's long loops: tqdm, switched off with `disable=`.

tqdm is not a core dependency (it comes with the `data` extra), so it is imported here, on
first use. A bar that was asked for without tqdm installed is refused with the pip command;
a bar that was not asked for is a no-op, so `progress=False` needs no tqdm.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

__all__ = ["progress_bar"]


def progress_bar(*, total: int | None, enabled: bool, desc: str, caller: str, unit: str = "it") -> Any:
    """A tqdm bar with `update`, `set_postfix` and `close`, silent when `enabled` is False.

    Args:
        total: Expected number of updates; None if unknown.
        enabled: Show the bar (`disable=not enabled`).
        desc: Label in front of the bar.
        caller: The public function that asked, named in the error when tqdm is missing.
        unit: Unit of `total`.

    Raises:
        ModuleNotFoundError: `enabled` is True and tqdm is not installed.

    Examples:
        >>> bar = progress_bar(total=3, enabled=False, desc="train", caller="train_run")
        >>> bar.update(1); bar.set_postfix(loss="0.5"); bar.close()
    """
    try:
        from tqdm.auto import tqdm
    except ModuleNotFoundError:
        if enabled:
            raise ModuleNotFoundError(
                f"{caller}(progress=True) shows a tqdm progress bar, but tqdm is not installed: "
                "pip install tqdm (it comes with advlab's `data` extra), or pass progress=False."
            ) from None
        return SimpleNamespace(update=lambda n=1: None, set_postfix=lambda **kwargs: None, close=lambda: None)
    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, disable=not enabled)
