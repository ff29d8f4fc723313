"""Where patches go: the patchable components of a GPT-2 block and how to reach them in nnsight.

`head` is one attention head's output before the output projection (TransformerLens'
`hook_z`): its `head_dim` channels of the projection's input, where the heads sit side by side.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from nnsight import TransformersModel

FORWARD_ORDER = ("head", "attn", "mlp", "resid")


@dataclass(frozen=True)
class Cell:
    component: str
    layer: int
    position: int | None      # None: every position at once
    head: int | None = None   # only for component "head"


def head_dim(model: TransformersModel) -> int:
    return model._module.transformer.h[0].attn.head_dim


def n_heads(model: TransformersModel) -> int:
    return model._module.transformer.h[0].attn.num_heads


def head_split_problem(model: TransformersModel) -> str | None:
    """Why `head` cannot be patched on `model`, or None: every layer's attention output projection
    must take the heads side by side, n_heads x head_dim inputs."""
    for layer, block in enumerate(model._module.transformer.h):
        inputs, heads, dim = block.attn.c_proj.weight.shape[0], block.attn.num_heads, block.attn.head_dim
        if inputs != heads * dim:
            return (f"cannot patch heads: layer {layer}'s attention output projection takes {inputs} inputs, "
                    f"not {heads} heads x {dim} channels")
    return None


def head_mask(heads: torch.Tensor, dim: int, width: int) -> torch.Tensor:
    """[n, width]: True on the channels of head `heads[i]` in the output projection's input."""
    return torch.arange(width, device=heads.device)[None, :] // dim == heads[:, None]


def component_output(model: TransformersModel, component: str, layer: int) -> torch.Tensor:
    """The activation patched for `component`: block output, attention output, MLP output, or
    the heads' outputs (the attention output projection's input, [rows, T, n_heads * head_dim]).

    Blocks and attention return tuples on some transformers versions; element 0 is the
    hidden state, while indexing a plain tensor with [0] would select batch row 0.
    """
    block = model.transformer.h[layer]
    if component == "head":
        return block.attn.c_proj.input
    output = {"resid": block, "attn": block.attn, "mlp": block.mlp}[component].output
    return output[0] if isinstance(output, tuple) else output


def last_logits(model: TransformersModel) -> torch.Tensor:
    """Inside a trace: the next-token logits at the last position, [rows, vocabulary]."""
    return model.lm_head.output[:, -1, :]
