"""Data selection on the weak-to-strong task: the rows the weak supervisor is surest of vs a random half.

On the weak-to-strong benchmark's task and recipe (benchmarks/w2s: 3-word VADER sentiment
texts, a tiny from-scratch BERT supervisor, all-MiniLM-L6-v2 student), for each seed:

1. split the training rows in half A and half B, train the weak model on half A's
   ground truth and write its soft labels of half B (the ``aligntk w2s`` protocol's own
   steps, ``W2SProtocol``: split, weak recipe, labelling);
2. ``aligntk select --score confidence --keep-fraction F`` with the weak model keeps the
   half-B rows whose weak label is most confident;
3. the strong student (``w2s_ce`` on the weak soft labels, the w2s benchmark's steps,
   batch and learning rate) trains on (a) the selected rows, (b) a random subset of the
   same size drawn with the seed, (c) all of half B, at the same budget;
4. test accuracy on the 2,000 held-out rows, and the weak labels' accuracy on each subset.

    python benchmarks/select/w2s.py            # seeds 0,1,2; results-w2s.{json,md} next to this file
    python benchmarks/select/w2s.py --smoke    # tiny task, 4 steps, 1 seed: checks the script in a minute
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from click.testing import CliRunner

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
W2S = ROOT / "benchmarks" / "w2s"
PROTOCOL = W2S / "w2s_minilm.yaml"
SUBSETS = ("selected", "random", "all")


def _w2s_module(name: str) -> Any:
    """A module of the w2s benchmark by file (its ``run.py`` would clash with this folder's)."""
    spec = importlib.util.spec_from_file_location(f"w2s_bench_{name}", W2S / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def argmax(probs: list[float]) -> int:
    return max(range(len(probs)), key=probs.__getitem__)


def subset_stats(rows: list[dict[str, Any]]) -> dict[str, float]:
    """How good the weak labels of these rows are: accuracy against the ground truth, mean confidence."""
    return {
        "rows": len(rows),
        "weak_label_accuracy": statistics.fmean(int(argmax(r["weak_probs"]) == r["label"]) for r in rows),
        "weak_confidence": statistics.fmean(max(r["weak_probs"]) for r in rows),
        "positive_fraction": statistics.fmean(r["label"] for r in rows),
    }


def select_confident(data: Path, model: Path, fraction: float, out: Path) -> dict[str, Any]:
    """``aligntk select --score confidence`` with the weak model; the report."""
    from aligntk.cli import main as cli

    flags = ["select", "--data", str(data), "--model", str(model), "--score", "confidence",
             "--keep-fraction", str(fraction), "--out", str(out), "--batch-size", "256"]  # fmt: skip
    result = CliRunner().invoke(cli, flags)
    if result.exit_code != 0:
        sys.exit(f"aligntk select failed: {result.output.strip()}")
    return json.loads((out / "report.json").read_text())


def run_seed(proto: Any, seed: int, fraction: float) -> dict[str, Any]:
    from aligntk_w2s.protocol import split_rows

    p = proto.p
    seed_dir = Path(p.output_dir) / f"seed_{seed}"
    started = time.monotonic()
    half_a, half_b = split_rows(p.data.path, p.data.weak_fraction, seed, seed_dir / "data")
    ground_truth = [{"name": "w2s_ce"}]  # soft CE on one-hot targets: plain CE, as the protocol trains its weak model
    weak_recipe = proto.recipe(p.weak, "weak", seed, half_a, ground_truth)
    weak = proto.run_recipe(weak_recipe, overwrite=True)
    weak_dir = Path(weak_recipe["output_dir"])
    labels = read_jsonl(proto.label(weak_dir, half_b, seed))
    rows = [{**row, "weak_probs": lab["probs"]} for row, lab in zip(read_jsonl(half_b), labels)]
    labelled = write_jsonl(seed_dir / "data" / "half_b_weak.jsonl", rows)
    weak_seconds = time.monotonic() - started

    sel_dir = seed_dir / "select"
    if sel_dir.exists():
        shutil.rmtree(sel_dir)
    report = select_confident(labelled, weak_dir / "model", fraction, sel_dir)
    scores = [json.loads(line)["score"] for line in (sel_dir / "scores.jsonl").read_text().splitlines()]
    # The selector's confidence is the weak model's top probability again: it must match the labels file.
    mismatch = max(abs(s - max(r["weak_probs"])) for s, r in zip(scores, rows))
    chosen = sorted(random.Random(seed).sample(range(len(rows)), report["kept"]))
    subsets = {"selected": read_jsonl(sel_dir / "kept.jsonl"), "random": [rows[i] for i in chosen], "all": rows}

    record: dict[str, Any] = {
        "seed": seed, "weak_test_accuracy": weak.final, "weak_seconds": round(weak_seconds, 1),
        "selection": {k: report[k] for k in ("rule", "cut", "rows", "kept", "quantiles", "seconds")},
        "confidence_vs_labels_max_abs_diff": mismatch, "subsets": {},
    }  # fmt: skip
    for name in SUBSETS:
        train = write_jsonl(seed_dir / "data" / f"{name}.jsonl", subsets[name])
        soft = write_jsonl(seed_dir / "data" / f"{name}_labels.jsonl", [{"probs": r["weak_probs"]} for r in subsets[name]])
        raw = proto.recipe(p.strong, f"student_{name}", seed, train, ground_truth)
        raw["data"]["soft_labels_path"] = str(soft.resolve())
        t0 = time.monotonic()
        summary = proto.run_recipe(raw, overwrite=True)
        record["subsets"][name] = {**subset_stats(subsets[name]), "test_accuracy": summary.final,
                                   "best_test_accuracy": summary.best, "seconds": round(time.monotonic() - t0, 1)}  # fmt: skip
        print(f"seed {seed} {name}: {record['subsets'][name]}", flush=True)
    record["seconds"] = round(time.monotonic() - started, 1)
    return record


def summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--fraction", type=float, default=0.5, help="share of half B kept by confidence")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "select-w2s")
    parser.add_argument("--smoke", action="store_true", help="a tiny task, 4 steps, one seed: checks the script")
    parser.add_argument("--name", default="results-w2s", help="write NAME.json and NAME.md")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: much faster on busy shared cores)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from aligntk_w2s.protocol import W2SProtocol, read_protocol

    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    work: Path = args.work.resolve() / ("smoke" if args.smoke else "")
    data = work / "data"
    sizes = {"n_train": 400, "n_test": 200} if args.smoke else {}
    _w2s_module("make_task").write_task(data, **sizes)  # deterministic: the w2s benchmark's task (smoke: smaller)
    minilm = _w2s_module("run").minilm_folder()
    overrides = [f"strong.model.path={minilm}", f"weak.model.tokenizer={minilm}", f"output_dir={work}",
                 f"data.path={data / 'train.jsonl'}", f"data.test_path={data / 'test.jsonl'}",
                 "train.eval_every=80"]  # fmt: skip  # end-of-training accuracy is what is compared
    if args.smoke:
        seeds = seeds[:1]
        overrides += ["train.max_steps=4", "train.eval_every=4", "weak.train.max_steps=4", "strong.update.warmup_steps=1"]
    protocol = read_protocol(PROTOCOL, overrides)
    proto = W2SProtocol(protocol, PROTOCOL)

    started, load_start = time.monotonic(), os.getloadavg()
    runs = []
    for seed in seeds:
        runs.append(run_seed(proto, seed, args.fraction))
    weak_train = {**protocol.train, **protocol.weak.train}
    results = {
        "settings": {
            "task": "benchmarks/w2s (make_task.py)", "protocol": "benchmarks/w2s/w2s_minilm.yaml", "overrides": overrides[2:],
            "fraction": args.fraction, "seeds": seeds, "smoke": args.smoke, "student_loss": "w2s_ce",
            "student_steps": protocol.train["max_steps"], "batch_size": protocol.train["batch_size"],
            "student_learning_rate": protocol.strong.update["learning_rate"] if protocol.strong.update else None,
            "weak_steps": weak_train["max_steps"], "test_rows": sum(1 for _ in (data / "test.jsonl").open()),
            "torch_threads": args.threads, "cpu_count": os.cpu_count(),
        },  # fmt: skip
        "runs": runs,
        "test_accuracy": {n: summary([r["subsets"][n]["test_accuracy"] for r in runs]) for n in SUBSETS},
        "weak_label_accuracy": {n: summary([r["subsets"][n]["weak_label_accuracy"] for r in runs]) for n in SUBSETS},
        "weak_test_accuracy": summary([r["weak_test_accuracy"] for r in runs]),
        "seconds": round(time.monotonic() - started, 1),
        "load_average": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]},
    }
    dest = work if args.smoke else HERE
    (dest / f"{args.name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (dest / f"{args.name}.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict[str, Any]) -> str:
    s, runs = results["settings"], results["runs"]
    labels = {
        "selected": f"top {s['fraction']:g} of half B by weak confidence",
        "random": f"random {s['fraction']:g} of half B",
        "all": "all of half B (reference)",
    }
    lines = [
        "# Data selection on the weak-to-strong task: confident weak labels vs a random subset",
        "",
        f"Weak: tiny BERT from scratch on half A ({s['weak_steps']} steps). Student: all-MiniLM-L6-v2, "
        f"{s['student_loss']} on the weak soft labels, {s['student_steps']} steps at batch {s['batch_size']}, "
        f"learning rate {s['student_learning_rate']:g}, the same for every subset. Seeds {s['seeds']}; test accuracy "
        f"at the end of training on {s['test_rows']} held-out rows. torch threads {s['torch_threads']}; total "
        f"{results['seconds'] / 60:.1f} min, load average {results['load_average']['start'][0]:.1f} at the start, "
        f"{results['load_average']['end'][0]:.1f} at the end." + (" SMOKE RUN: numbers mean nothing." if s["smoke"] else ""),
        "",
        "| student trained on | rows | test accuracy mean | min | max | per seed | weak-label accuracy on its rows (mean; per seed) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for name in SUBSETS:
        acc, wl = results["test_accuracy"][name], results["weak_label_accuracy"][name]
        per = ", ".join(f"{r['subsets'][name]['test_accuracy']:.3f}" for r in runs)
        per_wl = ", ".join(f"{r['subsets'][name]['weak_label_accuracy']:.3f}" for r in runs)
        rows = runs[0]["subsets"][name]["rows"]
        lines.append(f"| {labels[name]} | {rows} | {acc['mean']:.3f} | {acc['min']:.3f} | {acc['max']:.3f} | {per} | {wl['mean']:.3f}; {per_wl} |")
    weak = results["weak_test_accuracy"]
    lines += [
        "",
        f"Weak supervisor's test accuracy: mean {weak['mean']:.3f} (min {weak['min']:.3f}, max {weak['max']:.3f}); "
        "per seed " + ", ".join(f"{r['weak_test_accuracy']:.3f}" for r in runs) + ".",
        "Selection cut (weak confidence of the last row kept), per seed: "
        + ", ".join(f"{r['selection']['cut']:.3f}" for r in runs) + ".",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
