"""BCO's underlying-distribution matching (UDM): a density-ratio weight on the undesirable rows.

When the desirable and the undesirable prompts come from different distributions (thumbs-up
data mostly about writing, thumbs-down mostly about code), BCO (Jung et al. 2024,
https://arxiv.org/abs/2404.04656, section 4.3) reweights each undesirable example by the
density ratio ``p_D(x) / p_U(x)`` of its prompt, estimated with a classifier that tells
desirable prompts from undesirable ones by their embeddings. As TRL's ``BCOTrainer``
(``trl.experimental.bco`` before TRL 1.16):

* the classifier is scikit-learn's ``LogisticRegression(class_weight="balanced")``, fit on up to
  ``prompt_sample_size`` desirable and as many undesirable training prompts, drawn with
  replacement by ``numpy.random.choice`` after seeding numpy with the run's seed (desirable
  first), which is the sample TRL draws;
* an undesirable row's weight is ``clamp(p / (1 - p + 1e-8), min_density_ratio,
  max_density_ratio)`` with ``p`` the classifier's probability that its prompt is desirable;
  a desirable row's weight is 1.

TRL takes the embedding function from the user; a recipe names no code, so here the embedding
is the mean of an encoder's last hidden state over the prompt's tokens (``embed_texts``).

scikit-learn is optional (``pip install 'aligntk[bco-udm]'``) and imported on first use.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, PositiveInt, field_validator, model_validator

from aligntk import ComponentConfig, DataError, LocalFile, RecipeError

log = logging.getLogger("aligntk")

#: The recipe key of the options, for error messages.
KEY = "loss.udm"


# --------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------


def _encoder_types() -> set[str]:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES,
    )

    return set(MODEL_FOR_MASKED_LM_MAPPING_NAMES) | set(MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES)


def encoder_config(folder: Path) -> Any:
    """The transformers config of the text encoder in ``folder`` (local files only, no remote code).

    Raises:
        ValueError: ``folder`` holds no Hugging Face model, or one that is not a text encoder.
    """
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a Hugging Face model folder (no config.json)")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{folder}: transformers cannot read its config ({str(exc).splitlines()[0]})") from None
    if config.model_type not in _encoder_types():
        raise ValueError(
            f"{folder} holds a {config.model_type!r} model, not a text encoder (BERT-like, one that AutoModel "
            "loads with a masked-LM or text-encoding head); UDM embeds prompts with an encoder"
        )
    return config


class UDMConfig(ComponentConfig):
    """Options of BCO's underlying-distribution matching (TRL's ``BCOConfig`` defaults).

    Attributes:
        embedding_model: a local Hugging Face folder with a text encoder and its tokenizer
            (BERT, MPNet, a sentence-transformers model ...), loaded with ``AutoModel`` and
            ``AutoTokenizer``, local files only, ``trust_remote_code`` off. A prompt's embedding
            is the mean of its last hidden state over the prompt's tokens.
        prompt_sample_size: the most desirable (and the most undesirable) training prompts the
            classifier is fit on (TRL's ``prompt_sample_size``).
        min_density_ratio, max_density_ratio: the clamp on the estimated density ratio.
        batch_size: prompts per forward pass of the encoder.
    """

    embedding_model: LocalFile
    prompt_sample_size: PositiveInt = 1024
    min_density_ratio: float = Field(0.5, ge=0)
    max_density_ratio: float = Field(10.0, gt=0)
    batch_size: PositiveInt = 32

    @field_validator("embedding_model")
    @classmethod
    def _is_encoder(cls, value: Path) -> Path:
        encoder_config(value)
        return value

    @model_validator(mode="after")
    def _ordered(self) -> UDMConfig:
        if self.min_density_ratio > self.max_density_ratio:
            raise ValueError(
                f"min_density_ratio ({self.min_density_ratio}) is above max_density_ratio ({self.max_density_ratio})"
            )
        return self


# --------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``hidden`` over the positions ``mask`` keeps (a row with none gives zeros).

    Args:
        hidden: ``[B, T, H]`` an encoder's last hidden state.
        mask: ``[B, T]`` 1 for the prompt's tokens, 0 for padding.

    Returns:
        ``[B, H]`` float32.
    """
    m = mask.to(torch.float32).unsqueeze(-1)
    return (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1)


def density_ratio_weight(prob_desirable: torch.Tensor, min_ratio: float, max_ratio: float) -> torch.Tensor:
    """TRL's ``BCOTrainer._get_udm_weight`` after the classifier: ``clamp(p / (1 - p + 1e-8), min, max)``.

    Args:
        prob_desirable: ``[N]`` the classifier's probability that each prompt is desirable.
        min_ratio, max_ratio: the clamp.

    Returns:
        ``[N]`` weights, in the dtype of ``prob_desirable``.
    """
    return (prob_desirable / (1 - prob_desirable + 1e-8)).clamp(min=min_ratio, max=max_ratio)


def sample_indices(n_desirable: int, n_undesirable: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The prompts TRL fits its classifier on: ``numpy.random.choice(n, size=(min(n, size),))`` (with
    replacement) for the desirable rows, then for the undesirable rows, after ``numpy.random.seed(seed)``
    (what ``transformers.set_seed`` does); a private ``RandomState`` gives the same draws.

    Returns:
        indices into the desirable rows and into the undesirable rows (in data order).
    """
    rng = np.random.RandomState(seed)
    desirable = rng.choice(n_desirable, size=(min(n_desirable, size),))
    undesirable = rng.choice(n_undesirable, size=(min(n_undesirable, size),))
    return desirable, undesirable


def fit_classifier(desirable: torch.Tensor, undesirable: torch.Tensor) -> Any:
    """TRL's density-ratio classifier: ``LogisticRegression(class_weight="balanced")`` on float32
    embeddings, label 1 desirable and 0 undesirable.

    Args:
        desirable, undesirable: ``[N_D, H]`` and ``[N_U, H]`` prompt embeddings.

    Returns:
        the fitted ``sklearn.linear_model.LogisticRegression``.
    """
    LogisticRegression = _logistic_regression()
    x = torch.cat((desirable, undesirable), 0).cpu().float().numpy()
    y = torch.cat((torch.ones_like(desirable[:, 0]), torch.zeros_like(undesirable[:, 0])), 0).cpu().numpy()
    clf = LogisticRegression(class_weight="balanced").fit(x, y)
    scores = (
        clf.score(desirable.cpu().float().numpy(), y[: len(desirable)]),
        clf.score(undesirable.cpu().float().numpy(), y[len(desirable) :]),
    )
    log.info("UDM classifier training accuracy: desirable %.3f, undesirable %.3f", *scores)
    return clf


def prob_desirable(clf: Any, embeddings: torch.Tensor) -> torch.Tensor:
    """``[N]`` the classifier's probability that each of ``embeddings`` ``[N, H]`` is a desirable prompt."""
    if embeddings.shape[0] == 0:
        return embeddings.new_zeros(0)
    prob = clf.predict_proba(embeddings.cpu().float().numpy())[:, 1]
    return torch.as_tensor(prob, dtype=embeddings.dtype, device=embeddings.device)


def _logistic_regression() -> Any:
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        raise RecipeError(
            f"{KEY}: BCO's UDM fits a scikit-learn classifier, which is not installed: pip install 'aligntk[bco-udm]'"
        ) from None
    return LogisticRegression


# --------------------------------------------------------------------------------------
# The encoder and the fitted weights
# --------------------------------------------------------------------------------------


class PromptEmbedder:
    """A frozen text encoder that embeds prompts by the mean of its last hidden state."""

    def __init__(self, folder: Path, batch_size: int, device: torch.device | str = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        try:
            config = encoder_config(folder)
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
            model = AutoModel.from_pretrained(folder, config=config, local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise RecipeError(f"{KEY}.embedding_model: {str(exc).splitlines()[0]}") from None
        self.model = (model.get_encoder() if config.is_encoder_decoder else model).to(device).eval()
        self.model.requires_grad_(False)
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """``[N, H]`` float32 embeddings of ``texts``, tokenized without special tokens (as TRL)."""
        parts = []
        for j in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                list(texts[j : j + self.batch_size]),
                add_special_tokens=False, padding=True, truncation=True, return_tensors="pt",
            )  # fmt: skip
            enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            hidden = self.model(**enc).last_hidden_state
            parts.append(mean_pool(hidden, enc["attention_mask"]).cpu())
        width = int(self.model.config.hidden_size)
        return torch.cat(parts) if parts else torch.zeros(0, width)


class DensityRatio:
    """UDM's weights: the embedder and the classifier fit on the training prompts."""

    def __init__(self, config: UDMConfig, embedder: PromptEmbedder):
        self.config, self.embed = config, embedder
        self.clf: Any = None

    def fit(self, prompts: Sequence[str], desirable: Sequence[bool], seed: int) -> None:
        """Fit the classifier on TRL's sample of the training prompts.

        Raises:
            DataError: the training data has no desirable or no undesirable row.
        """
        _logistic_regression()  # say that scikit-learn is missing before embedding anything
        good = [p for p, d in zip(prompts, desirable) if d]
        bad = [p for p, d in zip(prompts, desirable) if not d]
        for rows, which in ((good, "desirable (label true)"), (bad, "undesirable (label false)")):
            if not rows:
                raise DataError(
                    f"{KEY}: the training data has no {which} rows, so there is no density ratio to estimate; "
                    "remove loss.udm or add such rows"
                )
        i, j = sample_indices(len(good), len(bad), self.config.prompt_sample_size, seed)
        self.clf = fit_classifier(self.embed([good[k] for k in i]), self.embed([bad[k] for k in j]))

    def weights(self, prompts: Sequence[str], desirable: torch.Tensor) -> torch.Tensor:
        """``[B]`` float32 weights: 1 for a desirable row, the clamped density ratio for an undesirable one."""
        if self.clf is None:
            raise RuntimeError("DensityRatio.weights needs fit() first")
        out = torch.ones(len(prompts), dtype=torch.float32)
        rows = torch.nonzero(~desirable.cpu().bool()).flatten().tolist()
        if rows:
            prob = prob_desirable(self.clf, self.embed([prompts[r] for r in rows]))
            c = self.config
            out[rows] = density_ratio_weight(prob, c.min_density_ratio, c.max_density_ratio)
        return out
