"""Shrinking the model for a CPU run: the seed (990 GFLOP per batch) is beyond a CPU's budget."""

from __future__ import annotations

from pyengine.core.spec import DeploymentSpec
from pyengine.model.stages import rank_flops

CPU_FLOP_BUDGET = 4e9  # per batch: keeps the CPU run (3 ranks x 3 variants) well under 60 s


def scale_for_cpu(spec: DeploymentSpec) -> tuple[DeploymentSpec, str]:
    """Shrink H, F and V by the smallest power of two that fits the CPU budget; fp32 on CPU.
    Returns (spec, note); note is '' when nothing changed."""
    m = spec.model
    total = sum(rank_flops(spec).values())
    d = 1
    while total / (d * d) > CPU_FLOP_BUDGET and min(m.hidden_size, m.ffn_hidden_size) // (2 * d) >= 16:
        d *= 2
    new = {"hidden_size": m.hidden_size // d, "ffn_hidden_size": m.ffn_hidden_size // d,
           "vocab_size": max(m.vocab_size // d, m.num_experts)}
    if m.layered and m.mla is not None:  # heads stay; MLA's widths narrow (the rotary one stays even)
        new["mla"] = {"q_lora_rank": m.mla.q_lora_rank and max(1, m.mla.q_lora_rank // d),
                      **{k: max(1, getattr(m.mla, k) // d) for k in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim")},
                      "qk_rope_head_dim": max(2, m.mla.qk_rope_head_dim // d // 2 * 2)}
    elif m.layered:  # heads and their grouping stay; each head narrows (RoPE needs an even d)
        new["head_dim"] = max(2, m.head_size // d // 2 * 2)
    if m.dtype != "float32":
        new["dtype"] = "float32"
    changed = {k: (_plain(getattr(m, k)), v) for k, v in new.items() if _plain(getattr(m, k)) != v}
    if not changed:
        return spec, ""
    what = ", ".join(f"{k} {a}→{b}" for k, (a, b) in changed.items())
    why = (f"the full size needs {total / 1e9:.3g} GFLOP per batch and this run's budget is "
           f"{CPU_FLOP_BUDGET / 1e9:.3g} GFLOP" if d > 1 else "the sizes fit")
    kept = "layers, heads, " if m.layered else ""
    note = (f"CPU backend: changed the model ({what}): {why}; fp32 because CPU bf16/fp16 GEMMs are "
            f"emulated. Tokens, {kept}experts, top-k and the layout are unchanged; --no-scale runs it as given.")
    return spec.replace(model=new), note


def _plain(v):
    """A spec part as the dict `replace` takes (compared with the new values)."""
    import dataclasses

    return dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
