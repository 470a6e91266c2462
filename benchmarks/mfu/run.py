"""MFU: model FLOPs utilization of aligntk's SFT engine, and of a bare PyTorch loop, on one device.

A Llama (default about 1.1B parameters: hidden 2048, 22 layers, MLP 5632, 32 heads, 4 KV
heads, the TinyLlama shape) is built from a config with random init, saved once, and
trained for ``--steps`` steps on rows of random token ids from a 32,000-token word-level
tokenizer (built in memory, no download), every row exactly ``--seq-len`` tokens (no
padding), loss on all tokens after a short prompt. Two trainers, alternating in one process:

* ``aligntk``: ``aligntk.testing.run_recipe`` with the ``sft`` data and loss, the ``full``
  update (AdamW, fused on CUDA), bf16 autocast with float32 weights.
* ``bare``: the same model, batches, AdamW (fused on CUDA), clipping, bf16 autocast and
  float32 cross-entropy in a plain ``for`` loop with one host sync per step: what the
  hardware gives with no framework around it.

FLOPs per token (PaLM, Chowdhury et al. 2022, appendix B): ``6 * N + 12 * L * H * T``, where
``N`` is the parameter count without the input embedding (a lookup, no matmul), ``L`` the
layers, ``H`` the hidden size and ``T`` the sequence length (the attention term counts the
whole T x T score matrix, not half for causal masking). ``MFU = FLOPs per token * tokens/s /
peak``, with the device's dense bf16 peak from a small table (``--peak-tflops`` overrides).
``6 * N_total`` alone is reported too.

    python benchmarks/mfu/run.py --out /tmp/mfu            # GPU, about 3 minutes on an H100
    python benchmarks/mfu/run.py --smoke --out /tmp/mfu    # tiny, CPU, seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "peers"))

from common import device_name, encode, llama_config, peak_rss, sync, word_tokenizer  # noqa: E402

#: Dense bf16 tensor-core peak, TFLOP/s, by a substring of torch.cuda.get_device_name() (first match wins).
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM (HBM3)
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("L4", 121.0),
)


def peak_tflops(name: str) -> float | None:
    return next((tf for key, tf in PEAK_BF16_TFLOPS if key in name), None)


def flops_per_token(config: dict, params: int, seq_len: int) -> dict[str, float]:
    """``6 N + 12 L H T`` (N without the input embedding) and ``6 N_total``."""
    n = params - config["vocab_size"] * config["hidden_size"]
    attention = 12 * config["num_hidden_layers"] * config["hidden_size"] * seq_len
    return {"palm": 6 * n + attention, "six_n_total": 6 * params, "attention_share": attention / (6 * n + attention)}


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


def prepare(work: Path, args: argparse.Namespace) -> dict:
    """Save the model and tokenizer; write the rows (jsonl for aligntk) and the batches (for the bare loop)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from aligntk.engine import global_batch_indices

    tokenizer = word_tokenizer(args.vocab)
    config = llama_config(tokenizer, args.hidden, args.layers, args.seq_len, intermediate=args.intermediate)
    config["num_key_value_heads"] = max(1, config["num_attention_heads"] // args.gqa)
    torch.manual_seed(args.seed)
    with torch.device(args.device):  # random init on the GPU: seconds instead of a minute
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    del model

    rng = random.Random(args.seed)
    n_words = args.vocab - 5
    rows, encoded = [], []
    for _ in range(args.batch_size * args.steps):
        # prompt: 15 words + "=" (16 tokens); completion: the rest, then EOS: exactly seq_len tokens
        words = [f"t{rng.randrange(n_words)}" for _ in range(args.seq_len - 2)]
        row = {"prompt": " ".join(words[:15]) + " =", "completion": " " + " ".join(words[15:])}
        p, c = encode(tokenizer, row["prompt"], row["completion"])
        assert len(p) + len(c) == args.seq_len, len(p) + len(c)
        rows.append(row)
        encoded.append((p, c))
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    batches = []
    for step in range(args.steps):
        chosen = [encoded[i] for i in global_batch_indices(step, len(rows), args.batch_size, args.seed)]
        ids = torch.tensor([p + c for p, c in chosen])
        labels = torch.tensor([[-100] * len(p) + c for p, c in chosen])
        batches.append((ids, labels))
    return {"config": config, "parameters": params, "batches": batches}


# --------------------------------------------------------------------------------------
# The two trainers; each returns the step-end times and the per-step losses
# --------------------------------------------------------------------------------------


def run_aligntk(work: Path, args: argparse.Namespace) -> tuple[list[float], list[float]]:
    import aligntk
    from aligntk.testing import read_metrics, run_recipe

    ends: list[float] = []

    class Timer:
        @aligntk.hookimpl
        def aligntk_on_step_end(self, run, step, metrics):  # noqa: ANN001
            sync(args.device)
            ends.append(time.perf_counter())

    recipe = {
        "output_dir": str(work / "aligntk_run"),
        "seed": args.seed,
        "model": {"path": str(work / "model")},
        "data": {"name": "sft", "path": str(work / "train.jsonl"), "max_length": args.seq_len},
        "loss": {"name": "sft"},
        "update": {"name": "full", "learning_rate": args.lr, "warmup_steps": 0, "schedule": "constant",
                   "weight_decay": 0.0, "max_grad_norm": 1.0},
        "train": {"max_steps": args.steps, "batch_size": args.batch_size, "precision": args.precision,
                  "log_every": 1, "device": args.device},
    }
    result = run_recipe(recipe, plugins={"mfu_timer": Timer()}, overwrite=True)
    return ends, [r["loss"] for r in read_metrics(result.run_dir)]


def run_bare(work: Path, args: argparse.Namespace, batches: list) -> tuple[list[float], list[float]]:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32, attn_implementation="sdpa")
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0,
                                  fused=device.type == "cuda")
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    ends, losses = [], []
    for ids, labels in batches:
        ids, labels = ids.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(input_ids=ids, use_cache=False).logits
            # float32 cross-entropy on the shifted labels, like aligntk's sft loss
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # the one host sync per step
        ends.append(time.perf_counter())
    return ends, losses


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU, a few steps (for tests)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--gqa", type=int, default=8, help="attention heads per KV head")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of each run")
    parser.add_argument("--repeats", type=int, default=2, help="alternating bare/aligntk pairs")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the device's peak bf16 TFLOP/s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    return parser


def main() -> None:
    parser = _parser()
    args = parser.parse_args()
    if args.smoke:
        args.device, args.precision = "cpu", "fp32"
        args.hidden, args.layers, args.intermediate, args.gqa, args.vocab = 64, 2, 128, 1, 512
        args.seq_len, args.batch_size, args.steps, args.warmup, args.repeats = 48, 2, 3, 1, 1
    if not 0 < args.warmup < args.steps:
        parser.error("--warmup must be at least 1 and below --steps")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (use --smoke or --device cpu)")
    name = device_name(args.device)
    peak = args.peak_tflops or (peak_tflops(name) if args.device == "cuda" else None)
    runs: dict[str, list[dict]] = {"bare": [], "aligntk": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shared = prepare(work, args)
        fpt = flops_per_token(shared["config"], shared["parameters"], args.seq_len)
        step_tokens = args.batch_size * args.seq_len
        for r in range(args.repeats):
            for who in ("bare", "aligntk") if r % 2 == 0 else ("aligntk", "bare"):
                if args.device == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                ends, losses = run_aligntk(work, args) if who == "aligntk" else run_bare(work, args, shared["batches"])
                gc.collect()
                wall = ends[-1] - ends[args.warmup - 1]
                tps = step_tokens * (args.steps - args.warmup) / wall
                run = {
                    "tokens_per_s": tps,
                    "step_s": wall / (args.steps - args.warmup),
                    "mfu": fpt["palm"] * tps / (peak * 1e12) if peak else None,
                    "mfu_6n": fpt["six_n_total"] * tps / (peak * 1e12) if peak else None,
                    "peak_memory": torch.cuda.max_memory_allocated() if args.device == "cuda" else peak_rss(),
                    "losses": losses,
                }
                runs[who].append(run)
                mfu = f"MFU {run['mfu']:.3f}" if run["mfu"] is not None else "MFU n/a (no peak for this device)"
                print(f"repeat {r + 1} {who:7s}: {tps:10.0f} tok/s  {run['step_s'] * 1e3:8.1f} ms/step  {mfu}  "
                      f"peak memory {run['peak_memory'] / 2**30:.1f} GiB  loss {losses[0]:.3f} -> {losses[-1]:.3f}",
                      flush=True)
    write_results(args, name, peak, shared, fpt, runs)


def write_results(args: argparse.Namespace, name: str, peak: float | None, shared: dict, fpt: dict,
                  runs: dict[str, list[dict]]) -> None:
    import torch
    import transformers

    med = {who: {k: statistics.median(r[k] for r in rs) if rs[0][k] is not None else None
                 for k in ("tokens_per_s", "step_s", "mfu", "mfu_6n", "peak_memory")} for who, rs in runs.items()}
    ratio = med["aligntk"]["tokens_per_s"] / med["bare"]["tokens_per_s"]
    gap = max(abs(a - b) for x, y in zip(runs["aligntk"], runs["bare"]) for a, b in zip(x["losses"], y["losses"]))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    summary = {
        "device": name,
        "peak_bf16_tflops": peak,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "settings": settings,
        "model": {"parameters": shared["parameters"], "config": shared["config"]},
        "flops_per_token": fpt,
        "median": med,
        "ratio_tokens_per_s_aligntk_over_bare": ratio,
        "max_abs_loss_gap": gap,
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(summary, indent=2))

    def pct(v: float | None) -> str:
        return f"{100 * v:.1f}%" if v is not None else "n/a"

    rows = "".join(
        f"| {who} | {m['tokens_per_s']:,.0f} | {m['step_s'] * 1e3:.1f} | {pct(m['mfu'])} | {pct(m['mfu_6n'])} "
        f"| {m['peak_memory'] / 2**30:.2f} |\n" for who, m in med.items()
    )
    c = shared["config"]
    (args.out / "results.md").write_text(
        "# MFU: aligntk SFT vs a bare PyTorch loop\n\n"
        f"Device: {name}; peak dense bf16 {peak or 'unknown'} TFLOP/s; torch {torch.__version__}, "
        f"transformers {transformers.__version__}.  \n"
        f"Model: Llama, {shared['parameters'] / 1e6:,.1f}M parameters (hidden {c['hidden_size']}, "
        f"{c['num_hidden_layers']} layers, MLP {c['intermediate_size']}, {c['num_attention_heads']} heads, "
        f"{c['num_key_value_heads']} KV heads, vocabulary {c['vocab_size']}), {args.precision} "
        f"({'autocast, ' if args.precision == 'bf16' else ''}float32 weights), AdamW; batch {args.batch_size} x {args.seq_len} tokens, {args.steps} steps, the first "
        f"{args.warmup} untimed; median of {args.repeats} alternating runs each.  \n"
        f"FLOPs per token: 6N + 12LHT = {fpt['palm'] / 1e9:.2f} GFLOP (attention {100 * fpt['attention_share']:.1f}% "
        f"of it; N without the input embedding); 6 N_total = {fpt['six_n_total'] / 1e9:.2f} GFLOP.\n\n"
        "| trainer | tokens/s | ms/step | MFU (6N + 12LHT) | MFU (6 N_total) | peak memory GiB |\n"
        "|---|---|---|---|---|---|\n" + rows +
        f"\naligntk / bare tokens/s: {ratio:.3f}. Largest per-step loss gap between the two: {gap:.2e}.\n"
    )
    print(f"aligntk/bare tokens/s {ratio:.3f}; MFU aligntk {pct(med['aligntk']['mfu'])}, bare {pct(med['bare']['mfu'])}")


if __name__ == "__main__":
    main()
