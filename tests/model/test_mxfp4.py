"""MXFP4 dequantization against transformers' own function and an inline decoding by hand."""

import pytest
import torch

from pyengine.core.errors import InputError
from pyengine.model import mxfp4


def _packed(e=2, o=3, g=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (e, o, g, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(120, 134, (e, o, g), generator=gen, dtype=torch.uint8)
    return blocks, scales


def test_matches_transformers_dequantization():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    blocks, scales = _packed(e=3, o=5, g=2)
    want = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    got = mxfp4.dequantize(blocks, scales, torch.float32)
    assert got.shape == want.shape == (3, 64, 5)
    assert torch.equal(got, want)


def test_one_byte_by_hand():
    # Byte 0x_hi_lo: lo = 0b0011 -> +1.5 (element 0), hi = 0b1110 -> -4.0 (element 1); scale 2^1.
    blocks = torch.zeros(1, 1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0, 0] = (0b1110 << 4) | 0b0011
    scales = torch.full((1, 1, 1), 128, dtype=torch.uint8)
    got = mxfp4.dequantize(blocks, scales, torch.float32)[0, :, 0]
    assert got[0].item() == 3.0 and got[1].item() == -8.0
    assert torch.count_nonzero(got[2:]) == 0


def test_pairs_replace_blocks_and_scales():
    blocks, scales = _packed()
    bias = torch.ones(2, 6)
    out = mxfp4.dequantize_experts({"e.gate_up_proj_blocks": blocks, "e.gate_up_proj_scales": scales,
                                    "e.gate_up_proj_bias": bias}, torch.float32)
    assert set(out) == {"e.gate_up_proj", "e.gate_up_proj_bias"}
    with pytest.raises(InputError, match="has no e.x_scales"):
        mxfp4.dequantize_experts({"e.x_blocks": blocks}, torch.float32)


def test_quantization_config():
    assert mxfp4.check_quantization_config({}) is False
    assert mxfp4.check_quantization_config({"quantization_config": {"quant_method": "mxfp4"}})
    with pytest.raises(InputError, match=r"^quantization_config.quant_method = .*fp8.*only mxfp4"):
        mxfp4.check_quantization_config({"quantization_config": {"quant_method": "fp8"}})
