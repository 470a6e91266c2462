"""Data selection benchmark: train on a subset chosen by ``aligntk select`` vs a random subset of the same size.

On the quickstart's addition task (recipes/quickstart.yaml, 5,000 training sums, 500 held-out):

1. scorers: the quickstart model trained briefly on all rows (``--scorer-steps``), and for
   learnability also a weaker one (``--weak-steps``);
2. ``aligntk select`` keeps ``--fraction`` of the training rows by each score in ``--scores``
   (``ifd``: highest instruction-following difficulty; ``learnability``: largest weak - strong
   loss gap; ``perplexity``: highest completion perplexity);
3. for each seed, a fresh quickstart model trains ``--steps`` steps on each selected subset
   and on a random subset of the same size (drawn with that seed), same recipe otherwise;
   exact match on the 500 held-out sums is reported as mean, min and max over seeds.

    python benchmarks/select/run.py            # the full run (settings in results.md)
    python benchmarks/select/run.py --smoke    # a few steps of everything, to check the script

Writes results.json and results.md next to this file (``--smoke``: into the work folder).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner

import aligntk
from aligntk.cli import main as cli

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RECIPE = ROOT / "recipes" / "quickstart.yaml"


def base_recipe(work: Path) -> dict[str, Any]:
    """The quickstart recipe with absolute paths, no periodic evaluation."""
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["model"]["tokenizer"] = str(RECIPE.parent / recipe["model"]["tokenizer"])
    recipe["data"]["path"] = str(RECIPE.parent / recipe["data"]["path"])
    recipe["data"]["eval_path"] = str(RECIPE.parent / recipe["data"]["eval_path"])
    recipe["train"]["eval_every"] = 10**9
    recipe["train"]["log_every"] = 50
    recipe["output_dir"] = str(work)
    return recipe


def train(recipe: dict[str, Any], out: Path, data: Path, steps: int, seed: int, eval_rows: Path | None) -> dict[str, Any]:
    r = copy.deepcopy(recipe)
    r.update(output_dir=str(out), seed=seed)
    r["data"]["path"] = str(data)
    if eval_rows is not None:
        r["data"]["eval_path"] = str(eval_rows)
    r["train"]["max_steps"] = steps
    r["update"]["warmup_steps"] = min(r["update"]["warmup_steps"], max(1, steps // 10))
    started = time.monotonic()
    result = aligntk.train(r, overwrite=True)
    return {"exact_match": result.last_eval.get("exact_match"), "eval_loss": result.last_eval.get("eval_loss"),
            "seconds": round(time.monotonic() - started, 1)}  # fmt: skip


def select(data: Path, score: str, models: dict[str, Path], fraction: float, out: Path) -> dict[str, Any]:
    if out.exists():
        shutil.rmtree(out)
    flags = ["select", "--data", str(data), "--score", score, "--keep-fraction", str(fraction), "--out", str(out),
             "--batch-size", "256"]  # fmt: skip
    for role, folder in models.items():
        flags += [f"--{role}", str(folder)]
    result = CliRunner().invoke(cli, flags)
    if result.exit_code != 0:
        sys.exit(f"aligntk select failed: {result.output.strip()}")
    return json.loads((out / "report.json").read_text())


def random_subset(data: Path, size: int, seed: int, out: Path) -> Path:
    lines = data.read_text().splitlines()
    chosen = sorted(random.Random(seed).sample(range(len(lines)), size))
    out.write_text("".join(lines[i] + "\n" for i in chosen))
    return out


def summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scores", default="ifd,learnability")
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--scorer-steps", type=int, default=200)
    parser.add_argument("--weak-steps", type=int, default=50)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "select-bench")
    parser.add_argument("--smoke", action="store_true", help="a few steps, 2 seeds, 60 eval rows: checks the script")
    parser.add_argument("--name", default="results", help="write NAME.json and NAME.md")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: much faster on busy shared cores)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    eval_rows = None
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    train_data = RECIPE.parent / "assets" / "arith" / "train.jsonl"
    if args.smoke:
        args.scorer_steps, args.weak_steps, args.steps, seeds = 6, 3, 4, seeds[:2]
        eval_rows = work / "eval-smoke.jsonl"
        eval_rows.write_text("".join((RECIPE.parent / "assets/arith/test.jsonl").read_text().splitlines(True)[:60]))
    recipe = base_recipe(work)
    started = time.monotonic()

    scorer = work / "scorer"
    scorers = {"scorer": train(recipe, scorer, train_data, args.scorer_steps, 0, eval_rows)}
    print(f"scorer ({args.scorer_steps} steps): {scorers['scorer']}", flush=True)
    models: dict[str, dict[str, Path]] = {}
    for score in args.scores.split(","):
        if score == "learnability":
            if "weak" not in scorers:
                scorers["weak"] = train(recipe, work / "weak", train_data, args.weak_steps, 0, eval_rows)
                print(f"weak ({args.weak_steps} steps): {scorers['weak']}", flush=True)
            models[score] = {"weak": work / "weak" / "model", "strong": scorer / "model"}
        else:
            models[score] = {"model": scorer / "model"}

    selections = {s: select(train_data, s, m, args.fraction, work / f"select-{s}") for s, m in models.items()}
    size = next(iter(selections.values()))["kept"]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in [*selections, "random"]}
    for seed in seeds:
        subsets = {s: work / f"select-{s}" / "kept.jsonl" for s in selections}
        subsets["random"] = random_subset(train_data, size, seed, work / f"random-{seed}.jsonl")
        for name, data in subsets.items():
            res = train(recipe, work / f"train-{name}-{seed}", data, args.steps, seed, eval_rows)
            runs[name].append({"seed": seed, **res})
            print(f"{name} seed {seed}: {res}", flush=True)

    results = {
        "settings": {
            "recipe": "recipes/quickstart.yaml", "fraction": args.fraction, "subset_rows": size,
            "scorer_steps": args.scorer_steps, "weak_steps": args.weak_steps, "steps": args.steps,
            "batch_size": recipe["train"]["batch_size"], "seeds": seeds, "smoke": args.smoke,
            "eval_rows": 60 if args.smoke else 500, "torch_threads": args.threads,
        },  # fmt: skip
        "scorers": scorers,
        "selections": {s: {k: r[k] for k in ("rule", "cut", "rows", "kept", "quantiles", "kept_quantiles")} for s, r in selections.items()},
        "runs": runs,
        "exact_match": {name: summary([r["exact_match"] for r in rs]) for name, rs in runs.items()},
        "seconds": round(time.monotonic() - started, 1),
    }
    dest = work if args.smoke else HERE
    (dest / f"{args.name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (dest / f"{args.name}.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [
        "# Data selection: selected vs random subset (quickstart addition task)",
        "",
        f"Subset: {s['subset_rows']} of 5,000 training rows ({s['fraction']:g}); each subset trains a fresh quickstart "
        f"model for {s['steps']} steps at batch {s['batch_size']}; scorer: quickstart trained {s['scorer_steps']} "
        f"steps on all rows (learnability's weak model: {s['weak_steps']} steps); seeds {s['seeds']}; exact match "
        f"on {s['eval_rows']} held-out sums; torch threads {s.get('torch_threads')}. Total {results['seconds']:.0f} s." + (" SMOKE RUN: numbers mean nothing." if s["smoke"] else ""),
        "",
        "| training subset | exact match mean | min | max | per seed |",
        "| --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for name, em in results["exact_match"].items():
        per = ", ".join(f"{r['exact_match']:.3f}" for r in results["runs"][name])
        label = f"selected by {name} ({results['selections'][name]['rule']})" if name in results["selections"] else "random"
        lines.append(f"| {label} | {em['mean']:.3f} | {em['min']:.3f} | {em['max']:.3f} | {per} |")
    lines += ["", "Scorers (exact match after their training): "
              + ", ".join(f"{k} {v['exact_match']:.3f}" for k, v in results["scorers"].items())]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
