"""LoRA runs chained into the next run, loaded by peft, and checkpointed small.

A DPO run whose ``model.path`` is a LoRA SFT run's ``model/`` starts from that SFT model
(base + adapter, continued or merged), and so does its reference: the reward margin is
exactly 0 before the first step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from aligntk_update import load_adapter
from safetensors import safe_open

from aligntk import AligntkError
from aligntk.models import build_model, load_tokenizer
from aligntk.recipe import ModelSpec
from aligntk.testing import (
    InterruptAt,
    char_tokenizer,
    read_metrics,
    run_recipe,
    write_preference_assets,
    write_tiny_assets,
)

LORA = {"name": "lora", "rank": 4, "alpha": 8, "learning_rate": 3e-2, "warmup_steps": 0}


def _ids() -> dict[str, torch.Tensor]:
    tok = char_tokenizer("0123456789+=")
    enc = tok(["12+34=46", "7+8=15"], padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**_ids()).logits


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``model/`` folder of a 4-step LoRA SFT run on a config-built tiny Llama."""
    recipe = write_tiny_assets(tmp_path_factory.mktemp("sft"))
    recipe["update"] = dict(LORA)
    return run_recipe(recipe, ["train.max_steps=4", "train.save_every=2"]).run_dir / "model"


@pytest.mark.parametrize(("adapter", "update"), [("continue", "lora"), ("merge", "full"), ("merge", "lora")])
def test_dpo_from_a_lora_sft_run_starts_from_it_at_zero_margin(
    sft_model: Path, tmp_path: Path, adapter: str, update: str
) -> None:
    spec = ModelSpec(path=str(sft_model), adapter=adapter)  # type: ignore[arg-type]
    loaded = build_model(spec, load_tokenizer(spec, tmp_path), tmp_path)
    sft = _logits(load_adapter(sft_model))
    assert torch.allclose(_logits(loaded), sft, atol=1e-5)  # the SFT model, not the bare base
    with (peft_model := load_adapter(sft_model)).disable_adapter():
        base = _logits(peft_model)
    assert not torch.allclose(base, sft, atol=1e-3)  # the adapter learned something to lose

    recipe = write_preference_assets(tmp_path / "dpo")
    recipe["model"] = {"path": str(sft_model), "adapter": adapter}
    recipe["update"] = dict(LORA) if update == "lora" else {"name": "full", "learning_rate": 1e-3}
    result = run_recipe(recipe, ["train.max_steps=2"])
    first = read_metrics(result.run_dir)[0]
    assert first["rewards/margin"] == 0.0
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0  # reference log-probs = policy's
    if adapter == "continue":  # the same adapter, trained on: no second one
        config = json.loads((result.run_dir / "model" / "adapter_config.json").read_text())
        assert config["r"] == 4


def test_continue_with_a_full_update_is_refused(sft_model: Path, tmp_path: Path) -> None:
    from aligntk import AligntkError

    recipe = write_preference_assets(tmp_path / "dpo")
    recipe["model"] = {"path": str(sft_model), "adapter": "continue"}
    with pytest.raises(AligntkError, match="model.adapter: continue"):
        run_recipe(recipe, ["train.max_steps=1"])


def test_peft_auto_class_loads_the_run_offline_from_anywhere(sft_model: Path, tmp_path: Path) -> None:
    expected = _logits(load_adapter(sft_model))
    torch.save(_ids(), tmp_path / "ids.pt")
    script = (
        "import sys, torch\n"
        "from peft import AutoPeftModelForCausalLM\n"
        "m = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
        "with torch.no_grad(): torch.save(m(**torch.load('ids.pt')).logits, 'out.pt')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", script, str(sft_model)], cwd=tmp_path, env=env, check=True)
    assert torch.allclose(torch.load(tmp_path / "out.pt"), expected, atol=1e-5)


def test_lora_checkpoints_hold_only_the_adapter_and_resume_exactly(tmp_path: Path) -> None:
    recipe = write_tiny_assets(tmp_path / "assets")
    recipe["update"] = dict(LORA)
    common = ["train.max_steps=6", "train.save_every=2", "train.grad_accum=2"]
    full = run_recipe(recipe, [*common, f"output_dir={tmp_path / 'full'}"])
    checkpoint = full.run_dir / "checkpoints" / "step-00000006" / "model.safetensors"
    with safe_open(str(checkpoint), framework="pt") as f:
        names = list(f.keys())
    assert names and all("lora_" in n for n in names)
    base_size = sum(p.stat().st_size for p in (full.run_dir / "model" / "base").glob("*.safetensors"))
    assert checkpoint.stat().st_size < base_size / 5

    broken = tmp_path / "broken"
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, [*common, f"output_dir={broken}"], plugins={"crash": InterruptAt(3)})
    resumed = run_recipe(recipe, [*common, f"output_dir={broken}"], resume=True)
    assert resumed.steps == 6
    a, b = load_adapter(full.run_dir / "model"), load_adapter(broken / "model")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_save_merged_writes_a_plain_model_equal_to_base_plus_adapter(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    recipe = write_tiny_assets(tmp_path)
    recipe["update"] = dict(LORA)
    recipe["model"]["save_merged"] = True
    run_dir = run_recipe(recipe, ["train.max_steps=2"]).run_dir
    merged_dir = run_dir / "model-merged"
    assert (merged_dir / "config.json").is_file() and not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert torch.allclose(_logits(merged), _logits(load_adapter(run_dir / "model")), atol=1e-5)
    assert (run_dir / "model" / "adapter_config.json").is_file()  # the adapter itself is still saved
    manifest = json.loads((run_dir / "aligntk-run.json").read_text())
    assert "model-merged" in json.dumps(manifest)


def test_save_merged_without_a_lora_adapter_is_refused(tmp_path: Path) -> None:
    recipe = write_tiny_assets(tmp_path)
    recipe["model"]["save_merged"] = True
    with pytest.raises(AligntkError, match="model.save_merged: update 'full' trains no LoRA adapter"):
        run_recipe(recipe, ["train.max_steps=1"])
