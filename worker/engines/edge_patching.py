"""Exact edge patching (EAP-IG's `exact`): one edge s->r patched alone, everything downstream recomputed.

Only receiver r's input gets sender s's donor-minus-receiving output added; every other
receiver, reading the same stream, sees the receiving run's. The run is rebuilt from one nnsight
read of both prompts (worker/engines/reuse.py), from the pair's first differing token on (before it both
runs agree, so every sender's difference is zero there) and from r's layer up:
- a head's q, k or v input: block r runs again on the suffix with a hook on the projection
  writing that head's values computed from norm(stream + difference);
- an MLP's input: block r runs again with the difference added to its MLP norm's input only
  (the norm feeds the MLP alone; the residual stream keeps the receiving run's);
- `logits`: the difference is added to the final stream before the last norm.
The later blocks run on the suffix with the receiving run's prefix keys and values, as the
reuse path does. Grouped-query models run ungrouped (worker/engines/eap.py), like the estimates.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext

import torch
from nnsight import TransformersModel

from worker.batch.group_read import GroupRead, read_groups
from worker.batch.rows import PairRows, per_batch
from worker.contract.options import PatchOptions
from worker.contract.pairs import Pair
from worker.graph.mib import GRAPH_SENDERS, Graph
from worker.kernels.suffix import block_on_suffix, readout, receiving_prefix, suffix_arguments, writing
from worker.model.families import part
from worker.model.sites import blocks, family, projection, site_values, through_post_norm
from worker.model.weights import output_weights


def receiver_site(name: str, layers: int) -> tuple[int, str, int]:
    """(layer, kind, head) of a receiver name: `a2.h1<q>` -> (2, "q", 1), `m1` -> (1, "m", 0),
    `logits` -> (layers, "logits", 0)."""
    if name == "logits":
        return layers, "logits", 0
    found = re.fullmatch(r"a(\d+)\.h(\d+)<([qkv])>", name)
    return (int(found[1]), found[3], int(found[2])) if found else (int(name[1:]), "m", 0)


def sender_difference(model: TransformersModel, read: GroupRead, sender: str, pairs: torch.Tensor, start: int):
    """[rows, T - start, d]: what patching an edge from `sender` adds to its receiver's input, for
    each pair of `pairs`: the sender's donor output minus its receiving output; a head's through
    its layer's post-attention norm where the family has one (`through_post_norm`)."""
    sites, after = read.acts.sites, slice(start, None)
    if sender == "input":
        return read.donors.difference(("input", 0), sites[("input", 0)], pairs, after)
    layer = int(sender[1:].split(".")[0])
    if sender.startswith("m"):
        return read.donors.difference(("mlp", layer), sites[("mlp", layer)], pairs, after)
    head = int(sender.split(".h")[1])
    heads = torch.full((len(pairs),), head, device=pairs.device)
    z = read.donors.difference(("head", layer), sites[("head", layer)], pairs, after, heads)
    block = blocks(model)[layer]
    difference = z @ output_weights(model, block)[head]
    own = sites[("head", layer)][read.donors.rows.receiving_rows(pairs), after]
    attention = part(block, family(model).out_proj)(own.flatten(2))
    return through_post_norm(model, block, attention, difference[:, :, None])[:, :, 0]


@contextmanager
def reading(model: TransformersModel, block, kind: str, hidden: torch.Tensor, change: torch.Tensor, heads):
    """While open, each row's receiver in `block` (head `heads[i]`'s `kind` input, q/k/v, or the
    MLP's input, `m`) reads the stream `hidden` plus `change[i]`; the rest of the block reads `hidden`."""
    where = family(model)
    if kind != "m":
        rows = torch.arange(len(heads), device=hidden.device)
        patched = site_values(
            model, kind, projection(model, block, kind)(part(block, where.attn_norm)(hidden + change))
        )
        with writing(model, block, kind, patched[rows, :, heads], heads):
            yield
        return
    handle = part(block, where.mlp_norm).register_forward_pre_hook(lambda module, args: (args[0] + change, *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def edge_run(model: TransformersModel, read: GroupRead, items: list[tuple[int, str, str]], start: int, metric: str):
    """The metric of the receiving run of each item (pair index in `read`, sender, receiver) with
    that one edge patched; every item's receiver in one layer and of one kind, patched from `start`."""
    device, layers = read.acts.resid[0].device, len(blocks(model))
    pairs = torch.tensor([pair for pair, _, _ in items], device=device)
    change = torch.cat(
        [sender_difference(model, read, s, pairs[i : i + 1], start) for i, (_, s, _) in enumerate(items)]
    )
    sites = [receiver_site(receiver, layers) for _, _, receiver in items]
    (layer, kind, _), heads = sites[0], torch.tensor([head for _, _, head in sites], device=device)
    receiving = read.donors.rows.receiving_rows(pairs)
    if kind == "logits":
        hidden = read.acts.resid[-1][receiving, start:] + change
    else:
        hidden = read.acts.resid[layer][receiving, start:]
        arguments = suffix_arguments(model, start, hidden)
        for at, block in enumerate(blocks(model)[layer:], start=layer):
            with reading(model, block, kind, hidden, change, heads) if at == layer else nullcontext():
                hidden = block_on_suffix(model, block, hidden, *receiving_prefix(read, at, pairs, start), arguments[at])
    donor = None if read.acts.donor is None else read.acts.donor[pairs]
    return readout(model, metric, hidden[:, -1], read.answers[pairs], donor).cpu()


def exact_edge_values(
    model: TransformersModel, pairs: Sequence[Pair], options: PatchOptions, items: Sequence[tuple[int, int]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clean and corrupted metric per pair (of one token length), and the patched metric of each
    item (pair index, edge index in `Graph.of(model).edges`)."""
    graph, rows_per_run = Graph.of(model), per_batch(options, pairs[0].n_tokens)
    values = torch.empty(len(items))
    baselines = []
    with torch.inference_mode():
        for read in read_groups(model, pairs, options, GRAPH_SENDERS):
            baselines.append(read.acts.metric)
            first = read.first
            batches = defaultdict(list)  # rows that run together: one receiver layer and kind, one start
            for i in read.share_of(items):
                pair, edge = items[i]
                sender, receiver = graph.senders[graph.edges[edge][0]][0], graph.receivers[graph.edges[edge][1]][0]
                layer, kind, _ = receiver_site(receiver, graph.layers)
                start = read.donors.start(pairs[pair])
                batches[(layer, kind, start)].append((i, (pair - first, sender, receiver)))
            for (_, _, start), batch in batches.items():
                for chunk in range(0, len(batch), rows_per_run):
                    run = batch[chunk : chunk + rows_per_run]
                    indices = torch.tensor([i for i, _ in run])
                    values[indices] = edge_run(model, read, [item for _, item in run], start, options.metric)
    return *PairRows.of(options).clean_and_corrupted(torch.cat(baselines)), values
