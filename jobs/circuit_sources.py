"""The circuits a `driver.py circuit` run evaluates: selected from an edges run's aggregate (or, in
the Python API, an edges table in memory) at edge budgets (worker/graph/circuits.py), or read from
graph JSON files made by hand or by another tool.

Selection ranks edges by |mean estimate| over the edges run's pairs, or by |mean score| where
every edge of every pair was patched exactly (`--verify-top` at least the edge count). Both the
edges run and each file must be of the model's graph; anything else is one line and exit 2.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.results.query import QueryError
from jobs.store import EDGES, Store
from worker.contract.layout import AGGREGATE_FILE
from worker.graph.circuits import EMPTY, Circuit, read_circuit
from worker.graph.mib import Graph


def edge_scores(edges_run: str, graph: Graph, model: str) -> list[float]:
    """Each edge's score (graph order) from the edges run at `edges_run`, scored on `model`."""
    store = Store(edges_run)
    manifest = store.read_manifest()
    if manifest is None or store.kind is not EDGES or not store.exists(AGGREGATE_FILE):
        raise QueryError(f"{edges_run}: not a finished edges run (driver.py edges writes one, with {AGGREGATE_FILE})")
    if manifest.get("model") != model:
        raise QueryError(f"{edges_run}: its edges were scored on {manifest.get('model')!r}, not {model!r} (--model)")
    table = pq.read_table(store.path(AGGREGATE_FILE), filesystem=store.fs)
    return ranking_scores(table.filter(pc.is_null(table.column("group"))), graph, edges_run)


def edges_table_scores(edges: pa.Table, graph: Graph) -> list[float]:
    """Each edge's score (graph order) from an edges table in memory (the Python API's `edges`):
    its mean over every pair of the table, as the aggregate computes it (which also leaves out
    pairs whose gap is under the report's --min-gap)."""
    sums = edges.select(["edge", "estimate", "score"]).cast(
        pa.schema([("edge", pa.string()), ("estimate", pa.float64()), ("score", pa.float64())])
    )
    table = sums.group_by("edge").aggregate(
        [("estimate", "mean"), ("estimate", "count"), ("score", "count"), ("score", "mean")]
    )
    names = {"estimate_mean": "mean_estimate", "estimate_count": "estimate_count"}
    names |= {"score_count": "count", "score_mean": "mean_score", "edge": "edge"}
    return ranking_scores(table.rename_columns([names[c] for c in table.column_names]), graph, "the edges table")


def ranking_scores(aggregate: pa.Table, graph: Graph, source: str) -> list[float]:
    """What selection ranks edges by, in graph order, from one aggregate row per edge: the mean
    estimate, or the mean exact score where every edge of every pair was patched exactly."""
    wanted = ["edge", "mean_estimate", "estimate_count", "count", "mean_score"]
    rows = {row["edge"]: row for row in aggregate.select(wanted).to_pylist()}
    if set(rows) != set(graph.edge_names):
        raise QueryError(f"{source}: its {len(rows)} edges are not this model's graph of {len(graph.edges)} edges")
    exact = all(row["count"] and row["count"] == row["estimate_count"] for row in rows.values())
    column = "mean_score" if exact else "mean_estimate"
    return [float("nan") if rows[name][column] is None else rows[name][column] for name in graph.edge_names]


def circuits_from_files(files: tuple[str, ...], graph: Graph) -> list[Circuit]:
    """Each file's circuit, named by its file name (without .json)."""
    circuits = []
    for file in files:
        name = Path(file).stem
        if name == EMPTY:
            raise ValueError(f"{file}: {EMPTY!r} names the circuit of no edge, evaluated with every run; rename it")
        circuits.append(read_circuit(file, name, graph))
    return circuits


def circuits_to_evaluate(
    model: str, edges_run: str | None, files: tuple[str, ...], budgets: tuple[str, ...], select: str
) -> tuple[Circuit, ...]:
    """The selected circuits (one per budget) and the given ones, of `model`'s graph."""
    if not edges_run and not files:
        raise ValueError("give circuits to evaluate: --edges EDGES_RUN (selected at --budgets) or --circuit FILE.json")
    from worker.model.checkpoint import load_config  # transformers: only once the options are known to be complete

    graph = Graph.of_config(load_config(model))
    scores = edge_scores(edges_run, graph, model) if edges_run else None
    return chosen_circuits(graph, scores, files, budgets, select)


def chosen_circuits(
    graph: Graph, scores: list[float] | None, files: tuple[str, ...], budgets: tuple[str, ...], select: str
) -> tuple[Circuit, ...]:
    """The circuits `select` picks from edge `scores` at each budget (none without scores), and those of `files`."""
    circuits = [Circuit.selected(graph, scores, select, budget) for budget in budgets] if scores is not None else []
    circuits += circuits_from_files(files, graph)
    names = [c.name for c in circuits]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"two circuits are named {twice[0]!r}; circuits are files OUT/circuits/NAME.json")
    return tuple(circuits)
