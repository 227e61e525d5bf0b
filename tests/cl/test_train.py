"""The trainer: resume reaches the same final metrics as an uninterrupted run, the
strategies order as they must, and `edgesparse train --quick` writes its outputs."""

import io
import json

import pytest
import torch

from edgesparse import cli
from edgesparse.cl.experiment import ablation_configs, default_configs
from edgesparse.cl.train import RunConfig, run, start

# DER++ at the paper's beta of 0.5: at RunConfig's 2.0 this 32-wide MLP at lr 0.1 fell to
# chance (task-IL 50% with RigL), where the full-size default gains from it.
TINY = dict(stream="split-digits", hidden=(32, 32), block=(8, 8), buffer_size=40, buffer_batch=8,
            batch_size=16, epochs=2, lr=0.1, beta=0.5)
QUIET = io.StringIO()


def test_resume_mid_task_equals_uninterrupted(tmp_path):
    config = RunConfig(name="resume", sparsity=0.5, tdm=True, ddr=True, dgm=True, **TINY)
    whole = run(config, progress_stream=QUIET)
    ckpt = tmp_path / "run.pt"
    _, epochs = start(config, ckpt, progress_stream=QUIET)
    for _ in range(5):  # stop after the first epoch of task 3: mid-task
        next(epochs)
    del epochs
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1
    resumed = run(config, ckpt, resume=True, progress_stream=QUIET)
    for key in ("acc_class_il", "acc_task_il", "flops_forward", "flops_backward", "samples", "sparse_density"):
        assert resumed[key] == whole[key], key
    assert len(resumed["wall_per_task_s"]) == 5


def test_resume_refuses_another_configuration(tmp_path):
    ckpt = tmp_path / "run.pt"
    _, epochs = start(RunConfig(**TINY), ckpt, progress_stream=QUIET)
    next(epochs)
    with pytest.raises(ValueError, match="configuration"):
        run(RunConfig(**{**TINY, "lr": 0.2}), ckpt, resume=True, progress_stream=QUIET)
    # A checkpoint of the format before alpha and beta were settings: its config cannot
    # say which beta it trained with, so it is refused, not resumed under today's default.
    state = torch.load(ckpt, weights_only=True)
    state["version"] = 1
    for key in ("alpha", "beta"):
        del state["config"][key]
    torch.save(state, ckpt)
    with pytest.raises(ValueError, match="checkpoint version 1 is not 2.*without --resume"):
        run(RunConfig(**TINY), ckpt, resume=True, progress_stream=QUIET)


def test_strategies_order_as_bounds():
    base = {**TINY, "epochs": 3}
    results = {s: run(RunConfig(name=s, strategy=s, **base), progress_stream=QUIET) for s in ("finetune", "derpp", "joint")}
    cil = {s: r["avg_class_il"] for s, r in results.items()}
    # Fine-tuning forgets the old classes; replay keeps some; joint training sees everything.
    assert cil["finetune"] < cil["derpp"] < cil["joint"]
    assert results["finetune"]["forgetting_class_il"] > results["derpp"]["forgetting_class_il"]
    # Replay puts the buffer batches through the model too: more samples for the same data.
    assert results["derpp"]["samples"] > results["finetune"]["samples"]


def test_mechanisms_cut_flops_and_samples():
    # 3 epochs: DDR removes once its counts span 2 epochs, so at 2 a task would end first.
    three = {**TINY, "epochs": 3}
    static3 = run(RunConfig(name="static", sparsity=0.5, **three), progress_stream=QUIET)
    sparcl = run(RunConfig(name="sparcl", sparsity=0.5, ddr=True, dgm=True, **three), progress_stream=QUIET)
    static = run(RunConfig(name="static", sparsity=0.5, **TINY), progress_stream=QUIET)
    spfde = run(RunConfig(name="spfde", sparsity=0.5, freeze=True, sieve=True, **TINY), progress_stream=QUIET)
    rigl = run(RunConfig(name="rigl", sparsity=0.5, rigl=True, **TINY), progress_stream=QUIET)
    assert sparcl["flops_backward"] < static3["flops_backward"] and sparcl["samples"] < static3["samples"]
    assert spfde["flops_backward"] < static["flops_backward"] and spfde["samples"] < static["samples"]
    assert rigl["sparse_density"] == static["sparse_density"]
    for r in (sparcl, spfde, rigl):
        assert r["avg_task_il"] > 60  # it learns (two-class tasks: chance is 50)


def test_config_errors_are_named():
    with pytest.raises(ValueError, match="sparse model"):
        RunConfig(tdm=True)
    with pytest.raises(ValueError, match="strategy"):
        RunConfig(strategy="ewc")
    with pytest.raises(ValueError, match="epochs"):
        RunConfig(epochs=0)
    with pytest.raises(ValueError, match="dgm_fraction"):
        RunConfig(sparsity=0.9, dgm=True, dgm_fraction=0.0)
    with pytest.raises(ValueError, match="ddr_fraction"):
        RunConfig(ddr=True, ddr_fraction=1.0)
    with pytest.raises(ValueError, match="lr"):
        RunConfig(lr=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        RunConfig(momentum=1.0)
    with pytest.raises(ValueError, match="init_gain"):
        RunConfig(init_gain=0.0)
    with pytest.raises(ValueError, match="beta"):
        RunConfig(beta=-0.5)


def test_cli_quick_train_writes_results_and_resumes(tmp_path, capsys):
    out = tmp_path / "train"
    assert cli.main(["train", "--quick", "--epochs", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "derpp-sparcl" in printed and "derpp-dense" in printed and "fewer FLOPs" in printed
    payload = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in payload["runs"]]
    assert names == ["derpp-sparcl", "derpp-dense"]
    for name in ("accuracy.png", "speed_accuracy.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sparse, dense = payload["runs"]
    assert sparse["flops_reduction"] == pytest.approx(dense["flops_total"] / sparse["flops_total"])
    assert sparse["config"]["lr"] == dense["config"]["lr"] == 0.06  # --quick: the dense run takes --lr
    assert sparse["config"]["init_gain"] == dense["config"]["init_gain"]  # one initialisation for both
    assert len(sparse["acc_class_il"]) == 5 and sparse["sparse_density"] == pytest.approx(0.5, abs=0.05)
    # Resuming a finished invocation retrains nothing and reports the same figures.
    assert cli.main(["train", "--resume", str(out)]) == 0
    again = json.loads((out / "results.json").read_text())["runs"]
    assert [r["acc_class_il"] for r in again] == [r["acc_class_il"] for r in payload["runs"]]


def test_dense_run_takes_its_own_learning_rate():
    base = RunConfig(sparsity=0.9, lr=0.06)
    sparse, dense = default_configs(base, "sparcl", dense_lr=0.03)
    assert (sparse.lr, sparse.sparsity, dense.lr, dense.sparsity) == (0.06, 0.9, 0.03, 0.0)
    runs = ablation_configs(base, dense_lr=0.02)
    assert [r.lr for r in runs] == [0.06] * 8 + [0.02] and runs[-1].sparsity == 0.0
    assert default_configs(base)[1].lr == 0.06


def test_cli_train_rejects_bad_settings(tmp_path, capsys):
    assert cli.main(["train", "--quick", "--sparsity", "1.5", "--out", str(tmp_path)]) == 2
    assert "sparsity" in capsys.readouterr().err
    assert cli.main(["train", "--quick", "--dense-lr", "-1", "--out", str(tmp_path)]) == 2
    assert "lr must be positive" in capsys.readouterr().err
    assert cli.main(["train", "--quick", "--init-gain", "0", "--out", str(tmp_path)]) == 2
    assert "init_gain must be positive" in capsys.readouterr().err
    assert cli.main(["train", "--quick", "--beta", "-1", "--out", str(tmp_path)]) == 2
    assert "beta (a DER++ replay loss weight) must be >= 0" in capsys.readouterr().err
    assert cli.main(["train", "--resume", str(tmp_path / "missing")]) == 2


def test_permuted_stream_with_erk_densities():
    config = RunConfig(stream="permuted-mnist1d", n_train=600, hidden=(32, 64, 32), block=(8, 8), sparsity=0.5,
                       distribution="erk", buffer_size=40, buffer_batch=8, batch_size=16, epochs=1)
    r = run(config, progress_stream=QUIET)
    assert len(r["acc_class_il"]) == 5 and r["acc_class_il"] == r["acc_task_il"]  # every task holds every class
    # ERK: the two sparse layers (64x32 and 32x64) have equal shapes up to transposition, so equal densities,
    # and together they keep half of their weights.
    assert r["sparse_density"] == pytest.approx(0.5, abs=1 / 32)
