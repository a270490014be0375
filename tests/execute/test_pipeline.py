"""The pipeline end to end against a reference written in the tests (tests/references.py: one
token and one chosen expert at a time, every F column, float64), which shares no code with the
stages, and against transformers' MixtralSparseMoeBlock + MixtralRMSNorm (tests/hf_mixtral.py).

The gloo cases run 3 real processes; one spawn runs the whole matrix of layouts so the
suite stays fast. The local-transport cases run the same matrix with 3 threads on CPU.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import references

from pyengine.core.errors import InputError
from pyengine.core.spec import DeploymentSpec, load_spec
from pyengine.execute.engine import Engine
from pyengine.execute.procs import spawn_ranks
from pyengine.model import weights as model
from pyengine.model.stages import Shard
from pyengine.transport.store import connect_store
from helpers import on_threads, small_spec

FP32_ATOL = FP32_RTOL = 1e-5  # fp32 logits ~N(0, 1); only summation order differs


def _layout(experts: list[int], fractions=None) -> dict:
    st = {"name": "experts", "gpus": experts, "tensor_parallel_size": len(experts)}
    if fractions:
        st["shard_fractions"] = fractions
    return {"stages": [{"name": "embed", "gpus": [0]}, st, {"name": "output", "gpus": [0]}]}


def _specs() -> list[tuple[str, DeploymentSpec]]:
    base = small_spec()
    cases = []
    for kind in ("gpipe", "asready"):
        for m in (1, 3, 4):  # 3 does not divide the 26 tokens: uneven micro-batches
            cases.append((f"{kind}-m{m}", base.replace(schedule={"kind": kind, "micro_batches": m})))
    cases.append(("uneven-tp", base.replace(parallel=_layout([1, 2], [0.3, 0.7]))))
    for b in ("partials", "reduce_scatter"):  # 13-token micro-batches: odd reduce-scatter split
        cases.append((f"boundary-{b}", base.replace(comm={"boundary": b}, schedule={"micro_batches": 2})))
    cases.append(("gpu0-takes-a-slice", base.replace(parallel=_layout([0, 1, 2], [0.2, 0.4, 0.4]),
                                                     comm={"boundary": "partials"})))
    cases.append(("no-overlap", base.replace(comm={"overlap": False})))
    return cases


CASES = _specs()


@functools.lru_cache(maxsize=None)
def _reference(spec: DeploymentSpec) -> np.ndarray:
    m = spec.model
    w = model.init_weights(spec, seed=3)
    logits = references.moe_block(w, model.make_tokens(spec, seed=3), m.top_k, m.norm_eps)
    return logits.reshape(m.batch_size, m.seq_len, m.vocab_size).numpy()


def _gloo_rank(rank: int, world: int, port: int, spec_jsons: list[str]) -> list:
    from pyengine.transport import create_transport

    store = connect_store(rank, world, port, timeout_s=30)
    groups = [(0, 1, 2), (1, 2)]
    out = []
    with create_transport("gloo", rank=rank, world_size=world, device="cpu", groups=groups,
                          store=store, timeout_s=20) as tr:
        for js in spec_jsons:
            spec = DeploymentSpec.from_json(js)
            logits = Engine(spec, tr, seed=3).forward(model.make_tokens(spec, seed=3))
            out.append(None if logits is None else logits.numpy())
    return out


@pytest.fixture(scope="module")
def gloo_results():  # one spawn of 3 gloo processes runs every case
    return spawn_ranks(_gloo_rank, 3, args=([s.to_json() for _, s in CASES],), timeout_s=240)[0]


@pytest.mark.slow
@pytest.mark.parametrize("i", range(len(CASES)), ids=[n for n, _ in CASES])
def test_gloo_pipeline_matches_reference(gloo_results, i):
    spec = CASES[i][1]
    got = gloo_results[i]
    assert got is not None and got.shape == (2, 13, 37)
    np.testing.assert_allclose(got, _reference(spec), atol=FP32_ATOL, rtol=FP32_RTOL)


@functools.lru_cache(maxsize=None)
def _local_run(i: int) -> list:
    """Logits of case i from 3 virtual ranks (threads) on the local transport, per rank."""

    from pyengine.transport.local import LocalTransport

    spec = CASES[i][1]
    transports = LocalTransport.create(3, "cpu", 20)
    return on_threads(lambda r: Engine(spec, transports[r], seed=3).forward(model.make_tokens(spec, seed=3)))


@pytest.mark.parametrize("i", range(len(CASES)), ids=[n for n, _ in CASES])
def test_local_transport_threads_match_reference(i):
    out = _local_run(i)
    np.testing.assert_allclose(out[0].numpy(), _reference(CASES[i][1]), atol=FP32_ATOL, rtol=FP32_RTOL)
    assert out[1] is None and out[2] is None  # logits live on the output rank only


@pytest.mark.parametrize("i", range(len(CASES)), ids=[n for n, _ in CASES])
def test_local_transport_threads_match_transformers(i):
    pytest.importorskip("transformers")
    from hf_mixtral import hf_forward

    spec = CASES[i][1]
    m = spec.model
    w = model.init_weights(spec, seed=3)
    want = hf_forward(w, model.make_tokens(spec, seed=3), m.top_k, m.norm_eps)
    got = _local_run(i)[0].reshape(want.shape)
    torch.testing.assert_close(got, want, atol=FP32_ATOL, rtol=FP32_RTOL)


def test_reference_is_not_trivially_equal_to_a_wrong_pipeline():
    # Guard against a test that cannot fail: dropping one TP shard must change the logits.
    spec = CASES[0][1]
    m = spec.model
    w = model.init_weights(spec, seed=3)
    ids = model.make_tokens(spec, seed=3)
    full = references.moe_block(w, ids, m.top_k, m.norm_eps)
    w_half = dict(w, w_down=w["w_down"].clone())
    w_half["w_down"][:, 15:, :] = 0
    assert (references.moe_block(w_half, ids, m.top_k, m.norm_eps) - full).abs().max() > 1e-2


def test_engine_rejects_wrong_token_shape():
    from pyengine.transport.local import LocalTransport

    spec = CASES[0][1]
    eng = Engine(spec, LocalTransport.create(3, "cpu", 5)[1], seed=3)
    with pytest.raises(InputError, match=r"ids.shape = \(1, 13\)"):
        eng.forward(torch.zeros(1, 13, dtype=torch.int64))


@pytest.mark.parametrize("bad,words", [(-1, "ids = -1: id at position [0, 4]"),
                                       (37, "ids = 37: id at position [0, 4]"),
                                       ("float", "ids = 'torch.float32': token ids must be integers")])
def test_engine_checks_ids_like_the_cli_before_any_rank_works(monkeypatch, bad, words):
    from pyengine.core.errors import InputError
    from pyengine.transport.local import LocalTransport

    spec = CASES[0][1]
    eng = Engine(spec, LocalTransport.create(3, "cpu", 5)[0], seed=3)
    monkeypatch.setattr(eng._runtime, "forward", lambda ids: pytest.fail("the rank ran"))
    ids = torch.zeros(2, 13, dtype=torch.int64)
    if bad == "float":
        ids = ids.float()
    else:
        ids[0, 4] = bad
    with pytest.raises(InputError) as e:
        eng.forward(ids)
    assert words in str(e.value)


def test_seed_weights_are_deterministic_and_shardable():
    spec = load_spec()
    small = spec.replace(model={"hidden_size": 16, "ffn_hidden_size": 12, "vocab_size": 10})
    a = model.weight(small, 5, "w_up")
    b = model.weight(small, 5, "w_up", shard=Shard(f_cols=(6, 12)))
    assert torch.equal(a[:, :, 6:12], b)
    assert torch.equal(model.init_weights(small, 5)["embed"], model.init_weights(small, 5)["embed"])
    assert not torch.equal(model.weight(small, 5, "embed"), model.weight(small, 6, "embed"))
