"""MIB's circuit track (jobs/mib/, `driver.py mib-export`, `mib-scores`, `make-mib`): an edges run
written as MIB's importance file or its nine circuits, circuit runs as MIB's results table, MIB's
rows as pairs, and what MIB would refuse, refused in one line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.mib.names import run_task
from jobs.pairfile import read_pairs
from jobs.store import Store
from jobs.tokens import decoded_pieces
from tests.conftest import EXAMPLE_PAIRS, REPO
from tests.test_driver import run_driver
from worker.graph.circuits import prune, read_circuit
from worker.graph.mib import Graph
from worker.model.checkpoint import load_config

MIB_GPT2 = REPO / "examples" / "mib-gpt2"  # IOI-trained, in GPT-2 small's graph (MIB's 32,491 edges), narrow


@pytest.fixture(scope="module")
def gpt2_small_graph(tmp_path_factory):
    """Edges runs on a GPT-2 with MIB's GPT-2 graph: in the noise direction of `make-ioi` pairs (which
    say their task), and in the denoise direction of the example pairs (which do not)."""
    root = tmp_path_factory.mktemp("mib")
    made = run_driver("make-ioi", "--n", 8, "--model", MIB_GPT2, "--out", root / "ioi.jsonl")
    assert made.returncode == 0, made.stderr
    for direction, pairs in (("noise", root / "ioi.jsonl"), ("denoise", EXAMPLE_PAIRS)):
        args = ("--pairs", pairs, "--model", MIB_GPT2, "--out", root / direction, "--direction", direction)
        done = run_driver("edges", *args)
        assert done.returncode == 0, done.stderr
    return root, MIB_GPT2


def test_an_edges_run_becomes_mibs_importance_file(gpt2_small_graph, tmp_path):
    """Every edge with MIB's score (the run's mean effect: the logit difference lost when the
    sender is corrupted in the clean run), in EAP-IG's graph JSON, which patchsweep's reader
    reads back whole; a submission of one task and one model is told what it lacks."""
    root, model = gpt2_small_graph
    done = run_driver("mib-export", root / "noise", "--task", "ioi", "--out", tmp_path / "sub")
    assert done.returncode == 0, done.stderr
    written = tmp_path / "sub" / "EAP_patching_edge" / "ioi_gpt2" / "importances.json"
    assert done.stdout.strip() == str(written)
    assert done.stderr.strip().splitlines() == [
        f"note: {tmp_path / 'sub' / 'EAP_patching_edge'}: 1 task(s) and 1 model(s) so far; "
        "a MIB submission needs at least two of each"
    ]
    data = json.loads(written.read_text())
    graph = Graph.of_config(load_config(str(model)))
    assert set(data) == {"cfg", "nodes", "edges"} and len(data["edges"]) == 32491 == len(graph.edges)
    assert data["cfg"] == {"n_layers": 12, "n_heads": 12, "parallel_attn_mlp": False, "d_model": 48}
    assert all(edge["in_graph"] for edge in data["edges"].values()) and all(
        node["in_graph"] for node in data["nodes"].values()
    )
    aggregate = pq.read_table(root / "noise" / "aggregate.parquet").to_pylist()
    effect = {row["edge"]: row["mean_effect"] for row in aggregate if row["group"] is None}
    assert {name: edge["score"] for name, edge in data["edges"].items()} == pytest.approx(effect)
    pairs = pq.read_table(root / "noise" / "pairs.parquet").to_pylist()
    edges = pq.read_table(root / "noise" / "edges").to_pylist()
    gap = {p["pair_id"]: p["clean_logit_diff"] - p["corrupted_logit_diff"] for p in pairs}
    top = max(effect, key=lambda name: abs(effect[name]))
    by_hand = [row["estimate"] * gap[row["pair_id"]] for row in edges if row["edge"] == top]
    assert effect[top] == pytest.approx(sum(by_hand) / len(by_hand))  # MIB's sign: a lost logit difference
    assert read_circuit(str(written), "ioi_gpt2", graph).edges == frozenset(range(len(graph.edges)))


def test_mib_export_reads_the_task_and_writes_mibs_nine_circuits(gpt2_small_graph, tmp_path):
    """Without --task, the task is the pairs' (make-ioi writes it); with --circuits, the folder holds
    MIB's nine circuits in place of the scores: the signed curve's top edges by mean effect, pruned,
    each at most its share of the edges, each read back by patchsweep's reader as the circuit chosen."""
    root, model = gpt2_small_graph
    scores = run_driver("mib-export", root / "noise", "--out", tmp_path / "sub")
    assert scores.returncode == 0, scores.stderr
    done = run_driver("mib-export", root / "noise", "--out", tmp_path / "sub", "--circuits")
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "sub" / "EAP_patching_edge" / "ioi_gpt2"
    budgets = ("0.1%", "0.2%", "0.5%", "1%", "2%", "5%", "10%", "20%", "50%")
    written = [folder / f"mib-signed-{budget.replace('%', 'pct')}.json" for budget in budgets]
    assert done.stdout.split() == [str(path) for path in written] and sorted(folder.iterdir()) == sorted(written)
    graph = Graph.of_config(load_config(str(model)))
    aggregate = pq.read_table(root / "noise" / "aggregate.parquet").to_pylist()
    effect = {row["edge"]: row["mean_effect"] for row in aggregate if row["group"] is None}
    order = sorted(range(len(graph.edges)), key=lambda e: (-effect[graph.edge_names[e]], e))
    sizes = []
    for budget, path in zip(budgets, written):
        top = set(order[: int(float(budget[:-1]) / 100 * len(graph.edges))])
        circuit = read_circuit(str(path), path.stem, graph)
        assert circuit.edges == prune(graph, top) and len(circuit.edges) <= len(top)
        sizes.append(len(circuit.edges))
    assert sizes[-1] > 0 and sizes == sorted(sizes)


def test_a_run_without_its_task_is_told_to_give_it(gpt2_small_graph):
    root, _ = gpt2_small_graph
    with pytest.raises(
        ValueError, match=r"its pairs do not say their task \(no `task` in the pair file\); give --task"
    ):
        run_task(Store(str(root / "denoise")), None, "RUN")
    assert run_task(Store(str(root / "denoise")), "arc_easy", "RUN") == "arc-easy"


def test_mib_scores_prints_mibs_table(gpt2_small_graph, tmp_path):
    """A row per method and selection, a column per (task, model) in MIB's order; `--select mib`'s
    row has CPR from the signed curve and CMD from the absolute one, as the runs' curves views say."""
    root, model = gpt2_small_graph
    runs = []
    for select in ("mib", "top"):
        runs.append(tmp_path / select)
        done = run_driver("circuit", "--pairs", root / "ioi.jsonl", "--model", model, "--edges", root / "noise",
                          "--select", select, "--budgets", "1%,10%,100%", "--out", runs[-1])  # fmt: skip
        assert done.returncode == 0, done.stderr
    printed = run_driver("mib-scores", *runs)
    assert printed.returncode == 0, printed.stderr
    cpr, cmd = (block.splitlines() for block in printed.stdout.strip().split("\n\n"))
    assert cpr[0] == "CPR (higher is better)" and cmd[0] == "CMD (lower is better)"
    header = [cell.strip() for cell in cpr[1].split("|")]
    assert header[:4] == ["Method", "IOI (GPT)", "IOI (QWen)", "IOI (Gemma)"] and len(header) == 13
    curves = {
        select: {row["curve"]: row for row in pq.read_table(run / "curves.parquet").to_pylist()}
        for select, run in zip(("mib", "top"), runs)
    }
    want = {
        "EAP": (curves["mib"]["mib-signed"]["cpr"], curves["mib"]["mib-absolute"]["cmd"]),
        "EAP (top)": (curves["top"]["top"]["cpr"], curves["top"]["top"]["cmd"]),
    }
    for metric, table in enumerate((cpr, cmd)):
        rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.split("|")] for line in table[2:])}
        assert set(rows) == set(want)
        for name, cells in rows.items():
            assert cells[0] == f"{want[name][metric]:.2f}" and set(cells[1:]) == {"-"}
    assert run_driver("mib-scores", runs[0], "--metric", "cmd").stdout.strip().splitlines()[0] == cmd[0]


def test_mib_scores_refuses_what_is_not_a_circuit_run(gpt2_small_graph):
    root, _ = gpt2_small_graph
    failed = run_driver("mib-scores", root / "noise")
    assert failed.returncode == 2
    (line,) = failed.stderr.strip().splitlines()
    assert "not a finished circuit run" in line


@pytest.mark.parametrize(
    "run, extra, message",
    [
        ("denoise", ("--task", "ioi"), "MIB scores edges by the logit difference with the clean prompt run"),
        ("noise", ("--task", "mcqa"), "MIB does not score mcqa on gpt2; it scores arc-challenge_llama3"),
        ("noise", ("--task", "sst2"), "unknown MIB task 'sst2'; MIB's are ioi, mcqa"),
        ("noise", ("--task", "ioi", "--model-name", "llama3"), "has 32491 edges, MIB's llama3 has 1592881"),
    ],
)
def test_what_mib_would_refuse_is_one_line(gpt2_small_graph, tmp_path, run, extra, message):
    root, _ = gpt2_small_graph
    failed = run_driver("mib-export", root / run, *extra, "--out", tmp_path / "sub")
    assert failed.returncode == 2
    (line,) = failed.stderr.strip().splitlines()
    assert message in line


MIB_ROWS = Path(__file__).parent / "data" / "mib"  # a few rows per task, written by hand from MIB's schema


def mibs_own(tokenizer, text: str) -> int:
    """An answer's token as MIB's HFEAPDataset takes it: the first of its encoding without special tokens."""
    return tokenizer(text, add_special_tokens=False).input_ids[0]


@pytest.mark.parametrize(
    "task, kept, dropped",
    [
        (
            "ioi",
            {"0": (" Mary", " John"), "4": (" Lisa", " Paul")},
            {
                "IOI names of unequal token lengths (MIB's filter)": 2,
                "clean and corrupted prompts of unequal token lengths": 1,
            },
        ),
        ("mcqa", {"10": ("B", "X")}, {"answer labels of unequal token lengths (MIB's filter)": 1}),
        (
            "arithmetic-addition",
            {"20": ("7", "9"), "24": ("3", "6")},
            {
                "an answer of more than one token (MIB's filter)": 1,
                "another operator than '+' (MIB's filter)": 1,
                "no counterfactual prompt (MIB's filter)": 1,
            },
        ),
    ],
)
def test_make_mib_makes_the_pairs_mibs_dataset_makes(tmp_path, tiny_model_dir, task, kept, dropped):
    """Prompts as the rows hold them (after GPT-2's BOS, which TransformerLens prepends for MIB),
    MIB's default counterfactual and answers (IOI's with a space, labels and numbers without),
    its filters in file order, every dropped row counted by reason; the file is a valid pair file
    whose answer tokens are MIB's."""
    from transformers import AutoTokenizer

    rows = [json.loads(line) for line in (MIB_ROWS / f"{task}.jsonl").read_text().splitlines()]
    done = run_driver("make-mib", "--task", task, "--from", MIB_ROWS / f"{task}.jsonl", "--out", tmp_path / "p.jsonl",
                      "--model", tiny_model_dir)  # fmt: skip
    assert done.returncode == 0, done.stderr
    counted = dict(re.fullmatch(r"dropped (\d+): (.*)", line).group(2, 1) for line in done.stderr.splitlines()[:-1])
    assert {reason: int(count) for reason, count in counted.items()} == dropped
    pairs = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert {p["id"]: (p["correct"], p["incorrect"]) for p in pairs} == kept
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    counterfactual = {"ioi": "s2_io_flip_counterfactual", "mcqa": "symbol_counterfactual"}.get(
        task, "random_counterfactual"
    )
    for pair in pairs:
        row = next(r for r in rows if str(r["idx"]) == pair["id"])
        assert pair["clean"] == "<|endoftext|>" + row["prompt"]
        assert pair["corrupted"] == "<|endoftext|>" + row[counterfactual]["prompt"]
        assert pair["task"] == task
        if task == "ioi":  # make-ioi's role labels, at the names' tokens and the last
            pieces = decoded_pieces(tokenizer, tokenizer(pair["clean"]).input_ids)
            at = {label: pieces[i].strip() for i, label in enumerate(pair["labels"]) if label in ("IO", "S1", "S2")}
            meta = row["metadata"]
            assert at == {"IO": meta["indirect_object"], "S1": meta["subject"], "S2": meta["subject"]}
            assert pair["labels"][-1] == "END" and pair["labels"][pieces.index(" " + meta["subject"]) + 1] == "S1+1"
        else:
            assert "labels" not in pair
    read = read_pairs(tmp_path / "p.jsonl", tokenizer, 1024)
    assert read.invalid == [] and [p.correct_ids[0] for p in read.pairs] == [
        mibs_own(tokenizer, p["correct"]) for p in pairs
    ]
    assert all(p.clean_ids[0] == tokenizer.bos_token_id for p in read.pairs)


def test_make_mib_keeps_the_first_n_and_refuses_rows_not_in_mibs_schema(tmp_path, tiny_model_dir):
    source = MIB_ROWS / "ioi.jsonl"
    done = run_driver("make-mib", "--task", "ioi", "--from", source, "--out", tmp_path / "p.jsonl", "--n", 1,
                      "--model", tiny_model_dir)  # fmt: skip
    assert done.returncode == 0 and [json.loads(x)["id"] for x in (tmp_path / "p.jsonl").read_text().splitlines()] == [
        "0"
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(source.read_text().splitlines()[0] + "\n" + json.dumps({"prompt": "Then, Mary"}) + "\n")
    failed = run_driver(
        "make-mib", "--task", "ioi", "--from", bad, "--out", tmp_path / "q.jsonl", "--model", tiny_model_dir
    )
    assert failed.returncode == 2
    (line,) = failed.stderr.strip().splitlines()
    assert line == f"error: {bad}:2: not MIB's schema: no field 's2_io_flip_counterfactual'"


GENERATORS = [("make-arithmetic", ("--op", "add")), ("make-arithmetic", ("--op", "sub")), ("make-mcqa", ())]


@pytest.mark.parametrize("command, options", GENERATORS)
def test_offline_generators_write_mib_like_pairs(tmp_path, tiny_model_dir, command, options):
    """The same file for a seed; every pair valid for the tokenizer (one-token answers, prompts of
    one length), its answer the prompt's own (the sum, the difference, the right colour's letter)
    and its incorrect answer the counterfactual's."""
    files = []
    for name in ("a.jsonl", "b.jsonl"):
        done = run_driver(
            command, *options, "--n", 12, "--seed", 3, "--out", tmp_path / name, "--model", tiny_model_dir
        )
        assert done.returncode == 0, done.stderr
        files.append((tmp_path / name).read_text())
    assert files[0] == files[1]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert read_pairs(tmp_path / "a.jsonl", tokenizer, 1024).invalid == []
    for record in map(json.loads, files[0].splitlines()):
        if command == "make-mcqa":
            choices = dict(re.findall(r"\n([A-D])\. (\w+)", record["clean"]))
            assert choices[record["correct"]] == record["color"]
            assert f"\n{record['incorrect']}. {record['color']}\n" in record["corrupted"]
        else:
            a, word, b = re.search(r"is (\d+) (plus|minus) (\d+)\?", record["clean"]).groups()
            c, _, d = re.search(r"is (\d+) (plus|minus) (\d+)\?", record["corrupted"]).groups()
            apply = int.__add__ if word == "plus" else int.__sub__
            assert (word == "plus") == (options[1] == "add")
            assert record["correct"] == str(apply(int(a), int(b))) and record["incorrect"] == str(apply(int(c), int(d)))
            assert record["correct"] != record["incorrect"]
