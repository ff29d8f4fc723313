"""The report's figures for an edge-attribution run: the top edges, and every edge's mean
estimate as a sender x receiver heatmap with nodes in the graph's (forward) order."""

from __future__ import annotations

import re

import plotly.graph_objects as go

from jobs.results.heatmaps import heatmap

TOP_EDGES = 20
AGREEMENT_SQL = """
WITH v AS (
    SELECT estimate::DOUBLE AS e, score::DOUBLE AS s FROM edges WHERE score IS NOT NULL AND estimate IS NOT NULL
),
ranked AS (
    SELECT e, s,
           rank() OVER (ORDER BY e) + (count(*) OVER (PARTITION BY e) - 1) / 2.0 AS re,
           rank() OVER (ORDER BY s) + (count(*) OVER (PARTITION BY s) - 1) / 2.0 AS rs
    FROM v
)
SELECT corr(e, s), corr(re, rs), count(*) FROM ranked
"""


def agreement(connection, method_title: str) -> list[tuple[str, str]]:
    """A summary line comparing the estimate with exact patching over the verified edges (Pearson,
    and Spearman on average ranks), if the run verified any."""
    pearson, spearman, n = connection.sql(AGREEMENT_SQL).fetchall()[0]
    if not n:
        return []
    said = "n/a" if pearson is None else f"Pearson {pearson:.3f}, Spearman {spearman:.3f}"
    return [(f"{method_title} vs exact edge patching", f"{said} ({n} verified edges)")]


def node_order(name: str) -> tuple:
    """Forward order of a node name: `input`, then per layer its heads (q, k, v), its MLP; `logits` last."""
    if name == "input":
        return (-1,)
    if name == "logits":
        return (float("inf"),)
    head = re.fullmatch(r"a(\d+)\.h(\d+)(?:<([qkv])>)?", name)
    if head:
        return (int(head[1]), 0, int(head[2]), "qkv".index(head[3]) if head[3] else 0)
    return (int(name[1:]), 1)


def interval(low: float | None, high: float | None) -> str:
    return "" if low is None else f"[{low:.4f}, {high:.4f}]"


def edge_figures(rows: list[dict], run: str) -> list[tuple[str, go.Figure]]:
    """The top edges by |mean estimate| (a table) and the sender x receiver heatmap, over every pair."""
    overall = [row for row in rows if row["group"] is None and row["mean_estimate"] is not None]
    if not overall:
        return []
    top = sorted(overall, key=lambda row: -abs(row["mean_estimate"]))[:TOP_EDGES]
    table = go.Figure(
        go.Table(
            header={"values": ["edge", "mean estimate", "std", "95% interval", "pairs"]},
            cells={
                "values": [
                    [row["edge"] for row in top],
                    [f"{row['mean_estimate']:.4f}" for row in top],
                    [f"{row['std_estimate']:.4f}" if row["std_estimate"] is not None else "" for row in top],
                    [interval(row["estimate_ci_low"], row["estimate_ci_high"]) for row in top],
                    [row["pairs"] for row in top],
                ]
            },
        )
    )
    table.update_layout(title=f"{run}: top {len(top)} edges by |mean estimate|", height=120 + 24 * len(top))
    senders = sorted({row["sender"] for row in overall}, key=node_order)
    receivers = sorted({row["receiver"] for row in overall}, key=node_order)
    at = {(row["sender"], row["receiver"]): row["mean_estimate"] for row in overall}
    z = [[at.get((sender, receiver)) for receiver in receivers] for sender in senders]
    grid = heatmap(f"{run}: mean estimate per edge", receivers, senders, z, None, "receiver", "sender", "estimate")
    return [("top-edges", table), ("edges", grid)]
