"""How a real router spreads a batch over the experts: the per-expert token counts that decide
the expert stage's load balance (uniform in the seeded model, uneven in a trained one).

`expert_token_counts(spec, source, ids)` runs only the router's part of the block -- the
embedding rows of `ids`, the norm before the MoE block and the router -- through the same stage
code the engine runs (`embed_and_route`), and reads nothing else: a checkpoint source reads only
the embedding rows of the distinct ids, the norm gain and the router. Each token counts once per
expert it picks (top-k slots), so the counts sum to tokens * top_k. This is the input for the
planner's measured routing and the run report's per-expert load.
"""

from __future__ import annotations

import torch

from pyengine.core.spec import DeploymentSpec
from pyengine.model.stages import Shard
from pyengine.model.stages.embed import embed_and_route
from pyengine.model.weights import WeightSource, as_source


def expert_token_counts(spec: DeploymentSpec, source: WeightSource | int, ids: torch.Tensor,
                        device: torch.device | str = "cpu") -> list[int]:
    """Tokens routed to each expert [E] for token ids `ids` (any shape), top-k slots counted."""
    src = as_source(source)
    flat = ids.reshape(-1)
    uniq, inverse = torch.unique(flat, return_inverse=True)
    w = {"embed": src.embed_rows(spec, uniq, device),  # row i is token id uniq[i]
         "norm_in": src.weight(spec, "norm_in", Shard(), device),
         "router": src.weight(spec, "router", Shard(), device)}
    _, _, top_ids, _ = embed_and_route(spec, w, inverse.to(device))
    return torch.bincount(top_ids.reshape(-1).long(), minlength=spec.model.num_experts).tolist()
