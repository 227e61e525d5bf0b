"""PruningMap files: round trip, validation errors, and sparsify consuming a map."""

import json

import pytest
import torch

from edgesparse.models import MLP
from edgesparse.nn import SparseLinear, SparseScheme, sparsify
from edgesparse.pruning_maps import SCHEMA_VERSION, PruningMap, PruningMapError
from tests._oracle import assert_pattern, masked_dense, top_blocks_mask

FP = "x86_64-test-2c"


def _payload(**over):
    payload = {"schema_version": SCHEMA_VERSION, "target": FP,
               "layers": {"layers.0": {"block": [8, 4], "density": 0.25, "kind": "block"},
                          "re:layers\\.[12]": {"block": [4, 8], "density": 0.5}, "layers.3": None},
               "default": None, "rules": [], "info": {"method": "search"}}
    payload.update(over)
    return payload


def test_round_trip_and_sparsify(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps(_payload()))
    pmap = PruningMap.load(path, expect_target=FP)
    assert pmap.layers["layers.0"] == SparseScheme((8, 4), 0.25) and pmap.layers["layers.3"] is None
    out = pmap.save(tmp_path / "again.json")
    assert json.loads(out.read_text()) == _payload()
    assert list(json.loads(out.read_text())["layers"]) == ["layers.0", "re:layers\\.[12]", "layers.3"]  # file order kept
    assert not list(tmp_path.glob("*.tmp"))

    model = MLP([16, 16, 16, 16, 4])
    weights = [layer.weight.detach().clone() for layer in model.layers]
    sparsify(model, pmap)
    expected = [((8, 4), 0.25), ((4, 8), 0.5), ((4, 8), 0.5)]
    for layer, w, (block, density) in zip(model.layers, weights, expected):
        assert isinstance(layer, SparseLinear) and layer.block == block
        assert_pattern(layer, top_blocks_mask(w, block, density))
    assert isinstance(model.layers[3], torch.nn.Linear)


def test_pow2_entries_round_trip_and_sparsify(tmp_path):
    from edgesparse.nn import Pow2Linear, Pow2Scheme

    scheme = Pow2Scheme(sparsity=0.5, exp_range=(-6, 4), group=8, chunk_rows=4, iterations=3)
    pmap = PruningMap(FP, {"layers.0": scheme, "layers.1": SparseScheme((4, 4), 0.5)},
                      notes={"layers.0": {"kind": "pow2", "retained_energy": 0.4}})
    path = pmap.save(tmp_path / "map.json")
    payload = json.loads(path.read_text())
    assert payload["schema_version"] == 2
    assert payload["layers"]["layers.0"] == {"pow2": {"sparsity": 0.5, "exp_range": [-6, 4], "group": 8,
                                                      "chunk_rows": 4, "iterations": 3},
                                             "kind": "pow2", "retained_energy": 0.4}
    again = PruningMap.load(path)
    assert again.layers == pmap.layers and again.notes == pmap.notes
    model = sparsify(MLP([16, 16, 16, 4]), again)
    assert isinstance(model.layers[0], Pow2Linear) and model.layers[0].exp_range == (-6, 4)
    assert isinstance(model.layers[1], SparseLinear)


def test_version_1_maps_still_read(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps(_payload(schema_version=1)))
    assert PruningMap.load(path).layers["layers.0"] == SparseScheme((8, 4), 0.25)


def test_other_target_warns(tmp_path):
    path = PruningMap(FP).save(tmp_path / "map.json")
    with pytest.warns(UserWarning, match="made for target"):
        PruningMap.load(path, expect_target="aarch64-cortex-a76-asimd-4c")


@pytest.mark.parametrize("change, message", [
    (dict(schema_version=3), "schema_version 3; this edgesparse reads versions 1, 2"),
    (dict(schema_version=True), "schema_version True"),
    (dict(schema_version=None), "schema_version None"),
    (dict(extra=1), "unknown keys \\['extra'\\]"),
    (dict(layers=[]), "'layers' must be an object"),
    (dict(target=""), "target must be a non-empty"),
    (dict(layers={"a": {"block": [8], "density": 0.5}}), "layers\\['a'\\].block must be \\[rows, cols\\]"),
    (dict(layers={"a": {"block": [8, 8], "density": 1.5}}), "layers\\['a'\\]: density must lie in \\[0, 1\\]"),
    (dict(layers={"a": {"block": [8, 8]}}), "layers\\['a'\\] is missing \\['density'\\]"),
    (dict(layers={"a": {"block": [8, 8], "density": 0.5, "speed": 1}}), "unknown keys \\['speed'\\]"),
    (dict(layers={"a": "8x8"}), "must be null \\(dense\\), an object with .block. and .density., or an object with .pow2."),
    (dict(layers={"re:(": None}), "not a valid regular expression"),
    (dict(layers={"default": None}), "'default' goes in the map's 'default' field"),
    (dict(default={"block": [0, 8], "density": 0.5}), "default: block"),
    (dict(info=[]), "'info' must be an object"),
    (dict(layers={"a": {"pow2": {"sparsity": 0.9, "bits": 4}}}), "layers\\['a'\\].pow2 has unknown keys \\['bits'\\]"),
    (dict(layers={"a": {"pow2": {"sparsity": 1.5}}}), "layers\\['a'\\].pow2: Pow2Scheme.sparsity must be"),
    (dict(layers={"a": {"pow2": {"group": 0}}}), "layers\\['a'\\].pow2: Pow2Scheme.group must be an int >= 1"),
    (dict(layers={"a": {"pow2": {"iterations": -1}}}), "Pow2Scheme.iterations must be an int >= 0"),
    (dict(layers={"a": {"pow2": {"exp_range": [0, 20]}}}), "layers\\['a'\\].pow2: "),
    (dict(layers={"a": {"pow2": [0.9]}}), "layers\\['a'\\].pow2 must be an object with keys"),
    (dict(layers={"a": {"pow2": {}, "block": [8, 8]}}), "unknown keys \\['block'\\] beside 'pow2'"),
])
def test_invalid_maps_name_the_field(tmp_path, change, message):
    path = tmp_path / "map.json"
    path.write_text(json.dumps(_payload(**change)))
    with pytest.raises(PruningMapError, match=message):
        PruningMap.load(path)


def test_missing_key_and_bad_json(tmp_path):
    path = tmp_path / "map.json"
    payload = _payload()
    del payload["target"]
    path.write_text(json.dumps(payload))
    with pytest.raises(PruningMapError, match="missing 'target'"):
        PruningMap.load(path)
    path.write_text("{")
    with pytest.raises(PruningMapError, match="not valid JSON"):
        PruningMap.load(path)
    path.write_text("{}")
    with pytest.raises(PruningMapError, match="no 'schema_version'"):
        PruningMap.load(path)


def test_validate_against_a_model():
    pmap = PruningMap.from_json(_payload(layers={"layers.9": None, "re:x": None}))
    with pytest.raises(PruningMapError, match="not in the model: \\['layers.9'\\]"):
        pmap.validate(MLP([8, 8, 2]))
    PruningMap.from_json(_payload()).validate(MLP([16, 16, 16, 16, 4]))


def test_cli_rule_map(tmp_path, capsys):
    from edgesparse.cli import main

    rules = [{"kind": "linear", "kernel": [1, 1], "n": 64, "k": 64, "positions": 1, "input_grad": True,
              "candidate": "block", "block": [16, 8], "density": 0.2},
             {"kind": "linear", "kernel": [1, 1], "n": 64, "k": 64, "positions": 1, "input_grad": False,
              "candidate": "block", "block": [8, 8], "density": 0.3}]
    source = PruningMap(FP, rules=rules).save(tmp_path / "searched.json")
    out = tmp_path / "rule.json"
    with pytest.warns(UserWarning, match="made for target 'x86_64-test-2c'"):
        assert main(["map", "--model", "mlp", "--widths", "48,48,48,10", "--batch", "4", "--method", "rule",
                     "--rules-from", str(source), "--out", str(out)]) == 0
    pmap = PruningMap.load(out)
    assert pmap.layers == {"layers.0": SparseScheme((8, 8), 0.3), "layers.1": SparseScheme((16, 8), 0.2)}
    assert pmap.info["method"] == "rule" and pmap.info["seconds"] < 1.0
    assert "rule map" in capsys.readouterr().out
    assert main(["map", "--model", "mlp", "--method", "rule", "--rules-from", str(tmp_path / "none.json"),
                 "--out", str(out)]) == 2
    assert main(["map", "--model", "mlp", "--sparsity", "1.5", "--out", str(out)]) == 2


def test_cli_rule_map_with_pow2_measures_its_steps(tmp_path, capsys):
    """A pow2 rule through `edgesparse map`: printed, saved, built, stepped (with
    re-quantization) and its retained energy counted from the decomposed weight."""
    import re

    from edgesparse.cli import main
    from edgesparse.nn import Pow2Scheme
    from edgesparse.pow2 import decompose

    rules = [{"kind": "linear", "kernel": [1, 1], "n": 48, "k": 48, "positions": 1, "input_grad": True,
              "candidate": "pow2", "block": [32, 3], "density": 0.5},
             {"kind": "linear", "kernel": [1, 1], "n": 48, "k": 48, "positions": 1, "input_grad": False,
              "candidate": "block", "block": [8, 8], "density": 0.25}]
    source = PruningMap(FP, {"layers.0": SparseScheme((8, 8), 0.25), "layers.1": None}, rules=rules)
    source_path = source.save(tmp_path / "searched.json")
    out = tmp_path / "rule.json"
    with pytest.warns(UserWarning, match="made for target"):
        assert main(["map", "--model", "mlp", "--widths", "48,48,48,10", "--batch", "4", "--method", "rule",
                     "--rules-from", str(source_path), "--out", str(out), "--compare", "1", "--rounds", "1"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"layers\.1\s+pow2 @ 0\.500", printed) and re.search(r"layers\.0\s+8x8 @ 0\.250", printed)
    assert PruningMap.load(out).layers["layers.1"] == Pow2Scheme(sparsity=0.5)

    torch.manual_seed(0)  # the command's model (--seed 0)
    w0, w1 = (layer.weight.detach().double() for layer in MLP([48, 48, 48, 10]).layers[:2])
    kept0 = float(masked_dense(w0, top_blocks_mask(w0, (8, 8), 0.25), (8, 8)).pow(2).sum())
    approx1 = decompose(w1.float(), 0.5).weight.to_dense().double()
    kept1 = float(w1.pow(2).sum() - (w1 - approx1).pow(2).sum())
    total = float(w0.pow(2).sum() + w1.pow(2).sum())
    energy = float(re.search(r"rule map\s+step\s+[\d.]+ ms\s+retained energy ([\d.]+)", printed).group(1))
    assert energy == pytest.approx((kept0 + kept1) / total, abs=1e-4)
    searched = float(re.search(r"searched map\s+step\s+[\d.]+ ms\s+retained energy ([\d.]+)", printed).group(1))
    assert searched == pytest.approx((kept0 + float(w1.pow(2).sum())) / total, abs=1e-4)
