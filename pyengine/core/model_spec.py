"""The model section of a deployment spec: sizes, attention, routing and the optional parts only
some families have (checked by pyengine.core.spec_rules, like the other sections)."""

from __future__ import annotations

from dataclasses import dataclass

from pyengine.core.spec_parts import ClampedSwiGLUSpec, GroupedRoutingSpec, MLASpec, YarnSpec


@dataclass(kw_only=True, slots=True, frozen=True)
class ModelSpec:
    batch_size: int
    """Sequences per batch (B)."""
    seq_len: int
    """Tokens per sequence (S); T = B*S tokens flow through the block."""
    hidden_size: int
    """H."""
    ffn_hidden_size: int
    """F: the expert FFN's inner size, split across the expert stage's TP shards."""
    num_experts: int
    """E."""
    top_k: int
    """Experts chosen per token (k <= E)."""
    vocab_size: int
    """V: embedding rows and output-head columns."""
    dtype: str = "bfloat16"
    """Weights and activations: one of pyengine.core.dtypes.MODEL_DTYPES."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon (a checkpoint's rms_norm_eps)."""
    renormalize: bool = True
    """Top-k routing weights rescaled to sum to 1 (a checkpoint's norm_topk_prob; Mixtral always
    does); False keeps the raw softmax probabilities of the chosen experts (OLMoE)."""
    num_layers: int | None = None
    """L decoder layers, each attention + router (on the embed stage's GPU) then the routed
    experts (on the experts stage); None: the attention-free block (embedding, router, experts,
    head), which is the one-layer case without attention of the same engine."""
    num_attention_heads: int | None = None
    """Query heads of every layer's attention (required with num_layers)."""
    num_key_value_heads: int | None = None
    """Key/value heads (GQA: each serves heads / kv_heads query heads); None = num_attention_heads."""
    head_dim: int | None = None
    """d of one head; None = hidden_size // num_attention_heads."""
    rope_theta: float = 10000.0
    """RoPE base (rotate-half convention, position = index in the sequence)."""
    qk_norm: str = "none"
    """RMSNorm on q and k before RoPE: none (Mixtral), per_head (over each head's d: Qwen3-MoE)
    or full (over the whole q and k projections: OLMoE)."""
    attention_bias: bool = False
    """q, k, v and o projections carry a bias (a checkpoint's attention_bias)."""
    bias_projections: tuple[str, ...] | None = None
    """Which projections carry a bias when not all four do: ["q", "k", "v"] (Qwen2-MoE: no o bias)
    or ["o"]; q, k and v go together (the fused QKV GEMM adds one bias). None: attention_bias says
    (all four or none)."""
    max_positions: int | None = None
    """Longest sequence the model supports (max_position_embeddings); None: no limit."""
    eos_token_ids: tuple[int, ...] | None = None
    """End-of-sequence ids that stop a sequence in `pyengine generate` (None: none). An id outside
    the vocabulary is allowed (OLMoE's default 50279 beside a smaller test vocabulary): it can
    never be drawn, which `unreachable_eos` names and generate says."""
    mla: MLASpec | None = None
    """Multi-head latent attention (DeepSeek-V2/V3) instead of GQA; num_key_value_heads and head_dim
    then stay unset (the cache holds the latent; see MLASpec)."""
    rope_scaling: YarnSpec | None = None
    """YaRN scaling of RoPE (the only scaling supported); None: plain RoPE."""
    shared_expert_size: int = 0
    """Inner size of the always-on shared expert MLP (SwiGLU) beside the routed ones (DeepSeek-V3:
    n_shared_experts x the expert F); 0: none. It runs on the normed rows the router reads, on the
    GPU `parallel.dense_mlp_placement` names."""
    shared_expert_gate: bool = False
    """The shared expert's output is scaled per token by sigmoid(u @ ws_scale) (Qwen2-MoE's
    shared_expert_gate, a [H] -> 1 linear); False: weight 1 (DeepSeek-V3)."""
    dense_layers: tuple[int, ...] | None = None
    """Layers whose MLP is dense (no router, no experts: DeepSeek-V3's first_k_dense_replace): a SwiGLU
    of dense_ffn_size, on the GPU(s) `parallel.dense_mlp_placement` names (the attention GPU: the experts
    stage skips them). The last layer is MoE."""
    dense_ffn_size: int = 0
    """Inner size of the dense layers' MLP."""
    grouped_routing: GroupedRoutingSpec | None = None
    """Sigmoid scores with a correction bias and group-limited top-k (DeepSeek-V3) instead of the
    softmax router; `renormalize` is its norm_topk_prob."""
    attention_sinks: bool = False
    """Each query head has a learned sink logit (tensor `sinks` [heads] per layer) that joins the
    softmax denominator and has no value (gpt-oss)."""
    sliding_window: int | None = None
    """Keys a query of a sliding layer sees (its own and the window - 1 before it); None: none."""
    layer_types: tuple[str, ...] | None = None
    """Per layer, "full" or "sliding" (a sliding_window layer); None: every layer sliding when
    sliding_window is set, else full."""
    router_bias: bool = False
    """The router's logits carry a per-expert bias (tensor `router_bias` [E]). The top-k softmaxed
    over the chosen logits (gpt-oss) is the softmax router with `renormalize`: the same weights."""
    expert_bias: bool = False
    """Every expert's gate, up and down projections carry a bias (b_gate, b_up [E, F], b_down [E, H])."""
    clamped_swiglu: ClampedSwiGLUSpec | None = None
    """The experts' activation is gpt-oss's clamped SwiGLU instead of silu(gate) * up."""

    @property
    def unreachable_eos(self) -> tuple[int, ...]:
        """End-of-sequence ids no logit can produce (outside [0, vocab_size))."""
        return tuple(e for e in self.eos_token_ids or () if e >= self.vocab_size)

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def layered(self) -> bool:
        """True for a model of decoder layers with attention; False for the block."""
        return self.num_layers is not None

    @property
    def layers(self) -> int:
        """Layer trips through the experts: num_layers, or 1 for the block."""
        return self.num_layers if self.num_layers is not None else 1

    @property
    def heads(self) -> int:
        return self.num_attention_heads or 0

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.heads

    @property
    def biased(self) -> tuple[str, ...]:
        """The projections that carry a bias, of q, k, v, o (bias_projections, else attention_bias)."""
        return biased_projections(self.attention_bias, self.bias_projections)

    def is_dense(self, layer: int | None) -> bool:
        """Layer `layer`'s MLP is dense (no experts)."""
        return layer is not None and layer in (self.dense_layers or ())

    def window(self, layer: int | None) -> int:
        """Keys a query of `layer` sees at most (0: every earlier key)."""
        if self.sliding_window is None or layer is None:
            return 0
        types = self.layer_types
        return self.sliding_window if types is None or types[layer] == "sliding" else 0

    @property
    def rope_dim(self) -> int:
        """Width RoPE rotates: MLA's qk_rope_head_dim, else the head's d."""
        return self.mla.qk_rope_head_dim if self.mla is not None else self.head_size

    @property
    def head_size(self) -> int:
        """d: head_dim, or hidden_size // num_attention_heads (MLA: q's and k's per-head width)."""
        if self.mla is not None:
            return self.mla.qk_head_dim
        if self.head_dim is not None:
            return self.head_dim
        return self.hidden_size // self.heads if self.heads else 0


def biased_projections(attention_bias: bool, bias_projections: tuple[str, ...] | None) -> tuple[str, ...]:
    """The projections of q, k, v, o that carry a bias: bias_projections when set, else all or none."""
    if bias_projections is not None:
        return tuple(bias_projections)
    return ("q", "k", "v", "o") if attention_bias else ()
