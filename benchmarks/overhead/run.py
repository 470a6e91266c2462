"""Engine overhead: aligntk's step against a bare PyTorch loop doing the same work.

Both run the quickstart model and data, the same batches in the same order, the same
forward, loss (cross-entropy on answer tokens), backward, clipping and AdamW step.
They alternate ``--repeats`` times in one process; the ratio of their median step
times is reported with its min and max over the repeats.

    python benchmarks/overhead/run.py --steps 120 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from aligntk import DataContext, load_plugins
from aligntk.engine import global_batch_indices, train
from aligntk.models import build_model, load_tokenizer
from aligntk.recipe import read_recipe, validate_recipe
from aligntk.testing import read_metrics

HERE = Path(__file__).resolve().parent
RECIPE = HERE.parents[1] / "recipes" / "quickstart.yaml"
WARMUP = 10


def aligntk_step_times(steps: int, out: Path) -> list[float]:
    plugins = load_plugins()
    raw = read_recipe(RECIPE, [f"train.max_steps={steps}", f"output_dir={out}", "evaluators=[]",
                               "data.eval_path=null", "train.log_every=1", "update.warmup_steps=0"])
    result = train(validate_recipe(raw, plugins.registry, source=RECIPE), plugins, overwrite=True)
    return [r["step_time"] for r in read_metrics(result.run_dir)][WARMUP:]


def bare_step_times(steps: int) -> list[float]:
    plugins = load_plugins()
    resolved = validate_recipe(read_recipe(RECIPE), plugins.registry, source=RECIPE)
    base = RECIPE.parent
    tokenizer = load_tokenizer(resolved.recipe.model, base)
    torch.manual_seed(resolved.recipe.seed)
    model = build_model(resolved.recipe.model, tokenizer, base)
    data = resolved.data.build()
    train_examples = data.load(DataContext(tokenizer, resolved.recipe.seed)).train
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    size = resolved.train.batch_size
    times = []
    model.train()
    for step in range(steps):
        started = time.perf_counter()
        indices = global_batch_indices(step, len(train_examples), size, resolved.recipe.seed)
        batch = data.collate([train_examples[i] for i in indices])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - started)
    return times[WARMUP:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    ratios, engine_ms, bare_ms = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            e = statistics.median(aligntk_step_times(args.steps, Path(tmp) / f"run{r}"))
            b = statistics.median(bare_step_times(args.steps))
            engine_ms.append(1000 * e)
            bare_ms.append(1000 * b)
            ratios.append(e / b)
            print(f"repeat {r + 1}: aligntk {1000 * e:.2f} ms/step, bare {1000 * b:.2f} ms/step, ratio {e / b:.3f}")
    summary = {
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "steps": args.steps,
        "repeats": args.repeats,
        "aligntk_ms_per_step": engine_ms,
        "bare_ms_per_step": bare_ms,
        "ratio": {"min": min(ratios), "median": statistics.median(ratios), "max": max(ratios)},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(summary, indent=2))
    (args.out / "results.md").write_text(
        "# Engine overhead: aligntk step / bare PyTorch step\n\n"
        f"Command: `python benchmarks/overhead/run.py --steps {args.steps} --repeats {args.repeats}`  \n"
        f"Device: {summary['device']}, torch {torch.__version__}; quickstart model (0.66M parameters), batch 64.\n\n"
        "| repeat | aligntk ms/step | bare ms/step | ratio |\n|---|---|---|---|\n"
        + "".join(f"| {i + 1} | {e:.2f} | {b:.2f} | {e / b:.3f} |\n" for i, (e, b) in enumerate(zip(engine_ms, bare_ms)))
        + f"\nRatio min / median / max: {min(ratios):.3f} / {statistics.median(ratios):.3f} / {max(ratios):.3f} "
        "(target <= 1.05).\n"
    )
    print(f"ratio median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    main()
