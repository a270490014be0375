"""Where weights come from (a WeightSource: seeded, or a checkpoint), seeded weights and tokens.

`rank_weights(spec, source, rank)` returns only what `rank` holds (its stages' tensors, each
sliced as the stage's `shard(rank)` says), from any WeightSource: `SeededWeights(seed)` (or a
plain int seed) or `pyengine.model.checkpoint.CheckpointWeights`. `full_weights` returns the
full, unsharded weights under WEIGHT_NAMES (the single-device reference and baseline).

Seeded values are generated per (tensor, expert) on the CPU from seeded generators, so a shard
never needs the whole tensor and every device sees the same numbers.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from pyengine.core.dtypes import torch_dtype
from pyengine.core.spec import DeploymentSpec
from pyengine.model.stages import Shard, stages_on

WEIGHT_NAMES = ("embed", "norm_in", "router", "w_gate", "w_up", "w_down", "norm_out", "out")
PER_EXPERT = ("w_gate", "w_up", "w_down")


def model_dtype(spec: DeploymentSpec) -> torch.dtype:
    return torch_dtype(spec.model.dtype)


def _full_shapes(spec: DeploymentSpec) -> dict[str, tuple[int, ...]]:
    m = spec.model
    h, f, e, v = m.hidden_size, m.ffn_hidden_size, m.num_experts, m.vocab_size
    return {"embed": (v, h), "norm_in": (h,), "router": (h, e), "w_gate": (e, h, f),
            "w_up": (e, h, f), "w_down": (e, f, h), "norm_out": (h,), "out": (h, v)}


def _generator(seed: int, name: str, index: int = 0) -> torch.Generator:
    # One stream per (tensor, expert): a shard can be made without the whole tensor,
    # and CPU generation makes the values identical on every backend.
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + zlib.crc32(f"{name}/{index}".encode())) % (2**63))
    return g


def _make(spec: DeploymentSpec, seed: int, name: str, index: int = 0) -> torch.Tensor:
    """fp32 values of one tensor (or of expert `index` of a per-expert tensor)."""
    shape = _full_shapes(spec)[name]
    if name in PER_EXPERT:
        shape = shape[1:]
    g = _generator(seed, name, index)
    if name in ("norm_in", "norm_out"):
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    fan_in = 1 if name == "embed" else shape[0]
    return torch.randn(shape, generator=g) / fan_in**0.5


def weight(spec: DeploymentSpec, seed: int, name: str, *, device: torch.device | str = "cpu",
           dtype: torch.dtype | None = None, shard: Shard = Shard()) -> torch.Tensor:
    """One weight, or the slice `shard` of it (expert tensors: some experts, columns of F)."""
    dtype = dtype or model_dtype(spec)
    if name not in PER_EXPERT:
        return _make(spec, seed, name).to(device=device, dtype=dtype)
    experts = shard.experts if shard.experts is not None else range(spec.model.num_experts)
    parts = []
    for e in experts:
        t = _make(spec, seed, name, e)
        if shard.f_cols is not None:
            a, b = shard.f_cols
            t = t[a:b, :] if name == "w_down" else t[:, a:b]
        parts.append(t.to(device=device, dtype=dtype))
    return torch.stack(parts).contiguous()


def take(full: dict[str, torch.Tensor], name: str, shard: Shard) -> torch.Tensor:
    """The slice `shard` of a full tensor (the same slice `weight(..., shard=shard)` makes)."""
    t = full[name]
    if name not in PER_EXPERT:
        return t
    if shard.experts is not None:
        t = t[list(shard.experts)]
    if shard.f_cols is not None:
        a, b = shard.f_cols
        t = t[:, a:b, :] if name == "w_down" else t[:, :, a:b]
    return t.contiguous()


def init_weights(spec: DeploymentSpec, seed: int = 0, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Full, unsharded weights under WEIGHT_NAMES. Same seed, same values on any backend."""
    return {name: weight(spec, seed, name, device=device, dtype=dtype) for name in WEIGHT_NAMES}


@runtime_checkable
class WeightSource(Protocol):
    """Where the engine's weights come from. Names are WEIGHT_NAMES in the engine's [in, out]
    layout (w_gate/w_up [E, H, F], w_down [E, F, H], router [H, E], out [H, V]), in the spec's
    dtype; `shard` picks experts and F columns. Sources must pickle (ranks may be processes)."""

    def weight(self, spec: DeploymentSpec, name: str, shard: Shard = Shard(),
               device: torch.device | str = "cpu") -> torch.Tensor:
        """One weight, or the slice `shard` of it, on `device`."""
        ...

    def read_bytes(self, spec: DeploymentSpec, name: str, shard: Shard = Shard()) -> int:
        """Bytes `weight(spec, name, shard)` reads from storage (0 for generated weights)."""
        ...

    def embed_rows(self, spec: DeploymentSpec, ids: torch.Tensor,
                   device: torch.device | str = "cpu") -> torch.Tensor:
        """Embedding rows of `ids` [n] -> [n, H] (a checkpoint reads only those rows)."""
        ...

    def describe(self) -> str:
        """One line for reports: what the weights are."""
        ...


@dataclass(frozen=True, slots=True)
class SeededWeights:
    """Seeded random weights: same seed, same values on any backend; nothing is read."""

    seed: int = 0

    def weight(self, spec: DeploymentSpec, name: str, shard: Shard = Shard(),
               device: torch.device | str = "cpu") -> torch.Tensor:
        return weight(spec, self.seed, name, device=device, shard=shard)

    def read_bytes(self, spec: DeploymentSpec, name: str, shard: Shard = Shard()) -> int:
        return 0

    def embed_rows(self, spec: DeploymentSpec, ids: torch.Tensor,
                   device: torch.device | str = "cpu") -> torch.Tensor:
        return weight(spec, self.seed, "embed", device=device)[ids.to(device)]

    def describe(self) -> str:
        return f"seeded random weights (seed {self.seed})"


def as_source(source: WeightSource | int) -> WeightSource:
    """A WeightSource from a source or a plain seed (the seeded weights of that seed)."""
    return SeededWeights(source) if isinstance(source, int) else source


def rank_weights(spec: DeploymentSpec, source: WeightSource | int, rank: int,
                 device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Only what `rank` holds: the weights of the stages it runs, each sliced as the stage says.
    `source` is a WeightSource or a seed."""
    src = as_source(source)
    out: dict[str, torch.Tensor] = {}
    for stage in stages_on(spec, rank):
        for name in stage.weight_names:
            out[name] = src.weight(spec, name, stage.shard(rank), device)
    return out


def rank_read_bytes(spec: DeploymentSpec, source: WeightSource | int, rank: int) -> int:
    """Bytes `rank_weights(spec, source, rank)` reads from storage: its slices only."""
    src = as_source(source)
    return sum(src.read_bytes(spec, name, stage.shard(rank))
               for stage in stages_on(spec, rank) for name in stage.weight_names)


def full_weights(spec: DeploymentSpec, source: WeightSource | int,
                 device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Every weight, unsharded, under WEIGHT_NAMES (the single-device reference and baseline)."""
    src = as_source(source)
    return {name: src.weight(spec, name, Shard(), device) for name in WEIGHT_NAMES}


def full_read_bytes(spec: DeploymentSpec, source: WeightSource | int) -> int:
    src = as_source(source)
    return sum(src.read_bytes(spec, name, Shard()) for name in WEIGHT_NAMES)


def make_tokens(spec: DeploymentSpec, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed + 7919)
    return torch.randint(0, spec.model.vocab_size, (spec.model.batch_size, spec.model.seq_len),
                         generator=g, dtype=torch.int64)
