"""The cell planner: which (component, layer[, head], position) cells a group of pairs has, and
which (pair, cell) rows of them a run computes. Shared by the effects and paths runners."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from nnsight import TransformersModel

from worker.contract.pairs import Pair
from worker.model.sites import Cell, n_layers, site_heads


def patch_cells(
    components: Sequence[str], n_layers: int, n_tokens: int, heads: Mapping[str, int] | None = None, positions="each"
) -> list[Cell]:
    """Every (component, layer[, head], position) of a prompt, in the order results are reported;
    `heads`: how many heads each per-head component has (worker/model/sites.py::site_heads).

    With `positions="all"` a cell patches every position at once (position None).
    """
    spots = [None] if positions == "all" else range(n_tokens)
    heads = heads or {}
    return [
        Cell(c, layer, position, head)
        for c in components
        for layer in range(n_layers)
        for head in (range(heads[c]) if heads.get(c) else [None])
        for position in spots
    ]


def model_cells(model: TransformersModel, components: Sequence[str], n_tokens: int, positions: str) -> list[Cell]:
    """`patch_cells` of `model`: its layers, and each per-head component's heads."""
    heads = {component: site_heads(model, component) for component in components}
    return patch_cells(components, n_layers(model), n_tokens, heads, positions)


def selected_cells(pairs: Sequence[Pair], cells: Sequence[Cell], labels: Sequence[str] = ()) -> list[tuple[int, int]]:
    """The (pair, cell) rows a result reports, pair-major: every cell, or with `labels` only the
    cells at positions whose label is listed (each pair has its own labelled positions)."""
    if not labels:
        return [(p, c) for p in range(len(pairs)) for c in range(len(cells))]
    rows = []
    for p, pair in enumerate(pairs):
        wanted = {i for i, label in enumerate(pair.labels or ()) if label in labels}
        rows += [(p, c) for c, cell in enumerate(cells) if cell.position in wanted]
    return rows
