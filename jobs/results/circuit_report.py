"""The report's figures for a circuit run: the faithfulness curves over the edge budgets, a table
of the circuits, and each circuit drawn as a graph (plotly, offline: no graphviz); its summary
lines, with MIB's CPR and CMD of each curve (jobs/results/curves.py)."""

from __future__ import annotations

import plotly.graph_objects as go

from jobs.results.curves import curve_of, curves_table
from jobs.store import Store
from worker.graph.circuits import EMPTY, Circuit, run_circuit
from worker.graph.mib import Graph

DRAWN_EDGES = 2000  # circuits with more edges are listed, not drawn: a hairball says nothing
DASH = {"q": "solid", "k": "dash", "v": "dot", "": "solid"}  # into a head's query, key or value; else solid


def curve_points(rows: list[dict], entries: list[dict]) -> list[tuple[dict, dict]]:
    """(manifest entry, aggregate row) of each circuit, over every pair, in order of its fraction."""
    overall = {row["circuit"]: row for row in rows if row["group"] is None}
    return sorted(((e, overall[e["name"]]) for e in entries if e["name"] in overall), key=lambda p: p[0]["fraction"])


def summary(rows: list[dict], manifest: dict) -> list[tuple[str, str]]:
    """The summary lines: the circuits, and MIB's CPR and CMD of each curve; of a `mib` selection,
    the pair MIB reports: CPR of the signed curve, CMD of the absolute one."""
    entries = manifest.get("circuits", [])
    lines = [("circuits", f"{len(entries)} (and {EMPTY}, every edge ablated)")]
    areas = {row["curve"]: row for row in curves_table(rows, entries).to_pylist() if row["cpr"] is not None}
    if "mib-signed" in areas and "mib-absolute" in areas:
        lines.append(("CPR, MIB's (signed top-n curve; higher is better)", f"{areas['mib-signed']['cpr']:.4f}"))
        lines.append(("CMD, MIB's (|score| top-n curve; lower is better)", f"{areas['mib-absolute']['cmd']:.4f}"))
        return lines
    for curve, row in areas.items():
        of = f" of {curve}" if len(areas) > 1 else ""
        lines.append((f"CPR{of} (area under faithfulness; higher is better)", f"{row['cpr']:.4f}"))
        lines.append((f"CMD{of} (area under |1 - faithfulness|; lower is better)", f"{row['cmd']:.4f}"))
    return lines


def curve(points: list[tuple[dict, dict]], run: str) -> go.Figure:
    x = [entry["fraction"] * 100 for entry, _ in points]
    names = [entry["name"] for entry, _ in points]
    figure = go.Figure()
    for line in dict.fromkeys(curve_of(entry) for entry, _ in points):
        mine = [i for i, (entry, _) in enumerate(points) if curve_of(entry) == line]
        figure.add_scatter(
            x=[x[i] for i in mine],
            y=[points[i][1]["faithfulness"] for i in mine],
            mode="lines+markers",
            name=f"dataset: {line}",
            text=[names[i] for i in mine],
        )
    means = [row["mean_faithfulness"] for _, row in points]
    figure.add_scatter(
        x=x,
        y=means,
        mode="markers",
        name="mean over pairs (95% interval)",
        text=names,
        error_y={
            "type": "data",
            "symmetric": False,
            "array": [None if r["ci_high"] is None else r["ci_high"] - m for (_, r), m in zip(points, means)],
            "arrayminus": [None if r["ci_low"] is None else m - r["ci_low"] for (_, r), m in zip(points, means)],
        },
    )
    figure.update_layout(
        title=f"{run}: faithfulness by circuit size",
        xaxis={"title": "edges kept (% of all edges)", "type": "log"},
        yaxis={"title": "faithfulness (1 = the full model, 0 = every edge ablated)"},
    )
    return figure


def table(points: list[tuple[dict, dict]], run: str) -> go.Figure:
    def fmt(value) -> str:
        return "" if value is None else f"{value:.3f}"

    columns = {
        "circuit": [e["name"] for e, _ in points],
        "edges": [e["edges"] for e, _ in points],
        "faithfulness": [fmt(r["faithfulness"]) for _, r in points],
        "mean over pairs": [fmt(r["mean_faithfulness"]) for _, r in points],
        "95% interval": [f"[{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]" for _, r in points],
        "pairs": [r["pairs"] for _, r in points],
    }
    figure = go.Figure(go.Table(header={"values": list(columns)}, cells={"values": list(columns.values())}))
    figure.update_layout(title=f"{run}: circuits", height=180 + 30 * len(points))
    return figure


def node_place(graph: Graph, node: str) -> tuple[float, float]:
    """Where a node is drawn: columns in forward order (input; per layer its heads, then its MLP;
    logits), heads one above another."""
    middle = (graph.heads - 1) / 2
    if node == "input":
        return 0.0, middle
    if node == "logits":
        return 2.0 * graph.layers + 1, middle
    if node.startswith("m"):
        return 2.0 * int(node[1:]) + 2, middle
    layer, head = node[1:].split(".h")
    return 2.0 * int(layer) + 1, float(head)


def drawing(circuit: Circuit, run: str) -> go.Figure:
    """The circuit's nodes by layer and its edges: blue positive, red negative score, width by |score|,
    into a head's query solid, key dashed, value dotted."""
    graph, figure = circuit.graph, go.Figure()
    largest = max((abs(circuit.scores[e]) for e in circuit.edges if circuit.scores[e] == circuit.scores[e]), default=0)
    groups: dict[tuple, tuple[list, list]] = {}
    for e in circuit.edges:
        s, r = graph.edges[e]
        sender, receiver = graph.senders[s][0], graph.receivers[r][0]
        score = circuit.scores[e] if circuit.scores[e] == circuit.scores[e] else 0.0
        width = 1 + round(4 * abs(score) / largest) if largest else 1
        key = (score >= 0, receiver[-2] if receiver.endswith(">") else "", width)
        xs, ys = groups.setdefault(key, ([], []))
        for node in (sender, Graph.node_of(receiver)):
            x, y = node_place(graph, node)
            xs.append(x)
            ys.append(y)
        xs.append(None)
        ys.append(None)
    for (positive, input, width), (xs, ys) in sorted(groups.items(), key=lambda item: item[0][2]):
        colour = "rgba(31,119,180,0.6)" if positive else "rgba(214,39,40,0.6)"
        name = f"{'+' if positive else '-'} into {input or 'stream'}"
        line = {"color": colour, "width": width, "dash": DASH[input]}
        figure.add_scatter(x=xs, y=ys, mode="lines", line=line, name=name, hoverinfo="skip", showlegend=False)
    nodes = sorted(circuit.nodes(), key=lambda node: node_place(graph, node))
    places = [node_place(graph, node) for node in nodes]
    figure.add_scatter(
        x=[x for x, _ in places],
        y=[y for _, y in places],
        mode="markers+text",
        text=nodes,
        textposition="top center",
        marker={"size": 9, "color": "#444"},
        name="nodes",
        showlegend=False,
    )
    figure.update_layout(
        title=f"{run}: circuit {circuit.name} ({len(circuit.edges)} edges; blue +, red -; q solid, k dashed, v dotted)",
        xaxis={"showticklabels": False, "title": "input, then per layer its heads and MLP, then logits"},
        yaxis={"showticklabels": False, "title": "head"},
        height=360 + 12 * graph.heads,
    )
    return figure


def circuit_figures(store: Store, rows: list[dict], manifest: dict, run: str) -> list[tuple[str, go.Figure]]:
    """The curve and the table over every pair, then each circuit small enough to draw."""
    points = curve_points(rows, manifest.get("circuits", []))
    if not points:
        return []
    figures = [("faithfulness", curve(points, run)), ("circuits", table(points, run))]
    for entry, _ in points:
        if 0 < entry["edges"] <= DRAWN_EDGES:
            figures.append((f"circuit-{entry['name']}", drawing(run_circuit(store.uri, entry["name"]), run)))
    return figures
