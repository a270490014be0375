"""Number formatting shared by the verdicts, the reports and the benchmarks (a leaf module)."""

from __future__ import annotations


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_s(s: float) -> str:
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3f} ms"
    return f"{s * 1e6:.1f} us"


def fmt_flops(f: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if abs(f) >= scale:
            return f"{f / scale:.1f} {unit}"
    return f"{f:.0f} FLOP"


def fmt_signed_pct(x: float) -> str:
    """A relative change as a signed percentage: +43.0%, -22.1%."""
    return f"{'+' if x >= 0 else ''}{100 * x:.1f}%"


def fmt_pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def fmt_split(values: list[float]) -> str:
    """Shares as '27.1/36.4/36.4%'."""
    return "/".join(f"{100 * v:.1f}" for v in values) + "%"
