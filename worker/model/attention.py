"""Attention with its probabilities in the open, so a head's pattern can be read and patched.

Transformers computes attention probabilities inside a function (`eager`, `sdpa`), not a
module, so neither nnsight nor a forward hook can reach them. `expose_patterns` gives every
attention module a `pattern` child, an identity the probabilities pass through; while
`reading_patterns` is open the model computes attention with `attention` below: the eager
computation (scores, the mask transformers built, softmax in float32, grouped-query keys and
values repeated per query head) with `module.pattern(probabilities)` between softmax and the
values. The `pattern` site is that module's output, [rows, heads, destinations, sources];
nnsight traces read and write it as any module's output, and the fast path (worker/engines/reuse.py)
hooks it. The scores softmax takes (the mask added) pass through `module.scores` the same way:
AtP*'s QK fix (worker/engines/atpstar.py) reads them. Runs that patch no pattern keep the model's own
attention (sdpa: 5-8% faster on CPU, docs/PERFORMANCE.md).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from nnsight import TransformersModel
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from worker.model.families import family_of, part

IMPLEMENTATION = "patchsweep"


class PatternSite(torch.nn.Identity):
    """The attention probabilities of every head, [rows, heads, destinations, sources]."""


class ScoreSite(torch.nn.Identity):
    """What softmax takes: every head's scores with the mask added, [rows, heads, destinations, sources]."""


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
    """Eager attention (as transformers' families write it), the probabilities through `module.pattern`.
    Gemma-2 soft-caps the scaled scores, softcap x tanh(scores / softcap), before the mask: the
    `scores` site is after the cap, what softmax takes. A sliding window is in the mask."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if attention_mask is not None:
        scores = scores + attention_mask
    scores = module.scores(scores)
    probabilities = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    pattern = module.pattern(torch.nn.functional.dropout(probabilities, p=dropout, training=module.training))
    return torch.matmul(pattern, value).transpose(1, 2).contiguous(), pattern


AttentionInterface.register(IMPLEMENTATION, attention)
AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)  # an additive mask, as eager attention takes


def expose_patterns(model: TransformersModel) -> None:
    """Give each block's attention module its `pattern` and `scores` sites (used while `reading_patterns`)."""
    where = family_of(model._module.config)
    for block in part(model, where.blocks):
        attention = part(block, where.attention)
        attention.pattern, attention.scores = PatternSite(), ScoreSite()


@contextmanager
def reading_patterns(model: TransformersModel, wanted: bool):
    """While open, if `wanted`, `model` computes attention with `attention` (its probabilities
    through the pattern sites); otherwise it keeps its own implementation."""
    before = model._module.config._attn_implementation
    if wanted:
        model._module.set_attn_implementation(IMPLEMENTATION)
    try:
        yield
    finally:
        model._module.set_attn_implementation(before)
