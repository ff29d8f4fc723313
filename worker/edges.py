"""Edge attribution patching (EAP; Syed et al. 2023) over the graph EAP-IG and MIB use (worker/graph.py).

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
from contextlib import contextmanager
from dataclasses import dataclass

import nnsight
import torch
from nnsight import TransformersModel

from worker.families import part
from worker.graph import Graph
from worker.metrics import Answers, DonorDistribution, vocabulary_metric
from worker.options import PatchOptions
from worker.pairs import Pair
from worker.receivers import INPUTS
from worker.rows import PairRows
from worker.sites import (
    blocks,
    component_output,
    embedding_output,
    family,
    head_dim,
    kv_groups,
    last_logits,
    n_layers,
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
    layout, indices = PairRows.of(options), torch.arange(len(pairs), device=device)
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
        return assemble(model, layout, values[:base].cpu(), saved, grads, gradient_rows, max(steps, 1))


def assemble(
    model: TransformersModel,
    layout: PairRows,
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

    def difference(act: torch.Tensor) -> torch.Tensor:
        return (
            act[layout.donor_offset : len(metric) : layout.per_pair] - layout.receiving_side(act[: len(metric)])
        ).detach()

    def per_pair(grad: torch.Tensor) -> torch.Tensor:
        return grad.view(-1, steps, *grad.shape[1:]).mean(1)

    differences, gradients = [difference(saved["input"])[:, :, None]], []
    for layer, block in enumerate(blocks(model)):
        z = site_values(model, "head", difference(saved["z"][layer]))
        differences.append(torch.einsum("pthe,hed->pthd", z, output_weights(model, block)))
        differences.append(difference(saved["mlp"][layer])[:, :, None])
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


def edge_effects(graph: Graph, read: EdgeRead) -> torch.Tensor:
    """[P, edges]: each edge's estimated change of the receiving run's metric, in `graph.edges` order."""
    senders = torch.cat(read.differences, dim=2).float()  # [P, T, senders, d]
    scores = torch.cat([torch.einsum("ptsd,ptrd->psr", senders, g.float()) for g in read.gradients], dim=2)
    sender_index = torch.tensor([s for s, _ in graph.edges])
    receiver_index = torch.tensor([r for _, r in graph.edges])
    return scores[:, sender_index, receiver_index]


def eap_estimates(
    model: TransformersModel, pairs: Sequence[Pair], options: PatchOptions, steps: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clean and corrupted metric per pair (of one token length), and [P, edges] each edge's
    estimated patched metric (the receiving run's plus the edge's change): EAP, or with `steps`
    EAP-IG over that many interpolated runs."""
    layout, graph = PairRows.of(options), Graph.of(model)
    per_group = max(1, options.max_batch_tokens // ((layout.per_pair + max(steps - 1, 0)) * pairs[0].n_tokens))
    metrics, estimates = [], []
    for first in range(0, len(pairs), per_group):
        read = read_edges(model, pairs[first : first + per_group], options, steps)
        metrics.append(read.metric)
        estimates.append(layout.receiving_side(read.metric)[:, None] + edge_effects(graph, read).cpu())
    return *layout.clean_and_corrupted(torch.cat(metrics)), torch.cat(estimates)


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
