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
from pyengine.model.stages import Shard, stages_of, stages_on
from pyengine.model.tensors import F_AXIS, PER_EXPERT, fp32_names, full_shape, slice_f, weight_key

WEIGHT_NAMES = ("embed", "norm_in", "router", "w_gate", "w_up", "w_down", "norm_out", "out")
"""The block's tensors (a model with layers has these per layer, plus its attention's)."""


def model_dtype(spec: DeploymentSpec) -> torch.dtype:
    return torch_dtype(spec.model.dtype)


def tensor_dtype(spec: DeploymentSpec, name: str) -> torch.dtype:
    """The dtype tensor `name` is held in: the model's, or fp32 for the few a family keeps so."""
    return torch.float32 if name in fp32_names(spec.model) else model_dtype(spec)


def tensor_list(spec: DeploymentSpec) -> list[tuple[str, int | None]]:
    """Every (name, layer) of the model, in stage order (what init_weights returns)."""
    return [t for stage in stages_of(spec) for t in stage.tensors()]


def _generator(seed: int, key: str, index: int = 0) -> torch.Generator:
    # One stream per (tensor, expert): a shard can be made without the whole tensor,
    # and CPU generation makes the values identical on every backend.
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + zlib.crc32(f"{key}/{index}".encode())) % (2**63))
    return g


def _make(spec: DeploymentSpec, seed: int, name: str, layer: int | None, index: int = 0) -> torch.Tensor:
    """fp32 values of one tensor (or of expert `index` of a per-expert tensor)."""
    shape = full_shape(spec.model, name)
    if name in PER_EXPERT:
        shape = shape[1:]
    g = _generator(seed, weight_key(name, layer), index)
    if name.endswith("norm") or name in ("norm_in", "norm_out"):
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    if len(shape) == 1:  # a bias
        return 0.1 * torch.randn(shape, generator=g)
    fan_in = 1 if name == "embed" else shape[0]
    return torch.randn(shape, generator=g) / fan_in**0.5


def weight(spec: DeploymentSpec, seed: int, name: str, *, device: torch.device | str = "cpu",
           dtype: torch.dtype | None = None, shard: Shard = Shard(), layer: int | None = None) -> torch.Tensor:
    """One weight of `layer`, or the slice `shard` of it (expert tensors: some experts, columns of F)."""
    dtype = dtype or tensor_dtype(spec, name)
    if name not in PER_EXPERT:
        return mlp_cut(_make(spec, seed, name, layer), name, shard).to(device=device, dtype=dtype)
    experts = shard.experts if shard.experts is not None else range(spec.model.num_experts)
    parts = []
    for e in experts:
        t = slice_f(name, _make(spec, seed, name, layer, e), shard.f_cols, expert_axis=False)
        parts.append(t.to(device=device, dtype=dtype))
    return torch.stack(parts).contiguous()


def take(full: dict[str, torch.Tensor], name: str, shard: Shard, layer: int | None = None) -> torch.Tensor:
    """The slice `shard` of a full tensor (the same slice `weight(..., shard=shard)` makes)."""
    t = full[weight_key(name, layer)]
    if name not in PER_EXPERT:
        return mlp_cut(t, name, shard)
    if shard.experts is not None:
        t = t[list(shard.experts)]
    return slice_f(name, t, shard.f_cols).contiguous()


def mlp_cut(t: torch.Tensor, name: str, shard: Shard) -> torch.Tensor:
    """A dense-MLP tensor's slice `shard` (Shard.mlp_slice), or `t` itself for any other tensor."""
    cut = shard.mlp_slice(name)
    if cut is None:
        return t
    axis, a, b = cut
    return t.narrow(axis, a, b - a).contiguous()


def init_weights(spec: DeploymentSpec, seed: int = 0, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Full, unsharded weights by key (the block: exactly WEIGHT_NAMES). Same seed, same values
    on any backend."""
    return {weight_key(n, l): weight(spec, seed, n, device=device, dtype=dtype, layer=l)
            for n, l in tensor_list(spec)}


@runtime_checkable
class WeightSource(Protocol):
    """Where the engine's weights come from. Names are WEIGHT_NAMES in the engine's [in, out]
    layout (w_gate/w_up [E, H, F], w_down [E, F, H], router [H, E], out [H, V]), in the spec's
    dtype; `shard` picks experts and F columns. Sources must pickle (ranks may be processes)."""

    def weight(self, spec: DeploymentSpec, name: str, shard: Shard = Shard(),
               device: torch.device | str = "cpu", layer: int | None = None) -> torch.Tensor:
        """One weight of `layer` (None: a shared tensor, or the block's), or the slice `shard`
        of it, on `device`."""
        ...

    def read_bytes(self, spec: DeploymentSpec, name: str, shard: Shard = Shard(),
                   layer: int | None = None) -> int:
        """Bytes `weight(spec, name, shard, layer=layer)` reads from storage (0 for generated weights)."""
        ...

    def embed_rows(self, spec: DeploymentSpec, ids: torch.Tensor,
                   device: torch.device | str = "cpu") -> torch.Tensor:
        """Embedding rows of `ids` [n] -> [n, H] (a checkpoint reads only those rows)."""
        ...

    def describe(self) -> str:
        """One line for reports: what the weights are."""
        ...

    def check_spec(self, spec: DeploymentSpec) -> None:
        """SpecError unless these weights can run `spec` (before any rank works)."""
        ...


@dataclass(frozen=True, slots=True)
class SeededWeights:
    """Seeded random weights: same seed, same values on any backend; nothing is read."""

    seed: int = 0

    def weight(self, spec: DeploymentSpec, name: str, shard: Shard = Shard(),
               device: torch.device | str = "cpu", layer: int | None = None) -> torch.Tensor:
        return weight(spec, self.seed, name, device=device, shard=shard, layer=layer)

    def read_bytes(self, spec: DeploymentSpec, name: str, shard: Shard = Shard(),
                   layer: int | None = None) -> int:
        return 0

    def embed_rows(self, spec: DeploymentSpec, ids: torch.Tensor,
                   device: torch.device | str = "cpu") -> torch.Tensor:
        return weight(spec, self.seed, "embed", device=device)[ids.to(device)]

    def describe(self) -> str:
        return f"seeded random weights (seed {self.seed})"

    def check_spec(self, spec: DeploymentSpec) -> None:
        """Seeded weights are made for whatever spec asks."""


@dataclass(frozen=True, slots=True)
class DeviceRandomWeights:
    """Random weights drawn on the device from `seed` (scale as the seeded ones): for timing and for
    comparing two runs on one device, not the seeded values (those are drawn on the CPU, minutes for
    the seeded whole model's 30 G parameters). Reproducible on one device type only."""

    seed: int = 0

    def weight(self, spec: DeploymentSpec, name: str, shard: Shard = Shard(),
               device: torch.device | str = "cpu", layer: int | None = None) -> torch.Tensor:
        shape = list(full_shape(spec.model, name))
        if name in PER_EXPERT:
            if shard.experts is not None:
                shape[0] = len(shard.experts)
            if shard.f_cols is not None and name in F_AXIS:
                shape[F_AXIS[name]] = shard.f_cols[1] - shard.f_cols[0]
        elif shard.mlp_slice(name) is not None:
            axis, a, b = shard.mlp_slice(name)
            shape[axis] = b - a
        g = torch.Generator(device=device)
        g.manual_seed((self.seed * 1_000_003 + zlib.crc32(weight_key(name, layer).encode())) % (2**63))
        t = torch.empty(shape, dtype=tensor_dtype(spec, name), device=device)
        if len(shape) == 1:
            return t.normal_(1.0 if "norm" in name else 0.0, 0.1, generator=g)
        if name in PER_EXPERT and name not in F_AXIS:  # b_down: one shard's, zeros on the others
            return slice_f(name, t.normal_(0.0, 0.1, generator=g), shard.f_cols)
        return t.normal_(0.0, 1.0 if name == "embed" else shape[-2] ** -0.5, generator=g)

    def read_bytes(self, spec: DeploymentSpec, name: str, shard: Shard = Shard(),
                   layer: int | None = None) -> int:
        return 0

    def embed_rows(self, spec: DeploymentSpec, ids: torch.Tensor,
                   device: torch.device | str = "cpu") -> torch.Tensor:
        return self.weight(spec, "embed", device=device)[ids.to(device)]

    def describe(self) -> str:
        return f"random weights drawn on the device (seed {self.seed}; not the seeded values)"

    def check_spec(self, spec: DeploymentSpec) -> None:
        """Made for whatever spec asks."""


def as_source(source: WeightSource | int) -> WeightSource:
    """A WeightSource from a source or a plain seed (the seeded weights of that seed)."""
    return SeededWeights(source) if isinstance(source, int) else source


def rank_weights(spec: DeploymentSpec, source: WeightSource | int, rank: int,
                 device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Only what `rank` holds: the tensors of the stages it runs (every layer's), each sliced as
    the stage says, keyed by weight_key. `source` is a WeightSource or a seed."""
    src = as_source(source)
    return {weight_key(name, layer): src.weight(spec, name, stage.shard(rank), device, layer=layer)
            for stage in stages_on(spec, rank) for name, layer in stage.tensors()}


def rank_read_bytes(spec: DeploymentSpec, source: WeightSource | int, rank: int) -> int:
    """Bytes `rank_weights(spec, source, rank)` reads from storage: its slices only."""
    src = as_source(source)
    return sum(src.read_bytes(spec, name, stage.shard(rank), layer=layer)
               for stage in stages_on(spec, rank) for name, layer in stage.tensors())


def full_weights(spec: DeploymentSpec, source: WeightSource | int,
                 device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Every weight, unsharded, by key (the single-device reference and baseline)."""
    src = as_source(source)
    return {weight_key(n, l): src.weight(spec, n, Shard(), device, layer=l) for n, l in tensor_list(spec)}


def full_read_bytes(spec: DeploymentSpec, source: WeightSource | int) -> int:
    src = as_source(source)
    return sum(src.read_bytes(spec, n, Shard(), layer=l) for n, l in tensor_list(spec))


def make_tokens(spec: DeploymentSpec, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed + 7919)
    return torch.randint(0, spec.model.vocab_size, (spec.model.batch_size, spec.model.seq_len),
                         generator=g, dtype=torch.int64)
