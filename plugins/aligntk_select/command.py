"""``aligntk select [SPEC.yaml] [flags]``: score a dataset's rows with small models, keep the best (a thin wrapper)."""

from __future__ import annotations

import sys

import click

from aligntk import AligntkError


@click.command("select")
@click.argument("spec", required=False, type=click.Path(dir_okay=False))
@click.option("--data", help="Data file to score (.jsonl .json .csv .parquet .arrow, or a save_to_disk folder).")
@click.option(
    "--score", type=click.Choice(["perplexity", "ifd", "reward", "learnability", "confidence", "loss"]), help="What to score."
)
@click.option(
    "--model", help="Model folder (perplexity, ifd; a scalar-head reward model for reward; a classifier for confidence, loss)."
)
@click.option("--weak", help="Weak model folder (learnability).")
@click.option("--strong", help="Strong model folder (learnability).")
@click.option(
    "--task",
    type=click.Choice(["causal_lm", "sequence_classification"]),
    help="What the models are (default: what the score needs; learnability: causal_lm).",
)
@click.option("--text-key", help="Column of a row's text (default text).")
@click.option("--label-key", help="Column of a classification row's label: a class or probabilities (default label).")
@click.option("--tokenizer", help="Tokenizer folder (default: each model's folder).")
@click.option("--keep-top", type=int, help="Keep the K best rows.")
@click.option("--keep-fraction", type=float, help="Keep the best fraction F of the rows (0 < F <= 1).")
@click.option("--threshold", type=float, help="Keep rows scoring at least T (at most T with --lowest).")
@click.option("--lowest", is_flag=True, default=None, help="Keep the lowest scores instead of the highest.")
@click.option("--out", help="Output folder (must not exist).")
@click.option("--batch-size", type=int, help="Rows per forward pass (default 32).")
@click.option("--max-length", type=int, help="A row with more tokens is an error.")
@click.option("--device", help="auto (default: CUDA if there is one), cpu, cuda, cuda:1 ...")
@click.option("--threads", type=int, help="torch CPU threads (default: torch's; 1 is fastest on busy shared cores).")
def select(spec: str | None, **flags: object) -> None:
    """Score every row of a dataset with a small model; keep the top-k, a fraction or a threshold.

    \b
    Scores: perplexity of the completion; ifd, instruction-following difficulty
    (perplexity given the prompt / perplexity alone); reward, a reward model's score;
    learnability, weak model's loss - strong model's loss; confidence, a classifier's top
    class probability on a row's text; loss, a classifier's cross-entropy of the row's
    label (an integer class or a list of probabilities, such as weak soft labels).
    Writes OUT/kept.jsonl (train on it with data.path: OUT/kept.jsonl), scores.jsonl,
    report.md, report.json and histogram.png.

    \b
    aligntk select --data train.jsonl --model runs/q/model --score ifd --keep-fraction 0.2 --out sel
    aligntk select --data half_b.jsonl --model runs/weak/model --score confidence --keep-fraction 0.5 --out sel
    aligntk select select.yaml --out sel2
    """
    from .run import select as run_select  # torch and transformers load only when running
    from .spec import read_spec

    try:
        report = run_select(read_spec(spec, flags))
    except AligntkError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    cut = report["cut"]
    click.echo(
        f"{report['score']}: kept {report['kept']} of {report['rows']} rows ({report['rule']}"
        + (f", cut {cut:.4g}" if isinstance(cut, float) else "")
        + f"); wrote {report['out']}"
    )
