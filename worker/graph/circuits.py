"""Circuits: sets of edges of the model's graph (worker/graph/mib.py), chosen from edge scores, pruned,
and read and written as EAP-IG's graph JSON, so a circuit moves between patchsweep, EAP-IG and MIB.

- `top`: the N edges of largest |score| (EAP-IG's `apply_topn`); `greedy`: grown back from
  `logits`, each step adding the highest-|score| edge into a node already in the circuit (EAP-IG's
  `apply_greedy`). Both then `prune`.
- `mib`: two curves, as MIB's `evaluate_area_under_curve` is run twice: `mib-signed` (the N edges
  of largest signed score, `apply_topn(absolute=False)`: MIB's CPR is read from it) and
  `mib-absolute` (of largest |score|: its CMD), both pruned. The scores are MIB's: each edge's
  mean effect in metric units, positive where it carries the behaviour (jobs/circuit_sources.py).
  Ties go in graph order (EAP-IG's `argsort` leaves them to the implementation).
- `consistent`: the N edges of largest |score| where an edge's score is how reliably the pairs
  agree on it: the end of its mean estimate's 95% interval nearest zero, or 0 where the interval
  holds zero (jobs/circuit_sources.py). One edge strong on a few pairs ranks below one moderate on all.
- `prune` (EAP-IG's): repeatedly drop the nodes with no edge in (except `input`) or no edge out
  (except `logits`), and the edges whose sender or receiver node was dropped; what is left is the
  edges on some path from `input` to `logits`.
- Budgets: edge counts, or percentages of all edges (int(p / 100 * edges), as MIB counts them).
- JSON: {"cfg": {n_layers, n_heads, parallel_attn_mlp, d_model}, "nodes": {name: {in_graph}},
  "edges": {name: {score, in_graph}}}, every node and edge of the graph, as EAP-IG's `to_json`
  writes it and `Graph.from_json` reads it. Reading one takes its in-graph edges and prunes, as
  EAP-IG's evaluation does (node flags follow from the edges).

Torch-free: the driver selects, reads and writes circuits; actors only read them.
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

from worker.contract.layout import circuit_file
from worker.contract.storage import child, opened
from worker.graph.mib import Graph

EMPTY = "empty"  # the circuit of no edge (every edge ablated), evaluated with every circuit
SELECTIONS = ("top", "greedy", "mib", "consistent")
CURVES = {  # a selection's curves
    "top": ("top",),
    "greedy": ("greedy",),
    "mib": ("mib-signed", "mib-absolute"),
    "consistent": ("consistent",),
}
MIB_BUDGETS = ("0.1%", "0.2%", "0.5%", "1%", "2%", "5%", "10%", "20%", "50%", "100%")


def prune(graph: Graph, edges: set[int] | frozenset[int]) -> frozenset[int]:
    """The edges (indices into `graph.edges`) left when nodes without an edge in or out are dropped, repeatedly."""
    kept = set(edges)
    while True:
        sends = {graph.senders[graph.edges[e][0]][0] for e in kept}
        reads = {Graph.node_of(graph.receivers[graph.edges[e][1]][0]) for e in kept} | {"input"}
        nodes = (sends & reads) | {"logits"}
        left = {
            e
            for e in kept
            if graph.senders[graph.edges[e][0]][0] in nodes
            and Graph.node_of(graph.receivers[graph.edges[e][1]][0]) in nodes
        }
        if left == kept:
            return frozenset(kept)
        kept = left


def ranked(scores: Sequence[float], signed: bool = False) -> list[int]:
    """Edge indices by |score| (or by score, `signed`), largest first; ties (and missing scores,
    last) in graph order."""
    size = (lambda x: x) if signed else abs
    return sorted(range(len(scores)), key=lambda e: (math.isnan(scores[e]), -size(scores[e]), e))


def select_top(graph: Graph, scores: Sequence[float], n: int) -> frozenset[int]:
    return prune(graph, set(ranked(scores)[:n]))


def select_signed(graph: Graph, scores: Sequence[float], n: int) -> frozenset[int]:
    return prune(graph, set(ranked(scores, signed=True)[:n]))


def select_greedy(graph: Graph, scores: Sequence[float], n: int) -> frozenset[int]:
    """From `logits` back: the highest-|score| edge into a node in the circuit, its sender joining."""
    into: dict[str, list[int]] = {}
    for e, (_, r) in enumerate(graph.edges):
        into.setdefault(Graph.node_of(graph.receivers[r][0]), []).append(e)
    order = {e: i for i, e in enumerate(ranked(scores))}
    candidates = [(order[e], e) for e in into["logits"]]
    heapq.heapify(candidates)
    chosen, nodes = set(), {"logits"}
    while candidates and len(chosen) < n:
        _, e = heapq.heappop(candidates)
        chosen.add(e)
        sender = graph.senders[graph.edges[e][0]][0]
        if sender not in nodes:
            nodes.add(sender)
            for parent in into.get(sender, []):
                heapq.heappush(candidates, (order[parent], parent))
    return prune(graph, chosen)


SELECT = {
    "top": select_top,
    "greedy": select_greedy,
    "mib-signed": select_signed,
    "mib-absolute": select_top,
    "consistent": select_top,
}


def parse_budgets(text: str) -> tuple[str, ...]:
    """Budgets from `1%,5%,200`: percentages of all edges (0 < p <= 100) or edge counts (> 0)."""
    budgets = []
    for part in (p.strip() for p in text.split(",")):
        try:
            value = float(part[:-1]) if part.endswith("%") else int(part)
        except ValueError:
            raise ValueError(
                f"budget {part!r} is neither a percentage of the edges (like 5%) nor an edge count"
            ) from None
        if value <= 0 or (part.endswith("%") and value > 100):
            raise ValueError(f"budget {part!r} must be above 0 (and a percentage at most 100%)")
        budgets.append(part)
    if not budgets or len(set(budgets)) < len(budgets):
        raise ValueError(f"budgets must be distinct and at least one, got {text!r}")
    return tuple(budgets)


def budget_edges(budget: str, n_edges: int) -> int:
    """How many edges a budget keeps before pruning: int(p / 100 * edges) for a percentage (MIB's count)."""
    count = int(float(budget[:-1]) / 100 * n_edges) if budget.endswith("%") else int(budget)
    if count > n_edges:
        raise ValueError(f"budget {budget} is more than the graph's {n_edges} edges")
    return count


def budget_fraction(budget: str, n_edges: int) -> float:
    """The budget as a fraction of all edges: the x of MIB's faithfulness curve."""
    return float(budget[:-1]) / 100 if budget.endswith("%") else int(budget) / n_edges


@dataclass(frozen=True)
class Circuit:
    """A named set of the graph's edges (`edges`: indices into `graph.edges`), with the score of
    every edge that chose it (NaN where none was given)."""

    name: str
    graph: Graph
    edges: frozenset[int]
    scores: tuple[float, ...]
    budget: str | None = None  # what it was selected at (None: made elsewhere)
    curve: str | None = None  # the curve it is a point of (a selection's: `CURVES`; None: made elsewhere)

    @classmethod
    def selected(cls, graph: Graph, scores: Sequence[float], curve: str, budget: str) -> Circuit:
        """The circuit of `curve` (top, greedy, mib-signed, mib-absolute) at `budget`, named
        `<curve>-<budget>` (% as pct)."""
        edges = SELECT[curve](graph, scores, budget_edges(budget, len(graph.edges)))
        name = f"{curve}-{budget.replace('%', 'pct')}"
        return cls(name, graph, edges, tuple(float(s) for s in scores), budget, curve)

    def edge_names(self) -> list[str]:
        return [self.graph.edge_names[e] for e in sorted(self.edges)]

    def fraction(self) -> float:
        """Where it sits on the faithfulness curve: its budget's fraction of all edges (MIB's x), or
        for a circuit made elsewhere the fraction of edges it keeps."""
        n_edges = len(self.graph.edges)
        return budget_fraction(self.budget, n_edges) if self.budget else len(self.edges) / n_edges

    def nodes(self) -> set[str]:
        """The nodes the circuit's edges touch, and `logits` (always in the graph)."""
        found = {"logits"}
        for e in self.edges:
            s, r = self.graph.edges[e]
            found |= {self.graph.senders[s][0], Graph.node_of(self.graph.receivers[r][0])}
        return found

    def cfg(self) -> dict:
        graph = self.graph
        return {
            "n_layers": graph.layers,
            "n_heads": graph.heads,
            "parallel_attn_mlp": graph.parallel,
            "d_model": graph.d_model,
        }

    def to_json(self) -> str:
        nodes = self.nodes()
        return json.dumps(
            {
                "cfg": self.cfg(),
                "nodes": {name: {"in_graph": name in nodes} for name in self.graph.nodes},
                "edges": {
                    name: {"score": score, "in_graph": e in self.edges}
                    for e, (name, score) in enumerate(zip(self.graph.edge_names, self.scores))
                },
            }
        )

    @classmethod
    def from_json(cls, name: str, text: str, graph: Graph, source: str) -> Circuit:
        """The circuit a graph JSON describes (its in-graph edges, pruned); one-line errors name `source`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{source}: not JSON ({error})") from None
        if not isinstance(data, dict) or not {"cfg", "nodes", "edges"} <= data.keys():
            raise ValueError(f"{source}: not a graph JSON (it needs cfg, nodes and edges, as EAP-IG writes them)")
        want = cls(name, graph, frozenset(), ()).cfg()
        given = {key: data["cfg"].get(key) for key in want} if isinstance(data["cfg"], dict) else {}
        if given != want:
            mismatch = ", ".join(f"{k}={given.get(k)!r}" for k in want if given.get(k) != want[k])
            have = ", ".join(f"{k}={want[k]!r}" for k in want if given.get(k) != want[k])
            raise ValueError(f"{source}: made for a model with {mismatch}; this model has {have}")
        unknown_nodes = [node for node in data["nodes"] if node not in set(graph.nodes)]
        if unknown_nodes:
            raise ValueError(f"{source}: unknown node {unknown_nodes[0]!r} (not in this model's graph)")
        if any(isinstance(node, dict) and "neurons" in node for node in data["nodes"].values()):
            raise ValueError(f"{source}: a neuron-level circuit; patchsweep evaluates edge-level circuits")
        index = {edge: e for e, edge in enumerate(graph.edge_names)}
        unknown = [edge for edge in data["edges"] if edge not in index]
        if unknown:
            raise ValueError(f"{source}: unknown edge {unknown[0]!r} (not in this model's graph)")
        scores = [math.nan] * len(index)
        for edge, entry in data["edges"].items():
            score = entry.get("score") if isinstance(entry, dict) else None
            scores[index[edge]] = math.nan if score is None else float(score)
        edges = {
            index[edge] for edge, entry in data["edges"].items() if isinstance(entry, dict) and entry.get("in_graph")
        }
        return cls(name, graph, prune(graph, edges), tuple(scores))


def read_circuit(location: str, name: str, graph: Graph | None = None) -> Circuit:
    """The circuit `name` in the graph JSON at `location` (a local path or URI), on `graph`, or
    by default on the graph its `cfg` names; one-line errors name `location`."""
    try:
        with opened(location) as stream:
            text = stream.read().decode()
    except OSError as error:
        raise ValueError(f"{location}: cannot read it ({error.strerror or error})") from None
    if graph is None:
        cfg = json.loads(text)["cfg"]
        graph = Graph(cfg["n_layers"], cfg["n_heads"], cfg["parallel_attn_mlp"], cfg["d_model"])
    return Circuit.from_json(name, text, graph, location)


def run_circuit(root: str, name: str, graph: Graph | None = None) -> Circuit:
    """The circuit `name` a circuit run at `root` (a local path or URI) evaluates."""
    return read_circuit(child(root, circuit_file(name)), name, graph)
