"""What evaluating circuits costs: pairs x circuits per second of `driver.py circuit`'s core
(worker/circuit_runs.py) over the 48 benchmark pairs, at MIB's ten budgets (and the empty
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

from bench.driver_throughput import repeated_pairs
from bench.gpt2_small import build_small
from jobs.pairfile import read_pairs
from worker.circuit_runs import circuit_tables
from worker.circuits import CIRCUITS_DIR, MIB_BUDGETS, Circuit
from worker.graph import Graph
from worker.model import load_model, load_tokenizer
from worker.options import PatchOptions

REPO = Path(__file__).resolve().parent.parent


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
    parser.add_argument("--pairs", default=str(REPO / "examples" / "pairs.jsonl"))
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--family", default="gpt2", choices=["gpt2", "gpt_neox", "llama"])
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()

    model_dir = str(build_small(args.family, f"{tempfile.gettempdir()}/patchsweep-{args.family}-12x768"))
    pairs_file = Path(tempfile.mkdtemp()) / "pairs.jsonl"
    repeated_pairs(Path(args.pairs), args.repeat, pairs_file)
    pairs = read_pairs(pairs_file, *load_tokenizer(model_dir)).pairs
    model = load_model(model_dir, args.device, args.dtype)
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
