"""Mean donors (`--donor mean`, `mean-all`): the mean donor-side activation of every site.

A site is a (component, layer) the run patches; its activation is what `worker/model/sites.py` reads
(per-head components: every head's values, head after head, as `site_values` orders them).
`mean` keeps one mean per position key: the position's label for labelled pairs (a token-wise
mean over every pair of the file), or `LENGTH:POSITION` for unlabelled ones (aligned by index
among pairs of one token length);
`mean-all` keeps one key, `all`, over every position of every pair. The donor side is the
clean prompt when denoising and the corrupted one when noising.

An actor sums a shard (`donor_sums`); the driver adds the shards' sums and stores the means in
OUT (jobs/means_pass.py); actors load that file once (`load_means`, cached per process) and
`Donors` writes its rows where a patch would write the donor's activation.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache

import nnsight
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from nnsight import TransformersModel

from worker.batch.rows import PairRows, per_batch
from worker.contract.layout import MEANS_FILE
from worker.contract.options import PatchOptions
from worker.contract.pairs import Pair
from worker.contract.storage import filesystem
from worker.graph.mib import GRAPH_SENDERS
from worker.model.sites import FORWARD_ORDER, component_output, n_layers, site_values

ALL_POSITIONS = "all"
SUMS_SCHEMA = pa.schema(
    [
        ("component", pa.string()),
        ("layer", pa.int16()),
        ("key", pa.string()),
        ("count", pa.int64()),
        ("sum", pa.list_(pa.float64())),
    ]
)


def position_keys(pair: Pair, donor: str) -> list[str]:
    """The key of each position of `pair` whose mean a `donor` patch writes there."""
    if donor == "mean-all":
        return [ALL_POSITIONS] * pair.n_tokens
    if pair.labels is not None:
        return list(pair.labels)
    return [f"{pair.n_tokens}:{t}" for t in range(pair.n_tokens)]


def donor_sites(options: PatchOptions, layers: int) -> list[tuple[str, int]]:
    """The (component, layer) sites whose means a run needs, in the order a forward pass reaches
    them: those it patches (path patching: heads), or, for a run of the graph's edges (no
    components: circuits), every sender: the token embeddings (`input`, layer 0), each layer's heads and MLP."""
    wanted = options.components or GRAPH_SENDERS
    first = [("input", 0)] if "input" in wanted else []
    return first + [(component, layer) for layer in range(layers) for component in FORWARD_ORDER if component in wanted]


def donor_sums(model: TransformersModel, pairs: Sequence[Pair], options: PatchOptions) -> pa.Table:
    """Per site and key: how many donor-side positions of `pairs` there are, and their activations' sum."""
    rows, sites = PairRows.of(options), donor_sites(options, n_layers(model))
    sums: dict[tuple[str, int, str], torch.Tensor] = {}
    counts: dict[str, int] = defaultdict(int)  # positions per key: the same at every site
    by_length: dict[int, list[Pair]] = defaultdict(list)
    for pair in pairs:
        by_length[pair.n_tokens].append(pair)
    for group in by_length.values():
        per_trace = per_batch(options, group[0].n_tokens)
        for first in range(0, len(group), per_trace):
            chunk = group[first : first + per_trace]
            donor_side = [rows.donor_of(p.clean_ids, p.corrupted_ids) for p in chunk]
            input_ids = torch.tensor(donor_side, device=model.device)
            with torch.inference_mode(), model.trace({"input_ids": input_ids}, logits_to_keep=1):
                saved = nnsight.save([])  # in forward order (`donor_sites`)
                for component, layer in sites:
                    saved.append(component_output(model, component, layer))
            flat = [key for pair in chunk for key in position_keys(pair, options.donor)]
            names = sorted(set(flat))
            number = {name: k for k, name in enumerate(names)}
            index = torch.tensor([number[key] for key in flat])
            for (component, layer), act in zip(sites, saved):
                values = site_values(model, component, act)
                values = values.reshape(values.shape[0] * values.shape[1], -1).double().cpu()
                summed = torch.zeros(len(names), values.shape[-1], dtype=torch.float64).index_add_(0, index, values)
                for k, name in enumerate(names):
                    site = (component, layer, name)
                    sums[site] = summed[k] if site not in sums else sums[site] + summed[k]
            for key in flat:
                counts[key] += 1
    sites = sorted(sums)
    return pa.table(
        {
            "component": [s[0] for s in sites],
            "layer": [s[1] for s in sites],
            "key": [s[2] for s in sites],
            "count": [counts[s[2]] for s in sites],
            "sum": [sums[s].tolist() for s in sites],
        },
        schema=SUMS_SCHEMA,
    )


@dataclass(frozen=True)
class DonorMeans:
    """The stored means: per site, a [keys, width] tensor, rows in the order of `keys`."""

    keys: tuple[str, ...]
    values: dict[tuple[str, int], torch.Tensor]
    placed: dict = field(default_factory=dict, compare=False, repr=False)  # `on`'s copies

    def on(self, device: torch.device, dtype: torch.dtype) -> dict[tuple[str, int], torch.Tensor]:
        """`values` on `device` in `dtype`, copied there once (an actor's every patch reads them)."""
        if (device, dtype) not in self.placed:
            self.placed[(device, dtype)] = {site: mean.to(device, dtype) for site, mean in self.values.items()}
        return self.placed[(device, dtype)]

    @classmethod
    def of(cls, table: pa.Table) -> DonorMeans:
        keys = tuple(sorted(set(table.column("key").to_pylist())))
        rows: dict[tuple[str, int], dict[str, list]] = defaultdict(dict)
        for row in table.to_pylist():
            rows[(row["component"], row["layer"])][row["key"]] = row["mean"]
        values = {site: torch.tensor([by_key[key] for key in keys]) for site, by_key in rows.items()}
        return cls(keys, values)

    def key_index(self, pairs: Sequence[Pair], donor: str) -> torch.Tensor:
        """[pairs, tokens]: the row of each position's mean (pairs of one length)."""
        index = {key: i for i, key in enumerate(self.keys)}
        try:
            return torch.tensor([[index[key] for key in position_keys(pair, donor)] for pair in pairs])
        except KeyError as missing:
            raise ValueError(f"the donor means have no mean for position key {missing}") from None


@cache
def load_means(root: str) -> DonorMeans:
    """The means stored in the run at `root` (a local path or URI), read once per process (an
    actor reads them for its first shard)."""
    fs, path = filesystem(root)
    return DonorMeans.of(pq.read_table(f"{path.rstrip('/')}/{MEANS_FILE}", filesystem=fs))
