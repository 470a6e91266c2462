"""torch.compile as a recipe option (``train.compile``): SFT throughput with and without it.

Builds one Llama from a config and an addition-like SFT task padded to a fixed width
(so compiled graphs see one shape), then runs the same recipe with ``train.compile``
false and true, alternating, each in a fresh process (``aligntk run``): compile caches
never carry over. Reports tokens/s over the steps after ``--warmup`` (the compile
happens there) and the wall time of the whole run, compile included.

    python benchmarks/compile/run.py --out benchmarks/compile/results/cpu
    python benchmarks/compile/run.py --device cuda --precision bf16 --hidden 1024 --layers 8 \\
        --batch 16 --out $OUT/compile
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def write_task(folder: Path, rows: int, width: int, seed: int) -> None:
    """Rows of ``digits=`` -> the digits reversed, all ``width`` characters long."""
    rng = random.Random(seed)
    half = (width - 2) // 2
    with (folder / "train.jsonl").open("w") as f:
        for _ in range(rows):
            digits = "".join(rng.choice("0123456789") for _ in range(half))
            f.write(json.dumps({"prompt": digits + "=", "completion": digits[::-1]}) + "\n")


def recipe(args: argparse.Namespace, folder: Path) -> dict:
    from aligntk.testing import char_tokenizer

    char_tokenizer("0123456789+=").save_pretrained(folder / "tokenizer")
    heads = max(1, args.hidden // 64)
    return {
        "output_dir": str(folder / "run"),
        "seed": 0,
        "model": {
            "config": {
                "model_type": "llama", "hidden_size": args.hidden, "intermediate_size": 4 * args.hidden,
                "num_hidden_layers": args.layers, "num_attention_heads": heads, "num_key_value_heads": heads,
                "max_position_embeddings": 2 * args.width,
            },
            "tokenizer": str(folder / "tokenizer"),
        },
        "data": {"name": "sft", "path": str(folder / "train.jsonl"), "max_length": args.width + 2},
        "loss": {"name": "sft"},
        "update": {"name": "full", "learning_rate": 1e-3, "warmup_steps": 0, "schedule": "constant"},
        "train": {
            "max_steps": args.steps, "batch_size": args.batch, "precision": args.precision, "device": args.device,
        },
    }


def one_run(config: Path, compiled: bool, run_dir: Path, warmup: int) -> dict:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "aligntk", "run", str(config), f"train.compile={str(compiled).lower()}",
         f"output_dir={run_dir}", "--overwrite"],
        check=True, capture_output=True, text=True,
    )
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("split") == "train" and r["step"] > warmup]
    tokens = sum(r["tokens"] for r in steps)
    seconds = sum(r["step_time"] for r in steps)
    return {
        "compile": compiled, "tokens_per_s": tokens / seconds, "wall_s": wall,
        "losses": [r["loss"] for r in records if r.get("split") == "train"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of tokens/s (compilation)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128, help="sequence length of every row")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cpu")
    args = parser.parse_args()
    if args.warmup >= args.steps:
        parser.error("--warmup must be below --steps")

    args.out.mkdir(parents=True, exist_ok=True)
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_task(folder, rows=max(256, args.batch * args.steps), width=args.width, seed=0)
        config = folder / "recipe.yaml"
        config.write_text(yaml.safe_dump(recipe(args, folder)))
        for r in range(args.repeats):
            for compiled in (False, True):
                res = one_run(config, compiled, folder / f"run-{r}-{int(compiled)}", args.warmup)
                runs.append(res)
                print(f"repeat {r + 1} compile={compiled!s:5}: {res['tokens_per_s']:9.0f} tok/s  "
                      f"wall {res['wall_s']:6.1f} s", flush=True)

    plain = [r for r in runs if not r["compile"]]
    comp = [r for r in runs if r["compile"]]
    ratios = [c["tokens_per_s"] / p["tokens_per_s"] for p, c in zip(plain, comp)]
    device = args.device
    if device == "cuda":
        import torch

        device = torch.cuda.get_device_name()
    summary = {
        "device": device, "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "tokens_per_s": {"plain": [r["tokens_per_s"] for r in plain], "compiled": [r["tokens_per_s"] for r in comp]},
        "wall_s": {"plain": [r["wall_s"] for r in plain], "compiled": [r["wall_s"] for r in comp]},
        "ratio_compiled_over_plain": {"min": min(ratios), "median": statistics.median(ratios), "max": max(ratios)},
        "max_loss_difference": max(abs(a - b) for p, c in zip(plain, comp) for a, b in zip(p["losses"], c["losses"])),
    }
    (args.out / "results.json").write_text(json.dumps(summary, indent=2))
    ratio = summary["ratio_compiled_over_plain"]
    lines = [
        f"# torch.compile (train.compile) on {device}, {args.precision}",
        "",
        f"Llama hidden {args.hidden}, {args.layers} layers, rows of {args.width} tokens, batch {args.batch}, "
        f"{args.steps} steps ({args.warmup} warm-up steps left out of tokens/s), {args.repeats} alternating repeats.",
        "",
        "| | tokens/s (median) | wall time incl. compile (median) |",
        "| --- | --- | --- |",
        f"| plain | {statistics.median(summary['tokens_per_s']['plain']):.0f} | "
        f"{statistics.median(summary['wall_s']['plain']):.1f} s |",
        f"| compiled | {statistics.median(summary['tokens_per_s']['compiled']):.0f} | "
        f"{statistics.median(summary['wall_s']['compiled']):.1f} s |",
        "",
        f"Throughput ratio compiled / plain: median {ratio['median']:.2f} (min {ratio['min']:.2f}, max {ratio['max']:.2f}). "
        f"Largest per-step loss difference: {summary['max_loss_difference']:.2e}.",
    ]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
