"""A Hugging Face config's attention, read for the whole model: heads, kv heads, head_dim, RoPE,
the family's q/k norm, projection biases, max positions and end-of-sequence ids.

What the engine's attention does not implement is not an error here (one MoE layer without
attention still runs with `--layer N`): it is kept as `unsupported` (key, value, rule) and
refused in one line when the whole model is asked for (HFModel.check_whole). Refused: sliding
window attention, RoPE scaling other than the default, OLMoE's clip_qkv, a q/k norm whose width
does not match the heads.
"""

from __future__ import annotations

from typing import Any

from pyengine.core.errors import InputError


def attention_fields(cfg: dict[str, Any], fam, get, hidden: int) -> dict[str, Any]:
    """HFModel's attention fields from config.json `cfg` (`get`: the typed key reader)."""
    if cfg.get("num_attention_heads") is None:  # enough for one MoE layer, not for the whole model
        return dict(unsupported=("num_attention_heads", None, "is required for the whole model"))
    heads = get.integer("num_attention_heads")
    kv = get.integer("num_key_value_heads", heads)
    head_dim = get.integer("head_dim", max(1, hidden // heads))
    rope = cfg.get("rope_parameters") or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    theta = (get.number("rope_theta", fam.rope_theta_default) if theta is None
             else get.positive_number("rope_parameters.rope_theta", theta))
    return dict(num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                rope_theta=float(theta), qk_norm=fam.qk_norm,
                attention_bias=get.flag("attention_bias", False) if fam.has_bias_option else False,
                max_positions=get.integer("max_position_embeddings", 1 << 30),
                eos_token_ids=_eos_ids(cfg.get("eos_token_id"), get.src),
                unsupported=_unsupported(cfg, fam, rope, heads, head_dim, hidden))


def _eos_ids(eos: Any, src: str) -> tuple[int, ...] | None:
    """eos_token_id: absent/null, one id, or a list of ids (transformers allows both)."""
    ids = [eos] if not isinstance(eos, list) and eos is not None else (eos or [])
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
        raise InputError(f"{src}: eos_token_id", eos, "must be a token id, a list of ids, or null")
    return tuple(ids) or None


def _unsupported(cfg: dict[str, Any], fam, rope: Any, heads: int, head_dim: int, hidden: int):
    kind = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
    if kind != "default":
        return ("rope_parameters.rope_type", kind, "only the default RoPE is supported (no scaling)")
    if cfg.get("rope_scaling"):
        return ("rope_scaling", cfg["rope_scaling"], "RoPE scaling is not supported")
    if cfg.get("use_sliding_window") if fam.window_switch else cfg.get("sliding_window") is not None:
        return ("sliding_window", cfg.get("sliding_window"), "sliding-window attention is not supported")
    if cfg.get("clip_qkv") is not None:
        return ("clip_qkv", cfg["clip_qkv"], "clipping q/k/v is not supported")
    if heads % max(1, cfg.get("num_key_value_heads") or heads):
        return ("num_key_value_heads", cfg.get("num_key_value_heads"),
                f"must divide num_attention_heads ({heads})")
    if head_dim % 2:
        return ("head_dim", head_dim, "RoPE needs an even head_dim")
    if fam.qk_norm == "full" and heads * head_dim != hidden:
        return ("num_attention_heads", heads, f"OLMoE's q norm spans hidden_size ({hidden}), so "
                                              f"heads x head_dim ({heads * head_dim}) must equal it")
    return None
