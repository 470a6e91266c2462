"""The harness in ``aligntk.testing``: its batches are the built-in data's, and its loss
check catches losses that learn from prompt or padding tokens, whatever the batch's label
fields and however many forwards the loss runs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from aligntk import ComponentConfig, DataContext, LossOutput, Models
from aligntk.models import frozen_copy
from aligntk.testing import (
    CLASSIFICATION_ROWS,
    PREFERENCE_ROWS,
    char_tokenizer,
    check_loss_contract,
    classification_batch,
    preference_batch,
    read_metrics,
    run_recipe,
    tiny_batch,
    tiny_classifier,
    tiny_model,
    token_label_fields,
    write_classification_assets,
    write_preference_assets,
)
from aligntk.types import Batch

from aligntk_po.data import PreferenceData
from aligntk_po.loss import DPOLoss
from aligntk_sft.loss import SFTLoss
from aligntk_w2s.data import ClassificationData
from aligntk_w2s.loss import W2SCE

IGNORED = "ignored tokens get no gradient"


@pytest.fixture(scope="module")
def tok() -> Any:
    return char_tokenizer()


def _assert_same_batch(ours: Batch, theirs: Batch) -> None:
    assert set(ours) == set(theirs)
    for name, value in theirs.items():
        assert ours[name].dtype == value.dtype, name
        assert torch.equal(ours[name], value), name


# --------------------------------------------------------------------------------------
# The batches are exactly what the built-in data collates
# --------------------------------------------------------------------------------------


def test_preference_batch_is_what_the_preference_data_collates(tok: Any, tmp_path: Path) -> None:
    rows = [(p, c, r, 0.5 * i) for i, (p, c, r) in enumerate(PREFERENCE_ROWS)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r, "margin": m}) + "\n" for p, c, r, m in rows))
    data = PreferenceData(PreferenceData.Config(path=path))
    collated = data.collate(data.load(DataContext(tokenizer=tok, seed=0)).train)
    batch = preference_batch(tok, rows)
    _assert_same_batch(batch, collated)

    # "1+2=" -> "3</s>": 4 prompt tokens labelled -100, then the completion, then padding.
    width = batch["chosen_input_ids"].shape[1]
    assert batch["rejected_input_ids"].shape == (4, width)
    assert batch["chosen_labels"][0].tolist()[:6] == [-100] * 4 + tok("3", add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id
    ]
    assert batch["chosen_labels"][0, 6:].eq(-100).all() and batch["chosen_attention_mask"][0, 6:].eq(0).all()
    assert batch["chosen_input_ids"][0, 6:].eq(tok.pad_token_id).all()


def test_classification_batch_is_what_the_classification_data_collates(tok: Any, tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in CLASSIFICATION_ROWS))
    for options in ({}, {"label_tokens": ["a", "b"]}):
        data = ClassificationData(ClassificationData.Config(path=path, **options))
        collated = data.collate(data.load(DataContext(tokenizer=tok, seed=0)).train)
        _assert_same_batch(classification_batch(tok, label_tokens=options.get("label_tokens")), collated)
    batch = classification_batch(tok)
    assert batch["attention_mask"].sum(1).tolist() == [len(t) for t, _ in CLASSIFICATION_ROWS]  # right padding


def test_token_label_fields_finds_every_per_token_labels_field(tok: Any) -> None:
    assert token_label_fields(tiny_batch(tok)) == ["labels"]
    assert sorted(token_label_fields(preference_batch(tok))) == ["chosen_labels", "rejected_labels"]
    assert token_label_fields(classification_batch(tok)) == []  # soft_labels [B, C], labels_int [B]


# --------------------------------------------------------------------------------------
# Preference losses
# --------------------------------------------------------------------------------------


class _NoOptions(ComponentConfig):
    pass


def _mean_logps(logits: torch.Tensor, input_ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``[B]`` mean log-probability of the next tokens where ``keep [B, T-1]``."""
    logps = logits[:, :-1].float().log_softmax(-1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, logps, 0.0).sum(-1) / keep.sum(-1)


class PairLoss:
    """SimPO-like: ``-log sigmoid(mean logp chosen - mean logp rejected)`` per pair.

    ``prompt_in``: the sides whose average wrongly takes in the prompt tokens (every
    attended next token instead of those with a label). ``joined``: one forward for
    ``[chosen; rejected]`` rather than one per side. ``reference``: subtract the log-probs of
    ``models["reference"]`` run under ``no_grad`` (a third and fourth forward).
    """

    Config = _NoOptions
    requires = frozenset({f"{s}_{n}" for s in ("chosen", "rejected") for n in ("input_ids", "attention_mask", "labels")})
    roles = ("policy",)

    def __init__(self, prompt_in: tuple[str, ...] = (), joined: bool = True, reference: bool = False):
        self.prompt_in, self.joined, self.reference = prompt_in, joined, reference

    def count(self, batch: Batch) -> torch.Tensor:
        return torch.tensor(batch["chosen_input_ids"].shape[0])

    def _logps(self, model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        sides = ("chosen", "rejected")
        if self.joined:
            ids = torch.cat([batch[f"{s}_input_ids"] for s in sides])
            mask = torch.cat([batch[f"{s}_attention_mask"] for s in sides])
            logits = dict(zip(sides, model(input_ids=ids, attention_mask=mask).logits.chunk(2)))
        else:
            logits = {s: model(input_ids=batch[f"{s}_input_ids"], attention_mask=batch[f"{s}_attention_mask"]).logits
                      for s in sides}
        out = {}
        for s in sides:
            if s in self.prompt_in:
                keep = batch[f"{s}_attention_mask"][:, 1:].bool()
            else:
                keep = batch[f"{s}_labels"][:, 1:] != -100
            out[s] = _mean_logps(logits[s], batch[f"{s}_input_ids"], keep)
        return out

    def __call__(self, models: Models, batch: Batch) -> LossOutput:
        policy = self._logps(models.policy, batch)
        margin = policy["chosen"] - policy["rejected"]
        if self.reference:
            with torch.no_grad():
                ref = self._logps(models["reference"], batch)
            margin = margin - (ref["chosen"] - ref["rejected"])
        return LossOutput(sum=-F.logsigmoid(margin).sum(), count=self.count(batch))


def test_built_in_dpo_passes_on_the_preference_batch(tok: Any) -> None:
    models = Models({"policy": tiny_model(tok), "reference": frozen_copy(tiny_model(tok, seed=1))})
    checks = check_loss_contract(DPOLoss(DPOLoss.Config(chunk_size=0)), models, preference_batch(tok))
    assert IGNORED in checks and "micro-batch split gives the same sum and count" in checks


@pytest.mark.parametrize("joined", [True, False], ids=["one forward", "a forward per side"])
def test_a_preference_loss_that_averages_over_the_prompt_fails(tok: Any, joined: bool) -> None:
    models = Models({"policy": tiny_model(tok)})
    batch = preference_batch(tok)
    with pytest.raises(AssertionError, match=r"label -100 received gradient.*chosen_labels row 0"):
        check_loss_contract(PairLoss(prompt_in=("chosen", "rejected"), joined=joined), models, batch)
    # Masking only the chosen side right is still caught, on the rejected rows.
    with pytest.raises(AssertionError, match=r"label -100 received gradient.*rejected_labels row 0"):
        check_loss_contract(PairLoss(prompt_in=("rejected",), joined=joined), models, batch)
    # Before the fix the default label_fields=("labels",) was absent here and the check was skipped.
    checks = check_loss_contract(PairLoss(joined=joined), models, batch)
    assert IGNORED in checks


def test_the_check_stays_exact_with_a_reference_forward_on_the_same_module(tok: Any) -> None:
    # The reference is the policy itself, called under no_grad: its forwards are not the loss's.
    policy = tiny_model(tok)
    models = Models({"policy": policy, "reference": policy})
    batch = preference_batch(tok)
    assert IGNORED in check_loss_contract(PairLoss(joined=False, reference=True), models, batch)
    with pytest.raises(AssertionError, match="rejected_labels"):
        check_loss_contract(PairLoss(prompt_in=("rejected",), joined=False, reference=True), models, batch)


def test_label_fields_overrides_and_is_then_required(tok: Any) -> None:
    models = Models({"policy": tiny_model(tok)})
    batch = preference_batch(tok)
    wrong = PairLoss(prompt_in=("rejected",))
    assert IGNORED in check_loss_contract(wrong, models, batch, label_fields=("chosen_labels",))
    assert IGNORED not in check_loss_contract(wrong, models, batch, label_fields=())
    with pytest.raises(AssertionError, match="label_fields"):
        check_loss_contract(PairLoss(), models, batch, label_fields=("margin",))
    # A reward model returns [B, 1]: there are no token logits to watch, so naming fields fails.
    reward = Models({"policy": tiny_classifier(tok, num_labels=1)})
    from aligntk_po.loss import RewardModelLoss

    rm = RewardModelLoss(RewardModelLoss.Config())
    assert IGNORED not in check_loss_contract(rm, reward, batch)
    with pytest.raises(AssertionError, match="no policy forward"):
        check_loss_contract(rm, reward, batch, label_fields=("chosen_labels", "rejected_labels"))


class LeftPaddedSFT:
    """Correctly masked, but it re-pads the rows on the left before its forward."""

    Config = _NoOptions
    requires = frozenset({"input_ids", "attention_mask", "labels"})
    roles = ("policy",)

    def count(self, batch: Batch) -> torch.Tensor:
        return (batch["labels"][:, 1:] != -100).sum()

    def __call__(self, models: Models, batch: Batch) -> LossOutput:
        shift = (1 - batch["attention_mask"]).sum(1).tolist()
        ids, mask, labels = (
            torch.stack([torch.roll(batch[k][i], s) for i, s in enumerate(shift)])
            for k in ("input_ids", "attention_mask", "labels")
        )
        logits = models.policy(input_ids=ids, attention_mask=mask).logits
        return LossOutput(sum=F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum"),
                          count=self.count(batch))


class TrimmedSFT(SFTLoss):
    """The built-in loss on rows cut to the longest sequence of the batch (extra padding dropped)."""

    def __call__(self, models: Models, batch: Batch) -> LossOutput:
        width = int(batch["attention_mask"].sum(1).max())
        return super().__call__(models, {k: v[:, :width] for k, v in batch.items()})


def test_rows_the_check_cannot_place_fail_loudly(tok: Any) -> None:
    models = Models({"policy": tiny_model(tok)})
    batch = tiny_batch(tok, [("1+2=", "3"), ("12+30=", "42")])
    wide = {k: F.pad(v, (0, 3), value=-100 if k == "labels" else 0) for k, v in batch.items()}
    assert IGNORED in check_loss_contract(TrimmedSFT(SFTLoss.Config(chunk_size=0)), models, wide)
    with pytest.raises(AssertionError, match="not a row of the batch"):
        check_loss_contract(LeftPaddedSFT(), models, tiny_batch(tok))


# --------------------------------------------------------------------------------------
# SFT and classification
# --------------------------------------------------------------------------------------


class PromptSFT:
    """Wrong: next-token cross-entropy over every attended token, prompt included."""

    Config = _NoOptions
    requires = frozenset({"input_ids", "attention_mask", "labels"})
    roles = ("policy",)

    def count(self, batch: Batch) -> torch.Tensor:
        return batch["attention_mask"][:, 1:].sum()

    def __call__(self, models: Models, batch: Batch) -> LossOutput:
        logits = models.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), reduction="sum")
        return LossOutput(sum=loss, count=self.count(batch))


def test_built_in_sft_passes_and_an_sft_loss_with_the_prompt_fails(tok: Any) -> None:
    models = Models({"policy": tiny_model(tok)})
    assert IGNORED in check_loss_contract(SFTLoss(SFTLoss.Config(chunk_size=0)), models, tiny_batch(tok))
    with pytest.raises(AssertionError, match=r"label -100 received gradient.*labels row 0"):
        check_loss_contract(PromptSFT(), models, tiny_batch(tok))


def test_classification_batch_keeps_the_contract_with_w2s_ce(tok: Any) -> None:
    checks = check_loss_contract(W2SCE(W2SCE.Config()), Models({"policy": tiny_classifier(tok)}), classification_batch(tok))
    assert checks == ["finite sum and count", "gradients flow", "micro-batch split gives the same sum and count",
                      "runs under bf16 autocast"]  # no per-token labels: nothing to mask


# --------------------------------------------------------------------------------------
# Asset writers: their recipes run with the built-in components
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("write", [write_preference_assets, write_classification_assets])
def test_asset_recipes_run_two_steps(tmp_path: Path, write: Any) -> None:
    recipe = write(tmp_path / "assets", rows=16)
    result = run_recipe(recipe)
    steps = read_metrics(result.run_dir)
    assert [r["step"] for r in steps] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in steps)
