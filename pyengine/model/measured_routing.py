"""The router's real choices for a batch: the routing `plan --routing measured` prices and the
per-expert load a run reports. One home for running the router outside the pipeline.

Only the router's part of the block runs -- the embedding rows of the distinct token ids, the
norm before the MoE block and the router -- through the same stage code the engine runs
(`embed_and_route`); a checkpoint source reads nothing else (not the experts, not the head).
"""

from __future__ import annotations

import torch

from pyengine.core.spec import DeploymentSpec
from pyengine.model.routing import MeasuredRouting
from pyengine.model.stages import Shard
from pyengine.model.stages.embed import embed_and_route
from pyengine.model.tensors import router_names
from pyengine.model.weights import WeightSource, as_source, make_tokens


def router_choices(spec: DeploymentSpec, source: WeightSource | int, ids: torch.Tensor,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """The top-k expert ids [T, k] the router picks for token ids `ids` (any shape)."""
    src = as_source(source)
    uniq, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
    w = {"embed": src.embed_rows(spec, uniq, device),  # row i is token id uniq[i]
         "norm_in": src.weight(spec, "norm_in", Shard(), device),
         **{n: src.weight(spec, n, Shard(), device) for n in router_names(spec.model)}}
    _, _, top_ids, _ = embed_and_route(spec, w, inverse.to(device))
    return top_ids


def measure_routing(spec: DeploymentSpec, source: WeightSource | int = 0,
                    ids: torch.Tensor | None = None) -> MeasuredRouting:
    """The router's choices for one batch: `ids` (default: the seeded tokens of `spec`) through
    the router of `source` (a seed or a checkpoint)."""
    tokens = make_tokens(spec, source if isinstance(source, int) else 0) if ids is None else ids
    return MeasuredRouting.from_ids(router_choices(spec, source, tokens), spec.model.num_experts)


def expert_token_counts(spec: DeploymentSpec, source: WeightSource | int, ids: torch.Tensor,
                        device: torch.device | str = "cpu") -> list[int]:
    """Tokens routed to each expert [E] (top-k slots counted: they sum to tokens * top_k)."""
    return pairs_per_expert(router_choices(spec, source, ids, device), spec.model.num_experts)


def pairs_per_expert(top_ids: torch.Tensor, num_experts: int) -> list[int]:
    """(token, expert) pairs routed to each expert, from top-k ids [T, k]."""
    return torch.bincount(top_ids.reshape(-1).long(), minlength=num_experts).tolist()
