"""Tiny random checkpoints of every supported family beyond GPT-2, built offline.

Each is a seeded random config of a few layers saved with a tokenizer of the kind its family
ships: byte-level BPE (GPT-2's kind, examples/tiny_gpt2.py) for GPT-NeoX and Qwen2, and a
SentencePiece-style one (words marked with ▁, `<s>` before every prompt) for Llama, Mistral and
Gemma. Llama, Mistral, Qwen2 and Gemma use grouped-query attention (4 query heads, 2 key/value
heads); Qwen2 and Gemma tie their unembedding to the embedding. The Gemmas are built to show
what sets them apart: heads of 12 channels (4 x 12 != the width 32), soft-caps that bite (Gemma-2's
attention scores reach 28 against a cap of 10; logits of both reach 12 against a cap of 8; Gemma-3
has no attention cap, as released), a sliding window of 4 tokens, shorter than
any test prompt (Gemma-2's layers alternate sliding and full; Gemma-3's 0 and 2 slide, with
their own rotary base), and every norm's weight drawn away from zero (they scale by 1 + weight).
`python examples/tiny_families.py DIR` writes all six.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from examples.tiny_gpt2 import EOS, build_tokenizer, corpus

FAMILIES = ("gpt_neox", "llama", "mistral", "qwen2", "gemma2", "gemma3_text")


def build_sentencepiece_style_tokenizer(texts: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """BPE over words marked with ▁ (Llama's convention), `<s>` prepended to every encoding."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer.train_from_iterator(texts, trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_config(family: str, vocab_size: int, bos: int, eos: int, initializer_range: float = 0.5):
    shape = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
        "initializer_range": initializer_range,
        "bos_token_id": bos,
        "eos_token_id": eos,
    }
    if family == "gpt_neox":
        return GPTNeoXConfig(**shape, rotary_pct=0.5, use_parallel_residual=True)
    grouped = {**shape, "num_key_value_heads": 2}
    if family == "llama":
        return LlamaConfig(**grouped, tie_word_embeddings=False)
    if family == "mistral":
        return MistralConfig(**grouped, sliding_window=None)
    if family == "qwen2":
        return Qwen2Config(**grouped, tie_word_embeddings=True)
    gemma = {**grouped, "head_dim": 12, "query_pre_attn_scalar": 16, "sliding_window": 4}
    if family == "gemma2":
        return Gemma2Config(**gemma, attn_logit_softcapping=10.0, final_logit_softcapping=8.0)
    layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    return Gemma3TextConfig(**gemma, layer_types=layer_types, final_logit_softcapping=8.0)


MODEL_CLASSES = {
    "gpt_neox": GPTNeoXForCausalLM,
    "llama": LlamaForCausalLM,
    "mistral": MistralForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "gemma2": Gemma2ForCausalLM,
    "gemma3_text": Gemma3ForCausalLM,
}


def build_tiny(family: str, out_dir: str | Path, seed: int = 2) -> Path:
    """Write a randomly initialised checkpoint of `family` and its tokenizer to `out_dir`."""
    if family in ("llama", "mistral", "gemma2", "gemma3_text"):
        tokenizer = build_sentencepiece_style_tokenizer(corpus())
        bos, eos = tokenizer.convert_tokens_to_ids("<s>"), tokenizer.convert_tokens_to_ids("</s>")
    else:
        tokenizer = build_tokenizer(corpus())
        bos = eos = tokenizer.convert_tokens_to_ids(EOS)
    torch.manual_seed(seed)
    model = MODEL_CLASSES[family](tiny_config(family, len(tokenizer), bos, eos)).eval()
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith("norm.weight") and family.startswith("gemma"):  # initialised to zero: 1 + weight
                weight.normal_(0.0, 0.5)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-families")
    for name in FAMILIES:
        print(build_tiny(name, root / name))
