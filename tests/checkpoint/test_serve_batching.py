"""Continuous batching is exact: 16+ requests of different prompt lengths and max_new_tokens, arriving
at different steps of the real step loop (chunked prefill mixed with decode over the paged KV cache,
slots and blocks reused as requests end), each produce exactly transformers' greedy `generate` of
that request alone. Tiny Mixtral, Qwen3-MoE and OLMoE checkpoints, TP and EP, three virtual ranks
(threads); the gloo processes run the same through `pyengine serve` (tests/serve/test_cli_serve.py).
Seeded sampling is reproducible alone and in a full batch, on the real engine."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import on_threads
from pyengine.model.checkpoint import open_checkpoint
from pyengine.model.hf_config import deployment_spec
from pyengine.serve.engine_api import ServingEngine
from pyengine.serve.engine_loop import ServeCapacity
from pyengine.serve.params import SamplingParams
from pyengine.transport.local import LocalTransport

LAYOUTS = {
    "tp": [{"name": "embed", "gpus": [0]}, {"name": "experts", "gpus": [1, 2], "tensor_parallel_size": 2},
           {"name": "output", "gpus": [0]}],
    "ep": [{"name": "embed", "gpus": [0]},
           {"name": "experts", "gpus": [0, 1, 2], "parallel_mode": "expert", "expert_ids": [[4], [0, 2], [1, 3]]},
           {"name": "output", "gpus": [0]}],
}
REQUESTS = [(1 + (5 * i) % 13, 1 + (3 * i) % 7) for i in range(17)]
"""(prompt length, max_new_tokens) of each request: 1..13 prompt tokens, 1..7 new ids."""
ARRIVE_EVERY = 2
"""A request arrives every this many steps (several wait while others run)."""


def prompt(i: int, n: int) -> torch.Tensor:
    """Ids in [3, 37): never transformers' pad id 0 (generate would mask it out of the attention)."""
    return torch.tensor([3 + (7 * i + 11 * j) % 34 for j in range(n)])


def spec_for(tmp_path, source, name: str):
    path = tmp_path / "layout.json"
    path.write_text(json.dumps({"hardware": {"num_gpus": 3, "gpu_memory_gb": 32},
                                "parallel": {"stages": LAYOUTS[name]},
                                "schedule": {"micro_batches": 2}, "comm": {"timeout_s": 60}}))
    spec = deployment_spec(source.hf, str(path), whole=True, batch=(1, 16))
    return spec.replace(model={"eos_token_ids": None})  # transformers is asked for every new id too


@torch.no_grad()
def transformers_alone(model, ids: torch.Tensor, new: int) -> list[int]:
    out = model.generate(ids[None], max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def serve_on_threads(spec, source, capacity: ServeCapacity, arrivals):
    """Rank 0 submits each (step, prompt, params) of `arrivals` at its step and steps until all
    have ended; the others follow. Returns rank 0's (handles, session), the others' sessions."""
    transports = LocalTransport.create(3, "cpu", 60)

    def body(rank):
        engine = ServingEngine(spec, transports[rank], source=source)
        session = engine.start_serving(capacity)
        if rank != 0:
            engine.follow()
            return session
        handles, step, pending = [], 0, sorted(arrivals, key=lambda a: a[0])
        while True:
            while pending and pending[0][0] <= step:
                _, p, params = pending.pop(0)
                handles.append(engine.submit(p, params))
            more = engine.step()
            step += 1
            if not more and not pending:
                break
        engine.close_serving()
        return handles, session

    return on_threads(body, timeout_s=300)


CASES = [("mixtral", "tp"), ("qwen3_moe", "ep"), ("olmoe", "tp"), ("mixtral", "ep")]


@pytest.mark.parametrize("family,layout_name", CASES, ids=[f"{f}-{lay}" for f, lay in CASES])
def test_requests_arriving_at_different_steps_equal_transformers_alone(checkpoint, tmp_path, family, layout_name):
    folder, model = checkpoint(family, norm_topk_prob=family == "qwen3_moe")
    source = open_checkpoint(folder)
    spec = spec_for(tmp_path, source, layout_name)
    wanted = [(prompt(i, n), SamplingParams(max_new_tokens=new)) for i, (n, new) in enumerate(REQUESTS)]
    # 6 slots of up to 32 tokens but 9 blocks of 16 (paged: each request reserves 1 or 2 blocks, so
    # admission waits on blocks as well as slots), 9 tokens a step (long prompts go in chunks)
    capacity = ServeCapacity(slots=6, capacity=32, blocks=9, step_tokens=9)

    arrivals = [(i * ARRIVE_EVERY, p, params) for i, (p, params) in enumerate(wanted)]
    out = serve_on_threads(spec, source, capacity, arrivals)
    handles, root = out[0]
    for i, (h, (p, params)) in enumerate(zip(handles, wanted)):
        assert h.result() == transformers_alone(model, p, params.max_new_tokens), i
    plans = root.loop.loop
    assert root.steps == out[1].steps == out[2].steps  # every rank ran every plan
    assert root.loop.blocks_used() == 0
    for follower in out[1:]:
        assert follower.loop.loop.blocks.table == plans.blocks.table


def test_seeded_sampling_is_the_same_alone_and_in_a_full_batch(checkpoint, tmp_path):
    folder, _ = checkpoint("olmoe")
    source = open_checkpoint(folder)
    spec = spec_for(tmp_path, source, "tp")
    capacity = ServeCapacity(slots=8, capacity=32, step_tokens=16)
    params = SamplingParams(max_new_tokens=6, temperature=1.2, top_k=20, top_p=0.9, seed=12345)
    alone = serve_on_threads(spec, source, capacity, [(0, prompt(0, 5), params)])
    crowd = [(0, prompt(i, 3 + i), SamplingParams(max_new_tokens=6, temperature=0.8, seed=i)) for i in range(1, 8)]
    full = serve_on_threads(spec, source, capacity, crowd[:3] + [(0, prompt(0, 5), params)] + crowd[3:])
    solo_ids = alone[0][0][0].result()
    assert full[0][0][3].result() == solo_ids and len(solo_ids) == 6
    assert len({tuple(h.result()) for h in full[0][0]}) > 1  # the crowd drew ids of its own


def test_the_python_api_iterating_a_handle_steps_for_it(checkpoint, tmp_path):
    import pyengine
    from pyengine.core.errors import InputError

    folder, model = checkpoint("mixtral")
    source = open_checkpoint(folder)
    spec = spec_for(tmp_path, source, "tp")
    transports = LocalTransport.create(3, "cpu", 60)
    ids = prompt(4, 6)

    def body(rank):
        engine = pyengine.Engine(spec, transports[rank], source=source)
        with pytest.raises(InputError, match="capacity = 'str': must be a ServeCapacity"):
            engine.start_serving("big")
        engine.start_serving(ServeCapacity(slots=2, capacity=32, step_tokens=4))
        if rank != 0:
            engine.follow()
            return None
        streamed = list(engine.submit(ids, SamplingParams(max_new_tokens=5)))
        engine.close_serving()
        return streamed

    assert on_threads(body, timeout_s=300)[0] == transformers_alone(model, ids, 5)
