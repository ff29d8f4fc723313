"""Time the worker's patching core alone (no Ray): seconds per pair on one process.

python -m bench.patch_core --pairs 8 --components resid
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

import torch

from bench.gpt2_small import build_gpt2_small, synthetic_pairs
from worker.contract.options import DEFAULT_MAX_BATCH_TOKENS
from worker.methods.registry import patch_batch
from worker.model.load import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--components", default="resid")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-batch-tokens", type=int, default=DEFAULT_MAX_BATCH_TOKENS)
    parser.add_argument("--exact-path", default="auto", choices=["auto", "trace", "reuse"])
    parser.add_argument("--n-layer", type=int, default=12)
    parser.add_argument("--n-embd", type=int, default=768)
    args = parser.parse_args()

    shape = {"n_layer": args.n_layer, "n_embd": args.n_embd, "n_positions": max(1024, args.tokens)}
    model_dir = f"{tempfile.gettempdir()}/patchsweep-gpt2-{args.n_layer}x{args.n_embd}"
    model = load_model(str(build_gpt2_small(model_dir, **shape)), args.device, args.dtype)
    components = args.components.split(",")
    pairs = synthetic_pairs(args.pairs, args.tokens)
    options = {"max_batch_tokens": args.max_batch_tokens, "exact_path": args.exact_path}
    patch_batch(model, pairs[:1], components, **options)  # warm-up
    start = time.perf_counter()
    result = patch_batch(model, pairs, components, **options)
    seconds = time.perf_counter() - start
    peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"model={args.n_layer} layers x {args.n_embd} wide, device={model.device} dtype={args.dtype} "
        f"threads={torch.get_num_threads()} "
        f"pairs={len(pairs)} tokens={args.tokens} components={args.components} "
        f"max_batch_tokens={args.max_batch_tokens} exact_path={args.exact_path}"
    )
    print(
        f"effects rows={result.effects.num_rows} seconds={seconds:.2f} "
        f"s/pair={seconds / len(pairs):.3f} pairs/s={len(pairs) / seconds:.2f} "
        f"peak_rss={peak_rss_gb:.2f} GiB"
    )


if __name__ == "__main__":
    main()
