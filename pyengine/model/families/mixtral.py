"""Mixtral (`model_type` mixtral): the common layout under `block_sparse_moe`, experts w1/w3/w2,
the top-k weights always renormalised, no q/k norm, no biases; a set sliding_window always
applies (transformers ignores use_sliding_window for it)."""

from pyengine.model.families.base import Family

FAMILY = Family("mixtral", "num_local_experts", "intermediate_size", "block_sparse_moe",
                ("w1", "w3", "w2"), 1e-5, always_renormalize=True, rope_theta_default=1e6)
