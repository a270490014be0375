"""OLMoE (`model_type` olmoe): the common layout under `mlp` with a full-width q/k RMSNorm and
optional attention biases."""

from pyengine.model.families.base import Family

FAMILY = Family("olmoe", "num_experts", "intermediate_size", "mlp",
                ("gate_proj", "up_proj", "down_proj"), 1e-5, qk_norm="full", has_bias_option=True)
