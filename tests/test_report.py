"""report.html: one inlined plotly.js, a heatmap per component, rendered by headless Chromium."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from jobs.datasets.ioi import generate_ioi
from jobs.pairfile import read_pairs
from jobs.results.aggregate import aggregate
from jobs.results.query import connect_tables, query
from jobs.results.report import (
    CHROMIUM_FLAGS,
    aggregate_figures,
    build_report,
    drill_down_figures,
    find_chromium,
    label_positions,
)
from jobs.store import Store
from tests.conftest import write_jsonl
from worker.contract.layout import GROUPS_FILE
from worker.contract.options import DEFAULT_COMPONENTS as COMPONENTS
from worker.contract.options import METHODS
from worker.methods.registry import patch_batch


def ioi_store(tmp, model, tokenizer_and_ctx, n_pairs: int, components, **options) -> tuple[Store, list[dict], object]:
    """A run of labelled IOI pairs written as the driver would (`options` of patch_batch also go to
    the manifest); the store, the records, the result."""
    records = generate_ioi(n_pairs, seed=0, tokenizer=tokenizer_and_ctx[0])
    pairs = read_pairs(write_jsonl(tmp / "ioi.jsonl", records), *tokenizer_and_ctx).pairs
    result = patch_batch(model, pairs, components, **options)
    store = Store(str(tmp / "run"))
    store.prepare("hash", overwrite=False)
    writer = store.part_writer()
    writer.write_pairs("part-00000", result.pairs)
    writer.write_results("part-00000", result.effects)
    store.write_pairs_table(["part-00000"])
    store.write_manifest(
        {"model": "tiny", "direction": "denoise", "metric": "logit_diff", "components": list(components), **options}
    )
    return store, records, result


@pytest.fixture(scope="module")
def ioi_run(tmp_path_factory, tiny_model, tokenizer_and_ctx):
    """Eight labelled IOI pairs (two templates, so two token lengths), whole components."""
    store, records, _ = ioi_store(tmp_path_factory.mktemp("report"), tiny_model, tokenizer_and_ctx, 8, COMPONENTS)
    return store, len(tiny_model.transformer.h), records


def test_heads_are_small_multiples_on_one_colour_scale(tmp_path, tiny_model, tokenizer_and_ctx):
    """One figure for `head`: a layer x head panel per label whose cells are not all exactly 0, in
    label order on one colour scale symmetric around 0; the all-zero labels named in one line."""
    store, records, result = ioi_store(tmp_path, tiny_model, tokenizer_and_ctx, 4, ["head"])
    config = tiny_model._module.config
    labels_of = {r["id"]: r["labels"] for r in records}
    means = mean_scores(result, lambda row: (labels_of[row["pair_id"]][row["position"]], row["layer"], row["head"]))
    positions = label_positions(connect_tables(store))
    figures = aggregate_figures(aggregate(store, "denoise").to_pylist(), "tiny", positions)
    labels = sorted({label for r in records for label in r["labels"]}, key=lambda label: (positions[label], label))
    cells = [(layer, head) for layer in range(config.n_layer) for head in range(config.n_head)]
    zero = [label for label in labels if all(means[(label, *cell)] == 0 for cell in cells)]
    drawn = [label for label in labels if label not in zero]
    assert zero and drawn  # the labels before the first differing token, and the rest
    assert [name for name, _ in figures] == ["head"]
    figure = figures[0][1]
    titles = [a.text for a in figure.layout.annotations]
    assert [title.split(" (N=")[0] for title in titles[: len(drawn)]] == [f"at {label}" for label in drawn]
    assert titles[-1].startswith("Every cell exactly 0 " + ", ".join(f"at {label}" for label in zero) + ":")
    largest = max(abs(means[(label, *cell)]) for label in drawn for cell in cells)
    assert (figure.layout.coloraxis.cmin, figure.layout.coloraxis.cmax) == pytest.approx((-largest, largest))
    for heatmap, label in zip(figure.data, drawn, strict=True):
        assert list(heatmap.x) == [str(h) for h in range(config.n_head)] and len(heatmap.z) == config.n_layer
        assert heatmap.coloraxis == "coloraxis"
        for layer, head in cells:
            assert heatmap.z[layer][head] == pytest.approx(means[(label, layer, head)], abs=1e-5)


def mean_scores(result, key) -> dict[tuple, float]:
    """By-hand mean score of the rows of pairs with a gap of at least 0.1, by `key(row)`."""
    gaps = {r["pair_id"]: abs(r["clean_logit_diff"] - r["corrupted_logit_diff"]) for r in result.pairs.to_pylist()}
    scores: dict[tuple, list[float]] = {}
    for row in result.effects.to_pylist():
        if gaps[row["pair_id"]] >= 0.1:
            scores.setdefault(key(row), []).append(row["score"])
    return {k: sum(v) / len(v) for k, v in scores.items()}


def test_all_positions_get_a_layer_by_component_panel_and_heads_one_of_their_own(
    tmp_path, tiny_model, tokenizer_and_ctx
):
    store, _, result = ioi_store(
        tmp_path, tiny_model, tokenizer_and_ctx, 4, ["resid", "attn", "mlp", "head"], positions="all"
    )
    config = tiny_model._module.config
    means = mean_scores(result, lambda row: (row["component"], row["layer"], row["head"]))
    rows = aggregate(store, "denoise").to_pylist()
    assert {row["label"] for row in rows} == {"all"} and {row["n_tokens"] for row in rows} == {None}
    figures = dict(aggregate_figures(rows, "tiny", label_positions(connect_tables(store))))
    assert list(figures) == ["all-positions", "head"]
    components = figures["all-positions"]
    assert list(components.data[0].x) == ["resid", "attn", "mlp"] and "all positions," in components.layout.title.text
    heads = figures["head"]
    assert list(heads.data[0].x) == [str(h) for h in range(config.n_head)]
    assert heads.layout.annotations[0].text.startswith("at all positions (N=")
    for layer in range(config.n_layer):
        for i, component in enumerate(["resid", "attn", "mlp"]):
            assert components.data[0].z[layer][i] == pytest.approx(means[(component, layer, None)], abs=1e-5)
        for head in range(config.n_head):
            assert heads.data[0].z[layer][head] == pytest.approx(means[("head", layer, head)], abs=1e-5)


def test_drill_down_shows_heads_at_the_listed_positions(tmp_path, tiny_model, tokenizer_and_ctx):
    store, _, result = ioi_store(tmp_path, tiny_model, tokenizer_and_ctx, 2, ["head", "mlp"], positions="S2,END")
    config = tiny_model._module.config
    connection = connect_tables(store)
    figures = dict(drill_down_figures(connection, store, "tiny", 1))
    pair_id, tokens, labels = connection.sql("SELECT pair_id, tokens, labels FROM pairs ORDER BY pair_id").fetchall()[0]
    spots = [i for i, label in enumerate(labels) if label in ("S2", "END")]
    heads, mlp = figures[f"pair-{pair_id}-head"].data[0], figures[f"pair-{pair_id}-mlp"].data[0]
    assert list(heads.x) == list(mlp.x) == [f"{i}:{tokens[i]}" for i in spots]
    assert list(heads.y) == [f"{layer}.{head}" for layer in range(config.n_layer) for head in range(config.n_head)]
    score = {
        (r["layer"], r["head"], r["position"]): r["score"]
        for r in result.effects.to_pylist()
        if r["pair_id"] == pair_id and r["component"] == "head"
    }
    for row, (layer, head) in enumerate(
        (layer, head) for layer in range(config.n_layer) for head in range(config.n_head)
    ):
        assert heads.z[row] == pytest.approx([score[(layer, head, i)] for i in spots])


def test_report_has_one_plotly_and_a_heatmap_per_component(ioi_run):
    store, _, records = ioi_run
    said = build_report(store, drill_down=2)
    assert "3 heatmaps" in said
    html = store.path("report.html")
    text = Path(html).read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert len(re.findall(r"plotly\.js v\d", text)) == 1, "plotly.js must be inlined exactly once"
    assert "cdn" not in text.lower().split("<body>")[1][:10000], "no network references in the figures"
    kept = (
        query(store.uri, "SELECT count(*) AS n FROM pairs WHERE abs(clean_logit_diff - corrupted_logit_diff) >= 0.1")
        .column("n")[0]
        .as_py()
    )
    assert 0 < kept <= len(records)
    for component in COMPONENTS:
        assert f'id="fig-{component}"' in text
        assert f"tiny (denoise, logit_diff): {component}, N={kept} pairs" in text
    # heatmaps, drill-downs, stability: its table, how many pairs, one box plot per component
    assert text.count('class="figure"') == 3 + 2 * 3 + 1 + 1 + 3
    assert 'id="fig-stability"' in text and "20 random halvings of the pairs (seed 0)" in text


def test_heatmap_shapes_follow_layers_and_role_labels(ioi_run):
    store, n_layers, records = ioi_run
    positions = label_positions(connect_tables(store))
    figures = aggregate_figures(aggregate(store, "denoise").to_pylist(), "tiny", positions)
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
    figures = aggregate_figures(rows, "tiny", label_positions(connect_tables(store)))
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
    (_, figure), *_ = drill_down_figures(connection, store, "tiny", 1)
    assert list(figure.data[0].x) == [f"{i}:{token}" for i, token in enumerate(tokens)]
    assert any(x.endswith(":␣" + record["correct"].strip()) for x in figure.data[0].x)


def test_group_by_adds_heatmaps_per_group_and_leaves_the_overall_aggregate(ioi_run):
    """A grouped report writes its rows to aggregate_groups and draws them after the overall
    heatmaps; aggregate keeps exactly the rows it had. A plain report removes the grouped table,
    which would otherwise describe an earlier report's shards and min-gap."""
    store, _, records = ioi_run

    def overall_rows():  # DuckDB sums in parallel: the last bits of a mean may differ between two runs
        rows = query(store.uri, "SELECT * FROM aggregate").to_pylist()
        return [{k: round(v, 9) if isinstance(v, float) else v for k, v in row.items()} for row in rows]

    build_report(store, drill_down=0)
    overall = overall_rows()
    said = build_report(store, group_by="template", drill_down=0)
    n_templates = len({r["template"] for r in records})
    assert f"{3 + 3 * n_templates} heatmaps" in said
    assert overall_rows() == overall
    assert all(row["group"] is None for row in overall)
    grouped = query(store.uri, 'SELECT DISTINCT "group" FROM aggregate_groups').column("group").to_pylist()
    assert sorted(grouped) == sorted({str(r["template"]) for r in records})
    assert store.exists(GROUPS_FILE)
    build_report(store, drill_down=0)
    assert not store.exists(GROUPS_FILE) and overall_rows() == overall


def rendered(store, tmp_path) -> str:
    """The report's DOM once headless Chromium has drawn it."""
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("headless Chromium is not installed (.ci/run installs Debian's chromium)")
    return subprocess.run(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path}/profile",
            "--virtual-time-budget=10000",
            "--dump-dom",
            f"file://{store.path('report.html')}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout


def test_chromium_draws_the_heads_small_multiples(tmp_path, tiny_model, tokenizer_and_ctx):
    """As a browser shows it: one figure of heads with a heatmap per drawn label, one colour bar,
    and the line that names the labels left out."""
    store, _, _ = ioi_store(tmp_path, tiny_model, tokenizer_and_ctx, 4, ["head"])
    build_report(store, drill_down=0)
    dom = rendered(store, tmp_path)
    figure = dom.split('id="fig-head"')[1].split('class="figure"')[0]
    drawn = aggregate_figures(aggregate(store, "denoise").to_pylist(), "t", label_positions(connect_tables(store)))
    assert figure.count('class="hm"') == len(drawn[0][1].data) > 1
    assert len(re.findall(r'class="cb[0-9a-z]* colorbar"', figure)) == 1 and "Every cell exactly 0 at " in figure


def test_chromium_renders_every_plot(ioi_run, tmp_path):
    store, _, _ = ioi_run
    build_report(store, drill_down=1)
    dom = rendered(store, tmp_path)
    figures = dom.count('class="figure"')
    heatmaps = 3 + 3  # per component, and the drill-down's
    assert figures == heatmaps + 1 + 1 + 3  # and stability's table, how many pairs, a box plot per component
    assert dom.count('class="hm"') == heatmaps, "every heatmap figure must have drawn its heatmap layer"
    images = re.findall(r'xlink:href="data:image/png;base64,([A-Za-z0-9+/=]+)"', dom)
    assert len(images) == heatmaps and all(len(image) > 500 for image in images)
    assert dom.count('class="trace boxes"') == 3 and dom.count('class="table-control-view"') == 1
    assert dom.count("top cell's interval half-width") >= 3  # how many pairs: drawn, a width curve per component


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


def test_the_metric_names_the_columns_titles_and_summary(tmp_path, tiny_model, tokenizer_and_ctx):
    store, _, result = ioi_store(tmp_path, tiny_model, tokenizer_and_ctx, 4, ["resid"], metric="kl")
    said = build_report(store, drill_down=1)
    assert "1 heatmaps" in said
    rows = query(store.uri, "SELECT * FROM aggregate").to_pylist()
    assert {"mean_kl", "mean_clean_kl", "mean_corrupted_kl"} <= set(rows[0]) and "mean_logit_diff" not in rows[0]
    labels = {r["pair_id"]: r["labels"] for r in result.pairs.to_pylist()}
    values: dict[tuple, list[float]] = {}
    for row in result.effects.to_pylist():
        values.setdefault((row["layer"], labels[row["pair_id"]][row["position"]]), []).append(row["kl"])
    assert len(rows) == len(values)
    for row in rows:
        kl = values[(row["layer"], row["label"])]
        assert row["mean_kl"] == pytest.approx(sum(kl) / len(kl), abs=1e-5)
    text = Path(store.path("report.html")).read_text()
    assert "tiny (denoise, kl): resid, N=" in text and "<th>clean kl</th>" in text


@pytest.mark.parametrize("method", ["atp", "atpstar"])
def test_an_atp_run_shows_estimates_and_how_they_compare_with_exact(tmp_path, tiny_model, tokenizer_and_ctx, method):
    """AtP* ranks by GradDrop's size, AtP by |estimate|: each run's top-K share is by its own ranking."""
    k, title, ranks_by = 4, METHODS[method].title, METHODS[method].ranks_by
    store, _, result = ioi_store(
        tmp_path, tiny_model, tokenizer_and_ctx, 6, ["resid", "attn"], method=method, verify_top=k
    )
    said = build_report(store, drill_down=1)
    assert "2 heatmaps, 2 AtP checks, 2 pair drill-downs" in said
    text = Path(store.path("report.html")).read_text()
    assert f"tiny (denoise, logit_diff, {title}): resid, N=" in text
    effects = result.effects.to_pandas().merge(result.pairs.to_pandas(), on="pair_id")
    kept = effects[(effects.clean_logit_diff - effects.corrupted_logit_diff).abs() >= 0.1]
    verified = kept[kept.score.notna()]
    for component, rows in verified.groupby("component"):
        pearson = rows.score.corr(rows.estimate)
        spearman = rows.score.rank().corr(rows.estimate.rank())
        assert (
            f"{component}, exact score vs {title} on {len(rows)} verified cells: "
            f"Pearson {pearson:.3f}, Spearman {spearman:.3f}" in text
        )
    shares = []
    for _, rows in verified.groupby("pair_id"):
        exact_top = set(rows.score.abs().sort_values(ascending=False).index[:k])
        atp_top = set(rows[ranks_by].abs().sort_values(ascending=False).index[:k])
        shares.append(len(exact_top & atp_top) / k)
    assert f"<td>{sum(shares) / len(shares):.3f} (mean over {len(shares)} pairs)</td>" in text
    rows = aggregate(store, "denoise").to_pylist()
    assert all(row["estimate_count"] > 0 and row["count"] <= row["estimate_count"] for row in rows)
    assert ("mean_graddrop" in rows[0]) == (method == "atpstar")  # AtP*'s score over the pairs, the paper's c(n)
    if method == "atpstar":
        label = [str(t) if labels is None else labels[t] for labels, t in zip(kept.labels, kept.position)]
        means = kept.assign(label=label).groupby(["component", "layer", "label"]).graddrop.mean()
        for row in rows:
            assert row["mean_graddrop"] == pytest.approx(means[(row["component"], row["layer"], row["label"])])
