"""A tiny llama GGUF checkpoint written at test time with the ``gguf`` package (no llama.cpp).

``write_tiny_llama_gguf(path)`` trains a small byte-level BPE tokenizer on a few sentences, builds
a tiny random ``LlamaForCausalLM`` sized to it, and writes both into one ``.gguf`` file the way
llama.cpp's ``convert_hf_to_gguf.py`` does: ``general.architecture = llama``, the ``llama.*``
hyperparameters transformers maps back to a config, the tokenizer as ``tokenizer.ggml.*``
metadata (model ``gpt2``: tokens, token types, merges, special ids, chat template), and the
tensors under gguf's names with ``attn_q`` / ``attn_k`` permuted (transformers reverses that on
read). It returns the model and tokenizer the file was written from, the reference a test
compares what transformers reads back against.

``quant="F32"`` stores every tensor as float32, so the weights read back equal the model's;
``quant="Q8_0"`` stores the 2-D weights 8-bit (``gguf.quants.quantize``), so they come back close.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

#: What the tokenizer is trained on (and a test can encode): words, digits, punctuation, unicode.
CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "A tiny model writes tiny answers: 1 + 2 = 3, 12 + 30 = 42.",
    "What is the capital of France? The capital of France is Paris.",
    "Hello, world! How are you today? I am fine, thank you.",
    "Fine-tuning a language model on a laptop takes patience and small batches.",
    "Caf\u00e9 cr\u00e8me, na\u00efve r\u00e9sum\u00e9, and a snowman \u2603 walk into a bar.",
)
BOS_EOS = "<|endoftext|>"
CHAT_SPECIALS = ("<|im_start|>", "<|im_end|>")
PAD = "<|pad|>"
#: ChatML, as SmolLM2-Instruct's GGUF carries it (shortened).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
#: The tiny Llama: GQA (4 heads, 2 kv heads), a non-default rope base and norm eps, so a wrongly
#: mapped hyperparameter or a missed q/k permutation shows in the logits.
TINY_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 5000.0,
}


def tiny_bpe_tokenizer(vocab_size: int = 400) -> Any:
    """A byte-level BPE fast tokenizer (GPT-2 style, no prefix space) with ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [BOS_EOS, *CHAT_SPECIALS, PAD]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(CORPUS) * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS_EOS, eos_token=BOS_EOS, pad_token=PAD,
        additional_special_tokens=list(CHAT_SPECIALS),
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama(tokenizer: Any, seed: int = 0, tie_word_embeddings: bool = False) -> torch.nn.Module:
    """A random-init tiny ``LlamaForCausalLM`` sized to ``tokenizer``, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **TINY_CONFIG,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # norms at 1 and zero-free: make them random too, so a missed norm shows
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def _permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` (convert_hf_to_gguf.py): HF's rotary halves -> interleaved."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _token_types(tokenizer: Any) -> list[int]:
    """gguf's token types: 3 (CONTROL) for special tokens, 1 (NORMAL) for the rest."""
    import gguf

    special = set(tokenizer.all_special_ids)
    return [
        int(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL) for i in range(len(tokenizer))
    ]


def _merges(tokenizer: Any) -> list[str]:
    import json

    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def write_tiny_llama_gguf(
    path: str | Path,
    *,
    quant: Literal["F32", "Q8_0"] = "F32",
    tie_word_embeddings: bool = False,
    seed: int = 0,
) -> tuple[torch.nn.Module, Any]:
    """Write a tiny llama GGUF at ``path``; return ``(hf_model, tokenizer)`` it was written from."""
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_bpe_tokenizer()
    model = tiny_llama(tokenizer, seed=seed, tie_word_embeddings=tie_word_embeddings)
    cfg = model.config
    qtype = {"F32": gguf.GGMLQuantizationType.F32, "Q8_0": gguf.GGMLQuantizationType.Q8_0}[quant]

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama-test")
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32 if quant == "F32" else gguf.LlamaFileType.MOSTLY_Q8_0))
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(TINY_CONFIG["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)

    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([tokenizer.convert_ids_to_tokens(i) for i in range(len(tokenizer))])
    writer.add_token_types(_token_types(tokenizer))
    writer.add_token_merges(_merges(tokenizer))
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if tie_word_embeddings and hf_name == "lm_head.weight":
            continue  # llama.cpp writes no output.weight for tied embeddings
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        base, suffix = hf_name.rsplit(".", 1)
        name = names.get_name(base)
        assert name is not None, hf_name
        data = tensor.detach().float().numpy().copy()
        if base.endswith("q_proj"):
            data = _permute(data, cfg.num_attention_heads, cfg.num_attention_heads)
        elif base.endswith("k_proj"):
            data = _permute(data, cfg.num_attention_heads, cfg.num_key_value_heads)
        if qtype != gguf.GGMLQuantizationType.F32 and data.ndim == 2:  # norms stay float32, as in llama.cpp
            writer.add_tensor(f"{name}.{suffix}", gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(f"{name}.{suffix}", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model, tokenizer
