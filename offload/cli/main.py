"""The `offload` command line (also `python -m offload`)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NamedTuple


BENCHES = ("adam", "io", "step")
# The peer comparisons that left the library for bench/ of the source tree (not in the wheel): their scripts.
MOVED_BENCHES = {"gpu": "bench/gpu_peers.py", "e2e": "bench/e2e.py"}


class Parsers(NamedTuple):
    """The command line's parsers: the top level, `offload bench`'s, and, by name, those of the commands that
    take --debug (each reports an unrecognized argument with its own usage)."""

    top: argparse.ArgumentParser
    bench: argparse.ArgumentParser
    commands: dict[str, argparse.ArgumentParser]


def main(argv: list[str] | None = None) -> int:
    """Runs the `offload` command in ``argv`` (default: sys.argv[1:]) and returns its exit status. A usage error
    exits through argparse (status 2); an OSError, ValueError or MemoryError is printed as one line (status 1),
    or raised with --debug."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parsers = build_parser()
    args, unknown = parsers.top.parse_known_args(argv)
    if args.command == "bench" and args.what not in BENCHES:
        if args.what in MOVED_BENCHES:
            parsers.bench.error(f"'offload bench {args.what}' compares offload with its peers and is no longer part "
                                f"of the package: run python3 {MOVED_BENCHES[args.what]} from a clone of the source "
                                "tree")
        parsers.bench.error(f"argument what: invalid choice: {args.what!r} (choose from {', '.join(BENCHES)})")
    if unknown:  # said by the subcommand's parser, with its own usage (the top level's would not help)
        parsers.commands.get(args.command, parsers.top).error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return _run(parsers.top, args)
    except (OSError, ValueError, MemoryError) as e:  # ConfigError, CheckpointError, MemoryBudgetError, I/O
        if getattr(args, "debug", False):
            raise
        print(f"offload {args.command}: error: {e}", file=sys.stderr)
        return 1


def build_parser() -> Parsers:
    """The parsers of `offload` and of each command, the commands in the order `offload --help` lists them."""
    parser = argparse.ArgumentParser(
        prog="offload",
        description="offload: train models larger than GPU memory on one machine.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  offload train                          # the main job: a small model, everything offloaded\n"
               "  offload train --model DIR --data train.jsonl --output tuned/   # fine-tune a HF model\n"
               "  offload estimate --model 7B            # what a model needs, and which placement fits\n"
               "  offload tune --dir /nvme/offload       # measure the swap directory, write offload.toml\n"
               "  offload bench step --help              # how fast this machine is: adam, io, step\n"
               "Run 'offload COMMAND --help' for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    bench = _add_bench(sub)
    info = sub.add_parser("info", help="print the native core's SIMD variant and thread count",
                          epilog="example: OFFLOAD_SIMD=avx2 offload info")
    info.set_defaults(command="info")
    clean = sub.add_parser("clean", help="remove swap directories left in DIR by runs that were killed",
                           epilog="example: offload clean /nvme/offload (directories of running processes are kept)")
    clean.add_argument("dir", metavar="DIR", help="the swap root (nvme_dir) to clean")
    export = sub.add_parser(
        "export", help="write a checkpoint's weights as plain safetensors (+ config.json)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Writes DIR/model.safetensors (fp32, the model's own state_dict keys, tied weights once) and "
                    "DIR/config.json when the model has a Hugging Face config: loadable with "
                    "model.load_state_dict or from_pretrained(DIR), without offload.",
        epilog="example:\n  offload export runs/ckpt --out runs/exported")
    export.add_argument("checkpoint", metavar="CKPT", help="the checkpoint directory (what engine.save wrote)")
    export.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")
    train = sub.add_parser("train", help="the main job: fine-tune a model with its state offloaded (try it first)",
                           description="Fine-tunes a Hugging Face model directory on your data (text, prompt/"
                                       "completion or chat JSONL, parquet, datasets directories) with parameters and "
                                       "optimizer state offloaded, and writes a Hugging Face model directory; with no "
                                       "arguments, trains a tiny Llama from scratch on text shipped with offload. "
                                       "Shows loss, tokens/s, where the time goes, host RAM and bytes moved.")
    from offload.cli.train import add_arguments

    add_arguments(train)
    tune = sub.add_parser("tune", help="measure the swap directory and write the best I/O settings to a config file",
                          description="Sweeps block size x transfers in flight (and O_DIRECT vs buffered) on a test "
                                      "file in PATH and writes the best IOConfig into the [io] table of --out.")
    from offload.cli.tune import add_arguments as add_tune_arguments

    add_tune_arguments(tune)
    estimate = sub.add_parser("estimate", help="memory and disk each placement needs, and which fits this machine",
                              description="Device memory, host RAM (peak RSS) and disk that training a model "
                                          "needs for each placement, and the fastest placement that fits.")
    from offload.cli.estimate import add_arguments as add_estimate_arguments

    add_estimate_arguments(estimate)
    commands = {"clean": clean, "export": export, "train": train, "tune": tune, "estimate": estimate}
    for command in commands.values():
        command.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return Parsers(parser, bench, commands)


def _add_bench(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`offload bench WHAT ...`: WHAT's own arguments are left in ``rest``, for its own parser."""
    bench = sub.add_parser("bench", help="paired benchmarks of this machine: Adam, disk I/O, the training step",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="examples:\n"
                                  "  offload bench adam --rounds 5             # native Adam vs torch fused AdamW\n"
                                  "  offload bench io --dir /nvme --size 4GiB  # the I/O engine vs fio\n"
                                  "  offload bench step --dir /nvme            # engine.step() against its floor\n"
                                  "  offload bench --debug step ...            # full traceback on errors\n"
                                  "Each takes --help for its own options. Comparisons with DeepSpeed, torchao and "
                                  "plain torch\ntraining (once 'offload bench gpu' and 'offload bench e2e') are "
                                  "scripts in bench/ of the\nsource tree: " + ", ".join(MOVED_BENCHES.values())
                                  + ".")
    bench.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    bench.add_argument("what", metavar="{" + ",".join(BENCHES) + "}", help="what to benchmark")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return bench


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.command == "tune":
        from offload.cli.tune import run as tune

        return tune(args)
    if args.command == "estimate":
        from offload.cli.estimate import run as estimate

        return estimate(args)
    if args.command == "train":
        from offload.cli.train import run

        return run(args)
    if args.command == "export":
        import logging

        from offload.checkpoint import export

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        path = export(args.checkpoint, args.out)
        print(f"wrote {path}")
        return 0
    if args.command == "bench":
        if args.what == "io":
            from offload.bench import io

            return io.main(args.rest)
        if args.what == "step":
            from offload.bench import step

            return step.main(args.rest)
        from offload.bench import adam

        return adam.main(args.rest)
    if args.command == "clean":
        import logging

        from offload.storage.swap_store import clean_stale_runs

        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        if not os.path.isdir(args.dir):
            print(f"offload clean: error: {args.dir}: " + ("not a directory" if os.path.exists(args.dir)
                                                          else "no such directory"), file=sys.stderr)
            return 2
        removed = clean_stale_runs(args.dir)
        print(f"removed {len(removed)} stale swap director{'y' if len(removed) == 1 else 'ies'} from {args.dir}")
        return 0
    if args.command == "info":
        from offload import __version__, native

        print(f"offload {__version__}: simd={native.simd_variant()} "
              f"(supported: {', '.join(native.supported_simd_variants())}), threads={native.num_threads()}")
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
