"""Deployment spec: hardware, model, parallel layout, schedule and comm options.

Everything a run needs is validated here, before any process starts: one error type
(`SpecError`) names the field, the value and the rule that it breaks.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from pyengine.core.errors import SpecError
from pyengine.core.spec_parse import build, parse_json
from pyengine.core.model_spec import ModelSpec, biased_projections
from pyengine.core.spec_rules import BOUNDARIES, INTERCONNECTS, SCHEDULE_KINDS, STAGE_NAMES, validate

__all__ = ["BOUNDARIES", "INTERCONNECTS", "SCHEDULE_KINDS", "STAGE_NAMES", "CommSpec", "DeploymentSpec",
           "HardwareSpec", "ModelSpec", "ParallelSpec", "ScheduleSpec", "SpecError", "StageSpec",
           "biased_projections", "load_spec", "near_even_split"]


@dataclass(kw_only=True, slots=True, frozen=True)
class HardwareSpec:
    num_gpus: int
    """GPUs available to the deployment (ranks are 0..num_gpus-1)."""
    gpu_memory_gb: float
    """Memory of one GPU in GB (the planner checks weights + activations fit)."""
    interconnect: str = "nvlink"
    """Link between GPUs: one of INTERCONNECTS (picks the planner's link preset)."""


@dataclass(kw_only=True, slots=True, frozen=True)
class StageSpec:
    name: str
    """One of STAGE_NAMES, in that order: embed (+ router), experts, output."""
    gpus: tuple[int, ...]
    """Ranks that run this stage; more than one only for the experts stage."""
    tensor_parallel_size: int = 1
    """Tensor mode: must equal len(gpus). Expert mode: must be 1 (every GPU holds whole experts)."""
    shard_fractions: tuple[float, ...] | None = None
    """Experts stage, tensor mode only: share of F held by each GPU (uneven TP); None = even split."""
    parallel_mode: str = "tensor"
    """Experts stage only: "tensor" (every GPU holds columns F_r of every expert and sees every
    token) or "expert" (every GPU holds whole experts and receives only the tokens routed to them)."""
    expert_ids: tuple[tuple[int, ...], ...] | None = None
    """Expert mode only: the whole experts each GPU of the stage holds, one list per GPU, every
    expert exactly once; None = a near-even contiguous split (first GPUs one more)."""


@dataclass(kw_only=True, slots=True, frozen=True)
class ParallelSpec:
    stages: tuple[StageSpec, ...]
    """Exactly three stages: embed, experts, output."""
    dense_mlp_placement: str = "attention"
    """Where the dense MLPs beside the routed experts run (a layer's shared expert, a dense layer's
    MLP): "attention" (the embed stage's GPU; its output joins the residual there) or "experts"
    (tensor-parallel over the experts stage's GPUs: gate/up split by columns, down by rows, in the
    shares of `shard_fractions` (expert mode: a near-even split over every GPU of the stage, the
    attention GPU included when it is one); each GPU adds its partial to the routed experts' partial
    it hands back, so nothing extra moves, but every expert GPU then sees every token of the layer).
    Needs a shared expert or dense layers in the model."""


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
        validate(self)

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

    def comm_groups(self) -> list[tuple[int, ...]]:
        """The collective groups a run of this spec creates (the world, then the experts stage;
        every group the runtime's collectives use is among them), in the order each rank's
        transport must create them: pass as `groups=` to create_transport."""
        return [tuple(range(self.world_size)), self.stage("experts").gpus]

    def micro_batch_sizes(self) -> list[int]:
        """Token counts per micro-batch: near-even split, first ones one larger."""
        return near_even_split(self.model.tokens, self.schedule.micro_batches)

    def micro_batch_bounds(self) -> list[tuple[int, int]]:
        bounds, start = [], 0
        for n in self.micro_batch_sizes():
            bounds.append((start, start + n))
            start += n
        return bounds

    @property
    def expert_parallel(self) -> bool:
        return self.stage("experts").parallel_mode == "expert"

    def expert_placement(self) -> tuple[tuple[int, ...], ...]:
        """The experts each experts-stage GPU holds, in stage order (tensor mode: all of them)."""
        st, e = self.stage("experts"), self.model.num_experts
        if not self.expert_parallel:
            return tuple(tuple(range(e)) for _ in st.gpus)
        if st.expert_ids is not None:
            return st.expert_ids
        bounds = [0]
        for n in near_even_split(e, len(st.gpus)):
            bounds.append(bounds[-1] + n)
        return tuple(tuple(range(a, b)) for a, b in zip(bounds, bounds[1:]))

    def ffn_shards(self) -> list[tuple[int, int, int]]:
        """(rank, f_start, f_end) of each experts-stage shard; covers [0, F) exactly (expert
        mode: every GPU holds all of F of its own experts)."""
        st = self.stage("experts")
        f = self.model.ffn_hidden_size
        if self.expert_parallel:
            return [(rank, 0, f) for rank in st.gpus]
        return _column_shards(st.gpus, f, st.shard_fractions)

    @property
    def mlps_on_experts(self) -> bool:
        """The shared expert and the dense layers' MLP run on the experts stage (TP over its GPUs)."""
        return self.parallel.dense_mlp_placement == "experts"

    def mlp_shards(self, size: int) -> list[tuple[int, int, int]]:
        """(rank, start, end) of each experts-stage GPU's columns of a dense MLP of inner size `size`: split
        as F (shard_fractions) in tensor mode, near-evenly over the stage's GPUs in expert mode."""
        st = self.stage("experts")
        if self.expert_parallel:
            bounds = [0]
            for n in near_even_split(size, len(st.gpus)):
                bounds.append(bounds[-1] + n)
            return [(rank, a, b) for rank, a, b in zip(st.gpus, bounds, bounds[1:])]
        return _column_shards(st.gpus, size, st.shard_fractions)

    # ---- JSON -----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any) -> DeploymentSpec:
        return build(cls, data, "")

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "<json>") -> DeploymentSpec:
        return cls.from_dict(parse_json(text, source))

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def all_moe(self, layers: int) -> DeploymentSpec:
        """This spec with `layers` layers, every one MoE (memory estimates linear in the layer count
        price dense layers as MoE ones, and every layer's KV cache as a full layer's, not a sliding
        one's ring: the window dropped too, else every layer would count as sliding and the count
        would err high); the dense MLPs' placement reset when nothing is left to place."""
        parallel = {} if self.model.shared_expert_size else {"dense_mlp_placement": "attention"}
        return self.replace(model={"num_layers": layers, "dense_layers": None, "layer_types": None,
                                   "sliding_window": None}, parallel=parallel)

    def replace(self, **sections: Any) -> DeploymentSpec:
        """New spec with some sections' fields replaced: replace(schedule={"micro_batches": 2})."""
        d = self.to_dict()
        for section, values in sections.items():
            if section not in d:
                raise SpecError(section, values, f"unknown section; expected one of {sorted(d)}")
            if not isinstance(values, dict):
                raise SpecError(section, values, "must be a dict of the section's fields to replace")
            d[section].update(values)
        return DeploymentSpec.from_dict(d)


def _column_shards(gpus: tuple[int, ...], size: int, fractions: tuple[float, ...] | None) -> list[tuple[int, int, int]]:
    """(rank, start, end) covering [0, size): each GPU's share of the fractions (None: even), the
    boundaries rounded, the last GPU taking the rest."""
    fr = fractions or tuple(1.0 / len(gpus) for _ in gpus)
    out, cum = [], 0.0
    for i, (rank, frac) in enumerate(zip(gpus, fr)):
        start = round(cum * size)
        cum += frac
        end = size if i == len(gpus) - 1 else round(cum * size)
        out.append((rank, start, end))
    return out


def near_even_split(total: int, parts: int) -> list[int]:
    """`parts` sizes summing to `total`, differing by at most one, larger first (torch.tensor_split)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def packaged_spec_names() -> list[str]:
    """Names of the specs shipped in pyengine/configs, usable as load_spec(name)."""
    configs = resources.files("pyengine").joinpath("configs")
    return sorted(e.name[: -len(".json")] for e in configs.iterdir() if e.name.endswith(".json"))


def _is_packaged_name(path: str) -> bool:
    # "tiny_cpu" names a packaged spec; "tiny_cpu.json" or "./tiny_cpu" name a file.
    return "/" not in path and os.sep not in path and not path.endswith(".json")


def _read_packaged(name: str) -> Any:
    if name not in packaged_spec_names():
        raise SpecError("config", name, f"no packaged spec of that name; packaged: {packaged_spec_names()}")
    text = resources.files("pyengine").joinpath(f"configs/{name}.json").read_text()
    return parse_json(text, f"{name}.json")


def read_config(path: str | os.PathLike | None = None) -> Any:
    """The parsed JSON of a config, not yet validated: a file path, a packaged spec's name, or
    None for the packaged seed. For callers that set fields first (command-line flags such as
    --micro-batches), so that the config is checked once, as the job will run it."""
    if path is None:
        return _read_packaged("seed_3gpu")
    if not isinstance(path, (str, os.PathLike)):
        raise SpecError("config", type(path).__name__, "must be a file path, a packaged spec's name or "
                                                      "None (a dict: DeploymentSpec.from_dict)")
    path = os.fspath(path)
    if _is_packaged_name(path):
        return _read_packaged(path)
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        raise SpecError("config", path, f"cannot be read: {e.strerror}") from None
    return parse_json(text, path)


def load_spec(path: str | os.PathLike | None = None) -> DeploymentSpec:
    """Load and validate a spec: a file path, a packaged spec's name (load_spec("tiny_cpu") reads
    pyengine/configs/tiny_cpu.json), or None for the packaged seed (seed_3gpu)."""
    return DeploymentSpec.from_dict(read_config(path))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
