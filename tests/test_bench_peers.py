"""The peers benchmark (aligntk vs TRL SFTTrainer / DPOTrainer) runs end to end at a tiny size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("matplotlib")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "peers" / "run.py"
TINY = ["--steps", "4", "--warmup", "1", "--repeats", "1", "--hidden", "64", "--layers", "2", "--batch-size", "2",
        "--min-len", "40", "--max-len", "60", "--max-length", "64", "--threads", "1"]


def _run(out: Path, *extra: str) -> dict:
    cmd = [sys.executable, str(SCRIPT), *TINY, *extra, "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    for name in ("results.md", "results.json", "loss_curves.png"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "results.json").read_text())
    for key in ("ratio_tokens_per_s", "ratio_peak_memory"):
        assert all(v > 0 for v in summary[key].values()), (key, summary[key])
    assert len(summary["losses"]["aligntk"][0]) == len(summary["losses"]["trl"][0]) == 4
    return summary


def test_peers_sft_tiny(tmp_path: Path) -> None:
    summary = _run(tmp_path, "--rows", "32", "--checkpointing", "off")
    assert summary["checkpointing"] == "gradient checkpointing `off`: aligntk off, TRL off"
    # Same initial weights, data, order and update: the two trainers follow one loss curve.
    assert summary["losses"]["aligntk"][0] == pytest.approx(summary["losses"]["trl"][0], abs=1e-3)


def test_peers_dpo_tiny_loss_curves_agree_at_fp32(tmp_path: Path) -> None:
    """aligntk's dpo (cached reference) and TRL's DPOTrainer (live reference) follow one loss curve.

    At step 1 the policy is the reference, so both losses are log 2; the later steps agree
    only if both compute the same log-probabilities, loss, gradient and update.
    """
    summary = _run(tmp_path, "--method", "dpo", "--lr", "1e-3", "--vocab", "64")
    assert summary["method"] == "dpo" and "precompute_ref_log_probs=False" in summary["reference"]
    aligntk, trl = summary["losses"]["aligntk"][0], summary["losses"]["trl"][0]
    assert aligntk[0] == pytest.approx(0.693147, abs=1e-5)
    assert aligntk == pytest.approx(trl, abs=1e-4)
    assert max(abs(a - aligntk[0]) for a in aligntk) > 1e-3  # the curve moves, so agreement means something
    assert "DPOTrainer" in (tmp_path / "results.md").read_text()


def test_peers_word_tokenizer_and_rows() -> None:
    """--vocab N builds an N-token word-level tokenizer; pairs differ in one token and have one length."""
    sys.path.insert(0, str(SCRIPT.parent))
    from common import encode, make_rows, word_tokenizer

    tok = word_tokenizer(1000)
    assert len(tok) == 1000
    rows = make_rows(20, 30, 60, seed=1, vocab=1000, pairs=True)
    for row in rows:
        p, c = encode(tok, row["prompt"], row["chosen"])
        _, r = encode(tok, row["prompt"], row["rejected"])
        assert 30 <= len(p) + len(c) <= 60 and len(c) == len(r)
        assert sum(a != b for a, b in zip(c, r)) == 1
        assert tok.unk_token_id not in p + c + r


GRPO_TINY = ["--method", "grpo", "--steps", "2", "--warmup", "1", "--repeats", "1", "--hidden", "32", "--layers", "1",
             "--prompts", "2", "--num-generations", "2", "--max-new-tokens", "4", "--max-length", "16", "--threads", "1"]


def test_peers_grpo_addition_reward() -> None:
    """The reward both sides call: half for digits, half for the sum's digits in place, in [0, 1]."""
    sys.path.insert(0, str(SCRIPT.parent))
    from grpo import addition_reward

    assert addition_reward(["23+34="] * 5, ["57", "58", "5a", "", " 57 "]) == [1.0, 0.75, 0.5, 0.0, 1.0]


@pytest.mark.slow  # two fresh processes importing TRL and transformers: about a minute on loaded cores
def test_peers_grpo_tiny(tmp_path: Path) -> None:
    """aligntk's grpo and TRL's GRPOTrainer run side by side; both reward curves are finite and in [0, 1]."""
    done = subprocess.run([sys.executable, str(SCRIPT), *GRPO_TINY, "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    for name in ("results.md", "results.json", "reward_curves.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["method"] == "grpo" and summary["completions_per_step"] == 4
    for key in ("sampled_tokens_per_s", "trained_tokens_per_s", "s_per_step", "peak_memory"):
        stats = summary["ratios"][key]
        assert set(stats) == {"min", "median", "max"} and all(v > 0 for v in stats.values()), (key, stats)
    for fw in ("aligntk", "trl"):
        (curve,) = summary["rewards"][fw]
        assert len(curve) == 2 and all(0.0 <= r <= 1.0 for r in curve), (fw, curve)  # NaN fails both
        assert all(n > 0 for n in summary["sampled_tokens"][fw][0] + summary["trained_tokens"][fw][0])
    assert summary["rewards_in_unit_interval"] is True
    assert "GRPOTrainer" in (tmp_path / "results.md").read_text()
