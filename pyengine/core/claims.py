"""The seed design note's claims, defined once. They are claims to test, not facts: `plan`'s
verdicts, `run`'s report and the pipeline benchmark each compare their own figures with these."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Claim:
    key: str
    label: str
    """Short name shown in tables."""
    quote: str
    """How the seed note words it (quoted in every verdict)."""
    target: float
    """The claimed figure: a fraction (0.40 = 40%), or percentage points for the splits."""


LATENCY_CUT = Claim("latency_cut", "latency cut 40%", "40% latency reduction", 0.40)
THROUGHPUT_GAIN = Claim("throughput_gain", "throughput +60%", "+60% throughput", 0.60)
UTILIZATION = Claim("utilization", "95% GPU utilisation", "95% GPU utilisation", 0.95)
BALANCE = Claim("balance_max_diff_pp", "load balance 33/33/34%, max difference 1%",
                "load balance 33/33/34%, max difference 1%", 1.0)
MEMORY_SPLIT = Claim("memory_max_diff_pp", "memory 33/33/34%", "memory usage 33/33/34%", 1.0)
MODULE_DIVISION = Claim("parts_per_gpu", "module division: 3 parts, 1 per GPU",
                        "module division: 3 parts for 3 GPUs, 1 each", 1.0)
BUBBLE_CUT = Claim("bubble_cut", "25% bubble time reduction", "25% bubble time reduction", 0.25)

HEADLINE = (LATENCY_CUT, THROUGHPUT_GAIN, UTILIZATION)
"""The figures a measured run checks directly against its own single-device baseline."""
