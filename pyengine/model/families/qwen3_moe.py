"""Qwen3-MoE (`model_type` qwen3_moe): per-head q/k RMSNorm, optional attention biases,
norm_topk_prob, a window switched by use_sliding_window, and dense MLP layers of intermediate_size
where decoder_sparse_step / mlp_only_layers say (Qwen's rule, as Qwen2-MoE)."""

from __future__ import annotations

from typing import Any

from pyengine.model.families.base import Family, dense_mlp_names, sparse_step_dense_layers


class Qwen3Moe(Family):
    def hf_fields(self, cfg: dict[str, Any], get, num_experts: int) -> dict[str, Any]:
        dense = self.dense_layers(cfg, get, get.integer("num_hidden_layers"))
        return {"dense_ffn_size": get.integer("intermediate_size")} if dense else {}

    def dense_layers(self, cfg: dict[str, Any], get, num_layers: int) -> tuple[int, ...]:
        return sparse_step_dense_layers(cfg, get, num_layers)

    def tensor_names(self, hf, layer: int) -> dict[str, str]:
        return dense_mlp_names(layer) if layer in hf.dense_layers else {}


FAMILY = Qwen3Moe("qwen3_moe", "num_experts", "moe_intermediate_size", "mlp",
                  ("gate_proj", "up_proj", "down_proj"), 1e-6, qk_norm="per_head",
                  has_bias_option=True, window_switch=True)
