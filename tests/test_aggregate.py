"""Aggregation and SQL queries against a by-hand pandas computation on a known result set."""

from __future__ import annotations

import csv
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from scipy import stats

from jobs.results.aggregate import aggregate
from jobs.results.query import QueryError, format_table, query
from jobs.store import Store
from worker.contract.tables import effects_schema, pair_columns

RNG = np.random.default_rng(0)


def pair_row(pair_id, n_tokens, labels, clean, corrupted, template):
    return {
        "pair_id": pair_id,
        "clean": "c",
        "corrupted": "k",
        "correct": [" A"],
        "incorrect": [" B"],
        "correct_ids": [1],
        "incorrect_ids": [2],
        "n_tokens": n_tokens,
        "tokens": [f"t{i}" for i in range(n_tokens)],
        "labels": labels,
        "clean_logit_diff": clean,
        "corrupted_logit_diff": corrupted,
        "template": template,
    }


@pytest.fixture
def known_run(tmp_path):
    """Two labelled pairs of different lengths, two unlabelled ones, one with a near-zero gap."""
    pairs = [
        pair_row("a", 3, ["S1", "S2", "END"], 3.0, -1.0, "t0"),
        pair_row("b", 4, ["S1", "x", "S2", "END"], 2.0, 0.0, "t1"),
        pair_row("c", 3, None, 1.5, -0.5, "t0"),
        pair_row("d", 3, None, 1.0, 0.99, "t1"),  # gap 0.01: excluded from scores
    ]
    rows = []
    for p in pairs:
        for component in ("resid", "mlp"):
            for layer in range(2):
                for position in range(p["n_tokens"]):
                    logit_diff = float(RNG.normal())
                    score = (logit_diff - p["corrupted_logit_diff"]) / (
                        p["clean_logit_diff"] - p["corrupted_logit_diff"]
                    )
                    rows.append(
                        {
                            "pair_id": p["pair_id"],
                            "component": component,
                            "layer": layer,
                            "position": position,
                            "head": None,
                            "logit_diff": logit_diff,
                            "score": score,
                        }
                    )
    store = Store(str(tmp_path / "run"))
    store.prepare("hash", overwrite=False)
    pair_schema = pa.schema([*pair_columns("logit_diff"), ("template", pa.string())])
    writer = store.part_writer()
    for shard, ids in (("part-00000", "ab"), ("part-00001", "cd")):  # as the driver writes them: a shard's pairs
        writer.write_pairs(shard, pa.Table.from_pylist([p for p in pairs if p["pair_id"] in ids], schema=pair_schema))
        writer.write_results(
            shard, pa.Table.from_pylist([r for r in rows if r["pair_id"] in ids], schema=effects_schema("logit_diff"))
        )
    store.write_pairs_table(["part-00000", "part-00001"])
    return store, pd.DataFrame(pairs), pd.DataFrame(rows)


def by_hand(pairs: pd.DataFrame, effects: pd.DataFrame, min_gap: float) -> pd.DataFrame:
    cells = effects.merge(pairs, on="pair_id")
    cells["label"] = [lab[pos] if lab is not None else str(pos) for lab, pos in zip(cells["labels"], cells["position"])]
    cells["n_group"] = [np.nan if lab is not None else n for lab, n in zip(cells["labels"], cells["n_tokens"])]
    cells["excluded"] = (cells["clean_logit_diff"] - cells["corrupted_logit_diff"]).abs() < min_gap
    expected = {}
    for key, group in cells.groupby(["component", "layer", "label", "n_group"], dropna=False):
        kept = group[~group["excluded"]]
        expected[(*key[:3], None if np.isnan(key[3]) else int(key[3]))] = {
            "count": len(kept),
            "excluded_pairs": group.loc[group["excluded"], "pair_id"].nunique(),
            "mean_score": kept["score"].mean() if len(kept) else None,
            "std_score": kept["score"].std() if len(kept) > 1 else None,
            "ci": stats.t.interval(0.95, len(kept) - 1, loc=kept["score"].mean(), scale=stats.sem(kept["score"]))
            if len(kept) > 1
            else (None, None),
            "mean_logit_diff": group["logit_diff"].mean(),
            "normalized_effect": (group["logit_diff"].mean() - group["corrupted_logit_diff"].mean())
            / (group["clean_logit_diff"].mean() - group["corrupted_logit_diff"].mean()),
        }
    return expected


def test_aggregate_equals_pandas_by_hand(known_run):
    store, pairs, effects = known_run
    table = aggregate(store, "denoise", min_gap=0.1)
    expected = by_hand(pairs, effects, 0.1)
    rows = table.to_pylist()
    assert len(rows) == len(expected)
    for row in rows:
        want = expected[(row["component"], row["layer"], row["label"], row["n_tokens"])]
        assert row["count"] == want["count"] and row["excluded_pairs"] == want["excluded_pairs"]
        for column in ("mean_score", "std_score", "mean_logit_diff", "normalized_effect"):
            if want[column] is None or pd.isna(want[column]):
                assert row[column] is None, column
            else:
                assert row[column] == pytest.approx(want[column], abs=1e-5), column
        if want["ci"][0] is None:
            assert row["ci_low"] is None and row["ci_high"] is None
        else:  # scipy's Student-t interval of the kept pairs' scores
            assert (row["ci_low"], row["ci_high"]) == pytest.approx(want["ci"], abs=1e-5)
    assert b"Student t" in table.schema.metadata[b"patchsweep.interval"]
    assert store.exists("aggregate.parquet")
    labelled = [r for r in rows if r["component"] == "resid" and r["layer"] == 0 and r["n_tokens"] is None]
    assert [r["label"] for r in labelled] == ["S1", "x", "S2", "END"]
    assert {r["n_tokens"] for r in rows} == {None, 3}
    s2 = next(r for r in labelled if r["label"] == "S2")
    assert s2["pairs"] == 2


def test_group_by_metadata_column(known_run):
    store, _, _ = known_run
    table = aggregate(store, "denoise", group_by="template")
    assert set(table.column("group").to_pylist()) == {"t0", "t1"}
    with pytest.raises(QueryError, match="no such column"):
        aggregate(store, "denoise", group_by="nope")


def test_query_counts_and_errors(known_run):
    store, _, effects = known_run
    aggregate(store, "denoise")
    assert query(store.uri, "SELECT count(*) AS n FROM effects").column("n")[0].as_py() == len(effects)
    assert query(store.uri, "SELECT count(*) AS n FROM pairs WHERE template = 't0'").column("n")[0].as_py() == 2
    n = query(store.uri, "SELECT count(DISTINCT component) AS n FROM aggregate").column("n")[0].as_py()
    assert n == 2
    rounded = query(store.uri, "SELECT -0.0::DOUBLE AS z, round(-0.0001::DOUBLE, 3) AS r")
    assert format_table(rounded, "table").splitlines()[2].split() == ["0", "0"]
    assert format_table(rounded, "json") == '{"z": 0.0, "r": 0.0}'
    listed = query(store.uri, "SELECT pair_id, labels, correct FROM pairs ORDER BY pair_id LIMIT 1")
    row = listed.to_pylist()[0]
    lines = format_table(listed, "csv").splitlines()
    assert lines[0] == '"pair_id","labels","correct"' and json.loads(next(csv.reader(lines[1:]))[2]) == row["correct"]
    joined = query(
        store.uri,
        "SELECT p.template, count(*) AS n FROM effects e JOIN pairs p USING (pair_id) GROUP BY ALL ORDER BY 1",
    )
    assert joined.to_pylist() == [{"template": "t0", "n": 24}, {"template": "t1", "n": 28}]
    with pytest.raises(QueryError, match="SQL error") as info:
        query(store.uri, "SELEC nonsense")
    assert "\n" not in str(info.value)
    with pytest.raises(QueryError, match="no effects"):
        query(str(store.path("nowhere")), "SELECT 1")


def test_query_command_prints_a_table_and_refuses_bad_sql_in_one_line(known_run):
    import subprocess
    import sys
    from pathlib import Path

    store, _, effects = known_run
    driver = str(Path(__file__).resolve().parent.parent / "driver.py")
    shown = subprocess.run(
        [
            sys.executable,
            driver,
            "query",
            store.uri,
            "SELECT component, count(*) AS n FROM effects GROUP BY 1 ORDER BY 1",
        ],
        capture_output=True,
        text=True,
    )
    assert shown.returncode == 0
    assert shown.stdout.splitlines()[0].split() == ["component", "n"]
    assert "mlp        26" in shown.stdout and "(2 rows)" in shown.stdout
    as_json = subprocess.run(
        [sys.executable, driver, "query", store.uri, "SELECT count(*) AS n FROM effects", "--format", "json"],
        capture_output=True,
        text=True,
    )
    assert as_json.stdout.strip() == f'{{"n": {len(effects)}}}'
    bad = subprocess.run([sys.executable, driver, "query", store.uri, "SELEC 1"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: SQL error")


def test_intervals_are_student_t():
    """The t quantile against scipy's, and the interval of each row's mean (none below two pairs)."""
    from jobs.results.intervals import t_quantile, with_interval

    for df in (1, 2, 3, 7, 30, 250, 10**5):
        assert t_quantile(0.975, df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-9)
    values = RNG.normal(size=9)
    table = pa.table({"mean": [values.mean(), 1.0], "std": [values.std(ddof=1), None], "count": [9, 1]})
    rows = with_interval(table, "mean", "std", "count").to_pylist()
    low, high = stats.t.interval(0.95, 8, loc=values.mean(), scale=stats.sem(values))
    assert (rows[0]["ci_low"], rows[0]["ci_high"]) == pytest.approx((low, high), rel=1e-9)
    assert rows[1]["ci_low"] is None and list(rows[0]) == ["mean", "std", "ci_low", "ci_high", "count"]
