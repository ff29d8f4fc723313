"""report.html: one inlined plotly.js, a heatmap per component, rendered by headless Chromium."""
from __future__ import annotations

import re
import subprocess

import pytest

from jobs.ioi import generate_ioi
from jobs.pairfile import read_pairs
from jobs.aggregate import aggregate
from jobs.report import (CHROMIUM_FLAGS, aggregate_figures, build_report, drill_down_figures, find_chromium,
                         label_positions)
from jobs.tables import connect_tables
from jobs.store import Store
from jobs.tables import query
from tests.conftest import write_jsonl
from worker.options import COMPONENTS
from worker.patching import patch_batch


@pytest.fixture(scope="module")
def ioi_run(tmp_path_factory, tiny_model, tokenizer_and_ctx):
    """A run of labelled IOI pairs (two templates, so two token lengths) written as the driver would."""
    tmp = tmp_path_factory.mktemp("report")
    records = generate_ioi(8, seed=0, tokenizer=tokenizer_and_ctx[0])
    pairs = read_pairs(write_jsonl(tmp / "ioi.jsonl", records), *tokenizer_and_ctx).pairs
    result = patch_batch(tiny_model, pairs, COMPONENTS)
    store = Store(str(tmp / "run"))
    store.prepare("hash", overwrite=False)
    store.write_shard("part-00000", result.effects, result.pairs)
    store.write_pairs_table(["part-00000"])
    store.write_manifest({"model": "tiny", "direction": "denoise", "components": list(COMPONENTS)})
    return store, len(tiny_model.transformer.h), records


def test_report_has_one_plotly_and_a_heatmap_per_component(ioi_run):
    store, n_layers, records = ioi_run
    said = build_report(store, drill_down=2)
    assert "3 heatmaps" in said
    html = (store.path("report.html"))
    text = open(html).read()
    assert text.startswith("<!DOCTYPE html>")
    assert len(re.findall(r"plotly\.js v\d", text)) == 1, "plotly.js must be inlined exactly once"
    assert "cdn" not in text.lower().split("<body>")[1][:10000], "no network references in the figures"
    kept = query(store.uri, "SELECT count(*) AS n FROM pairs "
                            "WHERE abs(clean_logit_diff - corrupted_logit_diff) >= 0.1").column("n")[0].as_py()
    assert 0 < kept <= len(records)
    for component in COMPONENTS:
        assert f'id="fig-{component}"' in text
        assert f"tiny: {component}, denoise, N={kept} pairs" in text
    assert text.count('class="figure"') == 3 + 2 * 3


def test_heatmap_shapes_follow_layers_and_role_labels(ioi_run):
    store, n_layers, records = ioi_run
    positions = label_positions(connect_tables(store))
    figures = aggregate_figures(aggregate(store, "denoise").to_pylist(), "tiny", "denoise", positions)
    assert [name for name, _ in figures] == list(COMPONENTS)
    all_labels = {label for r in records for label in r["labels"]}
    for _, figure in figures:
        heatmap = figure.data[0]
        assert len(heatmap.z) == n_layers and len(heatmap.y) == n_layers
        assert set(heatmap.x) == all_labels
        assert len(heatmap.z[0]) == len(all_labels)
        assert list(heatmap.x).index("S2") < list(heatmap.x).index("END") == len(heatmap.x) - 1
        assert heatmap.colorscale[0][1] == "rgb(103,0,31)" and heatmap.zmid == 0  # RdBu around 0


def test_every_heatmap_of_a_report_uses_one_label_order(ioi_run):
    """By mean position over all pairs, ties by name: the same columns in the same place in every figure."""
    store, _, records = ioi_run
    seen: dict[str, list[int]] = {}
    for record in records:
        for position, label in enumerate(record["labels"]):
            seen.setdefault(label, []).append(position)
    expected = sorted(seen, key=lambda label: (sum(seen[label]) / len(seen[label]), label))
    rows = aggregate(store, "denoise", group_by="template").to_pylist()
    figures = aggregate_figures(rows, "tiny", "denoise", label_positions(connect_tables(store)))
    assert len(figures) == 3 * len({r["template"] for r in records})
    for name, figure in figures:
        x = list(figure.data[0].x)
        assert x == [label for label in expected if label in x], name


def test_pairs_table_and_drill_down_show_tokens_as_text(ioi_run):
    store, _, records = ioi_run
    connection = connect_tables(store)
    pair_id, tokens = connection.sql("SELECT pair_id, tokens FROM pairs ORDER BY pair_id LIMIT 1").fetchall()[0]
    record = next(r for r in records if r["id"] == pair_id)
    assert "".join(tokens).replace("␣", " ") == record["clean"]
    assert not any("Ġ" in token for token in tokens)
    (name, figure), *_ = drill_down_figures(connection, "tiny", "denoise", 1)
    assert list(figure.data[0].x) == [f"{i}:{token}" for i, token in enumerate(tokens)]
    assert any(x.endswith(":␣" + record["correct"].strip()) for x in figure.data[0].x)


def test_group_by_adds_heatmaps_per_group(ioi_run):
    store, _, records = ioi_run
    said = build_report(store, group_by="template", drill_down=0)
    n_templates = len({r["template"] for r in records})
    assert f"{3 * n_templates} heatmaps" in said


def test_chromium_renders_every_plot(ioi_run, tmp_path):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("headless Chromium is not installed (.ci/run installs Debian's chromium)")
    store, _, _ = ioi_run
    build_report(store, drill_down=1)
    dom = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path}/profile", "--virtual-time-budget=10000",
         "--dump-dom", f"file://{store.path('report.html')}"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    figures = dom.count('class="figure"')
    assert figures == 3 + 3
    assert dom.count('class="hm"') == figures, "every figure must have drawn its heatmap layer"
    images = re.findall(r'xlink:href="data:image/png;base64,([A-Za-z0-9+/=]+)"', dom)
    assert len(images) == figures and all(len(image) > 500 for image in images)


def test_png_export_or_a_clear_reason(ioi_run):
    store, _, _ = ioi_run
    said = build_report(store, drill_down=0, png=True)
    if find_chromium() is None:
        assert "PNG export skipped: it needs Chromium" in said
    else:
        assert "3 PNGs" in said
        for component in COMPONENTS:
            with open(store.path("png", f"{component}.png"), "rb") as png:
                assert png.read(8) == b"\x89PNG\r\n\x1a\n"
