"""What a model family is to the engine: the one object the config reader, the checkpoint loader
and the spec builder ask about a `model_type` (its key names, tensor names and layouts, which
layers are dense, its routing and attention variants). Nothing outside pyengine.model.families
branches on a family's name.

A family is an instance of `Family` (the common Mixtral-like layout) or of a subclass overriding
the hooks below; each lives in its own module, registered in pyengine.model.families.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Family:
    """How one model_type names its MoE sizes and tensors, and which variants it uses."""

    model_type: str
    experts_key: str
    """Its config key for E (transformers maps num_experts <-> num_local_experts, so a saved
    config may carry the other one: both are read, see hf_config.EXPERT_KEYS)."""
    ffn_key: str
    moe_module: str
    """The MoE block under `model.layers.{N}.`: block_sparse_moe (Mixtral) or mlp."""
    projections: tuple[str, str, str]
    """Per-expert linear names for (gate, up, down)."""
    eps_default: float
    """transformers' rms_norm_eps default for the family (used when config.json omits it)."""
    always_renormalize: bool = False
    """Mixtral has no norm_topk_prob: it always renormalises the top-k weights."""
    qk_norm: str = "none"
    """The attention's q/k RMSNorm: none (Mixtral), per_head (Qwen3-MoE), full (OLMoE)."""
    rope_theta_default: float = 10000.0
    has_bias_option: bool = False
    """Its config has attention_bias (q/k/v/o projection biases)."""
    renormalize_default: bool = False
    """norm_topk_prob when config.json omits it (transformers' default for the family)."""
    window_switch: bool = False
    """use_sliding_window switches its window (Qwen); else a set sliding_window applies (Mixtral)."""
    reads_shared_experts: bool = False
    """Its hooks read the shared-expert keys; for a family without, a set one is refused."""

    # ---- hooks: the common layout; a family with more parts overrides them ----------------------
    def hf_fields(self, cfg: dict[str, Any], get, num_experts: int) -> dict[str, Any]:
        """HFModel fields beyond the common ones (refusing, in one line, what it does not support)."""
        return {}

    def dense_layers(self, cfg: dict[str, Any], get, num_layers: int) -> tuple[int, ...]:
        """Layers whose MLP is dense (no router, no experts)."""
        return ()

    def tensor_names(self, hf, layer: int) -> dict[str, str]:
        """Engine name -> HF name of layer `layer`'s tensors beyond (or replacing) the common ones."""
        return {}

    def expert_names(self, hf, layer: int, expert: int) -> dict[str, str]:
        """HF tensor names of one expert's w_gate, w_up, w_down (stored [out, in])."""
        from pyengine.model.tensors import PER_EXPERT

        moe = f"model.layers.{layer}.{self.moe_module}.experts.{expert}"
        return {engine: f"{moe}.{hf_name}.weight" for engine, hf_name in zip(PER_EXPERT, self.projections)}

    def fix_layout(self, hf, name: str, t):
        """Engine tensor `name` ([in, out]) in the engine's column order."""
        return t


def sparse_step_dense_layers(cfg: dict[str, Any], get, num_layers: int) -> tuple[int, ...]:
    """Qwen's rule: layer i is dense when listed in mlp_only_layers or when (i + 1) is not a
    multiple of decoder_sparse_step; the indices in range and the last layer MoE (the engine's
    output stage adds its experts)."""
    from pyengine.core.errors import InputError

    step = get.integer("decoder_sparse_step", 1)
    only = cfg.get("mlp_only_layers") or []
    if not isinstance(only, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in only):
        raise InputError(f"{get.src}: mlp_only_layers", only, "must be a list of layer indices")
    if any(not 0 <= i < num_layers for i in only):
        raise InputError(f"{get.src}: mlp_only_layers", only, f"must be a list of layer indices in [0, {num_layers})")
    dense = tuple(i for i in range(num_layers) if i in only or (i + 1) % step != 0)
    if num_layers - 1 in dense:
        key, value = ("mlp_only_layers", only) if num_layers - 1 in only else ("decoder_sparse_step", step)
        raise InputError(f"{get.src}: {key}", value, f"makes the last layer ({num_layers - 1}) dense; the engine "
                                                     "needs it MoE")
    return dense


def dense_mlp_names(layer: int) -> dict[str, str]:
    """A dense layer's MLP under `model.layers.{layer}.mlp` (gate_proj, up_proj, down_proj)."""
    return {f"wd_{p}": f"model.layers.{layer}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
