"""Multi-head latent attention (pyengine.model.attention_mla) over the paged cache: against
transformers' DeepseekV3Attention itself (q low-rank path and plain q_proj, interleaved RoPE, YaRN),
prefilled in two chunks; a decode group (absorbed form) against the non-absorbed formula written
here; the cache holds kv_lora_rank + qk_rope_head_dim values per token and layer (read back)."""

import math

import pytest
import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

from pyengine.core.spec import load_spec
from pyengine.model.attention import RopeTables, chunk_tables, host_meta, key_blocks
from pyengine.model.attention_mla import deinterleave_rope, mla_attention_torch
from pyengine.model.batch import Batch
from pyengine.model.kv_cache import KVCache, cache_bytes
from pyengine.model.rope_yarn import read_rope_scaling
from pyengine.model.tensors import LayerWeights

from helpers import TINY_CONFIG

HEADS, NOPE, ROPE, V, KV_LORA = 3, 6, 8, 5, 12
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 0.8}


def spec_for(q_lora, yarn=YARN):
    mla = {"q_lora_rank": q_lora, "kv_lora_rank": KV_LORA, "qk_nope_head_dim": NOPE, "qk_rope_head_dim": ROPE,
           "v_head_dim": V}
    scaling = read_rope_scaling({"rope_scaling": yarn}, "c") if yarn else None
    from dataclasses import asdict
    return load_spec(TINY_CONFIG).replace(model={"num_layers": 2, "num_attention_heads": HEADS, "mla": mla,
                                                 "rope_theta": 1000.0,
                                                 "rope_scaling": asdict(scaling) if scaling else None})


def hf_attention(q_lora, hidden, seed, yarn=YARN):
    cfg = DeepseekV3Config(hidden_size=hidden, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                           q_lora_rank=q_lora, kv_lora_rank=KV_LORA, qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE,
                           v_head_dim=V, max_position_embeddings=64, rope_theta=1000.0,
                           rope_scaling=dict(yarn) if yarn else None)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    attn = DeepseekV3Attention(cfg, 0).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]) if p.dim() > 1 else 1 + 0.3 * torch.randn_like(p))
    return attn, DeepseekV3RotaryEmbedding(cfg)


def engine_weights(attn, q_lora):
    """transformers' [out, in] -> the engine's [in, out]; the rotary columns de-interleaved."""
    t = lambda lin: lin.weight.detach().T.contiguous()  # noqa: E731
    qk = NOPE + ROPE
    w = {"wkv_a": deinterleave_rope(t(attn.kv_a_proj_with_mqa), 1, KV_LORA, ROPE),
         "kv_a_norm": attn.kv_a_layernorm.weight.detach(), "wkv_b": t(attn.kv_b_proj), "wo": t(attn.o_proj)}
    if q_lora:
        w.update(wq_a=t(attn.q_a_proj), q_a_norm=attn.q_a_layernorm.weight.detach(),
                 wq_b=deinterleave_rope(t(attn.q_b_proj), HEADS, NOPE, ROPE))
    else:
        w["wq"] = deinterleave_rope(t(attn.q_proj), HEADS, NOPE, ROPE)
    assert qk * HEADS == (w["wq_b"] if q_lora else w["wq"]).shape[1]
    return w


def run(spec, cache, rope, batch, a, w, layer=0):
    outs = []
    for c in batch.chunks:
        meta = torch.tensor(host_meta(c), dtype=torch.int32)
        tables = chunk_tables(cache, rope, c, meta, torch.float32, key_blocks(c, cache.block_size))
        outs.append(mla_attention_torch(spec.model, LayerWeights(w, None), a[c.lo:c.hi], cache, layer, c, tables))
    return torch.cat(outs)


@pytest.mark.parametrize("q_lora,yarn", [(10, YARN), (None, YARN), (10, None)])  # low-rank q; q_proj; plain RoPE
def test_prefill_in_two_chunks_equals_transformers(q_lora, yarn):
    spec = spec_for(q_lora, yarn)
    attn, rotary = hf_attention(q_lora, spec.model.hidden_size, 0, yarn)
    s = 9
    x = torch.randn(1, s, spec.model.hidden_size, generator=torch.Generator().manual_seed(1))
    pos = torch.arange(s)[None]
    mask = torch.full((s, s), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        want, _ = attn(x, rotary(x, pos), mask)
    cache = KVCache(spec, 1, s, "cpu", torch.float32, block_size=4)
    cache.grow({0: s})
    rope = RopeTables.for_model(spec.model, s, "cpu")
    w = engine_weights(attn, q_lora)
    got = run(spec, cache, rope, Batch.prefill([s], 2), x[0], w) @ w["wo"]
    torch.testing.assert_close(got, want[0], rtol=1e-5, atol=1e-5)


def non_absorbed(w, a_seq, q_lora, cos, sin, scale):
    """The last row's output of a sequence a_seq [n, H], written out: every key decompressed."""
    def rms(x, g):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * g

    def rot(x, c, s_):
        h = x.shape[-1] // 2
        return x * c + torch.cat([-x[..., h:], x[..., :h]], -1) * s_

    n = a_seq.shape[0]
    q = (rms(a_seq @ w["wq_a"], w["q_a_norm"]) @ w["wq_b"]) if q_lora else a_seq @ w["wq"]
    q = q.view(n, HEADS, NOPE + ROPE)[-1]
    ckv = a_seq @ w["wkv_a"]
    c, k_pe = rms(ckv[:, :KV_LORA], w["kv_a_norm"]), rot(ckv[:, KV_LORA:], cos, sin)
    kv = (c @ w["wkv_b"]).view(n, HEADS, NOPE + V)
    out = []
    for h in range(HEADS):
        q_pe = rot(q[h, NOPE:], cos[-1], sin[-1])
        scores = (kv[:, h, :NOPE] @ q[h, :NOPE] + k_pe @ q_pe) * scale
        out.append(torch.softmax(scores, 0) @ kv[:, h, NOPE:])
    return torch.cat(out)


def test_absorbed_decode_in_scattered_slots_equals_the_non_absorbed_formula():
    from pyengine.model.attention_mla import softmax_scale

    spec = spec_for(10)
    m = spec.model
    attn, _ = hf_attention(10, m.hidden_size, 2)
    w = engine_weights(attn, 10)
    g = torch.Generator().manual_seed(3)
    cache = KVCache(spec, 4, 14, "cpu", torch.float32, block_size=4)
    rope = RopeTables.for_model(m, 14, "cpu")
    slots, past = [2, 0, 3], [6, 1, 11]
    cache.grow({0: 1, 3: 1, 2: 1})  # interleaved: a slot's blocks are not adjacent
    prompts = {s: torch.randn(n + 1, m.hidden_size, generator=g) for s, n in zip(slots, past)}
    for s, n in zip(slots, past):
        cache.grow({s: n + 1})
        run(spec, cache, rope, Batch((n,), (0,), 1, slots=(s,)), prompts[s][:n], w, layer=1)
    (c,) = Batch.decode(past, 1, slots=slots).chunks
    meta = torch.tensor(host_meta(c, padding=1), dtype=torch.int32)  # one padding row
    tables = chunk_tables(cache, rope, c, meta, torch.float32, key_blocks(c, cache.block_size))
    a = torch.cat([torch.stack([prompts[s][-1] for s in slots]), torch.randn(1, m.hidden_size, generator=g)])
    got = mla_attention_torch(m, LayerWeights(w, None), a, cache, 1, c, tables)
    for i, (s, n) in enumerate(zip(slots, past)):
        want = non_absorbed(w, prompts[s], 10, rope.cos[:n + 1], rope.sin[:n + 1], softmax_scale(m))
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(got[-1]).all()


def test_the_cache_holds_the_latent_and_the_rotated_shared_key_per_token():
    spec = spec_for(10)
    m = spec.model
    cache = KVCache(spec, 2, 8, "cpu", torch.float32, block_size=4)
    rows = (2 * 2 + 1) * 4  # two slots of two blocks each, plus the trash block
    assert cache.k.nbytes + cache.v.nbytes == m.layers * rows * (KV_LORA + ROPE) * 4
    assert cache_bytes(spec, 2, 8, block_size=4) == m.layers * rows * (KV_LORA + ROPE) * 4
    attn, _ = hf_attention(10, m.hidden_size, 4)
    w = engine_weights(attn, 10)
    cache.grow({1: 5})
    a = torch.randn(5, m.hidden_size, generator=torch.Generator().manual_seed(5))
    rope = RopeTables.for_model(m, 8, "cpu")
    run(spec, cache, rope, Batch((5,), (0,), 1, slots=(1,)), a, w, layer=1)
    blocks = cache.allocator.table[1]
    stored = torch.cat([cache.k[1, b, :, 0] for b in blocks])[:5]  # [5, kv_lora + rope]
    ckv = a @ w["wkv_a"]
    c = ckv[:, :KV_LORA] / torch.sqrt(ckv[:, :KV_LORA].pow(2).mean(-1, keepdim=True) + 1e-6) * w["kv_a_norm"]
    pe = ckv[:, KV_LORA:]
    pe = pe * rope.cos[:5] + torch.cat([-pe[:, ROPE // 2:], pe[:, :ROPE // 2]], -1) * rope.sin[:5]
    torch.testing.assert_close(stored, torch.cat([c, pe], -1))
    assert not cache.k[0].any()  # layer 0 untouched


def test_the_triton_path_decodes_in_place_like_the_torch_path():
    """TritonOps: its static decode tables, the latent read in place by the MLA kernel (absorbed)."""
    from pyengine.model.ops_torch import TorchOps
    from pyengine.model.ops_triton import TritonOps

    spec = spec_for(10)
    m = spec.model
    attn, _ = hf_attention(10, m.hidden_size, 6)
    w = LayerWeights(engine_weights(attn, 10), None)
    rope = RopeTables.for_model(m, 24, "cpu")
    slots, past = [1, 0], [3, 19]
    outs = []
    for ops in (TorchOps(), TritonOps(spec, torch.device("cpu"))):
        cache = KVCache(spec, 3, 24, "cpu", torch.float32, block_size=4)
        for s, n in zip(slots, past):
            cache.grow({s: n + 1})
            a = torch.randn(n, m.hidden_size, generator=torch.Generator().manual_seed(s))
            run(spec, cache, rope, Batch((n,), (0,), 1, slots=(s,)), a, w.weights)
        (c,) = Batch.decode(past, 1, slots=slots).chunks
        meta = torch.tensor(host_meta(c, padding=1), dtype=torch.int32)
        tables = ops.decode_tables(cache, rope, meta, torch.float32, key_blocks(c, cache.block_size))
        a = torch.randn(3, m.hidden_size, generator=torch.Generator().manual_seed(9))
        outs.append(ops.attention(m, w, a, cache, 0, None, tables))
    torch.testing.assert_close(outs[1][:2], outs[0][:2], rtol=2e-5, atol=2e-6)
    assert not outs[1][2].any()  # the padding row: zeros
