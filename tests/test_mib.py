"""MIB's circuit track (jobs/mib_export.py, `driver.py mib-export`): an edges run written as MIB's
importance file, and what MIB would refuse, refused in one line."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from examples.tiny_gpt2 import build_tiny_gpt2
from tests.conftest import EXAMPLE_PAIRS
from tests.test_driver import run_driver
from worker.graph.circuits import read_circuit
from worker.graph.mib import Graph
from worker.model.checkpoint import load_config


@pytest.fixture(scope="module")
def gpt2_small_graph(tmp_path_factory):
    """A GPT-2 with GPT-2 small's graph (12 layers of 12 heads: MIB's 32,491 edges), narrow, and
    an edges run of the example pairs on it in each direction."""
    root = tmp_path_factory.mktemp("mib")
    model = build_tiny_gpt2(root / "gpt2-12x12", n_layer=12, n_head=12, n_embd=24)
    for direction in ("noise", "denoise"):
        args = ("--pairs", EXAMPLE_PAIRS, "--model", model, "--out", root / direction, "--direction", direction)
        done = run_driver("edges", *args)
        assert done.returncode == 0, done.stderr
    return root, model


def test_an_edges_run_becomes_mibs_importance_file(gpt2_small_graph, tmp_path):
    """Every edge with MIB's score (the run's mean effect: the logit difference lost when the
    sender is corrupted in the clean run), in EAP-IG's graph JSON, which patchsweep's reader
    reads back whole; a submission of one task and one model is told what it lacks."""
    root, model = gpt2_small_graph
    done = run_driver("mib-export", root / "noise", "--task", "ioi", "--out", tmp_path / "sub")
    assert done.returncode == 0, done.stderr
    written = tmp_path / "sub" / "EAP_patching_edge" / "ioi_gpt2" / "importances.json"
    assert done.stdout.strip() == str(written)
    assert done.stderr.strip().splitlines() == [
        f"note: {tmp_path / 'sub' / 'EAP_patching_edge'}: 1 task(s) and 1 model(s) so far; "
        "a MIB submission needs at least two of each"
    ]
    data = json.loads(written.read_text())
    graph = Graph.of_config(load_config(str(model)))
    assert set(data) == {"cfg", "nodes", "edges"} and len(data["edges"]) == 32491 == len(graph.edges)
    assert data["cfg"] == {"n_layers": 12, "n_heads": 12, "parallel_attn_mlp": False, "d_model": 24}
    assert all(edge["in_graph"] for edge in data["edges"].values()) and all(
        node["in_graph"] for node in data["nodes"].values()
    )
    aggregate = pq.read_table(root / "noise" / "aggregate.parquet").to_pylist()
    effect = {row["edge"]: row["mean_effect"] for row in aggregate if row["group"] is None}
    assert {name: edge["score"] for name, edge in data["edges"].items()} == pytest.approx(effect)
    pairs = pq.read_table(root / "noise" / "pairs.parquet").to_pylist()
    edges = pq.read_table(root / "noise" / "edges").to_pylist()
    gap = {p["pair_id"]: p["clean_logit_diff"] - p["corrupted_logit_diff"] for p in pairs}
    top = max(effect, key=lambda name: abs(effect[name]))
    by_hand = [row["estimate"] * gap[row["pair_id"]] for row in edges if row["edge"] == top]
    assert effect[top] == pytest.approx(sum(by_hand) / len(by_hand))  # MIB's sign: a lost logit difference
    assert read_circuit(str(written), "ioi_gpt2", graph).edges == frozenset(range(len(graph.edges)))


@pytest.mark.parametrize(
    "run, extra, message",
    [
        ("denoise", ("--task", "ioi"), "MIB scores edges by the logit difference with the clean prompt run"),
        ("noise", ("--task", "mcqa"), "MIB does not score mcqa on gpt2; it scores arc-challenge_llama3"),
        ("noise", ("--task", "sst2"), "unknown MIB task 'sst2'; MIB's are ioi, mcqa"),
        ("noise", ("--task", "ioi", "--model-name", "llama3"), "has 32491 edges, MIB's llama3 has 1592881"),
    ],
)
def test_what_mib_would_refuse_is_one_line(gpt2_small_graph, tmp_path, run, extra, message):
    root, _ = gpt2_small_graph
    failed = run_driver("mib-export", root / run, *extra, "--out", tmp_path / "sub")
    assert failed.returncode == 2
    (line,) = failed.stderr.strip().splitlines()
    assert message in line
