"""What a batch of each method holds, measured: the process's peak RSS (on CUDA, torch's peak
allocation) over a run whose batches are `B` budget units (`max_batch_tokens`: rows x tokens), on
the GPT-2-small shape in float32, against the batch planner's estimate, `batch_bytes` x B
(worker/methods/fitting.py).

Each (method, B) runs in a process of its own: it loads the model, warms up on one pair, notes
its RSS, runs enough pairs to fill a batch of B units while a thread samples the RSS every
millisecond, and reports the highest sample above the one noted. Two budgets show what the
bound buys.

    python -m bench.batch_memory [--tokens 16] [--units 512,2048] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

METHODS = {  # method: (components, rows a pair takes in a batch)
    "exact": (("resid", "attn", "mlp"), 0),  # its rows are cells: two pairs fill any batch
    "atp": (("resid", "attn", "mlp", "head"), 2),
    "atpstar": (("head",), 2),
    "eap": ((), 2),
    "eap-ig": ((), 6),  # its five steps: the receiving row and four more
}


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_during(run) -> int:
    """The highest RSS sampled while `run()` runs."""
    peak, done = [rss_bytes()], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            done.wait(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        run()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], rss_bytes())


def one(method: str, units: int, tokens: int, device: str) -> dict:
    """In this process: the peak memory a run of batches of `units` adds, and the planner's estimate."""
    import torch

    from bench.gpt2_small import build_gpt2_small, synthetic_pairs
    from worker.contract.options import PatchOptions
    from worker.methods.fitting import batch_bytes
    from worker.methods.registry import run_method
    from worker.model.load import load_model

    torch.set_num_threads(1)
    model = load_model(str(build_gpt2_small(Path(tempfile.gettempdir()) / "patchsweep-gpt2-small")), device, "float32")
    components, rows = METHODS[method]
    options = PatchOptions(components, method=method, max_batch_tokens=units)
    run_method(model, synthetic_pairs(1, tokens), PatchOptions(components, method=method, max_batch_tokens=tokens))
    pairs = synthetic_pairs(units // (rows * tokens) + 1 if rows else 2, tokens)
    estimate = batch_bytes(model, options, tokens) * units
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_method(model, pairs, options)
        return {"measured": torch.cuda.max_memory_allocated() - before, "estimate": estimate}
    before = rss_bytes()
    return {"measured": peak_during(lambda: run_method(model, pairs, options)) - before, "estimate": estimate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--units", default="512,2048")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "UNITS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.tokens, args.device)))
        return
    mib = 1 << 20
    measure = "torch's peak allocation" if args.device == "cuda" else "peak RSS"
    print(f"GPT-2 small shape, {args.tokens}-token prompts, float32, {args.device}: MiB of {measure} over the batches")
    print(f"{'method':8} {'units':>6} {'measured':>9} {'estimate':>9} {'estimate/measured':>18}")
    for method in args.methods.split(","):
        for units in (int(u) for u in args.units.split(",")):
            command = [sys.executable, "-m", "bench.batch_memory", "--tokens", str(args.tokens)]
            command += ["--device", args.device, "--one", method, str(units)]
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            row = json.loads(done.stdout.splitlines()[-1])
            ratio = row["estimate"] / max(row["measured"], 1)
            print(f"{method:8} {units:6d} {row['measured'] / mib:9.1f} {row['estimate'] / mib:9.1f} {ratio:18.2f}")


if __name__ == "__main__":
    main()
