"""pyengine.model.math (the stages' RMSNorm and router) against closed forms written by hand, and
against the independent references of tests/references.py. The stages call these helpers and
nothing else for normalisation and routing, so a bug here changes the pipeline's output only
where a check does not share the helper: these tests are that check."""

import math

import pytest
import torch

import references as ref
from pyengine.model.math import rmsnorm, route

TOLERANCES = {  # rmsnorm/route compute in fp32 and round once to the input dtype
    torch.float32: dict(atol=1e-6, rtol=1e-6),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
}


# ---- rmsnorm: known values -------------------------------------------------------------------
@pytest.mark.parametrize("x,w,eps,want", [
    # mean square 12.5 -> divide by sqrt(12.5): the 3-4-5 row
    ([3.0, 4.0], [1.0, 1.0], 0.0, [3 / math.sqrt(12.5), 4 / math.sqrt(12.5)]),
    # mean square 1, eps 3: divide by sqrt(1 + 3) = 2 (eps inside the root, not added after it)
    ([1.0, -1.0, 1.0, -1.0], [1.0, 1.0, 1.0, 1.0], 3.0, [0.5, -0.5, 0.5, -0.5]),
    # a constant row of 2s has mean square 4 (a mean, not a sum): all ones, then the gain
    ([2.0, 2.0, 2.0, 2.0], [1.0, 2.0, 3.0, -4.0], 0.0, [1.0, 2.0, 3.0, -4.0]),
    # one non-zero entry of H=4: mean square 16/4 = 4, eps 12 -> divide by 4
    ([0.0, 4.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0], 12.0, [0.0, 5.0, 0.0, 0.0]),
    # a zero row stays zero (eps keeps it finite)
    ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0], 1e-5, [0.0, 0.0, 0.0]),
])
def test_rmsnorm_known_values(x, w, eps, want):
    got = rmsnorm(torch.tensor([x]), torch.tensor(w), eps)
    torch.testing.assert_close(got, torch.tensor([want]), **TOLERANCES[torch.float32])


def test_rmsnorm_normalises_each_row_on_its_own():
    # two rows with different scales: each row's own mean square, not the tensor's
    x = torch.tensor([[1.0, 1.0], [10.0, -10.0]])
    torch.testing.assert_close(rmsnorm(x, torch.ones(2), 0.0), torch.tensor([[1.0, 1.0], [1.0, -1.0]]))


def test_rmsnorm_fp16_computes_in_fp32():
    # 300^2 = 90000 overflows fp16 (max 65504): squaring in fp16 would give inf and zeros
    x = torch.full((1, 4), 300.0, dtype=torch.float16)
    got = rmsnorm(x, torch.ones(4, dtype=torch.float16), 1e-5)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, torch.ones(1, 4, dtype=torch.float16), **TOLERANCES[torch.float16])


def test_rmsnorm_fp16_rounds_once():
    # "computed in fp32, returned in x.dtype": one rounding of the fp32 value, so each element
    # is within half an fp16 ulp of the exact result (plus the fp32 computation's few 2^-24).
    # Rounding the normalised x to fp16 before applying the gain rounds twice and misses this.
    g = torch.Generator().manual_seed(11)
    x = torch.randn(9, 37, generator=g).half()
    w = (1 + 0.3 * torch.randn(37, generator=g)).half()
    exact = ref.rmsnorm(x, w, 1e-5)
    got = rmsnorm(x, w, 1e-5)
    a = exact.abs().half()
    half_ulp = (torch.nextafter(a, torch.full_like(a, float("inf"))).double() - a.double()) / 2
    assert bool(((got.double() - exact).abs() <= half_ulp + 8 * 2.0**-24 * exact.abs()).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,H,eps", [
    (1, 1, 1e-5),  # a single element: x / sqrt(x^2 + eps)
    (7, 48, 1e-5),  # the tiny config's H
    (5, 33, 0.5),  # large eps: its placement shows
])
def test_rmsnorm_matches_independent_reference(T, H, eps, dtype):
    g = torch.Generator().manual_seed(T * 100 + H)
    x = torch.randn(T, H, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(H, generator=g)).to(dtype)
    got = rmsnorm(x, w, eps)
    assert got.dtype == dtype and got.shape == (T, H)
    torch.testing.assert_close(got.double(), ref.rmsnorm(x, w, eps), **TOLERANCES[dtype])


# ---- route: known values ---------------------------------------------------------------------
def _logits_route(logits: list[list[float]], k: int):
    """route() with u = the logits and an identity router, so u @ router = logits exactly."""
    u = torch.tensor(logits, dtype=torch.float32)
    return route(u, torch.eye(u.shape[1]), k)


def test_route_known_probabilities():
    # softmax of log(1..4) = 0.1, 0.2, 0.3, 0.4; top-2 = experts 3, 2 with 0.4, 0.3 -> 4/7, 3/7
    ids, w = _logits_route([[math.log(1), math.log(2), math.log(3), math.log(4)]], 2)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert ids.tolist() == [[3, 2]]
    torch.testing.assert_close(w, torch.tensor([[4 / 7, 3 / 7]]))


def test_route_softmax_is_over_experts_of_each_token():
    # Row 0 favours expert 0, row 1 expert 2. A softmax over tokens (dim 0) would pick
    # by column instead and give other weights.
    ids, w = _logits_route([[2.0, 0.0, 0.0], [0.0, 0.0, 5.0]], 1)
    assert ids.tolist() == [[0], [2]]
    torch.testing.assert_close(w, torch.ones(2, 1))
    ids, w = _logits_route([[math.log(6), math.log(3), 0.0], [0.0, math.log(2), math.log(8)]], 2)
    assert ids.tolist() == [[0, 1], [2, 1]]
    torch.testing.assert_close(w, torch.tensor([[6 / 9, 3 / 9], [8 / 10, 2 / 10]]))


def test_route_k_equals_e_keeps_the_softmax():
    # all experts chosen: the renormalised weights are the softmax itself, largest first
    ids, w = _logits_route([[0.0, math.log(3)]], 2)
    assert ids.tolist() == [[1, 0]]
    torch.testing.assert_close(w, torch.tensor([[0.75, 0.25]]))


def test_route_is_shift_invariant_and_handles_large_logits():
    # softmax(z + c) = softmax(z): logits near 1e4 must not overflow to inf/nan
    ids, w = _logits_route([[10000.0, 10000.0 + math.log(3), 9000.0]], 2)
    assert ids.tolist() == [[1, 0]]
    torch.testing.assert_close(w, torch.tensor([[0.75, 0.25]]))


@pytest.mark.parametrize("T,H,E,k", [
    (1, 8, 1, 1),  # one expert: weight exactly 1
    (26, 24, 5, 2),  # the pipeline tests' shape
    (48, 48, 5, 3),  # k = 3
    (9, 16, 8, 8),  # k = E
])
def test_route_matches_independent_softmax_top_k(T, H, E, k):
    g = torch.Generator().manual_seed(T * 1000 + E * 10 + k)
    u = torch.randn(T, H, generator=g)
    router = torch.randn(H, E, generator=g) / H**0.5
    ids, w = route(u, router, k)
    assert ids.shape == w.shape == (T, k)
    want_ids, want_w = ref.softmax_top_k(u.double() @ router.double(), k)
    assert ids.tolist() == want_ids
    torch.testing.assert_close(w.double(), torch.tensor(want_w, dtype=torch.float64), atol=1e-6, rtol=1e-6)
    # renormalised: every token's k weights sum to one, each in (0, 1], largest first
    torch.testing.assert_close(w.sum(-1), torch.ones(T), atol=1e-6, rtol=0)
    assert bool((w > 0).all()) and bool((w <= 1).all())
    assert bool((w[:, :-1] >= w[:, 1:]).all())
    assert all(len(set(row)) == k for row in ids.tolist())  # k distinct experts


def test_route_ties_go_to_the_lower_expert_id_like_the_references():
    """An exact tie between the k-th and (k+1)-th logits: the engine picks the lower id, as both
    references do (a stable rule; torch.topk promises no order on ties)."""
    from pyengine.model.reference import _top_k

    row = [0.0] * 37 + [1.0, 1.0, 1.0] + [0.0] * 24  # experts 37, 38, 39 tie; k = 2
    logits = [row, row[::-1]]
    ids, _ = _logits_route(logits, 2)
    expected = [[37, 38], [24, 25]]
    assert ids.tolist() == expected
    assert _top_k(torch.tensor(logits), 2, True)[0].tolist() == expected
    assert ref.softmax_top_k(torch.tensor(logits), 2)[0] == expected


@pytest.mark.parametrize("renormalize", [True, False])
def test_route_returns_dense_tensors_the_transports_can_send(renormalize):
    """The ids and weights are sent between ranks as they are; a slice of the sort is strided."""
    ids, w = route(torch.randn(7, 16), torch.randn(16, 5), 2, renormalize=renormalize)
    assert ids.is_contiguous() and w.is_contiguous()
