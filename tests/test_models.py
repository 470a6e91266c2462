"""aligntk.models on its own: building from a config, the tokenizer's pad token, frozen models, saving."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from aligntk import AligntkError
from aligntk.models import Frozen, attach_heads, build_model, frozen_copy, heads_of, load_tokenizer, save_pretrained
from aligntk.recipe import ModelSpec
from aligntk.testing import char_tokenizer, tiny_model

SMALL = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
         "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 32}


@pytest.fixture
def tokenizer_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "tok"
    char_tokenizer("0123456789+=").save_pretrained(folder)
    return folder


def test_a_model_built_from_a_config_is_sized_to_its_tokenizer(tokenizer_dir: Path) -> None:
    spec = ModelSpec(config=SMALL, tokenizer="tok")
    tokenizer = load_tokenizer(spec, tokenizer_dir.parent)  # "tok" is relative to the recipe folder
    model = build_model(spec, tokenizer, tokenizer_dir.parent)
    assert len(tokenizer) == 4 + 12 + 28  # specials, the recipe's characters, the chat template's
    assert model.config.vocab_size == len(tokenizer)
    assert model.get_input_embeddings().weight.shape == (len(tokenizer), 16)
    assert (model.config.pad_token_id, model.config.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)
    assert model.dtype == torch.float32


def test_a_sequence_classifier_gets_its_number_of_labels(tokenizer_dir: Path) -> None:
    spec = ModelSpec(config=SMALL, tokenizer=str(tokenizer_dir), task="sequence_classification", num_labels=1)
    tokenizer = load_tokenizer(spec, tokenizer_dir.parent)
    model = build_model(spec, tokenizer, tokenizer_dir.parent)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.score.weight.shape == (1, 16)


def test_a_tokenizer_without_a_pad_token_is_an_error_unless_the_recipe_names_one(tmp_path: Path) -> None:
    folder = tmp_path / "nopad"
    char_tokenizer(pad=False).save_pretrained(folder)
    with pytest.raises(AligntkError) as info:
        load_tokenizer(ModelSpec(config=SMALL, tokenizer=str(folder)), tmp_path)
    assert str(info.value) == (
        f"model.tokenizer: the tokenizer at {folder} has no pad token; set model.pad_token in the recipe "
        "(for example model.pad_token: '</s>')"
    )
    tokenizer = load_tokenizer(ModelSpec(config=SMALL, tokenizer=str(folder), pad_token="</s>"), tmp_path)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id


def test_a_missing_local_folder_is_named_with_its_key(tmp_path: Path) -> None:
    with pytest.raises(AligntkError) as info:
        load_tokenizer(ModelSpec(config=SMALL, tokenizer="./nowhere"), tmp_path)
    looked = tmp_path / "nowhere"
    assert str(info.value) == f"model.tokenizer: ./nowhere: no such model or tokenizer folder (looked in {looked})"


def test_frozen_stays_in_eval_mode_and_computes_no_gradient() -> None:
    model = tiny_model(char_tokenizer()).train()
    frozen = Frozen(model)
    frozen.train()  # what the engine does to every module at the start of a step
    assert not any(m.training for m in frozen.model.modules())
    assert not any(p.requires_grad for p in frozen.parameters())
    ids = torch.tensor([[5, 6, 7]])
    with torch.enable_grad():
        out = frozen(input_ids=ids)
    assert out.logits.grad_fn is None and not out.logits.requires_grad
    assert frozen.config is model.config  # attributes of the wrapped model pass through


def test_frozen_copy_is_independent_of_the_policy() -> None:
    policy = tiny_model(char_tokenizer()).train()
    reference = frozen_copy(policy)
    before = reference.model.lm_head.weight.clone()
    with torch.no_grad():
        policy.lm_head.weight.add_(1.0)
    assert torch.equal(reference.model.lm_head.weight, before)
    assert policy.training and all(p.requires_grad for p in policy.parameters())  # the policy is untouched
    own = {p.data_ptr() for p in policy.parameters()}
    assert not own & {p.data_ptr() for p in reference.parameters()}


def test_save_pretrained_loads_back_with_auto_classes(tmp_path: Path) -> None:
    tokenizer = char_tokenizer()
    model = tiny_model(tokenizer)
    save_pretrained(model, tokenizer, tmp_path / "model")
    assert not (tmp_path / "model" / "heads.safetensors").exists()  # no heads, no heads file
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    again = AutoTokenizer.from_pretrained(tmp_path / "model")
    assert again("12+3=")["input_ids"] == tokenizer("12+3=")["input_ids"]
    assert again.pad_token == "<pad>"


def test_heads_go_to_heads_safetensors_and_stay_on_the_policy(tmp_path: Path) -> None:
    tokenizer = char_tokenizer()
    model = tiny_model(tokenizer)
    value = torch.nn.Linear(64, 1)
    attach_heads(model, {"value": value})
    save_pretrained(model, tokenizer, tmp_path / "model")
    heads = load_file(str(tmp_path / "model" / "heads.safetensors"))
    assert set(heads) == {"value.weight", "value.bias"}
    assert torch.equal(heads["value.weight"], value.weight.detach())
    weights = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert not any(k.startswith("aligntk_heads") for k in weights)
    assert heads_of(model) == {"value": value}  # put back after saving
    AutoModelForCausalLM.from_pretrained(tmp_path / "model")  # the folder stays a plain Hugging Face model
