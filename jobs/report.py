"""report.html: one self-contained page of heatmaps (plotly.js inlined once), readable offline.

A layer x position-label heatmap of the mean score per component (per group and per token
length where the aggregate is split that way), a summary of the run, and a drill-down of a
few individual pairs with their actual tokens. `--png` also writes each heatmap as a PNG by
screenshotting it in headless Chromium, when Chromium is installed.
"""
from __future__ import annotations

import html
import shutil
import subprocess
import tempfile
from collections import defaultdict
from pathlib import Path

import plotly.graph_objects as go
import plotly.offline

from jobs.aggregate import DEFAULT_MIN_GAP, aggregate
from jobs.store import REPORT_FILE, Store
from jobs.tables import connect_tables
from worker.options import COMPONENTS

DRILL_DOWN_PAIRS = 3
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def find_chromium() -> str | None:
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def heatmap(title: str, x: list, layers: list[int], z, hover=None, x_title: str = "position") -> go.Figure:
    """The seed tutorial's look: RdBu diverging around 0, layer 0 on top, tokens on x."""
    trace = go.Heatmap(
        z=z, x=x, y=[f"{layer}" for layer in layers], colorscale="RdBu", zmid=0,
        colorbar={"title": "score"}, customdata=hover, xgap=1, ygap=1,
        hovertemplate=(
            "layer %{y}, %{x}<br>mean %{z:.3f}<br>std %{customdata[0]:.3f}<br>count %{customdata[1]}<extra></extra>"
            if hover is not None else "layer %{y}, %{x}<br>score %{z:.3f}<extra></extra>"
        ),
    )
    figure = go.Figure(trace)
    figure.update_layout(
        title=title, xaxis_title=x_title, yaxis_title="layer", height=160 + 28 * len(layers),
        yaxis={"autorange": "reversed", "type": "category"}, xaxis={"type": "category"},
        margin={"l": 60, "r": 20, "t": 60, "b": 60},
    )
    return figure


def panel_order(key: tuple, positions: dict[str, float]) -> tuple:
    """Components in the canonical resid, attn, mlp, head order, then groups, token lengths, labels."""
    component, group, n_tokens, label = key
    rank = COMPONENTS.index(component) if component in COMPONENTS else len(COMPONENTS)
    return rank, component, "" if group is None else str(group), n_tokens or 0, \
        () if label is None else label_key(label, positions)


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
    """Mean position, then name; unlabelled pairs' labels are their positions ("0", "1", ...)."""
    return positions[label] if label in positions else float(label), label


def in_label_order(labels, positions: dict[str, float]) -> list[str]:
    return sorted(labels, key=lambda label: label_key(label, positions))


def aggregate_figures(rows: list[dict], model: str, direction: str,
                      positions: dict[str, float]) -> list[tuple[str, go.Figure]]:
    """One heatmap per (component, group, token length) present in the aggregate rows: layer x
    position label; for `head`, one layer x head heatmap per position label (the IOI paper's figure)."""
    panels: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        label = row["label"] if row["component"] == "head" else None
        panels[(row["component"], row["group"], row["n_tokens"], label)].append(row)
    figures = []
    for key in sorted(panels, key=lambda key: panel_order(key, positions)):
        component, group, n_tokens, label = key
        cells = panels[key]
        if label is None:   # layer x position label
            column, x_title, x = "label", "position", in_label_order({cell["label"] for cell in cells}, positions)
        else:               # layer x head, at one label
            column, x_title, x = "head", "head", sorted({cell["head"] for cell in cells})
        layers = sorted({cell["layer"] for cell in cells})
        at = {(cell["layer"], cell[column]): cell for cell in cells}
        z = [[at.get((layer, value), {}).get("mean_score") for value in x] for layer in layers]
        hover = [[[at.get((layer, value), {}).get("std_score"), at.get((layer, value), {}).get("count")]
                  for value in x] for layer in layers]
        n_pairs = max(cell["pairs"] for cell in cells)
        scope = "".join([f", group {group}" if group is not None else "",
                         f", {n_tokens}-token pairs" if n_tokens is not None else ""])
        at_label = f" at {label}" if label is not None else ""
        title = f"{model}: {component}{at_label}, {direction}, N={n_pairs} pairs{scope}"
        name = "-".join(str(part) for part in (component, label, group, n_tokens) if part is not None)
        figures.append((name, heatmap(title, x, layers, z, hover, x_title)))
    return figures


def drill_down_figures(connection, model: str, direction: str, n_pairs: int) -> list[tuple[str, go.Figure]]:
    """Score heatmaps of the first few pairs, with their own tokens on x."""
    pairs = connection.sql(f"SELECT pair_id, tokens FROM pairs ORDER BY pair_id LIMIT {int(n_pairs)}").fetchall()
    figures = []
    for pair_id, tokens in pairs:
        effects = connection.execute(
            "SELECT component, layer, position, score FROM effects WHERE pair_id = ? AND head IS NULL ORDER BY ALL",
            [pair_id]
        ).fetchall()
        x = [f"{i}:{token}" for i, token in enumerate(tokens)]
        by_component: dict[str, dict] = defaultdict(dict)
        for component, layer, position, score in effects:
            by_component[component][(layer, position)] = score
        for component, scores in by_component.items():
            layers = sorted({layer for layer, _ in scores})
            z = [[scores.get((layer, p)) for p in range(len(tokens))] for layer in layers]
            title = f"{model}: pair {pair_id}, {component}, {direction}"
            figures.append((f"pair-{pair_id}-{component}", heatmap(title, x, layers, z)))
    return figures


def summary_rows(connection, manifest: dict, min_gap: float) -> list[tuple[str, str]]:
    stats = connection.sql(
        "SELECT count(*), "
        f"count(*) FILTER (WHERE abs(clean_logit_diff - corrupted_logit_diff) < {float(min_gap)}), "
        "avg(clean_logit_diff), stddev_samp(clean_logit_diff), min(clean_logit_diff), "
        "median(clean_logit_diff), max(clean_logit_diff), "
        "avg(corrupted_logit_diff), stddev_samp(corrupted_logit_diff), min(corrupted_logit_diff), "
        "median(corrupted_logit_diff), max(corrupted_logit_diff) FROM pairs"
    ).fetchall()[0]
    n, excluded, *values = [v if v is not None else float("nan") for v in stats]

    def spread(v) -> str:
        return f"mean {v[0]:.3f}, std {v[1]:.3f}, min {v[2]:.3f}, median {v[3]:.3f}, max {v[4]:.3f}"

    return [
        ("model", manifest.get("model", "?")),
        ("direction", manifest.get("direction", "?")),
        ("components", ", ".join(manifest.get("components", []))),
        ("pairs", f"{n}"),
        ("excluded from score means", f"{excluded} (|clean - corrupted logit diff| < {min_gap})"),
        ("clean logit diff", spread(values[:5])),
        ("corrupted logit diff", spread(values[5:])),
    ]


def page(title: str, summary: list[tuple[str, str]], sections: list[tuple[str, list]]) -> str:
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary)
    body = []
    for heading, figures in sections:
        body.append(f"<h2>{html.escape(heading)}</h2>")
        body += [f'<div class="figure" id="fig-{html.escape(name)}">'
                 f'{figure.to_html(full_html=False, include_plotlyjs=False)}</div>'
                 for name, figure in figures]
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        f"<script type='text/javascript'>{plotly.offline.get_plotlyjs()}</script>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}</style>"
        f"</head><body><h1>{html.escape(title)}</h1><table>{rows}</table>{''.join(body)}</body></html>"
    )


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
            subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={scratch}/profile",
                            f"--screenshot={target}", f"--window-size=1000,{height}",
                            "--virtual-time-budget=5000", source.as_uri()],
                           check=True, capture_output=True, timeout=120)
            written.append(target)
    return written


def write_report(store: Store, aggregate_rows: list[dict], min_gap: float,
                 drill_down: int = DRILL_DOWN_PAIRS, png: bool = False) -> str:
    """Write report.html (and PNGs if asked); returns a line saying what was written."""
    manifest = store.read_manifest() or {}
    model, direction = manifest.get("model", "?"), manifest.get("direction", "denoise")
    connection = connect_tables(store)
    heatmaps = aggregate_figures(aggregate_rows, model, direction, label_positions(connection))
    pairs = drill_down_figures(connection, model, direction, drill_down)
    document = page(f"patchsweep: {model}", summary_rows(connection, manifest, min_gap),
                    [("Mean score by layer and position", heatmaps), ("Individual pairs", pairs)])
    store.write_bytes(document.encode(), REPORT_FILE)
    said = f"report: {store.path(REPORT_FILE)} ({len(heatmaps)} heatmaps, {len(pairs)} pair drill-downs)"
    if not png:
        return said
    chromium = find_chromium()
    if chromium is None or "://" in store.uri:
        return said + "; PNG export skipped: it needs Chromium (apt-get install chromium) and a local --out"
    written = write_pngs(heatmaps, Path(store.path("png")), chromium)
    return said + f"; {len(written)} PNGs in {store.path('png')}"


def build_report(store: Store, group_by: str | None = None, min_gap: float = DEFAULT_MIN_GAP,
                 drill_down: int = DRILL_DOWN_PAIRS, png: bool = False) -> str:
    """Aggregate the run in `store` and write its report; returns a line saying what was written."""
    direction = (store.read_manifest() or {}).get("direction", "denoise")
    rows = aggregate(store, direction, group_by, min_gap).to_pylist()
    return write_report(store, rows, min_gap, drill_down, png)
