"""Update steps: freezing, trainable counts, optimizer options, and the L2-SP penalty."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from aligntk_update import L2SP, FullFineTuning, LoRA, PromptTuning
from aligntk_update.freeze import layer_range
from aligntk_update.optim import param_groups
from transformers import AutoModelForCausalLM

from aligntk.errors import AligntkError, RecipeError
from aligntk.models import build_model, load_tokenizer
from aligntk.recipe import ModelSpec
from aligntk.testing import TINY_LLAMA, char_tokenizer, run_recipe, tiny_model

HIDDEN = TINY_LLAMA["hidden_size"]


def _initial_policy(recipe: dict[str, Any]) -> torch.nn.Module:
    """The policy exactly as the engine builds it before training (same seed, same config)."""
    spec = ModelSpec(**recipe["model"])
    tokenizer = load_tokenizer(spec, Path.cwd())
    torch.manual_seed(recipe["seed"])
    return build_model(spec, tokenizer, Path.cwd())


def test_frozen_parameters_are_bit_identical_after_training(tiny: dict[str, Any]) -> None:
    tiny["update"] = {
        "name": "full",
        "learning_rate": 1e-2,
        "weight_decay": 0.1,
        "freeze": ["embed_tokens"],
        "freeze_layers": ":50%",
    }
    run_recipe(tiny, ["train.max_steps=3"])
    before = dict(_initial_policy(tiny).named_parameters())
    after = dict(AutoModelForCausalLM.from_pretrained(Path(tiny["output_dir"]) / "model").named_parameters())
    frozen = [n for n in before if "embed_tokens" in n or ".layers.0." in n]
    moved = [n for n in before if ".layers.1." in n or n.startswith("lm_head")]
    assert frozen and moved
    for name in frozen:
        assert torch.equal(before[name], after[name]), name
    for name in moved:
        assert not torch.equal(before[name], after[name]), name


def test_layer_ranges() -> None:
    assert list(layer_range(":50%", 4)) == [0, 1]
    assert list(layer_range("1:3", 4)) == [1, 2]
    assert list(layer_range("-1:", 4)) == [3]
    assert list(layer_range(":", 4)) == [0, 1, 2, 3]


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_trainable_counts_per_strategy() -> None:
    tok = char_tokenizer()
    vocab, layers = len(tok), TINY_LLAMA["num_hidden_layers"]
    total = sum(p.numel() for p in tiny_model(tok).parameters())

    assert _trainable(FullFineTuning(FullFineTuning.Config()).prepare(tiny_model(tok))) == total
    assert _trainable(L2SP(L2SP.Config()).prepare(tiny_model(tok))) == total
    frozen = FullFineTuning(FullFineTuning.Config(freeze=["embed_tokens"], freeze_layers=":50%"))
    per_layer = sum(p.numel() for n, p in tiny_model(tok).named_parameters() if ".layers.0." in n)
    assert _trainable(frozen.prepare(tiny_model(tok))) == total - vocab * HIDDEN - per_layer

    lora = LoRA(LoRA.Config(rank=4, target_modules=["q_proj", "v_proj"]))
    # Each adapted 64x64 projection gets A [r, 64] and B [64, r].
    assert _trainable(lora.prepare(tiny_model(tok))) == layers * 2 * (4 * HIDDEN + HIDDEN * 4)

    prompt = PromptTuning(PromptTuning.Config(num_virtual_tokens=5))
    assert _trainable(prompt.prepare(tiny_model(tok))) == 5 * HIDDEN
    prompt_lm = PromptTuning(PromptTuning.Config(num_virtual_tokens=5, tune_model=True))
    assert _trainable(prompt_lm.prepare(tiny_model(tok))) == total + 5 * HIDDEN


def test_param_groups_rates_and_decay_exclusions() -> None:
    tok = char_tokenizer()
    config = PromptTuning.Config(
        num_virtual_tokens=4, tune_model=True, learning_rate=1e-4, weight_decay=0.1,
        learning_rates={"prompt_encoder": 3e-2},
    )
    model = PromptTuning(config).prepare(tiny_model(tok))
    groups = param_groups(model, config)
    by_name = {n: (g["lr"], g["weight_decay"]) for g in groups for n in g["names"]}
    assert by_name["peft_model.prompt_encoder.default.embedding.weight"] == (3e-2, 0.1)
    assert by_name["peft_model.base_model.model.layers.0.self_attn.q_proj.weight"] == (1e-4, 0.1)
    assert by_name["peft_model.base_model.model.layers.0.input_layernorm.weight"] == (1e-4, 0.0)
    assert by_name["peft_model.base_model.model.norm.weight"] == (1e-4, 0.0)
    optimizer, _ = PromptTuning(config).configure(model, 10)
    assert sorted(g["lr"] for g in optimizer.param_groups) == [1e-4, 1e-4, 3e-2]


def test_optimizer_choice_and_fused_default() -> None:
    model = tiny_model(char_tokenizer())
    sgd, _ = FullFineTuning(FullFineTuning.Config(optimizer="sgd", momentum=0.9)).configure(model, 10)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9
    adamw, _ = FullFineTuning(FullFineTuning.Config()).configure(model, 10)
    assert isinstance(adamw, torch.optim.AdamW)
    assert not adamw.defaults["fused"]  # CPU tensors: the default kernel
    with pytest.raises(ValueError, match="nesterov"):
        FullFineTuning.Config(nesterov=True)


def test_schedule_steps_shortens_the_schedule() -> None:
    model = tiny_model(char_tokenizer())
    step = FullFineTuning(FullFineTuning.Config(learning_rate=1.0, schedule_steps=4))
    optimizer, scheduler = step.configure(model, total_steps=10)
    rates = []
    for _ in range(6):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]


def test_recipe_options_are_validated(tiny: dict[str, Any]) -> None:
    with pytest.raises(RecipeError, match="update.freeze_layers"):
        run_recipe(tiny, ["update.freeze_layers=lower"])
    with pytest.raises(RecipeError, match="update.r: unknown key"):
        run_recipe({**tiny, "update": {"name": "lora", "r": 4}})


def test_l2sp_penalty_and_gradient_equal_hand_computation() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    step = L2SP(L2SP.Config(alpha=0.3, freeze=["bias"]))
    model = step.prepare(model)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]))
        model.bias.add_(5.0)  # frozen: not part of the anchor
    penalty = step.penalty(model)
    # 0.3 / 2 * (1 + 4 + 0.25 + 0 + 9 + 1)
    assert penalty is not None and torch.allclose(penalty, torch.tensor(0.15 * 15.25))
    penalty.backward()
    assert torch.allclose(model.weight.grad, 0.3 * (model.weight.detach() - start))
    assert model.bias.grad is None


def test_l2sp_run_logs_the_penalty_and_stays_closer(tiny: dict[str, Any]) -> None:
    """The anchored run's weights drift less than the unanchored one's."""
    drift = {}
    for name, extra in (("full", {}), ("l2sp", {"alpha": 50.0})):
        recipe = {**tiny, "output_dir": f"{tiny['output_dir']}-{name}"}
        recipe["update"] = {"name": name, "learning_rate": 1e-2, **extra}
        run_recipe(recipe, ["train.max_steps=4"])
        before = _initial_policy(recipe).state_dict()
        after = AutoModelForCausalLM.from_pretrained(Path(recipe["output_dir"]) / "model").state_dict()
        drift[name] = sum((after[k] - before[k]).pow(2).sum() for k in before).sqrt().item()
    assert drift["l2sp"] < drift["full"]


def test_trainable_count_is_logged_at_prepare(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="aligntk"):
        FullFineTuning(FullFineTuning.Config(freeze=["embed_tokens"])).prepare(tiny_model(char_tokenizer()))
    assert re.search(r"update full: training [\d,]+ of [\d,]+ parameters \(\d", caplog.text)


def test_everything_frozen_is_a_plain_error() -> None:
    step = FullFineTuning(FullFineTuning.Config(freeze=["*"]))
    with pytest.raises(AligntkError, match="update full: no parameter is trainable"):
        step.configure(step.prepare(tiny_model(char_tokenizer())), 10)
