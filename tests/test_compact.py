"""`driver.py compact`: fewer, larger results files with the same rows, a run that still resumes,
and a compaction interrupted at any point that loses and repeats nothing."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.compact import compact, runs_of_parts, write_merged
from jobs.results.aggregate import aggregate
from jobs.results.query import query
from jobs.store import Store
from tests.test_aggregate import pair_row
from tests.test_driver import TEST_FAULT_ENV, assert_same_effects, effects_by_key, run_driver
from worker.contract.tables import effects_schema

ALL_ROWS = "SELECT * FROM effects ORDER BY pair_id, component, layer, position"


def test_runs_of_parts_are_consecutive_and_bounded():
    names = [f"part-{i:05d}" for i in (0, 1, 2, 3, 4, 6, 8, 9, 100000)]
    assert runs_of_parts(names, 3) == [
        ["part-00000", "part-00001", "part-00002"],
        ["part-00003", "part-00004"],
        ["part-00008", "part-00009"],
    ]


def hand_made_run(tmp_path, shards: int) -> Store:
    """A run of `shards` shards of one pair each, written as the driver's actors write them."""
    store = Store(str(tmp_path / "run"))
    store.prepare("hash", overwrite=False)
    writer = store.part_writer()
    for i in range(shards):
        name, pair = f"part-{i:05d}", pair_row(f"p{i}", 2, None, 1.0 + i, 0.0, "t")
        writer.write_pairs(name, pa.Table.from_pylist([pair]))
        rows = [
            {"pair_id": f"p{i}", "component": "resid", "layer": 0, "position": t, "logit_diff": 0.5 * t, "score": t}
            for t in range(2)
        ]
        writer.write_results(name, pa.Table.from_pylist(rows, schema=effects_schema("logit_diff")))
    store.write_pairs_table(store.finished_shards())
    store.write_manifest({"status": "done", "method": "exact"})
    return store


def test_an_interrupted_compaction_loses_and_repeats_nothing(tmp_path):
    store = hand_made_run(tmp_path, 10)
    shards, before = store.finished_shards(), query(store.uri, ALL_ROWS)
    aggregated = aggregate(store, "denoise")
    write_merged(store, sorted(shards)[:5])  # killed after the rename, before its parts were deleted
    (tmp_path / "run" / "effects" / "parts-00005-00009.parquet.tmp-0123").write_bytes(b"half a file")  # and mid-write
    assert store.finished_shards() == shards
    assert query(store.uri, ALL_ROWS).equals(before)
    assert aggregate(store, "denoise").equals(aggregated)

    said = compact(store, per_file=5)
    assert said == (
        "compacted 5 parts into 1 files; effects/ now holds 2 files; "
        "removed 5 parts an interrupted compaction had merged"
    )
    assert sorted(p.name for p in (tmp_path / "run" / "effects").iterdir()) == [
        "parts-00000-00004.parquet",
        "parts-00005-00009.parquet",
    ]
    assert store.finished_shards() == shards
    assert query(store.uri, ALL_ROWS).equals(before)
    assert aggregate(store, "denoise").equals(aggregated)


def test_a_compacted_run_queries_reports_and_resumes_as_before(tmp_path, tiny_model_dir, many_pairs, core_effects):
    """A run with a failed shard (a gap in the part numbers) compacted: the same rows and
    aggregate; the re-run computes only the failed shard; then there is nothing to do."""
    out = tmp_path / "run"
    args = ("--pairs", many_pairs, "--model", tiny_model_dir, "--out", out, "--components", "resid,mlp")
    args += ("--batch-pairs", 4)
    assert run_driver(*args, env_extra={TEST_FAULT_ENV: "raise-on:ex3-1"}).returncode == 1
    parts = sorted(p.name.removesuffix(".parquet") for p in (out / "effects").iterdir())
    before, aggregated = query(str(out), ALL_ROWS), pq.read_table(out / "aggregate.parquet").to_pandas()

    done = run_driver("compact", out, "--parts-per-file", 5)
    assert done.returncode == 0, done.stderr
    runs = runs_of_parts(parts, 5)
    files = len(list((out / "effects").iterdir()))
    merged = sum(len(run) for run in runs)
    assert files == len(runs) + len(parts) - merged and len(runs) > 1
    assert done.stderr.strip() == f"compacted {merged} parts into {len(runs)} files; effects/ now holds {files} files"
    assert query(str(out), ALL_ROWS).equals(before)
    assert run_driver("report", out).returncode == 0
    pd.testing.assert_frame_equal(pq.read_table(out / "aggregate.parquet").to_pandas(), aggregated, rtol=1e-9)

    resumed = run_driver(*args)
    assert resumed.returncode == 0 and f"({len(parts)} already done" in resumed.stderr, resumed.stderr
    assert_same_effects(effects_by_key(out), core_effects)
    again = run_driver(*args)
    assert again.returncode == 0 and "nothing to do" in again.stderr


@pytest.mark.parametrize("status", [None, "running"])
def test_compact_refuses_what_is_not_a_stopped_run(tmp_path, status):
    """No run (a directory of something else), or a run whose driver may still be writing."""
    out = tmp_path / "out"
    out.mkdir()
    if status:
        hand_made_run(tmp_path, 2).write_manifest({"status": status})
        out = tmp_path / "run"
    failed = run_driver("compact", out)
    assert failed.returncode == 2
    (line,) = failed.stderr.strip().splitlines()
    said = "no patchsweep run here" if status is None else "the run is still being written (status running)"
    assert line.startswith(f"error: {out}: {said}")
