"""Deployment spec: hardware, model, parallel layout, schedule and comm options.

Everything a run needs is validated here, before any process starts: one error type
(`SpecError`) names the field, the value and the rule that it breaks.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from pyengine.core.dtypes import MODEL_DTYPES as DTYPES
from pyengine.core.errors import InputError

STAGE_NAMES = ("embed", "experts", "output")
INTERCONNECTS = ("nvlink", "pcie")
SCHEDULE_KINDS = ("gpipe", "asready")
BOUNDARIES = ("all_reduce", "reduce_scatter", "partials")


class SpecError(InputError):
    """A deployment spec breaks a rule. `field` is the dotted path of the offending key."""

    kind = "invalid config"


@dataclass(kw_only=True, slots=True, frozen=True)
class HardwareSpec:
    num_gpus: int
    """GPUs available to the deployment (ranks are 0..num_gpus-1)."""
    gpu_memory_gb: float
    """Memory of one GPU in GB (the planner checks weights + activations fit)."""
    interconnect: str = "nvlink"
    """Link between GPUs: one of INTERCONNECTS (picks the planner's link preset)."""


@dataclass(kw_only=True, slots=True, frozen=True)
class ModelSpec:
    batch_size: int
    """Sequences per batch (B)."""
    seq_len: int
    """Tokens per sequence (S); T = B*S tokens flow through the block."""
    hidden_size: int
    """H."""
    ffn_hidden_size: int
    """F: the expert FFN's inner size, split across the expert stage's TP shards."""
    num_experts: int
    """E."""
    top_k: int
    """Experts chosen per token (k <= E)."""
    vocab_size: int
    """V: embedding rows and output-head columns."""
    dtype: str = "bfloat16"
    """Weights and activations: one of DTYPES."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len


@dataclass(kw_only=True, slots=True, frozen=True)
class StageSpec:
    name: str
    """One of STAGE_NAMES, in that order: embed (+ router), experts, output."""
    gpus: tuple[int, ...]
    """Ranks that run this stage; more than one only for the experts stage (its TP group)."""
    tensor_parallel_size: int = 1
    """Must equal len(gpus)."""
    shard_fractions: tuple[float, ...] | None = None
    """Experts stage only: share of F held by each GPU (uneven TP); None = even split."""


@dataclass(kw_only=True, slots=True, frozen=True)
class ParallelSpec:
    stages: tuple[StageSpec, ...]
    """Exactly three stages: embed, experts, output."""


@dataclass(kw_only=True, slots=True, frozen=True)
class ScheduleSpec:
    kind: str = "gpipe"
    """gpipe (all of stage 0, then stage 2, in micro-batch order) or asready (interleaved)."""
    micro_batches: int = 4
    """Token-axis micro-batches; sizes differ by at most one token (first ones larger)."""


@dataclass(kw_only=True, slots=True, frozen=True)
class CommSpec:
    boundary: str = "all_reduce"
    """Experts -> output hand-off: all_reduce (then the TP leader sends the sum),
    reduce_scatter (each shard sends its summed token half), or partials (every shard
    sends its partial; the output stage sums them in its first kernel)."""
    overlap: bool = True
    """Run comm on its own stream(s) so it hides behind compute (False: serialise)."""
    timeout_s: float = 60.0
    """A rank stuck in one action longer than this ends the job with an error naming it."""


@dataclass(kw_only=True, slots=True, frozen=True)
class DeploymentSpec:
    hardware: HardwareSpec
    model: ModelSpec
    parallel: ParallelSpec
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    comm: CommSpec = field(default_factory=CommSpec)

    def __post_init__(self) -> None:
        _validate(self)

    # ---- derived layout -------------------------------------------------------------
    def stage(self, name: str) -> StageSpec:
        return self.parallel.stages[STAGE_NAMES.index(name)]

    @property
    def ranks(self) -> tuple[int, ...]:
        """Ranks that take part in the deployment, sorted."""
        return tuple(sorted({g for s in self.parallel.stages for g in s.gpus}))

    @property
    def world_size(self) -> int:
        return max(self.ranks) + 1

    def micro_batch_sizes(self) -> list[int]:
        """Token counts per micro-batch: near-even split, first ones one larger."""
        return near_even_split(self.model.tokens, self.schedule.micro_batches)

    def micro_batch_bounds(self) -> list[tuple[int, int]]:
        bounds, start = [], 0
        for n in self.micro_batch_sizes():
            bounds.append((start, start + n))
            start += n
        return bounds

    def ffn_shards(self) -> list[tuple[int, int, int]]:
        """(rank, f_start, f_end) of each experts-stage shard; covers [0, F) exactly."""
        st = self.stage("experts")
        f = self.model.ffn_hidden_size
        fr = st.shard_fractions or tuple(1.0 / len(st.gpus) for _ in st.gpus)
        out, cum = [], 0.0
        for i, (rank, frac) in enumerate(zip(st.gpus, fr)):
            start = round(cum * f)
            cum += frac
            end = f if i == len(st.gpus) - 1 else round(cum * f)
            out.append((rank, start, end))
        return out

    # ---- JSON -----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any) -> DeploymentSpec:
        return _build(cls, data, "")

    @classmethod
    def from_json(cls, text: str, source: str = "<json>") -> DeploymentSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(source, text[max(0, e.pos - 20) : e.pos + 20],
                            f"malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def replace(self, **sections: Any) -> DeploymentSpec:
        """New spec with some sections' fields replaced: replace(schedule={"micro_batches": 2})."""
        d = self.to_dict()
        for section, values in sections.items():
            if section not in d:
                raise SpecError(section, values, f"unknown section; expected one of {sorted(d)}")
            d[section].update(values)
        return DeploymentSpec.from_dict(d)


def near_even_split(total: int, parts: int) -> list[int]:
    """`parts` sizes summing to `total`, differing by at most one, larger first (torch.tensor_split)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def load_spec(path: str | os.PathLike | None = None) -> DeploymentSpec:
    """Load and validate a spec; None loads the packaged seed (configs/seed_3gpu.json)."""
    if path is None:
        text = resources.files("pyengine").joinpath("configs/seed_3gpu.json").read_text()
        return DeploymentSpec.from_json(text, "seed_3gpu.json")
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise SpecError("config", path, f"cannot be read: {e.strerror}") from None
    return DeploymentSpec.from_json(text, path)


# ---- building from plain data, with type and key checks ------------------------------
_NESTED = {"hardware": HardwareSpec, "model": ModelSpec, "parallel": ParallelSpec,
           "schedule": ScheduleSpec, "comm": CommSpec}


def _build(cls: type, data: Any, path: str):
    where = path or "spec"
    if not isinstance(data, dict):
        raise SpecError(where, data, f"must be a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            near = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; known keys: {sorted(fields)}"
            raise SpecError(_join(path, key), data[key], "unknown key" + hint)
    kwargs = {}
    for name, f in fields.items():
        fpath = _join(path, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SpecError(fpath, None, "is required")
            continue
        kwargs[name] = _convert(cls, name, data[name], fpath)
    return cls(**kwargs)


def _convert(cls: type, name: str, value: Any, path: str):
    if cls is DeploymentSpec:
        return _build(_NESTED[name], value, path)
    if cls is ParallelSpec and name == "stages":
        if not isinstance(value, list):
            raise SpecError(path, value, "must be a list of stage objects")
        return tuple(_build(StageSpec, s, f"{path}[{i}]") for i, s in enumerate(value))
    if cls is StageSpec and name == "gpus":
        if not isinstance(value, list) or not value or not all(_is_int(g) for g in value):
            raise SpecError(path, value, "must be a non-empty list of GPU indices (ints)")
        return tuple(value)
    if cls is StageSpec and name == "shard_fractions":
        if value is None:
            return None
        if not isinstance(value, list) or not all(_is_num(v) for v in value):
            raise SpecError(path, value, "must be a list of numbers or null")
        return tuple(float(v) for v in value)
    expected = _TYPES[(cls, name)]
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is int:
        ok = _is_int(value)
    elif expected is float:
        ok = _is_num(value)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise SpecError(path, value, f"must be of type {expected.__name__}")
    return value


_TYPES = {
    **{(HardwareSpec, n): t for n, t in
       [("num_gpus", int), ("gpu_memory_gb", float), ("interconnect", str)]},
    **{(ModelSpec, n): int for n in
       ["batch_size", "seq_len", "hidden_size", "ffn_hidden_size", "num_experts", "top_k", "vocab_size"]},
    (ModelSpec, "dtype"): str, (ModelSpec, "norm_eps"): float,
    (StageSpec, "name"): str, (StageSpec, "tensor_parallel_size"): int,
    (ScheduleSpec, "kind"): str, (ScheduleSpec, "micro_batches"): int,
    (CommSpec, "boundary"): str, (CommSpec, "overlap"): bool, (CommSpec, "timeout_s"): float,
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ---- semantic rules ----------------------------------------------------------------
def _positive(path: str, value: float) -> None:
    if value <= 0:
        raise SpecError(path, value, "must be > 0")


def _one_of(path: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SpecError(path, value, f"must be one of {list(choices)}")


def _validate(spec: DeploymentSpec) -> None:
    hw, m = spec.hardware, spec.model
    _positive("hardware.num_gpus", hw.num_gpus)
    _positive("hardware.gpu_memory_gb", hw.gpu_memory_gb)
    _one_of("hardware.interconnect", hw.interconnect, INTERCONNECTS)
    for name in ("batch_size", "seq_len", "hidden_size", "ffn_hidden_size", "num_experts",
                 "top_k", "vocab_size"):
        _positive(f"model.{name}", getattr(m, name))
    _positive("model.norm_eps", m.norm_eps)
    if m.top_k > m.num_experts:
        raise SpecError("model.top_k", m.top_k, f"must be <= model.num_experts ({m.num_experts})")
    _one_of("model.dtype", m.dtype, DTYPES)
    _validate_stages(spec)
    s = spec.schedule
    _one_of("schedule.kind", s.kind, SCHEDULE_KINDS)
    _positive("schedule.micro_batches", s.micro_batches)
    if s.micro_batches > m.tokens:
        raise SpecError("schedule.micro_batches", s.micro_batches,
                        f"must be <= the token count batch_size*seq_len ({m.tokens}): "
                        "every micro-batch needs at least one token")
    _one_of("comm.boundary", spec.comm.boundary, BOUNDARIES)
    _positive("comm.timeout_s", spec.comm.timeout_s)


def _validate_stages(spec: DeploymentSpec) -> None:
    stages, ngpu = spec.parallel.stages, spec.hardware.num_gpus
    names = tuple(s.name for s in stages)
    if names != STAGE_NAMES:
        raise SpecError("parallel.stages", list(names),
                        f"must be exactly the stages {list(STAGE_NAMES)} in this order")
    for i, st in enumerate(stages):
        p = f"parallel.stages[{i}]"
        for g in st.gpus:
            if not 0 <= g < ngpu:
                raise SpecError(f"{p}.gpus", list(st.gpus),
                                f"GPU {g} does not exist (hardware.num_gpus = {ngpu})")
        if len(set(st.gpus)) != len(st.gpus):
            raise SpecError(f"{p}.gpus", list(st.gpus), "a GPU appears twice in one TP group")
        if st.tensor_parallel_size != len(st.gpus):
            raise SpecError(f"{p}.tensor_parallel_size", st.tensor_parallel_size,
                            f"must equal the number of GPUs in the stage ({len(st.gpus)})")
        if st.name != "experts":
            if len(st.gpus) != 1:
                raise SpecError(f"{p}.gpus", list(st.gpus),
                                f"stage {st.name!r} runs on one GPU (only 'experts' is tensor-parallel)")
            if st.shard_fractions is not None:
                raise SpecError(f"{p}.shard_fractions", list(st.shard_fractions),
                                "only the 'experts' stage is sharded")
            continue
        fr = st.shard_fractions
        if fr is None:
            if spec.model.ffn_hidden_size < len(st.gpus):
                raise SpecError(f"{p}.tensor_parallel_size", st.tensor_parallel_size,
                                f"exceeds model.ffn_hidden_size ({spec.model.ffn_hidden_size})")
            continue
        if len(fr) != len(st.gpus):
            raise SpecError(f"{p}.shard_fractions", list(fr),
                            f"needs one fraction per GPU ({len(st.gpus)})")
        if any(f <= 0 for f in fr):
            raise SpecError(f"{p}.shard_fractions", list(fr), "every fraction must be > 0")
        if abs(sum(fr) - 1.0) > 1e-6:
            raise SpecError(f"{p}.shard_fractions", list(fr),
                            f"must sum to 1 so the shards cover F exactly (sum = {sum(fr):.6g})")
        for rank, a, b in spec.ffn_shards():
            if b <= a:
                raise SpecError(f"{p}.shard_fractions", list(fr),
                                f"GPU {rank} gets no column of F={spec.model.ffn_hidden_size}")
