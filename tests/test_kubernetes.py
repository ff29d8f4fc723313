"""rayjob.yaml against KubeRay's own RayJob schema (k8s/ray.io_rayjobs.yaml.gz: its CRD, shipped
with where it came from), and against what patchsweep needs of it."""

from __future__ import annotations

import gzip
import hashlib
import shlex

import jsonschema
import pytest
import tomllib
import yaml

from tests.conftest import REPO

MANIFEST = REPO / "rayjob.yaml"
CRD = REPO / "k8s" / "ray.io_rayjobs.yaml.gz"


@pytest.fixture(scope="module")
def schema() -> dict:
    text = gzip.decompress(CRD.read_bytes())
    assert hashlib.sha256(text).hexdigest() in (REPO / "k8s" / "README.md").read_text()  # the file the note names
    crd = yaml.safe_load(text)
    assert crd["spec"]["names"]["kind"] == "RayJob"
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def test_the_rayjob_is_valid_against_kuberays_schema(schema):
    job = yaml.safe_load(MANIFEST.read_text())
    jsonschema.validate(job, schema)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")


def test_the_schema_catches_a_bad_manifest(schema):
    """The validation can fail: a misspelt field type, an unknown enum value."""
    job = yaml.safe_load(MANIFEST.read_text())
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(job, schema)
    job = yaml.safe_load(MANIFEST.read_text())
    job["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "password"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(job, schema)


def test_the_rayjob_runs_the_readme_command_on_gpus_with_the_token_and_a_bucket():
    job = yaml.safe_load(MANIFEST.read_text())
    spec = job["spec"]
    command = shlex.split(spec["entrypoint"])
    assert command[:2] == ["python", "driver.py"] and command[command.index("--out") + 1].startswith("s3://")
    readme = (REPO / "README.md").read_text()
    assert "kubectl apply -f rayjob.yaml" in readme
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": "patchsweep-ray-token"}
    assert cluster["rayVersion"] == "2.60.0"
    workers = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert workers["resources"]["limits"]["nvidia.com/gpu"] == 1
    pinned = yaml.safe_load(spec["runtimeEnvYAML"])["pip"]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    in_image = {"ray[default]==2.60.*"}  # the rayproject/ray image's own; torch as .ci/run pins it
    assert sorted(pinned) == sorted(
        [*(d for d in project if d not in in_image and not d.startswith("torch")), "torch==2.13.0"]
    )
