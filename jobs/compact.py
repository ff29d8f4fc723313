"""`driver.py compact OUT`: a run's results parts rewritten into fewer, larger files.

A run writes one results part per shard, so a million pairs make tens of thousands of parts,
and a query over them holds every part's footer (about 30 KB each: 1 GB at 31,000 parts).
Compaction rewrites each run of consecutive parts (part-00000 .. part-00999) into one file named
after its first and last shard (`parts-00000-00999.parquet`, `Store.covered` reads the name back),
in large row groups. The file is written to a temporary name and renamed once whole; only then
are its parts deleted. Interrupted at any point, the run stays whole: a temporary file is never
read (and is removed next time), and parts a compacted file already holds are ignored by every
reader (`Store.results_files`) and deleted by the next compaction. Resuming a compacted run
finds its finished shards in the names, so nothing is computed again; the `_pairs` parts stay.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow.parquet as pq

from jobs.store import BATCH_PARTS, Store
from worker.contract.layout import merged_name, part_index

PARTS_PER_FILE = BATCH_PARTS  # shards per compacted file, at most: one batch of the aggregate's reads
ROW_GROUP = 1 << 20  # rows per row group of a compacted file


def runs_of_parts(names: Sequence[str], per_file: int) -> list[list[str]]:
    """The single parts `names` (part-NNNNN) cut into runs of consecutive indices of at most
    `per_file` parts; runs of one part are left out (nothing to merge)."""
    runs: list[list[str]] = []
    for name in sorted(names, key=part_index):
        if runs and part_index(name) == part_index(runs[-1][-1]) + 1 and len(runs[-1]) < per_file:
            runs[-1].append(name)
        else:
            runs.append([name])
    return [run for run in runs if len(run) > 1]


def write_merged(store: Store, run: Sequence[str]) -> int:
    """Write the parts `run` into one file in row groups of `ROW_GROUP` rows; its rows."""
    paths = [store.path(store.results, f"{name}.parquet") for name in run]
    schema = pq.read_schema(paths[0], filesystem=store.fs)
    tables = (pq.read_table(path, filesystem=store.fs, schema=schema) for path in paths)
    return store.write_row_groups(f"{store.results}/{merged_name(run[0], run[-1])}.parquet", schema, tables, ROW_GROUP)


def compact(store: Store, per_file: int = PARTS_PER_FILE) -> str:
    """Compact the run in `store`; a line saying what was done. A run still being written is
    refused: its driver lists the parts it has and would not see them merge under it."""
    manifest = store.read_manifest()
    if manifest is None or not store.exists(store.results):
        raise ValueError(
            f"{store.uri}: no patchsweep run here (no manifest.json or {store.results}/); nothing to compact"
        )
    if manifest.get("status") == "running":
        raise ValueError(
            f"{store.uri}: the run is still being written (status running); compact it once its driver has stopped"
        )
    store.remove_temporaries(store.results)
    files = store.all_results_files()
    stale = store.stale_parts(files)
    store.remove(*(f"{store.results}/{name}.parquet" for name in stale))
    singles = [name for name, shards in files.items() if shards == [name] and name not in stale]
    runs = runs_of_parts(singles, per_file)
    for run in runs:
        write_merged(store, run)
        store.remove(*(f"{store.results}/{name}.parquet" for name in run))
    merged, left = sum(len(run) for run in runs), len(store.results_files())
    removed = f"; removed {len(stale)} parts an interrupted compaction had merged" if stale else ""
    return f"compacted {merged} parts into {len(runs)} files; {store.results}/ now holds {left} files{removed}"
