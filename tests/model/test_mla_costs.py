"""The embed stage's roofline kernels for MLA (pyengine.model.mla_costs), pinned by hand-computed
figures: a decode group (absorbed: the latent read once for every head) and a prefill chunk
(decompressed); the KV cache's bytes in the stage's state (what the memory check and planner use)."""

from pyengine.core.spec import load_spec
from pyengine.model.batch import Batch
from pyengine.model.stages import stages_of

from helpers import TINY_CONFIG

# H=48, heads=3, q_lora=10, kv_lora=12, nope=6, rope=8, v=5 (qk=14, latent width 20), fp32
SPEC = load_spec(TINY_CONFIG).replace(model={
    "num_layers": 2, "num_attention_heads": 3, "seq_len": 7,
    "mla": {"q_lora_rank": 10, "kv_lora_rank": 12, "qk_nope_head_dim": 6, "qk_rope_head_dim": 8, "v_head_dim": 5}})


def costs(chunk):
    embed = stages_of(SPEC)[0]
    return {k.name: k for k in embed.kernels(chunk.tokens, 0, layer=1, chunk=chunk)}


def test_a_decode_group_is_priced_absorbed():
    (c,) = Batch.decode([4, 9], 1).chunks  # 2 rows; keys 5 and 10
    k = costs(c)
    assert c.attended == 15 and c.keys_read == 15
    assert k["q_a_gemm"].flops == 2 * 2 * 10 * 48 and k["q_b_gemm"].flops == 2 * 2 * 42 * 10
    assert k["kv_a_gemm"].flops == 2 * 2 * 20 * 48
    assert k["q_absorb"].flops == 2 * 2 * 3 * 6 * 12  # rows x heads x nope x kv_lora
    assert k["attention"].flops == 2 * 3 * (20 + 12) * 15  # scores over kv_lora + rope, values kv_lora
    assert k["attention"].hbm_bytes == (2 * 2 * 3 * 20 + 15 * 20) * 4  # q and out; each row read once
    assert k["out_unabsorb"].flops == 2 * 2 * 3 * 12 * 5
    assert k["o_gemm"].flops == 2 * 2 * 48 * 15
    assert "kv_b_gemm" not in k


def test_a_prefill_chunk_decompresses_what_it_reads():
    c = Batch.prefill([7], 1).chunks[0]  # 7 tokens, 28 pairs, 7 keys
    k = costs(c)
    assert k["kv_b_gemm"].flops == 2 * 7 * 3 * (6 + 5) * 12
    assert k["attention"].flops == 2 * 3 * (14 + 5) * 28
    assert "q_absorb" not in k


def test_the_cache_is_priced_as_latent_rows():
    embed = stages_of(SPEC)[0]
    rows = (3 * 1 + 1) * 16  # 3 sequences of <= 16 tokens: one block each, plus the trash block
    assert embed.state_bytes(0, 3, 16) == 2 * rows * (12 + 8) * 4


def test_shared_expert_and_dense_layer_are_priced_on_the_attention_gpu():
    spec = SPEC.replace(model={"num_layers": 3, "dense_layers": [0], "dense_ffn_size": 11, "shared_expert_size": 9})
    embed, experts = stages_of(spec)[:2]
    c = Batch.prefill([7], 1).chunks[0]
    dense = {k.name: k for k in embed.kernels(7, 0, layer=0, chunk=c)}
    assert dense["dense_gate_up"].flops == 2 * 7 * 22 * 48 and dense["dense_down"].flops == 2 * 7 * 48 * 11
    assert "router_gemm" not in dense and "shared_gate_up" not in dense
    after = {k.name: k for k in embed.kernels(7, 0, layer=1, chunk=c)}
    assert after["shared_gate_up"].flops == 2 * 7 * 18 * 48 and after["shared_down"].flops == 2 * 7 * 48 * 9
    assert "rmsnorm_attn" in after  # after a dense layer: no hand-off to add, only the norm
    assert experts.layers() == [1, 2] and embed.layers() == [0, 1, 2]
    assert embed.hand_off_from(1) == () and embed.hand_off_from(2) == (1,)
    w = embed.weight_bytes(0)
    assert w["wd_up"] == 48 * 11 * 4 and w["ws_up"] == 2 * 48 * 9 * 4 and w["router"] == 2 * 48 * 5 * 4
