"""MIB's results table from circuit runs (`driver.py mib-scores`): a row per method, a column per
(task, model) MIB scores, in the shape of MIB's `print_results.py`, CPR and CMD.

Each circuit run is placed by its pairs' task (or `--task`) and its model (MIB's name, from the
checkpoint's type and its graph's edge count: jobs/mib/names.py). A run selected with `--select
mib` gives MIB's numbers: CPR read from its `mib-signed` curve, CMD from `mib-absolute`, as MIB
reads them (jobs/results/curves.py computes both areas). A `top`, `greedy` or `consistent` run
gives both from its one curve, in a row of its own that names the selection: its circuits are
not MIB's. A row is named by MIB's name of the edge method that chose the circuits (`EAP`,
`EAP-IG-inputs`; `given` for circuit files). Two runs for one cell of the table are refused.
"""

from __future__ import annotations

import pyarrow.parquet as pq

from jobs.mib.names import COLUMNS, MIB_METHODS, placed
from jobs.results.query import QueryError
from jobs.store import FAITHFULNESS, Store
from worker.contract.layout import CURVES_FILE

AREAS = {"cpr": "CPR (higher is better)", "cmd": "CMD (lower is better)"}


def run_rows(run: str, task: str | None, model_name: str | None) -> tuple[str, dict[str, dict[str, float | None]]]:
    """The run's column (`<task>_<model>`) and its rows: a name per selection, with its `cpr` and `cmd`."""
    store = Store(run)
    manifest = store.read_manifest()
    if manifest is None or store.kind is not FAITHFULNESS or not store.exists(CURVES_FILE):
        raise QueryError(
            f"{run}: not a finished circuit run (driver.py circuit writes one; find-circuits' is its OUT/evaluation)"
        )
    task, model, _ = placed(store, manifest, task, model_name, run)
    method = MIB_METHODS.get(manifest.get("scored_by"), manifest.get("scored_by") or "given")
    curves = {row["curve"]: row for row in pq.read_table(store.path(CURVES_FILE), filesystem=store.fs).to_pylist()}
    rows = {}
    if {"mib-signed", "mib-absolute"} & curves.keys():
        signed, absolute = curves.get("mib-signed", {}), curves.get("mib-absolute", {})
        rows[method] = {"cpr": signed.get("cpr"), "cmd": absolute.get("cmd")}
    for curve, row in curves.items():
        if not curve.startswith("mib-"):
            rows[f"{method} ({curve})"] = {"cpr": row["cpr"], "cmd": row["cmd"]}
    return f"{task}_{model}", rows


def mib_table(runs: tuple[str, ...], task: str | None, model_name: str | None) -> dict[str, dict[str, dict]]:
    """Row name -> column (`<task>_<model>`) -> its `cpr` and `cmd`, over every run."""
    table: dict[str, dict[str, dict]] = {}
    for run in runs:
        column, rows = run_rows(run, task, model_name)
        for name, scores in rows.items():
            if column in table.setdefault(name, {}):
                raise ValueError(f"{run}: a second run for {name} on {column}; give one run per method and column")
            table[name][column] = scores
    return table


def formatted(table: dict[str, dict[str, dict]], metric: str) -> str:
    """One metric's table as text: `Method` and MIB's twelve column headers, two decimals, `-` where no run is."""
    header = ["Method", *(label for _, _, label in COLUMNS)]
    lines = [header]
    for name, columns in table.items():
        cells = [columns.get(f"{task}_{model}", {}).get(metric) for task, model, _ in COLUMNS]
        lines.append([name, *("-" if value is None else f"{value:.2f}" for value in cells)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(" | ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)
