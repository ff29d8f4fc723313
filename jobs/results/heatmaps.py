"""The heatmap every report figure is drawn as, and the small multiples of a per-head component."""

from __future__ import annotations

from dataclasses import dataclass

import plotly.graph_objects as go
from plotly.subplots import make_subplots


def hover_template(y_title: str, statistic: str, with_statistics: bool) -> str:
    if with_statistics:
        return (
            f"{y_title} %{{y}}, %{{x}}<br>mean %{{z:.3f}}<br>std %{{customdata[0]:.3f}}<br>"
            "count %{customdata[1]}<br>95% interval [%{customdata[2]:.3f}, %{customdata[3]:.3f}]<extra></extra>"
        )
    return f"{y_title} %{{y}}, %{{x}}<br>{statistic} %{{z:.3f}}<extra></extra>"


def heatmap(
    title: str,
    x: list,
    rows: list,
    z,
    hover=None,
    x_title: str = "position",
    y_title: str = "layer",
    statistic: str = "score",
) -> go.Figure:
    """The seed tutorial's look: RdBu diverging around 0, layer 0 on top, tokens on x."""
    trace = go.Heatmap(
        z=z,
        x=x,
        y=[f"{row}" for row in rows],
        colorscale="RdBu",
        zmid=0,
        colorbar={"title": statistic},
        customdata=hover,
        xgap=1,
        ygap=1,
        hovertemplate=hover_template(y_title, statistic, with_statistics=hover is not None),
    )
    figure = go.Figure(trace)
    row_height = 28 if len(rows) <= 24 else 10  # per-head drill-downs have layers x heads rows
    figure.update_layout(
        title=title,
        xaxis_title=x_title,
        yaxis_title=y_title,
        height=160 + row_height * len(rows),
        yaxis={"autorange": "reversed", "type": "category"},
        xaxis={"type": "category"},
        margin={"l": 60, "r": 20, "t": 60, "b": 60},
    )
    return figure


@dataclass(frozen=True)
class Panel:
    """One layer x head heatmap of a component's small multiples: its position label's."""

    label: str  # "at S2", "at all positions", "from senders at END"
    x: list
    rows: list
    z: list
    hover: list
    pairs: int


def all_zero(panel: Panel) -> bool:
    return all(value is None or value == 0 for row in panel.z for value in row)


def small_multiples(title: str, panels: list[Panel], x_title: str, y_title: str, statistic: str) -> go.Figure:
    """A component's layer x head panels side by side (four to a row) on one colour scale,
    symmetric around 0, so a panel of values near 2e-4 looks as faint as it is beside one near
    0.5. Panels whose every cell is exactly 0 are not drawn but named in one line: before every
    pair's first differing token both prompts agree, so patching there changes nothing."""
    drawn = [panel for panel in panels if not all_zero(panel)] or panels[:1]
    zero = [panel.label for panel in panels if panel not in drawn]
    columns = min(len(drawn), 4)
    rows = -(-len(drawn) // columns)
    figure = make_subplots(
        rows=rows,
        cols=columns,
        subplot_titles=[f"{panel.label} (N={panel.pairs})" for panel in drawn],
        horizontal_spacing=0.05,
        vertical_spacing=min(0.12, 0.5 / rows),
    )
    largest = max((abs(v) for panel in drawn for row in panel.z for v in row if v is not None), default=0) or 1
    for i, panel in enumerate(drawn):
        figure.add_trace(
            go.Heatmap(
                z=panel.z,
                x=[str(v) for v in panel.x],
                y=[str(v) for v in panel.rows],
                coloraxis="coloraxis",
                customdata=panel.hover,
                xgap=1,
                ygap=1,
                hovertemplate=hover_template(y_title, statistic, with_statistics=True),
            ),
            row=i // columns + 1,
            col=i % columns + 1,
        )
    figure.update_yaxes(autorange="reversed", type="category", title_text=y_title, col=1)
    figure.update_yaxes(autorange="reversed", type="category")
    figure.update_xaxes(type="category", title_text=x_title, row=rows)
    figure.update_layout(
        title=title,
        coloraxis={"colorscale": "RdBu", "cmin": -largest, "cmax": largest, "colorbar": {"title": statistic}},
        height=140 + rows * (60 + 22 * len(drawn[0].rows)) + (30 if zero else 0),
        margin={"l": 60, "r": 20, "t": 90, "b": 60 + (30 if zero else 0)},
    )
    if zero:
        figure.add_annotation(
            text=f"Every cell exactly 0 {', '.join(zero)}: before every pair's first differing token both "
            "prompts agree, so patching there changes nothing (not drawn).",
            xref="paper",
            yref="paper",
            x=0,
            y=0,
            yshift=-60,
            showarrow=False,
            xanchor="left",
            yanchor="top",
        )
    return figure
