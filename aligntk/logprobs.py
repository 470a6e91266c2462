"""Log-probabilities of given tokens without materializing ``[B, T, V]`` float32 logits.

A causal LM's loss needs, at each labelled position, one number: the log-probability of
the next token. The plain path computes logits for every position and every vocabulary
entry (``[B, T, V]``, upcast to float32: 2 GB for 4 x 1024 tokens of a 128k vocabulary)
and keeps them for the backward pass. Here the model's decoder body runs once, and the
output layer is applied to the hidden states of the labelled positions only, ``chunk_size``
rows at a time, by ``LinearLogps``: a custom autograd function that keeps only the
log-sum-exp of each row and, in the backward pass, recomputes one chunk's logits and
turns them into their gradient in place (a head that is not a plain ``nn.Linear``, such
as a peft-wrapped one, runs each chunk under activation checkpointing instead). Neither
pass holds more than one chunk's logits; the price is one extra output-layer matmul per
chunk. Results are float32, like the plain path.

The model is called through its own ``forward`` (so DDP, peft LoRA and the engine's
frozen wrapper keep working), with ``logits_to_keep=1``; a forward hook on the decoder
body keeps its output. Where the structure is not recognized (no ``get_decoder`` /
``get_output_embeddings``, a model that prepends positions such as prompt tuning's soft
prompt (``prepends_positions``), a head with logit scaling or soft-capping, a
sequence-classification model) the plain logits path runs instead: same results, no saving.

``token_logps`` is the entry point, and the one place that picks the path: a loss passes its
``chunk_size`` option (``ChunkSize``: rows per chunk, ``0`` for the plain path, or ``auto``)::

    out = token_logps(model, batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
    loss_sum = -out.logps.sum()            # SFT: summed NLL of the labelled tokens
    seq_logps = out.logps.sum(-1)          # DPO: [B] summed log-probs per sequence
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeAlias

import torch
from pydantic import Field
from torch.utils.checkpoint import checkpoint

from .models import Frozen, unwrap
from .sequences import IGNORE_INDEX

#: Labelled tokens per output-layer chunk. In benchmarks/kernels (2 x 1024 tokens) it cut
#: the SFT loss's peak memory to 0.49x (32k vocabulary) and 0.41x (131k) of the plain
#: path's at the same or a better step time; 256 cut it further (0.32x, 0.23x). A chunk's
#: float32 logits are 1024 x V x 4 bytes, small beside a GPU micro-batch's B x T x V.
DEFAULT_CHUNK_SIZE = 1024

#: ``chunk_size: auto`` chunks from this vocabulary size up. Below it the logits are small:
#: in benchmarks/kernels chunking saved nothing at 1k entries and 24% of the loss's peak
#: memory at 8k; from 16k on 43% or more, at the same or a better step time.
AUTO_MIN_VOCAB = 16384

#: A loss option: rows per output-layer chunk, ``0`` for the plain path, or ``auto``.
ChunkSize: TypeAlias = Annotated[int, Field(ge=0)] | Literal["auto"]

#: Config fields of heads that do more than ``lm_head(hidden)``; such models take the plain path.
_HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")

log = logging.getLogger(__name__)


@dataclass
class TokenLogps:
    """Per-token log-probabilities, aligned with ``input_ids``.

    Attributes:
        logps: ``[B, T]`` float32; ``logps[b, t] = log p(target[b, t] | input_ids[b, :t])``,
            0 where not computed (position 0, and targets equal to ``-100``).
        mask: ``[B, T]`` bool, the positions computed.
        entropy: ``[B, T]`` float32 entropy of the predictive distribution at ``t - 1``
            (detached, a metric), 0 where not computed; ``None`` unless asked for.
        chunked: whether the chunked path ran (``False``: the plain logits path).
    """

    logps: torch.Tensor
    mask: torch.Tensor
    entropy: torch.Tensor | None = None
    chunked: bool = False


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def token_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    *,
    labels: torch.Tensor | None = None,
    chunk_size: int | Literal["auto"] = DEFAULT_CHUNK_SIZE,
    with_entropy: bool = False,
) -> TokenLogps:
    """Log-probability of each target token given the tokens before it.

    Position ``t`` scores ``targets[:, t]`` with the logits at ``t - 1`` (the Hugging Face
    label convention; the shift happens here). Targets are ``labels`` when given, else
    ``input_ids`` at the positions ``attention_mask`` marks as real.

    Args:
        model: a causal LM (possibly wrapped: DDP, peft, ``aligntk.models.Frozen``).
        input_ids: ``[B, T]``.
        attention_mask: ``[B, T]`` 1 for real tokens, or ``None`` (packed rows: pass
            ``position_ids`` restarting at 0 for each sequence instead).
        position_ids: ``[B, T]`` or ``None``.
        labels: ``[B, T]`` target ids, ``-100`` where nothing is scored (prompt, padding).
        chunk_size: labelled tokens per output-layer chunk; ``0`` runs the plain path
            (full ``[B, T, V]`` logits); ``auto`` chooses for this model
            (``resolve_chunk_size``), so a loss passes its ``chunk_size`` option as it is.
        with_entropy: also return the (detached) entropy at each computed position.

    Returns:
        ``TokenLogps`` with ``logps`` ``[B, T]`` float32 (differentiable).
    """
    chunk_size = resolve_chunk_size(model, chunk_size)
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 0, got {chunk_size}")
    targets = _targets(input_ids, attention_mask, labels)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    found = _body_and_head(model) if chunk_size > 0 else None
    hidden = _decoder_hidden(model, found[0], found[1], inputs) if found is not None else None
    if hidden is None:
        logits = model(**_present(inputs), use_cache=False).logits
        return logps_from_logits(logits, targets, with_entropy)
    assert found is not None
    mask = targets[:, 1:] != IGNORE_INDEX
    picked, entropy = head_logps(hidden[:, :-1][mask], found[1], targets[:, 1:][mask], chunk_size, with_entropy)
    return TokenLogps(
        logps=_scatter(picked, mask),
        mask=_pad_left(mask),
        entropy=_scatter(entropy, mask) if entropy is not None else None,
        chunked=True,
    )


def resolve_chunk_size(model: torch.nn.Module, chunk_size: int | str) -> int:
    """The chunk size to use for ``model``: ``auto`` becomes ``DEFAULT_CHUNK_SIZE`` for a
    recognized causal LM with at least ``AUTO_MIN_VOCAB`` output entries, else ``0``
    (also ``0`` for a model compiled with ``torch.compile``).
    """
    if chunk_size != "auto":
        return int(chunk_size)
    if hasattr(model, "_orig_mod"):
        # torch.compile (train.compile): the chunked path hooks the decoder on every call,
        # which would make the compiled graph's guards fail and recompile each step.
        return 0
    found = _body_and_head(model)
    if found is None:
        return 0
    head = found[1]
    vocab = getattr(head, "out_features", None)
    if not isinstance(vocab, int):
        weight = getattr(head, "weight", None)
        vocab = weight.shape[0] if isinstance(weight, torch.Tensor) else 0
    return DEFAULT_CHUNK_SIZE if vocab >= AUTO_MIN_VOCAB else 0


def head_logps(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    targets: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``log_softmax(head(hidden))[i, targets[i]]`` chunk by chunk over rows.

    A plain ``nn.Linear`` head goes through ``LinearLogps``, whose backward recomputes one
    chunk's logits at a time and turns them into their gradient in place. Any other head
    (a peft-wrapped one, say) runs each chunk under non-reentrant activation checkpointing:
    also one chunk at a time, with a few more ``[chunk, V]`` temporaries.

    Args:
        hidden: ``[N, H]`` final hidden states (after the last norm).
        head: the output layer, ``[*, H] -> [*, V]``.
        targets: ``[N]`` token ids, all valid.
        chunk_size: rows per chunk (> 0).
        with_entropy: also return each row's entropy (detached).

    Returns:
        ``([N] float32 log-probs, [N] float32 entropies or None)``.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    if type(head) is torch.nn.Linear:
        dtype = _compute_dtype(hidden.device.type, head.weight.dtype)
        logps, entropy = LinearLogps.apply(hidden, head.weight, head.bias, targets, chunk_size, dtype, with_entropy)
        return logps, (entropy if with_entropy else None)
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or any(p.requires_grad for p in head.parameters())
    )
    picked, entropies = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if needs_grad:
            logp, ent = checkpoint(_chunk_logps, h, head, t, with_entropy, use_reentrant=False)
        else:
            logp, ent = _chunk_logps(h, head, t, with_entropy)
        picked.append(logp)
        entropies.append(ent)
    if not picked:  # nothing labelled: keep the graph connected so backward still works
        empty = hidden.new_zeros(0, dtype=torch.float32) + hidden.sum().float() * 0
        return empty, (empty.detach() if with_entropy else None)
    return torch.cat(picked), (torch.cat(entropies) if with_entropy else None)


class LinearLogps(torch.autograd.Function):
    """Chunked ``log_softmax(hidden @ weight.T + bias)`` at ``targets``, for a linear head.

    Forward keeps only the ``[N]`` log-sum-exps. Backward recomputes each chunk's logits
    and overwrites them with their gradient, ``g * (onehot(target) - softmax)``, so one
    ``[chunk, V]`` float32 buffer is the most it holds. The matmuls run in ``dtype`` (the
    autocast dtype, as the plain path's would); the softmax in float32.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk_size: int,
        dtype: torch.dtype,
        with_entropy: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        picked = torch.empty_like(lse)
        entropy = torch.zeros(n if with_entropy else 0, dtype=torch.float32, device=hidden.device)
        w, b = weight.to(dtype), (bias.to(dtype) if bias is not None else None)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            logits = _linear(hidden[s:e], w, b)
            lse[s:e] = logits.logsumexp(-1)
            picked[s:e] = logits.gather(-1, targets[s:e, None]).squeeze(-1)
            if with_entropy:
                entropy[s:e] = lse[s:e] - (logits.softmax(-1) * logits).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size, ctx.dtype = chunk_size, dtype
        ctx.mark_non_differentiable(entropy)
        return picked - lse, entropy

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _grad_entropy: torch.Tensor | None) -> tuple[Any, ...]:
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        w, b = weight.to(ctx.dtype), (bias.to(ctx.dtype) if bias is not None else None)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        grad = grad.float()
        for s in range(0, hidden.shape[0], ctx.chunk_size):
            e = min(s + ctx.chunk_size, hidden.shape[0])
            g = grad[s:e, None]
            dlogits = _linear(hidden[s:e], w, b).sub_(lse[s:e, None]).exp_().mul_(-g)  # -g * softmax
            dlogits.scatter_add_(1, targets[s:e, None], g)  # + g at the target
            low = dlogits.to(ctx.dtype)
            if grad_h is not None:
                grad_h[s:e] = (low @ w).to(hidden.dtype)
            if grad_w is not None:
                grad_w += (low.t() @ hidden[s:e].to(ctx.dtype)).float()
            if grad_b is not None:
                grad_b += dlogits.sum(0)
        return (
            grad_h,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None,
            None,
            None,
            None,
            None,
        )


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _compute_dtype(device_type: str, default: torch.dtype) -> torch.dtype:
    """The dtype autocast would run the head's matmul in, or ``default`` outside autocast."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return default


def _linear(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``[n, V]`` float32 logits; inputs are cast to ``weight``'s dtype and autocast is off."""
    with torch.autocast(hidden.device.type, enabled=False):
        return torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias).float()


def _chunk_logps(
    hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk: ``[n, H] -> [n]`` float32 log-probs (and ``[n]`` entropies, or an empty tensor)."""
    logits = head(hidden).float()
    lse = logits.logsumexp(-1)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
    if not with_entropy:
        return logp, logits.new_zeros(0)
    with torch.no_grad():
        entropy = lse - (logits.softmax(-1) * logits).sum(-1)
    return logp, entropy


def _targets(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor | None) -> torch.Tensor:
    if labels is not None:
        return labels
    if attention_mask is None:
        return input_ids
    return input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)


def _present(inputs: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in inputs.items() if v is not None}


def _pad_left(x: torch.Tensor) -> torch.Tensor:
    """``[B, T - 1] -> [B, T]`` with a zero (or False) column in front: position 0 predicts nothing."""
    return torch.nn.functional.pad(x, (1, 0))


def _scatter(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rows of ``values`` ``[N]`` into a zero ``[B, T]`` float32 at ``mask`` (``[B, T - 1]``)."""
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    return _pad_left(out.masked_scatter(mask, values.float()))


def logps_from_logits(logits: torch.Tensor, targets: torch.Tensor, with_entropy: bool = False) -> TokenLogps:
    """The plain path, from logits a caller already has: full ``[B, T, V]``, upcast to float32.

    ``targets`` are labels (``-100`` where nothing is scored), aligned as in ``token_logps``.
    """
    mask = targets[:, 1:] != IGNORE_INDEX
    logps = logits[:, :-1].float().log_softmax(-1)
    picked = logps.gather(-1, targets[:, 1:].masked_fill(~mask, 0)[..., None]).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = _pad_left(torch.where(mask, -(logps.exp() * logps).sum(-1), 0.0))
    return TokenLogps(logps=_pad_left(torch.where(mask, picked, 0.0)), mask=_pad_left(mask), entropy=entropy)


#: The attribute by which a model wrapper declares that it prepends positions to every
#: sequence (prompt tuning's soft prompt): an int, how many. Such a wrapper returns logits
#: already aligned with its inputs (``[B, T, V]``, the prepended positions dropped); set it
#: on the wrapper (an update step's ``prepare`` does), and this module reads nothing else.
PREPENDED_POSITIONS = "prepended_positions"


def prepends_positions(model: torch.nn.Module) -> bool:
    """Whether ``model`` prepends positions to every sequence (prompt tuning, say).

    A wrapper declares it with an int attribute ``prepended_positions`` above 0
    (``PREPENDED_POSITIONS``); a peft model used directly is recognized by its
    prompt-learning config. Such a model neither takes the chunked path nor can train on
    packed rows (peft drops ``position_ids`` there, so packed sequences would attend to
    each other).
    """
    return _innermost(model) is None


def _innermost(model: torch.nn.Module) -> torch.nn.Module | None:
    """The Hugging Face model inside DDP, ``Frozen`` and peft wrappers; ``None`` if it prepends positions."""
    m = model
    while True:
        m = unwrap(m)
        if getattr(m, PREPENDED_POSITIONS, 0):
            return None
        if isinstance(m, Frozen):
            m = m.model
        elif hasattr(m, "peft_config") and hasattr(m, "get_base_model"):
            config = getattr(m, "active_peft_config", None)
            if config is None or getattr(config, "is_prompt_learning", False):
                return None
            m = m.get_base_model()
        else:
            return m


def _body_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """The decoder body and output layer of a (wrapped) Hugging Face causal LM, or ``None``.

    ``None`` means "take the plain path": the model is not a recognized causal LM, its
    head transforms the logits, or prompt tuning prepends positions the loss must not see.
    """
    m = _innermost(model)
    if m is None:
        return None
    get_head, get_body = getattr(m, "get_output_embeddings", None), getattr(m, "get_decoder", None)
    if not callable(get_head) or not callable(get_body):
        return None
    head, body = get_head(), get_body()
    if not isinstance(head, torch.nn.Module) or not isinstance(body, torch.nn.Module) or body is m:
        return None
    if "logits_to_keep" not in inspect.signature(m.forward).parameters:
        return None
    config = getattr(m, "config", None)
    for name in _HEAD_TRANSFORMS:
        if getattr(config, name, None) not in (None, 1, 1.0):
            return None
    return body, head


def _decoder_hidden(
    model: torch.nn.Module, body: torch.nn.Module, head: torch.nn.Module, inputs: dict[str, torch.Tensor | None]
) -> torch.Tensor | None:
    """``[B, T, H]`` output of the decoder body, from one call of ``model`` (its own forward).

    The model computes logits for the last position only (``logits_to_keep=1``), and those
    are detached: no loss uses them, and a hook watching the model's logits should not take
    them for the loss's.
    """
    captured: list[torch.Tensor] = []

    def keep(_module: Any, _args: Any, output: Any) -> None:
        hidden = getattr(output, "last_hidden_state", None)
        captured.append(hidden if hidden is not None else output[0])

    def detach(_module: Any, _args: Any, output: torch.Tensor) -> torch.Tensor:
        return output.detach()

    handles = [body.register_forward_hook(keep), head.register_forward_hook(detach)]
    try:
        model(**_present(inputs), use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    ids = inputs["input_ids"]
    assert ids is not None
    if len(captured) != 1 or captured[0].shape[:2] != ids.shape:
        log.info("chunked log-probs: unexpected decoder output; using the plain logits path")
        return None
    return captured[0]
