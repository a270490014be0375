"""The scheduler and the session over a fake step loop (tests/fake_step_loop.py): continuous batching
gives every request exactly what it gives alone, the token budget holds, prefill is chunked and
mixed with decode, admission reserves KV blocks and never overcommits, finished and aborted
requests free their slot and blocks at once and the blocks are reused."""

import pytest

from fake_step_loop import FakeStepLoop, TinyModel
from pyengine.core.errors import InputError
from pyengine.serve.params import SamplingParams
from pyengine.serve.request import Finish
from pyengine.serve.scheduler import Limits
from pyengine.serve.session import Session

VOCAB = 29


def make(blocks=64, block_size=4, slots=8, step_tokens=16, max_positions=None, stop_ids=()):
    model = TinyModel(VOCAB)
    loop = FakeStepLoop(model, blocks=blocks, block_size=block_size, slots=slots)
    limits = Limits(slots=slots, blocks=blocks, block_size=block_size, step_tokens=step_tokens,
                    max_positions=max_positions, vocab_size=VOCAB)
    return model, loop, Session(loop, limits, stop_ids=stop_ids)


def prompt(n, start=3):
    return [(start + 5 * i) % VOCAB for i in range(n)]


def run_all(session, limit=10_000):
    for _ in range(limit):
        if not session.step() and not session.has_work():
            return
    raise AssertionError("the session did not drain")


def test_requests_arriving_at_different_steps_each_get_their_solo_output():
    model, loop, session = make(slots=6, step_tokens=10)
    specs = [(1 + (7 * i) % 19, 1 + (5 * i) % 9) for i in range(18)]  # prompt lengths 1..19, 1..9 new
    handles, params = [], []
    for i, (n, new) in enumerate(specs):
        p = SamplingParams(max_new_tokens=new) if i % 3 else SamplingParams(max_new_tokens=new, temperature=0.9,
                                                                            top_p=0.8, top_k=7, seed=100 + i)
        handles.append(session.submit(prompt(n, start=i), p))
        params.append(p)
        for _ in range(i % 3):  # arrivals spread over steps
            session.step()
    run_all(session)
    for i, (h, (n, new)) in enumerate(zip(handles, specs)):
        assert h.result() == model.solo(prompt(n, start=i), params[i]), i
        assert h.finish is Finish.LENGTH
    assert loop.blocks.used == 0 and loop.blocks.free == 64  # every block back


def test_each_plan_keeps_the_budget_decodes_first_and_chunks_long_prompts():
    model, loop, session = make(slots=4, step_tokens=6)
    long = session.submit(prompt(17), SamplingParams(max_new_tokens=3))
    short = [session.submit(prompt(2, start=s), SamplingParams(max_new_tokens=5)) for s in range(3)]
    run_all(session)
    assert long.result() == model.solo(prompt(17), SamplingParams(max_new_tokens=3))
    chunks = [w for plan in loop.plans for w in plan.work if w.slot == 0 and not w.decode]
    assert [len(w.tokens) for w in chunks] == [6, 6, 5]  # 17 prompt tokens over three steps
    assert [w.sample for w in chunks] == [False, False, True]  # only the last chunk draws
    for plan in loop.plans:
        assert sum(len(w.tokens) for w in plan.work) <= 6
        kinds = [w.decode for w in plan.work]
        assert kinds == sorted(kinds, reverse=True)  # decodes, then prefill chunks
    mixed = [p for p in loop.plans if any(w.decode for w in p.work) and any(not w.decode for w in p.work)]
    assert mixed  # chunked prefill shares steps with decodes


def test_admission_reserves_prompt_plus_new_tokens_and_never_overcommits():
    # 12 blocks of 4: each request reserves ceil((6 + 6) / 4) = 3 blocks, so 4 run at once
    model, loop, session = make(blocks=12, block_size=4, slots=8, step_tokens=8)
    handles = [session.submit(prompt(6, start=i), SamplingParams(max_new_tokens=6)) for i in range(10)]
    most = 0
    for _ in range(500):
        if not session.step() and not session.has_work():
            break
        most = max(most, len(session.scheduler.running))
        assert session.scheduler.reserved <= 12 and loop.blocks.used <= 12
    assert most == 4
    for i, h in enumerate(handles):
        assert h.result() == model.solo(prompt(6, start=i), SamplingParams(max_new_tokens=6))


def test_a_long_request_and_many_short_ones_share_the_cache_and_freed_blocks_are_reused():
    model, loop, session = make(blocks=20, block_size=4, slots=5, step_tokens=8)
    long = session.submit(prompt(30), SamplingParams(max_new_tokens=10))  # 10 of the 20 blocks
    short = [session.submit(prompt(3, start=s), SamplingParams(max_new_tokens=4)) for s in range(12)]
    run_all(session)
    assert long.result() == model.solo(prompt(30), SamplingParams(max_new_tokens=10))
    for s, h in enumerate(short):
        assert h.result() == model.solo(prompt(3, start=s), SamplingParams(max_new_tokens=4))
    tables = [table for _, table in loop.blocks.history]
    seen, reused = set(), set()
    for table in tables:
        reused |= seen & set(table)
        seen |= set(table)
    assert reused  # a later sequence's block table holds blocks a finished one had
    assert max(len(t) for t in tables) >= 10  # the long one's table
    assert loop.blocks.used == 0


def test_stop_ids_end_a_request_and_are_its_last_id():
    model, loop, session = make()
    free_run = model.solo(prompt(5), SamplingParams(max_new_tokens=12))
    stop = free_run[3]
    h = session.submit(prompt(5), SamplingParams(max_new_tokens=12, stop_token_ids=[stop]))
    run_all(session)
    first = free_run.index(stop)
    assert h.result() == free_run[:first + 1] and h.finish is Finish.STOP
    _, _, with_eos = make(stop_ids=[stop])  # the model's end-of-sequence ids stop it too
    h2 = with_eos.submit(prompt(5), SamplingParams(max_new_tokens=12))
    run_all(with_eos)
    assert h2.result() == free_run[:first + 1]


def test_aborts_free_the_slot_and_blocks_at_the_next_step():
    model, loop, session = make(blocks=12, block_size=4, slots=2, step_tokens=8)
    running = session.submit(prompt(8), SamplingParams(max_new_tokens=36))  # reserves 11 of 12 blocks
    waiting = session.submit(prompt(4), SamplingParams(max_new_tokens=4))
    behind = session.submit(prompt(4, start=2), SamplingParams(max_new_tokens=4))
    session.step()
    session.step()
    assert loop.blocks.used > 0 and len(session.scheduler.running) == 1  # the next needs 2: it waits
    waiting.abort()
    running.abort()
    session.step()  # the aborts apply; the release goes with this plan
    assert running.finish is Finish.ABORT and waiting.finish is Finish.ABORT
    assert len(running.result()) < 36 and waiting.result() == []
    run_all(session)
    assert behind.result() == model.solo(prompt(4, start=2), SamplingParams(max_new_tokens=4))
    assert loop.blocks.used == 0


def test_a_request_that_can_never_fit_is_refused_at_submission():
    _, _, session = make(blocks=8, block_size=4, max_positions=40)
    with pytest.raises(InputError, match=r"prompt_ids = 30: tokens \+ max_new_tokens 11 = 41 exceed the model's 40 positions"):
        session.submit(prompt(30), SamplingParams(max_new_tokens=11))
    with pytest.raises(InputError, match="= 33 need 9 KV blocks of 4 tokens; the whole KV cache has 8"):
        session.submit(prompt(30), SamplingParams(max_new_tokens=3))
    with pytest.raises(InputError, match=r"prompt_ids\[1\] = 29: must be in \[0, 29\)"):
        session.submit([1, 29], SamplingParams())
    with pytest.raises(InputError, match="prompt_ids = \\[\\]: needs at least one token id"):
        session.submit([], SamplingParams())
    with pytest.raises(InputError, match=r"stop_token_ids\[0\] = 99: must be < the vocabulary's 29"):
        session.submit([1], SamplingParams(stop_token_ids=[99]))


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_new_tokens=0), "max_new_tokens = 0: must be in [1, "),
    (dict(temperature=-0.1), "temperature = -0.1: must be in [0, 100]"),
    (dict(temperature=float("nan")), "temperature = nan: must be a finite number"),
    (dict(top_p=0.0), "top_p = 0.0: must be in (0, 1]"),
    (dict(top_k=-1), "top_k = -1: must be in [0, "),
    (dict(seed=2**63), "seed = 9223372036854775808: must be in [0, "),
    (dict(stop_token_ids="5"), "stop_token_ids = '5': must be a list of token ids"),
    (dict(stop_token_ids=[3, -1]), "stop_token_ids[1] = -1: must be a non-negative integer"),
])
def test_sampling_params_name_the_field(kwargs, message):
    with pytest.raises(InputError) as e:
        SamplingParams(**kwargs)
    assert str(e.value).startswith(message)


def test_limits_need_a_budget_of_at_least_one_token_per_slot():
    with pytest.raises(InputError, match="step_tokens = 3: must be >= slots \\(4\\)"):
        Limits(slots=4, blocks=8, block_size=4, step_tokens=3)


def test_iterating_a_handle_drives_the_steps_and_yields_ids_as_they_come():
    model, loop, session = make()
    h = session.submit(prompt(4), SamplingParams(max_new_tokens=5))
    seen = []
    for token in h:
        seen.append(token)
        assert len(loop.plans) == len(seen)  # one step per new id: streamed, not batched at the end
    assert seen == model.solo(prompt(4), SamplingParams(max_new_tokens=5))


def test_the_same_seed_draws_the_same_ids_alone_and_in_a_full_batch():
    params = SamplingParams(max_new_tokens=8, temperature=1.1, top_k=12, top_p=0.95, seed=77)
    model, _, alone = make()
    solo = alone.submit(prompt(6), params)
    run_all(alone)
    _, _, busy = make(slots=8, step_tokens=12)
    others = [busy.submit(prompt(3 + i, start=i), SamplingParams(max_new_tokens=9, temperature=0.8, seed=i))
              for i in range(7)]
    crowded = busy.submit(prompt(6), params)
    run_all(busy)
    assert crowded.result() == solo.result() == model.solo(prompt(6), params)
    assert all(len(o.result()) == 9 for o in others)
