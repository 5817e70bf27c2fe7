"""What the scale benchmarks share, so that offload and DeepSpeed train exactly the same job: the Llama shape,
the batches, the loss, and a sampler of the GPU's load.

- ``llama_config``: Llama-2-7B's shape by default (hidden 4096, 32 layers, MLP 11008, 32 heads, 32k vocabulary,
  untied head), smaller for dry runs.
- ``TokenBatches``: byte-level token ids of the text that ships with offload (``offload/data/corpus.txt``), in
  windows at offsets drawn from a seeded generator: a stream a randomly initialised model learns quickly, so a
  falling loss means training works; batch ``i`` is a function of the seed and ``i`` only.
- ``causal_lm_loss``: the next-token loss transformers computes (mean over every position but each row's last),
  in fp32, chunk by chunk under activation checkpointing, so that only the bf16 logits stay alive: at 32k tokens
  a micro-batch's fp32 logits, their log-softmax and its gradient would take 12 GiB on their own.
- ``GpuSampler``: a thread reading NVML every 0.2 s (kernel-busy percentage, PCIe bytes each way, memory used).
"""

from __future__ import annotations

import pathlib
import threading
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CORPUS = pathlib.Path(__file__).resolve().parent.parent / "offload" / "data" / "corpus.txt"


def llama_config(hidden: int = 4096, layers: int = 32, intermediate: int = 11008, heads: int = 32,
                 vocab: int = 32000, seq: int = 2048):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=max(seq, 4096), tie_word_embeddings=False, rms_norm_eps=1e-5,
                       attn_implementation="sdpa")


def count_params(config) -> int:
    """Parameters of ``LlamaForCausalLM(config)`` without building it."""
    h, i, v, n = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    kv = h // config.num_attention_heads * config.num_key_value_heads
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h
    return n * per_layer + 2 * v * h + h


class TokenBatches:
    """``get(i)``: micro-batch ``i``, a ``(batch, seq)`` int64 CPU tensor of byte ids (< 256 <= vocab)."""

    def __init__(self, batch: int, seq: int, seed: int = 0) -> None:
        data = CORPUS.read_bytes()
        repeats = -(-(seq + 1) * 4 // len(data))
        self.tokens = torch.frombuffer(bytearray(data * max(1, repeats)), dtype=torch.uint8).long()
        self.batch, self.seq, self.seed = batch, seq, seed

    def get(self, index: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        starts = torch.randint(0, len(self.tokens) - self.seq, (self.batch,), generator=gen)
        return torch.stack([self.tokens[s:s + self.seq] for s in starts.tolist()])


def _ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")


def causal_lm_loss(logits: torch.Tensor, ids: torch.Tensor, chunk_tokens: int = 4096) -> torch.Tensor:
    """Mean next-token cross-entropy of ``logits`` (batch, seq, vocab) for ``ids`` (batch, seq)."""
    batch, seq, vocab = logits.shape
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]  # each row's last position predicts nothing
    flat_logits, flat_targets = logits.reshape(-1, vocab), targets.reshape(-1).to(logits.device)
    total = logits.new_zeros((), dtype=torch.float32)
    for part, part_targets in zip(flat_logits.split(chunk_tokens), flat_targets.split(chunk_tokens)):
        total = total + checkpoint(_ce_sum, part, part_targets, use_reentrant=False)
    return total / (batch * (seq - 1))


class GpuSampler:
    """Samples NVML in a thread between ``start()`` and ``stop()``; ``summary()`` gives the means over the
    samples taken in [t0, t1] (perf_counter seconds). Without NVML (or on the CPU) it records nothing."""

    def __init__(self, period_s: float = 0.2) -> None:
        self.period_s = period_s
        self.samples: list[tuple[float, float, float, float, float]] = []  # t, busy %, tx MB/s, rx MB/s, GiB used
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        except Exception:
            self._nvml = None

    def start(self) -> None:
        if self._handle is None:
            return
        self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        nv, h = self._nvml, self._handle
        while not self._stop.wait(self.period_s):
            try:
                busy = nv.nvmlDeviceGetUtilizationRates(h).gpu
                # PCIe throughput over the last 20 ms, KB/s; TX is device -> host, RX host -> device
                tx = nv.nvmlDeviceGetPcieThroughput(h, nv.NVML_PCIE_UTIL_TX_BYTES) / 1e3
                rx = nv.nvmlDeviceGetPcieThroughput(h, nv.NVML_PCIE_UTIL_RX_BYTES) / 1e3
                used = nv.nvmlDeviceGetMemoryInfo(h).used / 2**30
            except Exception:
                return
            self.samples.append((time.perf_counter(), float(busy), tx, rx, used))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def summary(self, t0: float, t1: float) -> dict:
        window = [s for s in self.samples if t0 <= s[0] <= t1]
        if not window:
            return {}
        mean = lambda k: sum(s[k] for s in window) / len(window)  # noqa: E731
        return {"samples": len(window), "gpu_busy_pct": mean(1), "d2h_mb_s": mean(2), "h2d_mb_s": mean(3),
                "nvml_used_gib_max": max(s[4] for s in window)}


def matmul_tflops(device: str, size: int = 8192, reps: int = 10) -> float:
    """The bf16 matrix-product rate of this device, TFLOP/s: the median of ``reps`` products of random
    ``size``-square matrices after three warm-ups (MFU is reported against it)."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    times = []
    for i in range(reps + 3):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    times.sort()
    return 2 * size**3 / times[len(times) // 2] / 1e12


def parse_bytes(field: str, text: str) -> int:
    from offload.config import parse_bytes as parse

    return parse(field, text)
