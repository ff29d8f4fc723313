"""What a family's shape costs: pairs/s of the `resid` fast path and of EAP on random models of
Gemma-2-2B's widths (few layers), one per family, side by side in one process.

    python -m bench.families                          # gemma2, gemma3_text, llama; 4 layers
    python -m bench.families --layers 2 --families gemma2 llama --pairs 16

Shape: Gemma-2-2B's (width 2304, 8 query heads of 256 channels and 4 key/value heads, a gated
9216-wide MLP, 256,000 tokens, tied unembedding), with `--layers` blocks; Gemma-2 with its caps
(50 on attention scores, 30 on logits) and window (4096: longer than these prompts, so every
key is seen, as in MIB's tasks), Gemma-3 with its query/key norms and per-type rotary bases, and
Llama with the same widths, so what is left is what sets the families apart: four norms per
block instead of two, the caps, eager attention (Gemma-2 has no sdpa) and, for EAP, Gemma's
post-norm MLP sender. Pairs: synthetic IOI-like ones of 16 tokens (bench/gpt2_small.py).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

from bench.circuits import best_of
from bench.gpt2_small import save_random, synthetic_pairs
from worker.contract.options import PatchOptions
from worker.methods.edges import edge_tables
from worker.methods.registry import patch_batch
from worker.model.load import load_model

GEMMA2_2B = {
    "vocab_size": 256000,
    "hidden_size": 2304,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "intermediate_size": 9216,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
}
GEMMA = {"query_pre_attn_scalar": 256, "sliding_window": 4096}
MODELS = {
    "gemma2": lambda shape: Gemma2ForCausalLM(
        Gemma2Config(**shape, **GEMMA, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    ),
    "gemma3_text": lambda shape: Gemma3ForCausalLM(Gemma3TextConfig(**shape, **GEMMA)),
    "llama": lambda shape: LlamaForCausalLM(LlamaConfig(**shape)),
}


def measure(family: str, shape: dict, pairs: list, args: argparse.Namespace) -> tuple[float, float]:
    """Seconds of the `resid` fast path and of EAP over `pairs` on a random `family` model of `shape`."""
    out = Path(tempfile.gettempdir()) / f"patchsweep-{family}-2b-widths-{shape['num_hidden_layers']}"
    model = load_model(str(save_random(out, lambda ids: MODELS[family]({**shape, **ids}))), args.device, args.dtype)
    resid = best_of(args.rounds, lambda: patch_batch(model, pairs, ["resid"]))
    return resid, best_of(args.rounds, lambda: edge_tables(model, pairs, PatchOptions((), method="eap")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["gemma2", "gemma3_text", "llama"], choices=sorted(MODELS))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()

    pairs = synthetic_pairs(args.pairs)
    print(f"Gemma-2-2B widths, {args.layers} layers; pairs={len(pairs)} tokens={pairs[0].n_tokens} dtype={args.dtype}")
    print(f"{'family':12s} {'threads':>7s} {'resid pairs/s':>13s} {'eap pairs/s':>11s}")
    for family in args.families:
        resid, eap = measure(family, {**GEMMA2_2B, "num_hidden_layers": args.layers}, pairs, args)
        print(f"{family:12s} {torch.get_num_threads():7d} {len(pairs) / resid:13.2f} {len(pairs) / eap:11.2f}")


if __name__ == "__main__":
    main()
