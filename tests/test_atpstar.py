"""AtP* (worker/engines/atpstar.py) against an autograd reference of its two fixes (tests/reference.py::
reference_atpstar): the QK fix's probabilities from a whole forward with the query or key
patched, GradDrop's from one forward and backward per cut block, on every family."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from examples.tiny_gpt2 import build_tiny_gpt2
from tests.conftest import ATTENTION_SITES, OUTPUT_COMPONENTS, TEST_DEVICE, TOL
from tests.reference import reference_atpstar
from tests.test_means import by_hand, stored_means
from tests.test_patching import by_cell, resampled
from worker.engines.atpstar import single_key_effects, single_key_weights
from worker.methods.registry import patch_batch
from worker.model.load import load_model

COMPONENTS = (*OUTPUT_COMPONENTS, *ATTENTION_SITES)


def assert_matches_reference(result, hf_model, pairs, components, direction, **options) -> None:
    """Every cell's estimate (as a metric) and GradDrop size (in metric units) equal the reference's."""
    metric = options.get("metric", "logit_diff")
    baselines = {r["pair_id"]: (r[f"clean_{metric}"], r[f"corrupted_{metric}"]) for r in result.pairs.to_pylist()}
    estimates, sizes = by_cell(result.effects, "estimate"), by_cell(result.effects, "graddrop")
    all_positions = options.pop("positions", "each") == "all"
    for pair in pairs:
        clean, corrupted = baselines[pair.pair_id]
        source, target = (clean, corrupted) if direction == "denoise" else (corrupted, clean)
        expected = reference_atpstar(hf_model, pair, components, direction, all_positions, **options)
        assert sum(key[0] == pair.pair_id for key in estimates) == len(expected)
        for cell, (want, want_size) in expected.items():
            got = estimates[(pair.pair_id, *cell)] * (source - target) + target
            assert got == pytest.approx(want, rel=1e-4, abs=TOL), cell
            size = sizes[(pair.pair_id, *cell)] * abs(clean - corrupted)
            assert size == pytest.approx(want_size, rel=1e-4, abs=TOL), cell


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_atpstar_matches_autograd_reference(hooked_family, direction):
    model, hf_model, pairs = hooked_family
    result = patch_batch(model, pairs, COMPONENTS, direction, method="atpstar")
    assert_matches_reference(result, hf_model, pairs, COMPONENTS, direction)


@pytest.mark.parametrize(
    ("donor", "metric", "positions"),
    [
        ("zero", "logit_diff", "each"),
        ("zero", "kl", "all"),
        ("resample", "prob_diff", "each"),
        ("pair", "logprob", "all"),
    ],
)
def test_atpstar_of_every_donor_metric_and_positions(tiny_model, hf_model, answer_pairs, donor, metric, positions):
    """Ablations change every key and query from the first token; all positions patch every key at once."""
    pairs = [resampled(pair) for pair in answer_pairs["sets"]]
    options = {"metric": metric, "positions": positions, "donor": donor}
    result = patch_batch(tiny_model, pairs, COMPONENTS, "noise", 40 * 16, method="atpstar", **options)
    expected = {"metric": metric, "positions": positions, "donor_kind": donor}
    assert_matches_reference(result, hf_model, pairs, COMPONENTS, "noise", **expected)


def test_atpstar_of_mean_ablation(tiny_model, hf_model, ioi_pairs, tmp_path):
    pairs, components = ioi_pairs[1:3], ("resid", "head", "q", "k")
    means = stored_means(tiny_model, pairs, components, "noise", "mean-all", tmp_path / "means")
    result = patch_batch(tiny_model, pairs, components, "noise", method="atpstar", donor="mean-all", means=means)
    expected = by_hand(hf_model, pairs, components, "noise", "mean-all")
    assert_matches_reference(result, hf_model, pairs, components, "noise", donor_kind="mean-all", means=expected)


def test_single_key_effects_keep_their_precision_where_attention_saturates():
    """A row whose key 2 holds all but 1e-9 of it, that key's score lowered by 25: in float32 the
    closed form equals a float64 softmax per patched key (the naive total-minus-own form does not)."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(1, 1, 6, 6, generator=generator, dtype=torch.float64)
    scores[..., 2] += 25.0
    patched = scores - 25.0 * (torch.arange(6) == 2)
    grad = torch.randn(1, 1, 6, 6, generator=generator, dtype=torch.float64)
    own = scores.softmax(-1)
    expected = torch.empty(1, 1, 6, 6, dtype=torch.float64)
    for s in range(6):
        row = scores.clone()
        row[..., s] = patched[..., s]
        expected[..., s] = ((row.softmax(-1) - own) * grad).sum(-1)
    keep, new = single_key_weights(scores.float(), patched.float())
    got = single_key_effects(own.float(), keep, new, grad.float())
    assert torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-5)
    weighted = (own * grad).float()
    total = weighted.sum(-1, keepdim=True)
    naive = keep * (total - weighted) + new * grad.float() - total
    assert not torch.allclose(naive.double(), expected, rtol=1e-4, atol=1e-5)


def test_atpstar_verifies_its_graddrop_top_cells_exactly(tiny_model, ioi_pairs):
    """--verify-top ranks by GradDrop's size; the verified cells' scores are exact patching's."""
    k, components = 3, ["attn", "head", "k"]
    star = patch_batch(tiny_model, ioi_pairs, components, method="atpstar", verify_top=k).effects.to_pandas()
    exact = patch_batch(tiny_model, ioi_pairs, components).effects.to_pandas()
    verified = star.score.notna()
    assert (verified.groupby(star.pair_id).sum() == 2 * k).all()
    for _, rows in star.groupby("pair_id"):
        assert verified[rows.graddrop.nlargest(k).index].all()
    assert star.score[verified].to_numpy() == pytest.approx(exact.score[verified].to_numpy(), rel=1e-4, abs=1e-5)


def test_atpstar_of_a_one_layer_model(tmp_path, ioi_pairs):
    """No other block to cut: GradDrop's size is |the estimated change|."""
    model_dir = build_tiny_gpt2(tmp_path / "one-layer", n_layer=1)
    pairs = ioi_pairs[1:3]
    result = patch_batch(load_model(str(model_dir), device=TEST_DEVICE), pairs, COMPONENTS, method="atpstar")
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert_matches_reference(result, hf_model, pairs, COMPONENTS, "denoise")
    rows = result.effects.to_pandas()
    assert (rows.graddrop - rows.estimate.abs()).abs().max() < 1e-5  # both over the same |gap|
