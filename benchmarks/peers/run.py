"""Peers: aligntk's SFT against TRL's SFTTrainer on the same model, data and settings.

One tiny Llama is built once from a config dict with a fixed seed and saved; both
trainers load that folder, so they start from identical weights. Both see the same
pre-tokenized prompt/completion rows (loss on completion tokens only), in the same
order (aligntk's batch order; TRL reads them with a sequential sampler), with the same
batch size, steps, learning rate (constant, no warm-up), AdamW (foreach kernel,
weight decay 0), clipping at 1.0 and precision. Each run is a fresh subprocess; the
two alternate ``--repeats`` times (the first one alternates too).

Measured per run: tokens/s = non-pad tokens of the timed steps / wall time from the
end of the last warm-up step to the end of the last step (timed at each trainer's
step-end hook, so logging between steps counts for both); peak RSS = the process's
``ru_maxrss`` at the end, and its growth over the RSS after imports, before the
model and data load.

    python benchmarks/peers/run.py --steps 20 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FRAMEWORKS = ("aligntk", "trl")
WORDS = "alpha beta gamma delta omega sigma kappa theta lambda zeta rho tau phi chi psi".split()


# --------------------------------------------------------------------------------------
# Shared inputs: model folder, rows, batch order
# --------------------------------------------------------------------------------------


def make_rows(n: int, min_len: int, max_len: int, seed: int) -> list[dict[str, str]]:
    """Deterministic prompt/completion rows; the completion is the prompt's words reversed."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        target = rng.randint(min_len, max_len)
        words: list[str] = [rng.choice(WORDS) + str(rng.randrange(10))]
        # prompt "w1 w2 ... =", completion " wn ... w1" + EOS: 2 * len(joined) + 4 tokens
        while True:
            word = rng.choice(WORDS) + str(rng.randrange(10))
            size = 2 * len(" ".join([*words, word])) + 4
            if size > max_len or 2 * len(" ".join(words)) + 4 >= target:
                break
            words.append(word)
        rows.append({"prompt": " ".join(words) + " =", "completion": " " + " ".join(reversed(words))})
    return rows


def prepare(work: Path, args: argparse.Namespace) -> dict:
    """Save the tokenizer + initial model, the rows, and TRL's pre-tokenized, pre-ordered rows."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from aligntk.engine import global_batch_indices
    from aligntk.testing import char_tokenizer

    tokenizer = char_tokenizer()
    config = {
        "model_type": "llama",
        "hidden_size": args.hidden,
        "intermediate_size": 4 * args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": max(1, args.hidden // 64),
        "num_key_value_heads": max(1, args.hidden // 64),
        "max_position_embeddings": args.max_length,
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    params = sum(p.numel() for p in model.parameters())

    rows = make_rows(args.rows, args.min_len, args.max_len, args.seed)
    with (work / "train.jsonl").open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    # The tokenization aligntk's sft data does: prompt (special tokens as the tokenizer adds
    # them), completion without, then EOS; prompt positions are masked.
    encoded = []
    for row in rows:
        p = tokenizer(row["prompt"], add_special_tokens=True)["input_ids"]
        c = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(p) + len(c) > args.max_length:
            raise SystemExit(f"a row has {len(p) + len(c)} tokens > --max-length {args.max_length}")
        encoded.append({"input_ids": p + c, "completion_mask": [0] * len(p) + [1] * len(c)})
    order = [i for step in range(args.steps) for i in global_batch_indices(step, len(rows), args.batch_size, args.seed)]
    with (work / "trl_rows.jsonl").open("w") as f:
        for i in order:
            f.write(json.dumps(encoded[i]) + "\n")
    step_tokens = [
        sum(len(encoded[i]["input_ids"]) for i in order[s * args.batch_size : (s + 1) * args.batch_size])
        for s in range(args.steps)
    ]
    lengths = [len(e["input_ids"]) for e in encoded]
    return {
        "model_config": config,
        "parameters": params,
        "row_tokens": {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths)},
        "step_tokens": step_tokens,
    }


# --------------------------------------------------------------------------------------
# Workers (one per subprocess)
# --------------------------------------------------------------------------------------


def _rss_now() -> int:
    """Resident set size now, in bytes (Linux /proc; else the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return _peak_rss()


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def worker_aligntk(spec: dict, out: Path) -> dict:
    import aligntk
    import aligntk.engine  # noqa: F401  (imports done before the RSS baseline)
    from aligntk.testing import read_metrics, run_recipe

    rss_before = _rss_now()

    ends: list[float] = []

    class Timer:
        @aligntk.hookimpl
        def aligntk_on_step_end(self, run, step, metrics):  # noqa: ANN001
            ends.append(time.perf_counter())

    recipe = {
        "output_dir": str(out / "run"),
        "seed": spec["seed"],
        "model": {"path": spec["work"] + "/model"},
        "data": {"name": "sft", "path": spec["work"] + "/train.jsonl", "max_length": spec["max_length"]},
        "loss": {"name": "sft"},
        "update": {"name": "full", "learning_rate": spec["lr"], "warmup_steps": 0, "schedule": "constant",
                   "weight_decay": 0.0, "max_grad_norm": 1.0},
        "train": {"max_steps": spec["steps"], "batch_size": spec["batch_size"], "precision": spec["precision"],
                  "log_every": 1, "device": "cpu"},
    }
    result = run_recipe(recipe, plugins={"peers_timer": Timer()}, overwrite=True)
    records = read_metrics(result.run_dir)
    return {"ends": ends, "losses": [r["loss"] for r in records], "tokens": [r["tokens"] for r in records],
            "rss_before": rss_before}


def worker_trl(spec: dict, out: Path) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rss_before = _rss_now()
    ends: list[float] = []
    losses: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    work = Path(spec["work"])
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model")
    data = datasets.load_dataset("json", data_files=str(work / "trl_rows.jsonl"), split="train",
                                 cache_dir=str(out / "hf_cache"))
    config = SFTConfig(
        output_dir=str(out / "trl"),
        use_cpu=True,
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        max_steps=spec["steps"],
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",  # aligntk's foreach AdamW (TRL's default here may pick the fused kernel)
        bf16=spec["precision"] == "bf16",
        max_length=spec["max_length"],
        completion_only_loss=True,
        train_sampling_strategy="sequential",  # rows are already in aligntk's batch order
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=spec["seed"],
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                         callbacks=[Timer()])
    trainer.train()
    return {"ends": ends, "losses": losses, "tokens": spec["step_tokens"], "rss_before": rss_before}


def run_worker(framework: str, spec_path: Path, result_path: Path) -> None:
    import torch

    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    out = result_path.parent / result_path.stem
    out.mkdir(parents=True, exist_ok=True)
    res = (worker_aligntk if framework == "aligntk" else worker_trl)(spec, out)
    warm, ends = spec["warmup"], res["ends"]
    if len(ends) != spec["steps"]:
        raise SystemExit(f"{framework}: {len(ends)} step ends for {spec['steps']} steps")
    wall = ends[-1] - ends[warm - 1]
    tokens = float(sum(res["tokens"][warm:]))
    result_path.write_text(json.dumps({
        "framework": framework,
        "tokens_per_s": tokens / wall,
        "timed_tokens": tokens,
        "timed_wall_s": wall,
        "peak_rss": _peak_rss(),
        "rss_after_imports": res["rss_before"],
        "losses": res["losses"],
        "step_tokens": res["tokens"],
    }))


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _plot(path: Path, runs: dict[str, list[dict]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for fw, style in zip(FRAMEWORKS, ("-", "--")):
        for i, run in enumerate(runs[fw]):
            ax.plot(range(1, len(run["losses"]) + 1), run["losses"], style, alpha=0.8,
                    label=f"{fw}" if i == 0 else None, color="C0" if fw == "aligntk" else "C1")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (completion tokens)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--min-len", type=int, default=128, help="shortest row, in characters (= tokens)")
    parser.add_argument("--max-len", type=int, default=250, help="longest row, in characters (= tokens)")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args.worker, args.spec, args.result)
        return
    if not 0 < args.warmup < args.steps:
        parser.error("--warmup must be at least 1 and below --steps")
    threads = args.threads or os.cpu_count() or 1

    runs: dict[str, list[dict]] = {fw: [] for fw in FRAMEWORKS}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shared = prepare(work, args)
        spec = {"work": str(work), "seed": args.seed, "steps": args.steps, "warmup": args.warmup,
                "batch_size": args.batch_size, "max_length": args.max_length, "lr": args.lr,
                "precision": args.precision, "threads": threads, "step_tokens": shared["step_tokens"]}
        (work / "spec.json").write_text(json.dumps(spec))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        for r in range(args.repeats):
            order = FRAMEWORKS if r % 2 == 0 else FRAMEWORKS[::-1]
            for fw in order:
                result = work / f"{fw}_{r}.json"
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", fw, "--spec", str(work / "spec.json"),
                       "--result", str(result)]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    sys.stderr.write(done.stdout[-3000:] + done.stderr[-6000:])
                    raise SystemExit(f"{fw} run {r + 1} failed (exit {done.returncode})")
                runs[fw].append(json.loads(result.read_text()))
                res = runs[fw][-1]
                print(f"repeat {r + 1} {fw:7s}: {res['tokens_per_s']:8.0f} tok/s  peak RSS "
                      f"{res['peak_rss'] / 2**20:6.0f} MiB  loss {res['losses'][0]:.3f} -> {res['losses'][-1]:.3f}",
                      flush=True)

    import torch
    import transformers
    import trl

    a, t = runs["aligntk"], runs["trl"]
    tps_ratio = [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(a, t)]
    rss_ratio = [x["peak_rss"] / y["peak_rss"] for x, y in zip(a, t)]
    growth = {fw: [max(0, x["peak_rss"] - x["rss_after_imports"]) for x in runs[fw]] for fw in FRAMEWORKS}
    growth_ratio = [ga / gt if gt else float("nan") for ga, gt in zip(growth["aligntk"], growth["trl"])]
    first_loss = {fw: [x["losses"][0] for x in runs[fw]] for fw in FRAMEWORKS}
    last_loss = {fw: [x["losses"][-1] for x in runs[fw]] for fw in FRAMEWORKS}
    max_gap = max(abs(la - lt) for x, y in zip(a, t) for la, lt in zip(x["losses"], y["losses"]))
    command = ("python benchmarks/peers/run.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k not in ("worker", "spec", "result", "out") and v is not None and v != parser.get_default(k)
    )).strip()
    summary = {
        "command": command,
        "device": f"cpu ({platform.processor() or platform.machine()}), {threads} torch threads per run",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "spec", "result", "out")},
        "model": {"parameters": shared["parameters"], "config": shared["model_config"]},
        "row_tokens": shared["row_tokens"],
        "tokens_per_s": {fw: [x["tokens_per_s"] for x in runs[fw]] for fw in FRAMEWORKS},
        "peak_rss_bytes": {fw: [x["peak_rss"] for x in runs[fw]] for fw in FRAMEWORKS},
        "rss_growth_bytes": growth,
        "ratio_tokens_per_s": _stats(tps_ratio),
        "ratio_peak_rss": _stats(rss_ratio),
        "ratio_rss_growth": _stats(growth_ratio),
        "first_loss": first_loss,
        "last_loss": last_loss,
        "max_abs_loss_gap": max_gap,
        "losses": {fw: [x["losses"] for x in runs[fw]] for fw in FRAMEWORKS},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(summary, indent=2))
    _plot(args.out / "loss_curves.png", runs,
          f"SFT, {shared['parameters'] / 1e6:.1f}M-param Llama, batch {args.batch_size}, {args.precision}")
    mib = 2**20
    table = "".join(
        f"| {i + 1} | {x['tokens_per_s']:.0f} | {y['tokens_per_s']:.0f} | {x['tokens_per_s'] / y['tokens_per_s']:.3f} "
        f"| {x['peak_rss'] / mib:.0f} | {y['peak_rss'] / mib:.0f} | {x['peak_rss'] / y['peak_rss']:.3f} "
        f"| {ga / mib:.0f} | {gt / mib:.0f} | {x['losses'][0]:.4f} / {y['losses'][0]:.4f} "
        f"| {x['losses'][-1]:.4f} / {y['losses'][-1]:.4f} |\n"
        for i, (x, y, ga, gt) in enumerate(zip(a, t, growth["aligntk"], growth["trl"]))
    )
    fmt = lambda s: f"{s['min']:.3f} / {s['median']:.3f} / {s['max']:.3f}"  # noqa: E731
    (args.out / "results.md").write_text(
        "# Peers: aligntk SFT vs TRL SFTTrainer\n\n"
        f"Command: `{command}`  \n"
        f"Device: {summary['device']}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"trl {trl.__version__}.  \n"
        f"Model: Llama, {shared['parameters'] / 1e6:.2f}M parameters (hidden {args.hidden}, {args.layers} layers, "
        f"character vocabulary of {shared['model_config']['vocab_size']}), {args.precision}; batch {args.batch_size}, "
        f"rows of {shared['row_tokens']['min']}-{shared['row_tokens']['max']} tokens (max length {args.max_length}); "
        f"{args.steps} steps, the first {args.warmup} untimed; each run in a fresh process, alternating.\n\n"
        "| repeat | aligntk tok/s | TRL tok/s | ratio | aligntk peak RSS MiB | TRL peak RSS MiB | ratio "
        "| aligntk RSS growth MiB | TRL RSS growth MiB | first loss aligntk / TRL | last loss aligntk / TRL |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n" + table +
        f"\naligntk / TRL, min / median / max over repeats:\n\n"
        f"- tokens/s (non-pad): {fmt(summary['ratio_tokens_per_s'])} (above 1: aligntk faster)\n"
        f"- peak RSS: {fmt(summary['ratio_peak_rss'])} (below 1: aligntk smaller)\n"
        f"- RSS growth over the process after imports (model, data, training): {fmt(summary['ratio_rss_growth'])}\n\n"
        f"Largest per-step loss gap between the two over all repeats: {max_gap:.4f}. "
        "Loss curves: `loss_curves.png`.\n"
    )
    print(f"tokens/s ratio aligntk/TRL median {summary['ratio_tokens_per_s']['median']:.3f}; "
          f"peak RSS ratio median {summary['ratio_peak_rss']['median']:.3f}; max loss gap {max_gap:.4f}")


if __name__ == "__main__":
    main()
