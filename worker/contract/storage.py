"""Writing Parquet parts where a run keeps them: a local directory or any pyarrow filesystem URI
(s3://bucket/run?endpoint_override=...), from an actor or from the driver.

Every file goes to a temporary name and is then renamed (on S3, a copy and a delete), so a
reader sees it whole or not at all. An actor writes its shard's pairs part first and its
results part last, so a shard whose results part exists is whole; a retried shard writes the
same two names again and replaces what an earlier attempt left, never adding rows. The actor
sends the driver a small `Receipt` instead of the tables, so results do not flow through it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from worker.contract.layout import PAIR_PARTS_DIR


def is_uri(location: str) -> bool:
    """Whether `location` names a scheme (s3://, ray://, file://) rather than a local path."""
    return "://" in location


def child(location: str, name: str) -> str:
    """`location`/`name`: a directory under a local path or a URI (before the URI's query string)."""
    base, _, query = location.partition("?")
    return f"{base.rstrip('/')}/{name}" + (f"?{query}" if query else "")


def opened(location: str, random_access: bool = False) -> pa.NativeFile:
    """`location` (a local path or a URI) opened for reading, its bytes as stored (no
    decompression by file name): a stream, or with `random_access` a seekable file (Parquet)."""
    fs, path = filesystem(location)
    return fs.open_input_file(path) if random_access else fs.open_input_stream(path, compression=None)


def written_to(location: str) -> pa.NativeFile:
    """`location` (a local path or a URI) opened for writing, whole or not at all (`atomic_output`);
    a local path's folders are made first."""
    fs, path = filesystem(location)
    if not is_uri(location):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    return atomic_output(fs, path)


def base_name(location: str) -> str:
    """The file name a local path or a URI ends with (a URI's query string left out)."""
    return location.partition("?")[0].rstrip("/").rsplit("/", 1)[-1]


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and root path of `uri`: a URI pyarrow understands, or a local path (made absolute)."""
    if is_uri(uri):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


@contextmanager
def atomic_output(fs: pafs.FileSystem, path: str) -> Iterator[pa.NativeFile]:
    """A stream to write `path` through: a temporary name, renamed to `path` once it is closed."""
    temporary = f"{path}.tmp-{uuid.uuid4().hex}"
    with fs.open_output_stream(temporary) as stream:
        yield stream
    fs.move(temporary, path)


def write_parquet(fs: pafs.FileSystem, path: str, table: pa.Table) -> int:
    """Write `table` to `path` atomically; the bytes written."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    data = sink.getvalue()
    with atomic_output(fs, path) as stream:
        stream.write(data)
    return data.size


@dataclass(frozen=True)
class Receipt:
    """What an actor reports for a shard it wrote: result rows, bytes of both parts, its own
    seconds (patching and writing), the Ray node it ran on, the batch bound it ran with (rows x
    tokens, as planned for memory) and how many times that bound was halved to fit."""

    rows: int
    bytes: int
    seconds: float
    node: str
    batch_tokens: int | None = None
    halvings: int = 0


@dataclass(frozen=True)
class PartWriter:
    """Where a run's shard parts go: `root` (an absolute local path or a URI) and the results
    directory under it (`effects` or `paths`). Small and picklable: the driver hands it to actors."""

    root: str
    results: str

    def path(self, directory: str, name: str) -> tuple[pafs.FileSystem, str]:
        fs, root = filesystem(self.root)
        return fs, "/".join([root.rstrip("/"), directory, f"{name}.parquet"])

    def write_pairs(self, name: str, pairs: pa.Table) -> int:
        return write_parquet(*self.path(PAIR_PARTS_DIR, name), pairs)

    def write_results(self, name: str, results: pa.Table) -> int:
        return write_parquet(*self.path(self.results, name), results)
