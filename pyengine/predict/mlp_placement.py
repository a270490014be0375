"""Where the dense MLPs beside the routed experts should run (parallel.dense_mlp_placement), judged:
a model with a shared expert or dense layers priced with them on the attention GPU and split over
the expert GPUs.

In the ping-pong of a model of layers the attention GPU idles while the experts compute (the
experts usually bound it); the shared expert and the dense layers' MLP are dense GEMMs either side
can run. On the attention GPU they fill its idle time; on the expert GPUs each runs a 1/n shard,
but beside its routed experts, on the side that already bounds the pipeline. Which is faster
depends on the sizes and the device, so both are predicted (the same tables and roofline as the
plan), not assumed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pyengine.core.spec import DeploymentSpec
from pyengine.core.spec_rules import MLP_PLACEMENTS
from pyengine.model.routing import Routing
from pyengine.predict.decode import step_s
from pyengine.predict.devices import DeviceProfile
from pyengine.predict.disaggregation import balance_of, variant


@dataclass(slots=True)
class PlacementOption:
    where: str
    """A value of parallel.dense_mlp_placement."""
    latency_s: float
    """The config's batch (prefill), predicted."""
    decode_step_s: float
    """One decode step of the batch at the prompts' length, predicted."""
    attention_s: float
    """Busy time per batch of the attention side (the embed stage's GPU)."""
    experts_s: float
    """Busy time per batch of the busiest expert GPU (its experts stage only)."""

    @property
    def balance(self) -> float:
        """attention_s / experts_s (1.0: the ping-pong's two sides equally busy)."""
        return balance_of(self.attention_s, self.experts_s)


@dataclass(slots=True)
class MlpPlacements:
    this: str
    """The spec's own placement."""
    options: list[PlacementOption] = field(default_factory=list)
    """Each placement the layout allows (one the spec refuses, e.g. more GPUs than columns, is left out)."""

    @property
    def fastest(self) -> str:
        """The placement of the lowest predicted batch latency (ties: the spec's own)."""
        return min(self.options, key=lambda o: (o.latency_s, o.where != self.this)).where

    @property
    def balanced(self) -> str:
        """The placement whose two sides are nearest equally busy (|log balance| least)."""
        return min(self.options, key=lambda o: (abs(math.log(o.balance)) if 0 < o.balance < math.inf else math.inf,
                                                o.where != self.this)).where

    def to_dict(self) -> dict:
        return {"this": self.this, "fastest": self.fastest, "balanced": self.balanced,
                "options": [{"where": o.where, "latency_s": o.latency_s, "decode_step_s": o.decode_step_s,
                             "attention_s": o.attention_s, "experts_s": o.experts_s, "balance": o.balance}
                            for o in self.options]}


def has_dense_mlps(spec: DeploymentSpec) -> bool:
    m = spec.model
    return bool(m.shared_expert_size or m.dense_layers)


def mlp_placements(spec: DeploymentSpec, device: DeviceProfile, routing: Routing | None = None) -> MlpPlacements | None:
    """Both placements predicted; None for a model without a shared expert or dense layers."""
    if not (spec.model.layered and has_dense_mlps(spec)):
        return None
    out = MlpPlacements(spec.parallel.dense_mlp_placement)
    for where in MLP_PLACEMENTS:
        v = variant(spec, device, routing, parallel={"dense_mlp_placement": where})
        if v is not None:
            out.options.append(PlacementOption(where, v.predicted.latency_s,
                                               step_s(v.spec, device, spec.model.seq_len, routing),
                                               v.attention_s, v.experts_s))
    return out
