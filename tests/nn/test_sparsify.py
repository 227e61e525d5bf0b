"""edgesparse.nn.sparsify: which layers a config swaps, with which scheme, and its errors.

Resolution order under test: an exact module name, then the "re:" keys (fullmatch, first
in insertion order), then "default"; None keeps a layer dense.
"""

import dataclasses
import math

import pytest
import torch
from torch import nn

import edgesparse
from edgesparse.nn import SparseLinear, SparseScheme, sparsify


class Net(nn.Module):
    """Names: stem (conv), encoder.0 / encoder.2 (Linear), encoder.1 (ReLU), head (Linear)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3)
        self.encoder = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 40))
        self.head = nn.Linear(40, 8)

    def forward(self, x):
        return self.head(self.encoder(self.stem(x).flatten(1)))


def kept_blocks(layer: nn.Linear, block, density) -> int:
    """How many blocks a scheme keeps: density * blocks, halves rounded up."""
    blocks = math.ceil(layer.out_features / block[0]) * math.ceil(layer.in_features / block[1])
    return math.floor(density * blocks + 0.5)


def assert_sparse(module, dense: nn.Linear, block, density):
    assert isinstance(module, SparseLinear)
    assert module.block == block and module.shape == (dense.out_features, dense.in_features)
    assert module.nnz_blocks == kept_blocks(dense, block, density)


def test_exact_then_first_regex_then_default_and_none_excludes():
    model = Net()
    dense = {name: model.get_submodule(name) for name in ("encoder.0", "encoder.2", "head")}
    config = {
        "re:encoder\\.\\d": {"block": (8, 8), "density": 0.25},  # first matching pattern wins ...
        "re:encoder.*": {"block": (4, 4), "density": 0.9},  # ... over a later one
        "encoder.2": SparseScheme(block=(16, 8), density=0.5),  # an exact name beats both
        "default": {"block": (4, 4), "density": 0.5},
        "head": None,  # excluded from the default
        "stem": None,  # the first conv, too
    }
    assert sparsify(model, config) is model
    assert_sparse(model.encoder[0], dense["encoder.0"], (8, 8), 0.25)
    assert_sparse(model.encoder[2], dense["encoder.2"], (16, 8), 0.5)
    assert model.head is dense["head"], "None keeps the layer dense"
    assert type(model.stem) is nn.Conv2d and type(model.encoder[1]) is nn.ReLU, "None and other types stay"


def test_default_swaps_every_linear_and_keeps_the_function():
    model = Net()
    x = torch.randn(3, 1, 6, 6)
    expected = model(x)
    # Every block kept; the stem's weight [2, 9] has no room for an 8x8 block.
    sparsify(model, {"default": {"block": 8, "density": 1.0}, "stem": None})
    assert [type(m) for m in (model.encoder[0], model.encoder[2], model.head)] == [SparseLinear] * 3
    assert model.head.block == (8, 8), "an int block means a square block"
    with edgesparse.use_backend("reference"):
        torch.testing.assert_close(model(x), expected)


def test_a_shared_layer_becomes_one_sparse_layer_under_every_name():
    shared = nn.Linear(16, 16)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    sparsify(model, {"default": {"block": (4, 4), "density": 0.5}})
    assert isinstance(model[0], SparseLinear) and model[0] is model[2]
    with pytest.raises(ValueError, match="'0' and '1' are the same layer but the config gives them different schemes"):
        sparsify(nn.Sequential(shared, shared), {"0": {"block": 4, "density": 0.5}, "1": {"block": 4, "density": 0.25}})


def test_scheme_is_a_frozen_validated_dataclass():
    scheme = SparseScheme(block=8, density=0.1)
    assert scheme.block == (8, 8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        scheme.density = 0.5
    assert scheme == SparseScheme.coerce({"block": (8, 8), "density": 0.1}, "config['x']")


@pytest.mark.parametrize(
    "config, error, message",
    [
        pytest.param({"head": {"block": 4, "density": 0.5, "dense": True}}, ValueError,
                     r"config\['head'\] must have exactly the keys \['block', 'density'\]; unknown 'dense'", id="unknown-key"),
        pytest.param({"head": {"block": 4}}, ValueError, r"config\['head'\] .*; missing density", id="missing-key"),
        pytest.param({"head": {"block": (0, 4), "density": 0.5}}, ValueError,
                     r"config\['head'\]: block sizes must be positive", id="zero-block"),
        pytest.param({"head": {"block": (4, 4, 4), "density": 0.5}}, TypeError,
                     r"config\['head'\]: block must be an int or a pair", id="three-sizes"),
        pytest.param({"default": {"block": 4, "density": 1.5}}, ValueError,
                     r"config\['default'\]: density must lie in \[0, 1\]", id="density"),
        pytest.param({"head": (4, 0.5)}, TypeError, r"config\['head'\] must be a SparseScheme, a dict", id="tuple-scheme"),
        pytest.param({"re:enc(": None}, ValueError, r"config key 're:enc\(' is not a valid regular expression", id="bad-regex"),
        pytest.param({"encoder.5": None}, ValueError, r"modules that are not in the model: \['encoder.5'\]", id="unknown-name"),
        pytest.param({"encoder.1": {"block": 2, "density": 0.5}}, NotImplementedError,
                     r"sparsify supports nn.Linear and nn.Conv2d \(groups=1, zero padding\); config\['encoder.1'\] names a ReLU",
                     id="relu"),
        pytest.param({"default": {"block": 4, "density": 0.5}, "head": None}, ValueError,
                     r"cannot sparsify 'stem': block=\(4, 4\) is larger than the layer", id="default-over-conv"),
        pytest.param({"encoder.0": {"block": 2, "density": 0.5}, "head": {"block": (16, 4), "density": 0.5}}, ValueError,
                     r"cannot sparsify 'head': block=\(16, 4\) is larger than the layer", id="block-over-layer"),
        pytest.param([("head", None)], TypeError, "config must be a mapping", id="not-a-mapping"),
    ],
)
def test_bad_config_raises_and_leaves_the_model_untouched(config, error, message):
    model = Net()
    before = {name: type(m) for name, m in model.named_modules()}
    with pytest.raises(error, match=message):
        sparsify(model, config)
    assert {name: type(m) for name, m in model.named_modules()} == before


def test_the_model_itself_cannot_be_swapped():
    with pytest.raises(ValueError, match="the model itself is an nn.Linear.*SparseLinear.from_dense"):
        sparsify(nn.Linear(8, 8), {"default": {"block": 4, "density": 0.5}})
