"""`--out s3://...` for real: a local S3 API server (moto's server mode) on a loopback port,
reached through pyarrow's S3 filesystem with an endpoint override, as a user would point
patchsweep at any S3-compatible endpoint. Credentials come from the standard AWS variables."""

from __future__ import annotations

import json
import os

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
