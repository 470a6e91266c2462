"""Peers, GRPO: aligntk's ``grpo`` loss on ``rollout`` data against TRL's ``GRPOTrainer``.

``run.py --method grpo`` lands here. Both sides start from one saved Llama and sample
``--num-generations`` completions for each of ``--prompts`` prompts per optimizer step
(TRL: ``per_device_train_batch_size = prompts x num_generations``, one generation per
step), at most ``--max-new-tokens`` tokens each, with transformers' ``generate``; both
score them with :func:`addition_reward` (a plain function for TRL, the same function
registered as the aligntk reward ``peers_addition`` by :func:`reward_plugin`), and
both run the reference model (``beta > 0``) but not the old-policy forward (one iteration).

Measured per run, over the timed steps: sampled tokens/s (completion tokens, EOS
included), trained tokens/s (prompt + completion tokens of the trained rows), seconds
per step, and how much of it is spent inside ``generate`` (the same wrapper around
``GenerationMixin.generate`` on both sides); the reward per step of each side.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: --generation vllm: the ``rollout`` data options that select aligntk's vLLM sampler (colocated,
#: TRL's truncated importance-sampling correction at its defaults); TRL's side runs
#: ``use_vllm=True``, ``vllm_mode="colocate"``. Needs a GPU: TRL's weight push fails on vLLM's CPU
#: backend (``'Parameter' object has no attribute 'weight_loader'``).
ALIGNTK_VLLM_OPTIONS: dict[str, Any] | None = {"generator": {"name": "vllm"}}


# --------------------------------------------------------------------------------------
# The task and its reward (the same function on both sides)
# --------------------------------------------------------------------------------------


def addition_reward(prompts: Sequence[str], completions: Sequence[str], **kwargs: Any) -> list[float]:
    """Per completion of ``"a+b="``, in [0, 1]: half for writing digits, half for the right ones in place.

    ``0.5 * (share of the completion's characters that are digits) + 0.5 * (characters equal
    to the sum's, in place, over the longer of the two)``, ends stripped: ``"57"`` for
    ``"23+34="`` scores 1.0, ``"58"`` 0.75, ``"5a"`` 0.5, ``""`` 0. A random policy over
    the 44-character vocabulary earns about 0.1, so both curves can climb from the start.
    TRL calls it with keyword arguments and its extra columns; aligntk's reward passes the
    two lists.
    """
    scores = []
    for prompt, completion in zip(prompts, completions):
        a, b = prompt.rstrip("=").split("+")
        answer, text = str(int(a) + int(b)), completion.strip()
        digits = sum(ch.isdigit() for ch in text) / len(text) if text else 0.0
        right = sum(x == y for x, y in zip(text, answer)) / max(len(text), len(answer))
        scores.append(0.5 * digits + 0.5 * right)
    return scores


def reward_plugin() -> object:
    """A plugin registering :func:`addition_reward` as the aligntk reward ``peers_addition``.

    Made on call, so that the driver and TRL's workers need not import aligntk.
    """
    import torch

    import aligntk
    from aligntk import ComponentConfig

    class AdditionConfig(ComponentConfig):
        """No options."""

    class Addition:
        """``addition_reward`` as a reward component (scores ``[N]``)."""

        Config = AdditionConfig

        def __init__(self, config: AdditionConfig):
            self.config = config

        def __call__(self, prompts: Sequence[str], completions: Sequence[str], **fields: Any) -> torch.Tensor:
            return torch.tensor(addition_reward(prompts, completions))

    class PeersReward:
        @aligntk.hookimpl
        def aligntk_register_rewards(self, register: Any) -> None:
            register("peers_addition", Addition)

    return PeersReward()


def make_prompts(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` rows ``{"prompt": "a+b=", "completion": "a+b"}`` with ``a, b < 50`` (aligntk.testing's task)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(50), rng.randrange(50)
        rows.append({"prompt": f"{a}+{b}=", "completion": str(a + b)})
    return rows


# --------------------------------------------------------------------------------------
# Shared inputs
# --------------------------------------------------------------------------------------


def prepare(work: Path, args: argparse.Namespace) -> dict:
    """Save the tokenizer + initial model, the prompts, and TRL's prompts in aligntk's order."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from aligntk.engine import global_batch_indices
    from aligntk.testing import char_tokenizer
    from common import llama_config

    tokenizer = char_tokenizer("0123456789+=")
    config = llama_config(tokenizer, args.hidden, args.layers, args.max_length)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    rows = make_prompts(args.rows, args.seed)
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    order = [i for s in range(args.steps) for i in global_batch_indices(s, len(rows), args.prompts, args.seed)]
    (work / "trl_prompts.jsonl").write_text("".join(json.dumps({"prompt": rows[i]["prompt"]}) + "\n" for i in order))
    lengths = [len(tokenizer(r["prompt"])["input_ids"]) for r in rows]
    if max(lengths) + args.max_new_tokens > args.max_length:
        raise SystemExit(f"prompts of {max(lengths)} tokens + --max-new-tokens > --max-length {args.max_length}")
    return {"model_config": config, "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": len(tokenizer), "prompt_tokens": {"min": min(lengths), "max": max(lengths)}}


# --------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------


class GenerateTimer:
    """Wall and process CPU time spent inside ``GenerationMixin.generate`` (the same wrapper on both sides)."""

    def __init__(self) -> None:
        from transformers.generation.utils import GenerationMixin

        self.calls: list[float] = []
        self.cpu: list[float] = []
        original = GenerationMixin.generate

        def timed(model: Any, *args: Any, **kwargs: Any) -> Any:
            start, cpu = time.perf_counter(), time.process_time()
            try:
                return original(model, *args, **kwargs)
            finally:
                self.calls.append(time.perf_counter() - start)
                self.cpu.append(time.process_time() - cpu)

        GenerationMixin.generate = timed


class PySpy:
    """``py-spy record`` of this very process over the timed steps (``--py-spy``): raw stacks to ``path``."""

    def __init__(self, path: Path, rate: int = 100):
        self.path, self.rate, self.proc = path, rate, None

    def start(self) -> None:
        import subprocess

        cmd = ["py-spy", "record", "--pid", str(os.getpid()), "--format", "raw", "--rate", str(self.rate),
               "--nonblocking", "-o", str(self.path)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # attached before the first timed step starts

    def stop(self) -> None:
        import signal

        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its samples and exits
            self.proc.wait(timeout=120)
            self.proc = None


#: py-spy categories, in order: (name, frames one of which a stack must contain, and, if not
#: empty, frames one of which it must also contain). The first that matches wins.
SPY_CATEGORIES: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("generate", ("generate (transformers/generation/utils.py",), ()),
    ("reward", ("addition_reward (",), ()),
    ("reference forward", ("policy_forward (", "_get_per_token_logps_and_entropies ("),
     ("RolloutData.rollout (", "_generate_and_score_completions (")),
    ("rollout bookkeeping (tokens, decode, collate, advantages)",
     ("RolloutData.rollout (", "OnlineBatches.micro_batches (", "_generate_and_score_completions (",
      "GRPOTrainer._prepare_inputs ("), ()),
    ("optimizer step + clipping", ("AdamW.step", "Optimizer.step", "_optimizer_step (", "clip_grad_norm_",
                                   "_unscale_and_clip ("), ()),
    ("backward", ("backward (torch/_tensor.py", "Accelerator.backward ("), ()),
    ("policy forward + loss", ("GRPOLoss.__call__ (", "GRPOTrainer.compute_loss ("), ()),
)


def summarize_pyspy(raw: Path) -> dict[str, Any]:
    """Samples of a raw py-spy file by category (``SPY_CATEGORIES``) and the top self-time functions."""
    import collections

    by_category: collections.Counter[str] = collections.Counter()
    self_time: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        category = "other (trainer loop, logging, data loader)"
        for name, needles, within in SPY_CATEGORIES:
            has = lambda keys: any(k in frame for frame in frames for k in keys)  # noqa: E731
            if has(needles) and (not within or has(within)):
                category = name
                break
        by_category[category] += n
        self_time[frames[-1]] += n
    return {"samples": total, "categories": dict(by_category.most_common()), "top_self": self_time.most_common(25)}


def worker_aligntk(spec: dict, out: Path, clock: Any) -> dict:
    from aligntk.testing import read_metrics, run_recipe

    from common import aligntk_timer
    from run import CHECKPOINTING

    data = {"name": "rollout", "path": spec["work"] + "/prompts.jsonl", "num_generations": spec["num_generations"],
            "max_new_tokens": spec["max_new_tokens"], "temperature": 1.0, "top_p": 1.0, "iterations": 1,
            "advantage": {"name": "group", "scale": "group"}}
    if spec["generation"] == "vllm":
        data.update(ALIGNTK_VLLM_OPTIONS or {})
    recipe = {
        "output_dir": str(out / "run"),
        "seed": spec["seed"],
        "model": {"path": spec["work"] + "/model"},
        "data": data,
        "rewards": [{"name": "peers_addition"}],
        # TRL's loss_type "dapo" is aligntk's token aggregation; TRL's use_bias_correction_kl default (true)
        "loss": {"name": "grpo", "beta": spec["beta"], "kl": "k3", "epsilon": 0.2, "aggregation": "token",
                 "kl_bias_correction": True},
        "update": {"name": "full", "learning_rate": spec["lr"], "warmup_steps": 0, "schedule": "constant",
                   "weight_decay": 0.0, "max_grad_norm": 1.0, "betas": [0.9, 0.999], "eps": 1e-8},
        "train": {"max_steps": spec["steps"], "batch_size": spec["prompts"], "precision": "fp32", "log_every": 1,
                  "device": spec["device"], "gradient_checkpointing": CHECKPOINTING[spec["checkpointing"]][0]},
    }
    clock.start = time.perf_counter()
    result = run_recipe(recipe, plugins={"peers_timer": aligntk_timer(clock), "peers_reward": reward_plugin()}, overwrite=True)
    records = read_metrics(result.run_dir)
    rows = spec["prompts"] * spec["num_generations"]
    return {"rewards": [r["reward"] for r in records], "losses": [r["loss"] for r in records],
            "sampled": [r["completion_length"] * rows for r in records],
            "trained": [r["tokens"] for r in records]}


def worker_trl(spec: dict, out: Path, clock: Any) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from common import trl_callback
    from run import CHECKPOINTING

    records: list[dict] = []

    def keep_record(logs: dict) -> None:
        if "reward" in logs:
            records.append(dict(logs))

    clock.start = time.perf_counter()
    work = Path(spec["work"])
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model")
    data = datasets.load_dataset("json", data_files=str(work / "trl_prompts.jsonl"), split="train",
                                 cache_dir=str(out / "hf_cache"))
    rows = spec["prompts"] * spec["num_generations"]
    cuda = spec["device"] == "cuda"
    vllm = {"use_vllm": True, "vllm_mode": "colocate"} if spec["generation"] == "vllm" else {}
    config = GRPOConfig(
        output_dir=str(out / "trl"),
        use_cpu=not cuda,
        per_device_train_batch_size=rows,  # TRL counts completions
        gradient_accumulation_steps=1,  # with the default steps_per_generation: one generation per step
        num_generations=spec["num_generations"],
        max_completion_length=spec["max_new_tokens"],
        temperature=1.0,
        top_p=1.0,
        num_iterations=1,
        beta=spec["beta"],
        epsilon=0.2,
        loss_type="dapo",
        scale_rewards="group",
        use_bias_correction_kl=True,
        shuffle_dataset=False,  # rows are already in aligntk's prompt order
        max_steps=spec["steps"],
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        gradient_checkpointing=CHECKPOINTING[spec["checkpointing"]][1],
        bf16=False,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=spec["seed"],
        **vllm,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=addition_reward, args=config, train_dataset=data,
                          processing_class=tokenizer, callbacks=[trl_callback(clock, keep_record)])
    trainer.train()
    previous, trained = 0.0, []
    for record in records:  # num_tokens is the running count of prompt + completion tokens
        trained.append(record["num_tokens"] - previous)
        previous = record["num_tokens"]
    return {"rewards": [r["reward"] for r in records], "losses": [r["loss"] for r in records],
            "sampled": [r["completions/mean_length"] * rows for r in records], "trained": trained}


def run_worker(framework: str, spec: dict, result_path: Path) -> None:
    """One run in this process: train, then write the result JSON (``run.py --worker`` calls it)."""
    import importlib
    import resource

    import torch

    from common import device_name, peak_rss, rss_now
    from run import StepClock, _profiler

    class Clock(StepClock):
        """run.py's step clock, also running py-spy (``--py-spy``) over the timed steps."""

        def __init__(self, spec: dict, profiler: object | None):
            super().__init__(spec, profiler)
            self.usage: list[Any] = []  # getrusage at the end of the warm-up and of the last step

        def tick(self) -> None:
            super().tick()
            if len(self.ends) in (self.warmup, self.steps):
                self.usage.append(resource.getrusage(resource.RUSAGE_SELF))
            if spy is not None and len(self.ends) == self.warmup:
                spy.start()
            if spy is not None and len(self.ends) == self.steps:
                spy.stop()

    for module in ("aligntk.engine",) if framework == "aligntk" else ("datasets", "transformers", "trl"):
        importlib.import_module(module)
    if spec["device"] == "cpu":
        torch.set_num_threads(spec["threads"])
    else:
        torch.cuda.reset_peak_memory_stats()
    out = result_path.parent / result_path.stem
    out.mkdir(parents=True, exist_ok=True)
    rss_before = rss_now()
    generate = GenerateTimer()
    profiler = _profiler(spec["device"]) if spec["profile"] else None
    spy = PySpy(result_path.parent / f"pyspy_{framework}.raw") if spec["py_spy"] else None
    clock = Clock(spec, profiler)
    res = (worker_aligntk if framework == "aligntk" else worker_trl)(spec, out, clock)
    warm, ends, steps = spec["warmup"], clock.ends, spec["steps"]
    if len(ends) != steps or len(res["rewards"]) != steps or len(generate.calls) != steps:
        raise SystemExit(f"{framework}: {len(ends)} step ends, {len(res['rewards'])} logged steps and "
                         f"{len(generate.calls)} generate calls for {steps} steps")
    if profiler is not None:
        table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60)
        (result_path.parent / f"profile_{framework}.txt").write_text(
            f"{framework}, grpo, steps {warm + 1}-{steps}, wall {ends[-1] - ends[warm - 1]:.3f} s\n" + table)
    if spy is not None:
        summary = summarize_pyspy(spy.path)
        lines = [f"{framework}, grpo, py-spy over steps {warm + 1}-{steps}: {summary['samples']} samples", "",
                 "category | samples | share", "---|---|---"]
        lines += [f"{k} | {v} | {v / max(summary['samples'], 1):.1%}" for k, v in summary["categories"].items()]
        lines += ["", "top functions by own samples:"] + [f"{v:6d}  {k}" for k, v in summary["top_self"]]
        (result_path.parent / f"pyspy_{framework}.txt").write_text("\n".join(lines) + "\n")
    wall = ends[-1] - ends[warm - 1]
    cpu = clock.cpu[-1] - clock.cpu[warm - 1]
    timed = steps - warm
    sampled, trained = sum(res["sampled"][warm:]), sum(res["trained"][warm:])
    generate_s, generate_cpu = sum(generate.calls[warm:]), sum(generate.cpu[warm:])
    cuda = spec["device"] == "cuda"
    result_path.write_text(json.dumps({
        "framework": framework,
        "device_name": device_name(spec["device"], spec["threads"]),
        "sampled_tokens_per_s": sampled / wall,
        "trained_tokens_per_s": trained / wall,
        "tokens_per_s": trained / wall,  # run.py's progress line
        "pairs_per_s": spec["prompts"] * spec["num_generations"] * timed / wall,  # completions/s
        "s_per_step": wall / timed,
        "generate_s_per_step": generate_s / timed,
        "rest_s_per_step": (wall - generate_s) / timed,
        "cpu_s_per_step": cpu / timed,
        "generate_cpu_s_per_step": generate_cpu / timed,
        "rest_cpu_s_per_step": (cpu - generate_cpu) / timed,
        "trained_tokens_per_cpu_s": trained / cpu,
        "sampled_tokens_per_cpu_s": sampled / cpu,
        "timed_wall_s": wall,
        "timed_cpu_s": cpu,
        "to_first_step_s": ends[0] - clock.start,
        "peak_memory": torch.cuda.max_memory_allocated() if cuda else peak_rss(),
        "peak_rss": peak_rss(),
        "rss_after_imports": rss_before,
        "load_average": os.getloadavg()[0],
        # over the timed steps: waits for a core (involuntary switches) against blocking (voluntary)
        "involuntary_switches": clock.usage[1].ru_nivcsw - clock.usage[0].ru_nivcsw,
        "voluntary_switches": clock.usage[1].ru_nvcsw - clock.usage[0].ru_nvcsw,
        "major_faults": clock.usage[1].ru_majflt - clock.usage[0].ru_majflt,
        "rewards": res["rewards"],
        "losses": res["losses"],
        "sampled_tokens": res["sampled"],
        "trained_tokens": res["trained"],
    }))


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------

RATIOS = (  # (key, label, aligntk/TRL above 1 is better?)
    ("sampled_tokens_per_s", "sampled tokens/s (completion tokens, EOS included)", True),
    ("trained_tokens_per_s", "trained tokens/s (prompt + completion, non-pad)", True),
    ("s_per_step", "seconds per step", False),
    ("generate_s_per_step", "seconds per step inside generate", False),
    ("rest_s_per_step", "seconds per step outside generate (reward, reference, forward + backward, update)", False),
    ("sampled_tokens_per_cpu_s", "sampled tokens per CPU-second (the process, all threads)", True),
    ("trained_tokens_per_cpu_s", "trained tokens per CPU-second", True),
    ("cpu_s_per_step", "CPU seconds per step (the process, all threads)", False),
    ("generate_cpu_s_per_step", "CPU seconds per step inside generate", False),
    ("rest_cpu_s_per_step", "CPU seconds per step outside generate", False),
    ("peak_memory", "peak memory", False),
)


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """``run.py --method grpo``: prepare, alternate fresh worker processes, write the results."""
    import tempfile

    from run import _run_all

    if args.generation == "vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None or args.device != "cuda":
            parser.error("--generation vllm needs --device cuda and vllm installed (pip install -e '.[vllm]')")
    if args.num_generations < 2:
        parser.error("--num-generations must be at least 2 (TRL's GRPOTrainer refuses 1)")
    args.rows = args.rows or args.steps * args.prompts
    threads = args.threads or os.cpu_count() or 1
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shared = prepare(work, args)
        spec = {"work": str(work), "method": "grpo", "checkpointing": args.checkpointing, "beta": args.beta,
                "seed": args.seed, "steps": args.steps, "warmup": args.warmup, "prompts": args.prompts,
                "num_generations": args.num_generations, "max_new_tokens": args.max_new_tokens,
                "max_length": args.max_length, "lr": args.lr, "device": args.device, "threads": threads,
                "profile": args.profile, "py_spy": args.py_spy, "generation": args.generation}
        runs = _run_all(args, work, spec)
        if args.py_spy:
            for fw in ("aligntk", "trl"):
                (args.out / f"pyspy_{fw}.txt").write_text((work / f"pyspy_{fw}.txt").read_text())
    write_results(args, parser, shared, runs)


def _stats(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _plot(path: Path, runs: dict[str, list[dict]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, fw, color in zip(axes, ("aligntk", "trl"), ("C0", "C1")):
        for i, run in enumerate(runs[fw]):
            ax.plot(range(1, len(run["rewards"]) + 1), run["rewards"], color=color, alpha=0.4 + 0.6 / (i + 1),
                    label=f"repeat {i + 1}")
        ax.set_title(f"{fw}: mean reward per step", fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("addition_reward (mean over completions)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(args: argparse.Namespace, parser: argparse.ArgumentParser, shared: dict,
                  runs: dict[str, list[dict]]) -> None:
    import torch
    import transformers
    import trl

    from run import BETA, CHECKPOINTING

    a, t = runs["aligntk"], runs["trl"]
    ratios = {key: _stats([x[key] / y[key] for x, y in zip(a, t)]) for key, _, _ in RATIOS}
    hidden = ("worker", "spec", "result")
    command = ("python benchmarks/peers/run.py " + " ".join(
        f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items()
        if k not in hidden and v not in (None, False) and v != parser.get_default(k)
        and not (k == "beta" and v == BETA["grpo"])
    )).strip()
    ours, theirs = CHECKPOINTING[args.checkpointing]
    checkpointing = (f"gradient checkpointing `{args.checkpointing}`: aligntk {'on' if ours else 'off'}, "
                     f"TRL {'on' if theirs else 'off'}")
    rows = args.prompts * args.num_generations
    finite = all(math.isfinite(r) and 0 <= r <= 1 for run in a + t for r in run["rewards"])
    summary = {
        "command": command,
        "method": "grpo",
        "generation": args.generation,
        "checkpointing": checkpointing,
        "device": a[0]["device_name"] + ("" if args.device == "cuda" else " per run"),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in hidden},
        "model": {"parameters": shared["parameters"], "config": shared["model_config"]},
        "completions_per_step": rows,
        "memory": "torch.cuda.max_memory_allocated" if args.device == "cuda" else "ru_maxrss",
        **{key: {fw: [x[key] for x in runs[fw]] for fw in runs} for key, _, _ in RATIOS},
        "to_first_step_s": {fw: [x["to_first_step_s"] for x in runs[fw]] for fw in runs},
        "load_average": {fw: [x["load_average"] for x in runs[fw]] for fw in runs},
        **{k: {fw: [x[k] for x in runs[fw]] for fw in runs}
           for k in ("involuntary_switches", "voluntary_switches", "major_faults", "timed_wall_s", "timed_cpu_s")},
        "ratios": ratios,
        "rewards_in_unit_interval": finite,
        "rewards": {fw: [x["rewards"] for x in runs[fw]] for fw in runs},
        "losses": {fw: [x["losses"] for x in runs[fw]] for fw in runs},
        "sampled_tokens": {fw: [x["sampled_tokens"] for x in runs[fw]] for fw in runs},
        "trained_tokens": {fw: [x["trained_tokens"] for x in runs[fw]] for fw in runs},
    }
    (args.out / "results.json").write_text(json.dumps(summary, indent=2))
    _plot(args.out / "reward_curves.png", runs,
          f"GRPO, {shared['parameters'] / 1e6:.2f}M-param Llama, {args.prompts} prompts x {args.num_generations} "
          f"completions, <= {args.max_new_tokens} new tokens, lr {args.lr:g}")
    mib = 2**20
    per_run = "".join(
        f"| {i + 1} | {x['sampled_tokens_per_s']:.0f} / {y['sampled_tokens_per_s']:.0f} "
        f"| {x['trained_tokens_per_s']:.0f} / {y['trained_tokens_per_s']:.0f} "
        f"| {x['s_per_step']:.3f} / {y['s_per_step']:.3f} "
        f"| {x['generate_s_per_step']:.3f} / {y['generate_s_per_step']:.3f} "
        f"| {x['peak_memory'] / mib:.0f} / {y['peak_memory'] / mib:.0f} "
        f"| {x['to_first_step_s']:.1f} / {y['to_first_step_s']:.1f} "
        f"| {x['load_average']:.1f} / {y['load_average']:.1f} "
        f"| {statistics.mean(x['rewards']):.3f} / {statistics.mean(y['rewards']):.3f} |\n"
        for i, (x, y) in enumerate(zip(a, t))
    )
    fmt = lambda s: f"{s['min']:.3f} / {s['median']:.3f} / {s['max']:.3f}"  # noqa: E731
    ratio_lines = "".join(
        f"| {label} | {fmt(ratios[key])} | {'above' if up else 'below'} 1 |\n" for key, label, up in RATIOS
    )
    curve = " ".join(f"{ra:.3f}/{rt:.3f}" for ra, rt in zip(a[0]["rewards"], t[0]["rewards"]))
    (args.out / "results.md").write_text(
        "# Peers: aligntk GRPO vs TRL GRPOTrainer\n\n"
        f"Command: `{command}`  \n"
        f"Device: {summary['device']}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"trl {trl.__version__}.  \n"
        f"Model: Llama, {shared['parameters'] / 1e6:.2f}M parameters (hidden {args.hidden}, {args.layers} layers, "
        f"character vocabulary of {shared['vocab_size']}), fp32, random init.  \n"
        f"Task: {args.rows} addition prompts `a+b=` ({shared['prompt_tokens']['min']}-{shared['prompt_tokens']['max']} "
        f"tokens), reward `addition_reward` (half for digits, half for the sum's digits in place).  \n"
        f"Per step: {args.prompts} prompts x {args.num_generations} completions = {rows} rows (TRL "
        f"per_device_train_batch_size {rows}), at most {args.max_new_tokens} new tokens, temperature 1, "
        f"{args.generation} generation; grpo: beta {args.beta} (k3, TRL's bias-corrected KL), epsilon 0.2, "
        "token aggregation (TRL dapo), group-scaled advantages, one iteration; AdamW lr "
        f"{args.lr:g} constant, clip 1.0. {checkpointing[0].upper()}{checkpointing[1:]}.  \n"
        f"{args.steps} steps, the first {args.warmup} untimed; each run in a fresh process, alternating.\n\n"
        "| repeat | sampled tok/s, aligntk / TRL | trained tok/s | s/step | s/step in generate | peak memory MiB "
        "| load + first step s | 1-min load at the end | mean reward |\n"
        "|---|---|---|---|---|---|---|---|---|\n" + per_run +
        "\n| aligntk / TRL | min / median / max | better when |\n|---|---|---|\n" + ratio_lines +
        f"\nRewards are finite and in [0, 1]: {finite}. Reward curves: `reward_curves.png` (the two sides "
        "sample with their own random streams, so the curves agree in trend, not step by step); repeat 1, "
        f"aligntk/TRL per step: {curve}\n"
    )
    print("aligntk/TRL medians: " + ", ".join(f"{k} {ratios[k]['median']:.3f}" for k, _, _ in RATIOS))
