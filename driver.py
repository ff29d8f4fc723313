"""patchsweep command line: `python driver.py --pairs dataset.jsonl` (also the `patchsweep` script).

Thin on purpose: it parses options and calls into jobs/; every expected failure is one
message on stderr and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from jobs.pairfile import PairFileError
from jobs.run import JobError, run_job
from jobs.spec import DEFAULT_BATCH_PAIRS, JobSpec
from jobs.store import OutputConflict
from worker.model import DEFAULT_MODEL, DTYPES, ModelLoadError
from worker.patching import COMPONENTS, DEFAULT_MAX_BATCH_TOKENS, DIRECTIONS, check_options

EXIT_USAGE = 2
USER_ERRORS = (JobError, ModelLoadError, OutputConflict, PairFileError, ValueError)


def parse_components(ctx, param, value: str) -> tuple[str, ...]:
    components = tuple(part.strip() for part in value.split(",") if part.strip())
    try:
        check_options(components, "denoise")
    except ValueError as error:
        raise click.BadParameter(str(error)) from None
    return components


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--pairs", type=click.Path(dir_okay=False), help="JSONL pair file: clean, corrupted, correct, incorrect[, id, labels, metadata].")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Hub id or local directory of a GPT-2-family checkpoint.")
@click.option("--out", help="Output directory or URI (s3://...).  [default: runs/<pairs file stem>]")
@click.option("--components", default=",".join(COMPONENTS), show_default=True, callback=parse_components,
              help="Comma-separated subset of resid (block output), attn, mlp (sublayer outputs).")
@click.option("--direction", type=click.Choice(DIRECTIONS), default="denoise", show_default=True,
              help="denoise: clean activations into the corrupted run (score 1 = clean); noise: the reverse (score 1 = corrupted-like).")
@click.option("--address", help="Join a running Ray cluster (auto or HOST:PORT). Default: start a local Ray for this run.")
@click.option("--workers", type=click.IntRange(min=1), help="Number of actors. Default: one per GPU, or 1 CPU actor.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="float32", show_default=True, help="Model weights dtype (half types on GPU only).")
@click.option("--batch-pairs", type=click.IntRange(min=1), default=DEFAULT_BATCH_PAIRS, show_default=True,
              help="Pairs per shard (the unit of dispatch, output file and resume).")
@click.option("--max-batch-tokens", type=click.IntRange(min=1), default=DEFAULT_MAX_BATCH_TOKENS, show_default=True,
              help="Rows x tokens per forward pass inside an actor; bounds activation memory.")
@click.option("--skip-invalid", is_flag=True, help="Run the valid pairs; write bad lines with reasons to OUT/invalid.jsonl.")
@click.option("--overwrite", is_flag=True, help="Replace an output directory written with a different configuration.")
@click.pass_context
def cli(ctx: click.Context, pairs: str | None, out: str | None, **options) -> None:
    """Activation patching at dataset scale.

    Patches every (component, layer, position) of every clean/corrupted pair in PAIRS with
    MODEL on a pool of Ray actors, and writes OUT/effects/part-*.parquet (one row per pair and
    cell), OUT/pairs.parquet and OUT/manifest.json. Re-running the same command resumes.
    """
    if ctx.invoked_subcommand is not None:
        return
    if pairs is None:
        raise click.UsageError("--pairs FILE is required (or give a subcommand)")
    spec = JobSpec(pairs=pairs, out=out or str(Path("runs") / Path(pairs).stem), **options)
    try:
        code = run_job(spec)
    except USER_ERRORS as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(EXIT_USAGE)
    sys.exit(code)


if __name__ == "__main__":
    cli()
