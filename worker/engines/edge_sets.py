"""Patching a set of edges at once (EAP-IG's `evaluate_graph`): what a circuit is judged by.

The receiving run is rebuilt layer by layer from one read of both prompts (worker/engines/reuse.py),
from the first position a donor can change on. Every receiver reads the stream plus, for each
of its edges in the set, the sender's donor output minus the sender's output in this run; so a
sender downstream of a patched edge sends its patched value, and the rest of the stream is the
run's own. Patching no edge gives the receiving run; patching every edge, the donor run. A
circuit is evaluated by patching every edge outside it (worker/methods/faithfulness.py).

Per block: each head's q, k and v are computed from norm(stream + its change), with that head's
rows of the projection, and written into the block's own forward (`reuse.writing`); the MLP's
norm reads the stream plus its change, which sums this block's heads' differences as the heads
are computed (a pre-hook on the output projection keeps this run's head outputs); the MLP's
output is kept the same way. The senders' differences so far ([senders, rows, positions, d])
are contracted per block with each row's patched-edge matrix: the only cost beyond the forward.
Where a post-attention norm stands between the heads and the stream (Gemma), a layer's heads are
not additive senders: their patched differences are summed per receiver and the sum passed
through that layer's norm at this run's attention output (`through_post_norm`), as EAP-IG does.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack

import torch
from nnsight import TransformersModel

from worker.batch.group_read import GroupRead, read_groups
from worker.batch.rows import PairRows, per_batch
from worker.contract.options import PatchOptions
from worker.contract.pairs import Pair
from worker.contract.receivers import INPUTS
from worker.graph.mib import GRAPH_SENDERS, Graph
from worker.kernels.suffix import block_on_suffix, readout, receiving_prefix, suffix_arguments, writing
from worker.model.families import part
from worker.model.sites import added_by, blocks, family, n_heads, site_values, through_post_norm
from worker.model.weights import head_bias, head_weights, output_weights, ungrouped


def edge_matrices(graph: Graph, patched: torch.Tensor) -> torch.Tensor:
    """[sets, senders, receivers]: the sets `patched` ([sets, edges] bool, `graph.edges` order) as
    sender x receiver matrices, 1 where the edge is patched."""
    matrices = torch.zeros(len(patched), len(graph.senders), len(graph.receivers))
    senders = torch.tensor([s for s, _ in graph.edges])
    receivers = torch.tensor([r for _, r in graph.edges])
    matrices[:, senders, receivers] = patched.float()
    return matrices


class EdgeSetRun:
    """The rows of one run: each a pair's receiving run with its own set of edges patched, from
    position `start` on. `differences` holds, per sender so far, its donor output minus its
    output in this run ([senders, rows, positions, d])."""

    def __init__(self, model: TransformersModel, read: GroupRead, pairs: torch.Tensor, matrices: torch.Tensor, start):
        self.model, self.read, self.pairs, self.start = model, read, pairs, start
        self.receiving, self.donor_rows = read.donors.rows.receiving_rows(pairs), read.donors.source_rows(pairs)
        self.hidden = read.acts.resid[0][self.receiving, start:]
        self.edges = matrices.to(self.hidden.device, self.hidden.dtype)
        self.linear = self.edges  # the edges whose senders' differences add up as they are
        self.post_norms: list[tuple[int, slice, torch.Tensor]] = []  # (layer, its head senders, its run's o)
        if family(model).attn_post_norm is not None:  # heads reach receivers through `post_norms` alone
            self.linear = self.edges.clone()
            for layer in range(len(blocks(model))):
                self.linear[:, self.head_senders(layer)] = 0
        self.differences = self.hidden.new_zeros(matrices.shape[1], *self.hidden.shape)
        embeddings = read.acts.sites[("input", 0)]
        self.differences[0] = read.donors.difference(("input", 0), embeddings, pairs, slice(start, None))
        self.arguments = suffix_arguments(model, start, self.hidden)

    def head_senders(self, layer: int) -> slice:
        """Where layer `layer`'s heads sit among the senders: after `input` and each earlier layer's heads and MLP."""
        heads = n_heads(self.model)
        first = 1 + layer * (heads + 1)
        return slice(first, first + heads)

    def change(self, senders: int, receivers: slice) -> torch.Tensor:
        """[rows, positions, receivers, d]: what each receiver reads beyond the stream, from the first `senders`."""
        found = torch.einsum("sntd,nsr->ntrd", self.differences[:senders], self.linear[:, :senders, receivers])
        for layer, heads, z in self.post_norms:
            if heads.stop <= senders:
                summed = torch.einsum("hntd,nhr->ntrd", self.differences[heads], self.edges[:, heads, receivers])
                found = found + through_post_norm(self.model, blocks(self.model)[layer], z, summed)
        return found

    def donated(self, component: str, layer: int, acts: torch.Tensor | None = None) -> torch.Tensor:
        """What sender `component` of `layer` sends along an ablated edge: the donor's output, zeros
        or the stored mean (`input`: the token embeddings, layer 0)."""
        acts = self.read.acts.sites[(component, layer)] if acts is None else acts
        return self.read.donors.take((component, layer), acts, self.donor_rows, slice(self.start, None))

    def block(self, layer: int, block: torch.nn.Module, sent: int, received: int) -> None:
        """Block `layer` on the run's stream, its receivers reading their changes and its senders'
        differences kept (`sent` senders and `received` receivers come before the block)."""
        model, where, heads = self.model, family(self.model), n_heads(self.model)
        mlp_receiver, weights = received + 3 * heads, output_weights(model, block)
        donor_z, donor_mlp = self.donated("head", layer), self.donated("mlp", layer)
        inputs = part(block, where.attn_norm)(
            self.hidden[:, :, None] + self.change(sent, slice(received, mlp_receiver))
        )
        inputs = inputs.unflatten(2, (heads, len(INPUTS)))  # the receivers are head-major: q, k, v

        def heads_sent(module, args):  # this run's head outputs: the output projection's input
            z = site_values(model, "head", args[0])
            self.differences[sent : sent + heads] = torch.einsum("nthe,hed->hntd", donor_z - z, weights)

        def attention_sent(module, args, output):  # before the post-norm: what the heads' sums pass through
            self.post_norms.append((layer, self.head_senders(layer), output))

        def mlp_reads(module, args):
            return (args[0] + self.change(sent + heads, slice(mlp_receiver, mlp_receiver + 1))[:, :, 0], *args[1:])

        def mlp_sent(module, args, output):
            self.differences[sent + heads] = donor_mlp - output

        with ExitStack() as stack:
            for i, input in enumerate(INPUTS):
                values = torch.einsum("nthd,hed->nthe", inputs[:, :, :, i], head_weights(model, block, input))
                stack.enter_context(writing(model, block, input, values + head_bias(model, block, input)))
            stack.enter_context(part(block, where.out_proj).register_forward_pre_hook(heads_sent))
            if where.attn_post_norm is not None:
                stack.enter_context(part(block, where.out_proj).register_forward_hook(attention_sent))
            stack.enter_context(part(block, where.mlp_norm).register_forward_pre_hook(mlp_reads))
            stack.enter_context(part(block, added_by(where, "mlp")).register_forward_hook(mlp_sent))
            prefix = receiving_prefix(self.read, layer, self.pairs, self.start)
            self.hidden = block_on_suffix(model, block, self.hidden, *prefix, self.arguments[layer])

    def metric(self, metric: str) -> torch.Tensor:
        """Every block run, then the metric of each row (`logits` reads the last stream plus its change)."""
        sent, received, heads = 1, 0, n_heads(self.model)
        for layer, block in enumerate(blocks(self.model)):
            self.block(layer, block, sent, received)
            sent, received = sent + heads + 1, received + 3 * heads + 1
        final = self.hidden[:, -1] + self.change(sent, slice(received, received + 1))[:, -1, 0]
        donor = None if self.read.acts.donor is None else self.read.acts.donor[self.pairs]
        return readout(self.model, metric, final, self.read.answers[self.pairs], donor).cpu()


def edge_set_values(
    model: TransformersModel,
    pairs: Sequence[Pair],
    options: PatchOptions,
    patched: torch.Tensor,
    items: Sequence[tuple[int, int]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clean and corrupted metric per pair (of one token length), and the metric of each item
    (pair index, set index): the pair's receiving run with the edges of set `patched[set]`
    ([sets, edges] bool, in `Graph.of(model).edges` order) patched from `options.donor`."""
    values, baselines = torch.empty(len(items)), []
    with ungrouped(model), torch.inference_mode():
        matrices = edge_matrices(Graph.of(model), patched)
        senders = matrices.shape[1]
        # a row keeps a difference per sender: 32 of them count as one row of the budget
        rows_per_run = per_batch(options, pairs[0].n_tokens, rows_per_item=senders, budget_scale=32)
        for read in read_groups(model, pairs, options, GRAPH_SENDERS):
            baselines.append(read.acts.metric)
            by_start: dict[int, list[int]] = {}
            for i in read.share_of(items):
                by_start.setdefault(read.donors.start(pairs[items[i][0]]), []).append(i)
            for start, mine in by_start.items():
                for chunk in range(0, len(mine), rows_per_run):
                    run = torch.tensor(mine[chunk : chunk + rows_per_run])
                    in_read = torch.tensor([items[i][0] - read.first for i in run.tolist()], device=model.device)
                    sets = matrices[[items[i][1] for i in run.tolist()]]
                    values[run] = EdgeSetRun(model, read, in_read, sets, start).metric(options.metric)
    return *PairRows.of(options).clean_and_corrupted(torch.cat(baselines)), values
