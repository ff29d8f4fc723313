"""patchsweep command line (placeholder until the Ray driver lands)."""
import click


@click.group()
def cli() -> None:
    """Activation patching at dataset scale."""


if __name__ == "__main__":
    cli()
