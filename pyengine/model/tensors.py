"""The model's tensors: their names, their full shapes, and the key each has in a weights dict.

A tensor is a name and, for per-layer tensors of a model with layers, a layer. Its key in a
weights dict is built by `weight_key` and never parsed back: the bare name for shared tensors and
for the attention-free block (whose names are exactly embed, norm_in, router, w_gate, w_up,
w_down, norm_out, out), `layers.<l>.<name>` for layer l's tensors. A stage computing layer l sees
`LayerWeights(weights, l)`: per-layer names resolve to that layer's tensors, shared ones to
themselves, so the stage code reads `w["router"]` whatever the layer.

Layout is the engine's [in, out] (HF linears are [out, in]): w_gate/w_up [E, H, F], w_down
[E, F, H], router [H, E], out [H, V], wq [H, heads*d], wk/wv [H, kv*d], wo [heads*d, H]; MLA's in
`_mla_shapes`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyengine.core.spec import ModelSpec

SHARED = ("embed", "norm_out", "out")
"""Tensors the model holds once, whatever its layer count."""
PER_EXPERT = ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down")
"""Tensors with one slice per expert (the biases only with model.expert_bias)."""
EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")
EXPERT_BIASES = ("b_gate", "b_up", "b_down")
"""gpt-oss's expert biases: b_gate, b_up [E, F] (sharded with F's columns) and b_down [E, H], which
the shard of F's first column holds and the others hold as zeros (added once per token and expert)."""
F_AXIS = {"w_gate": 2, "w_up": 2, "w_down": 1, "b_gate": 1, "b_up": 1}
"""The axis of F in each per-expert tensor's full [E, ...] shape (b_down has none)."""
ATTENTION = ("attn_norm", "wq", "wk", "wv", "wo")
QK_NORMS = ("q_norm", "k_norm")
BIASES = ("bq", "bk", "bv", "bo")
"""Projection biases, named b + the projection (model.biased says which a model has)."""


MLA = ("attn_norm", "wkv_a", "kv_a_norm", "wkv_b", "wo")
"""Multi-head latent attention (pyengine.model.attention_mla): the KV latent's down-projection (with
the shared rotary key), its norm, its up-projection to per-head k_nope and v, and o."""
MLA_Q_LORA = ("wq_a", "q_a_norm", "wq_b")
"""MLA's q through its low-rank path (q_lora_rank set); else one `wq`."""
DENSE_MLP = ("wd_gate", "wd_up", "wd_down")
"""A dense layer's MLP (model.dense_layers): [H, I], [H, I], [I, H]."""
SHARED_EXPERT = ("ws_gate", "ws_up", "ws_down")
"""The shared expert of a layer (model.shared_expert_size > 0): [H, S], [H, S], [S, H]."""
SHARED_EXPERT_GATE = "ws_scale"
"""The shared expert's per-token gate (model.shared_expert_gate): [H, 1], its output times
sigmoid(u @ ws_scale). Not `ws_gate`, which is the SwiGLU's gate projection."""
ROUTER_CORRECTION = "router_correction"
"""Grouped routing's per-expert bias [E], added to the scores for the choice only."""


def attention_names(model: ModelSpec) -> tuple[str, ...]:
    """One layer's attention tensors for this model's options (none for the block)."""
    if not model.layered:
        return ()
    if model.mla is not None:
        return MLA + (MLA_Q_LORA if model.mla.q_lora_rank is not None else ("wq",))
    return attention_tensors(model.qk_norm, model.biased) + (("sinks",) if model.attention_sinks else ())


def fp32_names(model: ModelSpec) -> tuple[str, ...]:
    """Tensors held in fp32 whatever the model dtype: grouped routing's gate and correction bias
    (DeepSeek-V3 keeps them in fp32; in bf16 the bias's small differences would flip choices)."""
    return ("router", ROUTER_CORRECTION) if model.grouped_routing is not None else ()


def expert_names(model: ModelSpec) -> tuple[str, ...]:
    """One MoE layer's expert tensors: the projections, and their biases with model.expert_bias."""
    return EXPERT_WEIGHTS + (EXPERT_BIASES if model.expert_bias else ())


def slice_f(name: str, t, f_cols: tuple[int, int] | None, expert_axis: bool = True):
    """The columns f_cols of F of per-expert tensor `name` (t [E, ...], or one expert's slice when
    not `expert_axis`); b_down kept whole by the shard of F's first column, zeros elsewhere."""
    if f_cols is None:
        return t
    a, b = f_cols
    if name == "b_down":
        return t if a == 0 else t.new_zeros(t.shape)
    axis = F_AXIS[name] - (0 if expert_axis else 1)
    return t.narrow(axis, a, b - a)


def shared_expert_names(model: ModelSpec) -> tuple[str, ...]:
    gate = (SHARED_EXPERT_GATE,) if model.shared_expert_gate else ()
    return SHARED_EXPERT + gate if model.shared_expert_size else ()


def router_names(model: ModelSpec) -> tuple[str, ...]:
    """One layer's router tensors: the gate, and grouped routing's correction bias."""
    return (("router",) + (("router_bias",) if model.router_bias else ())
            + ((ROUTER_CORRECTION,) if model.grouped_routing is not None else ()))


def attention_tensors(qk_norm: str, biased: tuple[str, ...]) -> tuple[str, ...]:
    """The attention tensors of a layer with this q/k norm and these biased projections (of q, k, v, o)."""
    return ATTENTION + (QK_NORMS if qk_norm != "none" else ()) + tuple(f"b{p}" for p in biased)


def weight_key(name: str, layer: int | None) -> str:
    """The key of tensor `name` of `layer` (None: shared, or the block) in a weights dict."""
    return name if layer is None or name in SHARED else f"layers.{layer}.{name}"


def model_layers(model: ModelSpec) -> list[int | None]:
    """The layer indices per-layer tensors carry: 0..L-1, or [None] for the block."""
    return list(range(model.layers)) if model.layered else [None]


def moe_layers(model: ModelSpec) -> list[int | None]:
    """The layers with routed experts (all but the dense ones)."""
    return [layer for layer in model_layers(model) if not model.is_dense(layer)]


def full_shape(model: ModelSpec, name: str) -> tuple[int, ...]:
    """The unsharded shape of tensor `name` in the engine's layout."""
    h, f, e, v = model.hidden_size, model.ffn_hidden_size, model.num_experts, model.vocab_size
    q, kv = model.heads * model.head_size, model.kv_heads * model.head_size
    norm_width = {"per_head": model.head_size, "full": None}.get(model.qk_norm)
    shapes = {"embed": (v, h), "norm_in": (h,), "router": (h, e), "w_gate": (e, h, f),
              "w_up": (e, h, f), "w_down": (e, f, h), "norm_out": (h,), "out": (h, v),
              "attn_norm": (h,), "wq": (h, q), "wk": (h, kv), "wv": (h, kv), "wo": (q, h),
              "q_norm": (norm_width or q,), "k_norm": (norm_width or kv,),
              "bq": (q,), "bk": (kv,), "bv": (kv,), "bo": (h,)}
    if model.mla is not None:
        shapes.update(_mla_shapes(model))
    shapes[ROUTER_CORRECTION] = shapes["router_bias"] = (e,)
    shapes.update(sinks=(model.heads,), b_gate=(e, f), b_up=(e, f), b_down=(e, h))
    s, d = model.shared_expert_size, model.dense_ffn_size
    shapes.update(ws_gate=(h, s), ws_up=(h, s), ws_down=(s, h), wd_gate=(h, d), wd_up=(h, d), wd_down=(d, h))
    shapes[SHARED_EXPERT_GATE] = (h, 1)
    return shapes[name]


def _mla_shapes(model: ModelSpec) -> dict[str, tuple[int, ...]]:
    m, h, n = model.mla, model.hidden_size, model.heads
    return {"wkv_a": (h, m.latent_width), "kv_a_norm": (m.kv_lora_rank,),
            "wkv_b": (m.kv_lora_rank, n * (m.qk_nope_head_dim + m.v_head_dim)), "wo": (n * m.v_head_dim, h),
            "wq": (h, n * m.qk_head_dim), "wq_a": (h, m.q_lora_rank), "q_a_norm": (m.q_lora_rank,),
            "wq_b": (m.q_lora_rank, n * m.qk_head_dim)}


class LayerWeights(Mapping):
    """A rank's weights as layer `layer` sees them (see the module docstring)."""

    def __init__(self, weights: Mapping[str, Any], layer: int | None):
        self.weights, self.layer = weights, layer

    def __getitem__(self, name: str) -> Any:
        return self.weights[weight_key(name, self.layer)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and weight_key(name, self.layer) in self.weights

    def __iter__(self) -> Iterator[str]:
        prefix = f"layers.{self.layer}."
        for key in self.weights:
            if key.startswith("layers."):
                if key.startswith(prefix):
                    yield key[len(prefix):]
            else:
                yield key

    def __len__(self) -> int:
        return sum(1 for _ in self)
