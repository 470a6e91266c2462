"""BCO's underlying-distribution matching (``loss.udm``) against TRL's code.

TRL 1.16 no longer ships its BCO trainer (it was ``trl.experimental.bco`` before), so, as in
tests/test_kto.py, the reference is TRL's code copied line for line from
``trl/experimental/bco/bco_trainer.py`` (Apache-2.0, HuggingFace): the sample and the
classifier fit of ``BCOTrainer.__init__`` / ``_get_sample_prompt_embeddings``, and
``_get_chosen_prob``, ``_get_udm_weight`` and ``bco_loss`` called on a stub ``self``
(one process: the accelerator's pad, gather and reduce are the identity).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aligntk import DataError, RecipeError
from aligntk.testing import char_tokenizer, read_metrics, run_recipe, tiny_model, write_tiny_assets
from aligntk_po.kto import BCOLoss, bco_loss, running_mean_update
from aligntk_po.udm import (
    DensityRatio,
    PromptEmbedder,
    UDMConfig,
    density_ratio_weight,
    fit_classifier,
    prob_desirable,
)

pytest.importorskip("sklearn")

CHARS = "0123456789+=-*"
# Desirable prompts are sums, undesirable ones mostly products: different prompt distributions.
GOOD = [f"{a}+{b}=" for a, b in ((1, 2), (12, 30), (5, 5), (7, 8), (3, 41), (9, 9), (20, 1), (6, 14))]
BAD = [f"{a}*{b}=" for a, b in ((2, 3), (4, 4), (11, 2), (7, 7), (3, 9))] + ["8-3=", "15+2="]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT and its tokenizer, saved as a Hugging Face folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("encoder")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *CHARS, *(f"##{d}" for d in "0123456789")]
    tokenizer = BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)})
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64,
    )  # fmt: skip
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------
# TRL's code (trl/experimental/bco/bco_trainer.py), copied verbatim in its arithmetic
# --------------------------------------------------------------------------------------


class _Accelerator:
    process_index = 0

    @staticmethod
    def pad_across_processes(x: torch.Tensor, pad_index: int) -> torch.Tensor:
        return x

    @staticmethod
    def gather(x: torch.Tensor) -> torch.Tensor:
        return x

    @staticmethod
    def reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
        return x


def _trl_sample(n: int, sample_size: int) -> np.ndarray:
    """``_get_sample_prompt_embeddings``'s choice of rows."""
    n_samples = min(n, sample_size)
    return np.random.choice(n, size=(n_samples,))


def _trl_fit(chosen_embeddings: torch.Tensor, rejected_embeddings: torch.Tensor) -> Any:
    """``BCOTrainer.__init__``'s classifier."""
    from sklearn.linear_model import LogisticRegression

    embeddings = torch.cat((chosen_embeddings, rejected_embeddings), dim=0)
    labels = torch.cat((torch.ones_like(chosen_embeddings[:, 0]), torch.zeros_like(rejected_embeddings[:, 0])), dim=0)
    return LogisticRegression(class_weight="balanced").fit(embeddings.cpu().float().numpy(), labels.cpu().numpy())


def _trl_get_chosen_prob(self: Any, prompt_embeddings: torch.Tensor) -> torch.Tensor:
    dtype = prompt_embeddings.dtype
    device = prompt_embeddings.device
    rank = self.accelerator.process_index
    padded_prompt_embeddings = self.accelerator.pad_across_processes(
        prompt_embeddings, pad_index=self.embedding_tokenizer.pad_token_id
    )
    sample_size = padded_prompt_embeddings.shape[0]
    nonzero = padded_prompt_embeddings.mean(dim=1) != self.embedding_tokenizer.pad_token_id
    prompt_embeddings = self.accelerator.gather(padded_prompt_embeddings)
    if prompt_embeddings.shape[0] == 0:
        return torch.tensor([], device=device, dtype=dtype)
    prob = self.clf.predict_proba(prompt_embeddings.cpu().float().numpy())[:, 1]
    prob = torch.as_tensor(prob, dtype=dtype, device=device)
    prob = self.accelerator.reduce(prob, reduction="mean")
    prob = prob[sample_size * rank : sample_size * (rank + 1)]
    prob = prob[nonzero]
    return prob


def _trl_get_udm_weight(self: Any, rejected_embeddings: torch.Tensor) -> torch.Tensor:
    prob_desirable = self._get_chosen_prob(rejected_embeddings)
    min_ratio = self.args.min_density_ratio
    max_ratio = self.args.max_density_ratio
    weight = (prob_desirable / (1 - prob_desirable + 1e-8)).clamp(min=min_ratio, max=max_ratio)
    return weight


def _trl_bco_loss(self: Any, pc: Any, pr: Any, rc: Any, rr: Any, chosen_embeddings: Any, rejected_embeddings: Any):
    """``BCOTrainer.bco_loss`` with ``match_underlying_distribution`` (``do_train=True``), then ``nanmean``."""
    chosen_rewards = self.beta * (pc - rc)
    rejected_rewards = self.beta * (pr - rr)
    self.running.update(torch.cat((chosen_rewards, rejected_rewards), 0).detach())
    delta = torch.as_tensor(self.running.mean, device=chosen_rewards.device)
    chosen_losses = -F.logsigmoid(chosen_rewards - delta)
    rejected_losses = -F.logsigmoid(-(rejected_rewards - delta))
    chosen_weight = torch.ones_like(chosen_losses)
    rejected_weight = self._get_udm_weight(rejected_embeddings)
    losses = torch.cat((chosen_weight * chosen_losses, rejected_weight * rejected_losses), dim=0)
    return losses.nanmean()


def _trl_stub(clf: Any, min_ratio: float, max_ratio: float, beta: float = 0.1) -> SimpleNamespace:
    from test_kto import _TRLRunningMoments

    # TRL drops the rows whose embedding's mean equals the pad id (its marker of padding across
    # processes); a LayerNorm-ed encoder's mean-pooled rows have means near 0, BERT's pad id, and
    # some are exactly 0.0 in float32, which then go missing. With one process nothing is padded,
    # so the stub's pad id is one no mean equals.
    stub = SimpleNamespace(
        accelerator=_Accelerator(), embedding_tokenizer=SimpleNamespace(pad_token_id=-1), clf=clf, beta=beta,
        args=SimpleNamespace(min_density_ratio=min_ratio, max_density_ratio=max_ratio), running=_TRLRunningMoments(),
    )  # fmt: skip
    stub._get_chosen_prob = lambda e: _trl_get_chosen_prob(stub, e)
    stub._get_udm_weight = lambda e: _trl_get_udm_weight(stub, e)
    return stub


# --------------------------------------------------------------------------------------
# (a) the weights, (b) the loss
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sample_size", "seed"), [(5, 3), (1024, 0)])
def test_udm_weights_match_trl(encoder: Path, sample_size: int, seed: int) -> None:
    prompts = GOOD + BAD
    labels = [True] * len(GOOD) + [False] * len(BAD)
    config = UDMConfig(
        embedding_model=encoder, prompt_sample_size=sample_size, min_density_ratio=0.7, max_density_ratio=1.6
    )
    embed = PromptEmbedder(encoder, batch_size=4)
    ours = DensityRatio(config, embed)
    ours.fit(prompts, labels, seed)
    mine = ours.weights(prompts, torch.tensor(labels))

    np.random.seed(seed)  # transformers.set_seed, then TRL draws desirable first
    i, j = _trl_sample(len(GOOD), sample_size), _trl_sample(len(BAD), sample_size)
    clf = _trl_fit(embed([GOOD[k] for k in i]), embed([BAD[k] for k in j]))
    np.testing.assert_allclose(ours.clf.coef_, clf.coef_, rtol=1e-6, atol=1e-8)
    theirs = _trl_get_udm_weight(_trl_stub(clf, 0.7, 1.6), embed(BAD))

    assert torch.equal(mine[: len(GOOD)], torch.ones(len(GOOD)))  # desirable rows keep weight 1, as TRL
    torch.testing.assert_close(mine[len(GOOD) :], theirs, rtol=0, atol=1e-6)
    assert len(set(mine[len(GOOD) :].tolist())) > 1  # the classifier tells the prompts apart


@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_bco_loss_with_udm_matches_trl(beta: float) -> None:
    g = torch.Generator().manual_seed(5)
    emb = torch.randn(16, 6, generator=g, dtype=torch.float64)
    emb[:8] += 0.8
    clf = fit_classifier(emb[:8], emb[8:])
    stub = _trl_stub(clf, 0.5, 10.0, beta)
    mean, count = 0.0, 1e-24
    for _ in range(3):  # over three batches, so the running mean matters
        label = torch.rand(8, generator=g) < 0.5
        label[0], label[1] = True, False
        batch_emb = torch.randn(8, 6, generator=g, dtype=torch.float64) + 0.8 * label[:, None]
        policy = (-torch.rand(8, generator=g, dtype=torch.float64) * 9).requires_grad_()
        ref = -torch.rand(8, generator=g, dtype=torch.float64) * 9
        theirs = _trl_bco_loss(
            stub, policy[label], policy[~label], ref[label], ref[~label], batch_emb[label], batch_emb[~label]
        )
        (their_grad,) = torch.autograd.grad(theirs, policy)
        weight = torch.ones(8, dtype=torch.float64)
        weight[~label] = density_ratio_weight(prob_desirable(clf, batch_emb[~label]), 0.5, 10.0)
        mean, count = running_mean_update(mean, count, beta * (policy - ref))
        ours = bco_loss(policy, ref, label, mean, beta, weight).mean()
        (our_grad,) = torch.autograd.grad(ours, policy)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)  # TRL keeps float32 running steps
        torch.testing.assert_close(our_grad, their_grad, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(weight[~label], torch.ones_like(weight[~label]))


# --------------------------------------------------------------------------------------
# (c) a run
# --------------------------------------------------------------------------------------


def _recipe(folder: Path, encoder: Path) -> dict[str, Any]:
    recipe = write_tiny_assets(folder)
    char_tokenizer(CHARS).save_pretrained(folder / "tokenizer")
    rows = [{"prompt": p, "completion": "1" * (k % 3 + 1), "label": True} for k, p in enumerate(GOOD)]
    rows += [{"prompt": p, "completion": "2" * (k % 3 + 1), "label": False} for k, p in enumerate(BAD)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[::3]))
    recipe["data"] = {
        "name": "unpaired_preference", "path": str(folder / "train.jsonl"), "eval_path": str(folder / "eval.jsonl"),
        "max_length": 16,
    }  # fmt: skip
    recipe["loss"] = {"name": "bco", "udm": {"embedding_model": str(encoder), "batch_size": 4}}
    recipe["train"] = {"max_steps": 2, "batch_size": 8}
    recipe.pop("evaluators", None)
    return recipe


def _setup(loss: BCOLoss, tok: Any, train: list[dict[str, Any]]) -> None:
    """What the engine does for a loss that declares ``setup``: hand it the run's tokenizer, data and seed."""
    from aligntk import DataSplits, LossContext

    loss.setup(LossContext(tokenizer=tok, seed=0, splits=DataSplits(train=train, eval=[]), device=torch.device("cpu")))


def test_bco_udm_run_logs_the_weight(tmp_path: Path, encoder: Path) -> None:
    from safetensors.torch import load_file

    result = run_recipe(_recipe(tmp_path, encoder))  # the engine calls the loss's setup, which fits UDM
    steps = read_metrics(Path(result.run_dir))
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert math.isfinite(r["loss"]) and 0.5 <= r["udm_weight"] <= 10.0
    cached = load_file(str(Path(result.run_dir) / "cache" / "bco-train.safetensors"))
    assert {"ref_logps", "udm_weight"} <= set(cached)
    weights = cached["udm_weight"]
    assert weights.shape == (len(GOOD) + len(BAD),) and int((weights == 1).sum()) >= len(GOOD)
    assert not torch.all(weights == 1)  # the undesirable rows are reweighted
    evals = read_metrics(Path(result.run_dir), split="eval")
    assert evals and all(math.isfinite(r["eval_loss"]) for r in evals)


# --------------------------------------------------------------------------------------
# (d) bad input
# --------------------------------------------------------------------------------------


def _validate(recipe: dict[str, Any]) -> Any:
    from aligntk import load_plugins
    from aligntk.recipe import validate_recipe

    return validate_recipe(recipe, load_plugins().registry)


def test_udm_off_by_default_and_validates(tmp_path: Path, encoder: Path) -> None:
    assert BCOLoss.Config().udm is None
    resolved = _validate(_recipe(tmp_path, encoder))
    udm = resolved.losses[0].config.udm
    assert (udm.prompt_sample_size, udm.min_density_ratio, udm.max_density_ratio) == (1024, 0.5, 10.0)
    assert resolved.losses[0].capabilities.precompute


def test_udm_missing_or_non_encoder_model_names_the_key(tmp_path: Path, encoder: Path) -> None:
    recipe = _recipe(tmp_path, encoder)
    recipe["loss"]["udm"]["embedding_model"] = str(tmp_path / "nowhere")
    with pytest.raises(RecipeError, match=r"loss\.udm\.embedding_model.*not found") as missing:
        _validate(recipe)
    assert "\n" not in str(missing.value).strip()
    tiny_model(char_tokenizer(CHARS)).save_pretrained(tmp_path / "llama")
    recipe["loss"]["udm"]["embedding_model"] = str(tmp_path / "llama")
    with pytest.raises(RecipeError, match=r"loss\.udm\.embedding_model.*'llama' model, not a text encoder"):
        _validate(recipe)
    (tmp_path / "empty").mkdir()
    recipe["loss"]["udm"]["embedding_model"] = str(tmp_path / "empty")
    with pytest.raises(RecipeError, match=r"loss\.udm\.embedding_model.*no config\.json"):
        _validate(recipe)


@pytest.mark.parametrize("label", [True, False])
def test_udm_needs_both_labels(encoder: Path, label: bool) -> None:
    tok = char_tokenizer(CHARS)
    loss = BCOLoss(BCOLoss.Config(udm={"embedding_model": encoder}))
    train = [{"prompt_ids": tok(p)["input_ids"], "completion_ids": [5], "label": label} for p in GOOD]
    which = "undesirable" if label else "desirable"
    with pytest.raises(DataError, match=rf"^loss\.udm: the training data has no {which} \(label"):
        _setup(loss, tok, train)


def test_udm_without_setup_or_sklearn_is_one_line(encoder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = char_tokenizer(CHARS)
    unfit = BCOLoss(BCOLoss.Config(udm={"embedding_model": encoder}, reference="live"))
    batch = {"input_ids": torch.tensor([[5, 6]]), "labels": torch.tensor([[-100, 6]]),
             "attention_mask": torch.ones(1, 2), "label": torch.tensor([False])}  # fmt: skip
    with pytest.raises(RecipeError, match=r"^loss\.udm: the density-ratio classifier is not fit"):
        unfit.precompute(None, batch)
    monkeypatch.setitem(sys.modules, "sklearn.linear_model", None)
    tok = char_tokenizer(CHARS)
    loss = BCOLoss(BCOLoss.Config(udm={"embedding_model": encoder}))
    with pytest.raises(RecipeError, match=r"^loss\.udm: .*scikit-learn.*pip install 'aligntk\[bco-udm\]'"):
        _setup(loss, tok, [{"prompt_ids": [5], "label": True}, {"prompt_ids": [6], "label": False}])
