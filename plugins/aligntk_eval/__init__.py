"""Built-in evaluators: greedy generation scored by exact match, and a classifier's accuracy.

Registered through the ``aligntk`` entry-point group like any third-party plugin, and
imports only aligntk's public API.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from pydantic import NonNegativeInt, PositiveInt

from aligntk import (
    ComponentConfig, DataError, EvaluatorCapabilities, Example, Register, Sample, hookimpl, left_pad, load_metric,
)

from .accuracy import Accuracy

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


#: The example fields ``exact_match`` reads: the prompt to generate from and the answer.
EXAMPLE_FIELDS = frozenset({"prompt_ids", "reference"})


class GenerationExactMatch:
    """Greedy-generates an answer to each evaluation prompt and scores exact match.

    Each example needs ``prompt_ids`` (``list[int]``, the tokenized prompt, special tokens
    included as the data component wants them) and ``reference`` (``str``, the expected
    answer). Prompts are left-padded into batches so that every sequence's new tokens
    start at the same column; ``generate`` derives position ids from the attention mask,
    so padding does not shift positions. The score is the fraction of generated answers
    equal to the reference after stripping whitespace (``aligntk.load_metric("exact_match")``).
    The first ``samples`` answers of each call, with their prompts and references, are kept
    for ``samples()``: the engine writes them to the run's ``samples.jsonl``.
    """

    class Config(ComponentConfig):
        """Options of the ``exact_match`` evaluator.

        Attributes:
            max_new_tokens: most tokens generated per answer.
            batch_size: prompts generated together.
            limit: evaluate only the first ``limit`` examples (``None``: all of them).
            stop_at_newline: keep only the first line of each answer, for models that go
                on after the answer instead of ending it with the end-of-sequence token.
            samples: answers shown per evaluation (the first examples, the same ones every
                time) in ``samples.jsonl`` and the logging sinks; 0 shows none.
        """

        max_new_tokens: PositiveInt = 16
        batch_size: PositiveInt = 64
        limit: PositiveInt | None = None
        stop_at_newline: bool = True
        samples: NonNegativeInt = 4

    config: Config

    @classmethod
    def capabilities(cls, config: Config) -> EvaluatorCapabilities:
        return EvaluatorCapabilities(requires=EXAMPLE_FIELDS, samples=config.samples > 0)

    def __init__(self, config: Config | None = None) -> None:
        self.config = config if config is not None else self.Config()
        self._samples: list[Sample] = []

    def __call__(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]
    ) -> dict[str, float]:
        """Generate an answer for each example and return ``{"exact_match": fraction}``.

        Args:
            model: a causal LM with ``generate`` (the engine passes it in eval mode).
            tokenizer: the run's tokenizer, for the pad and end-of-sequence ids and decoding.
            examples: evaluation examples with ``prompt_ids`` and ``reference``.

        Raises:
            DataError: there are no examples, or one lacks a required field.
        """
        examples = self._selected(examples)
        predictions = self.generate(model, tokenizer, examples)
        references = [str(ex["reference"]) for ex in examples]
        result = load_metric("exact_match").compute(predictions=predictions, references=references)
        shown = range(min(self.config.samples, len(examples)))
        self._samples = [
            Sample(
                prompt=tokenizer.decode(examples[i]["prompt_ids"], skip_special_tokens=True),
                completion=predictions[i],
                reference=references[i],
                # The metric's rule, one answer at a time: equal after stripping whitespace.
                score=float(predictions[i].strip() == references[i].strip()),
            )
            for i in shown
        ]
        return {"exact_match": float(result["exact_match"])}

    def samples(self) -> list[Sample]:
        """The first ``samples`` answers of the latest call, with their prompts, references and scores."""
        return list(self._samples)

    @torch.no_grad()
    def generate(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]
    ) -> list[str]:
        """Greedy answers for the (first ``limit``) examples, decoded without special tokens.

        Args:
            model: a causal LM with ``generate``.
            tokenizer: gives ``pad_token_id`` (else ``eos_token_id``) and ``eos_token_id``.
            examples: examples with ``prompt_ids``.

        Returns:
            One answer per selected example, in the examples' order.
        """
        examples = self._selected(examples)
        pad_id, eos_id = _pad_and_eos(tokenizer)
        device = next(model.parameters()).device
        prompts = [list(ex["prompt_ids"]) for ex in examples]
        # Batch prompts of similar length together: less padding, fewer wasted positions.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        answers: list[str] = [""] * len(prompts)
        for start in range(0, len(order), self.config.batch_size):
            idx = order[start : start + self.config.batch_size]
            input_ids, attention_mask = left_pad([prompts[i] for i in idx], pad_id)
            out = model.generate(  # type: ignore[operator]
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=self.config.max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad_id,
                eos_token_id=eos_id,
            )
            new_tokens = out[:, input_ids.shape[1] :].tolist()  # [B, new], same start column for all
            for i, tokens in zip(idx, new_tokens):
                answers[i] = self._decode(tokenizer, tokens, eos_id)
        return answers

    # ----------------------------------------------------------------------------------

    def _selected(self, examples: Sequence[Example]) -> list[Example]:
        n = len(examples) if self.config.limit is None else min(self.config.limit, len(examples))
        # Index rather than slice: slicing some sequences (a datasets.Dataset) gives columns.
        selected = [examples[i] for i in range(n)]
        if len(selected) == 0:
            raise DataError("the exact_match evaluator got no evaluation examples")
        for i, ex in enumerate(selected):
            missing = EXAMPLE_FIELDS - ex.keys()
            if missing:
                raise DataError(f"evaluation example {i} lacks {sorted(missing)}, needed by exact_match")
        return selected

    def _decode(self, tokenizer: PreTrainedTokenizerBase, tokens: list[int], eos_id: int | None) -> str:
        # Cut at the first end-of-sequence token ourselves: generate fills finished rows
        # with the pad id, and a pad token not marked special would otherwise be decoded.
        if eos_id is not None and eos_id in tokens:
            tokens = tokens[: tokens.index(eos_id)]
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if self.config.stop_at_newline:
            text = text.lstrip("\n").split("\n", 1)[0]
        return text


def _pad_and_eos(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int | None]:
    eos_id = tokenizer.eos_token_id
    # Padding positions are masked out, so any id works; eos is the usual stand-in.
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    if pad_id is None:
        raise DataError("the tokenizer has neither a pad nor an end-of-sequence token to pad prompts with")
    return pad_id, eos_id


@hookimpl
def aligntk_register_evaluators(register: Register) -> None:
    register("exact_match", GenerationExactMatch)
    register("accuracy", Accuracy)
