"""Exact work and traffic of the model (DESIGN.md): FLOPs per stage and shard, message bytes.

A multiply-add counts as 2 FLOPs. Element-wise work (norms, softmax, SwiGLU) is not
counted as FLOPs; it shows up in the planner as memory traffic instead.
"""

from __future__ import annotations

from pyengine.spec import DeploymentSpec, near_even_split

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
ROUTING_ID_BYTES = 4  # top-k expert ids travel as int32
ROUTING_WEIGHT_BYTES = 4  # top-k weights travel as fp32 (renormalised in fp32)


def elem_bytes(spec: DeploymentSpec) -> int:
    return DTYPE_BYTES[spec.model.dtype]


def stage0_flops(spec: DeploymentSpec, tokens: int) -> float:
    """Router GEMM [T, H] @ [H, E]; the embedding is a gather (no FLOPs)."""
    m = spec.model
    return 2.0 * tokens * m.hidden_size * m.num_experts


def expert_flops(spec: DeploymentSpec, tokens: int, f_cols: int) -> float:
    """One TP shard with f_cols of F: gate + up ([H, F_r] each) and down ([F_r, H]) per (token, expert) pair."""
    m = spec.model
    return 6.0 * tokens * m.top_k * m.hidden_size * f_cols


def stage2_flops(spec: DeploymentSpec, tokens: int) -> float:
    """Output head [T, H] @ [H, V]."""
    m = spec.model
    return 2.0 * tokens * m.hidden_size * m.vocab_size


def shard_cols(spec: DeploymentSpec) -> dict[int, int]:
    """F columns held by each experts-stage rank."""
    return {rank: end - start for rank, start, end in spec.ffn_shards()}


def rank_flops(spec: DeploymentSpec, tokens: int | None = None) -> dict[int, float]:
    """FLOPs per rank for `tokens` tokens (default: one whole batch)."""
    t = spec.model.tokens if tokens is None else tokens
    out = {r: 0.0 for r in spec.ranks}
    out[spec.stage("embed").gpus[0]] += stage0_flops(spec, t)
    for rank, cols in shard_cols(spec).items():
        out[rank] += expert_flops(spec, t, cols)
    out[spec.stage("output").gpus[0]] += stage2_flops(spec, t)
    return out


def payload_bytes(spec: DeploymentSpec, payload: str, tokens: int, part: int = 0) -> int:
    """Bytes of one message of `payload` for a micro-batch of `tokens` tokens.

    act: u [T, H] + top-k ids and weights; resid: x [T, H]; partial/sum: [T, H];
    half: this group member's token chunk of the reduce-scatter output.
    """
    m, es = spec.model, elem_bytes(spec)
    if payload == "act":
        return tokens * (m.hidden_size * es + m.top_k * (ROUTING_ID_BYTES + ROUTING_WEIGHT_BYTES))
    if payload in ("resid", "partial", "sum"):
        return tokens * m.hidden_size * es
    if payload == "half":
        group = len(spec.stage("experts").gpus)
        return near_even_split(tokens, group)[part] * m.hidden_size * es
    raise ValueError(f"payload = {payload!r}: unknown payload")
