"""The driver end to end, in subprocesses: results, resume, crash recovery, bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs.means_pass import means_table
from jobs.pairfile import read_pairs
from jobs.results.aggregate import DEFAULT_MIN_GAP
from tests.conftest import (
    EXAMPLE_PAIRS,
    REPO,
    Core,
    free_port,
    score_tolerance,
    without_other_rays,
    write_jsonl,
)
from worker.batch.mean_donors import donor_sums
from worker.contract.faults import TEST_FAULT_ENV
from worker.contract.layout import MEANS_FILE
from worker.contract.options import PatchOptions
from worker.graph.mib import Graph
from worker.methods.edges import edge_tables
from worker.methods.fitting import batch_bytes
from worker.methods.paths import path_batch
from worker.methods.registry import patch_batch
from worker.model.checkpoint import PROXY_VARIABLES

# Driver runs against the in-process core: other processes, other batches, and on a loaded
# machine other BLAS thread splits, so the same cell's logit difference has differed by up
# to 3e-4 (seen twice in about twenty runs). Exactness is checked in test_patching at 1e-4
# against the hook reference; here what matters is that every cell lands once, from its pair.
RUN_TOL = 1e-3


def driver_command(*args) -> list[str]:
    return [sys.executable, str(REPO / "driver.py"), *map(str, args)]


RUNS = ("paths", "edges", "circuit", "find-circuits")  # the commands that run a job (and the main one, options only)


def runs_a_job(args) -> bool:
    """Whether the driver's arguments `args` run a job (the main command, or one of `RUNS`)."""
    return str(args[0]).startswith("--") or args[0] in RUNS


def run_driver(*args, env_extra=None, timeout=300, ray=False, own_process=False) -> subprocess.CompletedProcess:
    """The driver as a user runs it. A job runs in process (`--workers 0`) unless the test gives
    `--workers` or `ray`: Ray's start and stop cost more than a test's patching, and what Ray does
    (actors, their deaths, lost nodes, joining a cluster) has tests of its own that ask for it.
    Without Ray the command runs in the test's own process (`in_this_process`) unless the test
    asks for `own_process` (an environment read at import); with Ray, as a process of its own."""
    if runs_a_job(args) and not ray and "--workers" not in args:
        args = (*args, "--workers", 0)
        if not own_process:
            return in_this_process(*args, env_extra=env_extra)
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(driver_command(*args), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def in_this_process(*args, env_extra=None) -> subprocess.CompletedProcess:
    """`driver.py ARGS` run by click in this process, from the repository's root: what a process
    of its own would print and exit with, without starting Python and importing torch again (5 s
    of CPU a run). An exception the command lets escape fails the test, as a traceback would."""
    from click.testing import CliRunner

    from driver import cli

    here = os.getcwd()
    os.chdir(REPO)
    try:
        result = CliRunner().invoke(cli, [str(arg) for arg in args], env=env_extra)
    finally:
        os.chdir(here)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def effects_by_key(out: Path) -> dict:
    rows = pq.read_table(out / "effects").to_pylist()
    keys = [(r["pair_id"], r["component"], r["layer"], r["position"]) for r in rows]
    assert len(keys) == len(set(keys)), "duplicate effect rows"
    return {k: (r["logit_diff"], r["score"]) for k, r in zip(keys, rows)}


def assert_same_effects(actual: dict, expected: Core) -> None:
    """Logit differences to RUN_TOL; scores to a tolerance scaled by each pair's clean-corrupted gap."""
    assert actual.keys() == expected.effects.keys()
    for key, (logit_diff, score) in expected.effects.items():
        assert actual[key][0] == pytest.approx(logit_diff, abs=RUN_TOL), key
        tolerance = score_tolerance(score, *expected.baselines[key[0]], tol=RUN_TOL)
        assert actual[key][1] == pytest.approx(score, abs=tolerance), key


def test_end_to_end_matches_core_and_writes_the_tables(tmp_path, tiny_model_dir, many_pairs, core_effects):
    out = tmp_path / "run"
    done = run_driver(
        "--pairs",
        many_pairs,
        "--model",
        tiny_model_dir,
        "--out",
        out,
        "--components",
        "resid,mlp",
        "--batch-pairs",
        5,
        "--workers",
        2,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert_same_effects(effects_by_key(out), core_effects)
    pairs = pq.read_table(out / "pairs.parquet")
    assert sorted(pairs.column("pair_id").to_pylist()) == sorted(core_effects.baselines)
    assert {"template", "order", "labels", "clean_logit_diff"} <= set(pairs.column_names)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["pair_count"] == 48
    assert {s["status"] for s in manifest["shards"]} == {"done"}
    assert len(manifest["shards"]) == len(list((out / "effects").glob("part-*.parquet")))
    assert manifest["versions"]["nnsight"] == "0.8.1"
    phases = manifest["timings"]["phase_seconds"]
    assert list(phases) == ["validate", "start_ray", "start_actors", "patch", "stop_ray", "pairs_table"]
    assert all(seconds >= 0 for seconds in phases.values())
    sequential = ("start_ray", "start_actors", "patch", "stop_ray", "pairs_table")  # validation overlaps Ray's start
    assert sum(phases[name] for name in sequential) <= manifest["timings"]["wall_seconds"] + 0.01
    assert "done: 48 of 48 pairs" in done.stderr


def test_in_process_matches_core_without_ray(tmp_path, tiny_model_dir, many_pairs, core_effects):
    """`--workers 0`: the same shards, parts, manifest and report, run in the driver's own process,
    with no Ray started; a raised fault fails its shard alone, and a re-run resumes it."""
    out = tmp_path / "run"
    args = ("--pairs", many_pairs, "--model", tiny_model_dir, "--out", out, "--components", "resid,mlp")
    failed = run_driver(*args, "--batch-pairs", 5, env_extra={TEST_FAULT_ENV: "raise-on:ex3-1"})
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    (bad,) = [s for s in manifest["shards"] if s["status"] == "failed"]
    assert bad["error"] == "RuntimeError: injected test fault on pair ex3-1"
    done = run_driver(*args, "--batch-pairs", 5)
    assert done.returncode == 0, done.stderr
    assert_same_effects(effects_by_key(out), core_effects)
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["timings"]["phase_seconds"]) == ["validate", "start_actors", "patch", "pairs_table"]
    assert {s["node"] for s in manifest["shards"]} == {"local"} and (out / "report.html").exists()
    refused = run_driver(*args, "--address", "127.0.0.1:1")
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        "error: --workers 0 runs the shards in this process, without Ray: it cannot join --address 127.0.0.1:1"
    ]


def test_resume_after_the_driver_is_killed(tmp_path, tiny_model_dir, many_pairs, core_effects):
    out = tmp_path / "run"
    args = (
        "--pairs",
        many_pairs,
        "--model",
        tiny_model_dir,
        "--out",
        out,
        "--components",
        "resid,mlp",
        "--batch-pairs",
        1,
    )
    process = subprocess.Popen(
        driver_command(*args), cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while len(list(out.glob("effects/part-*.parquet"))) < 3 and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished_before = len(list(out.glob("effects/part-*.parquet")))
    assert finished_before >= 3

    resumed = run_driver(*args)
    assert resumed.returncode == 0, resumed.stderr
    # actors write their own parts: one may have landed after the count, before they died
    already = int(resumed.stderr.split(" already done")[0].rsplit("(", 1)[1])
    assert finished_before <= already < 48
    assert_same_effects(effects_by_key(out), core_effects)
    assert pq.read_table(out / "pairs.parquet").num_rows == 48

    written = {name: (out / name).stat().st_mtime_ns for name in ("manifest.json", "report.html", "pairs.parquet")}
    again = run_driver(*args)
    assert again.returncode == 0, again.stderr
    assert again.stderr.strip() == (
        f"done: nothing to do, all 48 pairs are already in {out} "
        f"(rebuild the report with: python driver.py report {out})"
    )
    assert {name: (out / name).stat().st_mtime_ns for name in written} == written


def test_missing_shards_are_recomputed_and_nothing_else(tmp_path, tiny_model_dir, many_pairs, core_effects):
    out = tmp_path / "run"
    args = (
        "--pairs",
        many_pairs,
        "--model",
        tiny_model_dir,
        "--out",
        out,
        "--components",
        "resid,mlp",
        "--batch-pairs",
        8,
    )
    assert run_driver(*args).returncode == 0
    kept = out / "effects" / "part-00000.parquet"
    kept_mtime = kept.stat().st_mtime_ns
    (out / "effects" / "part-00003.parquet").unlink()
    left_by_a_killed_writer = out / "effects" / "part-00003.parquet.tmp-0123"
    left_by_a_killed_writer.write_bytes(b"half a part")
    resumed = run_driver(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert "(5 already done" in resumed.stderr
    assert kept.stat().st_mtime_ns == kept_mtime
    assert not left_by_a_killed_writer.exists()
    assert_same_effects(effects_by_key(out), core_effects)


@pytest.mark.parametrize("fault", ["crash-once", "crash-half-once"])
def test_a_shard_whose_actor_dies_is_rewritten_whole(tmp_path, tiny_model_dir, many_pairs, core_effects, fault):
    """Actors write their own parts; one dies (as an OOM kill would) before patching a shard, or
    after writing its pairs part and before its effects part. The retry writes both again: every
    part whole, every row once, receipts in the manifest."""
    out, marker = tmp_path / "run", tmp_path / "crashed"
    done = run_driver(
        "--pairs",
        many_pairs,
        "--model",
        tiny_model_dir,
        "--out",
        out,
        "--components",
        "resid,mlp",
        "--batch-pairs",
        12,
        env_extra={TEST_FAULT_ENV: f"{fault}:{marker}"},
        ray=True,
    )
    assert marker.exists(), "the fault-injection hook never fired"
    assert done.returncode == 0, done.stderr
    assert_same_effects(effects_by_key(out), core_effects)
    assert not [path for path in out.rglob("*") if ".tmp-" in path.name]
    assert pq.read_table(out / "pairs.parquet").num_rows == 48
    manifest = json.loads((out / "manifest.json").read_text())
    for shard in manifest["shards"]:
        effects_part = out / "effects" / f"{shard['name']}.parquet"
        pairs_part = out / "_pairs" / f"{shard['name']}.parquet"
        assert shard["rows"] == pq.read_table(effects_part).num_rows
        assert shard["bytes"] == effects_part.stat().st_size + pairs_part.stat().st_size
        assert pq.read_table(pairs_part).num_rows == shard["pairs"]
        assert shard["seconds"] > 0 and shard["node"]


@pytest.mark.parametrize(
    "fault, reason",
    [
        ("raise-on:ex3-1", "RuntimeError: injected test fault on pair ex3-1"),
        ("crash-on:ex3-1", "actor"),
    ],
)
def test_a_failing_shard_is_reported_and_the_rest_lands(
    tmp_path, tiny_model_dir, many_pairs, core_effects, fault, reason
):
    out = tmp_path / "run"
    args = (
        "--pairs",
        many_pairs,
        "--model",
        tiny_model_dir,
        "--out",
        out,
        "--components",
        "resid,mlp",
        "--batch-pairs",
        6,
    )
    failed = run_driver(*args, env_extra={TEST_FAULT_ENV: fault}, ray=fault.startswith("crash"))
    assert failed.returncode == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed"
    (bad,) = [s for s in manifest["shards"] if s["status"] == "failed"]
    assert reason in bad["error"] and "failed: " in failed.stderr
    assert sum(s["status"] == "done" for s in manifest["shards"]) == len(manifest["shards"]) - 1

    fixed = run_driver(*args)
    assert fixed.returncode == 0, fixed.stderr
    assert_same_effects(effects_by_key(out), core_effects)


def test_a_batch_out_of_memory_is_halved_until_it_fits(tmp_path, tiny_model_dir, many_pairs, core_effects):
    """Batches above 64 tokens run out of memory (an injected `OutOfMemoryError`, as CUDA raises it):
    each shard halves its batch until it fits (512, 256, 128, 64 tokens) and lands whole, every row
    once and equal to the unsplit run; the manifest says how often each shard's batch was halved."""
    out = tmp_path / "run"
    args = ("--pairs", many_pairs, "--model", tiny_model_dir, "--out", out, "--components", "resid,mlp")
    done = run_driver(*args, "--max-batch-tokens", 512, env_extra={TEST_FAULT_ENV: "oom-above:64"})
    assert done.returncode == 0, done.stderr
    assert_same_effects(effects_by_key(out), core_effects)
    assert pq.read_table(out / "pairs.parquet").num_rows == 48
    assert {shard["halvings"] for shard in json.loads((out / "manifest.json").read_text())["shards"]} == {3}


def test_max_batch_memory_plans_each_shard_s_batch(tmp_path, tiny_model, tiny_model_dir):
    """--max-batch-memory 300KB: each shard's batch bound is what 300 kB holds at its prompt length
    (in the manifest), under --max-batch-tokens; the effects are those of an unplanned run."""
    args = ("--pairs", EXAMPLE_PAIRS, "--model", tiny_model_dir, "--components", "resid,mlp")
    planned_run = run_driver(*args, "--out", tmp_path / "planned", "--max-batch-memory", "300KB")
    assert planned_run.returncode == 0, planned_run.stderr
    plain = run_driver(*args, "--out", tmp_path / "plain")
    assert plain.returncode == 0, plain.stderr
    options = PatchOptions(("resid", "mlp"))
    for shard in json.loads((tmp_path / "planned" / "manifest.json").read_text())["shards"]:
        bound = 300_000 // batch_bytes(tiny_model, options, shard["n_tokens"])
        assert shard["batch_tokens"] == min(bound, 4096) and bound < 4096
    pairs = pq.read_table(tmp_path / "plain" / "pairs.parquet").to_pylist()
    baselines = {p["pair_id"]: (p["clean_logit_diff"], p["corrupted_logit_diff"]) for p in pairs}
    assert_same_effects(effects_by_key(tmp_path / "planned"), Core(effects_by_key(tmp_path / "plain"), baselines))
    failed = run_driver(*args, "--out", tmp_path / "bad", "--max-batch-memory", "lots")
    assert failed.returncode == 2 and "'lots' is not an amount of memory (like 8GiB, 500MB or 2000000)" in failed.stderr


def test_a_pair_that_does_not_fit_alone_fails_its_shard_in_one_line(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    args = ("--pairs", EXAMPLE_PAIRS, "--model", tiny_model_dir, "--out", out, "--components", "resid")
    failed = run_driver(*args, "--max-batch-tokens", 8, env_extra={TEST_FAULT_ENV: "oom-above:0"})
    assert failed.returncode == 1
    shards = json.loads((out / "manifest.json").read_text())["shards"]
    assert shards and all(shard["status"] == "failed" for shard in shards)
    for shard in shards:
        assert re.fullmatch(
            r"DoesNotFit: a pair of \d+ tokens does not fit in memory even alone \(injected test fault: "
            r"batches of 1 tokens do not fit\)",
            shard["error"],
        ), shard["error"]


def test_ctrl_c_stops_cleanly_and_keeps_finished_shards(tmp_path, tiny_model_dir, many_pairs):
    out = tmp_path / "run"
    args = ("--pairs", many_pairs, "--model", tiny_model_dir, "--out", out, "--components", "resid", "--batch-pairs", 4)
    process = subprocess.Popen(
        driver_command(*args),
        cwd=REPO,
        start_new_session=True,
        env={**os.environ, TEST_FAULT_ENV: "slow:0.5"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not list(out.glob("effects/part-*.parquet")) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    manifest = json.loads((out / "manifest.json").read_text())
    finished = [s["name"] for s in manifest["shards"] if s["status"] == "done"]
    assert manifest["status"] == "interrupted" and 0 < len(finished) < 12
    assert sorted(p.stem for p in out.glob("effects/part-*.parquet")) == sorted(finished)
    assert pq.read_table(out / "pairs.parquet").num_rows == 4 * len(finished)


def test_out_may_be_a_filesystem_uri(tmp_path, tiny_model_dir):
    out = tmp_path / "uri-run"
    done = run_driver(
        "--pairs", EXAMPLE_PAIRS, "--model", tiny_model_dir, "--out", out.as_uri(), "--components", "resid"
    )
    assert done.returncode == 0, done.stderr
    assert pq.read_table(out / "pairs.parquet").num_rows == 12
    assert (out / "report.html").exists() and (out / "aggregate.parquet").exists()


def test_different_config_is_refused_unless_overwrite(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    base = ("--pairs", EXAMPLE_PAIRS, "--model", tiny_model_dir, "--out", out)
    assert run_driver(*base, "--components", "resid").returncode == 0
    refused = run_driver(*base, "--components", "attn")
    assert refused.returncode == 2
    assert "different configuration" in refused.stderr and "Traceback" not in refused.stderr
    replaced = run_driver(*base, "--components", "attn", "--overwrite")
    assert replaced.returncode == 0
    components = set(pq.read_table(out / "effects").column("component").to_pylist())
    assert components == {"attn"}


def test_bad_lines_are_listed_and_nothing_runs(tmp_path, tiny_model_dir):
    good = json.loads(EXAMPLE_PAIRS.read_text().splitlines()[0])
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            good,
            "{not json",
            {"clean": good["clean"], "corrupted": good["corrupted"], "correct": " John"},
            {**good, "id": "x", "correct": " John Mary"},
            {**good, "id": "y", "corrupted": good["corrupted"] + " Mary"},
            {**good},
        ],
    )
    failed = run_driver("--pairs", path, "--model", tiny_model_dir, "--out", tmp_path / "run")
    assert failed.returncode == 2
    assert "Traceback" not in failed.stderr
    for line, reason in [
        (2, "not JSON"),
        (3, "missing key 'incorrect'"),
        (4, "is 2 tokens"),
        (5, "lengths"),
        (6, "duplicate id 'ex0'"),
    ]:
        assert f"{path}:{line}: " in failed.stderr and reason in failed.stderr
    assert not (tmp_path / "run").exists()


def test_skip_invalid_runs_the_good_lines(tmp_path, tiny_model_dir):
    good = json.loads(EXAMPLE_PAIRS.read_text().splitlines()[0])
    path = write_jsonl(tmp_path / "mixed.jsonl", [good, "{not json"])
    out = tmp_path / "run"
    done = run_driver(
        "--pairs", path, "--model", tiny_model_dir, "--out", out, "--components", "resid", "--skip-invalid"
    )
    assert done.returncode == 0, done.stderr
    (invalid,) = [json.loads(line) for line in (out / "invalid.jsonl").read_text().splitlines()]
    assert invalid["line"] == 2 and invalid["text"] == "{not json" and "not JSON" in invalid["reason"]
    assert pq.read_table(out / "pairs.parquet").column("pair_id").to_pylist() == ["ex0"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/no/such/model"], "no such directory"),
        (["--pairs", "/no/such/file.jsonl"], "cannot read pair file"),
        (["--components", "resid,heads"], "components must be"),
        (["--positions", "each,END"], "cannot be combined with labels"),
        (["--verify-top", "3"], "verify_top must be 0, or positive with method atp"),
    ],
)
def test_usage_errors_are_one_line(tmp_path, tiny_model_dir, args, message):
    options = {"--pairs": str(EXAMPLE_PAIRS), "--model": str(tiny_model_dir), "--out": str(tmp_path / "o")}
    options.update(dict(zip(args[::2], args[1::2])))
    failed = run_driver(*[x for item in options.items() for x in item])
    assert failed.returncode == 2
    assert message in failed.stderr and "Traceback" not in failed.stderr


def test_the_driver_starts_without_torch_or_transformers():
    """Queries, reports and --help stay fast: only validation (in a thread) and actors load them."""
    probe = "import sys, driver; print(sorted(m for m in ('torch', 'transformers', 'nnsight') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "[]"


def run_driver_at(
    address: str, model_dir: Path, out: Path, *options, timeout: float = 120
) -> subprocess.CompletedProcess:
    """The driver asked to join `address`; `auto` sees no Ray but those of this test (its RAY_TMPDIR,
    its processes). Its timeout is well short of the minutes `ray.init` would wait."""
    args = ("--pairs", EXAMPLE_PAIRS, "--model", model_dir, "--out", out, "--address", address, *options)
    command = driver_command(*args)
    if address == "auto":
        command = without_other_rays(command)
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def no_cluster_line(failed: subprocess.CompletedProcess, address: str) -> str:
    """The driver's one line for an address with no cluster, after checking that it is one line and exit 2."""
    assert failed.returncode == 2, failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1, failed.stderr
    (line,) = failed.stderr.strip().splitlines()
    assert line.startswith(f"error: no running Ray cluster at {address}")
    assert line.endswith("; start one with ray start --head, or leave out --address")
    return line


@pytest.mark.parametrize("address", ["auto", "127.0.0.1:{port}"])
def test_no_ray_cluster_at_the_address_is_one_line(tmp_path, tiny_model_dir, ray_tmpdir, address):
    address = address.format(port=free_port())
    line = no_cluster_line(run_driver_at(address, tiny_model_dir, tmp_path / "o"), address)  # no `ray start` recorded
    why = "" if address == "auto" else ": Connection refused"  # auto: found nothing to name
    assert line.startswith(f"error: no running Ray cluster at {address}{why}; ")


def test_an_address_that_accepts_but_never_answers_is_one_line(tmp_path, tiny_model_dir):
    """A process listens there but never replies (a hung head): the connection is given up on
    after --connect-timeout. It listens on every interface: `ray.init` takes 127.0.0.1 for the
    node's own IP, and so does the driver's check."""
    with socket.create_server(("0.0.0.0", 0), backlog=16) as server:
        address = f"127.0.0.1:{server.getsockname()[1]}"
        started = time.time()
        failed = run_driver_at(address, tiny_model_dir, tmp_path / "o", "--connect-timeout", 1.5)
    assert time.time() - started < 60
    line = no_cluster_line(failed, address)
    assert line.startswith(f"error: no running Ray cluster at {address}: its GCS did not answer within 1.5 s")


def test_an_unreachable_hub_fails_at_once_in_one_line(tmp_path):
    """The default hub model with no network: one line, not a minute of retries printed on the way."""
    no_proxy = dict.fromkeys(PROXY_VARIABLES, "")
    endpoint = f"http://127.0.0.1:{free_port()}"
    failed = run_driver(
        "--pairs",
        EXAMPLE_PAIRS,
        "--out",
        tmp_path / "o",
        timeout=120,
        env_extra={**no_proxy, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf")},
        own_process=True,  # huggingface_hub reads HF_ENDPOINT when it is imported
    )
    assert failed.returncode == 2
    (line,) = failed.stderr.strip().splitlines()
    assert line.startswith("error: cannot load model id or path 'openai-community/gpt2'")
    assert endpoint in line and "--model PATH" in line


@pytest.mark.parametrize("positions", ["S2,END", "all"])
def test_heads_and_chosen_positions_end_to_end(tmp_path, tiny_model, tiny_model_dir, tokenizer_and_ctx, positions):
    """`--components resid,head --positions ...`: head rows carry their head, the rest null; the
    rows are those the in-process core gives; the report draws layer x head per label."""
    out = tmp_path / "run"
    done = run_driver(
        "--pairs",
        EXAMPLE_PAIRS,
        "--model",
        tiny_model_dir,
        "--out",
        out,
        "--components",
        "resid,head",
        "--positions",
        positions,
        "--batch-pairs",
        5,
    )
    assert done.returncode == 0, done.stderr
    pairs = read_pairs(EXAMPLE_PAIRS, *tokenizer_and_ctx).pairs
    config = tiny_model._module.config
    rows = pq.read_table(out / "effects").to_pylist()
    spots = 1 if positions == "all" else 2
    assert len(rows) == len(pairs) * spots * config.n_layer * (1 + config.n_head)
    assert {r["head"] for r in rows if r["component"] == "resid"} == {None}
    assert {r["head"] for r in rows if r["component"] == "head"} == set(range(config.n_head))
    core = patch_batch(tiny_model, pairs, ["resid", "head"], positions=positions).effects.to_pylist()

    def key(r):
        return r["pair_id"], r["component"], r["layer"], r["head"], r["position"]

    by_key = {key(r): r["logit_diff"] for r in rows}
    assert by_key.keys() == {key(r) for r in core}
    for r in core:
        assert by_key[key(r)] == pytest.approx(r["logit_diff"], abs=RUN_TOL)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["positions"] == manifest["config"]["positions"] == positions
    panels = {"S2,END": 1 + 1, "all": 1 + 1}[positions]  # resid (or the all-positions panel), then the heads
    assert f"({panels} heatmaps" in done.stderr


def test_zero_ablation_end_to_end(tmp_path, tiny_model, tiny_model_dir, tokenizer_and_ctx):
    """`--donor zero`: the rows the in-process core gives, the donor in the manifest, the config
    (so its hash differs from a run from the pairs' other prompts), the tables and the titles."""
    out = tmp_path / "run"
    args = ["--pairs", EXAMPLE_PAIRS, "--model", tiny_model_dir, "--components", "resid,head", "--direction", "noise"]
    done = run_driver(*args, "--positions", "all", "--donor", "zero", "--out", out, "--batch-pairs", 5)
    assert done.returncode == 0, done.stderr
    pairs = read_pairs(EXAMPLE_PAIRS, *tokenizer_and_ctx).pairs
    core = patch_batch(tiny_model, pairs, ["resid", "head"], "noise", positions="all", donor="zero").effects

    def key(r):
        return r["pair_id"], r["component"], r["layer"], r["head"]

    effects = pq.read_table(out / "effects")
    by_key = {key(r): r["logit_diff"] for r in effects.to_pylist()}
    assert by_key.keys() == {key(r) for r in core.to_pylist()}
    for r in core.to_pylist():
        assert by_key[key(r)] == pytest.approx(r["logit_diff"], abs=RUN_TOL)
    assert effects.schema.metadata[b"patchsweep.donor"] == b"zero"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["donor"] == manifest["config"]["donor"] == "zero"
    again = run_driver(*args, "--positions", "all", "--out", out, "--batch-pairs", 5)
    assert again.returncode == 2 and "different configuration" in again.stderr
    assert "noise, logit_diff, zero donor" in (out / "report.html").read_text()
    unknown = run_driver(*args, "--donor", "mean-of-nothing", "--out", tmp_path / "o")
    assert unknown.returncode == 2 and "Invalid value for '--donor'" in unknown.stderr
    pattern = run_driver(*args, "--components", "pattern", "--donor", "mean", "--out", tmp_path / "p")
    assert pattern.returncode == 2 and "donor mean cannot patch pattern" in pattern.stderr
    assert len(pattern.stderr.strip().splitlines()) == 1


def test_resample_end_to_end_is_reproducible_from_donor_pair_id(
    tmp_path, tiny_model, tiny_model_dir, tokenizer_and_ctx
):
    """`--donor resample --seed 3`: pairs.parquet names each pair's donor pair, and that alone
    reproduces the run: the in-process core, handed each named pair's clean prompt, gives the same
    rows. The seed is in the config; a pair alone in its token length is a bad line (exit 2)."""
    out = tmp_path / "run"
    args = ["--pairs", EXAMPLE_PAIRS, "--model", tiny_model_dir, "--components", "resid,mlp"]
    done = run_driver(*args, "--donor", "resample", "--seed", "3", "--out", out, "--batch-pairs", 3)
    assert done.returncode == 0, done.stderr
    named = dict(zip(*pq.read_table(out / "pairs.parquet", columns=["pair_id", "donor_pair_id"]).to_pydict().values()))
    pairs = {p.pair_id: p for p in read_pairs(EXAMPLE_PAIRS, *tokenizer_and_ctx).pairs}
    assert named.keys() == pairs.keys() and all(named[k] != k for k in named)
    rebuilt = [
        dataclasses.replace(p, donor_pair_id=named[p.pair_id], donor_ids=pairs[named[p.pair_id]].clean_ids)
        for p in pairs.values()
    ]
    core = patch_batch(tiny_model, rebuilt, ["resid", "mlp"], donor="resample").effects.to_pylist()

    def key(r):
        return r["pair_id"], r["component"], r["layer"], r["position"]

    by_key = {key(r): r["logit_diff"] for r in pq.read_table(out / "effects").to_pylist()}
    assert by_key.keys() == {key(r) for r in core}
    for r in core:
        assert by_key[key(r)] == pytest.approx(r["logit_diff"], abs=RUN_TOL)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["donor"] == "resample" and manifest["config"]["seed"] == 3
    alone = write_jsonl(
        tmp_path / "alone.jsonl", [json.loads(line) for line in Path(EXAMPLE_PAIRS).read_text().splitlines()[:4]]
    )
    failed = run_driver("--pairs", alone, *args[2:], "--donor", "resample", "--out", tmp_path / "o")
    assert failed.returncode == 2 and "to resample from (--donor resample)" in failed.stderr


def test_mean_donor_pass_is_stored_and_reused_on_resume(tmp_path, tiny_model, tiny_model_dir, tokenizer_and_ctx):
    """`--donor mean`: a first pass stores the means of every pair's donor side (what the worker's
    sums of the whole file give), the patches use them (the in-process core with that file gives
    the same rows), and a re-run after a failed shard reuses the stored means."""
    out = tmp_path / "run"
    args = ["--pairs", EXAMPLE_PAIRS, "--model", tiny_model_dir, "--components", "resid,head", "--direction", "noise"]
    args += ["--donor", "mean", "--out", out, "--batch-pairs", 5]
    failed = run_driver(*args, env_extra={TEST_FAULT_ENV: "raise-on:ex3"})
    assert failed.returncode == 1, failed.stderr
    means = out / MEANS_FILE
    stored, written = pq.read_table(means), means.stat().st_mtime_ns
    pairs = read_pairs(EXAMPLE_PAIRS, *tokenizer_and_ctx).pairs
    options = PatchOptions(("resid", "head"), direction="noise", donor="mean")
    expected = means_table([donor_sums(tiny_model, pairs, options)])
    assert stored.select(["component", "layer", "key", "count"]) == expected.select(
        ["component", "layer", "key", "count"]
    )
    for got, want in zip(stored.column("mean").to_pylist(), expected.column("mean").to_pylist()):
        assert got == pytest.approx(want, abs=1e-5)
    assert json.loads((out / "manifest.json").read_text())["donor_means"] == {"file": MEANS_FILE, "reused": False}
    done = run_driver(*args)
    assert done.returncode == 0, done.stderr
    assert means.stat().st_mtime_ns == written
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["donor_means"] == {"file": MEANS_FILE, "reused": True} and manifest["config"]["donor"] == "mean"
    core = patch_batch(tiny_model, pairs, ["resid", "head"], "noise", donor="mean", means=str(out)).effects

    def key(r):
        return r["pair_id"], r["component"], r["layer"], r["head"], r["position"]

    by_key = {key(r): r["logit_diff"] for r in pq.read_table(out / "effects").to_pylist()}
    assert by_key.keys() == {key(r) for r in core.to_pylist()}
    for r in core.to_pylist():
        assert by_key[key(r)] == pytest.approx(r["logit_diff"], abs=RUN_TOL)


def test_a_position_label_no_pair_has_is_one_line(tmp_path, tiny_model_dir):
    failed = run_driver(
        "--pairs", EXAMPLE_PAIRS, "--model", tiny_model_dir, "--out", tmp_path / "o", "--positions", "S2,S3"
    )
    assert failed.returncode == 2
    (line,) = failed.stderr.strip().splitlines()
    assert line.startswith(f"error: {EXAMPLE_PAIRS}: --positions lists 'S3', which no line has (its labels: ")


@pytest.mark.parametrize(("method", "components"), [("atp", ["attn", "head"]), ("atpstar", ["head", "k"])])
def test_atp_end_to_end_estimates_every_cell_and_verifies_some(
    tmp_path, tiny_model, tiny_model_dir, tokenizer_and_ctx, method, components
):
    out = tmp_path / "run"
    done = run_driver(
        "--pairs",
        EXAMPLE_PAIRS,
        "--model",
        tiny_model_dir,
        "--out",
        out,
        "--components",
        ",".join(components),
        "--method",
        method,
        "--verify-top",
        3,
        "--batch-pairs",
        5,
    )
    assert done.returncode == 0, done.stderr
    pairs = read_pairs(EXAMPLE_PAIRS, *tokenizer_and_ctx).pairs
    core = patch_batch(tiny_model, pairs, components, method=method, verify_top=3).effects.to_pylist()
    rows = pq.read_table(out / "effects").to_pylist()

    def key(r):
        return r["pair_id"], r["component"], r["layer"], r["head"], r["position"]

    ran = {key(r): r for r in rows}
    assert ran.keys() == {key(r) for r in core}
    for r in core:
        assert ran[key(r)]["estimate"] == pytest.approx(r["estimate"], abs=RUN_TOL, rel=RUN_TOL)
        assert (ran[key(r)]["graddrop"] is None) == (method == "atp")
        assert ran[key(r)]["graddrop"] == (r["graddrop"] and pytest.approx(r["graddrop"], abs=RUN_TOL, rel=RUN_TOL))
        assert (ran[key(r)]["logit_diff"] is None) == (r["logit_diff"] is None)
    assert sum(r["logit_diff"] is not None for r in rows) == len(pairs) * 2 * 3
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["method"], manifest["verify_top"]) == (method, 3)
    assert manifest["config"]["method"] == method and manifest["config"]["verify_top"] == 3
    assert "AtP checks" in done.stderr


def test_an_unsupported_model_family_is_one_line(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer, OPTConfig

    model_dir = tmp_path / "opt"
    OPTConfig(
        vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2, word_embed_proj_dim=16
    ).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(model_dir)
    failed = run_driver("--pairs", EXAMPLE_PAIRS, "--model", model_dir, "--out", tmp_path / "o")
    assert failed.returncode == 2
    (line,) = failed.stderr.strip().splitlines()
    assert line == (
        f"error: cannot patch {str(model_dir)!r}: model type 'opt' is not supported; "
        "patchsweep patches gemma2, gemma3_text, gpt2, gpt_neox, llama, mistral, qwen2 models"
    )


def test_paths_end_to_end(tmp_path, tiny_model, tiny_model_dir, tokenizer_and_ctx):
    """`driver.py paths`: the rows the in-process core gives, every (pair, sender, receiver) once;
    the manifest, aggregate and report name the receivers; a re-run has nothing to do."""
    out = tmp_path / "paths"
    receivers = ["logits", "2.1:q,1.0:v@END"]
    args = [
        "paths",
        "--pairs",
        EXAMPLE_PAIRS,
        "--model",
        tiny_model_dir,
        "--out",
        out,
        "--batch-pairs",
        5,
        *[x for receiver in receivers for x in ("--receivers", receiver)],
    ]
    done = run_driver(*args)
    assert done.returncode == 0, done.stderr
    pairs = read_pairs(EXAMPLE_PAIRS, *tokenizer_and_ctx).pairs
    config = tiny_model._module.config
    rows = pq.read_table(out / "paths").to_pylist()

    def key(r):
        return r["pair_id"], r["sender_layer"], r["sender_head"], r["sender_position"], r["receiver"]

    assert len(rows) == len({key(r) for r in rows}) == len(pairs) * config.n_layer * config.n_head * 2
    core = path_batch(tiny_model, pairs, PatchOptions(("head",), "all", method="paths", receivers=tuple(receivers)))
    by_key = {key(r): r["logit_diff"] for r in rows}
    for r in core.paths.to_pylist():
        assert by_key[key(r)] == pytest.approx(r["logit_diff"], abs=RUN_TOL), key(r)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "paths" and manifest["receivers"] == manifest["config"]["receivers"] == receivers
    aggregate = pq.read_table(out / "aggregate.parquet").to_pylist()
    assert {(r["receiver"], r["label"]) for r in aggregate} == {(receiver, "all") for receiver in receivers}
    assert len(aggregate) == 2 * config.n_layer * config.n_head
    assert "(2 heatmaps" in done.stderr and "paths to 2.1:q,1.0:v@END" in (out / "report.html").read_text()
    summed = run_driver("query", out, "SELECT count(*) AS n FROM paths WHERE receiver = 'logits'")
    assert summed.returncode == 0 and summed.stdout.split()[-3] == str(len(rows) // 2)
    again = run_driver(*args)
    assert again.returncode == 0 and "nothing to do" in again.stderr


@pytest.mark.parametrize(
    "receiver, message",
    [
        ("9.1:q", "error: receiver 9.1:q: the model has 3 layers of 4 heads, no head 9.1"),
        ("1.0:q@S3", f"error: {EXAMPLE_PAIRS}: --receivers lists 'S3', which no line has (its labels: "),
    ],
)
def test_bad_receivers_are_one_line(tmp_path, tiny_model_dir, receiver, message):
    failed = run_driver(
        "paths", "--pairs", EXAMPLE_PAIRS, "--model", tiny_model_dir, "--out", tmp_path / "o", "--receivers", receiver
    )
    assert failed.returncode == 2
    (line,) = failed.stderr.strip().splitlines()
    assert line.startswith(message)


def test_a_malformed_receiver_is_refused_before_anything_starts(tmp_path, tiny_model_dir):
    failed = run_driver(
        "paths", "--pairs", EXAMPLE_PAIRS, "--model", tiny_model_dir, "--out", tmp_path / "o", "--receivers", "9.9:x"
    )
    assert failed.returncode == 2 and "'9.9:x' is not LAYER.HEAD:q|k|v" in failed.stderr
    assert "Traceback" not in failed.stderr and not (tmp_path / "o").exists()


def test_edges_end_to_end(tmp_path, tiny_model, tiny_model_dir, tokenizer_and_ctx):
    """`driver.py edges`: every (pair, edge) once with the in-process core's estimates; the
    manifest, aggregate (mean estimate per edge), report and `edges` view; a re-run has nothing to do."""
    out = tmp_path / "edges"
    args = ["edges", "--pairs", EXAMPLE_PAIRS, "--model", tiny_model_dir, "--out", out, "--batch-pairs", 5]
    done = run_driver(*args, "--method", "eap-ig", "--ig-steps", 2, "--direction", "noise", "--verify-top", 3)
    assert done.returncode == 0, done.stderr
    pairs = read_pairs(EXAMPLE_PAIRS, *tokenizer_and_ctx).pairs
    graph = Graph.of(tiny_model)
    rows = pq.read_table(out / "edges").to_pylist()
    assert len(rows) == len({(r["pair_id"], r["edge"]) for r in rows}) == len(pairs) * len(graph.edges)
    options = PatchOptions((), direction="noise", method="eap-ig", ig_steps=2, verify_top=3)
    core = {(r["pair_id"], r["edge"]): r for r in edge_tables(tiny_model, pairs, options)[0].to_pylist()}
    for r in rows:
        want = core[(r["pair_id"], r["edge"])]
        assert r["estimate"] == pytest.approx(want["estimate"], abs=RUN_TOL)
        assert (r["score"] is None) == (want["score"] is None) and r["sender"] + "->" + r["receiver"] == r["edge"]
        if r["score"] is not None:
            assert r["logit_diff"] == pytest.approx(want["logit_diff"], abs=RUN_TOL)
    verified = [r for r in rows if r["score"] is not None]
    assert len(verified) == 2 * 3 * len(pairs)  # each pair's top 3 and 3 drawn at random
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "eap-ig" and manifest["config"]["ig_steps"] == 2 and manifest["verify_top"] == 3
    aggregate = pq.read_table(out / "aggregate.parquet").to_pylist()
    assert {r["edge"] for r in aggregate} == set(graph.edge_names)
    gaps = {
        r["pair_id"]: r["clean_logit_diff"] - r["corrupted_logit_diff"]
        for r in pq.read_table(out / "pairs.parquet").to_pylist()
    }
    kept = {pair for pair, gap in gaps.items() if abs(gap) >= DEFAULT_MIN_GAP}
    top = max(aggregate, key=lambda r: abs(r["mean_estimate"]))
    by_hand = [r["estimate"] for r in rows if r["edge"] == top["edge"] and r["pair_id"] in kept]
    assert top["pairs"] == len(by_hand) and top["excluded_pairs"] == len(pairs) - len(kept)
    assert top["mean_estimate"] == pytest.approx(sum(by_hand) / len(by_hand), abs=1e-5)
    report = (out / "report.html").read_text()
    assert "EAP-IG estimate" in report and f"({len(verified)} verified edges)" in report
    counted = run_driver("query", out, "SELECT count(DISTINCT edge) AS n FROM edges")
    assert counted.returncode == 0 and counted.stdout.split()[-3] == str(len(graph.edges))
    again = run_driver(*args, "--method", "eap-ig", "--ig-steps", 2, "--direction", "noise", "--verify-top", 3)
    assert again.returncode == 0 and "nothing to do" in again.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ig-steps", "0"], "--ig-steps"),
        (["--method", "acdc"], "Invalid value for '--method'"),
        (["--donor", "zero"], "error: edge attribution patches from the pair's other prompt: --donor pair, not zero"),
    ],
)
def test_bad_edge_options_are_one_line(tmp_path, tiny_model_dir, extra, message):
    failed = run_driver("edges", "--pairs", EXAMPLE_PAIRS, "--model", tiny_model_dir, "--out", tmp_path / "o", *extra)
    assert failed.returncode == 2 and message in failed.stderr
    assert "Traceback" not in failed.stderr and not (tmp_path / "o").exists()


def test_circuit_end_to_end(tmp_path, tiny_model, tiny_model_dir, tokenizer_and_ctx):
    """`driver.py circuit`: circuits selected from an edges run's aggregate at each budget (their
    JSON equal to selecting by hand) and one from a file, every (pair, circuit) once and equal to
    the in-process core; the aggregate's dataset faithfulness (a ratio of means) and 95% interval
    (scipy's t interval) by hand; the manifest, report and a re-run with nothing to do."""
    from scipy import stats

    from worker.graph.circuits import Circuit, budget_edges, select_top
    from worker.methods.faithfulness import circuit_tables

    edges_out, out = tmp_path / "edges", tmp_path / "circuits"
    common = ["--pairs", EXAMPLE_PAIRS, "--model", tiny_model_dir, "--batch-pairs", 5]
    assert run_driver("edges", *common, "--out", edges_out, "--direction", "noise").returncode == 0
    graph = Graph.of(tiny_model)
    theirs = Circuit("theirs", graph, frozenset(e for e, name in enumerate(graph.edge_names) if "m0" in name), ())
    theirs = Circuit.from_json(
        "theirs", Circuit("x", graph, theirs.edges, (0.0,) * len(graph.edges)).to_json(), graph, ""
    )
    (tmp_path / "theirs.json").write_text(theirs.to_json())
    args = [
        "circuit",
        *common,
        "--out",
        out,
        "--edges",
        edges_out,
        "--budgets",
        "10%,50%",
        "--circuit",
        tmp_path / "theirs.json",
    ]
    done = run_driver(*args)
    assert done.returncode == 0, done.stderr
    estimates = {r["edge"]: r["mean_estimate"] for r in pq.read_table(edges_out / "aggregate.parquet").to_pylist()}
    scores = [estimates[name] for name in graph.edge_names]
    circuits = [
        Circuit.from_json(n, (out / "circuits" / f"{n}.json").read_text(), graph, n) for n in ("top-10pct", "top-50pct")
    ]
    for circuit, budget in zip(circuits, ("10%", "50%")):
        assert circuit.edges == select_top(graph, scores, budget_edges(budget, len(graph.edges)))
    assert Circuit.from_json("theirs", (out / "circuits" / "theirs.json").read_text(), graph, "").edges == theirs.edges
    rows = pq.read_table(out / "faithfulness").to_pylist()
    pairs = read_pairs(EXAMPLE_PAIRS, *tokenizer_and_ctx).pairs
    assert len(rows) == len({(r["pair_id"], r["circuit"]) for r in rows}) == len(pairs) * 4
    names = ("top-10pct", "top-50pct", "theirs")
    options = PatchOptions((), direction="noise", method="circuit", circuits=names, circuits_at=str(out))
    core = {(r["pair_id"], r["circuit"]): r for r in circuit_tables(tiny_model, pairs, options)[0].to_pylist()}
    for r in rows:
        assert r["logit_diff"] == pytest.approx(core[(r["pair_id"], r["circuit"])]["logit_diff"], abs=RUN_TOL)
    clean = {r["pair_id"]: r["clean_logit_diff"] for r in pq.read_table(out / "pairs.parquet").to_pylist()}
    empty = {r["pair_id"]: r["logit_diff"] for r in rows if r["circuit"] == "empty"}
    kept = {p for p in clean if abs(clean[p] - empty[p]) >= DEFAULT_MIN_GAP}
    aggregate = {r["circuit"]: r for r in pq.read_table(out / "aggregate.parquet").to_pylist()}
    for name in names:
        mine = [r for r in rows if r["circuit"] == name and r["pair_id"] in kept]
        mean = lambda values: sum(values) / len(values)  # noqa: E731
        ratio = (mean([r["logit_diff"] for r in mine]) - mean([empty[r["pair_id"]] for r in mine])) / (
            mean([clean[r["pair_id"]] for r in mine]) - mean([empty[r["pair_id"]] for r in mine])
        )
        row = aggregate[name]
        assert row["faithfulness"] == pytest.approx(ratio, rel=1e-4) and row["pairs"] == len(mine)
        values = [r["faithfulness"] for r in mine]
        low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((low, high), rel=1e-4)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [c["name"] for c in manifest["circuits"]] == list(names) and manifest["circuits"][0]["fraction"] == 0.1
    report = (out / "report.html").read_text()
    assert "CPR (area under faithfulness" in report and 'id="fig-faithfulness"' in report
    assert run_driver(*args).stderr.count("nothing to do") == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "error: give circuits to evaluate: --edges EDGES_RUN"),
        (["--edges", "nowhere", "--budgets", "0%"], "error: budget '0%' must be above 0"),
        (["--circuit", "missing.json"], "error: missing.json: cannot read it"),
        (["--edges", REPO / "examples"], "examples: not a finished edges run"),
        (["--circuit", EXAMPLE_PAIRS], "not JSON"),
        (["--circuit", REPO / "examples" / "tiny-gpt2" / "config.json"], "config.json: not a graph JSON"),
    ],
)
def test_bad_circuit_options_are_one_line(tmp_path, tiny_model_dir, extra, message):
    failed = run_driver("circuit", "--pairs", EXAMPLE_PAIRS, "--model", tiny_model_dir, "--out", tmp_path / "o", *extra)
    assert failed.returncode == 2 and message in failed.stderr, failed.stderr
    assert "Traceback" not in failed.stderr and not (tmp_path / "o").exists()
