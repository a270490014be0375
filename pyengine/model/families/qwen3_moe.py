"""Qwen3-MoE (`model_type` qwen3_moe): per-head q/k RMSNorm, optional attention biases,
norm_topk_prob, a window switched by use_sliding_window, and dense layers by decoder_sparse_step /
mlp_only_layers (read here; the whole model refuses them: their MLP width is not read)."""

from __future__ import annotations

from typing import Any

from pyengine.model.families.base import Family, sparse_step_dense_layers


class Qwen3Moe(Family):
    def dense_layers(self, cfg: dict[str, Any], get, num_layers: int) -> tuple[int, ...]:
        return sparse_step_dense_layers(cfg, get, num_layers)


FAMILY = Qwen3Moe("qwen3_moe", "num_experts", "moe_intermediate_size", "mlp",
                  ("gate_proj", "up_proj", "down_proj"), 1e-6, qk_norm="per_head",
                  has_bias_option=True, window_switch=True)
