"""RoPE frequencies and scales: the plain ones, or YaRN's (rope_scaling type yarn) as the DeepSeek
configs use it and transformers computes it.

YaRN blends, per frequency i of a rotary width `dim`, the original inverse frequency
theta^(-2i/dim) (extrapolation: fast-rotating dims) with that frequency divided by `factor`
(interpolation: slow dims), by a ramp between the correction dims of beta_fast and beta_slow
rotations over the pretraining context. Two scales follow from m(s, c) = 0.1 c ln(s) + 1 (1 when
s <= 1):
- cos and sin are multiplied by m(factor, mscale) / m(factor, mscale_all_dim) when both are given,
  else by m(factor, 1) (or by attention_factor when the config sets it);
- MLA models multiply the softmax scale by m(factor, mscale_all_dim)^2 when mscale_all_dim is set.

Reading a config's scaling (`read_rope_scaling`) accepts yarn only: any other type is refused in one
line naming the key, as is an unknown yarn key.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from pyengine.core.errors import InputError
from pyengine.core.spec_parts import YarnSpec

YARN_KEYS = {"factor": "factor", "original_max_position_embeddings": "original_max_positions",
             "beta_fast": "beta_fast", "beta_slow": "beta_slow", "mscale": "mscale",
             "mscale_all_dim": "mscale_all_dim", "attention_factor": "attention_factor",
             "truncate": "truncate"}
"""config.json yarn key -> YarnSpec field."""
IGNORED_KEYS = ("type", "rope_type", "rope_theta")
"""The kind (read first) and the base (read as rope_theta by the attention reader)."""


def mscale(scale: float, coeff: float = 1.0) -> float:
    """YaRN's m(s, c) = 0.1 c ln(s) + 1 (1 for s <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * coeff * math.log(scale) + 1.0


def inv_freq(dim: int, theta: float, yarn: YarnSpec | None, device=None) -> torch.Tensor:
    """[dim / 2] fp32 inverse frequencies of a rotary width `dim`."""
    exps = torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim
    base = theta ** exps
    if yarn is None:
        return 1.0 / base
    low, high = _correction_range(yarn, dim, theta)
    if low == high:
        high += 0.001  # no division by zero (transformers does the same)
    ramp = ((torch.arange(dim // 2, device=device, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: the original frequency (fast dims), 0: divided by factor (slow dims)
    return (1.0 / (yarn.factor * base)) * (1 - keep) + (1.0 / base) * keep


def _correction_range(yarn: YarnSpec, dim: int, theta: float) -> tuple[float, float]:
    def dim_of(rotations: float) -> float:
        return dim * math.log(yarn.original_max_positions / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(yarn.beta_fast), dim_of(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def cos_sin_factor(yarn: YarnSpec | None) -> float:
    """What cos and sin are multiplied by."""
    if yarn is None:
        return 1.0
    if yarn.attention_factor:
        return yarn.attention_factor
    if yarn.mscale and yarn.mscale_all_dim:
        return mscale(yarn.factor, yarn.mscale) / mscale(yarn.factor, yarn.mscale_all_dim)
    return mscale(yarn.factor)


def softmax_scale(qk_head_dim: int, yarn: YarnSpec | None) -> float:
    """1 / sqrt(qk_head_dim), times m(factor, mscale_all_dim)^2 under YaRN with mscale_all_dim."""
    scale = qk_head_dim ** -0.5
    if yarn is not None and yarn.mscale_all_dim:
        scale *= mscale(yarn.factor, yarn.mscale_all_dim) ** 2
    return scale


def read_rope_scaling(cfg: dict[str, Any], src: str) -> YarnSpec | None:
    """The scaling of a config.json: `rope_scaling` (the released configs) or transformers 5's
    `rope_parameters`; None for the default RoPE. Refuses any other type, an unknown key, a missing
    factor or original_max_position_embeddings, in one line naming the key."""
    key, params = _params(cfg)
    if params is None:
        return None
    if not isinstance(params, dict):
        raise InputError(f"{src}: {key}", params, "must be an object")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return None
    if kind != "yarn":
        raise InputError(f"{src}: {key}.rope_type", kind, "only yarn RoPE scaling is supported")
    for k in params:
        if k not in YARN_KEYS and k not in IGNORED_KEYS:
            raise InputError(f"{src}: {key}.{k}", params[k], f"is not a yarn key the engine reads "
                                                            f"(known: {sorted(YARN_KEYS)})")
    values = {}
    for k, field in YARN_KEYS.items():
        v = params.get(k)
        if v is None:
            continue
        if field == "truncate":
            if not isinstance(v, bool):
                raise InputError(f"{src}: {key}.{k}", v, "must be true or false")
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (v == 0 and field not in (
                "mscale", "mscale_all_dim")):
            raise InputError(f"{src}: {key}.{k}", v, "must be a positive number")
        values[field] = v
    for k in ("factor", "original_max_position_embeddings"):
        if YARN_KEYS[k] not in values:
            raise InputError(f"{src}: {key}.{k}", None, "is required for yarn")
    if not float(values["original_max_positions"]).is_integer():
        raise InputError(f"{src}: {key}.original_max_position_embeddings", params[
            "original_max_position_embeddings"], "must be an integer")
    values["original_max_positions"] = int(values["original_max_positions"])
    return YarnSpec(**{k: (float(v) if k not in ("original_max_positions", "truncate") else v)
                       for k, v in values.items()})


def _params(cfg: dict[str, Any]) -> tuple[str, Any]:
    """(its key, the scaling parameters): rope_scaling wins when both are present and non-empty."""
    if cfg.get("rope_scaling"):
        return "rope_scaling", cfg["rope_scaling"]
    return "rope_parameters", cfg.get("rope_parameters") or None
