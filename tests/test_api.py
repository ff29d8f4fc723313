"""The public API (`import patchsweep`) is the code the actors run, with the options it is given:
each function's tables equal the runner's on the same options, and record those options."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

import patchsweep as ps
from worker.contract.options import PatchOptions
from worker.methods.faithfulness import evaluate_circuits
from worker.methods.registry import run_method


def options_of(table: pa.Table) -> dict[str, str]:
    meta = table.schema.metadata
    return {key: meta[f"patchsweep.{key}".encode()].decode() for key in ("direction", "metric", "donor")}


def test_read_pairs_checks_against_the_model_s_tokenizer(tiny_model_dir, tmp_path):
    good = {
        "clean": "When Mary and John went",
        "corrupted": "When Mary and Tom went",
        "correct": " a",
        "incorrect": " b",
    }
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "corrupted": "When Mary went"}) + "\n")
    pair_file = ps.read_pairs(str(path), model=str(tiny_model_dir))
    assert len(pair_file.pairs) == 1 and [bad.line for bad in pair_file.invalid] == [2]
    resampled = ps.read_pairs(str(path), model=str(tiny_model_dir), donor="resample")
    assert [bad.line for bad in resampled.invalid] == [1, 2]  # alone in its length: no other pair to resample from


def test_patch_is_the_runner_with_its_options(tiny_model, ioi_pairs):
    result = ps.patch(tiny_model, ioi_pairs, components=["mlp"], direction="noise", metric="kl", donor="zero")
    options = PatchOptions(("mlp",), direction="noise", metric="kl", donor="zero")
    effects, pairs = run_method(tiny_model, ioi_pairs, options, exact_path="auto")
    assert result.effects.equals(effects) and result.pairs.equals(pairs)
    assert options_of(result.effects) == {"direction": "noise", "metric": "kl", "donor": "zero"}
    estimated = ps.patch(tiny_model, ioi_pairs, components=["head"], method="atpstar", verify_top=2).effects
    assert estimated["graddrop"].null_count == 0 and estimated["score"].is_valid().to_pylist().count(True) > 0


def test_paths_and_edges_are_the_runners_with_their_options(tiny_model, ioi_pairs):
    routes = ps.paths(tiny_model, ioi_pairs, receivers=["1.0:q, 1.1:k", "logits"], metric="logprob", direction="noise")
    options = PatchOptions(("head",), "all", "noise", "logprob", method="paths", receivers=("1.0:q,1.1:k", "logits"))
    assert routes.paths.equals(run_method(tiny_model, ioi_pairs, options)[0])
    found = ps.edges(tiny_model, ioi_pairs, method="eap-ig", ig_steps=2, verify_top=1, direction="noise")
    options = PatchOptions((), direction="noise", method="eap-ig", verify_top=1, ig_steps=2)
    assert found.edges.equals(run_method(tiny_model, ioi_pairs, options)[0])
    assert found.edges.num_rows == len(ioi_pairs) * len(found.graph.edges)


def test_evaluate_circuits_takes_selected_and_given_circuits(tiny_model, ioi_pairs, tmp_path):
    found = ps.edges(tiny_model, ioi_pairs)
    chosen = ps.evaluate_circuits(tiny_model, ioi_pairs, edges=found, budgets=["10%"], select="greedy")
    (given := tmp_path / "mine.json").write_text(chosen.circuits[0].to_json())
    both = ps.evaluate_circuits(
        tiny_model, ioi_pairs, edges=found, budgets=["10%"], select="greedy", circuit=[str(given)], donor="zero"
    )
    assert [c.name for c in both.circuits] == ["greedy-10pct", "mine"]
    assert both.circuits[0].edges == both.circuits[1].edges == chosen.circuits[0].edges
    options = PatchOptions((), direction="noise", method="circuit", donor="zero", circuits=("greedy-10pct", "mine"))
    assert both.faithfulness.equals(evaluate_circuits(tiny_model, ioi_pairs, options, both.circuits)[0])
    assert options_of(both.faithfulness)["donor"] == "zero"
    with pytest.raises(ValueError, match="circuits"):
        ps.evaluate_circuits(tiny_model, ioi_pairs)  # nothing to evaluate
