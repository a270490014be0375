"""How an expert turns its gate and up projections into the down projection's input, and whether
its projections carry biases: chosen once per stage from the model spec (`of_model`) and handed to
the rank's ops with every call, so neither path branches on a name per call.

    swiglu (Mixtral, Qwen, OLMoE, DeepSeek):  silu(gate) * up
    clamped (gpt-oss):  (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g),  g = min(gate, limit)

With `bias` (gpt-oss): gate += b_gate[e], up += b_up[e] before it, and b_down[e] is added to the
down projection before the router weight scales it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True, slots=True)
class ExpertActivation:
    alpha: float = 0.0
    limit: float = 0.0
    """alpha > 0: the clamped SwiGLU with these constants; 0: plain SwiGLU."""
    bias: bool = False

    @classmethod
    def of_model(cls, model) -> ExpertActivation:
        c = model.clamped_swiglu
        return cls(c.alpha if c else 0.0, c.limit if c else 0.0, model.expert_bias)

    @property
    def clamped(self) -> bool:
        return self.alpha > 0

    @property
    def kernel(self) -> str:
        """The fused column kernel's activation option."""
        return "clamped_swiglu" if self.clamped else "swiglu"

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if not self.clamped:
            return F.silu(gate) * up
        g = gate.clamp(max=self.limit)
        return (up.clamp(min=-self.limit, max=self.limit) + 1) * (g * torch.sigmoid(g * self.alpha))


SWIGLU = ExpertActivation()
