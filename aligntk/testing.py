"""Test harness shipped in the wheel: for aligntk's own tests and for plugin authors.

* ``char_tokenizer`` / ``tiny_model``: a character tokenizer and a tiny causal LM
  (a few hundred thousand parameters) built offline from a config.
* ``tiny_classifier``: the same tiny Llama with a sequence-classification head.
* ``tiny_batch``, ``preference_batch``, ``classification_batch``: batches with exactly the
  fields the built-in ``sft``, ``preference`` and ``classification`` data collate.
* ``check_loss_contract``: the properties every loss must have.
* ``write_tiny_assets``, ``write_preference_assets``, ``write_classification_assets``: data
  files and a recipe dict for the built-in data components.
* ``run_recipe``: run a recipe dict for a few steps in a folder and return its metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
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


def tiny_classifier(
    tokenizer: PreTrainedTokenizerFast, num_labels: int = 2, seed: int = 0, **overrides: Any
) -> torch.nn.Module:
    """A tiny random-init Llama with a classification head (``logits`` ``[B, num_labels]``)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    options = {
        **TINY_LLAMA,
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "num_labels": num_labels,
        **overrides,
    }
    return AutoModelForSequenceClassification.from_config(AutoConfig.for_model(**options))


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


#: ``(prompt, chosen, rejected)``: the right sum chosen, a near miss rejected; lengths differ.
PREFERENCE_ROWS: tuple[tuple[str, str, str], ...] = (
    ("1+2=", "3", "4"),
    ("12+30=", "42", "41"),
    ("5+5=", "10", "9"),
    ("7+8=", "15", "16"),
)


def preference_batch(
    tokenizer: PreTrainedTokenizerFast,
    rows: Sequence[tuple[str, str, str] | tuple[str, str, str, float]] = PREFERENCE_ROWS,
) -> dict[str, torch.Tensor]:
    """A batch as the built-in ``preference`` data collates plain-text pairs.

    Each row is ``(prompt, chosen, rejected)`` or ``(prompt, chosen, rejected, margin)``.
    The prompt is tokenized with the tokenizer's special tokens, each completion without
    and ending with EOS; both sides share the prompt's tokens.

    Returns:
        ``{chosen,rejected}_input_ids``, ``{chosen,rejected}_attention_mask`` and
        ``{chosen,rejected}_labels`` ``[B, T]`` int64, right-padded to ONE width for both
        sides (pad token, mask 0, label ``-100``), prompt tokens labelled ``-100``; and
        ``margin`` ``[B]`` float32 (0 unless given).
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    sides: dict[str, list[tuple[list[int], list[int]]]] = {"chosen": [], "rejected": []}
    for row in rows:
        prompt = tokenizer(row[0], add_special_tokens=True)["input_ids"]
        for side, text in zip(sides, row[1:3]):
            completion = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
            sides[side].append((prompt + completion, [-100] * len(prompt) + completion))
    width = max(len(ids) for pairs in sides.values() for ids, _ in pairs)
    batch: dict[str, torch.Tensor] = {}
    for side, pairs in sides.items():
        batch[f"{side}_input_ids"] = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in pairs])
        batch[f"{side}_attention_mask"] = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in pairs])
        batch[f"{side}_labels"] = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in pairs])
    batch["margin"] = torch.tensor([float(row[3]) if len(row) > 3 else 0.0 for row in rows], dtype=torch.float32)
    return batch


#: ``(text, class)``: texts of different lengths, so the batch has right padding.
CLASSIFICATION_ROWS: tuple[tuple[str, int], ...] = (("12", 0), ("3456", 1), ("789", 0), ("50", 1))


def classification_batch(
    tokenizer: PreTrainedTokenizerFast,
    rows: Sequence[tuple[str, int]] = CLASSIFICATION_ROWS,
    num_classes: int = 2,
    label_tokens: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """A batch as the built-in ``classification`` data collates it (one-hot targets).

    Args:
        rows: ``(text, class)`` pairs, class in ``[0, num_classes)``.
        label_tokens: one single-token string per class, as the data's ``label_tokens``
            option: adds ``label_token_ids`` for a causal-LM classifier.

    Returns:
        ``input_ids``, ``attention_mask`` ``[B, T]`` int64 (right padding: pad token, mask 0),
        ``soft_labels`` ``[B, C]`` float32, ``labels_int`` ``[B]`` int64, and with
        ``label_tokens`` ``label_token_ids`` ``[B, C]`` int64. No field is per-token labels.
    """
    encoded = tokenizer([text for text, _ in rows])["input_ids"]
    width, pad = max(len(ids) for ids in encoded), tokenizer.pad_token_id
    batch = {
        "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids in encoded]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in encoded]),
        "soft_labels": torch.tensor([[float(c == label) for c in range(num_classes)] for _, label in rows]),
        "labels_int": torch.tensor([label for _, label in rows]),
    }
    if label_tokens is not None:
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in label_tokens]
        assert len(ids) == num_classes and all(len(i) == 1 for i in ids), "label_tokens: one single token per class"
        batch["label_token_ids"] = torch.tensor([[i[0] for i in ids]] * len(rows))
    return batch


# --------------------------------------------------------------------------------------
# The loss contract
# --------------------------------------------------------------------------------------


def _index(batch: Batch, rows: slice) -> Batch:
    return {k: v[rows] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in batch.items()}


def token_label_fields(batch: Batch) -> list[str]:
    """The batch's per-token label fields, the ones ``check_loss_contract`` checks by default.

    A field is one when its name ends in ``labels``, it is an integer ``[B, T]`` tensor and
    the batch has the matching ``*input_ids`` of the same shape: ``labels`` (with
    ``input_ids``), ``chosen_labels`` and ``rejected_labels`` (with ``chosen_input_ids`` ...).
    ``soft_labels`` ``[B, C]`` float32 is not one.
    """
    fields = []
    for name, value in batch.items():
        if not name.endswith("labels") or not isinstance(value, torch.Tensor) or value.dim() != 2:
            continue
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            continue
        ids = batch.get(name[: -len("labels")] + "input_ids")
        if isinstance(ids, torch.Tensor) and ids.shape == value.shape:
            fields.append(name)
    return fields


#: One watched policy forward: its input ids ``[B', T']`` (``None`` if unknown) and logits ``[B', T', V]``.
_Forward = tuple[torch.Tensor | None, torch.Tensor]


def _watch_policy(policy: torch.nn.Module) -> tuple[list[_Forward], Callable[[], None]]:
    """Record ``(input_ids, logits)`` of every policy forward whose logits need a gradient
    (retained). The ids are the forward's ``input_ids`` argument, else those its input
    embedding layer looked up; ``None`` when neither is known. Returns the records and a
    function that removes the hooks.
    """
    records: list[_Forward] = []
    embedded: list[torch.Tensor] = []

    def on_embed(_module: Any, args: Any, _output: Any) -> None:
        if args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
            embedded.append(args[0])

    def on_forward(_module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        ids = kwargs.get("input_ids")
        if ids is None and args and isinstance(args[0], torch.Tensor):
            ids = args[0]
        if ids is None and embedded:
            ids = embedded[-1]
        embedded.clear()
        logits = getattr(output, "logits", None)
        if isinstance(logits, torch.Tensor) and logits.requires_grad and logits.dim() == 3:
            logits.retain_grad()
            records.append((ids.detach() if isinstance(ids, torch.Tensor) else None, logits))

    handles = [policy.register_forward_hook(on_forward, with_kwargs=True)]
    try:
        embeddings = policy.get_input_embeddings()  # type: ignore[operator]
    except (AttributeError, NotImplementedError, TypeError):  # DDP, a plain module
        embeddings = None
    if isinstance(embeddings, torch.nn.Module):
        handles.append(embeddings.register_forward_hook(on_embed))

    def remove() -> None:
        for handle in handles:
            handle.remove()

    return records, remove


def _ignored_positions(
    row: torch.Tensor, batch: Batch, fields: Sequence[str]
) -> tuple[torch.Tensor, list[tuple[str, int]]]:
    """Which positions of one forward row ``[T']`` predict a ``-100`` label, and where the row comes from.

    The row is matched to every batch row (of each field's ``*input_ids``) it equals, up to
    trailing positions of the batch row whose labels are all ``-100`` (a loss may trim
    padding). Position ``t`` predicts label ``t + 1``; the last position predicts nothing. If
    several batch rows match, a position counts as ignored only when it is in all of them.

    Returns:
        ``(ignored [T'] bool, [(field, batch row), ...])``; the list is empty when no batch row matches.
    """
    width = row.shape[0]
    ignored = torch.ones(width, dtype=torch.bool)
    sources = []
    for field in fields:
        ids = batch[field[: -len("labels")] + "input_ids"].cpu()
        labels = batch[field].cpu()
        n = min(width, ids.shape[1])
        same = (ids[:, :n] == row[:n]).all(dim=1) & (labels[:, n:] == -100).all(dim=1)
        for i in same.nonzero().flatten().tolist():
            targets = torch.full((width,), -100, dtype=labels.dtype)
            targets[: n - 1] = labels[i, 1:n]
            ignored &= targets == -100
            sources.append((field, i))
    return ignored, sources


def _check_ignored(records: list[_Forward], batch: Batch, fields: Sequence[str]) -> set[str]:
    """Assert that no logit at an ignored position of ``fields``' rows got gradient; return the fields checked.

    Rows of the batch's other label fields are placed but not checked.

    Raises:
        AssertionError: a position whose next label is ``-100`` received gradient, or a policy
            forward ran on rows that are not rows of the batch's label fields.
    """
    covered: set[str] = set()
    others = [f for f in token_label_fields(batch) if f not in fields]
    for number, (ids, logits) in enumerate(records, start=1):
        if ids is None or tuple(ids.shape) != tuple(logits.shape[:2]):
            raise AssertionError(
                f"policy forward {number} returned logits {tuple(logits.shape)} for inputs that cannot be matched to "
                f"the batch's {', '.join(fields)}, so the ignored-token check cannot tell which positions are "
                "ignored; call the policy with input_ids (rows of the batch), or pass label_fields=() to skip it"
            )
        grad = logits.grad
        for r, row in enumerate(ids.cpu()):
            ignored, sources = _ignored_positions(row, batch, fields)
            if not sources and _ignored_positions(row, batch, others)[1]:
                continue  # a row of a label field the caller left out
            if not sources:
                raise AssertionError(
                    f"policy forward {number}, row {r}, is not a row of the batch's "
                    f"{' / '.join(f[: -len('labels')] + 'input_ids' for f in fields)}, so the ignored-token check "
                    "cannot tell which positions are ignored; run the policy on the batch's rows (padding may be "
                    "trimmed), or pass label_fields=() to skip the check"
                )
            covered.update(field for field, _ in sources)
            if grad is None or not ignored.any():
                continue
            leaked = grad[r][ignored.to(grad.device)].abs().amax(dim=-1)
            if leaked.max().item() != 0.0:
                where = ignored.nonzero().flatten()[(leaked != 0).cpu()].tolist()
                raise AssertionError(
                    f"positions with label -100 received gradient (max |grad| {leaked.max().item():.3g}): "
                    f"positions {where} of policy forward {number}, row {r} "
                    f"({', '.join(f'{field} row {i}' for field, i in sources)}), "
                    "whose next label is -100 (prompt or padding)"
                )
    return covered


def check_loss_contract(
    loss: LossComponent,
    models: Models,
    batch: Batch,
    atol: float = 1e-5,
    label_fields: Sequence[str] | None = None,
) -> list[str]:
    """Assert the properties every aligntk loss must have; return the names of the checks run.

    * ``sum`` and ``count`` are finite scalars and ``count`` equals ``loss.count(batch)``;
    * gradients reach the policy's parameters;
    * for every per-token label field of the batch (``token_label_fields``: ``labels``,
      ``chosen_labels``, ``rejected_labels`` ...), the policy's logits at positions whose
      next label is ``-100`` (prompt, padding) get exactly zero gradient. Every policy
      forward of the call whose ``[B, T, V]`` logits need a gradient is checked, however
      many there are (chosen and rejected apart or concatenated; a frozen reference's do
      not need one); each of its rows is matched to the batch row it ran on by its input
      ids. Left out (not in the returned names) when the policy returns no such logits,
      as a chunked loss or a classification head does;
    * splitting the batch in two micro-batches gives the same sum and count;
    * it runs under bf16 autocast and stays close to the float32 value.

    Args:
        label_fields: check these label fields instead of every one the batch has; each
            needs its ``*input_ids`` (``chosen_labels``: ``chosen_input_ids``). Naming a
            field makes its check required: it fails if no policy forward ran on its rows.
            ``()`` skips the ignored-token check.

    Raises:
        AssertionError: naming the property that failed.
    """
    explicit = label_fields is not None
    fields = list(label_fields) if label_fields is not None else token_label_fields(batch)
    for field in fields if explicit else ():
        assert field.endswith("labels") and field in batch and field[: -len("labels")] + "input_ids" in batch, (
            f"label_fields: {field!r} must be a batch field named *labels, next to its *input_ids"
        )
    done = []
    policy = models.policy
    policy.zero_grad(set_to_none=True)
    records, remove = _watch_policy(policy)
    try:
        out = loss(models, batch)
    finally:
        remove()
    assert out.sum.dim() == 0 and torch.isfinite(out.sum), f"loss sum must be a finite scalar, got {out.sum}"
    assert int(out.count) == int(loss.count(batch)), f"count {int(out.count)} != loss.count(batch) {int(loss.count(batch))}"
    assert int(out.count) > 0, "the test batch must have something to learn from"
    done.append("finite sum and count")

    out.sum.backward()
    grads = [p.grad for p in policy.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads), "no gradient reached the policy's parameters"
    done.append("gradients flow")

    if fields and (records or explicit):
        covered = _check_ignored(records, batch, fields)
        missing = [f for f in fields if f not in covered] if explicit else []
        assert not missing, (
            f"label_fields {missing}: no policy forward with [B, T, V] logits that need a gradient ran on their "
            "rows, so their ignored tokens could not be checked"
        )
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


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    import json

    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_preference_assets(folder: Path, rows: int = 32, seed: int = 0) -> dict[str, Any]:
    """Write a char tokenizer and addition pairs (``train.jsonl``, ``eval.jsonl``) into ``folder``.

    Each row is ``{"prompt": "23+45=", "chosen": "68", "rejected": "69"}``: the right sum
    chosen, a near miss rejected. Returns a recipe (a dict) that trains a tiny Llama on
    them with the ``preference`` data and the ``dpo`` loss (its reference is a frozen copy
    of the policy as it starts) for 2 steps; change its keys to test your own components.
    """
    import random

    folder.mkdir(parents=True, exist_ok=True)
    char_tokenizer("0123456789+=").save_pretrained(folder / "tokenizer")
    rng = random.Random(seed)
    for name, n in (("train.jsonl", rows), ("eval.jsonl", max(8, rows // 4))):
        pairs = []
        for _ in range(n):
            a, b = rng.randrange(50), rng.randrange(50)
            # A near miss that is never negative: the tokenizer knows no minus sign.
            pairs.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + rng.choice((1, 2, 10)))})
        _write_jsonl(folder / name, pairs)
    return {
        "output_dir": str(folder / "run"),
        "seed": seed,
        "model": {"config": dict(TINY_LLAMA), "tokenizer": str(folder / "tokenizer")},
        "data": {
            "name": "preference",
            "path": str(folder / "train.jsonl"),
            "eval_path": str(folder / "eval.jsonl"),
            "max_length": 16,
        },
        "loss": {"name": "dpo"},
        "update": {"name": "full", "learning_rate": 1e-3, "warmup_steps": 0},
        "train": {"max_steps": 2, "batch_size": 4},
    }


def write_classification_assets(folder: Path, rows: int = 32, seed: int = 0) -> dict[str, Any]:
    """Write a char tokenizer and a digits task (``train.jsonl``, ``eval.jsonl``) into ``folder``.

    Each row is ``{"text": "402917", "label": 1}``, the label 1 when the first digit is
    below 5. Returns a recipe (a dict) that trains a tiny Llama with a 2-class head
    (``task: sequence_classification``) on them with the ``classification`` data and the
    ``w2s_ce`` loss for 2 steps; change its keys to test your own components.
    """
    import random

    folder.mkdir(parents=True, exist_ok=True)
    char_tokenizer("0123456789").save_pretrained(folder / "tokenizer")
    rng = random.Random(seed)
    for name, n in (("train.jsonl", rows), ("eval.jsonl", max(8, rows // 4))):
        texts = ["".join(rng.choice("0123456789") for _ in range(rng.randrange(3, 7))) for _ in range(n)]
        _write_jsonl(folder / name, ({"text": t, "label": int(int(t[0]) < 5)} for t in texts))
    return {
        "output_dir": str(folder / "run"),
        "seed": seed,
        "model": {
            "config": dict(TINY_LLAMA),
            "tokenizer": str(folder / "tokenizer"),
            "task": "sequence_classification",
            "num_labels": 2,
        },
        "data": {
            "name": "classification",
            "path": str(folder / "train.jsonl"),
            "eval_path": str(folder / "eval.jsonl"),
            "num_classes": 2,
            "max_length": 16,
        },
        "loss": {"name": "w2s_ce"},
        "update": {"name": "full", "learning_rate": 1e-3, "warmup_steps": 0},
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
