"""`--out s3://...` for real: a local S3 API server (moto's server mode) on a loopback port,
reached through pyarrow's S3 filesystem with an endpoint override, as a user would point
patchsweep at any S3-compatible endpoint. Credentials come from the standard AWS variables."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pyarrow.fs as pafs
import pytest

from tests.conftest import EXAMPLE_PAIRS, free_port
from tests.test_driver import TEST_FAULT_ENV, run_driver

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {name: os.environ.get(name) for name in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def bucket_uri(endpoint: str, bucket: str, prefix: str) -> str:
    pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", allow_bucket_creation=True).create_dir(bucket)
    return f"s3://{bucket}/{prefix}?endpoint_override={endpoint}&scheme=http"


def listing(uri: str) -> list[str]:
    fs, root = pafs.FileSystem.from_uri(uri)
    return sorted(
        info.path[len(root) + 1 :]
        for info in fs.get_file_info(pafs.FileSelector(root, recursive=True))
        if info.type == pafs.FileType.File
    )


def test_a_run_report_and_query_in_a_bucket(s3_endpoint, tiny_model_dir):
    uri = bucket_uri(s3_endpoint, "runs", "tiny")
    done = run_driver(
        "--pairs",
        EXAMPLE_PAIRS,
        "--model",
        tiny_model_dir,
        "--out",
        uri,
        "--components",
        "resid",
        "--batch-pairs",
        5,
        env_extra=CREDENTIALS,
    )
    assert done.returncode == 0, done.stderr
    files = listing(uri)
    assert {"manifest.json", "pairs.parquet", "aggregate.parquet", "report.html"} <= set(files)
    assert [f for f in files if f.startswith("effects/")] == [f"effects/part-{i:05d}.parquet" for i in range(3)]
    assert not any(".tmp-" in f for f in files)
    rebuilt = run_driver("report", uri, "--group-by", "template", env_extra=CREDENTIALS)
    assert rebuilt.returncode == 0 and "heatmaps" in rebuilt.stderr, rebuilt.stderr
    counted = run_driver(
        "query", uri, "SELECT count(DISTINCT pair_id) AS n FROM effects", "--format", "json", env_extra=CREDENTIALS
    )
    assert counted.returncode == 0, counted.stderr
    assert [json.loads(line) for line in counted.stdout.splitlines()] == [{"n": 12}]


def test_a_failed_run_resumes_from_the_bucket(s3_endpoint, tiny_model_dir):
    uri = bucket_uri(s3_endpoint, "resume", "tiny")
    args = (
        "--pairs",
        EXAMPLE_PAIRS,
        "--model",
        tiny_model_dir,
        "--out",
        uri,
        "--components",
        "resid",
        "--batch-pairs",
        5,
    )
    failed = run_driver(*args, env_extra={**CREDENTIALS, TEST_FAULT_ENV: "raise-on:ex3"})
    assert failed.returncode == 1, failed.stderr
    manifest_before = [f for f in listing(uri) if f.startswith("effects/")]
    assert len(manifest_before) == 2
    resumed = run_driver(*args, env_extra=CREDENTIALS)
    assert resumed.returncode == 0, resumed.stderr
    assert "(2 already done" in resumed.stderr
    assert len([f for f in listing(uri) if f.startswith("effects/")]) == 3


def test_find_circuits_in_a_bucket(s3_endpoint, tiny_model_dir):
    """Edges, circuits selected from the bucket's aggregate, their JSON and the mean donor's means
    written there and read back by the actors, the faithfulness parts and report beside them."""
    uri = bucket_uri(s3_endpoint, "runs", "found")
    args = ["--pairs", EXAMPLE_PAIRS, "--model", tiny_model_dir, "--out", uri, "--batch-pairs", 5]
    done = run_driver("find-circuits", *args, "--method", "eap", "--budgets", "10%,100%", "--donor", "mean-all")
    assert done.returncode == 0, done.stderr
    files = set(listing(uri))
    assert {"edges/aggregate.parquet", "evaluation/circuits/top-10pct.json", "evaluation/donor_means.parquet"} <= files
    assert {"evaluation/report.html", "evaluation/aggregate.parquet"} <= files
    assert [f for f in sorted(files) if f.startswith("evaluation/faithfulness/")] == [
        f"evaluation/faithfulness/part-{i:05d}.parquet" for i in range(3)
    ]
    counted = run_driver(
        "query",
        uri.replace("found?", "found/evaluation?"),
        "SELECT count(*) AS n FROM faithfulness",
        "--format",
        "json",
        env_extra=CREDENTIALS,
    )
    assert [json.loads(line) for line in counted.stdout.splitlines()] == [{"n": 12 * 3}]


def test_pair_files_from_a_bucket(s3_endpoint, tmp_path, tiny_model, tiny_model_dir, tokenizer_and_ctx):
    """`--pairs s3://...`, gzip-compressed and Parquet, streamed from the bucket: the same rows as
    the in-process core on the local file, the config hashed from the object's bytes; `make-ioi`
    writes to a bucket; a missing key is one line, exit 2."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.pairfile import read_pairs
    from jobs.spec import file_sha256
    from tests.test_driver import RUN_TOL
    from worker.methods.registry import patch_batch

    fs, root = pafs.FileSystem.from_uri(bucket_uri(s3_endpoint, "pairs", "files"))
    lines = EXAMPLE_PAIRS.read_bytes()
    with fs.open_output_stream(f"{root}/pairs.jsonl.gz", compression=None) as stream:  # as stored
        stream.write(gzip.compress(lines))
    records = [json.loads(line) for line in lines.decode().splitlines() if line.strip()]
    records = [{**r, "correct": [r["correct"]] if isinstance(r["correct"], str) else r["correct"]} for r in records]
    records = [
        {**r, "incorrect": [r["incorrect"]] if isinstance(r["incorrect"], str) else r["incorrect"]} for r in records
    ]
    with fs.open_output_stream(f"{root}/pairs.parquet") as stream:
        pq.write_table(pa.Table.from_pylist(records), stream)
    core = patch_batch(tiny_model, read_pairs(EXAMPLE_PAIRS, *tokenizer_and_ctx).pairs, ["resid"]).effects.to_pylist()
    expected = {(r["pair_id"], r["layer"], r["position"]): r["logit_diff"] for r in core}
    for name in ("pairs.jsonl.gz", "pairs.parquet"):
        uri = f"s3://pairs/files/{name}?endpoint_override={s3_endpoint}&scheme=http"
        out = tmp_path / name
        args = ["--pairs", uri, "--model", tiny_model_dir, "--out", out, "--components", "resid"]
        done = run_driver(*args, env_extra=CREDENTIALS)
        assert done.returncode == 0, done.stderr
        rows = pq.read_table(out / "effects").to_pylist()
        assert len(rows) == len(expected)
        for r in rows:
            assert r["logit_diff"] == pytest.approx(expected[(r["pair_id"], r["layer"], r["position"])], abs=RUN_TOL)
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["pairs_file"] == uri and manifest["config"]["pairs_sha256"] == file_sha256(uri)
    written = f"s3://pairs/files/ioi.jsonl?endpoint_override={s3_endpoint}&scheme=http"
    made = run_driver("make-ioi", "--n", 20, "--out", written, "--model", tiny_model_dir, env_extra=CREDENTIALS)
    assert made.returncode == 0, made.stderr
    with fs.open_input_stream(f"{root}/ioi.jsonl") as stream:
        assert 0 < len(stream.read().decode().splitlines()) <= 20
    missing = f"s3://pairs/files/none.jsonl?endpoint_override={s3_endpoint}&scheme=http"
    failed = run_driver("--pairs", missing, "--model", tiny_model_dir, "--out", tmp_path / "x", env_extra=CREDENTIALS)
    assert failed.returncode == 2 and failed.stderr.count("\n") == 1, failed.stderr
    assert f"error: {missing}: cannot read pair file" in failed.stderr and not (tmp_path / "x").exists()


def checking_credentials_server(port: int) -> subprocess.Popen:
    """A local S3 API server that checks every request's credentials (moto's IAM enforcement),
    answering once it listens."""
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return server
        time.sleep(0.1)
    server.kill()
    raise TimeoutError("the S3 API server did not start")


@pytest.mark.parametrize("fault", ["unreachable", "wrong credentials"])
def test_a_pair_file_that_cannot_be_reached_is_one_line(tmp_path, tiny_model_dir, fault):
    """Nothing listens at the endpoint (pyarrow's own retries take a few seconds), or the server
    refuses our credentials: one line naming the file, exit 2, nothing written."""
    port = free_port()
    server = checking_credentials_server(port) if fault == "wrong credentials" else None
    uri = f"s3://pairs/ioi.jsonl?endpoint_override=127.0.0.1:{port}&scheme=http"
    try:
        failed = run_driver("--pairs", uri, "--model", tiny_model_dir, "--out", tmp_path / "x", env_extra=CREDENTIALS)
    finally:
        if server is not None:
            server.kill()
    assert failed.returncode == 2 and failed.stderr.count("\n") == 1, failed.stderr
    assert failed.stderr.startswith(f"error: {uri}: cannot read pair file")
    assert ("ACCESS_DENIED" if server else "Could not connect") in failed.stderr
    assert not (tmp_path / "x").exists()
