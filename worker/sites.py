"""Where patches go: the patchable components of a block and how to reach them in nnsight,
for any supported family (worker/families.py says where each family keeps them).

`head` is one attention head's output before the output projection (TransformerLens'
`hook_z`): its `head_dim` channels of the projection's input, where the heads sit side by side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from nnsight import TransformersModel

from worker.families import Family, family_of, part
from worker.receivers import INPUTS, Receiver

FORWARD_ORDER = ("head", "attn", "mlp", "resid")


@dataclass(frozen=True)
class Cell:
    component: str
    layer: int
    position: int | None  # None: every position at once
    head: int | None = None  # only for component "head"


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


def head_input(
    model: TransformersModel, block: torch.nn.Module, head: int, input: str
) -> tuple[torch.nn.Module, slice]:
    """The projection that computes head `head`'s query, key or value (`input`) in `block`, and
    the channels of its output that are that head's."""
    where, dim = family(model), head_dim(model)
    if where.qkv_layout == "separate":
        index = head if input == "q" else head // kv_groups(model)
        return part(block, where.qkv.format(input)), slice(index * dim, (index + 1) * dim)
    which = INPUTS.index(input)
    first = (3 * head + which) * dim if where.qkv_layout == "per_head" else (which * n_heads(model) + head) * dim
    return part(block, where.qkv), slice(first, first + dim)


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


def head_mask(heads: torch.Tensor, dim: int, width: int) -> torch.Tensor:
    """[n, width]: True on the channels of head `heads[i]` in the output projection's input."""
    return torch.arange(width, device=heads.device)[None, :] // dim == heads[:, None]


def component_output(model: TransformersModel, component: str, layer: int) -> torch.Tensor:
    """Inside a trace: the activation patched for `component`: block output, attention output,
    MLP output, or the heads' outputs (the attention output projection's input,
    [rows, T, n_heads * head_dim]).

    Blocks and attention return tuples on some transformers versions; element 0 is the
    hidden state, while indexing a plain tensor with [0] would select batch row 0.
    """
    where = family(model)
    block = part(model, where.blocks)[layer]
    if component == "head":
        return part(block, where.out_proj).input
    output = {"resid": block, "attn": part(block, where.attention), "mlp": part(block, where.mlp)}[component].output
    return output[0] if isinstance(output, tuple) else output


def embedding_output(model: TransformersModel) -> torch.Tensor:
    """Inside a trace: the residual stream entering the first block."""
    return part(model, family(model).embedding).output


def last_logits(model: TransformersModel) -> torch.Tensor:
    """Inside a trace: the next-token logits at the last position, [rows, vocabulary]."""
    return part(model, family(model).unembedding).output[:, -1, :]
