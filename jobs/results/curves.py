"""A circuit run's faithfulness curves and MIB's two areas under them (torch- and plotly-free).

A curve is the circuits one selection picked at each edge budget (`worker/graph/circuits.py::CURVES`):
`top` or `greedy` make one, `mib` two (`mib-signed`, `mib-absolute`), as MIB runs its evaluation
twice. Over a curve's circuits in budget order, with x the budget's fraction of all edges and f
the circuit's dataset-level faithfulness, by the trapezoid rule on a linear x from the smallest
budget to the largest, with no point at 0 (MIB's `evaluate_area_under_curve`):
- CPR, the area under f: higher is better (MIB reads it from the signed curve);
- CMD, the area under |1 - f|, each point's |1 - f| (not the exact area where f crosses 1):
  lower is better (MIB reads it from the absolute curve).
With MIB's ten budgets a perfect curve has CPR 0.999, the width from 0.1% to 100%.
"""

from __future__ import annotations

from itertools import pairwise

import pyarrow as pa

SELECTED = "selected"  # the curve of a run written before circuits named theirs


def curve_of(entry: dict) -> str:
    """Which curve a manifest's circuit entry is a point of: its selection's, or `given` (a file's)."""
    return entry.get("curve") or (SELECTED if entry["budget"] else "given")


def mib_areas(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """(CPR, CMD) of (fraction, faithfulness) points, or None with fewer than two."""
    points = sorted(points)
    if len(points) < 2:
        return None
    steps = list(pairwise(points))
    under = sum((x2 - x1) * (f1 + f2) / 2 for (x1, f1), (x2, f2) in steps)
    from_one = sum((x2 - x1) * (abs(1 - f1) + abs(1 - f2)) / 2 for (x1, f1), (x2, f2) in steps)
    return under, from_one


def curve_entries(entries: list[dict]) -> dict[str, list[dict]]:
    """The manifest's selected circuits (those with a budget) per curve, in budget order."""
    curves: dict[str, list[dict]] = {}
    for entry in sorted((e for e in entries if e["budget"]), key=lambda e: e["fraction"]):
        curves.setdefault(curve_of(entry), []).append(entry)
    return curves


def curves_table(rows: list[dict], entries: list[dict]) -> pa.Table:
    """One row per curve: `curve`, `cpr`, `cmd` (null below two points) and the dataset-level
    faithfulness at each budget, a column named by the budget (`0.1%`, ..., or an edge count)."""
    overall = {row["circuit"]: row["faithfulness"] for row in rows if row["group"] is None}
    curves = curve_entries(entries)
    budgets = list(dict.fromkeys(e["budget"] for found in curves.values() for e in found))
    columns: dict[str, list] = {"curve": [], "cpr": [], "cmd": []} | {budget: [] for budget in budgets}
    for curve, found in curves.items():
        at = {e["budget"]: overall.get(e["name"]) for e in found}
        areas = mib_areas([(e["fraction"], at[e["budget"]]) for e in found if at[e["budget"]] is not None])
        columns["curve"].append(curve)
        columns["cpr"].append(areas[0] if areas else None)
        columns["cmd"].append(areas[1] if areas else None)
        for budget in budgets:
            columns[budget].append(at.get(budget))
    schema = pa.schema(
        [("curve", pa.string()), ("cpr", pa.float64()), ("cmd", pa.float64())] + [(b, pa.float64()) for b in budgets]
    )
    return pa.table(columns, schema=schema)
