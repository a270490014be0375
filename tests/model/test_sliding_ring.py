"""A sliding layer's KV cache holds only its window (a ring of blocks per slot, pyengine.model.kv_cache):
its bytes are the ring's, and generation through the step loop with blocks of 2 tokens (a ring of 2
blocks for a window of 3, wrapped many times), prompts longer than the ring (written in one chunk,
split over micro-batches, and over two steps), equals the reference's greedy continuation, which
recomputes every sequence from scratch with no cache. Torch and Triton (interpreter) paths."""

import pytest
import torch

from helpers import on_threads
from pyengine.execute.step_loop import StepLoop
from pyengine.execute.step_plan import SeqWork, StepPlan
from pyengine.model.kv_cache import KVCache, cache_bytes
from pyengine.model.weights import init_weights, rank_weights
from pyengine.transport.local import LocalTransport
from test_whole_model_gpt_oss import BASE
from whole_model_checks import greedy

SPEC = BASE.replace(schedule={"micro_batches": 2})  # layers: sliding, full, sliding; window 3; fp32
PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6, 5], [2, 7, 1, 8], [6, 6, 6, 1, 2, 3, 4]]
STEPS = 9


def test_a_sliding_layer_holds_its_ring_only():
    m = SPEC.model
    cache = KVCache(SPEC, 4, 16, "cpu", torch.float32, block_size=2)
    assert cache.ring == 3 - 1  # ceil(3 / 2): any 3 consecutive positions hold distinct rows of 2 blocks
    token = m.kv_heads * m.head_size * 2 * 4  # K and V, fp32
    full_rows, ring_rows = (4 * 8 + 1) * 2, (4 * 2 + 1) * 2  # slots x blocks per slot + the trash block
    want = (1 * full_rows + 2 * ring_rows) * token
    assert cache.nbytes == want == cache_bytes(SPEC, 4, 16, block_size=2)
    assert [cache.is_ring(layer) for layer in range(3)] == [True, False, True]
    assert cache.ring_table[:, :].tolist() == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 8]]
    short = KVCache(SPEC, 4, 4, "cpu", torch.float32, block_size=2)  # 2 blocks a slot: no smaller ring
    assert short.ring == 0 and short.nbytes == 3 * (4 * 2 + 1) * 2 * token


def run(plans_of):
    """Per rank, the ids each step drew; `plans_of(seqs)` yields the prefill plans, then STEPS decode
    steps of every sequence follow."""
    transports = LocalTransport.create(3, "cpu", 30)

    def rank(r):
        w = rank_weights(SPEC, 3, r, torch.device("cpu"))
        loop = StepLoop(SPEC, r, transports[r], w, torch.device("cpu"), slots=4, capacity=24, block_size=2)
        assert loop.cache is None or loop.cache.ring == 2
        seqs = [list(p) for p in PROMPTS]
        for plan in plans_of():
            for work, i in zip([w for w in plan.work if w.sample], loop.run(plan).ids):
                seqs[work.slot].append(i)
        for _ in range(STEPS):
            plan = StepPlan(tuple(SeqWork(s, (seq[-1],), len(seq) - 1) for s, seq in enumerate(seqs)))
            for s, i in enumerate(loop.run(plan).ids):
                seqs[s].append(i)
        return seqs
    return on_threads(rank, timeout_s=600)


def one_plan():
    yield StepPlan(tuple(SeqWork(s, tuple(p), 0) for s, p in enumerate(PROMPTS)))


def two_steps():  # the first prompt's first 5 tokens, then its last 4 with the others
    p = PROMPTS[0]
    yield StepPlan((SeqWork(0, tuple(p[:5]), 0, sample=False),))
    yield StepPlan((SeqWork(0, tuple(p[5:]), 5),) + tuple(SeqWork(s, tuple(q), 0) for s, q in enumerate(PROMPTS) if s))


@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("plans", [one_plan, two_steps], ids=["one-plan", "two-steps"])
def test_generation_through_the_ring_equals_recomputing(path, plans, monkeypatch):
    monkeypatch.setenv("PYENGINE_KERNELS", path)
    w = init_weights(SPEC, 3)
    want = [greedy(SPEC, w, torch.tensor(p), STEPS + 1).tolist() for p in PROMPTS]
    per_rank = run(plans)
    assert all(seqs == want for seqs in per_rank)


def test_memory_linear_in_layers_prices_every_layer_as_a_full_one():
    """layers_that_fit and `fit` extrapolate memory from 1 and 2 layers of spec.all_moe (every layer
    priced alike, erring low): each layer's KV cache is priced as a full layer's, never as a ring,
    which would let more layers "fit" than do."""
    from pyengine.predict.resources import state_bytes

    spec = SPEC.replace(model={"seq_len": 64, "batch_size": 2})
    m = spec.model
    full_layer = (2 * 64 // 16 + 1) * 16 * m.kv_heads * m.head_size * 2 * 4  # slots x blocks + trash, K and V, fp32
    one, two = state_bytes(spec.all_moe(1)), state_bytes(spec.all_moe(2))
    slope = {r: two[r] - one[r] for r in one}
    assert max(slope.values()) == full_layer and state_bytes(spec)[0] < 3 * full_layer  # the real one rings
