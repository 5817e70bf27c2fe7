"""The command line shared by the generators of docs pages (gen_cli_docs.py, gen_config_docs.py): write the
page, print it, or check that the file in the tree is what the generator makes now."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent


def generator_main(page: Path, render: Callable[[], str], script: str, description: str,
                   argv: list[str] | None = None) -> int:
    """``--check``: exit 1 when ``page`` differs from ``render()``; ``--print``: write it to stdout; neither:
    write it to ``page``."""
    ap = argparse.ArgumentParser(description=description)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help=f"exit 1 when {page.relative_to(ROOT)} is stale")
    mode.add_argument("--print", action="store_true", help="print the page instead of writing it")
    a = ap.parse_args(argv)
    text = render()
    if a.print:
        sys.stdout.write(text)
        return 0
    if a.check:
        if not page.exists() or page.read_text() != text:
            print(f"{page.relative_to(ROOT)} is stale: run python3 tools/{script}", file=sys.stderr)
            return 1
        return 0
    page.write_text(text)
    print(f"wrote {page.relative_to(ROOT)}")
    return 0
