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

FSDP = "train.distributed=fsdp"
_PORT = iter(range(29631, 29700))


def _run(args: list[str], cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _aligntk(recipe: Path, out: Path, *overrides: str, procs: int = 1, resume: bool = False, ok: bool = True):
    launch = [sys.executable, "-m", "aligntk"] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
        "--master_port", str(next(_PORT)), "-m", "aligntk",
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


@pytest.mark.slow
def test_fsdp_dpo_matches_one_process(tmp_path: Path) -> None:
    from aligntk.testing import write_preference_assets

    recipe = write_preference_assets(tmp_path / "assets")
    recipe["train"].update(max_steps=3)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    one, two = tmp_path / "one", tmp_path / "two"
    _aligntk(path, one, "train.batch_size=2", "train.grad_accum=2")
    _aligntk(path, two, FSDP, "train.batch_size=2", procs=2)
    assert _max_diff(one, two) < 1e-5
    _same_losses(one, two)


@pytest.mark.slow
@pytest.mark.xfail(
    run=False,
    reason="not verified: on 2 CPU processes the DDP run of this tiny GRPO recipe finished its steps and wrote its "
    "model, but rank 1 never exited (seen once, not yet diagnosed)",
)
def test_fsdp_grpo_matches_ddp(tiny: dict[str, Any], tmp_path: Path) -> None:
    # Rollouts sample with each process's own generator, so the match is DDP on as many processes.
    tiny["data"] = {
        "name": "rollout", "path": tiny["data"]["path"], "num_generations": 4, "max_new_tokens": 3,
    }
    tiny["rewards"] = [{"name": "exact_answer"}]
    tiny["loss"] = {"name": "grpo", "beta": 0.04}
    tiny["train"].update(max_steps=3, batch_size=2)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny))
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    _aligntk(path, ddp, procs=2)
    _aligntk(path, fsdp, FSDP, procs=2)
    assert _max_diff(ddp, fsdp) < 1e-5
    _same_losses(ddp, fsdp)


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
