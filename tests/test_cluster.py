"""Running on real Ray clusters: several nodes, `ray job submit`, and the launcher config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import ray
import yaml
from ray._common.utils import get_default_ray_temp_dir
from ray.cluster_utils import Cluster

from jobs.run import NodesLost, Pool, run_job, send_again
from jobs.spec import JobSpec
from tests.conftest import EXAMPLE_PAIRS, REPO, free_port
from tests.test_driver import assert_same_effects, driver_command, effects_by_key
from worker.faults import TEST_FAULT_ENV

RAY = str(Path(sys.executable).parent / "ray")


def test_two_nodes_share_the_shards(tmp_path, tiny_model_dir):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    try:
        spec = JobSpec(
            pairs=str(EXAMPLE_PAIRS),
            out=str(tmp_path / "run"),
            model=str(tiny_model_dir),
            components=("resid",),
            address=cluster.address,
            workers=2,
            batch_pairs=2,
        )
        assert run_job(spec) == 0
    finally:
        ray.shutdown()
        cluster.shutdown()
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert {s["status"] for s in manifest["shards"]} == {"done"}
    assert len({s["node"] for s in manifest["shards"]}) == 2
    assert pq.read_table(tmp_path / "run" / "pairs.parquet").num_rows == 12


def test_a_node_lost_mid_run_leaves_its_shards_to_the_survivor(tmp_path, tiny_model_dir, many_pairs, core_effects):
    """Two one-CPU nodes, an actor on each; the worker node's processes killed mid-run (its raylet
    and its actor, as a machine that goes away). The driver drops the lost node's actor, sends its
    shard in flight to the head's actor, and finishes with every row once, equal to one process."""
    health = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500, "health_check_failure_threshold": 3}
    head_args = {"num_cpus": 1, "include_dashboard": False, "_system_config": health}
    os.environ[TEST_FAULT_ENV] = "slow:0.4"  # every shard takes a while: the node dies mid-run
    try:
        cluster = Cluster(initialize_head=True, head_node_args=head_args)
        worker = cluster.add_node(num_cpus=1)
    finally:
        del os.environ[TEST_FAULT_ENV]
    out = tmp_path / "run"
    args = ("--pairs", many_pairs, "--model", tiny_model_dir, "--out", out, "--components", "resid,mlp")
    driver = subprocess.Popen(
        driver_command(*args, "--batch-pairs", 2, "--workers", 2, "--address", cluster.address),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 180
        while len(list(out.glob("effects/part-*.parquet"))) < 4 and time.time() < deadline:
            time.sleep(0.05)
        cluster.remove_node(worker, allow_graceful=False)
        _, stderr = driver.communicate(timeout=300)
    finally:
        driver.kill()
        cluster.shutdown()
    assert driver.returncode == 0, stderr
    assert "its actor's node was lost; sent to another actor" in stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "done" and {s["status"] for s in manifest["shards"]} == {"done"}
    assert len(manifest["shards"]) == 24
    assert_same_effects(effects_by_key(out), core_effects)  # every row exactly once
    assert pq.read_table(out / "pairs.parquet").num_rows == 48


class LosingPool(Pool):
    """A pool whose next check finds the actors `lost` on dead nodes."""

    def __init__(self, actors: list, lost: list) -> None:
        super().__init__(list(actors), ["node"] * len(actors))
        self.lost = lost

    def drop_lost(self) -> list:
        self.actors = [actor for actor in self.actors if actor not in self.lost]
        return list(self.lost)


def test_a_lost_actors_shard_goes_to_an_idle_actor_and_losing_all_stops_the_run(capsys):
    busy, lost, idle = "busy", "lost", "idle"
    shard = (SimpleNamespace(name="part-00001"), ())
    in_flight, again, sent = {"r0": ((SimpleNamespace(name="part-00000"), ()), busy), "r1": (shard, lost)}, [], []

    def submit(actor) -> None:
        in_flight[f"r{len(in_flight) + 1}"] = (again.pop(0), actor)
        sent.append(actor)

    send_again(LosingPool([busy, lost, idle], [lost]), in_flight, again, submit)
    assert sent == [idle] and list(in_flight.values())[-1] == (shard, idle) and "r1" not in in_flight
    assert "shard part-00001: its actor's node was lost; sent to another actor" in capsys.readouterr().err
    with pytest.raises(NodesLost, match="every node with an actor was lost"):
        send_again(LosingPool([busy, idle], [busy, idle]), in_flight, again, submit)


def wait_for_dashboard(url: str, head: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert head.poll() is None, "ray start --head exited"
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:
            return  # answering, only asking for the token
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"no Ray dashboard at {url}")


def stop_head(head: subprocess.Popen, gcs_port: int) -> None:
    """End the head's process group, and forget its address as `ray stop` would have."""
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    current = Path(get_default_ray_temp_dir()) / "ray_current_cluster"  # honours RAY_TMPDIR
    if current.exists() and current.read_text().strip().endswith(f":{gcs_port}"):
        current.unlink()


def submit_until_an_agent_answers(command: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """The dashboard answers before its job agent is up; until then submission is refused (a
    loaded 2-core machine has taken over 120 s to start the agent)."""
    deadline = time.time() + timeout
    while True:
        submitted = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        if "No available agent" not in submitted.stderr or time.time() > deadline:
            return submitted
        time.sleep(2)


def generate_token(home: Path) -> Path:
    """What the README tells a user to run once: `ray get-auth-token --generate` (in a fresh HOME)."""
    home.mkdir()
    generated = subprocess.run(
        [RAY, "get-auth-token", "--generate"],
        env={**os.environ, "HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert generated.returncode == 0, generated.stderr
    token = home / ".ray" / "auth_token"
    assert token.read_text().strip() in generated.stdout
    return token


def test_ray_job_submit_runs_the_driver(tmp_path, tiny_model_dir):
    """Token authentication as on a real cluster: the test brings its own token, nothing from ~/.ray.

    The head gets the token file by RAY_AUTH_TOKEN_PATH (as cluster.yaml's file mount puts it on
    every node); the submitting client finds it in its HOME, as the README's commands leave it.
    """
    home = tmp_path / "home"
    token = generate_token(home)
    dashboard, gcs_port = free_port(), free_port()
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            "--num-cpus",
            "2",
            "--port",
            str(gcs_port),
            "--node-ip-address",
            "127.0.0.1",
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dashboard),
            "--disable-usage-stats",
        ],
        env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url, out = f"http://127.0.0.1:{dashboard}", tmp_path / "run"
    command = [
        RAY,
        "job",
        "submit",
        "--address",
        url,
        "--working-dir",
        str(REPO),
        "--",
        sys.executable,
        "driver.py",
        "--pairs",
        "examples/pairs.jsonl",
        "--model",
        str(tiny_model_dir),
        "--out",
        str(out),
        "--components",
        "resid",
    ]
    client = {key: value for key, value in os.environ.items() if not key.startswith("RAY_AUTH_TOKEN")}
    try:
        wait_for_dashboard(url, head)
        tokenless = subprocess.run(
            command,
            env={**client, "HOME": str(tmp_path), "RAY_AUTH_MODE": "token"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert tokenless.returncode != 0 and "authentication token" in tokenless.stderr
        submitted = submit_until_an_agent_answers(command, {**client, "HOME": str(home), "RAY_AUTH_MODE": "token"})
    finally:
        stop_head(head, gcs_port)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert "succeeded" in submitted.stdout
    assert json.loads((out / "manifest.json").read_text())["status"] == "done"
    assert pq.read_table(out / "pairs.parquet").num_rows == 12


def test_cluster_yaml_passes_rays_validator():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(prepare_config(config))
    docker_image = config["docker"]["image"]
    assert docker_image.startswith(f"rayproject/ray:{ray.__version__}")
    assert config["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and "patchsweep" in setup
