"""Tokenization at scale: rows/s of the ``sft`` data's load, serial, in processes, and from the cache.

It writes ``--rows`` chat rows (``{"messages": [...]}``: an optional system message, one to
two user/assistant turns, words drawn Zipf-like from a made-up lexicon) and trains a
byte-level BPE tokenizer (``--vocab`` tokens, the ``tokenizers`` library, no download) with
a ChatML-style chat template. Then, ``--repeats`` times, it times ``SFTData.load`` (read,
render the template, tokenize, label, truncate) for each variant, in this order:

* ``before``: the ``sft`` data as it was before parallel tokenization and the cache
  (``plugins/aligntk_sft/data.py`` at commit ``BEFORE``, read with ``git show``: one
  process, every row tokenized on every run);
* ``serial``: the code now, ``num_proc: 1``, ``cache: false``;
* ``processes``: ``num_proc: --num-proc``, ``cache: false``;
* ``cold``: ``num_proc: --num-proc`` with an empty cache folder (tokenizes and writes the entry);
* ``warm``: the same again (reads the entry back).

Every variant's examples are checked equal to ``before``'s. rows/s is ``--rows`` over the
wall time of ``load``; min / median / max over the repeats.

    python benchmarks/tokenize/run.py                     # 100,000 rows, 3 repeats (~10 min on 2 cores)
    python benchmarks/tokenize/run.py --rows 500 --repeats 1 --vocab 600 --out /tmp/t   # seconds
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
#: The last commit before parallel tokenization and the cache (issue 12, part 5).
BEFORE = "b6c833b91571947d024440d0ea1495ced2f11b01"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>"]
VARIANTS = ("before", "serial", "processes", "cold", "warm")


def lexicon(rng: random.Random, size: int = 20_000) -> list[str]:
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    words = set()
    while len(words) < size:
        words.add("".join(rng.choice(syllables) for _ in range(rng.choice((1, 2, 2, 3, 3, 4)))))
    return sorted(words)


def sentence(rng: random.Random, words: list[str], cum_weights: list[float], n: int) -> str:
    picked = rng.choices(words, cum_weights=cum_weights, k=n)
    text = " ".join(picked).capitalize()
    return text + rng.choice((".", "?", "!", ".", ".")) + (f" {rng.randint(0, 9999)}" if rng.random() < 0.2 else "")


def chat_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    words = lexicon(rng)
    weights = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(len(words))))  # Zipf
    rows = []
    for _ in range(n):
        messages = []
        if rng.random() < 0.1:
            messages.append({"role": "system", "content": sentence(rng, words, weights, rng.randint(5, 15))})
        for _ in range(rng.choice((1, 1, 1, 2))):
            messages.append({"role": "user", "content": sentence(rng, words, weights, rng.randint(4, 16))})
            reply = " ".join(sentence(rng, words, weights, rng.randint(4, 12)) for _ in range(rng.randint(1, 2)))
            messages.append({"role": "assistant", "content": reply})
        rows.append({"messages": messages})
    return rows


def train_tokenizer(rows: list[dict[str, Any]], vocab: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = (m["content"] for row in rows[:20_000] for m in row["messages"])
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def before_component() -> type | None:
    """``SFTData`` as it was at ``BEFORE`` (imported from ``git show``), or ``None`` without git."""
    try:
        source = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{BEFORE}:plugins/aligntk_sft/data.py"],
            check=True, capture_output=True, text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    with tempfile.TemporaryDirectory(prefix="aligntk-before-") as folder:
        file = Path(folder) / "sft_data_before.py"
        file.write_text(source)
        spec = importlib.util.spec_from_file_location("sft_data_before", file)
        module = importlib.util.module_from_spec(spec)
        sys.modules["sft_data_before"] = module
        spec.loader.exec_module(module)
    return module.SFTData


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the map's worker processes)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def time_load(component: type, path: Path, tokenizer: Any, **options: Any) -> tuple[float, float, list[Any]]:
    """``(wall seconds, CPU seconds, training examples)`` of one ``load``."""
    from aligntk import DataContext

    data = component(component.Config(path=path, max_length=1024, **options))
    cpu, started = cpu_seconds(), time.perf_counter()
    splits = data.load(DataContext(tokenizer=tokenizer, seed=0))
    return time.perf_counter() - started, cpu_seconds() - cpu, list(splits.train)


def summary(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"some of {','.join(VARIANTS)}")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    chosen = [v for v in args.variants.split(",") if v]
    if not chosen or set(chosen) - set(VARIANTS) or ("warm" in chosen and "cold" not in chosen):
        parser.error(f"--variants: some of {','.join(VARIANTS)} (warm needs cold)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    from aligntk_sft.data import SFTData

    before = before_component()
    work = Path(tempfile.mkdtemp(prefix="aligntk-tokenize-bench-"))
    rows = chat_rows(args.rows)
    path = work / "chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    started = time.perf_counter()
    tokenizer = train_tokenizer(rows, args.vocab)
    print(f"{args.rows} rows, {path.stat().st_size / 1e6:.1f} MB; tokenizer ({len(tokenizer)} tokens) "
          f"trained in {time.perf_counter() - started:.1f} s", flush=True)

    if before is None and "before" in chosen:
        print(f"no git history with commit {BEFORE}: the 'before' variant is left out", flush=True)
    seconds: dict[str, list[float]] = {v: [] for v in VARIANTS if v in chosen and (v != "before" or before)}
    cpu: dict[str, list[float]] = {v: [] for v in seconds}
    reference: list[Any] | None = None
    tokens = 0
    for repeat in range(args.repeats):
        cache_dir = work / f"cache-{repeat}"  # empty: the cold run writes, the warm run reads
        runs = {
            "before": lambda: time_load(before, path, tokenizer),
            "serial": lambda: time_load(SFTData, path, tokenizer, num_proc=1, cache=False),
            "processes": lambda: time_load(SFTData, path, tokenizer, num_proc=args.num_proc, cache=False),
            "cold": lambda: time_load(SFTData, path, tokenizer, num_proc=args.num_proc, cache_dir=cache_dir),
            "warm": lambda: time_load(SFTData, path, tokenizer, num_proc=args.num_proc, cache_dir=cache_dir),
        }
        for variant in seconds:
            took, used, examples = runs[variant]()
            if reference is None:
                reference = examples
                tokens = sum(len(e["input_ids"]) for e in examples)
            elif examples != reference:
                raise SystemExit(f"{variant}: the examples differ from the first variant's")
            seconds[variant].append(took)
            cpu[variant].append(used)
            print(f"repeat {repeat + 1}  {variant:9s} {took:7.2f} s  {args.rows / took:9,.0f} rows/s  "
                  f"(CPU {used:.1f} s)", flush=True)
            del examples

    import datasets
    import tokenizers
    import torch
    import transformers

    rate = {v: summary([args.rows / s for s in t]) for v, t in seconds.items()}
    baseline = next(iter(rate))
    result = {
        "command": "python benchmarks/tokenize/run.py " + " ".join(sys.argv[1:]),
        "rows": args.rows,
        "tokens": tokens,
        "vocab": len(tokenizer),
        "num_proc": args.num_proc,
        "repeats": args.repeats,
        "data_mb": round(path.stat().st_size / 1e6, 1),
        "machine": {
            "platform": platform.platform(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "datasets": datasets.__version__,
        },
        "seconds": seconds,
        "cpu_seconds": cpu,
        "rows_per_s": rate,
        "rows_per_cpu_s": {v: summary([args.rows / s for s in t]) for v, t in cpu.items()},
        "baseline": baseline,
        "speedup": {v: rate[v]["median"] / rate[baseline]["median"] for v in rate},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "results.md").write_text(table(result))
    print(table(result))
    shutil.rmtree(work, ignore_errors=True)


def table(result: dict[str, Any]) -> str:
    names = {
        "before": "before (serial, no cache; the code at the commit before)",
        "serial": "serial now (`num_proc: 1`, `cache: false`)",
        "processes": f"`num_proc: {result['num_proc']}`, `cache: false`",
        "cold": f"`num_proc: {result['num_proc']}`, cold cache (tokenize + write)",
        "warm": "warm cache (read back)",
    }
    lines = [
        "# Tokenization: rows/s of the sft data's load",
        "",
        f"Command: `{result['command']}`  ",
        f"{result['rows']:,} chat rows ({result['data_mb']} MB JSONL, {result['tokens']:,} tokens), byte-level "
        f"BPE with {result['vocab']:,} tokens, max_length 1024; {result['machine']['cpus_usable']} usable CPUs, "
        f"{result['machine']['platform']}.",
        "",
        f"| variant | rows/s min | median | max | x {result['baseline']} (median) | rows per CPU-second (median) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for v, r in result["rows_per_s"].items():
        lines.append(
            f"| {names[v]} | {r['min']:,.0f} | {r['median']:,.0f} | {r['max']:,.0f} | "
            f"{result['speedup'][v]:.2f} | {result['rows_per_cpu_s'][v]['median']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
