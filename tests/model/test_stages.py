"""The stage objects' exact costs (a multiply-add is 2 FLOPs), payload layouts and weight slices,
written out by hand for the seed and the tiny config."""

import pytest
import torch

from pyengine.model.boundaries import BOUNDARIES
from pyengine.model.payloads import Payload
from pyengine.model.stages import Shard, StageKind, rank_flops, stages_of
from pyengine.model.weights import init_weights, rank_weights, take, weight


def test_seed_flops_per_gpu(seed_spec):
    T, H, F, E, k, V = 1024, 4096, 14336, 8, 2, 32000
    f = rank_flops(seed_spec)
    assert f[0] == 2 * T * H * E + 2 * T * H * V  # router + output head
    assert f[1] == f[2] == 6 * T * k * H * (F // 2)  # gate + up + down on half of F
    assert f[0] == pytest.approx(268.5e9, rel=1e-3)
    assert f[1] == pytest.approx(360.8e9, rel=1e-3)


def test_tiny_flops_exact(tiny_spec):  # T=48, H=48, F=40 split 0.4/0.6, E=5, k=2, V=101
    embed, experts, output = stages_of(tiny_spec)
    assert (experts.f_cols(1), experts.f_cols(2)) == (16, 24)
    f = rank_flops(tiny_spec)
    assert f == {0: 2 * 48 * 48 * 5 + 2 * 48 * 48 * 101, 1: 6 * 48 * 2 * 48 * 16, 2: 6 * 48 * 2 * 48 * 24}
    assert [k.name for k in experts.kernels(48, 1)] == ["gate_up_swiglu", "down_combine"]
    assert experts.kernels(48, 1)[0].flops == 4 * 48 * 2 * 48 * 16


@pytest.mark.parametrize("name", ["seed", "tiny"])
def test_micro_batching_keeps_the_work(name, seed_spec, tiny_spec):
    spec = {"seed": seed_spec, "tiny": tiny_spec}[name]
    per_mb = [rank_flops(spec, t) for t in spec.micro_batch_sizes()]
    assert {r: sum(d[r] for d in per_mb) for r in spec.ranks} == rank_flops(spec)
    experts = stages_of(spec)[StageKind.EXPERTS]
    sharded = sum(experts.flops(spec.model.tokens, r) for r in experts.ranks)
    m = spec.model
    assert sharded == 6 * m.tokens * m.top_k * m.hidden_size * m.ffn_hidden_size


def test_payload_layouts(seed_spec):
    t = 256
    assert Payload.ACT.nbytes(seed_spec, t) == t * (4096 * 2 + 2 * (4 + 4))
    assert Payload.SUM.nbytes(seed_spec, t) == Payload.PARTIAL.nbytes(seed_spec, t) == t * 4096 * 2
    assert Payload.RESID.nbytes(seed_spec, t) == t * 4096 * 2
    # reduce-scatter chunks are padded to equal size (NCCL takes equal counts): 255 -> 2 x 128 rows
    assert Payload.HALF.buffers(seed_spec, 255)[0].rows == 128
    assert Payload.HALF.reduced_bytes(seed_spec, 255) == 256 * 4096 * 2
    assert Payload.SUM.reduced_bytes(seed_spec, 255) == 255 * 4096 * 2
    assert Payload.LOGITS.nbytes(seed_spec, t) == t * 32000 * 2
    with pytest.raises(ValueError, match="not produced by a collective"):
        Payload.ACT.reduced_bytes(seed_spec, t)


def test_boundaries_say_who_sends():
    assert BOUNDARIES["all_reduce"].senders((1, 2), 0) == (1,)  # the group's first member
    assert BOUNDARIES["all_reduce"].senders((0, 1, 2), 1) == (1,)  # the output GPU holds the sum
    assert BOUNDARIES["reduce_scatter"].senders((1, 2), 0) == (1, 2)
    assert BOUNDARIES["partials"].output_reads(3) == 3
    assert BOUNDARIES["all_reduce"].output_reads(3) == 1


def test_reduce_scatter_gather_drops_padding():
    chunks = [(torch.arange(0, 4.0).reshape(2, 2),), (torch.arange(4, 8.0).reshape(2, 2),)]
    (y,) = BOUNDARIES["reduce_scatter"].gather({Payload.HALF: chunks}, tokens=3)
    assert torch.equal(y, torch.tensor([[0.0, 1], [2, 3], [4, 5]]))


def test_weight_memory_and_parts(tiny_spec):
    embed, experts, output = stages_of(tiny_spec)
    assert experts.weight_bytes(2) == {n: 5 * 48 * 24 * 4 for n in ("w_gate", "w_up", "w_down")}
    assert embed.weight_bytes(0) == {"embed": 101 * 48 * 4, "norm_in": 48 * 4, "router": 48 * 5 * 4}
    assert [experts.part(1), experts.part(2)] == ["experts F[0:16]", "experts F[16:40]"]
    # working sets: stage 0 keeps x for the residual (output on the same GPU)
    work, held = embed.working_set(16, 0)
    assert (work, held) == (2 * 16 * 48 * 4 + 16 * 5 * 4 + 16 * 2 * 8, 16 * 48 * 4)


def test_attention_gpu_working_set_of_a_layer_by_hand(tiny_spec):
    """Per token of a layer on the attention GPU (H 48, 6 heads and 2 kv heads of d 8, fp32): x
    and u (H each), router logits (E fp32) and top-k (k id + weight, 8 B), then the attention's
    a (48), q (48), k (16), v (16) and output (48) before the o-projection, and the partials of
    both expert GPUs coming back (H each); x waits between layers."""
    spec = tiny_spec.replace(model={"num_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2})
    embed = stages_of(spec)[StageKind.EMBED]
    t = 16
    router = 2 * t * 48 * 4 + t * 5 * 4 + t * 2 * 8
    attention = t * (48 + 48 + 16 + 16 + 48) * 4
    partials = 2 * t * 48 * 4
    assert embed.working_set(t, 0) == (router + attention + partials, t * 48 * 4)


def test_shards_are_slices_of_the_full_weights(tiny_spec):
    full = init_weights(tiny_spec, seed=3)
    experts = stages_of(tiny_spec)[StageKind.EXPERTS]
    for r in experts.ranks:
        mine = rank_weights(tiny_spec, 3, r)
        for n in ("w_gate", "w_up", "w_down"):
            assert torch.equal(mine[n], take(full, n, experts.shard(r)))
    assert set(rank_weights(tiny_spec, 3, 0)) == {"embed", "norm_in", "router", "norm_out", "out"}
    picked = weight(tiny_spec, 3, "w_up", shard=Shard(experts=(4, 1), f_cols=(2, 5)))
    assert torch.equal(picked, full["w_up"][[4, 1]][:, :, 2:5])
