"""Third-party plugins installed for real: ``tests/plugins/aligntk-example`` and ``aligntk-broken``.

Both are separate distributions found only through the ``aligntk`` entry-point group,
exactly as a package from PyPI would be. Install them with::

    pip install --no-build-isolation -e tests/plugins/aligntk-example -e tests/plugins/aligntk-broken

``aligntk-example`` adds the loss ``label_smoothed_sft`` and a step hook; ``aligntk-broken``
fails to import, and every command must go on working without it.
"""

from __future__ import annotations

import math
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from pydantic import ValidationError

from aligntk import Models
from aligntk.testing import (
    char_tokenizer,
    check_loss_contract,
    read_metrics,
    run_recipe,
    tiny_batch,
    tiny_model,
    write_tiny_assets,
)

INSTALL = "pip install --no-build-isolation -e tests/plugins/aligntk-example -e tests/plugins/aligntk-broken"

for _dist in ("aligntk-example", "aligntk-broken"):
    try:
        distribution(_dist)
    except PackageNotFoundError:
        pytest.skip(f"test plugin {_dist!r} is not installed; run: {INSTALL}", allow_module_level=True)

import aligntk_example  # noqa: E402  (installed: checked above)
from aligntk_example import LabelSmoothedSFTLoss, LabelSmoothedSFTLossConfig, label_smoothed_nll  # noqa: E402


def aligntk_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed ``aligntk`` command in a fresh process, so plugins are found from scratch."""
    script = Path(sys.executable).parent / "aligntk"
    command = [str(script)] if script.exists() else [sys.executable, "-c", "from aligntk.cli import main; main()"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=300)


def plugin_blocks(listing: str) -> dict[str, list[str]]:
    """``aligntk plugins`` output as header line -> its indented lines (stripped)."""
    blocks: dict[str, list[str]] = {}
    header = None
    for line in listing.splitlines():
        if not line.strip():
            continue
        if line[0].isspace():
            assert header is not None, f"indented line before any plugin: {line!r}"
            blocks[header].append(" ".join(line.split()))
        else:
            header = " ".join(line.split())
            blocks[header] = []
    return blocks


@pytest.fixture
def steps_seen():
    aligntk_example.STEPS.clear()
    yield aligntk_example.STEPS
    aligntk_example.STEPS.clear()


# -- aligntk plugins ----------------------------------------------------------------------


def test_plugins_lists_third_party_broken_and_builtin():
    proc = aligntk_cli("plugins")
    assert proc.returncode == 0, proc.stderr
    blocks = plugin_blocks(proc.stdout)

    assert blocks["example (aligntk-example 0.1.0)"] == [
        "loss label_smoothed_sft",
        "suite example-smoothing",
        "hooks on_step_end",
    ]
    assert blocks["broken (aligntk-broken 0.1.0)"] == [
        "BROKEN: failed to import 'aligntk_broken': RuntimeError: aligntk_broken is broken on purpose"
    ]
    sft = next(lines for header, lines in blocks.items() if header.startswith("sft (aligntk "))
    assert "loss sft" in sft and "data sft" in sft
    assert any(header.startswith("update (aligntk ") for header in blocks)


# -- a run with the third-party loss ------------------------------------------------------


def test_recipe_with_third_party_loss_runs_and_step_hook_sees_steps(tmp_path, steps_seen):
    recipe = write_tiny_assets(tmp_path)
    recipe["loss"] = {"name": "label_smoothed_sft", "epsilon": 0.1}
    result = run_recipe(recipe)

    records = read_metrics(result.run_dir)
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert math.isfinite(record["loss"]) and record["loss"] > 0
        assert math.isfinite(record["nll"]) and record["nll"] > 0  # the loss's own metric is reported
    assert steps_seen == [1, 2]


# -- aligntk validate -----------------------------------------------------------------------


def test_validate_third_party_loss_despite_broken_plugin(tmp_path):
    recipe = write_tiny_assets(tmp_path)
    recipe["loss"] = {"name": "label_smoothed_sft", "epsilon": 0.1}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))

    proc = aligntk_cli("validate", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout and "loss label_smoothed_sft" in proc.stdout
    assert "warning: plugin 'broken' (aligntk-broken) is broken" in proc.stderr
    assert "aligntk_broken is broken on purpose" in proc.stderr


def test_validate_checks_the_third_party_loss_options(tmp_path):
    recipe = write_tiny_assets(tmp_path)
    recipe["loss"] = {"name": "label_smoothed_sft", "epsilon": 1.5}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))

    proc = aligntk_cli("validate", str(path))
    assert proc.returncode == 1
    assert "loss.epsilon" in proc.stderr and "Traceback" not in proc.stderr


# -- the loss itself --------------------------------------------------------------------------


def test_label_smoothed_nll_by_hand():
    # Vocabulary of 2, logits [0, log 3]: p = [1/4, 3/4]. Position 0 predicts label 1 (token 1).
    logits = torch.tensor([[[0.0, math.log(3.0)], [5.0, -5.0]]])  # [1, 2, 2]
    labels = torch.tensor([[-100, 1]])  # [1, 2]; the second position predicts nothing
    eps = 0.2
    loss_sum, nll_sum, count = label_smoothed_nll(logits, labels, eps)
    nll = math.log(4 / 3)
    uniform = (math.log(4) + math.log(4 / 3)) / 2
    assert count.item() == 1
    assert nll_sum.item() == pytest.approx(nll, rel=1e-6)
    assert loss_sum.item() == pytest.approx((1 - eps) * nll + eps * uniform, rel=1e-6)


@pytest.fixture(scope="module")
def tiny():
    tok = char_tokenizer()
    return Models({"policy": tiny_model(tok)}), tiny_batch(tok)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_example_loss_matches_torch_cross_entropy(tiny, eps):
    models, batch = tiny
    loss = LabelSmoothedSFTLoss(LabelSmoothedSFTLossConfig(epsilon=eps))
    with torch.no_grad():
        out = loss(models, batch)
        logits = models.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:].reshape(-1)
    flat = logits[:, :-1].reshape(-1, logits.size(-1)).float()
    expected = F.cross_entropy(flat, targets, ignore_index=-100, label_smoothing=eps, reduction="sum")
    expected_nll = F.cross_entropy(flat, targets, ignore_index=-100, reduction="sum")

    # tiny_batch: "1+2=" -> "3</s>" and "12+30=" -> "42</s>": 2 + 3 output tokens.
    assert out.count.item() == 5 == loss.count(batch).item()
    assert out.sum.dtype == torch.float32
    torch.testing.assert_close(out.sum, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.metrics["nll"], expected_nll, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_example_loss_passes_the_contract(tiny, eps):
    models, batch = tiny
    done = check_loss_contract(LabelSmoothedSFTLoss(LabelSmoothedSFTLossConfig(epsilon=eps)), models, batch)
    assert "ignored tokens get no gradient" in done
    assert "micro-batch split gives the same sum and count" in done


@pytest.mark.parametrize("options", [{"epsilon": 1.0}, {"epsilon": -0.1}, {"smoothing": 0.1}])
def test_example_loss_rejects_bad_options(options):
    with pytest.raises(ValidationError):
        LabelSmoothedSFTLossConfig(**options)


def test_a_plugin_adds_a_command():
    proc = aligntk_cli("example-echo", "hello", "there")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "example: hello there"
    assert "example-echo" in aligntk_cli("--help").stdout
