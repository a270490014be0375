"""gpt-oss (`model_type` gpt_oss: gpt-oss-20b, gpt-oss-120b): attention with a learned sink logit
per head, sliding-window layers beside full ones (`layer_types`, `sliding_window`), biases on every
projection, a router with a bias whose top-k is softmaxed over the chosen logits (the softmax router
renormalised: the same weights), experts with biases and the clamped SwiGLU, their gate/up fused in
one [E, H, 2F] tensor with gate and up in alternate columns, and YaRN RoPE. The released checkpoints
store the experts in MXFP4 (`*_blocks` + `*_scales`): dequantized at load to the model dtype.

What config.json says is read here and nowhere else: its keys (an unknown one is refused in one
line), its tensor names and their layouts (pyengine.model.checkpoint_experts.StoredExpert).
"""

from __future__ import annotations

from typing import Any

from pyengine.core.errors import InputError
from pyengine.core.spec_parts import ClampedSwiGLUSpec
from pyengine.model import mxfp4
from pyengine.model.checkpoint_experts import StoredExpert
from pyengine.model.families.base import Family

MODEL_TYPE = "gpt_oss"
READ = frozenset({
    "model_type", "hidden_size", "intermediate_size", "num_local_experts", "num_experts", "num_experts_per_tok",
    "experts_per_token", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "sliding_window", "layer_types", "attention_bias", "swiglu_alpha", "swiglu_limit", "rms_norm_eps",
    "rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings", "vocab_size",
    "tie_word_embeddings", "hidden_act", "quantization_config", "dtype", "torch_dtype", "eos_token_id",
    "_name_or_path",
})
"""Keys read (or checked and refused) by this family and the common reader."""
NO_EFFECT = frozenset({
    "architectures", "transformers_version", "bos_token_id", "pad_token_id", "initializer_range", "use_cache",
    "attention_dropout", "output_router_logits", "router_aux_loss_coef", "experts_implementation",
    "_attn_implementation", "initial_context_length",
})
"""Keys with no effect on model(ids).logits (bookkeeping, training losses, the cache switch; the
original context length is yarn's original_max_position_embeddings, read there)."""
LAYER_TYPES = {"sliding_attention": "sliding", "full_attention": "full"}
QUANT_KEYS = ("quant_method", "modules_to_not_convert")


def refuse_unsupported(cfg: dict[str, Any], src: str) -> None:
    """One InputError for the first key the engine does not read or whose value it does not run."""
    for key in cfg:
        if key not in READ and key not in NO_EFFECT:
            raise InputError(f"{src}: {key}", cfg[key], f"is not a {MODEL_TYPE} key the engine knows (an "
                                                        "unsupported feature is never ignored)")
    if cfg.get("experts_per_token", cfg.get("num_experts_per_tok")) != cfg.get("num_experts_per_tok"):
        raise InputError(f"{src}: experts_per_token", cfg["experts_per_token"],
                         f"disagrees with num_experts_per_tok = {cfg.get('num_experts_per_tok')}")
    qc = cfg.get("quantization_config")
    if isinstance(qc, dict):
        for key in qc:
            if key not in QUANT_KEYS:
                raise InputError(f"{src}: quantization_config.{key}", qc[key],
                                 f"is not read (known: {list(QUANT_KEYS)}); only the experts are MXFP4")
    mxfp4.check_quantization_config(cfg)  # any method but mxfp4: one line naming it


def layer_kinds(cfg: dict[str, Any], get, num_layers: int) -> dict[str, Any]:
    """sliding_window and layer_types as spec fields: transformers' default alternates (sliding
    first); a null window makes every layer full."""
    kinds = cfg.get("layer_types")
    if kinds is None:
        kinds = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)]
    if not isinstance(kinds, list) or len(kinds) != num_layers or any(k not in LAYER_TYPES for k in kinds):
        raise InputError(f"{get.src}: layer_types", kinds, f"must list {num_layers} of {sorted(LAYER_TYPES)}")
    if "sliding_window" in cfg and cfg["sliding_window"] is None or "sliding_attention" not in kinds:
        return dict(sliding_window=None, layer_types=None)
    return dict(sliding_window=get.integer("sliding_window", 128), layer_types=tuple(LAYER_TYPES[k] for k in kinds))


def read_fields(cfg: dict[str, Any], get, num_experts: int) -> dict[str, Any]:
    """The HFModel fields of this family beyond the common ones (refusing what is unsupported)."""
    from pyengine.model.rope_yarn import read_rope_scaling

    refuse_unsupported(cfg, get.src)
    quantized = mxfp4.check_quantization_config(cfg)
    hidden, ffn = get.integer("hidden_size"), get.integer("intermediate_size")
    for key, n in (("hidden_size", hidden), ("intermediate_size", ffn)):
        if quantized and n % mxfp4.VALUES_PER_SCALE:
            raise InputError(f"{get.src}: {key}", n, f"MXFP4 experts need a multiple of {mxfp4.VALUES_PER_SCALE}")
    heads = get.integer("num_attention_heads")
    kv = get.integer("num_key_value_heads", heads)
    if heads % kv:
        raise InputError(f"{get.src}: num_key_value_heads", kv, f"must divide num_attention_heads ({heads})")
    scaling = read_rope_scaling(cfg, get.src)
    if scaling is not None and scaling.mscale_all_dim:
        raise InputError(f"{get.src}: rope_scaling.mscale_all_dim", scaling.mscale_all_dim,
                         "scales MLA's softmax only; gpt-oss's attention takes none")
    return dict(rope_scaling=scaling, unsupported=None, attention_bias=get.flag("attention_bias", True),
                attention_sinks=True, router_bias=True, expert_bias=True, experts_mxfp4=quantized,
                clamped_swiglu=ClampedSwiGLUSpec(alpha=get.number("swiglu_alpha", 1.702),
                                                 limit=get.number("swiglu_limit", 7.0)),
                **layer_kinds(cfg, get, get.integer("num_hidden_layers")))


def layer_names(layer: int) -> dict[str, str]:
    """Engine name -> HF name of layer `layer`'s router and attention sinks."""
    p = f"model.layers.{layer}"
    return {"router": f"{p}.mlp.router.weight", "router_bias": f"{p}.mlp.router.bias",
            "sinks": f"{p}.self_attn.sinks"}


def stored_experts(hf, layer: int, expert: int) -> dict[str, StoredExpert]:
    """Where expert `expert`'s tensors live: gate_up_proj [E, H, 2F] (gate the even columns, up the
    odd ones) and down_proj [E, F, H], already [in, out]; their biases [E, 2F] and [E, H]. MXFP4:
    the blocks are [E, out, in/32, 16], gate_up's out being the interleaved 2F."""
    p = f"model.layers.{layer}.mlp.experts"
    e, h, f = hf.num_experts, hf.hidden_size, hf.ffn_hidden_size
    biases = {"b_gate": StoredExpert(f"{p}.gate_up_proj_bias", 0, expert, 2, 0, False, shape=(e, 2 * f)),
              "b_up": StoredExpert(f"{p}.gate_up_proj_bias", 0, expert, 2, 1, False, shape=(e, 2 * f)),
              "b_down": StoredExpert(f"{p}.down_proj_bias", None, expert, transposed=False, shape=(e, h))}
    if hf.experts_mxfp4:
        g = mxfp4.VALUES_PER_SCALE
        gate_up, down = (e, 2 * f, h // g, 16), (e, h, f // g, 16)
        return {"w_gate": StoredExpert(f"{p}.gate_up_proj", 0, expert, 2, 0, mxfp4=True, shape=gate_up),
                "w_up": StoredExpert(f"{p}.gate_up_proj", 0, expert, 2, 1, mxfp4=True, shape=gate_up),
                "w_down": StoredExpert(f"{p}.down_proj", 1, expert, mxfp4=True, shape=down), **biases}
    return {"w_gate": StoredExpert(f"{p}.gate_up_proj", 1, expert, 2, 0, False, shape=(e, h, 2 * f)),
            "w_up": StoredExpert(f"{p}.gate_up_proj", 1, expert, 2, 1, False, shape=(e, h, 2 * f)),
            "w_down": StoredExpert(f"{p}.down_proj", 0, expert, transposed=False, shape=(e, f, h)), **biases}


class GptOss(Family):
    def hf_fields(self, cfg: dict[str, Any], get, num_experts: int) -> dict[str, Any]:
        return read_fields(cfg, get, num_experts)

    def tensor_names(self, hf, layer: int) -> dict[str, str]:
        return layer_names(layer)

    def expert_names(self, hf, layer: int, expert: int) -> dict[str, StoredExpert]:
        return stored_experts(hf, layer, expert)


FAMILY = GptOss(MODEL_TYPE, "num_local_experts", "intermediate_size", "mlp", ("gate_up_proj", "gate_up_proj",
                "down_proj"), 1e-5, always_renormalize=True, rope_theta_default=150000.0, has_bias_option=True)
