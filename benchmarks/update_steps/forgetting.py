"""Forgetting benchmark: how much each update step forgets task A while learning task B.

Task A is the quickstart's two-digit addition; task B is the same sums with the answer
written backwards (``13+54=`` -> ``76``), which conflicts with A. A tiny Llama is first
trained on A; each update step then fine-tunes it on B for the same number of steps.
Reported per strategy: trainable parameters, mean step time, exact match on B, and
perplexity on A's held-out sums (before and after) plus the relative weight drift.

Run from the repository root (CPU is enough):
    python benchmarks/update_steps/forgetting.py --out /tmp/forgetting --pretrain 600 --steps 200
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from aligntk.recipe import read_recipe
from aligntk.testing import read_metrics, run_recipe

REPO = Path(__file__).resolve().parents[2]
if importlib.util.find_spec("aligntk_diagnostics") is None:  # not installed yet: the source tree
    sys.path.insert(0, str(REPO / "plugins"))
import aligntk_diagnostics  # noqa: E402

STRATEGIES: dict[str, dict[str, Any]] = {
    "full": {"name": "full", "learning_rate": 1e-3},
    "full, lower half frozen": {"name": "full", "learning_rate": 1e-3, "freeze": ["embed_tokens"], "freeze_layers": ":50%"},
    "l2sp (alpha 1)": {"name": "l2sp", "learning_rate": 1e-3, "alpha": 1.0},
    "lora (rank 8)": {"name": "lora", "learning_rate": 3e-3, "rank": 8, "target_modules": "all-linear"},
    "prompt_tuning (20)": {"name": "prompt_tuning", "learning_rate": 3e-2, "num_virtual_tokens": 20},
}


def _write_tasks(out: Path) -> None:
    arith = REPO / "recipes" / "assets" / "arith"
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (arith / f"{split}.jsonl").read_text().splitlines()]
        with (out / f"reversed_{split}.jsonl").open("w") as f:
            for row in rows:
                f.write(json.dumps({"prompt": row["prompt"], "completion": row["completion"][::-1]}) + "\n")
        if split == "test":
            (out / "task_a.txt").write_text("".join(r["prompt"] + r["completion"] + "\n" for r in rows[:200]))


def _plugins() -> dict[str, object]:
    from importlib.metadata import entry_points

    installed = any(ep.name == "diagnostics" for ep in entry_points(group="aligntk"))
    return {} if installed else {"diagnostics": aligntk_diagnostics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/forgetting"))
    parser.add_argument("--pretrain", type=int, default=600)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    _write_tasks(out)

    quickstart = read_recipe(REPO / "recipes" / "quickstart.yaml")
    arith = REPO / "recipes" / "assets" / "arith"
    base = {
        **quickstart,
        "output_dir": str(out / "base"),
        "model": {**quickstart["model"], "tokenizer": str(arith / "tokenizer")},
        "data": {**quickstart["data"], "path": str(arith / "train.jsonl"), "eval_path": str(arith / "test.jsonl")},
        "evaluators": [{"name": "exact_match", "max_new_tokens": 5, "limit": 200}],
        "train": {**quickstart["train"], "max_steps": args.pretrain, "eval_every": None, "batch_size": args.batch_size},
    }
    if not (out / "base" / "model").is_dir():
        run_recipe(base, overwrite=True, plugins=_plugins())
    base_eval = read_metrics(out / "base", "eval")[-1]
    print(f"base model after {args.pretrain} steps on task A: exact match {base_eval['exact_match']:.3f}")

    results = []
    for label, update in STRATEGIES.items():
        recipe = {
            **base,
            "output_dir": str(out / f"{len(results)}-{label.split()[0].rstrip(',')}"),
            "model": {"path": str(out / "base" / "model")},
            "data": {**base["data"], "path": str(out / "reversed_train.jsonl"), "eval_path": str(out / "reversed_test.jsonl")},
            "update": {**update, "warmup_steps": 20, "schedule": "cosine"},
            "evaluators": [
                {"name": "exact_match", "max_new_tokens": 5, "limit": 200},
                {"name": "perplexity", "path": str(out / "task_a.txt")},
                {"name": "drift"},
            ],
            "train": {**base["train"], "max_steps": args.steps, "log_every": 1},
        }
        run_recipe(recipe, overwrite=True, plugins=_plugins())
        run_dir = Path(recipe["output_dir"])
        first, last = read_metrics(run_dir, "eval")[0], read_metrics(run_dir, "eval")[-1]
        steps = read_metrics(run_dir, "train")
        results.append(
            {
                "strategy": label,
                "step_time_ms": 1000 * statistics.median(s["step_time"] for s in steps),
                "task_b_exact_match": last["exact_match"],
                "task_a_ppl_before": first["general_ppl"],
                "task_a_ppl_after": last["general_ppl"],
                "drift": last["drift"],
            }
        )
        print(json.dumps(results[-1]))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = ["| strategy | median step ms | exact match B | ppl A before | ppl A after | drift |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['strategy']} | {r['step_time_ms']:.1f} | {r['task_b_exact_match']:.3f} | "
            f"{r['task_a_ppl_before']:.3f} | {r['task_a_ppl_after']:.3f} | {r['drift']:.4f} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
