"""Weight helpers every family shares: per-head slices of the attention projections (weights
and biases, per input q/k/v), the output projection per head, and grouped-query ungrouping."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from nnsight import TransformersModel

from worker.model.families import part
from worker.model.sites import (
    blocks,
    family,
    head_dim,
    kv_groups,
    projection,
    site_values,
)


def weight_out_in(module: torch.nn.Module) -> torch.Tensor:
    """A projection's weight as [outputs, inputs] (a Linear's own; GPT-2's Conv1D stores [inputs, outputs])."""
    return module.weight if isinstance(module, torch.nn.Linear) else module.weight.T


def head_weights(model: TransformersModel, block: torch.nn.Module, input: str) -> torch.Tensor:
    """[heads, head_dim, d_model]: each head's rows of the projection computing its `input` (q, k or v)."""
    weight = weight_out_in(projection(model, block, input))  # [outputs, d_model]
    return site_values(model, input, weight.T[None])[0].permute(1, 2, 0)


def head_bias(model: TransformersModel, block: torch.nn.Module, input: str) -> torch.Tensor | float:
    """[heads, head_dim]: each head's part of the bias of the projection computing its `input`, or 0."""
    bias = projection(model, block, input).bias
    return 0.0 if bias is None else site_values(model, input, bias[None, None])[0, 0]


def output_weights(model: TransformersModel, block: torch.nn.Module) -> torch.Tensor:
    """[heads, head_dim, d_model]: each head's columns of the attention output projection."""
    weight = weight_out_in(part(block, family(model).out_proj))  # [d_model, heads * head_dim]
    return site_values(model, "head", weight[None])[0].permute(1, 2, 0)


def repeat_heads(tensor: torch.Tensor, groups: int, dim: int) -> torch.Tensor:
    """A key or value projection's weight [kv heads * dim, d] (or bias) with each head's rows `groups` times."""
    heads = tensor.view(-1, dim, *tensor.shape[1:])
    return heads.repeat_interleave(groups, dim=0).flatten(0, 1)


@contextmanager
def ungrouped(model: TransformersModel):
    """While open, a grouped-query model computes each query head's own key and value (its key/value
    head's, repeated; the same outputs), so the k and v receivers are per query head, the ungrouped
    view EAP-IG and MIB use (TransformerLens' `ungroup_grouped_query_attention`)."""
    groups, config = kv_groups(model), model._module.config
    if groups == 1:
        yield
        return
    restore = []
    for block in blocks(model):
        attention = part(block, family(model).attention)
        restore.append((attention, "num_key_value_groups", attention.num_key_value_groups))
        attention.num_key_value_groups = 1
        for input in ("k", "v"):
            module = projection(model, block, input)
            for name in ("weight", "bias"):
                if getattr(module, name, None) is not None:
                    restore.append((module, name, getattr(module, name)))
                    wide = repeat_heads(getattr(module, name), groups, head_dim(model))
                    setattr(module, name, torch.nn.Parameter(wide, requires_grad=False))
    restore.append((config, "num_key_value_heads", config.num_key_value_heads))
    config.num_key_value_heads = config.num_attention_heads
    try:
        yield
    finally:
        for owner, name, value in reversed(restore):
            setattr(owner, name, value)
