#!/usr/bin/env python3
"""Hugging Face model directories made here, with no hub: a byte-level BPE tokenizer trained offline with
`tokenizers` (with a chat template), and a Llama saved with `save_pretrained` layout (config.json,
generation_config.json, one or several safetensors shards with their index). Used by the tests and by the
fine-tuning benchmarks; the weights of a large model are written one shard at a time (bounded RAM).

    python3 tools/hf_model_dir.py OUT --hidden 2048 --layers 24 --intermediate 5504 --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path

# A minimal chat format: each turn is "<|role|>\n" + content + "</s>\n"; a generation prompt is "<|assistant|>\n".
# Rendering a prefix of the messages gives a prefix of the rendering, which is what finding the assistant turns
# needs (offload/data/encode.py).
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]


def training_text() -> list[str]:
    """The text the tokenizer is trained on: the corpus shipped with offload, paragraph by paragraph."""
    corpus = resources.files("offload.data").joinpath("corpus.txt").read_text()
    return [p for p in corpus.split("\n\n") if p.strip()]


def save_tokenizer(out: Path, vocab_size: int = 512):
    """Trains a byte-level BPE tokenizer on :func:`training_text` and saves it (tokenizer.json and its config)
    into ``out``. Returns the transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(training_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>", additional_special_tokens=SPECIAL_TOKENS[3:])
    fast.chat_template = CHAT_TEMPLATE
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast


def llama_config(vocab_size: int, hidden: int = 64, layers: int = 2, intermediate: int = 172, heads: int = 4,
                 kv_heads: int | None = None, max_positions: int = 512, tie: bool = False, dtype: str = "float32"):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                       intermediate_size=intermediate, num_attention_heads=heads,
                       num_key_value_heads=kv_heads or heads, max_position_embeddings=max_positions,
                       tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=2, dtype=dtype)


# (not 0, `offload train`'s default seed: a run that never read the saved weights would start from the same
# values and pass for one that did)
DEFAULT_SEED = 1


def save_llama(out: Path, config, seed: int = DEFAULT_SEED, max_shard_bytes: int = 2 << 30) -> int:
    """Writes a randomly initialised Llama of ``config`` into ``out`` as ``save_pretrained`` lays it out, in
    ``config.dtype``: small models through ``save_pretrained`` itself, models over ``max_shard_bytes`` layer by
    layer (built on the meta device, each tensor initialised as transformers would: normal(0, 0.02), norms 1),
    so that RAM holds one shard at a time. Returns the parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, str(config.dtype).replace("torch.", ""))
    with torch.device("meta"):
        shape_model = AutoModelForCausalLM.from_config(config)
    numel = sum(p.numel() for p in shape_model.parameters())
    if numel * dtype.itemsize <= max_shard_bytes:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).to(dtype)
        model.save_pretrained(out)
        return numel
    _save_in_shards(out, shape_model, dtype, seed, max_shard_bytes)
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    return numel


def _save_in_shards(out: Path, shape_model, dtype, seed: int, max_shard_bytes: int) -> None:
    import torch
    from safetensors.torch import save_file

    seen: set[int] = set()
    names = []
    for name, tensor in shape_model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:  # a tied weight is stored once, under its first name
            seen.add(id(tensor))
            names.append((name, tuple(tensor.shape)))
    generator = torch.Generator().manual_seed(seed)
    shards: list[list[str]] = [[]]
    sizes = [0]
    for name, shape in names:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if shards[-1] and sizes[-1] + nbytes > max_shard_bytes:
            shards.append([])
            sizes.append(0)
        shards[-1].append(name)
        sizes[-1] += nbytes
    shapes = dict(names)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in shard:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=dtype)
            else:
                tensors[name] = (torch.randn(shapes[name], generator=generator) * 0.02).to(dtype)
        save_file(tensors, out / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
        print(f"  wrote {file} ({sizes[i] / 1e9:.2f} GB)", file=sys.stderr, flush=True)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, indent=2))


def make_model_dir(out: Path, hidden: int = 64, layers: int = 2, intermediate: int = 172, heads: int = 4,
                   vocab_size: int = 512, dtype: str = "float32", tie: bool = False, seed: int = DEFAULT_SEED,
                   max_shard_bytes: int = 2 << 30, max_positions: int = 512) -> int:
    """A whole model directory: tokenizer + Llama. Returns the parameter count."""
    tokenizer = save_tokenizer(out, vocab_size)
    config = llama_config(max(vocab_size, len(tokenizer)), hidden, layers, intermediate, heads, tie=tie,
                          dtype=dtype, max_positions=max_positions)
    return save_llama(out, config, seed, max_shard_bytes)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="the model directory to write")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--intermediate", type=int, default=2752)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000, help="model vocabulary (the tokenizer is trained to at "
                                                             "most this many tokens)")
    ap.add_argument("--tokenizer-vocab", type=int, default=4096)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    ap.add_argument("--tie", action="store_true", help="tie the input embeddings and the LM head")
    ap.add_argument("--shard-gb", type=float, default=2.0)
    a = ap.parse_args()
    out = Path(a.out)
    tokenizer = save_tokenizer(out, a.tokenizer_vocab)
    config = llama_config(max(a.vocab, len(tokenizer)), a.hidden, a.layers, a.intermediate, a.heads, tie=a.tie,
                          dtype=a.dtype, max_positions=4096)
    numel = save_llama(out, config, max_shard_bytes=int(a.shard_gb * 1e9))
    print(json.dumps({"dir": str(out), "params": numel, "dtype": a.dtype}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
