"""What evaluating circuits costs: pairs x circuits per second of `driver.py circuit`'s core
(worker/methods/faithfulness.py) over the 48 benchmark pairs, at MIB's ten budgets (and the empty
circuit), against a plain forward of the same pairs' clean prompts.

    python -m bench.circuits
    python -m bench.circuits --family llama --rounds 2

Model: GPT-2-small-sized random, of `--family` (bench/gpt2_small.py); pairs: examples/pairs.jsonl
four times over (14, 17 and 19 tokens). The circuits are the top edges of seeded random scores
at each budget: the cost does not depend on which edges a circuit keeps. "per circuit / forward"
is one circuit evaluation's time per pair over one plain forward's (the model's own, batched by
length as the evaluation is, the last position's logits only); the evaluation also runs one
read of both prompts per pair, which the per-circuit time includes, spread over the circuits.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench.gpt2_small import add_model_arguments, model_and_pairs
from worker.contract.layout import CIRCUITS_DIR
from worker.contract.options import PatchOptions
from worker.graph.circuits import MIB_BUDGETS, Circuit
from worker.graph.mib import Graph
from worker.methods.faithfulness import circuit_tables


def best_of(rounds: int, run) -> float:
    run()  # warm-up
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def plain_forwards(model, pairs, max_batch_tokens: int) -> None:
    """The clean prompts through the model, batched by length as the evaluation batches them,
    the last position unembedded (as every patched run reads its metric)."""
    with torch.inference_mode():
        for n_tokens in sorted({p.n_tokens for p in pairs}):
            group = [p.clean_ids for p in pairs if p.n_tokens == n_tokens]
            per_batch = max(1, max_batch_tokens // n_tokens)
            for first in range(0, len(group), per_batch):
                model._module(torch.tensor(group[first : first + per_batch], device=model.device), logits_to_keep=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    args = parser.parse_args()

    model, pairs = model_and_pairs(args)
    graph = Graph.of(model)
    scores = torch.rand(len(graph.edges), generator=torch.Generator().manual_seed(0)).tolist()
    circuits = [Circuit.selected(graph, scores, "top", budget) for budget in MIB_BUDGETS]
    root = Path(tempfile.mkdtemp())
    (root / CIRCUITS_DIR).mkdir()
    for circuit in circuits:
        (root / CIRCUITS_DIR / f"{circuit.name}.json").write_text(circuit.to_json())
    names = tuple(c.name for c in circuits)
    options = PatchOptions((), direction="noise", method="circuit", circuits=names, circuits_at=str(root))
    print(
        f"family={args.family} device={model.device} dtype={args.dtype} threads={torch.get_num_threads()} "
        f"pairs={len(pairs)} tokens={sorted({p.n_tokens for p in pairs})} edges={len(graph.edges)} "
        f"circuits={len(circuits)} + empty (edges {[len(c.edges) for c in circuits]})"
    )
    evaluated = len(pairs) * (len(circuits) + 1)
    seconds = best_of(args.rounds, lambda: circuit_tables(model, pairs, options))
    forward = best_of(args.rounds, lambda: plain_forwards(model, pairs, options.max_batch_tokens))
    print(f"{'pairs x circuits/s':>20s} {'s/circuit/pair':>15s} {'forward s/pair':>15s} {'per circuit / forward':>22s}")
    per_circuit, per_forward = seconds / evaluated, forward / len(pairs)
    print(f"{evaluated / seconds:20.2f} {per_circuit:15.4f} {per_forward:15.4f} {per_circuit / per_forward:22.2f}")


if __name__ == "__main__":
    main()
