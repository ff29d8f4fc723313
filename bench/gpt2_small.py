"""GPT-2-small-sized random checkpoints (of GPT-2 or another family) and synthetic IOI-like
pairs, for benchmarks.

12 layers, 768 wide, 12 heads, 50257 vocab (`GPT2Config()`; the other families the same size,
with a gated 2048-wide MLP for Llama's kind, as many parameters as GPT-2's 3072-wide one); the
tokenizer is the tiny example one, since benchmark pairs are made of token ids directly.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from examples.tiny_gpt2 import EOS, build_tokenizer, corpus
from worker.contract.pairs import Pair


def save_random(out_dir: str | Path, make_model) -> Path:
    """Write `make_model({"bos_token_id": ..., "eos_token_id": ...})`, seeded, with the tiny
    tokenizer to `out_dir`, unless a checkpoint is there already."""
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    tokenizer = build_tokenizer(corpus())
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    torch.manual_seed(0)
    make_model({"bos_token_id": eos_id, "eos_token_id": eos_id}).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_gpt2_small(out_dir: str | Path, **shape) -> Path:
    """`GPT2Config()` by default; `shape` overrides fields (n_layer, n_embd, n_positions, ...)."""
    return save_random(out_dir, lambda ids: GPT2LMHeadModel(GPT2Config(**ids, **shape)))


SMALL = {
    "vocab_size": 50257,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 1024,
}
FAMILY_MODELS = {
    "gpt_neox": lambda ids: GPTNeoXForCausalLM(GPTNeoXConfig(**SMALL, **ids, intermediate_size=3072)),
    "llama": lambda ids: LlamaForCausalLM(LlamaConfig(**SMALL, **ids, intermediate_size=2048)),
}


def build_small(family: str, out_dir: str | Path) -> Path:
    """A GPT-2-small-sized random checkpoint of `family` (gpt2, gpt_neox or llama)."""
    return build_gpt2_small(out_dir) if family == "gpt2" else save_random(out_dir, FAMILY_MODELS[family])


def synthetic_pairs(n: int, n_tokens: int = 16, vocab: int = 300, seed: int = 0) -> list[Pair]:
    """Pairs whose clean and corrupted prompts differ at one position near the end, as in IOI."""
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(n):
        clean = torch.randint(0, vocab, (n_tokens,), generator=generator).tolist()
        corrupted = list(clean)
        corrupted[n_tokens - 3] = (clean[n_tokens - 3] + 1) % vocab
        pairs.append(
            Pair(
                pair_id=str(i),
                clean="",
                corrupted="",
                correct=("",),
                incorrect=("",),
                clean_ids=tuple(clean),
                corrupted_ids=tuple(corrupted),
                correct_ids=(clean[n_tokens - 3],),
                incorrect_ids=(corrupted[n_tokens - 3],),
                tokens=tuple(map(str, clean)),
            )
        )
    return pairs


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of an in-process benchmark on this shape: the pair file and its copies, the
    model's family, device and dtype, and how many timed rounds (the fastest is quoted)."""
    parser.add_argument("--pairs", default=str(Path(__file__).resolve().parent.parent / "examples" / "pairs.jsonl"))
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--family", default="gpt2", choices=["gpt2", "gpt_neox", "llama"])
    parser.add_argument("--rounds", type=int, default=1)


def model_and_pairs(args: argparse.Namespace) -> tuple:
    """The model `add_model_arguments` asked for (built once into the temp directory) and the pair
    file `args.repeat` times over, read with its tokenizer."""
    from bench.driver_throughput import repeated_pairs  # it imports this module
    from jobs.pairfile import read_pairs
    from worker.model.checkpoint import load_tokenizer
    from worker.model.load import load_model

    model_dir = str(build_small(args.family, f"{tempfile.gettempdir()}/patchsweep-{args.family}-12x768"))
    pairs_file = Path(tempfile.mkdtemp()) / "pairs.jsonl"
    repeated_pairs(Path(args.pairs), args.repeat, pairs_file)
    pairs = read_pairs(pairs_file, *load_tokenizer(model_dir)).pairs
    return load_model(model_dir, args.device, args.dtype), pairs
