"""What path patching costs: pairs/s for each receiver alone, on the 48 benchmark pairs, every
head a sender, against the cost of the IOI paper's recipe run as plain forwards.

    python -m bench.paths                       # logits, and 9.9:q,9.6:q,10.0:q@END
    python -m bench.paths --positions each --rounds 3

Model: GPT-2-small-sized random, of `--family` (bench/gpt2_small.py); pairs: examples/pairs.jsonl
four times over (14, 17 and 19 tokens, labelled). "recipe forwards" is what the recipe runs per
pair, one whole forward of the receiving prompt per sender for `logits` and two for head
receivers (frozen run, then the run with the receivers' inputs); "recipe s" prices them at this
machine's measured cost of one prompt's forward in a batch of 64.
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
from worker.contract.options import PatchOptions
from worker.contract.receivers import parse_receiver
from worker.methods.paths import path_batch
from worker.model.checkpoint import load_tokenizer
from worker.model.load import load_model
from worker.model.sites import n_heads, n_layers

REPO = Path(__file__).resolve().parent.parent


def forward_seconds(model, pairs, rows: int = 64) -> float:
    """Seconds per prompt of one plain batched forward (the Hugging Face module, no nnsight)."""
    ids = torch.tensor([pairs[0].clean_ids] * rows, device=model.device)
    with torch.inference_mode():
        model._module(ids)
        start = time.perf_counter()
        model._module(ids)
    return (time.perf_counter() - start) / rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--receivers", action="append", help="A receiver spec (repeat); default: logits and 9.9:q,9.6:q,10.0:q@END"
    )
    parser.add_argument("--positions", default="all")
    parser.add_argument("--pairs", default=str(REPO / "examples" / "pairs.jsonl"))
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--family", default="gpt2", choices=["gpt2", "gpt_neox", "llama"])
    parser.add_argument("--rounds", type=int, default=1, help="Keep each receiver's fastest of this many runs.")
    args = parser.parse_args()
    receivers = [parse_receiver(text).name for text in args.receivers or ["logits", "9.9:q,9.6:q,10.0:q@END"]]

    model_dir = str(build_small(args.family, f"{tempfile.gettempdir()}/patchsweep-{args.family}-12x768"))
    pairs_file = Path(tempfile.mkdtemp()) / "pairs.jsonl"
    repeated_pairs(Path(args.pairs), args.repeat, pairs_file)
    pairs = read_pairs(pairs_file, *load_tokenizer(model_dir)).pairs
    model = load_model(model_dir, args.device, args.dtype)
    senders = (
        n_layers(model)
        * n_heads(model)
        * (1 if args.positions == "all" else sum(p.n_tokens for p in pairs) / len(pairs))
    )
    print(
        f"family={args.family} device={model.device} dtype={args.dtype} threads={torch.get_num_threads()} "
        f"pairs={len(pairs)} tokens={sorted({p.n_tokens for p in pairs})} positions={args.positions} "
        f"senders/pair={senders:.0f}"
    )
    per_forward = forward_seconds(model, pairs)
    print(
        f"{'receiver':28s} {'rows':>7s} {'pairs/s':>8s} {'s/pair':>7s} {'recipe forwards/pair':>21s} "
        f"{'recipe s/pair':>14s} {'speed-up':>9s}"
    )
    options = {r: PatchOptions(("head",), args.positions, method="paths", receivers=(r,)) for r in receivers}
    for receiver in receivers:
        path_batch(model, pairs[:1], options[receiver])  # warm-up
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for receiver in receivers:
            start = time.perf_counter()
            rows = path_batch(model, pairs, options[receiver]).paths.num_rows
            best[receiver] = min(best.get(receiver, float("inf")), time.perf_counter() - start)
    for receiver in receivers:
        seconds = best[receiver] / len(pairs)
        forwards = 2 + senders * (1 if receiver == "logits" else 2)
        recipe = forwards * per_forward
        print(
            f"{receiver:28s} {rows:7d} {1 / seconds:8.2f} {seconds:7.3f} {forwards:21.0f} {recipe:14.3f} "
            f"{recipe / seconds:9.1f}"
        )


if __name__ == "__main__":
    main()
