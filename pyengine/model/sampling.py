"""Drawing each sequence's next id from its logits, on the logits' device, for a whole step at once.

    params = pack_sampling([(w.sampling, w.index) for w in plan.sampled], logits.device)
    ids = sample(logits, *params)          # [n] int64, still on the device

Per row r (one sequence), with temperature t, top_k k, top_p p, seed s and index i (which of its
request's new ids this draw is):

* t == 0 (greedy): the argmax of the raw logits, ties to the lower id (as torch.argmax).
* else, in this order:
  1. scale: z = (logits - max(logits)) / t (in fp32; the shift changes no rule below, and keeps a
     tiny t from overflowing two large logits into one +inf tie: z of the argmax stays 0);
  2. top-k: order the ids by z descending, ties by the lower id first; keep the first k
     (k == 0 or k >= V: keep all). Exactly k ids survive even when z ties across the boundary;
  3. top-p: q = softmax of z over the ids kept so far, in the same order; keep the shortest
     prefix whose q sum reaches p: an id is kept when the q of the ids before it sums to < p
     (so the first id is always kept; p >= 1 keeps every id the top-k kept);
  4. draw: argmax over the kept ids of z + g, g a standard Gumbel noise per (s, i, id). The
     Gumbel-max trick makes that argmax distributed as softmax(z) restricted to the kept ids.

The noise is counter based: g depends on (s, i, id) only, through splitmix64 rounds in int64 torch
ops (a bijective 64-bit mixer; wrap-around multiplication, logical shifts by masking), so the same
request with the same seed draws the same ids alone or in any batch, on any device or rank count.
Everything is tensor ops over the whole [n, V] block, with no branch on the data: the number of
launched kernels is the same whatever n and whichever rows are greedy, and nothing waits on the
host (the caller's one transfer of the new ids is the step's only sync).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

GOLDEN_GAMMA = -7046029254386353131
"""0x9E3779B97F4A7C15 as a signed int64: splitmix64's stream increment."""
MIX_1 = -4658895280553007687
"""0xBF58476D1CE4E5B9 as a signed int64: splitmix64's first multiplier."""
MIX_2 = -7723592293110705685
"""0x94D049BB133111EB as a signed int64: splitmix64's second multiplier."""
UNIFORM_BITS = 24
"""Bits of each hash turned into a uniform: exactly representable in fp32, so u is never 0 or 1."""

PACKED_ROWS = 5
"""Rows of pack_sampling's int64 block: temperature and top_p (float64 bits), top_k, seed, index."""


class SamplingLike(Protocol):
    """What pack_sampling reads of a sequence's sampling settings (pyengine's Sampling has it)."""

    temperature: float
    top_k: int
    top_p: float
    seed: int


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic: it copies the sign bit)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's output function on int64 (a bijection of the 64-bit patterns)."""
    x = x + GOLDEN_GAMMA
    x = (x ^ _shift_right(x, 30)) * MIX_1
    x = (x ^ _shift_right(x, 27)) * MIX_2
    return x ^ _shift_right(x, 31)


def noise_keys(seed: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """One 64-bit key per row from (seed, index): two mixing rounds, so nearby seeds and nearby
    indices give unrelated keys."""
    return splitmix64(splitmix64(seed) ^ index)


def uniforms(seed: torch.Tensor, index: torch.Tensor, vocab: int) -> torch.Tensor:
    """[n, vocab] fp32 uniforms in (0, 1), a function of (seed[r], index[r], id) only: the
    splitmix64 stream of the row's key at position id + 1, its top 24 bits, offset by half a step."""
    keys = noise_keys(seed.to(torch.int64), index.to(torch.int64))
    ids = torch.arange(1, vocab + 1, dtype=torch.int64, device=keys.device)
    bits = _shift_right(splitmix64(keys[:, None] + ids[None, :] * GOLDEN_GAMMA), 64 - UNIFORM_BITS)
    return (bits.to(torch.float32) + 0.5) * (1.0 / (1 << UNIFORM_BITS))


def gumbel(seed: torch.Tensor, index: torch.Tensor, vocab: int) -> torch.Tensor:
    """[n, vocab] standard Gumbel noise: -log(-log(u))."""
    return -torch.log(-torch.log(uniforms(seed, index, vocab)))


def keep_mask(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[n, V] bool: the ids top-k then top-p keep (rules 2 and 3 of the module docstring)."""
    n, vocab = scaled.shape
    order = torch.sort(scaled, dim=-1, descending=True, stable=True).indices  # ties: lower id first
    ranks = torch.arange(vocab, device=scaled.device).expand(n, vocab)
    k = torch.where((top_k <= 0) | (top_k > vocab), vocab, top_k).to(torch.int64)
    in_top_k = ranks < k[:, None]
    ordered = torch.gather(scaled, 1, order).masked_fill(~in_top_k, float("-inf"))
    probs = torch.softmax(ordered, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # the probability of the ids ranked before
    in_top_p = (before < top_p[:, None]) | (top_p[:, None] >= 1.0) | (ranks == 0)
    keep_sorted = in_top_k & in_top_p
    return torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           seed: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The next id of every row of logits [n, V] (any float dtype), as int64 [n] on the same
    device; the per-row settings are [n] tensors on that device (temperature, top_p fp32; top_k
    int32 or int64; seed, index int64). See the module docstring for the rules."""
    logits = logits.float()
    greedy_ids = torch.argmax(logits, dim=-1)
    greedy = temperature <= 0
    safe_t = torch.where(greedy, torch.ones_like(temperature), temperature).float()
    # shifted by the row's max first (softmax, top-k order and the Gumbel argmax do not move): a tiny
    # temperature then sends the other ids to -inf, never two large logits to one +inf tie
    scaled = (logits - logits.amax(dim=-1, keepdim=True)) / safe_t[:, None]
    keep = keep_mask(scaled, top_k, top_p.float())
    noisy = (scaled + gumbel(seed, index, logits.shape[-1])).masked_fill(~keep, float("-inf"))
    return torch.where(greedy, greedy_ids, torch.argmax(noisy, dim=-1))


def pack_sampling(rows: Sequence[tuple[SamplingLike, int]], device: torch.device | str
                  ) -> tuple[torch.Tensor, ...]:
    """sample()'s settings for rows of (sampling settings, index), on `device` with one
    host-to-device copy: an int64 block [5, n] (floats travel as their float64 bits), then views
    of it. Returns (temperature fp32, top_k int64, top_p fp32, seed int64, index int64)."""
    n = len(rows)
    floats = torch.tensor([[s.temperature for s, _ in rows], [s.top_p for s, _ in rows]],
                          dtype=torch.float64).reshape(2, n)
    ints = torch.tensor([[s.top_k for s, _ in rows], [s.seed for s, _ in rows], [i for _, i in rows]],
                        dtype=torch.int64).reshape(3, n)
    block = torch.cat([floats.view(torch.int64), ints]).to(device, non_blocking=True)
    as_float = block[:2].view(torch.float64).float()
    return as_float[0], block[2], as_float[1], block[3], block[4]


class _Greedy:
    temperature, top_k, top_p, seed = 0.0, 0, 1.0, 0


def sample_rows(logits: torch.Tensor, plan, rows: Sequence[int]) -> torch.Tensor:
    """An id for every row of logits [R, V] of a step: plan.work[i]'s row is rows[i]; a sampled
    work's row is drawn by its own settings and index, every other row (a prefill chunk that draws
    nothing, a static step's padding) greedily. `plan`: a pyengine StepPlan."""
    settings: list[tuple[SamplingLike, int]] = [(_Greedy, 0)] * logits.shape[0]
    for w, row in zip(plan.work, rows):
        if w.sample:
            settings[row] = (w.sampling, w.index)
    return sample(logits, *pack_sampling(settings, logits.device))
