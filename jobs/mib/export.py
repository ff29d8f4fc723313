"""A MIB circuit-track submission from edges runs (`driver.py mib-export`).

MIB (hannamw/MIB-circuit-track) scores one file per (task, model):
`DIR/<method>_<ablation>_<level>/<task>_<model>/importances.json`, EAP-IG's graph JSON with every
edge's `score` and `in_graph` (true: every edge is a candidate; MIB ranks them itself). The score
is MIB's importance: its attribution metric is the logit difference as a loss (negated), with
the clean prompt run and a sender corrupted, so an edge whose corruption lowers the logit
difference scores positive. An edges run's `mean_effect` is that, in the noise direction with
the logit difference (jobs/results/aggregate.py); MIB's own files differ from it by a positive
factor (their batch size), which no ranking sees.

MIB also takes, in place of the scores, nine circuits per folder, the k-th with at most 0.1%,
0.2%, 0.5%, 1%, 2%, 5%, 10%, 20% and 50% of the edges, as the same graph JSON (`in_graph` the
circuit; the scores kept: MIB's loader reads them). `--circuits` writes those: MIB's signed curve
(`mib-signed-<budget>.json`, the edges of largest score, pruned, so never above the budget), the
circuits whose faithfulness MIB's CPR integrates. MIB names no file of the nine; these say
their budget.

The task is the run's pairs' `task` (the `make-*` commands write it) or `--task`.

Names as MIB spells them (jobs/mib/names.py); what MIB would refuse or skip is refused in one line.
"""

from __future__ import annotations

from pathlib import Path

from jobs.circuit_sources import edge_scores
from jobs.mib.names import MIB_METHODS, placed
from jobs.results.query import QueryError
from jobs.store import EDGES, Store
from worker.graph.circuits import Circuit

ABLATION, LEVEL = "patching", "edge"  # edges take the pair's other prompt; scores per edge
IMPORTANCES = "importances"  # the scores' file, importances.json
SUBMISSION_BUDGETS = ("0.1%", "0.2%", "0.5%", "1%", "2%", "5%", "10%", "20%", "50%")  # MIB's circuits instead of scores


def export_run(
    edges_run: str,
    out: str | Path,
    task: str | None,
    model_name: str | None,
    method: str | None,
    circuits: bool = False,
) -> list[Path]:
    """Write the edges run's MIB importance file under `out` (with `circuits`, its circuit at each of
    MIB's submission budgets instead, in place of what an earlier export wrote there); returns the files."""
    store = Store(edges_run)
    manifest = store.read_manifest()
    if manifest is None or store.kind is not EDGES:
        raise QueryError(f"{edges_run}: not an edges run (driver.py edges writes one)")
    if manifest.get("direction") != "noise" or manifest.get("metric") != "logit_diff":
        raise ValueError(
            f"{edges_run}: MIB scores edges by the logit difference with the clean prompt run and a sender "
            "corrupted; run driver.py edges --direction noise --metric logit_diff"
        )
    task, name, graph = placed(store, manifest, task, model_name, edges_run)
    scores = edge_scores(edges_run, graph, manifest["model"], "mib")
    folder = Path(out) / f"{method or MIB_METHODS[manifest['method']]}_{ABLATION}_{LEVEL}" / f"{task}_{name}"
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.json"):  # MIB reads a folder's scores or its circuits, never both
        stale.unlink()
    if circuits:
        chosen = [Circuit.selected(graph, scores, "mib-signed", budget) for budget in SUBMISSION_BUDGETS]
    else:
        chosen = [Circuit(IMPORTANCES, graph, frozenset(range(len(graph.edges))), tuple(scores))]
    written = [folder / f"{circuit.name}.json" for circuit in chosen]
    for circuit, path in zip(chosen, written):
        path.write_text(circuit.to_json())
    return written


def submission_gaps(out: str | Path) -> list[str]:
    """What MIB's submission rules would find missing in `out`: each method folder needs at least
    two tasks and two models."""
    gaps = []
    for method in sorted(p for p in Path(out).iterdir() if p.is_dir()):
        pairs = [folder.name.rsplit("_", 1) for folder in method.iterdir() if any(folder.glob("*.json"))]
        tasks, models = {task for task, _ in pairs}, {model for _, model in pairs}
        if len(tasks) < 2 or len(models) < 2:
            gaps.append(
                f"{method}: {len(tasks)} task(s) and {len(models)} model(s) so far; "
                "a MIB submission needs at least two of each"
            )
    return gaps
