"""How well AtP's (or AtP*'s) estimates matched exact patching, on the rows `--verify-top` checked.

Per component: Pearson and Spearman correlation of exact `score` against `estimate` over the
verified rows (each pair's top K estimates and K rows drawn at random), with a scatter plot.
Per run: the share of each pair's K largest exact effects (among its verified rows) that the
method also ranked in its top K (by |estimate|, AtP*: by GradDrop's size, the method's
`ranks_by`), averaged over pairs: since the verified rows are its top K and K random others,
this is high unless the random draws find big effects it missed. Pairs under the min-gap rule
are left out, as in the aggregate.
"""

from __future__ import annotations

from dataclasses import dataclass

import plotly.graph_objects as go

from worker.contract.options import COMPONENTS

VERIFIED = """
CREATE OR REPLACE TEMP TABLE verified AS
SELECT e.pair_id, e.component, e.score, e.estimate, abs(e.{ranks_by}) AS size
FROM effects e JOIN pairs p USING (pair_id)
WHERE e.score IS NOT NULL AND e.estimate IS NOT NULL
  AND isfinite(e.score) AND abs("clean_{metric}" - "corrupted_{metric}") >= {min_gap}
"""

CORRELATIONS = """
WITH ranked AS (
    SELECT *,   -- average ranks, so that tied values (cells before the first difference) share one
           rank() OVER (PARTITION BY component ORDER BY score)
               + (count(*) OVER (PARTITION BY component, score) - 1) / 2 AS score_rank,
           rank() OVER (PARTITION BY component ORDER BY estimate)
               + (count(*) OVER (PARTITION BY component, estimate) - 1) / 2 AS estimate_rank
    FROM verified
)
SELECT component, count(*) AS n, corr(score, estimate) AS pearson, corr(score_rank, estimate_rank) AS spearman
FROM ranked GROUP BY component
"""

TOP_K_AGREEMENT = """
WITH ranked AS (
    SELECT pair_id,
           row_number() OVER (PARTITION BY pair_id ORDER BY abs(score) DESC, component, estimate) AS exact_rank,
           row_number() OVER (PARTITION BY pair_id ORDER BY size DESC, component, score) AS method_rank
    FROM verified
)
SELECT avg(share), count(*) FROM (
    SELECT pair_id, count(*) FILTER (WHERE exact_rank <= {k} AND method_rank <= {k}) / {k} AS share
    FROM ranked GROUP BY pair_id
)
"""


@dataclass(frozen=True)
class Agreement:
    component: str
    n: int
    pearson: float | None
    spearman: float | None


def collect_verified(connection, metric: str, min_gap: float, ranks_by: str) -> None:
    """Read the verified rows of the pairs the min-gap rule keeps, once, into the temporary table
    `verified` that the functions below query (`ranks_by`: the column whose size the method ranks by)."""
    connection.execute(VERIFIED.format(metric=metric, min_gap=float(min_gap), ranks_by=ranks_by))


def correlations(connection) -> list[Agreement]:
    """One per component, in the order resid, attn, mlp, head."""
    rows = connection.sql(CORRELATIONS).fetchall()
    return sorted((Agreement(*row) for row in rows), key=lambda a: COMPONENTS.index(a.component))


def top_k_agreement(connection, k: int) -> tuple[float | None, int]:
    """The mean share, and over how many pairs."""
    share, pairs = connection.sql(TOP_K_AGREEMENT.format(k=int(k))).fetchall()[0]
    return share, pairs


def scatter_figures(connection, run: str, agreements: list[Agreement], estimated: str) -> list[tuple[str, go.Figure]]:
    """Exact score against the estimate (`estimated` names it), one scatter per component, with both correlations."""
    figures = []
    for agreement in agreements:
        points = connection.execute(
            "SELECT estimate, score FROM verified WHERE component = ?", [agreement.component]
        ).fetchall()
        figure = go.Figure(
            go.Scatter(
                x=[x for x, _ in points], y=[y for _, y in points], mode="markers", marker={"size": 5, "opacity": 0.6}
            )
        )
        title = (
            f"{run}: {agreement.component}, exact score vs {estimated} on {agreement.n} verified cells: "
            f"Pearson {fmt(agreement.pearson)}, Spearman {fmt(agreement.spearman)}"
        )
        figure.update_layout(
            title=title,
            xaxis_title=estimated,
            yaxis_title="exact score",
            height=420,
            margin={"l": 60, "r": 20, "t": 60, "b": 60},
        )
        figures.append((f"verify-{agreement.component}", figure))
    return figures


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
