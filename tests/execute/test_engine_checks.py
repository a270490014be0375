"""The Python API checks what the CLI checks, before any rank works: Engine's arguments, ready-made
weights, the transport's size and groups, ids of any integer dtype, generate's prompts (read once,
the same on every rank) and its KV cache against free memory. Each refusal is one InputError naming
the argument and its value (found by a hostile pass over the API; each failed before its fix)."""

from __future__ import annotations

import re

import pytest
import torch

from helpers import each_rank
from pyengine.core.errors import InputError, ResourceError, SpecError
from pyengine.core.spec import load_spec
from pyengine.execute.engine import Engine
from pyengine.model.weights import init_weights, make_tokens, rank_weights
from pyengine.transport.base import TransportError
from pyengine.transport.local import LocalTransport

TINY = load_spec("tiny_cpu")
LAYERED = TINY.replace(model={"num_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                              "head_dim": 6}, comm={"timeout_s": 20})


# ---- Engine's own arguments ---------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,field", [
    (dict(source="/some/checkpoint"), "source"),   # a path, not a source: open_checkpoint(...)
    (dict(source=5), "source"),                    # not read as a seed
    (dict(seed="x"), "seed"),
    (dict(seed=1.5), "seed"),
    (dict(device="meta"), "device"),
    (dict(device="bogus"), "device"),
])
def test_bad_engine_arguments_are_named(kwargs, field):
    tr = LocalTransport.create(3, "cpu", 5)
    with pytest.raises(InputError) as e:
        Engine(TINY, tr[0], **kwargs)
    assert e.value.field == field, e.value
    if kwargs.get("source") == "/some/checkpoint":
        assert "open_checkpoint" in str(e.value)


@pytest.mark.parametrize("spec,transport,field", [
    (TINY.to_dict(), "ok", "spec"),
    (TINY, None, "transport"),
    (TINY, "list", "transport"),
    (TINY, "four", "transport.world_size"),
])
def test_bad_spec_or_transport_is_named(spec, transport, field):
    trs = LocalTransport.create(3, "cpu", 5)
    tr = {"ok": trs[0], "list": trs, "four": LocalTransport.create(4, "cpu", 5)[0], None: None}[transport]
    with pytest.raises(InputError) as e:
        Engine(spec, tr)
    assert e.value.field == field, e.value


def test_a_transport_without_the_reduction_group_is_refused_up_front():
    spec = TINY.replace(comm={"boundary": "all_reduce"})
    trs = LocalTransport.create(3, "cpu", 5)
    world = tuple(range(3))
    trs[1].has_group = lambda g: g == world  # as a gloo transport created with groups=[] would say
    with pytest.raises(InputError, match=r"no group \(1, 2\).*groups=spec.comm_groups\(\)"):
        Engine(spec, trs[1])
    Engine(spec.replace(comm={"boundary": "partials"}), trs[1])  # partials: no collective, fine


# ---- ready-made weights ---------------------------------------------------------------------------
def test_ready_made_weights_must_be_this_ranks_shard():
    tr = LocalTransport.create(3, "cpu", 5)
    full = init_weights(TINY, seed=3)  # every tensor unsharded: wrong for a TP rank
    with pytest.raises(InputError, match=r"weights\['w_gate'\] = .*rank 1 holds \[5, 48, 16\]"):
        Engine(TINY, tr[1], weights=full)
    mine = rank_weights(TINY, 3, 1)
    Engine(TINY, tr[1], weights=mine)  # exactly rank_weights: accepted
    for bad, match in [({k: v for k, v in mine.items() if k != "w_down"}, r"weights\['w_down'\] = 'NoneType'"),
                       ({**mine, "w_up": mine["w_up"].half()}, r"torch.float16.*holds .*torch.float32"),
                       ({**mine, "extra": mine["w_up"]}, r"weights = 'extra': is not a tensor rank 1 holds")]:
        with pytest.raises(InputError, match=match):
            Engine(TINY, tr[1], weights=bad)


# ---- ids and prompts --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.uint8, torch.int32])
def test_any_integer_dtype_of_ids_gives_the_int64_logits(dtype):
    spec = TINY.replace(model={"vocab_size": 100})  # ids fit int8
    ids = make_tokens(spec, seed=3)
    trs = LocalTransport.create(3, "cpu", 20)
    engines = each_rank(lambda r: Engine(spec, trs[r], seed=3))
    want = each_rank(lambda r: engines[r].forward(ids))[0]
    got = each_rank(lambda r: engines[r].forward(ids.to(dtype)))
    assert not any(isinstance(g, Exception) for g in got), got
    torch.testing.assert_close(got[0], want, rtol=0, atol=0)


def test_generate_reads_an_iterator_of_prompts_once():
    trs = LocalTransport.create(3, "cpu", 20)
    prompts = [torch.tensor([3, 17, 5]), torch.tensor([12, 4])]
    out = each_rank(lambda r: Engine(LAYERED, trs[r], seed=3).generate(iter(prompts), 2))
    assert not any(isinstance(o, Exception) for o in out), out
    assert [len(s) for s in out[0]] == [5, 4] and all(s.dtype == torch.int64 and s.device.type == "cpu"
                                                      for s in out[0])


def test_generate_refuses_one_tensor_and_names_its_own_arguments():
    trs = LocalTransport.create(3, "cpu", 20)
    engines = each_rank(lambda r: Engine(LAYERED, trs[r], seed=3))
    for bad, words in [((torch.tensor([3, 17, 5]), 2), r"^prompts = .*one tensor of shape \[3\].*\[ids\]"),
                       (([torch.tensor([3])], 0), r"^max_new_tokens = 0")]:
        out = each_rank(lambda r: engines[r].generate(*bad))
        assert all(isinstance(o, InputError) and re.search(words, str(o)) for o in out), out
    assert all(e.last_generation is None and e.last is None for e in engines)


def test_one_ranks_invalid_prompt_is_refused_on_every_rank_at_once():
    """Rank 1 alone passes an id outside the vocabulary: it names it, the others say a rank refused,
    all within moments (they used to wait out the transport's timeout for rank 1, then abort)."""
    import time

    trs = LocalTransport.create(3, "cpu", 60)
    engines = each_rank(lambda r: Engine(LAYERED, trs[r], seed=3))
    start = time.monotonic()
    out = each_rank(lambda r: engines[r].generate([torch.tensor([3, 17, 10**6 if r == 1 else 5])], 2))
    assert time.monotonic() - start < 30  # far below the 60 s timeout
    assert isinstance(out[1], InputError) and "outside the vocabulary" in str(out[1]), out
    assert all(isinstance(out[r], InputError) and "prompts = 'refused on 1 rank(s)'" in str(out[r]) for r in (0, 2)), out
    same = each_rank(lambda r: engines[r].generate([torch.tensor([3, 17, 5])], 2))  # and the engines still work
    assert all(torch.equal(s[0], same[0][0]) for s in same)


def test_a_wrong_shaped_forward_input_is_an_input_error():
    engine = Engine(TINY, LocalTransport.create(3, "cpu", 5)[0], seed=3)
    m = TINY.model
    with pytest.raises(InputError, match=rf"^ids.shape = \(1, 5\): must be \(batch_size, seq_len\) = "
                                         rf"\({m.batch_size}, {m.seq_len}\)"):
        engine.forward(torch.zeros(1, 5, dtype=torch.int64))


def test_different_prompts_on_different_ranks_are_refused_on_every_rank():
    trs = LocalTransport.create(3, "cpu", 20)
    engines = each_rank(lambda r: Engine(LAYERED, trs[r], seed=3))
    prompts = lambda r: [torch.tensor([3, 17, 6 if r == 0 else 5])]  # same lengths, rank 0 differs
    out = each_rank(lambda r: engines[r].generate(prompts(r), 2))
    assert all(isinstance(o, InputError) and "2 rank(s) differ from rank 0" in str(o) for o in out), out
    same = each_rank(lambda r: engines[r].generate(prompts(1), 2))  # and the engines still work
    assert all(torch.equal(s[0], same[0][0]) for s in same)


def test_a_kv_cache_larger_than_memory_is_refused_on_every_rank_before_any_work():
    huge = LAYERED.replace(model={"num_attention_heads": 64, "num_key_value_heads": 64, "head_dim": 256})
    trs = LocalTransport.create(3, "cpu", 20)
    engines = each_rank(lambda r: Engine(huge, trs[r], seed=3))
    out = each_rank(lambda r: engines[r].generate([torch.tensor([3, 17])], 10 ** 6))
    assert all(isinstance(o, ResourceError) and "rank 0's KV cache" in str(o) for o in out), out
    assert all(e.last_generation is None for e in engines)


# ---- transports and specs -----------------------------------------------------------------------------
@pytest.mark.parametrize("args,match", [
    (("3",), "world_size = '3'"), ((2.5,), "world_size = 2.5"), ((None,), "world_size = None"),
    ((3, "cpu", 0), "timeout_s = 0"), ((3, "cpu", -1), "timeout_s = -1"),
    ((3, "cpu", float("nan")), "timeout_s = nan"), ((3, "nonsense"), "device = 'nonsense'"),
    ((3, "meta"), "device = 'meta': must be 'cpu' or a CUDA device"),
])
def test_local_transport_create_names_a_bad_argument(args, match):
    with pytest.raises(TransportError, match=match):
        LocalTransport.create(*args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_local_transport_on_cuda_without_cuda_says_so():
    with pytest.raises(TransportError, match="torch sees no CUDA device here"):
        LocalTransport.create(3, "cuda")


def test_spec_replace_and_load_spec_name_a_wrong_type():
    with pytest.raises(SpecError, match=r"^model = 5: must be a dict"):
        TINY.replace(model=5)
    for bad in ({}, 3, b"tiny_cpu"):
        with pytest.raises(SpecError, match=r"^config = .*must be a file path, a packaged spec's name"):
            load_spec(bad)


def test_generate_takes_a_numpy_integer_for_max_new_tokens():
    import numpy as np

    trs = LocalTransport.create(3, "cpu", 20)
    out = each_rank(lambda r: Engine(LAYERED, trs[r], seed=3).generate([torch.tensor([3, 17])], np.int64(2)))
    assert not any(isinstance(o, Exception) for o in out), out
    assert len(out[0][0]) == 4


def test_meta_ids_are_refused_before_any_work():
    engine = Engine(TINY, LocalTransport.create(3, "cpu", 5)[0], seed=3)
    with pytest.raises(InputError, match=r"^ids = 'a meta tensor': holds no values"):
        engine.forward(make_tokens(TINY).to("meta"))


def test_sparse_ids_and_prompts_are_refused_before_any_work():
    engine = Engine(TINY, LocalTransport.create(3, "cpu", 5)[0], seed=3)
    with pytest.raises(InputError, match=r"^ids = 'a sparse_coo tensor': token ids must be a dense tensor"):
        engine.forward(make_tokens(TINY).to_sparse())
    layered = Engine(LAYERED, LocalTransport.create(3, "cpu", 5)[0], seed=3)
    with pytest.raises(InputError, match=r"^prompts\[0\] = 'a sparse_coo tensor': token ids must be a dense"):
        layered.generate([torch.tensor([3, 17]).to_sparse()], 2)
