"""The semantic rules a deployment spec must satisfy (types are the parser's job).

Each rule raises SpecError naming the dotted field path, the value and the rule.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol

from pyengine.core.dtypes import MODEL_DTYPES
from pyengine.core.errors import SpecError
from pyengine.core.limits import (MAX_EXPERTS, MAX_INT, MAX_LAYERS, MAX_TIMEOUT_S, MIN_TIMEOUT_S,
                                   TIMEOUT_WHY, check_number)



class DeploymentSpec(Protocol):
    """What the rules read of a spec (pyengine.core.spec.DeploymentSpec, which calls them):
    a protocol, so this module does not import the one that imports it, even for types."""

    model: Any
    hardware: Any
    parallel: Any
    schedule: Any
    comm: Any

    def ffn_shards(self) -> list[tuple[int, int, int]]: ...

    def mlp_shards(self, size: int) -> list[tuple[int, int, int]]: ...

STAGE_NAMES = ("embed", "experts", "output")
INTERCONNECTS = ("nvlink", "pcie")
SCHEDULE_KINDS = ("gpipe", "asready")
BOUNDARIES = ("all_reduce", "reduce_scatter", "partials")
PARALLEL_MODES = ("tensor", "expert")
MLP_PLACEMENTS = ("attention", "experts")


def _positive(path: str, value: float) -> None:
    if not value > 0:  # `not >` so that a NaN (from Python code) is refused too
        raise SpecError(path, value, "must be > 0")


def _numbers(obj: Any, path: str):
    """(dotted path, value) of every number in a spec, nested sections and lists included:
    a field added later (by any rule's author) is bounded without a line here."""
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from _numbers(getattr(obj, f.name), f"{path}.{f.name}" if path else f.name)
    elif isinstance(obj, (tuple, list)):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


def _sane_numbers(spec: DeploymentSpec) -> None:
    """Every float finite (1e400 in JSON reads as Infinity), every int a 32-bit count."""
    for path, v in _numbers(spec, ""):
        if isinstance(v, float) and not math.isfinite(v):
            raise SpecError(path, v, "must be a finite number (NaN and Infinity are refused)")
        if isinstance(v, int) and not -MAX_INT <= v <= MAX_INT:
            raise SpecError(path, v, f"is out of range: integers in a spec are within ±{MAX_INT} "
                                     "(32-bit counts)")


def _one_of(path: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SpecError(path, value, f"must be one of {list(choices)}")


def validate(spec: DeploymentSpec) -> None:
    _sane_numbers(spec)
    hw, m = spec.hardware, spec.model
    _positive("hardware.num_gpus", hw.num_gpus)
    _positive("hardware.gpu_memory_gb", hw.gpu_memory_gb)
    _one_of("hardware.interconnect", hw.interconnect, INTERCONNECTS)
    for name in ("batch_size", "seq_len", "hidden_size", "ffn_hidden_size", "num_experts",
                 "top_k", "vocab_size"):
        _positive(f"model.{name}", getattr(m, name))
    _positive("model.norm_eps", m.norm_eps)
    if m.num_experts > MAX_EXPERTS:
        raise SpecError("model.num_experts", m.num_experts, f"must be <= {MAX_EXPERTS} (published MoE "
                                                            "models have at most a few hundred)")
    if m.top_k > m.num_experts:
        raise SpecError("model.top_k", m.top_k, f"must be <= model.num_experts ({m.num_experts})")
    _one_of("model.dtype", m.dtype, MODEL_DTYPES)
    _validate_layers(m)
    _validate_stages(spec)
    _validate_placement(spec)
    s = spec.schedule
    _one_of("schedule.kind", s.kind, SCHEDULE_KINDS)
    _positive("schedule.micro_batches", s.micro_batches)
    if s.micro_batches > m.tokens:
        raise SpecError("schedule.micro_batches", s.micro_batches,
                        f"must be <= the token count batch_size*seq_len ({m.tokens}): "
                        "every micro-batch needs at least one token")
    _one_of("comm.boundary", spec.comm.boundary, BOUNDARIES)
    _positive("comm.timeout_s", spec.comm.timeout_s)
    check_number("comm.timeout_s", spec.comm.timeout_s, lo=MIN_TIMEOUT_S, hi=MAX_TIMEOUT_S,
                 error=SpecError, why=TIMEOUT_WHY)
    if m.tokens > MAX_INT:
        raise SpecError("model.batch_size", m.batch_size,
                        f"batch_size*seq_len = {m.tokens} tokens is beyond a 32-bit index ({MAX_INT})")


def _validate_parts(m) -> None:
    """The optional family parts (pyengine.core.spec_parts) check their own numbers."""
    if m.mla is not None:
        if m.num_layers is None:
            raise SpecError("model.mla", "...", "needs model.num_layers (the block has no attention)")
        for key in ("num_key_value_heads", "head_dim", "qk_norm"):
            if getattr(m, key) not in (None, "none"):
                raise SpecError(f"model.{key}", getattr(m, key), "must stay unset with model.mla (MLA has "
                                                                 "no kv heads, no head_dim and no q/k norm)")
        if m.biased:
            key = "attention_bias" if m.attention_bias else "bias_projections"
            raise SpecError(f"model.{key}", getattr(m, key), "MLA's projections carry no bias in this engine")
        m.mla.check("model.mla")
    if m.rope_scaling is not None:
        m.rope_scaling.check("model.rope_scaling")
        if m.mla is None and m.rope_scaling.mscale_all_dim:
            raise SpecError("model.rope_scaling.mscale_all_dim", m.rope_scaling.mscale_all_dim,
                            "scales MLA's softmax only; must be 0 with GQA attention")
    if isinstance(m.shared_expert_size, bool) or m.shared_expert_size < 0:
        raise SpecError("model.shared_expert_size", m.shared_expert_size, "must be an integer >= 0 (0: none)")
    if m.dense_layers is not None:
        _validate_dense(m)
    if m.shared_expert_size and not m.layered:
        raise SpecError("model.shared_expert_size", m.shared_expert_size, "needs model.num_layers")
    if m.shared_expert_gate and not m.shared_expert_size:
        raise SpecError("model.shared_expert_gate", True, "needs a shared expert (model.shared_expert_size > 0)")
    if m.bias_projections is not None:
        _validate_biases(m)
    if m.grouped_routing is not None:
        m.grouped_routing.check("model.grouped_routing", m.num_experts, m.top_k)
    if m.clamped_swiglu is not None:
        m.clamped_swiglu.check("model.clamped_swiglu")
    _validate_attention_variants(m)


LAYER_TYPES = ("full", "sliding")


def _validate_attention_variants(m) -> None:
    """Attention sinks and sliding windows (gpt-oss): GQA attention of a model with layers."""
    used = [k for k in ("attention_sinks", "sliding_window", "layer_types") if getattr(m, k) not in (None, False)]
    if used and not m.layered:
        raise SpecError(f"model.{used[0]}", getattr(m, used[0]), "needs model.num_layers (the block has no attention)")
    if used and m.mla is not None:
        raise SpecError(f"model.{used[0]}", getattr(m, used[0]), "is not supported with model.mla")
    if m.sliding_window is not None:
        _positive("model.sliding_window", m.sliding_window)
    if m.layer_types is None:
        return
    if m.sliding_window is None:
        raise SpecError("model.layer_types", list(m.layer_types), "needs model.sliding_window (the sliding layers' window)")
    if len(m.layer_types) != m.num_layers:
        raise SpecError("model.layer_types", list(m.layer_types), f"needs one entry per layer ({m.num_layers})")
    for i, kind in enumerate(m.layer_types):
        _one_of(f"model.layer_types[{i}]", kind, LAYER_TYPES)


BIAS_SETS = (("o",), ("q", "k", "v"), ("q", "k", "v", "o"))
"""The biased projections the engine runs: q, k and v together (one bias on the fused QKV GEMM)."""


def _validate_biases(m) -> None:
    got = tuple(m.bias_projections)
    if got not in BIAS_SETS:
        raise SpecError("model.bias_projections", list(got), f"must be one of {[list(b) for b in BIAS_SETS]} "
                                                             "(q, k and v carry a bias together, in that order)")
    if m.attention_bias and got != BIAS_SETS[-1]:
        raise SpecError("model.bias_projections", list(got), "disagrees with model.attention_bias = true "
                                                             "(every projection); leave one of them out")


def _validate_dense(m) -> None:
    if not m.layered:
        raise SpecError("model.dense_layers", list(m.dense_layers), "needs model.num_layers")
    for i, layer in enumerate(m.dense_layers):
        if not 0 <= layer < m.num_layers - 1:
            raise SpecError(f"model.dense_layers[{i}]", layer, f"must lie in [0, {m.num_layers - 1}) (the last "
                                                               "layer is MoE: the output stage adds its experts)")
    if len(set(m.dense_layers)) != len(m.dense_layers):
        raise SpecError("model.dense_layers", list(m.dense_layers), "names a layer twice")
    if m.dense_layers and (isinstance(m.dense_ffn_size, bool) or m.dense_ffn_size < 1):
        raise SpecError("model.dense_ffn_size", m.dense_ffn_size, "must be a positive integer with dense layers")


QK_NORMS = ("none", "per_head", "full")
ATTENTION_KEYS = ("num_attention_heads", "num_key_value_heads", "head_dim", "max_positions")


def _validate_layers(m) -> None:
    """A model of decoder layers needs its attention shape; the block takes none of it."""
    _one_of("model.qk_norm", m.qk_norm, QK_NORMS)
    if m.num_layers is None:
        for key in ATTENTION_KEYS:
            if getattr(m, key) is not None:
                raise SpecError(f"model.{key}", getattr(m, key),
                                "needs model.num_layers (the attention-free block has no attention)")
        if m.qk_norm != "none" or m.biased:
            key = "qk_norm" if m.qk_norm != "none" else "attention_bias" if m.attention_bias else "bias_projections"
            raise SpecError(f"model.{key}", getattr(m, key), "needs model.num_layers")
    else:
        _positive("model.num_layers", m.num_layers)
        if m.num_layers > MAX_LAYERS:
            raise SpecError("model.num_layers", m.num_layers, f"must be <= {MAX_LAYERS} (the deepest "
                                                              "published models have about 130)")
        if m.num_attention_heads is None:
            raise SpecError("model.num_attention_heads", None, "is required with model.num_layers")
        _positive("model.num_attention_heads", m.num_attention_heads)
        for key in ("num_key_value_heads", "head_dim", "max_positions"):
            if getattr(m, key) is not None:
                _positive(f"model.{key}", getattr(m, key))
        if m.heads % m.kv_heads:
            raise SpecError("model.num_key_value_heads", m.kv_heads,
                            f"must divide model.num_attention_heads ({m.heads}): each kv head serves "
                            "a whole group of query heads")
        if m.head_size < 2 or m.head_size % 2:
            key = "head_dim" if m.head_dim is not None else "num_attention_heads"
            raise SpecError(f"model.{key}", getattr(m, key),
                            f"gives head_dim {m.head_size}: RoPE rotates pairs, so it must be even and >= 2")
        _positive("model.rope_theta", m.rope_theta)
        if m.max_positions is not None and m.seq_len > m.max_positions:
            raise SpecError("model.seq_len", m.seq_len,
                            f"exceeds model.max_positions ({m.max_positions})")
    _validate_parts(m)
    for i, e in enumerate(m.eos_token_ids or ()):
        if isinstance(e, bool) or not isinstance(e, int) or e < 0:
            raise SpecError(f"model.eos_token_ids[{i}]", e, "must be a token id (a non-negative integer)")


def _validate_stages(spec: DeploymentSpec) -> None:
    stages, ngpu = spec.parallel.stages, spec.hardware.num_gpus
    names = tuple(s.name for s in stages)
    if names != STAGE_NAMES:
        raise SpecError("parallel.stages", list(names),
                        f"must be exactly the stages {list(STAGE_NAMES)} in this order")
    for i, st in enumerate(stages):
        p = f"parallel.stages[{i}]"
        for g in st.gpus:
            if not 0 <= g < ngpu:
                raise SpecError(f"{p}.gpus", list(st.gpus),
                                f"GPU {g} does not exist (hardware.num_gpus = {ngpu})")
        if len(set(st.gpus)) != len(st.gpus):
            raise SpecError(f"{p}.gpus", list(st.gpus), "a GPU appears twice in one stage")
        _one_of(f"{p}.parallel_mode", st.parallel_mode, PARALLEL_MODES)
        if st.name != "experts":
            _single_gpu_stage(p, st)
        elif st.parallel_mode == "expert":
            _expert_parallel_stage(spec, p, st)
        else:
            _tensor_parallel_stage(spec, p, st)


def _validate_placement(spec: DeploymentSpec) -> None:
    """The dense MLPs on the expert GPUs: there must be one, and every GPU a column of each."""
    m, path, where = spec.model, "parallel.dense_mlp_placement", spec.parallel.dense_mlp_placement
    _one_of(path, where, MLP_PLACEMENTS)
    if where == "attention":
        return
    sizes = {"shared_expert_size": m.shared_expert_size, "dense_ffn_size": m.dense_ffn_size if m.dense_layers else 0}
    if not any(sizes.values()):
        raise SpecError(path, where, "needs a model with a shared expert (model.shared_expert_size) or dense "
                                     "layers (model.dense_layers): nothing to place")
    for key, size in sizes.items():
        for rank, a, b in spec.mlp_shards(size) if size else ():
            if b <= a:
                raise SpecError(path, where, f"gives GPU {rank} no column of model.{key} ({size}): fewer "
                                             "columns than expert GPUs, or a shard fraction too small")


def _single_gpu_stage(p: str, st) -> None:
    if st.tensor_parallel_size != len(st.gpus):
        raise SpecError(f"{p}.tensor_parallel_size", st.tensor_parallel_size,
                        f"must equal the number of GPUs in the stage ({len(st.gpus)})")
    if len(st.gpus) != 1:
        raise SpecError(f"{p}.gpus", list(st.gpus),
                        f"stage {st.name!r} runs on one GPU (only 'experts' is parallel)")
    for key, default in (("shard_fractions", None), ("parallel_mode", "tensor"), ("expert_ids", None)):
        if getattr(st, key) != default:
            raise SpecError(f"{p}.{key}", getattr(st, key), "only the 'experts' stage is sharded")


def _tensor_parallel_stage(spec: DeploymentSpec, p: str, st) -> None:
    if st.expert_ids is not None:  # first: the user meant expert mode, whatever the TP size says
        raise SpecError(f"{p}.expert_ids", st.expert_ids, 'needs "parallel_mode": "expert"')
    if st.tensor_parallel_size != len(st.gpus):
        raise SpecError(f"{p}.tensor_parallel_size", st.tensor_parallel_size,
                        f"must equal the number of GPUs in the stage ({len(st.gpus)})")
    fr = st.shard_fractions
    if fr is None:
        if spec.model.ffn_hidden_size < len(st.gpus):
            raise SpecError(f"{p}.tensor_parallel_size", st.tensor_parallel_size,
                            f"exceeds model.ffn_hidden_size ({spec.model.ffn_hidden_size})")
        return
    if len(fr) != len(st.gpus):
        raise SpecError(f"{p}.shard_fractions", list(fr), f"needs one fraction per GPU ({len(st.gpus)})")
    if any(f <= 0 for f in fr):
        raise SpecError(f"{p}.shard_fractions", list(fr), "every fraction must be > 0")
    if abs(sum(fr) - 1.0) > 1e-6:
        raise SpecError(f"{p}.shard_fractions", list(fr),
                        f"must sum to 1 so the shards cover F exactly (sum = {sum(fr):.6g})")
    for rank, a, b in spec.ffn_shards():
        if b <= a:
            raise SpecError(f"{p}.shard_fractions", list(fr),
                            f"GPU {rank} gets no column of F={spec.model.ffn_hidden_size}")


def _expert_parallel_stage(spec: DeploymentSpec, p: str, st) -> None:
    e = spec.model.num_experts
    if st.tensor_parallel_size != 1:
        raise SpecError(f"{p}.tensor_parallel_size", st.tensor_parallel_size,
                        "must be 1 (or absent) in expert mode: every GPU holds whole experts")
    if st.shard_fractions is not None:
        raise SpecError(f"{p}.shard_fractions", list(st.shard_fractions),
                        "splits F in tensor mode only; expert mode places whole experts (expert_ids)")
    if st.expert_ids is None:
        if e < len(st.gpus):
            raise SpecError(f"{p}.gpus", list(st.gpus),
                            f"more GPUs than experts (model.num_experts = {e}): one would hold none")
        return
    ids = st.expert_ids
    if len(ids) != len(st.gpus):
        raise SpecError(f"{p}.expert_ids", ids, f"needs one list per GPU of the stage ({len(st.gpus)})")
    seen: dict[int, int] = {}
    for gpu, held in zip(st.gpus, ids):
        if not held:
            raise SpecError(f"{p}.expert_ids", ids, f"GPU {gpu} holds no experts: give it some, or take it "
                                                    f"out of {p}.gpus")
        for x in held:
            if not 0 <= x < e:
                raise SpecError(f"{p}.expert_ids", ids,
                                f"expert {x} does not exist (model.num_experts = {e})")
            if x in seen:
                where = f"on GPU {gpu}" if seen[x] == gpu else f"(GPUs {seen[x]} and {gpu})"
                raise SpecError(f"{p}.expert_ids", ids, f"expert {x} is placed twice {where}")
            seen[x] = gpu
    missing = sorted(set(range(e)) - set(seen))
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise SpecError(f"{p}.expert_ids", ids, f"experts [{shown}] are placed on no GPU")
