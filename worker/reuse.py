"""Patching by recomputing only what a patch changes (below nnsight, checked against it).

A patch at (layer l, position t) leaves every layer below l and every position before t
exactly as in the receiving run. So one nnsight trace reads the clean and corrupted
activations of each pair (block inputs, attention and MLP outputs), and each patched run
is rebuilt from there: the receiver's layer-l output on positions t..T-1 with position t
patched, then blocks l+1..L-1 on those positions only, attending to the receiver's cached
keys and values for positions before t. That costs about (L-l)(T-t) token-layers instead
of L*T. The blocks are the model's own modules, called on the suffix with a stand-in key/value
cache that holds the receiver's prefix (read in the same trace), so every family runs the
same code; worker/families.py says where each keeps the parts a patched layer needs.
A head patch only changes layer l's attention output at t (the output projection of
the receiver's heads with the donor's slice for that head), so it recomputes like `attn`.
Where attention and MLP read the same block input (GPT-NeoX's parallel residual), an
attention patch changes the block's output by its change alone.
A patch of every position at once (`positions="all"`) is one at positions t..T-1 with t the
pair's first differing token: before it both runs are identical.
Rows that share t are batched; rows join the batch at the layer they patch.
Only the last position's final hidden state is unembedded: on the answer columns alone for
`logit_diff`, on the whole vocabulary for the metrics that need it (worker/metrics.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import nnsight
import torch
import torch.nn.functional as F
from nnsight import TransformersModel

from worker.donors import Donors
from worker.families import part
from worker.metrics import Answers, DonorDistribution, answer_logit_diff, reads_vocabulary, vocabulary_metric
from worker.options import COMPONENTS, PatchOptions
from worker.pairs import Pair
from worker.rows import PairRows
from worker.sites import (
    FORWARD_ORDER,
    Cell,
    attention_site,
    blocks,
    component_output,
    embedding_output,
    family,
    last_logits,
    site_values,
)


@dataclass(frozen=True)
class Activations:
    """Of the read's rows (the `PairRows` layout): block inputs for layers 0..L (the last is the
    final block's output), the values (`site_values`) of each (component, layer) read, each
    layer's attention keys and values (as its cache holds them), and the metric of each row; for
    `kl`, each pair's donor distribution."""

    resid: list[torch.Tensor]
    sites: dict[tuple[str, int], torch.Tensor]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    metric: torch.Tensor
    donor: DonorDistribution | None


@dataclass(frozen=True)
class GroupRead:
    """A group of pairs read by one trace, and what every patched run of the group shares: the
    activations (in the `PairRows` layout of `donors.rows`), the answers, the receiving rows' prefix
    keys and values per layer, and where the group's patches take their values (`donors`)."""

    first: int  # the index of the group's first pair among all the pairs
    pairs: Sequence[Pair]
    acts: Activations
    answers: Answers
    prefix: list[tuple[torch.Tensor, torch.Tensor]]
    donors: Donors


def read_groups(
    model: TransformersModel, pairs: Sequence[Pair], options: PatchOptions, components: Sequence[str]
) -> Iterator[GroupRead]:
    """The pairs (of one token length) in groups whose clean and corrupted prompts fit
    `max_batch_tokens`, each read once (`read_activations`, keeping `components`)."""
    donors = Donors.of(options)
    per_group = max(1, options.max_batch_tokens // (donors.rows.per_pair * pairs[0].n_tokens))
    rows = donors.rows
    for first in range(0, len(pairs), per_group):
        group = pairs[first : first + per_group]
        answers = Answers.of(group).to(model.device)
        acts = read_activations(model, group, answers, options, components)
        prefix = [
            (rows.receiving_side(keys), rows.receiving_side(values)) for keys, values in zip(acts.keys, acts.values)
        ]
        yield GroupRead(first, group, acts, answers, prefix, donors.for_pairs(group))


def resolve_exact_path(path: str) -> str:
    """Which exact patching path runs: `reuse` (the default, `auto`) or `trace`."""
    if path not in ("auto", "trace", "reuse"):
        raise ValueError(f"exact_path must be auto, trace or reuse, got {path!r}")
    return "reuse" if path == "auto" else path


def read_activations(
    model: TransformersModel, pairs: Sequence[Pair], answers: Answers, options: PatchOptions, components: Sequence[str]
) -> Activations:
    """One nnsight trace over the clean and corrupted prompts, saving every activation a patch needs.

    Block inputs are always kept; the other components' activations only for `components`
    (`input`: the token embeddings, the graph's sender of that name, as site ("input", 0)).
    """
    device = model.device
    layout, indices = PairRows.of(options), torch.arange(len(pairs), device=device)
    input_ids = layout.input_ids(pairs).to(device)
    row_answers = answers[layout.of_rows(indices)]
    donor_rows = layout.donor_rows(indices)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    donor = None  # only saved values leave a trace: set here, replaced inside for `kl`
    with torch.inference_mode(), model.trace(inputs, logits_to_keep=1, use_cache=True):
        sites = nnsight.save({})
        if "input" in components:  # the token embeddings, before the stream they enter
            sites[("input", 0)] = component_output(model, "input", 0)
        resid = nnsight.save([embedding_output(model)])
        for layer in range(len(blocks(model))):
            for component in FORWARD_ORDER:
                if component in components and component != "resid":  # block outputs: `resid` above
                    sites[(component, layer)] = component_output(model, component, layer)
            resid.append(component_output(model, "resid", layer))
        logits = last_logits(model)
        row_donor = None
        if options.metric == "kl":
            donor = nnsight.save(DonorDistribution.of(logits[donor_rows]))
            row_donor = donor[layout.of_rows(indices)]
        metric = vocabulary_metric(options.metric, logits, row_answers, row_donor).save()
        cache = model.output.cache.save()
    return Activations(
        resid,
        {site: site_values(model, site[0], act) for site, act in sites.items()},
        [layer.keys for layer in cache.layers],
        [layer.values for layer in cache.layers],
        metric.cpu(),
        donor,
    )


class PrefixCache:
    """What a block's attention asks of a key/value cache (`update`), answered with the
    receiver's keys and values of positions 0..t-1 put before the suffix's own."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values

    def update(self, keys: torch.Tensor, values: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([self.keys, keys], dim=2), torch.cat([self.values, values], dim=2)


def suffix_arguments(model: TransformersModel, start: int, like: torch.Tensor) -> dict:
    """What every block needs to run on positions start..T-1 of `like` ([rows, T - start, d]):
    a causal mask over prefix and suffix, and where the family has them, rotary position
    embeddings for those positions (one row, broadcast over the batch). The same for every layer."""
    length, where = like.shape[1], family(model)
    positions = torch.arange(start, start + length, device=like.device)
    hidden_from = positions[:, None] < torch.arange(start + length, device=like.device)[None, :]
    mask = torch.zeros(hidden_from.shape, dtype=like.dtype, device=like.device)
    arguments = {"attention_mask": mask.masked_fill(hidden_from, torch.finfo(like.dtype).min)[None, None]}
    if where.rotary is not None:
        arguments["position_ids"] = positions[None]
        arguments["position_embeddings"] = part(model._module, where.rotary)(like, positions[None])
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
    and `suffix_arguments`."""
    cache = {family(model).cache_argument: PrefixCache(prefix_keys, prefix_values)}
    output = block(hidden, **cache, **arguments)
    return output[0] if isinstance(output, tuple) else output


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
    every position or where `at` ([rows, positions]) is True."""
    mask = (torch.arange(z.shape[2], device=z.device) == heads[:, None])[:, None, :, None]
    if at is not None:
        mask = mask & at[:, :, None, None]
    return part(block, family(model).out_proj)(torch.where(mask, donor_z[:, :, None], z).flatten(2))


def block_given_attention(
    model: TransformersModel, block: torch.nn.Module, hidden: torch.Tensor, attention: torch.Tensor
) -> torch.Tensor:
    """A block's output from its input `hidden` when its attention sublayer outputs `attention`: the
    residual additions and the MLP (with its norm) recomputed, in the family's arrangement."""
    where = family(model)
    mlp, norm = part(block, where.mlp), part(block, where.mlp_norm)
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
        donated = donors.take(cell, acts.sites[cell], donor_rows, here)
        suffix[:, :width] += donated - acts.sites[cell][receivers, here]
    elif component in ("attn", "head"):
        patched = patched_attention(model, block, acts, cell, here, receivers, donor_rows, heads, donors)
        suffix[:, :width] = block_given_attention(model, block, acts.resid[layer][receivers, here], patched)
    else:  # inside attention: the block runs again on the suffix, the head's values written as it goes
        donated = donors.take(cell, acts.sites[cell], donor_rows, here, heads)
        keys, values = read.prefix[layer]
        hidden = acts.resid[layer][receivers, start:]
        arguments = suffix_arguments(model, start, hidden)
        with writing(model, block, component, donated, heads):
            suffix = block_on_suffix(model, block, hidden, keys[pairs, :, :start], values[pairs, :, :start], arguments)
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
        return vocabulary_metric(metric, unembedding(final), answers, donor)
    columns, inverse = torch.unique(answers.ids, return_inverse=True)
    bias = unembedding.bias
    logits = F.linear(final, unembedding.weight[columns], None if bias is None else bias[columns])
    return answer_logit_diff(logits.gather(1, inverse), answers)


def run_rows(
    model: TransformersModel, read: GroupRead, rows: list[tuple[int, Cell]], start: int, whole: bool, metric: str
) -> torch.Tensor:
    """The patched metric of rows (pair index in `read`, cell) that all patch position `start` (all
    of start.. if `whole`)."""
    acts, prefix, answers = read.acts, read.prefix, read.answers
    device = acts.resid[0].device
    hidden, order, arguments = None, [], None
    for layer, block in enumerate(blocks(model)):
        if hidden is not None:
            pair_rows = torch.tensor([pair for pair, _ in order], device=device)
            keys, values = prefix[layer]
            arguments = arguments or suffix_arguments(model, start, hidden)
            hidden = block_on_suffix(
                model, block, hidden, keys[pair_rows, :, :start], values[pair_rows, :, :start], arguments
            )
        for component in COMPONENTS:
            joining = [(pair, cell) for pair, cell in rows if cell.layer == layer and cell.component == component]
            if not joining:
                continue
            pairs = torch.tensor([pair for pair, _ in joining], device=device)
            heads = torch.tensor([cell.head or 0 for _, cell in joining], device=device)
            new = patched_layer_output(model, block, read, (component, layer), start, whole, pairs, heads)
            hidden = new if hidden is None else torch.cat([hidden, new])
            order += joining
    pair_rows = torch.tensor([pair for pair, _ in order], device=device)
    donor = None if acts.donor is None else acts.donor[pair_rows]
    values = readout(model, metric, hidden[:, -1], answers[pair_rows], donor).cpu()
    position_of = {(pair, cell): i for i, (pair, cell) in enumerate(order)}
    return values[torch.tensor([position_of[row] for row in rows])]


def patched_span(pair: Pair, cell: Cell, donors: Donors) -> tuple[int, bool]:
    """(first patched position, whether every later position is patched too)."""
    return (donors.start(pair), True) if cell.position is None else (cell.position, False)


def reuse_values(
    model: TransformersModel,
    pairs: Sequence[Pair],
    cells: Sequence[Cell],
    work: Sequence[tuple[int, int]],
    options: PatchOptions,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as the trace path: baselines per pair and one patched metric per work item.

    Pairs are taken in groups whose clean and corrupted prompts fit `max_batch_tokens`, and
    each group's rows are run in chunks of at most `max_batch_tokens // T` rows.
    """
    rows_per_chunk = max(1, options.max_batch_tokens // pairs[0].n_tokens)
    values = torch.empty(len(work))
    baselines = []
    with torch.inference_mode():
        for read in read_groups(model, pairs, options, options.components):
            baselines.append(read.acts.metric)
            first = read.first
            mine = [i for i, (pair, _) in enumerate(work) if first <= pair < first + len(read.pairs)]
            spans = {i: patched_span(pairs[work[i][0]], cells[work[i][1]], read.donors) for i in mine}
            for start, whole in sorted(set(spans.values())):
                at_start = [i for i in mine if spans[i] == (start, whole)]
                for chunk in range(0, len(at_start), rows_per_chunk):
                    indices = at_start[chunk : chunk + rows_per_chunk]
                    rows = [(work[i][0] - first, cells[work[i][1]]) for i in indices]
                    values[torch.tensor(indices)] = run_rows(model, read, rows, start, whole, options.metric)
    metric = torch.cat(baselines)
    return *PairRows.of(options).clean_and_corrupted(metric), values
