"""Generation backends for online data: the ``hf`` part, the correction arithmetic, and vLLM.

The tests marked ``vllm`` need the ``vllm`` extra and run in their own virtual
environment (``.ci/run``'s last stage: ``python -m pytest -m vllm``); the others run in
the default suite. vLLM's CPU attention has no kernel for the tiny Llama's head size
(16), so its tests use one attention head of 64.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from aligntk_rl import HFGenerator, RolloutData, Samples
from aligntk_rl.data import RolloutConfig
from aligntk_rl.generators import Correction, hf_weights, sampling_correction

from helpers import Ones, OnesPlugin, assert_same_weights, token_logps

from aligntk import Models, left_pad
from aligntk.testing import char_tokenizer, read_metrics, run_recipe, tiny_model

VLLM_HEADS = {"num_attention_heads": 1, "num_key_value_heads": 1}
#: Small engines: an explicit KV cache, no compilation, so several start in one process.
VLLM_OPTIONS = {"name": "vllm", "kv_cache_memory_bytes": 64 * 2**20, "enforce_eager": True, "max_num_seqs": 64}


def _prompts(tok: Any, n: int = 8) -> list[list[int]]:
    return [tok(f"{a}+{3 * a % 50}=")["input_ids"] for a in range(1, n + 1)]


# --------------------------------------------------------------------------------------
# The generator part and the default backend (default suite)
# --------------------------------------------------------------------------------------


def test_the_generator_option_names_a_registered_part(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "1+1=", "completion": "2"}\n')
    assert RolloutConfig(path=path).generator.name == "hf"
    config = RolloutConfig(path=path, generator={"name": "vllm", "gpu_memory_utilization": 0.2, "correction": "none"})
    assert config.generator.name == "vllm" and config.generator.config.gpu_memory_utilization == 0.2
    generator = config.generator.build()
    assert generator.correction is None and generator.llm is None  # the engine starts on the first sample
    assert "vllm" not in sys.modules or generator.llm is None  # building it imports nothing
    default = RolloutConfig(path=path, generator="vllm").generator.build()
    assert default.correction == Correction("sequence_mask", None, 3.0)  # TRL's defaults
    with pytest.raises(ValueError, match="unknown generator 'vlm'"):
        RolloutConfig(path=path, generator="vlm")
    with pytest.raises(ValueError, match="gpu_memory"):
        RolloutConfig(path=path, generator={"name": "vllm", "gpu_memory": 0.2})
    with pytest.raises(ValueError, match="correction"):
        RolloutConfig(path=path, generator={"name": "vllm", "correction": "token"})


def test_the_hf_generator_at_a_low_temperature_decodes_as_greedy_generate() -> None:
    # Its sampling (seeded Gumbel-max, tests/test_sampling.py) concentrates on the argmax as the
    # temperature falls: the padding, decoding and cutting at EOS are generate's.
    tok = char_tokenizer("0123456789+=")
    model = tiny_model(tok).eval()
    prompts = _prompts(tok)
    sampling = SimpleNamespace(temperature=1e-4, top_p=1.0, max_new_tokens=6)
    samples = HFGenerator(HFGenerator.Config()).sample(model, tok, prompts, sampling)
    ids, mask = left_pad(prompts, tok.pad_token_id)
    generated = model.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=6,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )[:, ids.size(1) :].tolist()
    expected = [r[: r.index(tok.eos_token_id) + 1] if tok.eos_token_id in r else [t for t in r if t != tok.pad_token_id]
                for r in generated]
    assert samples.completions == expected and samples.logps is None


def test_sampling_correction_known_values() -> None:
    # Two completions of two tokens (then padding): log-ratios [0.5, -1] and [2, 0].
    trainer = torch.tensor([[0.0, -1.0, 0.0], [1.0, -2.0, 9.0]])
    sampler = torch.tensor([[-0.5, 0.0, 0.0], [-1.0, -2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    e = math.exp
    got = sampling_correction(trainer, sampler, mask, Correction("token_truncate", None, 3.0))
    torch.testing.assert_close(got, torch.tensor([[e(0.5), e(-1), 0.0], [3.0, 1.0, 0.0]]))
    got = sampling_correction(trainer, sampler, mask, Correction("token_mask", 0.5, 3.0))
    torch.testing.assert_close(got, torch.tensor([[e(0.5), 0.0, 0.0], [0.0, 1.0, 0.0]]))
    got = sampling_correction(trainer, sampler, mask, Correction("sequence_truncate", None, 3.0))
    torch.testing.assert_close(got, torch.tensor([[e(-0.5), e(-0.5), 0.0], [3.0, 3.0, 0.0]]))
    got = sampling_correction(trainer, sampler, mask, Correction("sequence_mask", None, 3.0))
    torch.testing.assert_close(got, torch.tensor([[e(-0.5), e(-0.5), 0.0], [0.0, 0.0, 0.0]]))


def test_pushed_weights_are_the_plain_names_with_lora_merged() -> None:
    from peft import LoraConfig, get_peft_model

    tok = char_tokenizer("0123456789+=")
    plain = tiny_model(tok)
    names = set(plain.state_dict())
    lora = get_peft_model(tiny_model(tok), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)  # a trained adapter: B is no longer 0
    pushed = dict(hf_weights(lora))
    assert set(pushed) == names
    merged = lora.merge_and_unload().state_dict()  # peft's own merge (after reading: it changes the model)
    for name in names:
        torch.testing.assert_close(pushed[name], merged[name], atol=1e-6, rtol=1e-5, msg=name)
    assert dict(hf_weights(plain)).keys() == names


class _FakeSampler:
    """Samples with the policy (hf) and reports its log-probs shifted by ``shift``: a sampler that disagrees."""

    def __init__(self, shift: float, correction: Correction | None):
        self.shift, self.correction = shift, correction

    def sample(self, model: torch.nn.Module, tok: Any, prompts: list[list[int]], sampling: Any, seeds: Any = None) -> Samples:
        completions = HFGenerator(HFGenerator.Config()).sample(model, tok, prompts, sampling, seeds).completions
        logps = []
        for p, comp in zip(prompts, completions):
            ids = torch.tensor([p + comp])
            own = token_logps(model(input_ids=ids).logits, ids)[0, len(p) :].tolist()
            logps.append([x + self.shift for x in own])
        return Samples(completions, logps)


@pytest.mark.parametrize("correction", [None, Correction("token_truncate", None, 3.0)])
def test_a_rollout_from_another_sampler_records_its_old_logps_and_mismatch(tmp_path: Path, correction: Any) -> None:
    tok = char_tokenizer("0123456789+=")
    policy = tiny_model(tok).eval()
    (tmp_path / "p.jsonl").write_text('{"prompt": "1+1=", "completion": "2"}\n')
    data = RolloutData(RolloutConfig(path=tmp_path / "p.jsonl", num_generations=3, max_new_tokens=4))
    data.generator = _FakeSampler(-0.25, correction)
    data.tokenizer, data.rewards, data.reward_names = tok, [(1.0, Ones(Ones.Config()))], ["ones"]
    prompt = {"prompt": "1+1=", "prompt_ids": tok("1+1=")["input_ids"], "reference": "2"}
    with torch.no_grad():
        rows = data.rollout(Models({"policy": policy}), [prompt])
    batch = data.collate(rows)
    mask = (batch["labels"] != -100).float()
    with torch.no_grad():
        own = token_logps(policy(input_ids=batch["input_ids"]).logits, batch["input_ids"]) * mask
    if correction is None:  # the sampler's log-probs are the old ones; the trainer scored nothing
        torch.testing.assert_close(batch["old_logps"], (own - 0.25) * mask, atol=1e-5, rtol=0)
        assert "sampling/importance_ratio" not in batch and "sampling/logp_difference" not in batch
    else:  # the trainer's are, and each token weighs exp(0.25)
        torch.testing.assert_close(batch["old_logps"], own, atol=1e-5, rtol=0)
        torch.testing.assert_close(batch["sampling/importance_ratio"], math.exp(0.25) * mask, atol=1e-5, rtol=0)
        torch.testing.assert_close(batch["sampling/logp_difference"], 0.25 * mask, atol=1e-5, rtol=0)


def test_the_grpo_loss_weights_the_surrogate_by_the_importance_ratio() -> None:
    from aligntk_rl import GRPOLoss

    tok = char_tokenizer("0123456789+=")
    model = tiny_model(tok)
    ids = torch.tensor([tok("1+1=22")["input_ids"], tok("2+2=44")["input_ids"]])
    labels = ids.clone()
    labels[:, :5] = -100
    mask = (labels != -100).float()
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "advantages": torch.tensor([[1.0], [-1.0]]) * mask, "rewards": torch.tensor([1.0, 0.0])}
    loss = GRPOLoss(GRPOLoss.Config(beta=0.0))
    plain = loss(Models({"policy": model}), batch)
    weights = torch.tensor([[2.0], [0.5]]) * mask
    weighted = loss(Models({"policy": model}), {**batch, "sampling/importance_ratio": weights})
    # ratio 1: the per-token surrogate is -A; weighted, -w A.
    assert plain.sum.item() == pytest.approx(-(batch["advantages"]).sum().item(), rel=1e-5)
    assert weighted.sum.item() == pytest.approx(-(batch["advantages"] * weights).sum().item(), rel=1e-5)
    n_tokens = mask.sum()
    assert weighted.metrics["sampling/importance_ratio"][0].item() == pytest.approx((weights * mask).sum().item())
    assert weighted.metrics["sampling/importance_ratio"][1].item() == n_tokens.item()


# --------------------------------------------------------------------------------------
# vLLM (its own venv: pytest -m vllm)
# --------------------------------------------------------------------------------------


def _vllm_generator(**options: Any) -> Any:
    from aligntk_rl.generators import VLLMGenerator

    config = {k: v for k, v in {**VLLM_OPTIONS, **options}.items() if k != "name"}
    return VLLMGenerator(VLLMGenerator.Config(**config))


def _hf_greedy(model: torch.nn.Module, tok: Any, prompts: list[list[int]], n: int) -> list[list[int]]:
    """transformers greedy decoding, one prompt at a time (no padding), cut after EOS."""
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        row = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[0, len(p) :].tolist()
        out.append(row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row)
    return out


@pytest.mark.vllm
def test_vllm_greedy_equals_transformers_before_and_after_a_push() -> None:
    tok = char_tokenizer("0123456789+=")
    model = tiny_model(tok, **VLLM_HEADS).eval()
    prompts = _prompts(tok, 16)
    greedy = SimpleNamespace(temperature=0.0, top_p=1.0, max_new_tokens=10)
    generator = _vllm_generator()
    before = generator.sample(model, tok, prompts, greedy).completions  # starts the engine, first push
    assert before == _hf_greedy(model, tok, prompts, 10)
    assert not generator.push(model)  # unchanged: nothing to push
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    assert generator.push(model)
    after = generator.sample(model, tok, prompts, greedy).completions
    assert after != before  # the engine samples with the new weights ...
    assert after == _hf_greedy(model, tok, prompts, 10)  # ... as transformers does


@pytest.mark.vllm
def test_vllm_greedy_follows_a_lora_policy() -> None:
    from peft import LoraConfig, get_peft_model

    tok = char_tokenizer("0123456789+=")
    model = get_peft_model(tiny_model(tok, **VLLM_HEADS), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    model.eval()
    prompts = _prompts(tok, 16)
    greedy = SimpleNamespace(temperature=0.0, top_p=1.0, max_new_tokens=10)
    got = _vllm_generator().sample(model, tok, prompts, greedy).completions
    assert got == _hf_greedy(model, tok, prompts, 10)


@pytest.mark.vllm
def test_vllm_sampling_logps_are_the_policys_own() -> None:
    tok = char_tokenizer("0123456789+=")
    model = tiny_model(tok, **VLLM_HEADS).eval()
    prompts = _prompts(tok, 16)
    generator = _vllm_generator()
    for temperature in (1.0, 0.7):  # raw log-probs: the model's, whatever the sampling temperature
        samples = generator.sample(model, tok, prompts, SimpleNamespace(temperature=temperature, top_p=1.0, max_new_tokens=12))
        worst = 0.0
        for p, comp, logps in zip(prompts, samples.completions, samples.logps):
            assert len(logps) == len(comp) > 0
            ids = torch.tensor([p + comp])
            with torch.no_grad():
                own = token_logps(model(input_ids=ids).logits, ids)[0, len(p) :]
            worst = max(worst, (own - torch.tensor(logps)).abs().max().item())
        print(f"temperature {temperature}: max |vLLM - policy| log-prob {worst:.2e}")
        assert worst < 1e-4


def _grpo_recipe(tiny: dict[str, Any], generator: Any) -> dict[str, Any]:
    folder = Path(tiny["data"]["path"]).parent
    return {
        **tiny,
        "model": {**tiny["model"], "config": {**tiny["model"]["config"], **VLLM_HEADS}},
        "data": {"name": "rollout", "path": str(folder / "train.jsonl"), "num_generations": 4, "max_new_tokens": 4,
                 "generator": generator},
        "loss": {"name": "grpo", "beta": 0.0},
        "rewards": [{"name": "ones"}],
        "update": {"name": "full", "learning_rate": 1e-2},
    }


@pytest.mark.vllm
def test_a_grpo_run_with_vllm_raises_the_reward_as_with_hf(tiny: dict[str, Any], tmp_path: Path) -> None:
    means = {}
    for name, generator in (("hf", "hf"), ("vllm", VLLM_OPTIONS)):
        recipe = _grpo_recipe(tiny, generator)
        result = run_recipe(recipe, ["train.max_steps=30", "train.batch_size=4", f"output_dir={tmp_path / name}"],
                            plugins={"ones": OnesPlugin()})
        records = read_metrics(result.run_dir)
        rewards = [r["reward"] for r in records]
        means[name] = (sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5)
        print(f"{name}: mean reward, first 5 steps {means[name][0]:.3f}, last 5 {means[name][1]:.3f}")
        assert means[name][1] > means[name][0] + 0.2, rewards
    last = records[-1]  # vllm: the mismatch is logged, and is numerical noise in float32
    print(f"vllm: sampling/logp_difference {last['sampling/logp_difference']:.2e}, "
          f"sampling/importance_ratio {last['sampling/importance_ratio']:.6f}")
    assert last["sampling/logp_difference"] < 1e-4
    assert last["sampling/importance_ratio"] == pytest.approx(1.0, abs=1e-3)


@pytest.mark.vllm
def test_a_resumed_vllm_run_starts_a_new_engine_and_ends_with_the_same_weights(
    tiny: dict[str, Any], tmp_path: Path
) -> None:
    from aligntk.testing import InterruptAt

    recipe = _grpo_recipe(tiny, VLLM_OPTIONS)
    common = ["train.max_steps=6", "train.batch_size=4", "train.save_every=2"]
    plugins = {"ones": OnesPlugin()}
    full = run_recipe(recipe, [*common, f"output_dir={tmp_path / 'full'}"], plugins=plugins)
    broken = tmp_path / "broken"
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, [*common, f"output_dir={broken}"], plugins={**plugins, "crash": InterruptAt(5)})
    resumed = run_recipe(recipe, [*common, f"output_dir={broken}"], plugins=plugins, resume=True)
    # The samples are seeded from the run's torch generator (checkpointed), and the engine
    # started at step 5 is fed the resumed weights: the same samples, the same weights.
    assert_same_weights(full.run_dir, resumed.run_dir)
    tail = {r["step"]: r for r in read_metrics(resumed.run_dir)}
    for r in read_metrics(full.run_dir):
        assert "sampling/importance_ratio" in r  # sampled by vLLM
        assert tail[r["step"]]["reward"] == r["reward"]


@pytest.mark.vllm
def test_gkd_samples_the_student_with_vllm(tiny: dict[str, Any]) -> None:
    from aligntk_rl import GKDData

    folder = Path(tiny["data"]["path"]).parent
    config = {**tiny["model"]["config"], **VLLM_HEADS}
    recipe = {
        **tiny,
        "model": {**tiny["model"], "config": config},
        "models": {"teacher": {"config": {**config, "intermediate_size": 64}, "tokenizer": tiny["model"]["tokenizer"]}},
        "data": {"name": "gkd", "path": str(folder / "train.jsonl"), "max_new_tokens": 4, "lmbda": 1.0,
                 "generator": VLLM_OPTIONS},
        "loss": {"name": "gkd"},
        "update": {"name": "full", "learning_rate": 1e-2},
    }
    sampled: list[int] = []
    sample = GKDData._sample

    def counting(self: Any, generator: Any, model: Any, examples: Any) -> Any:
        sampled.append(type(generator).__name__ == "VLLMGenerator")
        return sample(self, generator, model, examples)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(GKDData, "_sample", counting)
        result = run_recipe(recipe, ["train.max_steps=3", "train.batch_size=2"])
    assert sampled == [True] * 3
    assert [r["on_policy_fraction"] for r in read_metrics(result.run_dir)] == [1.0] * 3


@pytest.mark.vllm
def test_a_lora_grpo_run_pushes_the_merged_adapter(tiny: dict[str, Any], tmp_path: Path) -> None:
    recipe = _grpo_recipe(tiny, VLLM_OPTIONS)
    recipe["update"] = {"name": "lora", "rank": 4, "alpha": 8, "learning_rate": 5e-2, "target_modules": ["q_proj", "v_proj"]}
    result = run_recipe(recipe, ["train.max_steps=4", "train.batch_size=4"], plugins={"ones": OnesPlugin()})
    records = read_metrics(result.run_dir)
    # The trainer (peft's forward: W x + B A x) and vLLM (merged W + B A) agree on every step,
    # so the adapter reached the engine after each optimizer step.
    assert all(r["sampling/logp_difference"] < 1e-4 for r in records), [r["sampling/logp_difference"] for r in records]
    # The adapter moved before the last step, so a later step sampled from pushed, changed weights.
    # (Not "on the last steps": the share-of-1s reward can saturate, every group all 1, no gradient.)
    assert any(r["grad_norm"] > 0 for r in records[:-1]), [r["grad_norm"] for r in records]
