"""The whole model on one device through the same stage code: the single-device baseline that
`pyengine run` and the pipeline benchmark time against the pipeline.

It runs the stage objects of the spec moved onto one GPU (experts unsharded, one micro-batch,
partials handed straight on), layer after layer: the same compute the pipeline's ranks run,
without communication. torch is imported on call (the planner asks single_device_spec)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from pyengine.core.spec import DeploymentSpec
from pyengine.model.batch import Batch
from pyengine.model.payloads import Payload
from pyengine.model.stages import Work, stages_of
from pyengine.model.tensors import LayerWeights

if TYPE_CHECKING:
    import torch


def single_device_spec(spec: DeploymentSpec) -> DeploymentSpec:
    """Everything on GPU 0, one micro-batch, no communication."""
    return spec.replace(
        parallel={"stages": [{"name": "embed", "gpus": [0]},
                             {"name": "experts", "gpus": [0], "tensor_parallel_size": 1},
                             {"name": "output", "gpus": [0]}]},
        schedule={"micro_batches": 1, "kind": "gpipe"},
        comm={"boundary": "partials"})


def single_device(spec: DeploymentSpec, w: Mapping[str, torch.Tensor], ids: torch.Tensor,
                  batch: Batch | None = None) -> torch.Tensor:
    """logits [T, V] for ids [T] with full weights, sequential, no communication. `batch`
    (default: the spec's) says which sequences the ids hold."""
    one = single_device_spec(spec)
    embed, experts, output = stages_of(one)
    batch = Batch.prefill(list((batch or Batch.of_spec(spec)).new), 1)
    chunk = batch.chunks[0]
    cache = tables = None
    import torch

    from pyengine.model.ops import ops_for

    ops = ops_for(one, ids.device)
    if spec.model.layered:
        from pyengine.core.dtypes import torch_dtype
        from pyengine.model.attention import RopeTables, chunk_tables, fuse_qkv, host_meta, key_blocks
        from pyengine.model.kv_cache import KVCache

        dtype = torch_dtype(spec.model.dtype)
        cache = KVCache(spec, batch.sequences, max(batch.lengths), ids.device, dtype)
        cache.grow(dict(enumerate(batch.lengths)))
        rope = RopeTables.for_model(spec.model, cache.capacity, ids.device)
        meta = torch.tensor(host_meta(chunk), dtype=torch.int32).to(ids.device, non_blocking=True)
        tables = chunk_tables(cache, rope, chunk, meta, dtype, key_blocks(chunk, cache.block_size))
        w = dict(w)  # the fused projection is added beside the caller's tensors, not into its dict
        fuse_qkv(w, embed.layers())
    inputs: dict = {}
    for layer in embed.layers():
        lw = LayerWeights(w, layer)
        out = embed.compute(lw, ids, inputs, Work(layer, chunk, cache, tables, ops=ops))
        if Payload.ACT not in out:  # a dense layer: its MLP is in the residual already
            inputs = {Payload.RESID: [out[Payload.RESID]]}
            continue
        moe = experts.compute(lw, ids, {Payload.ACT: [out[Payload.ACT]]}, Work(layer, chunk, ops=ops))
        inputs = {Payload.RESID: [out[Payload.RESID]], Payload.PARTIAL: [moe[Payload.PARTIAL]]}
    last = output.layers()[0]
    logits = output.compute(LayerWeights(w, last), ids, inputs, Work(last, chunk, ops=ops))
    return logits[Payload.LOGITS][0]

