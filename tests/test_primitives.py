"""Quantizer primitives: exact pack/unpack round trips, qparam conventions, non-dividing groups."""
import pytest
import torch

from ptq.quant.primitives import (QuantSpec, compute_qparams, default_g_idx, dequantize, fake_quantize,
                                  fake_quantize_activation, pack, quantize, unpack)
from ptq.quant.qweight import QuantizedWeight


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("word_bits", [8, 32])
@pytest.mark.parametrize("k", [1, 7, 64, 100, 576])
def test_pack_unpack_bit_exact(bits, word_bits, k):
    g = torch.Generator().manual_seed(bits * 1000 + k)
    codes = torch.randint(0, 2**bits, (5, k), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack(codes, bits, word_bits)
    assert packed.shape == (5, -(-k * bits // word_bits))
    assert torch.equal(unpack(packed, bits, k), codes)


def test_pack_layout_lsb_first():
    # 4-bit: even element in the low nibble (MatMulNBits / compressed-tensors layout)
    codes = torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8)
    assert pack(codes, 4).tolist() == [[0x21, 0x43]]
    assert pack(codes, 4, 32).tolist() == [[0x4321]]
    # 3-bit straddles bytes: 0b111 at bits 0..2, then 0b001 at bits 3..5, then 0b110 at 6..8
    c3 = torch.tensor([[7, 1, 6]], dtype=torch.uint8)
    assert pack(c3, 3).tolist() == [[0b10001111, 0b1]]
    # int32 words with the top bit set stay exact
    c = torch.full((1, 8), 15, dtype=torch.uint8)
    assert pack(c, 4, 32).tolist() == [[-1]]


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("gs,k", [(32, 128), (128, 576), (64, 100), (-1, 96)])
def test_quantize_dequantize_roundtrip_and_error_bound(sym, gs, k):
    torch.manual_seed(0)
    w = torch.randn(16, k)
    spec = QuantSpec(4, gs, sym)
    qw = QuantizedWeight.from_float(w, spec)
    assert qw.scale.shape == (16, spec.groups(k))
    assert int(qw.codes.max()) <= 15
    deq = qw.dequantize()
    # error within half a step everywhere (min/max includes every value, no clipping)
    step = qw.scale[:, qw.g_idx.long()]
    assert bool(((deq - w).abs() <= step / 2 + 1e-6).all())
    # codes survive packing exactly, so the dequantized weights too
    re = unpack(pack(qw.codes, 4), 4, k)
    assert torch.equal(dequantize(re, qw.scale, qw.zeros(), qw.g_idx), deq)
    assert torch.equal(fake_quantize(w, spec), deq)


def test_short_last_group_uses_only_its_columns():
    w = torch.zeros(1, 130)
    w[0, 128:] = torch.tensor([0.5, -0.25])
    w[0, :128] = 100.0
    spec = QuantSpec(4, 128, False)
    scale, zero = compute_qparams(w, spec)
    assert scale.shape == (1, 2)
    assert abs(float(scale[0, 1]) - 0.75 / 15) < 1e-7  # range of the 2-column group only


def test_sym_grid_matches_gptq_convention():
    w = torch.tensor([[-1.0, 0.5, 0.25, 1.0]])
    scale, zero = compute_qparams(w, QuantSpec(4, -1, True))
    assert float(zero) == 8.0 and abs(float(scale) - 2 / 15) < 1e-7
    codes = quantize(w, scale, zero, 4, default_g_idx(4, 4))
    # -1/s = -7.4999997 in fp32 -> -7 -> code 1; the grid is [-8, 7] * s, so +1.0 -> 7.5 -> 8 clamps to 15
    assert codes.tolist() == [[1, 12, 10, 15]]


def test_mse_clip_never_worse_than_minmax():
    torch.manual_seed(1)
    w = torch.randn(32, 256) * torch.linspace(0.1, 3, 256)
    plain = fake_quantize(w, QuantSpec(3, 64, False))
    mse = fake_quantize(w, QuantSpec(3, 64, False, mse=True))
    assert float((mse - w).pow(2).sum()) < float((plain - w).pow(2).sum())


def test_activation_fake_quant_per_token_and_static():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 10.0, 20.0, 30.0]])
    y = fake_quantize_activation(x, 8, "token")
    assert torch.allclose(y, x, atol=30 / 255)
    clipped = fake_quantize_activation(x, 8, "tensor", clip=(0.0, 3.0))
    assert float(clipped.max()) == pytest.approx(3.0, abs=1e-5)


def test_spec_validation():
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=1)
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(group_size=0)
