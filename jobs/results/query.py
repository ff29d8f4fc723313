"""SQL over a run's tables: DuckDB views `effects` (`paths` in a path-patching run), `pairs`
and `aggregate` (and `curves` in a circuit run, `stability` where the report split the pairs).

The views scan Arrow datasets, so the partitioned results directory is streamed from
its Parquet parts (local or any pyarrow URI) instead of being loaded into memory. DuckDB
is held to `DUCKDB_MEMORY_LIMIT` and spills beyond it: its default (80% of RAM) lets a large
aggregation take gigabytes on a machine shared with the actors (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import tempfile
import uuid

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from jobs.store import Store
from worker.contract.layout import AGGREGATE_FILE, CURVES_FILE, GROUPS_FILE, PAIRS_FILE, STABILITY_FILE

DUCKDB_MEMORY_LIMIT = "256MB"


class QueryError(ValueError):
    """Bad SQL or a missing table; the message is one line."""


def duckdb_connection(threads: int | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection held to `DUCKDB_MEMORY_LIMIT`, spilling to a directory of its own
    (DuckDB instances sharing one overwrite each other's files). `threads`: at most this many
    (the aggregate's and stability's small batches take 1: each thread holds hash tables of its
    own, and the batches are too small to gain from more); by default one per core."""
    spill = f"{tempfile.gettempdir()}/patchsweep-duckdb-{uuid.uuid4().hex}"
    config = {"memory_limit": DUCKDB_MEMORY_LIMIT, "temp_directory": spill}
    connection = duckdb.connect(config=config | ({"threads": threads} if threads else {}))
    connection.execute("SET enable_progress_bar = false")  # it would cut into the driver's stderr lines
    # Arrow scans carry no row counts, so the join orderer guessed one row for each view and could
    # build its hash table on effects (millions of rows, which did not spill). Joins run as
    # written instead: the big view first (probed), pairs second (built).
    connection.execute("SET disabled_optimizers = 'join_order,build_side_probe_side'")
    return connection


def release_memory() -> None:
    """Hand back to the system the memory pyarrow's pool and the C heap keep cached once freed: a
    step of the report then starts from what is in use, not from the high-water mark of the one
    before (the run's pairs table left 55 MiB cached at 50,000 pairs, docs/PERFORMANCE.md)."""
    pa.default_memory_pool().release_unused()
    with contextlib.suppress(AttributeError, OSError):  # glibc's; elsewhere there is nothing to call
        ctypes.CDLL(None).malloc_trim(0)


def connect_tables(store: Store) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with a view for every table the run has written so far."""
    if not store.exists(store.results):
        raise QueryError(f"{store.uri}: no {store.results}/ here; is this a patchsweep output directory?")
    connection = duckdb_connection()
    sources = {
        store.results: store.results,
        "pairs": PAIRS_FILE,
        "aggregate": AGGREGATE_FILE,
        "aggregate_groups": GROUPS_FILE,
        "stability": STABILITY_FILE,
        "curves": CURVES_FILE,
    }
    for view, name in sources.items():
        files = list(store.results_files()) if view == store.results else []
        if files:  # the files `results_files` names: not the parts a compacted file holds too
            dataset = store.parts(store.results, files)
        elif store.exists(name) and natively_read(store, name):
            connection.execute(f"CREATE VIEW {view} AS SELECT * FROM read_parquet({sql_string(store.path(name))})")
            continue
        elif store.exists(name):
            dataset = ds.dataset(store.path(name), filesystem=store.fs, format="parquet")
        else:
            continue
        connection.register(f"_{view}_dataset", dataset)
        connection.execute(f"CREATE VIEW {view} AS SELECT * FROM _{view}_dataset")
    return connection


def natively_read(store: Store, name: str) -> bool:
    """Whether DuckDB reads the file `name` itself: a local file (its own reader streams within
    its memory limit, where a pyarrow scan decodes whole row groups ahead: the report's pass over
    pairs' labels took 77 MiB more at 200,000 pairs, docs/PERFORMANCE.md) whose path DuckDB would
    not take for a glob. Elsewhere (S3) through pyarrow's filesystem."""
    return isinstance(store.fs, pafs.LocalFileSystem) and not any(c in store.path(name) for c in "*?[{")


def sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def query(out: str, sql: str) -> pa.Table:
    """Run `sql` over the run in `out`; the result as an Arrow table."""
    connection = connect_tables(Store(out))
    try:
        return connection.sql(sql).to_arrow_table()
    except duckdb.Error as error:
        raise QueryError(f"SQL error: {one_line(error)}") from None


def no_negative_zero(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """A float column with -0.0 (what rounding a small negative number gives) as 0.0: adding
    zero turns -0.0 into 0.0 and leaves every other value as it is."""
    return pc.add(column, 0.0) if pa.types.is_floating(column.type) else column


def as_csv_cell(column: pa.ChunkedArray) -> pa.ChunkedArray | pa.Array:
    """A column CSV can hold: lists and structs (the pairs' tokens, labels, answers) as JSON text."""
    if pa.types.is_nested(column.type):
        return pa.array([None if v is None else json.dumps(v) for v in column.to_pylist()], pa.string())
    return column


def format_table(table: pa.Table, output_format: str) -> str:
    """Render a query result as an aligned text table, CSV or JSON lines."""
    table = pa.table([no_negative_zero(column) for column in table.columns], names=table.column_names)
    rows = table.to_pylist()
    if output_format == "json":
        return "\n".join(json.dumps(row, default=str) for row in rows)
    if output_format == "csv":
        sink = io.BytesIO()
        pacsv.write_csv(pa.table([as_csv_cell(column) for column in table.columns], names=table.column_names), sink)
        return sink.getvalue().decode().rstrip("\n")
    cells = [table.column_names] + [
        ["" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v) for v in row.values()] for row in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(table.column_names))]
    lines = ["  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join([*lines, f"({len(rows)} rows)"])
