"""Circuits (worker/graph/circuits.py): selection, pruning and EAP-IG's graph JSON on a graph small enough
to work by hand: two layers of one head, sequential blocks (23 edges)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import defaultdict
from itertools import pairwise

import pyarrow.parquet as pq
import pytest
import torch

from jobs.circuit_sources import chosen_circuits, reliable
from jobs.means_pass import means_table
from jobs.results.curves import curves_table
from tests.conftest import TOL
from tests.reference import position_key, reference_edge_set, sender_outputs
from tests.test_patching import labelled, resampled
from worker.batch.mean_donors import donor_sums
from worker.contract.layout import CIRCUITS_DIR, MEANS_FILE
from worker.contract.options import PatchOptions
from worker.graph.circuits import (
    EMPTY,
    MIB_BUDGETS,
    Circuit,
    budget_edges,
    parse_budgets,
    prune,
    select_greedy,
    select_top,
)
from worker.graph.mib import Graph
from worker.methods.faithfulness import circuit_tables
from worker.model.checkpoint import load_config

GRAPH = Graph(2, 1, parallel=False, d_model=8)
SCORES = {  # everything else scores 0
    "input->a1.h0<v>": 10.0,  # large, but a1.h0 reaches logits only through a1.h0->logits
    "m0->a1.h0<k>": -6.0,
    "input->m0": 5.5,
    "m1->logits": 5.0,
    "a1.h0->logits": -4.0,
    "a0.h0->m1": 3.0,
    "input->a0.h0<q>": 2.5,
    "input->logits": 1.0,
}


def edges(*names: str) -> frozenset[int]:
    return frozenset(GRAPH.edge_names.index(name) for name in names)


def names(chosen) -> set[str]:
    return {GRAPH.edge_names[e] for e in chosen}


def scores() -> list[float]:
    return [SCORES.get(name, 0.0) for name in GRAPH.edge_names]


def test_the_small_graph():
    assert len(GRAPH.edges) == 3 + 2 + 9 + 4 + 5
    assert GRAPH.nodes == ["input", "a0.h0", "m0", "a1.h0", "m1", "logits"]


@pytest.mark.parametrize(
    "given, left",
    [
        (["a0.h0->m0"], []),  # m0 sends nowhere, a0.h0 reads nothing
        (["input->a0.h0<q>", "a0.h0->logits", "m0->logits"], ["input->a0.h0<q>", "a0.h0->logits"]),
        (["input->m0", "m0->a1.h0<k>"], []),  # a1.h0 sends nowhere, then m0 neither
        (
            ["input->a0.h0<v>", "a0.h0->m1", "m1->logits", "a1.h0->logits"],
            ["input->a0.h0<v>", "a0.h0->m1", "m1->logits"],
        ),
        (["input->logits"], ["input->logits"]),
    ],
)
def test_prune_keeps_only_paths_from_input_to_logits(given, left):
    assert names(prune(GRAPH, edges(*given))) == set(left)


def test_top_takes_the_largest_then_prunes():
    assert select_top(GRAPH, scores(), 3) == frozenset()  # 10, 6, 5.5: nothing reaches the logits
    assert names(select_top(GRAPH, scores(), 8)) == set(SCORES)
    assert names(select_top(GRAPH, scores(), 5)) == {"input->a1.h0<v>", "m0->a1.h0<k>", "input->m0", "a1.h0->logits"}


def test_mib_selects_by_signed_score_and_by_size():
    """MIB's two curves: `mib-signed` takes the largest signed scores (10, 5.5, 5, 3, 2.5: a1.h0 and
    m0 then send nowhere and are pruned), `mib-absolute` the largest |score|, as `top`."""
    signed = Circuit.selected(GRAPH, scores(), "mib-signed", "5")
    assert signed.name == "mib-signed-5" and signed.curve == "mib-signed"
    assert names(signed.edges) == {"m1->logits", "a0.h0->m1", "input->a0.h0<q>"}
    assert Circuit.selected(GRAPH, scores(), "mib-absolute", "5").edges == select_top(GRAPH, scores(), 5)
    chosen = chosen_circuits(GRAPH, scores(), (), ("5", "50%"), "mib")
    assert [c.name for c in chosen] == ["mib-signed-5", "mib-signed-50pct", "mib-absolute-5", "mib-absolute-50pct"]
    assert [c.name for c in chosen_circuits(GRAPH, scores(), (), ("5",), "top")] == ["top-5"]


def test_consistent_ranks_by_the_interval_end_nearest_zero():
    """An edge's reliability: the end of its 95% interval nearest zero (signed), 0 where the
    interval holds zero; `consistent` then keeps the largest, as `top` does."""
    assert [reliable(*bounds) for bounds in ((0.2, 0.9), (-0.9, -0.3), (-0.1, 0.5), (None, None))] == [
        0.2,
        -0.3,
        0.0,
        0.0,
    ]
    chosen = chosen_circuits(GRAPH, scores(), (), ("5",), "consistent")
    assert [(c.name, c.curve) for c in chosen] == [("consistent-5", "consistent")]
    assert chosen[0].edges == select_top(GRAPH, scores(), 5)


def test_curves_and_their_areas_are_mibs():
    """Per curve, the faithfulness at each budget and MIB's trapezoid on the linear fraction axis,
    from the smallest budget to the largest (no point at 0): CPR the area under f, CMD under |1 - f|."""
    fractions = [0.001, 0.01, 0.1, 0.5, 1.0]
    budgets = [f"{100 * x:g}%" for x in fractions]
    curve = {"mib-signed": [0.2, 0.5, 0.9, 1.1, 1.0], "mib-absolute": [-0.1, 0.3, 0.7, 0.95, 1.0]}
    entries, rows = [], [{"circuit": EMPTY, "group": None, "faithfulness": 0.0}]
    for name, values in curve.items():
        for budget, x, f in zip(budgets, fractions, values):
            entries.append({"name": f"{name}-{budget}", "budget": budget, "fraction": x, "curve": name})
            rows.append({"circuit": f"{name}-{budget}", "group": None, "faithfulness": f})
    table = {row["curve"]: row for row in curves_table(rows, entries).to_pylist()}
    for name, values in curve.items():
        by_hand_cpr = sum(
            (x2 - x1) * (f1 + f2) / 2 for x1, x2, f1, f2 in zip(fractions, fractions[1:], values, values[1:])
        )
        by_hand_cmd = sum(
            (x2 - x1) * (abs(1 - f1) + abs(1 - f2)) / 2
            for x1, x2, f1, f2 in zip(fractions, fractions[1:], values, values[1:])
        )
        assert table[name]["cpr"] == pytest.approx(by_hand_cpr) and table[name]["cmd"] == pytest.approx(by_hand_cmd)
        assert [table[name][b] for b in budgets] == values
    perfect = curves_table(
        [{"circuit": f"top-{b}", "group": None, "faithfulness": 1.0} for b in MIB_BUDGETS],
        [{"name": f"top-{b}", "budget": b, "fraction": float(b[:-1]) / 100, "curve": "top"} for b in MIB_BUDGETS],
    ).to_pylist()[0]
    assert perfect["cpr"] == pytest.approx(0.999) and perfect["cmd"] == 0


def test_greedy_grows_from_the_logits():
    """m1->logits (5), a1.h0->logits (4): a1.h0 joins, so its input edges become candidates; then
    input->a1.h0<v> (10). m1 has no edge in: pruned."""
    assert names(select_greedy(GRAPH, scores(), 3)) == {"input->a1.h0<v>", "a1.h0->logits"}
    assert select_greedy(GRAPH, scores(), 2) == frozenset()
    assert names(select_greedy(GRAPH, scores(), 8)) == set(SCORES)


def test_budgets():
    assert parse_budgets("0.1%, 5% ,200") == ("0.1%", "5%", "200")
    assert [budget_edges(b, 32491) for b in MIB_BUDGETS] == [32, 64, 162, 324, 649, 1624, 3249, 6498, 16245, 32491]
    for bad, message in (("0%", "above 0"), ("150%", "at most 100%"), ("x", "neither"), ("5%,5%", "distinct")):
        with pytest.raises(ValueError, match=message):
            parse_budgets(bad)
    with pytest.raises(ValueError, match="more than the graph's 23 edges"):
        budget_edges("24", 23)


def test_json_round_trip_in_eap_igs_format():
    circuit = Circuit.selected(GRAPH, scores(), "greedy", "15%")  # int(0.15 * 23) = 3 edges
    assert circuit.name == "greedy-15pct" and names(circuit.edges) == {"input->a1.h0<v>", "a1.h0->logits"}
    data = json.loads(circuit.to_json())
    assert data["cfg"] == {"n_layers": 2, "n_heads": 1, "parallel_attn_mlp": False, "d_model": 8}
    assert list(data["nodes"]) == GRAPH.nodes and list(data["edges"]) == GRAPH.edge_names
    assert {n for n, v in data["nodes"].items() if v["in_graph"]} == {"input", "a1.h0", "logits"}
    assert data["edges"]["m0->a1.h0<k>"] == {"score": -6.0, "in_graph": False}
    back = Circuit.from_json("again", circuit.to_json(), GRAPH, "c.json")
    assert back.edges == circuit.edges and back.scores == circuit.scores


def test_a_circuit_from_elsewhere_is_pruned_and_checked():
    text = json.dumps(
        {
            "cfg": {"n_layers": 2, "n_heads": 1, "parallel_attn_mlp": False, "d_model": 8},
            "nodes": {"m0": {"in_graph": True}},
            "edges": {"input->m0": {"score": 1, "in_graph": True}, "m0->logits": {"in_graph": True}, "a0.h0->m0": {}},
        }
    )
    circuit = Circuit.from_json("theirs", text, GRAPH, "theirs.json")
    assert names(circuit.edges) == {"input->m0", "m0->logits"}
    assert circuit.scores[GRAPH.edge_names.index("input->m0")] == 1 and math.isnan(circuit.scores[0])
    wrong = json.loads(text)
    wrong["cfg"]["n_heads"] = 12
    for bad, message in (
        (json.dumps(wrong), "theirs.json: made for a model with n_heads=12; this model has n_heads=1"),
        (text.replace("m0->logits", "m9->logits"), "theirs.json: unknown edge 'm9->logits'"),
        (text.replace('"m0": {', '"m7": {'), "theirs.json: unknown node 'm7'"),
        ("{", "theirs.json: not JSON"),
        ("[]", "theirs.json: not a graph JSON"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            Circuit.from_json("theirs", bad, GRAPH, "theirs.json")


def written(circuits: list[Circuit], root) -> tuple[str, ...]:
    (root / CIRCUITS_DIR).mkdir(exist_ok=True)
    for circuit in circuits:
        (root / CIRCUITS_DIR / f"{circuit.name}.json").write_text(circuit.to_json())
    return tuple(c.name for c in circuits)


def test_circuit_evaluation_matches_hook_reference(hooked_family, tmp_path):
    """Every family: the circuit of every edge gives the clean metric (faithfulness 1), `empty` the
    corrupted one (0); a top-30% circuit equals one hooked forward with every edge outside it
    patched from the corrupted prompt; faithfulness is (m(C) - m(empty)) / (clean - m(empty))."""
    model, hf_model, pairs = hooked_family
    graph = Graph.of(model)
    draw = torch.rand(len(graph.edges), generator=torch.Generator().manual_seed(1)).tolist()
    full = Circuit("full", graph, frozenset(range(len(graph.edges))), tuple(draw))
    some = Circuit.selected(graph, draw, "top", "30%")
    assert 0 < len(some.edges) < len(graph.edges)
    names = written([full, some], tmp_path)
    options = PatchOptions((), direction="noise", method="circuit", circuits=names, circuits_at=str(tmp_path))
    rows, pairs_rows = circuit_tables(model, pairs, options)
    assert rows.num_rows == 3 * len(pairs)
    for pair, baselines in zip(pairs, pairs_rows.to_pylist()):
        found = {r["circuit"]: r for r in rows.to_pylist() if r["pair_id"] == pair.pair_id}
        clean, corrupted = baselines["clean_logit_diff"], baselines["corrupted_logit_diff"]
        assert found["full"]["logit_diff"] == pytest.approx(clean, abs=TOL) and found["full"]["edges"] == len(
            graph.edges
        )
        assert found["empty"]["logit_diff"] == pytest.approx(corrupted, abs=TOL) and found["empty"]["edges"] == 0
        outside = {name for e, name in enumerate(graph.edge_names) if e not in some.edges}
        expected = reference_edge_set(hf_model, pair, "noise", outside)
        assert found[some.name]["logit_diff"] == pytest.approx(expected, abs=TOL)
        assert found[some.name]["faithfulness"] == pytest.approx((expected - corrupted) / (clean - corrupted), abs=1e-3)
        assert found["full"]["faithfulness"] == pytest.approx(1, abs=1e-3) and found["empty"]["faithfulness"] == 0


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"direction": "denoise"}, "direction noise"),
        ({"circuits": ()}, "takes circuits"),
        ({"method": "exact", "components": ("resid",)}, "circuits are what method circuit evaluates"),
    ],
)
def test_circuit_options_are_checked(changes, message):
    given = {"components": (), "direction": "noise", "method": "circuit", "circuits": ("c",)} | changes
    with pytest.raises(ValueError, match=message):
        PatchOptions(**given)


def ablated_outputs(hf_model, pairs, donor: str) -> dict[str, dict[str, torch.Tensor]]:
    """Per pair, its senders' ablated outputs by hand: zeros; its resampled prompt's; or the mean of
    the donor-side (corrupted) outputs over the pairs' positions with its position's key (`mean`:
    the label; `mean-all`: every position)."""
    if donor == "resample":
        return {p.pair_id: sender_outputs(hf_model, list(p.donor_ids)) for p in pairs}
    outputs = {p.pair_id: sender_outputs(hf_model, list(p.corrupted_ids)) for p in pairs}
    if donor == "zero":
        return {pair: {s: torch.zeros_like(v) for s, v in found.items()} for pair, found in outputs.items()}
    keys = {p.pair_id: [position_key(p, t, donor) for t in range(p.n_tokens)] for p in pairs}
    gathered = defaultdict(list)
    for pair, found in outputs.items():
        for t, key in enumerate(keys[pair]):
            for sender, values in found.items():
                gathered[(sender, key)].append(values[t])
    mean = {site: torch.stack(values).mean(0) for site, values in gathered.items()}
    return {
        pair: {s: torch.stack([mean[(s, key)] for key in keys[pair]]) for s in found} for pair, found in outputs.items()
    }


@pytest.mark.parametrize("donor", ["zero", "mean-all", "mean", "resample"])
def test_circuits_with_ablated_edges_match_hook_reference(hooked_family, tmp_path, donor):
    """Every family and donor: the edges outside a circuit carry zeros, the stored means (worker
    sums of the pairs, as a run stores them) or a resampled prompt's outputs; the full circuit gives
    the clean metric, `empty` (every edge ablated) and a top-30% circuit equal the reference."""
    model, hf_model, pairs = hooked_family
    pairs = [resampled(p) if donor == "resample" else labelled(p) for p in pairs]
    graph = Graph.of(model)
    draw = torch.rand(len(graph.edges), generator=torch.Generator().manual_seed(2)).tolist()
    full = Circuit("full", graph, frozenset(range(len(graph.edges))), tuple(draw))
    some = Circuit.selected(graph, draw, "top", "30%")
    names = written([full, some], tmp_path)
    options = PatchOptions((), direction="noise", method="circuit", donor=donor, circuits=names)
    means = None
    if donor.startswith("mean"):
        (tmp_path / "run").mkdir()
        pq.write_table(means_table([donor_sums(model, [p], options) for p in pairs]), tmp_path / "run" / MEANS_FILE)
        means = str(tmp_path / "run")
    options = dataclasses.replace(options, circuits_at=str(tmp_path), means=means)
    rows, pairs_rows = circuit_tables(model, pairs, options)
    ablated = ablated_outputs(hf_model, pairs, donor)
    for pair, baselines in zip(pairs, pairs_rows.to_pylist()):
        found = {r["circuit"]: r for r in rows.to_pylist() if r["pair_id"] == pair.pair_id}
        assert found["full"]["logit_diff"] == pytest.approx(baselines["clean_logit_diff"], abs=TOL)
        outside = {name for e, name in enumerate(graph.edge_names) if e not in some.edges}
        for name, patched in ((some.name, outside), ("empty", set(graph.edge_names))):
            expected = reference_edge_set(hf_model, pair, "noise", patched, donor=ablated[pair.pair_id])
            assert found[name]["logit_diff"] == pytest.approx(expected, abs=TOL), name
        empty = found["empty"]["logit_diff"]
        if donor != "resample":  # an ablation is not the pair's corrupted run
            assert abs(empty - baselines["corrupted_logit_diff"]) > 10 * TOL
        faithfulness = (found[some.name]["logit_diff"] - empty) / (baselines["clean_logit_diff"] - empty)
        assert found[some.name]["faithfulness"] == pytest.approx(faithfulness, abs=1e-3)


def test_find_circuits_with_mibs_selection_scores_as_mib_does(tmp_path):
    """`find-circuits --select mib` on the toy IOI model: MIB's two curves, each circuit the top-n
    of the edges run's `mean_effect` (signed, or by size) at int(p x edges), pruned; the `curves`
    view's CPR and CMD are MIB's trapezoid over the aggregate's faithfulness at MIB's ten budgets;
    the report quotes CPR from the signed curve and CMD from the absolute one."""
    from jobs.results.query import query
    from tests.conftest import REPO
    from tests.test_driver import run_driver

    lines = (REPO / "examples/ioi_pairs.jsonl").read_text().splitlines()[:16]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    model = REPO / "examples/toy-ioi-gpt2"
    done = run_driver(
        "find-circuits", "--pairs", tmp_path / "pairs.jsonl", "--model", model, "--out", out, "--select", "mib"
    )
    assert done.returncode == 0, done.stderr
    aggregate = pq.read_table(out / "edges" / "aggregate.parquet").to_pylist()
    graph = Graph.of_config(load_config(str(model)))
    effect = {row["edge"]: row["mean_effect"] for row in aggregate if row["group"] is None}
    manifest = json.loads((out / "evaluation" / "manifest.json").read_text())
    faithfulness = {
        row["circuit"]: row["faithfulness"]
        for row in pq.read_table(out / "evaluation" / "aggregate.parquet").to_pylist()
        if row["group"] is None
    }
    curves = {row["curve"]: row for row in query(str(out / "evaluation"), "SELECT * FROM curves").to_pylist()}
    assert set(curves) == {"mib-signed", "mib-absolute"}
    for curve, size in (("mib-signed", lambda x: x), ("mib-absolute", abs)):
        order = sorted(range(len(graph.edges)), key=lambda e: (-size(effect[graph.edge_names[e]]), e))
        points = []
        for budget in MIB_BUDGETS:
            n = int(float(budget[:-1]) / 100 * len(graph.edges))
            saved = json.loads(
                (out / "evaluation" / "circuits" / f"{curve}-{budget.replace('%', 'pct')}.json").read_text()
            )
            kept = {name for name, edge in saved["edges"].items() if edge["in_graph"]}
            assert kept == names_in(graph, prune(graph, set(order[:n])))
            points.append((float(budget[:-1]) / 100, faithfulness[f"{curve}-{budget.replace('%', 'pct')}"]))
            assert curves[curve][budget] == pytest.approx(points[-1][1])
        steps = list(pairwise(points))
        assert curves[curve]["cpr"] == pytest.approx(sum((x2 - x1) * (f1 + f2) / 2 for (x1, f1), (x2, f2) in steps))
        cmd = sum((x2 - x1) * (abs(1 - f1) + abs(1 - f2)) / 2 for (x1, f1), (x2, f2) in steps)
        assert curves[curve]["cmd"] == pytest.approx(cmd)
    assert [e["curve"] for e in manifest["circuits"]].count("mib-signed") == len(MIB_BUDGETS)
    report = (out / "evaluation" / "report.html").read_text()
    assert f"{curves['mib-signed']['cpr']:.4f}" in report and f"{curves['mib-absolute']['cmd']:.4f}" in report


def names_in(graph: Graph, chosen) -> set[str]:
    return {graph.edge_names[e] for e in chosen}
