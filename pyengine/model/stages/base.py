"""What every stage answers (the base class) and the vocabulary the stage objects share."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from pyengine.core import dtypes
from pyengine.model.batch import Chunk
from pyengine.model.costs import KernelCost
from pyengine.model.payloads import Payload
from pyengine.model.tensors import DENSE_MLP, SHARED_EXPERT, model_layers

if TYPE_CHECKING:
    from pyengine.core.spec import DeploymentSpec


class StageKind(enum.IntEnum):
    """Stage index, in pipeline order (also the `s<N>` prefix of action ids)."""

    EMBED = 0
    EXPERTS = 1
    OUTPUT = 2


class Shard(NamedTuple):
    """The part of a full weight tensor a rank holds: some experts, some columns of F, some of the
    inner size of the dense MLPs (parallel.dense_mlp_placement "experts")."""

    experts: tuple[int, ...] | None = None
    """Expert ids held (per-expert tensors only); None = every expert."""
    f_cols: tuple[int, int] | None = None
    """[start, end) of the FFN dimension F (expert tensors only); None = all of F."""
    shared_cols: tuple[int, int] | None = None
    """[start, end) of the shared expert's inner size S (ws_gate/ws_up/ws_down); None = all of it."""
    dense_cols: tuple[int, int] | None = None
    """[start, end) of a dense layer MLP's inner size (wd_gate/wd_up/wd_down); None = all of it."""

    def mlp_slice(self, name: str) -> tuple[int, int, int] | None:
        """(axis, start, end) of dense-MLP tensor `name` in the engine's [in, out] layout (gate and
        up split by columns, down by rows), or None: held whole. Any other tensor of the shared
        expert (a gate of its output) is held whole on every GPU: it scales each GPU's partial alike."""
        for names, cols in ((SHARED_EXPERT, self.shared_cols), (DENSE_MLP, self.dense_cols)):
            if name in names and cols is not None:
                return (0 if name.endswith("_down") else 1, *cols)
        return None


Inputs = Mapping[Payload, Sequence[tuple[Any, ...]]]


class Source(NamedTuple):
    """Where a stage's input comes from: `payload` produced by stage `stage` of layer `layer`."""

    payload: Payload
    stage: StageKind
    layer: int | None


@dataclass(frozen=True, slots=True)
class Work:
    """Where one compute sits: its layer (None: the block), its chunk of the batch's token axis,
    and the attention rank's state (the KV cache and the chunk's RoPE tables; None elsewhere)."""

    layer: int | None
    chunk: Chunk
    cache: Any = None
    tables: Any = None
    logits_all: bool = True
    """False: the output head computes only the chunk's last-token rows (chunk.last_rows)."""
    ops: Any = None
    """The rank's kernels (pyengine.model.ops: the torch or the Triton path, prepared once);
    None: the default path for the tensors' device."""
    static: bool = False
    """A static decode step: fixed-size messages (every row of the chunk), padding rows routed
    nowhere (expert id -1), nothing sized by the data."""

    def kernels_for(self, device) -> Any:
        if self.ops is not None:
            return self.ops
        from pyengine.model.ops import ops_for

        return ops_for(None, device)


class Stage:
    """Base class: what every stage answers. Subclasses fill in the model-specific parts."""

    kind: StageKind
    shared_weights: tuple[str, ...] = ()
    """Tensors held once (embedding, final norm, head)."""
    attends = False
    """Its compute reads and writes the KV cache: within a layer, the chunks of one sequence
    must run in order."""

    def __init__(self, spec: DeploymentSpec):
        self.spec = spec
        self.ranks: tuple[int, ...] = spec.parallel.stages[self.kind].gpus
        self.elem = dtypes.nbytes(spec.model.dtype)
        self.layer_list = model_layers(spec.model)
        """Layer indices per-layer tensors and actions carry ([None] for the block)."""

    @property
    def name(self) -> str:
        return self.spec.parallel.stages[self.kind].name

    # ---- where the stage runs and what it consumes ------------------------------------------
    def layers(self) -> list[int | None]:
        """The layers at which this stage computes (every layer, unless it closes the model)."""
        return self.layer_list

    def inputs(self, layer: int | None) -> tuple[Source, ...]:
        """What its compute at `layer` consumes from single-rank stages; the experts' hand-off
        is the boundary's (pyengine.model.boundaries), see `hand_off_from`."""
        return ()

    def hand_off_from(self, layer: int | None) -> tuple[int | None, ...]:
        """The layer(s) whose experts' hand-off its compute at `layer` consumes (none, or one)."""
        return ()

    # ---- costs --------------------------------------------------------------------------------
    def cost_layer(self, layer: int | None) -> int | None:
        """A layer whose compute costs the same as `layer`'s (its kernels ask nothing else of
        the layer): the roofline prices one representative and reuses it, so pricing a model
        of many layers does not grow with them. The default shares nothing."""
        return layer

    def flops(self, tokens: int, rank: int, layer: int | None = None, chunk: Chunk | None = None) -> float:
        return sum(k.flops for k in self.kernels(tokens, rank, layer, chunk))

    def kernels(self, tokens: int, rank: int, layer: int | None = None,
                chunk: Chunk | None = None) -> list[KernelCost]:
        """The kernels one compute of `tokens` tokens launches at `layer` (chunk: which tokens,
        for attention; None: an average share of the spec's batch)."""
        raise NotImplementedError

    # ---- weights ------------------------------------------------------------------------------
    def layer_weights(self) -> tuple[str, ...]:
        """Tensors held once per layer."""
        return ()

    @property
    def weight_names(self) -> tuple[str, ...]:
        return self.shared_weights + self.layer_weights()

    def tensors(self) -> list[tuple[str, int | None]]:
        """Every (name, layer) this stage holds."""
        return ([(n, None) for n in self.shared_weights]
                + [(n, layer) for layer in self.layer_list for n in self.layer_weights()])

    def weight_shapes(self, rank: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the weights `rank` holds for this stage, one layer's worth (its slices, not
        the full tensors)."""
        raise NotImplementedError

    def weight_bytes(self, rank: int) -> dict[str, int]:
        """Bytes by tensor name, every layer's summed."""
        per_layer = set(self.layer_weights())
        count = len(self.layer_list)
        return {n: _prod(s) * self.elem * (count if n in per_layer else 1)
                for n, s in self.weight_shapes(rank).items()}

    def state_bytes(self, rank: int, sequences: int, capacity: int) -> int:
        """State that lives across micro-batches and forwards (the KV cache), for `sequences`
        sequences of up to `capacity` tokens."""
        return 0

    def shard(self, rank: int) -> Shard:
        """Which slice of this stage's weights `rank` holds (default: all of them)."""
        return Shard()

    def working_set(self, tokens: int, rank: int) -> tuple[int, int]:
        """(bytes live while one micro-batch computes, bytes that wait across micro-batches)."""
        raise NotImplementedError

    def part(self, rank: int) -> str:
        """The model part this rank holds for this stage (the module-division verdict)."""
        raise NotImplementedError

    def from_router(self, u: Any, top_ids: Any, top_w: Any, static: bool = False) -> dict[Payload, Any]:
        """Experts stages only: the router's output (u, top-k ids, top-k weights) packaged as
        the payload(s) this stage consumes (`static`: every row to every consumer)."""
        raise NotImplementedError

    def compute(self, weights: Mapping[str, Any], ids: Any, inputs: Inputs,
                work: Work | None = None) -> dict[Payload, tuple]:
        """Run the stage on one micro-batch: `weights` as its layer sees them
        (pyengine.model.tensors.LayerWeights), `ids` its token ids, `inputs` what it consumed,
        `work` its layer and chunk (None: the block's micro-batch, no attention)."""
        raise NotImplementedError


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out
