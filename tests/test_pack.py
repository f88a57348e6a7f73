"""Packing round trips and the GPTQ v1 bit layout."""
import pytest
import torch

from gift_quant.grid import Grid, QuantizedWeight, rtn
from gift_quant.pack import FORMATS, from_gptq, pack_rows, to_gptq, unpack_rows


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [32, 64, 50, 7])
def test_round_trip(bits, n):
    codes = torch.randint(0, 2**bits, (n, 5), generator=torch.Generator().manual_seed(bits * n))
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (-(-n * bits // 32), 5)  # gptqmodel's: to the last bit
    assert torch.equal(unpack_rows(packed, bits, n), codes)


def test_4bit_layout_is_nibbles_in_order():
    codes = torch.arange(32).remainder(16).reshape(32, 1)  # 0..15, 0..15
    words = pack_rows(codes, 4).to(torch.int64) & 0xFFFFFFFF
    assert words[:, 0].tolist() == [0x76543210, 0xFEDCBA98, 0x76543210, 0xFEDCBA98]


def test_3bit_values_cross_word_boundaries_like_gptq():
    # GPTQ's 3-bit packing: values 0..9 in word 0, value 10 split (2 bits in word 0, 1 bit in word 1), ...
    codes = torch.zeros(32, 1, dtype=torch.int64)
    codes[10] = 0b111
    codes[21] = 0b101
    w = pack_rows(codes, 3).to(torch.int64) & 0xFFFFFFFF
    assert w[0, 0] == 0b11 << 30 and w[1, 0] == (0b1 | (0b101 << 31 & 0xFFFFFFFF))
    assert w[2, 0] == 0b10  # the two high bits of value 21 (bits 64..65)


@pytest.mark.parametrize("group_size", [-1, 16])
def test_gptq_round_trip_of_a_layer(group_size):
    w = torch.randn(40, 48)
    qw = rtn(w, Grid(3, group_size), torch.tensor([1, 30]))
    for fmt in FORMATS:
        t = to_gptq(qw, fmt)
        back = from_gptq(t, 3, group_size, 48, 40, fmt)
        assert torch.equal(back.codes, qw.codes) and torch.equal(back.zero, qw.zero) and back.g_idx is None
        torch.testing.assert_close(back.scale, qw.scale.half().float())
        assert t["g_idx"].tolist() == [(j // group_size if group_size > 0 else 0) for j in range(48)]
    # v1 stores zero - 1 (symmetric 3-bit: 4 -> 3), v2 the zero itself
    assert set(unpack_rows(to_gptq(qw, "gptq")["qzeros"].T, 3, 40).unique().tolist()) == {3}
    assert set(unpack_rows(to_gptq(qw, "gptq_v2")["qzeros"].T, 3, 40).unique().tolist()) == {4}


def test_act_order_groups_follow_g_idx():
    """A permuted g_idx survives the round trip, and each column dequantizes with its own group's grid
    (a hand-computed reference: column j uses scale[:, g_idx[j]])."""
    torch.manual_seed(0)
    g_idx = torch.randperm(48) % 3  # three groups of 16 columns, scattered
    codes = torch.randint(0, 8, (40, 48), dtype=torch.uint8)
    scale, zero = torch.rand(40, 3) + 0.1, torch.randint(1, 8, (40, 3)).float()
    qw = QuantizedWeight(codes, scale.half().float(), zero, 3, 16, torch.zeros(0, dtype=torch.long),
                         torch.zeros(40, 0), g_idx)
    back = from_gptq(to_gptq(qw, "gptq_v2"), 3, 16, 48, 40, "gptq_v2")
    assert torch.equal(back.g_idx, g_idx)
    ref = torch.stack([qw.scale[:, g_idx[j]] * (codes[:, j].float() - zero[:, g_idx[j]]) for j in range(48)], 1)
    torch.testing.assert_close(back.dequantize_grid(), ref)
