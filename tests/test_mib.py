"""MIB's circuit track (jobs/mib_export.py, `driver.py mib-export`): an edges run written as MIB's
importance file, and what MIB would refuse, refused in one line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from examples.tiny_gpt2 import build_tiny_gpt2
from jobs.pairfile import read_pairs
from tests.conftest import EXAMPLE_PAIRS
from tests.test_driver import run_driver
from worker.graph.circuits import read_circuit
from worker.graph.mib import Graph
from worker.model.checkpoint import load_config


@pytest.fixture(scope="module")
def gpt2_small_graph(tmp_path_factory):
    """A GPT-2 with GPT-2 small's graph (12 layers of 12 heads: MIB's 32,491 edges), narrow, and
    an edges run of the example pairs on it in each direction."""
    root = tmp_path_factory.mktemp("mib")
    model = build_tiny_gpt2(root / "gpt2-12x12", n_layer=12, n_head=12, n_embd=24)
    for direction in ("noise", "denoise"):
        args = ("--pairs", EXAMPLE_PAIRS, "--model", model, "--out", root / direction, "--direction", direction)
        done = run_driver("edges", *args)
        assert done.returncode == 0, done.stderr
    return root, model


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
    assert data["cfg"] == {"n_layers": 12, "n_heads": 12, "parallel_attn_mlp": False, "d_model": 24}
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
