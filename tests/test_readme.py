"""The README works as written: its offline commands, taken from the README itself, run in order
in a fresh directory on the bundled models, and the figures it quotes are what the run prints.

The commands are every `python driver.py ...` line of the README's bash blocks (the setup line's
run command included), optional `[...]` parts left out; the test command, the Ray cluster block
(it needs a cluster and a bucket) and the rest of the setup line (installs) are not run here.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs.results.query import query
from tests.conftest import REPO
from tests.test_driver import runs_a_job

README = REPO / "README.md"
RUN = "python driver.py"
FIRST_OUT = "runs/ioi_pairs"  # where the README's first command writes


def readme_commands(text: str) -> list[str]:
    """The driver commands of the README's bash blocks, in order, as a user would type them."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line)  # a trailing comment
            line = re.sub(r"\s*\[[^\]]*\]", "", line).strip()  # optional parts, as in --help
            if RUN in line and not line.startswith(("ray ", "RAY_")):
                commands.append(line[line.index(RUN) :])
    return commands


def run(command: str, cwd: Path, in_process: bool = False) -> subprocess.CompletedProcess:
    """`command` as typed; with `in_process`, a job runs with `--workers 0` (what it prints and
    writes is the same; Ray's start and stop are the most of a small run's time)."""
    argv = [sys.executable, str(REPO / "driver.py"), *shlex.split(command)[2:]]
    if in_process and runs_a_job(argv[2:]):
        argv += ["--workers", "0"]
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)


@dataclass(frozen=True)
class Walkthrough:
    here: Path  # the fresh directory the commands ran in
    results: list[tuple[str, subprocess.CompletedProcess]]  # each command, in README order, and its run
    before: dict[str, str]  # each query of the first run: what it printed straight after that run


@pytest.fixture(scope="session")
def walkthrough(tmp_path_factory) -> Walkthrough:
    """Every README command, run in order in a fresh directory holding only the bundled examples:
    the first as written, on Ray; the jobs after it in process (tests/test_driver.py `run_driver`)."""
    here = tmp_path_factory.mktemp("walkthrough")
    (here / "examples").symlink_to(REPO / "examples")
    commands = readme_commands(README.read_text())
    results = [(commands[0], run(commands[0], here))]
    before = {c: run(c, here).stdout for c in commands if c.startswith(f"{RUN} query {FIRST_OUT} ")}
    results += [(command, run(command, here, in_process=True)) for command in commands[1:]]
    return Walkthrough(here, results, before)


def test_the_readme_names_its_commands():
    commands = readme_commands(README.read_text())
    assert commands[0] == "python driver.py --pairs examples/ioi_pairs.jsonl --model examples/toy-ioi-gpt2"
    assert any(" report " in f" {c} " for c in commands) and any(c.startswith(f"{RUN} paths") for c in commands)
    assert not any("dataset.jsonl" in c for c in commands), "the cluster block needs a cluster: not run here"


def test_every_readme_command_runs(walkthrough):
    for command, done in walkthrough.results:
        assert done.returncode == 0, f"{command}\n{done.stderr[-2000:]}"


def test_the_quoted_top_heads_are_what_the_query_prints(walkthrough):
    """'Which heads at END carry the answer: 3.3 (0.19 ± 0.15), 1.3 (0.14), ...': the heads query's
    rows, in its order, with its rounded means (and the first one's std)."""
    quoted = re.search(r"Which heads at END carry the answer: (.*?)\. ", README.read_text(), flags=re.S).group(1)
    heads = re.findall(r"(\d+)\.(\d+) \((-?[\d.]+)(?: ± ([\d.]+))?\)", quoted)
    assert len(heads) == 5
    printed = next(done.stdout for command, done in walkthrough.results if "component = 'head'" in command)
    rows = [line.split() for line in printed.splitlines()[2:-1]]  # under the header and its rule, above the count
    for (layer, head, mean, std), row in zip(heads, rows):
        assert row[:2] == [layer, head]
        assert float(row[2]) == pytest.approx(float(mean), abs=0.005)  # the README quotes two decimals
        if std:
            assert float(row[3]) == pytest.approx(float(std), abs=0.005)


def test_a_grouped_report_leaves_the_overall_aggregate_as_it_was(walkthrough):
    """The README builds a report grouped by template before its queries of the first run: they
    print the same rows as straight after the run (grouped rows live in a table of their own)."""
    before = walkthrough.before
    commands = [command for command, _ in walkthrough.results]
    grouped = next(i for i, c in enumerate(commands) if "--group-by template" in c)
    assert before and all(commands.index(query) > grouped for query in before)
    for command, done in walkthrough.results:
        if command in before:
            assert done.stdout == before[command], command
            assert not re.search(r"(^|\s)-0(\s|$)", done.stdout), "a negative zero was printed"


def test_resid_patching_moves_from_s2_to_end(walkthrough):
    """'S2 matters at early layers, END at late ones' (the toy IOI model of the first command)."""
    rows = query(
        str(walkthrough.here / FIRST_OUT),
        "SELECT layer, label, mean_score FROM aggregate WHERE component = 'resid' ORDER BY layer",
    ).to_pylist()
    by_layer = defaultdict(dict)
    for row in rows:
        by_layer[row["layer"]][row["label"]] = row["mean_score"]
    argmax = [max(scores, key=scores.get) for _, scores in sorted(by_layer.items())]
    assert argmax[0] == "S2" and argmax[-1] == "END"
    switch = argmax.index("END")
    assert set(argmax[:switch]) == {"S2"} and set(argmax[switch:]) == {"END"}
    assert by_layer[0]["S2"] > 0.5 and by_layer[len(argmax) - 1]["END"] > 0.9


def test_the_quoted_attention_sites_are_what_the_query_prints(walkthrough):
    """'its query (0.33) and its pattern (0.33) at S2 ...': the top rows of the attention-sites query."""
    printed = next(done.stdout for command, done in walkthrough.results if 'runs/ioi_attention "SELECT' in command)
    rows = [line.split() for line in printed.splitlines()[2:-1]]
    assert [row[:4] for row in rows[:2]] == [["q", "0", "3", "S2"], ["pattern", "0", "3", "S2"]]
    assert [round(float(row[4]), 2) for row in rows[:2]] == [0.33, 0.33]
    assert ["v", "3", "3", "S2"] in [row[:4] for row in rows]


def test_the_quoted_top_edges_are_what_the_query_prints(walkthrough):
    """'head 0.3 into the first MLP (0.16), head 3.3 into the logits (0.15) and the first MLP into
    3.3's value (0.12)'."""
    printed = next(done.stdout for command, done in walkthrough.results if 'runs/ioi_pairs-edges "SELECT' in command)
    rows = [line.split() for line in printed.splitlines()[2:-1]]
    quoted = [("a0.h3->m0", 0.16), ("a3.h3->logits", 0.15), ("m0->a3.h3<v>", 0.12)]
    assert [(row[0], round(float(row[1]), 2)) for row in rows[:3]] == quoted


def test_the_quoted_faithfulness_is_what_the_query_prints(walkthrough):
    """'keep 0.25 of the behaviour with 9 edges, 0.74 with 20 and 0.84 with 46; 91 edges (a
    fifth) keep 0.97', and the report's 'CPR 0.94' and 'CMD 0.06'."""
    printed = next(done.stdout for command, done in walkthrough.results if "find-circuits/evaluation" in command)
    rows = {int(row[1]): float(row[2]) for row in (line.split() for line in printed.splitlines()[2:-1])}
    assert {edges: rows.get(edges) for edges in (9, 20, 46, 91)} == {9: 0.25, 20: 0.74, 46: 0.84, 91: 0.97}
    report = (walkthrough.here / "runs/ioi_pairs-find-circuits/evaluation/report.html").read_text()
    cpr, cmd = re.findall(r"(?:CPR|CMD) \(area under[^<]*</th><td>([0-9.]+)<", report)
    assert (round(float(cpr), 2), round(float(cmd), 2)) == (0.94, 0.06)


def test_the_quoted_mib_scores_are_what_mib_scores_prints(walkthrough):
    """'CPR (from the signed curve) 1.08 and CMD (from the absolute curve) 0.01 on IOI (GPT)', the
    curves view's areas, and the importance file where the README says it is."""
    said = r"CPR \(from the signed curve\) ([\d.]+) and CMD \(from the absolute curve\) ([\d.]+)"
    quoted = re.search(said.replace(" ", r"\s+"), README.read_text())
    printed = next(done.stdout for command, done in walkthrough.results if command.startswith(f"{RUN} mib-scores"))
    cpr, cmd = (block.splitlines() for block in printed.strip().split("\n\n"))
    cells = [[cell.strip() for cell in table[2].split("|")] for table in (cpr, cmd)]
    assert [row[:2] for row in cells] == [["EAP-IG-inputs", quoted.group(1)], ["EAP-IG-inputs", quoted.group(2)]]
    curves = {
        r["curve"]: r
        for r in query(str(walkthrough.here / "runs/mib/ioi/evaluation"), "SELECT * FROM curves").to_pylist()
    }
    assert round(curves["mib-signed"]["cpr"], 2) == float(quoted.group(1))
    assert round(curves["mib-absolute"]["cmd"], 2) == float(quoted.group(2))
    assert (walkthrough.here / "runs/mib/submission/EAP-IG-inputs_patching_edge/ioi_gpt2/importances.json").exists()


def test_the_quoted_stability_is_what_the_run_stored(walkthrough):
    """'resid's halves correlate at 1.00 (0.82 to 1.00) with the same top 10 every time'."""
    rows = pq.read_table(walkthrough.here / FIRST_OUT / "stability.parquet").to_pylist()
    rows = [r for r in rows if r["pairs_a"] + r["pairs_b"] == 200]  # the run's own halvings, not the smaller samples
    spearman = [r["value"] for r in rows if r["scope"] == "resid" and r["measure"] == "spearman"]
    assert [round(v, 2) for v in (float(np.median(spearman)), min(spearman), max(spearman))] == [1.0, 0.82, 1.0]
    assert {r["value"] for r in rows if r["scope"] == "resid" and r["measure"] == "top-10 overlap"} == {1.0}


def readme_python() -> str:
    """The code block of the README's Python API section."""
    text = README.read_text()
    section = text[text.index("## Python API") :]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_the_python_api_section_runs_as_written(walkthrough):
    """The section's code, as written, in the directory the README's commands ran in (its
    `open_run` reads their first run); what it computed is then printed and checked: the
    connection's views are `query`'s, and every table records the options it was given."""
    shown = """
import json
print(json.dumps({
    "open_run": [list(row) for row in run.sql("SELECT component, round(max(mean_score), 2) FROM aggregate "
                                              "GROUP BY 1 ORDER BY 1").fetchall()],
    "rows": [result.effects.num_rows, heads.effects.num_rows, routes.paths.num_rows, found.edges.num_rows],
    "verified": heads.effects.filter(heads.effects["score"].is_valid()).num_rows,
    "receivers": sorted(set(routes.paths["receiver"].to_pylist())),
    "circuits": sorted(set(circuits.faithfulness["circuit"].to_pylist())),
    "edges": len(found.graph.edges),
}))
"""
    done = subprocess.run(
        [sys.executable, "-c", readme_python() + shown],
        cwd=walkthrough.here,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.splitlines()[-1])
    sql = "SELECT component, round(max(mean_score), 2) FROM aggregate GROUP BY 1 ORDER BY 1"
    assert seen["open_run"] == [list(row.values()) for row in query(str(walkthrough.here / FIRST_OUT), sql).to_pylist()]
    n_pairs, layers, heads = 24, 4, 4
    assert seen["rows"][3] == n_pairs * seen["edges"]
    assert seen["rows"][1] == n_pairs * layers * heads  # one position, END
    assert 0 < seen["verified"] <= n_pairs * 6  # verify_top 3: the top 3 and 3 at random, per pair
    assert seen["receivers"] == ["2.3:v,3.3:v", "logits"]
    assert seen["circuits"] == ["empty", "top-10pct", "top-2pct"]


def test_circuits_from_edges_in_memory_are_the_driver_s(walkthrough):
    """`ps.evaluate_circuits(edges=ps.edges(...))` selects from each edge's mean over the pairs in
    memory what `driver.py circuit --edges` selects from the edges run's aggregate: on the README's
    edges run (every pair above the gap), the same scores (the mean estimate, and MIB's mean
    effect for `mib`), and so the same circuits."""
    import patchsweep as ps
    from jobs.circuit_sources import edge_scores, edges_table_scores

    source = "examples/toy-ioi-gpt2"
    pairs = ps.read_pairs(str(REPO / "examples/ioi_pairs.jsonl"), model=str(REPO / source)).pairs
    model = ps.load_model(str(REPO / source), device="cpu")
    found = ps.edges(model, pairs, method="eap")
    run = str(walkthrough.here / "runs/ioi_pairs-edges")
    effects = edges_table_scores(found.edges, found.pairs, found.graph, "mib")
    np.testing.assert_allclose(effects, edge_scores(run, found.graph, source, "mib"), rtol=1e-4, atol=1e-7)
    reliable = edges_table_scores(found.edges, found.pairs, found.graph, "consistent")
    np.testing.assert_allclose(reliable, edge_scores(run, found.graph, source, "consistent"), rtol=1e-4, atol=1e-7)
    assert 0 < sum(score != 0 for score in reliable) < len(reliable)  # some intervals hold zero, some do not
    in_memory = edges_table_scores(found.edges, found.pairs, found.graph, "top")
    from_run = edge_scores(run, found.graph, source, "top")
    np.testing.assert_allclose(in_memory, from_run, rtol=1e-4, atol=1e-7)
    assert not np.allclose(effects, from_run)  # metric units, not shares of each pair's effect
    chosen = ps.evaluate_circuits(model, pairs[:2], edges=found, budgets=["2%", "5%"]).circuits
    assert [c.edges for c in chosen] == [
        ps.Circuit.selected(found.graph, from_run, "top", b).edges for b in ("2%", "5%")
    ]
