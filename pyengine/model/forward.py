"""The whole block on one device through the same stage code: the single-device baseline that
`pyengine run` and the pipeline benchmark time against the pipeline."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from pyengine.core.spec import DeploymentSpec
from pyengine.model.stages.embed import embed_and_route
from pyengine.model.stages.experts import expert_ffn
from pyengine.model.stages.output import output_head


def single_device(spec: DeploymentSpec, w: Mapping[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """logits [T, V] for ids [T] with full weights, sequential, no communication."""
    x, u, top_ids, top_w = embed_and_route(spec, w, ids)
    return output_head(spec, w, x, [expert_ffn(w, u, top_ids, top_w)])
