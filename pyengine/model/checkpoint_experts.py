"""Where one expert's engine tensor lives in a checkpoint, and the slices a shard of it reads.

A family names each expert tensor (w_gate, w_up, w_down and, with biases, b_gate, b_up, b_down) as a
`StoredExpert`: a tensor of its own (HF linears, [out, in]: Mixtral, Qwen, OLMoE, DeepSeek), or one
expert's slice of a fused [E, ...] tensor whose F columns may sit every `step`-th from `offset`
(gpt-oss's gate_up_proj [E, H, 2F]: gate in the even columns, up in the odd ones). A fused tensor may
be MXFP4 (gpt-oss's released checkpoints): `{key}_blocks` [E, out, in/32, 16] + `{key}_scales`
[E, out, in/32], dequantized here to the model dtype (pyengine.model.mxfp4). Only the F columns a
shard holds are read (MXFP4 along `in`: the 32-value groups covering them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pyengine.model import mxfp4
from pyengine.model.tensors import slice_f

GROUP = mxfp4.VALUES_PER_SCALE


@dataclass(frozen=True, slots=True)
class StoredExpert:
    key: str
    """The stored tensor's name (MXFP4: the stem of its _blocks and _scales)."""
    f_axis: int | None = 0
    """Axis of F in the stored tensor, the expert axis left out (None: no F, b_down)."""
    expert: int | None = None
    """The expert's index in a fused [E, ...] tensor; None: the tensor is this expert's alone."""
    step: int = 1
    offset: int = 0
    """F column j is stored at step * j + offset along f_axis."""
    transposed: bool = True
    """Stored [out, in] (an HF linear): transposed to the engine's [in, out]."""
    mxfp4: bool = False
    shape: tuple[int, ...] | None = None
    """The stored tensor's full shape (MXFP4: its blocks'), checked at open; None: an HF linear's
    own [F, H] (gate, up) or [H, F] (down)."""

    def stored_shapes(self, h: int, f: int, name: str) -> dict[str, tuple[int, ...]]:
        """Stored key -> the shape open_checkpoint expects of it."""
        if self.mxfp4:
            return {f"{self.key}_blocks": self.shape, f"{self.key}_scales": self.shape[:-1]}
        return {self.key: self.shape or ((h, f) if name == "w_down" else (f, h))}

    def reads(self, f_cols: tuple[int, int] | None, f: int) -> list[tuple[str, tuple]]:
        """(stored key, index) of each slice this expert's shard `f_cols` (None: all of F) reads."""
        a, b = f_cols or (0, f)
        if self.mxfp4:
            return [(f"{self.key}_{part}", self._mxfp4_index(a, b, part)) for part in ("blocks", "scales")]
        idx: list = [slice(None)] * (len(self.shape) if self.shape else 2)
        lead = 0
        if self.expert is not None:
            idx[0], lead = slice(self.expert, self.expert + 1), 1
        if self.f_axis is not None:
            idx[lead + self.f_axis] = slice(self.step * a + self.offset, self.step * (b - 1) + self.offset + 1)
        return [(self.key, tuple(idx))]

    def _mxfp4_index(self, a: int, b: int, part: str) -> tuple:
        """MXFP4 stores [E, out, groups(, 16)]; F is `out` (f_axis 0) or `in` (f_axis 1, by groups)."""
        e = slice(self.expert, self.expert + 1)
        if self.f_axis == 0:
            rows = slice(self.step * a + self.offset, self.step * (b - 1) + self.offset + 1)
            return (e, rows, slice(None)) + ((slice(None),) if part == "blocks" else ())
        groups = slice(a // GROUP, -(-b // GROUP))
        return (e, slice(None), groups) + ((slice(None),) if part == "blocks" else ())

    def finish(self, name: str, parts: list[torch.Tensor], f_cols: tuple[int, int] | None,
               dtype: torch.dtype) -> torch.Tensor:
        """The engine's slice ([in, out]; biases [F_r] or [H]) from what `reads` read."""
        if self.mxfp4:
            t = mxfp4.dequantize(parts[0], parts[1], dtype)[0]  # [in, out] of the rows read
            if self.f_axis == 0:
                return t[:, ::self.step].contiguous()
            a = (f_cols or (0, 0))[0]
            n = f_cols[1] - f_cols[0] if f_cols else None
            start = a - (a // GROUP) * GROUP
            return t[start:start + n if n else None].contiguous()
        t = parts[0].to(dtype)
        if self.expert is not None:
            t = t[0]
        if self.f_axis is not None and self.step > 1:
            t = t[(slice(None),) * self.f_axis + (slice(None, None, self.step),)]
        if self.f_axis is None:  # b_down: kept by the shard of F's first column only
            t = slice_f(name, t, f_cols, expert_axis=False)
        return (t.T if self.transposed and t.dim() == 2 else t).contiguous()


def stored_expert(name: str, where: str | StoredExpert) -> StoredExpert:
    """A family's name for an expert tensor: a StoredExpert, or the key of an HF linear of its own
    ([out, in]: F is the rows of gate/up, the columns of down)."""
    if isinstance(where, StoredExpert):
        return where
    return StoredExpert(where, f_axis=1 if name == "w_down" else 0)
