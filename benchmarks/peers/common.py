"""Offline inputs and device helpers shared by the peers and MFU benchmarks.

Nothing here downloads anything: tokenizers are built from a vocabulary in memory,
models from a config dict with random init, rows from a seeded generator.

* ``vocab == 0``: ``aligntk.testing.char_tokenizer()`` (50 tokens, one per character).
* ``vocab > 0``: a word-level tokenizer of exactly ``vocab`` tokens (4 specials, ``=``, and
  ``t0``, ``t1``, ...), split on spaces, so every word of a row is one token and a
  realistic vocabulary size (32,000) makes the LM head cost what it costs in practice.
"""

from __future__ import annotations

import os
import platform
import random
import resource
import sys
from collections.abc import Callable
from typing import Any

CHAR_WORDS = "alpha beta gamma delta omega sigma kappa theta lambda zeta rho tau phi chi psi".split()
SPECIALS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


# --------------------------------------------------------------------------------------
# Tokenizers and models
# --------------------------------------------------------------------------------------


def word_tokenizer(vocab: int) -> Any:
    """A word-level fast tokenizer with exactly ``vocab`` tokens (no hub, no training)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [*SPECIALS.values(), "=", *(f"t{i}" for i in range(vocab - len(SPECIALS) - 1))]
    if len(words) != vocab or vocab < 16:
        raise ValueError(f"vocab must be at least 16, got {vocab}")
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(SPECIALS.values()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS)


def build_tokenizer(vocab: int) -> Any:
    """``char_tokenizer()`` for ``vocab == 0``, else ``word_tokenizer(vocab)``."""
    if vocab == 0:
        from aligntk.testing import char_tokenizer

        return char_tokenizer()
    return word_tokenizer(vocab)


def llama_config(tokenizer: Any, hidden: int, layers: int, max_length: int, intermediate: int | None = None,
                 head_dim: int = 64) -> dict[str, Any]:
    """A Llama config dict (``AutoConfig.for_model(**it)``) sized by ``hidden`` and ``layers``."""
    heads = max(1, hidden // head_dim)
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate or 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "max_position_embeddings": max_length,
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "tie_word_embeddings": False,
    }


# --------------------------------------------------------------------------------------
# Rows: "w1 w2 ... wk =" -> the words reversed
# --------------------------------------------------------------------------------------


def _vocabulary(vocab: int) -> tuple[Callable[[random.Random], str], Callable[[list[str]], int], Callable[[str], str]]:
    """(draw a word, tokens of prompt + completion + EOS for these words, a near miss of a word)."""
    if vocab == 0:
        # prompt "w1 ... wk =" and completion " wk ... w1" + EOS: 2 * len(joined) + 4 characters
        return (lambda rng: rng.choice(CHAR_WORDS) + str(rng.randrange(10)),
                lambda words: 2 * len(" ".join(words)) + 4,
                lambda w: w[:-1] + str((int(w[-1]) + 1) % 10))
    n = vocab - len(SPECIALS) - 1
    # prompt k words + "=", completion k words + EOS
    return (lambda rng: f"t{rng.randrange(n)}",
            lambda words: 2 * len(words) + 2,
            lambda w: f"t{(int(w[1:]) + 1) % n}")


def make_rows(n: int, min_len: int, max_len: int, seed: int, vocab: int = 0, pairs: bool = False) -> list[dict]:
    """Deterministic rows of ``min_len`` to ``max_len`` tokens (prompt + one completion + EOS).

    SFT rows are ``{"prompt", "completion"}``; with ``pairs`` they are ``{"prompt", "chosen",
    "rejected"}``, the rejected answer being the chosen one with one word off by one (same
    length in tokens), so chosen and rejected cost the same.
    """
    draw, size, near_miss = _vocabulary(vocab)
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        target = rng.randint(min_len, max_len)
        words = [draw(rng)]
        while True:
            word = draw(rng)
            if size([*words, word]) > max_len or size(words) >= target:
                break
            words.append(word)
        answer = list(reversed(words))
        if not pairs:
            rows.append({"prompt": " ".join(words) + " =", "completion": " " + " ".join(answer)})
            continue
        wrong = list(answer)
        i = rng.randrange(len(wrong))
        wrong[i] = near_miss(wrong[i])
        rows.append({"prompt": " ".join(words) + " =", "chosen": " " + " ".join(answer),
                     "rejected": " " + " ".join(wrong)})
    return rows


def encode(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """What aligntk's ``sft`` and ``preference`` data do: prompt with the tokenizer's special
    tokens, completion without, then EOS. Returns (prompt ids, completion ids)."""
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return list(p), list(c)


# --------------------------------------------------------------------------------------
# Devices and memory
# --------------------------------------------------------------------------------------


def peak_rss() -> int:
    """The process's peak resident set size, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def rss_now() -> int:
    """Resident set size now, in bytes (Linux /proc; else the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss()


def device_name(device: str, threads: int | None = None) -> str:
    """``torch.cuda.get_device_name()`` on CUDA; the processor and thread count on CPU."""
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}), {threads or torch.get_num_threads()} torch threads"


def sync(device: str) -> None:
    """Wait for queued GPU work, so that a wall-clock reading means the work is done."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def trl_callback(clock: Any, on_log: Callable[[dict], None]) -> Any:
    """A TRL ``TrainerCallback`` that ticks ``clock`` after every optimizer step and hands each
    logged record (``logs``) to ``on_log``: the TRL side of every peers worker."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            clock.tick()

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if logs:
                on_log(logs)

    return Timer()


def aligntk_timer(clock: Any) -> Any:
    """An aligntk plugin that ticks ``clock`` after every optimizer step: the aligntk side of every peers worker."""
    import aligntk

    class Timer:
        @aligntk.hookimpl
        def aligntk_on_step_end(self, run, step, metrics):  # noqa: ANN001
            clock.tick()

    return Timer()
