"""The static decode step (pyengine.execute.decode_state, step_loop) against the test's own float64
reference (tests/references.py: each sequence recomputed from scratch, no cache): sequences stopping
mid-batch (holes in the slots), the live set shrinking through three bucket shapes, TP and EP, the
torch path and the Triton path (interpreter); and the CUDA-graph bookkeeping on CPU (CheckedReplays:
captured segments replayed, inputs that must not move, no host sync inside a segment)."""

import pytest
import torch

import references
from helpers import TINY_CONFIG, on_threads
from pyengine.core.spec import load_spec
from pyengine.execute.decode_state import DecodeShape, StaticStep, bucket, decode_shape
from pyengine.execute.graphs import CheckedReplays, HostSyncInSegment, no_host_sync
from pyengine.execute.step_loop import StepLoop
from pyengine.execute.step_plan import SeqWork, StepPlan
from pyengine.model.weights import init_weights, rank_weights
from pyengine.schedule import Kind
from pyengine.transport.local import LocalTransport

SPEC = load_spec(TINY_CONFIG).replace(model={
    "num_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 6,
    "rope_theta": 500.0}, schedule={"micro_batches": 2})
EP = SPEC.replace(parallel={"stages": [
    {"name": "embed", "gpus": [0]},
    {"name": "experts", "gpus": [0, 1, 2], "parallel_mode": "expert", "expert_ids": [[0], [1, 2], [3, 4]]},
    {"name": "output", "gpus": [0]}]})
PROMPTS = [[5, 9, 11], [7, 2, 3, 4, 1], [8, 8], [1, 2, 3, 4], [9, 10, 11, 12, 13, 14]]
LIVE = [[0, 1, 2, 3, 4]] * 3 + [[0, 2, 4]] * 2 + [[2]]  # shapes (2, 4) x3, (2, 2) x2, (1, 1)


def test_buckets_and_shapes():
    assert [bucket(n) for n in (1, 2, 3, 5, 8, 200, 256, 257, 600)] == [1, 2, 4, 8, 8, 256, 256, 512, 768]
    assert decode_shape(5, 2) == (DecodeShape(2, 4), [3, 2])
    assert decode_shape(1, 2) == (DecodeShape(1, 1), [1])
    with pytest.raises(ValueError, match="at least one"):
        bucket(0)


def test_a_step_writes_each_sequence_to_its_group_and_pads_the_rest():
    state = StaticStep(DecodeShape(2, 4), torch.device("cpu"))
    state.write([10, 11, 12], [4, 0, 2], [7, 3, 5], [2, 1])
    assert state.rows_of == [0, 1, 4]
    assert state.ids.tolist() == [10, 11, 0, 0, 12, 0, 0, 0]
    assert state.meta.tolist() == [[7, 3, 0, 0, 5, 0, 0, 0], [4, 0, -1, -1, 2, -1, -1, -1],
                                   [8, 4, 0, 0, 6, 0, 0, 0]]
    before = state.packed.data_ptr(), state.meta.data_ptr()
    state.write([1], [3], [9], [1])
    assert (state.packed.data_ptr(), state.meta.data_ptr()) == before  # written in place


def script(spec, **loop_kw):
    """Prefill PROMPTS, then decode along LIVE on 3 threads; per rank the ids of every step."""
    transports = LocalTransport.create(3, "cpu", 30)

    def rank(r):
        w = rank_weights(spec, 3, r, torch.device("cpu"))
        loop = StepLoop(spec, r, transports[r], w, torch.device("cpu"), slots=6, capacity=16, **loop_kw)
        seqs = [list(p) for p in PROMPTS]
        plan = StepPlan(tuple(SeqWork(s, tuple(p), 0) for s, p in enumerate(PROMPTS)))
        steps = [loop.run(plan).ids]
        for s, i in enumerate(steps[0]):
            seqs[s].append(i)
        for live in LIVE:
            plan = StepPlan(tuple(SeqWork(s, (seqs[s][-1],), len(seqs[s]) - 1) for s in live))
            ids = loop.run(plan).ids
            for s, i in zip(live, ids):
                seqs[s].append(i)
            steps.append(ids)
        return steps, seqs, loop
    return on_threads(rank, timeout_s=300)


def expected(spec, seqs):
    """Each step's ids from the float64 reference over the whole sequence so far."""
    m = spec.model
    w = init_weights(spec, 3)

    def next_id(ids):
        logits = references.decoder_model(w, torch.tensor([ids]), layers=m.num_layers, heads=m.heads,
                                          kv=m.kv_heads, top_k=m.top_k, eps=m.norm_eps, theta=m.rope_theta,
                                          qk_norm=m.qk_norm)
        return int(logits[-1].argmax())
    out, lens = [], [len(p) for p in PROMPTS]
    out.append([next_id(seqs[s][:lens[s]]) for s in range(len(PROMPTS))])
    for k, live in enumerate(LIVE):
        out.append([next_id(seqs[s][:lens[s] + k + 1]) for s in live])
    return out


@pytest.mark.parametrize("spec", [SPEC, EP], ids=["tp", "ep"])
def test_holes_and_shrinking_buckets_match_the_float64_reference(spec):
    per_rank = script(spec)
    steps, seqs, loop = per_rank[0]
    assert all(r[0] == steps for r in per_rank)  # every rank holds the same ids
    assert steps == expected(spec, seqs)
    assert set(loop._decode) == {DecodeShape(1, 1), DecodeShape(2, 2), DecodeShape(2, 4)}


def test_the_triton_path_generates_what_the_torch_path_does(monkeypatch):
    torch_steps = script(SPEC)[0][0]
    monkeypatch.setenv("PYENGINE_KERNELS", "triton")
    assert script(SPEC)[0][0] == torch_steps


@pytest.mark.parametrize("spec", [SPEC, EP], ids=["tp", "ep"])
def test_graph_bookkeeping_replays_what_eager_computes(spec, monkeypatch):
    monkeypatch.setenv("PYENGINE_KERNELS", "triton")  # the path a GPU captures
    eager = script(spec)[0][0]
    per_rank = script(spec, graph_backend=CheckedReplays())
    assert per_rank[0][0] == eager
    for _, _, loop in per_rank:  # shape (2, 4) ran 3 times and (2, 2) twice: both captured, replayed
        for shape in (DecodeShape(2, 4), DecodeShape(2, 2)):
            rt = loop._decode[shape][0]
            computes = sum(1 for a in rt.actions if a.kind is Kind.COMPUTE)
            assert rt.graphs.captured == computes > 0


def test_a_host_sync_inside_a_segment_is_refused():
    x = torch.arange(4)
    with pytest.raises(HostSyncInSegment, match="_local_scalar_dense"), no_host_sync():
        x.sum().item()
    with no_host_sync():
        (x * 2).sum()


def test_an_input_that_moves_after_capture_is_refused(monkeypatch):
    """A receive buffer reallocated between steps: the captured graph would read the old one."""
    monkeypatch.setenv("PYENGINE_KERNELS", "triton")
    from pyengine.execute.runtime import RankRuntime

    buffers = RankRuntime._buffers

    def fresh(self, a, rows):  # drop the pool before every receive: new addresses each step
        self._pool.pop(a.key, None)
        return buffers(self, a, rows)

    monkeypatch.setattr(RankRuntime, "_buffers", fresh)
    with pytest.raises(AssertionError, match="an input moved since its capture"):
        script(SPEC, graph_backend=CheckedReplays())


@pytest.mark.parametrize("graphs,rule", [("sideways", "must be one of auto, on, off"),
                                         ("on", "CUDA graphs need a GPU; the ranks run on cpu")])
def test_engine_graphs_argument_is_checked_up_front(graphs, rule):
    from pyengine.core.errors import InputError
    from pyengine.execute.engine import Engine

    (tr,) = LocalTransport.create(1, "cpu", 5)
    one = SPEC.replace(parallel={"stages": [{"name": "embed", "gpus": [0]},
                                            {"name": "experts", "gpus": [0], "tensor_parallel_size": 1},
                                            {"name": "output", "gpus": [0]}]}, hardware={"num_gpus": 1})
    with pytest.raises(InputError, match=f"graphs = '{graphs}': {rule}"):
        Engine(one, tr, graphs=graphs)
