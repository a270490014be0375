"""Optional parts of a model spec that only some families have: multi-head latent attention (MLA),
YaRN RoPE scaling and grouped sigmoid routing (all three: DeepSeek-V2/V3, Moonlight, Kimi-K2), and
the clamped SwiGLU of gpt-oss's experts.

A spec without them is the plain GQA model with the default RoPE and softmax routing. Each part
checks its own numbers (`check`, a SpecError naming the dotted field), called by spec_rules.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyengine.core.errors import SpecError


@dataclass(kw_only=True, slots=True, frozen=True)
class MLASpec:
    """Multi-head latent attention. Per token and layer the KV cache holds the normed latent
    (kv_lora_rank) and the shared rotated key (qk_rope_head_dim), nothing per head."""

    q_lora_rank: int | None = None
    """Rank of q's low-rank path (q_a_proj, q_a_layernorm, q_b_proj); None: one q_proj."""
    kv_lora_rank: int
    """Width of the compressed KV latent (kv_a_proj_with_mqa, kv_a_layernorm)."""
    qk_nope_head_dim: int
    """Per-head q/k width without position (decompressed from the latent by kv_b_proj)."""
    qk_rope_head_dim: int
    """Per-head q width and shared k width that RoPE rotates."""
    v_head_dim: int
    """Per-head value width (decompressed from the latent by kv_b_proj)."""

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_width(self) -> int:
        """Values the KV cache holds per token and layer."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def check(self, path: str) -> None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            _positive_int(f"{path}.{name}", getattr(self, name))
        if self.q_lora_rank is not None:
            _positive_int(f"{path}.q_lora_rank", self.q_lora_rank)
        if self.qk_rope_head_dim % 2:
            raise SpecError(f"{path}.qk_rope_head_dim", self.qk_rope_head_dim, "RoPE rotates pairs: must be even")


@dataclass(kw_only=True, slots=True, frozen=True)
class YarnSpec:
    """YaRN RoPE scaling (rope_scaling type yarn), as transformers computes it."""

    factor: float
    """Context extension factor (interpolated frequencies are divided by it)."""
    original_max_positions: int
    """Pretraining context (original_max_position_embeddings): sets the correction range."""
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    """With mscale_all_dim: cos/sin are scaled by m(factor, mscale) / m(factor, mscale_all_dim);
    0 (absent): by m(factor, 1)."""
    mscale_all_dim: float = 0.0
    """Non-zero: the softmax scale is multiplied by m(factor, mscale_all_dim)^2 (MLA models)."""
    attention_factor: float = 0.0
    """Non-zero: the cos/sin factor as given (overrides the mscale rule)."""
    truncate: bool = True
    """The correction range's bounds are rounded to whole dimensions (floor / ceil)."""

    def check(self, path: str) -> None:
        for name in ("factor", "beta_fast", "beta_slow"):
            if not getattr(self, name) > 0:
                raise SpecError(f"{path}.{name}", getattr(self, name), "must be > 0")
        _positive_int(f"{path}.original_max_positions", self.original_max_positions)
        for name in ("mscale", "mscale_all_dim", "attention_factor"):
            if getattr(self, name) < 0:
                raise SpecError(f"{path}.{name}", getattr(self, name), "must be >= 0 (0: absent)")


@dataclass(kw_only=True, slots=True, frozen=True)
class GroupedRoutingSpec:
    """Sigmoid scores, a per-expert correction bias added for the choice only, group-limited top-k
    (groups ranked by the sum of their two best biased scores; the best topk_group kept), the
    chosen unbiased scores optionally renormalised (the model's `renormalize`), then scaled."""

    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0

    def check(self, path: str, num_experts: int, top_k: int) -> None:
        _positive_int(f"{path}.n_group", self.n_group)
        _positive_int(f"{path}.topk_group", self.topk_group)
        if num_experts % self.n_group:
            raise SpecError(f"{path}.n_group", self.n_group, f"must divide num_experts ({num_experts})")
        if self.topk_group > self.n_group:
            raise SpecError(f"{path}.topk_group", self.topk_group, f"must be <= n_group ({self.n_group})")
        if top_k > self.topk_group * (num_experts // self.n_group):
            raise SpecError(f"{path}.topk_group", self.topk_group,
                            f"keeps {self.topk_group * (num_experts // self.n_group)} experts, fewer than "
                            f"top_k ({top_k})")
        if not self.routed_scaling_factor > 0:
            raise SpecError(f"{path}.routed_scaling_factor", self.routed_scaling_factor, "must be > 0")


@dataclass(kw_only=True, slots=True, frozen=True)
class ClampedSwiGLUSpec:
    """gpt-oss's expert activation: (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g) with
    g = min(gate, limit)."""

    alpha: float = 1.702
    limit: float = 7.0

    def check(self, path: str) -> None:
        for name in ("alpha", "limit"):
            if not getattr(self, name) > 0:
                raise SpecError(f"{path}.{name}", getattr(self, name), "must be > 0")


def _positive_int(path: str, v) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise SpecError(path, v, "must be a positive integer")
