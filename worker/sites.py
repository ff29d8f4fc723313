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

FORWARD_ORDER = ("head", "attn", "mlp", "resid")


@dataclass(frozen=True)
class Cell:
    component: str
    layer: int
    position: int | None      # None: every position at once
    head: int | None = None   # only for component "head"


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
            return (f"cannot patch heads: layer {layer}'s attention output projection takes {inputs} inputs, "
                    f"not {heads} heads x {dim} channels")
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
