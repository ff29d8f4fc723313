"""Circuits (worker/graph/circuits.py): selection, pruning and EAP-IG's graph JSON on a graph small enough
to work by hand: two layers of one head, sequential blocks (23 edges)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import defaultdict

import pyarrow.parquet as pq
import pytest
import torch

from jobs.means_pass import means_table
from tests.conftest import TOL
from tests.reference import position_key, reference_edge_set, sender_outputs
from tests.test_patching import labelled, resampled
from worker.batch.mean_donors import donor_sums
from worker.contract.layout import CIRCUITS_DIR, MEANS_FILE
from worker.contract.options import PatchOptions
from worker.graph.circuits import MIB_BUDGETS, Circuit, budget_edges, parse_budgets, prune, select_greedy, select_top
from worker.graph.mib import Graph
from worker.methods.faithfulness import circuit_tables

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
