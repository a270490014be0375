"""What crosses from a rank to the launcher: typed measurements, not string-keyed dicts."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(slots=True)
class ActionTime:
    id: str
    """The action id (its NVTX range name)."""
    kind: str
    stage: int
    micro_batch: int
    lane: str
    start_s: float
    end_s: float


@dataclass(slots=True)
class VariantMeasurement:
    """One variant (pipeline, no_overlap, m1) as one rank saw it."""

    latency_s: list[float]
    stream_tokens: int
    stream_s: float
    iters: int
    times: list[ActionTime]
    """The last timed iteration's actions, relative to t0."""
    t0: float
    """perf_counter() at that iteration's start: one monotonic clock per host aligns ranks."""


@dataclass(slots=True)
class RankMeasurement:
    rank: int
    device: str
    variants: dict[str, VariantMeasurement] = field(default_factory=dict)
    logits: np.ndarray | None = None
    """The pipeline's logits [B, S, V] (output rank only)."""
    reference_logits: np.ndarray | None = None
    """The independent single-device reference (output rank only)."""
    single_latency_s: list[float] | None = None
    """The single-device sequential baseline (output rank only)."""
    expert_counts: list[list[int]] | None = None
    """Per micro-batch, the (token, expert) pairs the router sent to each expert (router rank only)."""
    read_bytes: int = 0
    """Bytes of weights this rank read from a checkpoint for its own slices (0: seeded)."""
    check_read_bytes: int = 0
    """Bytes the output rank read for the output check's full weights (0: seeded)."""


@dataclass(slots=True)
class StepMeasurement:
    """One forward of a generation (the prefill, or one decode step), as one rank saw it."""

    seconds: float
    tokens: int
    """New tokens it produced (one per live sequence)."""
    micro_batches: int
    kv_read: int
    """Cached key rows its attention read, summed over its chunks (one layer's worth)."""
    times: list[ActionTime]
    t0: float
    touched: list[list[tuple[int, ...]]] = field(default_factory=list)
    """Router rank only: per layer, per micro-batch, the distinct experts its tokens chose."""


@dataclass(slots=True)
class GenerateMeasurement:
    rank: int
    device: str
    steps: list[StepMeasurement]
    """steps[0]: the prefill (time to first token); then one per decode step."""
    sequences: list[list[int]] | None = None
    """Per prompt: prompt + new ids (output rank)."""
    prompt_lengths: list[int] = field(default_factory=list)
    first_logits: np.ndarray | None = None
    """The first sequence's logits at each of its steps [steps, V] (output rank)."""
    read_bytes: int = 0
    graphs: str = ""
    """What the decode steps ran as: captured in CUDA graphs, or eager and why."""
