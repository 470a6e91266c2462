"""Test harness shipped in the wheel: for aligntk's own tests and for plugin authors.

* ``char_tokenizer`` / ``tiny_model``: a character tokenizer and a tiny causal LM
  (a few hundred thousand parameters) built offline from a config.
* ``tiny_batch``: a padded SFT-style batch with prompt tokens masked.
* ``check_loss_contract``: the properties every loss must have.
* ``run_recipe``: run a recipe dict for a few steps in a folder and return its metrics.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast

from .plugins import hookimpl
from .types import Batch, LossComponent, Models

#: Characters the default test tokenizer knows: digits, arithmetic, lower-case letters.
DEFAULT_CHARS = "0123456789+-*=?., abcdefghijklmnopqrstuvwxyz"
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
#: A minimal chat template: ``<s>user: ...\nassistant: ...</s>``.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def char_tokenizer(chars: Iterable[str] = DEFAULT_CHARS, pad: bool = True) -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer (one token per character), with a chat template.

    Args:
        chars: the characters it knows; others map to ``<unk>``.
        pad: give it a pad token (``False`` builds one without, to test that error).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    specials = dict(SPECIAL_TOKENS)
    if not pad:
        specials.pop("pad_token")
    vocab = {tok: i for i, tok in enumerate(specials.values())}
    for ch in dict.fromkeys(chars):
        vocab.setdefault(ch, len(vocab))
    # Also know the chat template's role names and newline character by character.
    for ch in "\n:abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(specials.values()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
    fast.chat_template = CHAT_TEMPLATE
    return fast


# --------------------------------------------------------------------------------------
# Tiny models and batches
# --------------------------------------------------------------------------------------

#: A Llama of about 100k parameters: enough to learn small tasks in seconds on a CPU.
TINY_LLAMA: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 128,
}


def tiny_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny random-init causal LM sized to ``tokenizer``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    options = {**TINY_LLAMA, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id, **overrides}
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**options))


def tiny_batch(
    tokenizer: PreTrainedTokenizerFast, pairs: Sequence[tuple[str, str]] = (("1+2=", "3"), ("12+30=", "42"))
) -> dict[str, torch.Tensor]:
    """A right-padded prompt/completion batch: ``input_ids``, ``attention_mask``, ``labels`` ``[B, T]``.

    Prompt and padding positions have label ``-100``; completions end with EOS.
    """
    rows = []
    for prompt, completion in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((p + c, [-100] * len(p) + c))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
        "labels": torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows]),
    }


# --------------------------------------------------------------------------------------
# The loss contract
# --------------------------------------------------------------------------------------


def _index(batch: Batch, rows: slice) -> Batch:
    return {k: v[rows] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in batch.items()}


def check_loss_contract(
    loss: LossComponent,
    models: Models,
    batch: Batch,
    atol: float = 1e-5,
    label_fields: Sequence[str] = ("labels",),
) -> list[str]:
    """Assert the properties every aligntk loss must have; return the names of the checks run.

    * ``sum`` and ``count`` are finite scalars and ``count`` equals ``loss.count(batch)``;
    * gradients reach the policy's parameters;
    * logits at positions whose next label is ``-100`` get no gradient (when the batch has
      ``label_fields``; a loss that runs ``[chosen; rejected]`` in one forward passes
      ``("chosen_labels", "rejected_labels")``, concatenated in that order);
    * splitting the batch in two micro-batches gives the same sum and count;
    * it runs under bf16 autocast and stays close to the float32 value.

    Raises:
        AssertionError: naming the property that failed.
    """
    done = []
    policy = models.policy
    policy.zero_grad(set_to_none=True)
    captured: list[torch.Tensor] = []

    def keep_logits(_module: Any, _args: Any, output: Any) -> None:
        logits = getattr(output, "logits", None)
        if logits is not None and logits.requires_grad:
            logits.retain_grad()
            captured.append(logits)

    handle = policy.register_forward_hook(keep_logits)
    try:
        out = loss(models, batch)
    finally:
        handle.remove()
    assert out.sum.dim() == 0 and torch.isfinite(out.sum), f"loss sum must be a finite scalar, got {out.sum}"
    assert int(out.count) == int(loss.count(batch)), f"count {int(out.count)} != loss.count(batch) {int(loss.count(batch))}"
    assert int(out.count) > 0, "the test batch must have something to learn from"
    done.append("finite sum and count")

    out.sum.backward()
    grads = [p.grad for p in policy.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads), "no gradient reached the policy's parameters"
    done.append("gradients flow")

    if all(f in batch for f in label_fields) and captured:
        logits = captured[0]
        labels = torch.cat([batch[f] for f in label_fields])
        ignored = torch.ones(labels.shape, dtype=torch.bool)
        ignored[:, :-1] = labels[:, 1:] == -100  # position t predicts label t + 1
        leaked = logits.grad[ignored].abs().max().item() if ignored.any() else 0.0
        assert leaked == 0.0, f"positions with label -100 received gradient (max |grad| {leaked})"
        done.append("ignored tokens get no gradient")

    n = next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    if n >= 2:
        with torch.no_grad():
            whole = loss(models, batch)
            halves = [loss(models, _index(batch, s)) for s in (slice(0, n // 2), slice(n // 2, n))]
        split_sum = sum(h.sum for h in halves)
        assert torch.allclose(whole.sum, split_sum, atol=atol, rtol=1e-4), (
            f"micro-batch split changes the sum: {whole.sum.item()} vs {split_sum.item()}"
        )
        assert int(whole.count) == sum(int(h.count) for h in halves), "micro-batch split changes the count"
        done.append("micro-batch split gives the same sum and count")

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = loss(models, batch)
    assert torch.isfinite(low.sum), "the loss is not finite under bf16 autocast"
    assert torch.allclose(low.sum.float(), out.sum.detach(), rtol=0.05, atol=0.05 * max(1, int(out.count))), (
        f"bf16 autocast changes the loss too much: {low.sum.item()} vs {out.sum.item()}"
    )
    done.append("runs under bf16 autocast")
    policy.zero_grad(set_to_none=True)
    return done


# --------------------------------------------------------------------------------------
# Running recipes
# --------------------------------------------------------------------------------------


def write_tiny_assets(folder: Path, rows: int = 64, seed: int = 0) -> dict[str, Any]:
    """Write a char tokenizer and an addition task (``train.jsonl``, ``eval.jsonl``) into ``folder``.

    Returns a recipe (a dict) that fine-tunes a tiny Llama on it with the ``sft``
    components; change its keys to test your own components.
    """
    import json
    import random

    folder.mkdir(parents=True, exist_ok=True)
    char_tokenizer("0123456789+=").save_pretrained(folder / "tokenizer")
    rng = random.Random(seed)
    for name, n in (("train.jsonl", rows), ("eval.jsonl", max(8, rows // 4))):
        with (folder / name).open("w") as f:
            for _ in range(n):
                a, b = rng.randrange(50), rng.randrange(50)
                f.write(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n")
    return {
        "output_dir": str(folder / "run"),
        "seed": seed,
        "model": {"config": dict(TINY_LLAMA), "tokenizer": str(folder / "tokenizer")},
        "data": {"name": "sft", "path": str(folder / "train.jsonl"), "eval_path": str(folder / "eval.jsonl")},
        "loss": {"name": "sft"},
        "update": {"name": "full", "learning_rate": 3e-3, "warmup_steps": 0},
        "train": {"max_steps": 2, "batch_size": 4},
    }


class InterruptAt:
    """A lifecycle plugin that interrupts a run after step ``at``, as a killed job would.

    Pass it to ``run_recipe(..., plugins={"crash": InterruptAt(5)})``, expect
    ``KeyboardInterrupt``, then run again with ``resume=True`` to test exact resume.
    """

    def __init__(self, at: int):
        self.at = at

    @hookimpl
    def aligntk_on_step_end(self, run: Any, step: int, metrics: dict[str, float]) -> None:
        if step == self.at:
            raise KeyboardInterrupt


def read_metrics(run_dir: Path, split: str = "train") -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` for one split (``train`` or ``eval``)."""
    import json

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("split") == split]


def run_recipe(
    recipe: dict[str, Any],
    overrides: Sequence[str] = (),
    plugins: dict[str, object] | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> Any:
    """Validate and run a recipe dict in this process (installed plugins plus ``plugins``).

    Returns the engine's ``RunResult``; read ``metrics.jsonl`` with ``read_metrics``.
    """
    import copy

    from .engine import train
    from .plugins import load_plugins
    from .recipe import apply_override, validate_recipe

    raw = copy.deepcopy(recipe)
    for override in overrides:
        apply_override(raw, override)
    loaded = load_plugins(extra=plugins)
    return train(validate_recipe(raw, loaded.registry), loaded, resume=resume, overwrite=overwrite)
