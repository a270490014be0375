"""A Hugging Face `config.json` read as one of the MoE families the engine runs, and the deployment
spec that follows from it. What differs between families (key names, tensor names and layouts,
dense layers, routing and attention variants) is each family's, in pyengine.model.families; this
module reads the keys they share and asks the family for the rest. Nothing here reads a tensor;
`pyengine.model.checkpoint` does.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from importlib import resources
from typing import Any

from pyengine.core.dtypes import MODEL_DTYPES, nbytes
from pyengine.core.errors import InputError, SpecError
from pyengine.core.spec import DeploymentSpec, biased_projections
from pyengine.core.spec_parse import parse_json
from pyengine.model.families import FAMILIES, REFUSED, Family
from pyengine.model.hf_attention import attention_fields

CONFIG_NAME = "config.json"


EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
SHARED_EXPERT_KEYS = ("shared_expert_intermediate_size", "n_shared_experts", "num_shared_experts")

SPEC_FIELDS = ("hidden_size", "ffn_hidden_size", "num_experts", "top_k", "vocab_size", "dtype",
               "norm_eps", "renormalize", "grouped_routing", "router_bias", "expert_bias", "clamped_swiglu")
"""The spec's model fields a checkpoint fixes (the rest of the spec is the user's choice)."""
WHOLE_MODEL_FIELDS = ("num_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                      "rope_theta", "qk_norm", "attention_bias", "max_positions", "eos_token_ids",
                      "mla", "rope_scaling", "shared_expert_size", "dense_layers", "dense_ffn_size",
                      "bias_projections", "shared_expert_gate", "attention_sinks", "sliding_window", "layer_types")
"""The further fields it fixes for the whole model (every decoder layer with its attention)."""
NOT_IN_LOGITS = ("dtype", "max_positions", "eos_token_ids")
"""Fixed fields a spec may set otherwise when running the checkpoint: the weights are cast to the
spec's dtype; positions and end-of-sequence ids bound generation, not the logits."""


@dataclass(frozen=True, slots=True)
class HFModel:
    """One config.json, read: the sizes the spec takes and what the loader needs to find tensors."""

    source: str
    """The config.json it came from (named in errors)."""
    family: str
    name: str
    hidden_size: int
    ffn_hidden_size: int
    num_experts: int
    top_k: int
    vocab_size: int
    dtype: str
    norm_eps: float
    renormalize: bool
    num_layers: int
    tie_word_embeddings: bool
    dense_layers: tuple[int, ...] = ()
    """Layers whose MLP is dense, not MoE (Qwen3-MoE's mlp_only_layers / decoder_sparse_step)."""
    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    head_dim: int = 0
    rope_theta: float = 10000.0
    qk_norm: str = "none"
    attention_bias: bool = False
    max_positions: int | None = None
    eos_token_ids: tuple[int, ...] | None = None
    unsupported: tuple[str, Any, str] | None = None
    """Why the whole model cannot run (None when it can): (config key, value, rule)."""
    mla: Any = None  # MLASpec: DeepSeek-V3's latent attention (None: GQA)
    rope_scaling: Any = None  # YarnSpec (None: plain RoPE)
    grouped_routing: Any = None  # GroupedRoutingSpec: DeepSeek-V3's router (None: softmax top-k)
    rope_interleave: bool = False  # rotary columns stored as interleaved pairs (DeepSeek)
    shared_expert_size: int = 0  # the shared expert's inner size (0: none)
    dense_ffn_size: int = 0  # the dense layers' MLP inner size (0: they are refused in the whole model)
    bias_projections: tuple[str, ...] | None = None  # biased projections when not all four (Qwen2: q, k, v)
    shared_expert_gate: bool = False  # the shared expert scaled by sigmoid(u @ its gate) (Qwen2-MoE)
    attention_sinks: bool = False  # gpt-oss: a sink logit per head
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None  # "full" / "sliding" per layer (None: all one kind)
    router_bias: bool = False
    expert_bias: bool = False
    clamped_swiglu: Any = None  # ClampedSwiGLUSpec (None: silu(gate) * up)
    experts_mxfp4: bool = False  # the experts stored as MXFP4 blocks + scales (dequantized at load)

    @property
    def biased(self) -> tuple[str, ...]:
        """The projections of q, k, v, o that carry a bias."""
        return biased_projections(self.attention_bias, self.bias_projections)

    def model_fields(self, whole: bool = False) -> dict[str, Any]:
        """The spec's model-section values this config fixes: the block's, or with `whole`
        the whole model's (every layer with its attention)."""
        out = {k: getattr(self, k) for k in SPEC_FIELDS}
        if whole:
            out.update({k: getattr(self, k) for k in WHOLE_MODEL_FIELDS})
            if self.mla is not None:  # MLA has no kv heads or head_dim
                out.update(num_key_value_heads=None, head_dim=None)
            out["dense_layers"] = self.dense_layers or None
        return {k: _json(v) for k, v in out.items()}  # JSON values

    def check_whole(self) -> None:
        """Refuse, in one line, a model whose every layer the engine cannot run."""
        if self.unsupported is not None:
            key, value, rule = self.unsupported
            raise InputError(f"{self.source}: {key}", value, rule)
        if self.dense_layers and not self.dense_ffn_size:
            raise InputError(f"{self.source}: mlp_only_layers / decoder_sparse_step",
                             list(self.dense_layers),
                             "dense MLP layers are not supported in the whole model (one MoE layer runs: "
                             "--layer N, open_checkpoint(folder, layer=N))")

    def all_experts_bytes(self) -> int:
        """Weight bytes of the routed experts of every MoE layer (the bulk of the model)."""
        moe_layers = self.num_layers - len(self.dense_layers)
        return moe_layers * self.num_experts * 3 * self.hidden_size * self.ffn_hidden_size * nbytes(self.dtype)

    def config_key(self, spec_field: str) -> str:
        """The config.json key behind a spec field (for error messages)."""
        fam = self.fam
        return {"ffn_hidden_size": fam.ffn_key, "num_experts": fam.experts_key,
                "top_k": "num_experts_per_tok", "norm_eps": "rms_norm_eps",
                "renormalize": "norm_topk_prob", "dtype": "dtype", "num_layers": "num_hidden_layers",
                "max_positions": "max_position_embeddings", "eos_token_ids": "eos_token_id",
                "qk_norm": "model_type", "mla": "kv_lora_rank / q_lora_rank / qk_*_head_dim / v_head_dim",
                "grouped_routing": "n_group / topk_group / routed_scaling_factor",
                "bias_projections": "qkv_bias", "clamped_swiglu": "swiglu_alpha / swiglu_limit",
                "attention_sinks": "model_type", "router_bias": "model_type",
                "expert_bias": "model_type"}.get(spec_field, spec_field)

    def check_layer(self, layer: int) -> None:
        """Refuse a layer index that does not exist or whose MLP is dense."""
        if not 0 <= layer < self.num_layers:
            raise InputError("layer", layer, f"out of range: {self.source} has num_hidden_layers = "
                                               f"{self.num_layers} (layers 0..{self.num_layers - 1})")
        if self.shared_expert_size:
            raise InputError("layer", layer, "has shared experts beside the routed ones: run the whole model")
        if layer in self.dense_layers:
            raise InputError("layer", layer, "is a dense MLP layer in this model (mlp_only_layers / "
                                               "decoder_sparse_step), not an MoE layer")

    def tensor_names(self, layer: int) -> dict[str, str]:
        """HF tensor names of layer `layer`'s non-expert weights (attention, norms, router) and the
        shared embed, norm_out, out, by engine name."""
        moe = f"model.layers.{layer}.{self.fam.moe_module}"
        attn = f"model.layers.{layer}.self_attn"
        embed = "model.embed_tokens.weight"
        out = {"embed": embed, "norm_in": f"model.layers.{layer}.post_attention_layernorm.weight",
               "router": f"{moe}.gate.weight", "norm_out": "model.norm.weight",
               "out": embed if self.tie_word_embeddings else "lm_head.weight",
               "attn_norm": f"model.layers.{layer}.input_layernorm.weight",
               "q_norm": f"{attn}.q_norm.weight", "k_norm": f"{attn}.k_norm.weight"}
        for p in "qkvo":
            out[f"w{p}"] = f"{attn}.{p}_proj.weight"
            out[f"b{p}"] = f"{attn}.{p}_proj.bias"
        out.update(self.fam.tensor_names(self, layer))
        return out

    @property
    def fam(self) -> Family:
        """The family this config belongs to (pyengine.model.families)."""
        return FAMILIES[self.family]

    def fix_layout(self, name: str, t):
        """Engine tensor `name` ([in, out]) in the engine's column order (DeepSeek: rotary columns)."""
        return self.fam.fix_layout(self, name, t)

    def expert_names(self, layer: int, expert: int) -> dict[str, str]:
        """HF tensor names of one expert's w_gate, w_up, w_down (stored [out, in])."""
        return self.fam.expert_names(self, layer, expert)


def _json(v: Any) -> Any:
    import dataclasses

    return dataclasses.asdict(v) if dataclasses.is_dataclass(v) else list(v) if isinstance(v, tuple) else v


def config_path(path: str | os.PathLike) -> str:
    """`path` itself if it is a file, else `path/config.json`."""
    path = os.fspath(path)
    return os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path


def read_hf_config(path: str | os.PathLike) -> HFModel:
    """Read a config.json (or a model folder holding one) as a supported MoE family."""
    src = config_path(path)
    try:
        with open(src, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise InputError("hf config", src, f"cannot be read: {e.strerror}") from None
    data = parse_json(raw, src)
    if not isinstance(data, dict):
        raise InputError(src, data, "must be a JSON object (a Hugging Face config.json)")
    return from_dict(data, src)


def from_dict(cfg: dict[str, Any], src: str = CONFIG_NAME) -> HFModel:
    family = _family(cfg, src)
    fam = FAMILIES[family]
    get = _Getter(cfg, src)
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise InputError(f"{src}: hidden_act", act, "the expert FFN is SwiGLU: only 'silu' is supported")
    num_layers = get.integer("num_hidden_layers")
    renorm = True if fam.always_renormalize else get.flag("norm_topk_prob", fam.renormalize_default)
    hidden = get.integer("hidden_size")
    return HFModel(
        source=src, family=family, name=_name(cfg, src),
        hidden_size=hidden, ffn_hidden_size=get.integer(fam.ffn_key),
        num_experts=_num_experts(cfg, fam, get), top_k=get.integer("num_experts_per_tok"),
        vocab_size=get.integer("vocab_size"), dtype=_dtype(cfg, src),
        norm_eps=get.number("rms_norm_eps", fam.eps_default), renormalize=renorm,
        num_layers=num_layers, tie_word_embeddings=get.flag("tie_word_embeddings", False),
        dense_layers=fam.dense_layers(cfg, get, num_layers),
        **{**attention_fields(cfg, fam, get, hidden), **fam.hf_fields(cfg, get, _num_experts(cfg, fam, get))})




def _family(cfg: dict[str, Any], src: str) -> str:
    mt = cfg.get("model_type")
    if mt in REFUSED:
        raise InputError(f"{src}: model_type", mt, REFUSED[mt])
    if mt not in FAMILIES:
        raise InputError(f"{src}: model_type", mt, f"not a supported MoE family (one of {sorted(FAMILIES)})")
    for key in SHARED_EXPERT_KEYS:
        if cfg.get(key) and not FAMILIES[mt].reads_shared_experts:
            raise InputError(f"{src}: {key}", cfg[key], "shared experts are not supported yet")
    return mt


def _name(cfg: dict[str, Any], src: str) -> str:
    name = cfg.get("_name_or_path") or ""
    if isinstance(name, str) and name:
        return name
    return os.path.basename(os.path.dirname(os.path.abspath(src))) or cfg["model_type"]


def _dtype(cfg: dict[str, Any], src: str) -> str:
    """transformers 5 writes `dtype`, 4.x `torch_dtype`; absent means float32 (its default)."""
    key = "dtype" if cfg.get("dtype") is not None else "torch_dtype"
    value = cfg.get(key) or "float32"
    if value not in MODEL_DTYPES:
        raise InputError(f"{src}: {key}", value, f"must be one of {list(MODEL_DTYPES)}")
    return value


def _num_experts(cfg: dict[str, Any], fam: Family, get: _Getter) -> int:
    keys = [fam.experts_key, *(k for k in EXPERT_KEYS if k != fam.experts_key)]
    present = [k for k in keys if cfg.get(k) is not None]
    values = {k: get.integer(k) for k in present}
    if len(set(values.values())) > 1:
        raise InputError(f"{get.src}: {present[1]}", values[present[1]],
                         f"disagrees with {present[0]} = {values[present[0]]}")
    return values[present[0]] if present else get.integer(fam.experts_key)


class _Getter:
    """Typed reads of config keys: a missing or ill-typed key is one InputError naming it."""

    def __init__(self, cfg: dict[str, Any], src: str):
        self.cfg, self.src = cfg, src

    def _value(self, key: str, default: Any) -> Any:
        if key in self.cfg and self.cfg[key] is not None:
            return self.cfg[key]
        if default is None:
            raise InputError(f"{self.src}: {key}", None, "is required")
        return default

    def integer(self, key: str, default: int | None = None) -> int:
        v = self._value(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise InputError(f"{self.src}: {key}", v, "must be a positive integer")
        return v

    def number(self, key: str, default: float) -> float:
        return self.positive_number(key, self._value(key, default))

    def positive_number(self, key: str, v: Any) -> float:
        """`v`, read from `key` (a nested key's path too), as a positive float."""
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
            raise InputError(f"{self.src}: {key}", v, "must be a positive number")
        return float(v)

    def flag(self, key: str, default: bool) -> bool:
        v = self._value(key, default)
        if not isinstance(v, bool):
            raise InputError(f"{self.src}: {key}", v, "must be true or false")
        return v


def deployment_spec(hf: HFModel, config: str | os.PathLike | None = None,
                    whole: bool = False, batch: tuple[int, int] | None = None) -> DeploymentSpec:
    """The spec: model sizes, dtype, eps and routing from `hf` (with `whole`: every layer with
    its attention, else one MoE layer without it); layout, schedule and tokens per batch from
    `config` (default: the packaged seed). A `config` model field that disagrees with the
    checkpoint is a SpecError naming it; leaving those fields out is the usual way. `batch`
    (sequences, longest) sets batch_size and seq_len from prompts (a config giving them must agree)."""
    _check_args(hf, config, batch)
    if whole:
        hf.check_whole()
    if config is None:
        data = parse_json(resources.files("pyengine").joinpath("configs/seed_3gpu.json").read_text(),
                          "seed_3gpu.json")
    elif isinstance(config, dict):
        data = copy.deepcopy(config)
    else:
        data = _read_config(os.fspath(config))
    if isinstance(data, dict) and "model" not in data:  # a layout only: the checkpoint gives the model
        data["model"] = {}
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        raise SpecError("model", model, "must be a JSON object (batch_size, seq_len, ...)")
    for key, value in hf.model_fields(whole).items():
        if config is not None and key in model and model[key] != value:
            raise SpecError(f"model.{key}", model[key],
                            f"disagrees with the checkpoint ({hf.source}: {hf.config_key(key)} gives "
                            f"{value!r}); leave it out of the config or set it to {value!r}")
        model[key] = value
    if batch is not None:
        for key, value in zip(("batch_size", "seq_len"), batch):
            if config is not None and key in model and model[key] != value:
                raise SpecError(f"model.{key}", model[key], f"disagrees with the prompts ({value}); leave it out")
            model[key] = value
    return DeploymentSpec.from_dict(data)


def _check_args(hf: Any, config: Any, batch: Any) -> None:
    if not isinstance(hf, HFModel):
        hint = " (pass open_checkpoint(folder).hf or read_hf_config(folder))"
        raise InputError("hf", type(hf).__name__, f"must be a checkpoint's HFModel{hint}")
    if config is not None and not isinstance(config, (str, os.PathLike, dict)):
        raise InputError("config", type(config).__name__, "must be a JSON file's path, a dict or None")
    if batch is not None and (not isinstance(batch, (tuple, list)) or len(batch) != 2 or any(
            isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in batch)):
        raise InputError("batch", batch, "must be (sequences, longest): two positive integers")


def _read_config(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            return parse_json(f.read(), path)
    except OSError as e:
        raise SpecError("config", path, f"cannot be read: {e.strerror}") from None
