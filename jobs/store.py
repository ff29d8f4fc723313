"""The output directory (local path or any URI pyarrow.fs understands, e.g. s3://bucket/run).

Layout (DESIGN.md): effects/part-*.parquet (paths/part-*.parquet for path patching),
pairs.parquet, manifest.json, invalid.jsonl. A shard's pairs rows go to _pairs/part-*.parquet
first and its results part last, each to a temporary name then renamed, so a shard whose results
part exists is whole; pairs.parquet is rebuilt from the _pairs parts at the end of every run.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from jobs.pairfile import InvalidLine
from worker.parts import PAIR_PARTS_DIR, PartWriter, atomic_output, filesystem, write_parquet

EFFECTS_DIR, PATHS_DIR = "effects", "paths"
PAIRS_ROW_GROUP = 65_536
BATCH_PARTS = 1000  # parts read together; a dataset keeps the footer of every part it has read (~30 KB)
MANIFEST, PAIRS_FILE, INVALID_FILE = "manifest.json", "pairs.parquet", "invalid.jsonl"
AGGREGATE_FILE, REPORT_FILE = "aggregate.parquet", "report.html"


class OutputConflict(RuntimeError):
    """The output directory holds a run with a different configuration."""


def results_dir(method: str | None) -> str:
    """Where a run's per-shard result parts go: paths/ for path patching, effects/ for the rest."""
    return PATHS_DIR if method == "paths" else EFFECTS_DIR


class Store:
    def __init__(self, uri: str, results: str | None = None) -> None:
        """`results`: the results directory (`results_dir`); by default the one of the run found here."""
        self.fs, self.root = filesystem(uri)
        self.uri = uri
        self.results = results or results_dir((self.read_manifest() or {}).get("method"))

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
        with atomic_output(self.fs, self.path(*parts)) as stream:
            stream.write(data)

    def write_table(self, table: pa.Table, *parts: str) -> None:
        write_parquet(self.fs, self.path(*parts), table)

    def part_writer(self) -> PartWriter:
        """What an actor needs to write its shards' parts here itself."""
        return PartWriter(self.uri if "://" in self.uri else self.root, self.results)

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
        for directory in (EFFECTS_DIR, PATHS_DIR, PAIR_PARTS_DIR):
            if self.exists(directory):
                self.fs.delete_dir(self.path(directory))
        for name in (MANIFEST, PAIRS_FILE, INVALID_FILE, AGGREGATE_FILE, REPORT_FILE):
            if self.exists(name):
                self.fs.delete_file(self.path(name))

    def finished_shards(self) -> set[str]:
        """Names (part-00000) of shards whose results part is in place."""
        selector = pafs.FileSelector(self.path(self.results), allow_not_found=True)
        return {
            info.base_name.removesuffix(".parquet")
            for info in self.fs.get_file_info(selector)
            if info.base_name.endswith(".parquet")
        }

    def shard_batches(self) -> Iterator[list[str]]:
        """The finished shards' names, `BATCH_PARTS` at a time: read a large run's parts in such
        batches, each with a dataset of its own, and memory does not grow with the run (one
        dataset over 31,000 parts held 1 GB of their footers)."""
        names = sorted(self.finished_shards())
        for first in range(0, len(names), BATCH_PARTS):
            yield names[first : first + BATCH_PARTS]

    def parts(self, directory: str, names: list[str], schema: pa.Schema | None = None) -> ds.Dataset:
        """The parts `names` of `directory` (the results directory or `_pairs`) as one dataset."""
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
        rows, held = 0, []
        with atomic_output(self.fs, self.path(PAIRS_FILE)) as stream, pq.ParquetWriter(stream, schema) as writer:
            for index, path in enumerate(paths):
                held.append(ds.dataset(path, schema=schema, filesystem=self.fs, format="parquet").to_table())
                if sum(t.num_rows for t in held) >= PAIRS_ROW_GROUP or index == len(paths) - 1:
                    table = pa.concat_tables(held)  # row groups of a useful size, not one per shard
                    writer.write_table(table, row_group_size=PAIRS_ROW_GROUP)
                    rows, held = rows + table.num_rows, []
        return rows

    def write_invalid(self, invalid: list[InvalidLine]) -> None:
        lines = [json.dumps({"line": bad.line, "reason": bad.reason, "text": bad.text}) + "\n" for bad in invalid]
        self.write_bytes("".join(lines).encode(), INVALID_FILE)
