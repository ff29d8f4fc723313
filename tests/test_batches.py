"""The report's reads a batch of rows at a time (`Store.row_batches`): whole results files, every
shard once, and the same aggregate and split halves whatever the batch size; DuckDB held to its
limits."""

from __future__ import annotations

import tempfile
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from jobs.compact import write_merged
from jobs.results.aggregate import DEFAULT_MIN_GAP, aggregate
from jobs.results.query import DUCKDB_MEMORY_LIMIT, duckdb_connection
from jobs.results.stability import stability
from jobs.store import Store
from tests.test_aggregate import pair_row
from worker.contract.layout import part_name
from worker.contract.tables import effects_schema, pair_columns

SHARDS = 6


def repeated_label_run(root: Path) -> Store:
    """Six shards of four pairs whose label `x` covers two positions (two rows per pair in its
    cells); pair p3's gap is below the min gap; shards 2 and 3 compacted into one file."""
    rng = np.random.default_rng(1)
    pairs = [
        pair_row(f"p{i}", 4, ["S1", "x", "x", "END"], 2.0, 1.95 if i == 3 else -1.0, f"t{i % 2}") for i in range(24)
    ]
    store = Store(str(root))
    store.prepare("hash", overwrite=False)
    writer, pair_schema = store.part_writer(), pa.schema([*pair_columns("logit_diff"), ("template", pa.string())])
    shards = [part_name(k) for k in range(SHARDS)]
    for k, shard in enumerate(shards):
        mine = pairs[k::SHARDS]
        writer.write_pairs(shard, pa.Table.from_pylist(mine, schema=pair_schema))
        rows = [
            {
                "pair_id": p["pair_id"],
                "component": c,
                "layer": layer,
                "position": position,
                "head": None,
                "logit_diff": value,
                "score": value,
            }
            for p in mine
            for c in ("resid", "mlp")
            for layer in range(2)
            for position in range(4)
            for value in [float(rng.normal())]
        ]
        writer.write_results(shard, pa.Table.from_pylist(rows, schema=effects_schema("logit_diff")))
    write_merged(store, shards[2:4])
    store.remove(*(f"{store.results}/{shard}.parquet" for shard in shards[2:4]))
    store.write_pairs_table(shards)
    store.write_manifest({"status": "done", "method": "exact"})
    return store


@pytest.mark.parametrize("rows", [1, 100, 10**9])
def test_row_batches_are_whole_files_holding_every_shard_once(tmp_path, rows):
    store = repeated_label_run(tmp_path / "run")
    files = store.results_files()
    batches = list(store.row_batches(rows))
    held = [shard for _, shards in batches for shard in shards]
    assert sorted(held) == sorted(store.finished_shards()) and len(held) == SHARDS
    for index, (dataset, shards) in enumerate(batches):
        names = [Path(path).stem for path in dataset.files]
        assert [shard for name in names for shard in files[name]] == shards  # whole files, in order
        assert dataset.count_rows() >= rows or index == len(batches) - 1
    assert len(batches) == {1: len(files), 10**9: 1}.get(rows, len(batches))
    assert [shards for _, shards in store.row_batches(None)] == [shards for _, shards in store.shard_batches()]


def test_the_aggregate_and_the_halves_do_not_depend_on_the_batch_size(tmp_path, monkeypatch):
    store = repeated_label_run(tmp_path / "run")
    whole = aggregate(store, "denoise").to_pylist()
    halves = stability(store, "logit_diff", DEFAULT_MIN_GAP, "score").to_pylist()
    by_rows = Store.row_batches
    monkeypatch.setattr(Store, "row_batches", lambda self, rows=1: by_rows(self, None if rows is None else 1))
    assert len(list(store.row_batches())) == SHARDS - 1  # a file at a time
    for batched, once in (
        (aggregate(store, "denoise").to_pylist(), whole),
        (stability(store, "logit_diff", DEFAULT_MIN_GAP, "score").to_pylist(), halves),
    ):
        assert len(batched) == len(once)
        for row, want in zip(batched, once):
            assert row.keys() == want.keys()
            for key, value in row.items():
                assert value == (pytest.approx(want[key]) if isinstance(value, float) else want[key]), key
    x = [row for row in whole if row["label"] == "x"]
    assert x and all((row["pairs"], row["excluded_pairs"], row["count"]) == (23, 1, 46) for row in x)


def test_duckdb_is_held_to_its_limits():
    """Every connection the report takes (aggregate, stability, the report's views): the memory
    limit, a spill directory of its own, and the threads asked for."""
    held = duckdb.connect(config={"memory_limit": DUCKDB_MEMORY_LIMIT}).sql("SELECT current_setting('memory_limit')")
    for threads in (None, 1):
        limit, spill, used = (
            duckdb_connection(threads)
            .sql(
                "SELECT current_setting('memory_limit'), current_setting('temp_directory'), current_setting('threads')"
            )
            .fetchall()[0]
        )
        assert limit == held.fetchall()[0][0]
        assert spill.startswith(f"{tempfile.gettempdir()}/patchsweep-duckdb-")
        assert threads is None or used == threads
