"""``aligntk w2s RECIPE``: run the whole weak-to-strong protocol from one recipe (a thin wrapper)."""

from __future__ import annotations

import sys

import click

from aligntk import AligntkError


@click.command("w2s")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--overwrite", is_flag=True, help="Replace runs already in the output folder.")
@click.option("--skip-finished", is_flag=True, help="Read back seeds that already finished instead of training them.")
def w2s(recipe: str, overrides: tuple[str, ...], overwrite: bool, skip_finished: bool) -> None:
    """Weak-to-strong protocol: weak on half A, label B, students per loss, ceiling; report PGR.

    OVERRIDES are KEY.PATH=VALUE pairs (e.g. seeds=[0,1] train.max_steps=50).
    """
    from .protocol import run_protocol  # torch and transformers load only when running

    try:
        results = run_protocol(recipe, overrides, overwrite=overwrite, skip_finished=skip_finished)
    except AligntkError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    from .report import markdown

    click.echo(markdown(results))
