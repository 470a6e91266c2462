"""Memory and step time per process, DDP against FSDP2, for 1, 2 and 4 processes on CPU.

Run one setting under torchrun (gloo):

    torchrun --nproc_per_node 2 benchmarks/scale/run.py --mode fsdp --out benchmarks/scale/results

or every setting and the table (``--all``; runs torchrun itself; ``--table`` rebuilds the
table from ``rows.jsonl``):

    python benchmarks/scale/run.py --all --procs 1 2 4

Each process builds the same Llama (about 100M parameters at the defaults, random
weights), wraps it as the engine does (DDP, or ``aligntk.sharding.shard``: FSDP2 per
decoder layer), runs a few AdamW steps, and reports:

- ``state_mb``: the bytes this process holds in weights, gradients and optimizer state
  (local shards under FSDP2), counted from the tensors: exact, and what scales with 1/N;
- ``peak_rss_mb``: the process's peak resident memory (``ru_maxrss``): includes the
  Python/torch baseline, activations, and the whole model each process builds before it
  is sharded (the engine loads the full model on every process first);
- ``step_s``: the median step time (2 cores shared: read the ratios, not the seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def _model(hidden: int, layers: int, vocab: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=256,
    )
    return LlamaForCausalLM(config)


def _tensor_mb(tensors: list[torch.Tensor]) -> float:
    from torch.distributed.tensor import DTensor

    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local) / 2**20


def one_setting(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from aligntk.distributed import init_distributed, shutdown
    from aligntk.recipe import FsdpSpec
    from aligntk.sharding import shard

    torch.manual_seed(0)
    d = init_distributed("cpu", needs_group=args.mode == "fsdp")
    model = _model(args.hidden, args.layers, args.vocab)
    params = sum(p.numel() for p in model.parameters())
    if args.mode == "fsdp":
        model = shard(model, FsdpSpec(), d.device)
    elif d.enabled:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep the gradients allocated: they count
        times.append(time.perf_counter() - start)
    weights = list(model.parameters())
    grads = [p.grad for p in weights if p.grad is not None]
    states = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim()]
    row = {
        "mode": args.mode,
        "procs": d.world_size,
        "rank": d.rank,
        "parameters": params,
        "state_mb": round(_tensor_mb(weights) + _tensor_mb(grads) + _tensor_mb(states), 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "step_s": round(statistics.median(times[1:] or times), 3),
    }
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        with (Path(args.out) / "rows.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
    if dist.is_initialized():
        dist.barrier()
    shutdown(d)


def _free_port() -> int:
    """A port nobody listens on now, for torchrun's rendezvous (a fixed one can be taken)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_all(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rows.jsonl").unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    same = ["--hidden", str(args.hidden), "--layers", str(args.layers), "--vocab", str(args.vocab),
            "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq), "--out", str(out)]
    for procs in args.procs:
        for mode in ("ddp", "fsdp"):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
                   "--master_port", str(_free_port()), __file__, "--mode", mode, *same]
            subprocess.run(cmd, env=env, check=True)
    write_table(out, args.procs)


def write_table(out: Path, procs_list: list[int]) -> None:
    """``results.md`` from ``rows.jsonl``: the largest process of each setting, with its ratios."""
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]

    def worst(mode: str, procs: int, key: str) -> float:
        return max(r[key] for r in rows if r["mode"] == mode and r["procs"] == procs)

    lines = ["| mode | processes | state MB / process | ratio to 1 process | peak RSS MB / process | "
             "ratio to 1 process | step s | step time / DDP's |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for procs in procs_list:
        for mode in ("ddp", "fsdp"):
            state, rss, step = (worst(mode, procs, k) for k in ("state_mb", "peak_rss_mb", "step_s"))
            lines.append(
                f"| {mode} | {procs} | {state:.0f} | {state / worst(mode, 1, 'state_mb'):.2f} | {rss:.0f} | "
                f"{rss / worst(mode, 1, 'peak_rss_mb'):.2f} | {step:.2f} | {step / worst('ddp', procs, 'step_s'):.2f} |"
            )
    (out / "results.md").write_text(f"{rows[0]['parameters'] / 1e6:.0f}M parameters\n\n" + "\n".join(lines) + "\n")
    print((out / "results.md").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["ddp", "fsdp"], default="fsdp")
    parser.add_argument("--all", action="store_true", help="every setting, then the table")
    parser.add_argument("--table", action="store_true", help="only the table, from --out's rows.jsonl")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.table:
        write_table(Path(args.out), args.procs)
    elif args.all:
        run_all(args)
    else:
        one_setting(args)


if __name__ == "__main__":
    main()
