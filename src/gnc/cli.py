"""The ``gnc`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


class CLIError(Exception):
    """An error reported as one line on stderr with exit status 2."""


def _cmd_bench(args: argparse.Namespace) -> None:
    from gnc.bench import bench_layer, format_table, parse_sizes, speedups

    sizes = parse_sizes(args.sizes) if args.sizes else None
    kw = {"sizes": sizes} if sizes else {}
    records = bench_layer(device=args.device, repeats=args.repeats, **kw)
    if args.json:
        print(json.dumps([r.as_dict() for r in records], indent=1))
        return
    print(format_table(records))
    for line in speedups(records):
        print(line)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gnc", description="Guided neural collapse: nearest-simplex-ETF classifiers."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("bench", help="timings and memory of the nearest-ETF layer")
    p.add_argument("--sizes", help="comma-separated DxK sizes (default 512x10,512x50,512x100,"
                   "2048x1000)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per case (median)")
    p.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``gnc``: errors are one line on stderr and a non-zero exit."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CLIError, ValueError, FileNotFoundError, KeyError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"gnc: error: {msg}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
