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
    out = Path(args.out or Path("results") / f"bench-{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
    try:
        with use_backend(args.backend) if args.backend else contextlib.nullcontext():
            if args.section in ("kernels", "all"):
                rows = bench.run(cases, rounds, progress)
                print(bench.format_table(rows), flush=True)
                json_path, csv_path = bench.write_results(rows, stamp, out)
                png_path = bench.plot(rows, out.with_suffix(".png"))
                print(f"wrote {json_path}, {csv_path} and {png_path}", flush=True)
            if args.section in ("training", "all"):
                from . import bench_training

                training_cases = bench_training.QUICK_CASES if args.quick else bench_training.DEFAULT_CASES
                rows = bench_training.run(training_cases, rounds, progress)
                print(bench_training.format_table(rows))
                training_out = out.with_name(out.stem + "-training.json")
                json_path, csv_path = bench.write_results(rows, stamp, training_out)
                png_path = bench_training.plot(rows, training_out.with_suffix(".png"))
                print(f"wrote {json_path}, {csv_path} and {png_path}")
    except BackendUnavailableError as err:
        print(f"edgesparse bench: {err}", file=sys.stderr)
        return 2
    return 0


def _export(args: argparse.Namespace) -> int:
    from . import export

    progress = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    try:
        model, input_shape = export.load_checkpoint(args.checkpoint)
        out = export.export(model, args.out, input_shape, target=args.target, batch_hint=args.batch_hint, progress=progress)
    except (OSError, TypeError, ValueError) as err:
        print(f"edgesparse export: {err}", file=sys.stderr)
        return 2
    if args.report:
        print(export.size_report(model, out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgesparse", description="Block-sparse training kernels: benchmarks and tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="time the block-sparse products against torch dense and torch.sparse")
    b.add_argument("--quick", action="store_true", help="small shapes, a few seconds (a smoke run)")
    b.add_argument("--rounds", type=int, default=None, help="rounds per case, each a 50 ms warm-up + 3 timed calls per provider (default 5, quick 2)")
    b.add_argument("--backend", choices=("tvm", "triton", "reference"), default=None,
                   help="force a backend (default: chosen per device)")
    b.add_argument("--section", choices=("kernels", "training", "all"), default="all",
                   help="kernels: the three products per shape; training: whole training steps and conv layers, "
                        "sparse modules against their dense models (default: both)")
    b.add_argument("--out", type=Path, default=None,
                   help="result file; .json and .csv are written (default results/bench-<time>.json)")
    b.set_defaults(run=_bench)
    e = sub.add_parser("export", help="write a checkpoint's model as kernels + weights + manifest for the C++ host (runtime/)")
    e.add_argument("checkpoint", type=Path, help="a model checkpoint written by edgesparse.export.save_checkpoint")
    e.add_argument("out", type=Path, help="directory to write")
    e.add_argument("--target", choices=("host", "aarch64"), default="host", help="CPU to compile for (default: this one)")
    e.add_argument("--batch-hint", type=int, default=32, help="batch the kernel schedules are chosen for (default 32)")
    e.add_argument("--report", action="store_true", help="print the directory's size against the dense fp32 state_dict")
    e.set_defaults(run=_export)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
