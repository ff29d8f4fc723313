"""95% intervals of a mean over pairs: Student t, mean +- t(0.975, n - 1) * std / sqrt(n).

The t quantile comes from the t distribution's CDF, written with the regularized incomplete beta
function (its continued fraction, evaluated by Lentz's method), and inverted by bisection: no
SciPy in the driver for one number per row.
"""

from __future__ import annotations

import math
from functools import cache

import pyarrow as pa
import pyarrow.compute as pc

LEVEL = 0.95
METHOD = "Student t over the pairs: mean +- t(0.975, count - 1) * std / sqrt(count)"


def _continued_fraction(a: float, b: float, x: float) -> float:
    tiny = 1e-300

    def bounded(value: float) -> float:
        return value if abs(value) > tiny else tiny

    c, d = 1.0, 1 / bounded(1 - (a + b) * x / (a + 1))
    result = d
    for m in range(1, 1000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1 / bounded(1 + numerator * d)
            c = bounded(1 + numerator / c)
            result *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return result


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _continued_fraction(a, b, x) / a
    return 1 - front * _continued_fraction(b, a, 1 - x) / b


def t_cdf(t: float, df: float) -> float:
    tail = 0.5 * incomplete_beta(df / 2, 0.5, df / (df + t * t))
    return 1 - tail if t >= 0 else tail


@cache
def t_quantile(p: float, df: float) -> float:
    """The t distribution's `p` quantile (p > 0.5), by bisection on its CDF (cached: an aggregate's
    rows share a few pair counts)."""
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, 2 * high
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
    return (low + high) / 2


def with_interval(table: pa.Table, mean: str, std: str, count: str, prefix: str = "") -> pa.Table:
    """`table` with `{prefix}ci_low` and `{prefix}ci_high` after `std`: the 95% interval of each row's mean
    (null where count < 2)."""
    half = [
        t_quantile(0.5 + LEVEL / 2, n - 1) * s / math.sqrt(n) if n is not None and n > 1 and s is not None else None
        for n, s in zip(table.column(count).to_pylist(), table.column(std).to_pylist())
    ]
    half = pa.array(half, pa.float64())
    at = table.schema.get_field_index(std) + 1
    table = table.add_column(at, pa.field(f"{prefix}ci_low", pa.float64()), pc.subtract(table.column(mean), half))
    table = table.add_column(at + 1, pa.field(f"{prefix}ci_high", pa.float64()), pc.add(table.column(mean), half))
    metadata = dict(table.schema.metadata or {})
    metadata[b"patchsweep.interval"] = METHOD.encode()
    return table.replace_schema_metadata(metadata)
