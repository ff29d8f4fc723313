"""The suffix recompute kernel: a block run on positions t..T-1 only, attending to a cached
prefix (`PrefixCache`), with a patched attention or layer output written in, and the readout
of the last position. Shared by the reuse path, path patching, exact edge patching and edge sets."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from nnsight import TransformersModel

from worker.batch.donors import Donors
from worker.batch.group_read import Activations, GroupRead
from worker.batch.metrics import Answers, DonorDistribution, answer_logit_diff, reads_vocabulary, vocabulary_metric
from worker.model.families import part
from worker.model.sites import (
    attention_site,
    blocks,
    capped,
    family,
    post_norm,
    site_values,
    sliding_window,
)


class PrefixCache:
    """What a block's attention asks of a key/value cache (`update`), answered with the
    receiver's keys and values of positions 0..t-1 put before the suffix's own."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values

    def update(self, keys: torch.Tensor, values: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([self.keys, keys], dim=2), torch.cat([self.values, values], dim=2)


def suffix_arguments(model: TransformersModel, start: int, like: torch.Tensor) -> list[dict]:
    """Per layer, what its block needs to run on positions start..T-1 of `like` ([rows, T - start,
    d]): a causal mask over prefix and suffix (hiding keys beyond the layer's sliding window, where
    it has one), and where the family has them, rotary position embeddings for those positions
    (one row, broadcast over the batch; per layer type where the family's base differs by type).
    Layers alike share one dict."""
    length, where = like.shape[1], family(model)
    positions = torch.arange(start, start + length, device=like.device)
    distance = positions[:, None] - torch.arange(start + length, device=like.device)[None, :]
    shared: dict[tuple, dict] = {}
    arguments = []
    for layer in range(len(blocks(model))):
        window = sliding_window(model, layer)
        kind = model._module.config.layer_types[layer] if where.rotary_by_layer_type else None
        if (window, kind) not in shared:
            hidden_from = distance < 0 if window is None else (distance < 0) | (distance >= window)
            mask = torch.zeros(hidden_from.shape, dtype=like.dtype, device=like.device)
            found = {"attention_mask": mask.masked_fill(hidden_from, torch.finfo(like.dtype).min)[None, None]}
            if where.rotary is not None:
                rotary = part(model._module, where.rotary)
                found["position_ids"] = positions[None]
                found["position_embeddings"] = rotary(like, positions[None], *([kind] if kind else []))
            shared[(window, kind)] = found
        arguments.append(shared[(window, kind)])
    return arguments


def block_on_suffix(
    model: TransformersModel,
    block: torch.nn.Module,
    hidden: torch.Tensor,
    prefix_keys: torch.Tensor,
    prefix_values: torch.Tensor,
    arguments: dict,
) -> torch.Tensor:
    """A block on positions t..T-1 of each row, given the keys and values of positions 0..t-1
    and its layer's `suffix_arguments`."""
    cache = {family(model).cache_argument: PrefixCache(prefix_keys, prefix_values)}
    output = block(hidden, **cache, **arguments)
    return output[0] if isinstance(output, tuple) else output


def receiving_prefix(read: GroupRead, layer: int, pairs: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer `layer`'s keys and values of positions 0..start-1 in the receiving run of each of
    `pairs` (indices in `read`): the prefix `block_on_suffix` attends to, which no patch from
    `start` on changes."""
    keys, values = read.prefix[layer]
    return keys[pairs, :, :start], values[pairs, :, :start]


def patched_attention(
    model: TransformersModel,
    block: torch.nn.Module,
    acts: Activations,
    cell: tuple[str, int],
    here: slice,
    receivers: torch.Tensor,
    donor_rows: torch.Tensor,
    heads: torch.Tensor,
    donors: Donors,
) -> torch.Tensor:
    """Layer `layer`'s attention output at positions `here` of `receivers`, patched (`cell`: `attn`
    or `head`, and the layer): the donor's whole output, or the donor's values of one head per
    row through the output projection."""
    values = acts.sites[cell]
    if cell[0] == "attn":
        return donors.take(cell, values, donor_rows, here)
    return heads_through_projection(
        model, block, values[receivers, here], donors.take(cell, values, donor_rows, here, heads), heads
    )


def heads_through_projection(
    model: TransformersModel,
    block: torch.nn.Module,
    z: torch.Tensor,
    donor_z: torch.Tensor,
    heads: torch.Tensor,
    at: torch.Tensor | None = None,
) -> torch.Tensor:
    """The attention output of heads' outputs `z` ([rows, positions, heads, head_dim]) where each
    row's head `heads[i]` takes the donor's values `donor_z[i]` ([rows, positions, head_dim]), at
    every position or where `at` ([rows, positions]) is True: what the sublayer adds to the
    stream, the output projection's output (through the family's post-norm)."""
    mask = (torch.arange(z.shape[2], device=z.device) == heads[:, None])[:, None, :, None]
    if at is not None:
        mask = mask & at[:, :, None, None]
    projected = part(block, family(model).out_proj)(torch.where(mask, donor_z[:, :, None], z).flatten(2))
    return post_norm(model, block, "attn", projected)


def block_given_attention(
    model: TransformersModel, block: torch.nn.Module, hidden: torch.Tensor, attention: torch.Tensor
) -> torch.Tensor:
    """A block's output from its input `hidden` when its attention sublayer adds `attention`: the
    residual additions and the MLP (with its norms) recomputed, in the family's arrangement."""
    where = family(model)
    norm = part(block, where.mlp_norm)

    def mlp(x: torch.Tensor) -> torch.Tensor:
        return post_norm(model, block, "mlp", part(block, where.mlp)(x))

    if getattr(model._module.config, "use_parallel_residual", False):  # the MLP reads the block input
        return hidden + attention + mlp(norm(hidden))
    middle = hidden + attention
    return middle + mlp(norm(middle))


def patched_layer_output(
    model: TransformersModel,
    block: torch.nn.Module,
    read: GroupRead,
    cell: tuple[str, int],
    start: int,
    whole: bool,
    pairs: torch.Tensor,
    heads: torch.Tensor,
) -> torch.Tensor:
    """Layer `layer`'s output on positions start..T-1 of the receiving run of each of `pairs`
    (indices in `read`), `cell` (component, layer) patched at `start` (or, if `whole`, at every
    one of those positions) with what `read.donors` give."""
    acts, donors = read.acts, read.donors
    receivers, donor_rows = donors.rows.receiving_rows(pairs), donors.source_rows(pairs)
    component, layer = cell
    suffix = acts.resid[layer + 1][receivers, start:].clone()
    width = suffix.shape[1] if whole else 1
    here = slice(start, start + width)
    if component == "resid":
        suffix[:, :width] = donors.take(cell, acts.resid[layer + 1], donor_rows, here)
    elif component == "mlp":
        suffix[:, :width] += donors.difference(cell, acts.sites[cell], pairs, here)
    elif component in ("attn", "head"):
        patched = patched_attention(model, block, acts, cell, here, receivers, donor_rows, heads, donors)
        suffix[:, :width] = block_given_attention(model, block, acts.resid[layer][receivers, here], patched)
    else:  # inside attention: the block runs again on the suffix, the head's values written as it goes
        donated = donors.take(cell, acts.sites[cell], donor_rows, here, heads)
        hidden = acts.resid[layer][receivers, start:]
        arguments = suffix_arguments(model, start, hidden)[layer]
        with writing(model, block, component, donated, heads):
            suffix = block_on_suffix(model, block, hidden, *receiving_prefix(read, layer, pairs, start), arguments)
    return suffix


@contextmanager
def writing(
    model: TransformersModel,
    block: torch.nn.Module,
    component: str,
    donated: torch.Tensor,
    heads: torch.Tensor | None = None,
):
    """While open, `block`'s `component` (q, k, v or pattern) of the i-th row takes `donated[i]`
    ([rows, positions, values]) on head `heads[i]`, at the first positions of the block's input;
    without `heads`, every head takes its own (`donated`: [rows, positions, heads, values])."""
    module = attention_site(model, block, component)

    def write(module, args, output):
        view = site_values(model, component, output)
        if heads is None:
            view[:, : donated.shape[1]] = donated
        else:
            view[torch.arange(len(heads), device=heads.device), : donated.shape[1], heads] = donated

    handle = module.register_forward_hook(write)
    try:
        yield
    finally:
        handle.remove()


def readout(
    model: TransformersModel, metric: str, hidden_last: torch.Tensor, answers: Answers, donor: DonorDistribution | None
) -> torch.Tensor:
    """The metric from final hidden states: the final norm, then the unembedding of the whole
    vocabulary where the metric needs it, else of the batch's answer columns only."""
    where = family(model)
    final = part(model._module, where.final_norm)(hidden_last)
    unembedding = part(model._module, where.unembedding)
    if reads_vocabulary(metric):
        return vocabulary_metric(metric, capped(model, unembedding(final)), answers, donor)
    columns, inverse = torch.unique(answers.ids, return_inverse=True)
    bias = unembedding.bias
    logits = F.linear(final, unembedding.weight[columns], None if bias is None else bias[columns])
    return answer_logit_diff(capped(model, logits).gather(1, inverse), answers)
