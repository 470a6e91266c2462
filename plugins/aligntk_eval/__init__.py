"""Built-in evaluators: greedy generation scored by exact match or by the choice it names, and a
classifier's accuracy.

Registered through the ``aligntk`` entry-point group like any third-party plugin, and
imports only aligntk's public API.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from pydantic import Field, NonNegativeInt, PositiveInt

from aligntk import (
    ComponentConfig, DataError, EvaluatorCapabilities, Example, Register, Sample, hookimpl, left_pad, load_metric,
    named_choice,
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
    #: The registered name, for error messages.
    name = "exact_match"

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
        scores = [self.score(p, r) for p, r in zip(predictions, references)]
        self._samples = [
            Sample(
                prompt=tokenizer.decode(examples[i]["prompt_ids"], skip_special_tokens=True),
                completion=predictions[i],
                reference=references[i],
                score=scores[i],
            )
            for i in range(min(self.config.samples, len(examples)))
        ]
        return {self.name: self.summarize(predictions, references, scores)}

    def score(self, prediction: str, reference: str) -> float:
        """One answer's score: 1.0 when equal to the reference after stripping whitespace."""
        return float(prediction.strip() == reference.strip())

    def summarize(self, predictions: list[str], references: list[str], scores: list[float]) -> float:
        """The reported value: ``aligntk.load_metric("exact_match")`` over all answers."""
        return float(load_metric("exact_match").compute(predictions=predictions, references=references)["exact_match"])

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
            raise DataError(f"the {self.name} evaluator got no evaluation examples")
        for i, ex in enumerate(selected):
            missing = EXAMPLE_FIELDS - ex.keys()
            if missing:
                raise DataError(f"evaluation example {i} lacks {sorted(missing)}, needed by {self.name}")
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


class GenerationChoiceMatch(GenerationExactMatch):
    """Greedy-generates an answer to each evaluation prompt and scores the choice it names.

    For chat models that answer in a sentence: ``The word "dismal" is negative.`` is
    right for the reference ``negative``. The answer is read with
    :func:`aligntk.named_choice` (exactly one of ``choices`` as a whole word, case
    ignored; none or several is wrong), the rule the rl plugin's ``choice`` reward uses,
    so a GRPO run is evaluated by what it was rewarded for. Returns
    ``{"choice_match": fraction}``; generation and samples are as in ``exact_match``.
    """

    class Config(GenerationExactMatch.Config):
        """Options of the ``choice_match`` evaluator: those of ``exact_match``, and

        Attributes:
            choices: the possible answers (at least two), such as ``[positive, negative]``.
        """

        choices: list[str] = Field(min_length=2)

    config: Config
    name = "choice_match"

    def score(self, prediction: str, reference: str) -> float:
        """1.0 when the answer names exactly one choice and it is the reference's."""
        answer = named_choice(prediction, self.config.choices)
        return float(answer is not None and answer == named_choice(reference, self.config.choices))

    def summarize(self, predictions: list[str], references: list[str], scores: list[float]) -> float:
        return sum(scores) / len(scores)


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
    register("choice_match", GenerationChoiceMatch)
    register("accuracy", Accuracy)
