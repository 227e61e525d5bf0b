"""The tuning database: round trip, concurrent writers, corrupt files, schema errors,
and the kernels' use of a tuned schedule."""

import importlib
import json
import multiprocessing
import warnings

import pytest
import torch

from edgesparse.compiler import tuning
from edgesparse.compiler.target import Target, versions
from edgesparse.compiler.tuning import (
    SCHEMA_VERSION, SchemaVersionError, ShapeClass, TuningDatabase, TuningDatabaseError, make_record, record_key,
)
from edgesparse.kernels.tvm.schedule import Schedule
from tests._oracle import masked_dense, top_blocks_mask

FP = "x86_64-test-avx2-2c"
VER = {"edgesparse": "0.1.0", "tvm": "0.27.0.post1"}


def _record(op="forward", block=(32, 32), m=256, sched=Schedule(2, 16, 2, "batch"), **extra):
    return make_record(op, block, "float32", ShapeClass.of(m, 512, 1024, 0.1), FP, VER, sched, time_s=1e-3, **extra)


def test_shape_class_buckets():
    assert ShapeClass.of(200, 512, 1024, 0.12) == ShapeClass(256, 512, 1024, 0.1)
    assert ShapeClass.of(256, 512, 1024, 0.1).batch == 256
    assert ShapeClass.of(1, 8, 8, 1.0) == ShapeClass(1, 8, 8, 1.0)
    assert ShapeClass.of(3, 8, 8, 0.26).density == 0.3
    for bad in (dict(m=0), dict(n=-1), dict(k=2.5)):
        args = {"m": 4, "n": 8, "k": 8, **bad}
        with pytest.raises(ValueError, match=next(iter(bad))):
            ShapeClass.of(args["m"], args["n"], args["k"], 0.5)
    with pytest.raises(ValueError, match="density"):
        ShapeClass.of(4, 8, 8, 0.0)


def test_key_holds_op_block_dtype_shape_target_versions():
    key = record_key("grad_weight", (16, 8), "float32", ShapeClass(64, 512, 1024, 0.2), FP, VER)
    for part in ("grad_weight", "16x8", "float32", "b64", "n512", "k1024", "d0.2", FP, "tvm=0.27.0.post1",
                 "edgesparse=0.1.0"):
        assert part in key
    with pytest.raises(ValueError, match="op must be one of"):
        record_key("backward", (16, 8), "float32", ShapeClass(64, 512, 1024, 0.2), FP, VER)


def test_round_trip(tmp_path):
    db = TuningDatabase(tmp_path / "db.json")
    assert db.load() == {}
    key, record = _record()
    db.merge({key: record})
    payload = json.loads(db.path.read_text())
    assert payload["schema_version"] == SCHEMA_VERSION
    assert db.lookup(key) == Schedule(2, 16, 2, "batch")
    assert db.load()[key]["time_s"] == 1e-3
    # A later measurement of the same key replaces it; other keys stay.
    key2, record2 = _record(op="grad_input")
    key_again, newer = _record(sched=Schedule(4, 8, 1, "blocks"))
    db.merge({key2: record2, key_again: newer})
    assert db.lookup(key) == Schedule(4, 8, 1, "blocks") and db.lookup(key2) == Schedule(2, 16, 2, "batch")
    assert not list(tmp_path.glob("*.tmp"))  # the temp file was renamed, not left behind


def test_records_from_before_the_vector_knob_read_as_the_column_layout(tmp_path):
    """Databases written before ``Schedule.vector`` existed hold schedules without it."""
    key, record = _record(sched=Schedule(3, 8, 2, "blocks", "batch"))
    del record["schedule"]["vector"]
    path = tmp_path / "db.json"
    path.write_text(json.dumps({"schema_version": SCHEMA_VERSION, "records": {key: record}}))
    assert TuningDatabase(path).lookup(key) == Schedule(3, 8, 2, "blocks", "columns")


def _writer(path, worker, count):
    db = TuningDatabase(path)
    for i in range(count):
        key, record = make_record("forward", (8, 8), "float32", ShapeClass.of(1 + i, 64 * (worker + 1), 64, 0.5), FP,
                                  VER, Schedule(1 + worker, 8, 1, "blocks"))
        db.merge({key: record})


def test_two_processes_writing_at_once_keep_every_record(tmp_path):
    path = tmp_path / "db.json"
    ctx = multiprocessing.get_context("fork")  # the children only do file I/O: forking is safe and fast
    procs = [ctx.Process(target=_writer, args=(str(path), w, 40)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    records = TuningDatabase(path).load()
    # Batches 1..40 fall into 7 power-of-two buckets per worker.
    buckets = {ShapeClass.of(1 + i, 64, 64, 0.5).batch for i in range(40)}
    assert len(records) == 2 * len(buckets)
    assert {r["schedule"]["rows"] for r in records.values()} == {1, 2}


def test_corrupt_file_is_moved_aside_and_rebuilt_by_a_writer(tmp_path):
    path = tmp_path / "db.json"
    path.write_text('{"schema_version": 1, "records": {"k": ')  # a writer killed mid-write (no atomic rename)
    db = TuningDatabase(path)
    with pytest.raises(TuningDatabaseError, match="not valid JSON"):
        db.load()
    key, record = _record()
    with pytest.warns(UserWarning, match="moved it to"):
        db.merge({key: record})
    assert db.lookup(key) == Schedule(2, 16, 2, "batch")
    aside = list(tmp_path.glob("db.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text().startswith('{"schema_version": 1, "records": {"k"')


def test_unknown_schema_version_is_refused_and_kept(tmp_path):
    path = tmp_path / "db.json"
    original = json.dumps({"schema_version": 99, "records": {}})
    path.write_text(original)
    db = TuningDatabase(path)
    with pytest.raises(SchemaVersionError, match="schema_version 99; this edgesparse reads only version 1"):
        db.load()
    key, record = _record()
    with pytest.raises(SchemaVersionError):
        db.merge({key: record})
    assert path.read_text() == original


@pytest.mark.parametrize("payload, message", [
    ([], "not an edgesparse tuning database"),
    ({"records": {}}, "not an edgesparse tuning database"),
    ({"schema_version": 1, "records": []}, "'records' must be an object"),
    ({"schema_version": 1, "records": {"k": 3}}, "record 'k' must be an object"),
    ({"schema_version": 1, "records": {"k": {"schedule": {"rows": 0, "cols": 8, "unroll": 1}}}},
     "record 'k' has no valid 'schedule'.*rows must be a positive int"),
    ({"schema_version": 1, "records": {"k": {"schedule": {"rows": 1, "cols": 8, "unroll": 1, "parallel": "x"}}}},
     "parallel must be one of"),
    ({"schema_version": 1, "records": {"k": {"schedule": {"rows": 1, "cols": 8, "unroll": 1, "vector": "rows"}}}},
     "vector must be one of"),
])
def test_invalid_contents_name_the_problem(tmp_path, payload, message):
    path = tmp_path / "db.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(TuningDatabaseError, match=message):
        TuningDatabase(path).load()


def test_kernels_use_the_tuned_schedule_and_ignore_a_bad_file(tmp_path, monkeypatch):
    from edgesparse import BSR

    fwd_module = importlib.import_module("edgesparse.kernels.tvm.bsr_linear")  # the package re-exports a function of that name

    path = tmp_path / "db.json"
    monkeypatch.setenv(tuning.DB_ENV, str(path))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g)
    W = BSR.from_dense(w, (16, 16), density=0.5)
    x = torch.randn(20, 96, generator=g)
    seen = []
    real = fwd_module.block_rows_product
    monkeypatch.setattr(fwd_module, "block_rows_product", lambda *a, **kw: seen.append(a[7]) or real(*a, **kw))

    fwd_module.bsr_linear(x, W)  # no database: the heuristic
    assert seen[-1] != Schedule(3, 8, 2, "batch")
    tuned = Schedule(3, 8, 2, "batch")  # a valid choice the heuristic would not make
    key, record = make_record("forward", (16, 16), "float32", ShapeClass.of(20, 64, 96, 0.5),
                              Target.detect().fingerprint, versions(), tuned)
    TuningDatabase(path).merge({key: record})
    y = fwd_module.bsr_linear(x, W)
    assert seen[-1] == tuned
    expected = x.double() @ masked_dense(w, top_blocks_mask(w, (16, 16), 0.5), (16, 16)).T
    assert torch.allclose(y.double(), expected, atol=1e-4)

    path.write_text("{ not json")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fwd_module.bsr_linear(x, W)
    assert seen[-1] != tuned
    assert any("ignoring the tuning database" in str(c.message) for c in caught)


def test_conv_grad_input_takes_a_tuned_column_schedule_and_skips_a_batch_one(tmp_path, monkeypatch):
    """A convolution's grad-input scatters its rows into the image, so a schedule tuned
    on the linear grad-input applies only in the column layout; a batch-vectorised one
    (which needs the rows transposed) falls back to the heuristic."""
    from edgesparse import BSR
    from edgesparse.kernels.tvm import bsr_conv2d

    path = tmp_path / "db.json"
    monkeypatch.setenv(tuning.DB_ENV, str(path))
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(2, 3, 5, 5, generator=g), torch.randn(2, 8, 5, 5, generator=g)
    w = torch.randn(8, 27, generator=g)
    W = BSR.from_dense(w, (4, 9), density=0.5)
    seen = []
    real = bsr_conv2d.check_fits
    monkeypatch.setattr(bsr_conv2d, "check_fits", lambda s, *a: seen.append(s) or real(s, *a))
    expected = torch.nn.grad.conv2d_input(x.shape, W.to_dense().double().reshape(8, 3, 3, 3), dy.double(), padding=1)
    heuristic = None
    for tuned in (Schedule(3, 9, 2, "blocks"), Schedule(2, 3, 1, "blocks", "batch")):
        key, record = make_record("grad_input", (4, 9), "float32", ShapeClass.of(50, 8, 27, W.density),
                                  Target.detect().fingerprint, versions(), tuned)
        TuningDatabase(path).merge({key: record})
        dx = bsr_conv2d.conv2d_grad_input(dy, W, x.shape, (3, 3), (1, 1), (1, 1), (1, 1))
        assert torch.allclose(dx.double(), expected, atol=1e-4)
        if tuned.vector == "columns":
            assert seen[-1] == tuned
        else:
            heuristic = seen[-1]
    assert heuristic.vector == "columns" and heuristic != Schedule(3, 9, 2, "blocks")
