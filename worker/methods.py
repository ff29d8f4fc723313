"""Which code runs each method: the one place a method's name becomes code.

What each method is (the table it writes, whether it estimates, whether it reads receivers) is
said torch-free in worker/options.py `METHODS`; here each name gets the function that turns a
shard of pairs into its results table and its pairs table. The methods that write `effects`
share one runner and differ only in how they estimate: exact patching estimates nothing,
AtP estimates every cell first (worker/attribution.py; AtP* in worker/atpstar.py) and
exact-patches what `verify_top` picks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import pyarrow as pa
from nnsight import TransformersModel

from worker.atpstar import atpstar_estimates
from worker.attention import reading_patterns
from worker.attribution import atp_estimates
from worker.circuit_runs import circuit_tables
from worker.edge_runs import edge_tables
from worker.options import METHODS, PatchOptions
from worker.pairs import Pair
from worker.patching import effects_batch
from worker.paths import path_batch

Runner = Callable[..., tuple[pa.Table, pa.Table]]  # (model, pairs, options, **choices) -> results, pairs


def path_tables(model: TransformersModel, pairs: Sequence[Pair], options: PatchOptions) -> tuple[pa.Table, pa.Table]:
    result = path_batch(model, pairs, options)
    return result.paths, result.pairs


RUNNERS: dict[str, Runner] = {
    "exact": partial(effects_batch, estimate=None),
    "atp": partial(effects_batch, estimate=atp_estimates),
    "atpstar": partial(effects_batch, estimate=atpstar_estimates),
    "paths": path_tables,
    "eap": edge_tables,
    "eap-ig": edge_tables,
    "circuit": circuit_tables,
}
assert RUNNERS.keys() == METHODS.keys(), "every method in worker/options.py needs a runner here"


def run_method(
    model: TransformersModel, pairs: Sequence[Pair], options: PatchOptions, **choices
) -> tuple[pa.Table, pa.Table]:
    """Run `options.method` on `pairs`: its results table and the pairs table. `choices` are the
    runner's own (the effects runner's `exact_path`). Attention probabilities are exposed only
    when a pattern is patched (worker/attention.py)."""
    with reading_patterns(model, "pattern" in options.components):
        return RUNNERS[options.method](model, pairs, options, **choices)
