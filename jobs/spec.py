"""What a run is: the options that decide its results, and a hash that identifies them.

Two runs into the same output directory must agree on this hash; that is the check that
lets a re-run resume safely and refuses to mix results of different configurations.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

from worker.contract.options import (
    DEFAULT_DONOR,
    DEFAULT_IG_STEPS,
    DEFAULT_MAX_BATCH_TOKENS,
    DEFAULT_METRIC,
    PatchOptions,
)
from worker.contract.storage import opened
from worker.graph.circuits import Circuit

DEFAULT_BATCH_PAIRS = 32
DEFAULT_CONNECT_TIMEOUT = 5.0  # seconds a cluster's GCS has to answer (jobs/cluster.py)
RESULT_DECIDING = (
    "model",
    "components",
    "positions",
    "direction",
    "metric",
    "method",
    "verify_top",
    "receivers",
    "donor",
    "seed",
    "ig_steps",
    "dtype",
    "batch_pairs",
    "max_batch_tokens",
    "skip_invalid",
)


@dataclass(frozen=True)
class JobSpec:
    pairs: str
    out: str
    model: str
    components: tuple[str, ...]
    positions: str = "each"
    direction: str = "denoise"
    metric: str = DEFAULT_METRIC
    method: str = "exact"
    verify_top: int = 0
    receivers: tuple[str, ...] = ()
    donor: str = DEFAULT_DONOR
    seed: int = 0
    ig_steps: int = DEFAULT_IG_STEPS
    dtype: str = "float32"
    device: str = "auto"
    address: str | None = None
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    workers: int | None = None
    batch_pairs: int = DEFAULT_BATCH_PAIRS
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    max_batch_memory: int | None = None  # bytes; None: the device's share (worker/methods/fitting.py)
    skip_invalid: bool = False
    overwrite: bool = False
    circuits: tuple[Circuit, ...] = ()  # method circuit: what to evaluate (written to OUT/circuits/)
    scored_by: str | None = None  # method circuit: the edge method whose scores chose them (None: files)

    def patch_options(self) -> PatchOptions:
        """What every actor is asked to do with each shard."""
        return PatchOptions(
            self.components,
            self.positions,
            self.direction,
            self.metric,
            self.max_batch_tokens,
            self.method,
            self.verify_top,
            self.receivers,
            self.donor,
            self.seed,
            ig_steps=self.ig_steps,
            circuits=tuple(circuit.name for circuit in self.circuits),
            max_batch_memory=self.max_batch_memory,
        )

    def config(self) -> dict:
        """The result-deciding options plus the pair file's content hash."""
        config = {key: getattr(self, key) for key in RESULT_DECIDING}
        config["components"] = list(self.components)
        if self.receivers:
            config["receivers"] = list(self.receivers)
        else:  # runs without receivers keep the hash they had before path patching existed
            del config["receivers"]
        if self.donor == DEFAULT_DONOR:  # and runs from the pair's other prompt the hash they had before donors
            del config["donor"]
        if self.donor != "resample":  # the seed decides only resample's pairing
            del config["seed"]
        if self.method != "eap-ig":  # the steps only EAP-IG's
            del config["ig_steps"]
        if self.circuits:  # each circuit by its edges (their scores decide nothing)
            config["circuits"] = {c.name: text_sha256(",".join(sorted(c.edge_names()))) for c in self.circuits}
        config["pairs_sha256"] = file_sha256(self.pairs)
        return config


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(location: str) -> str:
    """Of a local file or a URI's object, as stored."""
    digest = hashlib.sha256()
    with opened(location) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("patchsweep", "torch", "transformers", "nnsight", "ray", "pyarrow"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found
