"""Mean donors: the stored means against a by-hand mean over the donor prompts (hooks), and
patching with them against the hook and autograd references, on both exact paths, AtP and paths."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs.means_pass import means_table
from tests.conftest import OUTPUT_COMPONENTS, TOL
from tests.reference import capture, position_key, reference_atp
from tests.test_patching import assert_matches_reference, by_cell, labelled
from tests.test_paths import assert_paths_match_reference, paths
from worker.batch.mean_donors import donor_sums
from worker.contract.layout import MEANS_FILE
from worker.contract.options import PatchOptions
from worker.methods.registry import patch_batch


def by_hand(hf_model, pairs, components, direction, donor) -> dict:
    """{(component, layer, key): mean of the donor-side activation over the positions with that key}."""
    found = defaultdict(list)
    for pair in pairs:
        prompt = list(pair.clean_ids if direction == "denoise" else pair.corrupted_ids)
        for component in components:
            for layer in range(hf_model.config.n_layer):
                act = capture(hf_model, prompt, component, layer)[0].detach().double().numpy()
                for t in range(pair.n_tokens):
                    found[(component, layer, position_key(pair, t, donor))].append(act[t])
    return {site: np.mean(vectors, axis=0) for site, vectors in found.items()}


def stored_means(tiny_model, pairs, components, direction, donor, path) -> str:
    """The means as a run stores them: two shards summed by the worker, added and divided."""
    options = PatchOptions(tuple(components), direction=direction, donor=donor)
    sums = [donor_sums(tiny_model, shard, options) for shard in (pairs[:1], pairs[1:])]
    path.mkdir()
    pq.write_table(means_table(sums), path / MEANS_FILE)
    return str(path)


@pytest.mark.parametrize(("donor", "label"), [("mean", True), ("mean", False), ("mean-all", False)])
def test_stored_means_equal_a_by_hand_mean(tiny_model, hf_model, ioi_pairs, tmp_path, donor, label):
    pairs = [labelled(p) for p in ioi_pairs] if label else ioi_pairs
    expected = by_hand(hf_model, pairs, OUTPUT_COMPONENTS, "noise", donor)
    run = stored_means(tiny_model, pairs, OUTPUT_COMPONENTS, "noise", donor, tmp_path / "means")
    table = pq.read_table(f"{run}/{MEANS_FILE}")
    rows = table.to_pylist()
    assert {(r["component"], r["layer"], r["key"]) for r in rows} == expected.keys()
    positions = defaultdict(int)
    for pair in pairs:
        for t in range(pair.n_tokens):
            positions[position_key(pair, t, donor)] += 1
    for row in rows:
        assert row["count"] == positions[row["key"]]
        np.testing.assert_allclose(row["mean"], expected[(row["component"], row["layer"], row["key"])], atol=TOL)


@pytest.mark.parametrize("path", ["trace", "reuse"])
@pytest.mark.parametrize(("donor", "label", "positions"), [("mean", True, "each"), ("mean-all", False, "all")])
def test_mean_ablation_matches_hook_reference(tiny_model, hf_model, ioi_pairs, tmp_path, path, donor, label, positions):
    pairs = [labelled(p) for p in ioi_pairs] if label else ioi_pairs
    means = stored_means(tiny_model, pairs, OUTPUT_COMPONENTS, "noise", donor, tmp_path / "means")
    options = {"exact_path": path, "donor": donor, "means": means}
    result = patch_batch(tiny_model, pairs, OUTPUT_COMPONENTS, "noise", 40 * 16, positions, **options)
    assert result.effects.schema.metadata[b"patchsweep.donor"] == donor.encode()
    expected = by_hand(hf_model, pairs, OUTPUT_COMPONENTS, "noise", donor)
    assert_matches_reference(result, hf_model, pairs, "noise", positions == "all", donor=donor, means=expected)


def test_atp_and_paths_of_mean_ablation_match_references(tiny_model, hf_model, ioi_pairs, tmp_path):
    pairs = [labelled(p) for p in ioi_pairs]
    means = stored_means(tiny_model, pairs, OUTPUT_COMPONENTS, "noise", "mean", tmp_path / "means")
    expected = by_hand(hf_model, pairs, OUTPUT_COMPONENTS, "noise", "mean")
    atp = patch_batch(tiny_model, pairs, OUTPUT_COMPONENTS, "noise", method="atp", donor="mean", means=means)
    baselines = {r["pair_id"]: (r["clean_logit_diff"], r["corrupted_logit_diff"]) for r in atp.pairs.to_pylist()}
    estimates = by_cell(atp.effects, "estimate")
    for pair in pairs:
        clean, corrupted = baselines[pair.pair_id]
        reference = reference_atp(hf_model, pair, OUTPUT_COMPONENTS, "noise", donor_kind="mean", means=expected)
        for (component, layer, position, head), want in reference.items():
            got = estimates[(pair.pair_id, component, layer, position, head)] * (corrupted - clean) + clean
            assert got == pytest.approx(want, rel=1e-4, abs=TOL), (pair.pair_id, component, layer, position, head)
    receivers = ["logits", "1.0:q,2.1:q@END"]
    heads = stored_means(tiny_model, pairs, ["head"], "noise", "mean", tmp_path / "heads")
    result = paths(tiny_model, pairs, receivers, "noise", "each", donor="mean", means=heads)
    for receiver in receivers:
        assert_paths_match_reference(result, hf_model, pairs, receiver, "noise", False, donor="mean", means=expected)


def test_mean_donors_need_their_means(tiny_model, ioi_pairs):
    with pytest.raises(ValueError, match="needs its means"):
        patch_batch(tiny_model, ioi_pairs, ["resid"], donor="mean")
