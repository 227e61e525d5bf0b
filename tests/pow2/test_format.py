"""edgesparse.pow2 codes and Pow2Weight: exact decode, power-of-two rounding, validation,
reconstruction and the byte count. Oracles: codes decoded by their definition in
Python (math.ldexp), hand-computed roundings, and W rebuilt by a loop over blocks."""

import math

import pytest
import torch

from edgesparse import Pow2Weight
from edgesparse.pow2 import decode, encode, pack, quantize, unpack
from tests._oracle import assert_close, random_mask
from tests.pow2._pow2_oracle import code_value, dense_oracle, random_codes, random_pow2_weight, word_code_value


@pytest.mark.parametrize("exp_range", [(-7, 5), (-126, -112), (113, 127), (0, 0)])
def test_decode_is_exact_for_every_valid_code(exp_range):
    levels = exp_range[1] - exp_range[0] + 1
    codes = [0] + [f for f in range(1, levels + 1)] + [f - 128 for f in range(1, levels + 1)]
    got = decode(torch.tensor(codes, dtype=torch.int8), exp_range)
    expected = torch.tensor([code_value(c, exp_range[0]) for c in codes], dtype=torch.float32)
    assert torch.equal(got, expected)
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32)), "bit patterns differ"


def test_encode_rounds_to_the_nearer_power_and_clamps_and_thresholds():
    values = torch.tensor([1.0, 1.49, 1.5, 2.9, 3.0, -0.75, -0.74, 100.0, -100.0, 2.0**-7, 0.005, 0.003, 0.0, -0.0])
    expected = [1.0, 1.0, 2.0, 2.0, 4.0, -1.0, -0.5, 32.0, -32.0, 2.0**-7, 2.0**-7, 0.0, 0.0, 0.0]
    assert quantize(values).tolist() == expected
    # threshold: 0.01 zeroes 0.005, keeps 0.011 (-> 2^-7)
    assert quantize(torch.tensor([0.005, 0.011]), threshold=0.01).tolist() == [0.0, 2.0**-7]
    codes = encode(values)
    assert codes.dtype == torch.int8 and bool(((codes < 0) == (torch.tensor(expected) < 0)).all())


@pytest.mark.parametrize("bad", [16, 32, 64, 14, 15, -128, -114])
def test_invalid_codes_are_rejected(bad):
    ok = torch.zeros(3, dtype=torch.int8)
    with pytest.raises(ValueError, match="codes holds 1 invalid"):
        Pow2Weight(torch.tensor([[[bad], [0], [1]]], dtype=torch.int8), torch.zeros(1, 1, 3, 3, 1), [0, 1], [0], (1, 3))
    assert ok.sum() == 0


def test_codes_must_be_int8_and_basis_must_fit():
    with pytest.raises(TypeError, match="codes must be an int8"):
        Pow2Weight(torch.zeros(1, 3, 1), torch.zeros(1, 1, 3, 3, 1), [0, 1], [0], (1, 3))
    with pytest.raises(ValueError, match="basis must have shape \\(1, 1, 3, 3, 1\\)"):
        Pow2Weight(torch.zeros(1, 3, 1, dtype=torch.int8), torch.zeros(1, 2, 3, 3, 1), [0, 1], [0], (1, 3))
    with pytest.raises(ValueError, match="codes must have shape \\[nnz_blocks, 3, group\\]"):
        Pow2Weight(torch.zeros(1, 4, 1, dtype=torch.int8), torch.zeros(1, 1, 3, 3, 1), [0, 1], [0], (1, 3))
    with pytest.raises(ValueError, match="col_indices must lie in"):
        Pow2Weight(torch.zeros(1, 3, 1, dtype=torch.int8), torch.zeros(1, 1, 3, 3, 1), [0, 1], [1], (1, 3))


@pytest.mark.parametrize("exp_range, error", [((5, -7), ValueError), ((-10, 10), ValueError), ((-127, 0), ValueError),
                                              ((0.5, 1), TypeError), ((1,), TypeError)])
def test_exp_range_is_validated(exp_range, error):
    with pytest.raises(error, match="exp_range"):
        decode(torch.zeros(1, dtype=torch.int8), exp_range)


@pytest.mark.parametrize("group, chunk_rows", [(32, 192), (5, 4)])
def test_to_dense_is_C_times_B_per_row_chunk(group, chunk_rows, gen):
    shape = (67, 131)  # R = 44 rows of 3, the last with one padded column
    mask = random_mask(math.ceil(67 / group), 44, 0.5, gen)
    W = random_pow2_weight(shape, group, chunk_rows, mask, gen)
    expected, _, _ = dense_oracle(W)
    assert_close(W.to_dense(), expected, torch.float32, "W")
    assert_close(W.to_bsr().to_dense(), expected, torch.float32, "W via BSR")


def test_nbytes_counts_codes_index_and_basis(gen):
    mask = random_mask(3, 10, 0.5, gen)
    W = random_pow2_weight((70, 30), 32, 4, mask, gen)
    nnz = int(mask.sum())
    index = 4 * (3 + 1) + 4 * nnz
    sizes = W.nbytes()
    assert sizes["pow2"] == nnz * 32 * 2 + index + 3 * 3 * 9 * 32 * 4  # a 2-byte word per C row; 3 chunks of 4 rows
    assert sizes["bsr_fp32"] == nnz * 32 * 3 * 4 + index
    assert sizes["dense_fp32"] == 70 * 30 * 4


def test_pack_puts_code_i_in_bits_5i_to_5i_plus_4():
    # C row (2^e_min, -2^(e_min + 12), 0): f = 1; f = 13 with the sign (bit 4); f = 0.
    codes = torch.tensor([[[1], [-128 + 13], [0]]], dtype=torch.int8)
    words = pack(codes)
    assert words.dtype == torch.int16 and words.shape == (1, 1)
    assert int(words[0, 0]) == 1 + (13 + 16) * 32  # 929
    assert torch.equal(unpack(words), codes)


@pytest.mark.parametrize("exp_range", [(-7, 5), (-126, -112), (0, 0)])
def test_every_code_in_every_position_survives_packing(exp_range, gen):
    levels = exp_range[1] - exp_range[0] + 1
    codes = random_codes((40, 3, 33), levels, gen)
    codes[0, :, : 2 * levels + 1] = torch.tensor([0] + list(range(1, levels + 1)) + [f - 128 for f in range(1, levels + 1)])
    words = pack(codes)
    assert bool((words >= 0).all()), "bit 15 of a word is zero"
    assert torch.equal(unpack(words), codes)
    for b, i, p in [(0, 0, 0), (0, 1, levels), (0, 2, 2 * levels), (39, 2, 32), (17, 1, 5)]:
        assert word_code_value(int(words[b, p]), i, exp_range[0]) == code_value(int(codes[b, i, p]), exp_range[0])


def test_pack_and_unpack_reject_bad_operands():
    with pytest.raises(ValueError, match=r"codes must have shape \[\.\.\., 3, group\]"):
        pack(torch.zeros(2, 4, dtype=torch.int8))
    with pytest.raises(TypeError, match="words must be an int16 tensor"):
        unpack(torch.zeros(2, 4, dtype=torch.int8))


def test_bytes_are_at_most_a_quarter_of_the_fp32_bsr_on_the_issue_layer(gen):
    """2048 x 2048, half of the (32 x 3) row blocks kept, chunks of 192 rows: codes
    2/3 byte a weight, the basis and index on top; counted from the arrays by hand."""
    mask = random_mask(64, 683, 0.5, gen)
    W = random_pow2_weight((2048, 2048), 32, 192, mask, gen)
    nnz = int(mask.sum())
    expected = nnz * 32 * 2 + 4 * 65 + 4 * nnz + 64 * 4 * 9 * 32 * 4
    assert W.nbytes()["pow2"] == expected
    assert expected / (nnz * 32 * 3 * 4 + 4 * 65 + 4 * nnz) <= 0.25
