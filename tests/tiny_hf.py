"""Tiny random Hugging Face MoE checkpoints built with transformers (no download), and the
independent reference: transformers' own modules composed as the engine's block.

    x = embed_tokens(ids); u = layers[N].post_attention_layernorm(x)
    h = x + <the layer's sparse MoE block>(u);   logits = lm_head(model.norm(h))
"""

from __future__ import annotations

import math

import torch

SIZES = dict(hidden=22, ffn=13, experts=5, top_k=2, vocab=37, layers=3)
"""Odd sizes everywhere: nothing divides evenly by the TP split."""


def _classes(family: str):
    import transformers as tf

    return {"mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM),
            "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM),
            "olmoe": (tf.OlmoeConfig, tf.OlmoeForCausalLM),
            "deepseek_v3": (tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM),
            "qwen2_moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM),
            "gpt_oss": (tf.GptOssConfig, tf.GptOssForCausalLM)}[family]


DEEPSEEK_V3 = dict(num_attention_heads=3, q_lora_rank=10, kv_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=4,
                   v_head_dim=5, n_group=3, topk_group=2, n_shared_experts=2, first_k_dense_replace=1,
                   routed_scaling_factor=1.7, rope_theta=500.0,
                   rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                 "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8})
"""A tiny DeepSeek-V3: MLA with a low-rank q (widths not powers of two), 3 groups of the 6 experts
(2 kept), two shared experts, a dense first layer, YaRN (both of its scales); theta small so RoPE
turns far."""


QWEN2_MOE = dict(shared_expert_intermediate_size=9, mlp_only_layers=[1], max_position_embeddings=64)
"""A tiny Qwen2-MoE: q/k/v biases (transformers' default qkv_bias) and no o bias, a gated shared
expert of 9, a dense middle layer of intermediate_size 2F + 1."""


GPT_OSS = dict(sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
               swiglu_limit=1.1, max_position_embeddings=64,
               rope_parameters={"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0, "beta_fast": 32.0,
                                "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 16})
"""A tiny gpt-oss: sliding, full, sliding layers with a window of 4 (shorter than the prompts), the
SwiGLU clamp low enough to bite, YaRN as the released configs use it (not truncated), theta small."""


FAMILIES = ("mixtral", "qwen3_moe", "olmoe", "deepseek_v3", "qwen2_moe", "gpt_oss")
FAMILY_CONFIG = {
    "qwen3_moe": dict(norm_topk_prob=True, mlp_only_layers=[0]),  # a dense first layer (q/k-normed attention)
    # 6 experts in 3 groups (2 kept), two shared experts, a dense first layer (tiny_config's defaults)
    "deepseek_v3": dict(experts=6),
}
"""build(...) options of each family's whole-model tests."""


def fit_experts(stages: list[dict], family: str) -> list[dict]:
    """A layout's expert lists (written for 5 experts) fitted to the family's count: with 6, the
    sixth joins the first GPU of the experts stage."""
    experts = stages[1].get("expert_ids")
    if FAMILY_CONFIG.get(family, {}).get("experts") != 6 or experts is None:
        return stages
    return [stages[0], dict(stages[1], expert_ids=[experts[0] + [5], *experts[1:]]), stages[2]]


def tiny_config(family: str, *, hidden=22, ffn=13, experts=5, top_k=2, vocab=37, layers=3,
                tie=False, norm_topk_prob=None, eps=1e-5, **extra):
    cfg_cls, _ = _classes(family)
    # attention is never run (the block drops it): 2-wide heads only keep RoPE's checks happy
    kw = dict(hidden_size=hidden, vocab_size=vocab, num_hidden_layers=layers, num_experts_per_tok=top_k,
              num_attention_heads=hidden // 2, num_key_value_heads=1, rms_norm_eps=eps, tie_word_embeddings=tie,
              pad_token_id=0, bos_token_id=1, eos_token_id=2,
              experts_implementation="eager",  # 5.x: the plain per-expert loop, not grouped_mm
              **extra)
    if family == "mixtral":
        kw.update(intermediate_size=ffn, num_local_experts=experts, head_dim=2)
    elif family == "qwen3_moe":
        kw.update(moe_intermediate_size=ffn, intermediate_size=2 * ffn, num_experts=experts,
                  head_dim=2, norm_topk_prob=bool(norm_topk_prob))
    elif family == "deepseek_v3":
        kw.update(DEEPSEEK_V3, moe_intermediate_size=ffn, intermediate_size=2 * ffn + 1, n_routed_experts=experts,
                  norm_topk_prob=norm_topk_prob is not False, max_position_embeddings=64)
        kw.update({k: v for k, v in extra.items() if k in DEEPSEEK_V3})
        kw["num_key_value_heads"] = kw["num_attention_heads"]
    elif family == "qwen2_moe":
        kw.update(QWEN2_MOE, moe_intermediate_size=ffn, intermediate_size=2 * ffn + 1, num_experts=experts,
                  norm_topk_prob=bool(norm_topk_prob))
        kw.update({k: v for k, v in extra.items() if k in QWEN2_MOE})
    elif family == "gpt_oss":
        kw.update(GPT_OSS, intermediate_size=ffn, num_local_experts=experts, head_dim=2)
        kw.update({k: v for k, v in extra.items() if k in GPT_OSS})
    else:
        kw.update(intermediate_size=ffn, num_experts=experts, norm_topk_prob=bool(norm_topk_prob))
    return cfg_cls(**kw)


def _rescale(model: torch.nn.Module, seed: int) -> None:
    """Weights of unit-scale activations (transformers' 0.02-std init makes the router's
    probabilities near-uniform, so top-k would hang on rounding): linears ~ N(0, 1/fan_in),
    embedding ~ N(0, 1), norm gains ~ 1 + 0.1 N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


def build(family: str, folder, *, dtype=torch.float32, shard_size: str | None = None, seed: int = 0,
          **config_kw):
    """Save a tiny random `family` model to `folder` (sharded when `shard_size`); return it."""
    _, model_cls = _classes(family)
    torch.manual_seed(seed)
    model = model_cls(tiny_config(family, **config_kw))
    _rescale(model, seed)
    for name, b in model.named_buffers():  # DeepSeek-V3's correction bias: large enough to change choices
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.3 * torch.randn(b.shape, generator=torch.Generator().manual_seed(seed + 1)))
    model = model.to(dtype).eval()
    model.save_pretrained(str(folder), max_shard_size=shard_size or "2GB")
    return model


def moe_block(layer: torch.nn.Module) -> torch.nn.Module:
    """The layer's sparse MoE block (Mixtral in transformers 4.x: block_sparse_moe; 5.x: mlp)."""
    return getattr(layer, "block_sparse_moe", None) or layer.mlp


@torch.no_grad()
def reference_logits(model, layer: int, ids: torch.Tensor) -> torch.Tensor:
    """logits [B, S, V] of decoder layer `layer` without attention, from transformers' modules."""
    inner = model.model
    x = inner.embed_tokens(ids)
    dec = inner.layers[layer]
    y = moe_block(dec)(dec.post_attention_layernorm(x))
    y = y[0] if isinstance(y, tuple) else y  # transformers 4.x also returns the router logits
    return model.lm_head(inner.norm(x + y))


@torch.no_grad()
def reference_expert_counts(model, layer: int, ids: torch.Tensor) -> list[int]:
    """Tokens per expert as transformers' router picks them (top-k slots counted)."""
    inner = model.model
    dec = inner.layers[layer]
    u = dec.post_attention_layernorm(inner.embed_tokens(ids)).reshape(-1, model.config.hidden_size)
    logits = moe_block(dec).gate(u)
    logits = logits[0] if isinstance(logits, tuple) else logits  # 5.x router: (logits, scores, ids)
    top = torch.topk(torch.softmax(logits.float(), -1), model.config.num_experts_per_tok, -1).indices
    n = getattr(model.config, "num_local_experts", None) or model.config.num_experts
    return torch.bincount(top.reshape(-1), minlength=n).tolist()
