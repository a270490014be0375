"""Run the router on the seeded weights and tokens: the routing `plan --routing measured` assumes."""

from __future__ import annotations

import torch

from pyengine.core.spec import DeploymentSpec
from pyengine.model.routing import MeasuredRouting
from pyengine.model.stages.embed import embed_and_route
from pyengine.model.weights import make_tokens, weight


def measure_routing(spec: DeploymentSpec, seed: int = 0) -> MeasuredRouting:
    """The router's choices for one batch of `spec` with seed `seed` (CPU, fp32; embed, norm and
    router only, never the experts). fp32 may pick a different expert than bf16 where two router
    scores tie within bf16's precision; the load it measures is the same to within such ties."""
    w = {n: weight(spec, seed, n, dtype=torch.float32) for n in ("embed", "norm_in", "router")}
    _, _, top_ids, _ = embed_and_route(spec, w, make_tokens(spec, seed).reshape(-1))
    return MeasuredRouting.from_ids(top_ids, spec.model.num_experts)
