"""Split-half stability (jobs/results/stability.py) on synthetic runs: reproducible from its seed,
equal to a by-hand split with scipy's Spearman, and telling a run whose pairs agree from one whose
pairs are noise."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from scipy import stats

from jobs.results.aggregate import aggregate
from jobs.results.stability import TOP, stability
from jobs.store import Store
from tests.test_aggregate import pair_row
from worker.contract.tables import effects_schema, pair_columns

LABELS = ["S1", "x", "S2", "y", "END"]
LAYERS = 4


def synthetic_run(
    root,
    agree: bool,
    n_pairs: int = 40,
    seed: int = 0,
    flipped: bool = False,
    zeros: bool = False,
    float_noise: float = 0.0,
) -> tuple[Store, pd.DataFrame]:
    """Labelled pairs whose resid and mlp cells have each a fixed effect plus a little noise
    (`agree`), or nothing but noise; pair p3 has a gap below the min gap. Odd pairs are template
    t1, even ones t0; `flipped`: t1's effects are t0's negated. `zeros`: the cells a patch cannot
    move (the first two positions, before the prompts differ, and the last layer before the last
    position) are exactly 0; `float_noise`: the standard deviation of rounding-sized noise added
    to every score (drawn from a generator of its own, so the rest of the run is the same)."""
    rng, rounding = np.random.default_rng(seed), np.random.default_rng([seed, 1])
    base = rng.normal(size=(2, LAYERS, len(LABELS)))
    pairs = [pair_row(f"p{i}", len(LABELS), LABELS, 2.0, 1.95 if i == 3 else -1.0, f"t{i % 2}") for i in range(n_pairs)]
    rows = []
    for p in pairs:
        for c, component in enumerate(("resid", "mlp")):
            for layer in range(LAYERS):
                for position in range(len(LABELS)):
                    sign = -1 if flipped and p["template"] == "t1" else 1
                    effect = sign * base[c, layer, position] if agree else 0.0
                    score = effect + rng.normal(scale=0.05 if agree else 1.0)
                    unmoved = position < 2 or (layer == LAYERS - 1 and position < len(LABELS) - 1)
                    score = 0.0 if zeros and unmoved else score
                    score += rounding.normal(scale=float_noise) if float_noise else 0.0
                    rows.append(
                        {
                            "pair_id": p["pair_id"],
                            "component": component,
                            "layer": layer,
                            "position": position,
                            "head": None,
                            "logit_diff": score,
                            "score": score,
                        }
                    )
    store = Store(str(root))
    store.prepare("hash", overwrite=False)
    writer, pair_schema = store.part_writer(), pa.schema([*pair_columns("logit_diff"), ("template", pa.string())])
    shards = [f"part-{i:05d}" for i in range(4)]
    for k, shard in enumerate(shards):
        ids = {p["pair_id"] for p in pairs[k::4]}
        writer.write_pairs(shard, pa.Table.from_pylist([p for p in pairs if p["pair_id"] in ids], schema=pair_schema))
        mine = [r for r in rows if r["pair_id"] in ids]
        writer.write_results(shard, pa.Table.from_pylist(mine, schema=effects_schema("logit_diff")))
    store.write_pairs_table(shards)
    return store, pd.DataFrame(rows)


def test_halves_are_reproducible_from_the_seed(tmp_path):
    store, _ = synthetic_run(tmp_path / "run", agree=False)
    first = stability(store, "logit_diff", 0.1, "score", splits=5, seed=3)
    assert first.equals(stability(store, "logit_diff", 0.1, "score", splits=5, seed=3))
    assert not first.equals(stability(store, "logit_diff", 0.1, "score", splits=5, seed=4))
    assert first.schema.metadata[b"patchsweep.seed"] == b"3" and store.exists("stability.parquet")


@pytest.mark.parametrize("size", [None, 16])
def test_a_split_equals_one_by_hand(tmp_path, size):
    """Split 2 by the documented recipe: the kept pairs' ids sorted, permuted by
    default_rng([seed, split]) (for a smaller sample of `size` pairs, [seed, split, size], its
    first `size` pairs halved), the first half A; per cell each half's mean, scipy's Spearman."""
    store, rows = synthetic_run(tmp_path / "run", agree=False)
    table = stability(store, "logit_diff", 0.1, "score", splits=3, seed=7).to_pylist()
    kept = sorted(set(rows["pair_id"]) - {"p3"})
    order = np.random.default_rng([7, 2] if size is None else [7, 2, size]).permutation(len(kept))
    halved = len(kept) if size is None else size  # the run's own halving: every pair, B one larger
    half_a = {kept[i] for i in order[: halved // 2]}
    half_b = {kept[i] for i in order[halved // 2 : halved if size is None else halved // 2 * 2]}
    assert {8, 16, 32, 39} == {r["pairs_a"] + r["pairs_b"] for r in table}  # 8, 16, 32 below the run's 39
    for component in ("resid", "mlp"):
        mine = rows[(rows["component"] == component) & rows["pair_id"].isin(half_a | half_b)]
        means = mine.assign(a=mine["pair_id"].isin(half_a)).groupby(["a", "layer", "position"])["score"].mean()
        a, b = means[True].to_numpy(), means[False].to_numpy()
        found = {
            r["measure"]: r["value"]
            for r in table
            if r["scope"] == component and r["split"] == 2 and r["pairs_a"] + r["pairs_b"] == halved
        }
        assert found["spearman"] == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-9)
        top_a, top_b = set(np.argsort(-np.abs(a))[:TOP]), set(np.argsort(-np.abs(b))[:TOP])
        assert found[f"top-{TOP} overlap"] == len(top_a & top_b) / TOP
        assert {(r["pairs_a"], r["pairs_b"]) for r in table if r["pairs_a"] > 16} == {(19, 20)}


def test_stability_tells_agreeing_pairs_from_noise(tmp_path):
    def median(store, measure):
        table = stability(store, "logit_diff", 0.1, "score")
        return np.median([r["value"] for r in table.to_pylist() if r["measure"] == measure])

    agreeing, _ = synthetic_run(tmp_path / "agree", agree=True)
    noise, _ = synthetic_run(tmp_path / "noise", agree=False)
    assert median(agreeing, "spearman") > 0.95 and median(agreeing, f"top-{TOP} overlap") >= 0.9
    assert median(noise, "spearman") < 0.5 and median(noise, f"top-{TOP} overlap") < 0.7


def test_float_noise_does_not_move_stability(tmp_path):
    """A run whose unmoved cells are exactly 0, and the same run with noise of 1e-7 (float32
    rounding's size) on every score: every halving's measures agree to 0.01, as they do not when
    the noise is ranked (tolerance 0)."""
    exact, _ = synthetic_run(tmp_path / "exact", agree=True, zeros=True)
    noisy, _ = synthetic_run(tmp_path / "noisy", agree=True, zeros=True, float_noise=1e-7)
    first, second = (stability(store, "logit_diff", 0.1, "score", splits=5).to_pylist() for store in (exact, noisy))
    assert [r["measure"] for r in first] == [r["measure"] for r in second]
    for a, b in zip(first, second):
        assert b["value"] == pytest.approx(a["value"], abs=0.01), a
    with mock.patch("jobs.results.stability.NOISE_ULPS", 0):
        ranked = stability(noisy, "logit_diff", 0.1, "score", splits=5).to_pylist()
    assert max(abs(a["value"] - b["value"]) for a, b in zip(first, ranked)) > 0.05


@pytest.mark.parametrize("flipped", [False, True])
def test_groups_that_disagree_are_told_apart(tmp_path, flipped):
    """With --group-by, the two templates' cell means compared: the same effects agree, negated
    ones correlate at -1 (and their top 10 by |mean| still coincide)."""
    store, _ = synthetic_run(tmp_path / "run", agree=True, flipped=flipped)
    grouped = aggregate(store, "denoise", "template", 0.1).to_pylist()
    rows = stability(store, "logit_diff", 0.1, "score", splits=2, grouped=grouped).to_pylist()
    compared = [r for r in rows if r["groups"] is not None]
    assert {(r["scope"], r["groups"]) for r in compared} == {("resid", "t0 vs t1"), ("mlp", "t0 vs t1")}
    for r in compared:
        if r["measure"] == "spearman":
            assert r["value"] == pytest.approx(-1 if flipped else 1, abs=0.05) and r["split"] is None
    halves = [r["value"] for r in rows if r["groups"] is None and r["measure"] == "spearman" and r["pairs_a"] == 19]
    assert (max(halves) < 0.9) if flipped else (min(halves) > 0.95)  # random halves mix the templates
