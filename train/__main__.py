"""``python -m train ARGS`` = ``zoo train ARGS``; ``python -m train embed ARGS`` = ``zoo embed ARGS``.

This is what torchrun runs on every worker: ``torchrun --nproc_per_node N -m train --recipe R --out D``.
"""

from __future__ import annotations

import argparse
import sys

from train.cli import register


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m train")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    if not argv or argv[0] not in ("train", "embed"):
        argv = ["train", *argv]
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (KeyError, ValueError, FileNotFoundError) as exc:  # bad input: one line, as `zoo` prints it
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
