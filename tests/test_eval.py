"""The shipped exact-match metric and the ``exact_match`` generation evaluator."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pluggy
import pytest
import torch
from pydantic import ValidationError
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

import aligntk_eval
from aligntk.errors import AligntkError, DataError
from aligntk.metrics import available_metrics, load_metric
from aligntk import hookspecs
from aligntk.registry import Registry
from aligntk.testing import char_tokenizer
from aligntk.types import Evaluator
from aligntk_eval import GenerationExactMatch, left_pad

# -- the metric module -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("predictions", "references", "expected"),
    [
        (["68", "7"], ["68", "7"], 1.0),
        (["68", "7"], ["68", "8"], 0.5),
        (["1", "2", "3", "4"], ["4", "3", "2", "1"], 0.0),
        ([" 68\n", "\t7 "], ["68", " 7"], 1.0),  # whitespace at the ends does not count
        (["6 8"], ["68"], 0.0),  # inner whitespace does
    ],
)
def test_exact_match_metric(predictions: list[str], references: list[str], expected: float) -> None:
    result = load_metric("exact_match").compute(predictions=predictions, references=references)
    assert result == {"exact_match": expected}


def test_load_metric_is_cached_per_process() -> None:
    assert load_metric("exact_match") is load_metric("exact_match")


def test_unknown_metric_lists_shipped_ones() -> None:
    assert "exact_match" in available_metrics()
    with pytest.raises(AligntkError, match=r"unknown metric 'bleu'.*exact_match"):
        load_metric("bleu")


# -- the evaluator ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return char_tokenizer("0123456789+=")


def _tiny_causal_lm(kind: str, tok: PreTrainedTokenizerFast) -> PreTrainedModel:
    torch.manual_seed(0)
    special = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    # initializer_range larger than the default 0.02 so logits are well apart: a greedy
    # choice between near-equal logits could flip on float noise and make tests flaky.
    if kind == "llama":
        config = AutoConfig.for_model(
            "llama",
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
            initializer_range=0.5,
            **special,
        )
    else:
        # Learned absolute positions: unlike rotary ones (relative, so blind to a constant
        # shift), these give wrong answers if padding shifts the prompt's positions.
        config = AutoConfig.for_model(
            "gpt2", vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64, initializer_range=0.5,
            **special,
        )
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def llama(tok: PreTrainedTokenizerFast) -> PreTrainedModel:
    return _tiny_causal_lm("llama", tok)


def _examples(tok: PreTrainedTokenizerFast, prompts: Sequence[str], refs: Sequence[str]) -> list[dict[str, Any]]:
    return [{"prompt_ids": tok(p).input_ids, "reference": r} for p, r in zip(prompts, refs)]


PROMPTS = ["1+2=", "23+45=", "7=", "99+99=", "5+50=", "123+4=", "0+0="]


def test_left_pad() -> None:
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_batched_generation_equals_unbatched(tok: PreTrainedTokenizerFast, kind: str) -> None:
    model = _tiny_causal_lm(kind, tok)
    examples = _examples(tok, PROMPTS, [""] * len(PROMPTS))
    evaluator = GenerationExactMatch(GenerationExactMatch.Config(max_new_tokens=8, batch_size=3, stop_at_newline=False))
    batched = evaluator.generate(model, tok, examples)

    # One prompt at a time, no padding at all: what left padding must reproduce.
    expected = []
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex["prompt_ids"]])
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=8,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
            new = out[0, ids.shape[1] :].tolist()
            if tok.eos_token_id in new:
                new = new[: new.index(tok.eos_token_id)]
            expected.append(tok.decode(new, skip_special_tokens=True))

    assert batched == expected
    # The random model must say something for several prompts (it may also stop at once
    # on eos), or the comparison proves little.
    assert sum(len(s) >= 2 for s in expected) >= 2


def test_exact_match_on_model_outputs(tok: PreTrainedTokenizerFast, llama: PreTrainedModel) -> None:
    evaluator = GenerationExactMatch(GenerationExactMatch.Config(max_new_tokens=4, batch_size=4))
    answers = evaluator.generate(llama, tok, _examples(tok, PROMPTS, [""] * len(PROMPTS)))
    # Use two of the model's own answers as references and spoil the rest: 2/7 match.
    refs = [a if i < 2 else a + "x" for i, a in enumerate(answers)]
    result = evaluator(llama, tok, _examples(tok, PROMPTS, refs))
    assert result == {"exact_match": pytest.approx(2 / 7)}
    # With limit=2 only the first two (matching) examples count.
    evaluator.config.limit = 2
    assert evaluator(llama, tok, _examples(tok, PROMPTS, refs)) == {"exact_match": 1.0}


class _Answers(torch.nn.Module):
    """A stand-in model whose ``generate`` appends a fixed answer, then eos, then padding."""

    def __init__(self, answer_ids: list[int], eos_id: int, pad_id: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))  # so the evaluator finds a device
        self.tail = answer_ids + [eos_id, pad_id, pad_id]

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        assert kwargs["do_sample"] is False
        assert (attention_mask.sum(1) > 0).all() and (attention_mask[:, -1] == 1).all()  # left padded
        tail = torch.tensor(self.tail).expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, tail], dim=1)


def test_stub_model_scores(tok: PreTrainedTokenizerFast) -> None:
    model = _Answers(tok("42\n7").input_ids, tok.eos_token_id, tok.pad_token_id)
    examples = _examples(tok, ["40+2=", "2+40=", "1+1="], ["42", " 42 ", "2"])
    evaluator = GenerationExactMatch(GenerationExactMatch.Config(batch_size=2))
    assert evaluator.generate(model, tok, examples) == ["42"] * 3  # cut at the newline
    assert evaluator(model, tok, examples) == {"exact_match": pytest.approx(2 / 3)}

    evaluator.config.stop_at_newline = False
    assert evaluator.generate(model, tok, examples) == ["42\n7"] * 3
    assert evaluator(model, tok, examples) == {"exact_match": 0.0}


def test_choice_match_grades_the_choice_an_answer_names(tok: PreTrainedTokenizerFast) -> None:
    from aligntk_eval import GenerationChoiceMatch

    model = _Answers(tok("42\n7").input_ids, tok.eos_token_id, tok.pad_token_id)
    examples = _examples(tok, ["40+2=", "3+4=", "2+40="], ["42", "7", " 42 "])
    evaluator = GenerationChoiceMatch(GenerationChoiceMatch.Config(choices=["42", "7"], batch_size=2, samples=3))
    assert evaluator(model, tok, examples) == {"choice_match": pytest.approx(2 / 3)}  # "42" each time
    assert [s.score for s in evaluator.samples()] == [1.0, 0.0, 1.0]
    evaluator.config.stop_at_newline = False  # "42\n7" names both choices: wrong everywhere
    assert evaluator(model, tok, examples) == {"choice_match": 0.0}
    with pytest.raises(ValidationError):
        GenerationChoiceMatch.Config(choices=["42"])


def test_bad_examples_and_options(tok: PreTrainedTokenizerFast) -> None:
    model = _Answers([], tok.eos_token_id, tok.pad_token_id)
    evaluator = GenerationExactMatch()
    with pytest.raises(DataError, match="no evaluation examples"):
        evaluator(model, tok, [])
    with pytest.raises(DataError, match=r"example 1 lacks \['reference'\]"):
        evaluator(model, tok, [{"prompt_ids": [5], "reference": "1"}, {"prompt_ids": [5]}])
    with pytest.raises(ValidationError):
        GenerationExactMatch.Config(limit=0)
    with pytest.raises(ValidationError):
        GenerationExactMatch.Config(max_tokens=3)  # unknown keys are errors


def test_plugin_registers_evaluator() -> None:
    # A private manager, not load_plugins: once aligntk is installed its entry point
    # loads this same module, and pluggy refuses to register one object twice.
    pm = pluggy.PluginManager("aligntk")
    pm.add_hookspecs(hookspecs)
    pm.register(aligntk_eval, name="eval-under-test")
    pm.check_pending()  # every hookimpl matches a hookspec
    registry = Registry()
    pm.hook.aligntk_register_evaluators(register=lambda name, cls: registry.add("evaluator", name, cls, "eval"))
    assert registry.get("evaluator", "exact_match", "evaluators[0].name").cls is GenerationExactMatch
    assert isinstance(GenerationExactMatch(), Evaluator)
