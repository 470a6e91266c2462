"""LoRA and prompt tuning through peft: save, reload, merge, and what moves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from aligntk_sft.loss import SFTLoss
from aligntk_update import LoRA, PromptTuning, load_adapter, merge_adapter
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from aligntk import Models, RunInfo, hookimpl
from aligntk.cli import main
from aligntk.testing import char_tokenizer, check_loss_contract, read_metrics, run_recipe, tiny_batch, tiny_model


def _train(policy: torch.nn.Module, batch: dict[str, torch.Tensor], steps: int = 5, lr: float = 3e-2) -> None:
    """A few plain SGD steps on the SFT loss: enough to move every trainable tensor."""
    loss = SFTLoss(SFTLoss.Config())
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        out = loss(Models({"policy": policy}), batch)
        (out.sum / out.count).backward()
        optimizer.step()
        optimizer.zero_grad()


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _trained_lora(tmp_path: Path, base: torch.nn.Module) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    tok = char_tokenizer()
    batch = tiny_batch(tok)
    policy = LoRA(LoRA.Config(rank=4, alpha=8, target_modules="all-linear")).prepare(base)
    _train(policy, batch)
    policy.save_pretrained(tmp_path / "adapter")
    tok.save_pretrained(tmp_path / "adapter")
    return policy, batch


def test_lora_on_a_config_built_model_saves_reloads_and_merges(tmp_path: Path) -> None:
    policy, batch = _trained_lora(tmp_path, tiny_model(char_tokenizer()))
    expected = _logits(policy, batch)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter" / "base" / "model.safetensors").is_file()  # random init: kept for merging
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter" / "base")
    assert not torch.allclose(_logits(base, batch), expected, atol=1e-3)  # the adapter learned something
    assert torch.allclose(_logits(load_adapter(tmp_path / "adapter"), batch), expected, atol=1e-5)
    merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert torch.allclose(_logits(merged, batch), expected, atol=1e-5)


def test_lora_on_a_local_base_model_points_to_it(tmp_path: Path) -> None:
    tiny_model(char_tokenizer()).save_pretrained(tmp_path / "base_model")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base_model")
    policy, batch = _trained_lora(tmp_path, base)
    expected = _logits(policy, batch)
    assert not (tmp_path / "adapter" / "base").exists()
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == tmp_path / "base_model"
    merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    assert torch.allclose(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), batch), expected, atol=1e-5)


def test_lora_run_and_merge_command(tiny: dict[str, Any]) -> None:
    tiny["update"] = {"name": "lora", "rank": 4, "learning_rate": 1e-2, "target_modules": ["q_proj", "v_proj"]}
    run_recipe(tiny, ["train.max_steps=3", "train.save_every=3"])
    run_dir = Path(tiny["output_dir"])
    assert (run_dir / "model" / "adapter_config.json").is_file()
    out = run_dir.parent / "merged"
    result = CliRunner().invoke(main, ["merge", str(run_dir / "model"), str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    batch = tiny_batch(char_tokenizer("0123456789+="), (("1+2=", "3"), ("12+30=", "42")))
    adapter = _logits(load_adapter(run_dir / "model"), batch)
    assert torch.allclose(_logits(AutoModelForCausalLM.from_pretrained(out), batch), adapter, atol=1e-5)


class _StopAt:
    def __init__(self, step: int):
        self.step = step

    @hookimpl
    def aligntk_on_step_end(self, run: RunInfo, step: int, metrics: dict[str, float]) -> str | None:
        return "test stop" if step == self.step else None


def test_lora_resume_matches_an_uninterrupted_run(tiny: dict[str, Any]) -> None:
    from safetensors.torch import load_file

    tiny["update"] = {"name": "lora", "rank": 4, "learning_rate": 1e-2}
    straight = {**tiny, "output_dir": tiny["output_dir"] + "-straight"}
    run_recipe(straight, ["train.max_steps=4"])
    run_recipe(tiny, ["train.max_steps=4", "train.save_every=2"], plugins={"stop": _StopAt(2)})
    run_recipe(tiny, ["train.max_steps=4", "train.save_every=2"], resume=True)
    a = load_file(Path(straight["output_dir"]) / "model" / "adapter_model.safetensors")
    b = load_file(Path(tiny["output_dir"]) / "model" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_merge_refuses_a_prompt_adapter(tmp_path: Path) -> None:
    policy = PromptTuning(PromptTuning.Config(num_virtual_tokens=3)).prepare(tiny_model(char_tokenizer()))
    policy.save_pretrained(tmp_path / "adapter")
    result = CliRunner().invoke(main, ["merge", str(tmp_path / "adapter"), str(tmp_path / "out")])
    assert result.exit_code != 0 and "cannot be folded" in result.output


def test_prompt_tuning_changes_only_the_soft_prompt() -> None:
    tok = char_tokenizer()
    batch = tiny_batch(tok)
    policy = PromptTuning(PromptTuning.Config(num_virtual_tokens=4)).prepare(tiny_model(tok))
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    assert _logits(policy, batch).shape[:2] == batch["input_ids"].shape  # virtual positions dropped
    _train(policy, batch)
    changed = sorted(n for n, p in policy.named_parameters() if not torch.equal(p, before[n]))
    assert changed == ["peft_model.prompt_encoder.default.embedding.weight"]


def test_prompt_tuned_policy_keeps_the_loss_contract() -> None:
    tok = char_tokenizer()
    policy = PromptTuning(PromptTuning.Config(num_virtual_tokens=3)).prepare(tiny_model(tok))
    done = check_loss_contract(SFTLoss(SFTLoss.Config()), Models({"policy": policy}), tiny_batch(tok))
    assert "ignored tokens get no gradient" in done


def test_prompt_tuning_run_with_exact_match(tiny: dict[str, Any]) -> None:
    tiny["update"] = {"name": "prompt_tuning", "num_virtual_tokens": 4, "learning_rate": 3e-2}
    tiny["evaluators"] = [{"name": "exact_match", "max_new_tokens": 3}]
    run_recipe(tiny, ["train.max_steps=3"])
    evals = read_metrics(Path(tiny["output_dir"]), "eval")
    assert [e["step"] for e in evals] == [0, 3]
    assert all("exact_match" in e and "eval_loss" in e for e in evals)
    assert (Path(tiny["output_dir"]) / "model" / "adapter_config.json").is_file()


def test_prompt_plus_lm_tuning_saves_the_trained_model(tmp_path: Path) -> None:
    tok = char_tokenizer()
    batch = tiny_batch(tok)
    policy = PromptTuning(PromptTuning.Config(num_virtual_tokens=3, tune_model=True)).prepare(tiny_model(tok))
    _train(policy, batch)
    policy.save_pretrained(tmp_path / "adapter")
    reloaded = load_adapter(tmp_path / "adapter")
    expected = _logits(policy, batch)
    got = _logits(reloaded, batch)[:, 3:]  # peft's own model still returns the virtual positions
    assert torch.allclose(got, expected, atol=1e-5)


def test_adapters_train_with_gradient_checkpointing(tiny: dict[str, Any]) -> None:
    for i, update in enumerate(({"name": "lora", "rank": 2}, {"name": "prompt_tuning", "num_virtual_tokens": 2})):
        recipe = {**tiny, "output_dir": f"{tiny['output_dir']}-{i}", "update": update}
        run_recipe(recipe, ["train.gradient_checkpointing=true"])
        assert all(r["grad_norm"] > 0 for r in read_metrics(Path(recipe["output_dir"])))
