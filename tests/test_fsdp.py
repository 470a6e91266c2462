"""FSDP2 (``train.distributed: fsdp``): sharded runs end where one process ends, resume exactly,
and save a model transformers loads. Several processes run under ``torchrun`` with gloo on CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from aligntk import AligntkError
from aligntk.testing import read_metrics, run_recipe
from helpers import free_port

FSDP = "train.distributed=fsdp"


def _run(args: list[str], cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _aligntk(recipe: Path, out: Path, *overrides: str, procs: int = 1, resume: bool = False, ok: bool = True):
    launch = [sys.executable, "-m", "aligntk"] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
        "--master_port", str(free_port()), "-m", "aligntk",
    ]
    args = [*launch, "run", str(recipe), f"output_dir={out}", *overrides, *(["--resume"] if resume else [])]
    return _run(args, recipe.parent, ok=ok)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def _max_diff(a: Path, b: Path) -> float:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def _same_losses(a: Path, b: Path, tol: float = 1e-5) -> None:
    ra, rb = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        key = "loss" if x["split"] == "train" else "eval_loss"
        assert abs(x[key] - y[key]) < tol * max(1.0, abs(x[key])), (x, y)


def _cut(run: Path, to: Path) -> Path:
    """A copy of ``run`` as if it had stopped after its step-2 checkpoint (same recipe, new folder)."""
    shutil.copytree(run, to)
    shutil.rmtree(to / "model")
    shutil.rmtree(to / "checkpoints" / "step-00000004")
    saved = yaml.safe_load((to / "recipe.yaml").read_text())
    saved["output_dir"] = str(to)
    (to / "recipe.yaml").write_text(yaml.safe_dump(saved))
    return to


@pytest.fixture(scope="module")
def sft(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One process (plain) and two FSDP2 processes on the same global batch of 4, 4 steps,
    checkpoints at steps 2 and 4. The two-process run accumulates 2 micro-batches of 1."""
    from aligntk.testing import write_tiny_assets

    root = tmp_path_factory.mktemp("fsdp")
    recipe = write_tiny_assets(root / "assets")
    recipe["train"].update(max_steps=4, save_every=2, keep_checkpoints=5)
    path = root / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    one, two = root / "one", root / "two"
    _aligntk(path, one, "train.batch_size=2", "train.grad_accum=2")
    _aligntk(path, two, FSDP, "train.batch_size=1", "train.grad_accum=2", procs=2)
    return {"recipe": path, "one": one, "two": two}


def test_two_fsdp_processes_match_one_process(sft: dict[str, Path]) -> None:
    assert _max_diff(sft["one"], sft["two"]) < 1e-5
    _same_losses(sft["one"], sft["two"])
    a, b = read_metrics(sft["one"]), read_metrics(sft["two"])
    norms = [(x["grad_norm"], y["grad_norm"]) for x, y in zip(a, b) if x["split"] == "train"]
    assert all(abs(x - y) < 1e-5 * max(1.0, x) for x, y in norms)  # the full norm, not one shard's


def test_fsdp_checkpoint_is_sharded_and_the_model_loads(sft: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    step = sft["two"] / "checkpoints" / "step-00000004"
    files = sorted(p.relative_to(step).as_posix() for p in step.rglob("*") if p.is_file())
    assert "sharded/.metadata" in files and {"rng-0.pt", "rng-1.pt", "state.pt", "manifest.json"} <= set(files)
    assert len([f for f in files if f.endswith(".distcp")]) == 2  # one file per process
    manifest = json.loads((step / "manifest.json").read_text())["files"]
    assert set(manifest) == set(files) - {"manifest.json"}
    model = AutoModelForCausalLM.from_pretrained(sft["two"] / "model")
    weights = _weights(sft["two"])
    for name, p in model.state_dict().items():
        if name in weights:
            assert torch.equal(p, weights[name]), name


def test_resumed_fsdp_run_ends_bit_identical(sft: dict[str, Path], tmp_path: Path) -> None:
    resumed = _cut(sft["two"], tmp_path / "resumed")
    _aligntk(sft["recipe"], resumed, FSDP, "train.batch_size=1", "train.grad_accum=2", procs=2, resume=True)
    a, b = _weights(sft["two"]), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    keys = ("step", "loss", "grad_norm", "tokens_seen")
    assert [[r[k] for k in keys] for r in read_metrics(resumed)] == [[r[k] for k in keys] for r in read_metrics(sft["two"])]


def test_one_process_fsdp_is_the_plain_run(tiny: dict[str, Any], tmp_path: Path) -> None:
    plain = run_recipe(tiny, [f"output_dir={tmp_path / 'plain'}"])
    sharded = run_recipe(tiny, [f"output_dir={tmp_path / 'fsdp'}", FSDP])
    assert sharded.last_eval == plain.last_eval
    a, b = _weights(plain.run_dir), _weights(sharded.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_ddp_checkpoint_does_not_resume_under_fsdp(tiny: dict[str, Any], tmp_path: Path) -> None:
    out = [f"output_dir={tmp_path / 'run'}", "train.save_every=1"]
    run_recipe(tiny, out)
    with pytest.raises(AligntkError, match=r"differs from the run's \(train.distributed\)"):
        run_recipe(tiny, [*out, FSDP], resume=True)


def test_fsdp_refuses_fp16_in_one_line(tiny: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(AligntkError, match="fsdp does not support precision fp16"):
        run_recipe(tiny, [f"output_dir={tmp_path / 'run'}", FSDP, "train.precision=fp16"])


# -- slow: other methods, more processes, other process counts on resume -----------------


@pytest.mark.slow
def test_fsdp_resumes_on_another_process_count(sft: dict[str, Path], tmp_path: Path) -> None:
    resumed = _cut(sft["two"], tmp_path / "resumed")
    # The same recipe on one process: DCP reshards the weights and optimizer state.
    _aligntk(sft["recipe"], resumed, FSDP, "train.batch_size=1", "train.grad_accum=2", resume=True)
    assert read_metrics(resumed)[-1]["step"] == 4
    assert (resumed / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_four_fsdp_processes_match_one_process(sft: dict[str, Path], tmp_path: Path) -> None:
    four = tmp_path / "four"
    _aligntk(sft["recipe"], four, FSDP, "train.batch_size=1", "train.grad_accum=1", procs=4)
    assert _max_diff(sft["one"], four) < 1e-5
    _same_losses(sft["one"], four)


def _three_steps_two_processes_match_one(recipe: dict[str, Any], tmp_path: Path, four: bool = False) -> None:
    """3 steps on 2 (and 4) FSDP2 processes against 1 process accumulating the same global batch."""
    recipe["train"].update(max_steps=3)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    one, two = tmp_path / "one", tmp_path / "two"
    _aligntk(path, one, "train.batch_size=2", "train.grad_accum=2")
    _aligntk(path, two, FSDP, "train.batch_size=2", procs=2)
    assert _max_diff(one, two) < 1e-5
    _same_losses(one, two)
    if four:
        _aligntk(path, tmp_path / "four", FSDP, "train.batch_size=1", procs=4)
        assert _max_diff(one, tmp_path / "four") < 1e-5
        _same_losses(one, tmp_path / "four")


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["cached", "live"])
def test_fsdp_dpo_matches_one_process(tmp_path: Path, reference: str) -> None:
    from aligntk.testing import write_preference_assets

    recipe = write_preference_assets(tmp_path / "assets")
    recipe["loss"]["reference"] = reference  # live: the frozen reference runs every step, whole on each process
    _three_steps_two_processes_match_one(recipe, tmp_path, four=reference == "cached")


@pytest.mark.slow
def test_fsdp_packed_sft_matches_one_process(tiny: dict[str, Any], tmp_path: Path) -> None:
    tiny["data"]["packing"] = True
    _three_steps_two_processes_match_one(tiny, tmp_path)


def _reward_model(folder: Path) -> Path:
    """A random-init one-score classifier and its tokenizer: the ``reward_model`` reward for rollouts.

    Its scores vary from completion to completion, so every group has advantages to learn from
    (``exact_answer`` on an untrained policy scores every sample 0, and nothing would be compared).
    """
    from aligntk.testing import char_tokenizer, tiny_classifier

    tok = char_tokenizer("0123456789+=")
    tiny_classifier(tok, num_labels=1, seed=1).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _rollout_recipe(tiny: dict[str, Any], tmp_path: Path, **data: Any) -> Path:
    tiny["data"] = {
        "name": "rollout", "path": tiny["data"]["path"], "num_generations": 4, "max_new_tokens": 3, **data,
    }
    tiny["rewards"] = [{"name": "reward_model", "path": str(_reward_model(tmp_path / "rm"))}]
    tiny["train"].update(max_steps=3, batch_size=2)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny))
    return path


def _same_rollouts(a: Path, b: Path) -> None:
    """The same samples: every step's mean reward and completion length agree."""
    keys = ("reward", "completion_length")
    ra, rb = read_metrics(a), read_metrics(b)
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb):
        assert [x[k] for k in keys] == pytest.approx([y[k] for k in keys], abs=1e-6), (x, y)


@pytest.mark.slow
def test_fsdp_grpo_on_two_and_four_processes_matches_one_process(tiny: dict[str, Any], tmp_path: Path) -> None:
    # Each completion is drawn from its own seed (the run's seed, the step, the prompt), so
    # the rollouts are one process's on any process count, and so is the run.
    tiny["loss"] = {"name": "grpo", "beta": 0.04}
    path = _rollout_recipe(tiny, tmp_path)
    one, two, four = tmp_path / "one", tmp_path / "two", tmp_path / "four"
    _aligntk(path, one, "train.batch_size=1", "train.grad_accum=4")
    _aligntk(path, two, FSDP, "train.batch_size=1", "train.grad_accum=2", procs=2)
    _aligntk(path, four, FSDP, "train.batch_size=1", procs=4)
    assert any(r["grad_norm"] > 1e-3 for r in read_metrics(one))  # something was learned, and compared
    for run in (two, four):
        _same_rollouts(one, run)
        assert _max_diff(one, run) < 1e-5
        _same_losses(one, run)


def test_one_process_fsdp_grpo_samples_and_ends_as_the_plain_run(tiny: dict[str, Any], tmp_path: Path) -> None:
    # One process: the same random stream samples from the gathered replica, so the rollouts
    # and the run are the plain one's, bit for bit.
    tiny["loss"] = {"name": "grpo", "beta": 0.04}
    recipe = yaml.safe_load(_rollout_recipe(tiny, tmp_path).read_text())
    plain = run_recipe(recipe, [f"output_dir={tmp_path / 'plain'}"])
    sharded = run_recipe(recipe, [f"output_dir={tmp_path / 'fsdp'}", FSDP])
    keys = ("loss", "grad_norm", "reward", "completion_length")
    assert [[r[k] for k in keys] for r in read_metrics(sharded.run_dir)] == [
        [r[k] for k in keys] for r in read_metrics(plain.run_dir)
    ]
    a, b = _weights(plain.run_dir), _weights(sharded.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)

@pytest.mark.slow
def test_fsdp_ppo_trains_and_syncs_its_value_head_as_one_process(tiny: dict[str, Any], tmp_path: Path) -> None:
    tiny["loss"] = {"name": "ppo", "vf_coef": 0.5}
    path = _rollout_recipe(tiny, tmp_path, advantage={"name": "gae", "kl_coef": 0.05})
    one, fsdp = tmp_path / "one", tmp_path / "fsdp"
    _aligntk(path, one, "train.batch_size=2", "train.grad_accum=2")
    _aligntk(path, fsdp, FSDP, procs=2)
    _same_rollouts(one, fsdp)
    assert _max_diff(one, fsdp) < 1e-5
    _same_losses(one, fsdp)
    a = load_file(str(one / "model" / "heads.safetensors"))
    b = load_file(str(fsdp / "model" / "heads.safetensors"))
    assert a.keys() == b.keys() and a
    assert max(v.abs().max().item() for v in b.values()) > 0  # the head starts at zero: it was trained
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


@pytest.mark.slow
def test_fsdp_reward_model_matches_one_process(tmp_path: Path) -> None:
    from aligntk.testing import write_preference_assets

    recipe = write_preference_assets(tmp_path / "assets")
    recipe["model"].update(task="sequence_classification", num_labels=1)
    recipe["loss"] = {"name": "reward_model"}
    _three_steps_two_processes_match_one(recipe, tmp_path)


@pytest.mark.slow
def test_fsdp_weak_to_strong_student_matches_one_process(tmp_path: Path) -> None:
    """The strong student of the weak-to-strong protocol: soft labels from a weak model, ``w2s_ce``."""
    from aligntk.testing import write_classification_assets

    recipe = write_classification_assets(tmp_path / "assets")
    rows = [json.loads(x) for x in Path(recipe["data"]["path"]).read_text().splitlines()]
    weak = [{"index": i, "probs": [0.3, 0.7] if r["label"] else [0.8, 0.2]} for i, r in enumerate(rows)]
    (tmp_path / "weak_labels.jsonl").write_text("".join(json.dumps(w) + "\n" for w in weak))
    recipe["data"]["soft_labels_path"] = str(tmp_path / "weak_labels.jsonl")
    _three_steps_two_processes_match_one(recipe, tmp_path)


@pytest.mark.slow
def test_fsdp_lora_with_gradient_checkpointing_matches_one_process(tiny: dict[str, Any], tmp_path: Path) -> None:
    from peft import AutoPeftModelForCausalLM

    tiny["update"] = {"name": "lora", "learning_rate": 3e-3, "warmup_steps": 0, "rank": 4}
    tiny["train"].update(max_steps=3, gradient_checkpointing=True, save_every=3)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny))
    one, two = tmp_path / "one", tmp_path / "two"
    _aligntk(path, one, "train.batch_size=2", "train.grad_accum=2")
    _aligntk(path, two, FSDP, "train.batch_size=2", procs=2)
    a = load_file(str(one / "model" / "adapter_model.safetensors"))
    b = load_file(str(two / "model" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    _same_losses(one, two)
    AutoPeftModelForCausalLM.from_pretrained(two / "model")


@pytest.mark.slow
def test_compiled_fsdp_run_matches_the_plain_one(sft: dict[str, Path], tmp_path: Path) -> None:
    """``train.compile`` around the sharded policy (3 to 4 minutes on CPU: inductor compiles on each process)."""
    compiled = tmp_path / "compiled"
    _aligntk(sft["recipe"], compiled, FSDP, "train.compile=true", "train.batch_size=1", "train.grad_accum=2", procs=2)
    assert _max_diff(sft["two"], compiled) < 1e-4  # inductor orders float sums its own way (9e-6 seen)
    _same_losses(sft["two"], compiled)

@pytest.mark.slow
def test_two_nodes_match_one_node(sft: dict[str, Path], tmp_path: Path) -> None:
    """Two ``torchrun`` launches, one a node (``--nnodes 2 --node_rank 0/1``, rendezvous on
    127.0.0.1), run the fixture's two-process recipe and end where one two-process launch ends."""
    port = free_port()
    out = tmp_path / "nodes"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launches = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
             "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
             "-m", "aligntk", "run", str(sft["recipe"]), f"output_dir={out}", FSDP,
             "train.batch_size=1", "train.grad_accum=2"],
            cwd=sft["recipe"].parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for node in (0, 1)
    ]
    for proc in launches:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-4000:]
    a, b = _weights(sft["two"]), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    keys = ("step", "loss", "grad_norm", "tokens_seen")
    assert [[r[k] for k in keys] for r in read_metrics(out)] == [[r[k] for k in keys] for r in read_metrics(sft["two"])]
