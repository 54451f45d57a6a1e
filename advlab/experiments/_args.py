"""Argparse value types shared by the experiments' command lines (argparse names the option in its error)."""

from __future__ import annotations

import argparse
import math


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
