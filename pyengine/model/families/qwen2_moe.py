"""Qwen2-MoE (`model_type` qwen2_moe: Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): GQA with q/k/v projection
biases and none on o (`qkv_bias`, default true), softmax top-k routing whose weights are renormalised
only with `norm_topk_prob` (default false), a shared expert of `shared_expert_intermediate_size`
beside the routed ones scaled per token by sigmoid(u @ shared_expert_gate) (a [H] -> 1 linear), and
dense MLP layers of `intermediate_size` where `mlp_only_layers` / `decoder_sparse_step` say.

What config.json says is read here and nowhere else: its keys, what is refused (one line naming the
key: sliding-window attention, any key the engine does not know), its tensor names.
"""

from __future__ import annotations

from typing import Any

from pyengine.core.errors import InputError
from pyengine.model.families.base import Family, dense_mlp_names, sparse_step_dense_layers
from pyengine.model.tensors import SHARED_EXPERT_GATE

MODEL_TYPE = "qwen2_moe"
READ = frozenset({
    "model_type", "hidden_size", "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size",
    "num_experts", "num_local_experts", "num_experts_per_tok", "norm_topk_prob", "decoder_sparse_step",
    "mlp_only_layers", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "qkv_bias",
    "hidden_act", "rms_norm_eps", "rope_theta", "rope_parameters", "rope_scaling", "max_position_embeddings",
    "vocab_size", "tie_word_embeddings", "use_sliding_window", "sliding_window", "max_window_layers",
    "layer_types", "dtype", "torch_dtype", "eos_token_id", "_name_or_path",
})
"""Keys read (or checked and refused) by this family and the common reader."""
IGNORED = {"router_aux_loss_coef": "a training loss", "output_router_logits": "a training output"}
"""Keys this family reads past, and why."""
NO_EFFECT = frozenset({
    "architectures", "auto_map", "transformers_version", "bos_token_id", "pad_token_id", "initializer_range",
    "use_cache", "attention_dropout", "experts_implementation", "_attn_implementation",
})
"""Keys with no effect on model(ids).logits (bookkeeping, training, the cache switch)."""
FULL = "full_attention"


def refuse_unsupported(cfg: dict[str, Any], src: str) -> None:
    """One InputError for the first key the engine does not know or whose value it does not run."""
    for key in cfg:
        if key not in READ and key not in IGNORED and key not in NO_EFFECT:
            raise InputError(f"{src}: {key}", cfg[key], f"is not a {MODEL_TYPE} key the engine knows (an "
                                                        "unsupported feature is never ignored)")
    window = cfg.get("use_sliding_window", False)
    if window is not False:
        raise InputError(f"{src}: use_sliding_window", window, "sliding-window attention is not supported "
                                                               "(false only: every layer attends to all keys)")
    types = cfg.get("layer_types")
    if types is not None and (not isinstance(types, list) or any(t != FULL for t in types)):
        raise InputError(f"{src}: layer_types", types, f"only {FULL!r} layers are supported")
    bias = cfg.get("qkv_bias", True)
    if not isinstance(bias, bool):
        raise InputError(f"{src}: qkv_bias", bias, "must be true or false")


def read_fields(cfg: dict[str, Any], get) -> dict[str, Any]:
    """The HFModel fields of this family beyond the common ones (refusing what is unsupported)."""
    refuse_unsupported(cfg, get.src)
    dense = sparse_step_dense_layers(cfg, get, get.integer("num_hidden_layers"))
    return dict(bias_projections=("q", "k", "v") if cfg.get("qkv_bias", True) else None,
                shared_expert_size=get.integer("shared_expert_intermediate_size"), shared_expert_gate=True,
                dense_ffn_size=get.integer("intermediate_size") if dense else 0)


def mlp_names(hf, layer: int) -> dict[str, str]:
    """Engine name -> HF name of layer `layer`'s MLP tensors beyond the common ones: a dense layer's
    MLP, or a MoE layer's shared expert and its gate."""
    mlp = f"model.layers.{layer}.mlp"
    if layer in hf.dense_layers:
        return dense_mlp_names(layer)
    return {**{f"ws_{p}": f"{mlp}.shared_expert.{p}_proj.weight" for p in ("gate", "up", "down")},
            SHARED_EXPERT_GATE: f"{mlp}.shared_expert_gate.weight"}


class Qwen2Moe(Family):
    def hf_fields(self, cfg: dict[str, Any], get, num_experts: int) -> dict[str, Any]:
        return read_fields(cfg, get)

    def dense_layers(self, cfg: dict[str, Any], get, num_layers: int) -> tuple[int, ...]:
        return sparse_step_dense_layers(cfg, get, num_layers)

    def tensor_names(self, hf, layer: int) -> dict[str, str]:
        return mlp_names(hf, layer)


FAMILY = Qwen2Moe(MODEL_TYPE, "num_experts", "moe_intermediate_size", "mlp", ("gate_proj", "up_proj", "down_proj"),
                  1e-6, window_switch=True, reads_shared_experts=True)
