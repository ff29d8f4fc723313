"""The output directory (local path or any URI pyarrow.fs understands, e.g. s3://bucket/run).

What is in it is named in worker/contract/layout.py. A shard's pairs rows go to _pairs/part-*.parquet
first and its results part last, each to a temporary name then renamed, so a shard whose results
part exists is whole; pairs.parquet is rebuilt from the _pairs parts at the end of every run.
`driver.py compact` (jobs/compact.py) merges consecutive results parts into `parts-A-B.parquet`,
which holds shards part-A to part-B: readers ask `results_files` which file holds which shards.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from jobs.pairfile import InvalidLine
from worker.contract.layout import (
    AGGREGATE_FILE,
    CIRCUITS_DIR,
    COMPACTED,
    GROUPS_FILE,
    INVALID_FILE,
    MANIFEST,
    MEANS_FILE,
    PAIR_PARTS_DIR,
    PAIRS_FILE,
    REPORT_FILE,
    RESULTS_NAME,
    STABILITY_FILE,
    covered,
    part_index,
)
from worker.contract.options import METHODS
from worker.contract.storage import PartWriter, atomic_output, filesystem, is_uri, write_parquet

PAIRS_ROW_GROUP = 65_536
BATCH_PARTS = 1000  # parts read together; a dataset keeps the footer of every part it has read
QUERY_ROWS = 1 << 15  # results rows a query grouping per pair reads at once (`Store.row_batches`)


class OutputConflict(RuntimeError):
    """The output directory holds a run with a different configuration."""


@dataclass(frozen=True)
class ResultsKind:
    """The kind of results table a run writes: the one thing readers (aggregate, report, query)
    ask to tell an activation-patching run from a path-patching one."""

    directory: str  # its parts' directory under OUT, and its view's name in `query`
    cell: tuple[str, str, str]  # the columns that name a cell: what was patched, its layer, its head
    position: str  # the column of the position patched (null: every position at once)
    estimates: bool  # has AtP's `estimate` column
    senders: bool  # cells are sender heads, measured through a receiver (path patching)


EFFECTS = ResultsKind("effects", ("component", "layer", "head"), "position", estimates=True, senders=False)
PATH_SENDERS = ResultsKind("paths", ("receiver", "sender_layer", "sender_head"), "sender_position", False, True)
EDGES = ResultsKind("edges", ("edge", "sender", "receiver"), "", estimates=True, senders=False)  # no position
FAITHFULNESS = ResultsKind("faithfulness", ("circuit", "edges", ""), "", estimates=False, senders=False)  # per circuit
KINDS = (EFFECTS, PATH_SENDERS, EDGES, FAITHFULNESS)


def results_kind(method: str | None) -> ResultsKind:
    """The results a run with `method` writes (effects where a manifest names none)."""
    return {kind.directory: kind for kind in (EFFECTS, PATH_SENDERS, EDGES, FAITHFULNESS)}[
        METHODS[method or "exact"].results
    ]


class Store:
    def __init__(self, uri: str, kind: ResultsKind | None = None) -> None:
        """`kind`: the results the run writes (`results_kind`); by default those of the run found here."""
        self.fs, self.root = filesystem(uri)
        self.uri = uri
        self.kind = kind or results_kind((self.read_manifest() or {}).get("method"))
        self.results = self.kind.directory

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def read_manifest(self) -> dict | None:
        if not self.exists(MANIFEST):
            return None
        with self.fs.open_input_stream(self.path(MANIFEST)) as stream:
            return json.loads(stream.read())

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Write to a temporary name, then rename: readers see the whole file or none."""
        self.write_pieces([data], *parts)

    def write_pieces(self, pieces: Iterable[bytes], *parts: str) -> None:
        """`write_bytes` of the concatenated `pieces`, made and written one at a time."""
        with atomic_output(self.fs, self.path(*parts)) as stream:
            for piece in pieces:
                stream.write(piece)

    def write_table(self, table: pa.Table, *parts: str) -> None:
        write_parquet(self.fs, self.path(*parts), table)

    def part_writer(self) -> PartWriter:
        """What an actor needs to write its shards' parts here itself."""
        return PartWriter(self.uri if is_uri(self.uri) else self.root, self.results)

    def write_manifest(self, manifest: dict) -> None:
        self.write_bytes(json.dumps(manifest, indent=2).encode(), MANIFEST)

    def prepare(self, config_hash: str, overwrite: bool) -> dict | None:
        """Create the layout; refuse a directory written with another config unless overwriting.

        Returns the manifest of the run being resumed, if any.
        """
        manifest = self.read_manifest()
        if manifest is not None and manifest.get("config_hash") != config_hash and not overwrite:
            raise OutputConflict(
                f"{self.uri} holds a run with a different configuration "
                f"(model {manifest.get('config', {}).get('model')!r}, hash {manifest.get('config_hash')}); "
                "pass --overwrite to replace it, or choose another --out"
            )
        if overwrite:
            self.clear()
            manifest = None
        for directory in (self.results, PAIR_PARTS_DIR):
            self.fs.create_dir(self.path(directory), recursive=True)
            self.remove_temporaries(directory)
        return manifest

    def remove_temporaries(self, directory: str) -> None:
        """Delete what writers killed mid-write left behind (never renamed, so never part of the run)."""
        for info in self.fs.get_file_info(pafs.FileSelector(self.path(directory))):
            if ".tmp-" in info.base_name:
                self.fs.delete_file(info.path)

    def clear(self) -> None:
        for directory in (*(kind.directory for kind in KINDS), PAIR_PARTS_DIR, CIRCUITS_DIR):
            if self.exists(directory):
                self.fs.delete_dir(self.path(directory))
        self.remove(
            MANIFEST, PAIRS_FILE, INVALID_FILE, AGGREGATE_FILE, GROUPS_FILE, STABILITY_FILE, REPORT_FILE, MEANS_FILE
        )

    def remove(self, *names: str) -> None:
        """Delete the files `names` where they exist."""
        for name in names:
            if self.exists(name):
                self.fs.delete_file(self.path(name))

    def all_results_files(self) -> dict[str, list[str]]:
        """Every results file in place (its name without `.parquet`: a part or a compacted file;
        other files are not the run's) and the shards it holds, from one listing."""
        selector = pafs.FileSelector(self.path(self.results), allow_not_found=True)
        infos = self.fs.get_file_info(selector)
        names = [info.base_name.removesuffix(".parquet") for info in infos if info.base_name.endswith(".parquet")]
        return {name: covered(name) for name in names if RESULTS_NAME.fullmatch(name)}

    def stale_parts(self, files: dict[str, list[str]] | None = None) -> list[str]:
        """Parts a compacted file holds too (of `files`, by default the listing now): what a
        compaction interrupted before deleting them left."""
        files = self.all_results_files() if files is None else files
        merged = {shard for name, shards in files.items() if name.startswith(COMPACTED) for shard in shards}
        return sorted(name for name in files if name in merged)

    def results_files(self) -> dict[str, list[str]]:
        """The results files to read, in shard order, and the shards each holds: stale parts left
        out (judged on the same listing, so a compaction renaming meanwhile cannot double a row)."""
        files = self.all_results_files()
        stale = set(self.stale_parts(files))
        kept = {name: shards for name, shards in files.items() if name not in stale}
        return dict(sorted(kept.items(), key=lambda item: part_index(item[1][0])))

    def finished_shards(self) -> set[str]:
        """Names (part-00000) of shards whose results are in place."""
        return {shard for shards in self.results_files().values() for shard in shards}

    def shard_batches(self) -> Iterator[tuple[list[str], list[str]]]:
        """(results files, the shards they hold) about `BATCH_PARTS` shards at a time: read a large
        run's parts in such batches, each with a dataset of its own, and memory does not grow with
        the run (one dataset over every part keeps every part's footer)."""
        files, shards = [], []
        for name, held in self.results_files().items():
            files.append(name)
            shards += held
            if len(shards) >= BATCH_PARTS:
                yield files, shards
                files, shards = [], []
        if files:
            yield files, shards

    def row_batches(self, rows: int | None = QUERY_ROWS) -> Iterator[tuple[ds.Dataset, list[str]]]:
        """The results files as datasets of about `rows` rows each (whole files, so a pair's rows
        are never split; a larger file alone), with the shards they hold: what a query grouping
        per pair reads at once, so its hash table holds about `rows` groups, not a thousand
        shards' (650 MiB at 200,000 pairs, docs/PERFORMANCE.md). Each file's footer is read once
        and kept only while its batch is read. `rows` None: the batches of `shard_batches`."""
        if rows is None:
            for files, shards in self.shard_batches():
                yield self.parts(self.results, files), shards
            return
        parquet = ds.ParquetFileFormat()
        held, shards, held_rows = [], [], 0
        for name, covers in self.results_files().items():
            fragment = parquet.make_fragment(self.path(self.results, f"{name}.parquet"), self.fs)
            held.append(fragment)
            shards += covers
            held_rows += fragment.metadata.num_rows
            if held_rows >= rows:
                yield ds.FileSystemDataset(held, held[0].physical_schema, parquet, self.fs), shards
                held, shards, held_rows = [], [], 0
        if held:
            yield ds.FileSystemDataset(held, held[0].physical_schema, parquet, self.fs), shards

    def parts(self, directory: str, names: list[str], schema: pa.Schema | None = None) -> ds.Dataset:
        """The files `names` (without `.parquet`) of `directory` (the results directory or `_pairs`) as one dataset."""
        return ds.dataset(
            [self.path(directory, f"{name}.parquet") for name in names],
            schema=schema,
            filesystem=self.fs,
            format="parquet",
        )

    def write_pairs_table(self, shard_names: Iterable[str]) -> int:
        """Gather the finished shards' pairs rows into pairs.parquet, one part in memory at a time;
        returns the row count. Parts may differ in their metadata columns: each is read with the
        union of their schemas, a column it lacks as nulls."""
        paths = [self.path(PAIR_PARTS_DIR, f"{name}.parquet") for name in sorted(shard_names)]
        if not paths:
            return 0
        schemas = [pq.read_schema(path, filesystem=self.fs) for path in paths]
        schema = pa.unify_schemas(schemas, promote_options="permissive").with_metadata(schemas[0].metadata)
        tables = (ds.dataset(path, schema=schema, filesystem=self.fs, format="parquet").to_table() for path in paths)
        return self.write_row_groups(PAIRS_FILE, schema, tables, PAIRS_ROW_GROUP)

    def write_row_groups(self, name: str, schema: pa.Schema, tables: Iterable[pa.Table], row_group: int) -> int:
        """Write `tables` (read one at a time) to `name` under OUT, whole or not at all, in row groups
        of about `row_group` rows (a useful size, not one per part); the rows written."""
        rows, held, held_rows = 0, [], 0
        with atomic_output(self.fs, self.path(name)) as stream, pq.ParquetWriter(stream, schema) as writer:
            for table in tables:
                held.append(table)
                held_rows += table.num_rows
                if held_rows >= row_group:
                    writer.write_table(pa.concat_tables(held), row_group_size=row_group)
                    rows, held, held_rows = rows + held_rows, [], 0
            if held:
                writer.write_table(pa.concat_tables(held), row_group_size=row_group)
                rows += held_rows
        return rows

    def write_invalid(self, invalid: list[InvalidLine]) -> None:
        lines = [json.dumps({"line": bad.line, "reason": bad.reason, "text": bad.text}) + "\n" for bad in invalid]
        self.write_bytes("".join(lines).encode(), INVALID_FILE)
