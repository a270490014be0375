"""fused_residual_rmsnorm vs h = x + sum(partials); rmsnorm(h) * weight, written plainly."""

import pytest
import torch

from pyengine.kernels.residual_rmsnorm import fused_residual_rmsnorm
from pyengine.kernels import residual_rmsnorm as mod

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCES = {  # fp32: absolute bound; low precision: <= factor x torch's error + floor
    torch.float32: dict(atol=1e-5),
    torch.float16: dict(factor=2.0, floor=1e-3),
    torch.bfloat16: dict(factor=2.0, floor=8e-3),
}


def reference(x, partials, weight, eps=1e-5):
    h = x
    for p in partials:
        h = h + p.to(x.dtype)
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.to(x.dtype)
    return h, normed


def make(T, H, n, dtype, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)
    return mk(T, H), [mk(T, H) for _ in range(n)], 1 + 0.1 * mk(H)


def check(got, ref_fn, x, partials, weight):
    h32, n32 = ref_fn(x.float(), [p.float() for p in partials], weight.float())
    tol = TOLERANCES[x.dtype]
    if x.dtype == torch.float32:
        bounds = (tol["atol"],) * 2
    else:
        hl, nl = ref_fn(x, partials, weight)
        bounds = [tol["factor"] * (lo.float() - r).abs().max().item() + tol["floor"]
                  for lo, r in ((hl, h32), (nl, n32))]
    for name, g, r, b in (("h", got[0], h32, bounds[0]), ("normed", got[1], n32, bounds[1])):
        err = (g.float() - r).abs().max().item()
        assert err <= b, f"{name}: max error {err:.3g} > bound {b:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,H,n", [
    (1, 17, 1),  # T=1, odd H, one partial
    (7, 33, 2),  # TP=2 partials, H just past a power of two
    (5, 40, 3),  # three partials
    (3, 9, 4),  # the maximum of four partials
])
def test_matches_reference(T, H, n, dtype):
    x, partials, weight = make(T, H, n, dtype)
    h, normed = fused_residual_rmsnorm(x, partials, weight, return_residual=True)
    assert h.dtype == normed.dtype == dtype and normed.shape == (T, H)
    check((h, normed), reference, x, partials, weight)
    alone = fused_residual_rmsnorm(x, partials, weight)
    assert torch.equal(alone, normed)


def test_chunked_rows_match_single_pass(monkeypatch):  # H=37 over 8-wide chunks
    x, partials, weight = make(4, 37, 2, torch.float32)
    one = fused_residual_rmsnorm(x, partials, weight, return_residual=True)
    monkeypatch.setattr(mod, "MAX_BLOCK_H", 8)
    looped = fused_residual_rmsnorm(x, partials, weight, return_residual=True)
    assert torch.equal(looped[0], one[0])
    torch.testing.assert_close(looped[1], one[1], atol=1e-6, rtol=1e-6)
    check(looped, reference, x, partials, weight)


def test_out_strided_rows_and_fp32_partials():
    x, partials, weight = make(5, 17, 2, torch.float16)
    wide = torch.randn(5, 40, device=DEVICE).half()[:, 3:20]  # rows with stride 40
    wide.copy_(x)
    p32 = [p.float() for p in partials]  # fp32 partials are read as they are
    out = torch.empty(5, 17, device=DEVICE, dtype=torch.float16)
    res = fused_residual_rmsnorm(wide, p32, weight, out=out)
    assert res is out
    check((x + partials[0] + partials[1], out), reference, x, partials, weight)


def test_zero_tokens():
    x, partials, weight = make(0, 17, 2, torch.float32)
    assert fused_residual_rmsnorm(x, partials, weight).shape == (0, 17)


@pytest.mark.parametrize("case,exc,match", [
    ("no partials", ValueError, r"partials: got 0 tensors; must be 1\.\.4"),
    ("five partials", ValueError, r"partials: got 5 tensors; must be 1\.\.4"),
    ("not a list", TypeError, r"partials: got Tensor; must be a list or tuple"),
    ("partial shape", ValueError, r"partials\[1\]\.shape=\(3, 16\): must equal x\.shape"),
    ("weight shape", ValueError, r"weight\.shape=\(16,\): must be \[H=17\]"),
    ("int x", TypeError, r"x\.dtype=torch\.int64: must be a float dtype"),
    ("device", ValueError, r"partials\[0\]\.device=meta: must equal x\.device"),
    ("eps", ValueError, r"eps=0: must be > 0"),
    ("out dtype", ValueError, r"out: shape \(3, 17\), dtype torch\.float16"),
])
def test_bad_input(case, exc, match):
    x, partials, weight = make(3, 17, 2, torch.float32)
    kw = dict(x=x, partials=partials, weight=weight)
    change = {
        "no partials": dict(partials=[]),
        "five partials": dict(partials=partials * 2 + partials[:1]),
        "not a list": dict(partials=partials[0]),
        "partial shape": dict(partials=[partials[0], partials[1][:, :16]]),
        "weight shape": dict(weight=weight[:16]),
        "int x": dict(x=x.long()),
        "device": dict(partials=[torch.empty(3, 17, device="meta"), partials[1]]),
        "eps": dict(eps=0),
        "out dtype": dict(out=torch.empty(3, 17, device=x.device, dtype=torch.float16)),
    }[case]
    with pytest.raises(exc, match=match):
        fused_residual_rmsnorm(**{**kw, **change})


@pytest.mark.gpu
@pytest.mark.parametrize("T", [256, 1024])
def test_seed_shape_bf16(T):  # H=4096, two TP partials
    x, partials, weight = make(T, 4096, 2, torch.bfloat16, device="cuda")
    got = fused_residual_rmsnorm(x, partials, weight, return_residual=True)
    check(got, reference, x, partials, weight)


@pytest.mark.parametrize("T,H", [(1, 8), (5, 37), (3, 64)])  # T=1; H not a power of two; chunked
def test_plain_rmsnorm_is_the_kernel_without_partials(T, H, monkeypatch):
    if H == 37:
        monkeypatch.setattr(mod, "MAX_BLOCK_H", 8)  # several chunks per row
    g = torch.Generator().manual_seed(T * H)
    x, w = torch.randn(T, H, generator=g), torch.randn(H, generator=g)
    xd = x.double()
    want = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    got = mod.fused_rmsnorm(x.to(DEVICE), w.to(DEVICE), 1e-5).cpu()
    assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-5)
