"""Edge attribution (worker/engines/eap.py) against an autograd reference of its formula with a leaf
copy of each receiver's input (tests/reference.py::reference_eap)."""

from __future__ import annotations

import dataclasses

import pyarrow.compute as pc
import pytest
import torch

from jobs.run import say_if_every_edge_verified
from jobs.spec import JobSpec
from tests.conftest import TOL
from tests.reference import reference_eap, reference_edge_patching, reference_edge_set
from worker.contract.options import METRICS, PatchOptions
from worker.engines.eap import eap_estimates
from worker.engines.edge_patching import exact_edge_values
from worker.engines.edge_sets import edge_set_values
from worker.graph.mib import Graph
from worker.methods.edges import edge_tables
from worker.methods.registry import patch_batch
from worker.model.sites import kv_groups
from worker.model.weights import ungrouped


def test_the_graph_is_eap_igs():
    """GPT-2 small's 32,491 edges; an MLP reads its own layer's heads unless the block is parallel."""
    assert len(Graph(12, 12, parallel=False).edges) == 32491
    names = set(Graph(2, 2, parallel=False).edge_names)
    assert {"input->a0.h1<q>", "a0.h1->m0", "m0->a1.h0<k>", "m1->logits", "input->logits"} <= names
    assert "a1.h0->a1.h1<q>" not in names and "m0->m0" not in names and "a1.h0->m0" not in names
    assert "a0.h1->m0" not in set(Graph(2, 2, parallel=True).edge_names)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_eap_matches_autograd_reference(hooked_family, direction, metric):
    model, hf_model, pairs = hooked_family
    graph = Graph.of(model)
    for pair in pairs:  # one length each: a group each
        options = PatchOptions(("head",), direction=direction, metric=metric)
        with ungrouped(model):
            clean, corrupted, estimates = eap_estimates(model, [pair], options)
        expected = reference_eap(hf_model, pair, direction, metric)
        assert set(graph.edge_names) == set(expected)
        receiving = float(corrupted[0] if direction == "denoise" else clean[0])
        scale = max(abs(want - receiving) for want in expected.values())
        for name, got in zip(graph.edge_names, estimates[0].tolist()):
            assert got == pytest.approx(expected[name], abs=max(TOL, 1e-4 * scale)), name


@pytest.mark.parametrize(("direction", "metric"), [("denoise", "logit_diff"), ("noise", "kl")])
def test_eap_ig_matches_autograd_reference(hooked_family, direction, metric):
    """The gradient averaged over runs on embeddings interpolated from the donor side toward the
    receiving side (EAP-IG-inputs)."""
    model, hf_model, pairs = hooked_family
    graph, pair = Graph.of(model), pairs[0]
    options = PatchOptions(("head",), direction=direction, metric=metric)
    with ungrouped(model):
        clean, corrupted, estimates = eap_estimates(model, [pair], options, steps=3)
        plain = eap_estimates(model, [pair], options)[2]
    expected = reference_eap(hf_model, pair, direction, metric, steps=3)
    receiving = float(corrupted[0] if direction == "denoise" else clean[0])
    scale = max(abs(want - receiving) for want in expected.values())
    assert (estimates - plain).abs().max() > 10 * max(TOL, 1e-4 * scale)  # the steps change the gradient
    for name, got in zip(graph.edge_names, estimates[0].tolist()):
        assert got == pytest.approx(expected[name], abs=max(TOL, 1e-4 * scale)), name


def test_ungrouping_leaves_the_model_as_it_was(hooked_family):
    """Inside `ungrouped` every query head has its own key/value head with the same outputs; after, the
    model is grouped again (an actor's next run patches k and v per key/value head)."""
    model, _, pairs = hooked_family
    grouped = kv_groups(model)
    before = patch_batch(model, pairs, ["k", "resid"], positions="all").effects
    with ungrouped(model):
        assert kv_groups(model) == 1
        inside = patch_batch(model, pairs, ["resid"], positions="all").effects
    after = patch_batch(model, pairs, ["k", "resid"], positions="all").effects
    assert kv_groups(model) == grouped and after.num_rows == before.num_rows > 0
    assert after.column("logit_diff").to_pylist() == before.column("logit_diff").to_pylist()
    resid = before.filter(pc.equal(before["component"], "resid"))
    assert resid.column("logit_diff").to_pylist() == pytest.approx(inside.column("logit_diff").to_pylist(), abs=TOL)


def test_exact_edge_patching_matches_hook_reference(hooked_family):
    """Every edge of a pair patched alone (the receiver reads the stream plus the sender's
    difference, everything downstream recomputed) against whole forwards with hooks; the
    direction differs between families."""
    model, hf_model, pairs = hooked_family
    graph, pair = Graph.of(model), pairs[0]
    direction = "noise" if graph.parallel or kv_groups(model) > 1 else "denoise"
    options = PatchOptions((), direction=direction, method="eap", max_batch_tokens=24 * 16)
    with ungrouped(model):
        clean, corrupted, values = exact_edge_values(model, [pair], options, [(0, e) for e in range(len(graph.edges))])
    expected = reference_edge_patching(hf_model, pair, direction)
    receiving = float(corrupted[0] if direction == "denoise" else clean[0])
    assert sum(abs(want - receiving) > 10 * TOL for want in expected.values()) > len(expected) // 4
    for name, value in zip(graph.edge_names, values.tolist()):
        assert value == pytest.approx(expected[name], abs=TOL), name


def test_patching_a_set_of_edges_matches_hook_reference(hooked_family):
    """Sets of edges patched at once (a random third of the edges, the rest, every edge, none)
    against one whole forward with hooks per set: no edge gives the receiving run, every edge the
    donor run; a one-edge set equals patching that edge alone."""
    model, hf_model, pairs = hooked_family
    graph, pair = Graph.of(model), pairs[0]
    direction = "denoise" if graph.parallel or kv_groups(model) > 1 else "noise"
    some = torch.rand(len(graph.edges), generator=torch.Generator().manual_seed(0)) < 1 / 3
    alone = [3, len(graph.edges) // 2, len(graph.edges) - 1]
    sets = torch.stack(
        [some, ~some, torch.ones_like(some), torch.zeros_like(some)] + [torch.arange(len(some)) == e for e in alone]
    )
    options = PatchOptions((), direction=direction, method="eap", max_batch_tokens=24 * 4)
    clean, corrupted, values = edge_set_values(model, [pair], options, sets, [(0, s) for s in range(len(sets))])
    donor, receiving = (float(clean[0]), float(corrupted[0]))[:: 1 if direction == "denoise" else -1]
    assert abs(donor - receiving) > 10 * TOL
    assert values[2] == pytest.approx(donor, abs=TOL) and values[3] == pytest.approx(receiving, abs=TOL)
    for index, chosen in ((0, some), (1, ~some)):
        names = {name for name, keep in zip(graph.edge_names, chosen.tolist()) if keep}
        expected = reference_edge_set(hf_model, pair, direction, names)
        assert index or min(abs(expected - donor), abs(expected - receiving)) > 10 * TOL  # the rest: often the donor's
        assert values[index] == pytest.approx(expected, abs=TOL)
    with ungrouped(model):
        one_by_one = exact_edge_values(model, [pair], options, [(0, e) for e in alone])[2]
    assert values[4:].tolist() == pytest.approx(one_by_one.tolist(), abs=TOL)


def test_verified_edges_are_exact_and_the_rest_estimated(hooked_family):
    """`verify_top` K: per pair its K largest |estimate| edges and K drawn at random carry the exact
    metric and score (equal to patching those edges alone), every other row only the estimate."""
    model, _, pairs = hooked_family
    pair, k = pairs[0], 4
    options = PatchOptions((), direction="noise", method="eap", verify_top=k)
    rows = edge_tables(model, [pair], options)[0].to_pylist()
    graph = Graph.of(model)
    verified = [i for i, row in enumerate(rows) if row["score"] is not None]
    assert len(verified) == 2 * k and all(rows[i]["logit_diff"] is not None for i in verified)
    top = sorted(range(len(rows)), key=lambda i: -abs(rows[i]["estimate"]))[:k]
    assert set(top) <= set(verified)
    with ungrouped(model):
        clean, corrupted, exact = exact_edge_values(model, [pair], options, [(0, i) for i in verified])
    for i, value in zip(verified, exact.tolist()):
        assert rows[i]["edge"] == graph.edge_names[i]
        assert rows[i]["logit_diff"] == pytest.approx(value, abs=TOL)
        assert rows[i]["score"] == pytest.approx((value - float(clean[0])) / float(corrupted[0] - clean[0]), abs=1e-3)


def test_verify_top_above_the_edge_count_verifies_every_edge_and_says_so_once(hooked_family, capsys, tmp_path):
    """Clipped: every edge of the pair carries its exact value; the driver says it in one note."""
    model, _, pairs = hooked_family
    graph = Graph.of(model)
    options = PatchOptions((), direction="noise", method="eap", verify_top=10 * len(graph.edges))
    rows = edge_tables(model, pairs[:1], options)[0].to_pylist()
    assert len(rows) == len(graph.edges) and all(row["score"] is not None for row in rows)
    source = str(tmp_path / "checkpoint")
    model._module.config.save_pretrained(source)
    spec = JobSpec(pairs="p.jsonl", out="o", model=source, components=(), method="eap", verify_top=options.verify_top)
    say_if_every_edge_verified(spec)
    say_if_every_edge_verified(dataclasses.replace(spec, verify_top=len(graph.edges)))
    note = f"note: --verify-top {options.verify_top} is more than the model's {len(graph.edges)} edges"
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and note in err
