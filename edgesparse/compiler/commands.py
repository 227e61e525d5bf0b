"""The ``edgesparse tune`` and ``edgesparse map`` subcommands (registered by cli.py)."""

from __future__ import annotations

import argparse
import copy
import os
import re
import sys
import time
from pathlib import Path
from typing import List, Tuple


def _block(text: str) -> Tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if not m or int(m[1]) < 1 or int(m[2]) < 1:
        raise argparse.ArgumentTypeError(f"a block is ROWSxCOLS of positive ints, e.g. 32x32; got {text!r}")
    return int(m[1]), int(m[2])


def _layer(text: str) -> Tuple[int, int, int]:
    m = re.fullmatch(r"(\d+),(\d+),(\d+)", text)
    if not m or min(int(v) for v in m.groups()) < 1:
        raise argparse.ArgumentTypeError(f"a layer is M,N,K (batch, out features, in features); got {text!r}")
    return int(m[1]), int(m[2]), int(m[3])


def _endpoint(text: str) -> Tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _tune(args: argparse.Namespace) -> int:
    from .target import Target
    from .tuner import LocalRunner, RPCRunner, geomean, tune_layer
    from .tuning import OPS, TuningDatabase, TuningDatabaseError

    ops = args.ops.split(",")
    bad = [op for op in ops if op not in OPS]
    if bad:
        print(f"edgesparse tune: --ops takes {','.join(OPS)}; got {bad}", file=sys.stderr)
        return 2
    if args.budget <= 0:
        print(f"edgesparse tune: --budget must be positive seconds, got {args.budget}", file=sys.stderr)
        return 2
    if not 0 < args.density <= 1:
        print(f"edgesparse tune: --density must be in (0, 1], got {args.density}", file=sys.stderr)
        return 2
    if args.rpc and args.tracker:
        print("edgesparse tune: give --rpc or --tracker, not both", file=sys.stderr)
        return 2
    if args.tracker and not args.key:
        print("edgesparse tune: --tracker needs --key (the device's key on the tracker)", file=sys.stderr)
        return 2
    target = Target.detect()
    if args.rpc:
        runner = RPCRunner(*args.rpc)
    elif args.tracker:
        runner = RPCRunner(*args.tracker, key=args.key)
    else:
        runner = LocalRunner()
    db = TuningDatabase(args.db)
    print(f"tuning on {runner.name} for {target.fingerprint}; {args.budget:g} s per layer; database {db.path}")
    speedups = []
    try:
        for m, n, k in args.layer:
            results = tune_layer(m, n, k, args.block, args.density, budget_s=args.budget, ops=ops, runner=runner,
                                 db=db, target=target)
            for r in results:
                speedups.append(r.speedup)
                print(f"{r.problem.label():<48} heuristic {1e3 * r.heuristic_s:8.3f} ms  tuned {1e3 * r.best_s:8.3f} ms "
                      f"({r.speedup:.2f}x, {r.tried} schedules, {r.seconds:.1f} s)  {r.best}")
    except TuningDatabaseError as err:
        print(f"edgesparse tune: {err}", file=sys.stderr)
        return 2
    print(f"geometric mean speed-up over the heuristic: {geomean(speedups):.3f}x ({len(speedups)} kernels)")
    return 0


def _model(args) -> Tuple[object, object, object]:
    """(model, example input, which layers may be pruned) for ``--model``."""
    import torch

    from ..models import MLP, ResNet18

    torch.manual_seed(args.seed)
    if args.model == "mlp":
        widths = [int(w) for w in args.widths.split(",")]
        model = MLP(widths)
        last = f"layers.{len(widths) - 2}"
        return model, torch.randn(args.batch, widths[0]), (lambda name: name != last)  # classifier stays dense
    model = ResNet18(10, args.width)
    pattern = re.compile(r"layer\d\.\d\.conv[12]")  # as resnet18_sparse_config: stem, shortcuts, classifier dense
    return model, torch.randn(args.batch, 3, 32, 32), (lambda name: pattern.fullmatch(name) is not None)


def _map(args: argparse.Namespace) -> int:
    from ..pruning_maps import PruningMap, PruningMapError, rule_map, search_map
    from ..pruning_maps.mapper import stderr_progress
    from .files import cache_dir
    from .target import Target

    if not 0 <= args.sparsity < 1:
        print(f"edgesparse map: --sparsity must be in [0, 1), got {args.sparsity}", file=sys.stderr)
        return 2
    fingerprint = Target.detect().fingerprint
    model, example, include = _model(args)
    rules_path = args.rules_from or cache_dir() / f"rules-{fingerprint}.json"
    if args.method == "rule":
        try:
            source = PruningMap.load(rules_path, expect_target=fingerprint)
        except FileNotFoundError:
            print(f"edgesparse map: no rules at {rules_path}; run `edgesparse map --method search` first "
                  "or give --rules-from a searched map", file=sys.stderr)
            return 2
        except PruningMapError as err:
            print(f"edgesparse map: {err}", file=sys.stderr)
            return 2
        start = time.perf_counter()
        pmap = rule_map(model, example, source.rules, fingerprint, include)
        pmap.info["seconds"] = time.perf_counter() - start
        pmap.info["sparsity"] = args.sparsity
    else:
        try:
            result = search_map(model, example, args.sparsity, fingerprint, include, progress=stderr_progress,
                                reference_block=args.reference_block, layer_floor=args.layer_floor,
                                pow2=args.pow2)
        except ValueError as err:
            print(f"edgesparse map: {err}", file=sys.stderr)
            return 2
        pmap = result.pmap
        pmap.info["seconds"] = result.seconds
        pmap.save(rules_path)
        print(f"rules saved to {rules_path}")
        _print_search(result)
    pmap.save(args.out)
    print(f"{args.method} map: retained energy {pmap.info['retained_energy']:.4f}, computed in {pmap.info['seconds']:.3f} s; "
          f"wrote {args.out}")
    for name, scheme in pmap.layers.items():
        print(f"  {name:<24} {_describe(scheme)}")
    if args.compare:
        if args.method == "search":
            _compare(args, model, example, include, pmap, result)
        else:  # the rules against the search they came from, when it mapped this model
            others = {"searched map": source} if source.layers else {}
            _compare(args, model, example, include, pmap, None, others)
    return 0


def _describe(scheme) -> str:
    """'dense', '16x32 @ 0.300' or 'pow2 @ 0.100' (the kept fraction of C's row blocks)."""
    from ..nn import Pow2Scheme

    if scheme is None:
        return "dense"
    if isinstance(scheme, Pow2Scheme):
        return f"pow2 @ {1.0 - scheme.sparsity:.3f}"
    return f"{scheme.block[0]}x{scheme.block[1]} @ {scheme.density:.3f}"


def _print_search(result) -> None:
    print(f"energy budget {result.energy_target:.4f} of the prunable layers' weight energy; predicted latency of "
          "their forward + backward + update:")
    print(f"  searched map: {1e3 * sum(c.seconds for c in result.choice.values()):8.3f} ms")
    for block, u in sorted(result.uniforms.items(), key=lambda kv: sum(c.seconds for c in kv[1].values())):
        d = next(iter(u.values())).density
        print(f"  uniform {block[0]:>2}x{block[1]:<3} @ {d:.3f}: {1e3 * sum(c.seconds for c in u.values()):8.3f} ms")


def _compare(args, model, example, include, pmap, result, others=None) -> None:
    """Measured training steps of the map against the uniform maps predicted fastest
    (search) or ``others`` (label -> map)."""
    import torch

    from ..bench import _median_times
    from ..bench_training import _step_fn
    from ..nn import SparseScheme, sparsify

    target = torch.randint(10, (example.shape[0],))
    configs = {f"{pmap.info['method']} map": pmap, **(others or {})}
    predicted = {}  # label -> the prunable layers' share of a step as the search measured it
    if result is not None:
        predicted[next(iter(configs))] = sum(c.seconds for c in result.choice.values())
        ranked = sorted(result.uniforms.items(), key=lambda kv: sum(c.seconds for c in kv[1].values()))
        for block, u in ranked[: args.compare]:
            d = next(iter(u.values())).density
            label = f"uniform {block[0]}x{block[1]} @ {d:.3f}"
            configs[label] = {**{name: SparseScheme(block, d) for name in u}, "default": None}
            predicted[label] = sum(c.seconds for c in u.values())
    steps = {label: _step_fn(sparsify(copy.deepcopy(model), cfg), example, target) for label, cfg in configs.items()}
    print(f"measuring training steps (batch {example.shape[0]}), {args.rounds} rounds interleaved, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')} ...")
    times = _median_times(steps, args.rounds)
    energy = _energies(model, include, configs)
    base = times[next(iter(times))]
    for label, seconds in times.items():
        # The rest of the step (stem, BatchNorm, ReLU, classifier, loss, SGD) is the same
        # work under every map: the layers' speed-up is diluted by it in the step's.
        split = (f"  = layers {1e3 * predicted[label]:7.2f} (predicted) + rest {1e3 * (seconds - predicted[label]):7.2f}"
                 if label in predicted else "")
        print(f"  {label:<28} step {1e3 * seconds:9.2f} ms{split}  retained energy {energy[label]:.4f}  "
              f"map speed-up {seconds / base:.2f}x")


def _energies(model, include, configs) -> dict:
    """Retained weight energy, ||W||² - ||W - Ŵ||², of each config over the prunable
    layers, Ŵ the weight each built layer computes with (a dense one keeps all)."""
    from torch import nn

    from ..nn import Pow2Conv2d, Pow2Linear, SparseConv2d, SparseLinear, sparsify

    def computed_weight(module):
        if isinstance(module, (SparseLinear, SparseConv2d)):
            return module.to_dense().weight
        if isinstance(module, (Pow2Linear, Pow2Conv2d)):
            return module.weight_pow2().to_dense()
        return module.weight

    prunable = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and include(name)]
    weights = {name: model.get_submodule(name).weight.detach().double() for name in prunable}
    total = sum(float(w.pow(2).sum()) for w in weights.values())
    out = {}
    for label, cfg in configs.items():
        sparse = sparsify(copy.deepcopy(model), cfg)
        kept = 0.0
        for name, w in weights.items():
            approx = computed_weight(sparse.get_submodule(name)).detach().double().reshape(w.shape)
            kept += float(w.pow(2).sum() - (w - approx).pow(2).sum())
        out[label] = kept / total if total else 1.0
    return out


def add_commands(sub) -> None:
    """Add ``tune`` and ``map`` to the ``edgesparse`` command's subparsers."""
    t = sub.add_parser("tune", help="measure the kernels' schedules on this device (or one reached by TVM RPC) "
                                    "and store the fastest in the tuning database")
    t.add_argument("--layer", type=_layer, action="append", required=True, metavar="M,N,K",
                   help="batch, out features, in features of a layer to tune (repeatable)")
    t.add_argument("--block", type=_block, default=(32, 32), help="block shape ROWSxCOLS (default 32x32)")
    t.add_argument("--density", type=float, default=0.1, help="fraction of blocks kept (default 0.1)")
    t.add_argument("--ops", default="forward,grad_input,grad_weight", help="kernels to tune (default: all three)")
    t.add_argument("--budget", type=float, default=60.0, help="seconds per layer, shared by its ops (default 60)")
    t.add_argument("--db", type=Path, default=None, help="tuning database (default: the cache directory's)")
    t.add_argument("--rpc", type=_endpoint, default=None, metavar="HOST:PORT", help="measure on a TVM RPC server")
    t.add_argument("--tracker", type=_endpoint, default=None, metavar="HOST:PORT",
                   help="measure on a device registered with a TVM RPC tracker (with --key)")
    t.add_argument("--key", default=None, help="the device's key on the tracker")
    t.set_defaults(run=_tune)
    m = sub.add_parser("map", help="choose each layer's pruning scheme from measured latency and retained energy")
    m.add_argument("--model", choices=("mlp", "resnet18"), required=True)
    m.add_argument("--sparsity", type=float, default=0.9,
                   help="sets the energy budget: what --reference-block at density 1 - sparsity keeps (default 0.9)")
    m.add_argument("--method", choices=("search", "rule"), default="search")
    m.add_argument("--out", type=Path, required=True, help="the map's JSON file")
    m.add_argument("--rules-from", type=Path, default=None,
                   help="rule method: a searched map whose rules to apply (default: the last search's, in the cache dir)")
    m.add_argument("--reference-block", type=_block, default=(16, 16), help="block of the energy budget (default 16x16)")
    m.add_argument("--layer-floor", dest="layer_floor", type=float, default=0.0, metavar="F",
                   help="search: every layer keeps at least F x the budget's fraction of its own weight energy "
                        "(default 0: the global budget only, which may leave some layers nearly empty)")
    m.add_argument("--no-pow2", dest="pow2", action="store_false",
                   help="search: leave power-of-two weights out of the candidates (block pruning and dense only)")
    m.add_argument("--widths", default="2048,2048,2048,2048,10", help="mlp: layer widths (default 2048,...,10)")
    m.add_argument("--width", type=int, default=64,
                   help="resnet18: base width (default 64: the CIFAR ResNet-18 of `edgesparse bench`'s training "
                        "section, 256 and 512 channels in its last stages; 20 is the continual-learning literature's)")
    m.add_argument("--batch", type=int, default=None, help="batch (default: mlp 256, resnet18 32)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--compare", type=int, default=0, metavar="N",
                   help="also measure training steps of the map and of the N uniform maps predicted fastest "
                        "(rule method: of the searched map given by --rules-from)")
    # 10 rounds, not 5: the same MLP map measured 1.14x to 1.37x the best uniform one over
    # three 5-round runs on the shared dev machine; 10 rounds add ~5 s to an MLP comparison.
    m.add_argument("--rounds", type=int, default=10, help="rounds of the --compare measurement (default 10)")
    m.set_defaults(run=_map_with_defaults)


def _map_with_defaults(args: argparse.Namespace) -> int:
    if args.batch is None:
        args.batch = 256 if args.model == "mlp" else 32
    return _map(args)


__all__: List[str] = ["add_commands"]
