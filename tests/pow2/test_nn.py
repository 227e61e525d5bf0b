"""edgesparse.nn Pow2Linear / Pow2Conv2d: forward and every gradient against float64
autograd through the dense C·B rebuilt by hand; the custom ops' registrations; C's two
update rules; training lowers the loss; sparsify with a Pow2Scheme."""

import pytest
import torch
from torch import nn

import edgesparse
from edgesparse.nn import Pow2Conv2d, Pow2Linear, Pow2Scheme, sparsify
from edgesparse.nn.pow2 import bucket_switch_, requantize_
from tests._oracle import assert_close, device_for, randn, to64
from tests.pow2._pow2_oracle import basis_layout, blocks_of_C, dense_oracle

IN, OUT = 40, 70  # ragged: 70 rows in groups of 32, 40 columns in rows of 3


def layer(gen, sparsity=0.4, chunk_rows=4):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    return Pow2Linear.from_dense(nn.Linear(IN, OUT), sparsity, chunk_rows=chunk_rows, iterations=5)


@pytest.mark.parametrize("backend", ["reference", "tvm", "triton"])
def test_forward_and_all_gradients_match_autograd_through_dense_C_times_B(backend, gen):
    device = device_for(backend)
    lin = layer(gen).to(device)
    x = randn((2, 3, IN), gen, device=device).requires_grad_()
    dy = randn((2, 3, OUT), gen, device=device)
    with edgesparse.use_backend(backend):
        y = lin(x)
        y.backward(dy)
    w64, C64, B64 = dense_oracle(lin.weight_pow2(), requires_grad=True)
    x64 = to64(x).requires_grad_()
    b64 = to64(lin.bias).requires_grad_()
    y64 = x64 @ w64.T + b64
    y64.backward(to64(dy))
    assert_close(y, y64, torch.float32, "y")
    assert_close(x.grad, x64.grad, torch.float32, "x.grad")
    assert_close(lin.coef.grad, blocks_of_C(C64.grad, lin.weight_pow2()), torch.float32, "coef.grad")
    assert_close(lin.basis.grad, basis_layout(B64.grad, lin.weight_pow2()), torch.float32, "basis.grad")
    assert_close(lin.bias.grad, b64.grad, torch.float32, "bias.grad")


def test_conv_matches_F_conv2d_with_the_rebuilt_weight(gen):
    conv = nn.Conv2d(5, 40, 3, padding=1, stride=2)
    layer = Pow2Conv2d.from_dense(conv, 0.3, iterations=5)
    x = randn((2, 5, 7, 6), gen)
    w64, _, _ = dense_oracle(layer.weight_pow2())
    expected = nn.functional.conv2d(to64(x), w64.reshape(40, 5, 3, 3), to64(layer.bias), stride=2, padding=1)
    with edgesparse.use_backend("reference"):
        assert_close(layer(x), expected, torch.float32, "y")
    with pytest.raises(ValueError, match=r"x must have shape \[B, 5, H, W\]"):
        layer(x[:, :4])


OPS = ("pow2_linear", "pow2_linear_grad_input", "pow2_linear_grad_weight")


@pytest.mark.parametrize("op", OPS)
def test_opcheck_schema_fake_and_autograd_registration(op, gen):
    lin = layer(gen)
    W = lin.weight_pow2()
    x, dy = randn((3, IN), gen).requires_grad_(), randn((3, OUT), gen)
    common = (list(W.index), OUT, IN, W.chunk_rows, *W.exp_range)
    args = {
        "pow2_linear": (x, lin.coef, W.words, lin.basis, *common, lin.bias),
        "pow2_linear_grad_input": (dy, W.words, lin.basis.detach(), *common, "reference"),
        "pow2_linear_grad_weight": (dy, x.detach(), W.words, lin.basis.detach(), *common, "reference"),
    }[op]
    with edgesparse.use_backend("reference"):
        torch.library.opcheck(getattr(torch.ops.edgesparse, op).default, args)


def test_requantize_rounds_coef_to_powers_of_two_and_updates_codes(gen):
    lin = layer(gen)
    with torch.no_grad():
        lin.coef.mul_(1.3)  # off the power-of-two grid, as after an optimizer step
        lin.coef[0, 0, 0] = 0.74
        lin.coef[0, 1, 0] = -3.0
    lin.requantize_()
    assert float(lin.coef[0, 0, 0].detach()) == 0.5 and float(lin.coef[0, 1, 0].detach()) == -4.0
    assert int(lin.codes[0, 0, 0]) == 7 and int(lin.codes[0, 1, 0]) == -128 + 10  # e = -1: f = 7; e = 2: f = 10
    nonzero = lin.coef[lin.coef != 0].abs()
    assert torch.equal(nonzero, 2.0 ** torch.log2(nonzero).round())


def test_bucket_switch_moves_exponents_by_one_when_the_count_reaches_one(gen):
    lin = layer(gen)
    with torch.no_grad():
        codes = lin.codes
        codes[0, :, :4] = torch.tensor([1, -128 + 13, 0, 5], dtype=torch.int8)  # 2^-7, -2^5, 0, 2^-3
        lin.words.copy_(edgesparse.pow2.pack(codes))
        lin.coef.copy_(edgesparse.pow2.decode(codes, lin.exp_range))
    grad = torch.zeros_like(lin.coef)
    grad[0, :, :4] = torch.tensor([1.0, 1.0, 1.0, 0.0])  # descent: shrink 2^-7, grow -2^5, zero goes negative
    grad[0, 0, 5] = -1.0
    before = lin.codes.clone()
    lin.coef.grad = grad
    lin.bucket_switch_(rate=0.5)  # first call: counts reach 0.5, nothing moves
    assert torch.equal(lin.codes, before)
    lin.bucket_switch_(rate=0.5)
    assert lin.codes[0, :, :4].tolist() == [[0, -128 + 13, -128 + 1, 5]] * 3
    f5 = int(before[0, 0, 5]) & 15
    expected5 = min(f5 + 1, 13) if f5 else 1  # grows (or appears positive)
    assert int(lin.codes[0, 0, 5]) & 15 == expected5
    assert torch.equal(lin.coef, edgesparse.pow2.decode(lin.codes, lin.exp_range))
    with pytest.raises(ValueError, match="rate must lie in"):
        lin.bucket_switch_(rate=0.0)
    lin.coef.grad = None
    with pytest.raises(RuntimeError, match="needs coef.grad"):
        lin.bucket_switch_()


@pytest.mark.parametrize("mode", ["requantize", "bucket"])
def test_training_lowers_the_loss(mode, gen):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, 64), nn.ReLU(), nn.Linear(64, 10))
    sparsify(model, {"re:[02]": Pow2Scheme(0.4, chunk_rows=4, iterations=5)})
    assert isinstance(model[0], Pow2Linear) and isinstance(model[2], Pow2Linear)
    x = randn((128, IN), gen)
    target = x[:, :10] * 2 - x[:, 10:20]  # learnable from the input
    params = [p for name, p in model.named_parameters() if mode == "requantize" or not name.endswith("coef")]
    opt = torch.optim.SGD(params, lr=0.1)
    codes = model[0].codes.clone()
    losses = []
    with edgesparse.use_backend("reference"):
        for _ in range(25):
            opt.zero_grad()
            for m in (model[0], model[2]):
                m.coef.grad = None
            loss = nn.functional.mse_loss(model(x), target)
            loss.backward()
            opt.step()
            if mode == "requantize":
                requantize_(model)
            else:
                bucket_switch_(model, 0.05)
            losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    if mode == "bucket":
        assert (model[0].codes != codes).any(), "bucket switch never moved an exponent"


def test_sparsify_builds_pow2_convs_and_keeps_the_rest(gen):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    sparsify(model, {"0": Pow2Scheme(0.2, group=8, iterations=2), "3": None})
    assert isinstance(model[0], Pow2Conv2d) and isinstance(model[3], nn.Linear)
    with edgesparse.use_backend("reference"):
        assert model(randn((2, 3, 6, 6), gen)).shape == (2, 5)
    with pytest.raises(ValueError, match="exp_range"):
        Pow2Scheme(0.4, exp_range=(0, 20))
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        Pow2Linear.from_dense(nn.Conv2d(1, 1, 1))


def test_state_dict_round_trip_restores_codes_basis_and_pattern(gen, tmp_path):
    a, b = layer(gen), layer(gen)
    assert not torch.equal(a.codes, b.codes)
    path = tmp_path / "pow2.pt"
    torch.save(a.state_dict(), path)
    b.load_state_dict(torch.load(path, weights_only=True))
    x = randn((4, IN), gen)
    with edgesparse.use_backend("reference"):
        assert torch.equal(a(x), b(x))
    assert torch.equal(a.col_order, b.col_order) and torch.equal(a.codes, b.codes)


def test_compiled_training_step_has_no_graph_break(gen):
    from torch._dynamo.backends.common import aot_autograd

    # After a dense layer, so that the pow2 layer's input asks for a gradient too.
    model = nn.Sequential(nn.Linear(IN, IN), nn.ReLU(), layer(gen), nn.ReLU(), nn.Linear(OUT, 6))
    x, target = randn((5, IN), gen), randn((5, 6), gen)

    def step(x, target):
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        return loss.detach()

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm

    with edgesparse.use_backend("reference"), torch._dynamo.config.patch(trace_autograd_ops=True):
        loss_c = torch.compile(step, fullgraph=True, backend=aot_autograd(fw_compiler=record, bw_compiler=record))(x, target)
        grads_c = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        loss_e = step(x, target)
    torch._dynamo.reset()
    targets = {str(node.target) for gm in graphs for node in gm.graph.nodes}
    assert {f"edgesparse.{op}.default" for op in OPS} <= targets, sorted(t for t in targets if "edgesparse" in t)
    torch.testing.assert_close(loss_c, loss_e)
    for got, p in zip(grads_c, model.parameters()):
        torch.testing.assert_close(got, p.grad)


def test_a_state_dict_with_unpacked_int8_codes_still_loads(gen):
    """Checkpoints from before the codes were packed hold "codes" [nnz, 3, group] int8."""
    a, b = layer(gen), layer(gen)
    old = {k: v for k, v in a.state_dict().items() if k != "words"}
    old["codes"] = a.codes
    assert old["codes"].dtype == torch.int8 and old["codes"].shape[1] == 3
    b.load_state_dict(old)
    assert torch.equal(b.codes, a.codes) and torch.equal(b.words, a.words)
    x = randn((4, IN), gen)
    with edgesparse.use_backend("reference"):
        assert torch.equal(a(x), b(x))
