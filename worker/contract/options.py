"""What a job may ask of a worker, and how a worker refuses: names, defaults and their checks.

Free of torch and transformers on purpose, so the driver can check options, answer
`--help` and run queries without loading either (seconds of imports).
"""

from __future__ import annotations

from dataclasses import dataclass

from worker.contract.receivers import canonical_receivers, parse_receivers

DEFAULT_MODEL = "openai-community/gpt2"
DTYPE_NAMES = ("float32", "bfloat16", "float16")
COMPONENTS = ("resid", "attn", "mlp", "head", "q", "k", "v", "pattern")
HEAD_COMPONENTS = ("head", "q", "k", "v", "pattern")  # patched per head (worker/model/sites.py says what each is)
DEFAULT_COMPONENTS = ("resid", "attn", "mlp")  # per-head components have n_heads times the cells: asked for by name
DIRECTIONS = ("denoise", "noise")
POSITION_MODES = ("each", "all")  # or a list of position labels
METRICS = ("logit_diff", "logprob", "prob_diff", "kl")
DEFAULT_METRIC = "logit_diff"
NEEDS_INCORRECT = ("logit_diff", "prob_diff")  # the others read only the correct answers, or none
DONORS = ("pair", "resample", "zero", "mean", "mean-all")  # where a patch's values come from (worker/batch/donors.py)
MEAN_DONORS = ("mean", "mean-all")  # these need a first pass: the means of the donor-side activations
DEFAULT_DONOR = "pair"
PATHS = "paths"  # path patching (`driver.py paths`): head senders, measured through `receivers`
DEFAULT_IG_STEPS = 5  # eap-ig: gradients averaged over this many interpolated runs
DEFAULT_MAX_BATCH_TOKENS = 4096


@dataclass(frozen=True)
class Method:
    """What a method is, for the driver and for whoever reads its tables; worker/methods/registry.py says
    which code runs it. A new method is a row here and a runner there."""

    results: str  # the results table it writes: `effects`, `paths` (path patching) or `edges` (the model's graph)
    estimates: bool  # every cell gets an `estimate`; `score` only the cells --verify-top exact-patches
    receivers: bool  # measured through `--receivers` (path patching)
    title: str  # what figure titles say of it ("" for plain patching)
    ranks_by: str = "estimate"  # the column whose size ranks cells for --verify-top (AtP*: GradDrop's)


METHODS = {
    "exact": Method("effects", estimates=False, receivers=False, title=""),
    "atp": Method("effects", estimates=True, receivers=False, title="AtP estimate"),
    "atpstar": Method("effects", estimates=True, receivers=False, title="AtP* estimate", ranks_by="graddrop"),
    PATHS: Method("paths", estimates=False, receivers=True, title="path patching"),
    "eap": Method("edges", estimates=True, receivers=False, title="EAP estimate"),
    "eap-ig": Method("edges", estimates=True, receivers=False, title="EAP-IG estimate"),
    "circuit": Method("faithfulness", estimates=False, receivers=False, title="circuit faithfulness"),
}
PATCH_METHODS = tuple(name for name, method in METHODS.items() if method.results == "effects")  # the main command's
EDGE_METHODS = tuple(name for name, method in METHODS.items() if method.results == "edges")  # `driver.py edges`


class ModelLoadError(RuntimeError):
    """A model or tokenizer that cannot be loaded; the message is one line for the user."""


def parse_positions(text: str) -> str:
    """`each`, `all`, or the listed labels joined by commas (spaces and repeats dropped)."""
    parts = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not parts:
        raise ValueError("positions must be each, all, or a comma-separated list of position labels")
    if len(parts) > 1 and set(parts) & set(POSITION_MODES):
        raise ValueError(f"positions: {' or '.join(POSITION_MODES)} cannot be combined with labels, got {text!r}")
    return ",".join(parts)


def position_labels(positions: str) -> tuple[str, ...]:
    """The labels a `positions` value lists; empty for `each` and `all`."""
    return () if positions in POSITION_MODES else tuple(positions.split(","))


@dataclass(frozen=True)
class PatchOptions:
    """What a job asks of a worker for every shard: which cells, which way, read out how, in
    forwards of what size. Checked on construction, so a worker never starts on bad options."""

    components: tuple[str, ...] = DEFAULT_COMPONENTS
    positions: str = "each"
    direction: str = "denoise"
    metric: str = DEFAULT_METRIC
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    method: str = "exact"
    verify_top: int = 0  # atp, eap, eap-ig: exact-patch each pair's top K estimates and K more drawn at random
    receivers: tuple[str, ...] = ()  # paths: each receiver's canonical spec (worker/contract/receivers.py)
    donor: str = DEFAULT_DONOR  # where patched values come from: the pair's other prompt, or an ablation
    seed: int = 0  # resample: which other pair each pair takes its donor from (the driver's pairing)
    means: str | None = (
        None  # mean, mean-all: the run (local path or URI) whose means to read (worker/batch/mean_donors.py)
    )
    ig_steps: int = DEFAULT_IG_STEPS  # eap-ig: interpolated runs per pair (worker/engines/eap.py)
    circuits: tuple[str, ...] = ()  # circuit: the names of the circuits to evaluate (worker/methods/faithfulness.py)
    circuits_at: str | None = None  # circuit: the run (local path or URI) whose circuits/NAME.json they are
    max_batch_memory: int | None = None  # bytes a batch may hold (None: a share of the device's free memory)

    def wanted_labels(self) -> list[tuple[str, tuple[str, ...]]]:
        """The position labels every pair must carry, each list with the option that asks for it."""
        receiver_labels = tuple(dict.fromkeys(r.label for r in parse_receivers(self.receivers) if r.label))
        asked = (("--positions", position_labels(self.positions)), ("--receivers", receiver_labels))
        return [(option, labels) for option, labels in asked if labels]

    def __post_init__(self) -> None:
        components = self.components
        if self.method in EDGE_METHODS:
            self.check_edges()
        elif self.method == "circuit":
            self.check_circuits()
        elif self.circuits:
            raise ValueError(f"circuits are what method circuit evaluates, not method {self.method!r}")
        elif not components or any(c not in COMPONENTS for c in components) or len(set(components)) < len(components):
            raise ValueError(f"components must be a non-empty subset of {COMPONENTS}, got {list(components)}")
        if parse_positions(self.positions) != self.positions:
            raise ValueError(f"positions must be each, all or labels joined by commas, got {self.positions!r}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if self.donor not in DONORS:
            raise ValueError(f"donor must be one of {DONORS}, got {self.donor!r}")
        if self.donor in MEAN_DONORS and "pattern" in components:
            raise ValueError(
                f"donor {self.donor} cannot patch pattern: a pattern row has one value per source position, "
                "so prompts of different lengths have no mean pattern; use zero or resample"
            )
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be at least 1, got {self.max_batch_tokens}")
        if self.max_batch_memory is not None and self.max_batch_memory < 1:
            raise ValueError(f"max_batch_memory must be at least 1 byte, got {self.max_batch_memory}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {tuple(METHODS)}, got {self.method!r}")
        method = METHODS[self.method]
        if self.verify_top < 0 or (self.verify_top and not method.estimates):
            estimating = " or ".join(name for name, m in METHODS.items() if m.estimates)
            raise ValueError(f"verify_top must be 0, or positive with method {estimating}, got {self.verify_top}")
        if method.receivers != bool(self.receivers):
            raise ValueError(
                "receivers are what method paths measures through, and only it: "
                f"method {self.method!r} with receivers {list(self.receivers)}"
            )
        if method.receivers:
            if self.components != ("head",):
                raise ValueError(f"path patching sends from heads: components must be ('head',), got {self.components}")
            if canonical_receivers(self.receivers) != self.receivers:
                raise ValueError(f"receivers must be canonical specs, got {list(self.receivers)}")

    def check_edges(self) -> None:
        """An edge method scores the model's whole graph from the pair's other prompt."""
        if self.components:
            raise ValueError(f"edge attribution scores every edge of the graph: no components, got {self.components}")
        if self.donor != DEFAULT_DONOR:
            raise ValueError(f"edge attribution patches from the pair's other prompt: --donor pair, not {self.donor}")
        if self.ig_steps < 1:
            raise ValueError(f"--ig-steps must be at least 1, got {self.ig_steps}")

    def check_circuits(self) -> None:
        """A circuit evaluation runs the clean prompt, the edges outside each circuit ablated."""
        if self.components or not self.circuits:
            raise ValueError(f"a circuit evaluation takes circuits, not components: got {self.components}")
        if self.direction != "noise":
            raise ValueError("a circuit evaluation runs the clean prompt with ablated edges: direction noise")
