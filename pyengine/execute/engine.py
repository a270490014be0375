"""`pyengine.Engine`: the runtime as a library, e.g. inside a torchrun script.

    tr = pyengine.transport.create_transport("nccl", rank=rank, world_size=3, device=rank,
                                             groups=spec.comm_groups())
    engine = pyengine.Engine(spec, tr)
    logits = engine.forward(ids)   # [B, S, V] on the output stage's rank, None elsewhere
    out = engine.generate([p0, p1], max_new_tokens=32)   # every rank: prompt + new ids per prompt
"""

from __future__ import annotations

import torch

from pyengine.core.spec import DeploymentSpec
from pyengine.execute.generate import GenerateResult, Generator
from pyengine.execute.runtime import BatchResult, RankRuntime
from pyengine.model.weights import WeightSource, rank_weights
from pyengine.schedule import build


class Engine:
    def __init__(self, spec: DeploymentSpec, transport, *, seed: int = 0,
                 weights: dict[str, torch.Tensor] | None = None, device: torch.device | None = None,
                 source: WeightSource | None = None, graphs: str = "auto"):
        """`source` (e.g. pyengine.model.checkpoint.open_checkpoint(...)) gives this rank's weight
        slices; without it they are seeded by `seed` (the same seed on every rank); `weights`
        passes them ready-made (exactly pyengine.model.weights.rank_weights(spec, source, rank)).
        `graphs` (auto | on | off): capture generate's decode steps in CUDA graphs (auto: where the
        device and kernels allow; `graphs_reason` says what was decided).
        Every argument is checked here, on every rank alike (an InputError naming it)."""
        from pyengine.execute import engine_checks as checks

        checks.check_engine(spec, transport, seed, source, device)
        if source is not None:
            source.check_spec(spec)  # a checkpoint: the part it holds and the logits' fields
        if weights is not None:
            checks.check_weights(spec, transport.rank, weights)
        self.spec, self.transport = spec, transport
        self.rank = transport.rank
        self.device = torch.device(device) if device is not None else transport.device
        self.graphs = checks.check_graphs(graphs, self.device)
        self.table = build(spec)  # checked before anything runs
        checks.check_groups(transport, self.table, spec.world_size)
        if weights is None:
            weights = rank_weights(spec, source if source is not None else seed, self.rank, self.device)
        self.weights = weights
        self._runtime = RankRuntime(spec, self.rank, transport, self.weights, self.device,
                                    table=self.table)
        self.last: BatchResult | None = None
        """The last forward's result: logits (output rank) and this rank's timeline."""
        self.last_generation: GenerateResult | None = None
        """The last generate's result: sequences, one StepRecord per forward (timelines)."""
        self._generator: Generator | None = None
        self._kv_checked = (0, 0)  # (sequences, capacity) of the largest KV cache checked to fit

    def forward(self, ids: torch.Tensor) -> torch.Tensor | None:
        """One batch; every rank calls it with the same ids [B, S]: integers in [0, vocab_size),
        checked as the CLI checks --tokens (InputError, a ValueError) before any rank works."""
        from pyengine.model.tokens import check_ids

        from pyengine.core.errors import InputError

        m = self.spec.model
        check_ids(ids, m.vocab_size, field="ids")
        if tuple(ids.shape) != (m.batch_size, m.seq_len):
            raise InputError("ids.shape", tuple(ids.shape),
                             f"must be (batch_size, seq_len) = ({m.batch_size}, {m.seq_len}), the spec's")
        # any integer dtype in, int64 (the gathers' index type) on the runtime's device
        self.last = self._runtime.forward(ids.to(torch.int64))
        return self.last.logits

    def generate(self, prompts, max_new_tokens: int) -> list[torch.Tensor]:
        """Greedy generation (every rank calls it with the same prompts, 1-D id tensors of any
        lengths): per prompt, the prompt then its new ids, on every rank. Stops a sequence at
        one of spec.model.eos_token_ids or after max_new_tokens."""
        from pyengine.execute.engine_checks import refuse_together

        prompts, max_new_tokens = refuse_together(self.transport, self.spec.world_size, self.spec.comm.timeout_s,
                                                  lambda: self._generate_args(prompts, max_new_tokens))
        if self._generator is None:
            self._generator = Generator(self.spec, self.rank, self.transport, self.weights, self.device,
                                        graphs=self.graphs)
        self.last_generation = self._generator.generate(prompts, max_new_tokens, keep_logits=True)
        return self.last_generation.sequences

    def _generate_args(self, prompts, max_new_tokens) -> tuple[list[torch.Tensor], int]:
        """This rank's checks of generate's arguments: (prompts as a list, max_new_tokens as an int)."""
        from pyengine.model.prompts import check_generation, prompt_list

        prompts = prompt_list(prompts)  # read once: an iterator would be empty the second time
        check_generation(self.spec, prompts, max_new_tokens, steps_field="max_new_tokens")
        max_new_tokens = int(max_new_tokens)  # a numpy integer too
        self._check_kv_fits(len(prompts), max(len(p) for p in prompts) + max_new_tokens)
        return prompts, max_new_tokens

    @property
    def graphs_reason(self) -> str:
        """What generate's decode steps ran as (captured, or eager and why); empty before one."""
        return self._generator.graphs_reason if self._generator is not None else ""

    def _check_kv_fits(self, sequences: int, capacity: int) -> None:
        """The KV cache against free memory, before any work; skipped when one at least this large
        was checked before (the generator keeps a cache that fits, so it is already allocated)."""
        from pyengine.execute.engine_checks import check_kv_fits

        seen_sequences, seen_capacity = self._kv_checked
        if sequences <= seen_sequences and capacity <= seen_capacity:
            return
        check_kv_fits(self.spec, sequences, capacity, self.device)
        self._kv_checked = (max(sequences, seen_sequences), max(capacity, seen_capacity))
