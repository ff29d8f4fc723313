"""Query and aggregation timings on a synthetic effects table (default 5 million rows).

    python -m bench.query_speed --rows 5000000
Writes a fake run (50 Parquet parts, IOI-like labels) to a temp dir, then times SQL through
`jobs.results.query.query`, the full aggregation and the split-half stability.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

import numpy as np
import pyarrow as pa

from jobs.results.aggregate import DEFAULT_MIN_GAP, aggregate, with_intervals
from jobs.results.intervals import t_quantile
from jobs.results.query import query
from jobs.results.stability import DEFAULT_SPLITS, stability
from jobs.store import Store
from worker.contract.layout import PAIR_PARTS_DIR
from worker.contract.tables import effects_schema, pair_columns

LABELS = [
    "start",
    "start",
    "IO",
    "and",
    "S1",
    "S1+1",
    "middle",
    "middle",
    "middle",
    "middle",
    "S2",
    "action",
    "action",
    "action",
    "END",
]
QUERIES = {
    "count(*)": "SELECT count(*) FROM effects",
    "mean score by component, layer": "SELECT component, layer, avg(score) FROM effects GROUP BY ALL",
    "join pairs, filter label END": (
        "SELECT e.layer, avg(e.score) FROM effects e JOIN pairs p USING (pair_id) "
        "WHERE p.labels[e.position + 1] = 'END' GROUP BY 1"
    ),
    "top 10 cells of one pair": "SELECT * FROM effects WHERE pair_id = 'p123' ORDER BY score DESC LIMIT 10",
}


def fake_run(root: str, rows: int, parts: int = 50) -> Store:
    n_layers, n_tokens, components = 12, len(LABELS), ["resid", "attn", "mlp"]
    per_pair = n_layers * n_tokens * len(components)
    n_pairs = rows // per_pair
    store = Store(root)
    store.prepare("bench", overwrite=False)
    columns = pair_columns("logit_diff")
    pairs = {name: [] for name, _ in columns}
    rng = np.random.default_rng(0)
    for i in range(n_pairs):
        for name, value in [
            ("pair_id", f"p{i}"),
            ("clean", ""),
            ("corrupted", ""),
            ("correct", [" A"]),
            ("incorrect", [" B"]),
            ("correct_ids", [1]),
            ("incorrect_ids", [2]),
            ("n_tokens", n_tokens),
            ("tokens", LABELS),
            ("labels", LABELS),
            ("clean_logit_diff", 3.0 + rng.normal()),
            ("corrupted_logit_diff", -3.0 + rng.normal()),
        ]:
            pairs[name].append(value)
    pairs = pa.table(pairs, schema=pa.schema(columns))
    store.write_table(pairs, "pairs.parquet")
    grid_component = np.repeat(components, n_layers * n_tokens)
    grid_layer = np.tile(np.repeat(np.arange(n_layers), n_tokens), len(components))
    grid_position = np.tile(np.arange(n_tokens), n_layers * len(components))
    for part, ids in enumerate(np.array_split(np.arange(n_pairs), parts)):
        n = len(ids) * per_pair
        table = pa.table(
            {
                "pair_id": np.repeat([f"p{i}" for i in ids], per_pair),
                "component": np.tile(grid_component, len(ids)),
                "layer": np.tile(grid_layer, len(ids)).astype(np.int16),
                "position": np.tile(grid_position, len(ids)).astype(np.int16),
                "head": pa.nulls(n, pa.int16()),
                "logit_diff": rng.normal(size=n).astype(np.float32),
                "score": rng.normal(size=n).astype(np.float32),
                "estimate": pa.nulls(n, pa.float32()),
                "graddrop": pa.nulls(n, pa.float32()),
            },
            schema=effects_schema("logit_diff"),
        )
        store.write_table(table, "effects", f"part-{part:05d}.parquet")
        store.write_table(pairs.slice(int(ids[0]), len(ids)), PAIR_PARTS_DIR, f"part-{part:05d}.parquet")
    return store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=5_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        store = fake_run(f"{scratch}/run", args.rows)
        n = query(store.uri, "SELECT count(*) AS n FROM effects").column("n")[0].as_py()
        print(f"effects rows={n:,}")
        for name, sql in QUERIES.items():
            start = time.perf_counter()
            result = query(store.uri, sql)
            print(f"{name:32s} {time.perf_counter() - start:6.2f} s  ({result.num_rows} rows)")
        start = time.perf_counter()
        table = aggregate(store, "denoise")
        seconds = time.perf_counter() - start
        print(f"{'aggregate (all cells)':32s} {seconds:6.2f} s  ({table.num_rows} rows)")
        t_quantile.cache_clear()  # the intervals alone, as the aggregate computed them (a fresh cache)
        bare = table.drop_columns(["ci_low", "ci_high", "estimate_ci_low", "estimate_ci_high"])
        start = time.perf_counter()
        with_intervals(bare, estimates=True)
        intervals = time.perf_counter() - start
        print(f"{'  of which the 95% intervals':32s} {intervals:6.2f} s  ({intervals / seconds:.1%})")
        start = time.perf_counter()
        halves = stability(store, "logit_diff", DEFAULT_MIN_GAP, "score", DEFAULT_SPLITS)
        seconds = time.perf_counter() - start
        print(f"{f'stability ({DEFAULT_SPLITS} split halves)':32s} {seconds:6.2f} s  ({halves.num_rows} rows)")
        print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
