"""Path patching (worker/engines/path_patching.py) against a literal plain-PyTorch hook reference of the IOI
paper's recipe, and the checks its definition implies."""

from __future__ import annotations

import dataclasses

import pytest

from tests.conftest import TOL, score_tolerance
from tests.reference import reference_paths
from tests.test_patching import resampled
from worker.contract.options import PatchOptions
from worker.methods.paths import path_batch
from worker.methods.registry import patch_batch


def labelled(pairs):
    """The pairs with position labels: `S2` at the first differing token, `END` last, `x` elsewhere."""

    def labels(pair):
        names = ["x"] * pair.n_tokens
        names[pair.first_difference], names[-1] = "S2", "END"
        return tuple(names)

    return [dataclasses.replace(pair, labels=labels(pair)) for pair in pairs]


def paths(
    model,
    pairs,
    receivers,
    direction="denoise",
    positions="all",
    metric="logit_diff",
    max_batch_tokens=4096,
    donor="pair",
    means=None,
):
    options = PatchOptions(
        ("head",), positions, direction, metric, max_batch_tokens, "paths", 0, tuple(receivers), donor, means=means
    )
    return path_batch(model, pairs, options)


def by_sender(table, receiver, column):
    return {
        (r["pair_id"], r["sender_layer"], r["sender_head"], r["sender_position"]): r[column]
        for r in table.to_pylist()
        if r["receiver"] == receiver
    }


def assert_paths_match_reference(
    result,
    hf_model,
    pairs,
    receiver,
    direction,
    all_positions,
    metric="logit_diff",
    min_gap=50 * TOL,
    donor="pair",
    means=None,
):
    values, scores = by_sender(result.paths, receiver, metric), by_sender(result.paths, receiver, "score")
    baselines = {r["pair_id"]: r for r in result.pairs.to_pylist()}
    for pair in pairs:
        clean, corrupted = baselines[pair.pair_id][f"clean_{metric}"], baselines[pair.pair_id][f"corrupted_{metric}"]
        source, target = (clean, corrupted) if direction == "denoise" else (corrupted, clean)
        expected = reference_paths(hf_model, pair, receiver, direction, all_positions, metric, donor, means)
        assert sum(key[0] == pair.pair_id for key in values) == len(expected)
        for (layer, head, position), want in expected.items():
            key = (pair.pair_id, layer, head, position)
            assert values[key] == pytest.approx(want, abs=TOL), (receiver, key)
            if abs(clean - corrupted) > min_gap:
                want_score = (want - target) / (source - target)
                assert scores[key] == pytest.approx(want_score, abs=score_tolerance(want_score, clean, corrupted)), (
                    receiver,
                    key,
                )


RECEIVERS = ["logits", "1.0:q,1.2:q,2.1:q@END", "1.3:v,2.0:v", "2.2:k,1.1:v@S2"]


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("positions", ["all", "each"])
def test_matches_hook_reference(tiny_model, hf_model, ioi_pairs, direction, positions):
    pairs = labelled(ioi_pairs)
    # a small token budget splits the pairs into groups and the senders into chunks
    result = paths(tiny_model, pairs, RECEIVERS, direction, positions, max_batch_tokens=40 * 4)
    senders = sum(3 * 4 * (1 if positions == "all" else p.n_tokens) for p in pairs)  # 3 layers of 4 heads
    assert result.paths.num_rows == len(RECEIVERS) * senders
    for receiver in RECEIVERS:
        assert_paths_match_reference(result, hf_model, pairs, receiver, direction, positions == "all")


@pytest.mark.parametrize("metric", ["kl", "prob_diff"])
def test_every_metric_matches_hook_reference(tiny_model, hf_model, ioi_pairs, metric):
    pairs = labelled(ioi_pairs)
    result = paths(tiny_model, pairs, ["logits", "1.0:q,2.1:q@END"], "noise", metric=metric)
    for receiver in ("logits", "1.0:q,2.1:q@END"):
        assert_paths_match_reference(result, hf_model, pairs, receiver, "noise", True, metric, min_gap=0)


@pytest.mark.parametrize(("donor", "positions"), [("zero", "all"), ("zero", "each"), ("resample", "each")])
def test_ablated_senders_match_hook_reference(tiny_model, hf_model, ioi_pairs, donor, positions):
    """The sender's output zeroed, or taken from another prompt, in the frozen run, at every
    position where that changes the run (before the first differing token too, for zeros)."""
    pairs = [resampled(pair) for pair in labelled(ioi_pairs)]
    receivers = ["logits", "1.0:q,2.1:q@END", "1.3:v,2.0:v"]
    result = paths(tiny_model, pairs, receivers, "noise", positions, max_batch_tokens=40 * 4, donor=donor)
    assert result.paths.schema.metadata[b"patchsweep.donor"] == donor.encode()
    for receiver in receivers:
        assert_paths_match_reference(result, hf_model, pairs, receiver, "noise", positions == "all", donor=donor)


def test_sender_at_or_above_every_receiver_changes_nothing(tiny_model, ioi_pairs):
    """Heads read their layer's input, so a sender in a receiver's layer or later cannot reach it:
    its value is the receiving run's, exactly."""
    result = paths(tiny_model, ioi_pairs, ["1.0:q,1.3:v"], positions="each")
    corrupted = {r["pair_id"]: r["corrupted_logit_diff"] for r in result.pairs.to_pylist()}
    rows = result.paths.to_pylist()
    above = [r for r in rows if r["sender_layer"] >= 1]
    assert above and all(r["score"] == 0.0 and r["logit_diff"] == corrupted[r["pair_id"]] for r in above)
    assert any(r["score"] != 0.0 for r in rows if r["sender_layer"] == 0)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("positions", ["all", "each"])
def test_last_layer_logits_path_is_activation_patching(tiny_model, ioi_pairs, direction, positions):
    """A last-layer head has no head after it: its only path to the logits is the direct one, so
    path patching to `logits` equals activation patching of that head (at the same positions)."""
    path_rows = paths(tiny_model, ioi_pairs, ["logits"], direction, positions).paths.to_pylist()
    effects = patch_batch(tiny_model, ioi_pairs, ["head"], direction, positions=positions).effects.to_pylist()
    patched = {
        (r["pair_id"], r["layer"], r["head"], r["position"]): r["logit_diff"] for r in effects if r["layer"] == 2
    }
    last = {
        (r["pair_id"], r["sender_layer"], r["sender_head"], r["sender_position"]): r["logit_diff"]
        for r in path_rows
        if r["sender_layer"] == 2
    }
    assert last.keys() == patched.keys()
    for key, value in last.items():
        assert value == pytest.approx(patched[key], abs=TOL), key


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_paths_to_the_last_layer_and_logits_add_up_to_activation_patching(tiny_model, ioi_pairs, direction):
    """A head of the second-to-last layer patched at a position t before the last changes the
    stream only at t, and only through the MLP: the `logits` path is exactly 0, and the last layer
    (every head's q, k and v, at every position) reads that stream just as in activation patching,
    while the last position's own stream is untouched in both. So path patching through every
    last-layer head equals activation patching, and the two paths add up to it. (At the last
    position, the MLPs and norms are not linear: the two paths do not add up exactly there.)"""
    last_layer = ",".join(f"2.{head}:{x}" for head in range(4) for x in "qkv")
    rows = paths(tiny_model, ioi_pairs, ["logits", last_layer], direction, "each").paths.to_pylist()
    effects = patch_batch(tiny_model, ioi_pairs, ["head"], direction).effects.to_pylist()
    patched = {(r["pair_id"], r["layer"], r["head"], r["position"]): r["logit_diff"] for r in effects}
    receiving = {
        r["pair_id"]: r["corrupted_logit_diff" if direction == "denoise" else "clean_logit_diff"]
        for r in paths(tiny_model, ioi_pairs, ["logits"], direction).pairs.to_pylist()
    }
    n_tokens = {p.pair_id: p.n_tokens for p in ioi_pairs}
    checked = 0
    for r in rows:
        key = (r["pair_id"], r["sender_layer"], r["sender_head"], r["sender_position"])
        if r["sender_layer"] != 1 or r["sender_position"] == n_tokens[r["pair_id"]] - 1:
            continue
        if r["receiver"] == "logits":
            assert r["logit_diff"] == receiving[r["pair_id"]], key
        else:
            assert r["logit_diff"] == pytest.approx(patched[key], abs=TOL), key
            checked += patched[key] != receiving[r["pair_id"]]
    assert checked > 20
