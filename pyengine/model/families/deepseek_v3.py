"""DeepSeek-V3 (`model_type` deepseek_v3: DeepSeek-V3/R1's architecture, Moonlight-16B-A3B,
Kimi-K2-style models): multi-head latent attention (q through a low-rank path when q_lora_rank is
set), YaRN RoPE scaling, grouped sigmoid routing with a selection-only correction bias, shared
experts beside the routed ones, and dense MLP layers before the first MoE layer
(first_k_dense_replace). The math of each part: docs/mla.md.

What config.json says is read here and nowhere else: its keys, what is refused (one line naming
the key), its tensor names and their layout (the interleaved rotary columns).
"""

from __future__ import annotations

from typing import Any

from pyengine.core.errors import InputError
from pyengine.core.spec_parts import GroupedRoutingSpec, MLASpec
from pyengine.model.families.base import Family

MODEL_TYPE = "deepseek_v3"
LATENT_KEYS = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
IGNORED = {
    "aux_loss_alpha": "a training loss", "seq_aux": "a training loss", "ep_size": "the original code's EP degree",
    "num_nextn_predict_layers": "multi-token-prediction layers: not part of model(ids).logits",
    "num_mtp_layers": "multi-token-prediction layers: not part of model(ids).logits",
    "pretraining_tp": "a training setting", "qk_head_dim": "derived (qk_nope + qk_rope)",
    "head_dim": "derived (transformers writes qk_rope_head_dim there)",
}
"""Keys this family reads past, and why (the rest of a config's keys are read or refused)."""
READ = frozenset({
    "model_type", "hidden_size", "intermediate_size", "moe_intermediate_size", "n_routed_experts",
    "num_local_experts", "num_experts", "num_experts_per_tok", "n_shared_experts", "first_k_dense_replace",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "q_lora_rank", *LATENT_KEYS,
    "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob", "scoring_func", "topk_method",
    "moe_layer_freq", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "rope_interleave",
    "max_position_embeddings", "vocab_size", "tie_word_embeddings", "hidden_act", "attention_bias",
    "quantization_config", "dtype", "torch_dtype", "eos_token_id", "_name_or_path",
})
"""Keys read (or checked and refused) by this family and the common reader."""
NO_EFFECT = frozenset({
    "architectures", "auto_map", "transformers_version", "bos_token_id", "pad_token_id", "initializer_range",
    "use_cache", "attention_dropout", "output_router_logits", "experts_implementation", "_attn_implementation",
})
"""Keys with no effect on model(ids).logits (bookkeeping, training, the cache switch)."""


def mla_of(cfg: dict[str, Any], get) -> MLASpec:
    """MLASpec from the config (`get`: the typed key reader; q_lora_rank null: one q_proj)."""
    q_lora = cfg.get("q_lora_rank")
    return MLASpec(q_lora_rank=None if q_lora is None else get.integer("q_lora_rank"),
                   **{k: get.integer(k) for k in LATENT_KEYS})


def routing_of(cfg: dict[str, Any], get, num_experts: int, top_k: int) -> GroupedRoutingSpec:
    """GroupedRoutingSpec from n_group, topk_group, routed_scaling_factor (checked here, so a bad
    value names its config key)."""
    n_group, topk_group = get.integer("n_group", 1), get.integer("topk_group", 1)
    scaling = get.number("routed_scaling_factor", 1.0)
    if num_experts % n_group:
        raise InputError(f"{get.src}: n_group", n_group, f"must divide n_routed_experts ({num_experts})")
    if topk_group > n_group:
        raise InputError(f"{get.src}: topk_group", topk_group, f"must be <= n_group ({n_group})")
    if n_group > 1 and num_experts // n_group < 2:
        raise InputError(f"{get.src}: n_group", n_group, "groups must hold at least 2 experts (a group is "
                                                         "scored by its two best)")
    if top_k > topk_group * (num_experts // n_group):
        raise InputError(f"{get.src}: num_experts_per_tok", top_k,
                         f"exceeds the {topk_group * (num_experts // n_group)} experts of the kept groups")
    return GroupedRoutingSpec(n_group=n_group, topk_group=topk_group, routed_scaling_factor=scaling)


def refuse_unsupported(cfg: dict[str, Any], src: str) -> None:
    """One InputError for the first key whose value the engine does not implement."""
    for key in cfg:
        if key not in READ and key not in IGNORED and key not in NO_EFFECT:
            raise InputError(f"{src}: {key}", cfg[key], f"is not a {MODEL_TYPE} key the engine knows (an "
                                                        "unsupported feature is never ignored)")
    heads = cfg.get("num_attention_heads")
    rules = [
        ("scoring_func", cfg.get("scoring_func", "sigmoid") == "sigmoid", "only sigmoid scoring (DeepSeek-V3's)"),
        ("topk_method", cfg.get("topk_method", "noaux_tc") == "noaux_tc",
         "only noaux_tc (DeepSeek-V3's grouped top-k with the correction bias)"),
        ("moe_layer_freq", cfg.get("moe_layer_freq", 1) == 1, "every layer from first_k_dense_replace on is MoE (1)"),
        ("num_key_value_heads", cfg.get("num_key_value_heads") in (None, heads),
         f"MLA has no kv heads: must equal num_attention_heads ({heads}) or be absent"),
        ("attention_bias", cfg.get("attention_bias", False) is False, "MLA's projections carry no bias here"),
        ("rope_interleave", isinstance(cfg.get("rope_interleave", True), bool), "must be true or false"),
        ("quantization_config", cfg.get("quantization_config") is None,
         "quantized checkpoints (FP8 blocks) are not read: dequantize to bf16 first"),
        ("hidden_act", cfg.get("hidden_act", "silu") == "silu", "the MLPs are SwiGLU: only 'silu'"),
    ]
    for key, ok, rule in rules:
        if not ok:
            raise InputError(f"{src}: {key}", cfg.get(key), rule)


def first_dense_layers(cfg: dict[str, Any], get, num_layers: int) -> tuple[int, ...]:
    """Layers 0 .. first_k_dense_replace - 1: a dense MLP of intermediate_size, no router."""
    k = cfg.get("first_k_dense_replace", 0) or 0
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= num_layers:
        raise InputError(f"{get.src}: first_k_dense_replace", k, f"must be an integer in [0, {num_layers}]")
    return tuple(range(k))


def shared_ffn(cfg: dict[str, Any], get, moe_ffn: int) -> int:
    """The shared experts' total inner size (n_shared_experts x moe_intermediate_size; 0: none):
    transformers builds them as one MLP of that size, so they run as one."""
    n = cfg.get("n_shared_experts", 0) or 0
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InputError(f"{get.src}: n_shared_experts", n, "must be a non-negative integer")
    return n * moe_ffn


def attention_names(layer: int, q_lora: bool) -> dict[str, str]:
    """Engine name -> HF tensor name of layer `layer`'s MLA tensors (stored [out, in])."""
    p = f"model.layers.{layer}.self_attn"
    out = {"attn_norm": f"model.layers.{layer}.input_layernorm.weight",
           "wkv_a": f"{p}.kv_a_proj_with_mqa.weight", "kv_a_norm": f"{p}.kv_a_layernorm.weight",
           "wkv_b": f"{p}.kv_b_proj.weight", "wo": f"{p}.o_proj.weight"}
    if q_lora:
        out.update(wq_a=f"{p}.q_a_proj.weight", q_a_norm=f"{p}.q_a_layernorm.weight", wq_b=f"{p}.q_b_proj.weight")
    else:
        out["wq"] = f"{p}.q_proj.weight"
    return out


def router_names(layer: int) -> dict[str, str]:
    return {"router": f"model.layers.{layer}.mlp.gate.weight",
            "router_correction": f"model.layers.{layer}.mlp.gate.e_score_correction_bias"}


def rope_layouts(mla: MLASpec, heads: int, interleaved: bool) -> dict[str, tuple[int, int, int]]:
    """Engine tensors ([in, out]) whose output columns hold interleaved rotary slices, with
    (groups, nope, rope) for attention_mla.deinterleave_rope; none when rope_interleave is false."""
    if not interleaved:
        return {}
    q = "wq_b" if mla.q_lora_rank is not None else "wq"
    return {q: (heads, mla.qk_nope_head_dim, mla.qk_rope_head_dim),
            "wkv_a": (1, mla.kv_lora_rank, mla.qk_rope_head_dim)}


def read_fields(cfg: dict[str, Any], get, num_experts: int) -> dict[str, Any]:
    """The HFModel fields of this family beyond the common ones (refusing what is unsupported)."""
    from pyengine.model.rope_yarn import read_rope_scaling

    refuse_unsupported(cfg, get.src)
    return dict(mla=mla_of(cfg, get), rope_scaling=read_rope_scaling(cfg, get.src),
                grouped_routing=routing_of(cfg, get, num_experts, get.integer("num_experts_per_tok")),
                rope_interleave=cfg.get("rope_interleave", True),
                num_key_value_heads=get.integer("num_attention_heads"), head_dim=0, unsupported=None,
                shared_expert_size=shared_ffn(cfg, get, get.integer("moe_intermediate_size")),
                dense_ffn_size=get.integer("intermediate_size") if cfg.get("first_k_dense_replace") else 0)


def layer_names(hf, layer: int) -> dict[str, str]:
    """Engine name -> HF name of layer `layer`'s MLA and router tensors."""
    attention = attention_names(layer, hf.mla.q_lora_rank is not None)
    if layer in hf.dense_layers:  # its MLP is mlp.{gate,up,down}_proj, no router
        return {**attention, **{f"wd_{p}": f"model.layers.{layer}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}}
    shared = {f"ws_{p}": f"model.layers.{layer}.mlp.shared_experts.{p}_proj.weight" for p in ("gate", "up", "down")}
    return {**attention, **router_names(layer), **(shared if hf.shared_expert_size else {})}


def rope_columns(hf, name: str, t):
    """Engine tensor `name` ([in, out]) with its interleaved rotary columns de-interleaved."""
    from pyengine.model.attention_mla import deinterleave_rope

    layout = rope_layouts(hf.mla, hf.num_attention_heads, hf.rope_interleave).get(name)
    return t if layout is None else deinterleave_rope(t, *layout)


class DeepseekV3(Family):
    def hf_fields(self, cfg: dict[str, Any], get, num_experts: int) -> dict[str, Any]:
        return read_fields(cfg, get, num_experts)

    def dense_layers(self, cfg: dict[str, Any], get, num_layers: int) -> tuple[int, ...]:
        return first_dense_layers(cfg, get, num_layers)

    def tensor_names(self, hf, layer: int) -> dict[str, str]:
        return layer_names(hf, layer)

    def fix_layout(self, hf, name: str, t):
        return rope_columns(hf, name, t)


FAMILY = DeepseekV3(MODEL_TYPE, "n_routed_experts", "moe_intermediate_size", "mlp",
                    ("gate_proj", "up_proj", "down_proj"), 1e-6, renormalize_default=True,
                    reads_shared_experts=True)
