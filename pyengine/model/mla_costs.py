"""The roofline kernels of one layer's multi-head latent attention (pyengine.model.attention_mla) on
t rows that attend `attended` query-key pairs and read `keys` cached rows.

A prefill decompresses the cached latents it reads (kv_b over every key row) and attends per head
over nope + rope (scores) and v (values); a decode group stays in the latent (absorbed): q_nope goes
through W_UK (heads x nope x kv_lora per row), the scores span kv_lora + rope and the values kv_lora,
every cached row is read once for all heads, and W_UV maps the latent output back (heads x kv_lora x v).
"""

from __future__ import annotations

from pyengine.model.costs import KernelCost, KernelKind


def mla_kernels(model, t: float, attended: float, keys: float, es: int, decode: bool) -> list[KernelCost]:
    m, h, n = model.mla, model.hidden_size, model.heads
    q_width = n * m.qk_head_dim
    q = ([KernelCost.gemm("q_a_gemm", t, m.q_lora_rank, h, es), KernelCost.memory("q_a_norm", 2 * t * m.q_lora_rank * es),
          KernelCost.gemm("q_b_gemm", t, q_width, m.q_lora_rank, es)] if m.q_lora_rank is not None
         else [KernelCost.gemm("q_gemm", t, q_width, h, es)])
    latent = [KernelCost.gemm("kv_a_gemm", t, m.latent_width, h, es),
              KernelCost.memory("kv_norm_rope_cache_write", 2 * t * m.latent_width * es + 2 * t * q_width * es)]
    if decode:
        core = [
            KernelCost("q_absorb", 2.0 * t * n * m.qk_nope_head_dim * m.kv_lora_rank,
                       (t * n * (m.qk_nope_head_dim + m.kv_lora_rank) + m.kv_lora_rank * n * m.qk_nope_head_dim) * es,
                       KernelKind.GEMM, t),
            KernelCost("attention", 2.0 * n * (m.latent_width + m.kv_lora_rank) * attended,
                       (2 * t * n * m.latent_width + keys * m.latent_width) * es, KernelKind.GEMM, t),
            KernelCost("out_unabsorb", 2.0 * t * n * m.kv_lora_rank * m.v_head_dim,
                       (t * n * (m.kv_lora_rank + m.v_head_dim) + m.kv_lora_rank * n * m.v_head_dim) * es,
                       KernelKind.GEMM, t),
        ]
    else:
        core = [
            KernelCost.gemm("kv_b_gemm", keys, n * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank, es),
            KernelCost("attention", 2.0 * n * (m.qk_head_dim + m.v_head_dim) * attended,
                       (2 * t * q_width + keys * n * (m.qk_head_dim + m.v_head_dim)) * es, KernelKind.GEMM, t),
        ]
    return q + latent + core + [KernelCost.gemm("o_gemm", t, h, n * m.v_head_dim, es)]


def mla_working_set(model, t: int, es: int) -> int:
    """Bytes of one chunk's MLA activations on the attention GPU (q, latent, absorbed q, outputs)."""
    m, n = model.mla, model.heads
    return t * (model.hidden_size + 2 * n * m.qk_head_dim + m.latent_width
                + n * (m.latent_width + m.kv_lora_rank + m.v_head_dim)) * es
