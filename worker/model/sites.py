"""Where patches go: the patchable components of a block and how to reach them in nnsight,
for any supported family (worker/model/families.py says where each family keeps them).

Per head (`HEAD_COMPONENTS`), a cell patches one head's slice of an activation:
- `head`: the head's output before the output projection (TransformerLens' `hook_z`), its
  `head_dim` channels of the projection's input, where the heads sit side by side;
- `q`, `k`, `v`: the head's query, key or value as the projection computes it, before rotary
  position embeddings (families that have them apply them after); on grouped-query models a
  `k` or `v` cell is a key/value head, shared by `kv_groups` query heads;
- `pattern`: the head's attention probabilities of each destination over every source
  (worker/model/attention.py exposes them); a cell at position t replaces destination t's row.
`site_values` views each as [rows, positions, heads, values per head], so one indexing patches
any of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from nnsight import TransformersModel

from worker.contract.options import HEAD_COMPONENTS
from worker.contract.receivers import INPUTS, Receiver
from worker.model.families import Family, family_of, part

FORWARD_ORDER = ("q", "k", "v", "pattern", "head", "attn", "mlp", "resid")  # within a layer


@dataclass(frozen=True)
class Cell:
    component: str
    layer: int
    position: int | None  # None: every position at once
    head: int | None = None  # only for per-head components (`HEAD_COMPONENTS`)


def family(model: TransformersModel) -> Family:
    return family_of(model._module.config)


def blocks(model: TransformersModel) -> torch.nn.ModuleList:
    """The decoder layers themselves (not their envoys)."""
    return part(model._module, family(model).blocks)


def n_layers(model: TransformersModel) -> int:
    return len(blocks(model))


def n_heads(model: TransformersModel) -> int:
    return getattr(model._module.config, family(model).n_heads)


def projection_inputs(projection: torch.nn.Module) -> int:
    """Input width of a Linear, or of GPT-2's Conv1D (weight stored [inputs, outputs])."""
    return getattr(projection, "in_features", None) or projection.weight.shape[0]


def head_dim(model: TransformersModel) -> int:
    config = model._module.config
    return getattr(config, "head_dim", None) or config.hidden_size // n_heads(model)


def head_split_problem(model: TransformersModel) -> str | None:
    """Why `head` cannot be patched on `model`, or None: every layer's attention output projection
    must take the heads side by side, n_heads x head_dim inputs."""
    heads, dim, where = n_heads(model), head_dim(model), family(model)
    for layer, block in enumerate(blocks(model)):
        inputs = projection_inputs(part(block, where.out_proj))
        if inputs != heads * dim:
            return (
                f"cannot patch heads: layer {layer}'s attention output projection takes {inputs} inputs, "
                f"not {heads} heads x {dim} channels"
            )
    return None


def kv_groups(model: TransformersModel) -> int:
    """Query heads per key/value head: 1, or more with grouped-query attention."""
    return n_heads(model) // (getattr(model._module.config, "num_key_value_heads", None) or n_heads(model))


def site_heads(model: TransformersModel, component: str) -> int:
    """How many heads a layer of `component` has: its (query) heads, its key/value heads for `k`
    and `v`, or 0 for a component that is not per head."""
    if component not in HEAD_COMPONENTS:
        return 0
    return n_heads(model) // kv_groups(model) if component in ("k", "v") else n_heads(model)


def projection(model: TransformersModel, block, input: str):
    """In `block` (a module, or its envoy in a trace): the projection computing the query, key or value."""
    where = family(model)
    return part(block, where.qkv.format(input) if where.qkv_layout == "separate" else where.qkv)


def attention_site(
    model: TransformersModel, block: torch.nn.Module | object, component: str
) -> torch.nn.Module | object:
    """In `block`: the module whose output holds `component` (q, k, v: a projection; pattern: the
    attention's pattern site, worker/model/attention.py)."""
    if component == "pattern":
        return part(block, family(model).attention).pattern
    return projection(model, block, component)


def site_values(model: TransformersModel, component: str, act: torch.Tensor) -> torch.Tensor:
    """What a patch of `component` replaces, as a view of its activation `act` (writes go through):
    [rows, positions, heads, values per head] for per-head components, else `act` itself.

    A projection holds a head's q, k and v as the family's `qkv_layout` says: "stacked"
    [all q | all k | all v], "per_head" [q k v of head 0 | of head 1 | ...], or "separate"
    (a projection each). A pattern is [rows, heads, destinations, sources]: destinations are its positions.
    """
    if component not in HEAD_COMPONENTS:
        return act
    if component == "pattern":
        return act.transpose(1, 2)
    rows, positions, dim = act.shape[0], act.shape[1], head_dim(model)
    layout = family(model).qkv_layout
    if component == "head" or layout == "separate":
        return act.view(rows, positions, -1, dim)
    which = INPUTS.index(component)
    if layout == "per_head":
        return act.view(rows, positions, -1, 3, dim)[:, :, :, which]
    return act.view(rows, positions, 3, -1, dim)[:, :, which]


def receivers_problem(model: TransformersModel, receivers: tuple[Receiver, ...]) -> str | None:
    """Why `receivers` cannot be measured on `model`, or None: each head must exist, and a key or
    value receiver needs a head with its own keys and values (no grouped-query sharing)."""
    layers, heads, groups = n_layers(model), n_heads(model), kv_groups(model)
    for receiver in receivers:
        for h in receiver.heads:
            if not (h.layer < layers and h.head < heads):
                return (
                    f"receiver {receiver.name}: the model has {layers} layers of {heads} heads, "
                    f"no head {h.layer}.{h.head}"
                )
            if h.input != "q" and groups > 1:
                return (
                    f"receiver {receiver.name}: on this model {groups} query heads share each key/value head, "
                    f"so head {h.layer}.{h.head}'s {h.input} cannot be patched alone; use q receivers"
                )
    return None


def component_output(model: TransformersModel, component: str, layer: int) -> torch.Tensor:
    """Inside a trace: the activation patched for `component`: the token embeddings (`input`, the
    graph's sender of that name: EAP-IG's `hook_embed`), block output, attention output,
    MLP output, the heads' outputs (the attention output projection's input,
    [rows, T, n_heads * head_dim]), the projection computing `q`, `k` or `v`, or the attention
    probabilities (`pattern`). `site_values` gives each head's part of it.

    Blocks and attention return tuples on some transformers versions; element 0 is the
    hidden state, while indexing a plain tensor with [0] would select batch row 0.
    """
    where = family(model)
    if component == "input":  # the graph's input node (layer 0): the token embeddings alone
        return part(model, where.token_embedding).output
    block = part(model, where.blocks)[layer]
    if component == "head":
        return part(block, where.out_proj).input
    if component in (*INPUTS, "pattern"):
        return attention_site(model, block, component).output
    output = (block if component == "resid" else part(block, added_by(where, component))).output
    return output[0] if isinstance(output, tuple) else output


def added_by(where: Family, component: str) -> str:
    """In a block: the module whose output is `attn` or `mlp`, what the sublayer adds to the
    residual stream: after its post-norm where the family has one (Gemma; TransformerLens'
    hook_attn_out and hook_mlp_out sit there too)."""
    if component == "attn":
        return where.attn_post_norm or where.attention
    return where.mlp_post_norm or where.mlp


def post_norm(model: TransformersModel, block: torch.nn.Module, component: str, output: torch.Tensor) -> torch.Tensor:
    """What the `attn` or `mlp` sublayer of `block` adds to the stream when it outputs `output`
    (the attention output projection's or the MLP's): `output` itself, or through the family's post-norm."""
    where = family(model)
    norm = where.attn_post_norm if component == "attn" else where.mlp_post_norm
    return output if norm is None else part(block, norm)(output)


def through_post_norm(model: TransformersModel, block, o: torch.Tensor, differences: torch.Tensor) -> torch.Tensor:
    """[rows, T, K, d]: what K sums of block `block`'s head differences (`differences`: [rows, T, K,
    d], each a sum of heads' donor-minus-run outputs through the output projection) add to the
    stream in a run whose attention output projection outputs `o` ([rows, T, d]): themselves; on
    a family with a post-attention norm, post(o + difference) - post(o) (heads are not additive
    there; EAP-IG's `evaluate_graph` does the same)."""
    if family(model).attn_post_norm is None:
        return differences
    o = o[:, :, None]
    return post_norm(model, block, "attn", o + differences) - post_norm(model, block, "attn", o)


def sliding_window(model: TransformersModel, layer: int) -> int | None:
    """How far back layer `layer`'s attention sees (a query at t reads keys t - window + 1..t), or
    None for every earlier key: Gemma's and Qwen2's `sliding_attention` layers of config.layer_types,
    every layer of a Mistral with a `sliding_window`."""
    config = model._module.config
    window, types = getattr(config, "sliding_window", None), getattr(config, "layer_types", None)
    if types is not None:
        return window if types[layer] == "sliding_attention" else None
    return window


def capped(model: TransformersModel, logits: torch.Tensor) -> torch.Tensor:
    """Logits as the model returns them: Gemma soft-caps the unembedding's output,
    cap x tanh(logits / cap) (`final_logit_softcapping`), so no metric may assume a shift of
    every logit changes nothing."""
    cap = getattr(model._module.config, "final_logit_softcapping", None)
    return logits if cap is None else cap * torch.tanh(logits / cap)


def embedding_output(model: TransformersModel) -> torch.Tensor:
    """Inside a trace: the residual stream entering the first block."""
    return part(model, family(model).embedding).output


def last_logits(model: TransformersModel) -> torch.Tensor:
    """Inside a trace: the next-token logits at the last position, [rows, vocabulary] (`capped`)."""
    return capped(model, part(model, family(model).unembedding).output[:, -1, :])
