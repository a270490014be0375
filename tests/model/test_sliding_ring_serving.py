"""A sliding layer's ring under continuous batching (pyengine.serve.scheduler driving a StepLoop on 3
virtual ranks): 2 slots, blocks of 2 tokens, a window of 3 (a ring of 2 blocks), a step budget of 3
tokens, so prompts longer than the ring are chunked across steps at odd offsets, mixed with other
requests' decodes, and slots are released and reused while their ring still holds the previous
sequence's keys; TP and EP, every layer sliding, and the Triton path under the CUDA-graph
bookkeeping on CPU (graphs.CheckedReplays; 3 slots and a budget of 4, so static decode steps of 3
sequences in groups of 2 carry a padding row). Each request's ids equal the reference's greedy
continuation of its prompt alone, recomputed from scratch with no cache."""

import pytest
import torch

from helpers import on_threads
from pyengine.execute.decode_state import DecodeShape
from pyengine.execute.graphs import CheckedReplays
from pyengine.execute.step_loop import StepLoop
from pyengine.serve.params import SamplingParams
from pyengine.serve.request import Request
from pyengine.serve.scheduler import Limits, Scheduler
from pyengine.transport.local import LocalTransport
from pyengine.model.weights import init_weights, rank_weights
from test_whole_model_gpt_oss import BASE, EP
from whole_model_checks import greedy

SPEC = BASE.replace(schedule={"micro_batches": 2})  # layers: sliding, full, sliding; window 3; fp32
SPECS = {"tp": SPEC, "ep": SPEC.replace(parallel={"stages": EP}),
         "all-sliding": SPEC.replace(model={"layer_types": None})}  # no full layer: no paged K and V at all
# (prompt, new ids): prompts longer than the ring's 4 positions, short ones, one of a single token
REQUESTS = [([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], 4), ([2, 7], 6), ([6, 6, 6, 1, 2, 3, 4, 8], 3),
            ([9], 5), ([1, 4, 1, 4, 2, 1, 3, 5, 6, 2, 3, 7, 3], 2)]
CAPACITY = 16


def serve(spec, graph_backend=None, block_size=2, slots=2, ring=2):
    """Per rank, each request's new ids (every rank replays the same plans: ids are greedy)."""
    transports = LocalTransport.create(3, "cpu", 60)

    def rank(r):
        w = rank_weights(spec, 3, r, torch.device("cpu"))
        loop = StepLoop(spec, r, transports[r], w, torch.device("cpu"), slots=slots, capacity=CAPACITY,
                        block_size=block_size, graph_backend=graph_backend)
        assert loop.cache is None or loop.cache.ring == ring
        sched = Scheduler(Limits(slots=slots, blocks=16 * slots // block_size, block_size=block_size,
                                 step_tokens=slots + 1, capacity=CAPACITY))
        reqs = [Request(i, tuple(p), SamplingParams(max_new_tokens=n), frozenset())
                for i, (p, n) in enumerate(REQUESTS)]
        for req in reqs:
            sched.add(req)
        slots_used = []
        while (plan := sched.schedule()) is not None:
            slots_used += [w.slot for w in plan.work if w.past == 0]
            sched.commit(plan, loop.run(plan).ids)
        assert len(slots_used) == 5 and len(set(slots_used)) == slots  # every slot used, some reused
        if graph_backend is not None:  # the static decode steps ran captured and replayed
            rt = loop._decode[DecodeShape(2, 2)][0]  # 3 slots decoding: a padding row (one alone: too rare)
            assert rt.graphs.captured > 0 and not rt.graphs.failed
        return [req.out for req in reqs]
    return on_threads(rank, timeout_s=600)


@pytest.mark.parametrize("path,name,graphs", [("torch", "tp", False), ("torch", "ep", False),
                                               ("torch", "all-sliding", False),
                                               ("triton", "tp", False), ("triton", "ep", True)])
def test_served_requests_through_reused_rings_equal_recomputing(path, name, graphs, monkeypatch):
    monkeypatch.setenv("PYENGINE_KERNELS", path)
    spec = SPECS[name]
    w = init_weights(spec, 3)
    want = [greedy(spec, w, torch.tensor(p), n)[len(p):].tolist() for p, n in REQUESTS]
    per_rank = serve(spec, CheckedReplays(), slots=3) if graphs else serve(spec)
    assert all(outs == want for outs in per_rank), (per_rank[0], want)


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_a_window_whose_ring_would_not_be_smaller_keeps_full_storage(path, monkeypatch):
    """Blocks of 16: the window's ring (1 block) is not smaller than a slot's 1 block, so the sliding
    layers keep every position in the paged cache, and serving still equals recomputing."""
    monkeypatch.setenv("PYENGINE_KERNELS", path)
    w = init_weights(SPEC, 3)
    want = [greedy(SPEC, w, torch.tensor(p), n)[len(p):].tolist() for p, n in REQUESTS]
    assert all(outs == want for outs in serve(SPEC, block_size=16, ring=0))


@pytest.mark.parametrize("window,block_size,ring", [(1, 1, 1), (2, 2, 1), (4, 2, 2), (5, 3, 2), (4, 1, 4)])
def test_windows_and_block_sizes_of_every_alignment(window, block_size, ring):
    """Windows shorter than, equal to and longer than a block, and not a multiple of it (torch path)."""
    spec = SPEC.replace(model={"sliding_window": window})
    w = init_weights(spec, 3)
    want = [greedy(spec, w, torch.tensor(p), n)[len(p):].tolist() for p, n in REQUESTS]
    assert all(outs == want for outs in serve(spec, block_size=block_size, ring=ring))
