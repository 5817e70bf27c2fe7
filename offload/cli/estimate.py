"""`offload estimate`: the memory and disk each placement needs, and which one fits this machine."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from offload.config import parse_bytes
from offload.errors import ConfigError

if TYPE_CHECKING:
    from offload.cli.lora import LoraPlan
    from offload.estimate import Estimate, ModelShape

EXAMPLES = """examples:
  offload estimate --model medium                       # a preset of offload train
  offload estimate --model path/to/config.json --batch 4 --seq-len 2048 --device cuda
  offload estimate --model 7B --ram 64GiB --gpu 24GiB --disk 500GiB
  offload estimate --model large --config offload.toml  # with offload tune's bandwidths: a disk-time floor
  offload estimate --model 7B --ranks 4 --device cuda   # per rank, 4 GPUs sharing the offloaded state
  offload estimate --model path/to/llama-dir --lora-r 16  # a LoRA adapter on all linear layers, the base frozen"""

_TUNE_LINE = re.compile(r"#\s*offload tune.*?write_gbs=([0-9.]+)\s+read_gbs=([0-9.]+)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLES
    parser.add_argument("--model", required=True,
                        help="what offload train takes (a preset: tiny, small, medium, large; a config.json; a Hugging "
                             "Face model directory; a hub id in the local cache), or a parameter count (350M, 7B: a "
                             "Llama of standard proportions is assumed)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    parser.add_argument("--prefetch-layers", type=int, default=2)
    parser.add_argument("--ranks", type=int, default=1,
                        help="processes sharing the state (torchrun --nproc-per-node); figures are per rank")
    parser.add_argument("--device-memory-limit", default=None, help="for offloaded parameters (e.g. 2GiB)")
    parser.add_argument("--host-memory-limit", default=None,
                        help="Config.host_memory_limit to plan for (e.g. 16GiB): with the optimizer on NVMe, the "
                             "groups whose state fits stay in RAM, the first groups first")
    parser.add_argument("--ram", default=None, help="host RAM to plan for (default: what is available now)")
    parser.add_argument("--gpu", default=None, help="GPU memory to plan for (default: the GPU's, when on cuda)")
    parser.add_argument("--disk", default=None, help="free space in the swap directory (default: measured in "
                                                     "--nvme-dir)")
    parser.add_argument("--nvme-dir", default=None, help="where swap files would go (default: the temp dir)")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="a config written by offload tune: its measured bandwidths give a disk-time floor")
    parser.add_argument("--model-in-ram", action="store_true",
                        help="the model is built in RAM before the engine takes it (default: built with "
                             "offload.init_empty, as offload train does, so it never is)")
    parser.add_argument("--lora-r", type=int, default=None, metavar="R",
                        help="a LoRA run (offload train --lora-r): an adapter of rank R trains, the base is frozen "
                             "and stored in the compute dtype where parameters go")
    parser.add_argument("--lora-targets", default=None, metavar="NAMES",
                        help="with --lora-r: the adapted linear layers, as offload train takes them (default "
                             "all-linear)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="as offload train --activation-checkpointing: each block keeps only its input and is "
                             "recomputed in backward")
    parser.add_argument("--json", action="store_true", help="print one JSON record instead of the table")


def model_shape(spec: str, seq_len: int, lora: LoraPlan | None = None):
    """The ModelShape of ``spec``: built on the meta device from a preset or config file, or from a count; with
    ``lora``, that of the LoRA model (its adapters trainable, the rest frozen)."""
    import torch

    from offload.estimate import parse_count, shape_from_count, shape_from_model, with_lora

    count = parse_count(spec)
    if count is not None:
        if count <= 0:
            raise ConfigError(f"--model: the parameter count must be positive; got {spec!r}")
        if lora is None:
            return shape_from_count(count)
        try:
            return with_lora(shape_from_count(count), lora.r, lora.targets)
        except ValueError as e:
            raise ConfigError(f"--lora-targets: {str(e).removeprefix('with_lora: ')}") from None
    from offload.cli.model_source import resolve_model

    build = resolve_model(spec, seq_len).builder(0)  # raises ConfigError for an unknown model or a bad file
    with torch.device("meta"):
        if lora is None:
            return shape_from_model(build(), spec)
        lora.check_targets(build(), spec)
        return shape_from_model(lora.builder(build)(), spec)


def _lora(args: argparse.Namespace) -> LoraPlan | None:
    """--lora-r and --lora-targets, checked as offload train checks them."""
    from offload.cli.lora import LoraPlan, parse_targets, require_peft

    if args.lora_r is None:
        if args.lora_targets is not None:
            raise ConfigError("--lora-targets: needs --lora-r (a LoRA run: the rank of its adapter)")
        return None
    if args.lora_r < 1:
        raise ConfigError(f"--lora-r: must be >= 1; got {args.lora_r}")
    targets = parse_targets(args.lora_targets or "all-linear")
    from offload.estimate import parse_count

    if parse_count(args.model) is None:  # (a real model is wrapped by peft; a count's adapters are counted)
        require_peft()
    return LoraPlan(r=args.lora_r, alpha=args.lora_r, targets=targets, dropout=0.0)


def tuned_bandwidths(path: str | None) -> tuple[float, float] | None:
    """(write, read) GB/s recorded by offload tune in ``path``, or None."""
    if path is None:
        return None
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise OSError(e.errno, f"--config: cannot read {path}: {e.strerror}", path) from None
    m = _TUNE_LINE.search(text)
    return (float(m.group(1)), float(m.group(2))) if m else None


class _Budget(NamedTuple):
    """What a placement must fit, in bytes: host RAM, GPU memory (None: not a GPU run), free disk in
    ``nvme_dir``, and the engine's host buffers (``host_limit``, a host_memory_limit; None: unbounded)."""

    host_limit: int | None
    ram: int
    gpu: int | None
    disk: int
    nvme_dir: str


def run(args: argparse.Namespace) -> int:
    """Prints every placement's figures (a table, or one JSON record with --json) and the fastest one that fits
    the budget; returns 0, or 1 when none fits. Raises ConfigError for a bad flag, OSError for an unreadable
    --config or --nvme-dir."""
    from offload.estimate import PLACEMENTS, estimate, recommend

    for flag in ("batch", "seq_len", "ranks"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')}: must be >= 1; got {getattr(args, flag)}")
    device = _device(args)
    shape = model_shape(args.model, args.seq_len, _lora(args))
    limit = parse_bytes("--device-memory-limit", args.device_memory_limit) if args.device_memory_limit else None
    budget = _budget(args, device.startswith("cuda"))
    bandwidth = tuned_bandwidths(args.config)
    estimates = [estimate(shape, p, o, gr, dtype=args.dtype, device=device, batch=args.batch, seq_len=args.seq_len,
                          prefetch=args.prefetch_layers, device_memory_limit=limit, model_in_ram=args.model_in_ram,
                          ranks=args.ranks, host_memory_limit=budget.host_limit,
                          activation_checkpointing=args.activation_checkpointing)
                 for p, o, gr in PLACEMENTS]
    best = recommend(estimates, budget.ram, budget.gpu, budget.disk, budget.host_limit)
    if args.json:
        print(json.dumps({"model": shape.name, "params": shape.numel, "device": device, "ram": budget.ram,
                          "gpu": budget.gpu, "disk": budget.disk, "tuned_gbs": bandwidth,
                          "recommended": best.placement if best else None,
                          "placements": [dict(asdict(e), placement=e.placement, disk_floor_s=_disk_floor(e, bandwidth))
                                         for e in estimates]}))
        return 0 if best else 1
    _print_table(args, shape, device, estimates, budget, bandwidth)
    if best is None:
        print("\nrecommended: none fits; lower --batch/--seq-len, add RAM or disk, or use a smaller model")
        return 1
    print(f"\nrecommended: {best.placement} (the fastest placement that fits; Adam's CPU time comes on top of "
          "the disk time)")
    return 0


def _device(args: argparse.Namespace) -> str:
    """--device, or cuda when available and cpu otherwise; ConfigError for anything but cpu, cuda or cuda:N."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"--device: expected cpu or cuda; got {device!r}")
    return device


def _budget(args: argparse.Namespace, cuda: bool) -> _Budget:
    """The flags' budget, each figure not given measured on this machine: the RAM available now, the GPU's
    memory (``cuda`` only) and the free space in --nvme-dir (default: the temp dir)."""
    import psutil
    import torch

    host_limit = parse_bytes("--host-memory-limit", args.host_memory_limit) if args.host_memory_limit else None
    ram = parse_bytes("--ram", args.ram) if args.ram else psutil.virtual_memory().available
    gpu = None
    if cuda:
        gpu = parse_bytes("--gpu", args.gpu) if args.gpu else (
            torch.cuda.mem_get_info()[1] if torch.cuda.is_available() else None)
    nvme_dir = args.nvme_dir or tempfile.gettempdir()
    if args.disk:
        disk = parse_bytes("--disk", args.disk)
    else:
        try:
            disk = shutil.disk_usage(nvme_dir).free
        except OSError as e:
            raise OSError(e.errno, f"--nvme-dir: cannot read the free space of {nvme_dir}: {e.strerror}",
                          nvme_dir) from None
    return _Budget(host_limit, ram, gpu, disk, nvme_dir)


def _disk_floor(e: Estimate, bandwidth: tuple[float, float] | None) -> float | None:
    """Seconds per step that ``e``'s NVMe traffic takes at the (write, read) GB/s ``bandwidth``; None without
    a bandwidth or without traffic."""
    if bandwidth is None or not (e.nvme_read_per_step or e.nvme_written_per_step):
        return None
    write_gbs, read_gbs = bandwidth
    return e.nvme_read_per_step / (read_gbs * 1e9) + e.nvme_written_per_step / (write_gbs * 1e9)


def _print_table(args: argparse.Namespace, shape: ModelShape, device: str, estimates: list[Estimate], budget: _Budget,
                 bandwidth: tuple[float, float] | None) -> None:
    """The model and budget, one table row per placement, and what the figures include."""
    from offload.estimate import fits

    gib = 2**30
    cuda = device.startswith("cuda")
    ram, gpu, disk = budget.ram, budget.gpu, budget.disk
    frozen = f" (a LoRA adapter of rank {args.lora_r}; {shape.frozen_numel / 1e6:.1f}M frozen)" if args.lora_r else ""
    print(f"{shape.name}: {shape.numel / 1e6:.1f}M trainable parameters in {len(shape.group_numels)} groups{frozen}, "
          f"{args.dtype}, {device}, batch {args.batch} x {args.seq_len} tokens"
          + (", activation checkpointing" if args.activation_checkpointing else "")
          + (f" per rank; {args.ranks} ranks, every figure below is one rank's" if args.ranks > 1 else ""))
    print(f"planning for: RAM {ram / gib:.1f} GiB" + (f", GPU {gpu / gib:.1f} GiB" if gpu else "") +
          f", disk {disk / gib:.1f} GiB free in {budget.nvme_dir}")
    where = "GPU" if cuda else "device (RAM)"
    print(f"\n| placement | state in RAM | {where} GiB | host peak GiB | host buffers GiB | disk GiB "
          f"| NVMe GB/step read+write | disk time s/step | fits |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    groups = len(shape.group_numels)
    for e in estimates:
        t = _disk_floor(e, bandwidth)
        in_ram = "all" if e.state_groups_in_ram == groups else f"{e.state_groups_in_ram} of {groups} groups"
        print(f"| {e.placement} | {in_ram} | {e.device_bytes / gib:.2f} | {e.host_peak_bytes / gib:.2f} | "
              f"{e.host_pool_bytes / gib:.2f} | {e.disk_bytes / gib:.2f} | "
              f"{e.nvme_read_per_step / 1e9:.1f}+{e.nvme_written_per_step / 1e9:.1f} | "
              f"{'-' if t is None else f'{t:.2f}'} | "
              f"{'yes' if fits(e, ram, gpu, disk, budget.host_limit) else 'no'} |")
    if not shape.exact_groups:
        print("\n(a parameter count only: the groups and activations are those of the assumed Llama shape)")
    print("\nhost peak = this process as it is now (torch and the model code imported) + the engine's buffers"
          + (" (+ the model built in RAM, fp32, at the engine's build)" if args.model_in_ram else "")
          + " + weights + activations"
          + ("" if cuda else "; on the CPU device the weights and activations are in RAM"))
    if bandwidth is None:
        print("disk time: run 'offload tune --dir DIR --out offload.toml' and pass --config offload.toml")
