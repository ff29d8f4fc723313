"""The report's figures for an edge-attribution run: the top edges, and every edge's mean
estimate as a sender x receiver heatmap with nodes in the graph's (forward) order."""

from __future__ import annotations

import re

import plotly.graph_objects as go

from jobs.results.heatmaps import heatmap

TOP_EDGES = 20


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


def edge_figures(rows: list[dict], run: str) -> list[tuple[str, go.Figure]]:
    """The top edges by |mean estimate| (a table) and the sender x receiver heatmap, over every pair."""
    overall = [row for row in rows if row["group"] is None and row["mean_estimate"] is not None]
    if not overall:
        return []
    top = sorted(overall, key=lambda row: -abs(row["mean_estimate"]))[:TOP_EDGES]
    table = go.Figure(
        go.Table(
            header={"values": ["edge", "mean estimate", "std", "pairs"]},
            cells={
                "values": [
                    [row["edge"] for row in top],
                    [f"{row['mean_estimate']:.4f}" for row in top],
                    [f"{row['std_estimate']:.4f}" if row["std_estimate"] is not None else "" for row in top],
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
