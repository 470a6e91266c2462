"""The fast paths equal the plain ones: chunked log-probs and padding-free packing."""

from __future__ import annotations

import json
import math
import runpy
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from aligntk_po import DPOLoss, SimPOLoss
from aligntk_sft import SFTLoss
from aligntk_sft.data import SFTData, pack
from helpers import token_logps as from_logits

from aligntk import DataContext, Models, TrainingError
from aligntk.engine import _count_tokens
from aligntk.logprobs import AUTO_MIN_VOCAB, DEFAULT_CHUNK_SIZE, head_logps, resolve_chunk_size, token_logps
from aligntk.models import frozen_copy
from aligntk.testing import (
    char_tokenizer,
    check_loss_contract,
    read_metrics,
    run_recipe,
    tiny_batch,
    tiny_model,
    write_tiny_assets,
)

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
PAIRS = [("1+2=", "3"), ("12+30=", "42"), ("7+7=", "14"), ("0+0=", "0")]
ATOL = 1e-5


@pytest.fixture(scope="module")
def tok() -> Any:
    return char_tokenizer()


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def _assert_close(got: list[torch.Tensor], want: list[torch.Tensor], atol: float = ATOL) -> None:
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=atol, rtol=1e-4)


# --------------------------------------------------------------------------------------
# Chunked log-probs
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1024])
def test_chunked_token_logps_equal_plain_in_value_and_gradient(tok: Any, chunk_size: int) -> None:
    model = tiny_model(tok)
    batch = tiny_batch(tok, PAIRS)  # prompt and padding labels are -100; 3 and 7 divide no length

    def run(size: int) -> tuple[Any, list[torch.Tensor]]:
        out = token_logps(model, batch["input_ids"], batch["attention_mask"], labels=batch["labels"],
                          chunk_size=size, with_entropy=True)
        (out.logps.sum() + out.logps.pow(2).sum()).backward()  # a non-linear use of each log-prob
        return out, _grads(model)

    plain, plain_grads = run(0)
    chunked, chunked_grads = run(chunk_size)
    assert chunked.chunked and not plain.chunked
    torch.testing.assert_close(chunked.logps, plain.logps, atol=ATOL, rtol=0)
    torch.testing.assert_close(chunked.entropy, plain.entropy, atol=ATOL, rtol=0)
    assert torch.equal(chunked.mask, plain.mask)
    assert torch.equal(chunked.mask[:, 1:], batch["labels"][:, 1:] != -100)
    assert chunked.logps.dtype == torch.float32 and chunked.logps[~chunked.mask].abs().sum() == 0
    _assert_close(chunked_grads, plain_grads)


def test_token_logps_of_given_ids_align_with_the_rl_convention(tok: Any) -> None:
    model = tiny_model(tok)
    batch = tiny_batch(tok, PAIRS)
    out = token_logps(model, batch["input_ids"], batch["attention_mask"], chunk_size=5)
    want = from_logits(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                       batch["input_ids"])
    real = batch["attention_mask"].bool()
    real[:, 0] = False  # position 0 predicts nothing: 0 in both
    assert torch.equal(out.mask, real)
    torch.testing.assert_close(out.logps[real], want[real], atol=ATOL, rtol=0)
    assert out.logps[:, 0].abs().sum() == 0


def test_a_head_that_is_not_a_plain_linear_is_checkpointed_per_chunk(tok: Any) -> None:
    model = tiny_model(tok)
    hidden = torch.randn(11, model.config.hidden_size, requires_grad=True)
    targets = torch.randint(0, len(tok), (11,))
    wrapped = torch.nn.Sequential(model.lm_head)  # what a peft-wrapped head looks like: not nn.Linear

    def run(head: torch.nn.Module, size: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        logps, _ = head_logps(hidden, head, targets, size)
        logps.pow(2).sum().backward()
        grads = [hidden.grad.clone(), model.lm_head.weight.grad.clone()]
        hidden.grad, model.lm_head.weight.grad = None, None
        return logps, grads

    whole, whole_grads = run(model.lm_head, 11)
    for head in (model.lm_head, wrapped):
        logps, grads = run(head, 4)
        torch.testing.assert_close(logps, whole, atol=ATOL, rtol=0)
        _assert_close(grads, whole_grads)


def test_an_unrecognized_model_takes_the_plain_path(tok: Any) -> None:
    class Opaque(torch.nn.Module):  # no get_decoder / get_output_embeddings: e.g. a custom wrapper
        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs: Any) -> Any:
            return self.inner(**kwargs)

    model = tiny_model(tok)
    batch = tiny_batch(tok, PAIRS)
    args = (batch["input_ids"], batch["attention_mask"])
    opaque = token_logps(Opaque(model), *args, labels=batch["labels"], chunk_size=4)
    direct = token_logps(model, *args, labels=batch["labels"], chunk_size=4)
    prompt_tuned = model
    prompt_tuned.prepended_positions = 3  # a wrapper with a soft prompt declares it (PeftPolicy does)
    assert not token_logps(prompt_tuned, *args, labels=batch["labels"], chunk_size=4).chunked
    assert not opaque.chunked and direct.chunked
    torch.testing.assert_close(opaque.logps, direct.logps, atol=ATOL, rtol=0)


def test_peft_models_lora_chunked_and_prompt_tuning_plain(tok: Any) -> None:
    from aligntk_update.adapters import PeftPolicy
    from peft import LoraConfig, PromptTuningConfig, get_peft_model

    batch = tiny_batch(tok, PAIRS)
    args = (batch["input_ids"], batch["attention_mask"])
    # LoRA on the head too: the head is then a peft module, and takes the checkpointed path.
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False)
    model = PeftPolicy(get_peft_model(tiny_model(tok), lora))
    results = []
    for size in (0, 3):
        out = token_logps(model, *args, labels=batch["labels"], chunk_size=size)
        out.logps.sum().backward()
        results.append((out, [p.grad.clone() for p in model.parameters() if p.requires_grad]))
        model.zero_grad(set_to_none=True)
    (plain, plain_grads), (chunked, chunked_grads) = results
    assert chunked.chunked
    torch.testing.assert_close(chunked.logps, plain.logps, atol=ATOL, rtol=0)
    _assert_close(chunked_grads, plain_grads)

    soft = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    prompted = PeftPolicy(get_peft_model(tiny_model(tok), soft), virtual_tokens=3)
    out = token_logps(prompted, *args, labels=batch["labels"], chunk_size=3)
    assert not out.chunked and out.logps.shape == batch["input_ids"].shape
    # peft drops position_ids under prompt tuning: packed rows would attend to each other.
    packed = {"input_ids": batch["input_ids"][:1], "labels": batch["labels"][:1],
              "position_ids": torch.arange(batch["input_ids"].shape[1])[None]}
    with pytest.raises(TrainingError, match="prompt tuning"):
        SFTLoss(SFTLoss.Config())(Models({"policy": prompted}), packed)


def test_frozen_reference_gets_chunked_logps_without_a_graph(tok: Any) -> None:
    model = tiny_model(tok)
    batch = tiny_batch(tok, PAIRS)
    out = token_logps(frozen_copy(model), batch["input_ids"], batch["attention_mask"], labels=batch["labels"],
                      chunk_size=4)
    assert out.chunked and not out.logps.requires_grad


# --------------------------------------------------------------------------------------
# Chunked losses
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_chunked_sft_loss_equals_plain(tok: Any, chunk_size: int) -> None:
    model = tiny_model(tok)
    batch = tiny_batch(tok, PAIRS)
    results = []
    for size in (0, chunk_size):
        out = SFTLoss(SFTLoss.Config(chunk_size=size))(Models({"policy": model}), batch)
        out.sum.backward()
        results.append((out, _grads(model)))
    (plain, plain_grads), (chunked, chunked_grads) = results
    assert int(chunked.count) == int(plain.count) == 10
    torch.testing.assert_close(chunked.sum, plain.sum, atol=ATOL, rtol=1e-6)
    _assert_close(chunked_grads, plain_grads)


def test_auto_chunks_large_vocabularies_only(tok: Any) -> None:
    small, large = tiny_model(tok), tiny_model(tok, vocab_size=AUTO_MIN_VOCAB)
    assert resolve_chunk_size(small, "auto") == 0  # the tests' and quickstart's tiny vocabularies
    assert resolve_chunk_size(large, "auto") == DEFAULT_CHUNK_SIZE
    assert resolve_chunk_size(frozen_copy(large), "auto") == DEFAULT_CHUNK_SIZE
    assert resolve_chunk_size(small, 7) == 7
    assert SFTLoss.Config().chunk_size == DPOLoss.Config().chunk_size == SimPOLoss.Config().chunk_size == "auto"
    batch = tiny_batch(tok, PAIRS)
    auto = SFTLoss(SFTLoss.Config())(Models({"policy": large}), batch)
    plain = SFTLoss(SFTLoss.Config(chunk_size=0))(Models({"policy": large}), batch)
    torch.testing.assert_close(auto.sum, plain.sum, atol=ATOL, rtol=1e-6)


def preference_batch(tok: Any) -> dict[str, torch.Tensor]:
    """Two pairs; chosen and rejected padded to one width (as the ``preference`` data does)."""
    prompts = ["1+2=", "12+30="]
    both = tiny_batch(tok, [*zip(prompts, ["3", "42"]), *zip(prompts, ["4", "7"])])
    return {f"{side}_{k}": v[rows] for k, v in both.items() for side, rows in (("chosen", slice(0, 2)),
                                                                                 ("rejected", slice(2, 4)))}


@pytest.mark.parametrize("loss_cls, options", [(DPOLoss, {"reference": "live", "nll_weight": 0.5}),
                                               (DPOLoss, {"reference": "live", "loss_type": "ipo"}),
                                               (SimPOLoss, {})])
def test_chunked_preference_losses_equal_plain(tok: Any, loss_cls: Any, options: dict[str, Any]) -> None:
    model = tiny_model(tok)
    with torch.no_grad():  # move the policy off the reference, so the loss is not at its symmetric point
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    models = Models({"policy": model, "reference": frozen_copy(tiny_model(tok))})
    batch = preference_batch(tok)
    results = []
    for size in (0, 3):
        out = loss_cls(loss_cls.Config(chunk_size=size, **options))(models, batch)
        out.sum.backward()
        results.append((out, _grads(model)))
    (plain, plain_grads), (chunked, chunked_grads) = results
    torch.testing.assert_close(chunked.sum, plain.sum, atol=ATOL, rtol=1e-6)
    for name, value in plain.metrics.items():
        torch.testing.assert_close(chunked.metrics[name], value, atol=ATOL, rtol=1e-5)
    _assert_close(chunked_grads, plain_grads)


def test_cached_reference_logps_are_the_same_chunked(tok: Any) -> None:
    models = Models({"policy": tiny_model(tok), "reference": frozen_copy(tiny_model(tok, seed=1))})
    batch = preference_batch(tok)
    plain = DPOLoss(DPOLoss.Config()).reference_logps(models, batch)
    chunked = DPOLoss(DPOLoss.Config(chunk_size=2)).reference_logps(models, batch)
    for name in plain:
        torch.testing.assert_close(chunked[name], plain[name], atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["sft", "dpo", "simpo"])
def test_loss_contract_holds_when_chunked(tok: Any, kind: str) -> None:
    model = tiny_model(tok)
    if kind == "sft":
        loss: Any = SFTLoss(SFTLoss.Config(chunk_size=3))
        models, batch = Models({"policy": model}), tiny_batch(tok, PAIRS)
    else:
        cls = DPOLoss if kind == "dpo" else SimPOLoss
        loss = cls(cls.Config(chunk_size=3))
        models, batch = Models({"policy": model, "reference": frozen_copy(model)}), preference_batch(tok)
    done = check_loss_contract(loss, models, batch)
    # Chunked, the model returns no [B, T, V] logits to watch, so the ignored-token check is
    # left out; ignored tokens are never even scored (the tests above compare gradients).
    assert done == ["finite sum and count", "gradients flow", "micro-batch split gives the same sum and count",
                    "runs under bf16 autocast"]


# --------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------


def sft_examples(tok: Any, folder: Path, packing: bool) -> tuple[SFTData, list[dict[str, Any]]]:
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in PAIRS))
    data = SFTData(SFTData.Config(path=path, packing=packing))
    return data, data.load(DataContext(tok, seed=0)).train


def test_packed_collate_restarts_positions_and_masks_each_first_label(tok: Any, tmp_path: Path) -> None:
    data, examples = sft_examples(tok, tmp_path, packing=True)
    batch = data.collate(examples)
    lengths = [len(e["input_ids"]) for e in examples]
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask: the model then sees packing
    assert batch["input_ids"].shape == (1, sum(lengths))
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    assert batch["position_ids"][0, starts].tolist() == [0] * len(starts)
    assert batch["position_ids"][0].tolist() == [i for n in lengths for i in range(n)]
    assert batch["labels"][0, starts].tolist() == [-100] * len(starts)
    assert int(_count_tokens(batch)) == sum(lengths)  # the engine's token count: real tokens only
    assert pack(examples)["input_ids"].equal(batch["input_ids"])


@pytest.mark.parametrize("chunk_size, attention", [(0, "sdpa"), (4, "sdpa"), (0, "eager")])
def test_packed_batch_gives_the_padded_loss_count_and_gradients(
    tok: Any, tmp_path: Path, chunk_size: int, attention: str
) -> None:
    padded_data, examples = sft_examples(tok, tmp_path, packing=False)
    padded = padded_data.collate(examples)
    packed = pack(examples)
    model = tiny_model(tok, attn_implementation=attention)
    assert model.config._attn_implementation == attention
    loss = SFTLoss(SFTLoss.Config(chunk_size=chunk_size))
    results = []
    for batch in (padded, packed):
        out = loss(Models({"policy": model}), batch)
        out.sum.backward()
        results.append((out, _grads(model)))
    (pad_out, pad_grads), (pack_out, pack_grads) = results
    assert int(pack_out.count) == int(pad_out.count) == int(loss.count(packed))
    assert int(_count_tokens(packed)) == int(_count_tokens(padded))
    torch.testing.assert_close(pack_out.sum, pad_out.sum, atol=ATOL, rtol=1e-6)
    _assert_close(pack_grads, pad_grads)


def test_loss_contract_holds_for_packed_batches(tok: Any, tmp_path: Path) -> None:
    _, examples = sft_examples(tok, tmp_path, packing=True)
    done = check_loss_contract(SFTLoss(SFTLoss.Config()), Models({"policy": tiny_model(tok)}), pack(examples))
    assert "ignored tokens get no gradient" in done  # each sequence's first label included


# --------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------


def test_recipe_runs_packed_and_chunked_like_padded(tmp_path: Path) -> None:
    recipe = write_tiny_assets(tmp_path)
    recipe["train"]["log_every"] = 1
    plain = run_recipe(recipe, [f"output_dir={tmp_path / 'plain'}"])
    fast = run_recipe(recipe, [f"output_dir={tmp_path / 'fast'}", "data.packing=true", "loss.chunk_size=8"])
    plain_steps, fast_steps = read_metrics(Path(plain.run_dir)), read_metrics(Path(fast.run_dir))
    assert [r["step"] for r in fast_steps] == [1, 2]
    for p, f in zip(plain_steps, fast_steps, strict=True):
        assert f["loss"] == pytest.approx(p["loss"], rel=1e-4)
        assert f["tokens"] == p["tokens"]
    evals = read_metrics(Path(fast.run_dir), split="eval")
    assert evals and math.isclose(evals[-1]["eval_loss"], read_metrics(Path(plain.run_dir), "eval")[-1]["eval_loss"],
                                  rel_tol=1e-4)


def test_kernels_benchmark_smoke_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["run.py", "--smoke", "--out", str(out)])
    runpy.run_path(str(BENCHMARKS / "kernels" / "run.py"), run_name="__main__")
    summary = json.loads((out / "results.json").read_text())
    assert {r["chunk"] for r in summary["loss"]} == {0, 24}
    assert all(r["tokens_per_s"] > 0 for r in summary["packing"])
    assert "packed" in (out / "results.md").read_text()
    monkeypatch.setattr(sys, "argv", ["run.py", "--smoke", "--interleave", "8", "--out", str(out / "inter")])
    runpy.run_path(str(BENCHMARKS / "kernels" / "run.py"), run_name="__main__")
    (row,) = json.loads((out / "inter" / "results.json").read_text())["interleaved"]
    assert row["ratio"] > 0


def test_packing_is_checked_against_the_loss_fields_before_anything_loads(tiny: dict) -> None:
    from aligntk import RecipeError, load_plugins
    from aligntk.recipe import validate_recipe

    registry = load_plugins().registry
    packed = {**tiny, "data": {**tiny["data"], "packing": True}}
    validate_recipe(packed, registry)  # the sft loss reads position_ids when there is no mask
    with pytest.raises(RecipeError, match=r"loss 'dpo' needs batch fields .* that data 'sft' does not provide"):
        validate_recipe({**packed, "loss": {"name": "dpo"}}, registry)


def test_auto_chunking_steps_aside_for_a_compiled_model() -> None:
    from aligntk.logprobs import resolve_chunk_size

    class Compiled(torch.nn.Module):  # what torch.compile returns: the model under _orig_mod
        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self._orig_mod = inner

    model = tiny_model(char_tokenizer(), vocab_size=20000)
    assert resolve_chunk_size(model, "auto") > 0
    assert resolve_chunk_size(Compiled(model), "auto") == 0
    assert resolve_chunk_size(Compiled(model), 64) == 64  # an explicit size is the user's choice
