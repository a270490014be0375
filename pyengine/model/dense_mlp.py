"""The dense MLPs beside the routed experts, in one place for every stage that runs them: a dense
layer's MLP and a layer's shared expert (the always-on expert every token passes through).

Both are SwiGLU MLPs named by a prefix (p_gate, p_up, p_down; stored [in, out]). Where they run
(the attention GPU today) is the stage's choice; what they compute is this module's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pyengine.model.tensors import SHARED_EXPERT_GATE

DENSE_PREFIX = "wd"
SHARED_PREFIX = "ws"


def swiglu(u, w: Mapping[str, Any], p: str):
    """(silu(u @ gate) * (u @ up)) @ down of the MLP whose tensors are named p_gate, p_up, p_down."""
    import torch.nn.functional as F

    return (F.silu(u @ w[f"{p}_gate"]) * (u @ w[f"{p}_up"])) @ w[f"{p}_down"]


def dense_layer_mlp(u, w: Mapping[str, Any]):
    """A dense layer's MLP output [T, H] for its normed rows u."""
    return swiglu(u, w, DENSE_PREFIX)


def shared_expert(model, u, w: Mapping[str, Any]):
    """The layer's shared expert output [T, H] for its normed rows u: weight 1 for every token, or
    with model.shared_expert_gate (Qwen2-MoE) sigmoid(u @ ws_scale), one weight per token."""
    out = swiglu(u, w, SHARED_PREFIX)
    if model.shared_expert_gate:  # a per-token scalar: applied to each column shard's partial, the sum is the same
        return out * (u @ w[SHARED_EXPERT_GATE]).sigmoid()
    return out
