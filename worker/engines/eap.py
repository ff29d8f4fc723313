"""Edge attribution patching (EAP; Syed et al. 2023) over the graph EAP-IG and MIB use (worker/graph/mib.py).

EAP estimates patching edge s->r (r's input alone gets s's donor-minus-receiving difference) as
that difference times the metric's gradient at r's input, summed over positions and channels:
(a_s,donor - a_s,receiving) . dm/dx_r. One nnsight trace runs a batch's clean and corrupted
prompts and back-propagates the receivers' metric once, reading the gradients where the model
has them whole: at each q/k/v projection's output, at each MLP norm's output and at the last
block's output. A receiver's own input gradient follows from those by the chain rule through
the parts only it uses: a head's projection channels (its slice of the weight), then the norm
(a vector-Jacobian product at the stream the norm read), so no per-receiver copy of the
stream is ever run. The contraction is done per receiver layer against the senders below it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import nnsight
import torch
from nnsight import TransformersModel

from worker.batch.donors import Donors
from worker.batch.metrics import Answers, DonorDistribution, vocabulary_metric
from worker.batch.rows import PairRows, per_batch
from worker.contract.options import PatchOptions
from worker.contract.pairs import Pair
from worker.contract.receivers import INPUTS
from worker.graph.mib import Graph
from worker.model.families import part
from worker.model.sites import (
    blocks,
    component_output,
    embedding_output,
    family,
    last_logits,
    n_layers,
    site_values,
)
from worker.model.weights import head_weights, output_weights


def norm_vjp(norm: torch.nn.Module, stream: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """[P, T, K, d]: the gradient at the norm's input `stream` ([P, T, d]) of K receivers, each
    whose gradient at the norm's output is grads[:, :, k] (the norm is per position, so it is
    applied to K copies of the stream at once)."""
    copies = stream[:, :, None].expand(grads.shape).contiguous()
    return torch.func.vjp(norm, copies)[1](grads.to(stream.dtype))[0]


@dataclass(frozen=True)
class EdgeRead:
    """What one trace of a group of pairs gives: the metric of each pair's rows (`PairRows`
    layout), per sender block its donor-minus-receiving difference ([P, T, senders in the block,
    d]) and per receiver layer its receivers' input gradients ([P, T, receivers in the layer, d]):
    at the receiving run (EAP) or averaged over the interpolated runs (EAP-IG)."""

    metric: torch.Tensor
    differences: list[torch.Tensor]  # input, then per layer the heads, the MLP
    gradients: list[torch.Tensor]  # per layer its heads' q, k, v (head-major) and its MLP, then logits


def read_edges(model: TransformersModel, pairs: Sequence[Pair], options: PatchOptions, steps: int = 0) -> EdgeRead:
    """One trace over the clean and corrupted prompts with one backward of the metric: of the
    receiving runs (`steps` 0: EAP), or of `steps` runs per pair whose embeddings go from the
    donor side toward the receiving side, donor + k/steps (receiving - donor) for k = 0..steps-1
    (EAP-IG's "inputs" variant): step 0 is the donor row itself (its embeddings are the donor's),
    steps 1.. are appended after the pairs' own rows."""
    device, where = model.device, family(model)
    donors = Donors.of(options)
    layout, indices = donors.rows, torch.arange(len(pairs), device=device)
    base, extra = layout.per_pair * len(pairs), max(steps - 1, 0)
    repeat = layout.of_rows(indices).tolist() + indices.repeat_interleave(extra).tolist()
    own = layout.input_ids(pairs)  # then per pair `extra` rows, their embeddings replaced below
    input_ids = torch.cat([own, own[layout.receiving_rows(indices.cpu())].repeat_interleave(extra, dim=0)]).to(device)
    answers = Answers.of([pairs[p] for p in repeat]).to(device)
    donor_rows = layout.donor_rows(torch.tensor(repeat, device=device))
    if steps:  # per pair, its steps in order: the donor row, then its appended rows
        appended = base + torch.arange(len(pairs) * extra, device=device).view(len(pairs), extra)
        gradient_rows = torch.cat([layout.donor_rows(indices)[:, None], appended], dim=1).flatten()
    else:
        gradient_rows = layout.receiving_rows(indices)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    with torch.enable_grad(), model.trace(inputs, logits_to_keep=1):
        saved = nnsight.save({"attn_in": [], "qkv": [], "z": [], "mlp_in": [], "mlp_norm": [], "mlp": []})
        saved["input"] = component_output(model, "input", 0)  # the sender: token embeddings alone
        embedded = embedding_output(model)
        if extra:
            donor, receiving = embedded[layout.donor_rows(indices)], embedded[layout.receiving_rows(indices)]
            fractions = torch.arange(1, steps, device=device, dtype=embedded.dtype)[None, :, None, None] / steps
            embedded[base:] = (donor[:, None] + fractions * (receiving - donor)[:, None]).flatten(0, 1)
        embedded.requires_grad_(True)
        for layer in range(n_layers(model)):
            block = part(model, where.blocks)[layer]
            saved["attn_in"].append(part(block, where.attn_norm).input)
            saved["qkv"].append([component_output(model, i, layer) for i in INPUTS])
            saved["z"].append(component_output(model, "head", layer))
            saved["mlp_in"].append(part(block, where.mlp_norm).input)
            saved["mlp_norm"].append(part(block, where.mlp_norm).output)
            saved["mlp"].append(component_output(model, "mlp", layer))
        final = component_output(model, "resid", n_layers(model) - 1)
        logits = last_logits(model)
        kl_donor = DonorDistribution.of(logits[donor_rows].detach()) if options.metric == "kl" else None
        metric = vocabulary_metric(options.metric, logits, answers, kl_donor)
        values = metric.detach().save()
        grads = nnsight.save({"qkv": {}, "mlp_norm": {}})
        with metric[gradient_rows].sum().backward():
            grads["final"] = final.grad
            for layer in reversed(range(n_layers(model))):
                grads["mlp_norm"][layer] = saved["mlp_norm"][layer].grad
                for i, act in reversed(list(zip(INPUTS, saved["qkv"][layer]))):
                    grads["qkv"][(layer, i)] = act.grad
    with torch.no_grad():
        return assemble(model, donors, values[:base].cpu(), saved, grads, gradient_rows, max(steps, 1))


def assemble(
    model: TransformersModel,
    donors: Donors,
    metric: torch.Tensor,
    saved: dict,
    grads: dict,
    gradient_rows: torch.Tensor,
    steps: int,
) -> EdgeRead:
    """The read's differences and receiver gradients (see `EdgeRead`) from the trace's tensors:
    each gradient row's receiver gradients (the norms' Jacobians taken at that row's stream),
    averaged over a pair's `steps` rows."""
    where = family(model)

    pairs = torch.arange(len(metric) // donors.rows.per_pair, device=saved["input"].device)

    def difference(site: tuple[str, int], act: torch.Tensor) -> torch.Tensor:  # the pairs' own rows, not the steps'
        return donors.difference(site, site_values(model, site[0], act), pairs, slice(None)).detach()

    def per_pair(grad: torch.Tensor) -> torch.Tensor:
        return grad.view(-1, steps, *grad.shape[1:]).mean(1)

    differences, gradients = [difference(("input", 0), saved["input"])[:, :, None]], []
    for layer, block in enumerate(blocks(model)):
        z = difference(("head", layer), saved["z"][layer])
        differences.append(torch.einsum("pthe,hed->pthd", z, output_weights(model, block)))
        differences.append(difference(("mlp", layer), saved["mlp"][layer])[:, :, None])
        per_input = [
            torch.einsum("pthe,hed->pthd", site_values(model, i, grad[gradient_rows]), head_weights(model, block, i))
            for i, grad in ((i, grads["qkv"][(layer, i)]) for i in INPUTS)
        ]
        at_norm = torch.stack(per_input, dim=3).flatten(2, 3)  # [rows, T, heads * 3, d]: head-major, q k v
        heads = norm_vjp(part(block, where.attn_norm), saved["attn_in"][layer][gradient_rows].detach(), at_norm)
        mlp_grad = grads["mlp_norm"][layer][gradient_rows][:, :, None]
        mlp = norm_vjp(part(block, where.mlp_norm), saved["mlp_in"][layer][gradient_rows].detach(), mlp_grad)
        gradients.append(per_pair(torch.cat([heads, mlp], dim=2)))
    gradients.append(per_pair(grads["final"][gradient_rows][:, :, None]))
    return EdgeRead(metric, differences, gradients)


def sender_reach(senders: torch.Tensor, receivers: torch.Tensor, block_sizes: Sequence[int]) -> list[int]:
    """Per block of receivers (consecutive, of these sizes), how many senders, from the first, can
    feed it: one past the last sender of an edge (`senders[i]` -> `receivers[i]`) into the block.
    Senders come in forward order, so a layer's receivers are fed by a prefix of them."""
    blocks = torch.searchsorted(torch.tensor(block_sizes).cumsum(0), receivers, right=True)
    reach = torch.zeros(len(block_sizes), dtype=torch.long)
    return reach.scatter_reduce_(0, blocks, senders + 1, "amax").tolist()


def edge_effects(graph: Graph, read: EdgeRead) -> torch.Tensor:
    """[P, edges]: each edge's estimated change of the receiving run's metric, in `graph.edges` order:
    per block of receivers, the senders that can feed it against the receivers' input gradients,
    summed over positions and channels in one batched matrix product."""
    senders = torch.cat(read.differences, dim=2).float()  # [P, T, senders, d]
    n_pairs, n_tokens, n_senders, width = senders.shape
    flat = senders.permute(0, 2, 1, 3).reshape(n_pairs, n_senders, n_tokens * width)
    sender_index = torch.tensor([s for s, _ in graph.edges])
    receiver_index = torch.tensor([r for _, r in graph.edges])
    sizes = [g.shape[2] for g in read.gradients]
    scores = torch.zeros(n_pairs, n_senders, sum(sizes), device=senders.device)
    first = 0
    for g, size, reach in zip(read.gradients, sizes, sender_reach(sender_index, receiver_index, sizes)):
        receivers = g.float().permute(0, 1, 3, 2).reshape(n_pairs, n_tokens * width, size)  # [P, T*d, R]
        scores[:, :reach, first : first + size] = torch.bmm(flat[:, :reach], receivers)
        first += size
    return scores[:, sender_index, receiver_index]


def eap_estimates(
    model: TransformersModel, pairs: Sequence[Pair], options: PatchOptions, steps: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clean and corrupted metric per pair (of one token length), and [P, edges] each edge's
    estimated patched metric (the receiving run's plus the edge's change): EAP, or with `steps`
    EAP-IG over that many interpolated runs."""
    layout, graph = PairRows.of(options), Graph.of(model)
    per_group = per_batch(options, pairs[0].n_tokens, layout.per_pair + max(steps - 1, 0))
    metrics, estimates = [], []
    for first in range(0, len(pairs), per_group):
        read = read_edges(model, pairs[first : first + per_group], options, steps)
        metrics.append(read.metric)
        estimates.append(layout.receiving_side(read.metric)[:, None] + edge_effects(graph, read).cpu())
    return *layout.clean_and_corrupted(torch.cat(metrics)), torch.cat(estimates)
