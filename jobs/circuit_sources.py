"""The circuits a `driver.py circuit` run evaluates: selected from an edges run's aggregate at edge
budgets (worker/graph/circuits.py), or read from graph JSON files made by hand or by another tool.

Selection ranks edges by |mean estimate| over the edges run's pairs, or by |mean score| where
every edge of every pair was patched exactly (`--verify-top` at least the edge count). Both the
edges run and each file must be of the model's graph; anything else is one line and exit 2.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.results.query import QueryError
from jobs.store import AGGREGATE_FILE, EDGES, Store
from worker.graph.circuits import EMPTY, Circuit
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
    table = table.filter(pc.is_null(table.column("group")))
    wanted = ["edge", "mean_estimate", "estimate_count", "count", "mean_score"]
    rows = {row["edge"]: row for row in table.select(wanted).to_pylist()}
    if set(rows) != set(graph.edge_names):
        raise QueryError(f"{edges_run}: its {len(rows)} edges are not this model's graph of {len(graph.edges)} edges")
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
        try:
            text = Path(file).read_text()
        except OSError as error:
            raise ValueError(f"{file}: cannot read it ({error.strerror})") from None
        circuits.append(Circuit.from_json(name, text, graph, file))
    return circuits


def circuits_to_evaluate(
    model: str, edges_run: str | None, files: tuple[str, ...], budgets: tuple[str, ...], select: str
) -> tuple[Circuit, ...]:
    """The selected circuits (one per budget) and the given ones, of `model`'s graph."""
    if not edges_run and not files:
        raise ValueError("give circuits to evaluate: --edges EDGES_RUN (selected at --budgets) or --circuit FILE.json")
    from worker.model.checkpoint import load_config  # transformers: only once the options are known to be complete

    graph = Graph.of_config(load_config(model))
    circuits = []
    if edges_run:
        scores = edge_scores(edges_run, graph, model)
        circuits = [Circuit.selected(graph, scores, select, budget) for budget in budgets]
    circuits += circuits_from_files(files, graph)
    names = [c.name for c in circuits]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"two circuits are named {twice[0]!r}; circuits are files OUT/circuits/NAME.json")
    return tuple(circuits)
