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


@pytest.mark.parametrize("f_cols", [None, (0, 37), (37, 64), (5, 9)])
def test_stored_expert_slices_equal_transformers_dequantized_weights(tmp_path, f_cols):
    """gpt-oss's MXFP4 experts read as the engine's w_gate / w_up (the even / odd columns of
    gate_up_proj) and w_down, one expert and a shard's F columns at a time (down: by 32-value groups,
    cut inside a group), equal bit for bit to transformers' dequantization of the whole tensors."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from pyengine.model.checkpoint_experts import StoredExpert

    e, h, f = 3, 64, 64
    gu_b, gu_s = _packed(e=e, o=2 * f, g=h // 32, seed=1)
    dn_b, dn_s = _packed(e=e, o=h, g=f // 32, seed=2)
    save_file({"gu_blocks": gu_b, "gu_scales": gu_s, "dn_blocks": dn_b, "dn_scales": dn_s}, tmp_path / "x.safetensors")
    gate_up = convert_moe_packed_tensors(gu_b, gu_s, dtype=torch.float32)  # [E, H, 2F]
    down = convert_moe_packed_tensors(dn_b, dn_s, dtype=torch.float32)  # [E, F, H]
    a, b = f_cols or (0, f)
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as fh:
        for x in range(e):
            stored = {"w_gate": StoredExpert("gu", expert=x, step=2, offset=0, mxfp4=True),
                      "w_up": StoredExpert("gu", expert=x, step=2, offset=1, mxfp4=True),
                      "w_down": StoredExpert("dn", f_axis=1, expert=x, mxfp4=True)}
            want = {"w_gate": gate_up[x, :, 0::2][:, a:b], "w_up": gate_up[x, :, 1::2][:, a:b], "w_down": down[x, a:b]}
            for name, s in stored.items():
                parts = [fh.get_slice(k)[i] for k, i in s.reads(f_cols, f)]
                got = s.finish(name, parts, f_cols, torch.float32)
                assert got.shape == want[name].shape and torch.equal(got, want[name]), name
