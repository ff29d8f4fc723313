"""MIB's names for what patchsweep runs, and where a run sits among them.

MIB spells methods `EAP`, `EAP-IG-inputs`; tasks `ioi`, `mcqa`, `arithmetic-addition`,
`arithmetic-subtraction`, `arc-easy`, `arc-challenge`; models `gpt2`, `qwen2.5`, `gemma2`,
`llama3`, each known by its graph's edge count. It scores twelve (task, model) pairs (its
`COL_MAPPING`), the columns of its results table (`print_results.py`), in this order. A run
outside them is refused in one line: MIB would skip it.
"""

from __future__ import annotations

import pyarrow.parquet as pq

from jobs.store import Store
from worker.contract.layout import PAIRS_FILE
from worker.graph.mib import Graph

MIB_METHODS = {"eap": "EAP", "eap-ig": "EAP-IG-inputs"}
MIB_TASKS = ("ioi", "mcqa", "arithmetic-addition", "arithmetic-subtraction", "arc-easy", "arc-challenge")
MODEL_NAMES = {"gpt2": "gpt2", "qwen2": "qwen2.5", "gemma2": "gemma2", "llama": "llama3"}  # model type: MIB's name
EDGE_COUNTS = {"gpt2": 32491, "qwen2.5": 179749, "gemma2": 74218, "llama3": 1592881}
COLUMNS = (  # (task, model, its header in MIB's results table), in the table's order
    ("ioi", "gpt2", "IOI (GPT)"), ("ioi", "qwen2.5", "IOI (QWen)"), ("ioi", "gemma2", "IOI (Gemma)"),
    ("ioi", "llama3", "IOI (Llama)"), ("mcqa", "qwen2.5", "MCQA (QWen)"), ("mcqa", "gemma2", "MCQA (Gemma)"),
    ("mcqa", "llama3", "MCQA (Llama)"), ("arithmetic-addition", "llama3", "Arithmetic+ (Llama)"),
    ("arithmetic-subtraction", "llama3", "Arithmetic- (Llama)"), ("arc-easy", "gemma2", "ARC-E (Gemma)"),
    ("arc-easy", "llama3", "ARC-E (Llama)"), ("arc-challenge", "llama3", "ARC-C (Llama)"),
)  # fmt: skip
SCORED = {(task, model) for task, model, _ in COLUMNS}


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


def run_task(store: Store, given: str | None, source: str) -> str:
    """The run's MIB task: `given`, or the one its pairs' `task` column names (the `make-*` commands write it)."""
    if given:
        return mib_task(given)
    if "task" not in pq.read_schema(store.path(PAIRS_FILE), filesystem=store.fs).names:
        raise ValueError(f"{source}: its pairs do not say their task (no `task` in the pair file); give --task")
    column = pq.read_table(store.path(PAIRS_FILE), filesystem=store.fs, columns=["task"]).column("task")
    tasks = sorted(set(column.drop_null().to_pylist()))
    if len(tasks) != 1:
        raise ValueError(f"{source}: its pairs are of {len(tasks)} tasks ({', '.join(tasks)}); give --task")
    return mib_task(tasks[0])


def placed(
    store: Store, manifest: dict, task: str | None, model_name: str | None, source: str
) -> tuple[str, str, Graph]:
    """The run's (task, model) as MIB names them, and its model's graph; a pair MIB does not score refused."""
    from worker.model.checkpoint import load_config  # transformers: only for a run that gets this far

    config = load_config(manifest["model"])
    graph = Graph.of_config(config)
    name, task = mib_model(config, graph, model_name, source), run_task(store, task, source)
    if (task, name) not in SCORED:
        raise ValueError(f"MIB does not score {task} on {name}; it scores {', '.join(sorted(map('_'.join, SCORED)))}")
    return task, name, graph
