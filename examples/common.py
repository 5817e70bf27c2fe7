"""What both examples share: a model (a Hugging Face directory, or a small Llama built here) and blocks of token
ids cut from a text file (by default the text that ships with offload)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import transformers

import offload

CORPUS = Path(offload.__file__).parent / "data" / "corpus.txt"


def arguments(description: str) -> argparse.ArgumentParser:
    """The flags both examples take."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", help="a Hugging Face model directory (default: a small Llama built here)")
    ap.add_argument("--data", help="a UTF-8 text file (default: the text that ships with offload)")
    ap.add_argument("--nvme-dir", help="swap directory for parameters and optimizer state (default: a temp dir)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--out", help="write the fine-tuned model here (a Hugging Face model directory)")
    return ap


def load_model(model_dir: str | None) -> tuple[torch.nn.Module, object | None]:
    """``model_dir``'s causal LM and tokenizer, or a 4-layer Llama (random init) reading UTF-8 bytes."""
    if model_dir:
        return (transformers.AutoModelForCausalLM.from_pretrained(model_dir),
                transformers.AutoTokenizer.from_pretrained(model_dir))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)
    return transformers.LlamaForCausalLM(config), None


def token_blocks(tokenizer, text_file: str | None, seq_len: int) -> list[dict[str, torch.Tensor]]:
    """The text cut into blocks of ``seq_len`` tokens (``labels`` = ``input_ids``: the model shifts them)."""
    text = Path(text_file or CORPUS).read_text(encoding="utf-8")
    ids = tokenizer(text)["input_ids"] if tokenizer is not None else list(text.encode("utf-8"))
    ids = torch.tensor(ids)
    return [{"input_ids": block, "labels": block} for block in ids[:len(ids) // seq_len * seq_len].view(-1, seq_len)]
