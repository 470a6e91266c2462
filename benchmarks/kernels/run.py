"""Chunked log-probs and padding-free packing: peak memory and speed, before and after.

Two measurements, each variant in a fresh process (so peak memory is its own):

* ``loss``: one forward + backward of the ``sft`` loss on a tiny Llama body with a large
  vocabulary, plain (``chunk_size: 0``, full ``[B, T, V]`` logits) against chunked
  (``aligntk.logprobs``), across vocabulary sizes and sequence lengths. A quarter of
  each row is prompt (label ``-100``), as in SFT data.
* ``packing``: forward + backward of the ``sft`` loss on variable-length rows, padded
  (``sft`` data's default collate) against packed (``packing: true``); tokens/s counts
  real tokens only.

Peak memory is the growth of the process's peak RSS over the step (CPU; it includes the
parameter gradients, allocated at the first backward, the same in every variant) or
``torch.cuda.max_memory_allocated`` above what was allocated before the step (CUDA).
Times are the median of ``--repeats`` steps after one warm-up step.

    python benchmarks/kernels/run.py                 # CPU, the sizes in results/cpu
    python benchmarks/kernels/run.py --device cuda   # writes results/cuda
    python benchmarks/kernels/run.py --smoke --out /tmp/k   # seconds, in one process
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
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent

#: The body every case uses: small, so the output layer dominates as vocabularies grow.
BODY = {
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 4096,
}
SMOKE_BODY = {**BODY, "hidden_size": 32, "intermediate_size": 64, "max_position_embeddings": 256}
#: On a GPU: a body as wide as a 1B model's, so the output layer costs what it does there.
CUDA_BODY = {**BODY, "hidden_size": 2048, "intermediate_size": 4096, "num_attention_heads": 16,
             "num_key_value_heads": 16, "max_position_embeddings": 8192}


def sizes(smoke: bool, device: str) -> dict[str, Any]:
    if smoke:
        return {"vocabs": [256], "seqs": [32], "batch": 2, "chunks": [0, 24], "pack_vocab": 256,
                "pack_batch": 4, "pack_len": 32}
    if device == "cuda":
        return {
            "vocabs": [32768, 131072, 262144],
            "seqs": [1024, 4096],
            "batch": 4,
            "chunks": [0, 1024, 4096, 16384],
            "pack_vocab": 32768,
            "pack_batch": 16,
            "pack_len": 2048,
        }
    return {
        "vocabs": [1024, 32768, 131072],
        "seqs": [256, 1024],
        "batch": 2,
        "chunks": [0, 256, 1024, 4096],
        "pack_vocab": 32768,
        "pack_batch": 8,
        "pack_len": 512,
    }


# --------------------------------------------------------------------------------------
# One case (runs in its own process)
# --------------------------------------------------------------------------------------


def _model(vocab: int, body: dict[str, Any], device: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(**body, vocab_size=vocab, pad_token_id=0)
    return AutoModelForCausalLM.from_config(config).to(device).train()


def _peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _timed_steps(step: Any, batches: list[dict[str, torch.Tensor]], repeats: int, device: str) -> dict[str, Any]:
    """One warm-up step, then ``repeats`` timed ones; peak memory growth over all of them."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _peak_bytes(device)
    times = []
    for i in range(repeats + 1):
        started = time.perf_counter()
        step(batches[i % len(batches)])
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return {
        "step_s": statistics.median(times[1:]),
        "step_s_min": min(times[1:]),
        "step_s_max": max(times[1:]),
        "peak_mib": (_peak_bytes(device) - before) / 2**20,
    }


def _sft_step(model: torch.nn.Module, chunk_size: int, bf16: bool = False) -> Any:
    from aligntk import Models
    from aligntk_sft.loss import SFTLoss

    loss = SFTLoss(SFTLoss.Config(chunk_size=chunk_size))
    models = Models({"policy": model})
    device_type = next(model.parameters()).device.type

    def step(batch: dict[str, torch.Tensor]) -> None:
        model.zero_grad(set_to_none=False)  # gradients stay allocated: not part of the difference
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            out = loss(models, batch)
        out.sum.backward()

    return step


def _random_batch(spec: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``[batch, seq]`` random tokens; the first quarter of each row is prompt (label -100)."""
    vocab, seq = spec["vocab"], spec["seq"]
    ids = torch.randint(1, vocab, (spec["batch"], seq), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, : seq // 4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(spec["device"]) for k, v in batch.items()}


def loss_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Plain or chunked SFT loss, forward + backward, on random tokens."""
    device = spec["device"]
    model = _model(spec["vocab"], spec["body"], device)
    data = _random_batch(spec)
    return _timed_steps(_sft_step(model, spec["chunk"], spec.get("bf16", False)), [data], spec["repeats"], device)


def interleaved_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Plain and chunked steps alternating in one process: a load change hits both alike."""
    device = spec["device"]
    model = _model(spec["vocab"], spec["body"], device)
    data = _random_batch(spec)
    steps = {c: _sft_step(model, c, spec.get("bf16", False)) for c in (0, spec["chunk"])}
    times: dict[int, list[float]] = {c: [] for c in steps}
    for i in range(spec["repeats"] + 1):
        for c, step in steps.items():
            started = time.perf_counter()
            step(data)
            if device == "cuda":
                torch.cuda.synchronize()
            if i > 0:
                times[c].append(time.perf_counter() - started)
    plain, chunked = (statistics.median(times[c]) for c in steps)
    ratios = [b / a for a, b in zip(times[0], times[spec["chunk"]])]
    return {"plain_s": plain, "chunked_s": chunked, "ratio": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios)}


def packing_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Padded or packed SFT micro-batches of variable-length rows (lengths uniform in [L/8, L])."""
    from aligntk_sft.data import SFTData

    device, vocab, size, length = spec["device"], spec["vocab"], spec["pack_batch"], spec["pack_len"]
    model = _model(vocab, spec["body"], device)
    rng = random.Random(0)
    data = SFTData(SFTData.Config.model_construct(packing=spec["packing"]))
    data.pad_token_id = 0
    batches, real = [], []
    for _ in range(4):
        rows = []
        for _ in range(size):
            n = rng.randint(length // 8, length)
            ids = [rng.randrange(1, vocab) for _ in range(n)]
            prompt = n // 4
            rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
        batches.append({k: v.to(device) for k, v in data.collate(rows).items()})
        real.append(sum(len(r["input_ids"]) for r in rows))
    out = _timed_steps(_sft_step(model, 0, spec.get("bf16", False)), batches, spec["repeats"], device)
    out["tokens_per_s"] = statistics.mean(real) / out["step_s"]
    out["row_width"] = statistics.mean(b["input_ids"].numel() for b in batches)
    out["real_tokens"] = statistics.mean(real)
    return out


CASES = {"loss": loss_case, "interleaved": interleaved_case, "packing": packing_case}


def run_case(spec: dict[str, Any], inline: bool) -> dict[str, Any]:
    """Run one case in a fresh interpreter (``inline``: in this one, for smoke runs)."""
    load = os.getloadavg()[0]
    if inline:
        result = CASES[spec["kind"]](spec)
    else:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(f"case {spec} failed:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**spec, **result, "load_1min": load}


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Markdown table lines."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _loss_table(rows: list[dict[str, Any]]) -> list[str]:
    plain = {(r["vocab"], r["seq"]): r for r in rows if r["chunk"] == 0}
    cells = []
    for r in rows:
        p = plain[(r["vocab"], r["seq"])]
        cells.append([
            f"{r['vocab']:,}", f"{r['batch']} x {r['seq']}", "0 (plain)" if r["chunk"] == 0 else str(r["chunk"]),
            f"{r['step_s']:.3f} [{r['step_s_min']:.3f}, {r['step_s_max']:.3f}]", f"{r['step_s'] / p['step_s']:.2f}x",
            f"{r['peak_mib']:.0f}", f"{r['peak_mib'] / max(p['peak_mib'], 1e-9):.2f}x",
        ])
    header = ["vocab", "B x T", "chunk_size", "step (s), median [min, max]", "vs plain", "peak memory growth (MiB)",
              "vs plain"]
    return _table(header, cells)


def _packing_table(rows: list[dict[str, Any]]) -> list[str]:
    cells = [
        ["packed" if r["packing"] else "padded", f"{r['row_width']:.0f} ({r['real_tokens']:.0f})",
         f"{r['step_s']:.3f}", f"{r['tokens_per_s']:,.0f}", f"{r['peak_mib']:.0f}"]
        for r in rows
    ]
    header = ["collate", "tokens in the batch (real)", "step (s), median", "real tokens/s", "peak memory growth (MiB)"]
    return _table(header, cells)


def _interleaved_table(rows: list[dict[str, Any]]) -> list[str]:
    cells = [
        [f"{r['vocab']:,}", f"{r['batch']} x {r['seq']}", str(r["chunk"]), f"{r['plain_s']:.3f}",
         f"{r['chunked_s']:.3f}", f"{r['ratio']:.2f}x [{r['ratio_min']:.2f}, {r['ratio_max']:.2f}]"]
        for r in rows
    ]
    header = ["vocab", "B x T", "chunk_size", "plain step (s)", "chunked step (s)",
              "chunked / plain (median [min, max])"]
    return _table(header, cells)


def write_report(
    out: Path,
    env: dict[str, Any],
    loss_rows: list[dict[str, Any]],
    pack_rows: list[dict[str, Any]],
    inter_rows: Sequence[dict[str, Any]] = (),
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results = {"env": env, "loss": loss_rows, "interleaved": list(inter_rows), "packing": pack_rows}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    loads = [r["load_1min"] for r in [*loss_rows, *inter_rows, *pack_rows]]
    where = "each case in a fresh process"
    md = [
        f"# Kernels benchmark ({env['device']})",
        "",
        f"{env['machine']}; torch {env['torch']}, transformers {env['transformers']}; "
        f"{env['repeats']} timed steps per case (median), "
        f"{'all cases in one process (smoke run: memory not comparable)' if env['smoke'] else where}. "
        f"1-minute load average during the cases: {min(loads):.1f} to {max(loads):.1f} "
        f"on {env['cpus']} CPUs (other work was running: compare ratios, not absolute times).",
        "",
        f"SFT loss forward + backward; Llama body {env['body']['hidden_size']} wide, "
        f"{env['body']['num_hidden_layers']} layers, {'bf16 autocast' if env['bf16'] else 'float32'}; "
        "a quarter of each row is prompt (label -100).",
        "",
    ]
    if loss_rows:
        md += ["## SFT loss: plain against chunked, each in its own process", "", *_loss_table(loss_rows), ""]
    if inter_rows:
        md += [
            "## Step time, plain and chunked alternating in one process",
            "",
            "Each timed step of one is followed by a step of the other, so a change in the machine's load "
            "hits both alike; the ratio is the median over those pairs.",
            "",
            *_interleaved_table(list(inter_rows)),
            "",
        ]
    if pack_rows:
        md += [
            "## Padded against packed micro-batches",
            "",
            f"Vocabulary {pack_rows[0]['vocab']:,}; {pack_rows[0]['pack_batch']} rows per micro-batch, "
            f"lengths uniform in [{pack_rows[0]['pack_len'] // 8}, {pack_rows[0]['pack_len']}].",
            "",
            *_packing_table(pack_rows),
            "",
        ]
    (out / "results.md").write_text("\n".join(md))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat, all in this process")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per case (default 3; smoke 1)")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/kernels/results/DEVICE")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="run under bf16 autocast (default: on with --device cuda, off on CPU)")
    for name in ("vocabs", "seqs", "chunks"):
        parser.add_argument(f"--{name}", type=lambda v: [int(x) for x in v.split(",")], default=None,
                            help=f"comma-separated {name} (default: the device's grid)")
    parser.add_argument("--no-packing", action="store_true", help="skip the padded/packed comparison")
    parser.add_argument("--interleave", type=int, default=None, metavar="CHUNK",
                        help="only time plain against this chunk size, alternating in one process per case")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(CASES[spec["kind"]](spec)))
        return

    s = sizes(args.smoke, args.device)
    s.update({k: getattr(args, k) for k in ("vocabs", "seqs", "chunks") if getattr(args, k)})
    repeats = args.repeats or (1 if args.smoke else 3)
    body = SMOKE_BODY if args.smoke else CUDA_BODY if args.device == "cuda" else BODY
    bf16 = args.device == "cuda" if args.bf16 is None else args.bf16
    base = {"device": args.device, "repeats": repeats, "body": body, "batch": s["batch"], "bf16": bf16}
    if args.interleave:
        inter_rows = [
            run_case({**base, "kind": "interleaved", "vocab": v, "seq": t, "chunk": args.interleave}, args.smoke)
            for v in s["vocabs"]
            for t in s["seqs"]
        ]
        for r in inter_rows:
            print(f"vocab {r['vocab']} T {r['seq']}: chunked / plain {r['ratio']:.2f}x")
        write_report(args.out or HERE / "results" / f"{args.device}-interleaved", _env(args, repeats, body, bf16),
                     [], [], inter_rows)
        return
    loss_rows = [
        run_case({**base, "kind": "loss", "vocab": v, "seq": t, "chunk": c}, args.smoke)
        for v in s["vocabs"]
        for t in s["seqs"]
        for c in s["chunks"]
    ]
    for r in loss_rows:
        print(f"loss vocab {r['vocab']} T {r['seq']} chunk {r['chunk']}: {r['step_s']:.3f} s, {r['peak_mib']:.0f} MiB")
    pack_rows = [
        run_case(
            {**base, "kind": "packing", "vocab": s["pack_vocab"], "packing": p, "pack_batch": s["pack_batch"],
             "pack_len": s["pack_len"]},
            args.smoke,
        )
        for p in ((False, True) if not args.no_packing else ())
    ]
    for r in pack_rows:
        print(f"packing {r['packing']}: {r['tokens_per_s']:,.0f} tokens/s, {r['peak_mib']:.0f} MiB")
    write_report(args.out or HERE / "results" / args.device, _env(args, repeats, body, bf16), loss_rows, pack_rows)


def _env(args: argparse.Namespace, repeats: int, body: dict[str, Any], bf16: bool) -> dict[str, Any]:
    import transformers

    return {
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "repeats": repeats,
        "body": body,
        "bf16": bf16,
        "smoke": args.smoke,
    }


if __name__ == "__main__":
    main()
