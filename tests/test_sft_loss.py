"""The SFT loss against a hand computation, and the loss contract."""

from __future__ import annotations

import math

import torch
from aligntk_sft import SFTLoss, token_nll

from aligntk import Models
from aligntk.testing import char_tokenizer, check_loss_contract, tiny_batch, tiny_model


def test_token_nll_equals_hand_computation_on_output_tokens_only() -> None:
    # Vocabulary of 3; one sequence of 4 tokens: [prompt, prompt, out, out].
    logits = torch.tensor(
        [[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]]]
    )
    labels = torch.tensor([[-100, -100, 2, 1]])
    loss_sum, count = token_nll(logits, labels)

    def nll(row: list[float], target: int) -> float:
        return -(row[target] - math.log(sum(math.exp(v) for v in row)))

    # Position t predicts label t+1: position 1 predicts 2, position 2 predicts 1.
    expected = nll([0.0, 1.0, 0.0], 2) + nll([0.0, 0.0, 3.0], 1)
    assert count.item() == 2
    assert math.isclose(loss_sum.item(), expected, rel_tol=1e-6)


def test_token_nll_upcasts_half_precision_logits() -> None:
    logits = torch.randn(2, 5, 7).to(torch.bfloat16)
    labels = torch.tensor([[-100, 1, 2, 3, -100], [-100, -100, 4, 5, 6]])
    loss_sum, _ = token_nll(logits, labels)
    ref, _ = token_nll(logits.float(), labels)
    assert loss_sum.dtype == torch.float32
    assert torch.equal(loss_sum, ref)


def test_sft_loss_matches_model_and_masks_prompt() -> None:
    tok = char_tokenizer()
    model = tiny_model(tok)
    batch = tiny_batch(tok, [("1+2=", "3"), ("12+30=", "42")])
    loss = SFTLoss(SFTLoss.Config())
    out = loss(Models({"policy": model}), batch)
    # Completion tokens: "3</s>" and "42</s>" -> 2 + 3 labelled tokens.
    assert out.count.item() == 5 == loss.count(batch).item()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logp = torch.log_softmax(logits, -1)
    expected = 0.0
    for b in range(2):
        for t in range(batch["labels"].shape[1] - 1):
            target = batch["labels"][b, t + 1].item()
            if target != -100:
                expected -= logp[b, t, target].item()
    assert math.isclose(out.sum.item(), expected, rel_tol=1e-5)


def test_sft_loss_contract() -> None:
    tok = char_tokenizer()
    batch = tiny_batch(tok, [("1+2=", "3"), ("12+30=", "42"), ("7+7=", "14"), ("0+0=", "0")])
    done = check_loss_contract(SFTLoss(SFTLoss.Config()), Models({"policy": tiny_model(tok)}), batch)
    assert len(done) == 5
