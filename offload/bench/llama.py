"""The Llama-style model the benchmarks and tools train: random init, sized by width, depth and vocabulary."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def bench_llama(hidden: int, layers: int, max_tokens: int, vocab: int = 32000, seed: int = 0) -> LlamaForCausalLM:
    """A fp32 ``LlamaForCausalLM`` with untied embeddings, 64-wide heads and an 8/3 MLP, from ``seed``."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                                        num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                                        max_position_embeddings=max_tokens, tie_word_embeddings=False))
