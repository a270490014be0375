"""The dense MLPs on the expert GPUs (parallel.dense_mlp_placement "experts"): what both experts
stages (tensor and expert parallel) add when a layer's shared expert and the dense layers' MLP run
there instead of on the attention GPU.

Each expert GPU holds columns [a, b) of the MLP's inner size (gate and up by columns, down by rows;
`DeploymentSpec.mlp_shards`) and computes its partial down(silu(gate(u)) * up(u)) on every token of
the layer, which it adds to the routed experts' partial it hands back: the boundary's reduction (or
the expert-parallel combine) sums the GPUs' partials into the MLP's output with the routed sum, so
nothing extra moves. A dense layer's experts compute is that MLP alone (its routing is empty). What
the MLPs compute is `pyengine.model.dense_mlp`'s; this module only says where and what it costs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pyengine.model.costs import KernelCost
from pyengine.model.dense_mlp import dense_layer_mlp, shared_expert
from pyengine.model.stages.base import Shard
from pyengine.model.tensors import (DENSE_MLP, PER_EXPERT, expert_names, full_shape, model_layers, moe_layers,
                                    shared_expert_names)


class ExpertMLPs:
    """Mixed into the experts stages (set up by `_init_mlps`): their layers, tensors, shapes,
    costs and compute of the dense MLPs they hold. With placement "attention" it adds nothing."""

    spec: Any
    elem: int
    layer_list: list

    def _init_mlps(self) -> None:
        spec, m = self.spec, self.spec.model
        self.mlps = spec.mlps_on_experts
        """The shared expert and the dense layers' MLP run in this stage (split over its GPUs)."""
        # a dense layer's experts compute is its MLP when placed here; else dense layers have no experts
        self.layer_list = model_layers(m) if self.mlps and m.dense_layers else moe_layers(m)
        self._shared_cols = self._cols(m.shared_expert_size)
        self._dense_cols = self._cols(m.dense_ffn_size if m.dense_layers else 0)

    def _cols(self, size: int) -> dict[int, tuple[int, int]]:
        if not (self.mlps and size):
            return {}
        return {rank: (a, b) for rank, a, b in self.spec.mlp_shards(size)}

    def _mlp_shard(self, rank: int) -> dict[str, tuple[int, int] | None]:
        """Shard fields of the MLP columns `rank` holds."""
        return {"shared_cols": self._shared_cols.get(rank), "dense_cols": self._dense_cols.get(rank)}

    # ---- tensors ----------------------------------------------------------------------------------
    def layer_names(self, layer: int | None) -> tuple[str, ...]:
        """The tensors of `layer` this stage holds: a dense layer's MLP, or the routed experts (and the
        shared expert, when placed here)."""
        m = self.spec.model
        if m.is_dense(layer):
            return DENSE_MLP
        return expert_names(m) + (shared_expert_names(m) if self.mlps else ())

    def layer_weights(self) -> tuple[str, ...]:
        """Every per-layer name this stage holds at some layer (the keys of `weight_shapes`)."""
        names = self.layer_names(self.layer_list[-1])  # the last layer is MoE
        return names + (DENSE_MLP if len(self.layer_list) > len(moe_layers(self.spec.model)) else ())

    def tensors(self) -> list[tuple[str, int | None]]:
        return [(n, layer) for layer in self.layer_list for n in self.layer_names(layer)]

    def _mlp_shapes(self, rank: int) -> dict[str, tuple[int, ...]]:
        shard = Shard(**self._mlp_shard(rank))
        out = {}
        for name in self.layer_weights():
            if name in PER_EXPERT:  # the routed experts' (their shapes: the stage's)
                continue
            shape = list(full_shape(self.spec.model, name))
            cut = shard.mlp_slice(name)
            if cut is not None:
                shape[cut[0]] = cut[2] - cut[1]
            out[name] = tuple(shape)
        return out

    def weight_bytes(self, rank: int) -> dict[str, int]:
        """Bytes by tensor name, every layer's summed (dense layers hold only their MLP)."""
        shapes, out = self.weight_shapes(rank), {}
        for name, _ in self.tensors():
            n = self.elem
            for d in shapes[name]:
                n *= d
            out[name] = out.get(name, 0) + n
        return out

    def _held(self, rank: int) -> dict[str, tuple[int, int]]:
        """{"shared" / "dense": the [start, end) columns of that MLP `rank` holds}."""
        return {name: cols[rank] for name, cols in (("shared", self._shared_cols), ("dense", self._dense_cols))
                if rank in cols}

    def mlp_part(self, rank: int) -> str:
        """The MLP columns `rank` holds, for its module-division label ('' when none)."""
        return "".join(f" + {name}[{a}:{b}]" for name, (a, b) in self._held(rank).items())

    def mlp_working_set(self, tokens: int, rank: int) -> int:
        """Bytes of the MLP shard's activations (gate and up outputs of its columns) while it computes."""
        widest = max((b - a for a, b in self._held(rank).values()), default=0)
        return 2 * tokens * widest * self.elem

    # ---- costs ------------------------------------------------------------------------------------
    def mlp_kernels(self, rows: float, rank: int, layer: int | None) -> list[KernelCost]:
        """The kernels of `rank`'s MLP shard at `layer` over `rows` tokens: its gate/up GEMM, its down
        GEMM, and (beside routed experts) the add into their partial."""
        m, es, h = self.spec.model, self.elem, self.spec.model.hidden_size
        dense = m.is_dense(layer)
        cols = (self._dense_cols if dense else self._shared_cols).get(rank)
        if cols is None:
            return []
        c, p = cols[1] - cols[0], "dense" if dense else "shared"
        out = [KernelCost.gemm(f"{p}_gate_up", rows, 2 * c, h, es), KernelCost.gemm(f"{p}_down", rows, h, c, es)]
        return out if dense else out + [KernelCost.memory("shared_add", 3 * rows * h * es)]

    def mlp_cost_layer(self, layer: int | None) -> int | None:
        """Dense layers are priced on their own; every MoE layer costs the same (None)."""
        return layer if self.spec.model.is_dense(layer) else None

    # ---- compute ----------------------------------------------------------------------------------
    def with_mlp(self, w: Mapping[str, Any], u, layer: int | None, routed):
        """This GPU's partial at `layer`: its MLP shard's output on rows u, plus the routed experts'
        partial `routed()` (None at a dense layer, which routes nothing)."""
        m = self.spec.model
        if m.is_dense(layer):
            return dense_layer_mlp(u, w)
        y = routed()
        return y + shared_expert(m, u, w) if self.mlps and m.shared_expert_size else y
