"""Where each supported model family keeps its parts: one small table per family.

Patching, metrics and AtP are shared code that finds a model's blocks, attention, heads, MLP,
final norm and unembedding through this table; "how Llama differs" is its row here. The
family comes from the checkpoint's `config.model_type`, read before any weights load, so an
unsupported model is refused in one line.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import reduce
from typing import Any


@dataclass(frozen=True, kw_only=True)
class Family:
    blocks: str  # the decoder layers (a ModuleList); a block's output is `resid`
    embedding: str  # whose output is the residual stream entering block 0
    token_embedding: str  # whose output is the token embeddings alone: the graph's `input` node
    attn_norm: str  # in a block: the norm before attention (its output feeds the query/key/value projections)
    attention: str  # in a block: output (element 0) is the attention sublayer's output, `attn`
    qkv: str  # in a block: the query/key/value projection, or with {} the q, k and v ones
    qkv_layout: str  # how head h's q, k, v channels sit in it: "stacked" (all q | all k | all v),
    # "per_head" (q k v of head 0, of head 1, ...), "separate" (own modules; k, v per key/value head)
    out_proj: str  # in a block: the attention output projection, whose input holds the heads side by side
    mlp: str  # in a block: output is `mlp`
    mlp_norm: str  # in a block: the norm before the MLP
    final_norm: str
    unembedding: str
    n_heads: str  # the config attribute with the number of (query) heads
    rotary: str | None  # the module giving rotary position embeddings (cos, sin); None: absolute positions
    cache_argument: str  # the keyword under which a block takes a key/value cache
    # Gemma's "sandwich" norms: in a block, the norm each sublayer's output passes through before it
    # joins the residual stream; `attn` and `mlp` are then those norms' outputs, what the block adds
    attn_post_norm: str | None = None
    mlp_post_norm: str | None = None
    rotary_by_layer_type: bool = False  # rotary(x, positions, layer type): a base per config.layer_types kind


FAMILIES = {
    "gpt2": Family(
        blocks="transformer.h",
        embedding="transformer.drop",
        token_embedding="transformer.wte",  # position embeddings (wpe) are added after it
        attn_norm="ln_1",
        attention="attn",
        qkv="attn.c_attn",
        qkv_layout="stacked",
        out_proj="attn.c_proj",
        mlp="mlp",
        mlp_norm="ln_2",
        final_norm="transformer.ln_f",
        unembedding="lm_head",
        n_heads="n_head",
        rotary=None,
        cache_argument="cache",
    ),
    # attention and MLP read the same block input where config.use_parallel_residual; rotary positions
    "gpt_neox": Family(
        blocks="gpt_neox.layers",
        embedding="gpt_neox.emb_dropout",
        token_embedding="gpt_neox.embed_in",
        attn_norm="input_layernorm",
        attention="attention",
        qkv="attention.query_key_value",
        qkv_layout="per_head",
        out_proj="attention.dense",
        mlp="mlp",
        mlp_norm="post_attention_layernorm",
        final_norm="gpt_neox.final_layer_norm",
        unembedding="lm_head",
        n_heads="num_attention_heads",
        rotary="gpt_neox.rotary_emb",
        cache_argument="layer_past",
    ),
    # RMSNorm, gated MLP, rotary positions, grouped-query attention (heads are query heads)
    "llama": Family(
        blocks="model.layers",
        embedding="model.embed_tokens",
        token_embedding="model.embed_tokens",
        attn_norm="input_layernorm",
        attention="self_attn",
        qkv="self_attn.{}_proj",
        qkv_layout="separate",
        out_proj="self_attn.o_proj",
        mlp="mlp",
        mlp_norm="post_attention_layernorm",
        final_norm="model.norm",
        unembedding="lm_head",
        n_heads="num_attention_heads",
        rotary="model.rotary_emb",
        cache_argument="cache",
    ),
}
FAMILIES["mistral"] = FAMILIES["qwen2"] = FAMILIES["llama"]
# Llama's shape with a norm after each sublayer too (its own pre-MLP norm), embeddings scaled by
# sqrt(width) inside embed_tokens, soft-capped attention scores and logits (worker/model/sites.py,
# worker/model/attention.py), sliding-window layers (config.layer_types)
FAMILIES["gemma2"] = replace(
    FAMILIES["llama"],
    mlp_norm="pre_feedforward_layernorm",
    attn_post_norm="post_attention_layernorm",
    mlp_post_norm="post_feedforward_layernorm",
)
# and Gemma-3: query and key norms inside attention (after the projections), a rotary base per layer type
FAMILIES["gemma3_text"] = replace(FAMILIES["gemma2"], rotary_by_layer_type=True)


class UnsupportedModel(ValueError):
    """A checkpoint patchsweep cannot patch; the message is one line for the user."""


def family_of(config: Any) -> Family:
    """The family of a checkpoint's config; refuses other model types and checkpoints whose
    architecture has no causal LM head (a bare encoder, a classifier)."""
    model_type = getattr(config, "model_type", None)
    if model_type == "gemma3":
        raise UnsupportedModel(
            "the checkpoint is a multimodal Gemma-3 (model type 'gemma3'); patchsweep patches text models: "
            "use a text-only Gemma-3 checkpoint (model type 'gemma3_text', a Gemma3ForCausalLM)"
        )
    if model_type not in FAMILIES:
        raise UnsupportedModel(
            f"model type {model_type!r} is not supported; patchsweep patches {', '.join(sorted(FAMILIES))} models"
        )
    architectures = getattr(config, "architectures", None) or []
    if architectures and not any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in architectures):
        raise UnsupportedModel(
            f"the checkpoint is a {', '.join(architectures)}, without a causal language-model "
            "head; patchsweep needs one (e.g. a ...ForCausalLM checkpoint)"
        )
    return FAMILIES[model_type]


def part(root: Any, path: str) -> Any:
    """`root.a.b.c` for path "a.b.c": a module, or in a trace the module's nnsight envoy."""
    return reduce(getattr, path.split("."), root)
