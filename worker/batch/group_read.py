"""The shared read of a group of pairs: one nnsight trace of the clean and corrupted rows
(block inputs, site values, attention keys and values, the metric), grouped by the first
position a patch changes."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import nnsight
import torch
from nnsight import TransformersModel
from transformers import DynamicCache

from worker.batch.donors import Donors
from worker.batch.metrics import Answers, DonorDistribution, vocabulary_metric
from worker.batch.rows import PairRows, per_batch
from worker.contract.options import PatchOptions
from worker.contract.pairs import Pair
from worker.model.sites import (
    FORWARD_ORDER,
    blocks,
    component_output,
    embedding_output,
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

    def share_of(self, items: Sequence[tuple]) -> list[int]:
        """`group_share` of this read's pairs."""
        return group_share(items, self.first, len(self.pairs))


def group_share(items: Sequence[tuple], first: int, size: int) -> list[int]:
    """The indices, in order, of the `items` (each a pair's index among all the pairs, then what is
    done to it) whose pair is one of the `size` pairs from `first` on: of the work listed for every
    pair, the part one group of pairs runs."""
    return [i for i, item in enumerate(items) if first <= item[0] < first + size]


def read_groups(
    model: TransformersModel, pairs: Sequence[Pair], options: PatchOptions, components: Sequence[str]
) -> Iterator[GroupRead]:
    """The pairs (of one token length) in groups whose clean and corrupted prompts fit
    `max_batch_tokens`, each read once (`read_activations`, keeping `components`)."""
    donors = Donors.of(options)
    per_group = per_batch(options, pairs[0].n_tokens, donors.rows.per_pair)
    rows = donors.rows
    for first in range(0, len(pairs), per_group):
        group = pairs[first : first + per_group]
        answers = Answers.of(group).to(model.device)
        acts = read_activations(model, group, answers, options, components)
        prefix = [
            (rows.receiving_side(keys), rows.receiving_side(values)) for keys, values in zip(acts.keys, acts.values)
        ]
        yield GroupRead(first, group, acts, answers, prefix, donors.for_pairs(group))


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
    # a cache of every key and value: one built from the config keeps only a sliding window's on such layers
    with torch.inference_mode(), model.trace(inputs, logits_to_keep=1, use_cache=True, cache=DynamicCache()):
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
