"""Argparse value types shared by the experiments' command lines (argparse names the option in its error)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping

from advlab._errors import AdvlabTypeError, AdvlabValueError


def count(text: str) -> int:
    """Argparse type: an integer >= 1.

    Examples:
        >>> count("3")
        3
        >>> count("0")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: expected an integer >= 1, got 0
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def positive_size(text: str) -> float:
    """Argparse type: a finite float > 0.

    Examples:
        >>> positive_size("1e-3")
        0.001
        >>> positive_size("nan")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: expected a finite number > 0, got nan
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def check_fields(config: object, counts: Mapping[str, int], reals: Mapping[str, bool]) -> None:
    """Check an experiment config's integer and float fields (its `__post_init__` calls this).

    Args:
        config: The config (a dataclass instance).
        counts: Integer field -> its minimum.
        reals: Float field -> True where 0 is not allowed (negative and non-finite values never are).

    Raises:
        AdvlabValueError: A count below its minimum, or a float that is negative, zero where it
            must be positive, or not finite.
        AdvlabTypeError: A float field holding something else than a number.

    Examples:
        >>> from types import SimpleNamespace
        >>> check_fields(SimpleNamespace(epochs=0, lr=1e-3), {"epochs": 1}, {"lr": True})
        Traceback (most recent call last):
        ...
        advlab._errors.AdvlabValueError: Expected `epochs` to be an int >= 1, but got 0.
    """
    for name, low in counts.items():
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise AdvlabValueError(f"Expected `{name}` to be an int >= {low}, but got {value!r}.")
    for name, positive in reals.items():
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise AdvlabTypeError(f"Expected `{name}` to be a float, but got {value!r}.")
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise AdvlabValueError(
                f"Expected `{name}` to be a finite float {'> 0' if positive else '>= 0'}, but got {value!r}."
            )
