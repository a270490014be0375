"""The two MoE GEMMs at realistic reduction depths, tiny everything else.

The other kernel tests reduce over K <= 40, where accumulating in fp16 stays inside their
tolerance. Here K is 1-2K (the column GEMM reduces over H, the row GEMM over F_r) with T=5,
E=3, k=2, so the interpreter stays fast, and the tolerance is derived from what fp32
accumulation allows, element by element, against the exact (float64) result of the same fp16
or fp32 inputs:

    |kernel - exact| <= out_ulps * ulp_out(|exact|)              the rounding(s) at the end
                        + acc_lambda * sqrt(K) * 2^-24 * S       fp32 accumulation over K terms

where ulp_out is the spacing of the output dtype (column: u's dtype; row: fp32) and S the sum
of the terms' magnitudes (propagated through SwiGLU for the column GEMM). sqrt(K) is the
usual probabilistic bound on rounding errors that add up over K steps. Each fp16 case also
shows the bound separates: a torch model of the kernel with fp32 accumulation passes it, one
that accumulates in fp16 (rounding the running sum after each BLOCK_K chunk) fails it by far.
"""

import pytest
import torch
import triton

from pyengine.kernels.moe_align import moe_align_block_size
from pyengine.kernels.moe_column_swiglu import moe_column_swiglu
from pyengine.kernels.moe_row_down import moe_row_down

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
U32 = 2.0**-24  # fp32 unit roundoff: the accumulator's
BLOCK = 16
CONFIG = triton.Config({"BLOCK_M": BLOCK, "BLOCK_N": BLOCK, "BLOCK_K": BLOCK, "GROUP_M": 1},
                       num_warps=1, num_stages=1)
TOLERANCES = {
    # fp16 out: one rounding of the fp32 result (half an ulp; an ulp allows the fp32 sums to
    # round the other way). fp32 out: the epilogue's few fp32 ops (sigmoid, products, k-sum).
    torch.float16: dict(out_ulps=1.0, acc_lambda=1.0),
    torch.float32: dict(out_ulps=4.0, acc_lambda=1.0),
}
SEPARATION = 4.0  # the fp16-accumulated model must exceed the bound at least this many times over
T, E, TOP_K = 5, 3, 2


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` at |x| (float64)."""
    a = x.abs().to(dtype)
    return (torch.nextafter(a, torch.full_like(a, float("inf"))).double() - a.double())


def _bound(exact, magnitude, K, out_dtype, dtype):
    tol = TOLERANCES[dtype]
    return tol["out_ulps"] * _ulp(exact, out_dtype) + tol["acc_lambda"] * K**0.5 * U32 * magnitude


def _ratio(got, exact, bound) -> float:
    """Largest error / bound over the elements (<= 1 passes)."""
    return ((got.double() - exact).abs() / bound).max().item()


def _routing(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(T, E, generator=g).argsort(dim=1)[:, :TOP_K].to(torch.int32)  # k distinct experts
    weights = torch.softmax(torch.randn(T, TOP_K, generator=g), dim=1)
    return ids, weights


def _rows(align, ids):
    """(aligned row, pair, token, expert) of every real row of the alignment."""
    n = int(align.num_padded)
    out = []
    for row, pair in enumerate(align.sorted_ids[:n].tolist()):
        if pair < T * TOP_K:
            out.append((row, pair, pair // TOP_K, int(ids.reshape(-1)[pair])))
    return out


def _accumulate(x, w, fp16_running_sum):
    """x [K] @ w [K, N] of fp16/fp32 values: fp32 sums of BLOCK_K chunks, the running sum kept
    in fp32 (the kernel's way) or rounded to fp16 after every chunk."""
    acc = torch.zeros(w.shape[1], dtype=torch.float32)
    for k0 in range(0, x.shape[0], BLOCK):
        acc = acc + x[k0:k0 + BLOCK].float() @ w[k0:k0 + BLOCK].float()
        if fp16_running_sum:
            acc = acc.half().float()
    return acc


# ---- column GEMM: a = silu(u W_gate) * (u W_up), K = H ---------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("H,F", [
    (1536, 24),  # K = 96 full chunks; F not a multiple of the tile (ragged N)
    pytest.param(1037, 17, marks=pytest.mark.slow),  # prime-ish K: a ragged last K chunk
])
def test_column_gemm_deep_k(H, F, dtype):
    g = torch.Generator().manual_seed(H)
    u = torch.randn(T, H, generator=g).to(dtype)
    w_gate = (torch.randn(E, H, F, generator=g) / H**0.5).to(dtype)
    w_up = (torch.randn(E, H, F, generator=g) / H**0.5).to(dtype)
    ids, _ = _routing(H)
    align = moe_align_block_size(ids.to(DEVICE), E, BLOCK)
    a = moe_column_swiglu(u.to(DEVICE), w_gate.to(DEVICE), w_up.to(DEVICE), align, TOP_K, config=CONFIG).cpu()
    assert a.dtype == dtype

    rows = _rows(align, ids)
    assert sorted(p for _, p, _, _ in rows) == list(range(T * TOP_K))
    got = torch.stack([a[row] for row, _, _, _ in rows])
    x = torch.stack([u[tok] for _, _, tok, _ in rows]).double()
    wg = torch.stack([w_gate[e] for _, _, _, e in rows]).double()
    wu = torch.stack([w_up[e] for _, _, _, e in rows]).double()
    gate, up = torch.einsum("ph,phf->pf", x, wg), torch.einsum("ph,phf->pf", x, wu)
    sig = torch.sigmoid(gate)
    exact = gate * sig * up
    s_gate = torch.einsum("ph,phf->pf", x.abs(), wg.abs())
    s_up = torch.einsum("ph,phf->pf", x.abs(), wu.abs())
    d_gate = (sig * (1 + gate * (1 - sig)) * up).abs()  # d act / d gate
    magnitude = d_gate * s_gate + (gate * sig).abs() * s_up
    bound = _bound(exact, magnitude, H, dtype, dtype)
    assert _ratio(got, exact, bound) <= 1.0

    if dtype == torch.float16:  # the bound tells fp32 accumulation from fp16 accumulation
        def model(fp16_running_sum):
            out = []
            for (_, _, tok, e) in rows:
                gt = _accumulate(u[tok], w_gate[e], fp16_running_sum)
                ut = _accumulate(u[tok], w_up[e], fp16_running_sum)
                out.append((gt * torch.sigmoid(gt) * ut).to(dtype))
            return torch.stack(out)
        assert _ratio(model(False), exact, bound) <= 1.0
        assert _ratio(model(True), exact, bound) > SEPARATION


# ---- row GEMM: y[t] = sum_j w_tj * (a_tj @ W_down[e_tj]), K = F_r, fp32 out --------------------------
@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("F,H", [
    (1536, 40),  # K = 96 full chunks; H not a multiple of the tile
    pytest.param(2053, 17, marks=pytest.mark.slow),  # K past 2K with a ragged last chunk
])
def test_row_gemm_deep_k(F, H, dtype, deterministic):
    g = torch.Generator().manual_seed(F)
    ids, weights = _routing(F)
    align = moe_align_block_size(ids.to(DEVICE), E, BLOCK)
    a = torch.randn(align.sorted_ids.numel(), F, generator=g).to(dtype)  # SwiGLU outputs ~N(0, 1)
    w_down = (torch.randn(E, F, H, generator=g) / F**0.5).to(dtype)
    y = moe_row_down(a.to(DEVICE), w_down.to(DEVICE), weights.to(DEVICE), align, TOP_K,
                     deterministic=deterministic, config=CONFIG).cpu()
    assert y.dtype == torch.float32 and y.shape == (T, H)

    rows = _rows(align, ids)
    exact = torch.zeros(T, H, dtype=torch.float64)
    magnitude = torch.zeros(T, H, dtype=torch.float64)
    for row, pair, tok, e in rows:
        w = weights.reshape(-1)[pair].double()
        exact[tok] += w * (a[row].double() @ w_down[e].double())
        magnitude[tok] += w.abs() * (a[row].double().abs() @ w_down[e].double().abs())
    bound = _bound(exact, magnitude, F, torch.float32, dtype)
    assert _ratio(y, exact, bound) <= 1.0

    if dtype == torch.float16 and deterministic:
        def model(fp16_running_sum):
            out = torch.zeros(T, TOP_K, H, dtype=torch.float32)
            for row, pair, tok, e in rows:
                out[tok, pair % TOP_K] = weights.reshape(-1)[pair] * _accumulate(a[row], w_down[e], fp16_running_sum)
            return out.sum(1)
        assert _ratio(model(False), exact, bound) <= 1.0
        assert _ratio(model(True), exact, bound) > SEPARATION
