"""Which code runs each method: the one place a method's name becomes code.

What each method is (the table it writes, whether it estimates, whether it reads receivers) is
said torch-free in worker/contract/options.py `METHODS`; here each name gets the function that turns a
shard of pairs into its results table and its pairs table. The methods that write `effects`
share one runner and differ only in how they estimate: exact patching estimates nothing,
AtP estimates every cell first (worker/engines/atp.py; AtP* in worker/engines/atpstar.py) and
exact-patches what `verify_top` picks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import pyarrow as pa
from nnsight import TransformersModel

from worker.contract.options import (
    DEFAULT_COMPONENTS,
    DEFAULT_DONOR,
    DEFAULT_MAX_BATCH_TOKENS,
    DEFAULT_METRIC,
    METHODS,
    PatchOptions,
)
from worker.contract.pairs import Pair
from worker.engines.atp import atp_estimates
from worker.engines.atpstar import atpstar_estimates
from worker.methods.edges import edge_tables
from worker.methods.effects import effects_batch
from worker.methods.faithfulness import circuit_tables
from worker.methods.paths import path_batch
from worker.model.attention import reading_patterns

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
assert RUNNERS.keys() == METHODS.keys(), "every method in worker/contract/options.py needs a runner here"


def run_method(
    model: TransformersModel, pairs: Sequence[Pair], options: PatchOptions, **choices
) -> tuple[pa.Table, pa.Table]:
    """Run `options.method` on `pairs`: its results table and the pairs table. `choices` are the
    runner's own (the effects runner's `exact_path`). Attention probabilities are exposed only
    when a pattern is patched (worker/model/attention.py)."""
    with reading_patterns(model, "pattern" in options.components):
        return RUNNERS[options.method](model, pairs, options, **choices)


@dataclass(frozen=True)
class PatchResult:
    effects: pa.Table
    pairs: pa.Table


def patch_batch(
    model: TransformersModel,
    pairs: Sequence[Pair],
    components: Sequence[str] = DEFAULT_COMPONENTS,
    direction: str = "denoise",
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    positions: str = "each",
    metric: str = DEFAULT_METRIC,
    method: str = "exact",
    verify_top: int = 0,
    donor: str = DEFAULT_DONOR,
    exact_path: str = "auto",
    means: str | None = None,
) -> PatchResult:
    """Patch every (component, layer[, head], position) of every pair; the `effects` and `pairs` tables.

    `positions`: `each` position, `all` positions in one patch, or only the positions whose
    label is listed (`"S2,END"`); a pair without a listed label gets no rows. `metric`: what
    is read at the last position (worker/batch/metrics.py); it names the value column.
    `method="exact"` patches every cell; `"atp"` estimates every cell by attribution patching
    (worker/engines/atp.py) and exact-patches `verify_top` of them per pair (and as many at random).
    Pairs of different token lengths are patched in separate equal-length groups, so
    padding never shifts a position. `max_batch_tokens` bounds rows x tokens per forward,
    which bounds activation memory for long prompts and deep models. Exact patching runs on
    `exact_path="trace"`, every patch inside one nnsight trace per batch, or `"reuse"`, which
    reads the clean and corrupted activations with nnsight and recomputes only what a patch
    changes (worker/engines/reuse.py); `"auto"` takes `reuse`.
    """

    options = PatchOptions(
        tuple(components), positions, direction, metric, max_batch_tokens, method, verify_top, donor=donor, means=means
    )
    return PatchResult(*run_method(model, pairs, options, exact_path=exact_path))
