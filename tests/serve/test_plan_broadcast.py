"""A StepPlan through the int64 codec and the broadcast: the round trip is the identity, a damaged
tensor is refused, and a session on three virtual ranks (threads, the local transport) runs the
same plans on every rank, so the ranks' block allocators agree."""

import random

import pytest
import torch

from fake_step_loop import FakeStepLoop, TinyModel
from helpers import on_threads
from pyengine.execute.step_plan import GREEDY, Sampling, SeqWork, StepPlan
from pyengine.serve import plan_codec
from pyengine.serve.channel import Kind, PlanChannel
from pyengine.serve.params import SamplingParams
from pyengine.serve.scheduler import Limits
from pyengine.serve.session import Session
from pyengine.transport.local import LocalTransport


def random_plan(rng: random.Random) -> StepPlan:
    work = []
    for slot in rng.sample(range(40), rng.randint(0, 9)):
        n = rng.choice([1, 1, 2, 7, 33])
        sampling = GREEDY if rng.random() < 0.3 else Sampling(rng.choice([0.1, 0.7, 1.0, 1e-7, 2.0]),
                                                              rng.randint(0, 50000), rng.choice([1.0, 0.9, 1e-9]),
                                                              rng.randint(0, 2**63 - 1))
        work.append(SeqWork(slot, tuple(rng.randint(0, 150000) for _ in range(n)), rng.randint(0, 4000),
                            rng.random() < 0.8, sampling, rng.randint(0, 10**6)))
    return StepPlan(tuple(work), tuple(rng.sample(range(40), rng.randint(0, 3))))


@pytest.mark.parametrize("seed", range(20))
def test_codec_round_trip_is_the_identity(seed):
    plan = random_plan(random.Random(seed))
    data = plan_codec.encode(plan)
    assert data.dtype == torch.int64 and data.dim() == 1 and data.numel() == plan_codec.encoded_words(plan)
    assert plan_codec.decode(data) == plan


def test_codec_edges():
    for plan in [StepPlan(()), StepPlan((), (3, 1)),
                 StepPlan((SeqWork(0, (5,), 0, True, Sampling(0.1, 0, 0.30000000000000004, 0), 0),))]:
        assert plan_codec.decode(plan_codec.encode(plan)) == plan


def test_codec_refuses_a_damaged_tensor():
    data = plan_codec.encode(random_plan(random.Random(3)))
    with pytest.raises(plan_codec.PlanCodecError, match="version 1 expected"):
        plan_codec.decode(torch.cat([torch.tensor([9]), data[1:]]))
    with pytest.raises(plan_codec.PlanCodecError, match="its head says"):
        plan_codec.decode(data[:-1])
    bad = data.clone()
    bad[1] += 1  # one more work than there is
    with pytest.raises(plan_codec.PlanCodecError):
        plan_codec.decode(bad)


def test_the_channel_delivers_every_message_in_order():
    transports = LocalTransport.create(3, "cpu", timeout_s=20)
    plans = [random_plan(random.Random(s)) for s in range(6)]
    sent = [(Kind.PLAN, plans[0]), (Kind.IDLE, None), (Kind.PLAN, plans[1]), (Kind.PLAN, plans[2]),
            (Kind.IDLE, None), (Kind.STOP, None)]

    def body(rank):
        ch = PlanChannel(transports[rank], 0, 3, timeout_s=20)
        if rank == 0:
            for kind, plan in sent:
                ch.send(kind, plan)
            return sent
        got = []
        while True:
            m = ch.receive()
            got.append((m.kind, m.plan))
            if m.kind is Kind.STOP:
                return got

    out = on_threads(body, 3, timeout_s=60)
    assert out[1] == out[2] == sent


def test_a_session_on_three_ranks_runs_the_same_plans_everywhere():
    transports = LocalTransport.create(3, "cpu", timeout_s=20)
    model = TinyModel(29)
    loops = [FakeStepLoop(model, blocks=24, block_size=4, slots=4) for _ in range(3)]
    limits = Limits(slots=4, blocks=24, block_size=4, step_tokens=6, vocab_size=29)
    prompts = [[(i * 3 + j) % 29 for j in range(2 + i % 5)] for i in range(9)]
    params = [SamplingParams(max_new_tokens=2 + i % 4, temperature=0.5 * (i % 2), seed=i) for i in range(9)]

    def body(rank):
        session = Session(loops[rank], limits, channel=PlanChannel(transports[rank], 0, 3, 20))
        if rank != 0:
            session.follow()
            return None
        handles = [session.submit(p, q) for p, q in zip(prompts, params)]
        results = [h.result() for h in handles]
        session.step()  # nothing left: an IDLE message the followers take in stride
        session.close()
        return results

    results = on_threads(body, 3, timeout_s=120)[0]
    assert results == [model.solo(p, q) for p, q in zip(prompts, params)]
    assert loops[0].plans == loops[1].plans == loops[2].plans
    assert loops[0].blocks.history == loops[1].blocks.history == loops[2].blocks.history
    assert loops[0].plans[-1].release  # the last request's slot went back with a plan


def test_only_the_scheduling_rank_takes_requests():
    transports = LocalTransport.create(2, "cpu", timeout_s=5)
    limits = Limits(slots=2, blocks=8, block_size=4, step_tokens=4)
    follower = Session(FakeStepLoop(TinyModel()), limits, channel=PlanChannel(transports[1], 0, 2, 5))
    from pyengine.core.errors import InputError

    with pytest.raises(InputError, match="submit = 'rank 1': requests go to the scheduling rank \\(0\\)"):
        follower.submit([1, 2])
