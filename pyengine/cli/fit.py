"""Will the job fit? The planner's memory estimate (pyengine.predict.resources.memory_bytes),
applied by `pyengine run` and `pyengine bench comm` before any rank starts.

Without it `plan` says "fits: NO" while `run` spawns ranks that fail 3-35 s later. A run holds
more than one forward: its variants (no overlap, m=1) and the throughput stream (STREAM_BATCHES
batches as one schedule) each have their own activations, so a rank needs the largest of them;
the output rank also holds the single-device reference (all weights, one micro-batch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from pyengine.core.errors import ResourceError
from pyengine.core.spec import DeploymentSpec
from pyengine.core.units import fmt_bytes
from pyengine.execute.backends import Backend
from pyengine.execute.memory import Budget
from pyengine.model.stages import stages_on
from pyengine.predict.devices import PRESETS, DeviceProfile
from pyengine.predict.resources import activation_bytes, memory_bytes, state_bytes, weight_bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Need:
    rank: int
    stages: str
    weights: int
    activations: int
    reserved: int
    reference: int = 0
    """The output rank's single-device reference: all weights and one whole-batch forward."""
    kv_cache: int = 0
    """The attention rank's KV cache: every layer's keys and values of every sequence."""

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.reserved + self.reference + self.kv_cache

    def parts(self) -> str:
        items = [("weights", self.weights), ("activations", self.activations), ("KV cache", self.kv_cache),
                 ("reserved", self.reserved), ("reference", self.reference)]
        return " + ".join(f"{name} {fmt_bytes(v)}" for name, v in items if v)


def run_needs(spec: DeploymentSpec, variant_specs: Sequence[DeploymentSpec],
              device: DeviceProfile, capacity: int | None = None, reference: bool = True) -> list[Need]:
    """Per rank: weights + the largest variant's activations and KV cache (for `capacity`
    tokens per sequence; default seq_len) + reserved (+ the reference)."""
    kv = {r: max(state_bytes(v, capacity)[r] for v in variant_specs) for r in spec.ranks}
    worst = {r: max(memory_bytes(v, device, capacity=capacity)[r] for v in variant_specs) for r in spec.ranks}
    weights = {r: sum(w.values()) for r, w in weight_bytes(spec).items()}
    reserved = int(device.reserved_gb * 1e9)
    one_mb = spec.replace(schedule={"micro_batches": 1})
    ref = sum(weights.values()) + sum(activation_bytes(one_mb).values()) if reference else 0
    out_rank = spec.stage("output").gpus[0]
    return [Need(r, ", ".join(st.name for st in stages_on(spec, r)), weights[r],
                 worst[r] - weights[r] - reserved - kv[r], reserved, ref if r == out_rank else 0, kv[r])
            for r in spec.ranks]


def check_run_fits(spec: DeploymentSpec, variant_specs: Sequence[DeploymentSpec], backend: Backend,
                   capacity: int | None = None, reference: bool = True, scaled: bool = False) -> None:
    """ResourceError naming the rank, its stages, the need and the budget, or nothing
    (`capacity`: KV-cache tokens per sequence, generation's prompt + new tokens; `scaled`: `spec`
    is the config scaled for CPU, which the message says, since `plan` prices the config as given)."""
    device = PRESETS["seed32g"] if backend.on_gpu() else dataclasses.replace(PRESETS["seed32g"], reserved_gb=0.0)
    needs = run_needs(spec, variant_specs, device, capacity, reference)
    b = backend.memory_budget(spec.world_size)
    if backend.gpu_per_rank:  # the spec's GPUs, or this machine's if smaller (the plan's fit check)
        cap = int(spec.hardware.gpu_memory_gb * 1e9)
        what = f"GPU memory per rank (hardware.gpu_memory_gb = {spec.hardware.gpu_memory_gb:g})"
        if b is not None and b.bytes < cap:
            cap, what = b.bytes, b.what
        b = Budget(cap, False, what)
    if b is None:
        return
    try:
        check(needs, b)
    except ResourceError as e:
        rule = e.rule + (f"; at most {_layers_fitting(spec, variant_specs, device, b, capacity, reference)} "
                         f"of the model's {spec.model.layers} layers fit this layout" if spec.model.layered else "")
        if scaled:
            rule += ("; these are the sizes of the model as scaled for CPU (plan prices the config as "
                     "given; --no-scale runs it as given)")
        raise ResourceError(e.field, e.value, rule) from None


def _layers_fitting(spec: DeploymentSpec, variant_specs: Sequence[DeploymentSpec], device: DeviceProfile,
                    b: Budget, capacity: int | None, reference: bool) -> int:
    """The most layers the same job holds in budget `b`: every need is linear in the layer
    count (weights and KV cache per layer), so needs at 1 and 2 layers give it exactly."""
    def needs_at(n: int) -> list[Need]:
        # dense layers priced as MoE ones: errs low
        return run_needs(spec.all_moe(n), [v.all_moe(n) for v in variant_specs], device, capacity, reference)

    one, two = needs_at(1), needs_at(2)
    slope = [t.total - o.total for o, t in zip(one, two)]
    base = [o.total - d for o, d in zip(one, slope)]
    if b.shared:
        room = b.bytes - sum(base) - len(base) * b.per_rank_overhead
        return max(0, int(room // max(1, sum(slope))))
    return max(0, min(int((b.bytes - a) // max(1, d)) for a, d in zip(base, slope)))


def check(needs: Sequence[Need], b: Budget) -> None:
    if not b.shared:
        for n in needs:
            if n.total > b.bytes:
                raise ResourceError(f"rank {n.rank} (stage {n.stages})",
                                    f"{fmt_bytes(n.total)} = {n.parts()}",
                                    f"the budget is {fmt_bytes(b.bytes)} of {b.what}")
        return
    total = sum(n.total + b.per_rank_overhead for n in needs)
    if total <= b.bytes:
        return
    big = max(needs, key=lambda n: n.total)
    overhead = (f" + {len(needs)} rank processes x {fmt_bytes(b.per_rank_overhead)}"
                if b.per_rank_overhead else "")
    raise ResourceError(f"ranks {', '.join(str(n.rank) for n in needs)}",
                        f"{fmt_bytes(total)} together (the largest, rank {big.rank} (stage "
                        f"{big.stages}): {fmt_bytes(big.total)} = {big.parts()}){overhead}",
                        f"the budget is {fmt_bytes(b.bytes)} of {b.what}")

