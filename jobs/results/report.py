"""report.html: one self-contained page of heatmaps (plotly.js inlined once), readable offline.

A layer x position-label heatmap of the mean score per component (per group and per token
length where the aggregate is split that way), a layer x head heatmap per position label for
each per-head component (and, in a path-patching run, per receiver: sender layer x sender head), a summary of the
run, and a drill-down of a few individual pairs with their actual tokens. `--png` also writes
each heatmap as a PNG by screenshotting it in headless Chromium, when Chromium is installed.
"""

from __future__ import annotations

import html
import importlib.resources
import shutil
import subprocess
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import plotly.graph_objects as go
import plotly.offline
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.results.aggregate import ALL_POSITIONS, DEFAULT_MIN_GAP, aggregate
from jobs.results.circuit_report import circuit_figures
from jobs.results.circuit_report import summary as circuit_summary
from jobs.results.edge_report import agreement, edge_figures
from jobs.results.heatmaps import Panel, heatmap, small_multiples
from jobs.results.query import connect_tables, release_memory
from jobs.results.stability import DEFAULT_HALVES, SplitHalves, stability, stability_figures
from jobs.results.verification import collect_verified, correlations, fmt, scatter_figures, top_k_agreement
from jobs.store import EDGES, EFFECTS, FAITHFULNESS, ResultsKind, Store
from worker.contract.layout import GROUPS_FILE, PAIRS_FILE, REPORT_FILE, STABILITY_FILE
from worker.contract.options import COMPONENTS, DEFAULT_DONOR, DEFAULT_METRIC, HEAD_COMPONENTS, METHODS, Method
from worker.contract.storage import is_uri

DRILL_DOWN_PAIRS = 3
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def find_chromium() -> str | None:
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def panel_order(key: tuple, positions: dict[str, float]) -> tuple:
    """Components in the canonical order (worker/contract/options.py COMPONENTS), then groups, token lengths, labels."""
    name, group, n_tokens, label = key
    rank = COMPONENTS.index(name) if name in COMPONENTS else -1  # the all-positions panel first
    return (
        rank,
        name,
        "" if group is None else str(group),
        n_tokens or 0,
        () if label is None else label_key(label, positions),
    )


def label_positions(connection) -> dict[str, float]:
    """Each position label's mean position over the labelled pairs.

    One order for every heatmap of a report, so its columns line up from figure to figure
    (per-figure orders differed where labels tie or groups place them differently).
    """
    rows = connection.sql(
        "SELECT label, avg(position) FROM (SELECT unnest(labels) AS label, unnest(range(len(labels))) AS position "
        "FROM pairs) GROUP BY label"
    ).fetchall()
    return dict(rows)


def label_key(label: str, positions: dict[str, float]) -> tuple[float, str]:
    """Mean position, then name; unlabelled pairs' labels are their positions ("0", "1", ...); `all` last."""
    if label in positions:
        return positions[label], label
    return (float("inf"), label) if label == ALL_POSITIONS else (float(label), label)


def in_label_order(labels, positions: dict[str, float]) -> list[str]:
    return sorted(labels, key=lambda label: label_key(label, positions))


def panel_of(row: dict, kind: ResultsKind) -> tuple[tuple, str]:
    """The heatmap an aggregate row of a `kind` run belongs to, (name, group, n_tokens, label), and its x column.

    Per-head components (head, q, k, v, pattern): layer x head at one label. A component patched
    at every position at once: one layer x component panel for all of them. Otherwise: layer x
    position label per component.
    Path patching: sender layer x sender head per receiver and sender position label.
    """
    scope = (row["group"], row["n_tokens"])
    if kind.senders:
        return (f"paths to {row['receiver']}", *scope, row["label"]), "head"
    if row["component"] in HEAD_COMPONENTS:
        return (row["component"], *scope, row["label"]), "head"
    if row["label"] == ALL_POSITIONS:
        return ("all positions", *scope, None), "component"
    return (row["component"], *scope, None), "label"


def x_order(column: str, values: set, positions: dict[str, float]) -> list:
    if column == "label":
        return in_label_order(values, positions)
    return sorted(values, key=COMPONENTS.index) if column == "component" else sorted(values)


def component_rank(name: str) -> tuple:
    """Components in the canonical order (worker/contract/options.py COMPONENTS); receivers after, by name."""
    return (COMPONENTS.index(name) if name in COMPONENTS else len(COMPONENTS), name)


def scope_said(group, n_tokens) -> str:
    """What a panel's title adds of its scope: the group, the token length of unlabelled pairs."""
    return "".join([f", group {group}" if group is not None else "", f", {n_tokens}-token pairs" if n_tokens else ""])


def aggregate_figures(
    rows: list[dict], run: str, positions: dict[str, float], statistic: str = "score", kind: ResultsKind = EFFECTS
) -> list[tuple[str, go.Figure]]:
    """One heatmap per panel (see `panel_of`) present in the aggregate rows of a `kind` run, with
    hover statistics; per head (`head`, q, k, v, pattern; path patching's senders), the IOI
    paper's layer x head figure at each position label, drawn as small multiples of the
    component that share one colour scale (`small_multiples`)."""
    panels: dict[tuple, list[dict]] = defaultdict(list)
    columns: dict[tuple, str] = {}
    for row in rows:
        if kind.senders:  # a sender is drawn as a head's cell: its layer and head
            row = {**row, "layer": row["sender_layer"], "head": row["sender_head"]}
        key, columns[key] = panel_of(row, kind)
        panels[key].append(row)
    figures: list = []
    multiples: dict[tuple, list[Panel]] = {}  # per-head panels, per (name, group, n_tokens)
    for key in sorted(panels, key=lambda key: panel_order(key, positions)):
        name, group, n_tokens, label = key
        cells, column = panels[key], columns[key]
        x = x_order(column, {cell[column] for cell in cells}, positions)
        layers = sorted({cell["layer"] for cell in cells})
        at = {(cell["layer"], cell[column]): cell for cell in cells}
        prefix = "" if statistic == "score" else f"{statistic}_"
        named = (f"std_{statistic}", f"{prefix}count" if prefix else "count", f"{prefix}ci_low", f"{prefix}ci_high")
        z = [[at.get((layer, value), {}).get(f"mean_{statistic}") for value in x] for layer in layers]
        hover = [[[at.get((layer, value), {}).get(name) for name in named] for value in x] for layer in layers]
        n_pairs = max(cell["pairs"] for cell in cells)
        scope = scope_said(group, n_tokens)
        at = " from senders at" if kind.senders else " at"  # path patching: where the senders were patched
        at_label = {None: "", ALL_POSITIONS: f"{at} all positions"}.get(label, f"{at} {label}")
        title = f"{run}: {name}{at_label}, N={n_pairs} pairs{scope}"
        file_name = "-".join(str(part).replace(" ", "-") for part in key if part is not None)
        x_title = "sender head" if kind.senders else column if column != "label" else "position"
        if column == "head":
            whole = (name, group, n_tokens)
            if whole not in multiples:
                multiples[whole] = []
                figures.append(whole)  # a place held: drawn once all its labels are in
            multiples[whole].append(Panel(at_label.strip(), x, layers, z, hover, n_pairs))
            continue
        figures.append(
            (
                file_name,
                heatmap(
                    title,
                    x,
                    layers,
                    z,
                    hover,
                    x_title,
                    y_title="sender layer" if kind.senders else "layer",
                    statistic=statistic,
                ),
            )
        )
    for index, entry in enumerate(figures):
        if len(entry) == 3:  # a place held for a component's small multiples
            name, group, n_tokens = entry
            title = f"{run}: {name}{scope_said(group, n_tokens)}"
            file_name = "-".join(str(part).replace(" ", "-") for part in entry if part is not None)
            y_title = "sender layer" if kind.senders else "layer"
            x_title = "sender head" if kind.senders else "head"
            figures[index] = (file_name, small_multiples(title, multiples[entry], x_title, y_title, statistic))
    return figures


def drill_down_figures(
    connection, store: Store, run: str, n_pairs: int, statistic: str = "score"
) -> list[tuple[str, go.Figure]]:
    """Score heatmaps of the first few pairs, with their own tokens on x: layer (or layer.head for
    heads) x each position patched, or `all` where every position was patched at once; in a
    path-patching run, sender layer.head x sender position per receiver. Their rows are read a
    batch of parts at a time (`Store.row_batches`)."""
    pairs = connection.sql(f"SELECT pair_id, tokens FROM pairs ORDER BY pair_id LIMIT {int(n_pairs)}").fetchall()
    if not pairs:
        return []
    columns = ["pair_id", *store.kind.cell, store.kind.position, statistic]
    chosen = pc.field("pair_id").isin([pair_id for pair_id, _ in pairs])
    found: list[pa.Table] = []
    for results, _ in store.row_batches():
        rows = results.to_table(columns=columns, filter=chosen)
        if rows.num_rows or not found:  # empty tables kept would hold buffers per batch: 100 MiB at 31,000 parts
            found.append(rows.combine_chunks())
    connection.register("drill_down", pa.concat_tables(found))
    figures = []
    for pair_id, tokens in pairs:
        effects = connection.execute(
            f"SELECT {', '.join(columns[1:])} FROM drill_down WHERE pair_id = ? ORDER BY ALL", [pair_id]
        ).fetchall()
        by_component: dict[str, dict] = defaultdict(dict)
        for component, layer, head, position, score in effects:
            row = layer if head is None else f"{layer}.{head}"
            by_component[component][(row, position)] = score
        for component in sorted(by_component, key=component_rank):  # in the aggregate's order
            scores = by_component[component]
            rows = list(dict.fromkeys(row for row, _ in scores))
            spots = sorted({position for _, position in scores}, key=lambda p: -1 if p is None else p)
            x = [ALL_POSITIONS if p is None else f"{p}:{tokens[p]}" for p in spots]
            z = [[scores.get((row, p)) for p in spots] for row in rows]
            title = f"{run}: pair {pair_id}, {'paths to ' if store.kind.senders else ''}{component}"
            y_title = "layer.head" if component in HEAD_COMPONENTS or store.kind.senders else "layer"
            figures.append(
                (f"pair-{pair_id}-{component}", heatmap(title, x, rows, z, y_title=y_title, statistic=statistic))
            )
    return figures


def summary_rows(connection, manifest: dict, min_gap: float) -> list[tuple[str, str]]:
    metric = manifest.get("metric", DEFAULT_METRIC)
    clean, corrupted = f'"clean_{metric}"', f'"corrupted_{metric}"'

    def spread(column: str) -> str:
        return f"avg({column}), stddev_samp({column}), min({column}), median({column}), max({column})"

    stats = connection.sql(
        f"SELECT count(*), count(*) FILTER (WHERE abs({clean} - {corrupted}) < {float(min_gap)}), "
        f"{spread(clean)}, {spread(corrupted)} FROM pairs"
    ).fetchall()[0]
    n, excluded, *values = [v if v is not None else float("nan") for v in stats]

    def said(v) -> str:
        return f"mean {v[0]:.3f}, std {v[1]:.3f}, min {v[2]:.3f}, median {v[3]:.3f}, max {v[4]:.3f}"

    return [
        ("model", manifest.get("model", "?")),
        ("direction", manifest.get("direction", "?")),
        ("donor", manifest.get("donor", DEFAULT_DONOR)),
        ("metric", metric),
        *([("components", ", ".join(manifest["components"]))] if manifest.get("components") else []),
        *([("receivers", ", ".join(manifest["receivers"]))] if manifest.get("receivers") else []),
        *([("positions", manifest.get("positions", "each"))] if manifest.get("components") else []),
        ("method", manifest.get("method", "exact")),
        ("pairs", f"{n}"),
        ("excluded from score means", f"{excluded} (|clean - corrupted {metric}| < {min_gap})"),
        (f"clean {metric}", said(values[:5])),
        (f"corrupted {metric}", said(values[5:])),
    ]


def page_pieces(title: str, summary: list[tuple[str, str]], sections: list[tuple[str, list]]) -> Iterator[bytes]:
    """report.html in pieces, written one at a time (`write_page`): the document is never whole in
    memory, and plotly.js (4.8 MB) comes from its file a MiB at a time (`plotly_js`)."""
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary)
    yield (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><script type='text/javascript'>"
    ).encode()
    yield from plotly_js()
    yield (
        "</script><style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}</style>"
        f"</head><body><h1>{html.escape(title)}</h1><table>{rows}</table>"
    ).encode()
    for heading, figures in (section for section in sections if section[1]):
        yield f"<h2>{html.escape(heading)}</h2>".encode()
        for name, figure in figures:
            yield (
                f'<div class="figure" id="fig-{html.escape(name)}">'
                f"{figure.to_html(full_html=False, include_plotlyjs=False)}</div>"
            ).encode()
    yield b"</body></html>"


def plotly_js() -> Iterator[bytes]:
    """The bytes of `plotly.offline.get_plotlyjs()` (plotly's package_data/plotly.min.js), read a
    MiB at a time: not whole as text and again as bytes."""
    source = importlib.resources.files("plotly") / "package_data" / "plotly.min.js"
    if not source.is_file():  # another plotly's layout: its own reader
        yield plotly.offline.get_plotlyjs().encode()
        return
    with source.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            yield chunk


def write_page(store: Store, title: str, summary: list[tuple[str, str]], sections: list[tuple[str, list]]) -> None:
    """report.html, written piece by piece (`page_pieces`)."""
    store.write_pieces(page_pieces(title, summary, sections), REPORT_FILE)


def write_pngs(figures: list[tuple[str, go.Figure]], out_dir: Path, chromium: str) -> list[Path]:
    """Screenshot each figure alone in headless Chromium."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, figure in figures:
            source = Path(scratch) / f"{name}.html"
            figure.write_html(source, include_plotlyjs=True, full_html=True, config={"displayModeBar": False})
            target = out_dir / f"{name}.png"
            height = int(figure.layout.height or 500) + 40
            subprocess.run(
                [
                    chromium,
                    *CHROMIUM_FLAGS,
                    f"--user-data-dir={scratch}/profile",
                    f"--screenshot={target}",
                    f"--window-size=1000,{height}",
                    "--virtual-time-budget=5000",
                    source.as_uri(),
                ],
                check=True,
                capture_output=True,
                timeout=120,
            )
            written.append(target)
    return written


def method_of(manifest: dict) -> Method:
    return METHODS[manifest.get("method", "exact")]


def run_title(manifest: dict) -> str:
    """What every figure title starts with: model, direction, metric (and what the method adds, such
    as AtP for its estimates)."""
    donor = manifest.get("donor", DEFAULT_DONOR)
    said = [
        manifest.get("direction", "denoise"),
        manifest.get("metric", DEFAULT_METRIC),
        "" if donor == DEFAULT_DONOR else f"{donor} donor",
        method_of(manifest).title,
    ]
    return f"{manifest.get('model', '?')} ({', '.join(part for part in said if part)})"


def verification(
    connection, manifest: dict, run: str, min_gap: float
) -> tuple[list[tuple[str, str]], list[tuple[str, go.Figure]]]:
    """For an AtP (AtP*) run with verified rows: summary lines and one scatter per component."""
    k, metric, method = manifest.get("verify_top", 0), manifest.get("metric", DEFAULT_METRIC), method_of(manifest)
    if not method.estimates or not k:
        return [], []
    collect_verified(connection, metric, min_gap, method.ranks_by)
    agreements = correlations(connection)
    share, n_pairs = top_k_agreement(connection, k)
    lines = [
        (
            f"{method.title} vs exact, {a.component}",
            f"Pearson {fmt(a.pearson)}, Spearman {fmt(a.spearman)} ({a.n} verified cells)",
        )
        for a in agreements
    ]
    ranked = "its top" if method.ranks_by == "estimate" else f"its top by {method.ranks_by}"
    lines.append(
        (f"exact top {k} that {method.title} ranked in {ranked} {k}", f"{fmt(share)} (mean over {n_pairs} pairs)")
    )
    return lines, scatter_figures(connection, run, agreements, method.title)


def write_report(
    store: Store,
    aggregate_rows: list[dict],
    min_gap: float,
    drill_down: int = DRILL_DOWN_PAIRS,
    png: bool = False,
    stable: tuple[str, pa.Table | None] = ("not computed", None),
    statistic: str = "score",
) -> str:
    """Write report.html (and PNGs if asked); returns a line saying what was written. `stable`:
    what the summary says of split-half stability, and its table (None: not computed)."""
    manifest = store.read_manifest() or {}
    model = manifest.get("model", "?")
    run = run_title(manifest)
    connection = connect_tables(store)
    summary = [*summary_rows(connection, manifest, min_gap), ("split-half stability", stable[0])]
    overall = [row for row in aggregate_rows if row["group"] is None]
    halvings = stability_figures(stable[1], run, overall, statistic) if stable[1] is not None else []
    stability_section = ("Stability: would other pairs of the task give the same answer?", halvings)
    if store.kind is FAITHFULNESS:
        figures = circuit_figures(store, aggregate_rows, manifest, run)
        summary += circuit_summary(aggregate_rows, manifest)
        write_page(store, f"patchsweep: {model}", summary, [("Circuits", figures)])
        return f"report: {store.path(REPORT_FILE)} ({len(figures)} figures)"
    if store.kind is EDGES:
        figures = edge_figures(aggregate_rows, run)
        summary += agreement(connection, method_of(manifest).title)
        write_page(store, f"patchsweep: {model}", summary, [("Edges", figures), stability_section])
        return f"report: {store.path(REPORT_FILE)} ({len(figures)} figures)"
    statistic = "estimate" if method_of(manifest).estimates else "score"
    heatmaps = aggregate_figures(aggregate_rows, run, label_positions(connection), statistic, store.kind)
    release_memory()
    pairs = drill_down_figures(connection, store, run, drill_down, statistic)
    release_memory()
    checks, scatters = verification(connection, manifest, run, min_gap)
    layout = "sender layer and head, per receiver" if store.kind.senders else "layer and position"
    write_page(
        store,
        f"patchsweep: {model}",
        summary + checks,
        [
            (f"Mean {statistic} by {layout}", heatmaps),
            ("AtP against exact patching (verified cells)", scatters),
            stability_section,
            ("Individual pairs", pairs),
        ],
    )
    scattered = f", {len(scatters)} AtP checks" if scatters else ""
    said = f"report: {store.path(REPORT_FILE)} ({len(heatmaps)} heatmaps{scattered}, {len(pairs)} pair drill-downs)"
    if not png:
        return said
    chromium = find_chromium()
    if chromium is None or is_uri(store.uri):
        return said + "; PNG export skipped: it needs Chromium (apt-get install chromium) and a local --out"
    written = write_pngs(heatmaps, Path(store.path("png")), chromium)
    return said + f"; {len(written)} PNGs in {store.path('png')}"


def build_report(
    store: Store,
    group_by: str | None = None,
    min_gap: float = DEFAULT_MIN_GAP,
    drill_down: int = DRILL_DOWN_PAIRS,
    png: bool = False,
    halves: SplitHalves = DEFAULT_HALVES,
) -> str:
    """Aggregate the run in `store` (overall, and per group with `group_by`), measure its split-half
    stability as `halves` asks, and write its report; returns a line saying what was written.
    Without `group_by` an earlier grouped table is removed: it would describe other shards or
    another min-gap than the report beside it; an earlier stability table not rebuilt likewise."""
    manifest = store.read_manifest() or {}
    direction, metric = manifest.get("direction", "denoise"), manifest.get("metric", DEFAULT_METRIC)
    release_memory()  # what the run (the driver's pairs table) left cached
    rows = aggregate(store, direction, None, min_gap, metric).to_pylist()
    grouped = aggregate(store, direction, group_by, min_gap, metric).to_pylist() if group_by else []
    if not group_by:
        store.remove(GROUPS_FILE)
    rows += grouped
    stable, statistic = None, "estimate" if method_of(manifest).estimates else "score"
    n_pairs = pq.read_metadata(store.path(PAIRS_FILE), filesystem=store.fs).num_rows
    release_memory()
    if halves.wanted(n_pairs):
        dtype = manifest.get("config", {}).get("dtype", "float32")
        stable = stability(store, metric, min_gap, statistic, halves.splits, halves.seed, grouped, dtype)
        release_memory()
    else:
        store.remove(STABILITY_FILE)
    return write_report(store, rows, min_gap, drill_down, png, (halves.said(n_pairs, stable), stable), statistic)
