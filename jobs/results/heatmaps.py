"""The heatmap every report figure is drawn as."""

from __future__ import annotations

import plotly.graph_objects as go


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
        hovertemplate=(
            f"{y_title} %{{y}}, %{{x}}<br>mean %{{z:.3f}}<br>std %{{customdata[0]:.3f}}<br>"
            "count %{customdata[1]}<br>95% interval [%{customdata[2]:.3f}, %{customdata[3]:.3f}]<extra></extra>"
            if hover is not None
            else f"{y_title} %{{y}}, %{{x}}<br>{statistic} %{{z:.3f}}<extra></extra>"
        ),
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
