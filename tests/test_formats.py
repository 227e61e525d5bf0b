"""edgesparse.formats.BSR: construction, index arrays, conversions and argument checks.

Oracles: Python loops over block coordinates, dense torch, and scipy.sparse.bsr_matrix.
"""

import math
import numpy as np
import pytest
import scipy.sparse
import torch

from edgesparse import BSR
from tests._oracle import (
    block_params,
    blocks_in_mask_order,
    expand_mask,
    expected_indices,
    grid,
    mask_with_empty_lines,
    padded,
    padding_mask,
    randn,
)

SHAPES = [pytest.param((67, 131), id="67x131"), pytest.param((1, 1), id="1x1"), pytest.param((13, 3), id="13x3")]
INDEX_NAMES = ("row_offsets", "col_indices", "row_indices", "col_offsets", "col_order", "col_order_rows")


def mixed_mask(nb, kb, gen):
    """Random mask with at least one kept block and, when the grid has two or more blocks, one dropped."""
    mask = torch.rand(nb, kb, generator=gen) < 0.5
    mask.view(-1)[0] = True
    if nb * kb > 1:
        mask.view(-1)[-1] = False
    return mask


def assert_pattern(W: BSR, mask: torch.Tensor):
    row_offsets, col_indices, row_indices = expected_indices(mask)
    for name, expected in (("row_offsets", row_offsets), ("col_indices", col_indices), ("row_indices", row_indices)):
        got = getattr(W, name)
        assert got.dtype == torch.int32, f"{name} dtype {got.dtype}"
        assert torch.equal(got.cpu(), expected), f"{name}: {got.tolist()} != {expected.tolist()}"


def dense_from_mask(shape, block, mask, gen):
    """A random dense matrix whose blocks outside ``mask`` are exactly zero."""
    return randn(shape, gen) * expand_mask(mask, block, shape)


def block_norms_by_loop(w, block):
    """L2 norm of every (padded) block, row-major, in float64 by plain slicing."""
    bn, bk = block
    p = padded(w.double(), block)
    nb, kb = grid(tuple(w.shape), block)
    return [float(p[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk].pow(2).sum().sqrt()) for i in range(nb) for j in range(kb)]


def top_blocks_mask(norms, keep, nb, kb):
    """Mask of the `keep` largest norms; ties go to the earlier block in row-major order."""
    order = sorted(range(len(norms)), key=lambda b: (-norms[b], b))
    mask = torch.zeros(nb * kb, dtype=torch.bool)
    mask[order[:keep]] = True
    return mask.reshape(nb, kb)


# ------------------------------------------------------------------ from_dense without density
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block", block_params())
def test_from_dense_keeps_exactly_the_blocks_with_a_nonzero(block, shape, gen):
    nb, kb = grid(shape, block)
    mask = mixed_mask(nb, kb, gen)
    w = dense_from_mask(shape, block, mask, gen)
    # A kept block with a single nonzero entry must be kept as well.
    i, j = (int(v) for v in mask.nonzero()[0])
    r, c = i * block[0], j * block[1]  # the block's top-left entry lies inside the logical shape
    w[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]] = 0
    w[r, c] = 2.5

    W = BSR.from_dense(w, block)

    assert W.shape == shape and W.block == block
    assert W.padded_shape == (nb * block[0], kb * block[1])
    assert W.block_rows == nb and W.block_cols == kb
    assert_pattern(W, mask)
    assert W.nnz_blocks == int(mask.sum())
    assert W.density == pytest.approx(int(mask.sum()) / (nb * kb))
    assert W.dtype == torch.float32 and W.device == w.device
    assert torch.equal(W.values, blocks_in_mask_order(w, mask, block))
    assert torch.equal(W.to_dense(), w)


def test_from_dense_keeps_a_block_holding_only_nan():
    w = torch.zeros(16, 16)
    w[9, 2] = float("nan")  # block (1, 0) of 8x8 blocks
    W = BSR.from_dense(w, (8, 8))
    assert W.col_indices.tolist() == [0] and W.row_offsets.tolist() == [0, 0, 1]
    assert torch.isnan(W.values[0, 1, 2]) and int(torch.isnan(W.values).sum()) == 1


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block", block_params())
def test_from_dense_matches_scipy_blocking(block, shape, gen):
    """scipy's own dense -> BSR conversion keeps the blocks holding a nonzero."""
    nb, kb = grid(shape, block)
    w = dense_from_mask(shape, block, mixed_mask(nb, kb, gen), gen)
    ref = scipy.sparse.bsr_matrix(padded(w, block).numpy(), blocksize=block)
    ref.sort_indices()
    W = BSR.from_dense(w, block)
    assert W.row_offsets.tolist() == ref.indptr.tolist()
    assert W.col_indices.tolist() == ref.indices.tolist()
    np.testing.assert_array_equal(W.values.numpy(), ref.data)


# ------------------------------------------------------------------ from_dense with density
@pytest.mark.parametrize("density", [0.3, 0.5, 0.77])
@pytest.mark.parametrize("block", block_params())
def test_from_dense_density_keeps_the_largest_norm_blocks(block, density, gen):
    shape = (67, 131)
    nb, kb = grid(shape, block)
    w = randn(shape, gen) * torch.rand(shape, generator=gen)  # uneven block norms
    norms = block_norms_by_loop(w, block)
    keep = math.floor(density * nb * kb + 0.5)  # documented: halves round up
    mask = top_blocks_mask(norms, keep, nb, kb)

    W = BSR.from_dense(w, block, density=density)

    assert W.nnz_blocks == keep
    assert_pattern(W, mask)
    assert torch.equal(W.to_dense(), w * expand_mask(mask, block, shape))


def test_from_dense_density_ties_go_to_row_major_order():
    w = torch.ones(16, 24)  # 4 x 6 blocks of 4x4, all of the same norm
    W = BSR.from_dense(w, (4, 4), density=0.25)  # 6 blocks: the whole first block row
    assert W.row_offsets.tolist() == [0, 6, 6, 6, 6]
    assert W.col_indices.tolist() == list(range(6))


def test_from_dense_density_rounds_to_nearest_block_count():
    w = torch.arange(1.0, 10 * 10 + 1).reshape(10, 10)  # norms grow in row-major order
    W = BSR.from_dense(w, (1, 10), density=0.36)  # 3.6 of 10 rows -> 4 rows
    assert W.nnz_blocks == 4
    assert W.row_offsets.tolist() == [0] * 7 + [1, 2, 3, 4]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block", block_params([(1, 4), (8, 8), (64, 64), (3, 5)]))
@pytest.mark.parametrize("density", [0, 0.0, 1, 1.0])
def test_from_dense_density_zero_and_one(block, shape, density, gen):
    nb, kb = grid(shape, block)
    w = randn(shape, gen)
    w[: block[0], :] = 0  # an all-zero block row: density 1 keeps it anyway
    W = BSR.from_dense(w, block, density=density)
    if density == 0:
        assert W.nnz_blocks == 0 and W.density == 0.0
        assert tuple(W.values.shape) == (0, *block)
        assert W.row_offsets.tolist() == [0] * (nb + 1)
        assert W.col_offsets.tolist() == [0] * (kb + 1)
        assert W.col_indices.numel() == 0 and W.col_order.numel() == 0
        assert torch.equal(W.to_dense(), torch.zeros(shape))
    else:
        assert W.nnz_blocks == nb * kb and W.density == 1.0
        assert_pattern(W, torch.ones(nb, kb, dtype=torch.bool))
        assert torch.equal(W.to_dense(), w)


# ------------------------------------------------------------------ from_mask
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block", block_params())
def test_from_mask_round_trip(block, shape, gen):
    nb, kb = grid(shape, block)
    mask = mixed_mask(nb, kb, gen)
    w = randn(shape, gen)  # dense: blocks outside the mask hold nonzeros that must go
    W = BSR.from_mask(w, mask, block)
    assert_pattern(W, mask)
    assert W.nnz_blocks == int(mask.sum())
    assert W.density == pytest.approx(float(mask.float().mean()))
    assert torch.equal(W.block_mask(), mask)
    assert torch.equal(W.values, blocks_in_mask_order(w, mask, block))
    # Stored padding is zero.
    pad = padding_mask(W.row_indices, W.col_indices, block, shape)
    assert torch.all(W.values[pad] == 0)
    assert torch.equal(W.to_dense(), w * expand_mask(mask, block, shape))


@pytest.mark.parametrize(("mask_shape", "block"), [((9, 17), (8, 8)), ((67, 33), (1, 4)), ((3, 5), (23, 27))])
def test_from_mask_infers_block_from_shapes(mask_shape, block, gen):
    w = randn((67, 131), gen)
    mask = mixed_mask(*mask_shape, gen)
    W = BSR.from_mask(w, mask)
    assert W.block == block
    assert torch.equal(W.to_dense(), w * expand_mask(mask, block, (67, 131)))


# ------------------------------------------------------------------ transposed index
def test_transposed_index_hand_computed():
    # Block grid 3 x 4 (block 2x3, logical 5 x 11, so the last block row and column are padded):
    #   row 0: cols 0, 2, 3  -> blocks 0, 1, 2
    #   row 1: col  2        -> block  3
    #   row 2: cols 0, 3     -> blocks 4, 5
    # By column: col 0 -> blocks 0 (row 0), 4 (row 2); col 1 -> none;
    #            col 2 -> blocks 1 (row 0), 3 (row 1); col 3 -> blocks 2 (row 0), 5 (row 2).
    mask = torch.tensor([[1, 0, 1, 1], [0, 0, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
    W = BSR.from_mask(torch.randn(5, 11), mask, (2, 3))
    assert W.row_offsets.tolist() == [0, 3, 4, 6]
    assert W.col_indices.tolist() == [0, 2, 3, 2, 0, 3]
    assert W.row_indices.tolist() == [0, 0, 0, 1, 2, 2]
    assert W.col_offsets.tolist() == [0, 2, 2, 4, 6]
    assert W.col_order.tolist() == [0, 4, 1, 3, 2, 5]
    assert W.col_order_rows.tolist() == [0, 2, 0, 1, 0, 2]
    for name in INDEX_NAMES:
        assert getattr(W, name).dtype == torch.int32, name


@pytest.mark.parametrize("block", block_params())
def test_transposed_index_matches_a_loop_over_columns(block, gen):
    shape = (67, 131)
    nb, kb = grid(shape, block)
    mask, _, empty_cols = mask_with_empty_lines(nb, kb, gen)
    W = BSR.from_mask(randn(shape, gen), mask, block)
    # Hand computation: number the kept blocks row-major, then list them column by column.
    numbered = [(i, j) for i in range(nb) for j in range(kb) if mask[i, j]]
    col_offsets, col_order, col_order_rows = [0], [], []
    for j in range(kb):
        for b, (i, jj) in enumerate(numbered):
            if jj == j:
                col_order.append(b)
                col_order_rows.append(i)
        col_offsets.append(len(col_order))
    assert W.col_offsets.tolist() == col_offsets
    assert W.col_order.tolist() == col_order
    assert W.col_order_rows.tolist() == col_order_rows
    for j in empty_cols:
        assert W.col_offsets[j] == W.col_offsets[j + 1]
    # Walking a column through the index yields that column's blocks.
    wd = padded(W.to_dense(), block)
    for j in (0, kb // 3):
        for t in range(col_offsets[j], col_offsets[j + 1]):
            i, b = col_order_rows[t], col_order[t]
            expect = wd[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]]
            assert torch.equal(W.values[b], expect)


# ------------------------------------------------------------------ scipy agreement
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block", block_params())
def test_scipy_bsr_matrix_agrees(block, shape, gen):
    nb, kb = grid(shape, block)
    mask = mixed_mask(nb, kb, gen)
    w = randn(shape, gen).double()
    W = BSR.from_mask(w, mask, block)
    ref = scipy.sparse.bsr_matrix(
        (W.values.numpy(), W.col_indices.numpy(), W.row_offsets.numpy()), shape=W.padded_shape
    )
    np.testing.assert_array_equal(ref.toarray()[: shape[0], : shape[1]], (w * expand_mask(mask, block, shape)).numpy())
    np.testing.assert_array_equal(ref.toarray(), padded(W.to_dense(), block).numpy())
    x = np.random.default_rng(0).standard_normal((W.padded_shape[1], 3))
    np.testing.assert_allclose(ref @ x, padded(w * expand_mask(mask, block, shape), block).numpy() @ x, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ empty rows and columns
@pytest.mark.parametrize("block", block_params())
def test_empty_block_rows_and_columns(block, gen):
    shape = (67, 131)
    nb, kb = grid(shape, block)
    mask, empty_rows, empty_cols = mask_with_empty_lines(nb, kb, gen)
    w = randn(shape, gen)
    W = BSR.from_mask(w, mask, block)
    assert_pattern(W, mask)
    for i in empty_rows:
        assert W.row_offsets[i] == W.row_offsets[i + 1]
    for j in empty_cols:
        assert W.col_offsets[j] == W.col_offsets[j + 1]
    dense = W.to_dense()
    assert torch.equal(dense, w * expand_mask(mask, block, shape))
    for i in empty_rows:
        assert not dense[i * block[0] : (i + 1) * block[0]].any()
    for j in empty_cols:
        assert not dense[:, j * block[1] : (j + 1) * block[1]].any()
    # And from_dense of that matrix finds the same pattern.
    assert_pattern(BSR.from_dense(dense, block), mask)


# ------------------------------------------------------------------ .to(dtype)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=["fp16", "bf16", "fp64"])
def test_to_dtype(dtype, gen):
    shape, block = (67, 131), (8, 4)
    mask = mixed_mask(*grid(shape, block), gen)
    w = randn(shape, gen)
    W = BSR.from_mask(w, mask, block)
    V = W.to(dtype)
    assert V.dtype == dtype and V.values.dtype == dtype
    assert V.shape == W.shape and V.block == W.block
    assert torch.equal(V.values, blocks_in_mask_order(w, mask, block).to(dtype))
    assert torch.equal(V.to_dense(), (w * expand_mask(mask, block, shape)).to(dtype))
    for name in INDEX_NAMES:
        assert getattr(V, name).dtype == torch.int32
        assert torch.equal(getattr(V, name), getattr(W, name)), name
    assert W.dtype == torch.float32  # the original is untouched
    assert torch.equal(W.values, blocks_in_mask_order(w, mask, block))


def test_to_same_dtype_keeps_the_values():
    w = torch.randn(13, 3)
    W = BSR.from_dense(w, (4, 1))
    V = W.to(torch.float32)
    assert V.dtype == torch.float32 and torch.equal(V.to_dense(), w)


def test_to_meta_device_moves_values_and_indices():
    W = BSR.from_dense(torch.randn(13, 3), (4, 1))
    V = W.to("meta")
    assert V.device.type == "meta"
    for name in ("values",) + INDEX_NAMES:
        assert getattr(V, name).device.type == "meta", name
    assert W.device.type == "cpu"


# ------------------------------------------------------------------ with_values
def test_with_values_keeps_the_pattern():
    W = BSR.from_dense(torch.randn(13, 7), (4, 4))
    new = torch.randn_like(W.values)
    V = W.with_values(new)
    assert torch.equal(V.values, new) and torch.equal(V.col_indices, W.col_indices)
    assert torch.equal(V.row_offsets, W.row_offsets) and V.shape == W.shape
    with pytest.raises(ValueError, match="values"):
        W.with_values(torch.randn(W.nnz_blocks + 1, 4, 4))


# ------------------------------------------------------------------ bad arguments
@pytest.mark.parametrize("block", [0, (0, 4), (4, 0), (-1, 4), (4, -8)], ids=str)
def test_nonpositive_block_raises_value_error(block):
    with pytest.raises(ValueError, match=r"\bblock\b"):
        BSR.from_dense(torch.randn(8, 8), block)


@pytest.mark.parametrize("block", [(4,), (4, 4, 4), "4", 4.0, (4.0, 4), (4, "4"), True, (True, 4), None, [[4, 4]]], ids=repr)
def test_block_not_an_int_pair_raises_type_error(block):
    with pytest.raises(TypeError, match=r"\bblock\b"):
        BSR.from_dense(torch.randn(8, 8), block)


def test_block_as_list_is_accepted():
    W = BSR.from_dense(torch.randn(8, 8), [4, 2])
    assert W.block == (4, 2)


@pytest.mark.parametrize("density", [-0.1, 1.0001, 2, float("nan"), float("inf"), -float("inf")], ids=repr)
def test_density_out_of_range_raises_value_error(density):
    with pytest.raises(ValueError, match="density"):
        BSR.from_dense(torch.randn(8, 8), (4, 4), density=density)


@pytest.mark.parametrize("density", ["0.3", [0.3], True, 1j], ids=repr)
def test_density_not_a_number_raises_type_error(density):
    with pytest.raises(TypeError, match="density"):
        BSR.from_dense(torch.randn(8, 8), (4, 4), density=density)


@pytest.mark.parametrize("w", [torch.randn(8), torch.randn(2, 8, 8), torch.tensor(1.0)], ids=["1d", "3d", "0d"])
@pytest.mark.parametrize("ctor", ["from_dense", "from_mask"])
def test_w_not_2d_raises_value_error(w, ctor):
    with pytest.raises(ValueError, match=r"^w\b"):
        if ctor == "from_dense":
            BSR.from_dense(w, (4, 4))
        else:
            BSR.from_mask(w, torch.ones(2, 2, dtype=torch.bool), (4, 4))


@pytest.mark.parametrize(
    "w",
    [torch.ones(8, 8, dtype=torch.int64), torch.ones(8, 8, dtype=torch.int32), torch.ones(8, 8, dtype=torch.bool),
     torch.ones(8, 8, dtype=torch.complex64), np.ones((8, 8)), [[1.0] * 8] * 8, torch.randn(8, 8).to_sparse()],
    ids=["int64", "int32", "bool", "complex64", "numpy", "list", "sparse_coo"],
)
@pytest.mark.parametrize("ctor", ["from_dense", "from_mask"])
def test_w_of_wrong_kind_raises_type_error(w, ctor):
    with pytest.raises(TypeError, match=r"^w\b"):
        if ctor == "from_dense":
            BSR.from_dense(w, (4, 4))
        else:
            BSR.from_mask(w, torch.ones(2, 2, dtype=torch.bool), (4, 4))


@pytest.mark.parametrize(
    "mask", [torch.ones(3, 2, dtype=torch.bool), torch.ones(2, 1, dtype=torch.bool), torch.ones(4, dtype=torch.bool),
             torch.ones(1, 2, 2, dtype=torch.bool)],
    ids=["too_many_rows", "too_few_cols", "1d", "3d"],
)
def test_mask_of_wrong_shape_raises_value_error(mask):
    with pytest.raises(ValueError, match="block_mask"):
        BSR.from_mask(torch.randn(8, 8), mask, (4, 4))


def test_mask_not_a_tensor_raises():
    with pytest.raises(TypeError, match="block_mask"):
        BSR.from_mask(torch.randn(8, 8), [[True, False], [False, True]], (4, 4))


def test_empty_mask_without_block_raises():
    with pytest.raises(ValueError, match="block"):
        BSR.from_mask(torch.randn(8, 8), torch.ones(0, 2, dtype=torch.bool))


# ------------------------------------------------------------------ constructor validation
def _ok_args():
    return torch.randn(3, 2, 2), torch.tensor([0, 1, 0]), torch.tensor([0, 2, 3]), (4, 4)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda a: (a[0], a[1], torch.tensor([0, 2]), a[3]), "row_offsets"),  # wrong length
        (lambda a: (a[0], a[1], torch.tensor([0, 3, 2]), a[3]), "row_offsets"),  # decreasing
        (lambda a: (a[0], a[1], torch.tensor([1, 2, 3]), a[3]), "row_offsets"),  # does not start at 0
        (lambda a: (a[0], torch.tensor([0, 2, 0]), a[2], a[3]), "col_indices"),  # column 2 of 2
        (lambda a: (a[0], torch.tensor([1, 0, 0]), a[2], a[3]), "col_indices"),  # unsorted in a row
        (lambda a: (a[0], torch.tensor([0, 0, 0]), a[2], a[3]), "col_indices"),  # duplicate in a row
        (lambda a: (a[0], torch.tensor([0, 1]), a[2], a[3]), "col_indices"),  # one per block
        (lambda a: (a[0][0], a[1], a[2], a[3]), "values"),  # 2-D values
        (lambda a: (a[0], a[1], a[2], (4, -4)), "shape"),
    ],
    ids=["row_offsets_len", "row_offsets_decreasing", "row_offsets_start", "col_out_of_range", "col_unsorted",
         "col_duplicate", "col_count", "values_2d", "negative_shape"],
)
def test_constructor_rejects_inconsistent_arrays(change, match):
    with pytest.raises(ValueError, match=match):
        BSR(*change(_ok_args()))


def test_constructor_builds_a_consistent_matrix():
    values, cols, offsets, shape = _ok_args()
    W = BSR(values, cols, offsets, shape)
    ref = scipy.sparse.bsr_matrix((values.numpy(), cols.numpy(), offsets.numpy()), shape=(4, 4)).toarray()
    np.testing.assert_array_equal(W.to_dense().numpy(), ref)
    assert W.col_offsets.tolist() == [0, 2, 3] and W.col_order.tolist() == [0, 2, 1]


def test_numpy_scalars_are_accepted_for_block_and_density():
    w = torch.randn(16, 16)
    W = BSR.from_dense(w, (np.int64(8), np.int32(4)), density=np.float32(0.5))
    assert W.block == (8, 4) and W.nnz_blocks == 4


def test_density_rounds_halves_up():
    # 5 blocks of 1x1 at density 0.5 -> 2.5 blocks -> 3 kept (not banker's rounding to 2).
    W = BSR.from_dense(torch.arange(1.0, 6.0)[None], (1, 1), density=0.5)
    assert W.nnz_blocks == 3
    assert W.col_indices.tolist() == [2, 3, 4]  # the three largest entries: 3, 4, 5


def test_from_mask_rejects_non_bool_mask():
    with pytest.raises(TypeError, match="block_mask must be a bool tensor"):
        BSR.from_mask(torch.randn(8, 8), torch.ones(2, 2, dtype=torch.int64), (4, 4))
