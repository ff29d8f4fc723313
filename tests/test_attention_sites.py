"""Per-head attention sites (q, k, v, pattern) on every family: both exact paths, AtP and the
donors, against the plain-PyTorch reference (tests/reference.py: hooks on the projections, and
transformers' own eager attention probabilities for patterns)."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

from examples.tiny_families import FAMILIES, build_tiny
from examples.tiny_gpt2 import build_tiny_gpt2
from jobs.pairfile import encoder_for, parse_record
from tests.conftest import ATTENTION_SITES, IOI_LINES, TEST_DEVICE, TOL
from tests.reference import reference_atp
from tests.test_means import by_hand, stored_means
from tests.test_patching import assert_matches_reference, at_labels, by_cell, labelled, resampled
from worker.contract.options import PatchOptions
from worker.methods.registry import patch_batch
from worker.model.checkpoint import load_tokenizer
from worker.model.load import load_model

BUDGET = 24 * 16  # tokens per forward: small, so traces, pair groups and row chunks split


@pytest.fixture(scope="module", params=("gpt2", *FAMILIES))
def family(request, tmp_path_factory):
    """(name, nnsight model, Hugging Face model, two IOI pairs of different lengths in its tokenization)."""
    out = tmp_path_factory.mktemp(request.param)
    model_dir = build_tiny_gpt2(out) if request.param == "gpt2" else build_tiny(request.param, out)
    tokenizer, n_ctx = load_tokenizer(str(model_dir))
    records = [dict(zip(("clean", "corrupted", "correct", "incorrect"), line)) for line in IOI_LINES[1:3]]
    encoder = encoder_for(tokenizer, records)
    pairs = [parse_record(r, str(i), encoder, n_ctx) for i, r in enumerate(records)]
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return request.param, load_model(str(model_dir), device=TEST_DEVICE), hf_model, pairs


def heads_per_site(hf_model) -> dict[str, int]:
    config = hf_model.config
    shared = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return {"q": config.num_attention_heads, "k": shared, "v": shared, "pattern": config.num_attention_heads}


@pytest.mark.parametrize("path", ["trace", "reuse"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_sites_match_hook_reference(family, direction, path):
    _, model, hf_model, pairs = family
    result = patch_batch(model, pairs, ATTENTION_SITES, direction, BUDGET, exact_path=path)
    heads = heads_per_site(hf_model)
    rows = result.effects.to_pylist()
    for component, count in heads.items():  # k and v per key/value head on grouped-query models
        assert {r["head"] for r in rows if r["component"] == component} == set(range(count))
    layers = hf_model.config.num_hidden_layers
    assert len(rows) == sum(p.n_tokens for p in pairs) * layers * sum(heads.values())
    assert_matches_reference(result, hf_model, pairs, direction, min_gap=0.05)


@pytest.mark.parametrize("path", ["trace", "reuse"])
def test_sites_at_all_positions_match_hook_reference(family, path):
    """`all`: every position's query, key or value at once; the whole pattern."""
    _, model, hf_model, pairs = family
    result = patch_batch(model, pairs, ATTENTION_SITES, "noise", BUDGET, "all", exact_path=path)
    assert_matches_reference(result, hf_model, pairs, "noise", all_positions=True, min_gap=0.05)


@pytest.mark.parametrize("path", ["trace", "reuse"])
def test_zero_ablated_sites_match_hook_reference(family, path):
    """Zeros from the first token on (a zero pattern row: the head writes nothing there)."""
    _, model, hf_model, pairs = family
    result = patch_batch(model, pairs, ATTENTION_SITES, "noise", BUDGET, exact_path=path, donor="zero")
    assert_matches_reference(result, hf_model, pairs, "noise", min_gap=0.05, donor="zero")


@pytest.mark.parametrize("donor", ["pair", "zero"])
def test_atp_of_sites_matches_autograd_reference(family, donor):
    """AtP at a pattern: (donor - receiving probabilities) x the gradient at the probabilities,
    summed over sources; at q, k, v over the head's channels."""
    _, model, hf_model, pairs = family
    result = patch_batch(model, pairs, ATTENTION_SITES, "denoise", method="atp", donor=donor)
    baselines = {r["pair_id"]: (r["clean_logit_diff"], r["corrupted_logit_diff"]) for r in result.pairs.to_pylist()}
    estimates = by_cell(result.effects, "estimate")
    for pair in pairs:
        clean, corrupted = baselines[pair.pair_id]
        expected = reference_atp(hf_model, pair, ATTENTION_SITES, "denoise", donor_kind=donor)
        assert sum(key[0] == pair.pair_id for key in estimates) == len(expected)
        for (component, layer, position, head), want in expected.items():
            got = estimates[(pair.pair_id, component, layer, position, head)] * (clean - corrupted) + corrupted
            assert got == pytest.approx(want, rel=1e-4, abs=TOL), (component, layer, position, head)


@pytest.fixture(scope="module")
def gpt2(tiny_model, hf_model, ioi_pairs):
    """The donors and labels below are the same code on every family: checked on GPT-2."""
    return tiny_model, hf_model, ioi_pairs[1:3]


@pytest.mark.parametrize("path", ["trace", "reuse"])
def test_resampled_and_labelled_sites_match_hook_reference(gpt2, path):
    model, hf_model, pairs = gpt2
    pairs = [resampled(labelled(pair)) for pair in pairs]
    options = {"exact_path": path, "donor": "resample"}
    result = patch_batch(model, pairs, ATTENTION_SITES, "denoise", BUDGET, "S2,END", **options)
    wanted = at_labels("S2", "END")
    assert_matches_reference(result, hf_model, pairs, "denoise", wanted=wanted, min_gap=0.05, donor="resample")


@pytest.mark.parametrize("path", ["trace", "reuse"])
def test_mean_ablated_queries_keys_values_match_hook_reference(gpt2, tmp_path, path):
    model, hf_model, pairs = gpt2
    pairs, inputs = [labelled(pair) for pair in pairs], ATTENTION_SITES[:3]
    means = stored_means(model, pairs, inputs, "noise", "mean", tmp_path / "means")
    result = patch_batch(model, pairs, inputs, "noise", BUDGET, exact_path=path, donor="mean", means=means)
    expected = by_hand(hf_model, pairs, inputs, "noise", "mean")
    assert_matches_reference(result, hf_model, pairs, "noise", min_gap=0.05, donor="mean", means=expected)


def test_mean_donors_refuse_patterns():
    """A pattern row has one value per source, so prompts of different lengths share no mean."""
    for donor in ("mean", "mean-all"):
        with pytest.raises(ValueError, match=f"donor {donor} cannot patch pattern"):
            PatchOptions(("head", "pattern"), donor=donor)
