"""What ``edgesparse train`` runs: several training runs interleaved epoch by epoch (so
that a shared machine's changing load falls on all of them alike), their results
table, the accuracy-matrix and speed-versus-accuracy figures, and a JSON of every figure.

Output directory layout::

    invocation.json          the run configurations (what --resume reads back)
    checkpoints/<run>.pt     each run's last checkpoint (end of its last epoch)
    results.json             every run's results, with the machine and versions
    accuracy.png             class-IL and task-IL accuracy matrices, one column per run
    speed_accuracy.png       final class-IL accuracy against training wall-clock and FLOPs
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import sys
from dataclasses import asdict, replace
from itertools import product
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .train import RunConfig, start

__all__ = ["ablation_configs", "default_configs", "format_table", "run_invocation"]


def default_configs(base: RunConfig, sparse_method: str = "sparcl", dense_lr: Optional[float] = None) -> List[RunConfig]:
    """The default comparison: the sparse run (``sparse_method``: SparCL's TDM + DDR + DGM,
    RigL, SpFDE's freezing + sieving, or a static mask) and the dense run of the same
    strategy, same seed; the dense run at ``dense_lr`` (default: base's lr)."""
    flags = {
        "sparcl": dict(tdm=True, ddr=True, dgm=True),
        "rigl": dict(rigl=True),
        "spfde": dict(freeze=True, sieve=True),
        "static": {},
    }
    if sparse_method not in flags:
        raise ValueError(f"sparse_method must be one of {sorted(flags)}, got {sparse_method!r}")
    sparse = replace(base, name=f"{base.strategy}-{sparse_method}", **flags[sparse_method])
    dense = replace(base, name=f"{base.strategy}-dense", sparsity=0.0, lr=base.lr if dense_lr is None else dense_lr)
    return [sparse, dense]


def ablation_configs(base: RunConfig, dense_lr: Optional[float] = None) -> List[RunConfig]:
    """SparCL's TDM, DDR and DGM each on and off (8 sparse runs), plus the dense run (at
    ``dense_lr``, default base's lr)."""
    runs = []
    for tdm, ddr, dgm in product((True, False), repeat=3):
        tag = "+".join(n for n, on in (("tdm", tdm), ("ddr", ddr), ("dgm", dgm)) if on) or "static"
        runs.append(replace(base, name=f"sparse-{tag}", tdm=tdm, ddr=ddr, dgm=dgm))
    runs.append(replace(base, name="dense", sparsity=0.0, lr=base.lr if dense_lr is None else dense_lr))
    return runs


def _write_json(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _environment() -> Dict:
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "python": platform.python_version(),
        # The whole process (every run of the invocation, data and kernels included);
        # each run's own figure is its memory_peak_train_mb.
        "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_invocation(configs: Sequence[RunConfig], out: Path, resume: bool = False, progress_stream=sys.stderr) -> List[Dict]:
    """Train ``configs`` interleaved one epoch at a time, checkpointing each under ``out``;
    with ``resume`` the configurations are read back from ``out/invocation.json`` and
    every run continues from its checkpoint. Writes results.json and the figures and
    returns the results, the baseline (the first dense run) last-relative figures added."""
    out = Path(out)
    saved = out / "invocation.json"
    if resume:
        if not saved.exists():
            raise FileNotFoundError(f"--resume: {saved} does not exist (nothing to resume in {out})")
        configs = [RunConfig.from_dict(d) for d in json.loads(saved.read_text())["runs"]]
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"run names must be distinct, got {names}")
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    if not resume:
        _write_json({"runs": [asdict(c) for c in configs]}, saved)
    started = [start(c, out / "checkpoints" / f"{c.name}.pt", resume, progress_stream) for c in configs]
    pending = [epochs for _, epochs in started]
    while pending:
        for epochs in list(pending):
            if next(epochs, None) is None:
                pending.remove(epochs)
    results = [trainer.results() for trainer, _ in started]
    _add_relative(results)
    _write_json({"environment": _environment(), "runs": results}, out / "results.json")
    plot_accuracy(results, out / "accuracy.png")
    plot_speed_accuracy(results, out / "speed_accuracy.png")
    return results


def _add_relative(results: List[Dict]) -> None:
    dense = next((r for r in results if r["config"]["sparsity"] == 0.0), None)
    for r in results:
        r["speedup_wall"] = dense["wall_s"] / r["wall_s"] if dense and r["wall_s"] > 0 else None
        r["flops_reduction"] = dense["flops_total"] / r["flops_total"] if dense and r["flops_total"] > 0 else None
        r["delta_class_il"] = r["avg_class_il"] - dense["avg_class_il"] if dense else None


def format_table(results: List[Dict]) -> str:
    head = ["run", "density", "class-IL %", "task-IL %", "forget", "BWT", "GFLOP", "FLOPs x",
            "wall s", "wall x", "samples", "peak MB"]
    rows = []
    for r in results:
        rows.append([
            r["name"], f"{r['sparse_density']:.3f}", f"{r['avg_class_il']:.2f}", f"{r['avg_task_il']:.2f}",
            f"{r['forgetting_class_il']:.2f}", f"{r['bwt_class_il']:.2f}", f"{r['flops_total'] / 1e9:.1f}",
            f"{r['flops_reduction']:.2f}" if r.get("flops_reduction") else "-",
            f"{r['wall_s']:.1f}", f"{r['speedup_wall']:.2f}" if r.get("speedup_wall") else "-",
            str(r["samples"]), f"{r['memory_peak_train_mb']:.1f}",
        ])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def plot_accuracy(results: List[Dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(3.2 * len(results), 6), squeeze=False)
    for col, r in enumerate(results):
        for row, key in enumerate(("acc_class_il", "acc_task_il")):
            ax = axes[row][col]
            acc = r[key]  # rows: after task i; columns: test task j
            ax.imshow(acc, vmin=0, vmax=100, cmap="viridis")
            for i, row_acc in enumerate(acc):
                for j, value in enumerate(row_acc):
                    ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7, color="w")
            ax.set_title(f"{r['name']}\n{'class' if row == 0 else 'task'}-IL avg {r['avg_' + key[4:]]:.1f}%", fontsize=8)
            ax.set_xlabel("test task")
            ax.set_ylabel("after training task")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_speed_accuracy(results: List[Dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for r in results:
        for ax, x in zip(axes, (r["wall_s"], r["flops_total"] / 1e9)):
            ax.scatter(x, r["avg_class_il"], s=40)
            ax.annotate(r["name"], (x, r["avg_class_il"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    axes[0].set_xlabel("training wall-clock (s)")
    axes[1].set_xlabel("training GFLOP (weight products)")
    for ax in axes:
        ax.set_ylabel("final class-IL average accuracy (%)")
        ax.grid(alpha=0.3)
    fig.suptitle("speed versus accuracy (same stream, seed and strategy)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
