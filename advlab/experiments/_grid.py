"""Summaries shared by the experiments' tuning and reports: mean ± sample std, and growing a size grid past its edge."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from advlab._errors import AdvlabValueError


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value, NaN mean for none).

    Examples:
        >>> mean_std([1.0, 2.0, 3.0])
        (2.0, 1.0)
        >>> mean_std([0.5])
        (0.5, 0.0)
    """
    mean = statistics.fmean(values) if values else float("nan")
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def next_size(size: float, ordered: Sequence[float], *, down: bool) -> float:
    """The size one step past a grid's edge: the next 1-3-10 value, or the edge's own ratio.

    A size whose mantissa is 1 or 3 steps to the next value of the 1-3-10 sequence; any other
    grid is extended by the ratio of its two outermost sizes on that side. Three significant
    digits are kept.

    Args:
        size: The edge size (`ordered[0]` going down, `ordered[-1]` going up).
        ordered: The grid, ascending, at least two sizes when the mantissa is not 1 or 3.
        down: Extend below the grid (else above).

    Returns:
        The new size.

    Examples:
        >>> next_size(1e-4, [1e-4, 3e-4], down=True), next_size(3e-5, [3e-5, 1e-4], down=True)
        (3e-05, 1e-05)
        >>> next_size(0.1, [0.03, 0.1], down=False), next_size(0.3, [0.1, 0.3], down=False)
        (0.3, 1.0)
        >>> next_size(0.017, [0.00017, 0.0017, 0.017], down=False)
        0.17
    """
    mantissa = size / 10 ** math.floor(math.log10(size) + 1e-9)
    if math.isclose(mantissa, 1.0, rel_tol=1e-6) or math.isclose(mantissa, 3.0, rel_tol=1e-6):
        at_one = math.isclose(mantissa, 1.0, rel_tol=1e-6)
        factor = 10 / 3 if at_one == down else 3.0
    else:
        a, b = (ordered[0], ordered[1]) if down else (ordered[-2], ordered[-1])
        factor = b / a
    return float(f"{size / factor:.3g}") if down else float(f"{size * factor:.3g}")


def extension_side(sizes: Sequence[float], means: Sequence[float]) -> str | None:
    """Which edge of a tuning grid to grow past: `"up"`, `"down"` or None (the optimum is inside).

    Upward when the largest size is among the best (alone or tied: a plateau that reaches the
    top may rise further); downward only when the smallest size is best alone. A plateau that
    reaches the bottom is not grown downward: as the size goes to 0 every method tends to its
    size-0 limit, which the plateau already shows.

    Args:
        sizes: The grid, ascending.
        means: The mean score at each size (higher is better).

    Returns:
        The side, or None.

    Examples:
        >>> extension_side([1, 2, 3], [0.5, 0.7, 0.6]), extension_side([1, 2, 3], [0.5, 0.6, 0.7])
        (None, 'up')
        >>> extension_side([1, 2, 3], [0.7, 0.6, 0.5]), extension_side([1, 2, 3], [0.7, 0.7, 0.5])
        ('down', None)
        >>> extension_side([1, 2, 3], [0.7, 0.7, 0.7])
        'up'
    """
    if len(sizes) != len(means):
        raise AdvlabValueError(f"Expected one mean per size, but got {len(means)} means for {len(sizes)} sizes.")
    if len(sizes) < 2:
        return None
    top = max(means)
    best = [s for s, m in zip(sizes, means) if m == top]
    if sizes[-1] in best:
        return "up"
    if best == [sizes[0]]:
        return "down"
    return None
