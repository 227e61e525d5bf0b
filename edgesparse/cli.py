"""The ``edgesparse`` command."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
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
          f"{stamp['torch_threads']} threads, OMP_WAIT_POLICY {stamp['omp_wait_policy']}, tvm {stamp['tvm']}); median of {rounds} rounds x 3 timed calls per provider", flush=True)
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


def _train(args: argparse.Namespace) -> int:
    import time

    from .cl.experiment import ablation_configs, default_configs, format_table, run_invocation
    from .cl.train import RunConfig

    out = args.out
    if args.resume is not None:
        out = _resume_dir(args.resume)
        if out is None:
            print("edgesparse train: --resume found no results/train-* directory to resume", file=sys.stderr)
            return 2
    out = out or Path("results") / f"train-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    try:
        base = RunConfig(**_train_settings(args))
        dense_lr = (base.lr if args.quick else DENSE_LR) if args.dense_lr is None else args.dense_lr
        configs = ablation_configs(base, dense_lr) if args.ablation else default_configs(base, args.sparse_method, dense_lr)
    except (TypeError, ValueError) as err:
        print(f"edgesparse train: {err}", file=sys.stderr)
        return 2
    print(f"edgesparse train -> {out} (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')})", flush=True)
    tic = time.perf_counter()
    try:
        results = run_invocation(configs, out, resume=args.resume is not None)
    except (FileNotFoundError, ValueError) as err:
        print(f"edgesparse train: {err}", file=sys.stderr)
        return 2
    print(format_table(results))
    for r in results:
        if r.get("flops_reduction") and r["sparse_density"] < 1.0:
            print(f"{r['name']}: {r['flops_reduction']:.2f}x fewer FLOPs, {r['speedup_wall']:.2f}x faster on the clock "
                  f"(kernel efficiency {r['speedup_wall'] / r['flops_reduction']:.0%} of the FLOP saving), "
                  f"class-IL {r['delta_class_il']:+.2f} points against dense")
    print(f"wrote {out / 'results.json'}, {out / 'accuracy.png'} and {out / 'speed_accuracy.png'} "
          f"in {time.perf_counter() - tic:.0f} s")
    return 0


def _resume_dir(value: str) -> Optional[Path]:
    if value != "latest":
        return Path(value)
    candidates = sorted(Path("results").glob("train-*/invocation.json"))
    return candidates[-1].parent if candidates else None


# Settings of `edgesparse train` (full size, --quick): the full default fits the < 10 min
# budget on 2 cores for both runs together.
# Each run at its own best learning rate: class-IL over seeds (bench/cl_seeds.py, the
# README's table) peaks for dense DER++ at 0.03 and for the 10%-dense SparCL run at 0.06.
SPARSE_LR, DENSE_LR = 0.06, 0.03

_TRAIN_DEFAULTS = {
    "stream": ("split-mnist1d", "split-digits"),
    "hidden": ((2048, 2048, 2048), (128, 128, 128)),
    "block": ((32, 32), (16, 16)),
    "epochs": (5, 2),
    "buffer_size": (500, 100),
    "sparsity": (0.9, 0.5),
}


def _train_settings(args: argparse.Namespace) -> dict:
    settings = {}
    for key, (full, quick) in _TRAIN_DEFAULTS.items():
        value = getattr(args, key)
        settings[key] = (quick if args.quick else full) if value is None else value
    settings["hidden"] = tuple(settings["hidden"])
    settings["block"] = tuple(settings["block"]) if len(settings["block"]) == 2 else (settings["block"][0],) * 2
    for key in ("strategy", "lr", "momentum", "seed", "ddr_fraction", "dgm_fraction", "tdm_delta", "distribution", "batch_size", "buffer_batch"):
        settings[key] = getattr(args, key)
    for key in ("init_gain", "alpha", "beta"):  # RunConfig's defaults unless given
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    return settings


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
    e.add_argument("checkpoint", type=Path, help="a checkpoint: edgesparse.export.save_checkpoint's, or a training run's (its MLP)")
    e.add_argument("out", type=Path, help="directory to write")
    e.add_argument("--target", choices=("host", "aarch64"), default="host", help="CPU to compile for (default: this one)")
    e.add_argument("--batch-hint", type=int, default=32, help="batch the kernel schedules are chosen for (default 32)")
    e.add_argument("--report", action="store_true", help="print the directory's size against the dense fp32 state_dict")
    e.set_defaults(run=_export)

    t = sub.add_parser("train", help="continual learning on sparse layers against a dense baseline (the main job)")
    t.add_argument("--quick", action="store_true", help="a tiny stream and model, seconds (a smoke run)")
    t.add_argument("--stream", choices=("split-mnist1d", "split-digits", "permuted-mnist1d"), default=None,
                   help="data stream (default split-mnist1d; quick: split-digits)")
    t.add_argument("--strategy", choices=("derpp", "er", "finetune", "joint"), default="derpp")
    t.add_argument("--sparse-method", choices=("sparcl", "rigl", "spfde", "static"), default="sparcl",
                   help="what the sparse run adds to its strategy (default SparCL's TDM + DDR + DGM)")
    t.add_argument("--ablation", action="store_true",
                   help="instead: SparCL with TDM, DDR and DGM each on and off (8 runs) and dense")
    t.add_argument("--sparsity", type=float, default=None, help="block sparsity of the hidden layers (default 0.9)")
    t.add_argument("--distribution", choices=("uniform", "erk"), default="uniform", help="per-layer densities")
    t.add_argument("--hidden", type=int, nargs="+", default=None, help="hidden widths (default 2048 2048 2048)")
    t.add_argument("--block", type=int, nargs="+", default=None, help="block shape, one or two ints (default 32)")
    t.add_argument("--epochs", type=int, default=None, help="epochs per task (default 5)")
    t.add_argument("--buffer-size", dest="buffer_size", type=int, default=None, help="replay buffer, samples (default 500)")
    t.add_argument("--batch-size", dest="batch_size", type=int, default=32)
    t.add_argument("--buffer-batch", dest="buffer_batch", type=int, default=32, help="replay batch size (each of DER++'s two)")
    t.add_argument("--ddr-fraction", dest="ddr_fraction", type=float, default=0.15,
                   help="share of each task's examples DDR removes over its stages (default 0.15; SparCL: 0.3 over 50 epochs)")
    t.add_argument("--dgm-fraction", dest="dgm_fraction", type=float, default=0.2,
                   help="share of each layer's whole weight matrix (pruned blocks included) whose gradient DGM computes, "
                        "as in SparCL's code (default 0.2; at 90%% sparsity nothing is skipped)")
    t.add_argument("--tdm-delta", dest="tdm_delta", type=float, default=0.002,
                   help="share of all blocks TDM swaps per phase (default 0.002; SparCL's paper: 0.01)")
    t.add_argument("--lr", type=float, default=SPARSE_LR, help=f"SGD learning rate of the sparse runs (default {SPARSE_LR})")
    t.add_argument("--dense-lr", dest="dense_lr", type=float, default=None,
                   help=f"SGD learning rate of the dense run (default {DENSE_LR}; --quick: --lr)")
    t.add_argument("--init-gain", dest="init_gain", type=float, default=None,
                   help="hidden-to-hidden layers' initial weights x this, both runs (default: RunConfig's, 1.5; 1 = torch's default)")
    t.add_argument("--momentum", type=float, default=0.9, help="SGD momentum, both runs (default 0.9)")
    t.add_argument("--alpha", type=float, default=None,
                   help="DER++: weight of the MSE to the buffer's stored logits, both runs (default: RunConfig's, 0.1)")
    t.add_argument("--beta", type=float, default=None,
                   help="DER++: weight of the cross-entropy on the buffer's labels, both runs (default: RunConfig's, 2.0)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", type=Path, default=None, help="output directory (default results/train-<time>)")
    t.add_argument("--resume", nargs="?", const="latest", default=None, metavar="DIR",
                   help="continue an interrupted invocation from its checkpoints (default: the latest results/train-*)")
    t.set_defaults(run=_train)
    from .compiler.commands import add_commands  # `tune` and `map` (compiler issue)

    add_commands(sub)
    return parser


# The commands that time sparse products between torch ops, and so run under
# OMP_WAIT_POLICY=PASSIVE (below). `map` joined them late: its --compare steps had been
# timed with torch's workers spinning. The MLP map's step, measured in one process per
# policy: 42-53 ms spinning, 29-31 ms passive; a best uniform map's 50-60 against 35-39;
# the dense model's step ~200 ms under both.
TIMED_COMMANDS = ("train", "bench", "map", "tune")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None and args.command in TIMED_COMMANDS and "OMP_WAIT_POLICY" not in os.environ:
        _restart_with_passive_omp()
    return args.run(args)


def _restart_with_passive_omp() -> None:
    """Run the command again in a process with OMP_WAIT_POLICY=PASSIVE. OpenMP reads it
    when torch loads its runtime, before any code here runs, so it cannot be set later.
    Spinning OpenMP workers (torch's default) take the cores that TVM's workers need in
    the next sparse product; see README for the measurement. Dense and sparse runs of a
    command share the setting, and `bench` stamps it on its results. Only for the
    command line: main(argv) called from Python keeps its process."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    os.execve(sys.executable, [sys.executable, "-m", "edgesparse.cli", *sys.argv[1:]], env)


if __name__ == "__main__":
    sys.exit(main())
