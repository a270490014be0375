"""MXFP4 expert weights (gpt-oss's released checkpoints): dequantized once at load.

A `*_blocks` tensor holds uint8 bytes, two e2m1 (fp4) values each, low nibble first; a
`*_scales` tensor holds one e8m0 exponent byte (bias 127) per 32 values. Checkpoints store a
projection as blocks [E, out, in/32, 16] + scales [E, out, in/32]; the engine's expert layout
is [E, in, out] (gate_up_proj [E, H, 2F], down_proj [E, F, H]), so the result is transposed.
Tests check this against transformers' own dequantization on small packed tensors.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.errors import InputError

# e2m1 code -> value: bit 3 is the sign, bits 0-2 index the magnitudes below.
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
VALUES_PER_SCALE = 32
SUPPORTED_QUANT_METHODS = ("mxfp4",)


def check_quantization_config(config: dict[str, Any]) -> bool:
    """True when config.json declares MXFP4 experts; None of a quantization_config: False.

    Any other quantization method is refused in one line before any weight is read."""
    qc = config.get("quantization_config")
    if qc is None:
        return False
    method = qc.get("quant_method") if isinstance(qc, dict) else qc
    if method not in SUPPORTED_QUANT_METHODS:
        raise InputError("quantization_config.quant_method", method,
                         f"only {', '.join(SUPPORTED_QUANT_METHODS)} (gpt-oss experts) is supported")
    return True


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """blocks [*P, O, G, 16] uint8 + scales [*P, O, G] e8m0 -> [*P, G*32, O] in `dtype`."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] * 2 != VALUES_PER_SCALE:
        raise InputError("mxfp4 blocks/scales shapes", (tuple(blocks.shape), tuple(scales.shape)),
                         "blocks must be [..., G, 16] and scales [..., G]")
    b = blocks.to(torch.uint8)
    lut = torch.tensor(_E2M1 + tuple(-v for v in _E2M1), dtype=torch.float32)
    # Low nibble is the even element, high nibble the odd one (pairs interleave in order).
    vals = torch.stack((lut[(b & 0x0F).long()], lut[(b >> 4).long()]), dim=-1)
    vals = vals.flatten(-2)  # [..., G, 32]
    exp = scales.to(torch.int32) - 127
    # Powers of two are exact in fp32 for the e8m0 range the checkpoints use.
    out = torch.ldexp(vals, exp.unsqueeze(-1).float()).flatten(-2)  # [*P, O, G*32]
    return out.transpose(-1, -2).contiguous().to(dtype)


def dequantize_experts(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Replace each `X_blocks` + `X_scales` pair in `tensors` by the dequantized `X`."""
    out = {}
    for name, t in tensors.items():
        if name.endswith("_scales"):
            continue
        if name.endswith("_blocks"):
            stem = name[: -len("_blocks")]
            if stem + "_scales" not in tensors:
                raise InputError(name, tuple(t.shape), f"has no {stem}_scales beside it")
            out[stem] = dequantize(t, tensors[stem + "_scales"], dtype)
        else:
            out[name] = t
    orphan = [n for n in tensors if n.endswith("_scales") and n[: -len("_scales")] + "_blocks" not in tensors]
    if orphan:
        raise InputError(orphan[0], tuple(tensors[orphan[0]].shape), "has no _blocks beside it")
    return out
