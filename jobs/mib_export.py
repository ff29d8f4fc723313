"""A MIB circuit-track submission from edges runs (`driver.py mib-export`).

MIB (hannamw/MIB-circuit-track) scores one file per (task, model):
`DIR/<method>_<ablation>_<level>/<task>_<model>/importances.json`, EAP-IG's graph JSON with every
edge's `score` and `in_graph` (true: every edge is a candidate; MIB ranks them itself). The score
is MIB's importance: its attribution metric is the logit difference as a loss (negated), with
the clean prompt run and a sender corrupted, so an edge whose corruption lowers the logit
difference scores positive. An edges run's `mean_effect` is that, in the noise direction with
the logit difference (jobs/results/aggregate.py); MIB's own files differ from it by a positive
factor (their batch size), which no ranking sees.

Names as MIB spells them: methods `EAP`, `EAP-IG-inputs`; tasks `ioi`, `mcqa`,
`arithmetic-addition`, `arithmetic-subtraction`, `arc-easy`, `arc-challenge`; models `gpt2`,
`qwen2.5`, `gemma2`, `llama3`, each with its graph's edge count; only the (task, model) pairs MIB
scores (its `COL_MAPPING`). What MIB would refuse or skip is refused in one line.
"""

from __future__ import annotations

from pathlib import Path

from jobs.circuit_sources import edge_scores
from jobs.results.query import QueryError
from jobs.store import EDGES, Store
from worker.graph.circuits import Circuit
from worker.graph.mib import Graph

MIB_METHODS = {"eap": "EAP", "eap-ig": "EAP-IG-inputs"}
MIB_TASKS = ("ioi", "mcqa", "arithmetic-addition", "arithmetic-subtraction", "arc-easy", "arc-challenge")
MODEL_NAMES = {"gpt2": "gpt2", "qwen2": "qwen2.5", "gemma2": "gemma2", "llama": "llama3"}  # model type: MIB's name
EDGE_COUNTS = {"gpt2": 32491, "qwen2.5": 179749, "gemma2": 74218, "llama3": 1592881}
SCORED = {  # the (task, model) pairs MIB scores
    ("ioi", "gpt2"), ("ioi", "qwen2.5"), ("ioi", "gemma2"), ("ioi", "llama3"),
    ("mcqa", "qwen2.5"), ("mcqa", "gemma2"), ("mcqa", "llama3"),
    ("arithmetic-addition", "llama3"), ("arithmetic-subtraction", "llama3"),
    ("arc-easy", "gemma2"), ("arc-easy", "llama3"), ("arc-challenge", "llama3"),
}  # fmt: skip
ABLATION, LEVEL = "patching", "edge"  # edges take the pair's other prompt; scores per edge


def mib_task(task: str) -> str:
    """A task as MIB's paths spell it (`arc_easy` -> `arc-easy`); others refused."""
    name = task.replace("_", "-")
    if name not in MIB_TASKS:
        raise ValueError(f"unknown MIB task {task!r}; MIB's are {', '.join(MIB_TASKS)}")
    return name


def mib_model(config, graph: Graph, model_name: str | None, source: str) -> str:
    """MIB's name of the model (given, or from the checkpoint's type), checked against its edge count."""
    name = model_name or MODEL_NAMES.get(config.model_type)
    if name not in EDGE_COUNTS:
        raise ValueError(
            f"{source}: MIB has no model {name or config.model_type!r}; "
            f"give --model-name, one of {', '.join(EDGE_COUNTS)}"
        )
    if len(graph.edges) != EDGE_COUNTS[name]:
        raise ValueError(
            f"{source}: its graph has {len(graph.edges)} edges, MIB's {name} has {EDGE_COUNTS[name]}: "
            "not the model MIB scores"
        )
    return name


def export_run(edges_run: str, out: str | Path, task: str, model_name: str | None, method: str | None) -> Path:
    """Write the edges run's MIB importance file under `out`; returns its path."""
    from worker.model.checkpoint import load_config  # transformers: only for a run that gets this far

    store = Store(edges_run)
    manifest = store.read_manifest()
    if manifest is None or store.kind is not EDGES:
        raise QueryError(f"{edges_run}: not an edges run (driver.py edges writes one)")
    if manifest.get("direction") != "noise" or manifest.get("metric") != "logit_diff":
        raise ValueError(
            f"{edges_run}: MIB scores edges by the logit difference with the clean prompt run and a sender "
            "corrupted; run driver.py edges --direction noise --metric logit_diff"
        )
    config = load_config(manifest["model"])
    graph = Graph.of_config(config)
    name, task = mib_model(config, graph, model_name, edges_run), mib_task(task)
    if (task, name) not in SCORED:
        raise ValueError(f"MIB does not score {task} on {name}; it scores {', '.join(sorted(map('_'.join, SCORED)))}")
    scores = edge_scores(edges_run, graph, manifest["model"], "mib")
    everything = Circuit(f"{task}_{name}", graph, frozenset(range(len(graph.edges))), tuple(scores))
    folder = Path(out) / f"{method or MIB_METHODS[manifest['method']]}_{ABLATION}_{LEVEL}" / everything.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "importances.json").write_text(everything.to_json())
    return folder / "importances.json"


def submission_gaps(out: str | Path) -> list[str]:
    """What MIB's submission rules would find missing in `out`: each method folder needs at least
    two tasks and two models."""
    gaps = []
    for method in sorted(p for p in Path(out).iterdir() if p.is_dir()):
        pairs = [folder.name.rsplit("_", 1) for folder in method.iterdir() if (folder / "importances.json").exists()]
        tasks, models = {task for task, _ in pairs}, {model for _, model in pairs}
        if len(tasks) < 2 or len(models) < 2:
            gaps.append(
                f"{method}: {len(tasks)} task(s) and {len(models)} model(s) so far; "
                "a MIB submission needs at least two of each"
            )
    return gaps
