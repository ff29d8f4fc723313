"""The nnsight patching core against an independent plain-PyTorch hook reference."""

from __future__ import annotations

import dataclasses

import pytest

from tests.conftest import OUTPUT_COMPONENTS, TOL, score_tolerance
from tests.reference import reference_atp, reference_patching
from worker.batch.cells import patch_cells, selected_cells
from worker.batch.donors import Donors
from worker.contract.options import DEFAULT_COMPONENTS, METRICS, PatchOptions
from worker.engines.trace import cells_to_run, split_into_traces
from worker.methods.registry import patch_batch
from worker.model.sites import n_layers


def by_cell(effects, column):
    rows = effects.to_pylist()
    return {(r["pair_id"], r["component"], r["layer"], r["position"], r["head"]): r[column] for r in rows}


def assert_matches_reference(
    result,
    hf_model,
    pairs,
    direction,
    all_positions=False,
    wanted=None,
    tol=TOL,
    min_gap=50 * TOL,
    donor="pair",
    means=None,
):
    """Every row of `result` equals the hook reference, and every expected cell has a row.

    `wanted(pair)`: the positions a label list selects for `pair` (default: every cell).
    `min_gap`: how far apart each pair's clean and corrupted values must be for its scores to
    be a test (with a smaller gap the score tolerance grows until it says little).
    """
    metric = result.effects.schema.metadata[b"patchsweep.metric"].decode()
    values, scores = by_cell(result.effects, metric), by_cell(result.effects, "score")
    baselines = {r["pair_id"]: r for r in result.pairs.to_pylist()}
    components = sorted(set(result.effects.column("component").to_pylist()))
    for pair in pairs:
        expected = reference_patching(hf_model, pair, components, direction, all_positions, metric, donor, means)
        clean, corrupted = expected["clean"], expected["corrupted"]
        assert abs(clean - corrupted) > min_gap, "test pair too weak to normalise"
        assert baselines[pair.pair_id][f"clean_{metric}"] == pytest.approx(clean, abs=tol)
        assert baselines[pair.pair_id][f"corrupted_{metric}"] == pytest.approx(corrupted, abs=tol)
        source, target = (clean, corrupted) if direction == "denoise" else (corrupted, clean)
        cells = [key for key in expected if isinstance(key, tuple) and (wanted is None or key[2] in wanted(pair))]
        for component, layer, position, head in cells:
            key = (pair.pair_id, component, layer, position, head)
            want = expected[(component, layer, position, head)]
            assert values[key] == pytest.approx(want, abs=tol), key
            want_score = (want - target) / (source - target)
            assert scores[key] == pytest.approx(want_score, abs=score_tolerance(want_score, clean, corrupted, tol)), key
        assert sum(key[0] == pair.pair_id for key in values) == len(cells)


@pytest.mark.parametrize("path", ["trace", "reuse"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_matches_hook_reference_for_every_cell(tiny_model, hf_model, ioi_pairs, direction, path):
    # A small token budget forces several traces (or pair groups and row chunks) per length group.
    result = patch_batch(tiny_model, ioi_pairs, OUTPUT_COMPONENTS, direction, max_batch_tokens=40 * 16, exact_path=path)
    assert len({p.n_tokens for p in ioi_pairs}) == 3
    config = hf_model.config
    assert result.effects.num_rows == sum(p.n_tokens * config.n_layer * (3 + config.n_head) for p in ioi_pairs)
    assert_matches_reference(result, hf_model, ioi_pairs, direction)


@pytest.mark.parametrize("path", ["trace", "reuse"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_all_positions_at_once_match_hook_reference(tiny_model, hf_model, ioi_pairs, direction, path):
    result = patch_batch(
        tiny_model, ioi_pairs, OUTPUT_COMPONENTS, direction, max_batch_tokens=40 * 16, exact_path=path, positions="all"
    )
    config = hf_model.config
    assert result.effects.num_rows == len(ioi_pairs) * config.n_layer * (3 + config.n_head)
    assert result.effects.column("position").null_count == result.effects.num_rows
    assert_matches_reference(result, hf_model, ioi_pairs, direction, all_positions=True)


@pytest.mark.parametrize("path", ["trace", "reuse"])
@pytest.mark.parametrize(("direction", "positions"), [("denoise", "each"), ("noise", "each"), ("noise", "all")])
def test_zero_ablation_matches_hook_reference(tiny_model, hf_model, ioi_pairs, direction, positions, path):
    """Zeros in place of each activation, at every cell: before the first differing token too
    (an ablation changes every position), scored against the pair's own baselines."""
    result = patch_batch(
        tiny_model, ioi_pairs, OUTPUT_COMPONENTS, direction, 40 * 16, positions, exact_path=path, donor="zero"
    )
    assert result.effects.schema.metadata[b"patchsweep.donor"] == b"zero"
    assert result.pairs.schema.metadata[b"patchsweep.donor"] == b"zero"
    assert_matches_reference(result, hf_model, ioi_pairs, direction, positions == "all", donor="zero")
    if positions == "each":
        start = {p.pair_id: p.first_difference for p in ioi_pairs}
        early = [r["score"] for r in result.effects.to_pylist() if r["position"] < start[r["pair_id"]]]
        assert early and any(abs(score) > 1e-3 for score in early)


def resampled(pair):
    """The pair with a prompt to resample from: its clean prompt's first three tokens, then the rest
    reversed (any prompt of its length will do for the worker; the driver picks another pair's)."""
    donor = pair.clean_ids[:3] + tuple(reversed(pair.clean_ids[3:]))
    return dataclasses.replace(pair, donor_pair_id=f"{pair.pair_id}-reversed", donor_ids=donor)


@pytest.mark.parametrize("path", ["trace", "reuse"])
@pytest.mark.parametrize(("direction", "positions"), [("denoise", "each"), ("noise", "each"), ("noise", "all")])
def test_resample_ablation_matches_hook_reference(tiny_model, hf_model, ioi_pairs, direction, positions, path):
    """Each pair's patches take their values from another prompt of its length, read as a third row."""
    pairs = [resampled(pair) for pair in ioi_pairs]
    result = patch_batch(
        tiny_model, pairs, OUTPUT_COMPONENTS, direction, 40 * 16, positions, exact_path=path, donor="resample"
    )
    assert result.effects.schema.metadata[b"patchsweep.donor"] == b"resample"
    assert_matches_reference(result, hf_model, pairs, direction, positions == "all", donor="resample")


def test_resampling_needs_a_prompt_to_resample_from(tiny_model, ioi_pairs):
    with pytest.raises(ValueError, match="no donor prompt to resample from"):
        patch_batch(tiny_model, ioi_pairs, ["resid"], donor="resample")


def labelled(pair):
    """`early` before the first differing token, `S2` at it, `END` last, `x` elsewhere."""
    labels = ["x"] * pair.n_tokens
    labels[1], labels[pair.first_difference], labels[-1] = "early", "S2", "END"
    return dataclasses.replace(pair, labels=tuple(labels))


def at_labels(*names):
    return lambda pair: {i for i, label in enumerate(pair.labels) if label in names}


@pytest.mark.parametrize("path", ["trace", "reuse"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_listed_labels_patch_only_their_positions(tiny_model, hf_model, ioi_pairs, direction, path):
    pairs = [labelled(pair) for pair in ioi_pairs]
    result = patch_batch(
        tiny_model,
        pairs,
        OUTPUT_COMPONENTS,
        direction,
        max_batch_tokens=40 * 16,
        exact_path=path,
        positions="early,S2,END",
    )
    config = hf_model.config
    assert result.effects.num_rows == len(pairs) * 3 * config.n_layer * (3 + config.n_head)
    assert_matches_reference(result, hf_model, pairs, direction, wanted=at_labels("early", "S2", "END"))


@pytest.mark.parametrize("path", ["trace", "reuse"])
def test_labels_before_the_first_difference_score_zero_and_keep_baselines(tiny_model, hf_model, ioi_pairs, path):
    pairs = [labelled(pair) for pair in ioi_pairs]
    result = patch_batch(tiny_model, pairs, ["resid", "head"], exact_path=path, positions="early")
    assert set(result.effects.column("score").to_pylist()) == {0.0}
    assert_matches_reference(result, hf_model, pairs, "denoise", wanted=at_labels("early"))


@pytest.mark.parametrize("path", ["trace", "reuse"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("answers", ["single", "sets"])
@pytest.mark.parametrize("metric", METRICS)
def test_every_metric_matches_hook_reference(tiny_model, hf_model, answer_pairs, metric, answers, direction, path):
    pairs = answer_pairs[answers]
    result = patch_batch(
        tiny_model, pairs, OUTPUT_COMPONENTS, direction, max_batch_tokens=40 * 16, exact_path=path, metric=metric
    )
    assert result.effects.schema.names[5] == metric
    assert [f"clean_{metric}", f"corrupted_{metric}"] <= result.pairs.schema.names
    assert_matches_reference(result, hf_model, pairs, direction)
    if metric == "kl":  # the donor's divergence from itself
        donor = "clean_kl" if direction == "denoise" else "corrupted_kl"
        assert max(abs(kl) for kl in result.pairs.column(donor).to_pylist()) < 1e-5


@pytest.mark.parametrize("metric", ["logprob", "kl"])
def test_metrics_that_read_only_correct_answers_need_no_incorrect(tiny_model, hf_model, answer_pairs, metric):
    pairs = [dataclasses.replace(pair, incorrect=(), incorrect_ids=()) for pair in answer_pairs["sets"]]
    result = patch_batch(tiny_model, pairs, ["resid", "head"], metric=metric)
    assert result.pairs.column("incorrect_ids").null_count == len(pairs)
    assert_matches_reference(result, hf_model, pairs, "denoise")


def test_table_shapes_and_direction(tiny_model, ioi_pairs):
    result = patch_batch(tiny_model, ioi_pairs, ["resid", "mlp"], "noise")
    n_layers = len(tiny_model.transformer.h)
    assert result.effects.num_rows == sum(2 * n_layers * p.n_tokens for p in ioi_pairs)
    assert set(result.effects.column("component").to_pylist()) == {"resid", "mlp"}
    assert result.effects.column("head").null_count == result.effects.num_rows
    assert result.pairs.column("pair_id").to_pylist() == [p.pair_id for p in ioi_pairs]
    for table in (result.effects, result.pairs):
        assert table.schema.metadata[b"patchsweep.direction"] == b"noise"
        assert table.schema.metadata[b"patchsweep.metric"] == b"logit_diff"
    assert result.pairs.column("tokens").to_pylist()[0] == list(ioi_pairs[0].tokens)


def test_last_layer_resid_at_last_position_restores_donor(tiny_model, ioi_pairs):
    result = patch_batch(tiny_model, ioi_pairs, ["resid"])
    last_layer = len(tiny_model.transformer.h) - 1
    for row in result.effects.to_pylist():
        pair = next(p for p in ioi_pairs if p.pair_id == row["pair_id"])
        if row["layer"] == last_layer and row["position"] == pair.n_tokens - 1:
            assert row["score"] == pytest.approx(1.0, abs=TOL)


def test_positions_before_first_difference_score_zero_at_layer_zero(tiny_model, ioi_pairs):
    result = patch_batch(tiny_model, ioi_pairs, OUTPUT_COMPONENTS)
    first_diff = {
        p.pair_id: next(i for i, (a, b) in enumerate(zip(p.clean_ids, p.corrupted_ids)) if a != b) for p in ioi_pairs
    }
    checked = 0
    for row in result.effects.to_pylist():
        if row["layer"] == 0 and row["position"] < first_diff[row["pair_id"]]:
            assert row["score"] == pytest.approx(0.0, abs=TOL)
            checked += 1
    assert checked > 0


def test_reuse_and_trace_agree_in_bfloat16_too(tiny_model_dir, ioi_pairs):
    from worker.model.load import load_model

    model = load_model(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    trace = by_cell(patch_batch(model, ioi_pairs, OUTPUT_COMPONENTS, exact_path="trace").effects, "logit_diff")
    reuse = by_cell(patch_batch(model, ioi_pairs, OUTPUT_COMPONENTS, exact_path="reuse").effects, "logit_diff")
    assert trace.keys() == reuse.keys()
    assert max(abs(trace[k] - reuse[k]) for k in trace) < 0.25  # bfloat16 keeps ~3 significant digits


def test_auto_exact_path_picks_reuse_for_gpt2_and_rejects_unknown(tiny_model, ioi_pairs):
    from worker.engines.reuse import resolve_exact_path

    assert resolve_exact_path("auto") == "reuse"
    with pytest.raises(ValueError, match="exact_path"):
        patch_batch(tiny_model, ioi_pairs, ["resid"], exact_path="fastest")


def test_padding_free_grouping_equals_solo_runs(tiny_model, ioi_pairs):
    together = by_cell(patch_batch(tiny_model, ioi_pairs, ["attn"]).effects, "logit_diff")
    for pair in ioi_pairs:
        alone = by_cell(patch_batch(tiny_model, [pair], ["attn"]).effects, "logit_diff")
        for key, value in alone.items():
            assert together[key] == pytest.approx(value, abs=TOL)


def test_trace_split_respects_row_budget_and_covers_all_work():
    work = [(p, c) for p in range(5) for c in range(7)]
    chunks = split_into_traces(work, max_rows=10)
    assert [item for chunk in chunks for item in chunk] == work
    for chunk in chunks:
        assert len(chunk) + 2 * len({p for p, _ in chunk}) <= 10


def test_cells_before_the_first_difference_need_no_forward_pass(ioi_pairs):
    """From the pair's other prompt; an ablation changes every position, so every cell runs (but
    those of the last block that cannot reach the last position)."""
    n_tokens = ioi_pairs[0].n_tokens
    cells = patch_cells(DEFAULT_COMPONENTS, 3, n_tokens)
    rows = selected_cells(ioi_pairs[:1], cells)
    work = cells_to_run(ioi_pairs[:1], cells, rows, Donors.of(PatchOptions()), 3)
    start = ioi_pairs[0].first_difference
    assert 0 < start < n_tokens - 1
    assert {cells[c].position for _, c in work} == set(range(start, n_tokens))
    assert len(work) == 3 * 2 * (n_tokens - start) + 3
    ablated = cells_to_run(ioi_pairs[:1], cells, rows, Donors.of(PatchOptions(donor="zero")), 3)
    assert len(ablated) == 3 * 2 * n_tokens + 3


def test_last_block_cells_that_cannot_reach_the_last_position_need_no_forward_pass(ioi_pairs):
    """In the last block only keys and values (read by the last position's attention) and the
    last position itself reach the metric; `all` positions always do."""
    n_tokens = ioi_pairs[0].n_tokens
    components = ("resid", "attn", "mlp", "head", "q", "k", "v", "pattern")
    cells = patch_cells(components, 2, n_tokens, dict.fromkeys(components[3:], 2))
    rows = selected_cells(ioi_pairs[:1], cells)
    run = {cells[c] for _, c in cells_to_run(ioi_pairs[:1], cells, rows, Donors.of(PatchOptions(donor="zero")), 2)}
    skipped = {cell for cell in cells if cell not in run}
    assert skipped == {
        cell for cell in cells if cell.layer == 1 and cell.component not in ("k", "v") and cell.position < n_tokens - 1
    }
    every = patch_cells(components, 2, n_tokens, dict.fromkeys(components[3:], 2), positions="all")
    assert len(
        cells_to_run(ioi_pairs[:1], every, selected_cells(ioi_pairs[:1], every), Donors.of(PatchOptions()), 2)
    ) == len(every)


@pytest.mark.parametrize("method", ["exact", "atp"])
def test_cells_that_cannot_reach_the_metric_are_exactly_zero(tiny_model, ioi_pairs, method):
    """Not float noise around zero: the last block's resid before the last position is the
    receiving run itself (score and estimate 0.0), while its keys there still move the metric
    (some heads attend to a key so little that zeroing it changes nothing in float32)."""
    result = patch_batch(tiny_model, ioi_pairs[:2], ["resid", "k"], donor="zero", method=method).effects.to_pylist()
    last_layer, n_tokens = n_layers(tiny_model) - 1, {p.pair_id: p.n_tokens for p in ioi_pairs}
    at_last_layer = [r for r in result if r["layer"] == last_layer and r["position"] < n_tokens[r["pair_id"]] - 1]
    statistic = "score" if method == "exact" else "estimate"
    assert {r[statistic] for r in at_last_layer if r["component"] == "resid"} == {0.0}
    assert any(r[statistic] != 0.0 for r in at_last_layer if r["component"] == "k")


def test_rejects_unknown_component_direction_and_metric(tiny_model, ioi_pairs):
    with pytest.raises(ValueError, match="components"):
        patch_batch(tiny_model, ioi_pairs, ["heads"])
    with pytest.raises(ValueError, match="direction"):
        patch_batch(tiny_model, ioi_pairs, ["resid"], direction="sideways")
    with pytest.raises(ValueError, match="metric"):
        patch_batch(tiny_model, ioi_pairs, ["resid"], metric="accuracy")


def test_empty_input_gives_empty_tables(tiny_model):
    result = patch_batch(tiny_model, [])
    assert result.effects.num_rows == 0 and result.pairs.num_rows == 0


@pytest.mark.parametrize("positions", ["each", "all"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("metric", METRICS)
def test_atp_estimates_match_an_autograd_reference(tiny_model, hf_model, answer_pairs, metric, direction, positions):
    pairs = answer_pairs["sets"]
    result = patch_batch(
        tiny_model,
        pairs,
        OUTPUT_COMPONENTS,
        direction,
        max_batch_tokens=40 * 16,
        positions=positions,
        metric=metric,
        method="atp",
    )
    rows = result.effects.to_pylist()
    assert {r[metric] for r in rows} == {None} and {r["score"] for r in rows} == {None}  # nothing verified
    baselines = {r["pair_id"]: (r[f"clean_{metric}"], r[f"corrupted_{metric}"]) for r in result.pairs.to_pylist()}
    estimates = by_cell(result.effects, "estimate")
    for pair in pairs:
        expected = reference_atp(hf_model, pair, OUTPUT_COMPONENTS, direction, positions == "all", metric)
        clean, corrupted = baselines[pair.pair_id]
        source, target = (clean, corrupted) if direction == "denoise" else (corrupted, clean)
        assert sum(key[0] == pair.pair_id for key in estimates) == len(expected)
        for (component, layer, position, head), want in expected.items():
            got = estimates[(pair.pair_id, component, layer, position, head)] * (source - target) + target
            assert got == pytest.approx(want, rel=1e-4, abs=TOL), (pair.pair_id, component, layer, position, head)


@pytest.mark.parametrize(
    ("donor", "metric", "positions"),
    [("zero", "logit_diff", "each"), ("zero", "kl", "all"), ("resample", "kl", "each")],
)
def test_atp_of_ablations_matches_an_autograd_reference(tiny_model, hf_model, answer_pairs, donor, metric, positions):
    """AtP's (donor - receiving) difference with the ablation's values for the donor (zeros:
    -activation x gradient)."""
    pairs = [resampled(pair) for pair in answer_pairs["sets"]]
    result = patch_batch(
        tiny_model, pairs, OUTPUT_COMPONENTS, "noise", 40 * 16, positions, metric, method="atp", donor=donor
    )
    baselines = {r["pair_id"]: (r[f"clean_{metric}"], r[f"corrupted_{metric}"]) for r in result.pairs.to_pylist()}
    estimates = by_cell(result.effects, "estimate")
    for pair in pairs:
        expected = reference_atp(hf_model, pair, OUTPUT_COMPONENTS, "noise", positions == "all", metric, donor)
        clean, corrupted = baselines[pair.pair_id]
        assert sum(key[0] == pair.pair_id for key in estimates) == len(expected)
        for (component, layer, position, head), want in expected.items():
            got = estimates[(pair.pair_id, component, layer, position, head)] * (corrupted - clean) + clean
            assert got == pytest.approx(want, rel=1e-4, abs=TOL), (pair.pair_id, component, layer, position, head)


@pytest.mark.parametrize("path", ["trace", "reuse"])
def test_atp_verified_rows_are_exact_and_the_rest_are_estimates(tiny_model, ioi_pairs, path):
    k = 5
    atp = patch_batch(tiny_model, ioi_pairs, OUTPUT_COMPONENTS, method="atp", verify_top=k, exact_path=path)
    exact = by_cell(patch_batch(tiny_model, ioi_pairs, OUTPUT_COMPONENTS, exact_path=path).effects, "logit_diff")
    rows = atp.effects.to_pylist()
    assert len(rows) == len(exact)
    for pair in ioi_pairs:
        mine = [r for r in rows if r["pair_id"] == pair.pair_id]
        verified = [r for r in mine if r["logit_diff"] is not None]
        assert len(verified) == 2 * k and all(r["score"] is not None for r in verified)
        for r in verified:
            assert r["logit_diff"] == pytest.approx(
                exact[(pair.pair_id, r["component"], r["layer"], r["position"], r["head"])], abs=TOL
            )
        top = sorted(mine, key=lambda r: -abs(r["estimate"]))[:k]
        assert all(r["logit_diff"] is not None for r in top)  # the k largest estimates are among the verified
    again = patch_batch(tiny_model, ioi_pairs, OUTPUT_COMPONENTS, method="atp", verify_top=k, exact_path=path)
    assert (
        again.effects.column("logit_diff").is_null().to_pylist()
        == atp.effects.column("logit_diff").is_null().to_pylist()
    )
