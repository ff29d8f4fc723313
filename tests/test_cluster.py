"""Running on real Ray clusters: several nodes, `ray job submit`, and the launcher config."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import ray
import yaml
from ray._common.utils import get_default_ray_temp_dir
from ray.cluster_utils import Cluster

from jobs.dispatch import NodesLost, Pool, send_again
from jobs.run import run_job
from jobs.spec import DEFAULT_CONNECT_TIMEOUT, JobSpec
from tests.conftest import EXAMPLE_PAIRS, REPO, free_port
from tests.test_driver import assert_same_effects, driver_command, effects_by_key, no_cluster_line, run_driver_at
from worker.contract.faults import TEST_FAULT_ENV

RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture
def cluster(ray_tmpdir) -> Iterator[Cluster]:
    """A local multi-node Ray (its first node the head) in the test's own RAY_TMPDIR; every node,
    and the test's own connection to it, shut down after the test, pass or fail."""
    cluster = Cluster()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_two_nodes_share_the_shards(tmp_path, tiny_model_dir, cluster):
    cluster.add_node(num_cpus=1, include_dashboard=False)
    cluster.add_node(num_cpus=1)
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
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert {s["status"] for s in manifest["shards"]} == {"done"}
    assert len({s["node"] for s in manifest["shards"]}) == 2
    assert pq.read_table(tmp_path / "run" / "pairs.parquet").num_rows == 12


def test_a_node_lost_mid_run_leaves_its_shards_to_the_survivor(
    tmp_path, tiny_model_dir, many_pairs, core_effects, cluster, monkeypatch
):
    """Two one-CPU nodes, an actor on each; the worker node's processes killed mid-run (its raylet
    and its actor, as a machine that goes away). The driver drops the lost node's actor, sends its
    shard in flight to the head's actor, and finishes with every row once, equal to one process."""
    health = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500, "health_check_failure_threshold": 3}
    monkeypatch.setenv(TEST_FAULT_ENV, "slow:0.4")  # every shard takes a while: the node dies mid-run
    cluster.add_node(num_cpus=1, include_dashboard=False, _system_config=health)
    worker = cluster.add_node(num_cpus=1)
    monkeypatch.delenv(TEST_FAULT_ENV)
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


@dataclass(frozen=True)
class Head:
    process: subprocess.Popen  # `ray start --head --block`, leader of a process group of its own
    port: int  # its GCS's

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def gcs(self) -> int:
        """The pid of the head's GCS server."""
        (pid,) = [pid for pid, name in group_processes(self.process.pid).items() if name == "gcs_server"]
        return pid


def address_file() -> Path:
    return Path(get_default_ray_temp_dir()) / "ray_current_cluster"  # honours RAY_TMPDIR


@contextmanager
def ray_head(*options: str, env: dict | None = None, timeout: float = 120) -> Iterator[Head]:
    """`ray start --head --block` on a GCS port of its own, up once it has recorded its address.

    On leaving, pass or fail, every process it started is ended and its address forgotten, as
    `ray stop` would (which would stop every Ray on the machine): a later test's `auto` must not
    find a head still shutting down.
    """
    port = free_port()
    command = [RAY, "start", "--head", "--block", "--port", str(port), "--node-ip-address", "127.0.0.1"]
    process = subprocess.Popen(
        [*command, "--disable-usage-stats", *options],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + timeout
        while not (address_file().exists() and address_file().read_text().strip().endswith(f":{port}")):
            assert process.poll() is None and time.time() < deadline, "ray start --head did not start"
            time.sleep(0.5)
        yield Head(process, port)
    finally:
        end_group(process)
        if address_file().exists() and address_file().read_text().strip().endswith(f":{port}"):
            address_file().unlink()


def group_processes(group: int) -> dict[int, str]:
    """The live (not zombie) processes of process group `group`, from /proc: their names by pid."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # gone meanwhile
            continue
        state, _, pgrp = text[text.rindex(")") + 2 :].split()[:3]
        if int(pgrp) == group and state != "Z":
            found[int(stat.parent.name)] = text[text.index("(") + 1 : text.rindex(")")]
    return found


def end_group(leader: subprocess.Popen, grace: float = 10) -> None:
    """End `leader`'s whole process group and wait until none of it is left: SIGTERM (and SIGCONT,
    for a process the test stopped), SIGKILL for what is left after `grace` seconds."""
    for signals, wait in (((signal.SIGTERM, signal.SIGCONT), grace), ((signal.SIGKILL,), 10)):
        for signum in signals:
            with suppress(ProcessLookupError):
                os.killpg(leader.pid, signum)
        deadline = time.time() + wait
        while time.time() < deadline:
            leader.poll()  # reaps it: a zombie leader would count as alive
            if not group_processes(leader.pid):
                return
            time.sleep(0.2)


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


def test_ray_job_submit_runs_the_driver(tmp_path, tiny_model_dir, ray_tmpdir):
    """Token authentication as on a real cluster: the test brings its own token, nothing from ~/.ray.

    The head gets the token file by RAY_AUTH_TOKEN_PATH (as cluster.yaml's file mount puts it on
    every node); the submitting client finds it in its HOME, as the README's commands leave it.
    """
    home = tmp_path / "home"
    token = generate_token(home)
    dashboard = free_port()
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
    with ray_head(
        *("--num-cpus", "2", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard)),
        *("--dashboard-agent-listen-port", str(free_port())),  # not the default: another test's Ray may hold it
        env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)},
    ) as head:
        wait_for_dashboard(url, head.process)
        tokenless = subprocess.run(
            command,
            env={**client, "HOME": str(tmp_path), "RAY_AUTH_MODE": "token"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert tokenless.returncode != 0 and "authentication token" in tokenless.stderr
        submitted = submit_until_an_agent_answers(command, {**client, "HOME": str(home), "RAY_AUTH_MODE": "token"})
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert "succeeded" in submitted.stdout
    assert json.loads((out / "manifest.json").read_text())["status"] == "done"
    assert pq.read_table(out / "pairs.parquet").num_rows == 12


def named(address: str, head: Head) -> str:
    """A pattern for how the driver's line names `address`: `auto` with the head's address it found."""
    return rf"auto \(found [\d.]+:{head.port}\)" if address == "auto" else re.escape(address)


@pytest.mark.parametrize("address", ["auto", "HOST:PORT"])
def test_a_head_whose_gcs_was_killed_is_one_line(tmp_path, tiny_model_dir, ray_tmpdir, address):
    """A crashed head: its GCS killed, the address `ray start` recorded left behind (`auto` finds it)."""
    with ray_head("--num-cpus", "1", "--include-dashboard", "false") as head:
        address = head.address if address == "HOST:PORT" else address
        os.kill(head.gcs(), signal.SIGKILL)
        failed = run_driver_at(address, tiny_model_dir, tmp_path / "o")
    line = no_cluster_line(failed, address)
    assert re.match(rf"error: no running Ray cluster at {named(address, head)}: Connection refused;", line), line


@pytest.mark.parametrize("address", ["auto", "HOST:PORT"])
def test_a_head_whose_gcs_does_not_answer_is_one_line_within_the_timeout(tmp_path, tiny_model_dir, ray_tmpdir, address):
    """A hung head: its processes stopped (SIGSTOP; the raylet too, or it would end the head a
    minute on), so its GCS's port still accepts connections but nothing replies. `ray.init` would
    wait for it for minutes; the driver gives up after the default --connect-timeout."""
    with ray_head("--num-cpus", "1", "--include-dashboard", "false") as head:
        address = head.address if address == "HOST:PORT" else address
        os.killpg(head.process.pid, signal.SIGSTOP)
        started = time.time()
        failed = run_driver_at(address, tiny_model_dir, tmp_path / "o")
        seconds = time.time() - started
    line = no_cluster_line(failed, address)
    waited = f"its GCS did not answer within {DEFAULT_CONNECT_TIMEOUT:g} s"
    assert re.match(rf"error: no running Ray cluster at {named(address, head)}: {waited} ", line), line
    assert seconds < 60  # the driver's start and the wait, not Ray's minutes


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
