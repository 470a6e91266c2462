"""Peers: aligntk against TRL (SFTTrainer or DPOTrainer) on the same model, data and settings.

One Llama is built once from a config dict with a fixed seed and saved; both trainers load
that folder, so they start from identical weights. Both see the same token ids (TRL gets
them pre-tokenized), in the same order (aligntk's batch order; TRL reads them with a
sequential sampler), with the same batch size, steps, learning rate (constant, no warm-up),
AdamW (foreach on CPU, fused on CUDA; weight decay 0), clipping at 1.0 and precision.
Each run is a fresh subprocess; the two alternate ``--repeats`` times (the first one
alternates too).

* ``--method sft``: cross-entropy on completion tokens (TRL ``completion_only_loss``).
* ``--method grpo``: aligntk's ``grpo`` loss on ``rollout`` data against TRL's ``GRPOTrainer``
  (``grpo.py``): the same prompts, reward function, group size, completion length, beta,
  update and steps, sampling with transformers' ``generate`` on both sides.
* ``--method dpo``: sigmoid DPO with ``--beta`` on preference pairs (aligntk ``dpo`` loss on
  ``preference`` data). ``--reference`` picks what each side does about the frozen
  reference: ``default`` (each framework's default: aligntk caches reference log-probs
  before training, TRL runs the reference model in every step), ``cached`` (both
  precompute: TRL ``precompute_ref_log_probs=True``) or ``live`` (both run it every step).

Measured per run: tokens/s = non-pad tokens of the timed steps (DPO: chosen plus rejected
sequences) / wall time from the end of the last warm-up step to the end of the last step
(taken at each trainer's step-end hook, after a device sync, so logging between steps
counts for both); peak memory = ``torch.cuda.max_memory_allocated`` on CUDA, the process's
``ru_maxrss`` on CPU (and its growth over the RSS after imports).

    python benchmarks/peers/run.py --steps 20 --repeats 3
    python benchmarks/peers/run.py --method dpo --repeats 3 --out benchmarks/peers/results/dpo
    python benchmarks/peers/run.py --method grpo --repeats 3 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    aligntk_timer, build_tokenizer, device_name, encode, llama_config, make_rows, peak_rss, rss_now, sync,
    trl_callback,
)

FRAMEWORKS = ("aligntk", "trl")
#: --reference: (aligntk's dpo ``reference`` option, TRL's ``precompute_ref_log_probs``)
REFERENCE = {"default": ("cached", False), "cached": ("cached", True), "live": ("live", False)}
#: --checkpointing: (aligntk's ``train.gradient_checkpointing``, TRL's ``gradient_checkpointing``);
#: TRL 1.16's SFTConfig and DPOConfig turn it on by default, aligntk leaves it off.
CHECKPOINTING = {"default": (False, True), "off": (False, False), "on": (True, True)}
#: --beta when not given, per method
BETA = {"sft": None, "dpo": 0.1, "grpo": 0.04}


# --------------------------------------------------------------------------------------
# Shared inputs: model folder, rows, batch order
# --------------------------------------------------------------------------------------


def prepare(work: Path, args: argparse.Namespace) -> dict:
    """Save the tokenizer + initial model, the rows, and TRL's pre-tokenized, pre-ordered rows."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from aligntk.engine import global_batch_indices

    tokenizer = build_tokenizer(args.vocab)
    config = llama_config(tokenizer, args.hidden, args.layers, args.max_length)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    params = sum(p.numel() for p in model.parameters())

    dpo = args.method == "dpo"
    rows = make_rows(args.rows, args.min_len, args.max_len, args.seed, args.vocab, pairs=dpo)
    with (work / "train.jsonl").open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    # TRL's rows: the token ids aligntk's data component makes (see common.encode).
    encoded, lengths = [], []
    for row in rows:
        if dpo:
            p, c = encode(tokenizer, row["prompt"], row["chosen"])
            _, r = encode(tokenizer, row["prompt"], row["rejected"])
            encoded.append({"prompt_ids": p, "chosen_ids": c, "rejected_ids": r})
            lengths.append([len(p) + len(c), len(p) + len(r)])
        else:
            p, c = encode(tokenizer, row["prompt"], row["completion"])
            encoded.append({"input_ids": p + c, "completion_mask": [0] * len(p) + [1] * len(c)})
            lengths.append([len(p) + len(c)])
        if max(lengths[-1]) > args.max_length:
            raise SystemExit(f"a row has {max(lengths[-1])} tokens > --max-length {args.max_length}")
    order = [i for step in range(args.steps) for i in global_batch_indices(step, len(rows), args.batch_size, args.seed)]
    with (work / "trl_rows.jsonl").open("w") as f:
        for i in order:
            f.write(json.dumps(encoded[i]) + "\n")
    step_tokens = [sum(sum(lengths[i]) for i in order[s * args.batch_size : (s + 1) * args.batch_size])
                   for s in range(args.steps)]
    flat = [n for pair in lengths for n in pair]
    return {
        "model_config": config,
        "parameters": params,
        "row_tokens": {"min": min(flat), "median": statistics.median(flat), "max": max(flat)},
        "step_tokens": step_tokens,
    }


# --------------------------------------------------------------------------------------
# Workers (one per subprocess)
# --------------------------------------------------------------------------------------


class StepClock:
    """Step-end times (after a device sync); runs the profiler, if any, over the timed steps only."""

    def __init__(self, spec: dict, profiler: object | None):
        self.device, self.warmup, self.steps, self.profiler = spec["device"], spec["warmup"], spec["steps"], profiler
        self.ends: list[float] = []
        self.cpu: list[float] = []  # process CPU time (all threads): robust to other load on the machine
        self.start = time.perf_counter()

    def tick(self) -> None:
        sync(self.device)
        self.ends.append(time.perf_counter())
        self.cpu.append(time.process_time())
        if self.profiler is not None and len(self.ends) == self.warmup:
            self.profiler.start()
        if self.profiler is not None and len(self.ends) == self.steps:
            self.profiler.stop()  # before the final save (aligntk) and teardown


def worker_aligntk(spec: dict, out: Path, clock: StepClock) -> dict:
    from aligntk.testing import read_metrics, run_recipe

    if spec["method"] == "dpo":
        data = {"name": "preference"}
        loss = {"name": "dpo", "beta": spec["beta"], "loss_type": "sigmoid", "reference": REFERENCE[spec["reference"]][0]}
    else:
        data, loss = {"name": "sft"}, {"name": "sft"}
    recipe = {
        "output_dir": str(out / "run"),
        "seed": spec["seed"],
        "model": {"path": spec["work"] + "/model"},
        "data": {**data, "path": spec["work"] + "/train.jsonl", "max_length": spec["max_length"]},
        "loss": loss,
        "update": {"name": "full", "learning_rate": spec["lr"], "warmup_steps": 0, "schedule": "constant",
                   "weight_decay": 0.0, "max_grad_norm": 1.0},
        "train": {"max_steps": spec["steps"], "batch_size": spec["batch_size"], "precision": spec["precision"],
                  "log_every": 1, "device": spec["device"],
                  "gradient_checkpointing": CHECKPOINTING[spec["checkpointing"]][0]},
    }
    clock.start = time.perf_counter()
    result = run_recipe(recipe, plugins={"peers_timer": aligntk_timer(clock)}, overwrite=True)
    records = read_metrics(result.run_dir)
    return {"losses": [r["loss"] for r in records], "tokens": [r["tokens"] for r in records]}


def worker_trl(spec: dict, out: Path, clock: StepClock) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    losses: list[float] = []

    def keep_loss(logs: dict) -> None:
        if "loss" in logs:
            losses.append(float(logs["loss"]))

    timer = trl_callback(clock, keep_loss)

    clock.start = time.perf_counter()
    work = Path(spec["work"])
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model")
    data = datasets.load_dataset("json", data_files=str(work / "trl_rows.jsonl"), split="train",
                                 cache_dir=str(out / "hf_cache"))
    cuda = spec["device"] == "cuda"
    common = dict(
        output_dir=str(out / "trl"),
        use_cpu=not cuda,
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        max_steps=spec["steps"],
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        gradient_checkpointing=CHECKPOINTING[spec["checkpointing"]][1],
        optim="adamw_torch_fused" if cuda else "adamw_torch",  # the AdamW kernel aligntk picks on each device
        bf16=spec["precision"] == "bf16",
        max_length=spec["max_length"],
        train_sampling_strategy="sequential",  # rows are already in aligntk's batch order
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=spec["seed"],
        use_liger_kernel=spec["liger"],  # --liger: Liger's fused linear cross-entropy (CUDA, liger-kernel)
    )
    if spec["method"] == "dpo":
        from trl import DPOConfig, DPOTrainer

        class PreTokenizedDPOTrainer(DPOTrainer):
            """DPOTrainer reading rows that already hold prompt_ids/chosen_ids/rejected_ids.

            TRL 1.16 always tokenizes text rows in ``_prepare_dataset``; these rows are the
            token ids aligntk's ``preference`` data makes, so that step is skipped. Nothing
            else in the trainer is changed.
            """

            def _prepare_dataset(self, dataset, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
                return dataset

        config = DPOConfig(**common, beta=spec["beta"], loss_type=["sigmoid"],
                           precompute_ref_log_probs=REFERENCE[spec["reference"]][1])
        trainer = PreTokenizedDPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                                         callbacks=[timer])
    else:
        from trl import SFTConfig, SFTTrainer

        config = SFTConfig(**common, completion_only_loss=True)
        trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                             callbacks=[timer])
    trainer.train()
    return {"losses": losses, "tokens": spec["step_tokens"]}


def _profiler(device: str) -> object:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    return profile(activities=activities)


def run_worker(framework: str, spec_path: Path, result_path: Path) -> None:
    import importlib

    import torch

    spec = json.loads(spec_path.read_text())
    if spec["method"] == "grpo":
        import grpo

        grpo.run_worker(framework, spec, result_path)
        return
    # Each side's own heavy imports happen before the RSS baseline.
    for module in ("aligntk.engine",) if framework == "aligntk" else ("datasets", "transformers", "trl"):
        importlib.import_module(module)
    if spec["device"] == "cpu":
        torch.set_num_threads(spec["threads"])
    else:
        torch.cuda.reset_peak_memory_stats()
    out = result_path.parent / result_path.stem
    out.mkdir(parents=True, exist_ok=True)
    rss_before = rss_now()
    profiler = _profiler(spec["device"]) if spec["profile"] else None
    clock = StepClock(spec, profiler)
    res = (worker_aligntk if framework == "aligntk" else worker_trl)(spec, out, clock)
    warm, ends = spec["warmup"], clock.ends
    if len(ends) != spec["steps"]:
        raise SystemExit(f"{framework}: {len(ends)} step ends for {spec['steps']} steps")
    if profiler is not None:
        sort = "self_cuda_time_total" if spec["device"] == "cuda" else "self_cpu_time_total"
        table = profiler.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=60)
        (result_path.parent / f"profile_{framework}.txt").write_text(
            f"{framework}, {spec['method']}, steps {warm + 1}-{spec['steps']}, wall {ends[-1] - ends[warm - 1]:.3f} s\n"
            + table)
    wall = ends[-1] - ends[warm - 1]
    cpu = clock.cpu[-1] - clock.cpu[warm - 1]
    tokens = float(sum(res["tokens"][warm:]))
    cuda = spec["device"] == "cuda"
    result_path.write_text(json.dumps({
        "framework": framework,
        "device_name": device_name(spec["device"], spec["threads"]),
        "tokens_per_s": tokens / wall,
        "tokens_per_cpu_s": tokens / cpu,
        "pairs_per_s": spec["batch_size"] * (spec["steps"] - warm) / wall,
        "timed_tokens": tokens,
        "timed_wall_s": wall,
        "timed_cpu_s": cpu,
        "to_first_step_s": ends[0] - clock.start,
        "peak_memory": torch.cuda.max_memory_allocated() if cuda else peak_rss(),
        "peak_rss": peak_rss(),
        "load_average": os.getloadavg()[0],
        "rss_after_imports": rss_before,
        "losses": res["losses"],
        "step_tokens": res["tokens"],
    }))


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _plot(path: Path, runs: dict[str, list[dict]], title: str, ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for fw, style in zip(FRAMEWORKS, ("-", "--")):
        for i, run in enumerate(runs[fw]):
            ax.plot(range(1, len(run["losses"]) + 1), run["losses"], style, alpha=0.8,
                    label=f"{fw}" if i == 0 else None, color="C0" if fw == "aligntk" else "C1")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=("sft", "dpo", "grpo"), default="sft")
    parser.add_argument("--reference", choices=tuple(REFERENCE), default="default",
                        help="dpo: default (aligntk cached, TRL live), cached (both precompute) or live (both live)")
    parser.add_argument("--checkpointing", choices=tuple(CHECKPOINTING), default="default",
                        help="gradient checkpointing: default (aligntk off, TRL on: each side's default), off, on")
    parser.add_argument("--beta", type=float, default=None, help="the KL coefficient (default: 0.1 dpo, 0.04 grpo)")
    parser.add_argument("--prompts", type=int, default=4, help="grpo: prompts per step")
    parser.add_argument("--num-generations", type=int, default=8, help="grpo: completions per prompt (the group)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="grpo: longest completion, in tokens")
    parser.add_argument("--generation", choices=("transformers", "vllm"), default="transformers",
                        help="grpo: the sampler of both sides (vllm: once aligntk's rollout has one, see grpo.py)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--min-len", type=int, default=128, help="shortest sequence, in tokens")
    parser.add_argument("--max-len", type=int, default=250, help="longest sequence, in tokens")
    parser.add_argument("--rows", type=int, default=None,
                        help="rows in the file (default: 512 for sft; steps x batch size, one epoch, for dpo)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=0,
                        help="0: the 50-token character tokenizer; N: a word-level tokenizer of N tokens")
    parser.add_argument("--lr", type=float, default=None, help="default: 1e-3 for sft and grpo, 1e-4 for dpo")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="cpu: torch threads per run (default: all cores)")
    parser.add_argument("--profile", action="store_true",
                        help="torch.profiler over the timed steps of each run: profile_<framework>.txt")
    parser.add_argument("--py-spy", action="store_true",
                        help="grpo: py-spy over the timed steps of each run: pyspy_<framework>.txt (samples by category)")
    parser.add_argument("--liger", action="store_true",
                        help="TRL side with use_liger_kernel=True (needs CUDA and the liger-kernel package)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="default: benchmarks/peers/results (sft), results/dpo or results/grpo")
    parser.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser


def _run_all(args: argparse.Namespace, work: Path, spec: dict) -> dict[str, list[dict]]:
    """Alternate fresh worker processes; copy profiles, if any, to ``args.out``."""
    (work / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    runs: dict[str, list[dict]] = {fw: [] for fw in FRAMEWORKS}
    unit = {"dpo": "pairs", "grpo": "completions"}.get(args.method, "rows")
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
            print(f"repeat {r + 1} {fw:7s}: {res['tokens_per_s']:8.0f} tok/s ({res['pairs_per_s']:.2f} {unit}/s)  "
                  f"peak memory {res['peak_memory'] / 2**20:6.0f} MiB  "
                  + (f"reward {res['rewards'][0]:.3f} -> {res['rewards'][-1]:.3f}" if "rewards" in res else
                     f"loss {res['losses'][0]:.4f} -> {res['losses'][-1]:.4f}"), flush=True)
    if args.profile:
        for fw in FRAMEWORKS:
            (args.out / f"profile_{fw}.txt").write_text((work / f"profile_{fw}.txt").read_text())
    return runs


def main() -> None:
    parser = _parser()
    args = parser.parse_args()
    if args.worker:
        run_worker(args.worker, args.spec, args.result)
        return
    dpo = args.method == "dpo"
    args.beta = args.beta if args.beta is not None else BETA[args.method]
    if args.method == "grpo":
        import grpo

        args.lr = args.lr or 1e-3
        args.out = args.out or HERE / "results" / "grpo"
        if not 0 < args.warmup < args.steps:
            parser.error("--warmup must be at least 1 and below --steps")
        grpo.main(args, parser)
        return
    args.rows = args.rows or (args.steps * args.batch_size if dpo else 512)
    args.lr = args.lr or (1e-4 if dpo else 1e-3)
    args.out = args.out or (HERE / "results" / "dpo" if dpo else HERE / "results")
    if not 0 < args.warmup < args.steps:
        parser.error("--warmup must be at least 1 and below --steps")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available")
    if args.liger:
        import importlib.util

        if args.device != "cuda" or importlib.util.find_spec("liger_kernel") is None:
            parser.error("--liger: Liger's kernels need --device cuda and pip install liger-kernel")
    threads = args.threads or os.cpu_count() or 1
    args.out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shared = prepare(work, args)
        spec = {"work": str(work), "method": args.method, "reference": args.reference,
                "checkpointing": args.checkpointing, "beta": args.beta,
                "seed": args.seed, "steps": args.steps, "warmup": args.warmup, "batch_size": args.batch_size,
                "max_length": args.max_length, "lr": args.lr, "precision": args.precision, "device": args.device,
                "threads": threads, "profile": args.profile, "step_tokens": shared["step_tokens"],
                "liger": args.liger}
        runs = _run_all(args, work, spec)
    write_results(args, parser, shared, runs, threads)


def write_results(args: argparse.Namespace, parser: argparse.ArgumentParser, shared: dict,
                  runs: dict[str, list[dict]], threads: int) -> None:
    import torch
    import transformers
    import trl

    dpo, cuda = args.method == "dpo", args.device == "cuda"
    a, t = runs["aligntk"], runs["trl"]
    tps_ratio = [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(a, t)]
    cpu_ratio = [x["tokens_per_cpu_s"] / y["tokens_per_cpu_s"] for x, y in zip(a, t)]
    mem_ratio = [x["peak_memory"] / y["peak_memory"] for x, y in zip(a, t)]
    growth = {fw: [max(0, x["peak_rss"] - x["rss_after_imports"]) for x in runs[fw]] for fw in FRAMEWORKS}
    growth_ratio = [ga / gt if gt else float("nan") for ga, gt in zip(growth["aligntk"], growth["trl"])]
    gaps = [abs(la - lt) for x, y in zip(a, t) for la, lt in zip(x["losses"], y["losses"])]
    max_gap = max(gaps)
    hidden_args = ("worker", "spec", "result")
    command = ("python benchmarks/peers/run.py " + " ".join(
        f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items()
        if k not in hidden_args and v not in (None, False) and v != parser.get_default(k)
        and not (k == "beta" and v == BETA[args.method])
    )).strip()
    what = "DPO" if dpo else "SFT"
    peer = "DPOTrainer" if dpo else "SFTTrainer"
    mem_name = "peak CUDA memory allocated" if cuda else "peak RSS"
    reference = ""
    if dpo:
        ours, precompute = REFERENCE[args.reference]
        reference = (f"reference `{args.reference}`: aligntk `reference: {ours}`, TRL "
                     f"`precompute_ref_log_probs={precompute}`; beta {args.beta}, sigmoid loss")
    ours_ckpt, trl_ckpt = CHECKPOINTING[args.checkpointing]
    checkpointing = (f"gradient checkpointing `{args.checkpointing}`: aligntk {'on' if ours_ckpt else 'off'}, "
                     f"TRL {'on' if trl_ckpt else 'off'}")
    summary = {
        "command": command,
        "method": args.method,
        "reference": reference or None,
        "checkpointing": checkpointing,
        "device": a[0]["device_name"] + ("" if cuda else " per run"),
        "trl_use_liger_kernel": args.liger,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in hidden_args},
        "model": {"parameters": shared["parameters"], "config": shared["model_config"]},
        "row_tokens": shared["row_tokens"],
        "memory": "torch.cuda.max_memory_allocated" if cuda else "ru_maxrss",
        "tokens_per_s": {fw: [x["tokens_per_s"] for x in runs[fw]] for fw in FRAMEWORKS},
        "tokens_per_cpu_s": {fw: [x["tokens_per_cpu_s"] for x in runs[fw]] for fw in FRAMEWORKS},
        "load_average": {fw: [x["load_average"] for x in runs[fw]] for fw in FRAMEWORKS},
        "pairs_per_s" if dpo else "rows_per_s": {fw: [x["pairs_per_s"] for x in runs[fw]] for fw in FRAMEWORKS},
        "to_first_step_s": {fw: [x["to_first_step_s"] for x in runs[fw]] for fw in FRAMEWORKS},
        "peak_memory_bytes": {fw: [x["peak_memory"] for x in runs[fw]] for fw in FRAMEWORKS},
        "rss_growth_bytes": growth,
        "ratio_tokens_per_s": _stats(tps_ratio),
        "ratio_tokens_per_cpu_s": _stats(cpu_ratio),
        "ratio_peak_memory": _stats(mem_ratio),
        "ratio_rss_growth": _stats(growth_ratio),
        "first_loss": {fw: [x["losses"][0] for x in runs[fw]] for fw in FRAMEWORKS},
        "last_loss": {fw: [x["losses"][-1] for x in runs[fw]] for fw in FRAMEWORKS},
        "max_abs_loss_gap": max_gap,
        "losses": {fw: [x["losses"] for x in runs[fw]] for fw in FRAMEWORKS},
    }
    (args.out / "results.json").write_text(json.dumps(summary, indent=2))
    vocab = shared["model_config"]["vocab_size"]
    _plot(args.out / "loss_curves.png", runs,
          f"{what}, {shared['parameters'] / 1e6:.1f}M-param Llama, batch {args.batch_size}, {args.precision}",
          "DPO loss (mean over pairs)" if dpo else "train loss (completion tokens)")
    mib = 2**20
    table = "".join(
        f"| {i + 1} | {x['tokens_per_s']:.0f} | {y['tokens_per_s']:.0f} | {x['tokens_per_s'] / y['tokens_per_s']:.3f} "
        f"| {x['peak_memory'] / mib:.0f} | {y['peak_memory'] / mib:.0f} | {x['peak_memory'] / y['peak_memory']:.3f} "
        f"| {x['to_first_step_s']:.1f} / {y['to_first_step_s']:.1f} "
        f"| {x['tokens_per_cpu_s'] / y['tokens_per_cpu_s']:.3f} | {x['load_average']:.1f} / {y['load_average']:.1f} "
        f"| {x['losses'][0]:.4f} / {y['losses'][0]:.4f} | {x['losses'][-1]:.4f} / {y['losses'][-1]:.4f} |\n"
        for i, (x, y) in enumerate(zip(a, t))
    )
    curve = " ".join(f"{la:.4f}/{lt:.4f}" for la, lt in zip(a[0]["losses"], t[0]["losses"]))
    fmt = lambda s: f"{s['min']:.3f} / {s['median']:.3f} / {s['max']:.3f}"  # noqa: E731
    growth_line = ("" if cuda else
                   f"- RSS growth over the process after imports (model, data, training): "
                   f"{fmt(summary['ratio_rss_growth'])}\n")
    tokenizer = f"character vocabulary of {vocab}" if args.vocab == 0 else f"word-level vocabulary of {vocab}"
    (args.out / "results.md").write_text(
        f"# Peers: aligntk {what} vs TRL {peer}\n\n"
        f"Command: `{command}`  \n"
        f"Device: {summary['device']}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"trl {trl.__version__}.  \n"
        f"Model: Llama, {shared['parameters'] / 1e6:.2f}M parameters (hidden {args.hidden}, {args.layers} layers, "
        f"{tokenizer}), {args.precision}; batch {args.batch_size}"
        f"{' pairs' if dpo else ''}, sequences of {shared['row_tokens']['min']}-{shared['row_tokens']['max']} tokens "
        f"(max length {args.max_length}); {args.rows} rows; lr {args.lr:g}; {args.steps} steps, the first "
        f"{args.warmup} untimed; each run in a fresh process, alternating.  \n"
        + (f"DPO {reference}.  \n" if dpo else "") + f"{checkpointing[0].upper()}{checkpointing[1:]}.  \n"
        + "\n| repeat | aligntk tok/s | TRL tok/s | ratio | aligntk " + mem_name + " MiB | TRL " + mem_name
        + " MiB | ratio | load + first step s, aligntk / TRL | tokens per CPU-second ratio | 1-min load average "
        "at the end, aligntk / TRL | first loss aligntk / TRL | last loss aligntk / TRL |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n" + table +
        "\naligntk / TRL, min / median / max over repeats:\n\n"
        f"- tokens/s (non-pad{', chosen + rejected' if dpo else ''}): {fmt(summary['ratio_tokens_per_s'])} "
        "(above 1: aligntk faster)\n"
        f"- tokens per CPU-second of the process (all threads): {fmt(summary['ratio_tokens_per_cpu_s'])} "
        "(less sensitive than wall time to other load on a shared machine)\n"
        f"- {mem_name}: {fmt(summary['ratio_peak_memory'])} (below 1: aligntk smaller)\n" + growth_line +
        f"\nLargest per-step loss gap between the two over all repeats: {max_gap:.2e}. "
        f"Loss curves: `loss_curves.png`; repeat 1, aligntk/TRL per step: {curve}\n"
    )
    print(f"tokens/s ratio aligntk/TRL median {summary['ratio_tokens_per_s']['median']:.3f}; "
          f"{mem_name} ratio median {summary['ratio_peak_memory']['median']:.3f}; max loss gap {max_gap:.2e}")


if __name__ == "__main__":
    main()
