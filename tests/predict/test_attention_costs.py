"""Attention in the cost model, by hand on one odd shape, and the simulator of a model of layers
against the closed form of a balanced ping-pong."""

import pytest

from helpers import TINY_CONFIG
from pyengine.core.spec import load_spec
from pyengine.model.stages import StageKind, stages_of
from pyengine.predict.simulate import simulate
from pyengine.schedule import Action, Kind

# H 10, 5 heads of d 2 over 1 kv head, one sequence of 5 tokens in chunks of 3 and 2, fp32.
SPEC = load_spec(TINY_CONFIG).replace(model={
    "hidden_size": 10, "num_layers": 3, "num_attention_heads": 5, "num_key_value_heads": 1,
    "batch_size": 1, "seq_len": 5}, schedule={"micro_batches": 2})


def kernels(layer, mb):
    from pyengine.model.batch import Batch

    chunk = Batch.of_spec(SPEC).chunks[mb]
    return {k.name: (k.flops, k.hbm_bytes)
            for k in stages_of(SPEC)[StageKind.EMBED].kernels(chunk.tokens, 0, layer, chunk)}


def test_attention_flops_and_bytes_by_hand():
    k = kernels(1, 1)  # chunk 1: 2 tokens at positions 3 and 4, reading 5 cached keys
    t, h, q, kv, es = 2, 10, 5 * 2, 1 * 2, 4
    assert k["qkv_gemm"] == (2 * t * h * (q + 2 * kv), (h * (q + 2 * kv) + t * (h + q + 2 * kv)) * es)
    # causal: the token at position p reads p + 1 keys: 4 + 5 query-key pairs, 4 * d FLOPs per pair and head
    assert k["attention"] == (4 * 5 * 2 * (4 + 5), (2 * t * q + 2 * 5 * kv) * es)
    assert k["o_gemm"] == (2 * t * q * h, (q * h + t * (q + h)) * es)
    assert k["qk_norm_rope_kv_write"] == (0.0, (2 * t * (q + kv) + 2 * t * kv) * es)
    assert kernels(1, 0)["attention"][0] == 4 * 5 * 2 * (1 + 2 + 3)


def test_layer_0_embeds_later_layers_add_the_hand_off():
    first, later = kernels(0, 0), kernels(2, 0)
    assert "embed_gather" in first and "residual_sum_rmsnorm" not in first
    assert "residual_sum_rmsnorm" in later and "embed_gather" not in later
    # partials straight to GPU 0: x + 2 partials read, normed rows and the new residual written
    t, h, es = 3, 10, 4
    assert later["residual_sum_rmsnorm"][1] == (2 + 1 + 2) * t * h * es + h * es


@pytest.mark.parametrize("m", [1, 2, 3, 5])
def test_balanced_ping_pong_matches_its_closed_form(m):
    """Every compute takes c, messages take nothing. m = 1: strictly sequential, 2L + 1 computes.
    m >= 2: the attention GPU never waits -- layer l's chunk j needs layer l-1's experts on chunk j,
    done by the time the GPU has finished the other m - 1 chunks of layer l-1 -- so it runs its
    L * m attention computes and then m output heads back to back: (L + 1) * m * c."""
    spec = SPEC.replace(model={"seq_len": 10}, schedule={"micro_batches": m})
    c = 1e-3

    def cost(a: Action) -> float:
        return c if a.kind is Kind.COMPUTE else 0.0

    layers = spec.model.num_layers
    want = (2 * layers + 1) * c if m == 1 else (layers + 1) * m * c
    assert simulate(spec, op_costs=cost).makespan_s == pytest.approx(want)
