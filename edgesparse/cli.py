"""The ``edgesparse`` command."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import sys
from pathlib import Path
from typing import Optional, Sequence


def _bench(args: argparse.Namespace) -> int:
    from . import bench
    from .kernels.dispatch import BackendUnavailableError, use_backend

    cases = bench.QUICK_CASES if args.quick else bench.DEFAULT_CASES
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 5)
    if rounds < 1:
        print(f"edgesparse bench: --rounds must be at least 1, got {rounds}", file=sys.stderr)
        return 2
    stamp = bench.environment_stamp()
    print(f"edgesparse bench on {stamp['processor']} ({stamp['cpus']} CPUs, torch {stamp['torch']} with "
          f"{stamp['torch_threads']} threads, tvm {stamp['tvm']}); median of {rounds} rounds x 3 timed calls per provider", flush=True)
    progress = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    try:
        with use_backend(args.backend) if args.backend else contextlib.nullcontext():
            rows = bench.run(cases, rounds, progress)
    except BackendUnavailableError as err:
        print(f"edgesparse bench: {err}", file=sys.stderr)
        return 2
    print(bench.format_table(rows))
    out = args.out or Path("results") / f"bench-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    json_path, csv_path = bench.write_results(rows, stamp, Path(out))
    png_path = bench.plot(rows, Path(out).with_suffix(".png"))
    print(f"wrote {json_path}, {csv_path} and {png_path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgesparse", description="Block-sparse training kernels: benchmarks and tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="time the block-sparse products against torch dense and torch.sparse")
    b.add_argument("--quick", action="store_true", help="small shapes, a few seconds (a smoke run)")
    b.add_argument("--rounds", type=int, default=None, help="rounds per case, each a 50 ms warm-up + 3 timed calls per provider (default 5, quick 2)")
    b.add_argument("--backend", choices=("tvm", "triton", "reference"), default=None,
                   help="force a backend (default: chosen per device)")
    b.add_argument("--out", type=Path, default=None,
                   help="result file; .json and .csv are written (default results/bench-<time>.json)")
    b.set_defaults(run=_bench)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
