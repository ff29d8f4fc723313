"""patchsweep command line: `python driver.py --pairs dataset.jsonl` (also the `patchsweep` script).

Thin on purpose: it parses options and calls into jobs/; every expected failure is one
message on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import gc
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from jobs.circuit_sources import circuits_to_evaluate, scoring_method
from jobs.cluster import NoCluster
from jobs.compact import PARTS_PER_FILE
from jobs.compact import compact as compact_run
from jobs.datasets import write_jsonl
from jobs.datasets.arithmetic import OPERATIONS, generate_arithmetic
from jobs.datasets.greater_than import generate_greater_than
from jobs.datasets.ioi import CORRUPTIONS, generate_ioi
from jobs.datasets.mcqa import generate_mcqa
from jobs.datasets.mib import COUNTERFACTUALS, mib_pairs
from jobs.dispatch import JobError
from jobs.mib.export import export_run, submission_gaps
from jobs.mib.scores import AREAS, formatted, mib_table
from jobs.pairfile import PairFileError
from jobs.results.aggregate import DEFAULT_MIN_GAP
from jobs.results.query import QueryError, format_table, query
from jobs.results.report import DRILL_DOWN_PAIRS, build_report
from jobs.results.stability import DEFAULT_SPLITS, MAX_PAIRS, SplitHalves
from jobs.run import run_job
from jobs.spec import DEFAULT_BATCH_PAIRS, DEFAULT_CONNECT_TIMEOUT, JobSpec
from jobs.store import OutputConflict, Store
from worker.contract.options import (
    DEFAULT_COMPONENTS,
    DEFAULT_DONOR,
    DEFAULT_IG_STEPS,
    DEFAULT_MAX_BATCH_TOKENS,
    DEFAULT_METRIC,
    DEFAULT_MODEL,
    DIRECTIONS,
    DONORS,
    DTYPE_NAMES,
    EDGE_METHODS,
    METRICS,
    PATCH_METHODS,
    PATHS,
    ModelLoadError,
    PatchOptions,
    parse_positions,
)
from worker.contract.receivers import canonical_receivers
from worker.contract.storage import base_name, child
from worker.graph.circuits import MIB_BUDGETS, SELECTIONS, parse_budgets

EXIT_USAGE = 2
USER_ERRORS = (JobError, ModelLoadError, NoCluster, OutputConflict, PairFileError, QueryError, ValueError)


@contextmanager
def user_errors_reported() -> Iterator[None]:
    """Expected failures become `error: ...` on stderr and exit code 2, never a traceback."""
    try:
        yield
    except USER_ERRORS as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(EXIT_USAGE)


def parse_components(ctx, param, value: str) -> tuple[str, ...]:
    components = tuple(part.strip() for part in value.split(",") if part.strip())
    try:
        PatchOptions(components)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None
    return components


def positions_option(ctx, param, value: str) -> str:
    try:
        return parse_positions(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


UNITS = {"": 1} | {p: 1000**i for i, p in enumerate("kmgt", 1)} | {p + "i": 1024**i for i, p in enumerate("kmgt", 1)}


def memory_option(ctx, param, value: str | None) -> int | None:
    """Bytes from `8GiB`, `500MB`, `2g` or a plain count (K, M, G, T in thousands, Ki, Mi, Gi, Ti in 1024s)."""
    if value is None:
        return None
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*", value, flags=re.I)
    amount = float(found.group(1)) * UNITS[(found.group(2) or "").lower()] if found else 0
    if amount < 1:
        raise click.BadParameter(f"{value!r} is not an amount of memory (like 8GiB, 500MB or 2000000)")
    return int(amount)


def receivers_option(ctx, param, value: tuple[str, ...]) -> tuple[str, ...]:
    try:
        return canonical_receivers(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


def run_options(positions_help: str | None, positions_default: str | None, direction: bool = True):
    """The options every run takes (the main command, `paths`, `edges`, `circuit`): input, model,
    output, how the metric is read, where and in what batches it runs; `--positions` where the
    command patches positions (`positions_help` None: edges and circuits, which take every position
    at once); `--direction` where it can go both ways (a circuit runs the clean prompt)."""
    options = [
        click.option(
            "--pairs",
            help="Pair file (JSONL, gzip/zstd JSONL or Parquet): clean, corrupted, correct, incorrect[, id, "
            "labels, metadata]; a path, or a URI such as s3://BUCKET/KEY (the endpoint options as for --out).",
        ),
        click.option(
            "--model",
            default=DEFAULT_MODEL,
            show_default=True,
            help="Hub id or local directory of a gpt2, gpt_neox, llama, mistral or qwen2 checkpoint.",
        ),
        click.option(
            "--out",
            help="Output directory or URI (s3://...).  [default: runs/<pairs file stem>, "
            "runs/<pairs file stem>-paths for paths, -edges for edges, -circuits for circuit]",
        ),
        positions := click.option(
            "--positions", default=positions_default, show_default=True, callback=positions_option, help=positions_help
        ),
        directions := click.option(
            "--direction",
            type=click.Choice(DIRECTIONS),
            default="denoise",
            show_default=True,
            help="denoise: clean activations into the corrupted run (score 1 = clean); noise: the reverse "
            "(score 1 = corrupted-like).",
        ),
        click.option(
            "--metric",
            type=click.Choice(METRICS),
            default=DEFAULT_METRIC,
            show_default=True,
            help="What is read at the last position: logit_diff (mean correct minus mean incorrect logit), "
            "logprob (log total probability of correct), prob_diff (total probability of correct minus "
            "incorrect), kl (KL(donor || run) of the next-token distribution).",
        ),
        click.option(
            "--donor",
            type=click.Choice(DONORS),
            default=DEFAULT_DONOR,
            show_default=True,
            help="Where patched values come from: pair (the pair's other prompt), resample (the donor-side "
            "prompt of another pair of the same length, chosen by --seed), zero (zero ablation), mean (the mean "
            "donor-side activation per position label, from a first pass) or mean-all (one mean per component "
            "and layer). Scores keep the pair's own baselines: 1 = as far as the pair's other prompt moves it.",
        ),
        click.option(
            "--seed",
            type=int,
            default=0,
            show_default=True,
            help="With --donor resample: which other pair each pair resamples from (a seeded shuffle per length).",
        ),
        click.option(
            "--address", help="Join a running Ray cluster (auto or HOST:PORT). Default: start a local Ray for this run."
        ),
        click.option(
            "--connect-timeout",
            type=click.FloatRange(min=0, min_open=True),
            default=DEFAULT_CONNECT_TIMEOUT,
            show_default=True,
            help="Seconds the cluster at --address (or RAY_ADDRESS) has to answer before the run gives up on it.",
        ),
        click.option(
            "--workers",
            type=click.IntRange(min=0),
            help="Number of actors. Default: one per GPU, or 1 CPU actor. 0: no Ray, the shards run in this "
            "process (the same parts, resume and report; for one machine, a notebook or a small run).",
        ),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
        click.option(
            "--dtype",
            type=click.Choice(DTYPE_NAMES),
            default="float32",
            show_default=True,
            help="Model weights dtype (half types on GPU only).",
        ),
        click.option(
            "--batch-pairs",
            type=click.IntRange(min=1),
            default=DEFAULT_BATCH_PAIRS,
            show_default=True,
            help="Pairs per shard (the unit of dispatch, output file and resume).",
        ),
        click.option(
            "--max-batch-tokens",
            type=click.IntRange(min=1),
            default=DEFAULT_MAX_BATCH_TOKENS,
            show_default=True,
            help="Rows x tokens per forward pass inside an actor; bounds activation memory.",
        ),
        click.option(
            "--max-batch-memory",
            callback=memory_option,
            default=None,
            help="Memory a batch may hold (8GiB, 500MB): each shard's batch is planned to fit it, --max-batch-tokens "
            "its cap  [default: half the GPU's free memory, or of the memory available to the actor on CPU]",
        ),
        click.option(
            "--skip-invalid",
            is_flag=True,
            help="Run the valid pairs; write bad lines with reasons to OUT/invalid.jsonl.",
        ),
        click.option(
            "--overwrite", is_flag=True, help="Replace an output directory written with a different configuration."
        ),
    ]

    dropped = ([positions] if positions_help is None else []) + ([] if direction else [directions])
    options = [option for option in options if option not in dropped]

    def apply(command):
        for option in reversed(options):
            command = option(command)
        return command

    return apply


def default_out(pairs: str, suffix: str = "") -> str:
    """runs/<the pair file's name without its extension><suffix>, for a local path or a URI."""
    return str(Path("runs") / f"{Path(base_name(pairs)).stem}{suffix}")


def run(spec: JobSpec) -> None:
    with user_errors_reported():
        spec.patch_options()  # a bad combination of options is refused before anything starts
        code = run_job(spec)
    sys.exit(code)


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@run_options(
    "each: every position on its own; all: every position in one patch (position null); "
    "or labels such as S2,END: only positions with those labels (pairs need them).",
    "each",
)
@click.option(
    "--components",
    default=",".join(DEFAULT_COMPONENTS),
    show_default=True,
    callback=parse_components,
    help="Comma-separated subset of resid (block output), attn, mlp (sublayer outputs), and per "
    "head: head (its output before the output projection), q, k, v (its query, key, value before "
    "rotary embeddings; k and v per key/value head) and pattern (its attention probabilities).",
)
@click.option(
    "--method",
    type=click.Choice(PATCH_METHODS),
    default="exact",
    show_default=True,
    help="exact: patch every cell; atp: estimate every cell by attribution patching (two forwards and "
    "one backward per batch), in the `estimate` column.",
)
@click.option(
    "--verify-top",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="With --method atp: exact-patch each pair's K largest estimates, and K other cells drawn at random.",
)
@click.pass_context
def cli(ctx: click.Context, pairs: str | None, out: str | None, **options) -> None:
    """Activation patching at dataset scale.

    Patches every (component, layer, position) of every clean/corrupted pair in PAIRS with
    MODEL on a pool of Ray actors, and writes OUT/effects/part-*.parquet (one row per pair and
    cell), OUT/pairs.parquet and OUT/manifest.json. Re-running the same command resumes.
    """
    gc.freeze()  # the imported libraries live until exit: the collector need not scan them, nor shutdown free them
    if ctx.invoked_subcommand is not None:
        return
    if pairs is None:
        raise click.UsageError("--pairs FILE is required (or give a subcommand)")
    run(JobSpec(pairs=pairs, out=out or default_out(pairs), **options))


@cli.command("paths")
@run_options(
    "all: each sender head patched at every position (sender_position null); each: at every position "
    "on its own; or labels such as S2,END: at the positions with those labels.",
    "all",
)
@click.option(
    "--receivers",
    multiple=True,
    required=True,
    callback=receivers_option,
    help="What the senders' effect is measured through (repeat for several): logits, or receiver heads' "
    "query/key/value inputs as LAYER.HEAD:q|k|v[,...][@LABEL], e.g. 9.9:q,9.6:q,10.0:q@END "
    "(at the positions labelled END; every position without @).",
)
@click.option(
    "--senders",
    type=click.Choice(["heads"]),
    default="heads",
    show_default=True,
    help="What sends: every attention head of every layer.",
)
def paths(pairs: str | None, out: str | None, receivers: tuple[str, ...], senders: str, **options) -> None:
    """Path patching (Wang et al. 2022): each head's effect through the receivers only.

    In the receiving run a sender head's output takes the donor's value, every other head keeps
    the receiving run's, MLPs and norms are recomputed. `logits` reads that run's logits; head
    receivers take their q/k/v inputs from it into a plain receiving run, whose logits are read.
    Writes OUT/paths/part-*.parquet (one row per pair, sender and receiver), OUT/pairs.parquet,
    OUT/manifest.json and the report.
    """
    if pairs is None:
        raise click.UsageError("--pairs FILE is required")
    run(
        JobSpec(
            pairs=pairs,
            out=out or default_out(pairs, "-paths"),
            components=("head",),
            method=PATHS,
            receivers=receivers,
            **options,
        )
    )


def edge_scoring(default_method: str):
    """--method and --ig-steps: how `edges` (and `find-circuits`, first) score every edge."""

    def apply(command):
        command = click.option(
            "--ig-steps",
            type=click.IntRange(min=1),
            default=DEFAULT_IG_STEPS,
            show_default=True,
            help="eap-ig: interpolated runs per pair.",
        )(command)
        return click.option(
            "--method",
            type=click.Choice(EDGE_METHODS),
            default=default_method,
            show_default=True,
            help="eap: (sender's donor output - its receiving output) x the metric's gradient at the receiver's "
            "input, at the receiving run; eap-ig: that gradient averaged over --ig-steps runs whose embeddings go "
            "from the donor side toward the receiving side.",
        )(command)

    return apply


def circuit_selection(command):
    """--budgets and --select: the circuits an edges run's aggregate gives (`circuit`, `find-circuits`)."""
    command = click.option(
        "--select",
        type=click.Choice(SELECTIONS),
        default="top",
        show_default=True,
        help="top: the edges of largest |score|; greedy: grown from the logits, each step the largest-|score| "
        "edge into a node already in the circuit; mib: MIB's two curves, the edges of largest signed and of "
        "largest |mean effect| (MIB's importance, in metric units), its CPR read from the first and CMD from the "
        "second; consistent: the edges whose 95% interval over the pairs lies furthest from zero. All pruned to "
        "the paths from input to logits.",
    )(command)
    return click.option(
        "--budgets",
        default=",".join(MIB_BUDGETS),
        show_default=True,
        help="Edge counts, or percentages of all edges (MIB's ten by default): a circuit at each.",
    )(command)


@cli.command("edges")
@run_options(None, None)
@edge_scoring("eap")
@click.option(
    "--verify-top",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Exact-patch each pair's K edges of largest |estimate|, and K other edges drawn at random.",
)
def edges(pairs: str | None, out: str | None, method: str, ig_steps: int, **options) -> None:
    """Edge attribution over the model's whole graph (EAP, EAP-IG), per pair.

    Nodes and edges as EAP-IG and MIB name them: input, a{L}.h{H}, m{L}, logits; receivers take a
    head's q, k or v input, an MLP's input or the logits, e.g. a0.h3->a2.h1<q>. Writes
    OUT/edges/part-*.parquet (one row per pair and edge), OUT/pairs.parquet, OUT/manifest.json,
    the aggregate (mean estimate per edge, and mean exact score of the verified ones) and the report.
    """
    if pairs is None:
        raise click.UsageError("--pairs FILE is required")
    out = out or default_out(pairs, "-edges")
    run(JobSpec(pairs=pairs, out=out, components=(), method=method, ig_steps=ig_steps, **options))


@cli.command("circuit")
@run_options(None, None, direction=False)
@click.option(
    "--edges",
    "edges_run",
    help="An edges run (the OUT of driver.py edges on this model): a circuit selected from its aggregate at "
    "each --budgets.",
)
@click.option(
    "--circuit",
    "circuit_files",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="A circuit in EAP-IG's graph JSON (its in-graph edges; named by the file; repeat for several).",
)
@circuit_selection
def circuit(
    pairs: str | None,
    out: str | None,
    edges_run: str | None,
    circuit_files: tuple[str, ...],
    budgets: str,
    select: str,
    **options,
) -> None:
    """Faithfulness of circuits over every pair: the clean run with every edge outside the circuit ablated.

    Each pair's metric with the circuit alone, against the full model (clean) and the empty circuit
    (every edge ablated: the corrupted run for --donor pair): faithfulness = (m(C) - m(empty)) /
    (m(clean) - m(empty)). Writes OUT/circuits/NAME.json (EAP-IG's graph JSON), OUT/faithfulness/
    part-*.parquet (one row per pair and circuit), the aggregate per circuit and the report.
    """
    if pairs is None:
        raise click.UsageError("--pairs FILE is required")
    with user_errors_reported():
        found = circuits_to_evaluate(options["model"], edges_run, circuit_files, parse_budgets(budgets), select)
    run(circuit_job(pairs, out or default_out(pairs, "-circuits"), found, scoring_method(edges_run), options))


def circuit_job(pairs: str, out: str, circuits: tuple, scored_by: str | None, options: dict) -> JobSpec:
    """The circuit run of `circuit` and `find-circuits`: each circuit evaluated on every pair, noted
    with the edge method whose scores chose them."""
    return JobSpec(
        pairs=pairs, out=out, components=(), method="circuit", direction="noise", circuits=circuits,
        scored_by=scored_by, **options,
    )  # fmt: skip


@cli.command("find-circuits")
@run_options(None, None, direction=False)
@edge_scoring("eap-ig")
@circuit_selection
def find_circuits(
    pairs: str | None, out: str | None, method: str, ig_steps: int, budgets: str, select: str, **options
) -> None:
    """Edges, then circuits, in one command: the common case of `edges` and `circuit`.

    Scores every edge of every pair (OUT/edges, an edges run), selects a circuit at each budget
    from its aggregate, and evaluates their faithfulness on the same pairs (OUT/evaluation, a
    circuit run). Each is a run of its own: re-running resumes whichever is unfinished.
    """
    if pairs is None:
        raise click.UsageError("--pairs FILE is required")
    out = out or default_out(pairs, "-find-circuits")
    edges = JobSpec(
        pairs=pairs,
        out=child(out, "edges"),
        components=(),
        method=method,
        direction="noise",
        ig_steps=ig_steps,
        **{**options, "donor": DEFAULT_DONOR},  # edges are scored from the pair's other prompt; --donor ablates
    )
    with user_errors_reported():
        wanted = parse_budgets(budgets)
        PatchOptions((), "each", "noise", options["metric"], method="circuit", donor=options["donor"], circuits=("-",))
        code = run_job(edges)
    if code != 0:
        sys.exit(code)
    with user_errors_reported():
        found = circuits_to_evaluate(options["model"], edges.out, (), wanted, select)
    run(circuit_job(pairs, child(out, "evaluation"), found, method, options))


def generated(model: str, out: str, make) -> list[dict]:
    """The pair records `make(tokenizer)` gives with `model`'s tokenizer, written to `out` as JSONL
    (the `make-*` generators); a user error is one line."""
    from worker.model.checkpoint import (
        load_tokenizer,  # torch and transformers: only the commands that need them load them
    )

    with user_errors_reported():
        tokenizer, _ = load_tokenizer(model)
        records = make(tokenizer)
        write_jsonl(records, out)
    return records


@cli.command("make-ioi")
@click.option("--n", "n_pairs", type=click.IntRange(min=1), default=200, show_default=True, help="Number of pairs.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same file.")
@click.option("--out", required=True, help="JSONL file to write: a path, or a URI such as s3://BUCKET/KEY.")
@click.option(
    "--model",
    default=DEFAULT_MODEL,
    show_default=True,
    help="Tokenizer source: names that are not one token for it are dropped.",
)
@click.option(
    "--corruption",
    type=click.Choice(CORRUPTIONS),
    default="swap",
    show_default=True,
    help="swap: S2 replaced by IO (the answer flips); abc: IO, S1 and S2 replaced by three unrelated names.",
)
def make_ioi(n_pairs: int, seed: int, out: str, model: str, corruption: str) -> None:
    """Write IOI pairs (Wang et al. 2022 templates, both orders) with role labels."""
    records = generated(model, out, lambda tokenizer: generate_ioi(n_pairs, seed, tokenizer, corruption))
    click.echo(f"wrote {len(records)} {corruption} pairs to {out}", err=True)


@cli.command("make-mib")
@click.option(
    "--task",
    required=True,
    type=click.Choice(list(COUNTERFACTUALS)),
    help="The MIB task whose rows --from holds.",
)
@click.option("--from", "source", required=True, help="MIB's rows, as the hub stores them (JSON lines or Parquet).")
@click.option("--out", required=True, help="JSONL pair file to write: a path, or a URI such as s3://BUCKET/KEY.")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Tokenizer source: MIB's filters use it.")
@click.option("--counterfactual", default=None, help="The counterfactual column (default: MIB's for the task).")
@click.option("--n", "n_pairs", type=click.IntRange(min=1), default=None, help="Keep the first N pairs (default: all).")
def make_mib(task: str, source: str, out: str, model: str, counterfactual: str | None, n_pairs: int | None) -> None:
    """Write MIB circuit-track rows as pairs, as MIB's HFEAPDataset makes them: its prompts,
    counterfactual, answers and filters (rows dropped are counted by reason)."""
    from worker.model.checkpoint import load_tokenizer

    with user_errors_reported():
        tokenizer, _ = load_tokenizer(model)
        records, dropped = mib_pairs(source, task, tokenizer, counterfactual, n_pairs)
        write_jsonl(records, out)
    for reason, count in sorted(dropped.items()):
        click.echo(f"dropped {count}: {reason}", err=True)
    click.echo(f"wrote {len(records)} {task} pairs to {out}", err=True)


@cli.command("make-arithmetic")
@click.option("--op", type=click.Choice(sorted(OPERATIONS)), default="add", show_default=True, help="plus or minus.")
@click.option("--n", "n_pairs", type=click.IntRange(min=1), default=200, show_default=True, help="Number of pairs.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same file.")
@click.option("--out", required=True, help="JSONL file to write: a path, or a URI such as s3://BUCKET/KEY.")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Tokenizer source: numbers must be one token.")
def make_arithmetic(op: str, n_pairs: int, seed: int, out: str, model: str) -> None:
    """Write arithmetic pairs in the spirit of MIB's ("Q: How much is 12 plus 7? A:"), offline: the
    corrupted prompt another problem of the operation, its result the incorrect answer."""
    records = generated(model, out, lambda tokenizer: generate_arithmetic(n_pairs, seed, tokenizer, op))
    click.echo(f"wrote {len(records)} arithmetic ({op}) pairs to {out}", err=True)


@cli.command("make-mcqa")
@click.option("--n", "n_pairs", type=click.IntRange(min=1), default=200, show_default=True, help="Number of pairs.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same file.")
@click.option("--out", required=True, help="JSONL file to write: a path, or a URI such as s3://BUCKET/KEY.")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Tokenizer source: symbols must be one token.")
def make_mcqa(n_pairs: int, seed: int, out: str, model: str) -> None:
    """Write colour questions with lettered choices in the spirit of MIB's MCQA, offline: the
    corrupted prompt the same question with other symbols, its right symbol the incorrect answer."""
    records = generated(model, out, lambda tokenizer: generate_mcqa(n_pairs, seed, tokenizer))
    click.echo(f"wrote {len(records)} MCQA pairs to {out}", err=True)


@cli.command("make-greater-than")
@click.option("--n", "n_pairs", type=click.IntRange(min=1), default=200, show_default=True, help="Number of pairs.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same file.")
@click.option("--out", required=True, help="JSONL file to write: a path, or a URI such as s3://BUCKET/KEY.")
@click.option(
    "--model",
    default=DEFAULT_MODEL,
    show_default=True,
    help="Tokenizer source: years that are not one token for it are left out of the answer sets.",
)
def make_greater_than(n_pairs: int, seed: int, out: str, model: str) -> None:
    """Write greater-than pairs (Hanna et al. 2023): "The war lasted from the year 17YY to the year 17",
    answer sets of the years above YY and at or below it, corrupted with YY = 01; for --metric prob_diff."""
    records = generated(model, out, lambda tokenizer: generate_greater_than(n_pairs, seed, tokenizer))
    click.echo(f"wrote {len(records)} greater-than pairs to {out}", err=True)


@cli.command()
@click.argument("out")
@click.option("--group-by", help="Also split the heatmaps by this pairs column (e.g. template).")
@click.option(
    "--min-gap",
    type=float,
    default=DEFAULT_MIN_GAP,
    show_default=True,
    help="Leave pairs with |clean - corrupted logit diff| below this out of score means.",
)
@click.option(
    "--drill-down",
    type=click.IntRange(min=0),
    default=DRILL_DOWN_PAIRS,
    show_default=True,
    help="How many individual pairs to show with their tokens.",
)
@click.option("--png", is_flag=True, help="Also write each heatmap as OUT/png/*.png (needs Chromium).")
@click.option(
    "--stability/--no-stability",
    default=None,
    help=f"Split the pairs in random halves and compare them (OUT/stability.parquet). [default: on up to "
    f"{MAX_PAIRS:,} pairs]",
)
@click.option("--splits", type=click.IntRange(min=1), default=DEFAULT_SPLITS, show_default=True, help="Halvings.")
@click.option("--seed", type=int, default=0, show_default=True, help="Which random halvings: same seed, same halves.")
def report(
    out: str,
    group_by: str | None,
    min_gap: float,
    drill_down: int,
    png: bool,
    stability: bool | None,
    splits: int,
    seed: int,
) -> None:
    """Rebuild OUT/aggregate.parquet and OUT/report.html from a run's tables."""
    halves = SplitHalves(stability, splits, seed)
    with user_errors_reported():
        click.echo(build_report(Store(out), group_by, min_gap, drill_down, png, halves), err=True)


@cli.command()
@click.argument("out")
@click.option(
    "--parts-per-file",
    type=click.IntRange(min=2, max=PARTS_PER_FILE),
    default=PARTS_PER_FILE,
    show_default=True,
    help="Shards per file.",
)
def compact(out: str, parts_per_file: int) -> None:
    """Merge a run's results parts into fewer, larger files (safe to interrupt; queries and resumes as before)."""
    with user_errors_reported():
        click.echo(compact_run(Store(out), parts_per_file), err=True)


@cli.command("mib-export")
@click.argument("edges_runs", nargs=-1, required=True)
@click.option(
    "--out", "out", required=True, help="The submission's directory (runs of other tasks and models add to it)."
)
@click.option(
    "--task",
    default=None,
    help="The MIB task the runs' pairs are: ioi, mcqa, arithmetic-addition, ... (default: the pairs' `task`).",
)
@click.option("--model-name", default=None, help="MIB's name of the model (default: from the checkpoint's type).")
@click.option("--method", default=None, help="The method folder's name (default: MIB's, EAP or EAP-IG-inputs).")
@click.option(
    "--circuits",
    is_flag=True,
    help="Write MIB's nine circuits (at most 0.1%, ..., 50% of the edges) instead of the edges' scores.",
)
def mib_export(
    edges_runs: tuple[str, ...], out: str, task: str | None, model_name: str | None, method: str | None, circuits: bool
) -> None:
    """Write each edges run (scored with --direction noise) as a MIB circuit-track importance file:
    OUT/<method>_patching_edge/<task>_<model>/importances.json, EAP-IG's graph JSON with MIB's scores
    (with --circuits, MIB's nine circuits in its place)."""
    with user_errors_reported():
        for run in edges_runs:
            for written in export_run(run, out, task, model_name, method, circuits):
                click.echo(written)
        for gap in submission_gaps(out):
            click.echo(f"note: {gap}", err=True)


@cli.command("mib-scores")
@click.argument("circuit_runs", nargs=-1, required=True)
@click.option(
    "--task",
    default=None,
    help="The MIB task of every run's pairs (default: each run's pairs' `task`).",
)
@click.option("--model-name", default=None, help="MIB's name of the model (default: from the checkpoint's type).")
@click.option(
    "--metric",
    type=click.Choice(["cpr", "cmd", "both"]),
    default="both",
    show_default=True,
    help="Which of MIB's areas to print.",
)
def mib_scores(circuit_runs: tuple[str, ...], task: str | None, model_name: str | None, metric: str) -> None:
    """MIB's results table from circuit runs (driver.py circuit, or find-circuits' OUT/evaluation): a
    row per method, a column per (task, model) MIB scores, as MIB's print_results.py prints it. With
    --select mib, CPR is read from the signed curve and CMD from the absolute one, as MIB reads them."""
    with user_errors_reported():
        table = mib_table(circuit_runs, task, model_name)
    for name in ("cpr", "cmd") if metric == "both" else (metric,):
        click.echo(f"{AREAS[name]}\n{formatted(table, name)}\n")


@cli.command("query")
@click.argument("out")
@click.argument("sql")
@click.option(
    "--format", "output_format", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True
)
def query_command(out: str, sql: str, output_format: str) -> None:
    """Run SQL over the views effects (paths in a path-patching run), pairs and aggregate of the run in OUT
    (and curves in a circuit run, stability once the report has split the pairs).

    Example: python driver.py query runs/ioi "SELECT layer, avg(score) FROM effects GROUP BY 1 ORDER BY 1"
    """
    with user_errors_reported():
        click.echo(format_table(query(out, sql), output_format))


if __name__ == "__main__":
    cli()
